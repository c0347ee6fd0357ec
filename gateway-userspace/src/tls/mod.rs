//! TLS shared by every handler: the local certificate authority that signs
//! the certificates agents see ([`ca`]), and the rustls client configuration
//! the daemon uses toward upstreams ([`client`]).
//!
//! Interception works only for clients that trust the local CA: `agentgate
//! exec` points the usual environment variables at a bundle of the system
//! roots plus the local CA(s). A client that pins its own roots refuses the
//! gateway's certificate; a resource with `intercept = false` is relayed as a
//! connection instead. Fails closed: a CA that cannot be read or written, or
//! whose key other users could read, stops the daemon; an upstream whose
//! certificate does not verify is refused, never downgraded to plaintext.

pub mod ca;
pub mod client;

pub use ca::{CaInfo, CaPaths, CaStatus, LocalCa};
pub use client::client_config;

/// Errors of the local CA and the TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} is readable by group or others (mode {mode:o}): a CA key that may have leaked is not used"
    )]
    KeyPermissions { path: std::path::PathBuf, mode: u32 },
    #[error("no local CA in {dir} yet: the daemon creates it at its first start")]
    Missing { dir: std::path::PathBuf },
    #[error("certificate: {0}")]
    Cert(String),
    #[error("TLS handshake with the agent: {0}")]
    Handshake(String),
}
