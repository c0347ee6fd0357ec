//! Sans-IO pieces of the `MySQL` client/server protocol, on `mysql_common`.
//!
//! Framing is `mysql_common`'s [`PacketCodec`]: it joins the 16 MiB chunks of
//! a long packet, enforces the packet limit and checks sequence ids. One
//! [`Framer`] per side of the proxy re-frames every packet, so each side
//! keeps its own sequence ids (the proxy can answer a command itself, or add
//! a TLS request upstream, without renumbering by hand). Packet bodies are
//! parsed with `mysql_common`'s types (greeting, handshake response, column
//! definitions) and `ParseBuf`'s checked reads; what this file adds is the
//! state machine of a command's reply ([`Response`]) and rows.
//!
//! Fails closed: every length is checked before it is used; a packet that
//! does not parse, a sequence id out of order or a packet over
//! [`Limits::max_packet`] is an error, never skipped.

use bytes::BytesMut;
use mysql_common::{
    constants::{CapabilityFlags, ColumnType},
    io::ParseBuf,
    packets::{Column, HandshakePacket, HandshakeResponse},
    proto::codec::{PacketCodec, error::PacketCodecError},
};

/// `SERVER_MORE_RESULTS_EXISTS`: another result of the same command follows.
pub const MORE_RESULTS: u16 = 0x0008;
/// Most columns a result may have (`MySQL` allows 4096 per table; joins more).
pub const MAX_COLUMNS: u64 = 65_535;
/// `CLIENT_QUERY_ATTRIBUTES` (`MySQL` 8): `COM_QUERY` carries parameters.
const CLIENT_QUERY_ATTRIBUTES: u32 = 0x0800_0000;

/// Explicit limits on what the proxy accepts.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest packet (after joining 16 MiB chunks) from either side.
    pub max_packet: usize,
    /// Largest SQL text handed to the classifier (longer text is refused).
    pub max_sql_len: usize,
    /// Largest packet during authentication (greeting, handshake, auth data).
    pub max_auth_packet: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_packet: 64 * 1024 * 1024,
            max_sql_len: 1024 * 1024,
            max_auth_packet: 64 * 1024,
        }
    }
}

/// Why bytes could not be handled.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("packet over the {max}-byte limit")]
    TooLarge { max: usize },
    #[error("packet sequence id out of order")]
    OutOfSync,
    #[error("malformed {what}")]
    Malformed { what: &'static str },
    #[error("{what}")]
    Unsupported { what: String },
}

fn malformed(what: &'static str) -> ProtocolError {
    ProtocolError::Malformed { what }
}

/// One side's framing: decodes whole packets (chunks joined) and encodes
/// payloads (split at 16 MiB), numbering them.
#[derive(Debug)]
pub struct Framer {
    codec: PacketCodec,
    partial: BytesMut,
}

impl Framer {
    pub fn new(max_packet: usize) -> Self {
        let mut codec = PacketCodec::default();
        codec.max_allowed_packet = max_packet;
        Self {
            codec,
            partial: BytesMut::new(),
        }
    }

    /// A new command: sequence ids start again at 0.
    pub fn reset(&mut self) {
        self.codec.reset_seq_id();
    }

    pub fn set_max_packet(&mut self, max: usize) {
        self.codec.max_allowed_packet = max;
    }

    /// The next whole packet's payload, or `None` until more bytes come.
    pub fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, ProtocolError> {
        match self.codec.decode(src, &mut self.partial) {
            Ok(true) => Ok(Some(std::mem::take(&mut self.partial))),
            Ok(false) => Ok(None),
            Err(e) => Err(codec_error(&e, self.codec.max_allowed_packet)),
        }
    }

    /// Appends `payload` to `dst` as the next packet(s).
    pub fn encode(&mut self, payload: &[u8], dst: &mut BytesMut) -> Result<(), ProtocolError> {
        let mut src = payload;
        self.codec
            .encode(&mut src, dst)
            .map_err(|e| codec_error(&e, self.codec.max_allowed_packet))
    }
}

