//! Approvals end to end: a real daemon, real `PostgreSQL`, the real npm
//! `oidc-provider` (tests/oidc/provider.mjs) and approvers who log in with
//! `agentgate login` (device flow; `tests/scripts/device_browser.py` plays
//! their browser). Labels may not vote here (`allow_labels` is off).

use std::{
    io::Read as _,
    path::Path,
    process::{Output, Stdio},
    time::{Duration, Instant},
};

use agentgate_e2e::{DaemonOptions, Env, Proc, pg::PgServer, run_ok};
use serde_json::Value;

const PSQL: &str = "/usr/lib/postgresql/15/bin/psql";
const OIDC_PORT: u16 = 18080;
const ISSUER: &str = "http://127.0.0.1:18080";

fn oidc_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("oidc")
}

/// `demo` (a label agent) and `dave` (a verified person, also an approver)
/// run statements; updates need one approver and open a 10-minute grant for
/// the same statement; DDL needs two.
fn policy() -> String {
    r#"
[defaults]
unknown_destination = "deny"

[[resource]]
name = "pg"
protocol = "postgres"
addresses = ["127.0.0.1:5432"]
default_action = "deny"

[[rule]]
name = "reads"
identities = ["demo", "dave"]
resources = ["pg"]
action = "allow"
match = { sql = ["read", "transaction"] }

[[rule]]
name = "writes-need-one"
identities = ["demo", "dave"]
resources = ["pg"]
action = "require_approval"
match = { sql = ["write"] }
approval = { approver_groups = ["approvers"], timeout = "60s", grant_window = "10m", grant_scope = "statement" }

[[rule]]
name = "ddl-needs-two"
identities = ["demo"]
resources = ["pg"]
action = "require_approval"
match = { sql = ["ddl"] }
approval = { approver_groups = ["approvers"], quorum = 2, timeout = "60s" }
"#
    .into()
}

struct World {
    env: Env,
    pg: PgServer,
    _provider: Proc,
}

