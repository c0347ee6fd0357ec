//! Sans-IO codec for the Postgres v3 frontend/backend protocol.
//!
//! `decode_*` take the connection's receive buffer, and either consume exactly one
//! frame and return its message, return `Ok(None)` when more bytes are needed
//! (nothing consumed), or return an error. Message payloads are `Bytes` slices of
//! the received frame: decoding copies no payload bytes.
//!
//! Fails closed: every length is checked against [`Limits`] before anything is
//! buffered for it, and no allocation is sized from a count the peer claims
//! without first checking that the bytes for it are present. A frontend message
//! type this codec does not know is an error (the client is either broken or
//! probing, and Postgres itself would end the session); an unknown backend
//! message type that is well framed is passed through as [`BackendMessage::Unknown`],
//! because the server is trusted to speak its own protocol and new servers add
//! types. A malformed message of a known type is an error on either side.

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

/// `SSLRequest` code (1234.5679).
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
/// `GSSENCRequest` code (1234.5680).
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
/// `CancelRequest` code (1234.5678).
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// Longest cancel key a server may send (protocol 3.2 allows up to 256 bytes).
pub const MAX_CANCEL_KEY_LEN: usize = 256;

/// Bytes a `Parse` message may carry beyond its SQL text: statement name and up to
/// 65535 parameter type OIDs.
const PARSE_OVERHEAD: usize = 64 * 1024 + 65_535 * 4 + 8;

/// Which peer sent the bytes: errors say where they came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client (downstream, the agent).
    Frontend,
    /// The server (upstream).
    Backend,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Frontend => "client (downstream)",
            Side::Backend => "server (upstream)",
        })
    }
}

/// A message type byte, displayed as a character when printable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tag(pub u8);

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() {
            write!(f, "'{}'", char::from(self.0))
        } else {
            write!(f, "0x{:02x}", self.0)
        }
    }
}

/// Explicit size limits on everything the codec accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest startup packet (`StartupMessage`, `SSLRequest`, ...), length word included.
    pub max_startup_len: usize,
    /// Largest SQL text in a `Query` or `Parse` message (the length handed to the SQL parser).
    pub max_sql_len: usize,
    /// Largest body of any other message, either direction (`DataRow`, `CopyData`, `Bind`, ...).
    pub max_message_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_startup_len: 10 * 1024,
            max_sql_len: 1024 * 1024,
            max_message_len: 64 * 1024 * 1024,
        }
    }
}

/// Why bytes could not be decoded. Every variant is fatal for the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("{side}: message {tag} claims length {len}, below the minimum of 4")]
    BadLength { side: Side, tag: Tag, len: i32 },
    #[error("{side}: message {tag} of {len} bytes exceeds the limit of {limit}")]
    TooLarge {
        side: Side,
        tag: Tag,
        len: usize,
        limit: usize,
    },
    #[error("{side}: startup packet claims length {len}, outside 8..={limit}")]
    BadStartupLength { side: Side, len: i32, limit: usize },
    #[error("{side}: unknown message type {tag}")]
    UnknownMessage { side: Side, tag: Tag },
    #[error("{side}: malformed {what} message: {reason}")]
    Malformed {
        side: Side,
        what: &'static str,
        reason: &'static str,
    },
    #[error("{side}: unsupported protocol version {major}.{minor}")]
    UnsupportedVersion { side: Side, major: u16, minor: u16 },
}

// ---------------------------------------------------------------------------
// Startup

/// Protocol version from a `StartupMessage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProtocolVersion {
    pub major: u16,
    pub minor: u16,
}

/// The first packet of a connection (no type byte).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    /// `StartupMessage`: version and parameters (`user`, `database`, `options`, ...).
    Startup {
        version: ProtocolVersion,
        params: Vec<(String, String)>,
    },
    /// `SSLRequest`: answer `S` or `N` with one byte.
    SslRequest,
    /// `GSSENCRequest`: answer `G` or `N` with one byte.
    GssEncRequest,
    /// `CancelRequest` with the key a backend gave in `BackendKeyData`.
    CancelRequest { pid: i32, secret: Bytes },
}

impl StartupPacket {
    /// The value of a startup parameter, if present.
    pub fn param(&self, name: &str) -> Option<&str> {
        match self {
            StartupPacket::Startup { params, .. } => params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str()),
            _ => None,
        }
    }

    pub fn encode(&self, dst: &mut BytesMut) {
        let start = dst.len();
        dst.put_i32(0);
        match self {
            StartupPacket::Startup { version, params } => {
                dst.put_u16(version.major);
                dst.put_u16(version.minor);
                for (k, v) in params {
                    put_cstr(dst, k.as_bytes());
                    put_cstr(dst, v.as_bytes());
                }
                dst.put_u8(0);
            }
            StartupPacket::SslRequest => dst.put_u32(SSL_REQUEST_CODE),
            StartupPacket::GssEncRequest => dst.put_u32(GSSENC_REQUEST_CODE),
            StartupPacket::CancelRequest { pid, secret } => {
                dst.put_u32(CANCEL_REQUEST_CODE);
                dst.put_i32(*pid);
                dst.put_slice(secret);
            }
        }
        patch_len(dst, start);
    }
}

