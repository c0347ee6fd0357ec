//! Masking without oracles: an agent that does not need a protected value in
//! a result, only a yes/no per statement, still gets nothing. An extractor
//! (`scripts/ssn_extractor.py`, one psycopg connection) tries to recover a
//! customer's full SSN through each oracle class: errors, conditions
//! (`GREATEST`), timing (`pg_sleep`), enumeration in one statement (IN lists of
//! 2,000 guesses, `= ANY`), enumeration across statements (one guess each,
//! past the budget), joins against tables the agent wrote, and writes of
//! guesses into the protected column under its unique constraint. Run directly
//! against the server it recovers the value (so it works); through the
//! gateway it recovers no hidden digit, under the default column settings
//! and under the shipped FFIEC pack's masking. The budget's denial is
//! recorded, names the oracle and the column, and reaches the webhook; the
//! budget survives a restart of the daemon.
//!
//! Then what is not data is not masked: what clients run at connect and for
//! introspection (psql's `\d` family, libpqxx's `SHOW server_version_num`,
//! `version()`, a JDBC-style and an ORM metadata query) returns the same
//! bytes through the gateway as directly.

use std::{fmt::Write as _, fs, os::unix::fs::PermissionsExt as _, process::Stdio};

use agentgate_e2e::{
    DaemonOptions, Env, Proc,
    leak::Checker,
    pg::{PG_BIN, PgServer},
    read_until, scripts_dir,
};
use serde_json::Value;

/// Customer 1's SSN; `keep_last4` shows `***-**-9150`.
const TARGET: &str = "483-27-9150";
/// The default budget (`EqualityLimits::DEFAULT_BUDGET`).
const BUDGET: usize = 50;
const HOOK_SECRET: &str = "oracle-hook-secret-5d1";