fn codec_error(e: &PacketCodecError, max: usize) -> ProtocolError {
    match e {
        PacketCodecError::PacketTooLarge => ProtocolError::TooLarge { max },
        PacketCodecError::PacketsOutOfSync => ProtocolError::OutOfSync,
        PacketCodecError::Io(_) | PacketCodecError::BadCompressedPacketHeader => {
            malformed("packet framing")
        }
    }
}

// ---------------------------------------------------------------------------
// Handshake

/// What the proxy keeps of the server's greeting.
#[derive(Debug, Clone)]
pub struct Greeting {
    pub server_version: String,
    pub connection_id: u32,
    /// Capabilities as sent on to the client (after [`rewrite_greeting`]).
    pub capabilities: CapabilityFlags,
    /// What the server itself offered.
    pub server_capabilities: CapabilityFlags,
    pub auth_plugin: Option<String>,
    /// The authentication challenge (both parts, without the trailing NUL).
    pub scramble: Vec<u8>,
}

/// Capabilities the proxy never lets through: compression (the proxy reads
/// every byte), `MySQL` 8 query attributes and optional metadata (results
/// must carry their column definitions for masking), zstd.
pub fn stripped_capabilities() -> CapabilityFlags {
    CapabilityFlags::CLIENT_COMPRESS
        | CapabilityFlags::CLIENT_OPTIONAL_RESULTSET_METADATA
        | CapabilityFlags::CLIENT_ZSTD_COMPRESSION_ALGORITHM
        | CapabilityFlags::from_bits_retain(CLIENT_QUERY_ATTRIBUTES)
}

/// Validates the server's greeting (handshake v10) and rewrites its
/// capabilities in place: `strip` removed, `MariaDB`'s extended capabilities
/// (cached metadata, bulk operations, progress reports) zeroed. The rest,
/// server version and scramble included, reaches the client unchanged.
pub fn rewrite_greeting(
    payload: &mut [u8],
    strip: CapabilityFlags,
) -> Result<Greeting, ProtocolError> {
    if payload.first() == Some(&0xFF) {
        return Err(ProtocolError::Unsupported {
            what: "the server refused the connection".into(),
        });
    }
    let (version_len, caps, greeting) = {
        let p: HandshakePacket<'_> = ParseBuf(payload)
            .parse(())
            .map_err(|_| malformed("server greeting"))?;
        if p.protocol_version() != 10 {
            return Err(ProtocolError::Unsupported {
                what: format!("handshake protocol version {}", p.protocol_version()),
            });
        }
        let caps = p.capabilities();
        if !caps.contains(CapabilityFlags::CLIENT_PROTOCOL_41) {
            return Err(ProtocolError::Unsupported {
                what: "a server without CLIENT_PROTOCOL_41".into(),
            });
        }
        let g = Greeting {
            server_version: p.server_version_str().into_owned(),
            connection_id: p.connection_id(),
            capabilities: caps - strip,
            server_capabilities: caps,
            auth_plugin: p.auth_plugin_name_str().map(std::borrow::Cow::into_owned),
            scramble: p.nonce(),
        };
        (p.server_version_ref().len(), caps, g)
    };
    // protocol(1) version\0 conn_id(4) scramble(8) filler(1) caps_lo(2)
    // collation(1) status(2) caps_hi(2) auth_len(1) reserved(6) mariadb_caps(4)
    let lo = 1 + version_len + 1 + 4 + 8 + 1;
    let hi = lo + 2 + 1 + 2;
    let maria = hi + 2 + 1 + 6;
    if payload.len() < maria + 4 {
        return Err(malformed("server greeting"));
    }
    let bits = (caps - strip).bits();
    payload[lo..lo + 2].copy_from_slice(&(bits as u16).to_le_bytes());
    payload[hi..hi + 2].copy_from_slice(&((bits >> 16) as u16).to_le_bytes());
    payload[maria..maria + 4].fill(0);
    Ok(greeting)
}