/// Decode the first packet of a client connection (also after an `N` answer to
/// `SSLRequest`/`GSSENCRequest`).
pub fn decode_startup(
    buf: &mut BytesMut,
    limits: &Limits,
) -> Result<Option<StartupPacket>, ProtocolError> {
    const SIDE: Side = Side::Frontend;
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 8 || len as usize > limits.max_startup_len {
        return Err(ProtocolError::BadStartupLength {
            side: SIDE,
            len,
            limit: limits.max_startup_len,
        });
    }
    let len = len as usize;
    if buf.len() < len {
        return Ok(None);
    }
    let frame = buf.split_to(len).freeze();
    let mut r = Reader::new(frame.slice(4..), SIDE, "startup");
    let code = r.u32()?;
    let packet = match code {
        SSL_REQUEST_CODE => StartupPacket::SslRequest,
        GSSENC_REQUEST_CODE => StartupPacket::GssEncRequest,
        CANCEL_REQUEST_CODE => {
            r.what = "CancelRequest";
            let pid = r.i32()?;
            let secret = r.rest();
            if secret.len() < 4 || secret.len() > MAX_CANCEL_KEY_LEN {
                return Err(r.malformed("cancel key length outside 4..=256"));
            }
            return Ok(Some(StartupPacket::CancelRequest { pid, secret }));
        }
        _ => {
            let version = ProtocolVersion {
                major: (code >> 16) as u16,
                minor: (code & 0xffff) as u16,
            };
            if version.major != 3 {
                return Err(ProtocolError::UnsupportedVersion {
                    side: SIDE,
                    major: version.major,
                    minor: version.minor,
                });
            }
            r.what = "StartupMessage";
            let mut params = Vec::new();
            loop {
                let key = r.cstr()?;
                if key.is_empty() {
                    break;
                }
                let value = r.cstr()?;
                params.push((r.utf8(&key)?, r.utf8(&value)?));
            }
            r.finish()?;
            return Ok(Some(StartupPacket::Startup { version, params }));
        }
    };
    r.finish()?;
    Ok(Some(packet))
}

// ---------------------------------------------------------------------------
// Frontend messages

/// `Describe`/`Close` target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// `S`: a prepared statement.
    Statement,
    /// `P`: a portal.
    Portal,
}

impl Target {
    fn byte(self) -> u8 {
        match self {
            Target::Statement => b'S',
            Target::Portal => b'P',
        }
    }
}

/// A `Bind` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub portal: Bytes,
    pub statement: Bytes,
    pub param_formats: Vec<i16>,
    pub params: Vec<Option<Bytes>>,
    pub result_formats: Vec<i16>,
}

/// A message from the client, after startup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontendMessage {
    /// `Q`: simple query; `sql` without its terminating NUL.
    Query { sql: Bytes },
    /// `P`: `statement` empty for the unnamed statement.
    Parse {
        statement: Bytes,
        sql: Bytes,
        param_types: Vec<u32>,
    },
    /// `B`
    Bind(Bind),
    /// `D`
    Describe { target: Target, name: Bytes },
    /// `E`: `max_rows` 0 for all rows.
    Execute { portal: Bytes, max_rows: i32 },
    /// `C`
    Close { target: Target, name: Bytes },
    /// `S`
    Sync,
    /// `H`
    Flush,
    /// `X`
    Terminate,
    /// `d`
    CopyData(Bytes),
    /// `c`
    CopyDone,
    /// `f`
    CopyFail { message: Bytes },
    /// `p`: `PasswordMessage`, `SASLInitialResponse`, `SASLResponse` or
    /// `GSSResponse`; which one depends on the authentication exchange, so the
    /// body is kept whole (see [`SaslInitialResponse::parse`]).
    AuthResponse(Bytes),
    /// `F`: fast-path function call. Not parsed: it bypasses SQL, the proxy denies it.
    FunctionCall(Bytes),
}

/// Decode one client message after startup.
pub fn decode_frontend(
    buf: &mut BytesMut,
    limits: &Limits,
) -> Result<Option<FrontendMessage>, ProtocolError> {
    const SIDE: Side = Side::Frontend;
    let Some((tag, body_len)) = peek_header(buf, SIDE)? else {
        return Ok(None);
    };
    let limit = match tag {
        b'Q' => limits.max_sql_len.saturating_add(1),
        b'P' => limits.max_sql_len.saturating_add(PARSE_OVERHEAD),
        b'B' | b'D' | b'E' | b'C' | b'S' | b'H' | b'X' | b'd' | b'c' | b'f' | b'p' | b'F' => {
            limits.max_message_len
        }
        _ => {
            return Err(ProtocolError::UnknownMessage {
                side: SIDE,
                tag: Tag(tag),
            });
        }
    };
    if body_len > limit {
        return Err(ProtocolError::TooLarge {
            side: SIDE,
            tag: Tag(tag),
            len: body_len,
            limit,
        });
    }
    if buf.len() < 5 + body_len {
        return Ok(None);
    }
    let frame = buf.split_to(5 + body_len).freeze();
    parse_frontend(tag, frame.slice(5..), limits).map(Some)
}

