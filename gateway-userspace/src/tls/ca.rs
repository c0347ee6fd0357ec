//! The local certificate authority: created at the daemon's first start,
//! rotated by `agentgate ca rotate`, and signing a short-lived leaf per name
//! an agent dials (the TLS SNI, or the IP it connected to when it sent none).
//!
//! Files, in `<state_dir>/ca/` (the directory and certificates world-readable
//! so agents running as other users can read the bundle; the key `0600`):
//! - `ca.key`: the CA's private key (PKCS#8 PEM). Never in a record or a log.
//! - `ca.pem`: the CA certificate.
//! - `retired.json`: CAs replaced by a rotation, trusted until a stated time.
//! - `agentgate-cas.pem`: the current CA and the retired ones still trusted.
//! - `bundle.pem`: the system roots followed by `agentgate-cas.pem`; `exec`
//!   points `SSL_CERT_FILE` and its kin here.
//!
//! Fails closed: a key other users can read, a certificate that does not match
//! its key, or a file that cannot be written stops the start. The trade-off of
//! minting per name: the daemon holds a CA key that can sign for any name, so
//! the key is the host's most sensitive file after the audit signing key;
//! leaves live [`LEAF_LIFETIME`] and are cached per name (at most
//! [`MAX_CACHED_LEAVES`]), so a name costs one ECDSA signature per day.

use std::{
    collections::HashMap,
    fs,
    io::Write as _,
    net::IpAddr,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData as _, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};
use tokio_rustls::rustls::{self, server::ResolvesServerCert, sign::CertifiedKey};

use super::TlsError;

/// How long a minted leaf is valid (it is re-minted an hour before it ends).
pub const LEAF_LIFETIME: Duration = Duration::from_hours(24);
/// Leaves kept per CA; past this, expired ones go, then all.
pub const MAX_CACHED_LEAVES: usize = 4096;
/// How long a new CA is valid.
pub const CA_LIFETIME: Duration = Duration::from_hours(730 * 24);
/// How long a rotated-out CA stays in the bundle unless the command says otherwise.
pub const DEFAULT_OVERLAP: Duration = Duration::from_hours(24);
/// How often the daemon looks for a rotation by the CLI.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// Where the CA's files live.
#[derive(Debug, Clone)]
pub struct CaPaths {
    pub dir: PathBuf,
}

impl CaPaths {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("ca"),
        }
    }
    pub fn key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn retired(&self) -> PathBuf {
        self.dir.join("retired.json")
    }
    /// The agentgate CAs only (for `NODE_EXTRA_CA_CERTS`, which adds to Node's roots).
    pub fn trusted(&self) -> PathBuf {
        self.dir.join("agentgate-cas.pem")
    }
    /// System roots plus the agentgate CAs.
    pub fn bundle(&self) -> PathBuf {
        self.dir.join("bundle.pem")
    }
}

/// One CA certificate, as `agentgate ca show` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct CaInfo {
    pub subject: String,
    /// SHA-256 of the DER certificate, uppercase hex pairs joined by `:`.
    pub fingerprint_sha256: String,
    pub not_before: String,
    pub not_after: String,
    /// For a rotated-out CA: the end of its overlap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trusted_until: Option<String>,
    pub pem: String,
}

/// The CA as the files say: current, retired ones still trusted, and the files agents use.
#[derive(Debug, Clone, Serialize)]
pub struct CaStatus {
    pub current: CaInfo,
    pub previous: Vec<CaInfo>,
    pub bundle: PathBuf,
    pub agentgate_cas: PathBuf,
}

/// A rotated-out CA certificate and when its trust ends (`retired.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Retired {
    pem: String,
    /// Unix seconds.
    trusted_until: u64,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_owned(),
        source,
    }
}

fn cert_err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Cert(e.to_string())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

