//! `cargo xtask setup | build-ebpf | run | test | bench`.
//!
//! Every step that installs something checks first, so a second run is a fast
//! no-op. Nothing here downloads anything but packages from the registries
//! (Debian, crates.io, `PyPI`, npm) by name.

use std::{
    env,
    ffi::OsStr,
    fs,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

mod demo;
mod local;
mod procs;

#[derive(Parser)]
#[command(name = "xtask", about = "agentgate's build, run and test tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain and the test dependencies (idempotent).
    Setup,
    /// Build the eBPF object with nightly and bpf-linker.
    BuildEbpf,
    /// Set up, build, and run the daemon in the foreground on a local default config.
    Run {
        /// Replace `.state/agentgate.toml` with the default this command writes
        /// (the old file is kept as `agentgate.toml.old`); the audit log is kept.
        #[arg(long)]
        fresh: bool,
        /// With --fresh: also delete the audit log and the approvals store.
        #[arg(long, requires = "fresh")]
        discard_audit: bool,
        /// Run this agentgate binary instead of building the release one (tests).
        #[arg(long, hide = true)]
        bin: Option<PathBuf>,
        /// State directory instead of `.state` (tests; no pointer file is written).
        #[arg(long, hide = true)]
        state: Option<PathBuf>,
        /// Extra arguments after `agentgate run`.
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Set up, then fmt, clippy, unit tests and the root end-to-end tests.
    Test {
        /// Only run tests whose name contains this filter.
        filter: Option<String>,
        /// Skip fmt and clippy.
        #[arg(long)]
        no_lint: bool,
    },
    /// Issue 17's scenario for a person: an `OpenAI` Agents SDK agent under a
    /// verified identity, approvals, and the evidence package it leaves.
    Demo,
    /// Benchmarks: `audit`, `policy`, `evidence`, `pg`, or all when omitted.
    Bench {
        which: Option<String>,
        /// `pg` only: one short round, to check that it runs.
        #[arg(long)]
        quick: bool,
    },
}

/// Debian packages the build and the tests need.
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "bpftool",
    "iproute2",
    "postgresql",
    "postgresql-client",
    "mariadb-server",
    "pgbouncer",
    "curl",
    "nftables",
    // The SSH handler's tests: a real sshd, the OpenSSH clients, paramiko (Debian's python3).
    "openssh-server",
    "openssh-client",
    "python3-paramiko",
    "sudo",
    // The approvals page test and the report screenshots drive it (npm playwright-core).
    "chromium",
    // `cargo xtask bench mysql` drives it.
    "sysbench",
    // The HTTP test upstream's br and zstd bodies.
    "brotli",
    "zstd",
];

