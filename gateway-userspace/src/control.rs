//! The control socket: a unix stream socket (mode 0600, owned by root) speaking
//! one JSON object per line in each direction. The daemon checks the peer's
//! credentials on every request: only root may tag, exec or read status, and
//! no process inside (or below) a tagged cgroup may ask anything, whatever its
//! uid (fails closed: a caller whose cgroup cannot be read is refused too).
//!
//! An `exec` request owns its cgroup for as long as the requesting connection
//! stays open; when it closes, the daemon removes the cgroup once it is empty.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::UnixStream,
};

/// Longest request line accepted, in bytes.
pub const MAX_REQUEST: usize = crate::identity::MAX_HANDOFF_LINE + 4096;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    Status,
    /// Create a tagged cgroup bound to `identity`; the caller moves itself in.
    /// `privileged`: the command will run as root (`exec --allow-root`); the
    /// daemon records a `workload.privileged` record before answering.
    Exec {
        identity: String,
        #[serde(default)]
        privileged: bool,
    },
    /// From the `exec` process that owns an exec cgroup (the only caller
    /// inside a tagged cgroup the daemon answers, and only this): its
    /// agent's seccomp filter refused a call.
    ContainmentReport {
        pid: u32,
        call: String,
        family: i64,
        sock_type: i64,
        protocol: i64,
    },
    Tag {
        cgroup: PathBuf,
        identity: String,
    },
    Untag {
        cgroup: PathBuf,
    },
    /// Hand a session from `agentgate login` to the daemon, which verifies
    /// the ID token itself before holding it.
    Login {
        handoff: crate::identity::LoginHandoff,
    },
    /// End a verified identity's session (revoked at the provider too).
    Logout {
        identity: String,
    },
    /// Rotate the audit log's checkpoint signing key.
    AuditRotateKey,
    ApprovalsList,
    ApprovalsShow {
        id: String,
    },
    /// Vote on a held command as `as_name` (JSON `as`): a session the daemon
    /// holds and verified, or a label identity where `[approvals]
    /// allow_labels` says so. Never the requester; a rejection needs a reason.
    ApprovalsDecide {
        id: String,
        approve: bool,
        #[serde(rename = "as")]
        as_name: String,
        #[serde(default)]
        reason: Option<String>,
        #[serde(default)]
        ticket: Option<String>,
    },
    /// Live grants.
    ApprovalsGrants,
    /// End a grant early, as `as_name` (resolved like `ApprovalsDecide`).
    ApprovalsRevoke {
        grant: String,
        #[serde(rename = "as")]
        as_name: String,
        #[serde(default)]
        reason: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorKind {
    /// The caller's to fix (bad path, unknown identity, not allowed): exit 2.
    Usage,
    /// The daemon could not do it: exit 1.
    Failure,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    #[serde(default)]
    pub data: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    pub kind: ErrorKind,
    pub message: String,
}

impl Response {
    pub fn ok(data: serde_json::Value) -> Self {
        Self {
            ok: true,
            error: None,
            data,
        }
    }

    pub fn err(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            ok: false,
            error: Some(ErrorBody {
                kind,
                message: message.into(),
            }),
            data: serde_json::Value::Null,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "agentgate daemon is not running (no control socket at {path}); start it with `agentgate run`, or, if it runs with another config, set AGENTGATE_CONFIG=FILE (or pass --config FILE)"
    )]
    NotRunning { path: PathBuf },
    #[error("permission denied on {path}: the control socket is root-only")]
    PermissionDenied { path: PathBuf },
    #[error("talking to the daemon at {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon sent a malformed response")]
    Protocol(#[source] serde_json::Error),
    #[error("{message}")]
    Refused { kind: ErrorKind, message: String },
}

impl ControlError {
    /// Whether this is the caller's to fix (exit code 2).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Self::NotRunning { .. }
                | Self::PermissionDenied { .. }
                | Self::Refused {
                    kind: ErrorKind::Usage,
                    ..
                }
        )
    }
}

/// A client connection to the daemon.
pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
}

impl Client {
    pub async fn connect(path: &Path) -> Result<Self, ControlError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| match source.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
                    ControlError::NotRunning { path: path.into() }
                }
                std::io::ErrorKind::PermissionDenied => {
                    ControlError::PermissionDenied { path: path.into() }
                }
                _ => ControlError::Io {
                    path: path.into(),
                    source,
                },
            })?;
        Ok(Self {
            path: path.into(),
            reader: BufReader::new(stream),
        })
    }

    pub async fn request(&mut self, req: &Request) -> Result<serde_json::Value, ControlError> {
        let io = |source| ControlError::Io {
            path: self.path.clone(),
            source,
        };
        let mut line = serde_json::to_vec(req).map_err(ControlError::Protocol)?;
        line.push(b'\n');
        self.reader.get_mut().write_all(&line).await.map_err(io)?;
        let mut resp = String::new();
        let n = self
            .reader
            .read_line(&mut resp)
            .await
            .map_err(|source| ControlError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(ControlError::Io {
                path: self.path.clone(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "daemon closed the connection",
                ),
            });
        }
        let resp: Response = serde_json::from_str(&resp).map_err(ControlError::Protocol)?;
        match (resp.ok, resp.error) {
            (true, _) => Ok(resp.data),
            (false, Some(e)) => Err(ControlError::Refused {
                kind: e.kind,
                message: e.message,
            }),
            (false, None) => Err(ControlError::Refused {
                kind: ErrorKind::Failure,
                message: "request failed".into(),
            }),
        }
    }
}