fn rfc3339_secs(secs: i64) -> String {
    let t = SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64);
    let full = crate::time::rfc3339(t);
    // Whole seconds: certificates carry no more.
    format!("{}Z", &full[..19])
}

/// The environment `agentgate exec` sets so that common runtimes trust the
/// local CA without code changes: (variable, file). Most take the whole
/// bundle (they replace their roots with it); Node's variable adds to its
/// built-in roots, so it gets the agentgate CAs alone.
pub fn exec_env(paths: &CaPaths) -> Vec<(&'static str, PathBuf)> {
    let bundle = paths.bundle();
    let mut env: Vec<(&'static str, PathBuf)> = [
        // OpenSSL's default (Python's ssl and so httpx, Ruby, PHP), Go's
        // crypto/x509, rustls-native-certs.
        "SSL_CERT_FILE",
        // Python requests.
        "REQUESTS_CA_BUNDLE",
        // The curl command line and libcurl.
        "CURL_CA_BUNDLE",
        "GIT_SSL_CAINFO",
        "AWS_CA_BUNDLE",
        "PIP_CERT",
        "CARGO_HTTP_CAINFO",
        "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
        "DENO_CERT",
    ]
    .into_iter()
    .map(|k| (k, bundle.clone()))
    .collect();
    env.push(("NODE_EXTRA_CA_CERTS", paths.trusted()));
    env
}

/// Facts about a PEM certificate.
pub fn describe(pem: &str, trusted_until: Option<u64>) -> Result<CaInfo, TlsError> {
    let der = pem_to_der(pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(cert_err)?;
    let v = cert.validity();
    Ok(CaInfo {
        subject: cert.subject().to_string(),
        fingerprint_sha256: fingerprint(&der),
        not_before: rfc3339_secs(v.not_before.timestamp()),
        not_after: rfc3339_secs(v.not_after.timestamp()),
        trusted_until: trusted_until.map(|s| rfc3339_secs(s as i64)),
        pem: pem.to_owned(),
    })
}

/// SHA-256 of `der` as `AB:CD:...`.
pub fn fingerprint(der: &[u8]) -> String {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(der);
    d.iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn pem_to_der(pem: &str) -> Result<Vec<u8>, TlsError> {
    use rustls_pki_types::pem::PemObject as _;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|c| c.to_vec())
        .map_err(cert_err)
}

fn der_to_pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Writes `bytes` to `path` through a temporary file and a rename, with `mode`.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

fn read_key(path: &Path) -> Result<String, TlsError> {
    let mode = fs::metadata(path)
        .map_err(io_err(path))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(TlsError::KeyPermissions {
            path: path.to_owned(),
            mode: mode & 0o777,
        });
    }
    fs::read_to_string(path).map_err(io_err(path))
}

fn ca_params(not_before: SystemTime) -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    let host = fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    dn.push(DnType::OrganizationName, "agentgate");
    dn.push(DnType::CommonName, format!("agentgate local CA ({host})"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let mut serial = [0u8; 16];
    getrandom::getrandom(&mut serial).map_err(cert_err)?;
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let start = not_before - Duration::from_hours(1);
    params.not_before = start.into();
    params.not_after = (start + CA_LIFETIME).into();
    Ok(params)
}

/// Makes a new CA: its key and its certificate PEM.
fn new_ca() -> Result<(String, String), TlsError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(cert_err)?;
    let cert = ca_params(SystemTime::now())?
        .self_signed(&key)
        .map_err(cert_err)?;
    Ok((key.serialize_pem(), cert.pem()))
}

