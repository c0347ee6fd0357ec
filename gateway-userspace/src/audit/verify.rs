//! Verifying a log directory from the files alone.
//!
//! One streaming pass over the segments in seq order checks, for every line:
//! it is complete and within the size limit, it parses as a v1 record, its seq
//! is the next one, its `prev` is the previous record's hash, and its stored
//! hash is the hash of its canonical bytes. Checkpoint records must cover
//! exactly the records before them, carry the Merkle root and head computed so
//! far, and be signed by the log's current key; `key.rotation` records must be
//! signed by the old and the new key. Older checkpoints given by the caller
//! (exported earlier, off the host) must be signed, name a key of this log, and
//! match the root and head of the log at their size; a log shorter than one of
//! them is missing its tail. Memory is O(log n): the pass keeps a Merkle frontier.
//!
//! The writer runs the same pass at open (see `writer`), so it refuses to
//! append to a log it cannot vouch for, except for a torn last line, which it
//! quarantines. To keep start-up time independent of the log's size, the
//! writer starts that pass at its last durable checkpoint ([`Resume`],
//! `resume.json`): the checkpoint record is checked in full (seq, link, hash,
//! Merkle root and head against the saved frontier, signature, key) and so is
//! everything after it; the records before it are left to `audit verify`,
//! which always reads the whole log. Any mismatch of the saved state means a
//! full pass.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    checkpoint::{Checkpoint, KeyRotation, read_public_key},
    merkle::{Frontier, hex_hash},
    record::{GENESIS_PREV, Hash, Kind, ParsedLine, SCHEMA_VERSION, decode_hash, parse_line},
    segment::{
        Anchor, LineEnd, LineReader, SegmentFile, list_segments, quarantine_files, read_anchor,
    },
};

/// The file beside the segments that says where the writer's pass may start.
pub const RESUME_FILE: &str = "resume.json";

/// The scan state just before a durable checkpoint record, saved by the
/// writer after the checkpoint is fsynced. Not evidence: a start-up shortcut
/// that a scan re-checks against the checkpoint record itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Resume {
    pub v: u32,
    /// The checkpoint record's seq (= the records before it).
    pub seq: u64,
    /// Hash of the record before the checkpoint.
    #[serde(with = "hex_hash")]
    pub prev: Hash,
    /// Merkle frontier of the records before the checkpoint.
    pub frontier: Frontier,
    /// The key that signed the checkpoint (hex).
    pub key: String,
    /// Every segment up to the checkpoint's; the last one's `valid_len` is the
    /// checkpoint line's offset.
    pub segments: Vec<SegmentState>,
}

impl Resume {
    pub const VERSION: u32 = 1;

    /// The state the scan continues from, the segments before the
    /// checkpoint's, and the checkpoint's segment (up to the checkpoint line).
    /// `None` when the saved state does not fit the files.
    fn apply(&self, files: &[SegmentFile]) -> Option<(ScanState, SegmentState, usize)> {
        let fits = self.v == Self::VERSION
            && self.frontier.is_well_formed()
            && self.frontier.size() == self.seq
            && files.len() >= self.segments.len()
            && files.first().is_some_and(|f| f.first_seq == 0)
            && self
                .segments
                .iter()
                .zip(files)
                .all(|(s, f)| s.file == *f && s.frontier_at_start.is_well_formed());
        if !fits {
            return None;
        }
        let mut segments = self.segments.clone();
        let current = segments.pop()?;
        if current.file.first_seq + current.records != self.seq {
            return None;
        }
        let st = ScanState::at(
            segments,
            self.seq,
            self.prev,
            self.frontier.clone(),
            vec![self.key.clone()],
        );
        Some((st, current, self.segments.len() - 1))
    }
}

