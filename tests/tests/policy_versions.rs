//! Issue 29 end to end: a policy change cannot launder a command. One
//! daemon, a real `PostgreSQL` and the real agent (tests/agent, as in
//! `agent_evidence.rs`), in three periods:
//!
//! 1. the baseline holds the agent's DROP for approval; bob approves; the
//!    package answers question 2 "no";
//! 2. a looser policy is loaded, the agent's DROP runs without approval, the
//!    baseline is restored; the package shows both versions, the loosened
//!    rule and the DROP under "allowed only by a policy change", and answers
//!    question 2 "yes"; the archived files are the bytes that were loaded;
//! 3. a held DROP is released by a reload that allows it, and another is
//!    denied by a reload that denies it, each on record.

use std::{
    fs,
    io::Read as _,
    path::Path,
    process::{Output, Stdio},
    time::{Duration, Instant},
};

use agentgate_e2e::{
    DaemonOptions, Env, Proc,
    agent::{self, next_request, utc},
    pg::PgServer,
    run_ok,
};
use serde_json::Value;

const STUB_PORT: u16 = 18410;
const AGENT: &str = "contractor";
const RULE: &str = "contractor-changes-need-approval";
const PSQL: &str = "/usr/lib/postgresql/15/bin/psql";

/// The baseline: reads allowed, writes and DDL held for `approvers`.
/// `changes` is the action of the rule for writes and DDL.
fn policy(changes: &str) -> String {
    let approval = if changes == "require_approval" {
        "approval = { approver_groups = [\"approvers\"], timeout = \"60s\" }"
    } else {
        ""
    };
    format!(
        r#"
[defaults]
unknown_destination = "deny"

[[resource]]
name = "customers-db"
protocol = "postgres"
addresses = ["127.0.0.1:5432"]
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
name = "{RULE}"
identities = ["{AGENT}"]
resources = ["customers-db"]
action = "{changes}"
match = {{ sql = ["write", "ddl"] }}
{approval}

[[rule]]
name = "contractor-may-use-the-model"
identities = ["{AGENT}"]
resources = ["model-stub"]
action = "allow"
"#
    )
}

fn accepted_reloads(env: &Env) -> Vec<String> {
    env.audit_records()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "policy.reload" && r["result"]["outcome"] == "accepted")
        .map(|r| r["result"]["digest"].as_str().unwrap().to_owned())
        .collect()
}

