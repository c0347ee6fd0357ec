//! `cargo bench -p agentgate --bench evidence` (called by `cargo xtask bench evidence`).
//!
//! Writes a large log with the real writer (batched, 64 concurrent sessions of
//! 100 identities: connection, statement, masked result, close), then runs
//! the real `agentgate evidence` under `/usr/bin/time -v` and prints records/s
//! and peak RSS, for one identity and for 50 (half the log in scope).
//! `AGENTGATE_BENCH_EVIDENCE_RECORDS` sets the size (default 10 million); the
//! log is kept in the target directory and reused by later runs of that size.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use agentgate::audit::{AuditConfig, AuditLog, Durability, IdentityRef, Kind, NewRecord, Workload};
use serde_json::json;

const IDENTITIES: u64 = 100;
const WRITERS: u64 = 64;

fn who(i: u64) -> IdentityRef {
    IdentityRef {
        subject: format!("agent-{}@bank.example", i % IDENTITIES),
        kind: "human".into(),
        groups: vec!["contractors".into()],
    }
}

fn rec(kind: Kind, session: u64) -> NewRecord {
    NewRecord::new(kind)
        .session(format!("conn-{session}"))
        .connection(session)
        .identity(who(session))
        .workload(Workload {
            pid: 4000 + (session % 5000) as u32,
            exe: Some("/usr/bin/python3".into()),
            cmdline: Some("python3 agent.py --task reconcile".into()),
            uid: 1000,
            cgroup: Some(format!("/agentgate/exec-{}", session % IDENTITIES)),
        })
        .resource("customers-db")
}

/// One session: 4 records (3 in 16 sessions also get a denied write).
fn session(s: u64) -> Vec<NewRecord> {
    let mut v = vec![
        rec(Kind::ConnectionOpen, s)
            .action(json!({"destination": "10.0.0.5:5432", "protocol": "postgres"}))
            .decision(json!({"verdict": "allow", "rule": "read"})),
        rec(Kind::Statement, s)
            .action(json!({"class": "read", "sql": "SELECT name, ssn FROM customers WHERE id = ?", "tables": ["customers"], "protocol": "postgres", "sql_hash": "4f0c"}))
            .decision(json!({"verdict": "allow", "rule": "read"})),
        rec(Kind::Statement, s)
            .action(json!({"phase": "completed", "protocol": "postgres"}))
            .transform(json!({"masking": {"columns": ["ssn"], "detectors": [], "values_masked": 1, "values_nulled": 0}}))
            .result(json!({"status": "ok", "rows": 1})),
    ];
    if s % 16 < 3 {
        v.push(
            rec(Kind::Statement, s)
                .action(json!({"class": "write", "sql": "UPDATE customers SET ssn = ? WHERE id = ?", "tables": ["customers"], "protocol": "postgres"}))
                .decision(json!({"verdict": "deny", "rule": "no-writes", "reason": "writes need approval"})),
        );
    }
    v.push(rec(Kind::ConnectionClose, s).result(json!({"bytes_up": 300, "bytes_down": 900})));
    v
}

fn generate(dir: &Path, n: u64) {
    let mut cfg = AuditConfig::with_dir(dir);
    cfg.durability = Durability::Batched;
    cfg.checkpoint_every_records = 10_000;
    cfg.segment_max_bytes = 256 << 20;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let log = AuditLog::open(cfg).await.unwrap();
        let written = Arc::new(AtomicU64::new(0));
        let next = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..WRITERS {
            let (log, written, next) = (log.clone(), Arc::clone(&written), Arc::clone(&next));
            tasks.push(tokio::spawn(async move {
                while written.load(Ordering::Relaxed) < n {
                    let s = next.fetch_add(1, Ordering::Relaxed);
                    for r in session(s) {
                        log.append(r).await.unwrap();
                        written.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        log.close().await.unwrap();
    });
}

struct Run {
    records: u64,
    secs: f64,
    peak_rss_kib: u64,
    exit: Option<i32>,
}

fn run_evidence(dir: &Path, out: &Path, identities: u64) -> Run {
    let mut c = Command::new("/usr/bin/time");
    c.arg("-v")
        .arg(env!("CARGO_BIN_EXE_agentgate"))
        .args(["--config", "/nonexistent/agentgate.toml", "evidence"])
        .args([
            "--from",
            "2000-01-01T00:00:00Z",
            "--to",
            "2100-01-01T00:00:00Z",
        ])
        .arg("--dir")
        .arg(dir)
        .arg("--out")
        .arg(out);
    for i in 0..identities {
        c.arg("--identity").arg(format!("agent-{i}@bank.example"));
    }
    let t = Instant::now();
    let o = c
        .output()
        .expect("running agentgate evidence under /usr/bin/time");
    let secs = t.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    let records = stdout
        .split(" records read")
        .next()
        .and_then(|s| s.rsplit('(').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let peak_rss_kib = stderr
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Maximum resident set size (kbytes): ")
        })
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Run {
        records,
        secs,
        peak_rss_kib,
        exit: o.status.code(),
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n: u64 = std::env::var("AGENTGATE_BENCH_EVIDENCE_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("bench-evidence-{n}"));
    let dir = base.join("audit");
    let done = base.join("generated");
    if done.exists() {
        println!("reusing the log of {n} records in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        let t = Instant::now();
        generate(&dir, n);
        std::fs::write(&done, b"").unwrap();
        println!(
            "generated {n} records with the audit writer in {:.1} s ({:.0} records/s)",
            t.elapsed().as_secs_f64(),
            n as f64 / t.elapsed().as_secs_f64()
        );
    }
    let bytes: u64 = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    println!("log: {:.2} GiB", bytes as f64 / f64::from(1u32 << 30));
    println!();
    println!("| identities in scope | records read | seconds | records/s | peak RSS MiB | exit |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for ids in [1, 50] {
        let out = base.join(format!("out-{ids}"));
        let r = run_evidence(&dir, &out, ids);
        println!(
            "| {ids} | {} | {:.1} | {:.0} | {:.1} | {} |",
            r.records,
            r.secs,
            r.records as f64 / r.secs,
            r.peak_rss_kib as f64 / 1024.0,
            r.exit.map_or_else(|| "signal".into(), |c| c.to_string())
        );
    }
    println!();
    println!("target: peak RSS independent of the log's size (≤ 100 MiB at 10 million records)");
}
