//! The log's life beyond appends: readers recording their access (directly
//! and through the spool), key rotation, retention, the webhook sink,
//! batched durability with time-based checkpoints, proofs, refusals.

// Tests read as scenarios: long bodies and short local names are clearer here.
#![allow(clippy::too_many_lines, clippy::many_single_char_names)]

mod audit_common;

use std::time::Duration;

use agentgate::audit::{
    AuditError, AuditLog, Broken, Checkpoint, Durability, Kind, NewRecord, PUB_FILE, SPOOL_FILE,
    parse_line, verify_dir,
};
use audit_common::{TempLog, agentgate, lines, statement, write_log};

fn records(dir: &std::path::Path) -> Vec<agentgate::audit::Record> {
    lines(dir)
        .into_iter()
        .map(|l| parse_line(&l.bytes).unwrap().record)
        .collect()
}

/// Connection ids of the records that have one, in log order.
fn connection_ids(dir: &std::path::Path) -> Vec<u64> {
    records(dir)
        .iter()
        .filter_map(|r| r.connection_id)
        .collect()
}

/// Strict durability, the given batch interval, no checkpoints by count.
fn strict_cfg(t: &TempLog, batch_interval_ms: u64) -> agentgate::audit::AuditConfig {
    let mut cfg = t.cfg();
    cfg.durability = Durability::Strict;
    cfg.batch_interval_ms = batch_interval_ms;
    cfg.checkpoint_every_records = 1_000_000;
    cfg
}

fn segment_count(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("segment-")
        })
        .count()
}