/// Replaces the policy file (atomically, as an editor's save would) and
/// waits until the daemon has put it in force; returns its digest.
fn install(env: &Env, text: &str) -> String {
    let before = accepted_reloads(env).len();
    let dir = env.state.join("policy");
    let tmp = dir.join(".agent.toml.new");
    fs::write(&tmp, text).unwrap();
    fs::rename(&tmp, dir.join("agent.toml")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let now = accepted_reloads(env);
        if now.len() > before {
            return now.last().unwrap().clone();
        }
        assert!(Instant::now() < deadline, "the new policy was not loaded");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn set_plan(path: &Path, sql: &str) {
    fs::write(
        path,
        serde_json::to_vec(&serde_json::json!([["query", {"sql": sql}]])).unwrap(),
    )
    .unwrap();
}

/// Runs the agent's one-statement plan to its end; returns its query result.
fn run_agent(env: &Env, url: &str, approve_as: Option<&str>) -> Value {
    let mut a = agent::spawn_agent(env, "nobody", AGENT, STUB_PORT, url);
    if let Some(bob) = approve_as {
        let req = next_request(env, &mut a);
        let id = req["id"].as_str().unwrap();
        run_ok(&mut env.agentgate(&["approvals", "approve", id, "--as", bob])).unwrap();
    }
    let (out, err, ok) = agent::wait_agent(&mut a, Duration::from_mins(1));
    assert!(ok, "the agent failed:\n{out}\n{err}");
    agent::lines_of(&out)
        .into_iter()
        .find(|v| v["tool"] == "query")
        .unwrap_or_else(|| panic!("no query in the agent's output:\n{out}\n{err}"))
}

/// The package for the agent over `[from, to)`.
fn package(env: &Env, from: &str, to: &str, name: &str) -> (Value, String) {
    let out = env.state.join(name);
    let run = agent::evidence(env, AGENT, from, to, &out);
    assert_eq!(
        run.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let report: Value =
        serde_json::from_slice(&fs::read(out.join("evidence.json")).unwrap()).unwrap();
    let html = fs::read_to_string(out.join("index.html")).unwrap();
    (report, html)
}

fn q2(report: &Value) -> &Value {
    report["attestations"][0]["answers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["id"] == "q2")
        .unwrap()
}

/// Now, RFC 3339 UTC with nanoseconds: a period boundary that needs no waiting.
fn now() -> String {
    let out =
        run_ok(std::process::Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%S.%NZ"])).unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn psql(env: &Env, url: &str, sql: &str) -> Proc {
    let mut c = env.exec(AGENT, &[PSQL, url, "-At", "-c", sql]);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    Proc::spawn("psql", c).unwrap()
}

fn finish(mut p: Proc) -> Output {
    let deadline = Instant::now() + Duration::from_secs(30);
    while p.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "psql did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (mut out, mut err) = (String::new(), String::new());
    p.child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    p.child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    Output {
        status: p.child.wait().unwrap(),
        stdout: out.into_bytes(),
        stderr: err.into_bytes(),
    }
}

fn wait_one_pending(env: &Env) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let p = agent::pending(env);
        if p.len() == 1 {
            return p[0]["id"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "expected one pending: {p:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn record_of(env: &Env, kind: &str, id: &str) -> Value {
    env.audit_records()
        .unwrap()
        .into_iter()
        .find(|r| r["kind"] == kind && r["approval"]["id"] == id)
        .unwrap_or_else(|| panic!("no {kind} record for {id}"))
}

fn table_exists(pg: &PgServer, name: &str) -> bool {
    pg.admin_sql(&format!("SELECT to_regclass('public.{name}') IS NOT NULL"))
        .unwrap()
        .trim()
        == "t"
}

#[test]
#[allow(clippy::too_many_lines)] // one scenario, told in order
fn a_policy_change_cannot_launder_a_command() {
    let started = Instant::now();
    agent::python();
    let baseline = policy("require_approval");
    let looser = policy("allow");
    let mut env = Env::prepare(
        "polver",
        DaemonOptions {
            extra: "\n[approvals]\nallow_labels = true\n".into(),
            labels: vec![
                (AGENT.into(), vec!["contractors".into()]),
                ("bob".into(), vec!["approvers".into()]),
            ],
            policies: vec![("agent.toml".into(), baseline.clone())],
            audit_extra: "checkpoint_every_secs = 1".into(),
            ..Default::default()
        },
    )
    .unwrap();
    let pg = PgServer::start(&env.netns, 5432, false).unwrap();
    for t in ["scratch1", "scratch2", "scratch3", "scratch4"] {
        pg.admin_sql(&format!("CREATE TABLE {t} (id int)")).unwrap();
    }
    let transcript = env.state.join("model-transcript.jsonl");
    let plan = env.state.join("plan.json");
    set_plan(&plan, "DROP TABLE scratch1");
    let _stub = agent::model_stub(&env, STUB_PORT, &transcript, Some(&plan));
    env.start_daemon().unwrap();
    eprintln!("daemon up at {:.1} s", started.elapsed().as_secs_f64());
    let url = pg.url("127.0.0.1", "postgres", "postgres");
    let start = env
        .audit_records()
        .unwrap()
        .into_iter()
        .find(|r| r["kind"] == "daemon.start")
        .unwrap();
    let base_digest = start["action"]["policy_digest"]
        .as_str()
        .unwrap()
        .to_owned();

    // 1. No change: the DROP waits for bob.
    let from1 = utc(-1);
    let q = run_agent(&env, &url, Some("bob"));
    assert_eq!(q["ok"], true, "{q}");
    assert!(!table_exists(&pg, "scratch1"));
    let to1 = now();
    eprintln!("period 1 done at {:.1} s", started.elapsed().as_secs_f64());

    // 2. Loosened, used, restored.
    let from2 = to1.clone();
    let loose_digest = install(&env, &looser);
    assert_ne!(loose_digest, base_digest);
    set_plan(&plan, "DROP TABLE scratch2");
    let q = run_agent(&env, &url, None);
    assert_eq!(
        q["ok"], true,
        "ran without approval under the looser policy: {q}"
    );
    assert!(!table_exists(&pg, "scratch2"));
    assert_eq!(install(&env, &baseline), base_digest);
    let to2 = now();
    eprintln!("period 2 done at {:.1} s", started.elapsed().as_secs_f64());

    // 3. Held commands decided again by reloads.
    let p = psql(&env, &url, "DROP TABLE scratch3");
    let released = wait_one_pending(&env);
    install(&env, &looser);
    let out = finish(p);
    assert!(
        out.status.success(),
        "released by the reload: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!table_exists(&pg, "scratch3"));
    let r = record_of(&env, "approval.released", &released);
    assert_eq!(r["approval"]["rule"], RULE);
    assert_eq!(r["approval"]["policy_digest"], loose_digest.as_str());
    let ran = env
        .audit_records()
        .unwrap()
        .into_iter()
        .find(|r| r["kind"] == "statement" && r["approval"]["id"] == released.as_str())
        .expect("the released statement's record");
    assert_eq!(ran["approval"]["outcome"], "released", "{ran}");
    assert_eq!(ran["decision"]["verdict"], "allow", "{ran}");

    install(&env, &baseline);
    let p = psql(&env, &url, "DROP TABLE scratch4");
    let refused = wait_one_pending(&env);
    install(&env, &policy("deny"));
    let out = finish(p);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("denied by policy rule"), "{err}");
    assert!(table_exists(&pg, "scratch4"));
    let r = record_of(&env, "approval.refused", &refused);
    assert_eq!(r["approval"]["rule"], RULE);
    assert!(agent::pending(&env).is_empty());

    eprintln!("period 3 done at {:.1} s", started.elapsed().as_secs_f64());
    // The packages: period 1 answers no; period 2 yes, and says why.
    let (p1, _) = package(&env, &from1, &to1, "evidence-1");
    assert_eq!(q2(&p1)["answer"], "no", "{:#}", q2(&p1));
    assert_eq!(p1["policy"]["at_start"]["digest"], base_digest.as_str());
    assert_eq!(p1["policy"]["changed"]["items"], Value::Array(vec![]));

    let (p2, html) = package(&env, &from2, &to2, "evidence-2");
    let answer = q2(&p2);
    assert_eq!(answer["answer"], "yes", "{answer:#}");
    assert!(
        answer["detail"]
            .as_str()
            .unwrap()
            .starts_with("See policy changes"),
        "{answer:#}"
    );
    let pol = &p2["policy"];
    assert_eq!(pol["at_start"]["digest"], base_digest.as_str(), "{pol:#}");
    let versions: Vec<&str> = pol["changed"]["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["digest"].as_str().unwrap())
        .collect();
    assert_eq!(versions, [loose_digest.as_str(), base_digest.as_str()]);
    let change = &pol["changed"]["items"][0]["changes"][0];
    assert_eq!(change["name"], RULE, "{pol:#}");
    assert_eq!(change["change"], "loosened");
    assert_eq!(change["how"][0], "action: require_approval -> allow");
    assert!(
        change["new_text"]
            .as_str()
            .unwrap()
            .contains("action = \"allow\"")
    );
    let listed = pol["allowed_by_change"]["items"].as_array().unwrap();
    assert_eq!(listed.len(), 1, "{pol:#}");
    assert!(
        listed[0]["summary"]
            .as_str()
            .unwrap()
            .contains("DROP TABLE scratch2"),
        "{pol:#}"
    );
    assert_eq!(listed[0]["rule"], RULE);
    let cited = listed[0]["record"]["seq"].clone();
    assert!(
        answer["records"]["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["seq"] == cited),
        "{answer:#}"
    );
    assert!(html.contains("Allowed only by a policy change"));
    assert!(html.contains("see policy changes"));
    let audit_dir = env.state.join("audit").display().to_string();
    run_ok(&mut env.agentgate(&["audit", "verify", "--dir", &audit_dir])).unwrap();

    // The archive holds the bytes that were loaded, under their digests.
    let archive = env.state.join("policies");
    for (digest, text) in [(&base_digest, &baseline), (&loose_digest, &looser)] {
        assert_eq!(
            fs::read(archive.join(digest).join("agent.toml")).unwrap(),
            text.as_bytes()
        );
    }
    // `policy diff` prints the same change, from the archive.
    let out = run_ok(&mut env.agentgate(&[
        "policy",
        "diff",
        &base_digest,
        &loose_digest[..12],
        "--json",
    ]))
    .unwrap();
    let d: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d["changes"][0], *change);
    let bad = env
        .agentgate(&["policy", "diff", "nonsense", &base_digest])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&bad.stderr)
            .contains("neither a policy directory nor a policy digest"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    eprintln!("scenario took {:.1} s", started.elapsed().as_secs_f64());
}