#[allow(clippy::too_many_lines)] // one arm per message type reads best as one match
fn parse_frontend(tag: u8, body: Bytes, limits: &Limits) -> Result<FrontendMessage, ProtocolError> {
    let side = Side::Frontend;
    let msg = match tag {
        b'Q' => {
            let mut r = Reader::new(body, side, "Query");
            let sql = r.cstr()?;
            r.finish()?;
            check_sql_len(&sql, limits, "Query")?;
            FrontendMessage::Query { sql }
        }
        b'P' => {
            let mut r = Reader::new(body, side, "Parse");
            let statement = r.cstr()?;
            let sql = r.cstr()?;
            check_sql_len(&sql, limits, "Parse")?;
            let n = r.count16()?;
            let mut param_types = Vec::with_capacity(r.bounded(n, 4));
            for _ in 0..n {
                param_types.push(r.u32()?);
            }
            r.finish()?;
            FrontendMessage::Parse {
                statement,
                sql,
                param_types,
            }
        }
        b'B' => {
            let mut r = Reader::new(body, side, "Bind");
            let portal = r.cstr()?;
            let statement = r.cstr()?;
            let param_formats = r.i16_array()?;
            let n = r.count16()?;
            let mut params = Vec::with_capacity(r.bounded(n, 4));
            for _ in 0..n {
                params.push(r.value()?);
            }
            let result_formats = r.i16_array()?;
            r.finish()?;
            if param_formats
                .iter()
                .chain(&result_formats)
                .any(|f| !(0..=1).contains(f))
            {
                return Err(r.malformed("format code other than 0 or 1"));
            }
            if param_formats.len() > 1 && param_formats.len() != params.len() {
                return Err(r.malformed("parameter format count does not match parameters"));
            }
            FrontendMessage::Bind(Bind {
                portal,
                statement,
                param_formats,
                params,
                result_formats,
            })
        }
        b'D' | b'C' => {
            let what = if tag == b'D' { "Describe" } else { "Close" };
            let mut r = Reader::new(body, side, what);
            let target = match r.u8()? {
                b'S' => Target::Statement,
                b'P' => Target::Portal,
                _ => return Err(r.malformed("target is neither 'S' nor 'P'")),
            };
            let name = r.cstr()?;
            r.finish()?;
            if tag == b'D' {
                FrontendMessage::Describe { target, name }
            } else {
                FrontendMessage::Close { target, name }
            }
        }
        b'E' => {
            let mut r = Reader::new(body, side, "Execute");
            let portal = r.cstr()?;
            let max_rows = r.i32()?;
            r.finish()?;
            FrontendMessage::Execute { portal, max_rows }
        }
        b'S' | b'H' | b'X' | b'c' => {
            let what = match tag {
                b'S' => "Sync",
                b'H' => "Flush",
                b'X' => "Terminate",
                _ => "CopyDone",
            };
            Reader::new(body, side, what).finish()?;
            match tag {
                b'S' => FrontendMessage::Sync,
                b'H' => FrontendMessage::Flush,
                b'X' => FrontendMessage::Terminate,
                _ => FrontendMessage::CopyDone,
            }
        }
        b'd' => FrontendMessage::CopyData(body),
        b'f' => {
            let mut r = Reader::new(body, side, "CopyFail");
            let message = r.cstr()?;
            r.finish()?;
            FrontendMessage::CopyFail { message }
        }
        b'p' => FrontendMessage::AuthResponse(body),
        b'F' => FrontendMessage::FunctionCall(body),
        _ => {
            return Err(ProtocolError::UnknownMessage {
                side,
                tag: Tag(tag),
            });
        }
    };
    Ok(msg)
}

fn check_sql_len(sql: &Bytes, limits: &Limits, what: &'static str) -> Result<(), ProtocolError> {
    if sql.len() > limits.max_sql_len {
        return Err(ProtocolError::TooLarge {
            side: Side::Frontend,
            tag: Tag(if what == "Query" { b'Q' } else { b'P' }),
            len: sql.len(),
            limit: limits.max_sql_len,
        });
    }
    Ok(())
}

impl FrontendMessage {
    /// The message type byte.
    pub fn tag(&self) -> u8 {
        match self {
            FrontendMessage::Query { .. } => b'Q',
            FrontendMessage::Parse { .. } => b'P',
            FrontendMessage::Bind(_) => b'B',
            FrontendMessage::Describe { .. } => b'D',
            FrontendMessage::Execute { .. } => b'E',
            FrontendMessage::Close { .. } => b'C',
            FrontendMessage::Sync => b'S',
            FrontendMessage::Flush => b'H',
            FrontendMessage::Terminate => b'X',
            FrontendMessage::CopyData(_) => b'd',
            FrontendMessage::CopyDone => b'c',
            FrontendMessage::CopyFail { .. } => b'f',
            FrontendMessage::AuthResponse(_) => b'p',
            FrontendMessage::FunctionCall(_) => b'F',
        }
    }

    /// Append the framed message to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        let start = begin_frame(dst, self.tag());
        match self {
            FrontendMessage::Query { sql } => put_cstr(dst, sql),
            FrontendMessage::Parse {
                statement,
                sql,
                param_types,
            } => {
                put_cstr(dst, statement);
                put_cstr(dst, sql);
                dst.put_u16(param_types.len() as u16);
                for t in param_types {
                    dst.put_u32(*t);
                }
            }
            FrontendMessage::Bind(b) => {
                put_cstr(dst, &b.portal);
                put_cstr(dst, &b.statement);
                put_i16_array(dst, &b.param_formats);
                dst.put_u16(b.params.len() as u16);
                for p in &b.params {
                    put_value(dst, p.as_deref());
                }
                put_i16_array(dst, &b.result_formats);
            }
            FrontendMessage::Describe { target, name }
            | FrontendMessage::Close { target, name } => {
                dst.put_u8(target.byte());
                put_cstr(dst, name);
            }
            FrontendMessage::Execute { portal, max_rows } => {
                put_cstr(dst, portal);
                dst.put_i32(*max_rows);
            }
            FrontendMessage::Sync
            | FrontendMessage::Flush
            | FrontendMessage::Terminate
            | FrontendMessage::CopyDone => {}
            FrontendMessage::CopyData(b)
            | FrontendMessage::AuthResponse(b)
            | FrontendMessage::FunctionCall(b) => dst.put_slice(b),
            FrontendMessage::CopyFail { message } => put_cstr(dst, message),
        }
        patch_len(dst, start + 1);
    }
}

