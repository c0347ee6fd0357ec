//! `cargo xtask bench mysql`: agentgate's `MySQL` handler in front of
//! `MariaDB`, against `MariaDB` directly and against the same daemon relaying
//! the server as a plain TCP resource.
//!
//! One run, interleaved: every round runs every path (direct, TCP
//! passthrough, the handler with batched and with strict audit durability)
//! × workload (sysbench `oltp_point_select`, `oltp_read_only`; prepared
//! statements, sysbench's default) × 1 and 8 threads; each figure is the
//! median transactions per second over rounds; ratios come from the same
//! run. sysbench is started with `agentgate exec` (tagged, redirected by
//! eBPF) for every path but direct. The passthrough path is the same daemon
//! and redirect without the handler: the difference to it is what decoding,
//! deciding and auditing each statement costs.
//!
//! A measurement, not a test: it exits 0 when the target (handler ≥ 0.85×
//! passthrough at 1 thread) is missed and says MISS; 1 only when it could
//! not measure. Needs root.

use std::{collections::BTreeMap, fs, process::Command};

use agentgate_e2e::{
    DaemonOptions, Env,
    mysql::{MariaDb, PASSWORD},
    run_ok,
};
use anyhow::{Context as _, Result, bail};

const PORT: u16 = 3306;
const TABLES: u32 = 4;
const TABLE_SIZE: u32 = 10_000;
const TARGET: f64 = 0.85;

/// The handler resource at 127.0.0.1, the same server as a TCP resource at
/// 127.0.0.2; `demo` may do anything on both.
fn policy() -> String {
    format!(
        r#"
[defaults]
unknown_destination = "deny"

[[resource]]
name = "bench-my"
protocol = "mysql"
addresses = ["127.0.0.1:{PORT}"]
default_action = "deny"

[[resource]]
name = "bench-my-tcp"
protocol = "tcp"
addresses = ["127.0.0.2:{PORT}"]
default_action = "deny"

[[rule]]
name = "demo-all"
identities = ["demo"]
resources = ["bench-my", "bench-my-tcp"]
action = "allow"
"#
    )
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Path {
    Direct,
    Passthrough,
    Batched,
    Strict,
}

impl Path {
    fn label(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Passthrough => "tcp passthrough",
            Path::Batched => "handler (batched)",
            Path::Strict => "handler (strict)",
        }
    }
}

const PATHS: [Path; 4] = [Path::Direct, Path::Passthrough, Path::Batched, Path::Strict];
const WORKLOADS: [&str; 2] = ["oltp_point_select", "oltp_read_only"];
const THREADS: [u32; 2] = [1, 8];

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("my_bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn sysbench_args(workload: &str, host: &str, threads: u32, secs: u32) -> Vec<String> {
    vec![
        "sysbench".into(),
        workload.into(),
        format!("--mysql-host={host}"),
        format!("--mysql-port={PORT}"),
        "--mysql-user=app".into(),
        format!("--mysql-password={PASSWORD}"),
        "--mysql-db=shop".into(),
        format!("--tables={TABLES}"),
        format!("--table-size={TABLE_SIZE}"),
        format!("--threads={threads}"),
        format!("--time={secs}"),
        "--report-interval=0".into(),
        "run".into(),
    ]
}

/// Transactions per second from sysbench's summary.
fn tps(out: &str) -> Result<f64> {
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("transactions:"))
        .context("no transactions line")?;
    let per_sec = line
        .split('(')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .context("no rate")?;
    Ok(per_sec.parse()?)
}

fn restart(env: &mut Env, durability: &str) -> Result<()> {
    if let Some(mut d) = env.daemon.take() {
        d.terminate();
    }
    let audit = env.state.join("audit");
    let _ = fs::remove_dir_all(&audit);
    env.opts.audit_extra = format!("durability = \"{durability}\"");
    env.write_config()?;
    env.start_daemon()
}