fn access_records(dir: &std::path::Path, command: &str) -> usize {
    records(dir)
        .iter()
        .filter(|r| {
            r.kind == Kind::AuditAccess
                && r.action.as_ref().is_some_and(|a| a["command"] == command)
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_while_the_daemon_runs_is_spooled_and_ingested() {
    let t = TempLog::new();
    let log = AuditLog::open(t.cfg()).await.unwrap();
    for i in 0..5 {
        log.append(statement(i)).await.unwrap();
    }
    let out = agentgate()
        .args(["audit", "tail", "-n", "3", "--dir"])
        .arg(&t.dir)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 3);
    // The writer ingests the spool within a housekeeping tick or two.
    let mut found = 0;
    for _ in 0..50 {
        found = access_records(&t.dir, "tail");
        if found > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        found, 1,
        "the spooled access request became one audit.access record"
    );
    assert!(!t.dir.join(SPOOL_FILE).exists());
    let rec = records(&t.dir)
        .into_iter()
        .find(|r| r.kind == Kind::AuditAccess)
        .unwrap();
    assert!(rec.identity.unwrap().subject.starts_with("uid:"));
    assert!(
        rec.workload
            .unwrap()
            .cmdline
            .unwrap()
            .contains("audit tail")
    );
    log.close().await.unwrap();
    verify_dir(&t.dir, None).unwrap();
}

#[tokio::test]
async fn reading_with_the_daemon_stopped_appends_directly_and_export_filters() {
    let t = TempLog::new();
    write_log(t.cfg(), 12).await;
    let out = agentgate()
        .args([
            "audit",
            "export",
            "--format",
            "jsonl",
            "--identity",
            "alice-1",
            "--dir",
        ])
        .arg(&t.dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let exported: Vec<_> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(exported.len(), 6, "odd statements belong to alice-1");
    for l in &exported {
        let p = parse_line(l.as_bytes()).unwrap();
        assert_eq!(p.hash, p.computed, "exported lines stay verifiable");
        assert_eq!(p.record.identity.unwrap().subject, "alice-1");
    }
    assert_eq!(access_records(&t.dir, "export"), 1);
    assert!(
        !t.dir.join(SPOOL_FILE).exists(),
        "no daemon: appended directly"
    );
    // A time window that excludes everything.
    let out = agentgate()
        .args([
            "audit",
            "export",
            "--format",
            "jsonl",
            "--to",
            "2000-01-01T00:00:00Z",
            "--dir",
        ])
        .arg(&t.dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(out.stdout.is_empty());
    let out = agentgate()
        .args([
            "audit",
            "export",
            "--format",
            "jsonl",
            "--from",
            "yesterday",
            "--dir",
        ])
        .arg(&t.dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    verify_dir(&t.dir, None).unwrap();
}

#[tokio::test]
async fn key_rotation_is_logged_and_verifies() {
    let t = TempLog::new();
    let log = AuditLog::open(t.cfg()).await.unwrap();
    log.append(statement(0)).await.unwrap();
    let before = log.checkpoint().await.unwrap();
    let new_key = log.rotate_key().await.unwrap();
    assert_ne!(new_key, before.key);
    log.append(statement(1)).await.unwrap();
    log.close().await.unwrap();
    let cp_file = t.tmp.path().join("before.json");
    std::fs::write(&cp_file, serde_json::to_vec(&before).unwrap()).unwrap();
    let r = verify_dir(&t.dir, Some(&cp_file)).unwrap();
    assert_eq!(r.keys, vec![before.key.clone(), new_key.clone()]);
    assert_eq!(r.older_checked, 1);
    assert_eq!(
        std::fs::read_to_string(t.dir.join(PUB_FILE))
            .unwrap()
            .trim(),
        new_key
    );
    assert!(records(&t.dir).iter().any(|r| r.kind == Kind::KeyRotation));
    // The new key is installed: the log reopens and signs with it.
    let log = AuditLog::open(t.cfg()).await.unwrap();
    let cp = log.checkpoint().await.unwrap();
    assert_eq!(cp.key, new_key);
    log.close().await.unwrap();
    verify_dir(&t.dir, None).unwrap();
}

#[tokio::test]
async fn retention_deletes_only_checkpointed_segments_and_the_rest_verifies() {
    let t = TempLog::new();
    let log = AuditLog::open(t.cfg()).await.unwrap();
    for i in 0..60 {
        log.append(statement(i)).await.unwrap();
    }
    log.checkpoint().await.unwrap();
    let segments_before = agentgate::audit::list_segments(&t.dir).unwrap().len();
    let report = log
        .retain(time::OffsetDateTime::now_utc() + time::Duration::days(1))
        .await
        .unwrap();
    assert_eq!(
        report.deleted_segments.len(),
        segments_before - 1,
        "every closed segment is covered"
    );
    log.append(statement(99)).await.unwrap();
    log.close().await.unwrap();
    let r = verify_dir(&t.dir, None).unwrap();
    assert_eq!(r.first_seq, report.last_plus_one);
    let ret = records(&t.dir)
        .into_iter()
        .find(|r| r.kind == Kind::Retention)
        .expect("retention is logged");
    assert_eq!(
        ret.result.unwrap()["deleted"].as_array().unwrap().len(),
        report.deleted_segments.len()
    );
    // Removing the anchor (or more segments) is detected.
    let anchor = t.dir.join(agentgate::audit::ANCHOR_FILE);
    let saved = std::fs::read(&anchor).unwrap();
    std::fs::remove_file(&anchor).unwrap();
    let f = verify_dir(&t.dir, None).unwrap_err();
    assert!(matches!(f.what, Broken::Anchor(_)), "{f}");
    std::fs::write(&anchor, saved).unwrap();
    verify_dir(&t.dir, None).unwrap();
}

#[tokio::test]
async fn retention_keeps_what_no_checkpoint_covers() {
    let t = TempLog::new();
    let mut cfg = t.cfg();
    cfg.checkpoint_every_records = 1_000_000;
    let log = AuditLog::open(cfg).await.unwrap();
    for i in 0..60 {
        log.append(statement(i)).await.unwrap();
    }
    let report = log
        .retain(time::OffsetDateTime::now_utc() + time::Duration::days(1))
        .await
        .unwrap();
    assert!(
        report.deleted_segments.is_empty(),
        "nothing is checkpointed yet"
    );
    log.close().await.unwrap();
    assert_eq!(verify_dir(&t.dir, None).unwrap().first_seq, 0);
}

#[tokio::test]
async fn checkpoints_are_posted_to_the_webhook() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).await.unwrap();
            req.extend_from_slice(&buf[..n]);
            if let Some(i) = req.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&req[..i]).to_string();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .unwrap()
                    .parse()
                    .unwrap();
                if req.len() >= i + 4 + len {
                    s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                        .await
                        .unwrap();
                    return (head, req[i + 4..i + 4 + len].to_vec());
                }
            }
            assert!(n > 0, "client closed early");
        }
    });
    let t = TempLog::new();
    let mut cfg = t.cfg();
    cfg.checkpoint_webhook = Some(format!("http://127.0.0.1:{port}/agentgate/checkpoint"));
    let log = AuditLog::open(cfg).await.unwrap();
    log.append(statement(0)).await.unwrap();
    let cp = log.checkpoint().await.unwrap();
    let (head, body) = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap();
    assert!(
        head.starts_with("POST /agentgate/checkpoint HTTP/1.1"),
        "{head}"
    );
    let got: Checkpoint = serde_json::from_slice(&body).unwrap();
    assert_eq!(got, cp);
    got.verify_signature().unwrap();
    assert_eq!(log.stats().sink_failures, 0);
    log.close().await.unwrap();
}

