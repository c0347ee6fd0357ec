//! Masking without oracles through the `MySQL` handler, against `MariaDB`:
//! an agent that needs only a yes/no per statement still gets nothing. An
//! extractor (`scripts/mysql_ssn_extractor.py`, `PyMySQL`, and
//! mysql-connector's prepared statements for the binary protocol) tries to
//! recover a customer's full SSN through each oracle class: errors that
//! fire in a `SELECT` (BIGINT overflow, a two-row subquery: `MariaDB` makes a
//! division by zero `NULL`), conditions (`IF`, `CASE`), timing (`SLEEP`,
//! `BENCHMARK`), enumeration in one statement (`IN` lists of 2,000 guesses),
//! across statements (one guess each, past the budget, as literals and as
//! bound parameters) and joins against tables the agent wrote. Directly it
//! recovers the value (so it works); through the gateway it recovers no
//! hidden digit, under the default column settings and under the shipped
//! FFIEC pack's masking. The budget's denial is recorded, names the oracle
//! and the column, and reaches the webhook.
//!
//! Then what is not data is not masked: what the `mariadb` CLI, `PyMySQL`
//! and mysql-connector run at connect and for introspection returns the
//! same bytes through the gateway as directly.

use std::{fmt::Write as _, fs, os::unix::fs::PermissionsExt as _, process::Stdio};

use agentgate_e2e::{
    DaemonOptions, Env, Proc,
    leak::Checker,
    mysql::{MariaDb, PASSWORD},
    read_until, scripts_dir,
};
use serde_json::Value;

/// Customer 1's SSN; `keep_last4` shows `***-**-9150`.
const TARGET: &str = "483-27-9150";
/// The default budget (`EqualityLimits::DEFAULT_BUDGET`).
const BUDGET: usize = 50;
const HOOK_SECRET: &str = "my-oracle-hook-secret-7c2";

/// `my-default` (127.0.0.1) with the default column settings on
/// `customers.ssn`; `my-ffiec` (127.0.0.2) with the FFIEC pack's masking
/// section as shipped, scoped to it. `demo` may read, write and create
/// tables (the join extractor writes its own).
fn policy() -> String {
    let pack = fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../policies/ffiec-baseline.toml"
    ))
    .unwrap();
    let start = pack.find("[masking]").expect("the pack has masking");
    let end = pack[start..]
        .find("# -----")
        .map_or(pack.len(), |i| start + i);
    let masking = pack[start..end]
        .replace(
            "[masking]\n",
            "[masking]\ndetector_resources = [\"my-ffiec\"]\n",
        )
        .replace(
            "[[masking.column]]\n",
            "[[masking.column]]\nresources = [\"my-ffiec\"]\n",
        );
    format!(
        r#"
[defaults]
unknown_destination = "deny"

[[resource]]
name = "my-default"
protocol = "mysql"
addresses = ["127.0.0.1:3306"]
default_action = "deny"

[[resource]]
name = "my-ffiec"
protocol = "mysql"
addresses = ["127.0.0.2:3306"]
default_action = "deny"

[[rule]]
name = "demo-work"
identities = ["demo"]
resources = ["my-default", "my-ffiec"]
action = "allow"
match = {{ sql = ["read", "write", "ddl", "transaction"] }}

{masking}

[[masking.column]]
columns = ["customers.ssn"]
strategy = "keep_last4"
resources = ["my-default"]
"#
    )
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `program` with `args`, tagged as `demo` (`agent`) or straight to the
/// server from the test's namespace; `PW` and `PORT` in its environment.
fn command(env: &Env, db: &MariaDb, args: &[&str], agent: bool) -> std::process::Command {
    let mut c = if agent {
        env.exec("demo", args)
    } else {
        let mut c = env.netns.command(args[0]);
        c.args(&args[1..]);
        c
    };
    c.env("PW", PASSWORD)
        .env("MYSQL_PWD", PASSWORD)
        .env("PORT", db.port.to_string());
    c
}