/// A `SASLInitialResponse` (the first `p` message of a SASL exchange).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaslInitialResponse {
    pub mechanism: Bytes,
    /// `None` when the client sent length -1.
    pub data: Option<Bytes>,
}

impl SaslInitialResponse {
    /// Parse the body of an [`FrontendMessage::AuthResponse`] sent right after
    /// `AuthenticationSASL`.
    pub fn parse(body: &Bytes) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(body.clone(), Side::Frontend, "SASLInitialResponse");
        let mechanism = r.cstr()?;
        let data = r.value()?;
        r.finish()?;
        Ok(Self { mechanism, data })
    }
}

// ---------------------------------------------------------------------------
// Backend messages

/// Transaction status from `ReadyForQuery`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TxStatus {
    /// `I`: not in a transaction block.
    #[default]
    Idle,
    /// `T`: in a transaction block.
    InBlock,
    /// `E`: in a failed transaction block (statements rejected until it ends).
    Failed,
}

impl TxStatus {
    pub fn byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InBlock => b'T',
            TxStatus::Failed => b'E',
        }
    }
}

/// An `Authentication*` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication {
    /// 0
    Ok,
    /// 3
    CleartextPassword,
    /// 5
    Md5Password { salt: [u8; 4] },
    /// 10: mechanisms offered (e.g. `SCRAM-SHA-256`, `SCRAM-SHA-256-PLUS`).
    Sasl { mechanisms: Vec<Bytes> },
    /// 11
    SaslContinue(Bytes),
    /// 12
    SaslFinal(Bytes),
    /// Anything else (Kerberos 2, GSS 7, GSS continue 8, SSPI 9), kept raw.
    Other { code: i32, data: Bytes },
}

/// Fields of an `ErrorResponse` or `NoticeResponse`, in wire order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ErrorFields {
    pub fields: Vec<(u8, Bytes)>,
}

impl ErrorFields {
    /// Severity `S`/`V`, SQLSTATE `C` and message `M`.
    pub fn new(severity: &str, sqlstate: &str, message: &str) -> Self {
        let mut fields = Vec::with_capacity(6);
        fields.push((b'S', Bytes::copy_from_slice(severity.as_bytes())));
        fields.push((b'V', Bytes::copy_from_slice(severity.as_bytes())));
        fields.push((b'C', Bytes::copy_from_slice(sqlstate.as_bytes())));
        fields.push((b'M', Bytes::copy_from_slice(message.as_bytes())));
        Self { fields }
    }

    /// Add the detail field `D`.
    #[must_use]
    pub fn with_detail(mut self, detail: &str) -> Self {
        self.fields
            .push((b'D', Bytes::copy_from_slice(detail.as_bytes())));
        self
    }

    /// Add the hint field `H`.
    #[must_use]
    pub fn with_hint(mut self, hint: &str) -> Self {
        self.fields
            .push((b'H', Bytes::copy_from_slice(hint.as_bytes())));
        self
    }

    /// The first field of this type.
    pub fn get(&self, code: u8) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| &v[..])
    }

    /// SQLSTATE (`C`).
    pub fn sqlstate(&self) -> Option<&[u8]> {
        self.get(b'C')
    }

    /// Non-localized severity (`V`), or the localized one (`S`).
    pub fn severity(&self) -> Option<&[u8]> {
        self.get(b'V').or_else(|| self.get(b'S'))
    }

    fn encode_body(&self, dst: &mut BytesMut) {
        for (code, value) in &self.fields {
            dst.put_u8(*code);
            put_cstr(dst, value);
        }
        dst.put_u8(0);
    }
}

/// One column of a `RowDescription`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldDescription {
    pub name: Bytes,
    /// OID of the table the column comes from, 0 if none.
    pub table_oid: u32,
    /// Attribute number in that table, 0 if none.
    pub column_attr: i16,
    pub type_oid: u32,
    pub type_size: i16,
    pub type_modifier: i32,
    /// 0 text, 1 binary. Zero (unknown yet) in a `Describe` of a statement.
    pub format: i16,
}

/// A `RowDescription`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RowDescription {
    pub fields: Vec<FieldDescription>,
}

/// A `DataRow`, kept as its validated body: fields are read by [`DataRow::fields`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataRow {
    count: u16,
    body: Bytes,
}

impl DataRow {
    /// Build a row from field values (`None` is SQL NULL).
    pub fn from_fields<'a, I>(fields: I) -> Self
    where
        I: IntoIterator<Item = Option<&'a [u8]>>,
    {
        let mut body = BytesMut::new();
        body.put_u16(0);
        let mut count: u16 = 0;
        for f in fields {
            put_value(&mut body, f);
            count += 1;
        }
        body[0..2].copy_from_slice(&count.to_be_bytes());
        Self {
            count,
            body: body.freeze(),
        }
    }

