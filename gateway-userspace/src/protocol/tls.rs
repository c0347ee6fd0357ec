//! TLS toward a database server, shared by the database handlers: rustls
//! (ring), the chain verified against the resource's `ca_file` (else the
//! platform roots), the name against its `server_name` (else the IP
//! dialled). Each protocol asks for TLS its own way (Postgres
//! `SSLRequest`, `MySQL`'s capability flag) and then hands its stream here.
//! Fails closed: no trust anchors, a bad name or a failed handshake is an
//! error, never a plaintext fallback.

use std::{net::SocketAddr, path::Path, sync::Arc};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{client::TlsStream, rustls};

use crate::policy::UpstreamTls;

/// TLS over `stream` to the server at `addr`, per the resource's `tls`.
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    tls: &UpstreamTls,
    addr: SocketAddr,
) -> Result<TlsStream<S>, String> {
    let config = client_config(tls.ca_file.as_deref())?;
    let name = match &tls.server_name {
        Some(n) => rustls_pki_types::ServerName::try_from(n.clone())
            .map_err(|e| format!("server_name {n:?}: {e}"))?,
        None => rustls_pki_types::ServerName::IpAddress(addr.ip().into()),
    };
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, stream)
        .await
        .map_err(|e| e.to_string())
}

/// A client configuration trusting `ca_file` (else the platform roots).
pub fn client_config(ca_file: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    use rustls_pki_types::{CertificateDer, pem::PemObject as _};
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = ca_file {
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
        for c in certs {
            let c = c.map_err(|e| format!("ca_file {}: {e}", path.display()))?;
            roots
                .add(c)
                .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
        }
    } else {
        for c in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(c);
        }
    }
    if roots.is_empty() {
        return Err("no trust anchors".into());
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
}
