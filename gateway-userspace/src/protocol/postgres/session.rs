//! Pure (no I/O) state of one proxied Postgres session.
//!
//! The proxy loop feeds every decoded client message through
//! [`Session::disposition`] and then [`Session::forward`] or [`Session::deny`], and
//! every server message through [`Session::backend`]. The session keeps:
//!
//! - the transaction status from `ReadyForQuery`, the server's `BackendKeyData`
//!   (for `CancelRequest` routing) and `ParameterStatus` values;
//! - prepared statements (name → SQL, row description) and portals, so a decision
//!   made at `Parse` knows the statement at `Bind`/`Execute`, and the masker knows
//!   the columns (and their formats) of the rows an `Execute` returns;
//! - a queue of the requests forwarded upstream that still await their response,
//!   so every server response is matched to the client message it answers. This
//!   is what lets a denial be placed exactly where Postgres would have put the
//!   error, even in a pipeline, and lets the proxy swallow the answers to the
//!   `Describe` messages it injects itself.
//!
//! # How a denial works, and why
//!
//! A denied statement is never sent upstream. Instead the proxy sends a
//! replacement that is certain to fail at parse time without touching the catalog
//! ([`DENIED_SQL`], a syntax error), and [`Session::backend`] replaces the server's
//! error for it with the denial (`ERROR 42501 ... rule "..."`). The server's own
//! state then follows exactly what Postgres does with any failed statement:
//! outside a transaction block the implicit transaction of the batch is rolled
//! back and `ReadyForQuery('I')` follows; inside a block the transaction is left
//! failed and `ReadyForQuery('E')` follows, so a later `COMMIT` really rolls back
//! and `ROLLBACK TO SAVEPOINT` really recovers. Answering locally instead would
//! need a second, simulated transaction state that the server does not share
//! (and rewriting `COMMIT` into `ROLLBACK`), and could not place the error in
//! order behind responses still in flight for earlier pipelined messages. The
//! cost is one round trip per denial and a syntax error in the server's log.
//!
//! In the extended protocol, after a denial the client's messages up to its next
//! `Sync` are discarded ([`Disposition::Discard`]), as the server itself would skip
//! them after an error; the `Sync` is forwarded and the server's
//! `ReadyForQuery` ends the batch.
//!
//! # Fails closed
//!
//! A server response that does not match the request queue (a desynchronised
//! stream) is [`SessionError::Desync`]: the proxy must close both connections,
//! because from then on rows could be attributed to the wrong statement and masked
//! by the wrong columns. Rows whose description is unknown are reported with
//! `None` so the masker refuses them when any masking applies.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;

use super::codec::{
    BackendMessage, CopyFormat, ErrorFields, FrontendMessage, RowDescription, Target, TxStatus,
};

/// SQL sent upstream in place of a denied statement: a syntax error, so it fails
/// in the parser, before any catalog lookup, whatever objects the session created.
pub const DENIED_SQL: &[u8] = b"AGENTGATE DENIED";

/// Statement name the proxy uses when it must inject a failing `Parse` for a
/// denied message that is not itself a `Parse`.
const DENIED_STATEMENT: &[u8] = b"agentgate_denied";

/// The key a server gave in `BackendKeyData`, needed to cancel its queries.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendKey {
    pub pid: i32,
    pub secret: Bytes,
}

/// A prepared statement the server confirmed (`ParseComplete`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub sql: Bytes,
    pub param_types: Vec<u32>,
    /// From a `Describe` of the statement: formats are all 0 there, the real ones
    /// come from `Bind`. `Some(empty)` after `NoData`.
    pub rows: Option<Arc<RowDescription>>,
}

/// A portal the server confirmed (`BindComplete`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Portal {
    pub statement: Bytes,
    pub sql: Option<Bytes>,
    pub result_formats: Vec<i16>,
    /// Columns with their actual formats, once known.
    pub rows: Option<Arc<RowDescription>>,
}

/// What to do with a client message before any policy decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Drop it: the batch it belongs to already failed (skip until `Sync`).
    Discard,
    /// It carries SQL or a function call: ask the policy, then call
    /// [`Session::forward`] or [`Session::deny`].
    Decide,
    /// No decision needed: call [`Session::forward`].
    Forward,
}