    /// Wrap a body that [`DataRow::validate`]d. Used by the masker, which writes
    /// bodies itself.
    pub(crate) fn from_valid_body(count: u16, body: Bytes) -> Self {
        Self { count, body }
    }

    /// Number of fields.
    pub fn len(&self) -> usize {
        usize::from(self.count)
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The message body (field count and fields).
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// The field values in order; `None` is SQL NULL.
    pub fn fields(&self) -> DataRowFields<'_> {
        DataRowFields {
            rest: &self.body[2..],
            left: self.count,
        }
    }

    fn validate(body: Bytes) -> Result<Self, ProtocolError> {
        let mut r = Reader::new(body, Side::Backend, "DataRow");
        let count = r.count16()?;
        for _ in 0..count {
            let len = r.i32()?;
            if len >= 0 {
                r.skip(len as usize)?;
            } else if len != -1 {
                return Err(r.malformed("field length below -1"));
            }
        }
        r.finish()?;
        Ok(Self {
            count: count as u16,
            body: r.all,
        })
    }
}

/// Iterator over a validated `DataRow`'s fields.
#[derive(Debug, Clone)]
pub struct DataRowFields<'a> {
    rest: &'a [u8],
    left: u16,
}

impl<'a> Iterator for DataRowFields<'a> {
    type Item = Option<&'a [u8]>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 || self.rest.len() < 4 {
            return None;
        }
        self.left -= 1;
        let len = i32::from_be_bytes([self.rest[0], self.rest[1], self.rest[2], self.rest[3]]);
        self.rest = &self.rest[4..];
        if len < 0 {
            return Some(None);
        }
        let len = (len as usize).min(self.rest.len());
        let (value, rest) = self.rest.split_at(len);
        self.rest = rest;
        Some(Some(value))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (usize::from(self.left), Some(usize::from(self.left)))
    }
}

/// Overall and per-column formats of a `Copy*Response`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyFormat {
    /// 0 text (or CSV: the protocol does not say which), 1 binary.
    pub overall: i8,
    pub columns: Vec<i16>,
}

/// A message from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendMessage {
    /// `R`
    Authentication(Authentication),
    /// `K`: secret is 4 bytes in protocol 3.0, up to 256 in 3.2.
    BackendKeyData { pid: i32, secret: Bytes },
    /// `S`
    ParameterStatus { name: Bytes, value: Bytes },
    /// `Z`
    ReadyForQuery(TxStatus),
    /// `T`
    RowDescription(RowDescription),
    /// `D`
    DataRow(DataRow),
    /// `C`: command tag, e.g. `SELECT 3`.
    CommandComplete { tag: Bytes },
    /// `I`
    EmptyQueryResponse,
    /// `1`
    ParseComplete,
    /// `2`
    BindComplete,
    /// `3`
    CloseComplete,
    /// `n`
    NoData,
    /// `s`
    PortalSuspended,
    /// `t`
    ParameterDescription { types: Vec<u32> },
    /// `E`
    ErrorResponse(ErrorFields),
    /// `N`
    NoticeResponse(ErrorFields),
    /// `A`
    NotificationResponse {
        pid: i32,
        channel: Bytes,
        payload: Bytes,
    },
    /// `G`
    CopyInResponse(CopyFormat),
    /// `H`
    CopyOutResponse(CopyFormat),
    /// `W`
    CopyBothResponse(CopyFormat),
    /// `d`
    CopyData(Bytes),
    /// `c`
    CopyDone,
    /// `v`
    NegotiateProtocolVersion {
        newest_minor: i32,
        unrecognized: Vec<Bytes>,
    },
    /// `V`: kept raw (the proxy denies function calls, so none should come back).
    FunctionCallResponse(Bytes),
    /// A well-framed message of a type this codec does not know.
    Unknown { tag: u8, body: Bytes },
}

/// Decode one server message.
pub fn decode_backend(
    buf: &mut BytesMut,
    limits: &Limits,
) -> Result<Option<BackendMessage>, ProtocolError> {
    const SIDE: Side = Side::Backend;
    let Some((tag, body_len)) = peek_header(buf, SIDE)? else {
        return Ok(None);
    };
    if body_len > limits.max_message_len {
        return Err(ProtocolError::TooLarge {
            side: SIDE,
            tag: Tag(tag),
            len: body_len,
            limit: limits.max_message_len,
        });
    }
    if buf.len() < 5 + body_len {
        return Ok(None);
    }
    let frame = buf.split_to(5 + body_len).freeze();
    parse_backend(tag, frame.slice(5..)).map(Some)
}

