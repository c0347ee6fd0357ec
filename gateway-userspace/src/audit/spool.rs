//! The access-request spool: how a reader records `audit.access` while the
//! daemon holds the writer lock.
//!
//! The CLI appends one JSON [`NewRecord`] per line to `access-requests.jsonl` in
//! the log directory (one `write` with `O_APPEND`, then fsync). The writer
//! ingests the spool at startup and on each housekeeping tick (every second):
//! it renames the file to `access-requests.ingesting`, appends one `audit.access`
//! record per line (forcing the kind; a line that does not parse becomes an
//! `audit.access` record saying so, without its bytes), and deletes the file
//! once those records are durable. A crash in between can ingest a request
//! twice, never zero times.

use std::{
    fs,
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use super::record::{Kind, NewRecord};

pub const SPOOL_FILE: &str = "access-requests.jsonl";
pub const INGESTING_FILE: &str = "access-requests.ingesting";
/// Longest spool line accepted.
pub const MAX_SPOOL_LINE: usize = 64 << 10;
/// Most lines taken in one ingest (the rest waits for the next tick).
const MAX_SPOOL_BYTES: u64 = 16 << 20;

/// Appends an access request to the spool of `dir`.
pub fn spool_access_request(dir: &Path, rec: &NewRecord) -> io::Result<PathBuf> {
    let mut line = serde_json::to_vec(rec).map_err(io::Error::other)?;
    if line.len() > MAX_SPOOL_LINE {
        return Err(io::Error::other(
            "access request larger than the spool line limit",
        ));
    }
    line.push(b'\n');
    let path = dir.join(SPOOL_FILE);
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(&path)?;
    f.write_all(&line)?;
    f.sync_data()?;
    Ok(path)
}

/// Takes the pending requests: returns the records and the file to delete once
/// they are durable.
pub(crate) fn take(dir: &Path) -> io::Result<Option<(Vec<NewRecord>, PathBuf)>> {
    let ingesting = dir.join(INGESTING_FILE);
    if !ingesting.exists() {
        match fs::rename(dir.join(SPOOL_FILE), &ingesting) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    let len = fs::metadata(&ingesting)?.len();
    let raw = if len > MAX_SPOOL_BYTES {
        // Refuse to load an absurd spool; record that it happened.
        Vec::new()
    } else {
        fs::read(&ingesting)?
    };
    let mut out = Vec::new();
    if len > MAX_SPOOL_BYTES {
        out.push(NewRecord::new(Kind::AuditAccess).result(serde_json::json!({
            "via": "spool", "error": "spool file larger than the limit; not ingested", "bytes": len
        })));
    }
    for line in raw.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let parsed = (line.len() <= MAX_SPOOL_LINE)
            .then(|| serde_json::from_slice::<NewRecord>(line).ok())
            .flatten();
        out.push(match parsed {
            Some(mut rec) => {
                rec.kind = Kind::AuditAccess;
                rec
            }
            None => NewRecord::new(Kind::AuditAccess).result(serde_json::json!({
                "via": "spool", "error": "unparseable access request", "bytes": line.len()
            })),
        });
    }
    Ok(Some((out, ingesting)))
}
