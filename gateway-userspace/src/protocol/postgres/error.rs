//! Why a proxied Postgres connection ended abnormally.

use std::net::SocketAddr;

use super::{codec::ProtocolError, mask::MaskError, session::SessionError};
use crate::gate::AuditUnavailable;

/// Why a proxied Postgres connection ended abnormally; says which side.
#[derive(Debug, thiserror::Error)]
pub enum PgProxyError {
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
    #[error("{source}")]
    Protocol {
        #[source]
        source: ProtocolError,
    },
    #[error("client (downstream): {what}")]
    Client { what: String },
    #[error("server (upstream): connecting to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("server (upstream): TLS to {addr}: {reason}")]
    Tls { addr: SocketAddr, reason: String },
    #[error("{source}")]
    Session {
        #[source]
        source: SessionError,
    },
    #[error("{source}")]
    Mask {
        #[source]
        source: MaskError,
    },
    #[error("proxy: {source}")]
    Audit {
        #[source]
        source: AuditUnavailable,
    },
    #[error("{phase} timed out")]
    Timeout { phase: &'static str },
}

impl From<SessionError> for PgProxyError {
    fn from(source: SessionError) -> Self {
        PgProxyError::Session { source }
    }
}