fn world(name: &str) -> World {
    assert!(
        oidc_dir().join("node_modules/oidc-provider").is_dir(),
        "tests/oidc/node_modules is missing: run `cargo xtask setup`"
    );
    let extra = format!(
        "\n[identity]\nissuer = \"{ISSUER}\"\nclient_id = \"agentgate-cli\"\n\n\
         [approvals]\nallow_labels = false\n"
    );
    let mut env = Env::prepare(
        name,
        DaemonOptions {
            extra,
            policies: vec![("pg.toml".into(), policy())],
            // A label in the approvers group: refused, labels may not vote here.
            labels: vec![("approver".into(), vec!["approvers".into()])],
            ..DaemonOptions::default()
        },
    )
    .unwrap();
    let mut c = env.netns.command("node");
    c.arg("provider.mjs")
        .current_dir(oidc_dir())
        .env("OIDC_PORT", OIDC_PORT.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut provider = Proc::spawn("oidc-provider", c).unwrap();
    let ready = provider.read_line().unwrap();
    assert!(ready.contains("issuer"), "{ready}");
    env.start_daemon().unwrap();
    let pg = PgServer::start(&env.netns, 5432, false).unwrap();
    pg.seed_customers(5).unwrap();
    World {
        env,
        pg,
        _provider: provider,
    }
}

fn spawn_psql(env: &Env, who: &str, url: &str, sql: &str) -> Proc {
    let mut c = env.exec(who, &[PSQL, url, "-At", "-c", sql]);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    Proc::spawn("psql", c).unwrap()
}

fn finish(mut p: Proc) -> Output {
    let deadline = Instant::now() + Duration::from_secs(30);
    while p.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "client did not finish");
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

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn json(env: &Env, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let out = run_ok(&mut env.agentgate(&a)).unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Waits for exactly `n` pending requests; returns them.
fn wait_pending(env: &Env, n: usize) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let p = json(env, &["approvals", "list"])
            .as_array()
            .cloned()
            .unwrap_or_default();
        if p.len() == n {
            return p;
        }
        assert!(Instant::now() < deadline, "expected {n} pending: {p:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `approvals ARGS` expecting the caller's error (exit 2); returns stderr.
fn refused(env: &Env, args: &[&str]) -> String {
    let out = env.agentgate(args).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{args:?}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stderr)
}

fn name_of(pg: &PgServer, id: u32) -> String {
    pg.admin_sql(&format!("SELECT name FROM customers WHERE id = {id}"))
        .unwrap()
        .trim()
        .to_owned()
}

fn records(env: &Env, kind: &str) -> Vec<Value> {
    env.audit_records()
        .unwrap()
        .into_iter()
        .filter(|r| r["kind"] == kind)
        .collect()
}

const UPDATE_1: &str = "UPDATE customers SET name = 'approved' WHERE id = 1";

#[test]
#[allow(clippy::too_many_lines)] // one approval story, told in order
fn verified_approvers_separation_of_duties_quorum_and_grants() {
    let w = world("approvals");
    let (env, pg) = (&w.env, &w.pg);
    let url = pg.url("127.0.0.1", "postgres", "postgres");
    for user in ["bob", "dave", "alice"] {
        env.login(user);
    }

    // A tagged agent's write is held; nothing runs meanwhile.
    let p = spawn_psql(env, "demo", &url, UPDATE_1);
    let req = wait_pending(env, 1).remove(0);
    let id = req["id"].as_str().unwrap().to_owned();
    assert_eq!(req["requester"]["identity"], "demo");
    assert!(req["requester"]["pid"].as_u64().unwrap() > 0);
    assert!(
        req["requester"]["cgroup"]
            .as_str()
            .unwrap()
            .contains("agents"),
        "{req}"
    );
    assert!(
        !req["summary"].as_str().unwrap().contains("approved"),
        "literals redacted"
    );
    assert_eq!(name_of(pg, 1), "Customer 1");

    // Not an approver, not verified, not a name the daemon knows: refused.
    let e = refused(env, &["approvals", "approve", &id, "--as", "alice"]);
    assert!(e.contains("not in an approver group"), "{e}");
    let e = refused(env, &["approvals", "approve", &id, "--as", "approver"]);
    assert!(e.contains("label identity"), "{e}");
    let e = refused(env, &["approvals", "approve", &id, "--as", "mallory"]);
    assert!(e.contains("no verified session"), "{e}");
    assert_eq!(wait_pending(env, 1)[0]["votes"], serde_json::json!([]));

    // bob, verified, in `approvers`: the statement runs.
    let out = run_ok(&mut env.agentgate(&[
        "approvals",
        "approve",
        &id,
        "--as",
        "bob",
        "--ticket",
        "CHG-1",
    ]))
    .unwrap();
    assert!(
        text(&out.stdout).contains("grant grt-"),
        "{}",
        text(&out.stdout)
    );
    let out = finish(p);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("UPDATE 1"));
    assert_eq!(name_of(pg, 1), "approved");
    let granted = records(env, "approval.granted");
    assert_eq!(granted.len(), 1);
    assert_eq!(granted[0]["identity"]["kind"], "human");
    assert_eq!(
        granted[0]["identity"]["subject"],
        format!("bob ({ISSUER}#bob)")
    );
    assert_eq!(granted[0]["approval"]["ticket"], "CHG-1");
    assert_eq!(granted[0]["approval"]["via"], "cli");

    // The grant: listed, and the same statement runs again without a request.
    let grants = json(env, &["approvals", "grants"]);
    assert_eq!(grants.as_array().unwrap().len(), 1, "{grants}");
    let grant = grants[0]["id"].as_str().unwrap().to_owned();
    assert!(grant.starts_with("grt-"));
    assert_eq!(grants[0]["identity"], "demo");
    assert_eq!(grants[0]["scope"], "statement");
    let out = finish(spawn_psql(env, "demo", &url, UPDATE_1));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains("held for approval"),
        "covered by the grant"
    );
    let under_grant: Vec<Value> = records(env, "statement")
        .into_iter()
        .filter(|r| r["approval"]["outcome"] == "granted")
        .collect();
    assert_eq!(under_grant.len(), 1);
    assert_eq!(under_grant[0]["approval"]["grant"], grant.as_str());
    assert_eq!(json(env, &["approvals", "grants"])[0]["uses"], 1);

    // DDL needs two distinct verified approvers.
    let p = spawn_psql(
        env,
        "demo",
        &url,
        "ALTER TABLE customers ADD COLUMN note text",
    );
    let id = wait_pending(env, 1)[0]["id"].as_str().unwrap().to_owned();
    let out = run_ok(&mut env.agentgate(&["approvals", "approve", &id, "--as", "bob"])).unwrap();
    assert!(
        text(&out.stdout).contains("1 of 2"),
        "{}",
        text(&out.stdout)
    );
    let e = refused(env, &["approvals", "approve", &id, "--as", "bob"]);
    assert!(e.contains("already voted"), "{e}");
    assert_eq!(
        wait_pending(env, 1)[0]["votes"].as_array().unwrap().len(),
        1
    );
    run_ok(&mut env.agentgate(&["approvals", "approve", &id, "--as", "dave"])).unwrap();
    let out = finish(p);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(records(env, "approval.vote").len(), 1);

    // dave's own write: dave (an approver) cannot approve it; bob rejects it
    // with a reason, which dave's psql sees.
    let p = spawn_psql(
        env,
        "dave",
        &url,
        "UPDATE customers SET name = 'daves' WHERE id = 2",
    );
    let req = wait_pending(env, 1).remove(0);
    let id = req["id"].as_str().unwrap().to_owned();
    assert_eq!(req["requester"]["identity"], "dave");
    let e = refused(env, &["approvals", "approve", &id, "--as", "dave"]);
    assert!(e.contains("separation of duties"), "{e}");
    let e = refused(env, &["approvals", "reject", &id, "--as", "bob"]);
    assert!(e.contains("--reason"), "{e}");
    run_ok(&mut env.agentgate(&[
        "approvals",
        "reject",
        &id,
        "--as",
        "bob",
        "--reason",
        "no change ticket",
    ]))
    .unwrap();
    let out = finish(p);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("42501") || err.contains("permission") || err.contains("denied"),
        "{err}"
    );
    assert!(
        err.contains("no change ticket") && err.contains("writes-need-one"),
        "{err}"
    );
    assert_eq!(name_of(pg, 2), "Customer 2");
    let denied = records(env, "approval.denied");
    assert_eq!(denied[0]["approval"]["reason"], "no change ticket");

    // The agent cancels its held statement (a Postgres CancelRequest): the
    // request is withdrawn on record, the client gets query_canceled, and the
    // session goes on.
    let out = env
        .exec(
            "demo",
            &[
                "python3",
                "-c",
                r#"
import sys, threading, psycopg
c = psycopg.connect(sys.argv[1], autocommit=True)
threading.Timer(2.0, c.cancel).start()
try:
    c.execute("UPDATE customers SET name = 'cancelled' WHERE id = 4")
    print("ran")
except psycopg.errors.QueryCanceled as e:
    print("cancelled:", e)
print("after:", c.execute("SELECT 1").fetchone()[0])
"#,
                &url,
            ],
        )
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(
        stdout.contains("cancelled:") && stdout.contains("withdrawn"),
        "{stdout}"
    );
    assert!(stdout.contains("after: 1"), "{stdout}");
    assert_eq!(name_of(pg, 4), "Customer 4");
    assert!(wait_pending(env, 0).is_empty());
    let withdrawn = records(env, "approval.withdrawn");
    assert_eq!(withdrawn.len(), 1, "{withdrawn:?}");
    assert_eq!(withdrawn[0]["identity"]["subject"], "demo");
}

