//! The `MySQL` L7 proxy: the only I/O in [`crate::protocol::mysql`].
//!
//! [`serve`] takes an accepted, attributed client connection whose connect
//! decision was allow; [`refuse`] answers one whose decision was deny with
//! an `ERR` packet naming the rule.
//!
//! # Lifecycle, in the order the code follows it
//!
//! 1. **Upstream first**: TCP to the agent's original destination from the
//!    daemon's untagged context; the server's greeting is read, validated
//!    and passed to the client with its capabilities narrowed (see the
//!    module doc of [`super`]). Nothing the client sends reaches the server
//!    before its handshake response parses and claims only what it was
//!    offered.
//! 2. **TLS upstream** when the resource says `verify-full`: an
//!    `SSLRequest` and TLS with rustls ([`crate::tls::client`]) before the
//!    client's handshake response is sent on; a server without TLS is an
//!    error, never a plaintext fallback.
//! 3. **Authentication** is relayed packet by packet until the server's
//!    `OK` or `ERR` (auth switch, `caching_sha2_password` fast and full,
//!    `client_ed25519`). The `session.start` record must be durable before
//!    the client's first command is read (else `ERR` and close).
//! 4. **Commands**, one at a time (the protocol has no pipelining):
//!    `COM_QUERY` (every statement of a multi-statement text; the most
//!    dangerous class wins, so one denied statement stops them all),
//!    `COM_STMT_PREPARE` and every `COM_STMT_EXECUTE` (decided again with
//!    the policy in force), `COM_INIT_DB` (as `USE db`), `COM_FIELD_LIST`
//!    (as `SHOW COLUMNS`), `COM_PROCESS_KILL` (as `KILL`) are decided by
//!    the [`crate::gate`], which records and holds; replication, binlog,
//!    cursors (`COM_STMT_FETCH`) and unknown commands are denied.
//!    `COM_CHANGE_USER` is recorded and relayed (the database user changes,
//!    the agentgate identity does not). Ping, statistics, reset, close and
//!    long data are relayed.
//!    - allow: a read goes to the server while its record is written, and
//!      nothing of its reply reaches the client until the record is durable;
//!      anything else is forwarded once its record is durable (write-ahead),
//!      or denied if it cannot be written.
//!    - deny: `ERR 1142` (SQLSTATE `42000`) naming the rule and its reason;
//!      nothing reaches the server, so the session and any open transaction
//!      stay as they were.
//!    - hold: the client waits (the protocol has no notice channel); the
//!      request shows in every approval interface; a rejection or timeout is
//!      `ERR 1142` with the reason; a client that disconnects withdraws it.
//! 5. **Results** are masked by the resource's masking policy (column rules
//!    by the column definitions' `org_table`/`org_name` and the statement's
//!    lineage, detectors), text and binary rows; every statement gets a
//!    result record (rows, bytes, duration, error code, masking).
//!    `LOAD DATA LOCAL INFILE` (only when a rule allowed the statement): the
//!    file's name, size and hash are recorded; a server that asks for a file
//!    for any other statement gets an empty file and the client is never
//!    asked.
//! 6. **Close**: a `session.end` record.
//!
//! # Fails closed
//!
//! A client packet that does not frame or parse: `ERR` and close, nothing
//! forwarded. A server reply the proxy cannot follow, or a row it cannot
//! mask: the connection ends (the row is never sent). An error message about
//! a statement that reads a protected column is replaced (it may quote the
//! value: `Duplicate entry '123-45-6789'`).

use std::{
    collections::HashMap,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use bytes::BytesMut;
use mysql_common::constants::{CapabilityFlags, ColumnType};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
};

use super::{
    catalog::{self, Catalog},
    codec::{
        self, ClientHello, ColumnDef, Command, Framer, Limits, Packet, ProtocolError, Reply,
        Response,
    },
    rows::{self, Edit},
};
use crate::{
    approval::Broker,
    audit::Kind,
    connection::LiveConnection,
    gate::{self, AuditSink, Covered, Denial, DenialKind, Gate, ResultRecord, truncate_chars},
    mask::{
        MaskPolicy, MaskResult, ResultMasks, RowMasker as _,
        lineage::{self, Field, NoCatalog, RelationKind, Relations},
    },
    policy::{Action, Decision, PolicySet, PolicyStore, Resource, Subject, Verdict},
    sql::{
        Analysis, AnalysisCache, Classification, Dialect, StatementClass, lineage::StatementLineage,
    },
};

/// Redacted SQL kept in an audit record.
pub const MAX_RECORD_SQL_CHARS: usize = 64 * 1024;
/// Prepared statements a connection may hold (the proxy keeps each one's
/// text and analysis).
pub const MAX_PREPARED: usize = 4096;
/// Bytes queued for the client before they are written.
const FLUSH_AT: usize = 64 * 1024;
/// Packets of one authentication exchange, at most.
const MAX_AUTH_ROUNDS: u32 = 16;

/// Tunables of the `MySQL` handler.
#[derive(Debug, Clone)]
pub struct MySettings {
    pub limits: Limits,
    /// From the client's connect until the server's `OK` to its login.
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
}