/// What the proxy sends upstream for an allowed client message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// Send this first (a `Describe` of the portal an `Execute` will read, so the
    /// masker learns its columns); its answer is swallowed by [`Session::backend`].
    pub describe_first: Option<FrontendMessage>,
}

/// What to do with a server message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendAction {
    /// Pass it to the client unchanged.
    Forward,
    /// A `DataRow`: mask it with these columns before passing it on. `None`: the
    /// columns are unknown, so a masker with any rule must refuse the row.
    Row(Option<Arc<RowDescription>>),
    /// A `CopyData` of a `COPY ... TO STDOUT`: mask it per this format.
    CopyOut(CopyFormat),
    /// Send this instead (the denial error in place of the server's error for the
    /// injected statement).
    Replace(BackendMessage),
    /// Do not pass it on (the answer to a message the proxy injected).
    Drop,
}

/// The session state cannot follow the stream: close both connections.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("server (upstream): {what} does not answer any pending request (expected {expected})")]
    Desync {
        what: &'static str,
        expected: &'static str,
    },
    #[error("client (downstream): more than {limit} prepared statements")]
    TooManyStatements { limit: usize },
}

/// Most named prepared statements one session may hold (each keeps its SQL,
/// up to `Limits::max_sql_len`, in the proxy's memory).
pub const MAX_PREPARED_STATEMENTS: usize = 10_000;

#[derive(Debug, Clone)]
enum Pending {
    Parse {
        name: Bytes,
        sql: Bytes,
        param_types: Vec<u32>,
    },
    Bind {
        portal: Bytes,
        statement: Bytes,
        result_formats: Vec<i16>,
    },
    Describe {
        target: Target,
        name: Bytes,
        injected: bool,
    },
    Execute {
        portal: Bytes,
    },
    Close {
        target: Target,
        name: Bytes,
    },
    Sync,
    /// Simple query or function call: ends with `ReadyForQuery`.
    Simple {
        sql: Option<Bytes>,
    },
    /// Injected failing statement; its error is replaced by `error`.
    Denied {
        error: ErrorFields,
        simple: bool,
    },
}

/// The state of one session; see the module docs.
#[derive(Debug, Default)]
#[allow(clippy::struct_excessive_bools)] // independent protocol flags, not a mode enum in disguise
pub struct Session {
    tx_status: TxStatus,
    backend_key: Option<BackendKey>,
    server_params: HashMap<Bytes, Bytes>,
    statements: HashMap<Bytes, Statement>,
    portals: HashMap<Bytes, Portal>,
    pending: VecDeque<Pending>,
    /// The proxy denied a message of the current extended batch: discard the
    /// client's messages up to `Sync`.
    client_skipping: bool,
    /// The server reported an extended-protocol error and skips to `Sync`; the
    /// messages it skips get no response, so they are not queued.
    server_skipping: bool,
    /// Columns of the result set a simple query is returning.
    query_rows: Option<Arc<RowDescription>>,
    copy_out: Option<CopyFormat>,
    copy_in: bool,
    describe_portals: bool,
}

impl Session {
    /// A session; with `describe_portals` set (masking applies to this resource),
    /// [`Session::forward`] asks the proxy to inject a `Describe` before any
    /// `Execute` whose columns would otherwise be unknown.
    pub fn new(describe_portals: bool) -> Self {
        Self {
            describe_portals,
            ..Self::default()
        }
    }

    /// Transaction status from the last `ReadyForQuery`.
    pub fn tx_status(&self) -> TxStatus {
        self.tx_status
    }

    /// The key from the server's `BackendKeyData`, once received.
    pub fn backend_key(&self) -> Option<&BackendKey> {
        self.backend_key.as_ref()
    }

    /// A run-time parameter the server reported (`client_encoding`, ...).
    pub fn server_param(&self, name: &str) -> Option<&[u8]> {
        self.server_params.get(name.as_bytes()).map(|v| &v[..])
    }

    /// True while the client's messages are being discarded up to `Sync`.
    pub fn skipping_until_sync(&self) -> bool {
        self.client_skipping
    }