/// `pg-default` (127.0.0.1) with the default column settings on
/// `customers.ssn`; `pg-ffiec` (127.0.0.2) with the FFIEC pack's masking
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
            "[masking]\ndetector_resources = [\"pg-ffiec\"]\n",
        )
        .replace(
            "[[masking.column]]\n",
            "[[masking.column]]\nresources = [\"pg-ffiec\"]\n",
        );
    format!(
        r#"
[defaults]
unknown_destination = "deny"

[[resource]]
name = "pg-default"
protocol = "postgres"
addresses = ["127.0.0.1:5432"]
default_action = "deny"

[[resource]]
name = "pg-ffiec"
protocol = "postgres"
addresses = ["127.0.0.2:5432"]
default_action = "deny"

[[rule]]
name = "demo-work"
identities = ["demo"]
resources = ["pg-default", "pg-ffiec"]
action = "allow"
match = {{ sql = ["read", "write", "ddl", "transaction"] }}

{masking}

[[masking.column]]
columns = ["customers.ssn"]
strategy = "keep_last4"
resources = ["pg-default"]
"#
    )
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// One extractor run: through the gateway (`agent`) or not.
fn extract(env: &Env, url: &str, class: &str, arg: Option<&str>, agent: bool) -> Value {
    let script = scripts_dir().join("ssn_extractor.py");
    let script = script.to_str().unwrap();
    let mut args = vec!["python3", script, url, class];
    args.extend(arg);
    let out = if agent {
        env.exec("demo", &args).output().unwrap()
    } else {
        env.netns
            .command(args[0])
            .args(&args[1..])
            .output()
            .unwrap()
    };
    assert!(out.status.success(), "{class}: {}", text(&out.stderr));
    let so = text(&out.stdout);
    serde_json::from_str(so.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{class}: {e}: {so}"))
}

/// The JSON paths in `v` whose text contains `needle` (to say where, not what).
fn paths_holding(v: &Value, needle: &str) -> Vec<String> {
    match v {
        Value::Object(m) => m
            .iter()
            .flat_map(|(k, v)| {
                paths_holding(v, needle)
                    .into_iter()
                    .map(move |p| format!(".{k}{p}"))
            })
            .collect(),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .flat_map(|(i, v)| {
                paths_holding(v, needle)
                    .into_iter()
                    .map(move |p| format!("[{i}]{p}"))
            })
            .collect(),
        Value::String(s) if s.contains(needle) => vec![String::new()],
        _ => Vec::new(),
    }
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

/// psql with `args`, directly (`agent` false) or tagged as `demo`.
fn psql(env: &Env, url: &str, args: &[&str], agent: bool) -> (bool, String, String) {
    let bin = format!("{PG_BIN}/psql");
    let mut a = vec![bin.as_str(), url, "-X", "-v", "ON_ERROR_STOP=1"];
    a.extend_from_slice(args);
    let out = if agent {
        env.exec("demo", &a).output().unwrap()
    } else {
        env.netns.command(a[0]).args(&a[1..]).output().unwrap()
    };
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// What clients run at connect and for introspection.
const UTILITY: &[&[&str]] = &[
    &["-c", "\\d"],
    &["-c", "\\dt"],
    &["-c", "\\d customers"],
    &["-c", "\\d+ customers"],
    &["-c", "\\di"],
    &["-c", "\\dn"],
    &["-c", "\\df"],
    &["-c", "\\du"],
    &["-c", "\\l"],
    &["-c", "\\dx"],
    // libpqxx at connect; libpq/psycopg read the same parameters.
    &["-qAt", "-c", "SHOW server_version_num"],
    &["-qAt", "-c", "SHOW standard_conforming_strings"],
    &["-qAt", "-c", "SHOW server_encoding"],
    &["-qAt", "-c", "SHOW TimeZone"],
    &["-qAt", "-c", "SELECT version()"],
    &[
        "-qAt",
        "-c",
        "SELECT current_setting('server_version_num')::int, current_setting('max_identifier_length')",
    ],
    &["-qAt", "-c", "SELECT current_schema(), current_database()"],
    // JDBC (pgjdbc DatabaseMetaData.getColumns, abridged).
    &[
        "-qAt",
        "-c",
        "SELECT n.nspname, c.relname, a.attname, a.atttypid, a.attnotnull OR (t.typtype = 'd' AND t.typnotnull) AS attnotnull, \
         a.atttypmod, a.attlen, t.typtypmod, a.attnum, pg_catalog.pg_get_expr(def.adbin, def.adrelid) AS adsrc, \
         dsc.description, t.typbasetype, t.typtype FROM pg_catalog.pg_namespace n \
         JOIN pg_catalog.pg_class c ON (c.relnamespace = n.oid) JOIN pg_catalog.pg_attribute a ON (a.attrelid = c.oid) \
         JOIN pg_catalog.pg_type t ON (a.atttypid = t.oid) \
         LEFT JOIN pg_catalog.pg_attrdef def ON (a.attrelid = def.adrelid AND a.attnum = def.adnum) \
         LEFT JOIN pg_catalog.pg_description dsc ON (c.oid = dsc.objoid AND a.attnum = dsc.objsubid) \
         WHERE c.relkind IN ('r', 'p', 'v', 'f', 'm') AND a.attnum > 0 AND NOT a.attisdropped \
         AND c.relname LIKE 'customers' ORDER BY nspname, c.relname, attnum",
    ],
    // An ORM's reflection (SQLAlchemy's get_columns, abridged).
    &[
        "-qAt",
        "-c",
        "SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod), \
         (SELECT pg_catalog.pg_get_expr(d.adbin, d.adrelid) FROM pg_catalog.pg_attrdef d \
          WHERE d.adrelid = a.attrelid AND d.adnum = a.attnum AND a.atthasdef), \
         a.attnotnull, a.attrelid::regclass::text, pg_catalog.col_description(a.attrelid, a.attnum) \
         FROM pg_catalog.pg_attribute a WHERE a.attrelid = 'public.customers'::regclass \
         AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
    ],
    &[
        "-qAt",
        "-c",
        "SELECT table_name, column_name, data_type FROM information_schema.columns \
         WHERE table_schema = 'public' ORDER BY table_name, ordinal_position",
    ],
];

#[test]
#[allow(clippy::too_many_lines)] // one daemon and database for every class, in order
fn no_oracle_recovers_a_protected_value_and_what_is_not_data_is_not_masked() {
    let mut env = Env::prepare(
        "pgoracle",
        DaemonOptions {
            policies: vec![("pg.toml".into(), policy())],
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

    let pg = PgServer::start(&env.netns, 5432, false).unwrap();
    pg.seed_customers(10).unwrap();
    pg.admin_sql(&format!(
        "UPDATE customers SET ssn = '{TARGET}' WHERE id = 1; \
         CREATE UNIQUE INDEX customers_ssn ON customers (ssn)"
    ))
    .unwrap();
    let checker = Checker::new(&pg);
    let default_url = pg.url("127.0.0.1", "postgres", "postgres");
    let ffiec_url = pg.url("127.0.0.2", "postgres", "postgres");

    // A patient agent has narrowed customer 1 to 300 candidates; the right
    // one is the last it tries, past the budget.
    let mut candidates: Vec<String> = (0..299)
        .map(|i| format!("{:03}-{:02}-9150", 100 + i, i % 90 + 10))
        .collect();
    candidates.push(TARGET.into());
    let candidates = serde_json::json!(candidates).to_string();
    // Other decoys for the writes, so that they are new to the budget.
    let mut decoys: Vec<String> = (0..299)
        .map(|i| format!("{:03}-{:02}-9150", 400 + i, i % 90 + 10))
        .collect();
    decoys.push(TARGET.into());
    let decoys = serde_json::json!(decoys).to_string();

    let classes = [
        "error",
        "conditional",
        "timing",
        "enumeration",
        "join",
        "across",
        "unique",
    ];
    let mut table = String::new();
    let mut failures = Vec::new();
    for class in classes {
        let arg = match class {
            "across" => Some(candidates.as_str()),
            "unique" => Some(decoys.as_str()),
            _ => None,
        };
        let direct = extract(&env, &default_url, class, arg, false);
        let recovered = direct["recovered"].as_str().unwrap_or_default();
        if recovered != TARGET {
            failures.push(format!(
                "{class}: the extractor does not work directly: {direct}"
            ));
        }
        for (mode, url) in [("default", &default_url), ("ffiec", &ffiec_url)] {
            let got = extract(&env, url, class, arg, true);
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
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The budget outlives the daemon: killed and restarted, a new guess is
    // still refused by it.
    env.kill_daemon();
    env.start_daemon().unwrap();
    let (ok, _, err) = psql(
        &env,
        &default_url,
        &[
            "-c",
            "SELECT id FROM customers WHERE ssn = '999-99-9150' AND id = 1",
        ],
        true,
    );
    assert!(
        !ok && err.contains("across statements"),
        "after a restart: {err}"
    );

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
    for o in [
        "conditional",
        "error",
        "timing",
        "enumeration",
        "search",
        "uniqueness",
    ] {
        assert!(oracles.contains(o), "no {o} refusal among {oracles:?}");
    }
    let unnamed: Vec<&Value> = refusals
        .iter()
        .map(|r| &r["action"]["masking_refusal"])
        .filter(|m| !m["column"].as_str().is_some_and(|c| c.contains("ssn")))
        .collect();
    assert!(
        unnamed.is_empty(),
        "every refusal names the column: {unnamed:?}"
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
    let across_answered = recs
        .iter()
        .filter(|r| {
            r["action"]["message"] == "execute"
                && r["decision"]["verdict"] == "allow"
                && r["resource"] == "pg-default"
        })
        .count();
    assert!(
        across_answered <= BUDGET + 5,
        "{across_answered} lookups answered, budget {BUDGET}"
    );
    let all: Vec<Vec<String>> = recs.iter().map(|r| vec![r.to_string()]).collect();
    assert!(
        checker.find_leak(&all, "").is_none(),
        "no record holds a value"
    );
    // The whole value's digits (five alone turn up in hashes by chance).
    let holding: Vec<String> = recs
        .iter()
        .flat_map(|r| {
            ["483279150", "483-27"]
                .into_iter()
                .flat_map(|n| paths_holding(r, n))
                .map(|p| format!("{} at {p}", r["event"]))
        })
        .collect();
    assert!(
        holding.is_empty(),
        "records hold the hidden digits: {holding:?}"
    );

    // The alert reached the webhook, signed, naming who and what.
    let alert = read_until(receiver.child.stdout.as_mut().unwrap(), |l| {
        l.contains("masking.probe_budget_exceeded")
    })
    .unwrap();
    let alert: Value = serde_json::from_str(&alert).unwrap();
    assert_eq!(alert["signature_valid"], true);
    assert_eq!(alert["body"]["identity"], "demo");
    assert_eq!(alert["body"]["column"], "customers.ssn");
    assert_eq!(alert["body"]["resource"], "pg-default");

    // What is not data is not masked: the same bytes as directly.
    for args in UTILITY {
        let direct = psql(&env, &default_url, args, false);
        assert!(direct.0, "{args:?} directly: {}", direct.2);
        let through = psql(&env, &default_url, args, true);
        assert!(through.0, "{args:?} through the gateway: {}", through.2);
        assert_eq!(through.1, direct.1, "{args:?}");
    }
}
