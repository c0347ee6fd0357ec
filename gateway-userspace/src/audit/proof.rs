//! Inclusion proofs a third party can check without the log: the record line,
//! its audit path, and the signed checkpoint whose root the path leads to.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{
    AuditError,
    checkpoint::Checkpoint,
    merkle,
    paths::PathCollector,
    record::{Hash, Kind, decode_hash, parse_line},
    segment::read_anchor,
    verify::{ScanOptions, scan},
};

/// `agentgate audit prove --seq N` output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InclusionProof {
    pub v: u32,
    pub seq: u64,
    /// The record's line exactly as stored (without the newline).
    pub record: String,
    /// Audit path from the record's leaf to `checkpoint.root` (hex, leaf side first).
    pub path: Vec<String>,
    /// The signed checkpoint the proof is against (the newest in the log covering `seq`).
    pub checkpoint: Checkpoint,
}

/// Builds an inclusion proof for `seq` against the newest checkpoint in the
/// log that covers it. The log is verified on the way; memory stays
/// O(log n) (see `paths`), and a log whose oldest segments retention deleted
/// is proven from its anchor.
pub fn prove_inclusion(dir: &Path, seq: u64) -> Result<InclusionProof, AuditError> {
    let mut paths: Option<PathCollector> = None;
    let mut line: Option<String> = None;
    let mut anchor_err = None;
    let st = scan(
        dir,
        &ScanOptions {
            allow_torn_tail: false,
            older: &[],
            resume: None,
        },
        |_, _, p, raw| {
            let c = paths.get_or_insert_with(|| {
                if p.record.seq == 0 {
                    return PathCollector::default();
                }
                // The scan vouched for the anchor before this first record.
                match read_anchor(dir) {
                    Ok(Some(a)) => PathCollector::starting_at(&a.frontier),
                    other => {
                        anchor_err = Some(format!("{other:?}"));
                        PathCollector::default()
                    }
                }
            });
            if p.record.kind == Kind::Checkpoint
                && let Some(cp) = p
                    .record
                    .result
                    .clone()
                    .and_then(|v| serde_json::from_value::<Checkpoint>(v).ok())
            {
                c.checkpoint(cp);
            }
            if p.record.seq == seq {
                c.cite_next();
                line = Some(String::from_utf8_lossy(raw).into_owned());
            }
            c.push(&p.hash);
        },
    )
    .map_err(|f| AuditError::Tampered {
        dir: dir.to_path_buf(),
        failure: Box::new(f),
    })?;
    if let Some(e) = anchor_err {
        return Err(AuditError::Unprovable {
            seq,
            reason: format!("cannot read the retention anchor: {e}"),
        });
    }
    let (Some(record), Some(paths)) = (line, paths) else {
        return Err(AuditError::Unprovable {
            seq,
            reason: if seq < st.first_seq {
                format!("retention deleted seqs before {}", st.first_seq)
            } else {
                format!("the log has {} records", st.next_seq)
            },
        });
    };
    paths
        .proof(seq, record)
        .map_err(|reason| AuditError::Unprovable { seq, reason })
}

/// Checks a proof: the record's own hash, the path to the checkpoint root, the
/// checkpoint's signature, and (if given) that the signer is `trusted_key` (hex).
pub fn verify_inclusion_proof(p: &InclusionProof, trusted_key: Option<&str>) -> Result<(), String> {
    if p.v != 1 {
        return Err(format!("unknown proof version {}", p.v));
    }
    let parsed = parse_line(p.record.as_bytes()).map_err(|e| format!("record: {e}"))?;
    if parsed.computed != parsed.hash {
        return Err("record: hash does not match its contents".into());
    }
    if parsed.record.seq != p.seq {
        return Err(format!(
            "record holds seq {}, the proof claims {}",
            parsed.record.seq, p.seq
        ));
    }
    p.checkpoint
        .verify_signature()
        .map_err(|e| format!("checkpoint: {e}"))?;
    if let Some(k) = trusted_key
        && k != p.checkpoint.key
    {
        return Err(format!(
            "checkpoint signed by {}, not the trusted key {k}",
            p.checkpoint.key
        ));
    }
    let root = decode_hash(&p.checkpoint.root).ok_or("checkpoint root is not a hash")?;
    let path: Vec<Hash> = p
        .path
        .iter()
        .map(|h| decode_hash(h).ok_or_else(|| format!("path element {h:?} is not a hash")))
        .collect::<Result<_, _>>()?;
    if merkle::verify_inclusion(
        p.seq,
        p.checkpoint.size,
        &merkle::leaf_hash(&parsed.hash),
        &path,
        &root,
    ) {
        Ok(())
    } else {
        Err(format!(
            "the path does not lead from seq {} to the checkpoint root",
            p.seq
        ))
    }
}
