//! Segment files on disk: names, listing, reading lines with their offsets,
//! the retention anchor and the quarantine for torn tails.
//!
//! Layout of the log directory:
//! - `segment-<first seq, 20 digits>.jsonl`: records, one per line, in seq order;
//!   a segment's first record has the seq in its name.
//! - `anchor.json`: only after retention deleted old segments: the seq, prev hash
//!   and Merkle frontier where the remaining log starts (also in the `retention` record).
//! - `quarantine/`: torn tails cut off by crash recovery, kept byte for byte.
//! - `audit-signing.pub`, `.lock`, `access-requests.jsonl` (see `spool`).

use std::{
    fs::{self, File},
    io::{self, BufRead, BufReader, Read, Seek, SeekFrom},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use super::{merkle::Frontier, record::MAX_LINE_BYTES};

pub const ANCHOR_FILE: &str = "anchor.json";
pub const QUARANTINE_DIR: &str = "quarantine";
pub const LOCK_FILE: &str = ".lock";

/// A segment file and the seq its name says it starts at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentFile {
    pub path: PathBuf,
    pub first_seq: u64,
}

pub fn segment_name(first_seq: u64) -> String {
    format!("segment-{first_seq:020}.jsonl")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("segment-")?.strip_suffix(".jsonl")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Segments in `dir`, in seq order.
pub fn list_segments(dir: &Path) -> io::Result<Vec<SegmentFile>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(first_seq) = entry.file_name().to_str().and_then(parse_segment_name) {
            out.push(SegmentFile {
                path: entry.path(),
                first_seq,
            });
        }
    }
    out.sort_by_key(|s| s.first_seq);
    Ok(out)
}

/// One line read from a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineEnd {
    /// Ends with `\n` (not included in the buffer).
    Complete,
    /// The file ends without `\n`: a torn write or a truncation.
    Torn,
    /// Longer than the line limit.
    TooLong,
}

/// Reads lines and tracks their byte offsets.
pub struct LineReader {
    reader: BufReader<File>,
    offset: u64,
}

impl LineReader {
    pub fn open(path: &Path, offset: u64) -> io::Result<LineReader> {
        let mut f = File::open(path)?;
        if offset > 0 {
            f.seek(SeekFrom::Start(offset))?;
        }
        Ok(LineReader {
            reader: BufReader::with_capacity(256 << 10, f),
            offset,
        })
    }

    /// Offset of the next line.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Reads the next line into `buf` (cleared first). Returns its offset and how it ended,
    /// or `None` at end of file.
    pub fn next_line(&mut self, buf: &mut Vec<u8>) -> io::Result<Option<(u64, LineEnd)>> {
        buf.clear();
        let start = self.offset;
        let limit = MAX_LINE_BYTES as u64 + 1;
        let n = (&mut self.reader).take(limit).read_until(b'\n', buf)?;
        if n == 0 {
            return Ok(None);
        }
        self.offset += n as u64;
        if buf.last() == Some(&b'\n') {
            buf.pop();
            Ok(Some((start, LineEnd::Complete)))
        } else if n as u64 >= limit {
            Ok(Some((start, LineEnd::TooLong)))
        } else {
            Ok(Some((start, LineEnd::Torn)))
        }
    }
}

/// Where the remaining log starts after retention deleted older segments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Anchor {
    /// Seq of the first record kept.
    pub first_seq: u64,
    /// Hash of the last record deleted (the kept log's first prev).
    pub prev: String,
    /// Merkle frontier over the deleted records (its size is `first_seq`).
    pub frontier: Frontier,
}

pub fn read_anchor(dir: &Path) -> io::Result<Option<Anchor>> {
    match fs::read(dir.join(ANCHOR_FILE)) {
        Ok(raw) => serde_json::from_slice(&raw)
            .map(Some)
            .map_err(io::Error::other),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Files in `dir/quarantine`.
pub fn quarantine_files(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = fs::read_dir(dir.join(QUARANTINE_DIR))
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    out.sort();
    out
}

/// Name of the quarantine file for a torn tail cut from `segment` at `offset`.
pub fn quarantine_name(segment: &Path, offset: u64, unix_nanos: i128) -> String {
    let seg = segment
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("segment");
    format!("{seg}.at-{offset}.{unix_nanos}.torn")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_others_are_ignored() {
        assert_eq!(parse_segment_name(&segment_name(42)), Some(42));
        assert_eq!(parse_segment_name("segment-1.jsonl"), None);
        assert_eq!(parse_segment_name("anchor.json"), None);
    }
}
