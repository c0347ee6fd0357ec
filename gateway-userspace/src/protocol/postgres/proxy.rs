//! The Postgres L7 proxy: the only I/O in [`crate::protocol::postgres`].
//!
//! [`serve`] takes an accepted, attributed client connection whose connect
//! decision was allow; [`refuse`] answers one whose decision was deny with a
//! protocol-native error. The sans-IO pieces it drives are [`super::codec`],
//! [`super::session`], [`super::mask`] and [`super::catalog`].
//!
//! # Lifecycle, in the order the code follows it
//!
//! 1. **Startup** (client only, nothing upstream yet): `SSLRequest` and
//!    `GSSENCRequest` are answered `N` (the agent-to-proxy hop is loopback on the
//!    same host); a `CancelRequest` is sent to the original destination over a
//!    fresh connection and both are closed; a `StartupMessage` (replication
//!    connections refused) opens the upstream. Malformed bytes get `FATAL 08P01`
//!    and nothing is ever sent upstream.
//! 2. **Upstream**: TCP to the agent's original destination from the daemon's
//!    untagged context, then, when the resource's `tls` says so, `SSLRequest`,
//!    `S`, and TLS with rustls (ring), certificate chain and name verified against
//!    `ca_file` (else the platform roots) and `server_name` (else the IP dialled).
//! 3. **Authentication** is relayed unchanged (cleartext, MD5, SCRAM-SHA-256)
//!    except that `-PLUS` SASL mechanisms are removed: channel binding cannot pass
//!    a proxy that terminates the client's connection (see the module doc of
//!    [`super`]). Only authentication responses are accepted from the client.
//!    When the resource names a `credential`, the proxy logs in itself as its
//!    user instead and the client only sees `AuthenticationOk`
//!    ([`super::credential`]).
//! 4. **First `ReadyForQuery`**: the `connection.open` record must be durable (else
//!    `FATAL 58030` and close); when the resource has column masking rules the
//!    proxy runs its catalog query ([`super::catalog`]) before the client's first
//!    statement, on the same connection, and consumes the result itself.
//! 5. **Statements**: every `Query` (all statements in the string; the most
//!    dangerous class wins) and every `Parse` is classified here and handed to
//!    the [`crate::gate`], which decides, records and holds; this file renders
//!    its [`gate::Outcome`] in the protocol.
//!    - allow: the statement record (redacted SQL, keyed hash, class, tables,
//!      decision, rule, approval) is appended. A statement that can change
//!      state (any class above `read`, and every approved statement) is
//!      forwarded only once its record is durable (write-ahead); if the append
//!      fails it is denied with `58030` "audit log unavailable" (fails closed).
//!      A `read` or `transaction` statement is forwarded while its record is
//!      being written, and nothing more reaches the client until the record is
//!      durable; if it cannot be written, everything not yet released is
//!      dropped and the connection ends with `FATAL 58030` (the result is never
//!      seen);
//!    - deny: [`Session::deny`] sends a statement upstream that fails in the parser,
//!      and the server's error is replaced by `42501` naming the rule, so the
//!      transaction state is exactly Postgres' own (a denial inside a block fails
//!      the block; `COMMIT` then rolls back);
//!    - `require_approval`: the request goes to the approval broker, the client gets a
//!      `NoticeResponse` naming it at once, and the statement (and everything the
//!      client sends after it) is held until the outcome: approved or covered by a
//!      grant → forwarded; denied or expired → denied as above. A client that
//!      disconnects while held withdraws the request; nothing is forwarded.
//!    - fast-path `FunctionCall` is always denied (it bypasses SQL).
//!    - `Bind` parameters never enter a record: only their count and formats.
//! 6. **Results**: rows are masked per the resource's masking policy (column
//!    rules by `schema.table.column`, value detectors), text and binary;
//!    `COPY ... TO STDOUT` data is masked in text format (CSV, binary and custom
//!    delimiters are denied up front when masking applies, and so is
//!    `COPY (query) TO STDOUT` under column rules). Each completed statement gets
//!    a result record: rows, bytes, duration, SQLSTATE and the [`MaskReport`]
//!    (column names, counts, detector names; never a value).
//! 7. **Close**: a `connection.close` record with byte counts and duration.
//!
//! # Fails closed
//!
//! - A masking failure of any kind (unmaskable value, unknown columns, an OID
//!   still unresolved after a fresh catalog, a COPY it cannot parse) ends the
//!   connection with `FATAL XX000` *instead of* the row: the remaining result
//!   cannot be withheld without desynchronising client and server.
//! - A server stream the session cannot follow ([`SessionError`]) closes both sides.
//! - A client protocol error gets `FATAL 08P01`; the bad message is not forwarded.
//!
//! # What masking catches, and what it cannot
//!
//! Column rules apply to columns the server reports as coming from a table (or
//! view) column: `SELECT *`, `SELECT ssn AS x`, extended-protocol statements,
//! binary results (binary integers and numerics a rule names become NULL, text
//! types are masked as text), cursors, and `COPY table TO STDOUT`. Detectors
//! apply to every text value, including computed ones: `row_to_json(c)` and
//! `upper(email)` are caught when the value still *looks* like an SSN, card
//! number or e-mail address (an upper-cased address still matches the e-mail
//! detector). Nothing can recognise a value the query re-encoded:
//! `encode(ssn::bytea, 'hex')`, `md5(ssn)`, `reverse(ssn)`, `substr(ssn, 1, 3)`
//! concatenated across rows, arithmetic on a card number, or inference through
//! `WHERE ssn LIKE '123%'` (the rows returned reveal the value). A policy that
//! protects a table must therefore also deny computed access to it, e.g. a deny
//! rule with `tables = ["customers"]` and `functions = ["encode", "md5", ...]`,
//! or allow only named, reviewed statements.
//!
//! # Limits (constants; `PgSettings` carries them)
//!
//! - codec [`Limits`]: startup packet 10 KiB, SQL text 1 MiB, any other message
//!   64 MiB (so a 64 MiB result of 1 MiB rows passes; a single row over 64 MiB is a
//!   protocol error);
//! - [`STARTUP_TIMEOUT`] for the client's startup packet, [`AUTH_TIMEOUT`] until the
//!   server's first `ReadyForQuery`;
//! - [`HIGH_WATER`] bytes queued towards either side before the proxy stops
//!   reading the other side (backpressure);
//! - [`super::catalog::MAX_CATALOG_ROWS`] catalog rows; [`crate::gate::MAX_SUMMARY_CHARS`] of
//!   redacted SQL in an approval request, [`MAX_RECORD_SQL_CHARS`] in a record.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use bytes::{Buf as _, Bytes, BytesMut};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
};

use super::cancel::{CancelKeyGuard, Issued};
use super::config::{PostgresConfig, UnmaskableBinary};
pub use super::{cancel::CancelKeys, error::PgProxyError};
use super::{
    catalog::{self, Catalog, CopyOut, TableName},
    codec::{
        self, Authentication, BackendMessage, ErrorFields, FrontendMessage, Limits, RowDescription,
        StartupPacket, TxStatus,
    },
    mask::{CopyPlan, MaskError, MaskReport, RowPlan, Scratch, Unmaskable},
    session::{self, BackendAction, Disposition, Session},
    strip_channel_binding, upstream,
};
use crate::{
    approval::Broker,
    audit::{Kind, NewRecord},
    connection::LiveConnection,
    gate::{
        self, AuditSink, AuditUnavailable, Covered, Denial, DenialKind, Gate, ResultRecord,
        truncate_chars,
    },
    mask::{ColumnStrategy, MaskPolicy, Masker, ProbeBudget, ResultMasks, lineage},
    policy::{Action, Decision, PolicySet, PolicyStore, Resource, Subject, Verdict},
    sql::{
        Analysis, AnalysisCache, Classification, Dialect, MAX_CACHED_LEN, StatementClass,
        lineage as lineage_sql,
    },
};

/// How long a client may take to send its startup packet.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long authentication may take, until the server's first `ReadyForQuery`.
pub const AUTH_TIMEOUT: Duration = Duration::from_mins(1);
/// Bytes queued towards one side before the proxy stops reading the other.
pub const HIGH_WATER: usize = 1024 * 1024;
/// Redacted SQL kept in an audit record.
pub const MAX_RECORD_SQL_CHARS: usize = 64 * 1024;
/// `SSLRequest`/`GSSENCRequest` answered before a `StartupMessage` must come.
const MAX_NEGOTIATIONS: u32 = 2;
/// Prepared statements' analyses kept per connection (see `Pg::executed`).
const MAX_EXECUTED: usize = 64;
/// Most cursors whose queries a connection keeps for masking their rows.
const MAX_CURSORS: usize = 256;

/// Tunables of the Postgres handler.
#[derive(Debug, Clone)]
pub struct PgSettings {
    pub limits: Limits,
    pub startup_timeout: Duration,
    pub auth_timeout: Duration,
    pub connect_timeout: Duration,
    /// Binary values of types that cannot carry masked text: NULL, or refuse.
    pub unmaskable: Unmaskable,
}

impl Default for PgSettings {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            startup_timeout: STARTUP_TIMEOUT,
            auth_timeout: AUTH_TIMEOUT,
            connect_timeout: Duration::from_secs(5),
            unmaskable: Unmaskable::Null,
        }
    }
}

impl PgSettings {
    /// The settings `[proxy.postgres]` gives (the connect timeout comes from
    /// `[proxy]`).
    pub fn from_config(c: &PostgresConfig, connect_timeout: Duration) -> Self {
        Self {
            limits: Limits {
                max_startup_len: c.max_startup_bytes,
                max_sql_len: c.max_sql_bytes,
                max_message_len: c.max_message_bytes,
            },
            startup_timeout: Duration::from_secs(c.startup_timeout_secs),
            auth_timeout: Duration::from_secs(c.auth_timeout_secs),
            connect_timeout,
            unmaskable: match c.unmaskable_binary {
                UnmaskableBinary::Null => Unmaskable::Null,
                UnmaskableBinary::Refuse => Unmaskable::RefuseRow,
            },
        }
    }
}

// ---------------------------------------------------------------------------
// Audit (the sink and its records live in [`crate::gate`])

/// Reads forwarded while their records are still being written, at most, per
/// connection; then the proxy stops reading the client until the log catches up.
pub const MAX_UNCONFIRMED: usize = 64;

// ---------------------------------------------------------------------------
// Context

/// Everything [`serve`] needs about one attributed connection.
pub struct PgContext {
    /// Id, identity, workload, original destination, live byte counters; its
    /// `record()` fills in who and from where for every audit record.
    pub conn: Arc<LiveConnection>,
    pub subject: Subject,
    /// The resource the destination belongs to (from the policy in force at accept).
    pub resource: Resource,
    pub policy: Arc<PolicyStore>,
    pub approvals: Broker,
    pub audit: Arc<dyn AuditSink>,
    /// Key for the keyed hash of statements (correlation without the text).
    pub correlation_key: [u8; 32],
    pub settings: PgSettings,
    /// Shared by every Postgres connection of the daemon.
    pub cancel_keys: CancelKeys,
    /// Statement analyses by shape, shared by every connection.
    pub sql_cache: Arc<AnalysisCache>,
    /// Equality probes on protected columns, per identity (shared by every
    /// connection, whatever its protocol).
    pub probes: Arc<ProbeBudget>,
}

// ---------------------------------------------------------------------------
// Startup

fn fatal_bytes(sqlstate: &str, message: &str) -> Bytes {
    BackendMessage::ErrorResponse(ErrorFields::new("FATAL", sqlstate, message)).to_bytes()
}

