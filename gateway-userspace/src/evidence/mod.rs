//! The examiner's evidence package: `index.html`, `evidence.json` and
//! `records.jsonl` for some identities and a period, built from the audit log.
//!
//! Two streaming passes. The first is the verifier's own pass (`audit::scan`):
//! every record it vouches for goes to the report model ([`model::Collector`]);
//! where it stops, the report says so at the top and counts what follows
//! without itemizing it (fails closed: nothing unverified is presented as
//! evidence, nothing unreadable is skipped silently). The second pass reads
//! only stored hashes to build the inclusion proofs of the records the report
//! cites (`audit::paths`, shared with `audit prove`), each checked before it
//! is written.
//!
//! Memory bound, independent of the log's size: the model keeps at most
//! [`model::LIST_CAP`] entries per list and [`model::KEY_CAP`] identities,
//! workloads and resources, texts clipped to [`model::TEXT_CAP`] characters,
//! and up to [`model::OPEN_CAP`] open sessions, bindings and pending approvals
//! (about 60 MB with every cap reached); proofs keep about 48 hashes for each
//! of at most [`MAX_CITED`] cited records (about 60 MB at worst), whose lines
//! wait in a spill file in the output directory, not in memory. So about
//! 150 MB in the worst case; 14 to 20 MB measured (1 and 50 identities,
//! `cargo xtask bench evidence`). The trade-off: the log is read twice.

pub mod html;
pub mod model;
pub mod model_channel;
pub mod policy;
pub mod ssh_sessions;