fn read_retired(paths: &CaPaths) -> Result<Vec<Retired>, TlsError> {
    match fs::read_to_string(paths.retired()) {
        Ok(text) => serde_json::from_str(&text)
            .map_err(|e| TlsError::Cert(format!("{}: {e}", paths.retired().display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(io_err(&paths.retired())(e)),
    }
}

/// The system roots as PEM (what the platform's verifier trusts).
fn system_roots_pem() -> String {
    let loaded = rustls_native_certs::load_native_certs();
    for e in &loaded.errors {
        tracing::warn!(error = %e, "reading a system root certificate");
    }
    loaded.certs.iter().map(|c| der_to_pem(c)).collect()
}

/// Rewrites `agentgate-cas.pem` and `bundle.pem` from the current CA and the
/// retired ones whose overlap has not ended (those that ended are dropped
/// from `retired.json` too).
fn write_trust(paths: &CaPaths, current_pem: &str) -> Result<(), TlsError> {
    let now = unix_now();
    let retired = read_retired(paths)?;
    let live: Vec<Retired> = retired
        .into_iter()
        .filter(|r| r.trusted_until > now)
        .collect();
    write_atomic(
        &paths.retired(),
        serde_json::to_string_pretty(&live)
            .expect("serialises")
            .as_bytes(),
        0o644,
    )?;
    let mut ours = current_pem.to_owned();
    for r in &live {
        ours.push_str(&r.pem);
    }
    write_atomic(&paths.trusted(), ours.as_bytes(), 0o644)?;
    let mut bundle = system_roots_pem();
    bundle.push_str(&ours);
    write_atomic(&paths.bundle(), bundle.as_bytes(), 0o644)
}

fn ensure_dir(paths: &CaPaths) -> Result<(), TlsError> {
    fs::create_dir_all(&paths.dir).map_err(io_err(&paths.dir))?;
    fs::set_permissions(&paths.dir, fs::Permissions::from_mode(0o755)).map_err(io_err(&paths.dir))
}

/// What `agentgate ca show` prints; reads the files only.
pub fn status(state_dir: &Path) -> Result<CaStatus, TlsError> {
    let paths = CaPaths::new(state_dir);
    let pem = match fs::read_to_string(paths.cert()) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(TlsError::Missing { dir: paths.dir });
        }
        Err(e) => return Err(io_err(&paths.cert())(e)),
    };
    let now = unix_now();
    let previous = read_retired(&paths)?
        .iter()
        .filter(|r| r.trusted_until > now)
        .map(|r| describe(&r.pem, Some(r.trusted_until)))
        .collect::<Result<_, _>>()?;
    Ok(CaStatus {
        current: describe(&pem, None)?,
        previous,
        bundle: paths.bundle(),
        agentgate_cas: paths.trusted(),
    })
}

/// Replaces the CA with a new one; the old certificate stays in the bundle
/// for `overlap`. The daemon picks the new CA up within a second. Returns
/// the new status.
pub fn rotate(state_dir: &Path, overlap: Duration) -> Result<CaStatus, TlsError> {
    let paths = CaPaths::new(state_dir);
    let old_pem = match fs::read_to_string(paths.cert()) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(TlsError::Missing { dir: paths.dir });
        }
        Err(e) => return Err(io_err(&paths.cert())(e)),
    };
    let mut retired = read_retired(&paths)?;
    if !overlap.is_zero() {
        retired.push(Retired {
            pem: old_pem,
            trusted_until: unix_now() + overlap.as_secs(),
        });
    }
    let (key, cert) = new_ca()?;
    // The retired list first: the old CA is never out of the bundle before
    // the new one is in.
    write_atomic(
        &paths.retired(),
        serde_json::to_string_pretty(&retired)
            .expect("serialises")
            .as_bytes(),
        0o644,
    )?;
    write_atomic(&paths.key(), key.as_bytes(), 0o600)?;
    write_atomic(&paths.cert(), cert.as_bytes(), 0o644)?;
    write_trust(&paths, &cert)?;
    status(state_dir)
}

/// The CA that signs: its issuer, its certificate, and the one key every
/// leaf it mints uses (one ECDSA key for all names: minting costs a
/// signature, not a key generation).
struct Signer {
    issuer: Issuer<'static, KeyPair>,
    ca_der: CertificateDer<'static>,
    ca_not_after: SystemTime,
    leaf_key: KeyPair,
    leaf_signing: Arc<dyn rustls::sign::SigningKey>,
    /// `ca.pem`'s (length, modification time) when it was loaded.
    stamp: (u64, SystemTime),
}

