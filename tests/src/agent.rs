//! The agent scenario's pieces, shared by the tests that run it: the real
//! agent (`OpenAI` Agents SDK, tests/agent/agent.py) under `agentgate exec`,
//! its scripted model stub, the approvals it waits on and the evidence
//! package built afterwards.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{Env, Proc, run_ok};

pub fn agent_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("agent")
}

/// The agent venv's python; panics with the fix when `cargo xtask setup` has not run.
pub fn python() -> PathBuf {
    let python = agent_dir().join(".venv/bin/python");
    assert!(
        python.exists(),
        "tests/agent/.venv is missing: run `cargo xtask setup`"
    );
    python
}

/// Starts the model stub on `port` in the test's netns, writing what it is
/// sent to `transcript`; with `script`, its plan is read from that file at
/// each request (a JSON list of `[tool, arguments]`).
pub fn model_stub(env: &Env, port: u16, transcript: &Path, script: Option<&Path>) -> Proc {
    let mut c = env.netns.command("python3");
    c.arg(agent_dir().join("model_stub.py"))
        .args(["--port", &port.to_string(), "--transcript"])
        .arg(transcript)
        .stdout(Stdio::piped());
    if let Some(s) = script {
        c.arg("--script").arg(s);
    }
    let mut stub = Proc::spawn("model stub", c).unwrap();
    assert_eq!(stub.read_line().unwrap().trim(), port.to_string());
    stub
}

/// Starts the agent as `user`, tagged and bound to `identity`, talking to
/// the model stub on `model_port` and to `PostgreSQL` at `pg_url`.
pub fn spawn_agent(env: &Env, user: &str, identity: &str, model_port: u16, pg_url: &str) -> Proc {
    let python = python();
    let mut c = env.exec_as(
        user,
        identity,
        &[
            &python.display().to_string(),
            &agent_dir().join("agent.py").display().to_string(),
        ],
    );
    c.env(
        "AGENT_MODEL_URL",
        format!("http://127.0.0.1:{model_port}/v1"),
    )
    .env("AGENT_PG_URL", pg_url)
    .env("HOME", "/tmp")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    Proc::spawn("agent", c).unwrap()
}

/// Waits up to `limit` for the agent to exit: (stdout, stderr, success).
pub fn wait_agent(agent: &mut Proc, limit: Duration) -> (String, String, bool) {
    use std::io::Read as _;
    let deadline = Instant::now() + limit;
    while agent.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the agent did not finish");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut out = Vec::new();
    let mut err = Vec::new();
    if let Some(mut s) = agent.child.stdout.take() {
        s.read_to_end(&mut out).unwrap();
    }
    if let Some(mut s) = agent.child.stderr.take() {
        s.read_to_end(&mut err).unwrap();
    }
    let ok = agent.child.wait().is_ok_and(|s| s.success());
    (
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
        ok,
    )
}

/// The JSON lines of an agent's output.
pub fn lines_of(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Now (plus `offset_secs`) as RFC 3339 in UTC, from `date`.
pub fn utc(offset_secs: i64) -> String {
    let out = run_ok(Command::new("date").args([
        "-u",
        "-d",
        &format!("{offset_secs:+} seconds"),
        "+%Y-%m-%dT%H:%M:%SZ",
    ]))
    .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The pending approval requests (`approvals list --json`).
pub fn pending(env: &Env) -> Vec<Value> {
    let out = run_ok(&mut env.agentgate(&["approvals", "list", "--json"])).unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array().cloned().unwrap_or_default()
}

/// Waits for the one pending request; returns it.
pub fn next_request(env: &Env, agent: &mut Proc) -> Value {
    let deadline = Instant::now() + Duration::from_mins(1);
    loop {
        let mut p = pending(env);
        if p.len() == 1 {
            return p.remove(0);
        }
        assert!(p.is_empty(), "more than one request pending: {p:?}");
        assert!(
            agent.child.try_wait().unwrap().is_none(),
            "the agent exited before asking"
        );
        assert!(Instant::now() < deadline, "no approval request came");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `agentgate evidence` for `identity` over `[from, to)` into `out`.
pub fn evidence(
    env: &Env,
    identity: &str,
    from: &str,
    to: &str,
    out: &Path,
) -> std::process::Output {
    env.agentgate(&[
        "evidence",
        "--identity",
        identity,
        "--from",
        from,
        "--to",
        to,
        "--out",
        &out.display().to_string(),
        "--dir",
        &env.state.join("audit").display().to_string(),
    ])
    .output()
    .unwrap()
}