/// What a successful verification found.
#[derive(Debug, Clone)]
pub struct VerifyReport {
    /// Seq of the first record present (0 unless retention deleted older segments).
    pub first_seq: u64,
    /// Tree size: seqs `0..size` are covered (`size - first_seq` records present).
    pub size: u64,
    pub segments: usize,
    /// Merkle root over all records (hex).
    pub root: String,
    /// Hash of the last record (hex).
    pub head: String,
    /// Checkpoint records found in the log.
    pub checkpoints: u64,
    /// The log's signing keys in order of use (hex).
    pub keys: Vec<String>,
    /// Older checkpoints given by the caller that were checked.
    pub older_checked: usize,
    /// Older checkpoints that predate the retained data (cannot be compared).
    pub older_predating_retention: usize,
    /// Quarantined torn tails kept in `quarantine/`.
    pub quarantined: Vec<PathBuf>,
}

/// Where verification stopped and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct VerifyFailure {
    pub segment: Option<PathBuf>,
    /// The seq of the broken record (the seq expected at that position).
    pub seq: Option<u64>,
    /// Byte offset of the broken line in `segment`.
    pub offset: Option<u64>,
    pub what: Broken,
}

/// What failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Broken {
    Io(String),
    /// The line has no `\n`: torn by a crash or truncated.
    TornLine,
    /// Not a well-formed v1 record.
    Malformed(String),
    /// The record at this position carries another seq: a record was deleted,
    /// inserted or moved.
    SeqMismatch {
        found: u64,
    },
    /// A segment's name says it starts at another seq: records are missing.
    SegmentStart {
        found: u64,
    },
    /// `prev` is not the previous record's hash.
    ChainLink,
    /// The stored hash is not the hash of the record's contents.
    Hash,
    /// A checkpoint record does not match the log before it.
    Checkpoint(String),
    Signature(String),
    KeyRotation(String),
    /// A key the log never used.
    UnknownKey(String),
    /// An older checkpoint covers more records than the log has.
    MissingTail {
        checkpoint_size: u64,
        log_size: u64,
    },
    /// The log at an older checkpoint's size is not the log it signed.
    Inconsistent(String),
    /// The log starts after seq 0 without a valid retention anchor.
    Anchor(String),
    /// A session recording does not match its chunk records.
    Recording {
        file: String,
        what: String,
    },
}

impl fmt::Display for Broken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Broken::Io(e) => write!(f, "cannot read: {e}"),
            Broken::TornLine => {
                f.write_str("torn line: the segment ends mid-record (crash or truncation)")
            }
            Broken::Malformed(e) => write!(f, "malformed record: {e}"),
            Broken::SeqMismatch { found } => {
                write!(
                    f,
                    "chain broken: this position holds seq {found} (a record was deleted, inserted or moved)"
                )
            }
            Broken::SegmentStart { found } => write!(
                f,
                "segment starts at seq {found}: records before it are missing"
            ),
            Broken::ChainLink => {
                f.write_str("chain link broken: prev is not the previous record's hash")
            }
            Broken::Hash => f.write_str("hash mismatch: the record's contents were changed"),
            Broken::Checkpoint(e) => write!(f, "checkpoint record wrong: {e}"),
            Broken::Signature(e) => write!(f, "signature: {e}"),
            Broken::KeyRotation(e) => write!(f, "key rotation: {e}"),
            Broken::UnknownKey(e) => write!(f, "unknown key: {e}"),
            Broken::MissingTail {
                checkpoint_size,
                log_size,
            } => write!(
                f,
                "missing tail: a checkpoint covers {checkpoint_size} records but the log has only {log_size}"
            ),
            Broken::Inconsistent(e) => write!(f, "inconsistent with the older checkpoint: {e}"),
            Broken::Anchor(e) => write!(f, "retention anchor: {e}"),
            Broken::Recording { file, what } => write!(f, "recording {file}: {what}"),
        }
    }
}