/// The client's handshake response, as the proxy records it.
#[derive(Debug, Clone)]
pub struct ClientHello {
    pub capabilities: CapabilityFlags,
    pub user: String,
    pub database: Option<String>,
    pub auth_plugin: Option<String>,
    pub attributes: Vec<(String, String)>,
}

/// Length of an `SSLRequest` (a handshake response cut after its fixed part).
pub const SSL_REQUEST_LEN: usize = 32;

/// Parses the client's handshake response. `offered`: the capabilities the
/// client was shown; a client claiming one it was not offered is lying
/// (or speaking another protocol) and is refused. An `SSLRequest` returns
/// `Ok(None)`.
pub fn parse_client_hello(
    payload: &[u8],
    offered: CapabilityFlags,
) -> Result<Option<ClientHello>, ProtocolError> {
    if payload.len() < SSL_REQUEST_LEN {
        return Err(malformed("handshake response"));
    }
    let caps = CapabilityFlags::from_bits_retain(u32::from_le_bytes([
        payload[0], payload[1], payload[2], payload[3],
    ]));
    if !caps.contains(CapabilityFlags::CLIENT_PROTOCOL_41) {
        return Err(ProtocolError::Unsupported {
            what: "a client without CLIENT_PROTOCOL_41".into(),
        });
    }
    if caps.contains(CapabilityFlags::CLIENT_SSL) && payload.len() == SSL_REQUEST_LEN {
        return Ok(None);
    }
    let checked = stripped_capabilities() | CapabilityFlags::CLIENT_SSL;
    let lying = (caps & checked) - offered;
    if !lying.is_empty() {
        return Err(ProtocolError::Unsupported {
            what: format!(
                "the client claims capabilities it was not offered ({:#x})",
                lying.bits()
            ),
        });
    }
    let r: HandshakeResponse<'_> = ParseBuf(payload)
        .parse(())
        .map_err(|_| malformed("handshake response"))?;
    let mut attributes: Vec<(String, String)> = r
        .connect_attributes()
        .unwrap_or_default()
        .into_iter()
        .collect();
    attributes.sort();
    Ok(Some(ClientHello {
        capabilities: caps,
        user: String::from_utf8_lossy(r.user()).into_owned(),
        database: r.db_name().map(|d| String::from_utf8_lossy(d).into_owned()),
        auth_plugin: r
            .auth_plugin()
            .map(|p| String::from_utf8_lossy(p.as_bytes()).into_owned()),
        attributes,
    }))
}

/// Sets the capability word of a handshake response (or `SSLRequest`).
pub fn set_client_capabilities(payload: &mut [u8], caps: CapabilityFlags) {
    if payload.len() >= 4 {
        payload[..4].copy_from_slice(&caps.bits().to_le_bytes());
    }
}

// ---------------------------------------------------------------------------
// Commands