/// Reads the client's startup packet, answering `N` to encryption requests.
/// `Ok(None)`: the client went away before sending one.
async fn read_startup<S: AsyncRead + AsyncWrite + Unpin>(
    client: &mut S,
    buf: &mut BytesMut,
    limits: &Limits,
) -> Result<Option<StartupPacket>, PgProxyError> {
    let mut negotiations = 0;
    loop {
        match codec::decode_startup(buf, limits) {
            Err(source) => return Err(PgProxyError::Protocol { source }),
            Ok(Some(StartupPacket::SslRequest | StartupPacket::GssEncRequest)) => {
                negotiations += 1;
                if negotiations > MAX_NEGOTIATIONS {
                    return Err(PgProxyError::Client {
                        what: "too many encryption requests".into(),
                    });
                }
                if !buf.is_empty() {
                    // Bytes sent before our answer cannot be a sane startup.
                    return Err(PgProxyError::Client {
                        what: "data after an encryption request before its answer".into(),
                    });
                }
                client
                    .write_all(b"N")
                    .await
                    .map_err(|source| PgProxyError::ClientIo { source })?;
            }
            Ok(Some(p)) => return Ok(Some(p)),
            Ok(None) => {
                buf.reserve(1024);
                let n = client
                    .read_buf(buf)
                    .await
                    .map_err(|source| PgProxyError::ClientIo { source })?;
                if n == 0 {
                    return Ok(None);
                }
            }
        }
    }
}

/// Answers a connection whose connect decision was deny: reads the startup
/// packet and sends `FATAL 28000` naming the rule (a `CancelRequest` is just
/// closed). Never contacts the upstream.
pub async fn refuse(mut client: TcpStream, rule: &str, reason: &str) -> Result<(), PgProxyError> {
    let mut buf = BytesMut::new();
    let limits = Limits::default();
    let startup = tokio::time::timeout(
        STARTUP_TIMEOUT,
        read_startup(&mut client, &mut buf, &limits),
    )
    .await
    .map_err(|_| PgProxyError::Timeout { phase: "startup" })?;
    let bytes = match startup {
        Ok(Some(StartupPacket::Startup { .. })) => fatal_bytes(
            "28000",
            &format!("agentgate: connection denied by policy rule \"{rule}\": {reason}"),
        ),
        Ok(_) => return Ok(()),
        Err(e @ PgProxyError::Protocol { .. }) => {
            fatal_bytes("08P01", &format!("agentgate: protocol error: {e}"))
        }
        Err(e) => return Err(e),
    };
    let _ = client.write_all(&bytes).await;
    let _ = client.shutdown().await;
    Ok(())
}

/// Serves one allowed client connection until either side closes.
pub async fn serve(mut client: TcpStream, ctx: PgContext) -> Result<(), PgProxyError> {
    let _ = client.set_nodelay(true);
    let mut cin = BytesMut::new();
    let startup = tokio::time::timeout(
        ctx.settings.startup_timeout,
        read_startup(&mut client, &mut cin, &ctx.settings.limits),
    )
    .await
    .map_err(|_| PgProxyError::Timeout { phase: "startup" });
    let startup = match startup.and_then(|r| r) {
        Ok(Some(p)) => p,
        Ok(None) => return Ok(()),
        Err(e) => {
            if matches!(
                e,
                PgProxyError::Protocol { .. } | PgProxyError::Client { .. }
            ) {
                let _ = client
                    .write_all(&fatal_bytes("08P01", &format!("agentgate: {e}")))
                    .await;
            }
            return Err(e);
        }
    };
    let params = match startup {
        StartupPacket::CancelRequest { pid, secret } => {
            return forward_cancel(&ctx, pid, secret).await;
        }
        StartupPacket::Startup { ref params, .. } => params.clone(),
        _ => unreachable!("read_startup answers encryption requests itself"),
    };
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    if param("replication").is_some_and(|v| !matches!(v.as_str(), "false" | "off" | "no" | "0")) {
        let _ = client
            .write_all(&fatal_bytes(
                "0A000",
                "agentgate: replication connections are not supported through the proxy",
            ))
            .await;
        return Ok(());
    }
    // The resource's own login, when it names one: read now (a rotated
    // secret applies to the next connection), never shown to anyone.
    let credential = match &ctx.resource.credential {
        None => None,
        Some(c) => Some((c, super::credential::read(&mut client, &ctx, c).await?)),
    };
    let (mut upstream, tls) = match upstream::connect(
        ctx.conn.destination,
        ctx.resource.tls.as_ref(),
        ctx.settings.connect_timeout,
    )
    .await
    {
        Ok(u) => u,
        Err(e) => {
            let _ = client
                .write_all(&fatal_bytes(
                    "08001",
                    &format!("agentgate: cannot reach the server: {e}"),
                ))
                .await;
            return Err(e);
        }
    };
    let mut uout = BytesMut::new();
    let Some((cred, secret)) = credential else {
        startup.encode(&mut uout);
        let mut pg = Pg::new(&ctx, cin, uout, tls, param);
        let (cr, cw) = client.into_split();
        let (ur, uw) = tokio::io::split(upstream);
        let result = pg.run(cr, cw, ur, uw).await;
        pg.close_record(result.as_ref().err()).await;
        return result;
    };
    let (params, rest) =
        super::credential::start(&mut client, &mut *upstream, &ctx, cred, secret, startup).await?;
    let param = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let mut pg = Pg::new(&ctx, cin, uout, tls, param);
    pg.uin = rest;
    pg.credential = Some(cred.describe());
    let (cr, cw) = client.into_split();
    let (ur, uw) = tokio::io::split(upstream);
    let result = pg.run(cr, cw, ur, uw).await;
    pg.close_record(result.as_ref().err()).await;
    result
}

async fn forward_cancel(ctx: &PgContext, pid: i32, secret: Bytes) -> Result<(), PgProxyError> {
    let issued = ctx.cancel_keys.issued_to(pid, &secret);
    let allowed = issued.as_ref().is_some_and(|i| {
        i.destination == ctx.conn.destination && i.identity == ctx.subject.identity
    });
    let mut ev = ctx.conn.record(Kind::Decision).action(json!({
        "protocol": "postgres",
        "message": "cancel_request",
        "backend_pid": pid,
    }));
    ev.decision = Some(if allowed {
        json!({"verdict": "allow", "rule": "agentgate:cancel-own-session"})
    } else {
        json!({
            "verdict": "deny",
            "rule": "agentgate:cancel-key-not-issued",
            "reason": if issued.is_some() {
                "the key belongs to another identity's session or server"
            } else {
                "no session through this proxy holds the key"
            },
        })
    });
    // Postgres never answers a CancelRequest, so neither does the proxy.
    if !allowed {
        ctx.audit.append_detached(ev);
        tracing::warn!(
            event = "postgres.cancel",
            conn = ctx.conn.id,
            "cancel request refused: key not issued to this identity and server"
        );
        return Ok(());
    }
    ctx.audit
        .append(ev)
        .await
        .map_err(|source| PgProxyError::Audit { source })?;
    // A statement held for approval is not at the server: the cancel withdraws it.
    if let Some(i) = &issued {
        ctx.approvals
            .withdraw_connection(i.conn, "the client cancelled the statement")
            .await;
    }
    let (mut up, _) = upstream::connect(
        ctx.conn.destination,
        ctx.resource.tls.as_ref(),
        ctx.settings.connect_timeout,
    )
    .await?;
    let mut b = BytesMut::new();
    StartupPacket::CancelRequest { pid, secret }.encode(&mut b);
    up.write_all(&b)
        .await
        .map_err(|source| PgProxyError::UpstreamIo { source })?;
    let _ = up.shutdown().await;
    // The server closes after reading it; wait briefly so the request is read.
    let mut sink = [0u8; 16];
    let _ = tokio::time::timeout(Duration::from_secs(2), up.read(&mut sink)).await;
    tracing::info!(
        event = "postgres.cancel",
        conn = ctx.conn.id,
        "cancel request forwarded"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// The connection

/// A statement held for approval: the message to forward or deny, and the
/// gate's hold.
struct Held {
    msg: FrontendMessage,
    hold: gate::Hold,
}

/// What the records say about one decided statement.
struct StmtRecord {
    action: Value,
    hash: String,
    class: &'static str,
}

impl StmtRecord {
    /// The statement as the gate sees it. `summary`: its redacted SQL.
    fn command(self, summary: &str, changes_state: bool) -> gate::Command<'_> {
        gate::Command {
            action: self.action,
            fingerprint: self.hash,
            class: self.class,
            summary,
            changes_state,
        }
    }
}

/// Counters of the statement whose results are flowing.
struct Running {
    started: Instant,
    rows: u64,
    bytes: u64,
    report: MaskReport,
    /// Per result column with a protected column in its lineage: its name
    /// and the decision (`direct`, `preserved`, `derived-redacted`, ...).
    lineage: Option<Value>,
}

impl Running {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            rows: 0,
            bytes: 0,
            report: MaskReport::default(),
            lineage: None,
        }
    }
}

enum Event {
    ClientRead(std::io::Result<usize>),
    UpstreamRead(std::io::Result<usize>),
    ClientWrote(std::io::Result<usize>),
    UpstreamWrote(std::io::Result<usize>),
    Recorded(Result<(), AuditUnavailable>),
    Approval(gate::hold::Answer),
    AuthTimeout,
    Stalled,
}

#[allow(clippy::struct_excessive_bools)] // independent connection flags, not a mode in disguise
struct Pg<'a> {
    ctx: &'a PgContext,
    /// Decides, records and holds every statement.
    gate: Gate<'a>,
    /// Records of forwarded read-only statements not yet durable, oldest
    /// first. Nothing is written to the client while one is pending.
    unconfirmed: VecDeque<gate::Recording<'a>>,
    set: Arc<PolicySet>,
    session: Session,
    catalog: Catalog,
    cin: BytesMut,
    uin: BytesMut,
    cout: BytesMut,
    uout: BytesMut,
    /// First `ReadyForQuery` seen (authentication done).
    ready: bool,
    /// The catalog query is running; `Some(true)` once it reported an error.
    catalog_inflight: Option<bool>,
    /// A client message to process again after the catalog loads.
    deferred: Option<FrontendMessage>,
    held: Option<Held>,
    /// Prepared statements, by name, whose approved `Parse` still covers their
    /// first execution (an approval covers one command).
    approved_parse: HashSet<Bytes>,
    /// The analyses of the prepared statements this connection executes, by
    /// SQL text: an `Execute` of a statement seen before skips the shape
    /// cache's tokenizing. At most [`MAX_EXECUTED`] texts of at most
    /// [`MAX_CACHED_LEN`] bytes; emptied when full.
    executed: HashMap<Bytes, Arc<Analysis>>,
    /// `ReadyForQuery` came and nothing was sent upstream since.
    idle_point: bool,
    /// The masking plan of the result flowing, with the lineage decisions
    /// its record names.
    plan: Option<Plan>,
    /// Statements of the running query whose results ended (which statement
    /// of a multi-statement query a row description belongs to).
    results_seen: usize,
    /// Outputs of the cursors declared on this connection, by name.
    cursors: HashMap<String, lineage_sql::Outputs>,
    copy: Option<CopyPlan<ColumnStrategy>>,
    copies_seen: usize,
    scratch: Scratch,
    cur: Running,
    /// The latest `Bind`'s parameters, counted (never the values), by portal.
    last_bind: Option<(Bytes, Value)>,
    /// The latest `Bind`'s parameter bytes, by portal: the equality budget
    /// counts the values a prepared statement compares (never recorded).
    last_bind_values: Option<(Bytes, Vec<Option<Bytes>>)>,
    statements: u64,
    user: String,
    database: String,
    application_name: String,
    /// The resource's credential the proxy logged in with (user and
    /// file, never the secret); `None`: the client's own login.
    credential: Option<Value>,
    tls_upstream: bool,
    /// Flush what is queued for the client, then close.
    closing: bool,
    client_eof: bool,
    upstream_eof: bool,
    opened_at: Instant,
    /// This session's cancel key, while it lives.
    cancel_key: Option<CancelKeyGuard>,
}

