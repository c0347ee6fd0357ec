//! The daemon's TLS client toward upstreams: rustls (ring), the chain
//! verified against the resource's `ca_file` or else the platform roots (read
//! once per process), the name against what the caller passes. Fails closed:
//! no trust anchors is an error, never "accept anything".

use std::{path::Path, sync::Arc, sync::OnceLock};

use tokio_rustls::rustls;

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
