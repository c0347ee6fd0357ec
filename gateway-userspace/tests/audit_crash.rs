//! Crash safety: a writer under load is killed with `SIGKILL` at random moments; every
//! restart recovers, the log verifies, torn bytes are kept in quarantine, and no
//! acknowledged record is missing.
// Tests read as scenarios: long bodies and short local names are clearer here.
#![allow(clippy::too_many_lines, clippy::many_single_char_names)]

mod audit_common;

use std::{
    collections::HashMap,
    io::{BufRead, BufReader},
    process::Stdio,
    time::Duration,
};

use agentgate::audit::{AuditLog, Kind, quarantine_files, verify_dir};
use audit_common::{TempLog, agentgate, lines};

/// xorshift64*: enough randomness for kill timing, reproducible from the printed seed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn torn_tail(dir: &std::path::Path) -> Vec<u8> {
    let Some(last) = agentgate::audit::list_segments(dir).unwrap().pop() else {
        return Vec::new();
    };
    let raw = std::fs::read(last.path).unwrap();
    let cut = raw.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    raw[cut..].to_vec()
}

#[test]
fn twenty_sigkills_under_load_lose_no_acknowledged_record() {
    let t = TempLog::new();
    let seed = std::env::var("AUDIT_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("crash test seed {seed} (AUDIT_CRASH_SEED to replay)");
    let mut rng = Rng(seed);
    let mut acked: HashMap<u64, String> = HashMap::new();
    let mut torn_rounds = 0;
    for round in 0..20 {
        let batched = round % 4 == 3;
        let mut cmd = agentgate();
        cmd.args(["audit", "stress", "--writers", "16", "--dir"])
            .arg(&t.dir);
        if batched {
            // Batched mode acknowledges before fsync; a process kill (not a power cut)
            // still loses nothing, so the same promise holds.
            cmd.arg("--batched");
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line == "READY" {
                    let _ = ready_tx.send(());
                }
                let mut parts = line.split(' ');
                if let (Some("ACK"), Some(seq), Some(hash)) =
                    (parts.next(), parts.next(), parts.next())
                {
                    got.push((seq.parse::<u64>().unwrap(), hash.to_owned()));
                }
            }
            got
        });
        // Opening verifies the whole log first; kill only once it is appending.
        ready_rx
            .recv_timeout(Duration::from_mins(1))
            .expect("the writer did not open");
        std::thread::sleep(Duration::from_millis(5 + rng.next() % 120));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let got = reader.join().unwrap();
        let n = got.len();
        acked.extend(got);

        let torn = torn_tail(&t.dir);
        let before = quarantine_files(&t.dir);
        // Restart: open (recover) and close cleanly.
        let st = agentgate()
            .args(["audit", "stress", "--count", "0", "--dir"])
            .arg(&t.dir)
            .status()
            .unwrap();
        assert!(st.success(), "round {round}: restart failed");
        let report = verify_dir(&t.dir, None)
            .unwrap_or_else(|f| panic!("round {round}: verify failed: {f}"));
        if !torn.is_empty() {
            torn_rounds += 1;
            let after = quarantine_files(&t.dir);
            let new: Vec<_> = after.iter().filter(|p| !before.contains(p)).collect();
            assert_eq!(
                new.len(),
                1,
                "round {round}: one quarantine file per torn tail"
            );
            assert_eq!(
                std::fs::read(new[0]).unwrap(),
                torn,
                "round {round}: quarantined bytes differ"
            );
        }
        let present: HashMap<u64, String> = lines(&t.dir)
            .into_iter()
            .map(|l| {
                (
                    l.seq,
                    hex::encode(agentgate::audit::parse_line(&l.bytes).unwrap().hash),
                )
            })
            .collect();
        for (seq, hash) in &acked {
            assert_eq!(
                present.get(seq),
                Some(hash),
                "round {round}: acknowledged seq {seq} missing or changed"
            );
        }
        eprintln!(
            "round {round}: {n} acked this round, {} in all, log size {}, torn tail {} bytes",
            acked.len(),
            report.size,
            torn.len()
        );
    }
    eprintln!("{torn_rounds} of 20 kills left a torn tail");
    assert!(
        acked.len() > 20 * 10,
        "the writers made too little progress to test anything"
    );
    let out = agentgate()
        .args(["audit", "verify", "--dir"])
        .arg(&t.dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
}

#[tokio::test]
async fn torn_last_line_is_quarantined_and_recorded() {
    let t = TempLog::new();
    audit_common::write_log(t.cfg(), 7).await;
    let seg = agentgate::audit::list_segments(&t.dir)
        .unwrap()
        .pop()
        .unwrap()
        .path;
    let torn = b"{\"v\":1,\"seq\":9,\"time\":\"2025-".to_vec();
    let mut raw = std::fs::read(&seg).unwrap();
    let good_len = raw.len();
    raw.extend_from_slice(&torn);
    std::fs::write(&seg, raw).unwrap();
    let f = verify_dir(&t.dir, None).unwrap_err();
    assert_eq!(f.what, agentgate::audit::Broken::TornLine);
    assert_eq!(f.offset, Some(good_len as u64));

    // A reader never repairs.
    let e = AuditLog::open_for_reader(t.cfg()).await.unwrap_err();
    assert!(
        matches!(e, agentgate::audit::AuditError::NeedsRepair { .. }),
        "{e}"
    );

    let log = AuditLog::open(t.cfg()).await.unwrap();
    let a = log.append(audit_common::statement(100)).await.unwrap();
    log.close().await.unwrap();
    verify_dir(&t.dir, None).expect("recovered log verifies");
    let q = quarantine_files(&t.dir);
    assert_eq!(q.len(), 1);
    assert_eq!(std::fs::read(&q[0]).unwrap(), torn);
    let rec = lines(&t.dir)
        .into_iter()
        .find(|l| l.seq == a.seq - 1)
        .unwrap();
    let p = agentgate::audit::parse_line(&rec.bytes).unwrap();
    assert_eq!(p.record.kind, Kind::LogRecovered);
    let result = p.record.result.unwrap();
    assert_eq!(result["quarantined_bytes"], torn.len());
    assert_eq!(result["offset"], good_len);
}