impl fmt::Display for VerifyFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        if let Some(s) = &self.segment {
            write!(
                f,
                "segment {}",
                s.file_name()
                    .map_or_else(|| s.display().to_string(), |n| n.to_string_lossy().into())
            )?;
            sep = ", ";
        }
        if let Some(seq) = self.seq {
            write!(f, "{sep}seq {seq}")?;
            sep = ", ";
        }
        if let Some(o) = self.offset {
            write!(f, "{sep}byte offset {o}")?;
            sep = ", ";
        }
        if !sep.is_empty() {
            f.write_str(": ")?;
        }
        write!(f, "{}", self.what)
    }
}

/// A torn last line found by a scan that allows one.
#[derive(Debug, Clone)]
pub(crate) struct TornTail {
    pub segment: PathBuf,
    pub offset: u64,
}

/// A segment as the scan saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SegmentState {
    pub file: SegmentFile,
    /// Bytes of complete lines.
    pub valid_len: u64,
    pub records: u64,
    /// Frontier and prev before the segment's first record (for retention anchors).
    pub frontier_at_start: Frontier,
    #[serde(with = "hex_hash")]
    pub prev_at_start: Hash,
    pub first_time: Option<String>,
    pub last_time: Option<String>,
}

/// Everything a pass learns; the writer continues from it.
#[derive(Debug, Clone)]
pub(crate) struct ScanState {
    pub segments: Vec<SegmentState>,
    pub first_seq: u64,
    pub next_seq: u64,
    pub prev: Hash,
    pub frontier: Frontier,
    pub keys: Vec<String>,
    pub last_checkpoint: Option<Checkpoint>,
    pub checkpoints: u64,
    pub since_checkpoint: u64,
    pub torn_tail: Option<TornTail>,
    pub older_checked: usize,
    pub older_predating: usize,
}

impl ScanState {
    /// A pass about to read on from `next_seq`, nothing counted yet.
    fn at(
        segments: Vec<SegmentState>,
        next_seq: u64,
        prev: Hash,
        frontier: Frontier,
        keys: Vec<String>,
    ) -> Self {
        ScanState {
            segments,
            first_seq: 0,
            next_seq,
            prev,
            frontier,
            keys,
            last_checkpoint: None,
            checkpoints: 0,
            since_checkpoint: 0,
            torn_tail: None,
            older_checked: 0,
            older_predating: 0,
        }
    }

    pub fn current_key(&self) -> Option<&str> {
        self.keys.last().map(String::as_str)
    }
}

pub(crate) struct ScanOptions<'a> {
    /// Report a torn last line in `ScanState::torn_tail` instead of failing.
    pub allow_torn_tail: bool,
    pub older: &'a [Checkpoint],
    /// Start at this checkpoint instead of the beginning (no older
    /// checkpoints, no retention anchor). A saved state that does not fit the
    /// files fails the scan; the caller then scans in full.
    pub resume: Option<&'a Resume>,
}

/// Checks the log in `dir`; with `older_checkpoint`, also that the log is
/// consistent with the checkpoint(s) in that file (one JSON object, or one per line).
pub fn verify_dir(
    dir: &Path,
    older_checkpoint: Option<&Path>,
) -> Result<VerifyReport, VerifyFailure> {
    let older = match older_checkpoint {
        Some(p) => Checkpoint::read_file(p).map_err(|e| VerifyFailure {
            segment: None,
            seq: None,
            offset: None,
            what: Broken::Io(e),
        })?,
        None => Vec::new(),
    };
    let mut chunks = Vec::new();
    let st = scan(
        dir,
        &ScanOptions {
            allow_torn_tail: false,
            older: &older,
            resume: None,
        },
        |_, _, p, _| {
            if p.record.kind == Kind::RecordingChunk {
                chunks.push((p.record.seq, p.record.result.clone()));
            }
        },
    )?;
    check_recordings(dir, chunks)?;
    Ok(VerifyReport {
        first_seq: st.first_seq,
        size: st.next_seq,
        segments: st.segments.len(),
        root: hex::encode(st.frontier.root()),
        head: hex::encode(st.prev),
        checkpoints: st.checkpoints,
        keys: st.keys,
        older_checked: st.older_checked,
        older_predating_retention: st.older_predating,
        quarantined: quarantine_files(dir),
    })
}