#[test]
fn a_restart_cancels_held_requests_and_keeps_grants() {
    let mut w = world("apprestart");
    let url = w.pg.url("127.0.0.1", "postgres", "postgres");
    w.env.login("bob");

    // A grant before the restart.
    let p = spawn_psql(&w.env, "demo", &url, UPDATE_1);
    let id = wait_pending(&w.env, 1)[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    run_ok(
        &mut w
            .env
            .agentgate(&["approvals", "approve", &id, "--as", "bob"]),
    )
    .unwrap();
    assert!(finish(p).status.success());
    let grant = json(&w.env, &["approvals", "grants"])[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // Held when the daemon dies.
    let held = spawn_psql(
        &w.env,
        "demo",
        &url,
        "UPDATE customers SET name = 'held' WHERE id = 3",
    );
    let held_id = wait_pending(&w.env, 1)[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    w.env.kill_daemon();
    let out = finish(held);
    assert!(!out.status.success(), "the held client lost its connection");
    w.env.start_daemon().unwrap();

    // Recorded as cancelled, and no longer pending.
    let cancelled = records(&w.env, "approval.cancelled");
    assert_eq!(cancelled.len(), 1, "{cancelled:?}");
    assert_eq!(cancelled[0]["approval"]["id"], held_id.as_str());
    assert!(
        cancelled[0]["approval"]["reason"]
            .as_str()
            .unwrap()
            .contains("daemon restarted"),
        "{}",
        cancelled[0]
    );
    assert_eq!(cancelled[0]["identity"]["subject"], "demo");
    assert!(wait_pending(&w.env, 0).is_empty());
    assert_eq!(
        name_of(&w.pg, 3),
        "Customer 3",
        "the held statement never ran"
    );

    // The grant still covers the same statement.
    let grants = json(&w.env, &["approvals", "grants"]);
    assert_eq!(grants[0]["id"], grant.as_str(), "{grants}");
    let out = finish(spawn_psql(&w.env, "demo", &url, UPDATE_1));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!text(&out.stderr).contains("held for approval"));
    assert!(
        records(&w.env, "statement")
            .iter()
            .any(|r| r["approval"]["grant"] == grant.as_str()),
        "the use names the grant"
    );

    // Revoked (sessions do not survive a restart: bob logs in again), the
    // statement is held once more.
    w.env.login("bob");
    let out = run_ok(&mut w.env.agentgate(&[
        "approvals",
        "revoke",
        &grant,
        "--as",
        "bob",
        "--reason",
        "change window over",
    ]))
    .unwrap();
    assert!(text(&out.stdout).contains("revoked"));
    assert_eq!(
        json(&w.env, &["approvals", "grants"]),
        serde_json::json!([])
    );
    let revoked = records(&w.env, "grant.revoked");
    assert_eq!(revoked.len(), 1);
    assert_eq!(revoked[0]["approval"]["reason"], "change window over");
    let p = spawn_psql(&w.env, "demo", &url, UPDATE_1);
    let id = wait_pending(&w.env, 1)[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    run_ok(&mut w.env.agentgate(&[
        "approvals",
        "reject",
        &id,
        "--as",
        "bob",
        "--reason",
        "not again",
    ]))
    .unwrap();
    assert!(!finish(p).status.success());
}