/// A result's masking plan.
struct Plan {
    desc: Arc<RowDescription>,
    rows: RowPlan<ColumnStrategy>,
    /// The lineage decisions its record names.
    lineage: Option<Value>,
    /// The JSON masks [`ColumnStrategy::Json`] points into.
    json: Vec<Arc<lineage::JsonMask>>,
}

/// An error or notice about a statement that reads a protected column:
/// severity and the names of the objects involved are kept; the SQLSTATE
/// is reduced to its class ([`lineage::withheld_sqlstate`]); the message,
/// detail, hint, context and position, which may quote or point at a value,
/// are replaced or dropped.
fn withheld(f: &ErrorFields) -> ErrorFields {
    let code = f
        .sqlstate()
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .unwrap_or_default();
    let code = lineage::withheld_sqlstate(&code);
    let mut fields: Vec<(u8, Bytes)> = f
        .fields
        .iter()
        .filter(|(k, _)| matches!(k, b'S' | b'V' | b's' | b't' | b'c' | b'd' | b'n'))
        .cloned()
        .collect();
    fields.push((b'C', Bytes::from(code.clone())));
    fields.push((
        b'M',
        Bytes::from(format!(
            "agentgate: the server's error (SQLSTATE class {code}) is withheld: the statement reads a protected column, and the error may depend on or quote its value"
        )),
    ));
    ErrorFields { fields }
}

fn masking_active(m: &MaskPolicy) -> bool {
    !m.columns().is_empty() || m.detectors_enabled()
}

impl<'a> Pg<'a> {
    /// A connection's state once the upstream is open: nothing read or
    /// decided yet. `param`: the client's startup parameters.
    fn new(
        ctx: &'a PgContext,
        cin: BytesMut,
        uout: BytesMut,
        tls_upstream: bool,
        param: impl Fn(&str) -> Option<String>,
    ) -> Self {
        Pg {
            set: ctx.policy.current(),
            session: Session::new(true),
            catalog: Catalog::default(),
            cin,
            uin: BytesMut::new(),
            cout: BytesMut::new(),
            uout,
            ready: false,
            catalog_inflight: None,
            deferred: None,
            held: None,
            approved_parse: HashSet::new(),
            executed: HashMap::new(),
            idle_point: false,
            plan: None,
            results_seen: 0,
            cursors: HashMap::new(),
            copy: None,
            copies_seen: 0,
            scratch: Scratch::default(),
            cur: Running::new(),
            last_bind: None,
            last_bind_values: None,
            statements: 0,
            user: param("user").unwrap_or_default(),
            database: param("database")
                .or_else(|| param("user"))
                .unwrap_or_default(),
            application_name: param("application_name").unwrap_or_default(),
            credential: None,
            tls_upstream,
            closing: false,
            client_eof: false,
            upstream_eof: false,
            opened_at: Instant::now(),
            unconfirmed: VecDeque::new(),
            cancel_key: None,
            gate: Gate::new(
                &*ctx.conn,
                &ctx.subject,
                &ctx.resource,
                &*ctx.audit,
                &ctx.approvals,
            ),
            ctx,
        }
    }

    fn event(&self, kind: Kind, action: Value) -> NewRecord {
        self.ctx.conn.record(kind).action(action)
    }

    fn masking(&self) -> &MaskPolicy {
        self.set.masking_for(&self.ctx.resource)
    }

