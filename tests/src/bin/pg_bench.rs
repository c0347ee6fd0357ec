//! `cargo xtask bench pg`: agentgate in front of Postgres, against Postgres
//! directly and against pgbouncer (session mode).
//!
//! One run, interleaved: every round runs every path (Postgres directly,
//! agentgate with batched and with strict audit durability, agentgate relaying
//! the same server as a plain TCP resource, pgbouncer) ×
//! workload (pgbench select-only and TPC-B-like, simple and prepared protocol)
//! × 1 and 8 clients, so the drift of a shared machine spreads over all of them;
//! each figure is the median over rounds. Odd rounds run the paths in reverse
//! order. Also: the 100-row `SELECT * FROM customers LIMIT 100` with 5 masked
//! columns, as a micro figure over the row masker with the real `MaskPolicy`
//! loaded from the bench's policy, and end to end (agentgate with masking vs the
//! same daemon on an unmasked resource vs direct).
//!
//! agentgate runs with its eBPF redirect (pgbench is started with `agentgate
//! exec`, tagged), audit on, the sockmap fast path on (its default). The TCP
//! passthrough path is the same daemon and redirect without the Postgres
//! handler: the difference to it is what decoding, deciding and auditing each
//! statement costs. Latency
//! percentiles come from pgbench's per-transaction logs; proxy CPU from the
//! proxy process's utime+stime in `/proc/PID/stat` around each run; RSS from
//! `/proc/PID/status` after each run.
//!
//! This is a measurement, not a test: it exits 0 when a target is missed and
//! says MISS. It exits 1 only when it could not measure at all. Needs root.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use agentgate::{
    mask::Masker,
    protocol::postgres::{
        codec::{DataRow, FieldDescription, RowDescription},
        mask::{MaskReport, RowPlan, Scratch, Unmaskable, oid},
    },
};
use agentgate_e2e::{
    DaemonOptions, Env, Proc,
    pg::{PASSWORD, PG_BIN, PgServer},
    run_ok,
};
use anyhow::{Context as _, Result, bail};

const PG_PORT: u16 = 5432;
const BOUNCER_PORT: u16 = 6432;
/// pgbench scale: 8 branches, so 8 TPC-B clients do not all queue on one row.
const SCALE: u32 = 8;
const CUSTOMERS: u32 = 1000;
/// Rows of the masked SELECT.
const MASK_ROWS: usize = 100;