struct Leaf {
    key: Arc<CertifiedKey>,
    renew_at: SystemTime,
}

struct State {
    signer: Signer,
    leaves: HashMap<String, Leaf>,
    checked: Instant,
}

/// The daemon's CA: mints and caches leaves, and follows rotations made by the CLI.
pub struct LocalCa {
    paths: CaPaths,
    state: Mutex<State>,
}

fn stamp(path: &Path) -> Result<(u64, SystemTime), TlsError> {
    let m = fs::metadata(path).map_err(io_err(path))?;
    Ok((m.len(), m.modified().map_err(io_err(path))?))
}

fn load_signer(paths: &CaPaths) -> Result<Signer, TlsError> {
    let stamp = stamp(&paths.cert())?;
    let key_pem = read_key(&paths.key())?;
    let cert_pem = fs::read_to_string(paths.cert()).map_err(io_err(&paths.cert()))?;
    let key = KeyPair::from_pem(&key_pem).map_err(cert_err)?;
    let der = pem_to_der(&cert_pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).map_err(cert_err)?;
    if cert.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(TlsError::Cert(format!(
            "{} does not belong to {}",
            paths.cert().display(),
            paths.key().display()
        )));
    }
    let not_after = SystemTime::UNIX_EPOCH
        + Duration::from_secs(cert.validity().not_after.timestamp().max(0) as u64);
    let issuer = Issuer::from_ca_cert_der(&der.clone().into(), key).map_err(cert_err)?;
    let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(cert_err)?;
    let leaf_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
    let leaf_signing = rustls::crypto::ring::sign::any_ecdsa_type(&leaf_der).map_err(cert_err)?;
    Ok(Signer {
        issuer,
        ca_der: CertificateDer::from(der),
        ca_not_after: not_after,
        leaf_key,
        leaf_signing,
        stamp,
    })
}

impl LocalCa {
    /// Opens the CA in `state_dir`, creating it on first use, and rewrites
    /// the trust bundle (system roots change with the host's packages).
    pub fn load_or_create(state_dir: &Path) -> Result<Self, TlsError> {
        let paths = CaPaths::new(state_dir);
        ensure_dir(&paths)?;
        match (paths.key().exists(), paths.cert().exists()) {
            (false, false) => {
                let (key, cert) = new_ca()?;
                write_atomic(&paths.key(), key.as_bytes(), 0o600)?;
                write_atomic(&paths.cert(), cert.as_bytes(), 0o644)?;
                tracing::info!(dir = %paths.dir.display(), "created the local CA");
            }
            (true, true) => {}
            _ => {
                return Err(TlsError::Cert(format!(
                    "{}: one of ca.key and ca.pem is missing; restore it, or remove both to make a new CA",
                    paths.dir.display()
                )));
            }
        }
        let signer = load_signer(&paths)?;
        let pem = fs::read_to_string(paths.cert()).map_err(io_err(&paths.cert()))?;
        write_trust(&paths, &pem)?;
        Ok(Self {
            paths,
            state: Mutex::new(State {
                signer,
                leaves: HashMap::new(),
                checked: Instant::now(),
            }),
        })
    }

    pub fn paths(&self) -> &CaPaths {
        &self.paths
    }