/// Python modules the tests import, with the `PyPI` requirement that provides each.
const PY_PACKAGES: &[(&str, &str)] = &[
    ("psycopg", "psycopg[binary]==3.2.*"),
    // MySQL: text protocol (PyMySQL, ed25519 through PyNaCl) and binary
    // protocol (mysql-connector-python's prepared cursors).
    ("pymysql", "PyMySQL==1.1.*"),
    ("nacl", "PyNaCl==1.5.*"),
    ("mysql.connector", "mysql-connector-python==9.*"),
];

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let root = workspace_root();
    env::set_current_dir(&root)?;
    match cli.command {
        Task::Setup => setup(&root),
        Task::BuildEbpf => build_ebpf(&root),
        Task::Run {
            fresh,
            discard_audit,
            bin,
            state,
            args,
        } => local::run(
            &root,
            &local::Options {
                fresh,
                discard_audit,
                bin,
                state,
            },
            &args,
        ),
        Task::Test { filter, no_lint } => test(&root, filter.as_deref(), no_lint),
        Task::Demo => demo::run(&root),
        Task::Bench { which, quick } => bench(&root, which.as_deref(), quick),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cmd<S: AsRef<OsStr>>(program: S) -> Command {
    Command::new(program)
}

fn status(c: &mut Command) -> Result<()> {
    let st = c.status().with_context(|| format!("running {c:?}"))?;
    if !st.success() {
        bail!("{c:?} failed: {st}");
    }
    Ok(())
}

fn succeeds(c: &mut Command) -> bool {
    c.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn is_root() -> bool {
    cmd("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

fn setup(root: &Path) -> Result<()> {
    if !is_root() {
        bail!("setup installs packages and the tests load eBPF programs: run as root");
    }
    // 1. nightly rust-src for -Z build-std=core.
    let installed = cmd("rustup")
        .args(["component", "list", "--toolchain", "nightly", "--installed"])
        .output()?;
    if !String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        status(cmd("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    }
    // 2. Debian packages.
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !cmd("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if !missing.is_empty() {
        eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
        status(cmd("apt-get").args(["update", "-q"]))?;
        status(
            cmd("apt-get")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&missing)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    // 3. bpf-linker built against LLVM 22.
    let linker_ok = cmd("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("0.13.0"));
    if !linker_ok {
        let path = format!(
            "/usr/lib/llvm-22/bin:{}",
            env::var("PATH").unwrap_or_default()
        );
        status(
            cmd("cargo")
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    "0.13.0",
                    "--locked",
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ])
                .env("PATH", path)
                .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
        )?;
    }
    // 4. bpffs, for pinned links (fail-closed mode).
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    if !mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf"))
    {
        status(cmd("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))?;
    }
    // 5. Python clients.
    for (module, req) in PY_PACKAGES {
        if !succeeds(cmd("python3").args(["-c", &format!("import {module}")])) {
            status(cmd("python3").args([
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                req,
            ]))?;
        }
    }
    // 6. cargo-fuzz, for the decoder fuzz smoke run.
    if !succeeds(cmd("cargo").args(["fuzz", "--version"])) {
        status(cmd("cargo").args(["install", "cargo-fuzz", "--version", "0.13.2", "--locked"]))?;
    }
    // 7. Node packages of the test OpenID provider and the browser driver (screenshots too):
    // again whenever the lock file is newer than what npm last installed.
    let oidc = root.join("tests/oidc");
    let mtime = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    let installed = mtime(&oidc.join("node_modules/.package-lock.json"));
    let locked = mtime(&oidc.join("package-lock.json"));
    if oidc.join("package.json").exists() && (installed.is_none() || installed < locked) {
        status(
            cmd("npm")
                .args(["ci", "--no-audit", "--no-fund"])
                .current_dir(&oidc),
        )?;
    }
    // 8. The agent scenario's venv (the OpenAI Agents SDK), pinned by requirements.txt.
    agent_venv(root)?;
    Ok(())
}

/// tests/agent/.venv with tests/agent/requirements.txt installed; redone only
/// when the requirements change (their copy is kept in the venv).
fn agent_venv(root: &Path) -> Result<PathBuf> {
    let dir = root.join("tests/agent");
    let venv = dir.join(".venv");
    let python = venv.join("bin/python");
    let wanted = fs::read_to_string(dir.join("requirements.txt"))
        .context("reading tests/agent/requirements.txt")?;
    let stamp = venv.join("requirements.installed");
    if python.exists() && fs::read_to_string(&stamp).is_ok_and(|s| s == wanted) {
        return Ok(python);
    }
    eprintln!("xtask: installing the agent's Python packages into tests/agent/.venv");
    // Debian's python, not a pyenv one under /root: agents run as `nobody`.
    status(
        cmd("/usr/bin/python3")
            .args(["-m", "venv", "--clear"])
            .arg(&venv),
    )?;
    status(
        cmd(&python)
            .args([
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(dir.join("requirements.txt")),
    )?;
    fs::write(&stamp, wanted)?;
    Ok(python)
}

fn build_ebpf(root: &Path) -> Result<()> {
    status(
        cmd("rustup")
            .args([
                "run",
                "nightly",
                "cargo",
                "build",
                "--release",
                "-Z",
                "build-std=core",
                "--target",
                "bpfel-unknown-none",
            ])
            .current_dir(root.join("gateway-ebpf")),
    )
}

/// The local default: state under .state/, policies from policies/local, the
/// product's defaults otherwise (fail-closed, fast path on).
#[allow(unsafe_code)]
pub(crate) fn ignore_sigint() {
    // SAFETY: setting a signal to SIG_IGN has no handler to run; the daemon
    // child installs its own handler, which replaces the inherited SIG_IGN.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
}

pub(crate) const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A throwaway `PostgreSQL` for the local walkthrough, on 127.0.0.1:5432, with a
/// `customers` table of fake personal data. Stopped on drop.
struct DemoPostgres {
    data: PathBuf,
}

impl DemoPostgres {
    /// The demo database's password. Local, throwaway, printed on purpose.
    const PASSWORD: &'static str = "demo";

    fn start(dir: &Path) -> Result<Option<Self>> {
        Self::start_on(dir, 5432, Path::new("/tmp"))
    }

    /// As [`DemoPostgres::start`], on `port`; `None` if something listens there.
    /// `sockets`: the directory of its Unix socket (Unix sockets are not
    /// network-namespaced: a test's server keeps out of /tmp).
    fn start_on(dir: &Path, port: u16, sockets: &Path) -> Result<Option<Self>> {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(None);
        }
        let data = dir.join("data");
        let as_postgres = |program: &str| {
            let mut c = cmd("runuser");
            c.args(["-u", "postgres", "--", &format!("{PG_BIN}/{program}")]);
            c
        };
        if !data.join("PG_VERSION").exists() {
            fs::create_dir_all(dir)?;
            let pwfile = dir.join("pw");
            fs::write(&pwfile, Self::PASSWORD)?;
            status(cmd("chown").args(["-R", "postgres:postgres"]).arg(dir))?;
            status(
                as_postgres("initdb")
                    .args([
                        "-U",
                        "postgres",
                        "--auth=scram-sha-256",
                        "-E",
                        "UTF8",
                        "--locale=C.UTF-8",
                    ])
                    .arg(format!("--pwfile={}", pwfile.display()))
                    .arg("-D")
                    .arg(&data),
            )?;
            fs::remove_file(&pwfile)?;
        }
        status(
            as_postgres("pg_ctl")
                .arg("-D")
                .arg(&data)
                .arg("-o")
                .arg(format!(
                    "-c listen_addresses=127.0.0.1 -p {port} -k {}",
                    sockets.display()
                ))
                .arg("-l")
                .arg(dir.join("postgres.log"))
                .args(["-w", "start"]),
        )?;
        let seed = "CREATE TABLE IF NOT EXISTS customers (id int primary key, name text, email text, ssn text, card text, balance numeric);\n\
                    INSERT INTO customers SELECT i, 'Customer ' || i, 'user' || i || '@example.com', \
                    lpad((100 + i)::text, 3, '0') || '-' || lpad((10 + i % 89)::text, 2, '0') || '-' || lpad((1000 + i)::text, 4, '0'), \
                    '4111111111111111', i * 10.5 FROM generate_series(1, 50) i ON CONFLICT DO NOTHING;";
        status(
            as_postgres("psql")
                .args([
                    "-h",
                    &sockets.display().to_string(),
                    "-p",
                    &port.to_string(),
                    "-U",
                    "postgres",
                    "-qc",
                    seed,
                ])
                .env("PGPASSWORD", Self::PASSWORD),
        )?;
        Ok(Some(Self { data }))
    }
}

impl Drop for DemoPostgres {
    fn drop(&mut self) {
        let _ = cmd("runuser")
            .args(["-u", "postgres", "--", &format!("{PG_BIN}/pg_ctl")])
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "stop"])
            .status();
    }
}

/// Where cargo puts what it builds: `CARGO_TARGET_DIR` when set (a worktree
/// sharing a warm build), else `target/` at the workspace root.
fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from)
}

fn test(root: &Path, filter: Option<&str>, no_lint: bool) -> Result<()> {
    setup(root)?;
    if !no_lint {
        status(cmd("cargo").args(["fmt", "--all", "--check"]))?;
        status(cmd("cargo").args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    // The end-to-end tests drive the real binary.
    status(cmd("cargo").args(["build", "-p", "agentgate"]))?;
    let bin = target_dir(root).join("debug/agentgate");
    let mut c = cmd("cargo");
    // Every test binary runs, so that one failure does not hide the rest.
    c.args([
        "test",
        "--workspace",
        "--lib",
        "--bins",
        "--tests",
        "--no-fail-fast",
    ])
    .env("AGENTGATE_BIN", &bin);
    if let Some(f) = filter {
        c.arg(f);
    }
    // Two at a time: the end-to-end tests move hundreds of MiB through the
    // kernel each, and this machine has two cores.
    c.args(["--", "--test-threads=2"]);
    let (passed, mut failed) = run_counting(&mut c)?;
    if filter.is_none() {
        match fuzz_smoke(root) {
            Ok(()) => println!("fuzz smoke: no crash"),
            Err(e) => {
                eprintln!("xtask: fuzz smoke failed: {e:#}");
                failed += 1;
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        bail!("{failed} tests failed");
    }
    Ok(())
}

/// The decoders' and classifiers' fuzz targets (Postgres, `MySQL`, the HTTP
/// glue, the SSH command classifier), 15 s each (90 s in all). A crash fails
/// the run; its input is left in gateway-userspace/fuzz/artifacts.
fn fuzz_smoke(root: &Path) -> Result<()> {
    let dir = root.join("gateway-userspace");
    for target in [
        "pg_frontend",
        "pg_backend",
        "pg_mask_row",
        "mysql_codec",
        "http_glue",
        "ssh_command",
    ] {
        let corpus = dir.join("fuzz/corpus").join(target);
        fs::create_dir_all(&corpus)?;
        status(
            cmd("rustup")
                .args(["run", "nightly", "cargo", "fuzz", "run", "-O", target])
                .arg(&corpus)
                .arg(dir.join("fuzz/seeds").join(target))
                .args(["--", "-max_total_time=15"])
                .current_dir(&dir),
        )?;
    }
    Ok(())
}

/// Runs a test command, echoing its output, and sums its `test result:` lines.
fn run_counting(c: &mut Command) -> Result<(u64, u64)> {
    use std::io::{BufRead as _, BufReader};
    let mut child = c
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {c:?}"))?;
    let (mut passed, mut failed) = (0, 0);
    for line in BufReader::new(child.stdout.take().context("piped stdout")?).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            for part in rest.split(['.', ';']) {
                let mut words = part.split_whitespace();
                if let (Some(n), Some(what)) = (words.next(), words.next()) {
                    match what {
                        "passed" => passed += n.parse::<u64>().unwrap_or(0),
                        "failed" => failed += n.parse::<u64>().unwrap_or(0),
                        _ => {}
                    }
                }
            }
        }
    }
    let st = child.wait()?;
    if !st.success() && failed == 0 {
        bail!("{c:?} failed: {st}");
    }
    Ok((passed, failed))
}

fn bench(root: &Path, which: Option<&str>, quick: bool) -> Result<()> {
    setup(root)?;
    let all = which.is_none();
    let mut ran = false;
    for name in ["audit", "policy", "evidence", "pg", "mysql"] {
        if !(all || which == Some(name)) {
            continue;
        }
        if name == "pg" {
            bench_pg(root, quick)?;
            ran = true;
            continue;
        }
        if name == "mysql" {
            bench_mysql(root, quick)?;
            ran = true;
            continue;
        }
        let bench_file = root.join(format!("gateway-userspace/benches/{name}.rs"));
        if bench_file.exists() {
            status(cmd("cargo").args(["bench", "-p", "agentgate", "--bench", name]))?;
            ran = true;
        } else if !all {
            bail!("no benchmark named {name} yet");
        }
    }
    if !ran {
        bail!("no benchmarks ran");
    }
    Ok(())
}

/// sysbench against `MariaDB` directly, through the TCP passthrough and through
/// the `MySQL` handler (`tests/src/bin/my_bench.rs`): the release daemon, as root.
fn bench_mysql(root: &Path, quick: bool) -> Result<()> {
    if !is_root() {
        bail!("`bench mysql` runs the daemon with its eBPF programs: run it as root");
    }
    status(cmd("cargo").args(["build", "--release", "-p", "agentgate"]))?;
    let mut c = cmd("cargo");
    c.args([
        "run",
        "--release",
        "-p",
        "agentgate-e2e",
        "--bin",
        "my_bench",
        "--",
    ])
    .env("AGENTGATE_BIN", target_dir(root).join("release/agentgate"));
    if quick {
        c.arg("--quick");
    }
    status(&mut c)
}

/// pgbench against Postgres directly, through agentgate and through pgbouncer
/// (`tests/src/bin/pg_bench.rs`): the release daemon, as root.
fn bench_pg(root: &Path, quick: bool) -> Result<()> {
    if !is_root() {
        bail!("`bench pg` runs the daemon with its eBPF programs: run it as root");
    }
    status(cmd("cargo").args(["build", "--release", "-p", "agentgate"]))?;
    let mut c = cmd("cargo");
    c.args([
        "run",
        "--release",
        "-p",
        "agentgate-e2e",
        "--bin",
        "pg_bench",
        "--",
    ])
    .env("AGENTGATE_BIN", target_dir(root).join("release/agentgate"));
    if quick {
        c.arg("--quick");
    }
    status(&mut c)
}