#[tokio::test]
async fn batched_mode_checkpoints_on_time() {
    let t = TempLog::new();
    let mut cfg = t.cfg();
    cfg.durability = Durability::Batched;
    cfg.batch_interval_ms = 20;
    cfg.checkpoint_every_records = 1_000_000;
    cfg.checkpoint_every_secs = 1;
    let log = AuditLog::open(cfg).await.unwrap();
    for i in 0..5 {
        log.append(statement(i)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let s = log.stats();
    assert!(s.checkpoints >= 1, "{s:?}");
    assert!(s.fsyncs >= 1, "{s:?}");
    assert!(records(&t.dir).iter().any(|r| r.kind == Kind::Checkpoint));
    verify_dir(&t.dir, None).unwrap();
    log.close().await.unwrap();
}

#[tokio::test]
async fn reserved_kinds_and_oversized_records_are_refused_and_the_log_continues() {
    let t = TempLog::new();
    let log = AuditLog::open(t.cfg()).await.unwrap();
    let e = log
        .append(NewRecord::new(Kind::Checkpoint))
        .await
        .unwrap_err();
    assert!(matches!(e, AuditError::ReservedKind { .. }));
    let huge =
        NewRecord::new(Kind::Statement).action(serde_json::json!({"sql": "x".repeat(2 << 20)}));
    let e = log.append(huge).await.unwrap_err();
    assert!(matches!(e, AuditError::TooLarge { .. }), "{e}");
    let a = log.append(statement(1)).await.unwrap();
    assert_eq!(a.seq, 0);
    // A second writer is refused while the first holds the lock.
    let e = AuditLog::open(t.cfg()).await.unwrap_err();
    assert!(matches!(e, AuditError::Locked { .. }), "{e}");
    log.close().await.unwrap();
    verify_dir(&t.dir, None).unwrap();
}

#[tokio::test]
async fn inclusion_proofs_from_the_cli_verify_and_tampered_ones_fail() {
    let t = TempLog::new();
    write_log(t.cfg(), 25).await;
    let out = agentgate()
        .args(["audit", "prove", "--seq", "7", "--dir"])
        .arg(&t.dir)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let proof_file = t.tmp.path().join("proof.json");
    std::fs::write(&proof_file, &out.stdout).unwrap();
    let pub_file = t.dir.join(PUB_FILE);
    let ok = agentgate()
        .args(["audit", "verify-proof", "--key"])
        .arg(&pub_file)
        .arg(&proof_file)
        .output()
        .unwrap();
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );

    let mut proof: agentgate::audit::InclusionProof = serde_json::from_slice(&out.stdout).unwrap();
    proof.path[0] = hex::encode([0u8; 32]);
    std::fs::write(&proof_file, serde_json::to_vec(&proof).unwrap()).unwrap();
    let bad = agentgate()
        .args(["audit", "verify-proof"])
        .arg(&proof_file)
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stdout).contains("does not lead"));
    assert_eq!(
        access_records(&t.dir, "prove"),
        1,
        "prove reads the log and is recorded"
    );
}