/// A client command, by its first byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command<'a> {
    Quit,
    InitDb(&'a [u8]),
    Query(&'a [u8]),
    FieldList {
        table: &'a [u8],
    },
    Statistics,
    ProcessKill(u32),
    Ping,
    ChangeUser,
    StmtPrepare(&'a [u8]),
    StmtExecute {
        stmt_id: u32,
        cursor_flags: u8,
    },
    StmtSendLongData {
        stmt_id: u32,
    },
    StmtClose {
        stmt_id: u32,
    },
    StmtReset {
        stmt_id: u32,
    },
    StmtFetch {
        stmt_id: u32,
    },
    SetOption(u16),
    ResetConnection,
    /// Replication and binlog: never relayed.
    Replication(u8),
    /// Anything else (`COM_DEBUG`, `COM_SHUTDOWN`-era leftovers, bulk
    /// execute, unknown bytes): never relayed.
    Other(u8),
}

impl Command<'_> {
    /// The name used in records.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Quit => "COM_QUIT",
            Command::InitDb(_) => "COM_INIT_DB",
            Command::Query(_) => "COM_QUERY",
            Command::FieldList { .. } => "COM_FIELD_LIST",
            Command::Statistics => "COM_STATISTICS",
            Command::ProcessKill(_) => "COM_PROCESS_KILL",
            Command::Ping => "COM_PING",
            Command::ChangeUser => "COM_CHANGE_USER",
            Command::StmtPrepare(_) => "COM_STMT_PREPARE",
            Command::StmtExecute { .. } => "COM_STMT_EXECUTE",
            Command::StmtSendLongData { .. } => "COM_STMT_SEND_LONG_DATA",
            Command::StmtClose { .. } => "COM_STMT_CLOSE",
            Command::StmtReset { .. } => "COM_STMT_RESET",
            Command::StmtFetch { .. } => "COM_STMT_FETCH",
            Command::SetOption(_) => "COM_SET_OPTION",
            Command::ResetConnection => "COM_RESET_CONNECTION",
            Command::Replication(_) => "replication",
            Command::Other(_) => "unsupported",
        }
    }

    /// What the server answers it with.
    pub fn reply(&self) -> Reply {
        match self {
            Command::Quit | Command::StmtSendLongData { .. } | Command::StmtClose { .. } => {
                Reply::Nothing
            }
            Command::Query(_) => Reply::ResultSets { binary: false },
            Command::StmtExecute { .. } | Command::StmtFetch { .. } => {
                Reply::ResultSets { binary: true }
            }
            Command::StmtPrepare(_) => Reply::Prepare,
            Command::FieldList { .. } => Reply::FieldList,
            Command::Statistics => Reply::Statistics,
            _ => Reply::Simple,
        }
    }
}

fn stmt_id(body: &[u8]) -> Result<u32, ProtocolError> {
    body.get(..4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(malformed("statement id"))
}

/// Parses a command packet. `max_sql`: longest SQL text accepted.
pub fn parse_command(payload: &[u8], max_sql: usize) -> Result<Command<'_>, ProtocolError> {
    let (&code, body) = payload.split_first().ok_or(malformed("empty command"))?;
    let sql = |b: &'static str| -> Result<(), ProtocolError> {
        if body.len() > max_sql {
            Err(ProtocolError::Unsupported {
                what: format!(
                    "{b} text of {} bytes, over the {max_sql}-byte limit",
                    body.len()
                ),
            })
        } else {
            Ok(())
        }
    };
    Ok(match code {
        0x01 => Command::Quit,
        0x02 => {
            if body.len() > 256 {
                return Err(malformed("COM_INIT_DB"));
            }
            Command::InitDb(body)
        }
        0x03 => {
            sql("COM_QUERY")?;
            Command::Query(body)
        }
        0x04 => {
            let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
            Command::FieldList {
                table: &body[..end],
            }
        }
        0x09 => Command::Statistics,
        0x0C => Command::ProcessKill(stmt_id(body)?),
        0x0E => Command::Ping,
        0x11 => Command::ChangeUser,
        0x16 => {
            sql("COM_STMT_PREPARE")?;
            Command::StmtPrepare(body)
        }
        0x17 => {
            if body.len() < 9 {
                return Err(malformed("COM_STMT_EXECUTE"));
            }
            Command::StmtExecute {
                stmt_id: stmt_id(body)?,
                cursor_flags: body[4],
            }
        }
        0x18 => {
            if body.len() < 6 {
                return Err(malformed("COM_STMT_SEND_LONG_DATA"));
            }
            Command::StmtSendLongData {
                stmt_id: stmt_id(body)?,
            }
        }
        0x19 => Command::StmtClose {
            stmt_id: stmt_id(body)?,
        },
        0x1A => Command::StmtReset {
            stmt_id: stmt_id(body)?,
        },
        0x1B => {
            let b = body.get(..2).ok_or(malformed("COM_SET_OPTION"))?;
            Command::SetOption(u16::from_le_bytes([b[0], b[1]]))
        }
        0x1C => Command::StmtFetch {
            stmt_id: stmt_id(body)?,
        },
        0x1F => Command::ResetConnection,
        // COM_BINLOG_DUMP, COM_TABLE_DUMP, COM_REGISTER_SLAVE, COM_BINLOG_DUMP_GTID
        0x12 | 0x13 | 0x15 | 0x1E => Command::Replication(code),
        other => Command::Other(other),
    })
}