    /// The current CA certificate (DER).
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.state.lock().expect("ca lock").signer.ca_der.clone()
    }

    /// The certificate and key for `name` (a DNS name, or an IP address in
    /// text form), minted now or from the cache.
    pub fn leaf(&self, name: &str) -> Result<Arc<CertifiedKey>, TlsError> {
        let mut st = self.state.lock().expect("ca lock");
        self.follow_rotation(&mut st);
        let now = SystemTime::now();
        if let Some(l) = st.leaves.get(name)
            && l.renew_at > now
        {
            return Ok(l.key.clone());
        }
        let (key, not_after) = mint(&st.signer, name, now)?;
        if st.leaves.len() >= MAX_CACHED_LEAVES {
            st.leaves.retain(|_, l| l.renew_at > now);
            if st.leaves.len() >= MAX_CACHED_LEAVES {
                st.leaves.clear();
            }
        }
        let renew_at = not_after
            .checked_sub(Duration::from_hours(1))
            .unwrap_or(not_after);
        st.leaves.insert(
            name.to_owned(),
            Leaf {
                key: key.clone(),
                renew_at,
            },
        );
        Ok(key)
    }

    /// A rotation by the CLI replaced `ca.pem`: load the new CA (once its
    /// key matches) and drop the leaves of the old one.
    fn follow_rotation(&self, st: &mut State) {
        if st.checked.elapsed() < RELOAD_CHECK {
            return;
        }
        st.checked = Instant::now();
        let Ok(now) = stamp(&self.paths.cert()) else {
            return;
        };
        if now == st.signer.stamp {
            return;
        }
        match load_signer(&self.paths) {
            Ok(signer) => {
                tracing::info!(fingerprint = %fingerprint(&signer.ca_der), "the local CA was rotated; new leaves are signed by the new CA");
                st.signer = signer;
                st.leaves.clear();
            }
            // Mid-rotation (the key written, the certificate not yet) or
            // broken: keep signing with the CA in memory, try again later.
            Err(e) => tracing::warn!(error = %e, "the local CA changed but cannot be loaded yet"),
        }
    }

    /// A resolver for one connection: the SNI name, or `dialled` when the
    /// client sent none.
    pub fn resolver(self: &Arc<Self>, dialled: IpAddr) -> Arc<dyn ResolvesServerCert> {
        Arc::new(Resolver {
            ca: self.clone(),
            dialled,
        })
    }

    /// A rustls server configuration for one connection to `dialled`,
    /// offering `alpn` (e.g. `[b"h2", b"http/1.1"]`; empty for none).
    pub fn server_config(
        self: &Arc<Self>,
        dialled: IpAddr,
        alpn: &[&[u8]],
    ) -> Arc<rustls::ServerConfig> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_no_client_auth()
        .with_cert_resolver(self.resolver(dialled));
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(cfg)
    }
}

/// Signs a leaf for `name`; returns it with its end of validity.
fn mint(
    signer: &Signer,
    name: &str,
    now: SystemTime,
) -> Result<(Arc<CertifiedKey>, SystemTime), TlsError> {
    let mut params = CertificateParams::default();
    let san = match name.parse::<IpAddr>() {
        Ok(ip) => SanType::IpAddress(ip),
        Err(_) => SanType::DnsName(name.to_owned().try_into().map_err(cert_err)?),
    };
    params.subject_alt_names = vec![san];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let mut serial = [0u8; 16];
    getrandom::getrandom(&mut serial).map_err(cert_err)?;
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let not_before = now - Duration::from_hours(1);
    let not_after = (now + LEAF_LIFETIME).min(signer.ca_not_after);
    params.not_before = not_before.into();
    params.not_after = not_after.into();
    let cert = params
        .signed_by(&signer.leaf_key, &signer.issuer)
        .map_err(cert_err)?;
    let chain = vec![cert.der().clone(), signer.ca_der.clone()];
    Ok((
        Arc::new(CertifiedKey::new(chain, signer.leaf_signing.clone())),
        not_after,
    ))
}