impl Default for MySettings {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            handshake_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// Everything [`serve`] needs about one attributed connection.
pub struct MyContext {
    pub conn: Arc<LiveConnection>,
    pub subject: Subject,
    pub resource: Resource,
    pub policy: Arc<PolicyStore>,
    pub approvals: Broker,
    pub audit: Arc<dyn AuditSink>,
    /// Key for the keyed hash of statements.
    pub correlation_key: [u8; 32],
    pub settings: MySettings,
    pub sql_cache: Arc<AnalysisCache>,
    /// Equality probes on protected columns per identity (shared by every
    /// SQL handler of the daemon).
    pub probes: Arc<crate::mask::ProbeBudget>,
}

/// Why a proxied `MySQL` connection ended abnormally; says which side.
#[derive(Debug, thiserror::Error)]
pub enum MyProxyError {
    #[error("client (downstream) I/O: {source}")]
    ClientIo {
        #[source]
        source: std::io::Error,
    },
    #[error("server (upstream) I/O: {source}")]
    UpstreamIo {
        #[source]
        source: std::io::Error,
    },
    #[error("client (downstream): {source}")]
    Client {
        #[source]
        source: ProtocolError,
    },
    #[error("server (upstream): {source}")]
    Server {
        #[source]
        source: ProtocolError,
    },
    #[error("server (upstream): {reason}")]
    Connect { reason: String },
    #[error("proxy: {what}")]
    Proxy { what: String },
    #[error("{phase} timed out")]
    Timeout { phase: &'static str },
}

/// The server's stream, TLS or not.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Answers a connection whose connect decision was deny: an `ERR` packet
/// (in place of a greeting) naming the rule. Never contacts the upstream.
pub async fn refuse(mut client: TcpStream, rule: &str, reason: &str) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    let mut f = Framer::new(Limits::default().max_auth_packet);
    let _ = f.encode(
        &codec::err_packet(
            1045,
            "28000",
            &format!("agentgate: connection denied by policy rule \"{rule}\": {reason}"),
        ),
        &mut out,
    );
    client.write_all(&out).await?;
    client.shutdown().await
}

/// Serves one allowed client connection until either side closes.
pub async fn serve(client: TcpStream, ctx: MyContext) -> Result<(), MyProxyError> {
    let _ = client.set_nodelay(true);
    let limits = ctx.settings.limits.clone();
    let mut cf = Framer::new(limits.max_auth_packet);
    let upstream = match connect(&ctx).await {
        Ok(u) => u,
        Err(e) => {
            let mut out = BytesMut::new();
            let _ = cf.encode(
                &codec::err_packet(
                    2003,
                    "08S01",
                    &format!("agentgate: cannot reach the server: {e}"),
                ),
                &mut out,
            );
            let mut client = client;
            let _ = client.write_all(&out).await;
            return Err(e);
        }
    };
    let mut my = My {
        c: Box::new(client),
        u: Box::new(upstream),
        cin: BytesMut::new(),
        uin: BytesMut::new(),
        cout: BytesMut::new(),
        cf,
        uf: Framer::new(limits.max_auth_packet),
        gate: Gate::new(
            &*ctx.conn,
            &ctx.subject,
            &ctx.resource,
            &*ctx.audit,
            &ctx.approvals,
        ),
        set: ctx.policy.current(),
        ctx: &ctx,
        caps: CapabilityFlags::empty(),
        user: String::new(),
        database: None,
        server_version: String::new(),
        tls_upstream: false,
        prepared: HashMap::new(),
        approved_prepare: std::collections::HashSet::new(),
        statements: 0,
        opened_at: Instant::now(),
        started: false,
        catalog: None,
        credential: None,
        agent_user: None,
    };
    let result = my.run().await;
    my.close_record(result.as_ref().err()).await;
    result
}

/// TCP to the original destination; TLS comes after the greeting.
async fn connect(ctx: &MyContext) -> Result<TcpStream, MyProxyError> {
    let addr = ctx.conn.destination;
    let tcp = tokio::time::timeout(ctx.settings.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| MyProxyError::Connect {
            reason: format!("connecting to {addr} timed out"),
        })?
        .map_err(|e| MyProxyError::Connect {
            reason: format!("connecting to {addr}: {e}"),
        })?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// A prepared statement the server issued on this connection.
struct Prepared {
    sql: Vec<u8>,
    analysis: Arc<Analysis>,
    /// Its result columns' types (from the prepare reply; an execute's own
    /// column definitions replace them).
    params: u16,
    /// The parameter types the client last sent for it.
    param_types: Option<rows::ParamTypes>,
    /// Long data was sent for a parameter since the last execution (its
    /// value is then not in the execute packet).
    long_data: bool,
}

/// What the records say about one decided command.
struct Stmt {
    action: Value,
    hash: String,
    class: StatementClass,
    analysis: Arc<Analysis>,
    /// `LOAD DATA LOCAL`: the client may be asked for a file.
    local_infile: bool,
    /// The SQL text as sent (kept for `COM_STMT_PREPARE` and `USE`).
    raw: Option<Vec<u8>>,
    /// The statements' lineage with the relations they name without a
    /// schema in the database each runs in (`USE` inside the text moves
    /// the statements after it); `None` without column rules or lineage.
    lineage: Option<Arc<Vec<StatementLineage>>>,
    /// A `COM_STMT_EXECUTE`: values are bound (else a text or a prepare).
    executes: bool,
    /// The values bound (`None` inside: NULL); `None` when they cannot be
    /// read (each then counts as new for the equality budget).
    bound: Option<Vec<Option<Vec<u8>>>>,
}

struct My<'a> {
    ctx: &'a MyContext,
    gate: Gate<'a>,
    set: Arc<PolicySet>,
    c: Box<dyn Io>,
    u: Box<dyn Io>,
    cin: BytesMut,
    uin: BytesMut,
    cout: BytesMut,
    /// Client-side and server-side framing: each side keeps its own
    /// sequence ids.
    cf: Framer,
    uf: Framer,
    /// Capabilities both sides agreed on.
    caps: CapabilityFlags,
    user: String,
    database: Option<String>,
    server_version: String,
    tls_upstream: bool,
    prepared: HashMap<u32, Prepared>,
    /// Statements whose approved `PREPARE` still covers their first execution.
    approved_prepare: std::collections::HashSet<u32>,
    statements: u64,
    opened_at: Instant,
    /// `session.start` is on record.
    started: bool,
    /// Views and routines, read after login when column rules apply.
    catalog: Option<Catalog>,
    /// The resource's credential as recorded (never its secret), when the
    /// proxy logged in with it.
    credential: Option<Value>,
    /// The user name the agent sent, when the credential's replaced it.
    agent_user: Option<String>,
}

/// Counters of one result.
struct Running {
    started: Instant,
    rows: u64,
    bytes: u64,
    values_masked: u64,
    values_nulled: u64,
    columns_masked: std::collections::BTreeSet<String>,
    detectors: std::collections::BTreeSet<&'static str>,
    lineage: Option<Value>,
    infile: Option<Value>,
}

impl Running {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            rows: 0,
            bytes: 0,
            values_masked: 0,
            values_nulled: 0,
            columns_masked: std::collections::BTreeSet::new(),
            detectors: std::collections::BTreeSet::new(),
            lineage: None,
            infile: None,
        }
    }
}

/// One result set's masking plan.
struct ResultPlan {
    types: Vec<ColumnType>,
    /// `None`: nothing to mask (no rules, no detectors).
    masks: Option<ResultMasks>,
    /// The lineage decisions its record names.
    lineage: Option<Value>,
    names: Vec<String>,
}

impl<'a> My<'a> {
    // -----------------------------------------------------------------------
    // I/O

    async fn read_client(&mut self) -> Result<Option<BytesMut>, MyProxyError> {
        loop {
            match self.cf.decode(&mut self.cin) {
                Ok(Some(p)) => return Ok(Some(p)),
                Ok(None) => {}
                Err(source) => return Err(MyProxyError::Client { source }),
            }
            self.flush_client().await?;
            self.cin.reserve(16 * 1024);
            let n = self
                .c
                .read_buf(&mut self.cin)
                .await
                .map_err(|source| MyProxyError::ClientIo { source })?;
            if n == 0 {
                return Ok(None);
            }
        }
    }

    async fn read_upstream(&mut self) -> Result<BytesMut, MyProxyError> {
        loop {
            match self.uf.decode(&mut self.uin) {
                Ok(Some(p)) => {
                    return Ok(p);
                }
                Ok(None) => {}
                Err(source) => return Err(MyProxyError::Server { source }),
            }
            // Nothing whole is left: what is queued for the client goes now.
            self.flush_client().await?;
            self.uin.reserve(64 * 1024);
            let n = self
                .u
                .read_buf(&mut self.uin)
                .await
                .map_err(|source| MyProxyError::UpstreamIo { source })?;
            if n == 0 {
                return Err(MyProxyError::UpstreamIo {
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                });
            }
        }
    }

    fn send_client(&mut self, payload: &[u8]) -> Result<(), MyProxyError> {
        self.cf
            .encode(payload, &mut self.cout)
            .map_err(|source| MyProxyError::Server { source })
    }

    async fn flush_client(&mut self) -> Result<(), MyProxyError> {
        if self.cout.is_empty() {
            return Ok(());
        }
        self.c
            .write_all(&self.cout)
            .await
            .map_err(|source| MyProxyError::ClientIo { source })?;
        self.ctx
            .conn
            .bytes_down
            .fetch_add(self.cout.len() as u64, Ordering::Relaxed);
        self.cout.clear();
        Ok(())
    }

