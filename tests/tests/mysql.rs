//! `MariaDB` through agentgate's `MySQL` handler, with a real server
//! (Debian's `mariadb-server`) and real clients: the `mariadb` CLI, `PyMySQL`
//! (text protocol) and mysql-connector-python's prepared cursor (binary
//! protocol).

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use agentgate_e2e::{
    DaemonOptions, Env, Proc,
    mysql::{MariaDb, PASSWORD},
    run_ok,
};

/// Reads allowed, writes need approval, DDL/DCL/admin/unknown denied, PII masked.
fn policy(port: u16, approval_timeout: &str) -> String {
    format!(
        r#"
[defaults]
unknown_destination = "deny"

[[resource]]
name = "shop"
protocol = "mysql"
addresses = ["127.0.0.1:{port}"]
default_action = "deny"

[[rule]]
name = "demo-reads"
identities = ["demo"]
resources = ["shop"]
action = "allow"
match = {{ sql = ["read", "transaction"] }}

[[rule]]
name = "demo-writes-need-approval"
identities = ["demo"]
resources = ["shop"]
action = "require_approval"
match = {{ sql = ["write"] }}
approval = {{ approver_groups = ["dba"], timeout = "{approval_timeout}" }}

[[rule]]
name = "no-ddl-or-admin"
identities = ["demo"]
resources = ["shop"]
action = "deny"
match = {{ sql = ["ddl", "dcl", "admin", "unknown"] }}

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

fn env(name: &str, approval_timeout: &str) -> (Env, MariaDb) {
    let opts = DaemonOptions {
        policies: vec![("shop.toml".into(), policy(3306, approval_timeout))],
        extra: "\n[approvals]\nallow_labels = true\n".into(),
        labels: vec![("dba-ann".into(), vec!["dba".into()])],
        ..DaemonOptions::default()
    };
    let env = Env::new(name, opts).unwrap();
    let db = MariaDb::start(&env.netns, 3306).unwrap();
    db.seed_customers(10).unwrap();
    (env, db)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The `mariadb` CLI tagged as `demo`, with `args` after the connection ones.
fn cli(env: &Env, db: &MariaDb, user: &str, args: &[&str]) -> std::process::Output {
    let mut a = db.cli_args(user);
    a.extend(args.iter().map(|s| (*s).to_owned()));
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    env.exec("demo", &a)
        .env("MYSQL_PWD", PASSWORD)
        .output()
        .unwrap()
}

/// A Python program tagged as `demo`; `PASSWORD` and the port are in its
/// environment as `PW` and `PORT`.
fn python_cmd(env: &Env, db: &MariaDb, program: &str) -> std::process::Command {
    let mut c = env.exec("demo", &["python3", "-c", program]);
    c.env("PW", PASSWORD).env("PORT", db.port.to_string());
    c
}

fn python(env: &Env, db: &MariaDb, program: &str) -> std::process::Output {
    python_cmd(env, db, program).output().unwrap()
}

const PYMYSQL: &str = "import os, pymysql\n\
conn = pymysql.connect(host='127.0.0.1', port=int(os.environ['PORT']), user='app', password=os.environ['PW'], database='shop', client_flag=pymysql.constants.CLIENT.MULTI_STATEMENTS)\n\
cur = conn.cursor()\n";

const CONNECTOR: &str = "import os, mysql.connector\n\
conn = mysql.connector.connect(host='127.0.0.1', port=int(os.environ['PORT']), user='app', password=os.environ['PW'], database='shop', ssl_disabled=True, use_pure=True)\n\
cur = conn.cursor(prepared=True)\n";

#[test]
#[allow(clippy::too_many_lines)] // one session story, told in order
fn clients_are_decided_masked_and_recorded() {
    let (env, db) = env("mydecide", "30s");
    let count = || {
        db.admin_sql("SELECT count(*) FROM shop.customers")
            .unwrap()
            .trim()
            .to_owned()
    };

    // The CLI, native password: a read; the server's own version shows.
    let out = cli(
        &env,
        &db,
        "app",
        &[
            "-N",
            "-e",
            "SELECT count(*) FROM customers; SELECT @@version",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let so = text(&out.stdout);
    assert!(so.starts_with("10\n"), "{so}");
    assert!(so.contains("MariaDB"), "{so}");

    // ed25519 (MariaDB's client_ed25519 plugin, via auth switch).
    let out = cli(&env, &db, "edu", &["-N", "-e", "SELECT 'ed25519 ok'"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "ed25519 ok");

    // Denied: ERR 1142 / 42000 naming the rule; the table is still there.
    let out = cli(&env, &db, "app", &["-e", "DROP TABLE customers"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("ERROR 1142 (42000)"), "{err}");
    assert!(err.contains("no-ddl-or-admin"), "{err}");
    assert_eq!(count(), "10");
    // Executable comments are code; keyword-only statements are not reads.
    for sql in [
        "/*!50000 DROP TABLE customers */",
        "SELECT * FROM customers INTO OUTFILE '/tmp/agentgate-my-out'",
        "CREATE USER 'x'@'%' IDENTIFIED BY 'y'",
        "HANDLER customers OPEN",
        "PREPARE s FROM 'DROP TABLE customers'",
    ] {
        let out = cli(&env, &db, "app", &["-e", sql]);
        assert!(
            text(&out.stderr).contains("ERROR 1142"),
            "{sql}: {}",
            text(&out.stderr)
        );
    }
    assert_eq!(count(), "10");

    // A denial inside a transaction: the session and the transaction go on.
    let mut c = env.exec(
        "demo",
        &db.cli_args("app")
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    c.args(["-N", "--force"])
        .env("MYSQL_PWD", PASSWORD)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(b"BEGIN;\nSELECT count(*) FROM customers;\nDROP TABLE customers;\nSELECT @@in_transaction;\nCOMMIT;\nSELECT 'after';\n")
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    let (so, se) = (text(&out.stdout), text(&out.stderr));
    assert!(se.contains("ERROR 1142 (42000)"), "{se}");
    assert_eq!(
        so.split_whitespace().collect::<Vec<_>>(),
        ["10", "1", "after"],
        "{so}"
    );

    // PyMySQL (text protocol): columns masked by their origin; a
    // multi-statement query with one denied statement runs none of them.
    let out = python(
        &env,
        &db,
        &format!(
            "{PYMYSQL}cur.execute('SELECT id, ssn, email, card, name FROM customers WHERE id <= 2 ORDER BY id')\n\
             for r in cur.fetchall(): print('|'.join(map(str, r)))\n\
             try:\n    cur.execute(\"SELECT 1; DROP TABLE customers\")\nexcept pymysql.err.MySQLError as e:\n    print('denied', e.args[0])\n\
             cur.execute('SELECT 2')\nprint('usable', cur.fetchone()[0])\n"
        ),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let so = text(&out.stdout);
    let lines: Vec<&str> = so.lines().collect();
    assert_eq!(lines.len(), 4, "{so}");
    let first: Vec<&str> = lines[0].split('|').collect();
    assert_eq!(first[0], "1");
    assert!(
        first[1].ends_with("1001") && !first[1].contains("101-11"),
        "ssn keeps its last 4 only: {so}"
    );
    assert!(
        !first[2].contains("user1@example.com"),
        "email redacted: {so}"
    );
    assert!(
        first[3].ends_with("1111") && !first[3].contains("41111111"),
        "{so}"
    );
    assert_eq!(first[4], "Customer 1", "unprotected columns unchanged");
    assert_eq!(lines[2], "denied 1142");
    assert_eq!(lines[3], "usable 2");
    assert_eq!(count(), "10");

    // mysql-connector-python, prepared (binary protocol): masked too;
    // a prepared DDL is denied at PREPARE.
    let out = python(
        &env,
        &db,
        &format!(
            "{CONNECTOR}cur.execute('SELECT id, ssn, email, balance FROM customers WHERE id = %s', (3,))\n\
             print('|'.join(map(str, cur.fetchone())))\n\
             try:\n    cur.execute('DROP TABLE customers')\nexcept mysql.connector.Error as e:\n    print('denied', e.errno)\n\
             cur.execute('SELECT id FROM customers WHERE id = %s', (4,))\nprint('usable', cur.fetchone()[0])\n"
        ),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let so = text(&out.stdout);
    let lines: Vec<&str> = so.lines().collect();
    let row: Vec<&str> = lines[0].split('|').collect();
    assert_eq!(row[0], "3", "{so}");
    assert!(
        row[1].ends_with("1003") && !row[1].contains("103-13"),
        "{so}"
    );
    assert!(!row[2].contains("user3@example.com"), "{so}");
    assert_eq!(row[3], "31.50", "{so}");
    assert_eq!(lines[1], "denied 1142", "{so}");
    assert_eq!(lines[2], "usable 4", "{so}");

    // The record: session start (server version, database user), statements
    // (class, tables, decision), results (rows).
    let records = env.audit_records().unwrap();
    let start = records
        .iter()
        .find(|r| r["kind"] == "session.start" && r["action"]["protocol"] == "mysql")
        .expect("a session.start record");
    assert!(
        start["action"]["server_version"]
            .as_str()
            .unwrap()
            .contains("MariaDB")
    );
    assert_eq!(start["action"]["user"], "app");
    let denied = records
        .iter()
        .find(|r| r["action"]["command"] == "COM_QUERY" && r["action"]["class"] == "ddl")
        .expect("the DROP's record");
    assert_eq!(denied["decision"]["verdict"], "deny", "{denied}");
    assert_eq!(denied["action"]["destructive"], true, "{denied}");
    let masked = records
        .iter()
        .find(|r| {
            r["action"]["phase"] == "completed"
                && r["transform"]["masking"]["values_masked"].as_u64() > Some(0)
        })
        .expect("a result record with masking");
    assert!(masked["result"]["rows"].as_u64().unwrap() >= 1, "{masked}");
    let all = serde_json::to_string(&records).unwrap();
    for r in &records {
        let s = r.to_string();
        assert!(!s.contains(PASSWORD), "no password in any record: {s}");
    }
    assert!(!all.contains("101-11-1001"), "no raw PII in any record");
}

fn pending(env: &Env) -> Vec<serde_json::Value> {
    let out = run_ok(&mut env.agentgate(&["approvals", "list", "--json"])).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array().cloned().unwrap_or_default()
}

fn wait_pending(env: &Env) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(r) = pending(env).first() {
            return r["id"].as_str().unwrap().to_owned();
        }
        assert!(Instant::now() < deadline, "no pending request");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn finish(mut p: Proc) -> (String, String) {
    use std::io::Read as _;
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
    (out, err)
}

#[test]
fn writes_wait_for_approval_and_rejections_and_timeouts_are_1142() {
    let (env, db) = env("myapprove", "4s");
    let name_of_1 = || {
        db.admin_sql("SELECT name FROM shop.customers WHERE id = 1")
            .unwrap()
            .trim()
            .to_owned()
    };
    let update = |value: &str| {
        let program = format!(
            "{PYMYSQL}try:\n    cur.execute(\"UPDATE customers SET name = '{value}' WHERE id = 1\")\n    conn.commit()\n    print('ran', cur.rowcount)\nexcept pymysql.err.MySQLError as e:\n    print('denied', e.args[0], e.args[1])\n"
        );
        let mut c = python_cmd(&env, &db, &program);
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        Proc::spawn("python", c).unwrap()
    };

    // Approved: the held UPDATE runs.
    let p = update("approved-x");
    let id = wait_pending(&env);
    assert_eq!(name_of_1(), "Customer 1", "nothing ran while held");
    run_ok(&mut env.agentgate(&["approvals", "approve", &id, "--as", "dba-ann"])).unwrap();
    let (so, se) = finish(p);
    assert_eq!(so.trim(), "ran 1", "{se}");
    assert_eq!(name_of_1(), "approved-x");

    // Rejected: 1142 with the reason; nothing ran.
    let p = update("rejected-x");
    let id = wait_pending(&env);
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
    let (so, se) = finish(p);
    assert!(so.starts_with("denied 1142"), "{so}{se}");
    assert!(
        so.contains("demo-writes-need-approval") && so.contains("no ticket"),
        "{so}"
    );
    assert_eq!(name_of_1(), "approved-x");

    // Timeout: 1142 once the deadline passes.
    let started = Instant::now();
    let p = update("expired-x");
    wait_pending(&env);
    let (so, _) = finish(p);
    assert!(started.elapsed() >= Duration::from_secs(3));
    assert!(
        so.starts_with("denied 1142") && so.contains("expired"),
        "{so}"
    );
    assert_eq!(name_of_1(), "approved-x");
    assert!(pending(&env).is_empty());
}

/// Reads for `demo` on two `MariaDB` resources whose logins the daemon
/// holds: `held` (`mysql_native_password`) on 127.0.0.1, `held_ed`
/// (`ed25519`, reached by an auth switch) on 127.0.0.2.
fn credential_policy(native: &std::path::Path, ed: &std::path::Path) -> String {
    format!(
        r#"
[defaults]
unknown_destination = "deny"

[[resource]]
name = "shop"
protocol = "mysql"
addresses = ["127.0.0.1:3306"]
default_action = "deny"
credential = {{ user = "held", password_file = "{}" }}

[[resource]]
name = "shop-ed"
protocol = "mysql"
addresses = ["127.0.0.2:3306"]
default_action = "deny"
credential = {{ user = "held_ed", password_file = "{}" }}

[[rule]]
name = "demo-reads"
identities = ["demo"]
resources = ["shop", "shop-ed"]
action = "allow"
match = {{ sql = ["read", "transaction"] }}
"#,
        native.display(),
        ed.display()
    )
}

/// The daemon holds the database login: the agent connects with no
/// password (the `mariadb` CLI) or a wrong one (`PyMySQL`), and its queries
/// run as the resource's user (native password, and ed25519 by an auth
/// switch); the records name the credential and never hold the secret.
#[test]
fn the_daemon_logs_in_with_the_resources_credential() {
    let secrets = std::env::temp_dir().join(format!("agentgate-mycred-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&secrets);
    std::fs::create_dir_all(&secrets).unwrap();
    // Test-only secret, unique to this run so a leak cannot be a coincidence.
    let secret = format!("held-secret-{}", agentgate_e2e::unique("s"));
    let (native, ed) = (secrets.join("held.pw"), secrets.join("held_ed.pw"));
    for f in [&native, &ed] {
        std::fs::write(f, format!("{secret}\n")).unwrap();
        std::fs::set_permissions(f, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    }
    let opts = DaemonOptions {
        policies: vec![("shop.toml".into(), credential_policy(&native, &ed))],
        ..DaemonOptions::default()
    };
    let env = Env::new("mycred", opts).unwrap();
    let db = MariaDb::start(&env.netns, 3306).unwrap();
    db.seed_customers(3).unwrap();
    db.admin_sql(&format!(
        "CREATE USER 'held'@'%' IDENTIFIED BY '{secret}';\n\
         CREATE USER 'held_ed'@'%' IDENTIFIED VIA ed25519 USING PASSWORD('{secret}');\n\
         GRANT SELECT ON shop.* TO 'held'@'%';\n\
         GRANT SELECT ON shop.* TO 'held_ed'@'%';"
    ))
    .unwrap();

    for (host, user) in [("-h127.0.0.1", "held@%"), ("-h127.0.0.2", "held_ed@%")] {
        let out = env
            .exec(
                "demo",
                &[
                    "mariadb",
                    host,
                    "-P3306",
                    "-uagent",
                    "--skip-ssl",
                    "shop",
                    "-N",
                    "-e",
                    "SELECT CURRENT_USER(), count(*) FROM customers",
                ],
            )
            .env_remove("MYSQL_PWD")
            .output()
            .unwrap();
        assert!(out.status.success(), "{host}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout).trim(), format!("{user}\t3"), "{host}");
    }
    let out = python(
        &env,
        &db,
        "import os, pymysql\n\
         c = pymysql.connect(host='127.0.0.1', port=int(os.environ['PORT']), user='whoever', password='wrong', database='shop')\n\
         cur = c.cursor(); cur.execute('SELECT CURRENT_USER()'); print(cur.fetchone()[0])\n",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "held@%");

    let records = env.audit_records().unwrap();
    let starts: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["kind"] == "session.start" && r["action"]["protocol"] == "mysql")
        .collect();
    assert_eq!(starts.len(), 3, "{starts:#?}");
    for s in &starts {
        let c = &s["action"]["credential"];
        assert_eq!(c["kind"], "resource", "{s:#}");
        assert!(c["user"] == "held" || c["user"] == "held_ed", "{s:#}");
        assert_eq!(s["action"]["user"], c["user"], "{s:#}");
    }
    assert!(
        starts
            .iter()
            .any(|s| s["action"]["credential"]["auth_plugin"] == "client_ed25519")
    );
    assert!(
        starts
            .iter()
            .any(|s| s["action"]["agent_user"] == "whoever")
    );
    let all = serde_json::to_string(&records).unwrap();
    assert!(!all.contains(&secret), "no record holds the secret");
    let log = std::fs::read_to_string(env.state.join("daemon.log")).unwrap_or_default();
    assert!(!log.contains(&secret), "no log line holds the secret");
    let _ = std::fs::remove_dir_all(&secrets);
}

/// `LOAD DATA LOCAL INFILE` reads a file on the agent's host: refused
/// unless a rule allows it (class `admin`, here only into `imports`), and
/// then the file's name, size and SHA-256 are in the result record.
#[test]
fn load_data_local_runs_only_where_a_rule_allows_it_and_is_recorded() {
    let policy = r#"
[defaults]
unknown_destination = "deny"

[[resource]]
name = "shop"
protocol = "mysql"
addresses = ["127.0.0.1:3306"]
default_action = "deny"

[[rule]]
name = "demo-reads"
identities = ["demo"]
resources = ["shop"]
action = "allow"
match = { sql = ["read", "transaction"] }

[[rule]]
name = "demo-imports"
identities = ["demo"]
resources = ["shop"]
action = "allow"
match = { sql = ["admin"], tables = ["imports"] }
"#;
    let opts = DaemonOptions {
        policies: vec![("shop.toml".into(), policy.into())],
        ..DaemonOptions::default()
    };
    let env = Env::new("myinfile", opts).unwrap();
    let db = MariaDb::start(&env.netns, 3306).unwrap();
    db.seed_customers(3).unwrap();
    db.admin_sql("CREATE TABLE shop.imports (a int, b text)")
        .unwrap();
    let file = env.state.join("import.csv");
    let body = "1,one\n2,two\n3,three\n";
    std::fs::write(&file, body).unwrap();
    let load = |table: &str| {
        cli(
            &env,
            &db,
            "app",
            &[
                "--local-infile=1",
                "-e",
                &format!(
                    "LOAD DATA LOCAL INFILE '{}' INTO TABLE {table} FIELDS TERMINATED BY ','",
                    file.display()
                ),
            ],
        )
    };
    let count = |t: &str| {
        db.admin_sql(&format!("SELECT count(*) FROM shop.{t}"))
            .unwrap()
    };

    // No rule allows it into customers: refused, nothing read or loaded.
    let out = load("customers");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("ERROR 1142 (42000)"), "{err}");
    assert_eq!(count("customers").trim(), "3");

    // Into imports it runs; the record names the file, its size and hash.
    let out = load("imports");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(count("imports").trim(), "3");
    let records = env.audit_records().unwrap();
    let refused = records
        .iter()
        .find(|r| r["decision"]["verdict"] == "deny" && r["action"]["class"] == "admin")
        .expect("the refusal's record");
    assert!(
        refused["action"]["notes"][0]
            .as_str()
            .unwrap()
            .contains("LOAD DATA LOCAL"),
        "{refused:#}"
    );
    let loaded = records
        .iter()
        .find(|r| r["action"]["local_infile"].is_object())
        .expect("the load's result record");
    let f = &loaded["action"]["local_infile"];
    assert_eq!(f["file"], file.display().to_string(), "{loaded:#}");
    assert_eq!(f["bytes"], body.len(), "{loaded:#}");
    let want = {
        use sha2::Digest as _;
        use std::fmt::Write as _;
        sha2::Sha256::digest(body.as_bytes())
            .iter()
            .fold(String::new(), |mut s, b| {
                let _ = write!(s, "{b:02x}");
                s
            })
    };
    assert_eq!(f["sha256"], want, "{loaded:#}");
}

/// sysbench as a client: a short `oltp_point_select` through the handler,
/// with server-side prepared statements (sysbench's default) and with the
/// text protocol; each completes with transactions and no error.
#[test]
fn sysbench_point_selects_complete_without_errors() {
    let (env, _db) = env("mysysbench", "30s");
    let args = |mode: &str, action: &str| -> Vec<String> {
        [
            "sysbench",
            "oltp_point_select",
            "--mysql-host=127.0.0.1",
            "--mysql-port=3306",
            "--mysql-user=app",
            "--mysql-db=shop",
            "--tables=1",
            "--table-size=1000",
            "--threads=2",
            "--time=2",
            "--report-interval=0",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .chain([format!("--db-ps-mode={mode}"), action.to_owned()])
        .collect()
    };
    // The table, straight to the server (not what is measured).
    let prep = args("auto", "prepare");
    let out = env
        .netns
        .command(&prep[0])
        .args(&prep[1..])
        .env("MYSQL_PWD", PASSWORD)
        .output()
        .unwrap();
    assert!(out.status.success(), "prepare: {}", text(&out.stderr));
    for mode in ["auto", "disable"] {
        let a = args(mode, "run");
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let out = env
            .exec("demo", &a)
            .env("MYSQL_PWD", PASSWORD)
            .output()
            .unwrap();
        let so = text(&out.stdout);
        assert!(out.status.success(), "{mode}: {}\n{so}", text(&out.stderr));
        let number = |label: &str| -> u64 {
            so.lines()
                .find(|l| l.trim_start().starts_with(label))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{mode}: no {label} in {so}"))
        };
        assert!(number("transactions:") > 0, "{mode}: {so}");
        assert_eq!(number("ignored errors:"), 0, "{mode}: {so}");
    }
}