/// Every session recording against its `recording.chunk` records (in the
/// verified chain): a changed, cut or extended recording fails, named.
fn check_recordings(dir: &Path, chunks: Vec<(u64, Option<Value>)>) -> Result<(), VerifyFailure> {
    let mut parsed = Vec::with_capacity(chunks.len());
    for (seq, v) in chunks {
        let c = v
            .and_then(|v| serde_json::from_value::<ChunkRecord>(v).ok())
            .ok_or_else(|| {
                fail(
                    None,
                    Some(seq),
                    None,
                    Broken::Malformed("a recording.chunk record without its chunk".into()),
                )
            })?;
        parsed.push((
            seq,
            crate::recording::Chunk {
                file: c.file,
                index: c.index,
                offset: c.offset,
                len: c.len,
                blake3: c.blake3,
                last: c.last,
            },
        ));
    }
    crate::recording::verify_chunks(dir, &parsed).map_err(|m| {
        fail(
            None,
            Some(m.seq),
            None,
            Broken::Recording {
                file: m.file,
                what: m.what,
            },
        )
    })
}

#[derive(serde::Deserialize)]
struct ChunkRecord {
    file: String,
    index: u32,
    offset: u64,
    len: u64,
    blake3: String,
    #[serde(rename = "final")]
    last: bool,
}

fn fail(
    segment: Option<&Path>,
    seq: Option<u64>,
    offset: Option<u64>,
    what: Broken,
) -> VerifyFailure {
    VerifyFailure {
        segment: segment.map(Path::to_path_buf),
        seq,
        offset,
        what,
    }
}