    async fn send_upstream(&mut self, payload: &[u8]) -> Result<(), MyProxyError> {
        let mut out = BytesMut::with_capacity(payload.len() + 8);
        self.uf
            .encode(payload, &mut out)
            .map_err(|source| MyProxyError::Client { source })?;
        self.u
            .write_all(&out)
            .await
            .map_err(|source| MyProxyError::UpstreamIo { source })?;
        self.ctx
            .conn
            .bytes_up
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// An `ERR` to the client, then close.
    async fn fatal(&mut self, code: u16, state: &str, message: &str) {
        let _ = self.send_client(&codec::err_packet(code, state, message));
        let _ = self.flush_client().await;
        let _ = self.c.shutdown().await;
    }

    // -----------------------------------------------------------------------
    // Handshake

    async fn run(&mut self) -> Result<(), MyProxyError> {
        let timeout = self.ctx.settings.handshake_timeout;
        match tokio::time::timeout(timeout, self.handshake()).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => return Ok(()),
            Ok(Err(e)) => {
                let (code, state) = match &e {
                    MyProxyError::Client { .. } => (1043, "08S01"),
                    _ => (2013, "HY000"),
                };
                self.fatal(code, state, &format!("agentgate: {e}")).await;
                return Err(e);
            }
            Err(_) => {
                self.fatal(2013, "HY000", "agentgate: the login timed out")
                    .await;
                return Err(MyProxyError::Timeout { phase: "login" });
            }
        }
        let max = self.ctx.settings.limits.max_packet;
        self.cf.set_max_packet(max);
        self.uf.set_max_packet(max);
        self.commands().await
    }

    /// Greeting, TLS, login. `Ok(false)`: the login failed (the client has
    /// the server's `ERR`).
    async fn handshake(&mut self) -> Result<bool, MyProxyError> {
        let mut greeting = self.read_upstream().await?;
        if greeting.first() == Some(&0xFF) {
            // The server refuses (too many connections, host blocked): as it said.
            self.send_client(&greeting)?;
            self.flush_client().await?;
            return Ok(false);
        }
        let tls = self
            .ctx
            .resource
            .tls
            .as_ref()
            .filter(|t| t.mode == crate::policy::TlsMode::VerifyFull)
            .cloned();
        let strip = codec::stripped_capabilities() | CapabilityFlags::CLIENT_SSL;
        let g = codec::rewrite_greeting(&mut greeting, strip)
            .map_err(|source| MyProxyError::Server { source })?;
        if tls.is_some() && !g.server_capabilities.contains(CapabilityFlags::CLIENT_SSL) {
            return Err(MyProxyError::Connect {
                reason: "the resource requires TLS (tls.mode = \"verify-full\") and the server does not offer it".into(),
            });
        }
        self.server_version.clone_from(&g.server_version);
        self.send_client(&greeting)?;
        self.flush_client().await?;
        let Some(mut hello) = self.read_client().await? else {
            return Ok(false);
        };
        let parsed = codec::parse_client_hello(&hello, g.capabilities)
            .map_err(|source| MyProxyError::Client { source })?;
        let Some(ClientHello {
            capabilities,
            user,
            database,
            ..
        }) = parsed
        else {
            return Err(MyProxyError::Client {
                source: ProtocolError::Unsupported {
                    what: "TLS toward the agent is not offered: no local CA is configured for it (the agent's leg is loopback; use ssl-mode=DISABLED or PREFERRED)".into(),
                },
            });
        };
        self.caps = capabilities & g.capabilities;
        self.user = user;
        self.database = database;
        let login = self.credential_hello(&mut hello, &g).await?;
        if let Some(tls) = tls {
            let mut caps = CapabilityFlags::from_bits_retain(u32::from_le_bytes([
                hello[0], hello[1], hello[2], hello[3],
            ]));
            caps.insert(CapabilityFlags::CLIENT_SSL);
            codec::set_client_capabilities(&mut hello, caps);
            self.send_upstream(&hello[..codec::SSL_REQUEST_LEN]).await?;
            let tcp = std::mem::replace(&mut self.u, Box::new(tokio::io::duplex(1).0));
            let stream = crate::tls::client::connect(tcp, &tls, self.ctx.conn.destination)
                .await
                .map_err(|reason| MyProxyError::Connect { reason })?;
            self.u = Box::new(stream);
            self.tls_upstream = true;
        }
        self.send_upstream(&hello).await?;
        drop(hello);
        let logged_in = match login {
            Some((mut l, cred)) => {
                l.tls = self.tls_upstream;
                let ok = self.login(&mut l, &cred.user).await?;
                let mut d = cred.describe();
                d["kind"] = json!("resource");
                d["auth_plugin"] = json!(l.plugin);
                self.credential = Some(d);
                ok
            }
            None => self.relay_auth().await?,
        };
        if !logged_in {
            return Ok(false);
        }
        self.session_start().await?;
        if !self.masking().columns().is_empty() {
            self.load_catalog().await?;
        }
        Ok(true)
    }