struct Resolver {
    ca: Arc<LocalCa>,
    dialled: IpAddr,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("dialled", &self.dialled)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello
            .server_name()
            .map_or_else(|| self.dialled.to_string(), str::to_ascii_lowercase);
        match self.ca.leaf(&name) {
            Ok(k) => Some(k),
            Err(e) => {
                // No certificate: the handshake fails (closed), the agent sees an alert.
                tracing::warn!(error = %e, "minting a leaf certificate failed");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verify_chain(ca: &LocalCa, roots_pem: &str, name: &str) {
        use rustls::client::danger::ServerCertVerifier as _;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pki_types::CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .unwrap();
        let leaf = ca.leaf(name).unwrap();
        let server_name = rustls_pki_types::ServerName::try_from(name.to_owned()).unwrap();
        verifier
            .verify_server_cert(
                &leaf.cert[0],
                &leaf.cert[1..],
                &server_name,
                &[],
                rustls_pki_types::UnixTime::now(),
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }

    use rustls_pki_types::pem::PemObject as _;

    #[test]
    fn created_once_with_a_private_key_and_leaves_that_verify() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path()).unwrap();
        let paths = CaPaths::new(dir.path());
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&paths.key()), 0o600);
        assert_eq!(mode(&paths.bundle()), 0o644);
        let first = fs::read_to_string(paths.cert()).unwrap();
        // Leaves for a name and for an IP verify against the bundle alone.
        let bundle = fs::read_to_string(paths.bundle()).unwrap();
        assert!(
            bundle.ends_with(&first),
            "the bundle ends with the agentgate CA"
        );
        verify_chain(&ca, &first, "api.example.test");
        verify_chain(&ca, &first, "127.0.0.1");
        // Cached: the same name gives the same certificate.
        assert!(Arc::ptr_eq(
            &ca.leaf("a.test").unwrap(),
            &ca.leaf("a.test").unwrap()
        ));
        // A second start keeps the CA.
        drop(ca);
        let _again = LocalCa::load_or_create(dir.path()).unwrap();
        assert_eq!(fs::read_to_string(paths.cert()).unwrap(), first);
        // A key others can read is refused.
        fs::set_permissions(paths.key(), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            LocalCa::load_or_create(dir.path()),
            Err(TlsError::KeyPermissions { .. })
        ));
    }

    #[test]
    fn rotation_keeps_the_old_ca_trusted_for_the_overlap_and_the_daemon_follows() {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::load_or_create(dir.path()).unwrap();
        let before = status(dir.path()).unwrap();
        let old_leaf = ca.leaf("svc.test").unwrap();
        let after = rotate(dir.path(), Duration::from_hours(2)).unwrap();
        assert_ne!(
            before.current.fingerprint_sha256,
            after.current.fingerprint_sha256
        );
        assert_eq!(after.previous.len(), 1);
        assert_eq!(
            after.previous[0].fingerprint_sha256,
            before.current.fingerprint_sha256
        );
        let trusted = fs::read_to_string(CaPaths::new(dir.path()).trusted()).unwrap();
        assert!(
            trusted.contains(before.current.pem.trim())
                && trusted.contains(after.current.pem.trim())
        );
        // The daemon's CA notices within its check interval and mints from the new CA.
        ca.state.lock().unwrap().checked = Instant::now().checked_sub(RELOAD_CHECK * 2).unwrap();
        let new_leaf = ca.leaf("svc.test").unwrap();
        assert!(!Arc::ptr_eq(&old_leaf, &new_leaf));
        assert_eq!(
            ca.ca_der().as_ref(),
            pem_to_der(&after.current.pem).unwrap().as_slice()
        );
        verify_chain(&ca, &after.current.pem, "svc.test");
        // No overlap: the old CA leaves the bundle at once.
        let again = rotate(dir.path(), Duration::ZERO).unwrap();
        assert_eq!(
            again.previous.len(),
            1,
            "only the first retired CA is still trusted"
        );
    }

    #[test]
    fn fingerprint_is_colon_separated_sha256() {
        let f = fingerprint(b"x");
        assert_eq!(f.len(), 32 * 3 - 1);
        assert!(f.starts_with("2D:71:16:42"));
    }
}