#[tokio::test]
async fn detached_records_are_written_in_order_and_synced_without_a_waiter() {
    let t = TempLog::new();
    let log = AuditLog::open(strict_cfg(&t, 20)).await.unwrap();
    log.append(statement(0)).await.unwrap();
    let fsyncs = log.stats().fsyncs;
    for i in 1..4 {
        log.append_detached(statement(i)).unwrap();
    }
    // Nobody waits: no fsync of its own at once, but one within the interval.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = log.stats();
    assert_eq!(s.appends, 4, "{s:?}");
    assert!(
        s.fsyncs > fsyncs,
        "detached records were never synced: {s:?}"
    );
    assert!(s.fsync_micros_max <= s.fsync_micros_total, "{s:?}");
    // fdatasync of appended data takes time on a disk (tmpfs syncs nothing).
    let fs = std::process::Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(&t.dir)
        .output()
        .unwrap();
    if String::from_utf8_lossy(&fs.stdout).trim() != "tmpfs" {
        assert!(s.fsync_micros_max > 0, "fsync latency not measured: {s:?}");
    }
    log.append(statement(4)).await.unwrap();
    let connections: Vec<u64> = records(&t.dir)
        .iter()
        .filter(|r| r.kind == Kind::Statement)
        .filter_map(|r| r.connection_id)
        .collect();
    assert_eq!(connections, vec![0, 1, 2, 3, 4]);
    assert!(matches!(
        log.append_detached(NewRecord::new(Kind::Checkpoint)),
        Err(AuditError::ReservedKind { .. })
    ));
    log.close().await.unwrap();
    verify_dir(&t.dir, None).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detached_records_ride_with_the_next_write() {
    let t = TempLog::new();
    let mut cfg = t.cfg();
    cfg.batch_interval_ms = 10_000;
    cfg.checkpoint_every_records = 1_000_000;
    let log = AuditLog::open(cfg).await.unwrap();
    log.append(statement(0)).await.unwrap();
    let before = log.stats();
    for i in 1..4 {
        log.append_detached(statement(i)).unwrap();
    }
    // Time for the writer to take them; the interval is far away.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(log.stats().batches, before.batches, "held, not written");
    assert_eq!(records(&t.dir).len(), before.appends as usize);
    log.append(statement(4)).await.unwrap();
    let after = log.stats();
    assert_eq!(
        after.batches,
        before.batches + 1,
        "one write for all: {after:?}"
    );
    assert_eq!(after.appends, before.appends + 4);
    let connections = connection_ids(&t.dir);
    assert_eq!(connections, vec![0, 1, 2, 3, 4], "appended order");
    // Held records are written before a key rotation and at close.
    log.append_detached(statement(5)).unwrap();
    log.rotate_key().await.unwrap();
    log.append_detached(statement(6)).unwrap();
    log.close().await.unwrap();
    let connections = connection_ids(&t.dir);
    assert_eq!(connections, vec![0, 1, 2, 3, 4, 5, 6]);
    verify_dir(&t.dir, None).unwrap();
}

#[tokio::test]
async fn records_are_in_the_order_of_the_calls() {
    let t = TempLog::new();
    let log = AuditLog::open(t.cfg()).await.unwrap();
    // An awaited append is queued when called, before its future runs.
    let first = log.append(statement(0));
    log.append_detached(statement(1)).unwrap();
    let second = log.append(statement(2));
    second.await.unwrap();
    first.await.unwrap();
    log.close().await.unwrap();
    assert_eq!(connection_ids(&t.dir), vec![0, 1, 2]);
}

#[tokio::test]
async fn held_records_cross_segment_rotation_intact() {
    let t = TempLog::new();
    let mut cfg = t.cfg();
    cfg.segment_max_bytes = 4096;
    let log = AuditLog::open(cfg).await.unwrap();
    for i in 0..60 {
        if i % 3 == 0 {
            log.append(statement(i)).await.unwrap();
        } else {
            log.append_detached(statement(i)).unwrap();
        }
    }
    log.close().await.unwrap();
    let segments = segment_count(&t.dir);
    assert!(segments > 3, "rotated: {segments} segments");
    let connections = connection_ids(&t.dir);
    assert_eq!(connections, (0..60).collect::<Vec<u64>>());
    let report = verify_dir(&t.dir, None).unwrap();
    assert_eq!(report.segments, segments);
}

#[tokio::test]
async fn the_log_opens_again_as_soon_as_close_returns() {
    let t = TempLog::new();
    for i in 0..30 {
        let log = AuditLog::open(t.cfg())
            .await
            .unwrap_or_else(|e| panic!("reopen {i}: {e}"));
        log.append(statement(i)).await.unwrap();
        log.close().await.unwrap();
    }
    verify_dir(&t.dir, None).unwrap();
}

/// Strict durability with a sole waiter: the append stages its record when
/// called and commits it on its own thread. The log keeps the order of the
/// calls, and a record whose append is dropped before it ran is still
/// written (the proxy forwards a read before its record is durable, so a
/// connection that goes away then must not lose it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_sole_appends_keep_call_order_and_survive_being_dropped() {
    let t = TempLog::new();
    let log = AuditLog::open(strict_cfg(&t, 20)).await.unwrap();
    let first = log.append(statement(0)); // alone: staged here
    log.append_detached(statement(1)).unwrap();
    let second = log.append(statement(2)); // another waits: queued
    second.await.unwrap();
    first.await.unwrap();
    log.append(statement(3)).await.unwrap();
    assert_eq!(connection_ids(&t.dir), vec![0, 1, 2, 3]);

    // Past the writer's first housekeeping pass (at start; the next is a
    // second later): only the held-record check can write what follows.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let fsyncs = log.stats().fsyncs;
    drop(log.append(statement(4)));
    log.append_detached(statement(5)).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        connection_ids(&t.dir),
        vec![0, 1, 2, 3, 4, 5],
        "written within the batch interval though nobody awaited it"
    );
    assert!(log.stats().fsyncs > fsyncs, "and synced");
    log.close().await.unwrap();
    verify_dir(&t.dir, None).unwrap();
}