/// The bench's policy: `demo` may do everything on Postgres; the resource at
/// 127.0.0.1 masks five `customers` columns and runs every detector, the same
/// server at `[::1]` is a second resource without masking (the end-to-end
/// masking cost is the difference), and the same server at 127.0.0.2 is a
/// plain TCP resource (relayed without the Postgres handler).
fn policy() -> String {
    format!(
        r#"
[defaults]
unknown_destination = "deny"

[[resource]]
name = "bench-pg"
protocol = "postgres"
addresses = ["127.0.0.1:{PG_PORT}"]
default_action = "deny"

[[resource]]
name = "bench-pg-unmasked"
protocol = "postgres"
addresses = ["[::1]:{PG_PORT}"]
default_action = "deny"

[[resource]]
name = "bench-tcp"
protocol = "tcp"
addresses = ["127.0.0.2:{PG_PORT}"]
default_action = "deny"

[[rule]]
name = "demo-everything"
identities = ["demo"]
resources = ["bench-pg", "bench-pg-unmasked", "bench-tcp"]
action = "allow"

[masking]
detectors = ["all"]
detector_strategy = "redact"
detector_resources = ["bench-pg"]

[[masking.column]]
columns = ["customers.ssn", "customers.card"]
strategy = "keep_last4"
resources = ["bench-pg"]

[[masking.column]]
columns = ["customers.email", "customers.name", "customers.balance"]
strategy = "redact"
resources = ["bench-pg"]
"#
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Via {
    Direct,
    Batched,
    Strict,
    Pgbouncer,
    /// agentgate (batched) on the resource without masking; masked SELECT only.
    BatchedUnmasked,
    /// agentgate relaying the server as a `tcp` resource: redirect, connection
    /// records, no Postgres handler.
    Passthrough,
}

impl Via {
    const MATRIX: [Via; 5] = [
        Self::Direct,
        Self::Batched,
        Self::Strict,
        Self::Passthrough,
        Self::Pgbouncer,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Batched => "agentgate, batched",
            Self::Strict => "agentgate, strict",
            Self::Pgbouncer => "pgbouncer (session)",
            Self::BatchedUnmasked => "agentgate, batched, unmasked resource",
            Self::Passthrough => "agentgate, TCP passthrough (no L7)",
        }
    }

    fn tagged(self) -> bool {
        matches!(
            self,
            Self::Batched | Self::Strict | Self::BatchedUnmasked | Self::Passthrough
        )
    }

    /// Through the Postgres handler (statement records).
    fn l7(self) -> bool {
        self.tagged() && self != Self::Passthrough
    }

    fn host_port(self) -> (&'static str, u16) {
        match self {
            Self::Pgbouncer => ("127.0.0.1", BOUNCER_PORT),
            Self::BatchedUnmasked => ("::1", PG_PORT),
            Self::Passthrough => ("127.0.0.2", PG_PORT),
            _ => ("127.0.0.1", PG_PORT),
        }
    }

    fn durability(self) -> Option<&'static str> {
        match self {
            Self::Batched | Self::BatchedUnmasked | Self::Passthrough => Some("batched"),
            Self::Strict => Some("strict"),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Workload {
    SelectSimple,
    SelectPrepared,
    TpcbSimple,
    TpcbPrepared,
    /// `SELECT * FROM customers LIMIT 100`, 5 of its 6 columns masked.
    Masked100,
}

impl Workload {
    const MATRIX: [Workload; 4] = [
        Self::SelectSimple,
        Self::SelectPrepared,
        Self::TpcbSimple,
        Self::TpcbPrepared,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::SelectSimple => "select-only (-S), simple",
            Self::SelectPrepared => "select-only (-S), prepared",
            Self::TpcbSimple => "TPC-B-like, simple",
            Self::TpcbPrepared => "TPC-B-like, prepared",
            Self::Masked100 => "SELECT 100 rows, 5 masked columns",
        }
    }

    fn args(self, script: &Path) -> Vec<String> {
        let v: &[&str] = match self {
            Self::SelectSimple => &["-S", "-M", "simple"],
            Self::SelectPrepared => &["-S", "-M", "prepared"],
            Self::TpcbSimple => &["-M", "simple"],
            Self::TpcbPrepared => &["-M", "prepared"],
            Self::Masked100 => &["-M", "simple", "-f"],
        };
        let mut v: Vec<String> = v.iter().map(|s| (*s).to_owned()).collect();
        if self == Self::Masked100 {
            v.push(script.display().to_string());
        }
        v
    }

    /// Statements per transaction that wait for a durable audit record: a
    /// write before it goes upstream, a read or transaction statement before
    /// its result is released (it runs meanwhile, so its wait overlaps the
    /// server's; the bound below charges a full fsync anyway, so it is
    /// conservative). The proxy records every `Query`, `Parse` and `Execute`:
    /// every statement of a transaction (`-S`: one SELECT; TPC-B-like: BEGIN,
    /// 3 UPDATEs, a SELECT, an INSERT, END), in the simple protocol and with
    /// `-M prepared` alike, where each `Execute` of a statement parsed once per
    /// connection has its own write-ahead record.
    fn write_ahead_statements(self) -> u32 {
        match self {
            Self::TpcbSimple | Self::TpcbPrepared => 7,
            Self::SelectSimple | Self::SelectPrepared | Self::Masked100 => 1,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Case {
    workload: Workload,
    clients: u32,
    path: Via,
}

#[derive(Clone, Debug)]
struct Sample {
    tps: f64,
    txns: u64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_ms_per_1k: Option<f64>,
    rss_kib: Option<u64>,
    hwm_kib: Option<u64>,
    /// The daemon's own mean `fdatasync` latency during the run, ms (from
    /// `agentgate status`; agentgate paths that synced).
    fsync_ms: Option<f64>,
}

struct Opts {
    rounds: u32,
    secs: u32,
    quick: bool,
    /// Only the masking micro benchmark (no servers, no root).
    micro_only: bool,
}

fn parse_args() -> Result<Opts> {
    let mut o = Opts {
        rounds: 5,
        secs: 4,
        quick: false,
        micro_only: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => {
                o.rounds = 1;
                o.secs = 2;
                o.quick = true;
            }
            "--rounds" => o.rounds = it.next().context("--rounds N")?.parse()?,
            "--secs" => o.secs = it.next().context("--secs N")?.parse()?,
            "--micro" => o.micro_only = true,
            "-h" | "--help" => {
                println!(
                    "pg_bench [--quick] [--rounds N] [--secs S] | --micro (the row masker alone)"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    if o.rounds == 0 || o.secs == 0 {
        bail!("--rounds and --secs must be at least 1");
    }
    Ok(o)
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pg_bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Everything the runs share.
struct Bench {
    env: Env,
    pg: PgServer,
    bouncer: Proc,
    /// Durability the running daemon was started with.
    durability: &'static str,
    logs: PathBuf,
    script: PathBuf,
    secs: u32,
    clk_tck: f64,
    failures: Vec<String>,
    /// Audit log bytes written by the daemons so far.
    audit_bytes: u64,
}

impl Bench {
    /// Postgres with pgbench's tables and `customers`, pgbouncer, and the
    /// daemon (batched); also whether masking shows on the wire.
    fn setup(secs: u32) -> Result<(Self, bool)> {
        let mut env = Env::prepare(
            "pgbench",
            DaemonOptions {
                policies: vec![("bench.toml".into(), policy())],
                audit_extra: "durability = \"batched\"".into(),
                ..Default::default()
            },
        )?;
        let pg = PgServer::start(&env.netns, PG_PORT, false)?;
        pg.seed_customers(CUSTOMERS)?;
        eprintln!("pg_bench: pgbench -i -s {SCALE}");
        run_ok(
            env.netns
                .command(format!("{PG_BIN}/pgbench"))
                .args(["-i", "-q", "-s", &SCALE.to_string()])
                .args(["-h", "127.0.0.1", "-p", &PG_PORT.to_string(), "-U"])
                .args(["postgres", "postgres"])
                .env("PGPASSWORD", PASSWORD),
        )?;
        let bouncer = start_pgbouncer(&env, &pg)?;
        env.start_daemon()?;
        check_daemon_pid(&env)?;
        let logs = env.state.join("pgbench-logs");
        let script = env.state.join("select100.sql");
        fs::write(
            &script,
            format!("SELECT * FROM customers LIMIT {MASK_ROWS};\n"),
        )?;
        let clk = run_ok(Command::new("getconf").arg("CLK_TCK"))?;
        let clk_tck: f64 = String::from_utf8_lossy(&clk.stdout).trim().parse()?;
        let masking_seen = masking_observed(&env)?;
        Ok((
            Self {
                env,
                pg,
                bouncer,
                durability: "batched",
                logs,
                script,
                secs,
                clk_tck,
                failures: Vec::new(),
                audit_bytes: 0,
            },
            masking_seen,
        ))
    }
}

fn run() -> Result<()> {
    let opts = parse_args()?;
    let started = Instant::now();

    eprintln!("pg_bench: masking micro benchmark");
    let micro = mask_micro()?;
    eprintln!("pg_bench: mask_row {micro:.0} ns/row");
    if opts.micro_only {
        println!("row masker: {micro:.0} ns/row");
        return Ok(());
    }

    let (mut b, masking_seen) = Bench::setup(opts.secs)?;
    let mut results: BTreeMap<Case, Vec<(u32, Sample)>> = BTreeMap::new();
    let mut fsync_s: Vec<f64> = Vec::new();
    let load_before = loadavg();
    for round in 0..opts.rounds {
        fsync_s.extend(fsync_latency(&b.env.state, 200)?);
        // Snake order: the paths of one case run back to back, alternately
        // forwards and backwards, so a ratio compares runs seconds apart.
        let mut backwards = round % 2 == 1;
        for group in case_groups() {
            let mut group = group;
            if backwards {
                group.reverse();
            }
            backwards = !backwards;
            for case in group {
                eprintln!(
                    "pg_bench: round {}/{} {} / {} / {} client(s)",
                    round + 1,
                    opts.rounds,
                    case.path.label(),
                    case.workload.label(),
                    case.clients
                );
                match b.run_case(case) {
                    Ok(s) => results.entry(case).or_default().push((round, s)),
                    Err(e) => {
                        eprintln!("pg_bench:   failed: {e:#}");
                        b.failures.push(format!(
                            "round {}: {} / {} / {}: {}",
                            round + 1,
                            case.path.label(),
                            case.workload.label(),
                            case.clients,
                            first_line(&format!("{e:#}"))
                        ));
                    }
                }
            }
        }
    }
    fsync_s.sort_by(f64::total_cmp);

    let report = Report {
        opts: &opts,
        results: &results,
        fsync_median_ms: quantile(&fsync_s, 0.5) * 1e3,
        fsync_p90_ms: quantile(&fsync_s, 0.9) * 1e3,
        micro_ns: micro,
        masking_seen,
        l7: Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../gateway-userspace/src/protocol/postgres/proxy.rs"
        ))
        .exists(),
        failures: &b.failures,
        elapsed: started.elapsed(),
        load: (load_before, loadavg()),
        audit_bytes: b.audit_bytes + dir_bytes(&b.env.state.join("audit")),
    }
    .render();
    print!("{report}");
    std::io::stdout().flush()?;
    let out = target_dir().join("bench-pg.md");
    fs::write(&out, &report).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("pg_bench: wrote {}", out.display());
    drop(b);
    Ok(())
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
        PathBuf::from,
    )
}

fn first_line(s: &str) -> String {
    let l = s.lines().next().unwrap_or_default();
    l.chars().take(300).collect()
}

/// The runs of one round, grouped by workload and client count; a group's
/// runs go back to back.
fn case_groups() -> Vec<Vec<Case>> {
    let mut v = Vec::new();
    for workload in Workload::MATRIX {
        for clients in [1, 8] {
            v.push(
                [
                    Via::Direct,
                    Via::Batched,
                    Via::Passthrough,
                    Via::Pgbouncer,
                    Via::Strict,
                ]
                .into_iter()
                .map(|path| Case {
                    workload,
                    clients,
                    path,
                })
                .collect(),
            );
        }
    }
    v.push(
        [Via::Direct, Via::BatchedUnmasked, Via::Batched]
            .into_iter()
            .map(|path| Case {
                workload: Workload::Masked100,
                clients: 1,
                path,
            })
            .collect(),
    );
    v
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

impl Bench {
    fn run_case(&mut self, case: Case) -> Result<Sample> {
        if let Some(d) = case.path.durability()
            && d != self.durability
        {
            self.restart_daemon(d)?;
        }
        // pgbench's own preparation (minus the VACUUM of the tables every
        // client reads, which is kept): the same table state for every run.
        for sql in [
            "VACUUM pgbench_branches",
            "VACUUM pgbench_tellers",
            "TRUNCATE pgbench_history",
        ] {
            self.pg.admin_sql(sql)?;
        }
        let _ = fs::remove_dir_all(&self.logs);
        fs::create_dir_all(&self.logs)?;
        let (host, port) = case.path.host_port();
        let mut args: Vec<String> = [
            "-h",
            host,
            "-p",
            &port.to_string(),
            "-U",
            "postgres",
            "-n",
            "-T",
            &self.secs.to_string(),
            "-c",
            &case.clients.to_string(),
            "-j",
            "1",
            "-l",
            "--log-prefix",
            &self.logs.join("tx").display().to_string(),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.extend(case.workload.args(&self.script));
        args.push("postgres".into());
        let pgbench = format!("{PG_BIN}/pgbench");
        let mut cmd = if case.path.tagged() {
            let mut all = vec![pgbench.as_str()];
            all.extend(args.iter().map(String::as_str));
            self.env.exec("demo", &all)
        } else {
            let mut c = self.env.netns.command(&pgbench);
            c.args(&args);
            c
        };
        cmd.env("PGPASSWORD", PASSWORD);
        let proxy_pid = match case.path {
            Via::Direct => None,
            Via::Pgbouncer => Some(self.bouncer.pid()),
            _ => self.env.daemon.as_ref().map(Proc::pid),
        };
        let agentgate = !matches!(case.path, Via::Direct | Via::Pgbouncer);
        let s0 = agentgate.then(|| audit_fsyncs(&self.env)).flatten();
        let t0 = proxy_pid.and_then(cpu_ticks);
        let out = run_ok(&mut cmd)?;
        let t1 = proxy_pid.and_then(cpu_ticks);
        let s1 = agentgate.then(|| audit_fsyncs(&self.env)).flatten();
        let text = String::from_utf8_lossy(&out.stdout);
        let txns: u64 = field_after(&text, "number of transactions actually processed:")
            .context("pgbench printed no transaction count")?
            .parse()?;
        let tps: f64 = field_after(&text, "tps =")
            .context("pgbench printed no tps")?
            .parse()?;
        if txns == 0 {
            bail!("no transactions completed");
        }
        let mut lat = read_latencies(&self.logs)?;
        if lat.is_empty() {
            bail!("pgbench wrote no per-transaction log");
        }
        lat.sort_by(f64::total_cmp);
        let cpu_ms_per_1k = match (t0, t1) {
            (Some(a), Some(b)) => Some((b - a) as f64 / self.clk_tck * 1e3 / txns as f64 * 1000.0),
            _ => None,
        };
        Ok(Sample {
            tps,
            txns,
            p50_ms: quantile(&lat, 0.5),
            p99_ms: quantile(&lat, 0.99),
            cpu_ms_per_1k,
            rss_kib: proxy_pid.and_then(|p| status_kib(p, "VmRSS:")),
            hwm_kib: proxy_pid.and_then(|p| status_kib(p, "VmHWM:")),
            fsync_ms: fsync_mean_ms(s0, s1),
        })
    }

    fn restart_daemon(&mut self, durability: &'static str) -> Result<()> {
        eprintln!("pg_bench: restarting agentgate with durability = {durability}");
        if let Some(mut d) = self.env.daemon.take() {
            d.terminate();
        }
        // A fresh log per daemon: this bench writes about 1 KiB of audit per
        // statement (gigabytes per round); keeping them all would fill small
        // disks.
        let audit = self.env.state.join("audit");
        self.audit_bytes += dir_bytes(&audit);
        fs::remove_dir_all(&audit).with_context(|| format!("removing {}", audit.display()))?;
        self.env.opts.audit_extra = format!("durability = \"{durability}\"");
        self.env.write_config()?;
        self.env.start_daemon()?;
        check_daemon_pid(&self.env)?;
        self.durability = durability;
        Ok(())
    }
}

/// The daemon's audit fsync count and total fsync time (µs) so far.
fn audit_fsyncs(env: &Env) -> Option<(u64, u64)> {
    let out = env.agentgate(&["status", "--json"]).output().ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let s = &v["audit"]["stats"];
    Some((s["fsyncs"].as_u64()?, s["fsync_micros_total"].as_u64()?))
}

/// The mean fsync latency (ms) between two [`audit_fsyncs`] readings.
fn fsync_mean_ms(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> Option<f64> {
    let ((n0, us0), (n1, us1)) = (before?, after?);
    (n1 > n0).then(|| (us1 - us0) as f64 / (n1 - n0) as f64 / 1e3)
}

fn dir_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir).map_or(0, |entries| {
        entries
            .filter_map(Result::ok)
            .filter_map(|e| e.metadata().ok())
            .filter(fs::Metadata::is_file)
            .map(|m| m.len())
            .sum()
    })
}

/// The harness starts the daemon through `sh -c 'exec nsenter ... agentgate'`;
/// CPU and RSS are only the proxy's if that pid is the daemon itself.
fn check_daemon_pid(env: &Env) -> Result<()> {
    let pid = env.daemon.as_ref().context("no daemon")?.pid();
    let comm = fs::read_to_string(format!("/proc/{pid}/comm"))?;
    if comm.trim() != "agentgate" {
        bail!("daemon pid {pid} is {comm:?}, not agentgate: CPU/RSS would be wrong");
    }
    Ok(())
}

/// The text after `key` up to the next whitespace, in pgbench's summary.
fn field_after<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
}

/// Per-transaction latencies (ms) from pgbench `-l` logs: `client_id
/// transaction_no time_us script_no epoch epoch_us`; failed transactions are
/// skipped.
fn read_latencies(dir: &Path) -> Result<Vec<f64>> {
    let mut v = Vec::new();
    for e in fs::read_dir(dir)? {
        let text = fs::read_to_string(e?.path())?;
        for line in text.lines() {
            if let Some(us) = line
                .split_whitespace()
                .nth(2)
                .and_then(|t| t.parse::<f64>().ok())
            {
                v.push(us / 1e3);
            }
        }
    }
    Ok(v)
}

/// utime + stime (clock ticks) of a process, all threads.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the comm field: state is field 3, utime 14, stime 15.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// `q`-quantile of sorted data (nearest rank).
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => f64::midpoint(v[n / 2 - 1], v[n / 2]),
    }
}

/// Seconds per 4 KiB append + `fdatasync` in `dir` (the audit log's file
/// system: the audit writer appends to a segment file and `fdatasync`s it).
fn fsync_latency(dir: &Path, iters: usize) -> Result<Vec<f64>> {
    let path = dir.join("fsync-probe");
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    let block = [0x5au8; 4096];
    let mut v = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        f.write_all(&block)?;
        f.sync_data()?;
        v.push(t.elapsed().as_secs_f64());
    }
    drop(f);
    fs::remove_file(&path)?;
    Ok(v)
}

/// pgbouncer in session mode on 127.0.0.1:6432, as user postgres, in the netns.
fn start_pgbouncer(env: &Env, pg: &PgServer) -> Result<Proc> {
    let dir = env.state.join("pgbouncer");
    fs::create_dir_all(&dir)?;
    // Test-only password (the harness's); pgbouncer needs it in clear to do
    // SCRAM both to the client and to the server.
    fs::write(
        dir.join("userlist.txt"),
        format!("\"postgres\" \"{PASSWORD}\"\n"),
    )?;
    fs::write(
        dir.join("pgbouncer.ini"),
        format!(
            "[databases]\npostgres = host=127.0.0.1 port={port} dbname=postgres\n\n\
             [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {BOUNCER_PORT}\n\
             unix_socket_dir =\nauth_type = scram-sha-256\nauth_file = {dir}/userlist.txt\n\
             pool_mode = session\nmax_client_conn = 100\ndefault_pool_size = 20\n\
             logfile = {dir}/pgbouncer.log\nlog_connections = 0\nlog_disconnections = 0\n",
            port = pg.port,
            dir = dir.display()
        ),
    )?;
    run_ok(
        Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir),
    )?;
    // setpriv execs (runuser would fork): the pid is pgbouncer's own.
    let mut c = env.netns.command("setpriv");
    c.args(["--reuid=postgres", "--regid=postgres", "--init-groups"])
        .arg("/usr/sbin/pgbouncer")
        .arg(dir.join("pgbouncer.ini"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let p = Proc::spawn("pgbouncer", c)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ok = env
            .netns
            .command(format!("{PG_BIN}/psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &BOUNCER_PORT.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-qAtc",
                "SELECT 1",
            ])
            .env("PGPASSWORD", PASSWORD)
            .output()
            .is_ok_and(|o| o.status.success());
        if ok {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "pgbouncer did not answer: {}",
                fs::read_to_string(dir.join("pgbouncer.log")).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let comm = fs::read_to_string(format!("/proc/{}/comm", p.pid()))?;
    if comm.trim() != "pgbouncer" {
        bail!("pgbouncer pid is {comm:?}: CPU/RSS would be wrong");
    }
    Ok(p)
}

/// Whether a tagged client reading `customers.ssn` through agentgate sees it
/// masked (the L7 handler is in) or in clear (relayed at L4).
fn masking_observed(env: &Env) -> Result<bool> {
    let q = |host: &str, tagged: bool| -> Result<String> {
        let psql = format!("{PG_BIN}/psql");
        let url =
            format!("host={host} port={PG_PORT} user=postgres dbname=postgres sslmode=disable");
        let sql = "SELECT ssn FROM customers WHERE id = 1";
        let args = [psql.as_str(), url.as_str(), "-qAtc", sql];
        let mut c = if tagged {
            env.exec("demo", &args)
        } else {
            let mut c = env.netns.command(&psql);
            c.args(&args[1..]);
            c
        };
        c.env("PGPASSWORD", PASSWORD);
        Ok(String::from_utf8_lossy(&run_ok(&mut c)?.stdout)
            .trim()
            .to_owned())
    };
    let direct = q("127.0.0.1", false)?;
    let proxied = q("127.0.0.1", true)?;
    let unmasked = q("::1", true)?;
    if unmasked != direct {
        bail!("the unmasked resource changed a value: the comparison would be wrong");
    }
    Ok(proxied != direct)
}

/// ns per row of `RowPlan::mask_row_into` (what the proxy calls: it writes the
/// masked message into the connection's output buffer) over 100 `customers` rows (text format,
/// as `SELECT * FROM customers LIMIT 100` returns them) with the bench policy's
/// `MaskPolicy`: 5 columns masked by rule, the 6th scanned by every detector.
fn mask_micro() -> Result<f64> {
    const TABLE_OID: u32 = 16_384;
    let set = agentgate::policy::load_str(&[("bench.toml", &policy())])
        .map_err(|e| anyhow::anyhow!("bench policy: {e}"))?;
    let resource = set.resource("bench-pg").context("bench-pg resource")?;
    let masker = Masker::new(set.masking_for(resource));
    let cols = [
        ("id", oid::INT4),
        ("name", oid::TEXT),
        ("email", oid::TEXT),
        ("ssn", oid::TEXT),
        ("card", oid::TEXT),
        ("balance", oid::NUMERIC),
    ];
    let desc = RowDescription {
        fields: cols
            .iter()
            .enumerate()
            .map(|(i, (name, ty))| FieldDescription {
                name: bytes::Bytes::from_static(name.as_bytes()),
                table_oid: TABLE_OID,
                column_attr: i as i16 + 1,
                type_oid: *ty,
                type_size: -1,
                type_modifier: -1,
                format: 0,
            })
            .collect(),
    };
    // The values `seed_customers` writes.
    let rows: Vec<DataRow> = (1..=MASK_ROWS)
        .map(|i| {
            let vals = [
                i.to_string(),
                format!("Customer {i}"),
                format!("user{i}@example.com"),
                format!("{:03}-{:02}-{:04}", 100 + i % 600, 10 + i % 89, 1000 + i),
                "4111111111111111".to_owned(),
                format!("{:.1}", i as f64 * 10.5),
            ];
            DataRow::from_fields(vals.iter().map(|v| Some(v.as_bytes())))
        })
        .collect();
    let plan = RowPlan::new(
        &desc,
        &masker,
        |o| (o == TABLE_OID).then(|| "public.customers".to_owned()),
        Unmaskable::Null,
    )?;
    let ruled: Vec<&str> = plan.ruled_columns().collect();
    if ruled.len() != 5 {
        bail!("expected 5 masked columns, the policy masks {ruled:?}");
    }
    let mut scratch = Scratch::default();
    let mut report = MaskReport::default();
    // Sanity: every row changes, and no clear value is left.
    for r in &rows {
        let out = plan
            .mask_row(&masker, r, &mut scratch, &mut report)?
            .context("a row was not masked")?;
        let any_clear = out.fields().flatten().any(|v| {
            v.windows(4).any(|w| w == b"4111") || v.windows(12).any(|w| w == b"@example.com")
        });
        if any_clear {
            bail!("a masked row still holds a card number or an email");
        }
    }
    // Preemption on a shared machine only ever adds time: the fastest of many
    // short batches is the cost of the code.
    let mut best = f64::INFINITY;
    let mut out = bytes::BytesMut::new();
    for _ in 0..25 {
        let iters = 100;
        let t = Instant::now();
        for _ in 0..iters {
            out.clear();
            for r in &rows {
                std::hint::black_box(plan.mask_row_into(
                    &masker,
                    r,
                    &mut scratch,
                    &mut report,
                    &mut out,
                )?);
            }
        }
        best = best.min(t.elapsed().as_nanos() as f64 / (iters * MASK_ROWS) as f64);
    }
    Ok(best)
}

struct Report<'a> {
    opts: &'a Opts,
    results: &'a BTreeMap<Case, Vec<(u32, Sample)>>,
    fsync_median_ms: f64,
    fsync_p90_ms: f64,
    micro_ns: f64,
    masking_seen: bool,
    l7: bool,
    failures: &'a [String],
    elapsed: Duration,
    /// Load averages before and after.
    load: (String, String),
    audit_bytes: u64,
}

/// Medians of one case over rounds.
struct Agg {
    tps: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu: Option<f64>,
    rss_mib: Option<f64>,
    hwm_mib: Option<f64>,
    n: usize,
}

fn agg(v: &[(u32, Sample)]) -> Agg {
    let opt = |f: &dyn Fn(&Sample) -> Option<f64>| {
        let xs: Vec<f64> = v.iter().filter_map(|(_, s)| f(s)).collect();
        (!xs.is_empty()).then(|| median(xs))
    };
    Agg {
        tps: median(v.iter().map(|(_, s)| s.tps).collect()),
        p50_ms: median(v.iter().map(|(_, s)| s.p50_ms).collect()),
        p99_ms: median(v.iter().map(|(_, s)| s.p99_ms).collect()),
        cpu: opt(&|s| s.cpu_ms_per_1k),
        rss_mib: opt(&|s| s.rss_kib.map(|k| k as f64 / 1024.0)),
        hwm_mib: v
            .iter()
            .filter_map(|(_, s)| s.hwm_kib)
            .max()
            .map(|k| k as f64 / 1024.0),
        n: v.len(),
    }
}

fn pass(ok: bool) -> &'static str {
    if ok { "PASS" } else { "**MISS**" }
}

fn case(workload: Workload, clients: u32, path: Via) -> Case {
    Case {
        workload,
        clients,
        path,
    }
}

impl Report<'_> {
    fn samples(&self, c: Case) -> &[(u32, Sample)] {
        self.results.get(&c).map_or(&[], Vec::as_slice)
    }

    fn get(&self, c: Case) -> Option<Agg> {
        let v = self.samples(c);
        (!v.is_empty()).then(|| agg(v))
    }

    /// Median over rounds of `f(a, b)` for the runs of `a` and `b` in the same
    /// round (runs seconds apart, so load drift cancels).
    fn paired(&self, a: Case, b: Case, f: impl Fn(&Sample, &Sample) -> f64) -> Option<f64> {
        let xs: Vec<f64> = self
            .samples(a)
            .iter()
            .filter_map(|(ra, sa)| {
                self.samples(b)
                    .iter()
                    .find(|(rb, _)| rb == ra)
                    .map(|(_, sb)| f(sa, sb))
            })
            .collect();
        (!xs.is_empty()).then(|| median(xs))
    }

    /// The strict-durability bound for one round's batched run (see `render`).
    fn bound(&self, workload: Workload, clients: u32, batched: &Sample) -> f64 {
        bound_with(self.fsync_median_ms, workload, clients, batched)
    }

    fn header(&self, s: &mut String) {
        let o = self.opts;
        let _ = writeln!(
            s,
            "## PostgreSQL: agentgate vs direct and pgbouncer\n\n\
             `cargo xtask bench pg{}`: {} round(s) × {} s per run; in each round the five paths of one \
             workload and client count run back to back (alternately forwards and backwards). Figures are \
             medians over rounds; ratios are medians of the ratios within each round. \
             {} CPUs, {}, load average {} before and {} after (a shared machine). \
             PostgreSQL 15 (fsync off, so the database itself never waits for the disk), pgbench scale {SCALE}, \
             one pgbench thread. pgbouncer {} in session mode. agentgate: eBPF redirect, audit on, policy \
             with 5 column rules and all detectors, sockmap fast path on; Postgres {} (masking {} on the wire). \
             The TCP passthrough path is the same daemon relaying the same server as a `tcp` resource \
             (redirect and connection records, no Postgres handler). \
             Audit-disk fsync (4 KiB append + fdatasync): median {:.3} ms, p90 {:.3} ms. Took {:.0} s.\n",
            if o.quick { " --quick" } else { "" },
            o.rounds,
            o.secs,
            std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
            kernel(),
            self.load.0,
            self.load.1,
            version("/usr/sbin/pgbouncer"),
            if self.l7 {
                "L7 handler in"
            } else {
                "relayed at L4 (no L7 handler in this build)"
            },
            if self.masking_seen {
                "observed"
            } else {
                "NOT observed"
            },
            self.fsync_median_ms,
            self.fsync_p90_ms,
            self.elapsed.as_secs_f64(),
        );
    }

    /// Audit volume: total, and per transaction through agentgate.
    fn audit_volume(&self, s: &mut String) {
        let tagged: u64 = self
            .results
            .iter()
            .filter(|(c, _)| c.path.l7())
            .flat_map(|(_, v)| v.iter().map(|(_, x)| x.txns))
            .sum();
        let _ = writeln!(
            s,
            "\nAudit written: {:.2} GiB for {tagged} transactions through agentgate, {:.0} bytes per \
             transaction through the Postgres handler (statement and result records, connection records). Each daemon start gets a \
             fresh log, to bound the disk space a run takes.",
            self.audit_bytes as f64 / f64::from(1u32 << 30),
            self.audit_bytes as f64 / tagged.max(1) as f64,
        );
    }

    fn main_table(&self, s: &mut String) {
        let _ = writeln!(
            s,
            "| workload | clients | path | TPS | × direct | p50 ms | p99 ms | proxy CPU ms / 1k tx | proxy RSS MiB (peak) |\n\
             |---|---:|---|---:|---:|---:|---:|---:|---:|"
        );
        for workload in Workload::MATRIX {
            for clients in [1, 8] {
                for path in Via::MATRIX {
                    let this = case(workload, clients, path);
                    let Some(a) = self.get(this) else {
                        let _ = writeln!(
                            s,
                            "| {} | {clients} | {} | failed | | | | | |",
                            workload.label(),
                            path.label()
                        );
                        continue;
                    };
                    let ratio = self.paired(this, case(workload, clients, Via::Direct), |x, d| {
                        x.tps / d.tps
                    });
                    let partial = if a.n < self.opts.rounds as usize {
                        format!(" ({} of {} rounds)", a.n, self.opts.rounds)
                    } else {
                        String::new()
                    };
                    let _ = writeln!(
                        s,
                        "| {} | {clients} | {}{partial} | {:.0} | {} | {:.3} | {:.3} | {} | {} |",
                        workload.label(),
                        path.label(),
                        a.tps,
                        ratio.map_or("–".into(), |r| format!("{r:.2}")),
                        a.p50_ms,
                        a.p99_ms,
                        a.cpu.map_or("–".into(), |cpu| format!("{cpu:.1}")),
                        match (a.rss_mib, a.hwm_mib) {
                            (Some(rss), Some(peak)) => format!("{rss:.1} ({peak:.1})"),
                            _ => "–".into(),
                        },
                    );
                }
            }
        }
    }

    /// Batched against the TCP passthrough of the same daemon: what the
    /// Postgres handler (decode, decide, audit each statement) costs, and the
    /// transport alone against direct and pgbouncer.
    fn handler_table(&self, s: &mut String) {
        let _ = writeln!(
            s,
            "\n### The transport alone, and what the Postgres handler adds\n\n\
             TCP passthrough: the same daemon, redirect and fast path, relaying the same server as a `tcp` \
             resource (connection records only). Ratios are medians of the ratios within each round.\n\n\
             | workload | clients | passthrough × direct | passthrough × pgbouncer | batched × passthrough | \
             handler CPU µs / tx (batched − passthrough) | handler p50 µs (batched − passthrough) |\n\
             |---|---:|---:|---:|---:|---:|---:|"
        );
        let cell = |r: Option<f64>, unit: &str, digits: usize| {
            r.map_or("–".into(), |r| format!("{r:.digits$}{unit}"))
        };
        for workload in Workload::MATRIX {
            for clients in [1, 8] {
                let c = |path| case(workload, clients, path);
                let pass_tps = |a: &Sample, b: &Sample| a.tps / b.tps;
                let _ = writeln!(
                    s,
                    "| {} | {clients} | {} | {} | {} | {} | {} |",
                    workload.label(),
                    cell(
                        self.paired(c(Via::Passthrough), c(Via::Direct), pass_tps),
                        "",
                        2
                    ),
                    cell(
                        self.paired(c(Via::Passthrough), c(Via::Pgbouncer), pass_tps),
                        "",
                        2
                    ),
                    cell(
                        self.paired(c(Via::Batched), c(Via::Passthrough), pass_tps),
                        "",
                        2
                    ),
                    cell(
                        self.paired(c(Via::Batched), c(Via::Passthrough), |b, p| {
                            match (b.cpu_ms_per_1k, p.cpu_ms_per_1k) {
                                (Some(b), Some(p)) => b - p,
                                _ => f64::NAN,
                            }
                        }),
                        "",
                        1
                    ),
                    cell(
                        self.paired(c(Via::Batched), c(Via::Passthrough), |b, p| {
                            (b.p50_ms - p.p50_ms) * 1e3
                        }),
                        "",
                        0
                    ),
                );
            }
        }
    }

    /// The masked SELECT table; returns the end-to-end ns per row.
    fn masking_table(&self, s: &mut String) -> Option<f64> {
        let _ = writeln!(
            s,
            "\n### `SELECT * FROM customers LIMIT {MASK_ROWS}` (5 of 6 columns masked), 1 client\n\n\
             | path | TPS | p50 ms | p99 ms | proxy CPU ms / 1k tx |\n|---|---:|---:|---:|---:|"
        );
        for path in [Via::Direct, Via::BatchedUnmasked, Via::Batched] {
            let label = if path == Via::Batched {
                "agentgate, batched, masked resource"
            } else {
                path.label()
            };
            match self.get(case(Workload::Masked100, 1, path)) {
                Some(a) => {
                    let _ = writeln!(
                        s,
                        "| {label} | {:.0} | {:.3} | {:.3} | {} |",
                        a.tps,
                        a.p50_ms,
                        a.p99_ms,
                        a.cpu.map_or("–".into(), |c| format!("{c:.1}")),
                    );
                }
                None => {
                    let _ = writeln!(s, "| {label} | failed | | | |");
                }
            }
        }
        let e2e_ns = self.paired(
            case(Workload::Masked100, 1, Via::Batched),
            case(Workload::Masked100, 1, Via::BatchedUnmasked),
            |m, u| (m.p50_ms - u.p50_ms) * 1e6 / MASK_ROWS as f64,
        );
        let _ = writeln!(
            s,
            "\nMasking cost per row: {:.0} ns in the row masker alone (`RowPlan::mask_row_into` with the \
             bench policy's `MaskPolicy`: 5 columns by rule, the 6th scanned by all detectors; 100 rows, \
             fastest of 25 batches of 100 passes); end to end {} ((p50 on the masked resource − p50 on the unmasked \
             resource, same daemon, same round) / {MASK_ROWS} rows{}).",
            self.micro_ns,
            e2e_ns.map_or("n/a".into(), |n| format!("{n:.0} ns")),
            if self.masking_seen {
                ""
            } else {
                "; no masking on the wire in this build, so this is noise"
            },
        );
        e2e_ns
    }

    /// The strict-durability target's measured cell, and whether it passes.
    fn strict_target(&self, workload: Workload, clients: u32) -> (String, bool) {
        let st = case(workload, clients, Via::Strict);
        let ba = case(workload, clients, Via::Batched);
        let r = self.paired(st, ba, |st, ba| st.tps / self.bound(workload, clients, ba));
        let bound = self.paired(ba, ba, |_, ba| self.bound(workload, clients, ba));
        // The same bound with the daemon's own fsync latency under
        // this load (reported, not judged: see the header).
        let in_situ_f: Vec<f64> = self
            .samples(st)
            .iter()
            .filter_map(|(_, x)| x.fsync_ms)
            .collect();
        let every_run = !in_situ_f.is_empty() && in_situ_f.len() == self.samples(st).len();
        let in_situ = every_run
            .then(|| {
                self.paired(st, ba, |st, ba| {
                    let f = st.fsync_ms.unwrap_or(f64::NAN);
                    st.tps / bound_with(f, workload, clients, ba)
                })
            })
            .flatten();
        let in_situ = in_situ.map_or(String::new(), |r| {
            format!(
                "; under load fsync {:.3} ms: {r:.2} × that bound",
                median(in_situ_f)
            )
        });
        let measured = match (r, bound, self.get(st)) {
            (Some(r), Some(b), Some(a)) => {
                format!("{:.0} TPS, {r:.2} × bound {b:.0}{in_situ}", a.tps)
            }
            _ => "failed".into(),
        };
        (measured, r.is_some_and(|r| r >= 0.9))
    }

    fn targets(&self, s: &mut String, e2e_ns: Option<f64>) {
        let _ = writeln!(
            s,
            "\n### Targets\n\n| target | measured | result |\n|---|---:|---|"
        );
        for workload in Workload::MATRIX {
            let r = self.paired(
                case(workload, 1, Via::Batched),
                case(workload, 1, Via::Direct),
                |b, d| b.tps / d.tps,
            );
            let _ = writeln!(
                s,
                "| batched TPS ≥ 0.85 × direct, 1 client, {} | {} | {} |",
                workload.label(),
                r.map_or("failed".into(), |r| format!("{r:.2}×")),
                pass(r.is_some_and(|r| r >= 0.85))
            );
        }
        for workload in Workload::MATRIX {
            let r = self.paired(
                case(workload, 8, Via::Batched),
                case(workload, 8, Via::Pgbouncer),
                |b, p| b.tps / p.tps,
            );
            let _ = writeln!(
                s,
                "| batched TPS ≥ pgbouncer, 8 clients, {} | {} | {} |",
                workload.label(),
                r.map_or("failed".into(), |r| format!("{r:.2}× pgbouncer")),
                pass(r.is_some_and(|r| r >= 1.0))
            );
        }
        for workload in Workload::MATRIX {
            for clients in [1, 8] {
                let (measured, ok) = self.strict_target(workload, clients);
                let _ = writeln!(
                    s,
                    "| strict TPS ≥ 0.9 × fsync bound, {clients} client{}, {} | {measured} | {} |",
                    if clients == 1 { "" } else { "s" },
                    workload.label(),
                    pass(ok)
                );
            }
        }
        let _ = writeln!(
            s,
            "| masking ≤ 300 ns per row (row masker) | {:.0} ns | {} |",
            self.micro_ns,
            pass(self.micro_ns <= 300.0)
        );
        let _ = writeln!(
            s,
            "| masking ≤ 300 ns per row (end to end) | {} | {} |",
            e2e_ns.map_or("failed".into(), |n| format!("{n:.0} ns")),
            if self.masking_seen {
                pass(e2e_ns.is_some_and(|n| n <= 300.0))
            } else {
                "n/a: not masked on the wire"
            }
        );
        let _ = writeln!(
            s,
            "\nThe strict-durability bound: with `durability = \"strict\"` an append returns once the record \
             is fdatasync'ed. The proxy records every statement it decides and every execution (every \
             simple-protocol `Query`, every `Parse`, every `Execute`): a write goes upstream only after its record is durable; a read or transaction \
             statement goes at once but its result reaches the client only after its record is durable. So \
             each of the S decided statements of a transaction waits for one whole fsync, of latency f, \
             before its client sees anything (group commit lets clients share an fsync but cannot shorten \
             that wait; for reads it overlaps the server's work, which makes the bound conservative). S = 1 for select-only and 7 for TPC-B-like (BEGIN, 3 UPDATE, \
             SELECT, INSERT, END), in the simple protocol and with `-M prepared` alike (pgbench parses once \
             per connection, then each `Execute` is recorded like a statement; result records are appended \
             after the statement ran, not awaited). Everything else a transaction costs \
             is what it costs with batched durability, t = N / TPS_batched(N) for N clients, so \
             TPS_bound(N) = N / (S·f + t), with f the median fsync above and TPS_batched from the same round; \
             1 / (S·f) is the per-client ceiling from fsync alone. The targets judge the bound with f \
             measured on an idle machine; each strict row also gives the daemon's own mean fdatasync \
             latency during that run (from `agentgate status`) and the ratio to the bound with it: with \
             pgbench, the server and the proxy on the same cores, the journal's commit waits for CPU too."
        );
    }

    fn render(&self) -> String {
        let mut s = String::new();
        self.header(&mut s);
        self.main_table(&mut s);
        self.audit_volume(&mut s);
        self.handler_table(&mut s);
        let e2e = self.masking_table(&mut s);
        self.targets(&mut s, e2e);
        if !self.failures.is_empty() {
            let _ = writeln!(s, "\nFailed runs:\n");
            for f in self.failures {
                let _ = writeln!(s, "- {f}");
            }
        }
        s
    }
}

fn kernel() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "Linux".into(), |r| format!("Linux {}", r.trim()))
}

fn version(bin: &str) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
        })
        .unwrap_or_default()
}

/// The strict-durability bound, `TPS_bound(N) = N / (S·f + N / TPS_batched)`,
/// with the fsync latency `f` in ms (see `Report::header`).
fn bound_with(fsync_ms: f64, workload: Workload, clients: u32, batched: &Sample) -> f64 {
    let f = fsync_ms / 1e3;
    let n = f64::from(clients);
    n / (f64::from(workload.write_ahead_statements()) * f + n / batched.tps)
}