    async fn run<CR, CW, UR, UW>(
        &mut self,
        mut cr: CR,
        mut cw: CW,
        mut ur: UR,
        mut uw: UW,
    ) -> Result<(), PgProxyError>
    where
        CR: AsyncRead + Unpin,
        CW: AsyncWrite + Unpin,
        UR: AsyncRead + Unpin,
        UW: AsyncWrite + Unpin,
    {
        let limits = self.ctx.settings.limits.clone();
        let client_cap = limits
            .max_message_len
            .max(limits.max_sql_len + 64 * 1024 + 65_535 * 4)
            + 64 * 1024;
        let upstream_cap = limits.max_message_len + 64 * 1024;
        let auth_deadline = tokio::time::Instant::now() + self.ctx.settings.auth_timeout;
        let outcome = loop {
            if let Err(e) = self.pump().await {
                break Err(e);
            }
            if self.finished() {
                break Ok(());
            }
            // Pipelined reads run while their records are written; past
            // MAX_UNCONFIRMED of them the client waits for the log.
            let read_client = !self.client_eof
                && !self.closing
                && self.cin.len() < client_cap
                && self.unconfirmed.len() < MAX_UNCONFIRMED;
            let read_upstream = !self.upstream_eof
                && !self.closing
                && self.cout.len() < HIGH_WATER
                && self.uin.len() < upstream_cap;
            if read_client {
                self.cin.reserve(16 * 1024);
            }
            if read_upstream {
                self.uin.reserve(64 * 1024);
            }
            let holding = self.held.is_some();
            let held = self.held.as_mut().map(|h| h.hold.decided());
            let ready = self.ready;
            let release = self.unconfirmed.is_empty();
            let unconfirmed = self.unconfirmed.front_mut();
            // Biased: output first, so a read statement is on its way to the
            // server before its record is committed (which, with strict
            // durability, may sync on this thread); then the records, then
            // input. No branch can starve another: output drains, and a
            // record resolves once.
            let ev = tokio::select! {
                biased;
                r = uw.write(&self.uout), if !self.uout.is_empty() && !self.closing => Event::UpstreamWrote(r),
                r = cw.write(&self.cout), if release && !self.cout.is_empty() => Event::ClientWrote(r),
                r = async { match unconfirmed { Some(f) => f.await, None => std::future::pending().await } }, if !release => Event::Recorded(r),
                r = cr.read_buf(&mut self.cin), if read_client => Event::ClientRead(r),
                r = ur.read_buf(&mut self.uin), if read_upstream => Event::UpstreamRead(r),
                o = async { match held { Some(f) => f.await, None => std::future::pending().await } }, if holding => Event::Approval(o),
                () = tokio::time::sleep_until(auth_deadline), if !ready => Event::AuthTimeout,
                else => Event::Stalled,
            };
            match ev {
                Event::ClientRead(Ok(0)) => self.client_gone().await,
                Event::UpstreamRead(Ok(0)) => self.upstream_eof = true,
                Event::ClientRead(Ok(_)) | Event::UpstreamRead(Ok(_)) => {}
                Event::ClientRead(Err(e)) | Event::ClientWrote(Err(e)) => {
                    self.client_gone().await;
                    break Err(PgProxyError::ClientIo { source: e });
                }
                Event::UpstreamRead(Err(e)) => {
                    self.upstream_eof = true;
                    self.fatal("08006", "agentgate: connection to the server lost");
                    tracing::info!(conn = self.ctx.conn.id, error = %e, "upstream read failed");
                }
                Event::ClientWrote(Ok(n)) => {
                    self.cout.advance(n);
                    self.ctx
                        .conn
                        .bytes_down
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
                Event::UpstreamWrote(Ok(n)) => {
                    self.uout.advance(n);
                    self.ctx
                        .conn
                        .bytes_up
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
                Event::UpstreamWrote(Err(e)) => {
                    self.upstream_eof = true;
                    self.fatal("08006", "agentgate: connection to the server lost");
                    tracing::info!(conn = self.ctx.conn.id, error = %e, "upstream write failed");
                }
                Event::Approval(o) => self.approval_outcome(o).await,
                Event::Recorded(r) => {
                    self.unconfirmed.pop_front();
                    if let Err(e) = r {
                        self.withhold(&e);
                    }
                }
                Event::AuthTimeout => {
                    self.fatal("08006", "agentgate: authentication timed out");
                    break Err(PgProxyError::Timeout {
                        phase: "authentication",
                    });
                }
                Event::Stalled => break Ok(()),
            }
        };
        self.flush_at_end(&mut cw, &mut uw).await;
        outcome
    }

    /// Best effort at the end: what the client should still see (errors, last
    /// results), once every statement it answers is on record; then close.
    async fn flush_at_end<CW, UW>(&mut self, cw: &mut CW, uw: &mut UW)
    where
        CW: AsyncWrite + Unpin,
        UW: AsyncWrite + Unpin,
    {
        while let Some(f) = self.unconfirmed.pop_front() {
            match tokio::time::timeout(Duration::from_secs(5), f).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => self.withhold(&e),
                Err(_) => self.withhold(&AuditUnavailable {
                    reason: "timed out".into(),
                }),
            }
        }
        if !self.cout.is_empty() {
            let _ = tokio::time::timeout(Duration::from_secs(5), cw.write_all(&self.cout)).await;
            self.ctx
                .conn
                .bytes_down
                .fetch_add(self.cout.len() as u64, Ordering::Relaxed);
            self.cout.clear();
        }
        let _ = cw.shutdown().await;
        if !self.closing && !self.uout.is_empty() {
            let _ = tokio::time::timeout(Duration::from_secs(5), uw.write_all(&self.uout)).await;
        }
        let _ = uw.shutdown().await;
    }

    fn finished(&self) -> bool {
        (self.closing && self.cout.is_empty())
            || (self.client_eof && self.uout.is_empty() && self.cin.is_empty())
            || (self.upstream_eof && self.cout.is_empty() && self.uin.len() < 5)
    }

    /// The client closed: a held statement's request is cancelled (recorded
    /// `approval.cancelled`), and the statement never runs.
    async fn client_gone(&mut self) {
        self.client_eof = true;
        if let Some(h) = self.held.take() {
            self.gate.cancel(h.hold).await;
        }
        // Nothing the client still had queued is processed.
        self.cin.clear();
        self.deferred = None;
    }

    /// A forwarded statement's record could not be written: nothing the client
    /// has not seen yet is released, and the connection ends.
    fn withhold(&mut self, e: &AuditUnavailable) {
        tracing::error!(conn = self.ctx.conn.id, error = %e, "audit append failed; results withheld");
        self.unconfirmed.clear();
        self.cout.clear();
        self.closing = false;
        self.fatal(
            "58030",
            "agentgate: audit log unavailable; the statement's results were withheld (fails closed)",
        );
    }

    /// Queue a fatal error for the client and stop talking to the server.
    fn fatal(&mut self, sqlstate: &str, message: &str) {
        if self.closing {
            return;
        }
        self.cout.extend_from_slice(&fatal_bytes(sqlstate, message));
        self.closing = true;
        self.uout.clear();
    }

    /// Decode and handle everything that can be handled now.
    async fn pump(&mut self) -> Result<(), PgProxyError> {
        loop {
            let mut progressed = false;
            while !self.closing && self.cout.len() < HIGH_WATER {
                match codec::decode_backend(&mut self.uin, &self.ctx.settings.limits) {
                    Ok(Some(m)) => {
                        progressed = true;
                        self.on_backend(m).await?;
                    }
                    Ok(None) => break,
                    Err(source) => {
                        self.fatal("08P01", "agentgate: the server sent a malformed message");
                        return Err(PgProxyError::Protocol { source });
                    }
                }
            }
            while self.can_process_client() {
                if self.ready && self.catalog_wanted() {
                    self.start_catalog();
                    progressed = true;
                    break;
                }
                let msg = match self.deferred.take() {
                    Some(m) => m,
                    None => {
                        match codec::decode_frontend(&mut self.cin, &self.ctx.settings.limits) {
                            Ok(Some(m)) => m,
                            Ok(None) => break,
                            Err(source) => {
                                self.fatal(
                                    "08P01",
                                    &format!("agentgate: protocol error: {source}"),
                                );
                                self.cin.clear();
                                return Err(PgProxyError::Protocol { source });
                            }
                        }
                    }
                };
                progressed = true;
                self.on_client(msg).await?;
            }
            if !progressed {
                return Ok(());
            }
        }
    }

    fn can_process_client(&self) -> bool {
        !self.closing
            && !self.client_eof
            && self.held.is_none()
            && self.catalog_inflight.is_none()
            && self.uout.len() < HIGH_WATER
            && self.unconfirmed.len() < MAX_UNCONFIRMED
            && (self.deferred.is_some() || !self.cin.is_empty())
    }

    fn catalog_wanted(&self) -> bool {
        self.idle_point
            && self.session.is_idle()
            && self.session.tx_status() != TxStatus::Failed
            && !self.masking().columns().is_empty()
            && self.catalog.wants_load()
    }

    fn start_catalog(&mut self) {
        let q = FrontendMessage::Query {
            sql: Bytes::from_static(catalog::CATALOG_SQL.as_bytes()),
        };
        let _ = self.session.forward(&q);
        q.encode(&mut self.uout);
        self.catalog.begin();
        self.catalog_inflight = Some(false);
        self.idle_point = false;
    }

    // -----------------------------------------------------------------------
    // Server → client

    #[allow(clippy::too_many_lines)] // one arm per session action reads best as one match
    async fn on_backend(&mut self, m: BackendMessage) -> Result<(), PgProxyError> {
        if let Some(failed) = self.catalog_inflight {
            return self.on_catalog(&m, failed);
        }
        if !self.ready {
            return self.on_auth_backend(m).await;
        }
        let running_sql = self.session.current_sql().cloned();
        let action = match self.session.backend(&m) {
            Ok(a) => a,
            Err(e) => {
                self.fatal("08P01", &format!("agentgate: {e}"));
                return Err(e.into());
            }
        };
        match action {
            BackendAction::Forward => {
                match &m {
                    BackendMessage::CommandComplete { tag } => {
                        self.completed(running_sql.as_ref(), "ok", Some(tag), None);
                        self.results_seen += 1;
                    }
                    BackendMessage::EmptyQueryResponse => {
                        self.completed(running_sql.as_ref(), "ok", None, None);
                        self.results_seen += 1;
                    }
                    BackendMessage::PortalSuspended => {
                        self.completed(running_sql.as_ref(), "ok", None, None);
                    }
                    BackendMessage::ErrorResponse(f) if running_sql.is_some() => {
                        let state = f
                            .sqlstate()
                            .map(|s| String::from_utf8_lossy(s).into_owned());
                        self.completed(running_sql.as_ref(), "error", None, state.as_deref());
                        if self.withholds_messages(running_sql.as_ref()) {
                            BackendMessage::ErrorResponse(withheld(f)).encode(&mut self.cout);
                            return Ok(());
                        }
                    }
                    BackendMessage::NoticeResponse(f)
                        if running_sql.is_some()
                            && self.withholds_messages(running_sql.as_ref()) =>
                    {
                        BackendMessage::NoticeResponse(withheld(f)).encode(&mut self.cout);
                        return Ok(());
                    }
                    BackendMessage::CopyOutResponse(_) => {
                        if let Err(reason) = self.copy_plan(running_sql.as_ref()) {
                            return self.mask_failed(&MaskError::Copy { reason });
                        }
                    }
                    BackendMessage::ReadyForQuery(_) => {
                        self.idle_point = true;
                        self.results_seen = 0;
                        self.copies_seen = 0;
                        self.copy = None;
                    }
                    _ => {}
                }
                m.encode(&mut self.cout);
            }
            BackendAction::Row(desc) => {
                let BackendMessage::DataRow(row) = &m else {
                    unreachable!("Row is only returned for DataRow")
                };
                self.cur.rows += 1;
                self.cur.bytes += row.body().len() as u64;
                if !masking_active(self.masking()) {
                    m.encode(&mut self.cout);
                    return Ok(());
                }
                let Some(desc) = desc else {
                    return self.mask_failed(&MaskError::Refused {
                        column: "?".into(),
                        reason: "the row's columns are not known",
                    });
                };
                if let Err(e) = self.ensure_plan(&desc, running_sql.as_ref()) {
                    return self.mask_failed(&e);
                }
                let p = self.plan.as_ref().expect("ensure_plan set it");
                if self.cur.lineage.is_none() {
                    self.cur.lineage.clone_from(&p.lineage);
                }
                let plan = &p.rows;
                let masker = Masker {
                    policy: self.set.masking_for(&self.ctx.resource),
                    json: &p.json,
                };
                if let Err(e) = plan.mask_row_into(
                    &masker,
                    row,
                    &mut self.scratch,
                    &mut self.cur.report,
                    &mut self.cout,
                ) {
                    return self.mask_failed(&e);
                }
            }
            BackendAction::CopyOut(format) => {
                let BackendMessage::CopyData(data) = &m else {
                    unreachable!("CopyOut is only returned for CopyData")
                };
                self.cur.rows += 1;
                self.cur.bytes += data.len() as u64;
                if !masking_active(self.masking()) {
                    m.encode(&mut self.cout);
                    return Ok(());
                }
                let Some(plan) = self.copy.as_ref() else {
                    return self.mask_failed(&MaskError::Copy {
                        reason: "COPY columns are not known",
                    });
                };
                let masker = Masker::new(self.set.masking_for(&self.ctx.resource));
                match plan.mask_copy_data(
                    &masker,
                    super::mask::CopyKind::Text,
                    &format,
                    data,
                    &mut self.scratch,
                    &mut self.cur.report,
                ) {
                    Ok(Some(new)) => BackendMessage::CopyData(new).encode(&mut self.cout),
                    Ok(None) => m.encode(&mut self.cout),
                    Err(e) => return self.mask_failed(&e),
                }
            }
            BackendAction::Replace(msg) => msg.encode(&mut self.cout),
            BackendAction::Drop => {}
        }
        Ok(())
    }

    async fn on_auth_backend(&mut self, mut m: BackendMessage) -> Result<(), PgProxyError> {
        if let BackendMessage::Authentication(a @ Authentication::Sasl { .. }) = &mut m
            && !strip_channel_binding(a)
        {
            self.fatal(
                "28000",
                "agentgate: the server offers only SCRAM with channel binding, which cannot pass a proxy",
            );
            return Ok(());
        }
        let is_ready = matches!(m, BackendMessage::ReadyForQuery(_));
        self.session.backend(&m)?;
        if is_ready {
            let mut ev = self.event(
                Kind::SessionStart,
                json!({
                    "protocol": "postgres",
                    "database": self.database,
                    "user": self.user,
                    "application_name": self.application_name,
                    "destination": self.ctx.conn.destination.to_string(),
                    "tls_upstream": self.tls_upstream,
                    "credential": self.credential,
                }),
            );
            ev.decision = Some(json!({"verdict": "allow"}));
            if let Err(e) = self.ctx.audit.append(ev).await {
                self.fatal(
                    "58030",
                    "agentgate: audit log unavailable; connection closed (fails closed)",
                );
                return Err(PgProxyError::Audit { source: e });
            }
            self.ready = true;
            self.idle_point = true;
            if let Some(k) = self.session.backend_key() {
                let issued = Issued {
                    destination: self.ctx.conn.destination,
                    identity: self.ctx.subject.identity.clone(),
                    conn: self.ctx.conn.id,
                };
                self.cancel_key = Some(self.ctx.cancel_keys.issue(k.pid, k.secret.clone(), issued));
            }
        }
        m.encode(&mut self.cout);
        Ok(())
    }

    fn on_catalog(&mut self, m: &BackendMessage, failed: bool) -> Result<(), PgProxyError> {
        self.session.backend(m)?;
        match m {
            BackendMessage::DataRow(r) => self.catalog.row(r),
            BackendMessage::ErrorResponse(f) => {
                tracing::warn!(
                    conn = self.ctx.conn.id,
                    sqlstate = %String::from_utf8_lossy(f.sqlstate().unwrap_or_default()),
                    "catalog query failed; unknown tables are treated as unknown (every rule naming a column applies)"
                );
                self.catalog_inflight = Some(true);
            }
            BackendMessage::ReadyForQuery(_) => {
                if failed {
                    self.catalog.failed();
                } else {
                    self.catalog.finish();
                    tracing::debug!(
                        conn = self.ctx.conn.id,
                        relations = self.catalog.len(),
                        truncated = self.catalog.is_truncated(),
                        "catalog loaded"
                    );
                }
                self.catalog_inflight = None;
                self.idle_point = true;
                self.plan = None;
            }
            BackendMessage::NoticeResponse(_)
            | BackendMessage::ParameterStatus { .. }
            | BackendMessage::NotificationResponse { .. } => m.encode(&mut self.cout),
            _ => {}
        }
        Ok(())
    }

    fn ensure_plan(
        &mut self,
        desc: &Arc<RowDescription>,
        sql: Option<&Bytes>,
    ) -> Result<(), MaskError> {
        if self
            .plan
            .as_ref()
            .is_some_and(|p| Arc::ptr_eq(&p.desc, desc))
        {
            return Ok(());
        }
        let set = self.set.clone();
        let policy = set.masking_for(&self.ctx.resource);
        let masker = Masker::new(policy);
        if policy.columns().is_empty() {
            // Detectors only: table names do not matter.
            let plan = RowPlan::new(
                desc,
                &masker,
                |_| Some(String::new()),
                self.ctx.settings.unmaskable,
            )?;
            self.plan = Some(Plan {
                desc: desc.clone(),
                rows: plan,
                lineage: None,
                json: Vec::new(),
            });
            return Ok(());
        }
        // The server's attribution: pending OIDs are masked as "table
        // unknown" (every rule naming the column applies); unresolvable
        // ones refuse the row.
        let mut fields = Vec::with_capacity(desc.fields.len());
        for f in &desc.fields {
            let name = String::from_utf8_lossy(&f.name).into_owned();
            fields.push(match self.catalog.table(f.table_oid) {
                TableName::None => lineage::Field {
                    relation: None,
                    column: name,
                    computed: true,
                },
                TableName::Known(q) => lineage::Field {
                    column: self
                        .catalog
                        .relation(f.table_oid)
                        .and_then(|r| r.column_named(f.column_attr))
                        .map_or(name, str::to_owned),
                    relation: Some(q),
                    computed: false,
                },
                TableName::Pending => lineage::Field {
                    relation: None,
                    column: name,
                    computed: false,
                },
                TableName::Unresolvable => {
                    return Err(MaskError::UnresolvedTable {
                        table_oid: f.table_oid,
                        column: name,
                    });
                }
            });
        }
        // The statement's lineage: which statement of the text this is (a
        // FETCH's rows are its cursor's query's).
        let analysis = sql.map(|s| self.executed_analysis(s));
        let stmt = analysis.as_ref().and_then(|a| {
            let l = a.lineage.as_ref()?;
            let i = if l.len() == 1 { 0 } else { self.results_seen };
            l.get(i)
        });
        let outputs = stmt.and_then(|s| match &s.fetch {
            Some(cursor) => self.cursors.get(cursor),
            None => Some(&s.outputs),
        });
        let functions = stmt.map_or(&[][..], |s| s.functions.as_slice());
        let masks = ResultMasks::plan(policy, &self.catalog, outputs, functions, &fields);
        let decided = masks.record(|i| String::from_utf8_lossy(&desc.fields[i].name).into_owned());
        let plan = RowPlan::with_strategies(
            desc,
            &masker,
            &masks.strategies,
            self.ctx.settings.unmaskable,
        );
        self.plan = Some(Plan {
            desc: desc.clone(),
            rows: plan,
            lineage: decided,
            json: masks.json,
        });
        Ok(())
    }

    /// Whether the server's messages about the running statement are
    /// withheld: it reads a protected column, and a message may quote a
    /// value of it.
    fn withholds_messages(&mut self, sql: Option<&Bytes>) -> bool {
        let set = self.set.clone();
        let policy = set.masking_for(&self.ctx.resource);
        if policy.columns().is_empty() {
            return false;
        }
        let Some(sql) = sql else { return true };
        let analysis = self.executed_analysis(sql);
        match analysis.lineage.as_ref() {
            None => true,
            Some(all) => all
                .iter()
                .any(|s| lineage::reads_protected(policy, &self.catalog, Some(s))),
        }
    }

    /// A statement the masking policy refuses: it searches a protected
    /// column beyond its rule's `predicates` (any oracle but a bounded
    /// equality test), passes the identity's equality budget, copies a
    /// protected column into a table, or computes from one whose rule says
    /// `derived = "deny"`.
    fn lineage_refusal(
        &self,
        sql: &Bytes,
        analysis: &Analysis,
        params: &lineage::Params<'_>,
    ) -> Option<lineage::Refusal> {
        let policy = self.set.masking_for(&self.ctx.resource);
        if policy.columns().is_empty() {
            return None;
        }
        let statements = analysis.lineage.as_ref()?;
        lineage::admit(
            policy,
            &self.catalog,
            &self.ctx.probes,
            &self.ctx.subject.identity,
            &self.ctx.resource.name,
            &String::from_utf8_lossy(sql),
            Dialect::Postgres,
            statements,
            params,
        )
        .err()
    }

    /// Denies a statement the masking policy refuses, naming the rule, the
    /// column, the oracle and why (never a value). `true`: denied.
    async fn refuse_by_lineage(
        &mut self,
        m: &FrontendMessage,
        sql: &Bytes,
        analysis: &Analysis,
        params: &lineage::Params<'_>,
        stmt: &mut Option<StmtRecord>,
    ) -> bool {
        let Some(r) = self.lineage_refusal(sql, analysis, params) else {
            return false;
        };
        let reason = format!("{} ({})", r.reason, r.column);
        let decision = Decision {
            verdict: Verdict::Deny {
                reason: reason.clone(),
            },
            rule: r.rule.clone(),
        };
        if let Some(mut stmt) = stmt.take() {
            if let Some(o) = r.oracle {
                stmt.action["masking_refusal"] = json!({"oracle": o.as_str(), "column": r.column});
            }
            self.gate.deny(stmt.command("", false), &decision).await;
        }
        self.deny_with(
            m,
            ErrorFields::new(
                "ERROR",
                "42501",
                &format!(
                    "agentgate: statement denied by masking rule \"{}\": {reason}",
                    r.rule
                ),
            ),
        );
        true
    }

    /// A `CopyOutResponse`: build the plan for the `COPY` whose data follows.
    fn copy_plan(&mut self, sql: Option<&Bytes>) -> Result<(), &'static str> {
        let index = self.copies_seen;
        self.copies_seen += 1;
        self.copy = None;
        let set = self.set.clone();
        let policy = set.masking_for(&self.ctx.resource);
        if !masking_active(policy) {
            return Ok(());
        }
        let masker = Masker::new(policy);
        let sql = sql.ok_or("the COPY statement is not known")?;
        let copies = catalog::copy_outs(&String::from_utf8_lossy(sql))
            .ok_or("the COPY statement does not parse")?;
        let spec = copies.get(index).ok_or("the COPY statement is not known")?;
        let plan = match spec {
            CopyOut::Unmaskable { reason } => return Err(reason),
            CopyOut::Query if policy.columns().is_empty() => CopyPlan::detectors_only(&masker),
            CopyOut::Query => return Err("COPY (query) TO STDOUT under column rules"),
            CopyOut::Table { table, columns } => {
                if policy.columns().is_empty() {
                    CopyPlan::detectors_only(&masker)
                } else {
                    let rel = self
                        .catalog
                        .resolve(table)
                        .ok_or("the COPY table is not in the catalog")?;
                    let qualified = format!("{}.{}", rel.schema, rel.name);
                    let cols: Vec<(Option<&str>, &str)> = if columns.is_empty() {
                        rel.columns
                            .iter()
                            .map(|c| (Some(qualified.as_str()), c.as_str()))
                            .collect()
                    } else {
                        columns
                            .iter()
                            .map(|c| (Some(qualified.as_str()), c.as_str()))
                            .collect()
                    };
                    if cols.is_empty() {
                        return Err("the COPY table's columns are not known");
                    }
                    CopyPlan::new(&cols, &masker)
                }
            }
        };
        self.copy = Some(plan);
        Ok(())
    }

