//! `cargo xtask demo`: issue 17's scenario, played for a person.
//!
//! Starts a throwaway `PostgreSQL` (127.0.0.1:15432), the test `OpenID` provider
//! (tests/oidc, 127.0.0.1:18480), the scripted model (`tests/agent/model_stub.py`,
//! 127.0.0.1:18400) and a daemon with its own state under `.state/demo`; logs
//! `contractor@bank` and the approver `bob` in through the provider's device flow
//! (the browser step is automated: it is a demo); runs the `OpenAI` Agents SDK agent
//! under `agentgate exec --identity contractor@bank`; plays the approver (rejects
//! the DROP with a reason, approves the UPDATE); writes the evidence package and
//! prints where it is. Everything it started is stopped on exit, Ctrl-C included.
//! The trade-off: fixed loopback ports, so it fails (and says so) if another
//! demo or `cargo xtask run`'s proxy holds them.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use super::{
    DemoPostgres, agent_venv, cmd,
    procs::{ExecCgroup, Guard, Pins, start_provider},
    setup, status, target_dir,
};

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Ctrl-C sets a flag the demo's loops check; this process then stops what it
/// started (its guards drop). Children get the default disposition at exec.
fn catch_sigint() {
    let handler: extern "C" fn(libc::c_int) = on_sigint;
    #[allow(unsafe_code)]
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGINT, handler as libc::sighandler_t);
    }
}

fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst) {
        bail!("interrupted; stopping what the demo started");
    }
    Ok(())
}

const PG_PORT: u16 = 15432;
const OIDC_PORT: u16 = 18480;
const STUB_PORT: u16 = 18400;
const PROXY_PORT: u16 = 15011;
const AGENT: &str = "contractor@bank";
const APPROVER: &str = "bob";
const REJECT_REASON: &str = "dropping customers is not in the change plan (CHG-1042)";

fn policy() -> String {
    format!(
        r#"# Written by `cargo xtask demo`.
[defaults]
unknown_destination = "deny"

[[resource]]
name = "customers-db"
protocol = "postgres"
addresses = ["127.0.0.1:{PG_PORT}"]
default_action = "deny"

[[resource]]
name = "model-stub"
protocol = "tcp"
addresses = ["127.0.0.1:{STUB_PORT}"]
default_action = "deny"

[[rule]]
name = "contractor-reads"
identities = ["{AGENT}"]
resources = ["customers-db"]
action = "allow"
match = {{ sql = ["read", "transaction"] }}

[[rule]]
name = "contractor-changes-need-approval"
identities = ["{AGENT}"]
resources = ["customers-db"]
action = "require_approval"
match = {{ sql = ["write", "ddl"] }}
approval = {{ approver_groups = ["approvers"], timeout = "120s" }}

[[rule]]
name = "contractor-may-use-the-model"
identities = ["{AGENT}"]
resources = ["model-stub"]
action = "allow"

[masking]
detectors = ["all"]

[[masking.column]]
columns = ["customers.ssn", "customers.card"]
strategy = "keep_last4"

[[masking.column]]
columns = ["customers.email"]
strategy = "redact"
"#
    )
}

fn config(state: &Path) -> String {
    format!(
        "# Written by `cargo xtask demo`.\n\
         [daemon]\n\
         state_dir = \"{state}\"\n\
         control_socket = \"{state}/control.sock\"\n\
         exec_cgroup = \"agentgate-demo\"\n\
         fail_mode = \"open\"\n\
         bpffs_dir = \"/sys/fs/bpf/agentgate-demo\"\n\n\
         [policy]\n\
         dir = \"{state}/policy\"\n\n\
         [audit]\n\
         dir = \"{state}/audit\"\n\
         checkpoint_every_secs = 1\n\n\
         [proxy]\n\
         port = {PROXY_PORT}\n\n\
         [identity]\n\
         issuer = \"http://127.0.0.1:{OIDC_PORT}\"\n\
         client_id = \"agentgate-cli\"\n",
        state = state.display()
    )
}

