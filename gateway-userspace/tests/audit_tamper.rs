//! The tamper corpus: each change to a written log is detected, and the
//! verifier names the right record (segment, seq, byte offset).
// Tests read as scenarios: long bodies and short local names are clearer here.
#![allow(clippy::too_many_lines, clippy::many_single_char_names)]

mod audit_common;

use agentgate::audit::{AuditLog, Broken, Checkpoint, record_hash, split_line, verify_dir};
use audit_common::{
    TempLog, agentgate, edit_byte, flip_value_byte, line_of, lines, segment_lines, write_log,
    write_segment,
};

const N: u64 = 60;

async fn fresh() -> TempLog {
    let t = TempLog::new();
    write_log(t.cfg(), N).await;
    verify_dir(&t.dir, None).expect("a fresh log verifies");
    t
}

#[tokio::test]
async fn fresh_log_spans_segments_and_verifies() {
    let t = fresh().await;
    let r = verify_dir(&t.dir, None).unwrap();
    assert!(r.segments >= 3, "segments: {}", r.segments);
    assert!(r.checkpoints >= 6);
    assert_eq!(r.keys.len(), 1);
    let out = agentgate()
        .args(["audit", "verify", "--dir"])
        .arg(&t.dir)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test]
async fn flipped_byte_in_a_value_is_a_hash_mismatch_at_that_record() {
    let t = fresh().await;
    let target = flip_value_byte(&t.dir, 17);
    let f = verify_dir(&t.dir, None).unwrap_err();
    assert_eq!(f.what, Broken::Hash);
    assert_eq!(f.seq, Some(17));
    assert_eq!(f.offset, Some(target.offset));
    assert_eq!(f.segment.as_deref(), Some(target.segment.as_path()));

    let out = agentgate()
        .args(["audit", "verify", "--dir"])
        .arg(&t.dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("seq 17") && stdout.contains(&format!("byte offset {}", target.offset)),
        "{stdout}"
    );
}

#[tokio::test]
async fn flipped_structural_byte_is_malformed_at_that_record() {
    let t = fresh().await;
    let target = line_of(&t.dir, 23);
    let mut raw = std::fs::read(&target.segment).unwrap();
    raw[target.offset as usize] = b'['; // the opening brace
    std::fs::write(&target.segment, raw).unwrap();
    let f = verify_dir(&t.dir, None).unwrap_err();
    assert!(matches!(f.what, Broken::Malformed(_)), "{f}");
    assert_eq!((f.seq, f.offset), (Some(23), Some(target.offset)));
}

#[tokio::test]
async fn flipped_byte_in_the_prev_field_breaks_the_chain_link() {
    let t = fresh().await;
    edit_byte(&t.dir, 31, b"\"prev\":\"", 8, |b| {
        *b = if *b == b'0' { b'1' } else { b'0' };
    });
    let f = verify_dir(&t.dir, None).unwrap_err();
    assert_eq!(
        (f.what.clone(), f.seq),
        (Broken::ChainLink, Some(31)),
        "{f}"
    );
}

#[tokio::test]
async fn deleted_record_is_named() {
    let t = fresh().await;
    let target = line_of(&t.dir, 12);
    let mut seg: Vec<Vec<u8>> = segment_lines(&target.segment);
    seg.retain(|l| *l != target.bytes);
    write_segment(&target.segment, &seg);
    let f = verify_dir(&t.dir, None).unwrap_err();
    assert_eq!(f.what, Broken::SeqMismatch { found: 13 }, "{f}");
    assert_eq!((f.seq, f.offset), (Some(12), Some(target.offset)));
}