    /// True when no request awaits a response (the session is idle).
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty()
    }

    /// A confirmed prepared statement.
    pub fn statement(&self, name: &[u8]) -> Option<&Statement> {
        self.statements.get(name)
    }

    /// A confirmed portal.
    pub fn portal(&self, name: &[u8]) -> Option<&Portal> {
        self.portals.get(name)
    }

    /// SQL text of a prepared statement as a `Bind` naming it will see it: the
    /// latest `Parse` still in flight for that name, else the confirmed statement.
    /// `None` for a statement created by SQL `PREPARE` (the proxy should decide
    /// on the `PREPARE` itself, and fail closed here).
    pub fn statement_sql(&self, name: &[u8]) -> Option<&Bytes> {
        self.pending
            .iter()
            .rev()
            .find_map(|p| match p {
                Pending::Parse { name: n, sql, .. } if n == name => Some(sql),
                _ => None,
            })
            .or_else(|| self.statements.get(name).map(|s| &s.sql))
    }

    /// Name of the statement behind a portal as an `Execute` naming it will
    /// see it: the latest `Bind` still in flight for it, else the confirmed one.
    pub fn portal_statement(&self, portal: &[u8]) -> Option<&Bytes> {
        self.pending
            .iter()
            .rev()
            .find_map(|p| match p {
                Pending::Bind {
                    portal: n,
                    statement,
                    ..
                } if n == portal => Some(statement),
                _ => None,
            })
            .or_else(|| self.portals.get(portal).map(|p| &p.statement))
    }

    /// SQL text behind a portal as an `Execute` naming it will see it.
    pub fn portal_sql(&self, portal: &[u8]) -> Option<&Bytes> {
        let pending_bind = self.pending.iter().rev().find_map(|p| match p {
            Pending::Bind {
                portal: n,
                statement,
                ..
            } if n == portal => Some(statement),
            _ => None,
        });
        match pending_bind {
            Some(statement) => self.statement_sql(statement),
            None => self.portals.get(portal).and_then(|p| p.sql.as_ref()),
        }
    }

    /// SQL of the request whose results are flowing now (for audit and for the
    /// COPY column list).
    pub fn current_sql(&self) -> Option<&Bytes> {
        match self.pending.front()? {
            Pending::Simple { sql } => sql.as_ref(),
            Pending::Execute { portal } => self.portals.get(portal).and_then(|p| p.sql.as_ref()),
            _ => None,
        }
    }

    /// Step 1 for each client message: discard, decide, or forward.
    pub fn disposition(&self, msg: &FrontendMessage) -> Disposition {
        if self.client_skipping
            && !matches!(msg, FrontendMessage::Sync | FrontendMessage::Terminate)
        {
            return Disposition::Discard;
        }
        match msg {
            FrontendMessage::Query { .. }
            | FrontendMessage::Parse { .. }
            | FrontendMessage::FunctionCall(_) => Disposition::Decide,
            _ => Disposition::Forward,
        }
    }

    /// Step 2 for an allowed message (or one that needs no decision): record it;
    /// the proxy then sends `describe_first` (if any) and the message upstream.
    pub fn forward(&mut self, msg: &FrontendMessage) -> Forward {
        let mut describe_first = None;
        match msg {
            FrontendMessage::Sync => {
                self.client_skipping = false;
                self.server_skipping = false;
                self.pending.push_back(Pending::Sync);
            }
            FrontendMessage::Query { sql } => self.push(Pending::Simple {
                sql: Some(sql.clone()),
            }),
            FrontendMessage::FunctionCall(_) => self.push(Pending::Simple { sql: None }),
            FrontendMessage::Parse {
                statement,
                sql,
                param_types,
            } => self.push(Pending::Parse {
                name: statement.clone(),
                sql: sql.clone(),
                param_types: param_types.clone(),
            }),
            FrontendMessage::Bind(b) => self.push(Pending::Bind {
                portal: b.portal.clone(),
                statement: b.statement.clone(),
                result_formats: b.result_formats.clone(),
            }),
            FrontendMessage::Describe { target, name } => self.push(Pending::Describe {
                target: *target,
                name: name.clone(),
                injected: false,
            }),
            FrontendMessage::Execute { portal, .. } => {
                if self.describe_portals
                    && !self.server_skipping
                    && !self.portal_rows_will_be_known(portal)
                {
                    self.push(Pending::Describe {
                        target: Target::Portal,
                        name: portal.clone(),
                        injected: true,
                    });
                    describe_first = Some(FrontendMessage::Describe {
                        target: Target::Portal,
                        name: portal.clone(),
                    });
                }
                self.push(Pending::Execute {
                    portal: portal.clone(),
                });
            }
            FrontendMessage::Close { target, name } => self.push(Pending::Close {
                target: *target,
                name: name.clone(),
            }),
            FrontendMessage::CopyDone | FrontendMessage::CopyFail { .. } => self.copy_in = false,
            FrontendMessage::Flush
            | FrontendMessage::Terminate
            | FrontendMessage::CopyData(_)
            | FrontendMessage::AuthResponse(_) => {}
        }
        Forward { describe_first }
    }

    /// Step 2 for a denied `Query`, `Parse`, `FunctionCall` (or any extended
    /// message the proxy refuses): returns the failing message to send upstream
    /// in its place, whose error [`Session::backend`] replaces with `error`.
    /// `None` when the server is already skipping this batch (it would ignore the
    /// replacement; the client gets the earlier error, as from Postgres).
    pub fn deny(&mut self, msg: &FrontendMessage, error: ErrorFields) -> Option<FrontendMessage> {
        let simple = matches!(
            msg,
            FrontendMessage::Query { .. } | FrontendMessage::FunctionCall(_)
        );
        if !simple {
            self.client_skipping = true;
        }
        if self.server_skipping {
            return None;
        }
        self.pending.push_back(Pending::Denied { error, simple });
        let sql = Bytes::from_static(DENIED_SQL);
        Some(if simple {
            FrontendMessage::Query { sql }
        } else {
            // The client's own statement name: a failed Parse leaves the server's
            // statements exactly as Postgres would have left them.
            let statement = match msg {
                FrontendMessage::Parse { statement, .. } => statement.clone(),
                _ => Bytes::from_static(DENIED_STATEMENT),
            };
            FrontendMessage::Parse {
                statement,
                sql,
                param_types: Vec::new(),
            }
        })
    }

    fn push(&mut self, p: Pending) {
        if !self.server_skipping {
            self.pending.push_back(p);
        }
    }

    /// Will the columns of `portal` be known when its `Execute` returns rows?
    fn portal_rows_will_be_known(&self, portal: &[u8]) -> bool {
        for p in self.pending.iter().rev() {
            match p {
                Pending::Describe {
                    target: Target::Portal,
                    name,
                    ..
                } if name == portal => return true,
                Pending::Bind {
                    portal: n,
                    statement,
                    ..
                } if n == portal => {
                    // Derivable at BindComplete if the statement's columns are known
                    // and no newer Parse replaces it.
                    let reparsed = self
                        .pending
                        .iter()
                        .any(|q| matches!(q, Pending::Parse { name, .. } if name == statement));
                    return !reparsed
                        && self
                            .statements
                            .get(statement)
                            .is_some_and(|s| s.rows.is_some());
                }
                _ => {}
            }
        }
        self.portals.get(portal).is_some_and(|p| p.rows.is_some())
    }

    /// Every server message, in order.
    #[allow(clippy::too_many_lines)] // one arm per message type reads best as one match
    pub fn backend(&mut self, msg: &BackendMessage) -> Result<BackendAction, SessionError> {
        Ok(match msg {
            BackendMessage::BackendKeyData { pid, secret } => {
                self.backend_key = Some(BackendKey {
                    pid: *pid,
                    secret: secret.clone(),
                });
                BackendAction::Forward
            }
            BackendMessage::ParameterStatus { name, value } => {
                if self.server_params.len() < 256 || self.server_params.contains_key(name) {
                    self.server_params.insert(name.clone(), value.clone());
                }
                BackendAction::Forward
            }
            BackendMessage::ParseComplete => match self.pop("ParseComplete", "Parse")? {
                Pending::Parse {
                    name,
                    sql,
                    param_types,
                } => {
                    if self.statements.len() >= MAX_PREPARED_STATEMENTS
                        && !self.statements.contains_key(&name)
                    {
                        return Err(SessionError::TooManyStatements {
                            limit: MAX_PREPARED_STATEMENTS,
                        });
                    }
                    self.statements.insert(
                        name,
                        Statement {
                            sql,
                            param_types,
                            rows: None,
                        },
                    );
                    BackendAction::Forward
                }
                _ => return Err(desync("ParseComplete", "Parse")),
            },
            BackendMessage::BindComplete => match self.pop("BindComplete", "Bind")? {
                Pending::Bind {
                    portal,
                    statement,
                    result_formats,
                } => {
                    let st = self.statements.get(&statement);
                    let rows = st
                        .and_then(|s| s.rows.as_ref())
                        .map(|r| Arc::new(with_formats(r, &result_formats)));
                    let sql = st.map(|s| s.sql.clone());
                    self.portals.insert(
                        portal,
                        Portal {
                            statement,
                            sql,
                            result_formats,
                            rows,
                        },
                    );
                    BackendAction::Forward
                }
                _ => return Err(desync("BindComplete", "Bind")),
            },
            BackendMessage::CloseComplete => match self.pop("CloseComplete", "Close")? {
                Pending::Close { target, name } => {
                    match target {
                        Target::Statement => {
                            self.statements.remove(&name);
                        }
                        Target::Portal => {
                            self.portals.remove(&name);
                        }
                    }
                    BackendAction::Forward
                }
                _ => return Err(desync("CloseComplete", "Close")),
            },
            BackendMessage::ParameterDescription { .. } => match self.pending.front() {
                Some(Pending::Describe {
                    target: Target::Statement,
                    injected,
                    ..
                }) => forward_unless(*injected),
                _ => return Err(desync("ParameterDescription", "Describe")),
            },
            BackendMessage::RowDescription(desc) => match self.pending.front() {
                Some(Pending::Simple { .. }) => {
                    self.query_rows = Some(Arc::new(desc.clone()));
                    BackendAction::Forward
                }
                Some(Pending::Describe { .. }) => self.described(Some(desc))?,
                _ => return Err(desync("RowDescription", "Describe or Query")),
            },
            BackendMessage::NoData => match self.pending.front() {
                Some(Pending::Describe { .. }) => self.described(None)?,
                _ => return Err(desync("NoData", "Describe")),
            },
            BackendMessage::DataRow(_) => match self.pending.front() {
                Some(Pending::Simple { .. }) => BackendAction::Row(self.query_rows.clone()),
                Some(Pending::Execute { portal }) => {
                    BackendAction::Row(self.portals.get(portal).and_then(|p| p.rows.clone()))
                }
                _ => return Err(desync("DataRow", "Execute or Query")),
            },
            BackendMessage::CommandComplete { .. }
            | BackendMessage::EmptyQueryResponse
            | BackendMessage::PortalSuspended => {
                self.copy_out = None;
                self.copy_in = false;
                match self.pending.front() {
                    Some(Pending::Simple { .. }) => self.query_rows = None,
                    Some(Pending::Execute { .. }) => {
                        self.pending.pop_front();
                    }
                    _ => return Err(desync("CommandComplete", "Execute or Query")),
                }
                BackendAction::Forward
            }
            BackendMessage::CopyInResponse(_) => {
                self.expect_running("CopyInResponse")?;
                self.copy_in = true;
                BackendAction::Forward
            }
            BackendMessage::CopyOutResponse(f) => {
                self.expect_running("CopyOutResponse")?;
                self.copy_out = Some(f.clone());
                BackendAction::Forward
            }
            BackendMessage::CopyBothResponse(_) => {
                // Replication streams are not inspected: refuse rather than pass blind.
                return Err(desync("CopyBothResponse", "no replication"));
            }
            BackendMessage::CopyData(_) => match &self.copy_out {
                Some(f) => BackendAction::CopyOut(f.clone()),
                None => return Err(desync("CopyData", "COPY TO STDOUT")),
            },
            BackendMessage::CopyDone => {
                if self.copy_out.is_none() {
                    return Err(desync("CopyDone", "COPY TO STDOUT"));
                }
                BackendAction::Forward
            }
            BackendMessage::ErrorResponse(_) => self.error()?,
            BackendMessage::ReadyForQuery(status) => {
                match self.pending.pop_front() {
                    Some(
                        Pending::Sync
                        | Pending::Simple { .. }
                        | Pending::Denied { simple: true, .. },
                    )
                    | None => {}
                    Some(_) => return Err(desync("ReadyForQuery", "Sync or Query")),
                }
                self.tx_status = *status;
                self.query_rows = None;
                self.copy_out = None;
                self.copy_in = false;
                if *status == TxStatus::Idle {
                    // Portals live until the end of their transaction.
                    self.portals.clear();
                }
                BackendAction::Forward
            }
            BackendMessage::Authentication(_)
            | BackendMessage::NoticeResponse(_)
            | BackendMessage::NotificationResponse { .. }
            | BackendMessage::NegotiateProtocolVersion { .. }
            | BackendMessage::FunctionCallResponse(_)
            | BackendMessage::Unknown { .. } => BackendAction::Forward,
        })
    }

    fn pop(&mut self, what: &'static str, expected: &'static str) -> Result<Pending, SessionError> {
        self.pending.pop_front().ok_or(desync(what, expected))
    }

    fn expect_running(&self, what: &'static str) -> Result<(), SessionError> {
        match self.pending.front() {
            Some(Pending::Simple { .. } | Pending::Execute { .. }) => Ok(()),
            _ => Err(desync(what, "Execute or Query")),
        }
    }

    /// Answer to a `Describe` at the front of the queue.
    fn described(&mut self, desc: Option<&RowDescription>) -> Result<BackendAction, SessionError> {
        let Some(Pending::Describe {
            target,
            name,
            injected,
        }) = self.pending.pop_front()
        else {
            return Err(desync("RowDescription", "Describe"));
        };
        let rows = Arc::new(desc.cloned().unwrap_or_default());
        match target {
            Target::Statement => {
                if let Some(s) = self.statements.get_mut(&name) {
                    s.rows = Some(rows);
                }
            }
            Target::Portal => {
                if let Some(p) = self.portals.get_mut(&name) {
                    p.rows = Some(rows);
                }
            }
        }
        Ok(forward_unless(injected))
    }

    fn error(&mut self) -> Result<BackendAction, SessionError> {
        self.copy_out = None;
        self.copy_in = false;
        self.query_rows = None;
        let Some(front) = self.pending.front() else {
            // Startup/authentication failure or a server shutdown: pass it on.
            return Ok(BackendAction::Forward);
        };
        match front {
            // Simple protocol: the request ends at ReadyForQuery.
            Pending::Simple { .. } => Ok(BackendAction::Forward),
            Pending::Denied {
                simple: true,
                error,
            } => Ok(BackendAction::Replace(BackendMessage::ErrorResponse(
                error.clone(),
            ))),
            Pending::Sync => Err(desync("ErrorResponse", "a request before Sync")),
            _ => {
                let failed = self.pending.pop_front().expect("front exists");
                if let Pending::Parse { name, .. } = &failed
                    && name.is_empty()
                {
                    // Postgres drops the unnamed statement before parsing.
                    self.statements.remove(name);
                }
                // The server now skips everything up to Sync: those get no answer.
                while let Some(p) = self.pending.front() {
                    if matches!(p, Pending::Sync) {
                        break;
                    }
                    self.pending.pop_front();
                }
                if self.pending.is_empty() {
                    self.server_skipping = true;
                }
                Ok(match failed {
                    Pending::Denied { error, .. } => {
                        BackendAction::Replace(BackendMessage::ErrorResponse(error))
                    }
                    _ => BackendAction::Forward,
                })
            }
        }
    }
}