    #[allow(clippy::unnecessary_wraps)] // the row paths return it as their own result
    fn mask_failed(&mut self, e: &MaskError) -> Result<(), PgProxyError> {
        tracing::warn!(conn = self.ctx.conn.id, error = %e, "masking failed; closing the connection");
        let mut ev = self.event(
            Kind::MaskingFailure,
            json!({"protocol": "postgres", "database": self.database}),
        );
        ev.result = Some(json!({"error": e.to_string()}));
        let sink = self.ctx.audit.clone();
        tokio::spawn(async move {
            if let Err(e) = sink.append(ev).await {
                tracing::error!(error = %e, "audit append failed for a masking failure");
            }
        });
        self.fatal(
            "XX000",
            &format!(
                "agentgate: a result could not be masked ({e}); the connection is closed rather than send unmasked data"
            ),
        );
        Ok(())
    }

    /// A statement's results ended: its result record (not awaited: the
    /// statement already ran).
    fn completed(
        &mut self,
        sql: Option<&Bytes>,
        status: &'static str,
        tag: Option<&Bytes>,
        sqlstate: Option<&str>,
    ) {
        let cur = std::mem::replace(&mut self.cur, Running::new());
        let report = &cur.report;
        let transform = (report.values_masked > 0 || cur.lineage.is_some()).then(|| {
            json!({
                "masking": {
                    "columns": report.columns_masked,
                    "values_masked": report.values_masked,
                    "values_nulled": report.values_nulled,
                    "detectors": report.detectors.iter().collect::<Vec<_>>(),
                    "lineage": cur.lineage,
                }
            })
        });
        let command = tag.map(|t| String::from_utf8_lossy(t).into_owned());
        let action = json!({
            "protocol": "postgres",
            "phase": "completed",
            "database": self.database,
            "sql_hash": sql.map(|s| crate::audit::keyed_hash(&self.ctx.correlation_key, s)),
        });
        self.gate.completed(
            action,
            transform,
            &ResultRecord::Completed {
                status,
                command,
                rows: cur.rows,
                bytes: cur.bytes,
                duration_ms: cur.started.elapsed().as_millis() as u64,
                sqlstate: sqlstate.map(str::to_owned),
            },
        );
    }

    // -----------------------------------------------------------------------
    // Client → server

    async fn on_client(&mut self, m: FrontendMessage) -> Result<(), PgProxyError> {
        if !self.ready {
            return match m {
                FrontendMessage::AuthResponse(_) => {
                    m.encode(&mut self.uout);
                    Ok(())
                }
                FrontendMessage::Terminate => {
                    m.encode(&mut self.uout);
                    self.client_eof = true;
                    Ok(())
                }
                other => {
                    self.fatal(
                        "08P01",
                        "agentgate: protocol error: only authentication messages are allowed before the server is ready",
                    );
                    Err(PgProxyError::Client {
                        what: format!(
                            "message {:?} before authentication completed",
                            char::from(other.tag())
                        ),
                    })
                }
            };
        }
        match self.session.disposition(&m) {
            Disposition::Discard => Ok(()),
            Disposition::Forward => {
                if let FrontendMessage::Bind(b) = &m {
                    self.last_bind_values = Some((b.portal.clone(), b.params.clone()));
                    self.last_bind = Some((
                        b.portal.clone(),
                        json!({
                            "params": b.params.len(),
                            "null_params": b.params.iter().filter(|p| p.is_none()).count(),
                            "formats": b.param_formats,
                            "types": self.session.statement(&b.statement).map(|s| s.param_types.clone()),
                        }),
                    ));
                }
                if let FrontendMessage::Execute { portal, .. } = &m {
                    // A portal whose SQL the proxy never saw (a statement made
                    // by SQL `PREPARE`, a cursor from `DECLARE`) is decided
                    // like SQL `EXECUTE`: what runs is not visible, `unknown`.
                    let sql = self.session.portal_sql(portal).cloned().unwrap_or_else(|| {
                        let mut text = b"EXECUTE ".to_vec();
                        text.extend_from_slice(portal);
                        Bytes::from(text)
                    });
                    return self.execute(m, sql).await;
                }
                let terminate = matches!(m, FrontendMessage::Terminate);
                self.forward(&m);
                if terminate {
                    self.client_eof = true;
                    self.cin.clear();
                }
                Ok(())
            }
            Disposition::Decide => self.decide(m).await,
        }
    }

    fn forward(&mut self, m: &FrontendMessage) {
        let f = self.session.forward(m);
        if let Some(d) = f.describe_first {
            d.encode(&mut self.uout);
        }
        m.encode(&mut self.uout);
        self.idle_point = false;
        if matches!(
            m,
            FrontendMessage::Query { .. } | FrontendMessage::Execute { .. }
        ) {
            self.cur = Running::new();
        }
    }

    fn deny_with(&mut self, m: &FrontendMessage, error: ErrorFields) {
        if let Some(replacement) = self.session.deny(m, error) {
            replacement.encode(&mut self.uout);
            self.idle_point = false;
        }
    }

    async fn decide(&mut self, m: FrontendMessage) -> Result<(), PgProxyError> {
        self.set = self.ctx.policy.current();
        self.statements += 1;
        let (sql, message, name) = match &m {
            FrontendMessage::Query { sql } => (sql.clone(), "query", None),
            FrontendMessage::Parse { sql, statement, .. } => (
                sql.clone(),
                "parse",
                Some(String::from_utf8_lossy(statement).into_owned()),
            ),
            _ => {
                // Fast-path function calls bypass SQL entirely.
                let rule = "agentgate:function-call";
                let stmt = StmtRecord {
                    action: json!({"protocol": "postgres", "message": "function_call", "database": self.database}),
                    hash: String::new(),
                    class: "unknown",
                };
                let decision = Decision {
                    verdict: Verdict::Deny {
                        reason: "fast-path function calls are not allowed".into(),
                    },
                    rule: rule.into(),
                };
                self.gate.deny(stmt.command("", false), &decision).await;
                self.deny_with(&m, session::denial_error(rule));
                return Ok(());
            }
        };
        if let FrontendMessage::Parse { statement, .. } = &m {
            // A new statement under this name: the old one's approval goes.
            self.approved_parse.remove(statement);
        }
        let text = String::from_utf8_lossy(&sql);
        let analysis = self.ctx.sql_cache.analyze(&text, Dialect::Postgres);
        let classification = Arc::clone(&analysis.classification);
        let stmt = self.stmt_record(
            &analysis.redacted,
            &sql,
            &classification,
            message,
            name.as_deref(),
        );
        // COPY TO STDOUT the masker could not follow is refused up front.
        match self.copy_precheck(&text) {
            CopyCheck::Ok => {}
            CopyCheck::NeedCatalog => {
                self.catalog.mark_stale();
                if self.idle_point && self.session.is_idle() && self.catalog.wants_load() {
                    self.statements -= 1;
                    self.deferred = Some(m);
                    self.start_catalog();
                    return Ok(());
                }
            }
            CopyCheck::Deny(reason) => {
                let rule = "agentgate:copy-unmaskable";
                let decision = Decision {
                    verdict: Verdict::Deny {
                        reason: reason.clone(),
                    },
                    rule: rule.into(),
                };
                self.gate.deny(stmt.command("", false), &decision).await;
                self.deny_with(
                    &m,
                    ErrorFields::new(
                        "ERROR",
                        "42501",
                        &format!("agentgate: statement denied by policy rule \"{rule}\": {reason}"),
                    ),
                );
                return Ok(());
            }
        }
        // The policy first (its denial names its own rule, and a denied
        // statement costs no equality budget), then the masking's searches.
        let action = Action::Sql(Arc::clone(&classification));
        let decision = self.gate.decide(&self.set, &action);
        let mut stmt = Some(stmt);
        if !matches!(decision.verdict, Verdict::Deny { .. })
            && self
                .refuse_by_lineage(&m, &sql, &analysis, &lineage::Params::NotBound, &mut stmt)
                .await
        {
            return Ok(());
        }
        let stmt = stmt.expect("not taken unless refused");
        self.remember_analysis(&sql, &analysis);
        self.remember_cursors(&analysis);
        let read_only = classification.class <= StatementClass::Read;
        let command = stmt.command(&analysis.redacted, !read_only);
        let outcome = self
            .gate
            .admit_action(command, &decision, None, &action)
            .await;
        self.carry_out(m, outcome);
        Ok(())
    }

