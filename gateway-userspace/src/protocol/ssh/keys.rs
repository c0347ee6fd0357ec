//! SSH keys the daemon holds: its host CA (the agent's clients trust the
//! proxy through it), the user certificates it signs for upstream logins,
//! and the `@cert-authority` block it keeps in a `known_hosts` file.
//!
//! Keys are OpenSSH private key files, created 0600 by the daemon and never
//! readable by a tagged agent (the state directory is root's). Fails closed:
//! a key that cannot be read, or a certificate that cannot be signed, ends
//! the connection before anything reaches the host. The trade-off: host
//! certificates are signed per connection (a few tens of microseconds) so
//! their principals are exactly the names of the resource the agent dialled.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use russh::keys::ssh_key::{
    self, Certificate, HashAlg, LineEnding, PrivateKey, certificate, private::Ed25519Keypair,
};

/// Marks the block the daemon owns in a `known_hosts` file.
pub const BLOCK_BEGIN: &str = "# BEGIN agentgate ssh host CA (managed by agentgate; do not edit)";
pub const BLOCK_END: &str = "# END agentgate ssh host CA";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: {what}")]
    File { path: PathBuf, what: String },
    #[error("signing a certificate: {0}")]
    Sign(String),
}

fn file_err(path: &Path, what: impl std::fmt::Display) -> KeyError {
    KeyError::File {
        path: path.to_path_buf(),
        what: what.to_string(),
    }
}

/// A fresh ed25519 key.
pub fn generate() -> Result<PrivateKey, KeyError> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).map_err(|e| KeyError::Sign(e.to_string()))?;
    Ok(PrivateKey::from(Ed25519Keypair::from_seed(&seed)))
}

/// Reads the key at `path`, or creates it (0600, ed25519) if absent.
pub fn load_or_create(path: &Path, comment: &str) -> Result<PrivateKey, KeyError> {
    if path.exists() {
        return load(path);
    }
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    }
    let mut key = generate()?;
    key.set_comment(comment);
    let text = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| file_err(path, e))?;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| file_err(path, e))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| file_err(path, e))?;
    tracing::info!(path = %path.display(), "created an SSH key");
    Ok(key)
}

/// Reads an OpenSSH private key; refuses one others can read.
pub fn load(path: &Path) -> Result<PrivateKey, KeyError> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = fs::metadata(path).map_err(|e| file_err(path, e))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(file_err(
            path,
            "a private key others can read (chmod 600 it)",
        ));
    }
    PrivateKey::read_openssh_file(path).map_err(|e| file_err(path, e))
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn nonce() -> Result<Vec<u8>, KeyError> {
    let mut n = vec![0u8; 32];
    getrandom::getrandom(&mut n).map_err(|e| KeyError::Sign(e.to_string()))?;
    Ok(n)
}

/// A user certificate for `key`, signed by `ca`: valid for `principal` from
/// a minute ago (clock skew) for `validity`; `key_id` names the verified
/// identity and the request, so the host's log says who acted.
pub fn sign_user_cert(
    ca: &PrivateKey,
    key: &PrivateKey,
    principal: &str,
    key_id: &str,
    validity: Duration,
) -> Result<Certificate, KeyError> {
    let now = SystemTime::now();
    let mut b = certificate::Builder::new(
        nonce()?,
        key.public_key().key_data().clone(),
        unix(now) - 60,
        unix(now + validity),
    )
    .map_err(|e| KeyError::Sign(e.to_string()))?;
    let sign = |e: ssh_key::Error| KeyError::Sign(e.to_string());
    b.cert_type(certificate::CertType::User).map_err(sign)?;
    b.key_id(key_id).map_err(sign)?;
    b.valid_principal(principal).map_err(sign)?;
    b.extension("permit-pty", "").map_err(sign)?;
    b.sign(ca).map_err(sign)
}

/// A host certificate for the proxy's host key, valid for `names` (what the
/// agent may dial: the resource's host names and addresses) for a day.
pub fn sign_host_cert(
    ca: &PrivateKey,
    host_key: &PrivateKey,
    names: &[String],
) -> Result<Certificate, KeyError> {
    let now = SystemTime::now();
    let mut b = certificate::Builder::new(
        nonce()?,
        host_key.public_key().key_data().clone(),
        unix(now) - 300,
        unix(now + Duration::from_hours(24)),
    )
    .map_err(|e| KeyError::Sign(e.to_string()))?;
    let sign = |e: ssh_key::Error| KeyError::Sign(e.to_string());
    b.cert_type(certificate::CertType::Host).map_err(sign)?;
    b.key_id("agentgate proxy").map_err(sign)?;
    for n in names {
        b.valid_principal(n.as_str()).map_err(sign)?;
    }
    b.sign(ca).map_err(sign)
}

/// Reads an OpenSSH public key file (`ssh-ed25519 AAAA... comment`): a
/// resource's host CA.
pub fn load_public(path: &Path) -> Result<ssh_key::PublicKey, KeyError> {
    let text = fs::read_to_string(path).map_err(|e| file_err(path, e))?;
    ssh_key::PublicKey::from_openssh(text.trim()).map_err(|e| file_err(path, e))
}