#[tokio::test]
async fn deleted_tail_is_caught_by_a_later_exported_checkpoint() {
    let t = TempLog::new();
    let cp_file = t.tmp.path().join("exported-checkpoints.jsonl");
    let mut cfg = t.cfg();
    cfg.checkpoint_file = Some(cp_file.clone());
    let log = AuditLog::open(cfg).await.unwrap();
    for i in 0..N {
        log.append(audit_common::statement(i)).await.unwrap();
    }
    let cp = log.checkpoint().await.unwrap();
    log.close().await.unwrap();
    // The file sink runs after the ack; wait for the exported checkpoint.
    for _ in 0..100 {
        if Checkpoint::read_file(&cp_file).is_ok_and(|v| v.iter().any(|c| c.size == cp.size)) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let exported = Checkpoint::read_file(&cp_file).unwrap();
    assert!(exported.contains(&cp), "the sink holds the checkpoint");

    // Cut everything from seq 40 on: whole segments and part of one.
    let all = lines(&t.dir);
    let cut = all.iter().find(|l| l.seq == 40).unwrap().clone();
    for l in &all {
        if l.segment > cut.segment {
            let _ = std::fs::remove_file(&l.segment);
        }
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&cut.segment)
        .unwrap();
    f.set_len(cut.offset).unwrap();
    // Alone, a clean cut at a line boundary looks like a shorter log.
    verify_dir(&t.dir, None).expect("without a checkpoint a clean tail cut is invisible");
    let f = verify_dir(&t.dir, Some(&cp_file)).unwrap_err();
    assert!(
        matches!(f.what, Broken::MissingTail { log_size: 40, .. }),
        "{f}"
    );
    assert_eq!(f.seq, Some(40));
    assert_eq!(f.segment.as_deref(), Some(cut.segment.as_path()));

    let out = agentgate()
        .args(["audit", "verify", "--dir"])
        .arg(&t.dir)
        .arg("--checkpoint")
        .arg(&cp_file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("missing tail"), "{stdout}");
}

#[tokio::test]
async fn swapped_records_are_named() {
    let t = fresh().await;
    let a = line_of(&t.dir, 44);
    let b = line_of(&t.dir, 45);
    assert_eq!(a.segment, b.segment, "pick a pair within one segment");
    let mut seg = segment_lines(&a.segment);
    let i = seg.iter().position(|l| *l == a.bytes).unwrap();
    seg.swap(i, i + 1);
    write_segment(&a.segment, &seg);
    let f = verify_dir(&t.dir, None).unwrap_err();
    assert_eq!(f.what, Broken::SeqMismatch { found: 45 }, "{f}");
    assert_eq!((f.seq, f.offset), (Some(44), Some(a.offset)));
}

#[tokio::test]
async fn inserted_copy_of_a_record_is_named_where_it_sits() {
    let t = fresh().await;
    let at = line_of(&t.dir, 20);
    let copy = line_of(&t.dir, 5).bytes;
    let mut seg = segment_lines(&at.segment);
    let i = seg.iter().position(|l| *l == at.bytes).unwrap();
    seg.insert(i, copy);
    write_segment(&at.segment, &seg);
    let f = verify_dir(&t.dir, None).unwrap_err();
    assert_eq!(f.what, Broken::SeqMismatch { found: 5 }, "{f}");
    assert_eq!((f.seq, f.offset), (Some(20), Some(at.offset)));
}

#[tokio::test]
async fn inserted_forged_record_with_a_valid_hash_is_caught_at_the_duplicate_seq() {
    let t = fresh().await;
    let before = line_of(&t.dir, 26);
    let after = line_of(&t.dir, 27);
    assert_eq!(before.segment, after.segment);
    // A forger who knows the format: seq 27, prev = hash of 26, correct own hash.
    let (canonical, _) = split_line(&after.bytes).unwrap();
    let text = String::from_utf8(canonical)
        .unwrap()
        .replace("payments-db", "payroll-db");
    let prev = agentgate::audit::parse_line(&before.bytes).unwrap().hash;
    let h = record_hash(text.as_bytes(), &prev);
    let forged = format!(
        "{},\"hash\":\"{}\"}}",
        &text[..text.len() - 1],
        hex::encode(h)
    );
    assert!(agentgate::audit::parse_line(forged.as_bytes()).is_ok_and(|p| p.hash == p.computed));
    let mut seg = segment_lines(&after.segment);
    let i = seg.iter().position(|l| *l == after.bytes).unwrap();
    seg.insert(i, forged.clone().into_bytes());
    write_segment(&after.segment, &seg);
    let f = verify_dir(&t.dir, None).unwrap_err();
    // The forged line verifies locally; the original 27 after it cannot follow it.
    assert_eq!(f.what, Broken::SeqMismatch { found: 27 }, "{f}");
    assert_eq!(f.seq, Some(28));
    assert_eq!(f.offset, Some(after.offset + forged.len() as u64 + 1));
}

#[tokio::test]
async fn segment_truncated_mid_line_is_a_torn_line() {
    let t = fresh().await;
    let all = lines(&t.dir);
    let first_seg = all[0].segment.clone();
    let last_of_first = all
        .iter()
        .rfind(|l| l.segment == first_seg)
        .unwrap()
        .clone();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&first_seg)
        .unwrap();
    f.set_len(last_of_first.offset + 40).unwrap();
    let f = verify_dir(&t.dir, None).unwrap_err();
    assert_eq!(f.what, Broken::TornLine, "{f}");
    assert_eq!(f.seq, Some(last_of_first.seq));
    assert_eq!(f.offset, Some(last_of_first.offset));
    assert_eq!(f.segment.as_deref(), Some(first_seg.as_path()));
}