    /// Acts on the gate's outcome: forward (a read at once, its results held
    /// for its record), deny with `42501` (or `58030` when the log cannot
    /// take the record), or hold for approval with a `NoticeResponse`.
    fn carry_out(&mut self, m: FrontendMessage, outcome: gate::Outcome<'a>) {
        match outcome {
            gate::Outcome::ForwardNow { recording } => {
                self.unconfirmed.push_back(recording);
                self.forward(&m);
            }
            gate::Outcome::Forward { approved } => {
                if let FrontendMessage::Parse { statement, .. } = &m
                    && approved
                {
                    self.approved_parse.insert(statement.clone());
                }
                self.forward(&m);
            }
            gate::Outcome::Deny(denial) => self.deny_with(&m, denial_error(&denial)),
            gate::Outcome::Held(hold) => {
                BackendMessage::NoticeResponse(session::approval_notice(
                    &hold.request_id,
                    &hold.deadline,
                ))
                .encode(&mut self.cout);
                self.held = Some(Held { msg: m, hold });
            }
        }
    }

    fn stmt_record(
        &self,
        redacted: &str,
        raw: &Bytes,
        c: &Classification,
        message: &str,
        name: Option<&str>,
    ) -> StmtRecord {
        let redacted = truncate_chars(redacted, MAX_RECORD_SQL_CHARS);
        let hash = crate::audit::keyed_hash(&self.ctx.correlation_key, raw);
        StmtRecord {
            action: json!({
                "protocol": "postgres",
                "message": message,
                "statement_name": name,
                "database": self.database,
                "user": self.user,
                "sql": redacted,
                "sql_hash": hash,
                "class": c.class.as_str(),
                "statements": c.statements.len(),
                "tables": c.tables,
                "functions": c.functions,
                "destructive": c.destructive,
                "unparsed_reason": c.reason,
            }),
            hash,
            class: c.class.as_str(),
        }
    }

    /// An `Execute` of a prepared statement: a command of its own. It is
    /// decided again with the policy in force now (a reload that denies the
    /// statement stops its next execution), has its own record (class, keyed
    /// hash linking it to the `Parse` record, bind parameters counted) under
    /// the same write-ahead rule as a simple query, and, where the policy asks
    /// for approval, is approved on its own: the approval of its `Parse`
    /// covers the first execution only.
    async fn execute(&mut self, m: FrontendMessage, sql: Bytes) -> Result<(), PgProxyError> {
        let FrontendMessage::Execute { portal, .. } = &m else {
            unreachable!("called for Execute")
        };
        let statement = self.session.portal_statement(portal).cloned();
        let bind = match self.last_bind.take() {
            Some((p, bind)) if p == *portal => Some(bind),
            _ => None,
        };
        let analysis = self.executed_analysis(&sql);
        let class = analysis.classification.class;
        let hash = crate::audit::keyed_hash(&self.ctx.correlation_key, &sql);
        let stmt = StmtRecord {
            action: json!({
                "protocol": "postgres",
                "message": "execute",
                "portal": String::from_utf8_lossy(portal),
                "database": self.database,
                "user": self.user,
                "sql_hash": hash,
                "class": class.as_str(),
                "bind": bind,
            }),
            hash,
            class: class.as_str(),
        };
        self.set = self.ctx.policy.current();
        let mut stmt = Some(stmt);
        let values = match self.last_bind_values.take() {
            Some((p, values)) if p == *portal => values,
            _ => Vec::new(),
        };
        let param = |n: usize| -> Option<Vec<u8>> {
            values.get(n.checked_sub(1)?).map(|v| {
                v.as_ref()
                    .map_or_else(|| b"\0null".to_vec(), |b| b.to_vec())
            })
        };
        let action = Action::Sql(Arc::clone(&analysis.classification));
        let decision = self.gate.decide(&self.set, &action);
        if !matches!(decision.verdict, Verdict::Deny { .. })
            && self
                .refuse_by_lineage(
                    &m,
                    &sql,
                    &analysis,
                    &lineage::Params::Bound(&param),
                    &mut stmt,
                )
                .await
        {
            return Ok(());
        }
        let stmt = stmt.expect("not taken unless refused");
        let covered = statement
            .as_ref()
            .is_some_and(|name| self.approved_parse.remove(name))
            .then_some(Covered {
                by: "the approval of its parse",
            });
        let read_only = class <= StatementClass::Read;
        let command = stmt.command(&analysis.redacted, !read_only);
        let outcome = self
            .gate
            .admit_action(command, &decision, covered, &action)
            .await;
        self.carry_out(m, outcome);
        Ok(())
    }

    /// Keeps the outputs of the cursors a statement declares, for the
    /// masking of their `FETCH`es (at most [`MAX_CURSORS`]; a `FETCH` from a
    /// cursor not kept has its computed columns redacted).
    fn remember_cursors(&mut self, a: &Analysis) {
        for s in a.lineage.iter().flatten() {
            if let Some((name, outputs)) = &s.cursor {
                if self.cursors.len() >= MAX_CURSORS {
                    self.cursors.clear();
                }
                self.cursors.insert(name.clone(), outputs.clone());
            }
        }
    }

    /// Keeps a decided statement's analysis for its results' masking.
    fn remember_analysis(&mut self, sql: &Bytes, a: &Arc<Analysis>) {
        if sql.len() <= MAX_CACHED_LEN && !self.executed.contains_key(sql) {
            if self.executed.len() >= MAX_EXECUTED {
                self.executed.clear();
            }
            self.executed.insert(sql.clone(), Arc::clone(a));
        }
    }

    /// The analysis of a prepared statement's SQL, from this connection's
    /// [`Pg::executed`] when it ran before.
    fn executed_analysis(&mut self, sql: &Bytes) -> Arc<Analysis> {
        if let Some(a) = self.executed.get(sql) {
            return Arc::clone(a);
        }
        let a = self
            .ctx
            .sql_cache
            .analyze(&String::from_utf8_lossy(sql), Dialect::Postgres);
        if sql.len() <= MAX_CACHED_LEN {
            if self.executed.len() >= MAX_EXECUTED {
                self.executed.clear();
            }
            self.executed.insert(sql.clone(), Arc::clone(&a));
        }
        a
    }

    /// The approvers answered a held statement: forward it or deny it.
    async fn approval_outcome(&mut self, answer: gate::hold::Answer) {
        let Some(h) = self.held.take() else {
            return;
        };
        let outcome = self.gate.release(h.hold, answer).await;
        self.carry_out(h.msg, outcome);
    }

    fn copy_precheck(&self, text: &str) -> CopyCheck {
        let policy = self.masking();
        if !masking_active(policy) || !text.to_ascii_lowercase().contains("copy") {
            return CopyCheck::Ok;
        }
        let Some(copies) = catalog::copy_outs(text) else {
            return CopyCheck::Ok; // not parsed: Unknown class, the policy decides
        };
        for c in copies {
            match c {
                CopyOut::Unmaskable { reason } => {
                    return CopyCheck::Deny(format!(
                        "{reason} cannot be masked; use COPY ... TO STDOUT in text format"
                    ));
                }
                CopyOut::Query if !policy.columns().is_empty() => {
                    return CopyCheck::Deny(
                        "COPY (query) TO STDOUT cannot be masked by column; COPY a table or SELECT instead".into(),
                    );
                }
                CopyOut::Table { table, .. }
                    if !policy.columns().is_empty() && self.catalog.resolve(&table).is_none() =>
                {
                    if self.catalog.wants_load() || !self.catalog.is_loaded() {
                        return CopyCheck::NeedCatalog;
                    }
                    return CopyCheck::Deny(
                        "the COPY table is unknown or ambiguous; qualify it with its schema".into(),
                    );
                }
                _ => {}
            }
        }
        CopyCheck::Ok
    }

    async fn close_record(&mut self, error: Option<&PgProxyError>) {
        if !self.ready {
            return;
        }
        let mut ev = self.event(
            Kind::SessionEnd,
            json!({"protocol": "postgres", "database": self.database, "user": self.user}),
        );
        ev.result = Some(json!({
            "statements": self.statements,
            "bytes_up": self.ctx.conn.bytes_up.load(Ordering::Relaxed),
            "bytes_down": self.ctx.conn.bytes_down.load(Ordering::Relaxed),
            "duration_ms": self.opened_at.elapsed().as_millis() as u64,
            "error": error.map(ToString::to_string),
        }));
        if let Err(e) = self.ctx.audit.append(ev).await {
            tracing::error!(error = %e, "audit append failed for connection.close");
        }
    }
}

enum CopyCheck {
    Ok,
    NeedCatalog,
    Deny(String),
}

/// A denial as Postgres reports it: `42501` naming the rule (and the approval
/// request, when approvers said no or nobody decided), `58030` when the log
/// could not take the statement's record.
fn denial_error(d: &Denial) -> ErrorFields {
    match &d.kind {
        DenialKind::Policy => session::denial_error(&d.rule),
        DenialKind::Approval { request } => ErrorFields::new(
            "ERROR",
            "42501",
            &format!(
                "agentgate: statement denied by policy rule \"{}\": approval request {request} {}",
                d.rule, d.reason
            ),
        ),
        // Withdrawn by the client's own cancel: what Postgres says to one.
        DenialKind::Withdrawn { request } => ErrorFields::new(
            "ERROR",
            "57014",
            &format!(
                "agentgate: statement denied by policy rule \"{}\": approval request {request} {}",
                d.rule, d.reason
            ),
        ),
        DenialKind::AuditUnavailable => ErrorFields::new(
            "ERROR",
            "58030",
            "agentgate: audit log unavailable; the statement was not run (fails closed)",
        ),
    }
}

#[cfg(test)]
mod tests {
    use std::{future::Future, net::SocketAddr, pin::Pin, sync::Mutex};

    use tokio::net::TcpListener;

    use super::*;
    use crate::policy::{PolicyStore, load_str};

    const POLICY: &str = r#"
[[resource]]
name = "db"
protocol = "postgres"
addresses = ["127.0.0.1:1"]
[[rule]]
name = "reads"
identities = ["agent"]
resources = ["db"]
action = "allow"
match = { sql = ["read"] }
[[rule]]
name = "writes"
identities = ["agent"]
resources = ["db"]
action = "allow"
match = { sql = ["write"] }
[[rule]]
name = "vault-writes"
identities = ["agent"]
resources = ["db"]
action = "require_approval"
match = { sql = ["write"], tables = ["vault"] }
[rule.approval]
approver_groups = ["dba"]
timeout = "30s"
"#;