/// Every record of `tasks` tasks of `each` appends (connection ids
/// `task * 1000 + j`) is in the log once, each task's in the order of its
/// calls, and the log verifies.
fn assert_each_task_in_order(dir: &std::path::Path, tasks: u64, each: u64) {
    let ids = connection_ids(dir);
    assert_eq!(ids.len() as u64, tasks * each, "each record once");
    for task in 0..tasks {
        let mine: Vec<u64> = ids.iter().copied().filter(|i| i / 1000 == task).collect();
        let want: Vec<u64> = (0..each).map(|j| task * 1000 + j).collect();
        assert_eq!(mine, want, "task {task} in the order of its calls");
    }
    verify_dir(dir, None).unwrap();
}

/// Many tasks appending at once in strict mode, some committing their own
/// records, most queued to the writer, across many segment rotations: every
/// record is in the log once, each task's in its order, and the log verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_concurrent_appends_land_once_each_in_order() {
    const TASKS: u64 = 8;
    const EACH: u64 = 40;
    let t = TempLog::new();
    let mut cfg = t.cfg();
    cfg.durability = Durability::Strict;
    cfg.batch_interval_ms = 5;
    cfg.checkpoint_every_records = 50;
    // Segments rotate many times, some when an append commits its own record.
    cfg.segment_max_bytes = 4096;
    let log = AuditLog::open(cfg).await.unwrap();
    append_from_tasks(&log, TASKS, EACH, 3, None).await;
    log.close().await.unwrap();
    let segments = segment_count(&t.dir);
    assert!(segments > 3, "rotated: {segments} segments");
    assert_each_task_in_order(&t.dir, TASKS, EACH);
}

