//! Helpers shared by the audit integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use agentgate::audit::{AuditConfig, AuditLog, IdentityRef, Kind, NewRecord, list_segments};

/// A log directory inside a temp dir (the key goes to the temp dir itself).
pub struct TempLog {
    pub tmp: tempfile::TempDir,
    pub dir: PathBuf,
}

impl TempLog {
    pub fn new() -> TempLog {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("audit");
        TempLog { tmp, dir }
    }

    pub fn cfg(&self) -> AuditConfig {
        let mut c = AuditConfig::with_dir(&self.dir);
        c.checkpoint_every_records = 10;
        c.segment_max_bytes = 8192;
        c
    }
}

pub fn statement(i: u64) -> NewRecord {
    NewRecord::new(Kind::Statement)
        .session(format!("sess-{}", i % 3))
        .connection(i)
        .identity(IdentityRef { subject: format!("alice-{}", i % 2), kind: "human".into(), groups: vec!["dba".into()] })
        .resource("payments-db")
        .action(serde_json::json!({"sql": "SELECT name FROM customers WHERE id = ?", "literal_hashes": ["abc"]}))
        .decision(serde_json::json!({"action": "allow", "rule": "r1"}))
}

/// Writes `n` statements and closes the log.
pub async fn write_log(cfg: AuditConfig, n: u64) {
    let log = AuditLog::open(cfg).await.expect("open");
    for i in 0..n {
        log.append(statement(i)).await.expect("append");
    }
    log.close().await.expect("close");
}

/// One stored line: its segment, offset, bytes (without `\n`) and seq.
#[derive(Debug, Clone)]
pub struct Line {
    pub segment: PathBuf,
    pub offset: u64,
    pub bytes: Vec<u8>,
    pub seq: u64,
}

pub fn lines(dir: &Path) -> Vec<Line> {
    let mut out = Vec::new();
    for seg in list_segments(dir).unwrap() {
        let raw = std::fs::read(&seg.path).unwrap();
        let mut off = 0u64;
        for l in raw.split_inclusive(|b| *b == b'\n') {
            let body = l.strip_suffix(b"\n").unwrap_or(l).to_vec();
            let seq = agentgate::audit::parse_line(&body).map_or(u64::MAX, |p| p.record.seq);
            out.push(Line {
                segment: seg.path.clone(),
                offset: off,
                bytes: body,
                seq,
            });
            off += l.len() as u64;
        }
    }
    out
}

pub fn line_of(dir: &Path, seq: u64) -> Line {
    lines(dir)
        .into_iter()
        .find(|l| l.seq == seq)
        .expect("seq present")
}

/// Edits, in place, the byte `skip` bytes after the first `needle` in record
/// `seq`'s line. Returns the line as it was.
pub fn edit_byte(
    dir: &Path,
    seq: u64,
    needle: &[u8],
    skip: usize,
    edit: impl FnOnce(&mut u8),
) -> Line {
    let target = line_of(dir, seq);
    let pos = target
        .bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("needle in the line")
        + skip;
    let mut raw = std::fs::read(&target.segment).unwrap();
    edit(&mut raw[target.offset as usize + pos]);
    std::fs::write(&target.segment, raw).unwrap();
    target
}

/// Flips one byte inside record `seq`'s resource name (`payments-db` ->
/// `paxments-db`): same length, so only that record's hash breaks. Returns
/// the line as it was.
pub fn flip_value_byte(dir: &Path, seq: u64) -> Line {
    edit_byte(dir, seq, b"payments-db", 2, |b| *b ^= 0x01) // 'y' -> 'x'
}

/// Rewrites one segment from its lines.
pub fn write_segment(path: &Path, lines: &[Vec<u8>]) {
    let mut raw = Vec::new();
    for l in lines {
        raw.extend_from_slice(l);
        raw.push(b'\n');
    }
    std::fs::write(path, raw).unwrap();
}

pub fn segment_lines(path: &Path) -> Vec<Vec<u8>> {
    let raw = std::fs::read(path).unwrap();
    raw.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect()
}

pub fn agentgate() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_agentgate"));
    // No daemon config on the test host is read.
    c.arg("--config").arg("/nonexistent/agentgate.toml");
    c
}