    /// A minimal server: trust auth, and every `Query` answered with a
    /// syntax error (for the proxy's denial statement) or `SELECT 0`. Records
    /// the SQL it received.
    async fn fake_server(l: TcpListener, seen: Arc<Mutex<Vec<String>>>) {
        let (mut s, _) = l.accept().await.unwrap();
        let mut len = [0u8; 4];
        s.read_exact(&mut len).await.unwrap();
        let mut rest = vec![0u8; u32::from_be_bytes(len) as usize - 4];
        s.read_exact(&mut rest).await.unwrap();
        s.write_all(b"R\0\0\0\x08\0\0\0\0Z\0\0\0\x05I")
            .await
            .unwrap();
        let mut skipping = false;
        loop {
            let mut hdr = [0u8; 5];
            if s.read_exact(&mut hdr).await.is_err() {
                return;
            }
            let n = u32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as usize - 4;
            let mut body = vec![0u8; n];
            s.read_exact(&mut body).await.unwrap();
            if hdr[0] != b'Q' {
                // The extended protocol, just enough for one statement and portal.
                let reply = match hdr[0] {
                    b'P' if body
                        .windows(session::DENIED_SQL.len())
                        .any(|w| w == session::DENIED_SQL) =>
                    {
                        skipping = true;
                        BackendMessage::ErrorResponse(ErrorFields::new(
                            "ERROR",
                            "42601",
                            "syntax error",
                        ))
                    }
                    _ if skipping && hdr[0] != b'S' => continue,
                    b'P' => BackendMessage::ParseComplete,
                    b'B' => BackendMessage::BindComplete,
                    b'D' => BackendMessage::NoData,
                    b'E' => {
                        seen.lock().unwrap().push("EXECUTE".into());
                        BackendMessage::CommandComplete {
                            tag: Bytes::from_static(b"UPDATE 1"),
                        }
                    }
                    b'S' => {
                        skipping = false;
                        BackendMessage::ReadyForQuery(TxStatus::Idle)
                    }
                    _ => continue,
                };
                let mut out = BytesMut::new();
                reply.encode(&mut out);
                s.write_all(&out).await.unwrap();
                continue;
            }
            let sql = String::from_utf8_lossy(&body[..n - 1]).into_owned();
            let reply = if sql.as_bytes() == session::DENIED_SQL {
                BackendMessage::ErrorResponse(ErrorFields::new("ERROR", "42601", "syntax error"))
            } else {
                BackendMessage::CommandComplete {
                    tag: Bytes::from_static(b"SELECT 0"),
                }
            };
            seen.lock().unwrap().push(sql);
            let mut out = BytesMut::new();
            reply.encode(&mut out);
            BackendMessage::ReadyForQuery(TxStatus::Idle).encode(&mut out);
            s.write_all(&out).await.unwrap();
        }
    }

    /// A log that takes the records `picks` does not pick; a picked record
    /// waits until `gate` (if any) opens, then fails if `fail`.
    struct TestSink {
        picks: fn(&NewRecord) -> bool,
        gate: Option<tokio::sync::watch::Receiver<bool>>,
        fail: bool,
        /// Records in the order they are queued: at the call, as the trait
        /// requires of every sink.
        queued: Arc<Mutex<Vec<String>>>,
    }

    impl TestSink {
        /// Takes every record at once.
        fn accepting() -> Self {
            Self {
                picks: |_| false,
                gate: None,
                fail: false,
                queued: Arc::default(),
            }
        }

        /// Fails every record.
        fn failing() -> Self {
            Self {
                picks: |_| true,
                gate: None,
                fail: true,
                queued: Arc::default(),
            }
        }

        /// Fails only statement records of a write (so the connection opens).
        fn failing_writes() -> Self {
            Self {
                picks: |r| of_class(r, "write"),
                gate: None,
                fail: true,
                queued: Arc::default(),
            }
        }

        /// Holds statement records of reads until `gate` opens, then fails them if `fail`.
        fn slow_reads(gate: tokio::sync::watch::Receiver<bool>, fail: bool) -> Self {
            Self {
                picks: |r| of_class(r, "read"),
                gate: Some(gate),
                fail,
                queued: Arc::default(),
            }
        }
    }

    fn record_label(r: &NewRecord) -> String {
        let a = r.action.as_ref();
        let phase = a.and_then(|a| a["phase"].as_str()).unwrap_or("statement");
        let sql = a.and_then(|a| a["sql"].as_str()).unwrap_or("");
        format!("{phase} {sql}").trim().to_owned()
    }

    fn of_class(r: &NewRecord, class: &str) -> bool {
        r.action.as_ref().is_some_and(|a| a["class"] == class)
    }

    impl AuditSink for TestSink {
        fn append(
            &self,
            r: NewRecord,
        ) -> Pin<Box<dyn Future<Output = Result<(), AuditUnavailable>> + Send + '_>> {
            self.queued.lock().unwrap().push(record_label(&r));
            let picked = (self.picks)(&r);
            let gate = self.gate.clone();
            let fail = self.fail;
            Box::pin(async move {
                if !picked {
                    return Ok(());
                }
                if let Some(mut gate) = gate {
                    let _ = gate.wait_for(|open| *open).await;
                }
                if fail {
                    Err(AuditUnavailable {
                        reason: "disk full".into(),
                    })
                } else {
                    Ok(())
                }
            })
        }