/// Is `cert` a host certificate the CA `ca` signed for one of `names`,
/// valid now (unix seconds), with no critical options? `Err`: why not, in
/// the record's words.
pub fn check_host_cert(
    cert: &Certificate,
    ca: &ssh_key::PublicKey,
    names: &[String],
    now: u64,
) -> Result<(), &'static str> {
    if cert.cert_type() != certificate::CertType::Host {
        return Err("not a host certificate");
    }
    if cert.signature_key().fingerprint(HashAlg::Sha256) != ca.fingerprint(HashAlg::Sha256) {
        return Err("host certificate not signed by the host CA");
    }
    if cert
        .validate_at(now, [&ca.fingerprint(HashAlg::Sha256)])
        .is_err()
    {
        return Err("host certificate invalid or expired");
    }
    if !cert.critical_options().is_empty() {
        return Err("host certificate with critical options");
    }
    if !cert.valid_principals().iter().any(|p| names.contains(p)) {
        return Err("host certificate not valid for this host");
    }
    Ok(())
}

/// `SHA256:...` of a public key, as OpenSSH prints it.
pub fn fingerprint(key: &ssh_key::PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// The `@cert-authority` line for `hosts`.
pub fn cert_authority_line(ca: &PrivateKey, hosts: &[String]) -> Result<String, KeyError> {
    let public = ca
        .public_key()
        .to_openssh()
        .map_err(|e| KeyError::Sign(e.to_string()))?;
    Ok(format!("@cert-authority {} {public}", hosts.join(",")))
}

/// Replaces the daemon's marked block in `path` with `lines` (creating the
/// file, 0644, if absent); everything outside the block is kept as is.
pub fn write_known_hosts_block(path: &Path, lines: &[String]) -> Result<(), KeyError> {
    let old = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(file_err(path, e)),
    };
    let mut out = String::with_capacity(old.len() + 256);
    let mut inside = false;
    for l in old.lines() {
        if l == BLOCK_BEGIN {
            inside = true;
        } else if l == BLOCK_END {
            inside = false;
        } else if !inside {
            out.push_str(l);
            out.push('\n');
        }
    }
    if !lines.is_empty() {
        out.push_str(BLOCK_BEGIN);
        out.push('\n');
        for l in lines {
            out.push_str(l);
            out.push('\n');
        }
        out.push_str(BLOCK_END);
        out.push('\n');
    }
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
    }
    let tmp = path.with_extension("agentgate-tmp");
    fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)
        .and_then(|mut f| f.write_all(out.as_bytes()).and_then(|()| f.sync_all()))
        .and_then(|()| fs::rename(&tmp, path))
        .map_err(|e| file_err(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_carry_principal_key_id_and_type() {
        let ca = generate().unwrap();
        let key = generate().unwrap();
        let cert =
            sign_user_cert(&ca, &key, "deploy", "alice req-1", Duration::from_mins(5)).unwrap();
        assert_eq!(cert.key_id(), "alice req-1");
        assert_eq!(cert.valid_principals(), ["deploy"]);
        assert_eq!(cert.cert_type(), certificate::CertType::User);
        assert!(cert.verify_signature().is_ok());
        let host = sign_host_cert(&ca, &key, &["ops-host".into(), "127.0.0.1".into()]).unwrap();
        assert_eq!(host.cert_type(), certificate::CertType::Host);
    }

    #[test]
    fn host_certificates_are_checked_against_the_host_ca() {
        let ca = generate().unwrap();
        let other = generate().unwrap();
        let key = generate().unwrap();
        let now = unix(SystemTime::now());
        let names = vec!["127.0.0.1".to_owned()];
        let cert = sign_host_cert(&ca, &key, &names).unwrap();
        let ca_pub = ca.public_key().clone();
        assert_eq!(check_host_cert(&cert, &ca_pub, &names, now), Ok(()));
        let forged = sign_host_cert(&other, &key, &names).unwrap();
        assert_eq!(
            check_host_cert(&forged, &ca_pub, &names, now),
            Err("host certificate not signed by the host CA")
        );
        assert_eq!(
            check_host_cert(&cert, &ca_pub, &["10.0.0.9".to_owned()], now),
            Err("host certificate not valid for this host")
        );
        assert_eq!(
            check_host_cert(&cert, &ca_pub, &names, now + 3 * 86_400),
            Err("host certificate invalid or expired")
        );
        let user = sign_user_cert(&ca, &key, "127.0.0.1", "x", Duration::from_mins(5)).unwrap();
        assert_eq!(
            check_host_cert(&user, &ca_pub, &names, now),
            Err("not a host certificate")
        );
    }

    #[test]
    fn the_known_hosts_block_is_replaced_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("known_hosts");
        fs::write(&p, "host1 ssh-ed25519 AAAA\n").unwrap();
        write_known_hosts_block(&p, &["@cert-authority a x".into()]).unwrap();
        write_known_hosts_block(&p, &["@cert-authority b y".into()]).unwrap();
        let t = fs::read_to_string(&p).unwrap();
        assert!(t.starts_with("host1 ssh-ed25519 AAAA\n"), "{t}");
        assert!(
            t.contains("@cert-authority b y") && !t.contains("a x"),
            "{t}"
        );
        assert_eq!(t.matches(BLOCK_BEGIN).count(), 1);
    }

    #[test]
    fn a_key_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ca");
        load_or_create(&p, "ca").unwrap();
        assert!(load(&p).is_ok());
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load(&p).is_err());
    }
}
