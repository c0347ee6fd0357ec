//! The daemon's TLS client toward upstreams, for every handler: rustls
//! (ring), the chain verified against the resource's `ca_file` or else the
//! platform roots (read once per process), the name against the resource's
//! `server_name` or else the IP dialled. Each protocol asks for TLS its own
//! way (Postgres `SSLRequest`, `MySQL`'s capability flag, HTTPS at once) and
//! then hands its stream here. Fails closed: no trust anchors, a bad name
//! or a failed handshake is an error, never a plaintext fallback.

use std::{net::SocketAddr, path::Path, sync::Arc, sync::OnceLock};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{client::TlsStream, rustls};

use crate::policy::UpstreamTls;

/// TLS over `stream` to the database server at `addr`, per the resource's
/// `tls` (no ALPN).
pub async fn connect<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    tls: &UpstreamTls,
    addr: SocketAddr,
) -> Result<TlsStream<S>, String> {
    let config = client_config(tls.ca_file.as_deref(), &[])?;
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

fn system_roots() -> Arc<rustls::RootCertStore> {
    static ROOTS: OnceLock<Arc<rustls::RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            for c in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(c);
            }
            Arc::new(roots)
        })
        .clone()
}

/// A client configuration trusting `ca_file` (PEM) or, without one, the
/// platform roots; offering `alpn` (empty: none).
pub fn client_config(
    ca_file: Option<&Path>,
    alpn: &[&[u8]],
) -> Result<rustls::ClientConfig, String> {
    use rustls_pki_types::{CertificateDer, pem::PemObject as _};
    let roots = if let Some(path) = ca_file {
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
        for c in certs {
            let c = c.map_err(|e| format!("ca_file {}: {e}", path.display()))?;
            roots
                .add(c)
                .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
        }
        Arc::new(roots)
    } else {
        system_roots()
    };
    if roots.is_empty() {
        return Err("no trust anchors".into());
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}