        fn append_detached(&self, r: NewRecord) {
            self.queued.lock().unwrap().push(record_label(&r));
        }
    }

    fn ctx(dest: SocketAddr, audit: Arc<dyn AuditSink>) -> PgContext {
        let set = load_str(&[("p.toml", POLICY)]).unwrap();
        let resource = set.resource("db").unwrap().clone();
        let policy = Arc::new(PolicyStore::from_set(
            std::path::Path::new("/nonexistent"),
            set,
            None,
        ));
        let conn = Arc::new(LiveConnection::for_test(dest, "db"));
        PgContext {
            conn,
            subject: Subject {
                identity: "agent".into(),
                groups: vec![],
            },
            resource,
            policy,
            approvals: Broker::new(
                Arc::new(crate::approval::testing::Accepting),
                crate::approval::Settings::default(),
            ),
            audit,
            correlation_key: [7; 32],
            cancel_keys: CancelKeys::default(),
            sql_cache: Arc::default(),
            probes: Arc::default(),
            settings: PgSettings::default(),
        }
    }

    fn startup() -> BytesMut {
        let mut b = BytesMut::new();
        StartupPacket::Startup {
            version: codec::ProtocolVersion { major: 3, minor: 0 },
            params: vec![("user".into(), "u".into()), ("database".into(), "d".into())],
        }
        .encode(&mut b);
        b
    }

    fn query(sql: &str) -> BytesMut {
        let mut b = BytesMut::new();
        FrontendMessage::Query {
            sql: Bytes::copy_from_slice(sql.as_bytes()),
        }
        .encode(&mut b);
        b
    }

    /// Reads backend messages until `ReadyForQuery` or EOF; returns the SQLSTATEs seen.
    async fn until_ready(c: &mut TcpStream, buf: &mut BytesMut) -> (Vec<String>, bool) {
        let mut states = Vec::new();
        loop {
            while let Some(m) = codec::decode_backend(buf, &Limits::default()).unwrap() {
                match m {
                    BackendMessage::ErrorResponse(f) => {
                        states.push(String::from_utf8_lossy(f.sqlstate().unwrap()).into_owned());
                    }
                    BackendMessage::ReadyForQuery(_) => return (states, false),
                    _ => {}
                }
            }
            if c.read_buf(buf).await.unwrap() == 0 {
                return (states, true);
            }
        }
    }

    async fn harness(audit: Arc<dyn AuditSink>) -> (TcpStream, Arc<Mutex<Vec<String>>>, BytesMut) {
        let (c, seen, buf, _) = harness_with_approvals(audit).await;
        (c, seen, buf)
    }

    async fn harness_with_approvals(
        audit: Arc<dyn AuditSink>,
    ) -> (TcpStream, Arc<Mutex<Vec<String>>>, BytesMut, Broker) {
        harness_with_policy(audit, None).await
    }

    async fn harness_with_policy(
        audit: Arc<dyn AuditSink>,
        policy: Option<Arc<PolicyStore>>,
    ) -> (TcpStream, Arc<Mutex<Vec<String>>>, BytesMut, Broker) {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut ctx = ctx(upstream.local_addr().unwrap(), audit);
        if let Some(policy) = policy {
            ctx.policy = policy;
        }
        let approvals = ctx.approvals.clone();
        tokio::spawn(fake_server(upstream, seen.clone()));
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = front.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = front.accept().await.unwrap();
            let _ = serve(s, ctx).await;
        });
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(&startup()).await.unwrap();
        let mut buf = BytesMut::new();
        let (errs, eof) = until_ready(&mut c, &mut buf).await;
        assert!(errs.is_empty() && !eof);
        (c, seen, buf, approvals)
    }

    #[test]
    fn the_configs_defaults_are_the_handlers() {
        let s = PgSettings::from_config(&PostgresConfig::default(), Duration::from_secs(5));
        let d = PgSettings::default();
        assert_eq!(s.limits, d.limits);
        assert_eq!(
            (s.startup_timeout, s.auth_timeout, s.unmaskable),
            (d.startup_timeout, d.auth_timeout, d.unmaskable)
        );
    }

    #[tokio::test]
    async fn an_unloggable_statement_is_denied_and_never_reaches_the_server() {
        let (mut c, seen, mut buf) = harness(Arc::new(TestSink::failing_writes())).await;
        c.write_all(&query("DELETE FROM t WHERE id = 1"))
            .await
            .unwrap();
        let (errs, _) = until_ready(&mut c, &mut buf).await;
        assert_eq!(errs, vec!["58030"]);
        c.write_all(&query("SELECT 1")).await.unwrap();
        let (errs, _) = until_ready(&mut c, &mut buf).await;
        assert!(errs.is_empty(), "the session stays usable");
        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            seen,
            vec!["AGENTGATE DENIED".to_owned(), "SELECT 1".to_owned()]
        );
    }

    /// Parse, Bind, Execute and Sync of one unnamed statement.
    fn extended(sql: &str) -> BytesMut {
        prepared("", sql)
    }

    /// Parse of `statement`, then one execution of it.
    fn prepared(statement: &str, sql: &str) -> BytesMut {
        let mut b = BytesMut::new();
        FrontendMessage::Parse {
            statement: Bytes::copy_from_slice(statement.as_bytes()),
            sql: Bytes::copy_from_slice(sql.as_bytes()),
            param_types: Vec::new(),
        }
        .encode(&mut b);
        b.extend_from_slice(&execution(statement));
        b
    }

    /// How many `Execute`s the fake server ran.
    fn executed(seen: &Mutex<Vec<String>>) -> usize {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|s| *s == "EXECUTE")
            .count()
    }

    /// Bind, Execute and Sync of the prepared statement `statement`.
    fn execution(statement: &str) -> BytesMut {
        let mut b = BytesMut::new();
        FrontendMessage::Bind(codec::Bind {
            portal: Bytes::new(),
            statement: Bytes::copy_from_slice(statement.as_bytes()),
            param_formats: Vec::new(),
            params: vec![Some(Bytes::from_static(b"123-45-6789"))],
            result_formats: Vec::new(),
        })
        .encode(&mut b);
        FrontendMessage::Execute {
            portal: Bytes::new(),
            max_rows: 0,
        }
        .encode(&mut b);
        FrontendMessage::Sync.encode(&mut b);
        b
    }

    fn of_message(r: &NewRecord, message: &str) -> bool {
        r.action.as_ref().is_some_and(|a| a["message"] == message)
    }

    #[tokio::test]
    async fn an_execution_that_cannot_be_logged_never_runs() {
        // The Parse is recorded; the Execute's own record fails.
        let sink = TestSink {
            picks: |r| of_message(r, "execute"),
            gate: None,
            fail: true,
            queued: Arc::default(),
        };
        let (mut c, seen, mut buf) = harness(Arc::new(sink)).await;
        c.write_all(&extended("UPDATE t SET a = $1")).await.unwrap();
        let (errs, eof) = until_ready(&mut c, &mut buf).await;
        assert_eq!(errs, vec!["58030"]);
        assert!(!eof, "the session stays usable");
        assert_eq!(
            executed(&seen),
            0,
            "the server ran an execution that has no record"
        );
        // A logged execution runs.
        let (mut c, seen, mut buf) = harness(Arc::new(TestSink::accepting())).await;
        c.write_all(&extended("UPDATE t SET a = $1")).await.unwrap();
        let (errs, _) = until_ready(&mut c, &mut buf).await;
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(seen.lock().unwrap().clone(), vec!["EXECUTE".to_owned()]);
    }

    #[tokio::test]
    async fn an_executions_result_waits_for_its_record() {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let sink = TestSink {
            picks: |r| of_message(r, "execute"),
            gate: Some(rx),
            fail: false,
            queued: Arc::default(),
        };
        let (mut c, seen, mut buf) = harness(Arc::new(sink)).await;
        c.write_all(&extended("SELECT a FROM t WHERE b = $1"))
            .await
            .unwrap();
        wait_seen(&seen, "EXECUTE").await;
        // ParseComplete and BindComplete may pass; the Execute's result may not.
        tokio::time::sleep(Duration::from_millis(300)).await;
        while c.try_read_buf(&mut buf).unwrap_or(0) > 0 {}
        let mut early = Vec::new();
        while let Some(m) = codec::decode_backend(&mut buf, &Limits::default()).unwrap() {
            early.push(m);
        }
        assert!(
            !early
                .iter()
                .any(|m| matches!(m, BackendMessage::CommandComplete { .. })),
            "an execution's result was released before its record: {early:?}"
        );
        tx.send(true).unwrap();
        let (errs, eof) = until_ready(&mut c, &mut buf).await;
        assert!(errs.is_empty() && !eof);
    }

    #[tokio::test]
    async fn pipelined_reads_are_recorded_before_their_results() {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let sink = Arc::new(TestSink::slow_reads(rx, false));
        let (mut c, seen, mut buf) = harness(sink.clone()).await;
        let mut two = query("SELECT 1");
        two.extend_from_slice(&query("SELECT 2"));
        c.write_all(&two).await.unwrap();
        // Both ran and both results are back while the first record waits.
        wait_seen(&seen, "SELECT 2").await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.send(true).unwrap();
        for _ in 0..2 {
            let (errs, eof) = until_ready(&mut c, &mut buf).await;
            assert!(errs.is_empty() && !eof);
        }
        let queued: Vec<String> = sink
            .queued
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("SELECT") || l.starts_with("completed"))
            .cloned()
            .collect();
        assert_eq!(
            queued,
            [
                "statement SELECT ?",
                "statement SELECT ?",
                "completed",
                "completed"
            ],
            "each statement's record precedes the results"
        );
    }

    /// Waits for one pending approval request and decides it.
    async fn decide_next(approvals: &Broker, approve: bool) {
        for _ in 0..500 {
            if let Some(req) = approvals.list().pop() {
                let boss = crate::approval::testing::approver("boss", &["dba"]);
                let vote = if approve {
                    crate::approval::Vote::Approve {
                        reason: None,
                        ticket: None,
                    }
                } else {
                    crate::approval::Vote::Reject {
                        reason: "no".into(),
                        ticket: None,
                    }
                };
                approvals.decide(&req.id, &boss, vote).await.unwrap();
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no approval request came");
    }

    #[tokio::test]
    async fn an_approval_covers_one_execution_of_a_prepared_statement() {
        let sink = Arc::new(TestSink::accepting());
        let (mut c, seen, mut buf, approvals) = harness_with_approvals(sink).await;
        c.write_all(&prepared("s1", "UPDATE vault SET a = $1"))
            .await
            .unwrap();
        decide_next(&approvals, true).await;
        let (errs, _) = until_ready(&mut c, &mut buf).await;
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(
            executed(&seen),
            1,
            "the approved Parse covers its first execution"
        );
        // A second execution is another command: it waits for its own approval.
        c.write_all(&execution("s1")).await.unwrap();
        decide_next(&approvals, false).await;
        let (errs, eof) = until_ready(&mut c, &mut buf).await;
        assert_eq!(errs, vec!["42501"]);
        assert!(!eof);
        assert_eq!(executed(&seen), 1, "a denied execution never runs");
        c.write_all(&execution("s1")).await.unwrap();
        decide_next(&approvals, true).await;
        let (errs, _) = until_ready(&mut c, &mut buf).await;
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(executed(&seen), 2);
        // A statement without approval rules executes as often as it likes.
        c.write_all(&extended("UPDATE t SET a = $1")).await.unwrap();
        c.write_all(&execution("")).await.unwrap();
        for _ in 0..2 {
            let (errs, _) = until_ready(&mut c, &mut buf).await;
            assert!(errs.is_empty(), "{errs:?}");
        }
        assert_eq!(executed(&seen), 4);
        assert!(approvals.list().is_empty());
    }

    #[tokio::test]
    async fn a_client_that_pipelines_reads_waits_for_the_log() {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let sink = Arc::new(TestSink::slow_reads(rx, false));
        let (mut c, _seen, mut buf) = harness(sink.clone()).await;
        let n = 3 * MAX_UNCONFIRMED;
        let mut all = BytesMut::new();
        for i in 0..n {
            all.extend_from_slice(&query(&format!("SELECT {i}")));
        }
        c.write_all(&all).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let in_flight = || {
            sink.queued
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.starts_with("statement SELECT"))
                .count()
        };
        assert_eq!(
            in_flight(),
            MAX_UNCONFIRMED,
            "reads in flight while the log stalls"
        );
        tx.send(true).unwrap();
        for _ in 0..n {
            let (errs, eof) = until_ready(&mut c, &mut buf).await;
            assert!(errs.is_empty() && !eof);
        }
        assert_eq!(in_flight(), n);
    }

    #[tokio::test]
    async fn a_policy_reload_stops_the_next_execution_of_a_prepared_statement() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("p.toml"), POLICY).unwrap();
        let store = Arc::new(PolicyStore::open(dir.path(), None).unwrap());
        let sink = Arc::new(TestSink::accepting());
        let (mut c, seen, mut buf, _) = harness_with_policy(sink, Some(store.clone())).await;
        c.write_all(&prepared("s2", "UPDATE t SET a = $1"))
            .await
            .unwrap();
        let (errs, _) = until_ready(&mut c, &mut buf).await;
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(executed(&seen), 1);
        // Writes are denied from now on: the prepared statement may not run again.
        let tightened = POLICY.replace(
            "name = \"writes\"\nidentities = [\"agent\"]\nresources = [\"db\"]\naction = \"allow\"",
            "name = \"writes\"\nidentities = [\"agent\"]\nresources = [\"db\"]\naction = \"deny\"",
        );
        assert_ne!(tightened, POLICY);
        std::fs::write(dir.path().join("p.toml"), tightened).unwrap();
        store.reload(dir.path()).unwrap();
        c.write_all(&execution("s2")).await.unwrap();
        let (errs, eof) = until_ready(&mut c, &mut buf).await;
        assert_eq!(errs, vec!["42501"]);
        assert!(!eof, "the session stays usable");
        assert_eq!(executed(&seen), 1, "the denied execution never ran");
    }

    #[tokio::test]
    async fn an_execution_the_proxy_cannot_see_is_decided_as_unknown() {
        // Bind to a statement no Parse created (SQL `PREPARE` makes such).
        let (mut c, seen, mut buf) = harness(Arc::new(TestSink::accepting())).await;
        c.write_all(&execution("made_by_sql_prepare"))
            .await
            .unwrap();
        let (errs, eof) = until_ready(&mut c, &mut buf).await;
        assert_eq!(
            errs,
            vec!["42501"],
            "unknown is not allowed by the test policy"
        );
        assert!(!eof);
        assert!(seen.lock().unwrap().is_empty(), "nothing ran");
    }

    async fn wait_seen(seen: &Arc<Mutex<Vec<String>>>, sql: &str) {
        for _ in 0..500 {
            if seen.lock().unwrap().iter().any(|s| s == sql) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the server never received {sql:?}");
    }

    #[tokio::test]
    async fn a_read_runs_while_its_record_is_written_but_its_result_waits_for_it() {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let sink = TestSink::slow_reads(rx, false);
        let (mut c, seen, mut buf) = harness(Arc::new(sink)).await;
        c.write_all(&query("SELECT 1")).await.unwrap();
        wait_seen(&seen, "SELECT 1").await;
        // The server answered; nothing reaches the client before the record.
        let early = tokio::time::timeout(Duration::from_millis(300), c.read_buf(&mut buf)).await;
        assert!(early.is_err(), "a result was released before its record");
        tx.send(true).unwrap();
        let (errs, eof) = until_ready(&mut c, &mut buf).await;
        assert!(errs.is_empty() && !eof);
    }

    #[tokio::test]
    async fn a_read_whose_record_fails_never_shows_its_result() {
        let (tx, rx) = tokio::sync::watch::channel(false);
        let sink = TestSink::slow_reads(rx, true);
        let (mut c, seen, mut buf) = harness(Arc::new(sink)).await;
        c.write_all(&query("SELECT 1")).await.unwrap();
        wait_seen(&seen, "SELECT 1").await;
        tx.send(true).unwrap();
        let mut got = Vec::new();
        loop {
            while let Some(m) = codec::decode_backend(&mut buf, &Limits::default()).unwrap() {
                got.push(m);
            }
            if c.read_buf(&mut buf).await.unwrap() == 0 {
                break;
            }
        }
        assert_eq!(got.len(), 1, "only the error, no result: {got:?}");
        let BackendMessage::ErrorResponse(f) = &got[0] else {
            panic!("expected an error, got {got:?}");
        };
        assert_eq!(f.sqlstate(), Some(&b"58030"[..]));
    }

    #[tokio::test]
    async fn an_unloggable_connection_is_closed_after_authentication() {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let ctx = ctx(
            upstream.local_addr().unwrap(),
            Arc::new(TestSink::failing()),
        );
        tokio::spawn(fake_server(upstream, seen.clone()));
        let (mut c, s) = {
            let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let c = TcpStream::connect(front.local_addr().unwrap())
                .await
                .unwrap();
            (c, front.accept().await.unwrap().0)
        };
        let task = tokio::spawn(serve(s, ctx));
        c.write_all(&startup()).await.unwrap();
        let mut buf = BytesMut::new();
        let (errs, eof) = until_ready(&mut c, &mut buf).await;
        assert_eq!(errs, vec!["58030"]);
        assert!(eof);
        assert!(matches!(
            task.await.unwrap(),
            Err(PgProxyError::Audit { .. })
        ));
        assert!(seen.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_malformed_message_is_a_protocol_error_and_is_not_forwarded() {
        let (mut c, seen, mut buf) = harness(Arc::new(TestSink::failing_writes())).await;
        let mut bad = BytesMut::from(&b"Q\0\0\0\x02"[..]);
        bad.extend_from_slice(b"SELECT 1\0");
        c.write_all(&bad).await.unwrap();
        let (errs, eof) = until_ready(&mut c, &mut buf).await;
        assert_eq!(errs, vec!["08P01"]);
        assert!(eof, "the proxy closes");
        assert!(seen.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn refuse_answers_the_startup_with_28000_naming_the_rule() {
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = TcpStream::connect(front.local_addr().unwrap())
            .await
            .unwrap();
        let (s, _) = front.accept().await.unwrap();
        let task = tokio::spawn(async move { refuse(s, "no-prod", "not on call").await });
        let mut ssl = BytesMut::new();
        StartupPacket::SslRequest.encode(&mut ssl);
        c.write_all(&ssl).await.unwrap();
        let mut n = [0u8; 1];
        c.read_exact(&mut n).await.unwrap();
        assert_eq!(&n, b"N");
        c.write_all(&startup()).await.unwrap();
        let mut buf = BytesMut::new();
        let (errs, eof) = until_ready(&mut c, &mut buf).await;
        assert_eq!(errs, vec!["28000"]);
        assert!(eof);
        task.await.unwrap().unwrap();
    }
}