// ---------------------------------------------------------------------------
// Server packets

/// An `ERR` packet's payload (protocol 4.1 form, with SQLSTATE).
pub fn err_packet(code: u16, sqlstate: &str, message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + message.len());
    out.push(0xFF);
    out.extend_from_slice(&code.to_le_bytes());
    out.push(b'#');
    let mut state = [b'H', b'Y', b'0', b'0', b'0'];
    for (d, s) in state.iter_mut().zip(sqlstate.bytes()) {
        *d = s;
    }
    out.extend_from_slice(&state);
    out.extend_from_slice(message.as_bytes());
    out
}

/// An `ERR` packet's code and SQLSTATE.
pub fn err_code(payload: &[u8]) -> Option<(u16, String)> {
    if payload.first() != Some(&0xFF) || payload.len() < 3 {
        return None;
    }
    let code = u16::from_le_bytes([payload[1], payload[2]]);
    let state = if payload.get(3) == Some(&b'#') && payload.len() >= 9 {
        String::from_utf8_lossy(&payload[4..9]).into_owned()
    } else {
        String::new()
    };
    Some((code, state))
}

/// Status flags of an `OK` packet (header `0x00`, or `0xFE` as a terminator).
pub fn ok_status(payload: &[u8]) -> Result<(u64, u16), ProtocolError> {
    let mut b = ParseBuf(payload.get(1..).ok_or(malformed("OK packet"))?);
    let affected = b.checked_eat_lenenc_int().ok_or(malformed("OK packet"))?;
    b.checked_eat_lenenc_int().ok_or(malformed("OK packet"))?;
    let s = b.checked_eat(2).ok_or(malformed("OK packet"))?;
    Ok((affected, u16::from_le_bytes([s[0], s[1]])))
}

/// A column definition as the masker needs it.
#[derive(Debug, Clone)]
pub struct ColumnDef {
    pub schema: String,
    /// The table as written (an alias), and the real one (`org_table`).
    pub table: String,
    pub org_table: String,
    pub name: String,
    pub org_name: String,
    pub column_type: ColumnType,
}

impl ColumnDef {
    pub fn parse(payload: &[u8]) -> Result<Self, ProtocolError> {
        let c: Column = ParseBuf(payload)
            .parse(())
            .map_err(|_| malformed("column definition"))?;
        Ok(Self {
            schema: c.schema_str().into_owned(),
            table: c.table_str().into_owned(),
            org_table: c.org_table_str().into_owned(),
            name: c.name_str().into_owned(),
            org_name: c.org_name_str().into_owned(),
            column_type: c.column_type(),
        })
    }
}

/// What the server answers a command with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// No answer (`COM_STMT_CLOSE`, `COM_STMT_SEND_LONG_DATA`, `COM_QUIT`).
    Nothing,
    /// One `OK`, `ERR` or `EOF` packet.
    Simple,
    /// One string packet (`COM_STATISTICS`).
    Statistics,
    /// Result sets: `OK`, `ERR`, a `LOCAL INFILE` request, or columns and
    /// rows, repeated while `SERVER_MORE_RESULTS_EXISTS`.
    ResultSets { binary: bool },
    /// `COM_STMT_PREPARE`: its `OK`, then parameter and column definitions.
    Prepare,
    /// `COM_FIELD_LIST`: column definitions until `EOF`.
    FieldList,
}