#[tokio::test]
async fn whole_log_rewritten_with_a_new_key_is_caught_by_an_older_checkpoint() {
    let original = TempLog::new();
    let cp_file = original.tmp.path().join("exported.jsonl");
    write_log(original.cfg(), N).await;
    let report = verify_dir(&original.dir, None).unwrap();
    // The examiner kept the log's last checkpoint (as the sink would have).
    let last = lines(&original.dir).into_iter().last().unwrap();
    let rec = agentgate::audit::parse_line(&last.bytes).unwrap().record;
    let cp: Checkpoint = serde_json::from_value(rec.result.unwrap()).unwrap();
    std::fs::write(&cp_file, serde_json::to_vec(&cp).unwrap()).unwrap();

    // The attacker writes a fresh, self-consistent log with a new key, with one
    // record changed, and puts it (and its public key) in place.
    let forged = TempLog::new();
    let log = AuditLog::open(forged.cfg()).await.unwrap();
    for i in 0..N {
        let mut r = audit_common::statement(i);
        if i == 33 {
            r.resource = Some("nothing-to-see".into());
        }
        log.append(r).await.unwrap();
    }
    log.close().await.unwrap();
    std::fs::remove_dir_all(&original.dir).unwrap();
    std::process::Command::new("cp")
        .arg("-a")
        .arg(&forged.dir)
        .arg(&original.dir)
        .status()
        .unwrap();

    let alone = verify_dir(&original.dir, None).expect("the forgery is self-consistent");
    assert_ne!(alone.keys, report.keys);
    let f = verify_dir(&original.dir, Some(&cp_file)).unwrap_err();
    assert!(matches!(f.what, Broken::Inconsistent(_)), "{f}");
    assert_eq!(f.seq, Some(cp.size - 1));

    // The CLI says so too.
    let out = agentgate()
        .args(["audit", "verify", "--dir"])
        .arg(&original.dir)
        .arg("--checkpoint")
        .arg(&cp_file)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test]
async fn rewritten_identical_records_with_a_new_key_are_caught_by_the_key() {
    let original = TempLog::new();
    write_log(original.cfg(), 5).await;
    let last = lines(&original.dir).into_iter().last().unwrap();
    let rec = agentgate::audit::parse_line(&last.bytes).unwrap().record;
    let cp: Checkpoint = serde_json::from_value(rec.result.unwrap()).unwrap();
    let cp_file = original.tmp.path().join("cp.json");
    std::fs::write(&cp_file, serde_json::to_vec(&cp).unwrap()).unwrap();
    // Replace the signing key, strip the checkpoints and re-sign from scratch.
    let forged = TempLog::new();
    write_log(forged.cfg(), 5).await;
    std::fs::remove_dir_all(&original.dir).unwrap();
    std::process::Command::new("cp")
        .arg("-a")
        .arg(&forged.dir)
        .arg(&original.dir)
        .status()
        .unwrap();
    let f = verify_dir(&original.dir, Some(&cp_file)).unwrap_err();
    // Timestamps differ, so roots differ: detected as inconsistency (or unknown key).
    assert!(
        matches!(f.what, Broken::Inconsistent(_) | Broken::UnknownKey(_)),
        "{f}"
    );
}

#[test]
fn usage_errors_exit_2() {
    let out = agentgate()
        .args(["audit", "verify", "--dir", "/nonexistent/agentgate-audit"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = agentgate()
        .args(["audit", "export", "--format", "csv"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