/// The streaming pass. `visit` sees every verified record with its segment,
/// offset and raw line (without `\n`).
// One streaming pass in the order of the module doc; the per-record and
// end-of-log checks are already split out, the rest is the loop itself.
#[allow(clippy::too_many_lines)]
pub(crate) fn scan(
    dir: &Path,
    opts: &ScanOptions<'_>,
    mut visit: impl FnMut(&Path, u64, &ParsedLine, &[u8]),
) -> Result<ScanState, VerifyFailure> {
    let io = |e: std::io::Error| fail(Some(dir), None, None, Broken::Io(e.to_string()));
    // Older checkpoints: signatures first (they are the examiner's evidence).
    let mut older: Vec<&Checkpoint> = opts.older.iter().collect();
    older.sort_by_key(|c| c.size);
    for cp in &older {
        cp.verify_signature().map_err(|e| {
            fail(
                None,
                None,
                None,
                Broken::Signature(format!("older checkpoint of size {}: {e}", cp.size)),
            )
        })?;
    }
    let files = list_segments(dir).map_err(io)?;
    let anchor = read_anchor(dir).map_err(io)?;
    let mut st = ScanState::at(
        Vec::with_capacity(files.len()),
        0,
        GENESIS_PREV,
        Frontier::default(),
        Vec::new(),
    );
    let mut anchor_vouched = true;
    let mut resumed = None;
    if let Some(r) = opts.resume {
        let unfit = || {
            fail(
                Some(dir),
                Some(r.seq),
                None,
                Broken::Malformed("the saved resume point does not fit the log".into()),
            )
        };
        if anchor.is_some() || !older.is_empty() {
            return Err(unfit());
        }
        let (state, seg, index) = r.apply(&files).ok_or_else(unfit)?;
        st = state;
        resumed = Some((seg, index));
    }
    if let Some(first) = files.first().filter(|_| resumed.is_none())
        && first.first_seq != 0
    {
        let Some(a) = anchor.as_ref().filter(|a| a.first_seq == first.first_seq) else {
            return Err(fail(
                Some(&first.path),
                Some(0),
                Some(0),
                Broken::Anchor(format!(
                    "the log starts at seq {} and no anchor.json vouches for the deleted records",
                    first.first_seq
                )),
            ));
        };
        apply_anchor(&mut st, a)
            .map_err(|e| fail(Some(&first.path), Some(first.first_seq), Some(0), e))?;
        anchor_vouched = false;
    }
    let mut older_iter = older.iter().peekable();
    while let Some(cp) = older_iter.next_if(|c| c.size < st.next_seq) {
        let _ = cp;
        st.older_predating += 1;
    }

    let mut buf = Vec::with_capacity(4096);
    let last_index = files.len().saturating_sub(1);
    let start = resumed.as_ref().map_or(0, |(_, i)| *i);
    // A resumed pass must begin with the checkpoint record it was saved at.
    let mut expect_checkpoint = resumed.is_some();
    for (i, file) in files.iter().enumerate().skip(start) {
        let seg_path = file.path.as_path();
        let resumed_seg = resumed.take().map(|(seg, _)| seg);
        if resumed_seg.is_none() && file.first_seq != st.next_seq {
            return Err(fail(
                Some(seg_path),
                Some(st.next_seq),
                Some(0),
                Broken::SegmentStart {
                    found: file.first_seq,
                },
            ));
        }
        let mut seg = resumed_seg.unwrap_or_else(|| SegmentState {
            file: file.clone(),
            valid_len: 0,
            records: 0,
            frontier_at_start: st.frontier.clone(),
            prev_at_start: st.prev,
            first_time: None,
            last_time: None,
        });
        let mut reader = LineReader::open(seg_path, seg.valid_len).map_err(|e| {
            fail(
                Some(seg_path),
                Some(st.next_seq),
                Some(0),
                Broken::Io(e.to_string()),
            )
        })?;
        loop {
            let seq = st.next_seq;
            let here = |off: u64, what: Broken| fail(Some(seg_path), Some(seq), Some(off), what);
            let Some((offset, end)) = reader
                .next_line(&mut buf)
                .map_err(|e| here(reader.offset(), Broken::Io(e.to_string())))?
            else {
                break;
            };
            match end {
                LineEnd::Complete => {}
                LineEnd::Torn if opts.allow_torn_tail && i == last_index => {
                    st.torn_tail = Some(TornTail {
                        segment: file.path.clone(),
                        offset,
                    });
                    break;
                }
                LineEnd::Torn => return Err(here(offset, Broken::TornLine)),
                LineEnd::TooLong => {
                    return Err(here(
                        offset,
                        Broken::Malformed("line longer than the limit".into()),
                    ));
                }
            }
            // Older checkpoints at this size: compare before adding the record.
            check_older(&mut st, &mut older_iter, Some(seg_path), offset)?;
            let p = parse_line(&buf).map_err(|e| here(offset, Broken::Malformed(e)))?;
            if expect_checkpoint {
                if p.record.kind != Kind::Checkpoint {
                    return Err(here(
                        offset,
                        Broken::Malformed("the resume point is not a checkpoint record".into()),
                    ));
                }
                expect_checkpoint = false;
            }
            check_record(&mut st, &p, anchor.as_ref(), &mut anchor_vouched)
                .map_err(|e| here(offset, e))?;
            visit(seg_path, offset, &p, &buf);
            st.frontier.push(&p.hash);
            st.prev = p.hash;
            st.next_seq += 1;
            seg.records += 1;
            seg.valid_len = reader.offset();
            if seg.first_time.is_none() {
                seg.first_time = Some(p.record.time.clone());
            }
            seg.last_time = Some(p.record.time);
        }
        st.segments.push(seg);
    }
    if expect_checkpoint || resumed.is_some() {
        return Err(fail(
            Some(dir),
            Some(st.next_seq),
            None,
            Broken::Malformed("no checkpoint record at the resume point".into()),
        ));
    }
    finish(dir, &mut st, &mut older_iter, &older, anchor_vouched)?;
    Ok(st)
}