/// What one server packet was, in its reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// An `OK` ending a statement (`more`: another result follows).
    Ok {
        affected: u64,
        more: bool,
    },
    Err {
        code: u16,
        sqlstate: String,
    },
    /// A result's column count.
    ColumnCount(u64),
    /// The `i`-th column definition of the current result.
    Column(usize),
    /// The `EOF` after the column definitions.
    ColumnsEnd,
    Row,
    /// The `EOF` (or `OK`) after the rows (`more`: another result follows).
    ResultEnd {
        more: bool,
    },
    /// `COM_STMT_PREPARE`'s `OK`.
    Prepared {
        stmt_id: u32,
        columns: u16,
        params: u16,
    },
    PrepareParam,
    PrepareColumn(usize),
    /// The server asks the client for a file (`LOAD DATA LOCAL INFILE`).
    LocalInfile {
        file: String,
    },
    /// `COM_STATISTICS`' text, or an `EOF` answering a simple command.
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    First,
    Columns { left: u64, index: usize },
    ColumnsEof,
    Rows,
    PrepParams { left: u16, columns: u16 },
    PrepParamsEof { columns: u16 },
    PrepColumns { left: u16, index: usize },
    PrepColumnsEof,
    Done,
}

/// The reply to one command, packet by packet (pure state).
#[derive(Debug, Clone)]
pub struct Response {
    reply: Reply,
    deprecate_eof: bool,
    state: State,
}

impl Response {
    /// `deprecate_eof`: both sides negotiated `CLIENT_DEPRECATE_EOF`.
    pub fn new(reply: Reply, deprecate_eof: bool) -> Self {
        Self {
            reply,
            deprecate_eof,
            state: if reply == Reply::Nothing {
                State::Done
            } else {
                State::First
            },
        }
    }

    /// The reply is complete: the next packet belongs to the next command.
    pub fn done(&self) -> bool {
        self.state == State::Done
    }

    /// Binary rows (`COM_STMT_EXECUTE`).
    pub fn binary(&self) -> bool {
        matches!(self.reply, Reply::ResultSets { binary: true })
    }

    /// After the client sent a `LOCAL INFILE`'s data: the server's `OK` or
    /// `ERR` comes next.
    pub fn infile_sent(&mut self) {
        self.state = State::First;
    }

    fn end(&mut self, more: bool) {
        self.state = if more { State::First } else { State::Done };
    }