#[allow(clippy::too_many_lines)] // one arm per message type reads best as one match
fn parse_backend(tag: u8, body: Bytes) -> Result<BackendMessage, ProtocolError> {
    let side = Side::Backend;
    let empty = |body: Bytes, what: &'static str, msg: BackendMessage| {
        Reader::new(body, side, what).finish().map(|()| msg)
    };
    let msg = match tag {
        b'R' => {
            let mut r = Reader::new(body, side, "Authentication");
            let code = r.i32()?;
            let auth = match code {
                0 => Authentication::Ok,
                3 => Authentication::CleartextPassword,
                5 => {
                    let s = r.take(4)?;
                    Authentication::Md5Password {
                        salt: [s[0], s[1], s[2], s[3]],
                    }
                }
                10 => {
                    let mut mechanisms = Vec::new();
                    loop {
                        let m = r.cstr()?;
                        if m.is_empty() {
                            break;
                        }
                        mechanisms.push(m);
                    }
                    Authentication::Sasl { mechanisms }
                }
                11 => Authentication::SaslContinue(r.rest()),
                12 => Authentication::SaslFinal(r.rest()),
                _ => Authentication::Other {
                    code,
                    data: r.rest(),
                },
            };
            r.finish()?;
            BackendMessage::Authentication(auth)
        }
        b'K' => {
            let mut r = Reader::new(body, side, "BackendKeyData");
            let pid = r.i32()?;
            let secret = r.rest();
            if secret.len() < 4 || secret.len() > MAX_CANCEL_KEY_LEN {
                return Err(r.malformed("cancel key length outside 4..=256"));
            }
            BackendMessage::BackendKeyData { pid, secret }
        }
        b'S' => {
            let mut r = Reader::new(body, side, "ParameterStatus");
            let name = r.cstr()?;
            let value = r.cstr()?;
            r.finish()?;
            BackendMessage::ParameterStatus { name, value }
        }
        b'Z' => {
            let mut r = Reader::new(body, side, "ReadyForQuery");
            let status = match r.u8()? {
                b'I' => TxStatus::Idle,
                b'T' => TxStatus::InBlock,
                b'E' => TxStatus::Failed,
                _ => return Err(r.malformed("unknown transaction status")),
            };
            r.finish()?;
            BackendMessage::ReadyForQuery(status)
        }
        b'T' => {
            let mut r = Reader::new(body, side, "RowDescription");
            let n = r.count16()?;
            let mut fields = Vec::with_capacity(r.bounded(n, 19));
            for _ in 0..n {
                let name = r.cstr()?;
                let table_oid = r.u32()?;
                let column_attr = r.i16()?;
                let type_oid = r.u32()?;
                let type_size = r.i16()?;
                let type_modifier = r.i32()?;
                let format = r.i16()?;
                fields.push(FieldDescription {
                    name,
                    table_oid,
                    column_attr,
                    type_oid,
                    type_size,
                    type_modifier,
                    format,
                });
            }
            r.finish()?;
            BackendMessage::RowDescription(RowDescription { fields })
        }
        b'D' => BackendMessage::DataRow(DataRow::validate(body)?),
        b'C' => {
            let mut r = Reader::new(body, side, "CommandComplete");
            let tag = r.cstr()?;
            r.finish()?;
            BackendMessage::CommandComplete { tag }
        }
        b'I' => empty(
            body,
            "EmptyQueryResponse",
            BackendMessage::EmptyQueryResponse,
        )?,
        b'1' => empty(body, "ParseComplete", BackendMessage::ParseComplete)?,
        b'2' => empty(body, "BindComplete", BackendMessage::BindComplete)?,
        b'3' => empty(body, "CloseComplete", BackendMessage::CloseComplete)?,
        b'n' => empty(body, "NoData", BackendMessage::NoData)?,
        b's' => empty(body, "PortalSuspended", BackendMessage::PortalSuspended)?,
        b'c' => empty(body, "CopyDone", BackendMessage::CopyDone)?,
        b't' => {
            let mut r = Reader::new(body, side, "ParameterDescription");
            let n = r.count16()?;
            let mut types = Vec::with_capacity(r.bounded(n, 4));
            for _ in 0..n {
                types.push(r.u32()?);
            }
            r.finish()?;
            BackendMessage::ParameterDescription { types }
        }
        b'E' | b'N' => {
            let what = if tag == b'E' {
                "ErrorResponse"
            } else {
                "NoticeResponse"
            };
            let mut r = Reader::new(body, side, what);
            let mut fields = Vec::new();
            loop {
                let code = r.u8()?;
                if code == 0 {
                    break;
                }
                fields.push((code, r.cstr()?));
            }
            r.finish()?;
            let f = ErrorFields { fields };
            if tag == b'E' {
                BackendMessage::ErrorResponse(f)
            } else {
                BackendMessage::NoticeResponse(f)
            }
        }
        b'A' => {
            let mut r = Reader::new(body, side, "NotificationResponse");
            let pid = r.i32()?;
            let channel = r.cstr()?;
            let payload = r.cstr()?;
            r.finish()?;
            BackendMessage::NotificationResponse {
                pid,
                channel,
                payload,
            }
        }
        b'G' | b'H' | b'W' => {
            let mut r = Reader::new(body, side, "Copy*Response");
            let overall = r.u8()? as i8;
            let columns = r.i16_array()?;
            r.finish()?;
            if !(0..=1).contains(&overall) || columns.iter().any(|f| !(0..=1).contains(f)) {
                return Err(r.malformed("format code other than 0 or 1"));
            }
            let f = CopyFormat { overall, columns };
            match tag {
                b'G' => BackendMessage::CopyInResponse(f),
                b'H' => BackendMessage::CopyOutResponse(f),
                _ => BackendMessage::CopyBothResponse(f),
            }
        }
        b'd' => BackendMessage::CopyData(body),
        b'v' => {
            let mut r = Reader::new(body, side, "NegotiateProtocolVersion");
            let newest_minor = r.i32()?;
            let n = r.count32()?;
            let mut unrecognized = Vec::with_capacity(r.bounded(n, 1));
            for _ in 0..n {
                unrecognized.push(r.cstr()?);
            }
            r.finish()?;
            BackendMessage::NegotiateProtocolVersion {
                newest_minor,
                unrecognized,
            }
        }
        b'V' => BackendMessage::FunctionCallResponse(body),
        _ => BackendMessage::Unknown { tag, body },
    };
    Ok(msg)
}

