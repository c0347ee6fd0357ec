//! `cargo bench -p agentgate --bench audit` (called by `cargo xtask bench audit`).
//!
//! One run prints: the machine's fsync latency, µs per record for
//! serialization + hashing alone, and durable appends/s with 1, 8 and 64
//! concurrent writers in strict and batched mode, then checks the targets
//! (≤ 2 µs/record; strict with 64 writers ≥ 10× one writer). A plain binary,
//! not criterion: the concurrent figures need their own harness.

use std::{
    os::unix::fs::FileExt,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use agentgate::audit::{
    AuditConfig, AuditLog, Durability, GENESIS_PREV, IdentityRef, Kind, NewRecord, Workload,
    encode_line, now_rfc3339,
};

fn record(i: u64) -> NewRecord {
    NewRecord::new(Kind::Statement)
        .session("5f1c0e2a-sess")
        .connection(i)
        .identity(IdentityRef { subject: "alice@bank.example".into(), kind: "human".into(), groups: vec!["dba".into()] })
        .workload(Workload {
            pid: 4242,
            exe: Some("/usr/bin/python3".into()),
            cmdline: Some("python3 agent.py --task reconcile".into()),
            uid: 1000,
            cgroup: Some("/agentgate/agents/reconcile".into()),
        })
        .resource("payments-db")
        .action(serde_json::json!({"protocol": "postgres", "sql": "SELECT name, iban FROM customers WHERE id = ?", "literals": ["4f0c…"]}))
        .decision(serde_json::json!({"action": "allow", "rule": "ffiec-read"}))
        .transform(serde_json::json!({"masked_columns": ["iban"]}))
}

fn fsync_latency(dir: &Path) -> (f64, f64) {
    let path = dir.join("fsync-probe");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let block = vec![0x5au8; 512];
    let mut samples = Vec::with_capacity(200);
    for i in 0..200u64 {
        f.write_all_at(&block, i * 512).unwrap();
        let t = Instant::now();
        f.sync_data().unwrap();
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let _ = std::fs::remove_file(&path);
    samples.sort_by(f64::total_cmp);
    (
        samples[samples.len() / 2],
        samples.iter().sum::<f64>() / samples.len() as f64,
    )
}

fn encode_cost(run: Duration) -> (f64, f64, usize) {
    let host = "gw-01";
    let mut prev = GENESIS_PREV;
    let mut buf = Vec::with_capacity(1 << 20);
    let recs: Vec<NewRecord> = (0..1000).map(record).collect();
    // Warm up, then measure time formatting + serialization + hashing as the writer does.
    let mut n = 0u64;
    let t = Instant::now();
    while t.elapsed() < run {
        for r in &recs {
            buf.clear();
            let time = now_rfc3339();
            prev = encode_line(r, n, &time, host, &prev, &mut buf).unwrap();
            n += 1;
        }
    }
    let total = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    // The hash alone over one typical line, for the breakdown.
    let line = buf.clone();
    let mut m = 0u64;
    let t = Instant::now();
    while t.elapsed() < run / 4 {
        for _ in 0..1000 {
            prev = agentgate::audit::record_hash(&line, &prev);
        }
        m += 1000;
    }
    let hash = t.elapsed().as_secs_f64() * 1e6 / m as f64;
    (total, hash, line.len())
}

async fn throughput(base: &Path, writers: usize, durability: Durability, run: Duration) -> f64 {
    let dir = base.join(format!("{durability:?}-{writers}"));
    let _ = std::fs::remove_dir_all(&dir);
    let mut cfg = AuditConfig::with_dir(&dir);
    cfg.state_dir = Some(base.to_path_buf());
    cfg.durability = durability;
    cfg.batch_interval_ms = 10;
    let log = AuditLog::open(cfg).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (log, stop, count) = (log.clone(), Arc::clone(&stop), Arc::clone(&count));
        tasks.push(tokio::spawn(async move {
            let mut i = w as u64;
            while !stop.load(Ordering::Relaxed) {
                log.append(record(i)).await.unwrap();
                count.fetch_add(1, Ordering::Relaxed);
                i += writers as u64;
            }
        }));
    }
    let t = Instant::now();
    tokio::time::sleep(run).await;
    stop.store(true, Ordering::Relaxed);
    let n = count.load(Ordering::Relaxed);
    let secs = t.elapsed().as_secs_f64();
    for t in tasks {
        t.await.unwrap();
    }
    log.close().await.unwrap();
    agentgate::audit::verify_dir(&dir, None).expect("the benchmark log verifies");
    let _ = std::fs::remove_dir_all(&dir);
    n as f64 / secs
}

fn main() {
    // `cargo bench` passes --bench; under `cargo test --all-targets` this is a short smoke run.
    let full = std::env::args().any(|a| a == "--bench");
    let run = if full {
        Duration::from_secs(3)
    } else {
        Duration::from_millis(100)
    };
    let base = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let (fs_median, fs_mean) = fsync_latency(base.path());
    println!(
        "audit benchmark (log on the filesystem of {})",
        env!("CARGO_TARGET_TMPDIR")
    );
    println!("fsync (fdatasync of a 512 B append): median {fs_median:.0} µs, mean {fs_mean:.0} µs");
    let (us, hash_us, len) = encode_cost(if full { Duration::from_secs(2) } else { run });
    println!(
        "serialization + hashing: {us:.2} µs/record (blake3 alone over the {len} byte line: {hash_us:.2} µs)"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut strict = Vec::new();
    println!("{:<10} {:>8} {:>16}", "mode", "writers", "appends/s");
    for durability in [Durability::Strict, Durability::Batched] {
        for writers in [1, 8, 64] {
            let r = rt.block_on(throughput(base.path(), writers, durability, run));
            println!(
                "{:<10} {:>8} {:>16.0}",
                format!("{durability:?}").to_lowercase(),
                writers,
                r
            );
            if durability == Durability::Strict {
                strict.push(r);
            }
        }
    }
    if !full {
        println!("(smoke run; `cargo bench -p agentgate --bench audit` for real figures)");
        return;
    }
    let ratio = strict[2] / strict[0];
    println!(
        "target serialization+hashing <= 2 µs/record: {} ({us:.2})",
        if us <= 2.0 { "met" } else { "MISSED" }
    );
    println!(
        "target strict 64 writers >= 10x 1 writer: {} ({ratio:.1}x)",
        if ratio >= 10.0 { "met" } else { "MISSED" }
    );
}