    /// Classifies the next server packet and advances.
    #[allow(clippy::too_many_lines)] // one state machine, one match
    pub fn feed(&mut self, p: &[u8]) -> Result<Packet, ProtocolError> {
        let head = *p.first().ok_or(malformed("empty server packet"))?;
        if head == 0xFF && self.state != State::Done {
            // An error ends the reply wherever it comes (multi-statement:
            // no later statement runs).
            let (code, sqlstate) = err_code(p).ok_or(malformed("ERR packet"))?;
            self.state = State::Done;
            return Ok(Packet::Err { code, sqlstate });
        }
        let terminator = head == 0xFE && p.len() < 0xFF_FFFF && (self.deprecate_eof || p.len() < 9);
        match self.state {
            State::Done => Err(ProtocolError::Unsupported {
                what: "the server sent a packet no command asked for".into(),
            }),
            State::First => match self.reply {
                Reply::Nothing => unreachable!("Reply::Nothing starts Done"),
                Reply::Simple | Reply::Statistics => {
                    self.state = State::Done;
                    if head == 0x00 {
                        let (affected, _) = ok_status(p)?;
                        Ok(Packet::Ok {
                            affected,
                            more: false,
                        })
                    } else {
                        Ok(Packet::Other)
                    }
                }
                Reply::FieldList => {
                    if terminator {
                        self.state = State::Done;
                        Ok(Packet::ResultEnd { more: false })
                    } else {
                        Ok(Packet::Column(0))
                    }
                }
                Reply::Prepare => {
                    if head != 0x00 || p.len() < 12 {
                        return Err(malformed("COM_STMT_PREPARE reply"));
                    }
                    let stmt_id = u32::from_le_bytes([p[1], p[2], p[3], p[4]]);
                    let columns = u16::from_le_bytes([p[5], p[6]]);
                    let params = u16::from_le_bytes([p[7], p[8]]);
                    self.state = State::PrepParams {
                        left: params,
                        columns,
                    };
                    self.after_params(false);
                    Ok(Packet::Prepared {
                        stmt_id,
                        columns,
                        params,
                    })
                }
                Reply::ResultSets { .. } => match head {
                    0x00 => {
                        let (affected, status) = ok_status(p)?;
                        let more = status & MORE_RESULTS != 0;
                        self.end(more);
                        Ok(Packet::Ok { affected, more })
                    }
                    0xFB => Ok(Packet::LocalInfile {
                        file: String::from_utf8_lossy(&p[1..]).into_owned(),
                    }),
                    _ => {
                        let n = ParseBuf(p)
                            .checked_eat_lenenc_int()
                            .filter(|n| (1..=MAX_COLUMNS).contains(n))
                            .ok_or(malformed("column count"))?;
                        self.state = State::Columns { left: n, index: 0 };
                        Ok(Packet::ColumnCount(n))
                    }
                },
            },
            State::Columns { left, index } => {
                self.state = if left > 1 {
                    State::Columns {
                        left: left - 1,
                        index: index + 1,
                    }
                } else if self.deprecate_eof {
                    State::Rows
                } else {
                    State::ColumnsEof
                };
                Ok(Packet::Column(index))
            }
            State::ColumnsEof => {
                if head != 0xFE {
                    return Err(malformed("EOF after column definitions"));
                }
                self.state = State::Rows;
                Ok(Packet::ColumnsEnd)
            }
            State::Rows => {
                if terminator {
                    let status = if self.deprecate_eof {
                        ok_status(p)?.1
                    } else {
                        let s = p.get(3..5).ok_or(malformed("EOF packet"))?;
                        u16::from_le_bytes([s[0], s[1]])
                    };
                    let more = status & MORE_RESULTS != 0;
                    self.end(more);
                    Ok(Packet::ResultEnd { more })
                } else {
                    Ok(Packet::Row)
                }
            }
            State::PrepParams { left, columns } => {
                self.state = State::PrepParams {
                    left: left - 1,
                    columns,
                };
                self.after_params(true);
                Ok(Packet::PrepareParam)
            }
            State::PrepParamsEof { columns } => {
                if head != 0xFE {
                    return Err(malformed("EOF after parameter definitions"));
                }
                self.state = State::PrepColumns {
                    left: columns,
                    index: 0,
                };
                self.after_columns(false);
                Ok(Packet::ColumnsEnd)
            }
            State::PrepColumns { left, index } => {
                self.state = State::PrepColumns {
                    left: left - 1,
                    index: index + 1,
                };
                self.after_columns(true);
                Ok(Packet::PrepareColumn(index))
            }
            State::PrepColumnsEof => {
                if head != 0xFE {
                    return Err(malformed("EOF after column definitions"));
                }
                self.state = State::Done;
                Ok(Packet::ColumnsEnd)
            }
        }
    }

    /// Parameters all read (`had`: there were some): their `EOF`, or the columns.
    fn after_params(&mut self, had: bool) {
        if let State::PrepParams { left: 0, columns } = self.state {
            if had && !self.deprecate_eof {
                self.state = State::PrepParamsEof { columns };
            } else {
                self.state = State::PrepColumns {
                    left: columns,
                    index: 0,
                };
                self.after_columns(false);
            }
        }
    }

    /// Columns all read (`had`: there were some): their `EOF`, or done.
    fn after_columns(&mut self, had: bool) {
        if let State::PrepColumns { left: 0, .. } = self.state {
            self.state = if had && !self.deprecate_eof {
                State::PrepColumnsEof
            } else {
                State::Done
            };
        }
    }
}
