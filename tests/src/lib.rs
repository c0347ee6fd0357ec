//! Harness for agentgate's end-to-end tests against the real kernel.
//!
//! Each test gets its own network namespace, its own cgroup (the eBPF programs
//! attach there, so tests cannot see each other's traffic), its own state
//! directory and bpffs pin directory. Drop guards remove all of it, and kill
//! whatever the test started, even when the test panics.
//!
//! The tests need root and a built `agentgate` binary: `cargo xtask test`
//! provides both (it exports `AGENTGATE_BIN`).

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A short unique name for this test's resources.
pub fn unique(name: &str) -> String {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let short: String = name
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(10)
        .collect();
    format!("ag{}{}{}", std::process::id() % 100_000, n, short)
}

/// Panics with the reason when the test cannot run here; never passes silently.
pub fn require_root() {
    let uid = Command::new("id").arg("-u").output().expect("id -u");
    assert_eq!(
        uid.stdout.trim_ascii(),
        b"0",
        "end-to-end tests load eBPF programs and need root: run them with `cargo xtask test`"
    );
}

pub fn agentgate_bin() -> PathBuf {
    if let Ok(p) = std::env::var("AGENTGATE_BIN") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/agentgate");
    assert!(
        p.exists(),
        "no agentgate binary at {}: run `cargo xtask test`",
        p.display()
    );
    p
}

pub fn scripts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts")
}

fn cgroup2_mount() -> PathBuf {
    let text = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    for line in text.lines() {
        if let Some((left, right)) = line.split_once(" - ")
            && right.starts_with("cgroup2 ")
        {
            return PathBuf::from(left.split_whitespace().nth(4).expect("mount point"));
        }
    }
    panic!("no cgroup2 mount: agentgate needs cgroup v2");
}

/// A network namespace with loopback up.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Result<Self> {
        run_ok(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Self {
            name: name.to_owned(),
        };
        run_ok(Command::new("ip").args(["-n", name, "link", "set", "lo", "up"]))?;
        Ok(ns)
    }

    /// A command that runs inside this namespace. `nsenter --net` rather than
    /// `ip netns exec`: the latter remounts /sys, hiding the cgroup2 and bpffs mounts.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/run/netns/{}", self.name))
            .arg("--")
            .arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A cgroup subtree for one test; every process in it is killed on drop.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(name: &str) -> Result<Self> {
        let path = cgroup2_mount().join(name);
        fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn child(&self, name: &str) -> Result<PathBuf> {
        let p = self.path.join(name);
        fs::create_dir_all(&p)?;
        Ok(p)
    }

    /// Kernel id of a cgroup (its inode).
    pub fn id(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt as _;
        fs::metadata(path).expect("cgroup exists").ino()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = fs::write(self.path.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if remove_tree(&self.path) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "warning: could not remove test cgroup {}",
            self.path.display()
        );
    }
}

/// Removes a cgroup directory tree bottom-up; false if something is still busy.
fn remove_tree(p: &Path) -> bool {
    if let Ok(entries) = fs::read_dir(p) {
        for e in entries.filter_map(Result::ok) {
            if e.file_type().is_ok_and(|t| t.is_dir()) && !remove_tree(&e.path()) {
                return false;
            }
        }
    }
    fs::remove_dir(p).is_ok() || !p.exists()
}

