//! The tamper-evident audit log (DESIGN.md "Audit log", EVIDENCE.md).
//!
//! **Fails closed.** [`AuditLog::append`] returns only once the record is durable
//! (see [`Durability`]); when it cannot be written (disk full, permissions, I/O
//! error) it returns an error and the caller must deny the action it wanted to
//! log. The failure is a `tracing` error, a counter, and a `log.failure` record
//! as soon as the log can be written again. Checkpoint export to outside sinks
//! is the one part that fails open (the checkpoints are in the log regardless).
//!
//! **Files.** Segments of JSON lines (`segment-<first seq>.jsonl`, rotated by
//! size and age) in the log directory, schema `"v": 1`. Every record has seq,
//! time (UTC, RFC 3339, nanoseconds), host, kind, session id, connection id,
//! identity, workload, resource, action, decision, transform, approval, result,
//! prev and hash, in that order (absent values are `null`).
//!
//! **Canonical bytes and hash.** The canonical bytes of a record are its line up
//! to the `,"hash":` field, with `}` appended: the writer's compact serialization
//! of every field but `hash` in the fixed order above. `hash = blake3(
//! "agentgate.audit.record.v1\0" || canonical || prev)` with `prev` the previous
//! record's 32-byte hash (zeros before seq 0). A verifier needs only the file.
//!
//! **Merkle tree.** Record hashes are the leaves of an RFC 6962-shaped tree
//! (blake3, 0x00 leaf and 0x01 node prefixes; [`merkle`]), so inclusion and
//! consistency proofs can be made and checked.
//!
//! **Checkpoints.** Every `checkpoint_every_records` records or
//! `checkpoint_every_secs` seconds, on demand and at close, the writer appends a
//! `checkpoint` record (size, root, head, signed with ed25519; [`Checkpoint`])
//! and hands it to the sinks (a file meant to be on another mount or host, an
//! `http://` webhook). The key is made at first start (`audit-signing.key`, 0600,
//! in the state directory); its public half is `audit-signing.pub` beside the
//! log. Rotation is a `key.rotation` record signed by both keys.
//!
//! **Crash safety.** See [`writer`](self::AuditLog): a torn last line is moved to
//! `quarantine/` and a `log.recovered` record names it.
//!
//! **Retention.** [`AuditLog::retain`] deletes only whole, closed segments
//! covered by a checkpoint in the log, and records a `retention` record (with
//! the anchor the verifier continues from) before deleting anything. The log
//! never calls it by itself; the daemon applies `[audit] retain_days` hourly
//! ([`enforce_retention`]).
//!
//! **Readers.** Reading through the CLI appends an `audit.access` record: it
//! takes the writer lock (`.lock`, `flock`) and appends directly, or, while the
//! daemon holds the lock, spools the request ([`spool_access_request`]) for the
//! daemon to ingest within a second.
//!
//! **PII.** Raw PII never enters the log: callers pass already-redacted
//! statements and correlate originals with [`keyed_hash`].

mod checkpoint;
mod config;
pub mod merkle;
pub mod ocsf;
mod paths;
mod proof;
mod record;
mod retention;
mod segment;
mod sink;
mod spool;
mod verify;
mod writer;

use std::{path::PathBuf, sync::Arc};

pub use checkpoint::{Checkpoint, KEY_FILE, KeyRotation, PUB_FILE, read_public_key};
pub use config::{AuditConfig, Durability};
pub(crate) use paths::PathCollector;
pub use proof::{InclusionProof, prove_inclusion, verify_inclusion_proof};
pub(crate) use record::format_time;
pub use record::{
    EncodeError, GENESIS_PREV, Hash, IdentityRef, Kind, MAX_LINE_BYTES, NewRecord, ParsedLine,
    Record, SCHEMA_VERSION, Workload, encode_line, now_rfc3339, parse_line, parse_time,
    record_hash, split_line,
};
pub use retention::{enforce_retention, keep_after};
pub(crate) use segment::read_anchor;
pub use segment::{
    ANCHOR_FILE, Anchor, LOCK_FILE, LineEnd, LineReader, QUARANTINE_DIR, SegmentFile,
    list_segments, quarantine_files, segment_name,
};
pub use spool::{INGESTING_FILE, SPOOL_FILE, spool_access_request};
pub use verify::{Broken, VerifyFailure, VerifyReport, read_records, verify_dir};
pub(crate) use verify::{ScanOptions, scan};
pub use writer::{Appended, AuditLog, AuditStats, MAX_BATCH, RetentionReport};

/// Errors from the audit log. Cloneable: one write failure answers many waiters.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    #[error("audit config: {reason}")]
    Config { reason: String },
    #[error("audit log: {op} {}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: Arc<std::io::Error>,
    },
    #[error("audit log {} is locked by another writer (is the daemon running?)", dir.display())]
    Locked { dir: PathBuf },
    #[error("audit log {} needs the daemon to open it first: {reason}", dir.display())]
    NeedsRepair { dir: PathBuf, reason: String },
    #[error("audit log {} does not verify, refusing to append: {failure}", dir.display())]
    Tampered {
        dir: PathBuf,
        #[source]
        failure: Box<VerifyFailure>,
    },
    #[error("signing key {} is not the log's current key {log_key}; restore the key", path.display())]
    KeyMismatch { path: PathBuf, log_key: String },
    #[error("audit record of {bytes} bytes exceeds the {limit} byte limit")]
    TooLarge { bytes: usize, limit: usize },
    #[error("records of kind {kind} are written by the audit log itself")]
    ReservedKind { kind: Kind },
    #[error("cannot prove seq {seq}: {reason}")]
    Unprovable { seq: u64, reason: String },
    #[error("the audit writer has stopped")]
    Closed,
    #[error("audit log internal error: {reason}")]
    Internal { reason: String },
}

/// Keyed blake3 of `data` (hex): lets records correlate a redacted value with
/// its original without storing it. The key never enters the log.
pub fn keyed_hash(key: &[u8; 32], data: &[u8]) -> String {
    blake3::keyed_hash(key, data).to_hex().to_string()
}

/// File name of the correlation key inside the state directory.
pub const CORRELATION_KEY_FILE: &str = "audit-correlation.key";

/// Loads the key for [`keyed_hash`] from `state_dir`, making it (0600) at first use.
pub fn load_or_create_correlation_key(state_dir: &std::path::Path) -> Result<[u8; 32], AuditError> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let path = state_dir.join(CORRELATION_KEY_FILE);
    let io = |op: &'static str, path: &std::path::Path| {
        let path = path.to_path_buf();
        move |e| AuditError::Io {
            path,
            op,
            source: Arc::new(e),
        }
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let mut key = [0u8; 32];
            hex::decode_to_slice(text.trim(), &mut key).map_err(|_| AuditError::Config {
                reason: format!("{} does not hold 64 hex digits", path.display()),
            })?;
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut key);
            std::fs::create_dir_all(state_dir).map_err(io("create state dir", state_dir))?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .map_err(io("create correlation key", &path))?;
            f.write_all(format!("{}\n", hex::encode(key)).as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(io("write correlation key", &path))?;
            Ok(key)
        }
        Err(e) => Err(io("read correlation key", &path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_hash_depends_on_key_and_data() {
        let a = keyed_hash(&[1; 32], b"4111111111111111");
        assert_eq!(a.len(), 64);
        assert_ne!(a, keyed_hash(&[2; 32], b"4111111111111111"));
        assert_ne!(a, keyed_hash(&[1; 32], b"4111111111111112"));
        assert_eq!(a, keyed_hash(&[1; 32], b"4111111111111111"));
    }
}
