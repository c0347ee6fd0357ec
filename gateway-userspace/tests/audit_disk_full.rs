//! Disk full: appends fail with a clear error, nothing acknowledged is lost,
//! and once space returns a `log.failure` record and the chain continue.
//! Needs root (mounts a small tmpfs); without it the test says so and skips.
// Tests read as scenarios: long bodies and short local names are clearer here.
#![allow(clippy::too_many_lines, clippy::many_single_char_names)]

mod audit_common;

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::Command,
};

use agentgate::audit::{AuditConfig, AuditError, AuditLog, Kind, verify_dir};
use audit_common::{lines, statement};

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).ok()?;
        let ok = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "agentgate-test",
            ])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 4096];
    let mut n = 0;
    while f.write_all(&chunk).is_ok() {
        n += chunk.len() as u64;
    }
    // Fill the last partial page too.
    while f.write_all(&chunk[..1]).is_ok() {
        n += 1;
    }
    n
}

#[tokio::test]
async fn disk_full_fails_appends_and_recovers_with_a_log_failure_record() {
    let tmp = tempfile::tempdir().unwrap();
    let Some(mnt) = Tmpfs::mount(&tmp.path().join("mnt"), "512k") else {
        eprintln!("SKIPPED: cannot mount a tmpfs (needs root): disk-full test did not run");
        return;
    };
    let mut cfg = AuditConfig::with_dir(mnt.0.join("audit"));
    cfg.state_dir = Some(tmp.path().join("state"));
    cfg.checkpoint_every_records = 10;
    let log = AuditLog::open(cfg.clone()).await.unwrap();
    let mut acked = Vec::new();
    for i in 0..20 {
        acked.push(log.append(statement(i)).await.unwrap());
    }
    let filler = mnt.0.join("filler");
    assert!(fill(&filler) > 0);

    // The segment's last page may still have room: appends succeed until it is full.
    let mut failures = 0;
    let mut i = 100;
    while failures < 5 {
        i += 1;
        assert!(i < 1000, "the disk never filled up");
        match log.append(statement(i)).await {
            Err(e @ AuditError::Io { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains("No space left on device") && text.contains("segment-"),
                    "unclear error: {text}"
                );
                failures += 1;
            }
            Err(e) => panic!("unexpected error kind: {e}"),
            Ok(a) => {
                assert_eq!(
                    failures, 0,
                    "append {a:?} succeeded between failures on a full disk"
                );
                acked.push(a);
            }
        }
    }
    assert_eq!(failures, 5);
    assert!(log.stats().log_failures >= 5);
    assert!(log.stats().failing, "the log says it is failing");
    // What was acknowledged is intact, and the failed writes left nothing behind.
    verify_dir(&cfg.dir, None).expect("log verifies while the disk is full");

    std::fs::remove_file(&filler).unwrap();
    let after = log
        .append(statement(200))
        .await
        .expect("append works once space returns");
    assert!(!log.stats().failing, "and that it no longer is");
    log.close().await.unwrap();

    let all = lines(&cfg.dir);
    for a in &acked {
        let l = all
            .iter()
            .find(|l| l.seq == a.seq)
            .expect("acknowledged record present");
        assert_eq!(agentgate::audit::parse_line(&l.bytes).unwrap().hash, a.hash);
    }
    let failure = all.iter().find(|l| l.seq == after.seq - 1).unwrap();
    let p = agentgate::audit::parse_line(&failure.bytes).unwrap();
    assert_eq!(
        p.record.kind,
        Kind::LogFailure,
        "a log.failure record precedes the first append after recovery"
    );
    let result = p.record.result.unwrap();
    assert_eq!(result["failed_records"], 5);
    assert!(result["error"].as_str().unwrap().contains("No space left"));
    assert!(after.seq > acked.last().unwrap().seq + 1);
    verify_dir(&cfg.dir, None).expect("chain continues after the failure");
    drop(mnt);
}