fn utc(offset_secs: i64) -> Result<String> {
    let out = cmd("date")
        .args([
            "-u",
            "-d",
            &format!("{offset_secs:+} seconds"),
            "+%Y-%m-%dT%H:%M:%SZ",
        ])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

struct Demo {
    bin: PathBuf,
    config: PathBuf,
    state: PathBuf,
    root: PathBuf,
}

impl Demo {
    fn agentgate(&self, args: &[&str]) -> Command {
        let mut c = cmd(&self.bin);
        c.arg("--config").arg(&self.config).args(args);
        c
    }

    fn json(&self, args: &[&str]) -> Result<Value> {
        let out = self.agentgate(args).output()?;
        if !out.status.success() {
            bail!(
                "agentgate {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// `agentgate login`, its prompt shown, the browser step automated.
    fn login(&self, user: &str) -> Result<()> {
        println!("\n== {user} logs in (agentgate login, device flow at the OpenID provider)");
        let mut c = self.agentgate(&["login"]);
        c.env("AGENTGATE_CONTROL_SOCKET", self.state.join("control.sock"))
            .env("AGENTGATE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut login = Guard::spawn("agentgate login", &mut c)?;
        let mut stderr = BufReader::new(login.child.stderr.take().context("stderr")?);
        let url = loop {
            let mut line = String::new();
            if stderr.read_line(&mut line)? == 0 {
                bail!("agentgate login ended without a prompt");
            }
            print!("   | {line}");
            if let Some(rest) = line.trim().strip_prefix("(or open ") {
                break rest
                    .split_whitespace()
                    .next()
                    .unwrap_or_default()
                    .to_owned();
            }
        };
        println!("   (the demo plays {user}'s browser: code confirmed, signed in, consented)");
        status(
            cmd("python3")
                .arg(self.root.join("tests/scripts/device_browser.py"))
                .args([&url, user]),
        )?;
        for line in stderr.lines() {
            println!("   | {}", line?);
        }
        let st = login.child.wait()?;
        if !st.success() {
            bail!("agentgate login as {user} failed: {st}");
        }
        Ok(())
    }
}

#[allow(clippy::too_many_lines)] // one scenario, told in order
pub fn run(root: &Path) -> Result<()> {
    setup(root)?;
    status(cmd("cargo").args(["build", "--release", "-p", "agentgate"]))?;
    let python = agent_venv(root)?;
    // Ctrl-C reaches every child (same process group); this process lives on
    // to stop what is left.
    catch_sigint();
    let state = root.join(".state/demo");
    if state.exists() {
        fs::remove_dir_all(&state).context("clearing .state/demo")?;
    }
    fs::create_dir_all(state.join("policy"))?;
    fs::write(state.join("policy/agent.toml"), policy())?;
    let config_path = state.join("agentgate.toml");
    fs::write(&config_path, config(&state))?;
    let d = Demo {
        bin: target_dir(root).join("release/agentgate"),
        config: config_path,
        state: state.clone(),
        root: root.to_path_buf(),
    };
    for port in [OIDC_PORT, STUB_PORT, PROXY_PORT] {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            bail!("127.0.0.1:{port} is in use (another demo?); the demo needs it");
        }
    }

    println!("== PostgreSQL on 127.0.0.1:{PG_PORT} with a `customers` table of fake personal data");
    let Some(_pg) = DemoPostgres::start_on(&state.join("pg"), PG_PORT, Path::new("/tmp"))? else {
        bail!("127.0.0.1:{PG_PORT} is in use; the demo starts its own PostgreSQL there");
    };
    println!("== the test OpenID provider (npm oidc-provider) at http://127.0.0.1:{OIDC_PORT}");
    let provider = start_provider(root, OIDC_PORT)?;
    println!("== the scripted model (OpenAI-compatible) at http://127.0.0.1:{STUB_PORT}/v1");
    let mut c = cmd("python3");
    c.arg(root.join("tests/agent/model_stub.py"))
        .args(["--port", &STUB_PORT.to_string(), "--transcript"])
        .arg(state.join("model-transcript.jsonl"))
        .stdout(Stdio::piped());
    let mut stub = Guard::spawn("model stub", &mut c)?;
    let mut port = String::new();
    BufReader::new(stub.child.stdout.take().context("stdout")?).read_line(&mut port)?;

    println!(
        "== agentgate daemon (log: {})",
        state.join("daemon.log").display()
    );
    let _pins = Pins(PathBuf::from("/sys/fs/bpf/agentgate-demo"));
    let _cgroups = ExecCgroup::new("agentgate-demo");
    let log = fs::File::create(state.join("daemon.log"))?;
    let mut c = d.agentgate(&["run"]);
    c.env("AGENTGATE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log);
    let mut daemon = Guard::spawn("agentgate daemon", &mut c)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while d.json(&["status", "--json"]).is_err() {
        check_interrupted()?;
        if let Ok(Some(st)) = daemon.child.try_wait() {
            bail!(
                "the daemon exited ({st}); see {}",
                state.join("daemon.log").display()
            );
        }
        if Instant::now() > deadline {
            bail!("the daemon did not answer within 20 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let from = utc(-2)?;
    d.login(AGENT)?;
    d.login(APPROVER)?;

    println!(
        "\n== the agent: agentgate exec --identity {AGENT} --user nobody -- python tests/agent/agent.py"
    );
    let mut c = d.agentgate(&["exec", "--identity", AGENT, "--user", "nobody", "--"]);
    c.arg(&python)
        .arg(root.join("tests/agent/agent.py"))
        .env(
            "AGENT_MODEL_URL",
            format!("http://127.0.0.1:{STUB_PORT}/v1"),
        )
        .env(
            "AGENT_PG_URL",
            format!(
                "host=127.0.0.1 port={PG_PORT} user=postgres dbname=postgres password={}",
                DemoPostgres::PASSWORD
            ),
        )
        .env("HOME", "/tmp")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut agent = Guard::spawn("agent", &mut c)?;
    let out = agent.child.stdout.take().context("stdout")?;
    let printer = std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                println!("   agent | {line}");
                continue;
            };
            if let Some(sql) = v["sql"].as_str() {
                println!("   agent | tool query: {sql}");
                if let Some(rows) = v["rows"].as_array() {
                    for r in rows {
                        println!("   agent |   {r}");
                    }
                } else if v["ok"] == true {
                    println!("   agent |   {}", v["status"].as_str().unwrap_or(""));
                } else {
                    println!(
                        "   agent |   ERROR {}: {}",
                        v["sqlstate"].as_str().unwrap_or("?"),
                        v["error"].as_str().unwrap_or("")
                    );
                }
            } else if let Some(f) = v["final"].as_str() {
                println!(
                    "   agent | final answer: {}",
                    f.chars().take(160).collect::<String>()
                );
            }
        }
    });

    // The approver's side.
    let mut decided = 0;
    let deadline = Instant::now() + Duration::from_mins(3);
    while agent.child.try_wait()?.is_none() {
        check_interrupted()?;
        if Instant::now() > deadline {
            bail!("the agent did not finish within 3 minutes");
        }
        let pending = d.json(&["approvals", "list", "--json"])?;
        for req in pending.as_array().into_iter().flatten() {
            let id = req["id"].as_str().unwrap_or_default();
            let summary = req["summary"].as_str().unwrap_or_default();
            println!("   approver | held: {id} {summary}");
            let mut args = vec!["approvals"];
            if summary.contains("DROP") {
                args.extend(["reject", id, "--as", APPROVER, "--reason", REJECT_REASON]);
                println!("   approver | {APPROVER} rejects it: {REJECT_REASON}");
            } else {
                args.extend(["approve", id, "--as", APPROVER]);
                println!("   approver | {APPROVER} approves it");
            }
            status(d.agentgate(&args).stdout(Stdio::null()))?;
            decided += 1;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = printer.join();
    if decided != 2 {
        bail!("expected two held statements, decided {decided}");
    }
    // The agent's cgroup is released once it is gone; the period ends after.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = d
            .agentgate(&["audit", "export", "--format", "jsonl"])
            .output()?;
        if String::from_utf8_lossy(&out.stdout).contains("\"identity.unbind\"")
            || Instant::now() > deadline
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let to = utc(2)?;

    let out = state.join("evidence");
    println!(
        "\n== agentgate evidence --identity {AGENT} --from {from} --to {to} --out {}",
        out.display()
    );
    status(&mut d.agentgate(&[
        "evidence",
        "--identity",
        AGENT,
        "--from",
        &from,
        "--to",
        &to,
        "--out",
        &out.display().to_string(),
    ]))?;
    let report: Value = serde_json::from_slice(&fs::read(out.join("evidence.json"))?)?;
    for a in report["attestations"][0]["answers"]
        .as_array()
        .into_iter()
        .flatten()
    {
        println!(
            "   {:<3} {:<70} {}",
            a["answer"].as_str().unwrap_or("?").to_uppercase(),
            a["question"].as_str().unwrap_or(""),
            a["id"].as_str().unwrap_or("")
        );
    }
    println!("\n== agentgate audit verify");
    status(&mut d.agentgate(&["audit", "verify"]))?;
    let png = out.join("report.png");
    let shot = cmd("node")
        .arg(root.join("tests/oidc/screenshot.mjs"))
        .arg(out.join("index.html"))
        .arg(&png)
        .stdout(Stdio::null())
        .status();
    drop(daemon);
    drop(stub);
    drop(provider);
    println!(
        "\nThe evidence package: {}\n  open {}{}",
        out.display(),
        out.join("index.html").display(),
        if shot.is_ok_and(|s| s.success()) {
            format!("\n  (a screenshot of it: {})", png.display())
        } else {
            String::new()
        }
    );
    Ok(())
}