    /// The resource's own login, when it names one: the secret read now (a
    /// rotated secret applies to the next connection), never shown to
    /// anyone; `hello` replaced by the handshake response to send upstream.
    async fn credential_hello(
        &mut self,
        hello: &mut BytesMut,
        g: &codec::Greeting,
    ) -> Result<Option<(super::credential::Login, crate::policy::Credential)>, MyProxyError> {
        let Some(cred) = self.ctx.resource.credential.clone() else {
            return Ok(None);
        };
        let secret = match cred.read_secret() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(conn = self.ctx.conn.id, file = %cred.password_file.display(), error = %e, "cannot read the resource's credential");
                self.fatal(
                    1045,
                    "28000",
                    "agentgate: the resource's credential cannot be read; see the daemon's log",
                )
                .await;
                return Err(MyProxyError::Proxy {
                    what: format!(
                        "the resource's credential {}: {e}",
                        cred.password_file.display()
                    ),
                });
            }
        };
        let (upstream_hello, l) = super::credential::hello(
            hello,
            &cred.user,
            secret,
            g.auth_plugin.as_deref(),
            g.scramble.clone(),
        )
        .map_err(|what| MyProxyError::Proxy {
            what: format!("login with the resource's credential: {what}"),
        })?;
        *hello = BytesMut::from(&upstream_hello[..]);
        self.agent_user = Some(std::mem::replace(&mut self.user, cred.user.clone()));
        Ok(Some((l, cred)))
    }

    /// Reads views and routines on the client's connection, before its
    /// first command. A catalog that cannot be read protects every relation
    /// wholesale (fails closed).
    async fn load_catalog(&mut self) -> Result<(), MyProxyError> {
        let views = self.side_query(catalog::VIEWS_SQL).await?;
        let routines = self.side_query(catalog::ROUTINES_SQL).await?;
        self.catalog = Some(if let (Some(v), Some(r)) = (views, routines) {
            Catalog::from_rows(&v, &r)
        } else {
            tracing::warn!(
                conn = self.ctx.conn.id,
                "catalog unreadable: relations protected wholesale"
            );
            Catalog::unavailable()
        });
        Ok(())
    }

    /// A query of the proxy's own, its rows as text; `None` when the server
    /// refuses it or it returns more than [`catalog::MAX_CATALOG_ROWS`].
    async fn side_query(
        &mut self,
        sql: &str,
    ) -> Result<Option<Vec<Vec<Option<String>>>>, MyProxyError> {
        self.uf.reset();
        let mut p = vec![0x03];
        p.extend_from_slice(sql.as_bytes());
        self.send_upstream(&p).await?;
        let mut resp = Response::new(Reply::ResultSets { binary: false }, self.deprecate_eof());
        let mut columns = 0;
        let mut rows = Vec::new();
        let mut ok = true;
        let server = |source| MyProxyError::Server { source };
        while !resp.done() {
            let p = self.read_upstream().await?;
            match resp.feed(&p).map_err(server)? {
                Packet::ColumnCount(n) => columns = n as usize,
                Packet::Row if ok => {
                    let values = rows::text_values(&p, columns).map_err(server)?;
                    rows.push(
                        values
                            .into_iter()
                            .map(|r| r.map(|r| String::from_utf8_lossy(&p[r]).into_owned()))
                            .collect(),
                    );
                    ok = rows.len() <= catalog::MAX_CATALOG_ROWS;
                }
                Packet::Err { .. } | Packet::LocalInfile { .. } => ok = false,
                _ => {}
            }
        }
        Ok(ok.then_some(rows))
    }

    /// What names in statements are (views, routines).
    fn relations(&self) -> &dyn Relations {
        match &self.catalog {
            Some(c) => c,
            None => &NoCatalog,
        }
    }

    /// A statement that stores a value of a protected table (or a view, or
    /// through a routine) in a user variable: beyond masking from there.
    fn variable_refusal(&self, sql: &[u8], c: &Classification) -> Option<(String, String)> {
        let policy = self.masking();
        if policy.columns().is_empty()
            || !crate::sql::mysql::assigns_user_variable(&String::from_utf8_lossy(sql))
        {
            return None;
        }
        let rels = self.relations();
        let touched = c
            .tables
            .iter()
            .find(|t| {
                policy.rule_for_any_column(Some(t)).is_some()
                    || !matches!(rels.kind(t), RelationKind::Table)
            })
            .or_else(|| c.functions.iter().find(|f| rels.is_user_function(f)))
            .cloned()
            .or_else(|| {
                c.reason
                    .as_ref()
                    .map(|_| "a statement that does not parse".to_owned())
            })?;
        Some((
            "masking: user variables".to_owned(),
            format!(
                "stores a value read from {touched} in a user variable, where it would no longer be masked"
            ),
        ))
    }

    /// Logs in upstream with the resource's credential
    /// ([`super::credential`]); the client gets the server's `OK` (`true`)
    /// or its `ERR` (`false`), never an authentication request.
    async fn login(
        &mut self,
        l: &mut super::credential::Login,
        user: &str,
    ) -> Result<bool, MyProxyError> {
        use super::credential::Step;
        for _ in 0..MAX_AUTH_ROUNDS {
            let p = self.read_upstream().await?;
            let step = l.step(&p).map_err(|what| MyProxyError::Proxy {
                what: format!("login with the resource's credential: {what}"),
            })?;
            match step {
                Step::Done => {
                    self.send_client(&p)?;
                    return Ok(true);
                }
                Step::Refused => {
                    tracing::warn!(conn = self.ctx.conn.id, user = %user, "the server refused the resource's credential");
                    self.send_client(&p)?;
                    self.flush_client().await?;
                    return Ok(false);
                }
                Step::Send(answer) => self.send_upstream(&answer).await?,
                Step::Wait => {}
            }
        }
        Err(MyProxyError::Proxy {
            what: "authentication took too many rounds".into(),
        })
    }

    /// Relays an authentication exchange until the server's `OK` (`true`)
    /// or `ERR` (`false`). The packets are never logged: one may carry a
    /// cleartext password (`caching_sha2_password` full authentication).
    async fn relay_auth(&mut self) -> Result<bool, MyProxyError> {
        for _ in 0..MAX_AUTH_ROUNDS {
            let p = self.read_upstream().await?;
            let head = p.first().copied();
            self.send_client(&p)?;
            match head {
                Some(0x00) => return Ok(true),
                Some(0xFF) => {
                    self.flush_client().await?;
                    return Ok(false);
                }
                // Fast authentication succeeded: the server's OK follows.
                Some(0x01) if p.len() == 2 && p[1] == 0x03 => {}
                Some(0xFE | 0x01) => {
                    let Some(answer) = self.read_client().await? else {
                        return Ok(false);
                    };
                    self.send_upstream(&answer).await?;
                }
                _ => {
                    return Err(MyProxyError::Server {
                        source: ProtocolError::Malformed {
                            what: "authentication packet",
                        },
                    });
                }
            }
        }
        Err(MyProxyError::Proxy {
            what: "authentication took too many rounds".into(),
        })
    }

    async fn session_start(&mut self) -> Result<(), MyProxyError> {
        let mut ev = self.ctx.conn.record(Kind::SessionStart).action(json!({
            "protocol": "mysql",
            "database": self.database,
            "user": self.user,
            "server_version": self.server_version,
            "destination": self.ctx.conn.destination.to_string(),
            "tls_upstream": self.tls_upstream,
            "tls_client": false,
            "credential": self.credential,
            "agent_user": self.agent_user,
        }));
        ev.decision = Some(json!({"verdict": "allow"}));
        if let Err(e) = self.ctx.audit.append(ev).await {
            self.fatal(
                1105,
                "HY000",
                "agentgate: audit log unavailable; connection closed (fails closed)",
            )
            .await;
            return Err(MyProxyError::Proxy {
                what: format!("session.start not recorded: {e}"),
            });
        }
        self.started = true;
        self.flush_client().await
    }

    // -----------------------------------------------------------------------
    // Commands

    fn deprecate_eof(&self) -> bool {
        self.caps.contains(CapabilityFlags::CLIENT_DEPRECATE_EOF)
    }

    async fn commands(&mut self) -> Result<(), MyProxyError> {
        loop {
            self.cf.reset();
            self.uf.reset();
            let Some(packet) = self.read_client().await? else {
                return Ok(());
            };
            let max_sql = self.ctx.settings.limits.max_sql_len;
            let cmd = match codec::parse_command(&packet, max_sql) {
                Ok(c) => c,
                Err(source) => {
                    let e = MyProxyError::Client { source };
                    self.fatal(1047, "08S01", &format!("agentgate: {e}")).await;
                    return Err(e);
                }
            };
            if !self.command(&cmd, &packet).await? {
                return Ok(());
            }
        }
    }

    /// Handles one command. `Ok(false)`: the connection ends.
    async fn command(&mut self, cmd: &Command<'_>, packet: &[u8]) -> Result<bool, MyProxyError> {
        self.set = self.ctx.policy.current();
        match *cmd {
            Command::Quit => {
                let _ = self.send_upstream(packet).await;
                return Ok(false);
            }
            Command::StmtSendLongData { stmt_id } => {
                if let Some(p) = self.prepared.get_mut(&stmt_id) {
                    p.long_data = true;
                }
                self.send_upstream(packet).await?;
            }
            Command::StmtReset { stmt_id } => {
                if let Some(p) = self.prepared.get_mut(&stmt_id) {
                    p.long_data = false;
                }
                self.send_upstream(packet).await?;
                self.relay(cmd.reply(), None).await?;
            }
            Command::Ping | Command::Statistics | Command::SetOption(_) => {
                self.send_upstream(packet).await?;
                self.relay(cmd.reply(), None).await?;
            }
            Command::StmtClose { stmt_id } => {
                self.prepared.remove(&stmt_id);
                self.approved_prepare.remove(&stmt_id);
                self.send_upstream(packet).await?;
            }
            Command::ResetConnection => {
                self.prepared.clear();
                self.approved_prepare.clear();
                self.send_upstream(packet).await?;
                self.relay(cmd.reply(), None).await?;
            }
            Command::ChangeUser => return self.change_user(packet).await,
            Command::Query(sql) | Command::StmtPrepare(sql) => {
                self.sql(cmd.name(), sql, packet, None).await?;
            }
            Command::InitDb(db) => {
                let text = format!("USE `{}`", String::from_utf8_lossy(db).replace('`', "``"));
                self.sql(cmd.name(), text.as_bytes(), packet, None).await?;
            }
            Command::FieldList { table } => {
                let text = format!(
                    "SHOW COLUMNS FROM `{}`",
                    String::from_utf8_lossy(table).replace('`', "``")
                );
                self.sql(cmd.name(), text.as_bytes(), packet, None).await?;
            }
            Command::ProcessKill(id) => {
                let text = format!("KILL {id}");
                self.sql(cmd.name(), text.as_bytes(), packet, None).await?;
            }
            Command::StmtExecute {
                stmt_id,
                cursor_flags,
            } => {
                if cursor_flags != 0 {
                    self.refuse_command(
                        cmd.name(),
                        "agentgate:mysql-cursor",
                        "server-side cursors (COM_STMT_EXECUTE with a cursor, COM_STMT_FETCH) are not relayed",
                    )
                    .await?;
                } else {
                    self.execute(stmt_id, packet).await?;
                }
            }
            Command::StmtFetch { .. } => {
                self.refuse_command(
                    cmd.name(),
                    "agentgate:mysql-cursor",
                    "server-side cursors (COM_STMT_EXECUTE with a cursor, COM_STMT_FETCH) are not relayed",
                )
                .await?;
            }
            Command::Replication(_) => {
                self.refuse_command(
                    cmd.name(),
                    "agentgate:mysql-replication",
                    "replication and binlog commands are not relayed",
                )
                .await?;
            }
            Command::Other(code) => {
                self.refuse_command(
                    cmd.name(),
                    "agentgate:mysql-command",
                    &format!("command 0x{code:02x} is not relayed"),
                )
                .await?;
            }
        }
        self.flush_client().await?;
        Ok(true)
    }

    /// A command the handler refuses on its own: recorded as a denial
    /// naming the check, answered `ERR 1142`.
    async fn refuse_command(
        &mut self,
        name: &str,
        rule: &str,
        reason: &str,
    ) -> Result<(), MyProxyError> {
        let decision = Decision {
            verdict: Verdict::Deny {
                reason: reason.to_owned(),
            },
            rule: rule.to_owned(),
        };
        let action = json!({
            "protocol": "mysql",
            "command": name,
            "database": self.database,
            "user": self.user,
            "class": "unknown",
        });
        let denial = self
            .gate
            .deny(
                gate::Command {
                    action,
                    fingerprint: String::new(),
                    class: "unknown",
                    summary: "",
                    changes_state: true,
                },
                &decision,
            )
            .await;
        self.send_client(&denial_err(&denial))?;
        Ok(())
    }

    /// `analysis`: known already (a prepared statement's).
    fn stmt(
        &self,
        name: &str,
        sql: &[u8],
        statement_id: Option<u32>,
        analysis: Option<Arc<Analysis>>,
    ) -> Stmt {
        let analysis = analysis.unwrap_or_else(|| {
            self.ctx
                .sql_cache
                .analyze(&String::from_utf8_lossy(sql), Dialect::MySql)
        });
        let lineage = self.qualified_lineage(sql, &analysis);
        let c = &analysis.classification;
        let hash = crate::audit::keyed_hash(&self.ctx.correlation_key, sql);
        let local_infile = c.statements.iter().any(|s| {
            s.note
                .as_deref()
                .is_some_and(|n| n.starts_with("file read: LOAD DATA LOCAL"))
        });
        Stmt {
            action: json!({
                "protocol": "mysql",
                "command": name,
                "statement_id": statement_id,
                "database": self.database,
                "user": self.user,
                "sql": truncate_chars(&analysis.redacted, MAX_RECORD_SQL_CHARS),
                "sql_hash": hash,
                "class": c.class.as_str(),
                "statements": c.statements.len(),
                "tables": c.tables,
                "functions": c.functions,
                "destructive": c.destructive,
                "notes": c.statements.iter().filter_map(|s| s.note.clone()).collect::<Vec<_>>(),
                "unparsed_reason": c.reason,
            }),
            hash,
            class: c.class,
            local_infile,
            analysis,
            raw: Some(sql.to_vec()),
            executes: false,
            bound: None,
            lineage,
        }
    }

    /// [`Stmt::lineage`]: names without a schema qualified with the
    /// database each statement runs in. When the statements cannot be told
    /// apart (a stored program's body) or no database is selected, names
    /// stay as written, and rules naming a schema cover them too.
    fn qualified_lineage(
        &self,
        sql: &[u8],
        analysis: &Analysis,
    ) -> Option<Arc<Vec<StatementLineage>>> {
        let all = analysis.lineage.as_ref()?;
        if self.masking().columns().is_empty() {
            return None;
        }
        let text = String::from_utf8_lossy(sql);
        let text = crate::sql::mysql::unwrap_executable_comments(&text);
        let dbs = crate::sql::mysql::databases_per_statement(&text, self.database.as_deref())
            .map(|(d, _)| d)
            .filter(|d| d.len() == all.len());
        let mut out = all.clone();
        if let Some(dbs) = dbs {
            for (l, db) in out.iter_mut().zip(dbs) {
                if let Some(db) = db {
                    l.qualify(&db);
                }
            }
        }
        Some(Arc::new(out))
    }

    fn masking(&self) -> &MaskPolicy {
        self.set.masking_for(&self.ctx.resource)
    }

    /// A statement the masking policy refuses: it searches a protected
    /// column beyond its rule's `predicates` (any oracle but a bounded
    /// equality test), passes the identity's equality budget (counted here,
    /// the same budget as every SQL handler's), copies a protected column
    /// into a table, or computes from one whose rule says `derived = "deny"`.
    fn lineage_refusal(&self, stmt: &Stmt) -> Option<lineage::Refusal> {
        let policy = self.masking();
        if policy.columns().is_empty() {
            return None;
        }
        let statements = stmt.lineage.as_deref()?;
        let values = stmt.bound.as_ref();
        let param = |n: usize| -> Option<Vec<u8>> {
            let v = values?.get(n.checked_sub(1)?)?;
            Some(v.clone().unwrap_or_else(|| b"\0null".to_vec()))
        };
        let params = if stmt.executes {
            lineage::Params::Bound(&param)
        } else {
            lineage::Params::NotBound
        };
        lineage::admit(
            policy,
            self.relations(),
            &self.ctx.probes,
            &self.ctx.subject.identity,
            &self.ctx.resource.name,
            &String::from_utf8_lossy(stmt.raw.as_deref().unwrap_or_default()),
            Dialect::MySql,
            statements,
            &params,
        )
        .err()
    }

    /// Decides a SQL command and carries the decision out.
    async fn sql(
        &mut self,
        name: &'static str,
        sql: &[u8],
        packet: &[u8],
        covered: Option<Covered>,
    ) -> Result<(), MyProxyError> {
        let stmt = self.stmt(name, sql, None, None);
        self.decide(stmt, packet, covered).await
    }

    async fn execute(&mut self, stmt_id: u32, packet: &[u8]) -> Result<(), MyProxyError> {
        let Some(p) = self.prepared.get(&stmt_id) else {
            // Not prepared through this proxy (or closed): nothing to decide on.
            return self
                .refuse_command(
                    "COM_STMT_EXECUTE",
                    "agentgate:mysql-unknown-statement",
                    "the statement was not prepared on this connection through agentgate",
                )
                .await;
        };
        let (sql, params, analysis) = (p.sql.clone(), p.params, Arc::clone(&p.analysis));
        let bound = self.prepared.get_mut(&stmt_id).and_then(|p| {
            let long_data = std::mem::take(&mut p.long_data);
            let values = rows::execute_params(packet, usize::from(params), &mut p.param_types);
            (!long_data).then_some(values.ok()).flatten()
        });
        let mut stmt = self.stmt("COM_STMT_EXECUTE", &sql, Some(stmt_id), Some(analysis));
        stmt.executes = true;
        stmt.bound = bound;
        stmt.action["sql"] = Value::Null;
        stmt.action["params"] = json!(params);
        let covered = self.approved_prepare.remove(&stmt_id).then_some(Covered {
            by: "the approval of its prepare",
        });
        self.decide(stmt, packet, covered).await
    }

    async fn decide(
        &mut self,
        stmt: Stmt,
        packet: &[u8],
        covered: Option<Covered>,
    ) -> Result<(), MyProxyError> {
        self.statements += 1;
        let analysis = Arc::clone(&stmt.analysis);
        if let Some((rule, reason)) = self.variable_refusal(
            stmt.raw.as_deref().unwrap_or_default(),
            &analysis.classification,
        ) {
            let decision = Decision {
                verdict: Verdict::Deny { reason },
                rule,
            };
            let denial = self.gate.deny(Self::command_of(&stmt), &decision).await;
            return self.send_client(&denial_err(&denial));
        }
        // The policy first (its denial names its own rule, and a denied
        // statement costs no equality budget), then the masking's searches.
        let action = Action::Sql(Arc::clone(&analysis.classification));
        let decision = self.gate.decide(&self.set, &action);
        if !matches!(decision.verdict, Verdict::Deny { .. })
            && let Some(r) = self.lineage_refusal(&stmt)
        {
            let decision = Decision {
                verdict: Verdict::Deny {
                    reason: format!("{} ({})", r.reason, r.column),
                },
                rule: r.rule.clone(),
            };
            let mut command = Self::command_of(&stmt);
            if let Some(o) = r.oracle {
                command.action["masking_refusal"] =
                    json!({"oracle": o.as_str(), "column": r.column});
            }
            let denial = self.gate.deny(command, &decision).await;
            return self.send_client(&denial_err(&denial));
        }
        let class = stmt.class;
        let read_only = class <= StatementClass::Read;
        let outcome = {
            let command = gate::Command {
                action: stmt.action.clone(),
                fingerprint: stmt.hash.clone(),
                class: class.as_str(),
                summary: &analysis.redacted,
                changes_state: !read_only,
            };
            self.gate
                .admit_action(command, &decision, covered, &action)
                .await
        };
        self.carry_out(stmt, packet, outcome).await
    }

    fn command_of(stmt: &Stmt) -> gate::Command<'_> {
        gate::Command {
            action: stmt.action.clone(),
            fingerprint: stmt.hash.clone(),
            class: stmt.class.as_str(),
            summary: "",
            changes_state: true,
        }
    }

    async fn carry_out(
        &mut self,
        stmt: Stmt,
        packet: &[u8],
        mut outcome: gate::Outcome<'a>,
    ) -> Result<(), MyProxyError> {
        let mut approved = false;
        loop {
            match outcome {
                gate::Outcome::ForwardNow { recording } => {
                    // The server works while the record is written; nothing
                    // of its reply reaches the client before it is durable.
                    self.send_upstream(packet).await?;
                    if let Err(e) = recording.await {
                        tracing::error!(conn = self.ctx.conn.id, error = %e, "audit append failed; results withheld");
                        self.fatal(
                            1105,
                            "HY000",
                            "agentgate: audit log unavailable; the statement's results were withheld (fails closed)",
                        )
                        .await;
                        return Err(MyProxyError::Proxy {
                            what: format!("statement not recorded: {e}"),
                        });
                    }
                    break;
                }
                gate::Outcome::Forward { approved: a } => {
                    approved = a;
                    self.send_upstream(packet).await?;
                    break;
                }
                gate::Outcome::Deny(denial) => {
                    return self.send_client(&denial_err(&denial));
                }
                gate::Outcome::Held(mut hold) => {
                    tracing::info!(
                        conn = self.ctx.conn.id,
                        request = %hold.request_id,
                        deadline = %hold.deadline,
                        "statement held for approval"
                    );
                    // The client waits; it should send nothing. EOF withdraws.
                    let mut probe = [0u8; 1];
                    let answer = tokio::select! {
                        a = hold.decided() => Some(a),
                        r = self.c.read(&mut probe) => {
                            match r {
                                Ok(n) if n > 0 => {
                                    self.cin.extend_from_slice(&probe[..n]);
                                    Some(hold.decided().await)
                                }
                                _ => None,
                            }
                        }
                    };
                    if let Some(a) = answer {
                        outcome = self.gate.release(hold, a).await;
                    } else {
                        self.gate.cancel(hold).await;
                        return Err(MyProxyError::ClientIo {
                            source: std::io::ErrorKind::UnexpectedEof.into(),
                        });
                    }
                }
            }
        }
        let reply = match packet.first() {
            Some(0x16) => Reply::Prepare,
            Some(0x17) => Reply::ResultSets { binary: true },
            Some(0x04) => Reply::FieldList,
            Some(0x03) => Reply::ResultSets { binary: false },
            _ => Reply::Simple,
        };
        let relayed = self.relay(reply, Some(&stmt)).await?;
        if let Some((id, params)) = relayed.prepared {
            if self.prepared.len() >= MAX_PREPARED && !self.prepared.contains_key(&id) {
                // Past the limit the statement stays at the server but the
                // proxy forgets it: its executions are refused.
                tracing::warn!(conn = self.ctx.conn.id, "prepared statement limit reached");
            } else {
                self.prepared.insert(
                    id,
                    Prepared {
                        sql: stmt.raw.clone().unwrap_or_default(),
                        analysis: Arc::clone(&stmt.analysis),
                        params,
                        param_types: None,
                        long_data: false,
                    },
                );
                if approved {
                    self.approved_prepare.insert(id);
                }
            }
        }
        self.track_database(packet, stmt.raw.as_deref(), relayed.ok)
            .await?;
        Ok(())
    }

    /// The session's database after a command: `COM_INIT_DB` or a text
    /// that is one `USE` (when it succeeded), or, after a multi-statement
    /// text with a `USE` inside, what the server says.
    async fn track_database(
        &mut self,
        packet: &[u8],
        raw: Option<&[u8]>,
        ok: bool,
    ) -> Result<(), MyProxyError> {
        let whole_use = raw.and_then(use_database);
        if ok {
            if packet.first() == Some(&0x02) {
                self.database = Some(String::from_utf8_lossy(&packet[1..]).into_owned());
            } else if let Some(db) = whole_use.clone() {
                self.database = Some(db);
            }
        }
        if whole_use.is_none()
            && packet.first() == Some(&0x03)
            && let Some(raw) = raw
        {
            // A `USE` inside a multi-statement text (the server stops at
            // the first error, perhaps after it): the server says where the
            // session is now.
            let text = String::from_utf8_lossy(raw);
            let text = crate::sql::mysql::unwrap_executable_comments(&text);
            let current = self.database.clone();
            let moves = crate::sql::mysql::databases_per_statement(&text, current.as_deref())
                .is_none_or(|(each, after)| after != current || each.iter().any(|d| *d != current));
            if moves && text.to_ascii_lowercase().contains("use") {
                if let Some(rows) = self.side_query("SELECT DATABASE()").await? {
                    self.database = rows.first().and_then(|r| r.first().cloned().flatten());
                } else {
                    tracing::warn!(
                        conn = self.ctx.conn.id,
                        "the current database is unknown after a multi-statement USE; names stay unqualified"
                    );
                    self.database = None;
                }
            }
        }
        Ok(())
    }

    // -----------------------------------------------------------------------
    // Replies

    /// Relays the server's reply to the command just sent: masks rows,
    /// records each statement's result.
    async fn relay(&mut self, reply: Reply, stmt: Option<&Stmt>) -> Result<Relayed, MyProxyError> {
        let mut resp = Response::new(reply, self.deprecate_eof());
        let mut out = Relayed::default();
        let mut cur = Running::new();
        let mut columns: Vec<ColumnDef> = Vec::new();
        let mut plan: Option<ResultPlan> = None;
        let mut index = 0usize;
        let withhold = stmt.is_some_and(|s| self.withholds_messages(s));
        let server = |source| MyProxyError::Server { source };
        while !resp.done() {
            let p = self.read_upstream().await?;
            let kind = resp.feed(&p).map_err(server)?;
            match kind {
                Packet::ColumnCount(_) => {
                    columns.clear();
                    plan = None;
                    self.send_client(&p)?;
                }
                Packet::Column(_) | Packet::PrepareColumn(_) => {
                    if columns.len() < codec::MAX_COLUMNS as usize {
                        columns.push(ColumnDef::parse(&p).map_err(server)?);
                    }
                    self.send_client(&p)?;
                }
                Packet::Row => {
                    if plan.is_none() {
                        plan = Some(self.plan(&columns, stmt, index));
                    }
                    let plan = plan.as_ref().expect("set above");
                    let masked = self.mask_row(plan, &p, resp.binary(), &mut cur)?;
                    cur.rows += 1;
                    cur.bytes += p.len() as u64;
                    self.send_client(masked.as_deref().unwrap_or(&p))?;
                }
                Packet::ResultEnd { .. } | Packet::Ok { .. } => {
                    self.send_client(&p)?;
                    out.ok = true;
                    if let Some(pl) = plan.take() {
                        cur.lineage = pl.lineage;
                    }
                    if let Some(s) = stmt {
                        let affected = match kind {
                            Packet::Ok { affected, .. } => Some(affected),
                            _ => None,
                        };
                        self.completed(
                            s,
                            std::mem::replace(&mut cur, Running::new()),
                            affected,
                            None,
                        );
                    }
                    index += 1;
                }
                Packet::Err { code, ref sqlstate } => {
                    out.ok = false;
                    if withhold {
                        self.send_client(&codec::err_packet(
                            code,
                            sqlstate,
                            &format!("agentgate: the server's message (error {code}) is withheld: the statement reads a protected column, and the message may quote its value"),
                        ))?;
                    } else {
                        self.send_client(&p)?;
                    }
                    if let Some(s) = stmt {
                        self.completed(
                            s,
                            std::mem::replace(&mut cur, Running::new()),
                            None,
                            Some(code),
                        );
                    }
                }
                Packet::Prepared {
                    stmt_id, params, ..
                } => {
                    out.prepared = Some((stmt_id, params));
                    out.ok = true;
                    self.send_client(&p)?;
                }
                Packet::LocalInfile { ref file } => {
                    self.local_infile(&p, file, stmt, &mut cur).await?;
                    resp.infile_sent();
                }
                Packet::PrepareParam | Packet::ColumnsEnd | Packet::Other => {
                    self.send_client(&p)?;
                }
            }
            if self.cout.len() >= FLUSH_AT {
                self.flush_client().await?;
            }
        }
        self.flush_client().await?;
        Ok(out)
    }

    /// Whether the server's error messages about a statement are withheld:
    /// it reads a protected column, and a message may quote a value.
    fn withholds_messages(&self, a: &Stmt) -> bool {
        let policy = self.masking();
        if policy.columns().is_empty() {
            return false;
        }
        match a.lineage.as_ref() {
            None => true,
            Some(all) => all
                .iter()
                .any(|s| lineage::reads_protected(policy, self.relations(), Some(s))),
        }
    }

    /// The masks of a result from its columns (`org_table`, `org_name`) and
    /// the lineage of the statement (the `index`-th of its text) it answers.
    fn plan(&self, columns: &[ColumnDef], stmt: Option<&Stmt>, index: usize) -> ResultPlan {
        let policy = self.masking();
        let types: Vec<ColumnType> = columns.iter().map(|c| c.column_type).collect();
        if policy.columns().is_empty() && !policy.detectors_enabled() {
            return ResultPlan {
                types,
                masks: None,
                lineage: None,
                names: Vec::new(),
            };
        }
        let fields: Vec<Field> = columns
            .iter()
            .map(|c| Field {
                // As the server names it: in its schema.
                relation: (!c.org_table.is_empty()).then(|| {
                    if c.schema.is_empty() {
                        c.org_table.clone()
                    } else {
                        format!("{}.{}", c.schema, c.org_table)
                    }
                }),
                column: if c.org_name.is_empty() {
                    c.name.clone()
                } else {
                    c.org_name.clone()
                },
                computed: c.org_table.is_empty(),
            })
            .collect();
        let st = stmt.and_then(|s| s.lineage.as_deref()).and_then(|l| {
            if l.len() == 1 {
                l.first()
            } else {
                l.get(index)
            }
        });
        let outputs = st.map(|s| &s.outputs);
        let functions = st.map_or(&[][..], |s| s.functions.as_slice());
        let masks = ResultMasks::plan(policy, self.relations(), outputs, functions, &fields);
        let names: Vec<String> = columns.iter().map(|c| c.name.clone()).collect();
        let lineage = masks.record(|i| names.get(i).cloned().unwrap_or_default());
        ResultPlan {
            types,
            masks: Some(masks),
            lineage,
            names,
        }
    }

    /// A row masked per its plan; `None` when it goes on unchanged.
    fn mask_row(
        &self,
        plan: &ResultPlan,
        p: &[u8],
        binary: bool,
        cur: &mut Running,
    ) -> Result<Option<Vec<u8>>, MyProxyError> {
        let Some(masks) = &plan.masks else {
            return Ok(None);
        };
        let policy = self.masking();
        let masker = masks.masker(policy);
        let detectors = masker.has_detectors();
        let mut buf = String::new();
        let mut refused = false;
        let rewritten = rows::rewrite(p, &plan.types, binary, |i, v| {
            let Some(v) = v else { return Edit::Keep };
            let strategy = masks.strategies.get(i).copied().flatten();
            if strategy.is_none() && !detectors {
                return Edit::Keep;
            }
            let textual = rows::is_textual(plan.types[i]);
            let name = || plan.names.get(i).cloned().unwrap_or_default();
            let null = |cur: &mut Running| {
                cur.values_nulled += 1;
                cur.columns_masked.insert(name());
                Edit::Null
            };
            if binary && !textual {
                // A binary number or date cannot carry masked text.
                return if strategy.is_some() {
                    null(cur)
                } else {
                    Edit::Keep
                };
            }
            let Ok(text) = std::str::from_utf8(v) else {
                return if strategy.is_some() {
                    null(cur)
                } else {
                    Edit::Keep
                };
            };
            buf.clear();
            match masker.mask_text(text, strategy, &mut buf) {
                MaskResult::Unchanged => Edit::Keep,
                MaskResult::Masked { detectors } => {
                    cur.detectors.extend(detectors);
                    if textual {
                        cur.values_masked += 1;
                        cur.columns_masked.insert(name());
                        Edit::Text(buf.clone())
                    } else {
                        null(cur)
                    }
                }
                MaskResult::Refuse => {
                    refused = true;
                    Edit::Keep
                }
            }
        })
        .map_err(|source| MyProxyError::Server { source })?;
        if refused {
            return Err(MyProxyError::Proxy {
                what: "a value could not be masked; the row was not sent".into(),
            });
        }
        Ok(rewritten)
    }

    /// The server asks for a file (`LOAD DATA LOCAL INFILE`). Only for a
    /// statement that is one (and was allowed) is the client asked; its
    /// data is relayed and its name, size and hash recorded. Otherwise the
    /// server gets an empty file and the client never hears of it.
    async fn local_infile(
        &mut self,
        request: &[u8],
        file: &str,
        stmt: Option<&Stmt>,
        cur: &mut Running,
    ) -> Result<(), MyProxyError> {
        use sha2::Digest as _;
        let asked = stmt.is_some_and(|s| s.local_infile)
            && self.caps.contains(CapabilityFlags::CLIENT_LOCAL_FILES);
        if !asked {
            self.send_upstream(&[]).await?;
            cur.infile = Some(json!({
                "file": file,
                "refused": "the server asked for a file the statement does not load",
            }));
            return Ok(());
        }
        self.send_client(request)?;
        self.flush_client().await?;
        let mut hash = sha2::Sha256::new();
        let mut size = 0u64;
        loop {
            let Some(chunk) = self.read_client().await? else {
                return Err(MyProxyError::ClientIo {
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                });
            };
            self.send_upstream(&chunk).await?;
            if chunk.is_empty() {
                break;
            }
            size += chunk.len() as u64;
            hash.update(&chunk);
        }
        cur.infile = Some(json!({
            "file": file,
            "bytes": size,
            "sha256": hex::encode(hash.finalize()),
        }));
        Ok(())
    }

    /// A statement's result: its record (not awaited: it already ran).
    fn completed(&self, stmt: &Stmt, cur: Running, affected: Option<u64>, error: Option<u16>) {
        let transform =
            (cur.values_masked + cur.values_nulled > 0 || cur.lineage.is_some()).then(|| {
                json!({
                    "masking": {
                        "columns": cur.columns_masked,
                        "values_masked": cur.values_masked,
                        "values_nulled": cur.values_nulled,
                        "detectors": cur.detectors,
                        "lineage": cur.lineage,
                    }
                })
            });
        let mut action = json!({
            "protocol": "mysql",
            "phase": "completed",
            "database": self.database,
            "sql_hash": stmt.hash,
        });
        if let Some(a) = affected {
            action["affected_rows"] = json!(a);
        }
        if let Some(f) = cur.infile {
            action["local_infile"] = f;
        }
        self.gate.completed(
            action,
            transform,
            &ResultRecord::Completed {
                status: if error.is_some() { "error" } else { "ok" },
                command: None,
                rows: cur.rows,
                bytes: cur.bytes,
                duration_ms: cur.started.elapsed().as_millis() as u64,
                sqlstate: error.map(|c| c.to_string()),
            },
        );
    }

    // -----------------------------------------------------------------------
    // COM_CHANGE_USER and close

    /// Recorded (write-ahead), then relayed like a login: the database user
    /// changes, the agentgate identity does not. `Ok(false)`: the server
    /// refused it (and closes).
    async fn change_user(&mut self, packet: &[u8]) -> Result<bool, MyProxyError> {
        if self.credential.is_some() {
            // The agent holds no database password here; a login of its
            // own would bypass the resource's credential.
            self.refuse_command(
                "COM_CHANGE_USER",
                "agentgate:mysql-credential",
                "the resource's credential logs in to this server; COM_CHANGE_USER is not relayed",
            )
            .await?;
            self.flush_client().await?;
            return Ok(true);
        }
        let (user, database) =
            change_user_fields(packet, self.caps).ok_or(MyProxyError::Client {
                source: ProtocolError::Malformed {
                    what: "COM_CHANGE_USER",
                },
            })?;
        let mut ev = self.ctx.conn.record(Kind::Statement).action(json!({
            "protocol": "mysql",
            "command": "COM_CHANGE_USER",
            "user": user,
            "previous_user": self.user,
            "database": database,
        }));
        ev.decision = Some(json!({"verdict": "allow", "rule": "agentgate:mysql-change-user"}));
        if let Err(e) = self.ctx.audit.append(ev).await {
            self.send_client(&codec::err_packet(
                1105,
                "HY000",
                "agentgate: audit log unavailable; the command was not run (fails closed)",
            ))?;
            self.flush_client().await?;
            tracing::error!(conn = self.ctx.conn.id, error = %e, "audit append failed");
            return Ok(true);
        }
        self.send_upstream(packet).await?;
        self.prepared.clear();
        self.approved_prepare.clear();
        let ok = self.relay_auth().await?;
        self.flush_client().await?;
        if ok {
            self.user = user;
            self.database = database;
        }
        Ok(ok)
    }

    async fn close_record(&mut self, error: Option<&MyProxyError>) {
        if !self.started {
            return;
        }
        let mut ev = self
            .ctx
            .conn
            .record(Kind::SessionEnd)
            .action(json!({"protocol": "mysql", "database": self.database, "user": self.user}));
        ev.result = Some(json!({
            "statements": self.statements,
            "bytes_up": self.ctx.conn.bytes_up.load(Ordering::Relaxed),
            "bytes_down": self.ctx.conn.bytes_down.load(Ordering::Relaxed),
            "duration_ms": self.opened_at.elapsed().as_millis() as u64,
            "error": error.map(ToString::to_string),
        }));
        if let Err(e) = self.ctx.audit.append(ev).await {
            tracing::error!(error = %e, "audit append failed for session.end");
        }
    }
}