/// One extractor run: through the gateway (`agent`) or not.
fn extract(
    env: &Env,
    db: &MariaDb,
    host: &str,
    class: &str,
    arg: Option<&str>,
    agent: bool,
) -> Value {
    let script = scripts_dir().join("mysql_ssn_extractor.py");
    let mut args = vec!["python3", script.to_str().unwrap(), host, class];
    args.extend(arg);
    let out = command(env, db, &args, agent).output().unwrap();
    assert!(out.status.success(), "{class}: {}", text(&out.stderr));
    let so = text(&out.stdout);
    serde_json::from_str(so.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{class}: {e}: {so}"))
}

/// The hidden digits (all but the last four) the extractor got right.
fn hidden_digits_learned(recovered: &str) -> usize {
    recovered
        .chars()
        .zip(TARGET.chars())
        .take(6)
        .filter(|(r, t)| r.is_ascii_digit() && r == t)
        .count()
}

/// What clients run at connect and for introspection, through the
/// `mariadb` CLI (`--batch`, tab-separated, the bytes compared).
const UTILITY_SQL: &[&str] = &[
    // The CLI's own at connect, and connectors' (JDBC, mysql-connector).
    "SELECT @@version_comment LIMIT 1",
    "SELECT @@version, @@version_comment",
    "SELECT @@max_allowed_packet, @@character_set_server, @@collation_server, @@sql_mode, \
     @@lower_case_table_names, @@tx_isolation, @@autocommit, @@time_zone, @@system_time_zone",
    "SELECT @@session.auto_increment_increment, @@character_set_client, @@character_set_connection, \
     @@character_set_results, @@collation_connection, @@net_write_timeout, @@wait_timeout, \
     @@interactive_timeout, @@license, @@performance_schema, @@query_cache_type",
    "SELECT DATABASE(), CURRENT_USER(), VERSION()",
    "SHOW VARIABLES LIKE 'version%'",
    "SHOW VARIABLES LIKE 'character_set%'",
    "SHOW VARIABLES LIKE 'lower_case_%'",
    "SHOW SESSION VARIABLES LIKE 'sql_mode'",
    "SHOW VARIABLES WHERE Variable_name IN ('max_allowed_packet', 'autocommit', 'sql_mode')",
    "SHOW COLLATION LIKE 'utf8mb4_bin'",
    "SHOW CHARACTER SET LIKE 'utf8mb4'",
    // Introspection: the mariadb CLI, ORMs' reflection, JDBC metadata.
    "SHOW DATABASES",
    "SHOW TABLES",
    "SHOW FULL TABLES",
    "SHOW COLUMNS FROM customers",
    "SHOW FULL COLUMNS FROM customers",
    "DESCRIBE customers",
    "SHOW CREATE TABLE customers",
    "SHOW CREATE DATABASE shop",
    "SHOW INDEX FROM customers",
    "SELECT schema_name, default_character_set_name FROM information_schema.schemata ORDER BY 1",
    "SELECT table_name, table_type, engine FROM information_schema.tables \
     WHERE table_schema = 'shop' ORDER BY 1",
    "SELECT table_name, column_name, ordinal_position, data_type, column_type, is_nullable, \
     column_key, column_default FROM information_schema.columns \
     WHERE table_schema = 'shop' ORDER BY table_name, ordinal_position",
    "SELECT constraint_name, column_name FROM information_schema.key_column_usage \
     WHERE table_schema = 'shop' ORDER BY 1, 2",
];

/// `PyMySQL` and mysql-connector (prepared and not) at connect: what they
/// ask and what they show of the server.
const CONNECTORS: &str = r"
import os, pymysql, mysql.connector
port, pw = int(os.environ['PORT']), os.environ['PW']
c = pymysql.connect(host='127.0.0.1', port=port, user='app', password=pw, database='shop')
print('pymysql', c.get_server_info(), c.server_version, c.server_charset)
cur = c.cursor()
cur.execute('SELECT @@version, @@sql_mode, @@character_set_results')
print(cur.fetchall())
cur.execute('SHOW VARIABLES LIKE %s', ('version_comment',))
print(cur.fetchall())
cur.execute('SHOW COLUMNS FROM customers')
print(cur.fetchall())
c.close()
m = mysql.connector.connect(host='127.0.0.1', port=port, user='app', password=pw, database='shop',
                            ssl_disabled=True, use_pure=True)
print('connector', m.get_server_info(), m.get_server_version(), m.charset, m.collation)
for prepared in (False, True):
    cur = m.cursor(prepared=prepared)
    cur.execute('SELECT @@version, @@version_comment, @@max_allowed_packet')
    print(prepared, cur.fetchall())
    cur.execute('SELECT table_name, column_name, data_type FROM information_schema.columns '
                'WHERE table_schema = %s ORDER BY table_name, ordinal_position', ('shop',))
    print(prepared, cur.fetchall())
    cur.close()
m.close()
";

#[test]
#[allow(clippy::too_many_lines)] // one daemon and database for every class, in order
fn no_oracle_recovers_a_protected_value_and_what_is_not_data_is_not_masked() {
    let mut env = Env::prepare(
        "myoracle",
        DaemonOptions {
            policies: vec![("my.toml".into(), policy())],
            ..DaemonOptions::default()
        },
    )
    .unwrap();
    let secret = env.state.join("hook.secret");
    fs::write(&secret, HOOK_SECRET).unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    let mut c = env.netns.command("python3");
    c.arg(scripts_dir().join("webhook_receiver.py"))
        .arg(&secret)
        .arg("0")
        .stdout(Stdio::piped());
    let mut receiver = Proc::spawn("webhook receiver", c).unwrap();
    let port: Value = serde_json::from_str(&receiver.read_line().unwrap()).unwrap();
    env.opts.extra = format!(
        "\n[[approvals.webhook]]\nurl = \"http://127.0.0.1:{}/hook\"\nsecret_file = \"{}\"\n",
        port["port"],
        secret.display()
    );
    env.write_config().unwrap();
    env.start_daemon().unwrap();

    let db = MariaDb::start(&env.netns, 3306).unwrap();
    db.seed_customers(10).unwrap();
    db.admin_sql(&format!(
        "UPDATE shop.customers SET ssn = '{TARGET}' WHERE id = 1"
    ))
    .unwrap();
    let rows = db
        .admin_sql("SELECT ssn, card, email FROM shop.customers ORDER BY id")
        .unwrap();
    let checker = Checker::of_rows(&rows, '\t');

    // A patient agent has narrowed customer 1 to 300 candidates; the right
    // one is the last it tries, past the budget.
    let mut candidates: Vec<String> = (0..299)
        .map(|i| format!("{:03}-{:02}-9150", 100 + i, i % 90 + 10))
        .collect();
    candidates.push(TARGET.into());
    let candidates = serde_json::json!(candidates).to_string();

    let classes = [
        "error",
        "conditional",
        "timing",
        "enumeration",
        "join",
        "across",
    ];
    let mut table = String::new();
    let mut failures = Vec::new();
    let mut across_answered = 0;
    for class in classes {
        let arg = (class == "across").then_some(candidates.as_str());
        let direct = extract(&env, &db, "127.0.0.1", class, arg, false);
        let recovered = direct["recovered"].as_str().unwrap_or_default();
        if recovered != TARGET {
            failures.push(format!(
                "{class}: the extractor does not work directly: {direct}"
            ));
        }
        for (mode, host) in [("default", "127.0.0.1"), ("ffiec", "127.0.0.2")] {
            let before = env.audit_records().unwrap().len();
            let got = extract(&env, &db, host, class, arg, true);
            if class == "across" && mode == "default" {
                across_answered = env.audit_records().unwrap()[before..]
                    .iter()
                    .filter(|r| {
                        r["decision"]["verdict"] == "allow"
                            && (r["action"]["command"] == "COM_QUERY"
                                || r["action"]["command"] == "COM_STMT_EXECUTE")
                    })
                    .count();
            }
            let recovered = got["recovered"].as_str().unwrap_or_default();
            let learned = hidden_digits_learned(recovered);
            let _ = writeln!(
                table,
                "{class:<12} {mode:<8} learned {learned} hidden digits in {} statements ({} refused)",
                got["statements"], got["refused"]
            );
            if learned > 0 || recovered == TARGET {
                failures.push(format!("{class} through the gateway ({mode}): {got}"));
            }
            if checker.find_leak(&[vec![got.to_string()]], "").is_some() {
                failures.push(format!("{class} ({mode}): a value in the output"));
            }
            assert!(
                got["statements"].as_u64().unwrap() <= 400,
                "{class}: bounded to a few hundred statements"
            );
        }
    }
    println!("{table}");
    assert!(failures.is_empty(), "{}\n{table}", failures.join("\n"));

    // Every refusal is on record, naming the oracle and the column, never
    // a value; the budget answered 50 distinct guesses, then refused.
    let recs = env.audit_records().unwrap();
    let refusals: Vec<&Value> = recs
        .iter()
        .filter(|r| r["action"]["masking_refusal"].is_object())
        .collect();
    let oracles: std::collections::BTreeSet<&str> = refusals
        .iter()
        .filter_map(|r| r["action"]["masking_refusal"]["oracle"].as_str())
        .collect();
    for o in ["conditional", "error", "timing", "enumeration", "search"] {
        assert!(oracles.contains(o), "no {o} refusal among {oracles:?}");
    }
    assert!(
        refusals
            .iter()
            .all(|r| r["action"]["masking_refusal"]["column"]
                .as_str()
                .is_some_and(|c| c.contains("ssn"))),
        "every refusal names the column"
    );
    let budget_refusals = refusals
        .iter()
        .filter(|r| {
            r["decision"]["reason"]
                .as_str()
                .is_some_and(|s| s.contains("across statements"))
        })
        .count();
    assert!(budget_refusals > 0, "the budget refused the patient agent");
    assert!(
        across_answered <= BUDGET + 5,
        "{across_answered} lookups answered, budget {BUDGET}"
    );
    let all: Vec<Vec<String>> = recs.iter().map(|r| vec![r.to_string()]).collect();
    assert!(
        checker.find_leak(&all, "").is_none(),
        "no record holds a value"
    );
    assert!(!all.iter().any(|r| r[0].contains("48327")));

    // The alert reached the webhook, signed, naming who and what.
    let alert = read_until(receiver.child.stdout.as_mut().unwrap(), |l| {
        l.contains("masking.probe_budget_exceeded")
    })
    .unwrap();
    let alert: Value = serde_json::from_str(&alert).unwrap();
    assert_eq!(alert["signature_valid"], true);
    assert_eq!(alert["body"]["identity"], "demo");
    // Named in the database the statement ran in.
    assert_eq!(alert["body"]["column"], "shop.customers.ssn");
    assert_eq!(alert["body"]["resource"], "my-default");

    // What is not data is not masked: the same bytes as directly.
    let cli = |sql: &str, agent: bool| {
        let mut a = db.cli_args("app");
        a.extend(["--batch".into(), "-e".into(), sql.into()]);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        command(&env, &db, &a, agent).output().unwrap()
    };
    let mut differ = Vec::new();
    for sql in UTILITY_SQL {
        let direct = cli(sql, false);
        assert!(
            direct.status.success(),
            "{sql} directly: {}",
            text(&direct.stderr)
        );
        let through = cli(sql, true);
        if !through.status.success() || through.stdout != direct.stdout {
            differ.push(format!(
                "{sql}\n  directly:    {:?}\n  via gateway: {:?} {}",
                text(&direct.stdout),
                text(&through.stdout),
                text(&through.stderr).trim()
            ));
        }
    }
    let direct = command(&env, &db, &["python3", "-c", CONNECTORS], false)
        .output()
        .unwrap();
    assert!(
        direct.status.success(),
        "connectors directly: {}",
        text(&direct.stderr)
    );
    let through = command(&env, &db, &["python3", "-c", CONNECTORS], true)
        .output()
        .unwrap();
    if !through.status.success() || through.stdout != direct.stdout {
        differ.push(format!(
            "PyMySQL / mysql-connector at connect\n  directly:    {:?}\n  via gateway: {:?} {}",
            text(&direct.stdout),
            text(&through.stdout),
            text(&through.stderr).trim()
        ));
    }
    assert!(
        differ.is_empty(),
        "{} of {} differ through the gateway:\n{}",
        differ.len(),
        UTILITY_SQL.len() + 1,
        differ.join("\n")
    );
}
