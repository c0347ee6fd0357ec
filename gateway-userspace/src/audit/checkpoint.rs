//! Signed checkpoints and the ed25519 signing key.
//!
//! A checkpoint says: "the log of `origin` had `size` records, the Merkle root
//! over them was `root`, the last of them had hash `head`", signed with the log's
//! ed25519 key. The signed message is a fixed text (see [`Checkpoint::message`]).
//! The private key is made at first start, mode 0600, in the state directory; the
//! public key is exported beside the log as `audit-signing.pub` (hex). A key
//! change is a `key.rotation` record signed by both the old and the new key.

use std::{
    fs,
    io::Write,
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
};

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use super::{AuditError, record::Hash};

/// File name of the private key inside the state directory.
pub const KEY_FILE: &str = "audit-signing.key";
/// File name of the exported public key inside the log directory.
pub const PUB_FILE: &str = "audit-signing.pub";

/// A signed statement of the log's size and root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub v: u32,
    pub origin: String,
    /// Number of records covered: seqs `0..size`.
    pub size: u64,
    /// Merkle root over the first `size` record hashes (hex).
    pub root: String,
    /// Hash of record `size - 1` (hex; zeros for an empty log).
    pub head: String,
    pub time: String,
    /// The ed25519 public key that signed (hex).
    pub key: String,
    /// ed25519 signature over [`Checkpoint::message`] (hex).
    pub signature: String,
}

impl Checkpoint {
    /// The exact bytes signed.
    pub fn message(&self) -> Vec<u8> {
        format!(
            "agentgate audit checkpoint v{}\n{}\n{}\n{}\n{}\n{}\n{}\n",
            self.v, self.origin, self.size, self.root, self.head, self.time, self.key
        )
        .into_bytes()
    }

    pub(crate) fn sign(
        key: &SigningKey,
        origin: &str,
        size: u64,
        root: &Hash,
        head: &Hash,
        time: String,
    ) -> Checkpoint {
        let mut cp = Checkpoint {
            v: 1,
            origin: origin.to_owned(),
            size,
            root: hex::encode(root),
            head: hex::encode(head),
            time,
            key: hex::encode(key.verifying_key().as_bytes()),
            signature: String::new(),
        };
        cp.signature = hex::encode(key.sign(&cp.message()).to_bytes());
        cp
    }

    /// Checks the signature against the key named in the checkpoint.
    pub fn verify_signature(&self) -> Result<(), String> {
        verify_hex(&self.key, &self.message(), &self.signature)
    }

    /// Reads checkpoints from a file: one JSON object, or one per line.
    pub fn read_file(path: &Path) -> Result<Vec<Checkpoint>, String> {
        const LIMIT: u64 = 64 << 20;
        let meta = fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if meta.len() > LIMIT {
            return Err(format!("{}: larger than {LIMIT} bytes", path.display()));
        }
        let text = fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if let Ok(one) = serde_json::from_str::<Checkpoint>(&text) {
            return Ok(vec![one]);
        }
        let mut out = Vec::new();
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            out.push(
                serde_json::from_str(line)
                    .map_err(|e| format!("{}:{}: not a checkpoint: {e}", path.display(), i + 1))?,
            );
        }
        if out.is_empty() {
            return Err(format!("{}: no checkpoint in file", path.display()));
        }
        Ok(out)
    }
}

/// The body of a `key.rotation` record's `result`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRotation {
    pub old_key: String,
    pub new_key: String,
    pub time: String,
    /// Old key's signature over [`KeyRotation::message`]: the old key hands over.
    pub old_signature: String,
    /// New key's signature over the same message: proof the writer holds it.
    pub new_signature: String,
}

impl KeyRotation {
    pub fn message(old_key: &str, new_key: &str, time: &str) -> Vec<u8> {
        format!("agentgate audit key rotation v1\n{old_key}\n{new_key}\n{time}\n").into_bytes()
    }

    pub(crate) fn sign(old: &SigningKey, new: &SigningKey, time: String) -> KeyRotation {
        let old_key = hex::encode(old.verifying_key().as_bytes());
        let new_key = hex::encode(new.verifying_key().as_bytes());
        let msg = Self::message(&old_key, &new_key, &time);
        KeyRotation {
            old_signature: hex::encode(old.sign(&msg).to_bytes()),
            new_signature: hex::encode(new.sign(&msg).to_bytes()),
            old_key,
            new_key,
            time,
        }
    }

    pub fn verify(&self) -> Result<(), String> {
        let msg = Self::message(&self.old_key, &self.new_key, &self.time);
        verify_hex(&self.old_key, &msg, &self.old_signature)
            .map_err(|e| format!("old key: {e}"))?;
        verify_hex(&self.new_key, &msg, &self.new_signature).map_err(|e| format!("new key: {e}"))
    }
}

