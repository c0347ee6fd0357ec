//! `PostgreSQL` through agentgate, with a real server and real clients.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use agentgate_e2e::{
    DaemonOptions, Env, Proc,
    pg::{PASSWORD, PgServer, make_ca},
    run_ok, scripts_dir,
};

const PSQL: &str = "/usr/lib/postgresql/15/bin/psql";

#[test]
fn psql_through_the_proxy_reaches_the_real_server() {
    let env = Env::new("pgl4", DaemonOptions::default()).unwrap();
    let pg = PgServer::start(&env.netns, 5432, false).unwrap();
    pg.seed_customers(10).unwrap();
    let url = pg.url("127.0.0.1", "postgres", "postgres");
    let out = run_ok(&mut env.exec(
        "demo",
        &[PSQL, &url, "-qAtc", "SELECT count(*) FROM customers"],
    ))
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "10");
    let s = env.status().unwrap();
    assert_eq!(s["counters"]["redirected"].as_u64(), Some(1));
}

/// The L7 policy used by most tests: reads allowed, writes need approval,
/// everything else denied, computed access to `customers` denied, PII masked.
fn l7_policy(port: u16, approval_timeout: &str, tls: Option<&str>) -> String {
    let tls = tls.map_or(String::new(), |ca| {
        format!("tls = {{ mode = \"verify-full\", ca_file = \"{ca}\" }}\n")
    });
    format!(
        r#"
[defaults]
unknown_destination = "deny"

[[resource]]
name = "pg"
protocol = "postgres"
addresses = ["127.0.0.1:{port}", "[::1]:{port}"]
default_action = "deny"
{tls}
[[rule]]
name = "demo-reads"
identities = ["demo"]
resources = ["pg"]
action = "allow"
match = {{ sql = ["read", "transaction"] }}

[[rule]]
name = "demo-writes-need-approval"
identities = ["demo"]
resources = ["pg"]
action = "require_approval"
match = {{ sql = ["write"] }}
approval = {{ approver_groups = ["dba"], timeout = "{approval_timeout}" }}

[[rule]]
name = "no-ddl-or-admin"
identities = ["demo"]
resources = ["pg"]
action = "deny"
match = {{ sql = ["ddl", "dcl", "admin", "unknown"] }}

[[rule]]
name = "no-computed-pii"
identities = ["demo"]
resources = ["pg"]
action = "deny"
match = {{ tables = ["customers"], functions = ["encode", "decode", "md5", "sha256", "convert_to", "reverse", "translate", "overlay"] }}

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

fn l7_env(name: &str, approval_timeout: &str) -> (Env, PgServer) {
    l7_env_with(name, approval_timeout, "")
}

/// `extra`: config text after the `[proxy]` keys (e.g. a `[proxy.postgres]` table).
fn l7_env_with(name: &str, approval_timeout: &str, extra: &str) -> (Env, PgServer) {
    // `dba-ann` is a label approver: labels may vote here (local-trial setting).
    let opts = DaemonOptions {
        policies: vec![("pg.toml".into(), l7_policy(5432, approval_timeout, None))],
        extra: format!("{extra}\n[approvals]\nallow_labels = true\n"),
        labels: vec![("dba-ann".into(), vec!["dba".into()])],
        ..DaemonOptions::default()
    };
    let env = Env::new(name, opts).unwrap();
    let pg = PgServer::start(&env.netns, 5432, false).unwrap();
    pg.seed_customers(10).unwrap();
    (env, pg)
}

fn psql(env: &Env, url: &str, args: &[&str]) -> std::process::Output {
    let mut a = vec![PSQL, url];
    a.extend_from_slice(args);
    env.exec("demo", &a).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs a Python program (psycopg) tagged as `demo`; returns its stdout and stderr.
fn python(env: &Env, program: &str, args: &[&str]) -> std::process::Output {
    let mut a = vec!["python3", "-c", program];
    a.extend_from_slice(args);
    env.exec("demo", &a).output().unwrap()
}

fn audit_records(env: &Env) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(env.state.join("audit"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
        .collect();
    files.sort();
    for f in files {
        for line in std::fs::read_to_string(f).unwrap().lines() {
            if let Ok(v) = serde_json::from_str(line) {
                out.push(v);
            }
        }
    }
    out
}

#[test]
fn statements_are_allowed_denied_and_transactions_stay_postgres_shaped() {
    let (env, pg) = l7_env("pgdecide", "30s");
    let url = pg.url("127.0.0.1", "postgres", "postgres");

    let out = psql(&env, &url, &["-qAtc", "SELECT count(*) FROM customers"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "10");

    let out = psql(&env, &url, &["-qAtc", "DROP TABLE customers"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("denied by policy rule \"no-ddl-or-admin\""),
        "{err}"
    );
    assert_eq!(
        pg.admin_sql("SELECT count(*) FROM customers")
            .unwrap()
            .trim(),
        "10"
    );

    // A denial inside a transaction fails it: COMMIT rolls back; the session
    // stays usable afterwards.
    let mut c = env.exec(
        "demo",
        &[PSQL, &url, "-At", "-v", "VERBOSITY=verbose", "-f", "-"],
    );
    c.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(
                b"BEGIN;\nSELECT count(*) FROM customers;\nDROP TABLE customers;\nSELECT 1;\nCOMMIT;\nSELECT 'after';\n",
            )
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert!(se.contains("42501"), "denial has SQLSTATE 42501: {se}");
    assert!(se.contains("current transaction is aborted"), "{se}");
    assert!(
        so.contains("ROLLBACK"),
        "COMMIT of a failed block rolls back: {so}"
    );
    assert!(so.trim_end().ends_with("after"), "{so}");

    // Extended protocol (psycopg): the same, and the connection is reusable.
    let out = python(
        &env,
        r#"
import json, sys, psycopg
c = psycopg.connect(sys.argv[1])
res = {}
try:
    c.execute("DROP TABLE customers")
except psycopg.errors.InsufficientPrivilege as e:
    res["denied"] = str(e)
res["status_after_denial"] = c.info.transaction_status.name
c.rollback()
res["count"] = c.execute("SELECT count(*) FROM customers WHERE id > %s", (0,)).fetchone()[0]
print(json.dumps(res))
"#,
        &[&url],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value =
        serde_json::from_str(text(&out.stdout).lines().last().unwrap()).unwrap();
    assert!(
        v["denied"].as_str().unwrap().contains("no-ddl-or-admin"),
        "{v}"
    );
    assert_eq!(v["status_after_denial"], "INERROR");
    assert_eq!(v["count"], 10);

    check_statement_records(&audit_records(&env));
}

/// Write-ahead records of the test above: the denied DROP and the allowed
/// reads, redacted; the parameterised read's execution and its result.
fn check_statement_records(recs: &[serde_json::Value]) {
    let stmts: Vec<_> = recs.iter().filter(|r| r["kind"] == "statement").collect();
    assert!(
        stmts.iter().any(|r| r["action"]["class"] == "ddl"
            && r["decision"]["verdict"] == "deny"
            && r["decision"]["rule"] == "no-ddl-or-admin"),
        "a deny record for the DROP"
    );
    let param_read = stmts
        .iter()
        .find(|r| {
            r["action"]["message"] == "parse"
                && r["action"]["sql"]
                    .as_str()
                    .is_some_and(|s| s.contains("id > $1"))
        })
        .expect("the parameterised read was recorded");
    assert_eq!(param_read["decision"]["verdict"], "allow");
    assert_eq!(param_read["action"]["sql_hash"].as_str().unwrap().len(), 64);
    // Each execution has its own record before its result: linked to the
    // Parse by the keyed hash, bind parameters counted, not shown.
    let position = |pred: &dyn Fn(&serde_json::Value) -> bool| {
        recs.iter()
            .position(|r| r["kind"] == "statement" && pred(r))
            .expect("record present")
    };
    let execution = position(&|r| {
        r["action"]["message"] == "execute"
            && r["action"]["sql_hash"] == param_read["action"]["sql_hash"]
    });
    assert_eq!(recs[execution]["action"]["class"], "read");
    assert_eq!(recs[execution]["action"]["bind"]["params"], 1);
    assert_eq!(
        recs[execution]["decision"]["rule"], param_read["decision"]["rule"],
        "decided again, by the same rule"
    );
    let completed = position(&|r| {
        r["action"]["phase"] == "completed"
            && r["action"]["sql_hash"] == param_read["action"]["sql_hash"]
    });
    assert!(
        execution < completed,
        "the execution is recorded before its result"
    );
    assert_eq!(recs[completed]["result"]["command"], "SELECT 1");
}

fn pending(env: &Env) -> Vec<serde_json::Value> {
    let out = run_ok(&mut env.agentgate(&["approvals", "list", "--json"])).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array().cloned().unwrap_or_default()
}

fn wait_pending(env: &Env, n: usize, timeout: Duration) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let p = pending(env);
        if p.len() == n {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "expected {n} pending, have {p:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn spawn_psql(env: &Env, url: &str, sql: &str) -> Proc {
    let mut c = env.exec("demo", &[PSQL, url, "-At", "-c", sql]);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    Proc::spawn("psql", c).unwrap()
}

/// Starts a Python program (psycopg) tagged as `demo` with `url` as its
/// argument; [`finish`] collects it.
fn spawn_python(env: &Env, program: &str, url: &str) -> Proc {
    let mut c = env.exec("demo", &["python3", "-c", program, url]);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    Proc::spawn("python", c).unwrap()
}

fn finish(p: Proc) -> std::process::Output {
    use std::io::Read as _;
    let mut p = p;
    let deadline = Instant::now() + Duration::from_secs(30);
    while p.child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "client did not finish");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut out = String::new();
    let mut err = String::new();
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
    std::process::Output {
        status: p.child.wait().unwrap(),
        stdout: out.into_bytes(),
        stderr: err.into_bytes(),
    }
}

#[test]
#[allow(clippy::too_many_lines)] // one approval story, told in order
fn writes_wait_for_approval_and_denials_and_timeouts_are_native_errors() {
    let (env, pg) = l7_env("pgapprove", "6s");
    let url = pg.url("127.0.0.1", "postgres", "postgres");
    let name_of_1 = || {
        pg.admin_sql("SELECT name FROM customers WHERE id = 1")
            .unwrap()
            .trim()
            .to_owned()
    };

    // Approved: the held UPDATE runs.
    let p = spawn_psql(
        &env,
        &url,
        "UPDATE customers SET name = 'approved-x' WHERE id = 1",
    );
    let req = wait_pending(&env, 1, Duration::from_secs(10)).remove(0);
    let summary = req["summary"].as_str().unwrap();
    assert!(
        !summary.contains("approved-x"),
        "literals redacted: {summary}"
    );
    assert_eq!(req["requester"]["identity"], "demo");
    assert_eq!(name_of_1(), "Customer 1", "nothing ran while held");
    let id = req["id"].as_str().unwrap();
    run_ok(&mut env.agentgate(&["approvals", "approve", id, "--as", "dba-ann"])).unwrap();
    let out = finish(p);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("held for approval"),
        "NOTICE shown"
    );
    assert!(text(&out.stdout).contains("UPDATE 1"));
    assert_eq!(name_of_1(), "approved-x");

    // Rejected: a permission error naming the rule; nothing ran.
    let p = spawn_psql(
        &env,
        &url,
        "UPDATE customers SET name = 'rejected-x' WHERE id = 1",
    );
    let id = wait_pending(&env, 1, Duration::from_secs(10))[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    run_ok(&mut env.agentgate(&[
        "approvals",
        "reject",
        &id,
        "--as",
        "dba-ann",
        "--reason",
        "no ticket",
    ]))
    .unwrap();
    let out = finish(p);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("demo-writes-need-approval") && err.contains("no ticket"),
        "{err}"
    );
    assert_eq!(name_of_1(), "approved-x");

    // Timeout: denied when the deadline passes.
    let started = Instant::now();
    let p = spawn_psql(
        &env,
        &url,
        "UPDATE customers SET name = 'expired-x' WHERE id = 1",
    );
    wait_pending(&env, 1, Duration::from_secs(10));
    let out = finish(p);
    assert!(started.elapsed() >= Duration::from_secs(5));
    assert!(
        text(&out.stderr).contains("expired"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(name_of_1(), "approved-x");
    assert!(pending(&env).is_empty());

    // A client that goes away while held cancels its request; nothing runs.
    let out = python(
        &env,
        r#"
import os, sys, threading, psycopg
c = psycopg.connect(sys.argv[1], autocommit=True)
threading.Timer(1.5, lambda: os._exit(3)).start()
c.execute("UPDATE customers SET name = 'gone-x' WHERE id = 1")
"#,
        &[&url],
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(3);
    while !pending(&env).is_empty() {
        assert!(Instant::now() < deadline, "request not cancelled");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        name_of_1(),
        "approved-x",
        "the cancelled statement never ran"
    );

    // A prepared statement: each execution is a command of its own, approved
    // on its own (the rule has no grant window).
    let p = spawn_python(
        &env,
        r#"
import sys, psycopg
c = psycopg.connect(sys.argv[1], autocommit=True)
q = "UPDATE customers SET name = %s WHERE id = 1"
for n in ("prepared-1", "prepared-2"):
    c.execute(q, (n,), prepare=True)
"#,
        &url,
    );
    for expected in ["prepared-1", "prepared-2"] {
        let id = wait_pending(&env, 1, Duration::from_secs(10))[0]["id"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_ne!(name_of_1(), expected, "nothing ran while held");
        run_ok(&mut env.agentgate(&["approvals", "approve", &id, "--as", "dba-ann"])).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while name_of_1() != expected {
            assert!(
                Instant::now() < deadline,
                "{expected} did not run on its own approval (name is {})",
                name_of_1()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let out = finish(p);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(pending(&env).is_empty());

    let recs = audit_records(&env);
    for outcome in ["approved", "rejected", "expired", "cancelled"] {
        assert!(
            recs.iter()
                .any(|r| r["kind"] == "statement" && r["approval"]["outcome"] == outcome),
            "a statement record with approval outcome {outcome}"
        );
    }
    for kind in [
        "approval.requested",
        "approval.granted",
        "approval.denied",
        "approval.expired",
        "approval.cancelled",
    ] {
        assert!(recs.iter().any(|r| r["kind"] == kind), "a {kind} record");
    }
    // (The workload's command line is recorded as the process gave it; psql
    // -c puts SQL there. What this handler writes must hold no literal.)
    for r in &recs {
        for field in ["action", "decision", "approval", "result", "transform"] {
            let text = r[field].to_string();
            assert!(
                !text.contains("approved-x") && !text.contains("rejected-x"),
                "no literals in {field}: {text}"
            );
        }
    }
}

/// Raw values the policy protects, read directly from the server.
fn protected_values(pg: &PgServer) -> Vec<String> {
    pg.admin_sql("SELECT ssn || E'\\n' || email || E'\\n' || card FROM customers")
        .unwrap()
        .lines()
        .map(str::to_owned)
        .filter(|s| !s.is_empty())
        .collect()
}

fn assert_no_raw(values: &[String], output: &str, what: &str) {
    let lower = output.to_lowercase();
    for v in values {
        assert!(
            !lower.contains(&v.to_lowercase()),
            "{what}: raw protected value {v:?} reached the client"
        );
    }
}

/// Re-encoding defeats detectors: the policy denies it instead, also as a
/// cursor's query (decided at `DECLARE`, like the `SELECT` itself).
fn check_reencoding_is_denied(env: &Env, url: &str) {
    for sql in [
        "SELECT encode(ssn::bytea, 'hex') FROM customers",
        "DECLARE h CURSOR WITH HOLD FOR SELECT encode(ssn::bytea, 'hex') FROM customers",
    ] {
        let out = psql(env, url, &["-At", "-c", sql]);
        assert!(!out.status.success(), "{sql}");
        assert!(
            text(&out.stderr).contains("no-computed-pii"),
            "{sql}: {}",
            text(&out.stderr)
        );
    }
}

/// A cursor's rows come in `FETCH` results, masked like any other.
fn check_cursors(env: &Env, url: &str, raw: &[String]) {
    let out = psql(
        env,
        url,
        &[
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            "BEGIN",
            "-c",
            "DECLARE c CURSOR FOR SELECT ssn, card, email FROM customers ORDER BY id",
            "-c",
            "FETCH 2 FROM c",
            "-c",
            "MOVE 1 IN c",
            "-c",
            "FETCH ALL FROM c",
            "-c",
            "COMMIT",
        ],
    );
    let so = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_no_raw(raw, &so, "DECLARE/FETCH");
    assert!(
        so.contains("***-**-1002|************1111|[REDACTED]"),
        "{so}"
    );
    assert!(!so.contains("***-**-1003"), "MOVE skipped row 3: {so}");
    assert_eq!(so.matches("***-**-").count(), 9, "{so}");
}

#[test]
fn protected_columns_never_reach_the_client_raw() {
    let (env, pg) = l7_env("pgmask", "30s");
    let url = pg.url("127.0.0.1", "postgres", "postgres");
    let raw = protected_values(&pg);
    assert_eq!(raw.len(), 30);

    for sql in [
        "SELECT * FROM customers",
        "SELECT id, ssn AS x, card, email FROM customers",
        "SELECT row_to_json(c) FROM customers c",
        "SELECT upper(email) FROM customers",
        "COPY customers TO STDOUT",
        "COPY customers (email, ssn, card) TO STDOUT",
    ] {
        let out = psql(&env, &url, &["-At", "-c", sql]);
        let so = text(&out.stdout);
        assert!(out.status.success(), "{sql}: {}", text(&out.stderr));
        assert!(so.lines().count() >= 10, "{sql}: {so}");
        assert_no_raw(&raw, &so, sql);
    }
    let out = psql(
        &env,
        &url,
        &[
            "-At",
            "-c",
            "SELECT ssn, card, email FROM customers WHERE id = 1",
        ],
    );
    assert_eq!(
        text(&out.stdout).trim(),
        "***-**-1001|************1111|[REDACTED]",
        "column strategies as configured"
    );

    check_cursors(&env, &url, &raw);

    check_reencoding_is_denied(&env, &url);

    // CSV cannot be parsed by the masker: refused up front, session intact.
    let out = psql(
        &env,
        &url,
        &["-At", "-c", "COPY customers TO STDOUT WITH (FORMAT csv)"],
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("copy-unmaskable"),
        "{}",
        text(&out.stderr)
    );

    // Extended protocol, text and binary results (psycopg).
    let out = python(
        &env,
        r#"
import json, sys, psycopg
c = psycopg.connect(sys.argv[1])
rows = []
for binary in (False, True):
    cur = c.cursor(binary=binary)
    cur.execute("SELECT id, ssn, email, card, name FROM customers WHERE id > %s ORDER BY id", (0,))
    rows += [[str(v) for v in r] for r in cur.fetchall()]
    cur.execute("SELECT row_to_json(c)::text, upper(email) FROM customers c WHERE id > %s", (0,))
    rows += [[str(v) for v in r] for r in cur.fetchall()]
    # A server-side cursor: DECLARE through the extended protocol, rows by FETCH.
    with c.transaction():
        cur = c.cursor(name="sc%d" % binary, binary=binary)
        cur.execute("SELECT id, ssn, email, card, name FROM customers WHERE id > %s ORDER BY id", (0,))
        rows += [[str(v) for v in r] for r in cur.fetchmany(3)]
        rows += [[str(v) for v in r] for r in cur.fetchall()]
print(json.dumps(rows))
"#,
        &[&url],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let so = text(&out.stdout);
    let rows: Vec<Vec<String>> = serde_json::from_str(so.lines().last().unwrap()).unwrap();
    assert_eq!(rows.len(), 60);
    assert_no_raw(&raw, &so, "psycopg");
    assert!(so.contains("***-**-1001"), "{so}");

    // The result records say what was masked, never the values.
    let recs = audit_records(&env);
    let masked: Vec<_> = recs
        .iter()
        .filter(|r| {
            r["transform"]["masking"]["values_masked"]
                .as_u64()
                .unwrap_or(0)
                > 0
        })
        .collect();
    assert!(!masked.is_empty());
    assert!(masked.iter().any(|r| {
        r["transform"]["masking"]["columns"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "ssn")
    }));
    let all = recs.iter().map(ToString::to_string).collect::<String>();
    assert_no_raw(&raw, &all, "audit log");
}

#[test]
fn cancel_large_results_and_scram_work_through_the_proxy() {
    let (env, pg) = l7_env("pgcancel", "30s");
    let url = pg.url("127.0.0.1", "postgres", "postgres");
    let out = python(
        &env,
        r#"
import json, socket, struct, sys, threading, time, psycopg
c = psycopg.connect(sys.argv[1], autocommit=True)
res = {}
def forged_cancel():
    # The right backend pid with a secret the server never gave: the proxy
    # must not forward it.
    s = socket.create_connection(("127.0.0.1", 5432))
    s.sendall(struct.pack("!iiii", 16, 80877102, c.info.backend_pid, 12345))
    # As libpq does: wait for the other end to close (a socket closed at
    # once may be gone before the proxy has looked up where it came from).
    s.recv(1)
    s.close()
threading.Timer(0.5, forged_cancel).start()
t0 = time.monotonic()
c.execute("SELECT pg_sleep(2)")
res["forged_ignored_seconds"] = time.monotonic() - t0
t0 = time.monotonic()
threading.Timer(1.0, c.cancel).start()
try:
    c.execute("SELECT pg_sleep(30)")
    res["cancelled"] = False
except psycopg.errors.QueryCanceled:
    res["cancelled"] = True
res["seconds"] = time.monotonic() - t0
res["after"] = c.execute("SELECT 1").fetchone()[0]
rows = c.execute("SELECT repeat('x', 1 << 20) FROM generate_series(1, 64)").fetchall()
res["big_rows"] = len(rows)
res["big_bytes"] = sum(len(r[0]) for r in rows)
res["big_intact"] = all(r[0] == "x" * (1 << 20) for r in rows)
print(json.dumps(res))
"#,
        &[&url],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value =
        serde_json::from_str(text(&out.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(v["cancelled"], true, "{v}");
    assert!(v["seconds"].as_f64().unwrap() < 10.0, "{v}");
    assert!(
        v["forged_ignored_seconds"].as_f64().unwrap() >= 1.9,
        "a forged cancel key cancelled the query: {v}"
    );
    let cancels: Vec<String> = audit_records(&env)
        .iter()
        .filter(|r| r["action"]["message"] == "cancel_request")
        .map(|r| {
            r["decision"]["rule"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(
        cancels,
        vec![
            "agentgate:cancel-key-not-issued".to_owned(),
            "agentgate:cancel-own-session".to_owned()
        ]
    );
    assert_eq!(v["after"], 1);
    assert_eq!(v["big_rows"], 64);
    assert_eq!(v["big_bytes"], 64 << 20);
    assert_eq!(v["big_intact"], true);
    // The server only accepts SCRAM-SHA-256 (PgServer's initdb), so logging
    // in at all proves the exchange passed the proxy; a wrong password fails.
    let bad =
        "host=127.0.0.1 port=5432 user=postgres dbname=postgres password=wrong sslmode=disable";
    let out = psql(&env, bad, &["-Atc", "SELECT 1"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("password authentication failed"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn tls_upstream_is_verified_with_the_resource_ca() {
    let mut env = Env::new("pgtls", DaemonOptions::default()).unwrap();
    let pg = PgServer::start(&env.netns, 5432, true).unwrap();
    pg.seed_customers(3).unwrap();
    let ca = pg.tls.as_ref().unwrap().ca_cert.display().to_string();
    let dir = env.state.join("policy");
    std::fs::remove_file(dir.join("loopback.toml")).unwrap();
    std::fs::write(dir.join("pg.toml"), l7_policy(5432, "30s", Some(&ca))).unwrap();
    // Restart so the new policy is certainly in force.
    env.kill_daemon();
    env.start_daemon().unwrap();
    let url = pg.url("127.0.0.1", "postgres", "postgres");
    let out = psql(
        &env,
        &url,
        &[
            "-Atc",
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        "t",
        "the proxy's upstream leg is TLS"
    );
    let out = psql(
        &env,
        &url,
        &["-Atc", "SELECT ssn FROM customers WHERE id = 1"],
    );
    assert_eq!(text(&out.stdout).trim(), "***-**-1001");
    let recs = audit_records(&env);
    assert!(
        recs.iter()
            .any(|r| r["kind"] == "session.start" && r["action"]["tls_upstream"] == true)
    );

    // A CA that did not sign the server's certificate: refused, natively.
    let other_dir = env.state.join("other-ca");
    std::fs::create_dir_all(&other_dir).unwrap();
    let other = make_ca(&other_dir).unwrap().ca_cert;
    std::fs::write(
        dir.join("pg.toml"),
        l7_policy(5432, "30s", Some(&other.display().to_string())),
    )
    .unwrap();
    env.kill_daemon();
    env.start_daemon().unwrap();
    let out = psql(&env, &url, &["-Atc", "SELECT 1"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("cannot reach the server") && err.contains("TLS"),
        "{err}"
    );
}

#[test]
fn hostile_client_input_gets_a_protocol_error_and_nothing_runs() {
    let (env, pg) = l7_env_with("pghostile", "30s", "[proxy.postgres]\nmax_sql_bytes = 4096");
    pg.admin_sql("ALTER SYSTEM SET log_statement = 'all'")
        .unwrap();
    pg.admin_sql("SELECT pg_reload_conf()").unwrap();
    for case in [
        "garbage-before-startup",
        "bad-length",
        "huge-length",
        "unknown-type",
        "no-terminator",
        "garbage-after-startup",
        "over-sql-limit",
    ] {
        let script = scripts_dir().join("pg_raw.py");
        let out = env
            .exec(
                "demo",
                &[
                    "python3",
                    script.to_str().unwrap(),
                    "127.0.0.1",
                    "5432",
                    "postgres",
                    "postgres",
                    PASSWORD,
                    case,
                ],
            )
            .output()
            .unwrap();
        assert!(out.status.success(), "{case}: {}", text(&out.stderr));
        let v: serde_json::Value =
            serde_json::from_str(text(&out.stdout).lines().last().unwrap()).unwrap();
        assert_eq!(v["sqlstates"], serde_json::json!(["08P01"]), "{case}: {v}");
        assert_eq!(v["closed"], true, "{case}: the proxy closes");
    }
    assert_eq!(
        pg.admin_sql("SELECT count(*) FROM customers")
            .unwrap()
            .trim(),
        "10"
    );
    let log = std::fs::read_to_string(pg.dir.join("postgres.log")).unwrap();
    assert!(
        !log.contains("DELETE"),
        "nothing reached the server:\n{log}"
    );
    // The daemon is still serving.
    let url = pg.url("127.0.0.1", "postgres", "postgres");
    let out = psql(&env, &url, &["-Atc", "SELECT 1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn a_denied_connection_gets_a_postgres_error_naming_the_rule() {
    let policy = r#"
[[resource]]
name = "pg"
protocol = "postgres"
addresses = ["127.0.0.1:5432"]

[[rule]]
name = "demo-no-pg"
identities = ["demo"]
resources = ["pg"]
action = "deny"
"#
    .to_owned();
    let opts = DaemonOptions {
        policies: vec![("pg.toml".into(), policy)],
        ..DaemonOptions::default()
    };
    let env = Env::new("pgrefuse", opts).unwrap();
    let pg = PgServer::start(&env.netns, 5432, false).unwrap();
    let url = pg.url("127.0.0.1", "postgres", "postgres");
    let out = env
        .exec("demo", &[PSQL, &url, "-Atc", "SELECT 1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("connection denied by policy rule \"demo-no-pg\""),
        "{err}"
    );
}

#[test]
fn pgbench_runs_through_the_proxy_and_every_write_is_audited() {
    pgbench_through_the_proxy("strict");
}

#[test]
fn pgbench_runs_through_the_proxy_with_batched_durability() {
    pgbench_through_the_proxy("batched");
}

/// pgbench through the proxy: every transaction of the TPC-B-like script, in
/// the simple, extended and prepared protocols, completes, and every write it
/// ran has its own allowed write-ahead record and its own result record.
fn pgbench_through_the_proxy(durability: &str) {
    const PGBENCH: &str = "/usr/lib/postgresql/15/bin/pgbench";
    const CLIENTS: usize = 2;
    const PER_CLIENT: usize = 15;
    let policy = r#"
[[resource]]
name = "pg"
protocol = "postgres"
addresses = ["127.0.0.1:5432"]
default_action = "deny"

[[rule]]
name = "demo-bench"
identities = ["demo"]
resources = ["pg"]
action = "allow"
match = { sql = ["read", "write", "transaction"] }
"#
    .to_owned();
    let opts = DaemonOptions {
        policies: vec![("pg.toml".into(), policy)],
        audit_extra: format!("durability = \"{durability}\""),
        ..DaemonOptions::default()
    };
    let env = Env::new(&format!("pgbench-{durability}"), opts).unwrap();
    let _pg = PgServer::start(&env.netns, 5432, false).unwrap();
    let connect = ["-h", "127.0.0.1", "-p", "5432", "-U", "postgres"];
    // Initialised directly (its DDL is not the subject here).
    run_ok(
        env.netns
            .command(PGBENCH)
            .args(["-i", "-q", "-s", "1"])
            .args(connect)
            .arg("postgres")
            .env("PGPASSWORD", PASSWORD),
    )
    .unwrap();
    let n = CLIENTS * PER_CLIENT;
    let mut seen = audit_records(&env).len();
    for mode in ["simple", "extended", "prepared"] {
        let (c, t) = (CLIENTS.to_string(), PER_CLIENT.to_string());
        let mut argv = vec![PGBENCH, "-n", "-M", mode, "-c", &c, "-j", "1", "-t", &t];
        argv.extend(connect);
        argv.push("postgres");
        let out = run_ok(env.exec("demo", &argv).env("PGPASSWORD", PASSWORD)).unwrap();
        let report = text(&out.stdout);
        assert!(
            report.contains(&format!(
                "number of transactions actually processed: {n}/{n}"
            )) && report.contains("number of failed transactions: 0 "),
            "{mode}: {report}\n{}",
            text(&out.stderr)
        );
        // Result records are not awaited by the proxy: give the last ones
        // their batch interval.
        let count = |recs: &[serde_json::Value], pred: &dyn Fn(&serde_json::Value) -> bool| {
            recs.iter()
                .filter(|r| r["kind"] == "statement" && pred(r))
                .count()
        };
        let tag = |prefix: &'static str| {
            move |r: &serde_json::Value| {
                r["action"]["phase"] == "completed"
                    && r["result"]["command"]
                        .as_str()
                        .is_some_and(|c| c.starts_with(prefix))
            }
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let recs = loop {
            let all = audit_records(&env);
            let new = all[seen..].to_vec();
            if count(&new, &tag("COMMIT")) >= n || Instant::now() > deadline {
                seen = all.len();
                break new;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // BEGIN; UPDATE accounts; SELECT; UPDATE tellers; UPDATE branches;
        // INSERT history; END. Plus pgbench's two queries at start, once per
        // run: the scale (`pgbench_branches`) and whether `pgbench_accounts`
        // is partitioned.
        for (prefix, expected) in [
            ("BEGIN", n),
            ("UPDATE", 3 * n),
            ("SELECT", n + 2),
            ("INSERT", n),
            ("COMMIT", n),
        ] {
            assert_eq!(
                count(&recs, &tag(prefix)),
                expected,
                "{mode}: result records of {prefix}"
            );
        }
        let executed = if mode == "simple" { "query" } else { "execute" };
        let writes = count(&recs, &|r| {
            r["action"]["message"] == executed
                && r["action"]["class"] == "write"
                && r["decision"]["verdict"] == "allow"
                && r["decision"]["rule"] == "demo-bench"
        });
        assert_eq!(writes, 4 * n, "{mode}: write-ahead records of the writes");
    }
    let dir = env.state.join("audit");
    run_ok(&mut env.agentgate(&["audit", "verify", "--dir", dir.to_str().unwrap()])).unwrap();
}

/// psycopg's pipeline mode through the proxy: queued reads come back in order
/// and masked (text and binary); a denied statement in the middle fails with
/// 42501 where Postgres would raise it, the rest of that pipeline is aborted
/// as Postgres would abort it, nothing after it ran, and the connection goes
/// on.
#[test]
fn psycopg_pipeline_mode_is_decided_in_order_and_stays_in_sync() {
    let (env, pg) = l7_env("pgpipe", "30s");
    let url = pg.url("127.0.0.1", "postgres", "postgres");
    let raw = protected_values(&pg);
    let out = python(
        &env,
        r#"
import json, sys, psycopg
c = psycopg.connect(sys.argv[1], autocommit=True)
out = {"rows": [], "errors": []}
with c.pipeline():
    curs = []
    for i in range(1, 11):
        cur = c.cursor(binary=(i % 2 == 0))
        cur.execute("SELECT id, ssn, email FROM customers WHERE id = %s", (i,))
        curs.append(cur)
    for cur in curs:
        out["rows"] += [[str(v) for v in r] for r in cur.fetchall()]
try:
    with c.pipeline():
        a = c.execute("SELECT count(*) FROM customers WHERE id > %s", (0,))
        c.execute("DROP TABLE customers")
        c.execute("SELECT 1 FROM customers WHERE id = %s", (1,))
except psycopg.Error as e:
    out["errors"].append([type(e).__name__, e.sqlstate])
out["after"] = c.execute("SELECT count(*) FROM customers").fetchone()[0]
print(json.dumps(out))
"#,
        &[&url],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let so = text(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(so.lines().last().unwrap()).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 10, "{so}");
    for (i, r) in rows.iter().enumerate() {
        assert_eq!(r[0], (i + 1).to_string(), "in order: {so}");
        assert_eq!(r[1], format!("***-**-{}", 1000 + i + 1), "masked: {so}");
    }
    assert_no_raw(&raw, &so, "pipeline");
    assert_eq!(
        v["errors"],
        serde_json::json!([["InsufficientPrivilege", "42501"]]),
        "{so}"
    );
    assert_eq!(v["after"], 10, "the table is still there: {so}");
    // The DROP was decided and recorded as denied; the read queued after it
    // was neither decided nor sent (Postgres skips to Sync after an error).
    let recs = audit_records(&env);
    assert!(recs.iter().any(|r| r["action"]["class"] == "ddl"
        && r["decision"]["verdict"] == "deny"
        && r["decision"]["rule"] == "no-ddl-or-admin"));
    assert!(
        !recs.iter().any(|r| r["action"]["sql"]
            .as_str()
            .is_some_and(|s| s.starts_with("SELECT 1 FROM customers"))),
        "the read after the denied statement was decided"
    );
    let one_row = recs
        .iter()
        .filter(|r| r["action"]["phase"] == "completed" && r["result"]["command"] == "SELECT 1");
    assert_eq!(
        one_row.count(),
        10 + 1 + 1,
        "the ten pipelined reads, the count before the DROP, the count after the pipeline"
    );
}

/// A write that needs approval in the middle of a psycopg pipeline, with a
/// read in flight before it and one queued after it: the write waits for the
/// approver while the read's result is already out, then runs; the read after
/// it sees its effect; nothing is held up in the meantime (other sessions go
/// on).
#[test]
fn an_approved_write_mid_pipeline_runs_in_order() {
    let (env, pg) = l7_env("pgpipeapr", "30s");
    let url = pg.url("127.0.0.1", "postgres", "postgres");
    let p = spawn_python(
        &env,
        r#"
import json, sys, psycopg
c = psycopg.connect(sys.argv[1], autocommit=True)
with c.pipeline():
    before = c.execute("SELECT name FROM customers WHERE id = %s", (2,))
    c.execute("UPDATE customers SET name = %s WHERE id = %s", ("pipelined", 2))
    after = c.execute("SELECT name FROM customers WHERE id = %s", (2,))
print(json.dumps([before.fetchone()[0], after.fetchone()[0]]))
"#,
        &url,
    );
    let id = wait_pending(&env, 1, Duration::from_secs(10))[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // While the write is held, the audit log and other sessions go on.
    let other = psql(&env, &url, &["-Atc", "SELECT count(*) FROM customers"]);
    assert_eq!(text(&other.stdout).trim(), "10", "{}", text(&other.stderr));
    assert_eq!(
        pg.admin_sql("SELECT name FROM customers WHERE id = 2")
            .unwrap()
            .trim(),
        "Customer 2",
        "nothing ran while held"
    );
    run_ok(&mut env.agentgate(&["approvals", "approve", &id, "--as", "dba-ann"])).unwrap();
    let out = finish(p);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert_eq!(v, serde_json::json!(["Customer 2", "pipelined"]));
}

/// Reads for `demo` on a Postgres resource whose login the daemon holds.
fn credential_policy(pw_file: &std::path::Path) -> String {
    format!(
        r#"
[[resource]]
name = "pg"
protocol = "postgres"
addresses = ["127.0.0.1:5432"]
default_action = "deny"
credential = {{ user = "app", password_file = "{}" }}

[[rule]]
name = "demo-reads"
identities = ["demo"]
resources = ["pg"]
action = "allow"
match = {{ sql = ["read", "transaction"] }}
"#,
        pw_file.display()
    )
}

/// The daemon holds the database login: the agent (an unprivileged user
/// that cannot read the secret) connects with a wrong password, or none,
/// and its queries run as the resource's user; the records name the
/// credential and never hold the secret; a secret file others can read
/// refuses the policy with its file and line.
#[test]
fn the_daemon_logs_in_with_the_resources_credential() {
    let secrets = std::env::temp_dir().join(format!("agentgate-cred-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&secrets);
    std::fs::create_dir_all(&secrets).unwrap();
    let pw_file = secrets.join("app.pw");
    // Test-only secret, unique to this run so a leak cannot be a coincidence.
    let secret = format!(
        "app-secret-{}-{}",
        std::process::id(),
        agentgate_e2e::unique("s")
    );
    std::fs::write(&pw_file, format!("{secret}\n")).unwrap();
    let mode = |m: u32| {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&pw_file, std::fs::Permissions::from_mode(m)).unwrap();
    };
    mode(0o600);
    let opts = DaemonOptions {
        policies: vec![("pg.toml".into(), credential_policy(&pw_file))],
        ..DaemonOptions::default()
    };
    let env = Env::new("pgcred", opts).unwrap();
    let pg = PgServer::start(&env.netns, 5432, false).unwrap();
    pg.seed_customers(10).unwrap();
    pg.admin_sql(&format!(
        "CREATE ROLE app LOGIN PASSWORD '{secret}'; GRANT SELECT ON customers TO app;"
    ))
    .unwrap();

    let cat = env
        .exec_as("nobody", "demo", &["cat", &pw_file.display().to_string()])
        .output()
        .unwrap();
    assert!(!cat.status.success(), "the agent cannot read the secret");

    for (what, url) in [
        (
            "a wrong password",
            "host=127.0.0.1 port=5432 user=agent dbname=postgres password=wrong sslmode=disable",
        ),
        (
            "no password",
            "host=127.0.0.1 port=5432 user=agent dbname=postgres sslmode=disable",
        ),
    ] {
        let sql = "SELECT current_user, count(*) FROM customers";
        let out = env
            .exec_as("nobody", "demo", &[PSQL, url, "-w", "-qAtc", sql])
            .output()
            .unwrap();
        assert!(out.status.success(), "{what}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout).trim(), "app|10", "{what}");
    }

    let recs = audit_records(&env);
    let starts: Vec<_> = recs
        .iter()
        .filter(|r| r["kind"] == "session.start")
        .collect();
    assert_eq!(starts.len(), 2, "{starts:#?}");
    for s in &starts {
        assert_eq!(s["action"]["user"], "app", "{s:#}");
        assert_eq!(s["action"]["credential"]["user"], "app", "{s:#}");
        let file = pw_file.display().to_string();
        assert_eq!(s["action"]["credential"]["password_file"], file, "{s:#}");
    }
    let everything = format!(
        "{}\n{}",
        serde_json::to_string(&recs).unwrap(),
        env.daemon_log()
    );
    assert!(
        !everything.contains(&secret),
        "the secret is in a record or the log"
    );

    // A secret file its group can read refuses the policy, with file:line.
    mode(0o640);
    let dir = env.state.join("policy").display().to_string();
    let out = env.agentgate(&["policy", "check", &dir]).output().unwrap();
    let err = text(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("pg.toml:7:"), "{err}");
    assert!(err.contains("chmod 600"), "{err}");
    let _ = std::fs::remove_dir_all(&secrets);
}