/// What [`My::relay`] saw.
#[derive(Default)]
struct Relayed {
    /// A `COM_STMT_PREPARE` succeeded: the statement id and parameter count.
    prepared: Option<(u32, u16)>,
    /// The (last) statement succeeded.
    ok: bool,
}

/// `USE db` (the whole text): the database it selects.
fn use_database(sql: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(sql)
        .ok()?
        .trim()
        .trim_end_matches(';')
        .trim();
    let (kw, rest) = text.split_at_checked(3)?;
    if !kw.eq_ignore_ascii_case("use") || !rest.starts_with(char::is_whitespace) {
        return None;
    }
    let name = rest.trim();
    let name = name
        .strip_prefix('`')
        .and_then(|n| n.strip_suffix('`'))
        .map_or_else(|| name.to_owned(), |n| n.replace("``", "`"));
    (!name.is_empty() && !name.contains(char::is_whitespace)).then_some(name)
}

/// `COM_CHANGE_USER`'s user and database.
fn change_user_fields(packet: &[u8], caps: CapabilityFlags) -> Option<(String, Option<String>)> {
    let mut b = mysql_common::io::ParseBuf(packet.get(1..)?);
    let user = null_str(&mut b)?;
    if caps.contains(CapabilityFlags::CLIENT_SECURE_CONNECTION) {
        b.checked_eat_u8_str()?;
    } else {
        null_str(&mut b)?;
    }
    let db = null_str(&mut b).filter(|d| !d.is_empty());
    Some((user, db))
}

fn null_str(b: &mut mysql_common::io::ParseBuf<'_>) -> Option<String> {
    let rest = b.0;
    let end = rest.iter().position(|&c| c == 0)?;
    let s = String::from_utf8_lossy(&rest[..end]).into_owned();
    b.checked_skip(end + 1).then_some(s)
}

/// A denial as `MySQL` reports it: `ERR 1142` (SQLSTATE `42000`) naming the
/// rule and why; `1105` when the log could not take the record.
fn denial_err(d: &Denial) -> Vec<u8> {
    let message = match &d.kind {
        DenialKind::Policy => format!(
            "agentgate: statement denied by policy rule \"{}\": {}",
            d.rule, d.reason
        ),
        DenialKind::Approval { request } | DenialKind::Withdrawn { request } => format!(
            "agentgate: statement denied by policy rule \"{}\": approval request {request} {}",
            d.rule, d.reason
        ),
        DenialKind::AuditUnavailable => {
            return codec::err_packet(
                1105,
                "HY000",
                "agentgate: audit log unavailable; the statement was not run (fails closed)",
            );
        }
    };
    codec::err_packet(1142, "42000", &message)
}