use std::{
    collections::BTreeSet,
    fs::File,
    io::{BufWriter, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
};

use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::audit::{
    Checkpoint, Kind, LineEnd, LineReader, PathCollector, ScanOptions, format_time, list_segments,
    parse_line, quarantine_files, read_anchor, scan, split_line,
};
use model::{AfterBreak, Collector, Failure, OlderCheckpoints, Scope, Unproven};
pub use model::{Report, SCHEMA};

/// Most records `records.jsonl` holds; further citations are counted.
pub const MAX_CITED: usize = 20_000;
/// Most identities one report covers.
pub const MAX_IDENTITIES: usize = 50;

/// What to build.
#[derive(Debug, Clone)]
pub struct Options {
    pub dir: PathBuf,
    pub identities: Vec<String>,
    pub from: OffsetDateTime,
    pub to: OffsetDateTime,
    pub out: PathBuf,
    /// Older exported checkpoint(s) the log must be consistent with.
    pub checkpoint: Option<PathBuf>,
    /// The daemon's policy archive (`<state_dir>/policies`), for the rules
    /// of each policy version; without it versions are listed by digest only.
    pub policy_archive: Option<PathBuf>,
}

/// What was built.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The log verified (and matched `--checkpoint`).
    pub intact: bool,
    /// The first record not intact, in one sentence (when not intact).
    pub failure: Option<String>,
    pub records_read: u64,
    pub cited: usize,
    pub proven: usize,
    pub index_html: PathBuf,
    pub evidence_json: PathBuf,
    pub records_jsonl: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum EvidenceError {
    #[error("{0}")]
    Usage(String),
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> EvidenceError {
    let path = path.to_path_buf();
    move |source| EvidenceError::Io { op, path, source }
}

/// Builds the package in `opts.out`. `progress(done, total)` is called with
/// bytes of the log read, every few thousand records.
#[allow(clippy::too_many_lines)] // the steps in the module doc's order
pub fn build(opts: &Options, progress: &mut dyn FnMut(u64, u64)) -> Result<Outcome, EvidenceError> {
    if opts.identities.is_empty() || opts.identities.len() > MAX_IDENTITIES {
        return Err(EvidenceError::Usage(format!(
            "give 1 to {MAX_IDENTITIES} identities"
        )));
    }
    if opts.from >= opts.to {
        return Err(EvidenceError::Usage("--from must be before --to".into()));
    }
    std::fs::create_dir_all(&opts.out).map_err(io("creating", &opts.out))?;
    let older = match &opts.checkpoint {
        Some(p) => Checkpoint::read_file(p).map_err(|e| {
            EvidenceError::Usage(format!("{}: not a checkpoint file: {e}", p.display()))
        })?,
        None => Vec::new(),
    };
    let segments = list_segments(&opts.dir).map_err(io("listing", &opts.dir))?;
    let mut starts = Vec::with_capacity(segments.len());
    let mut total = 0u64;
    for s in &segments {
        starts.push((s.path.clone(), total));
        total += std::fs::metadata(&s.path).map_or(0, |m| m.len());
    }
    let scope = Scope {
        identities: opts.identities.clone(),
        from: format_time(opts.from),
        to: format_time(opts.to),
    };
    let mut collector = Collector::new(scope.clone());

    // Pass 1: verify and collect.
    let mut read = 0u64;
    let mut next_seq = None::<u64>;
    let mut newest: Option<Checkpoint> = None;
    let mut seg_index = 0usize;
    let mut first = None::<model::Cite>;
    let result = scan(
        &opts.dir,
        &ScanOptions {
            allow_torn_tail: false,
            older: &older,
            resume: None,
        },
        |seg, off, p, raw| {
            read += 1;
            next_seq = Some(p.record.seq + 1);
            if first.is_none() {
                first = Some(model::Cite {
                    seq: p.record.seq,
                    hash: hex::encode(p.hash),
                    kind: p.record.kind.as_str(),
                    time: p.record.time.clone(),
                });
            }
            if p.record.kind == Kind::Checkpoint
                && let Some(cp) = p
                    .record
                    .result
                    .clone()
                    .and_then(|v| serde_json::from_value::<Checkpoint>(v).ok())
            {
                newest = Some(cp);
            }
            collector.observe(p.record.seq, &hex::encode(p.hash), &p.record);
            if read.is_multiple_of(8192) {
                while seg_index + 1 < starts.len() && starts[seg_index].0 != seg {
                    seg_index += 1;
                }
                let base = starts.get(seg_index).map_or(0, |s| s.1);
                progress(base + off + raw.len() as u64 + 1, total);
            }
        },
    );
    progress(total, total);
    if let Some(f) = first.filter(|f| f.seq > 0) {
        collector.retained_from(f);
    }
    let intact = result.is_ok();
    let failure_line;
    match result {
        Ok(st) => {
            failure_line = None;
            collector.set_integrity(|i| {
                i.intact = true;
                i.first_seq = st.first_seq;
                i.verified_to = st.next_seq;
                i.segments = st.segments.len();
                i.checkpoints = st.checkpoints;
                i.root = Some(hex::encode(st.frontier.root()));
                i.head = Some(hex::encode(st.prev));
                i.keys.clone_from(&st.keys);
                i.older_checkpoints = opts.checkpoint.as_ref().map(|p| OlderCheckpoints {
                    file: p.display().to_string(),
                    consistent: true,
                    checked: st.older_checked,
                    predating_retention: st.older_predating,
                });
            });
        }
        Err(f) => {
            let segment = f
                .segment
                .as_ref()
                .and_then(|s| s.file_name())
                .map(|n| n.to_string_lossy().into_owned());
            let summary = match f.seq {
                Some(seq) => format!(
                    "The log is NOT intact: the first record not intact is seq {seq}{}{}: {}",
                    segment
                        .as_deref()
                        .map(|s| format!(" in {s}"))
                        .unwrap_or_default(),
                    f.offset
                        .map(|o| format!(" at byte {o}"))
                        .unwrap_or_default(),
                    f.what
                ),
                None => format!("The log is NOT intact: {f}"),
            };
            let after = match (&f.segment, f.offset) {
                (Some(seg), Some(off)) if seg.is_file() => {
                    Some(count_after_break(&segments, seg, off, &opts.identities))
                }
                _ => None,
            };
            let inconsistent = matches!(
                f.what,
                crate::audit::Broken::Inconsistent(_) | crate::audit::Broken::MissingTail { .. }
            );
            failure_line = Some(summary.clone());
            collector.set_integrity(|i| {
                i.intact = false;
                i.failure = Some(Failure {
                    segment,
                    seq: f.seq,
                    offset: f.offset,
                    what: f.what.to_string(),
                    summary,
                });
                i.first_seq = segments.first().map_or(0, |s| s.first_seq);
                i.verified_to = next_seq.unwrap_or(0);
                i.segments = segments.len();
                i.after_break = after;
                i.older_checkpoints = opts.checkpoint.as_ref().map(|p| OlderCheckpoints {
                    file: p.display().to_string(),
                    consistent: !inconsistent,
                    checked: 0,
                    predating_retention: 0,
                });
            });
        }
    }
    collector.set_integrity(|i| {
        i.newest_checkpoint = newest.as_ref().map(|c| model::CheckpointRef {
            size: c.size,
            root: c.root.clone(),
            time: c.time.clone(),
            key: c.key.clone(),
            origin: c.origin.clone(),
        });
        i.quarantined = quarantine_files(&opts.dir)
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        if !intact {
            i.checkpoints = 0;
        }
    });
    let versions = collector.take_policy();
    let mut report = collector.finish(crate::audit::now_rfc3339(), opts.dir.display().to_string());
    let archive = opts
        .policy_archive
        .as_ref()
        .map(crate::policy::PolicyArchive::new);
    policy::apply(&mut report, versions.finish(archive.as_ref()));
    report.ssh_sessions.attach_transcripts(&opts.dir);

    // Pass 2: proofs of what the report cites.
    let mut cited = BTreeSet::new();
    collect_cites(
        &serde_json::to_value(&report).unwrap_or(Value::Null),
        &mut cited,
    );
    let omitted = cited.len().saturating_sub(MAX_CITED);
    let cited: BTreeSet<u64> = cited.into_iter().take(MAX_CITED).collect();
    report.citations_omitted = omitted as u64;
    let records_jsonl = opts.out.join("records.jsonl");
    let (proven, unproven) = write_records(
        &opts.dir,
        &segments,
        &cited,
        newest.as_ref(),
        &opts.out,
        &records_jsonl,
    )?;
    report.unproven = unproven;

    let evidence_json = opts.out.join("evidence.json");
    let json = serde_json::to_vec_pretty(&report).map_err(|e| EvidenceError::Io {
        op: "encoding",
        path: evidence_json.clone(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(&evidence_json, json).map_err(io("writing", &evidence_json))?;
    let index_html = opts.out.join("index.html");
    std::fs::write(&index_html, html::render(&report)).map_err(io("writing", &index_html))?;
    Ok(Outcome {
        intact: intact
            && report
                .integrity
                .older_checkpoints
                .as_ref()
                .is_none_or(|o| o.consistent),
        failure: failure_line,
        records_read: read,
        cited: cited.len(),
        proven,
        index_html,
        evidence_json,
        records_jsonl,
    })
}

/// Seqs of every citation in the report (objects with `seq`, `hash`, `kind`, `time`).
fn collect_cites(v: &Value, out: &mut BTreeSet<u64>) {
    match v {
        Value::Object(m) => {
            if let (Some(seq), Some(Value::String(_)), Some(_), Some(_)) = (
                m.get("seq").and_then(Value::as_u64),
                m.get("hash"),
                m.get("kind"),
                m.get("time"),
            ) {
                out.insert(seq);
            }
            for x in m.values() {
                collect_cites(x, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| collect_cites(x, out)),
        _ => {}
    }
}

/// Lines after a break: counted, and those naming an identity in scope.
fn count_after_break(
    segments: &[crate::audit::SegmentFile],
    broken: &Path,
    offset: u64,
    identities: &[String],
) -> AfterBreak {
    let mut after = AfterBreak::default();
    let mut buf = Vec::new();
    let mut started = false;
    for s in segments {
        let from = if s.path == broken {
            started = true;
            offset
        } else if started {
            0
        } else {
            continue;
        };
        let Ok(mut r) = LineReader::open(&s.path, from) else {
            after.unreadable += 1;
            continue;
        };
        while let Ok(Some((_, end))) = r.next_line(&mut buf) {
            after.lines += 1;
            match (end, parse_line(&buf)) {
                (LineEnd::Complete, Ok(p)) => {
                    if p.record
                        .identity
                        .as_ref()
                        .is_some_and(|i| identities.iter().any(|id| model::names(&i.subject, id)))
                    {
                        after.in_scope += 1;
                    }
                }
                _ => after.unreadable += 1,
            }
        }
    }
    after
}

/// Pass 2: reads stored hashes up to the last cited record, builds each cited
/// record's proof against the newest checkpoint, checks it and writes
/// `records.jsonl` (one proof per line; a record without one says why).
#[allow(clippy::too_many_lines)] // one pass, then one write; splitting hides the order
fn write_records(
    dir: &Path,
    segments: &[crate::audit::SegmentFile],
    cited: &BTreeSet<u64>,
    newest: Option<&Checkpoint>,
    out_dir: &Path,
    path: &Path,
) -> Result<(usize, Vec<Unproven>), EvidenceError> {
    let spill_path = out_dir.join(".records.spill");
    let mut spill = File::options()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&spill_path)
        .map_err(io("creating", &spill_path))?;
    let mut spilled: Vec<(u64, u64, u64)> = Vec::with_capacity(cited.len()); // seq, offset, len
    let mut unproven = Vec::new();
    let first = segments.first().map_or(0, |s| s.first_seq);
    let anchor = if first > 0 {
        read_anchor(dir)
            .ok()
            .flatten()
            .filter(|a| a.first_seq == first)
    } else {
        None
    };
    let mut paths = match (&anchor, first) {
        (Some(a), _) => PathCollector::starting_at(&a.frontier),
        (None, 0) => PathCollector::default(),
        (None, _) => {
            for &seq in cited {
                unproven.push(Unproven {
                    seq,
                    reason: "the log starts after seq 0 without a retention anchor".into(),
                });
            }
            std::fs::write(path, b"").map_err(io("writing", path))?;
            let _ = std::fs::remove_file(&spill_path);
            return Ok((0, unproven));
        }
    };
    let last = cited.last().copied();
    let mut buf = Vec::new();
    let mut spill_len = 0u64;
    'segments: for s in segments {
        if last.is_none_or(|l| paths.size() > l) && newest.is_none_or(|c| paths.size() > c.size) {
            break;
        }
        let mut r = LineReader::open(&s.path, 0).map_err(io("reading", &s.path))?;
        while let Some((_, end)) = r.next_line(&mut buf).map_err(io("reading", &s.path))? {
            let seq = paths.size();
            let (LineEnd::Complete, Ok((_, hash))) = (end, split_line(&buf)) else {
                break 'segments;
            };
            if let Some(cp) = newest
                && cp.size == seq
            {
                paths.checkpoint(cp.clone());
            }
            if cited.contains(&seq) {
                paths.cite_next();
                spill.write_all(&buf).map_err(io("writing", &spill_path))?;
                spilled.push((seq, spill_len, buf.len() as u64));
                spill_len += buf.len() as u64;
            }
            paths.push(&hash);
            if last.is_none_or(|l| seq >= l) && newest.is_none_or(|c| seq >= c.size) {
                break 'segments;
            }
        }
    }
    let mut w = BufWriter::new(File::create(path).map_err(io("creating", path))?);
    let mut proven = 0;
    let mut line = Vec::new();
    for (seq, off, len) in &spilled {
        line.resize(*len as usize, 0);
        spill
            .seek(SeekFrom::Start(*off))
            .and_then(|_| spill.read_exact(&mut line))
            .map_err(io("reading", &spill_path))?;
        let record = String::from_utf8_lossy(&line).into_owned();
        let entry = match paths.proof(*seq, record.clone()) {
            Ok(p) => {
                proven += 1;
                serde_json::to_value(&p).unwrap_or(Value::Null)
            }
            Err(reason) => {
                unproven.push(Unproven {
                    seq: *seq,
                    reason: reason.clone(),
                });
                json!({"v": 1, "seq": seq, "record": record, "unproven": reason})
            }
        };
        serde_json::to_writer(&mut w, &entry)
            .map_err(std::io::Error::other)
            .and_then(|()| w.write_all(b"\n"))
            .map_err(io("writing", path))?;
    }
    let read_again: BTreeSet<u64> = spilled.iter().map(|(s, _, _)| *s).collect();
    for &seq in cited {
        if !read_again.contains(&seq) {
            unproven.push(Unproven {
                seq,
                reason: "the record could not be read again for its proof".into(),
            });
        }
    }
    w.flush().map_err(io("writing", path))?;
    drop(spill);
    let _ = std::fs::remove_file(&spill_path);
    Ok((proven, unproven))
}