#[allow(clippy::too_many_lines)] // one measurement, in order
fn run() -> Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let (secs, rounds) = if quick { (3, 1) } else { (10, 3) };
    let mut env = Env::prepare(
        "mybench",
        DaemonOptions {
            policies: vec![("bench.toml".into(), policy())],
            audit_extra: "durability = \"batched\"".into(),
            ..Default::default()
        },
    )?;
    let db = MariaDb::start(&env.netns, PORT)?;
    eprintln!("my_bench: sysbench prepare ({TABLES} tables of {TABLE_SIZE} rows)");
    let mut prep = sysbench_args("oltp_read_only", "127.0.0.1", 1, 1);
    prep.pop();
    prep.push("prepare".into());
    run_ok(env.netns.command(&prep[0]).args(&prep[1..]))?;
    env.start_daemon()?;
    let mut durability = "batched";
    let mut samples: BTreeMap<(Path, &str, u32), Vec<f64>> = BTreeMap::new();
    for round in 0..rounds {
        let mut order = PATHS.to_vec();
        if round % 2 == 1 {
            order.reverse();
        }
        for path in order {
            let want = if path == Path::Strict {
                "strict"
            } else {
                "batched"
            };
            if path != Path::Direct && path != Path::Passthrough && want != durability {
                eprintln!("my_bench: restarting agentgate with durability = {want}");
                restart(&mut env, want)?;
                durability = want;
            }
            for workload in WORKLOADS {
                for threads in THREADS {
                    let host = if path == Path::Passthrough {
                        "127.0.0.2"
                    } else {
                        "127.0.0.1"
                    };
                    let args = sysbench_args(workload, host, threads, secs);
                    let a: Vec<&str> = args.iter().map(String::as_str).collect();
                    let mut c: Command = if path == Path::Direct {
                        let mut c = env.netns.command(a[0]);
                        c.args(&a[1..]);
                        c
                    } else {
                        env.exec("demo", &a)
                    };
                    let out = c.output()?;
                    let so = String::from_utf8_lossy(&out.stdout);
                    if !out.status.success() {
                        bail!(
                            "sysbench {workload} via {}: {}{}",
                            path.label(),
                            so,
                            String::from_utf8_lossy(&out.stderr)
                        );
                    }
                    let t = tps(&so)?;
                    eprintln!(
                        "my_bench: round {round} {:<18} {workload:<18} {threads} thr: {t:.0} tps",
                        path.label()
                    );
                    samples
                        .entry((path, workload, threads))
                        .or_default()
                        .push(t);
                }
            }
        }
    }
    let median = |k: (Path, &str, u32)| -> f64 {
        let mut v = samples.get(&k).cloned().unwrap_or_default();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    println!(
        "\nsysbench, {TABLES}x{TABLE_SIZE} rows, prepared statements, {secs} s per run, median of {rounds} round(s); tps and ratio to passthrough (and to direct)"
    );
    println!(
        "| workload | threads | direct | tcp passthrough | handler (batched) | handler (strict) |"
    );
    println!("|---|---|---|---|---|---|");
    let mut misses = Vec::new();
    for workload in WORKLOADS {
        for threads in THREADS {
            let d = median((Path::Direct, workload, threads));
            let p = median((Path::Passthrough, workload, threads));
            let b = median((Path::Batched, workload, threads));
            let s = median((Path::Strict, workload, threads));
            println!(
                "| {workload} | {threads} | {d:.0} | {p:.0} ({:.2}x) | {b:.0} ({:.2}x, {:.2}x) | {s:.0} ({:.2}x, {:.2}x) |",
                p / d,
                b / p,
                b / d,
                s / p,
                s / d
            );
            if threads == 1 && b / p < TARGET {
                misses.push(format!("{workload}: batched {:.2}x passthrough", b / p));
            }
        }
    }
    if misses.is_empty() {
        println!("\ntarget (handler >= {TARGET}x passthrough at 1 thread): MET");
    } else {
        println!(
            "\ntarget (handler >= {TARGET}x passthrough at 1 thread): MISS ({})",
            misses.join("; ")
        );
    }
    drop(db);
    Ok(())
}