/// `tasks` tasks append `each` records apiece, every `detached_every`-th
/// detached and the rest awaited, pausing 2 ms every `pause_every` records.
async fn append_from_tasks(
    log: &AuditLog,
    tasks: u64,
    each: u64,
    detached_every: u64,
    pause_every: Option<u64>,
) {
    let mut handles = Vec::new();
    for task in 0..tasks {
        let log = log.clone();
        handles.push(tokio::spawn(async move {
            for j in 0..each {
                let rec = statement(task * 1000 + j);
                if j % detached_every == detached_every - 1 {
                    log.append_detached(rec).unwrap();
                } else {
                    log.append(rec).await.unwrap();
                }
                if pause_every.is_some_and(|n| j % n == 0) {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
}

/// Batched durability with the periodic fsync running in the background
/// every millisecond: appends (awaited and detached) from 8 tasks go on while
/// fsyncs run, across segment rotations and checkpoints. Every record lands
/// once, in each task's order; fsyncs happened; the log verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_appends_go_on_while_the_periodic_fsync_runs() {
    const TASKS: u64 = 8;
    const EACH: u64 = 300;
    let t = TempLog::new();
    let mut cfg = t.cfg();
    cfg.durability = Durability::Batched;
    cfg.batch_interval_ms = 1;
    cfg.checkpoint_every_records = 200;
    cfg.segment_max_bytes = 16 * 1024;
    let log = AuditLog::open(cfg).await.unwrap();
    // Pauses let the fsync timer fire between appends too.
    append_from_tasks(&log, TASKS, EACH, 2, Some(50)).await;
    let s = log.stats();
    assert!(s.fsyncs >= 10, "periodic fsyncs ran: {s:?}");
    log.close().await.unwrap();
    assert!(segment_count(&t.dir) > 3, "rotated");
    assert_each_task_in_order(&t.dir, TASKS, EACH);
}

/// Strict durability, the shape of a Postgres connection with reads in
/// flight: each task starts an append, polls it once, awaits a second append
/// and only then the first. Across tasks, segment rotations and checkpoints no
/// append waits for another task's unpolled one: everything completes, once
/// each and in the order of each task's calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_appends_awaited_out_of_order_never_hold_each_other_up() {
    const TASKS: u64 = 8;
    const EACH: u64 = 60;
    let t = TempLog::new();
    let mut cfg = t.cfg();
    cfg.durability = Durability::Strict;
    cfg.batch_interval_ms = 5;
    cfg.checkpoint_every_records = 50;
    cfg.segment_max_bytes = 8192;
    let log = AuditLog::open(cfg).await.unwrap();
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            for j in (0..EACH).step_by(2) {
                let mut read = std::pin::pin!(log.append(statement(task * 1000 + j)));
                let first =
                    std::future::poll_fn(|cx| std::task::Poll::Ready(read.as_mut().poll(cx))).await;
                log.append(statement(task * 1000 + j + 1)).await.unwrap();
                match first {
                    std::task::Poll::Ready(r) => r.unwrap(),
                    std::task::Poll::Pending => read.await.unwrap(),
                };
            }
        }));
    }
    tokio::time::timeout(Duration::from_secs(30), async {
        for task in tasks {
            task.await.unwrap();
        }
    })
    .await
    .expect("appends awaited out of order held each other up");
    log.close().await.unwrap();
    assert_each_task_in_order(&t.dir, TASKS, EACH);
}