fn verify_hex(key_hex: &str, msg: &[u8], sig_hex: &str) -> Result<(), String> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(key_hex, &mut key)
        .map_err(|_| "public key is not 64 hex digits".to_string())?;
    let key = VerifyingKey::from_bytes(&key).map_err(|e| format!("bad public key: {e}"))?;
    let mut sig = [0u8; 64];
    hex::decode_to_slice(sig_hex, &mut sig)
        .map_err(|_| "signature is not 128 hex digits".to_string())?;
    key.verify(msg, &Signature::from_bytes(&sig))
        .map_err(|_| "signature does not verify".to_string())
}

pub(crate) fn io_err(
    path: &Path,
    op: &'static str,
) -> impl FnOnce(std::io::Error) -> AuditError + use<> {
    let path = path.to_path_buf();
    move |e| AuditError::Io {
        path,
        op,
        source: Arc::new(e),
    }
}

/// Loads the signing key from `state_dir`, or makes one (0600) if there is none
/// and `create` is set. Returns the key and whether it was created.
pub(crate) fn load_or_create_key(
    state_dir: &Path,
    create: bool,
) -> Result<(SigningKey, bool), AuditError> {
    let path = state_dir.join(KEY_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => Ok((parse_key(&path, &text)?, false)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
            fs::create_dir_all(state_dir).map_err(io_err(state_dir, "create state dir"))?;
            let key = SigningKey::generate(&mut rand_core::OsRng);
            write_key_file(&path, &key, true)?;
            Ok((key, true))
        }
        Err(e) => Err(io_err(&path, "read signing key")(e)),
    }
}

fn parse_key(path: &Path, text: &str) -> Result<SigningKey, AuditError> {
    let mode = fs::metadata(path)
        .map_err(io_err(path, "stat signing key"))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(AuditError::Config {
            reason: format!(
                "{} is readable by others (mode {:o}); it must be 0600",
                path.display(),
                mode & 0o777
            ),
        });
    }
    let mut seed = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut seed).map_err(|_| AuditError::Config {
        reason: format!(
            "{} does not hold a 64-hex-digit ed25519 seed",
            path.display()
        ),
    })?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Writes the key (0600, fsynced). `create_new` refuses to overwrite.
pub(crate) fn write_key_file(
    path: &Path,
    key: &SigningKey,
    create_new: bool,
) -> Result<(), AuditError> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).mode(0o600);
    if create_new {
        opts.create_new(true);
    } else {
        opts.create(true).truncate(true);
    }
    let mut f = opts
        .open(path)
        .map_err(io_err(path, "create signing key"))?;
    f.write_all(format!("{}\n", hex::encode(key.to_bytes())).as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io_err(path, "write signing key"))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Replaces the key file atomically (write a temp file, fsync, rename, fsync dir).
pub(crate) fn replace_key(state_dir: &Path, key: &SigningKey) -> Result<(), AuditError> {
    let tmp = state_dir.join(format!("{KEY_FILE}.new"));
    let _ = fs::remove_file(&tmp);
    write_key_file(&tmp, key, true)?;
    let dst = state_dir.join(KEY_FILE);
    fs::rename(&tmp, &dst).map_err(io_err(&dst, "install signing key"))?;
    sync_dir(state_dir)
}

/// Writes the public key beside the log (atomically).
pub(crate) fn export_public_key(dir: &Path, key: &SigningKey) -> Result<PathBuf, AuditError> {
    let dst = dir.join(PUB_FILE);
    let want = format!("{}\n", hex::encode(key.verifying_key().as_bytes()));
    if fs::read_to_string(&dst).is_ok_and(|have| have == want) {
        return Ok(dst);
    }
    let tmp = dir.join(format!("{PUB_FILE}.new"));
    fs::write(&tmp, want.as_bytes()).map_err(io_err(&tmp, "write public key"))?;
    fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io_err(&tmp, "fsync public key"))?;
    fs::rename(&tmp, &dst).map_err(io_err(&dst, "install public key"))?;
    sync_dir(dir)?;
    Ok(dst)
}

/// Reads the exported public key (hex), if present.
pub fn read_public_key(dir: &Path) -> Option<String> {
    fs::read_to_string(dir.join(PUB_FILE))
        .ok()
        .map(|s| s.trim().to_owned())
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), AuditError> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io_err(dir, "fsync directory"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_signature_verifies_and_detects_change() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let cp = Checkpoint::sign(&key, "o", 5, &[1; 32], &[2; 32], "t".into());
        assert!(cp.verify_signature().is_ok());
        let mut bad = cp.clone();
        bad.size = 6;
        assert!(bad.verify_signature().is_err());
    }

    #[test]
    fn rotation_needs_both_keys() {
        let a = SigningKey::from_bytes(&[1; 32]);
        let b = SigningKey::from_bytes(&[2; 32]);
        let r = KeyRotation::sign(&a, &b, "t".into());
        assert!(r.verify().is_ok());
        let mut bad = r.clone();
        bad.new_key = hex::encode(SigningKey::from_bytes(&[3; 32]).verifying_key().as_bytes());
        assert!(bad.verify().is_err());
    }
}