/// A child process killed on drop.
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, mut c: Command) -> Result<Self> {
        let child = c
            .spawn()
            .with_context(|| format!("spawning {name}: {c:?}"))?;
        Ok(Self {
            child,
            name: name.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reads one line of stdout (the process must have been spawned with piped stdout).
    pub fn read_line(&mut self) -> Result<String> {
        let out = self.child.stdout.as_mut().context("stdout not piped")?;
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            match out.read(&mut byte)? {
                0 => bail!("{} exited before printing a line", self.name),
                _ if byte[0] == b'\n' => break,
                _ => line.push(byte[0]),
            }
        }
        Ok(String::from_utf8_lossy(&line).into_owned())
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn terminate(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

/// Runs a command, failing with its output unless it exits 0.
pub fn run_ok(c: &mut Command) -> Result<Output> {
    let out = c.output().with_context(|| format!("running {c:?}"))?;
    if !out.status.success() {
        bail!(
            "{c:?} exited {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// A TCP port that was free on loopback a moment ago (inside a fresh netns all are).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_or(15001, |a| a.port())
}

/// Options for a test daemon.
#[derive(Clone, Debug)]
pub struct DaemonOptions {
    pub fast_path: bool,
    pub fail_closed: bool,
    pub port: u16,
    /// Extra TOML appended to the config.
    pub extra: String,
    /// Extra TOML keys written inside the `[audit]` table (e.g.
    /// `durability = "batched"`).
    pub audit_extra: String,
    /// Policy files (name, text) for the daemon's policy directory; by
    /// default one that lets the label `demo` reach any loopback TCP port.
    pub policies: Vec<(String, String)>,
    /// Label identities (name, groups) besides `demo`.
    pub labels: Vec<(String, Vec<String>)>,
}

/// Loopback TCP for the label identity `demo`; nothing else.
pub const LOOPBACK_POLICY: &str = r#"
[defaults]
unknown_destination = "deny"

[[resource]]
name = "loopback"
protocol = "tcp"
addresses = ["127.0.0.0/8:*", "[::1/128]:*"]
default_action = "deny"

[[rule]]
name = "demo-loopback"
identities = ["demo"]
resources = ["loopback"]
action = "allow"
"#;

impl Default for DaemonOptions {
    fn default() -> Self {
        Self {
            fast_path: true,
            fail_closed: false,
            port: 15001,
            extra: String::new(),
            audit_extra: String::new(),
            policies: vec![("loopback.toml".into(), LOOPBACK_POLICY.into())],
            labels: Vec::new(),
        }
    }
}

/// An isolated agentgate deployment: netns, cgroup, state, and the daemon.
/// Field order is drop order: the daemon dies before its cgroup and netns go.
pub struct Env {
    pub daemon: Option<Proc>,
    pub bpffs: PathBuf,
    pub state: PathBuf,
    pub config: PathBuf,
    pub opts: DaemonOptions,
    pub cgroup: Cgroup,
    pub netns: Netns,
    pub name: String,
}

impl Env {
    pub fn new(test: &str, opts: DaemonOptions) -> Result<Self> {
        let mut env = Self::prepare(test, opts)?;
        env.start_daemon()?;
        Ok(env)
    }

    /// Everything but the daemon: start it with [`Env::start_daemon`] once the
    /// test has started what the daemon needs (an `OpenID` provider, say).
    pub fn prepare(test: &str, opts: DaemonOptions) -> Result<Self> {
        require_root();
        let name = unique(test);
        let netns = Netns::new(&name)?;
        let cgroup = Cgroup::new(&name)?;
        cgroup.child("daemon")?;
        let state = std::env::temp_dir().join(format!("agentgate-e2e-{name}"));
        let _ = fs::remove_dir_all(&state);
        fs::create_dir_all(&state)?;
        let bpffs = PathBuf::from(format!("/sys/fs/bpf/agentgate-e2e-{name}"));
        let config = state.join("agentgate.toml");
        let policy_dir = state.join("policy");
        fs::create_dir_all(&policy_dir)?;
        for (file, text) in &opts.policies {
            fs::write(policy_dir.join(file), text)?;
        }
        let env = Self {
            daemon: None,
            bpffs,
            state,
            config,
            opts,
            cgroup,
            netns,
            name,
        };
        env.write_config()?;
        Ok(env)
    }

    /// (Re)writes the daemon config from `self.opts`; a running daemon reads
    /// it at its next start.
    pub fn write_config(&self) -> Result<()> {
        let rel = |p: &Path| {
            p.strip_prefix(cgroup2_mount())
                .expect("under the mount")
                .display()
                .to_string()
        };
        let config_text = format!(
            "[daemon]\nstate_dir = \"{state}\"\ncontrol_socket = \"{state}/control.sock\"\n\
             attach_cgroup = \"{attach}\"\nexec_cgroup = \"{attach}/agents\"\n\
             fail_mode = \"{mode}\"\nbpffs_dir = \"{bpffs}\"\n\
             label_identities = [{{ name = \"demo\", groups = [\"demo\"] }}{labels}]\n\n\
             [policy]\ndir = \"{policy}\"\nwatch_interval_secs = 1\n\n\
             [audit]\ndir = \"{state}/audit\"\n{audit_extra}\n\n\
             [proxy]\nport = {port}\nfast_path = {fast}\n{extra}\n",
            policy = self.state.join("policy").display(),
            state = self.state.display(),
            attach = rel(&self.cgroup.path),
            mode = if self.opts.fail_closed {
                "closed"
            } else {
                "open"
            },
            bpffs = self.bpffs.display(),
            port = self.opts.port,
            fast = self.opts.fast_path,
            audit_extra = self.opts.audit_extra,
            extra = self.opts.extra,
            labels = self.labels_toml(),
        );
        fs::write(&self.config, config_text)?;
        Ok(())
    }

    /// The extra label identities as entries of `label_identities`.
    fn labels_toml(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        for (name, groups) in &self.opts.labels {
            let _ = write!(out, ", {{ name = {name:?}, groups = {groups:?} }}");
        }
        out
    }

    /// Starts the daemon inside the test's netns, in the `daemon` child cgroup
    /// (below the attach point, untagged), and waits until it answers.
    pub fn start_daemon(&mut self) -> Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state.join("daemon.log"))?;
        let procs = self.cgroup.path.join("daemon/cgroup.procs");
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(format!(
                "echo $$ > {procs} && exec nsenter --net=/run/netns/{ns} -- {bin} --config {cfg} run",
                procs = procs.display(),
                ns = self.netns.name,
                bin = agentgate_bin().display(),
                cfg = self.config.display()
            ))
            .env("AGENTGATE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log);
        self.daemon = Some(Proc::spawn("agentgate run", c)?);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(out) = self.agentgate(&["status", "--json"]).output()
                && out.status.success()
            {
                return Ok(());
            }
            if let Some(d) = self.daemon.as_mut()
                && let Ok(Some(st)) = d.child.try_wait()
            {
                bail!("daemon exited {st}:\n{}", self.daemon_log());
            }
            if Instant::now() > deadline {
                bail!("daemon did not start within 15 s:\n{}", self.daemon_log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn daemon_log(&self) -> String {
        fs::read_to_string(self.state.join("daemon.log")).unwrap_or_default()
    }

    /// `agentgate --config <this env> ARGS...` inside the netns.
    pub fn agentgate(&self, args: &[&str]) -> Command {
        let mut c = self.netns.command(agentgate_bin());
        c.arg("--config").arg(&self.config).args(args);
        c
    }

    /// `agentgate exec --allow-root --identity ID -- CMD...` inside the netns.
    /// As root: these tests are about the redirect and the protocol handlers,
    /// and their clients (the pyenv python under /root) need it.
    /// `agentgate login` as `user`: the CLI prints the device-flow link,
    /// `scripts/device_browser.py` plays the browser on the test provider's
    /// pages, and the CLI hands the session to the daemon, which verifies it.
    pub fn login(&self, user: &str) {
        let mut c = self.agentgate(&["login"]);
        // `login` reads only [identity] from the config; the socket comes from here.
        c.env("AGENTGATE_CONTROL_SOCKET", self.state.join("control.sock"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut p = Proc::spawn("agentgate login", c).unwrap();
        let mut err = BufReader::new(p.child.stderr.take().unwrap());
        let mut shown = String::new();
        let url = loop {
            let mut line = String::new();
            assert!(
                err.read_line(&mut line).unwrap() > 0,
                "login ended without a prompt: {shown}"
            );
            shown.push_str(&line);
            if let Some(rest) = line.trim().strip_prefix("(or open ") {
                break rest.split_whitespace().next().unwrap().to_owned();
            }
        };
        let browser = run_ok(
            self.netns
                .command("python3")
                .arg(scripts_dir().join("device_browser.py"))
                .args([&url, user]),
        );
        assert!(browser.is_ok(), "{browser:?}");
        let mut rest = String::new();
        err.read_to_string(&mut rest).unwrap();
        let status = p.child.wait().unwrap();
        assert!(status.success(), "login as {user} failed: {shown}{rest}");
        assert!(rest.contains(&format!("Logged in as {user}")), "{rest}");
        assert!(rest.contains("The daemon now holds the session"), "{rest}");
    }

    pub fn exec(&self, identity: &str, cmd: &[&str]) -> Command {
        let mut c = self.agentgate(&["exec", "--allow-root", "--identity", identity, "--"]);
        c.args(cmd);
        c
    }

    /// `agentgate exec --user USER --identity ID -- CMD...` inside the netns:
    /// the agent runs as `user` (NAME or NAME:GROUP). /root is not readable
    /// by other users: use /usr/bin/python3, not the pyenv python.
    pub fn exec_as(&self, user: &str, identity: &str, cmd: &[&str]) -> Command {
        let mut c = self.agentgate(&["exec", "--user", user, "--identity", identity, "--"]);
        c.args(cmd);
        c
    }

    /// Every record of this daemon's audit log, as `agentgate audit export` gives them.
    pub fn audit_records(&self) -> Result<Vec<serde_json::Value>> {
        let dir = self.state.join("audit");
        let out = run_ok(&mut self.agentgate(&[
            "audit",
            "export",
            "--format",
            "jsonl",
            "--dir",
            &dir.display().to_string(),
        ]))?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("parsing {l:?}")))
            .collect()
    }

    pub fn status(&self) -> Result<serde_json::Value> {
        let out = run_ok(&mut self.agentgate(&["status", "--json"]))?;
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Polls `status` until `pred` holds or the timeout passes.
    pub fn wait_status(
        &self,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status()?;
            if pred(&s) {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("status never matched; last: {s:#}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the echo server in the netns; returns it with its port.
    pub fn echo_server(&self, bind: &str) -> Result<(Proc, u16)> {
        let mut c = self.netns.command("python3");
        c.arg(scripts_dir().join("echo_server.py"))
            .arg(bind)
            .stdout(Stdio::piped());
        let mut p = Proc::spawn("echo server", c)?;
        let port: u16 = p.read_line()?.trim().parse().context("echo server port")?;
        Ok((p, port))
    }

    pub fn kill_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.kill9();
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.terminate();
        }
        // Removing the pins detaches fail-closed programs from the test cgroup.
        let _ = fs::remove_dir_all(&self.bpffs);
        if std::thread::panicking() {
            eprintln!("--- daemon log of {} ---\n{}", self.name, self.daemon_log());
        }
        let _ = fs::remove_dir_all(&self.state);
    }
}

/// Runs a client command and parses the one JSON object it prints last.
pub fn json_output(c: &mut Command) -> Result<serde_json::Value> {
    let out = run_ok(c)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text
        .lines()
        .last()
        .with_context(|| format!("no output from {c:?}"))?;
    serde_json::from_str(last).with_context(|| format!("parsing {last:?}"))
}

/// Reads lines from a piped child until one satisfies `pred`.
pub fn read_until(out: &mut impl std::io::Read, pred: impl Fn(&str) -> bool) -> Result<String> {
    let mut r = BufReader::new(out);
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            bail!("stream ended");
        }
        if pred(line.trim_end()) {
            return Ok(line.trim_end().to_owned());
        }
    }
}
pub mod agent;
pub mod leak;
pub mod mysql;
pub mod pg;
pub mod ssh;