impl BackendMessage {
    /// The message type byte.
    pub fn tag(&self) -> u8 {
        match self {
            BackendMessage::Authentication(_) => b'R',
            BackendMessage::BackendKeyData { .. } => b'K',
            BackendMessage::ParameterStatus { .. } => b'S',
            BackendMessage::ReadyForQuery(_) => b'Z',
            BackendMessage::RowDescription(_) => b'T',
            BackendMessage::DataRow(_) => b'D',
            BackendMessage::CommandComplete { .. } => b'C',
            BackendMessage::EmptyQueryResponse => b'I',
            BackendMessage::ParseComplete => b'1',
            BackendMessage::BindComplete => b'2',
            BackendMessage::CloseComplete => b'3',
            BackendMessage::NoData => b'n',
            BackendMessage::PortalSuspended => b's',
            BackendMessage::ParameterDescription { .. } => b't',
            BackendMessage::ErrorResponse(_) => b'E',
            BackendMessage::NoticeResponse(_) => b'N',
            BackendMessage::NotificationResponse { .. } => b'A',
            BackendMessage::CopyInResponse(_) => b'G',
            BackendMessage::CopyOutResponse(_) => b'H',
            BackendMessage::CopyBothResponse(_) => b'W',
            BackendMessage::CopyData(_) => b'd',
            BackendMessage::CopyDone => b'c',
            BackendMessage::NegotiateProtocolVersion { .. } => b'v',
            BackendMessage::FunctionCallResponse(_) => b'V',
            BackendMessage::Unknown { tag, .. } => *tag,
        }
    }

    /// Append the framed message to `dst`.
    pub fn encode(&self, dst: &mut BytesMut) {
        let start = begin_frame(dst, self.tag());
        match self {
            BackendMessage::Authentication(a) => match a {
                Authentication::Ok => dst.put_i32(0),
                Authentication::CleartextPassword => dst.put_i32(3),
                Authentication::Md5Password { salt } => {
                    dst.put_i32(5);
                    dst.put_slice(salt);
                }
                Authentication::Sasl { mechanisms } => {
                    dst.put_i32(10);
                    for m in mechanisms {
                        put_cstr(dst, m);
                    }
                    dst.put_u8(0);
                }
                Authentication::SaslContinue(d) => {
                    dst.put_i32(11);
                    dst.put_slice(d);
                }
                Authentication::SaslFinal(d) => {
                    dst.put_i32(12);
                    dst.put_slice(d);
                }
                Authentication::Other { code, data } => {
                    dst.put_i32(*code);
                    dst.put_slice(data);
                }
            },
            BackendMessage::BackendKeyData { pid, secret } => {
                dst.put_i32(*pid);
                dst.put_slice(secret);
            }
            BackendMessage::ParameterStatus { name, value } => {
                put_cstr(dst, name);
                put_cstr(dst, value);
            }
            BackendMessage::ReadyForQuery(s) => dst.put_u8(s.byte()),
            BackendMessage::RowDescription(d) => {
                dst.put_u16(d.fields.len() as u16);
                for f in &d.fields {
                    put_cstr(dst, &f.name);
                    dst.put_u32(f.table_oid);
                    dst.put_i16(f.column_attr);
                    dst.put_u32(f.type_oid);
                    dst.put_i16(f.type_size);
                    dst.put_i32(f.type_modifier);
                    dst.put_i16(f.format);
                }
            }
            BackendMessage::DataRow(r) => dst.put_slice(&r.body),
            BackendMessage::CommandComplete { tag } => put_cstr(dst, tag),
            BackendMessage::EmptyQueryResponse
            | BackendMessage::ParseComplete
            | BackendMessage::BindComplete
            | BackendMessage::CloseComplete
            | BackendMessage::NoData
            | BackendMessage::PortalSuspended
            | BackendMessage::CopyDone => {}
            BackendMessage::ParameterDescription { types } => {
                dst.put_u16(types.len() as u16);
                for t in types {
                    dst.put_u32(*t);
                }
            }
            BackendMessage::ErrorResponse(f) | BackendMessage::NoticeResponse(f) => {
                f.encode_body(dst);
            }
            BackendMessage::NotificationResponse {
                pid,
                channel,
                payload,
            } => {
                dst.put_i32(*pid);
                put_cstr(dst, channel);
                put_cstr(dst, payload);
            }
            BackendMessage::CopyInResponse(f)
            | BackendMessage::CopyOutResponse(f)
            | BackendMessage::CopyBothResponse(f) => {
                dst.put_i8(f.overall);
                put_i16_array(dst, &f.columns);
            }
            BackendMessage::CopyData(b)
            | BackendMessage::FunctionCallResponse(b)
            | BackendMessage::Unknown { body: b, .. } => dst.put_slice(b),
            BackendMessage::NegotiateProtocolVersion {
                newest_minor,
                unrecognized,
            } => {
                dst.put_i32(*newest_minor);
                dst.put_i32(unrecognized.len() as i32);
                for u in unrecognized {
                    put_cstr(dst, u);
                }
            }
        }
        patch_len(dst, start + 1);
    }