/// The checks that need the whole log: older checkpoints beyond its end, their
/// keys, the retention anchor, the exported public key.
fn finish<'a, I: Iterator<Item = &'a &'a Checkpoint>>(
    dir: &Path,
    st: &mut ScanState,
    older_iter: &mut std::iter::Peekable<I>,
    older: &[&Checkpoint],
    anchor_vouched: bool,
) -> Result<(), VerifyFailure> {
    let last = st
        .segments
        .last()
        .map(|s| (s.file.path.clone(), s.valid_len));
    let end_path = last.as_ref().map(|(p, _)| p.as_path());
    let end_off = last.as_ref().map(|(_, l)| *l);
    check_older(st, older_iter, end_path, end_off.unwrap_or(0))?;
    if let Some(cp) = older_iter.next() {
        return Err(fail(
            end_path,
            Some(st.next_seq),
            end_off,
            Broken::MissingTail {
                checkpoint_size: cp.size,
                log_size: st.next_seq,
            },
        ));
    }
    for cp in older {
        if cp.size >= st.first_seq && !st.keys.is_empty() && !st.keys.contains(&cp.key) {
            return Err(fail(
                None,
                None,
                None,
                Broken::UnknownKey(format!(
                    "older checkpoint of size {} is signed by {} which this log never used",
                    cp.size, cp.key
                )),
            ));
        }
    }
    if !anchor_vouched {
        return Err(fail(
            end_path,
            None,
            None,
            Broken::Anchor("no retention record in the log matches anchor.json".into()),
        ));
    }
    if let Some(pub_key) = read_public_key(dir)
        && !st.keys.is_empty()
        && !st.keys.contains(&pub_key)
    {
        return Err(fail(
            None,
            None,
            None,
            Broken::UnknownKey(format!(
                "the exported public key {pub_key} never signed this log"
            )),
        ));
    }
    Ok(())
}

/// The checks on one parsed record, in order: version, seq, chain link, hash,
/// then what its kind means.
fn check_record(
    st: &mut ScanState,
    p: &ParsedLine,
    anchor: Option<&Anchor>,
    anchor_vouched: &mut bool,
) -> Result<(), Broken> {
    if p.record.v != SCHEMA_VERSION {
        return Err(Broken::Malformed(format!(
            "unknown schema version {}",
            p.record.v
        )));
    }
    if p.record.seq != st.next_seq {
        return Err(Broken::SeqMismatch {
            found: p.record.seq,
        });
    }
    if p.prev != st.prev {
        return Err(Broken::ChainLink);
    }
    if p.computed != p.hash {
        return Err(Broken::Hash);
    }
    match p.record.kind {
        Kind::Checkpoint => {
            check_checkpoint_record(st, p)?;
            st.since_checkpoint = 0;
            return Ok(());
        }
        Kind::KeyRotation => check_rotation_record(st, p)?,
        Kind::Retention if anchor.is_some() && retention_anchor(p).as_ref() == anchor => {
            *anchor_vouched = true;
        }
        _ => {}
    }
    st.since_checkpoint += 1;
    Ok(())
}

fn apply_anchor(st: &mut ScanState, a: &Anchor) -> Result<(), Broken> {
    if !a.frontier.is_well_formed() || a.frontier.size() != a.first_seq {
        return Err(Broken::Anchor(
            "the anchor's Merkle frontier does not match its seq".into(),
        ));
    }
    st.prev = decode_hash(&a.prev).ok_or_else(|| Broken::Anchor("prev is not a hash".into()))?;
    st.frontier = a.frontier.clone();
    st.first_seq = a.first_seq;
    st.next_seq = a.first_seq;
    Ok(())
}

fn retention_anchor(p: &ParsedLine) -> Option<Anchor> {
    let v = p.record.result.as_ref()?.get("anchor")?;
    serde_json::from_value(v.clone()).ok()
}