fn desync(what: &'static str, expected: &'static str) -> SessionError {
    SessionError::Desync { what, expected }
}

fn forward_unless(injected: bool) -> BackendAction {
    if injected {
        BackendAction::Drop
    } else {
        BackendAction::Forward
    }
}

/// A statement's columns with the result formats a `Bind` asked for: no codes
/// means all text, one code applies to all columns, else one per column.
pub fn with_formats(rows: &RowDescription, result_formats: &[i16]) -> RowDescription {
    let mut out = rows.clone();
    for (i, f) in out.fields.iter_mut().enumerate() {
        f.format = match result_formats {
            [] => 0,
            [one] => *one,
            many => many.get(i).copied().unwrap_or(0),
        };
    }
    out
}

/// The error a denied statement gets: SQLSTATE 42501 (insufficient privilege),
/// naming the rule.
pub fn denial_error(rule: &str) -> ErrorFields {
    ErrorFields::new(
        "ERROR",
        "42501",
        &format!("agentgate: statement denied by policy rule \"{rule}\""),
    )
}

/// The notice a held statement gets while it waits for approval.
pub fn approval_notice(request_id: &str, deadline_rfc3339: &str) -> ErrorFields {
    ErrorFields::new(
        "NOTICE",
        "00000",
        &format!(
            "agentgate: statement held for approval, request {request_id}, deadline {deadline_rfc3339}"
        ),
    )
    .with_hint(&format!("approve with: agentgate approvals approve {request_id}"))
}