    /// Convenience: the encoded bytes of this message.
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::new();
        self.encode(&mut b);
        b.freeze()
    }
}

// ---------------------------------------------------------------------------
// Framing helpers

/// Type byte and body length of the next frame, or `None` if the header is not
/// all here yet. Checks the length word; never looks at the body.
fn peek_header(buf: &[u8], side: Side) -> Result<Option<(u8, usize)>, ProtocolError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(ProtocolError::BadLength {
            side,
            tag: Tag(tag),
            len,
        });
    }
    Ok(Some((tag, len as usize - 4)))
}

fn begin_frame(dst: &mut BytesMut, tag: u8) -> usize {
    let start = dst.len();
    dst.put_u8(tag);
    dst.put_i32(0);
    start
}

/// Write the length word at `len_at` covering everything from there to the end.
fn patch_len(dst: &mut BytesMut, len_at: usize) {
    let len = (dst.len() - len_at) as i32;
    dst[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(dst: &mut BytesMut, s: &[u8]) {
    dst.put_slice(s);
    dst.put_u8(0);
}

fn put_value(dst: &mut BytesMut, v: Option<&[u8]>) {
    match v {
        None => dst.put_i32(-1),
        Some(v) => {
            dst.put_i32(v.len() as i32);
            dst.put_slice(v);
        }
    }
}

fn put_i16_array(dst: &mut BytesMut, a: &[i16]) {
    dst.put_u16(a.len() as u16);
    for v in a {
        dst.put_i16(*v);
    }
}

/// Bounds-checked reader over a message body.
struct Reader {
    all: Bytes,
    pos: usize,
    side: Side,
    what: &'static str,
}

impl Reader {
    fn new(all: Bytes, side: Side, what: &'static str) -> Self {
        Self {
            all,
            pos: 0,
            side,
            what,
        }
    }

    fn malformed(&self, reason: &'static str) -> ProtocolError {
        ProtocolError::Malformed {
            side: self.side,
            what: self.what,
            reason,
        }
    }

    fn remaining(&self) -> usize {
        self.all.len() - self.pos
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtocolError> {
        if self.remaining() < N {
            return Err(self.malformed("truncated"));
        }
        let mut a = [0u8; N];
        a.copy_from_slice(&self.all[self.pos..self.pos + N]);
        self.pos += N;
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, ProtocolError> {
        Ok(self.array::<1>()?[0])
    }

    fn i16(&mut self) -> Result<i16, ProtocolError> {
        Ok(i16::from_be_bytes(self.array()?))
    }

    fn i32(&mut self) -> Result<i32, ProtocolError> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, ProtocolError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    /// A 16-bit count, which must not be negative.
    fn count16(&mut self) -> Result<usize, ProtocolError> {
        let n = self.i16()?;
        if n < 0 {
            return Err(self.malformed("negative count"));
        }
        Ok(n as usize)
    }

    fn count32(&mut self) -> Result<usize, ProtocolError> {
        let n = self.i32()?;
        if n < 0 {
            return Err(self.malformed("negative count"));
        }
        Ok(n as usize)
    }

    /// Capacity to reserve for `n` items of at least `min_size` bytes each: never
    /// more than the bytes present can hold, so a lying count allocates nothing big.
    fn bounded(&self, n: usize, min_size: usize) -> usize {
        n.min(self.remaining() / min_size.max(1))
    }

    fn take(&mut self, n: usize) -> Result<Bytes, ProtocolError> {
        if self.remaining() < n {
            return Err(self.malformed("truncated"));
        }
        let b = self.all.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(b)
    }

    fn skip(&mut self, n: usize) -> Result<(), ProtocolError> {
        if self.remaining() < n {
            return Err(self.malformed("truncated"));
        }
        self.pos += n;
        Ok(())
    }

    /// A NUL-terminated string, without the NUL.
    fn cstr(&mut self) -> Result<Bytes, ProtocolError> {
        let Some(nul) = self.all[self.pos..].iter().position(|&b| b == 0) else {
            return Err(self.malformed("string without NUL terminator"));
        };
        let s = self.all.slice(self.pos..self.pos + nul);
        self.pos += nul + 1;
        Ok(s)
    }

    /// An Int32 length (-1 for NULL) followed by that many bytes.
    fn value(&mut self) -> Result<Option<Bytes>, ProtocolError> {
        let len = self.i32()?;
        match len {
            -1 => Ok(None),
            l if l < 0 => Err(self.malformed("value length below -1")),
            l => self.take(l as usize).map(Some),
        }
    }

    fn i16_array(&mut self) -> Result<Vec<i16>, ProtocolError> {
        let n = self.count16()?;
        let mut v = Vec::with_capacity(self.bounded(n, 2));
        for _ in 0..n {
            v.push(self.i16()?);
        }
        Ok(v)
    }

    fn rest(&mut self) -> Bytes {
        let b = self.all.slice(self.pos..);
        self.pos = self.all.len();
        b
    }

    fn utf8(&self, b: &Bytes) -> Result<String, ProtocolError> {
        String::from_utf8(b.to_vec()).map_err(|_| self.malformed("parameter is not UTF-8"))
    }

    fn finish(&self) -> Result<(), ProtocolError> {
        if self.remaining() == 0 {
            Ok(())
        } else {
            Err(self.malformed("trailing bytes"))
        }
    }
}