fn check_older<'a, I: Iterator<Item = &'a &'a Checkpoint>>(
    st: &mut ScanState,
    older: &mut std::iter::Peekable<I>,
    segment: Option<&Path>,
    offset: u64,
) -> Result<(), VerifyFailure> {
    while let Some(cp) = older.next_if(|c| c.size == st.next_seq) {
        let root = hex::encode(st.frontier.root());
        let head = hex::encode(st.prev);
        if cp.root != root || cp.head != head {
            let what = if cp.head == head {
                "same last record but a different Merkle root: earlier records were changed"
                    .to_string()
            } else {
                format!(
                    "the log's records 0..{} are not the ones it signed (root {} vs {})",
                    cp.size,
                    short(&root),
                    short(&cp.root)
                )
            };
            return Err(fail(
                segment,
                Some(cp.size.saturating_sub(1)),
                Some(offset),
                Broken::Inconsistent(what),
            ));
        }
        st.older_checked += 1;
    }
    Ok(())
}

fn short(h: &str) -> &str {
    &h[..h.len().min(16)]
}

fn check_checkpoint_record(st: &mut ScanState, p: &ParsedLine) -> Result<(), Broken> {
    let cp: Checkpoint = p
        .record
        .result
        .clone()
        .ok_or_else(|| Broken::Checkpoint("no checkpoint in result".into()))
        .and_then(|v| {
            serde_json::from_value(v).map_err(|e| Broken::Checkpoint(format!("result: {e}")))
        })?;
    if cp.size != p.record.seq {
        return Err(Broken::Checkpoint(format!(
            "covers {} records, expected {}",
            cp.size, p.record.seq
        )));
    }
    if cp.root != hex::encode(st.frontier.root()) {
        return Err(Broken::Checkpoint(
            "Merkle root differs from the records before it".into(),
        ));
    }
    if cp.head != hex::encode(st.prev) {
        return Err(Broken::Checkpoint(
            "head differs from the previous record's hash".into(),
        ));
    }
    cp.verify_signature().map_err(Broken::Signature)?;
    match st.current_key() {
        None => st.keys.push(cp.key.clone()),
        Some(k) if k == cp.key => {}
        Some(k) => {
            return Err(Broken::Signature(format!(
                "signed by {} but the log's key is {k}",
                cp.key
            )));
        }
    }
    st.checkpoints += 1;
    st.last_checkpoint = Some(cp);
    Ok(())
}

fn check_rotation_record(st: &mut ScanState, p: &ParsedLine) -> Result<(), Broken> {
    let r: KeyRotation = p
        .record
        .result
        .clone()
        .ok_or_else(|| Broken::KeyRotation("no rotation in result".into()))
        .and_then(|v| {
            serde_json::from_value(v).map_err(|e| Broken::KeyRotation(format!("result: {e}")))
        })?;
    r.verify().map_err(Broken::KeyRotation)?;
    match st.current_key() {
        Some(k) if k != r.old_key => {
            return Err(Broken::KeyRotation(format!(
                "hands over from {} but the log's key is {k}",
                r.old_key
            )));
        }
        None => st.keys.push(r.old_key.clone()),
        Some(_) => {}
    }
    st.keys.push(r.new_key);
    Ok(())
}

/// Reads every parseable record in seq order without verifying (for `tail`,
/// `export`): stops at the first line that does not parse.
pub fn read_records(
    dir: &Path,
    mut f: impl FnMut(&Path, u64, &ParsedLine, &[u8]) -> bool,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    for seg in list_segments(dir)? {
        let mut r = LineReader::open(&seg.path, 0)?;
        while let Some((off, end)) = r.next_line(&mut buf)? {
            if end != LineEnd::Complete {
                return Ok(());
            }
            let Ok(p) = parse_line(&buf) else {
                return Ok(());
            };
            if !f(&seg.path, off, &p, &buf) {
                return Ok(());
            }
        }
    }
    Ok(())
}
