//! Policy engine: shipped packs load, bad files give exact positions, the
//! decision matrix, matching semantics, masking per resource, reload.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use agentgate::{
    mask::Strategy,
    policy::{
        Action, Decision, PolicySet, PolicyStore, Subject, Verdict, WatchEvent, WatchOptions,
        load_dir, load_str,
    },
    sql::{Dialect, classify},
};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

fn fixture(name: &str) -> String {
    std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/bad_policies")
            .join(name),
    )
    .unwrap()
}

// ------------------------------------------------------------------ shipped packs

/// Every directory under policies/ holding *.toml files is a pack and must load.
#[test]
fn every_shipped_pack_passes_check() {
    let root = repo_root().join("policies");
    let mut packs = vec![root.clone()];
    for e in std::fs::read_dir(&root).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            packs.push(p);
        }
    }
    let mut checked = 0;
    for pack in packs {
        let has_toml = std::fs::read_dir(&pack)
            .unwrap()
            .any(|e| e.unwrap().path().extension().is_some_and(|x| x == "toml"));
        if !has_toml {
            continue;
        }
        if let Err(e) = load_dir(&pack) {
            panic!("{} does not load:\n{e}", pack.display());
        }
        checked += 1;
    }
    assert!(
        checked >= 2,
        "expected the baseline and the local pack, checked {checked}"
    );
}

#[test]
fn local_pack_behaves_as_xtask_run_expects() {
    let set = load_dir(&repo_root().join("policies/local")).unwrap();
    let pg = set.resource_for("127.0.0.1:5432".parse().unwrap()).unwrap();
    assert_eq!(pg.name, "local-postgres");
    assert_eq!(
        set.resource_for("[::1]:5432".parse().unwrap())
            .unwrap()
            .name,
        "local-postgres"
    );
    assert_eq!(
        set.resource_for("127.0.0.1:7777".parse().unwrap())
            .unwrap()
            .name,
        "local-echo"
    );
    let demo = Subject {
        identity: "demo".into(),
        groups: vec!["demo".into()],
    };
    assert_eq!(
        set.decide_connect(&demo, "127.0.0.1:5432".parse().unwrap())
            .verdict,
        Verdict::Allow
    );
    assert_eq!(
        set.decide_connect(&demo, "127.0.0.1:7777".parse().unwrap())
            .verdict,
        Verdict::Allow
    );
    let d = set.decide_connect(&demo, "127.0.0.1:6379".parse().unwrap());
    assert_eq!(d.rule, "default:unknown-destination");
    assert!(matches!(d.verdict, Verdict::Deny { .. }));

    let read = sql(&set, &demo, "local-postgres", "SELECT * FROM customers");
    assert_eq!(
        (read.verdict, read.rule.as_str()),
        (Verdict::Allow, "demo-read")
    );
    let write = sql(
        &set,
        &demo,
        "local-postgres",
        "UPDATE customers SET email = 'x' WHERE id = 1",
    );
    let Verdict::RequireApproval(spec) = write.verdict else {
        panic!("{write:?}")
    };
    assert_eq!(spec.approver_groups, vec!["approvers"]);
    assert_eq!(spec.timeout, Duration::from_mins(2));
    let grant = sql(
        &set,
        &demo,
        "local-postgres",
        "GRANT SELECT ON customers TO demo",
    );
    assert!(matches!(grant.verdict, Verdict::Deny { .. }));
    assert_eq!(grant.rule, "default:resource:local-postgres");

    let m = set.masking_for(pg);
    assert_eq!(
        m.column_rule(Some("customers"), "ssn"),
        Some(Strategy::KeepLast4)
    );
    assert_eq!(
        m.column_rule(Some("customers"), "card_number"),
        Some(Strategy::KeepLast4)
    );
    assert_eq!(
        m.column_rule(Some("customers"), "email"),
        Some(Strategy::KeyedHash)
    );
    assert_eq!(m.column_rule(Some("customers"), "name"), None);
    assert!(m.detectors_enabled());
}

#[test]
#[allow(clippy::too_many_lines)]
fn ffiec_baseline_decides_as_documented() {
    let set = load_dir(&repo_root().join("policies")).unwrap();
    let eng = Subject {
        identity: "e1".into(),
        groups: vec!["engineers".into()],
    };
    let analyst = Subject {
        identity: "a1".into(),
        groups: vec!["analysts".into()],
    };
    let db = "core-banking-db";
    let kind = |d: &Decision| match &d.verdict {
        Verdict::Allow => "allow",
        Verdict::Deny { .. } => "deny",
        Verdict::RequireApproval(_) => "approval",
    };
    let cases = [
        (&analyst, "SELECT * FROM accounts", "allow", "analysts-read"),
        (
            &analyst,
            "UPDATE accounts SET x = 1 WHERE id = 2",
            "deny",
            "default:resource:core-banking-db",
        ),
        (
            &eng,
            "UPDATE accounts SET x = 1 WHERE id = 2",
            "allow",
            "engineers-bounded-writes",
        ),
        (
            &eng,
            "DELETE FROM accounts",
            "approval",
            "destructive-dml-needs-approval",
        ),
        (
            &eng,
            "TRUNCATE accounts",
            "approval",
            "destructive-dml-needs-approval",
        ),
        (
            &eng,
            "ALTER TABLE accounts ADD COLUMN x int",
            "approval",
            "ddl-needs-approval",
        ),
        (
            &eng,
            "GRANT SELECT ON accounts TO x",
            "deny",
            "no-privilege-or-admin-sql",
        ),
        (
            &analyst,
            "SELECT pg_read_file('/etc/passwd')",
            "deny",
            "no-privilege-or-admin-sql",
        ),
        (
            &analyst,
            "DO $$ BEGIN DELETE FROM accounts; END $$",
            "deny",
            "no-privilege-or-admin-sql",
        ),
        (
            &analyst,
            "SELECT 1; GRANT SELECT ON t TO x",
            "deny",
            "no-privilege-or-admin-sql",
        ),
    ];
    for (who, text, want, rule) in cases {
        let d = sql(&set, who, db, text);
        assert_eq!(
            (kind(&d), d.rule.as_str()),
            (want, rule),
            "{} {text}",
            who.identity
        );
    }
    let api = set.resource("payments-api-prod").unwrap();
    let http = |m: &str| Action::Http {
        method: m.into(),
        host: "payments.bank.internal".into(),
        path: "/v1/transfers".into(),
        query: None,
        json: None,
    };
    assert_eq!(set.decide(&eng, api, &http("GET")).verdict, Verdict::Allow);
    let post = set.decide(&eng, api, &http("POST"));
    let Verdict::RequireApproval(spec) = post.verdict else {
        panic!("{post:?}")
    };
    assert_eq!(
        (spec.quorum, spec.grant_window),
        (2, Some(Duration::from_mins(15)))
    );
    assert!(matches!(
        set.decide(&analyst, api, &http("POST")).verdict,
        Verdict::Deny { .. }
    ));
    // PII columns masked everywhere, detectors on.
    let m = set.masking_for(set.resource(db).unwrap());
    assert_eq!(
        m.column_rule(Some("customers"), "ssn"),
        Some(Strategy::Redact)
    );
    assert_eq!(
        m.column_rule(None, "card_number"),
        Some(Strategy::KeepLast4)
    );
    assert!(m.detectors_enabled());
    assert_eq!(
        set.binding_for("/system.slice/reporting-agent.service")
            .unwrap()
            .identity,
        "svc-reporting"
    );
}

/// The annotated example in policies/README.md is a valid policy.
#[test]
fn readme_example_loads() {
    let readme = std::fs::read_to_string(repo_root().join("policies/README.md")).unwrap();
    let start = readme.find("```toml\n").unwrap() + "```toml\n".len();
    let end = start + readme[start..].find("```").unwrap();
    let set = load_str(&[("README.md", &readme[start..end])]).unwrap_or_else(|e| panic!("{e}"));
    let r = set.resource("orders-db").unwrap();
    assert_eq!(
        r.tls.as_ref().unwrap().server_name.as_deref(),
        Some("orders.db.internal")
    );
    assert_eq!(set.rules().len(), 2);
    assert_eq!(
        set.masking_for(r)
            .column_rule(Some("public.customers"), "ssn"),
        Some(Strategy::KeepLast4)
    );
    let d = sql(&set, &subject("alice"), "orders-db", "SELECT * FROM orders");
    assert_eq!(short(&d), "A:analysts-read-orders");
}

/// Tables created implicitly by a dotted header or key are accepted.
#[test]
fn implicit_tables_are_accepted() {
    let text = format!(
        "defaults.unknown_destination = \"deny\"\n{GOOD_A}[[masking.column]]\ncolumns = [\"ssn\"]\nstrategy = \"redact\"\n"
    );
    let set = load_str(&[("i.toml", &text)]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        set.masking_for(set.resource("a").unwrap())
            .column_rule(None, "ssn"),
        Some(Strategy::Redact)
    );
}

// ------------------------------------------------------------------ bad files

#[test]
fn bad_policy_files_report_exact_positions() {
    let cases: &[(&str, &[&str])] = &[
        (
            "unknown_field.toml",
            &[
                "unknown_field.toml:5:1: unknown field `colour`, expected one of `name`, `description`, `protocol`, `addresses`, `tls`, `credential`, `default_action`, `default_approval`, `intercept`, `profile`, `prompt_dlp`",
            ],
        ),
        (
            "bad_protocol.toml",
            &[
                "bad_protocol.toml:3:12: unknown variant `oracle`, expected one of `postgres`, `mysql`, `http`, `https`, `tcp`, `ssh`",
            ],
        ),
        (
            "bad_address.toml",
            &[
                "bad_address.toml:4:32: invalid address `::1:5432`: write IPv6 addresses in brackets, e.g. [::1]:5432",
                "bad_address.toml:4:44: a DNS name needs a port, not `*`: `db.internal:*`",
            ],
        ),
        (
            "bad_rules.toml",
            &[
                "bad_rules.toml:10:26: unknown statement class `reads` (one of: transaction, read, write, ddl, dcl, admin, unknown)",
                "bad_rules.toml:14:8: rule `r2` applies to no one: set `identities` or `groups` (use [\"*\"] for everyone)",
                "bad_rules.toml:15:14: unknown resource `dbx`",
                "bad_rules.toml:16:10: `action = \"require_approval\"` needs an `approval` table",
            ],
        ),
        (
            "bad_approval.toml",
            &[
                "bad_approval.toml:4:14: unknown resource `db`",
                "bad_approval.toml:6:32: `approver_groups` is empty: nobody could approve",
                "bad_approval.toml:6:45: `quorum` must be 1 to 16",
                "bad_approval.toml:6:58: invalid duration `2 weeks`: unknown unit `weeks` (ms, s, m, h, d)",
            ],
        ),
        (
            "bad_masking.toml",
            &[
                "bad_masking.toml:7:14: unknown detector `ssn` (one of: all, us_ssn, card_pan, email, phone, iban, aba_routing)",
                "bad_masking.toml:12:14: `nope` matches no resource",
                "bad_masking.toml:14:19: `equality_budget` must be at most 1000000",
                "bad_masking.toml:13:19: `equality_window` must be more than 0 and at most 30d",
                "bad_masking.toml:10:12: invalid column `a..b`: expected column, table.column or schema.table.column",
            ],
        ),
        (
            "syntax.toml",
            &["syntax.toml:1:11: invalid table header; expected `.`, `]]`"],
        ),
    ];
    for (file, want) in cases {
        let text = fixture(file);
        let errors = load_str(&[(file, &text)]).expect_err(file);
        let got: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
        assert_eq!(got, *want, "{file}");
        // Display: one error per line.
        assert_eq!(errors.to_string(), want.join("\n"));
    }
}

#[test]
fn duplicates_across_files_name_both_positions() {
    let a = fixture("dup_a.toml");
    let b = fixture("dup_b.toml");
    let errors = load_str(&[("dup_a.toml", &a), ("dup_b.toml", &b)]).unwrap_err();
    assert_eq!(
        errors.to_string(),
        "dup_b.toml:3:8: duplicate resource name `db` (first defined at dup_a.toml:2:8)\n\
         dup_b.toml:8:8: duplicate rule name `r1` (first defined at dup_a.toml:7:8)"
    );
}

#[test]
fn directory_problems_are_reported_with_the_path() {
    let dir = tempdir("empty");
    let e = load_dir(&dir).unwrap_err();
    assert!(
        e.to_string()
            .ends_with(": no policy files (*.toml) in this directory"),
        "{e}"
    );
    let e = load_dir(&dir.join("missing")).unwrap_err();
    assert!(
        e.to_string().contains("cannot read policy directory"),
        "{e}"
    );
}

// ------------------------------------------------------------------ decision matrix

const MATRIX_POLICY: &str = r#"
[[resource]]
name = "pg"
protocol = "postgres"
addresses = ["10.0.0.1:5432"]

[[resource]]
name = "my"
protocol = "mysql"
addresses = ["10.0.0.2:3306"]

[[resource]]
name = "api"
protocol = "http"
addresses = ["10.0.0.3:443"]

[[resource]]
name = "raw"
protocol = "tcp"
addresses = ["10.0.0.4:22"]
default_action = "allow"

[[rule]]
name = "analysts-read"
groups = ["analysts"]
resources = ["pg", "my"]
match = { sql = ["read"] }
action = "allow"

[[rule]]
name = "analysts-write-approval"
groups = ["analysts"]
resources = ["pg", "my"]
match = { sql = ["write"] }
action = "require_approval"
approval = { approver_groups = ["approvers"], timeout = "60s" }

[[rule]]
name = "eng-sql"
groups = ["eng"]
resources = ["pg", "my"]
match = { sql = ["read", "write", "ddl"] }
action = "allow"

[[rule]]
name = "carol-ddl-approval"
identities = ["carol"]
resources = ["pg"]
match = { sql = ["ddl"] }
action = "require_approval"
approval = { approver_groups = ["dba"], quorum = 2, timeout = "5m", grant_window = "10m" }

[[rule]]
name = "no-payroll"
identities = ["*"]
resources = ["*"]
match = { sql = ["read", "write"], tables = ["payroll"] }
action = "deny"

[[rule]]
name = "no-dcl-admin-unknown"
identities = ["*"]
resources = ["pg", "my"]
match = { sql = ["dcl", "admin", "unknown"] }
action = "deny"

[[rule]]
name = "api-get"
groups = ["analysts", "eng"]
resources = ["api"]
match = { http_methods = ["GET"] }
action = "allow"

[[rule]]
name = "api-write"
groups = ["eng"]
resources = ["api"]
match = { http_methods = ["POST", "DELETE"], http_paths = ["/v1/*"] }
action = "require_approval"
approval = { approver_groups = ["api-owners"], timeout = "10m" }

[[rule]]
name = "interns-out"
groups = ["interns"]
resources = ["*"]
action = "deny"
"#;

fn subject(id: &str) -> Subject {
    let groups: &[&str] = match id {
        "alice" => &["analysts"],
        "bob" | "carol" => &["eng"],
        "dave" => &["interns", "analysts"],
        _ => &[],
    };
    Subject {
        identity: id.into(),
        groups: groups.iter().map(|s| (*s).to_owned()).collect(),
    }
}

fn sql(set: &PolicySet, who: &Subject, resource: &str, text: &str) -> Decision {
    let r = set.resource(resource).unwrap();
    let c = classify(text, r.protocol.sql_dialect().unwrap_or(Dialect::Postgres));
    set.decide(who, r, &Action::Sql(Arc::new(c)))
}

fn short(d: &Decision) -> String {
    let v = match d.verdict {
        Verdict::Allow => "A",
        Verdict::Deny { .. } => "D",
        Verdict::RequireApproval(_) => "R",
    };
    format!("{v}:{}", d.rule)
}

/// identity, resource, action, expected `verdict:rule`. Actions: `connect`,
/// `sql:<text>`, `http:<METHOD> <path>`.
const MATRIX: &[(&str, &str, &str, &str)] = &[
    // alice: analyst
    ("alice", "pg", "connect", "A:analysts-read"),
    ("alice", "pg", "sql:SELECT * FROM orders", "A:analysts-read"),
    (
        "alice",
        "pg",
        "sql:BEGIN; SELECT * FROM orders; COMMIT",
        "A:analysts-read",
    ),
    (
        "alice",
        "pg",
        "sql:UPDATE orders SET a = 1 WHERE id = 1",
        "R:analysts-write-approval",
    ),
    (
        "alice",
        "pg",
        "sql:SELECT 1; UPDATE orders SET a = 1 WHERE id = 1",
        "R:analysts-write-approval",
    ),
    (
        "alice",
        "pg",
        "sql:DROP TABLE orders",
        "D:default:resource:pg",
    ),
    (
        "alice",
        "pg",
        "sql:GRANT SELECT ON orders TO x",
        "D:no-dcl-admin-unknown",
    ),
    ("alice", "pg", "sql:SELECT * FROM payroll", "D:no-payroll"),
    (
        "alice",
        "pg",
        "sql:SELECT * FROM orders; SELECT * FROM public.payroll",
        "D:no-payroll",
    ),
    ("alice", "pg", "sql:SELEC oops", "D:no-dcl-admin-unknown"),
    (
        "alice",
        "pg",
        "sql:SELECT pg_read_file('/etc/passwd')",
        "D:no-dcl-admin-unknown",
    ),
    (
        "alice",
        "my",
        "sql:SELECT * FROM `orders`",
        "A:analysts-read",
    ),
    ("alice", "api", "connect", "A:api-get"),
    ("alice", "api", "http:GET /v1/accounts", "A:api-get"),
    (
        "alice",
        "api",
        "http:POST /v1/accounts",
        "D:default:resource:api",
    ),
    ("alice", "raw", "connect", "A:default:resource:raw"),
    // bob: engineer
    ("bob", "pg", "sql:SELECT * FROM orders", "A:eng-sql"),
    (
        "bob",
        "pg",
        "sql:BEGIN; DELETE FROM orders WHERE id = 1; COMMIT",
        "A:eng-sql",
    ),
    ("bob", "pg", "sql:DROP TABLE orders", "A:eng-sql"),
    ("bob", "pg", "sql:SELECT * FROM payroll", "D:no-payroll"),
    (
        "bob",
        "pg",
        "sql:DO $$ BEGIN DELETE FROM orders; END $$",
        "D:no-dcl-admin-unknown",
    ),
    ("bob", "api", "http:GET /v1/payments", "A:api-get"),
    ("bob", "api", "http:post /v1/payments", "R:api-write"),
    (
        "bob",
        "api",
        "http:DELETE /admin/cache",
        "D:default:resource:api",
    ),
    (
        "bob",
        "api",
        "http:PUT /v1/payments",
        "D:default:resource:api",
    ),
    // carol: engineer with an identity rule that beats her group's allow at equal conditions
    (
        "carol",
        "pg",
        "sql:DROP TABLE orders",
        "R:carol-ddl-approval",
    ),
    ("carol", "my", "sql:DROP TABLE orders", "A:eng-sql"),
    ("carol", "pg", "sql:SELECT 1", "A:eng-sql"),
    // dave: intern and analyst. The unconditioned deny decides the connection;
    // a rule with conditions is more specific for commands (README, "How a decision is made").
    ("dave", "pg", "connect", "D:interns-out"),
    ("dave", "raw", "connect", "D:interns-out"),
    ("dave", "pg", "sql:SELECT * FROM orders", "A:analysts-read"),
    ("dave", "pg", "sql:DROP TABLE orders", "D:interns-out"),
    // eve: no groups
    ("eve", "pg", "connect", "D:default:resource:pg"),
    (
        "eve",
        "pg",
        "sql:SELECT * FROM orders",
        "D:default:resource:pg",
    ),
    ("eve", "pg", "sql:SELECT * FROM payroll", "D:no-payroll"),
    ("eve", "api", "http:GET /", "D:default:resource:api"),
    ("eve", "raw", "connect", "A:default:resource:raw"),
];

#[test]
fn decision_matrix() {
    let set = load_str(&[("matrix.toml", MATRIX_POLICY)]).unwrap();
    let mut failures = Vec::new();
    for (who, res, action, want) in MATRIX {
        let s = subject(who);
        let r = set.resource(res).unwrap();
        let d = if *action == "connect" {
            set.decide(&s, r, &Action::Connect)
        } else if let Some(text) = action.strip_prefix("sql:") {
            sql(&set, &s, res, text)
        } else if let Some(h) = action.strip_prefix("http:") {
            let (method, path) = h.split_once(' ').unwrap();
            set.decide(
                &s,
                r,
                &Action::Http {
                    method: method.into(),
                    host: "api.internal".into(),
                    path: path.into(),
                    query: None,
                    json: None,
                },
            )
        } else {
            unreachable!()
        };
        if short(&d) != *want {
            failures.push(format!(
                "{who} {res} {action}: want {want}, got {}",
                short(&d)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn approval_spec_is_carried() {
    let set = load_str(&[("matrix.toml", MATRIX_POLICY)]).unwrap();
    let d = sql(&set, &subject("carol"), "pg", "CREATE TABLE t (a int)");
    let Verdict::RequireApproval(spec) = d.verdict else {
        panic!()
    };
    assert_eq!(spec.approver_groups, vec!["dba"]);
    assert_eq!(spec.quorum, 2);
    assert_eq!(spec.timeout, Duration::from_mins(5));
    assert_eq!(spec.grant_window, Some(Duration::from_mins(10)));
}

// ------------------------------------------------------------------ semantics

fn one_resource(rules: &str) -> PolicySet {
    let text = format!(
        "[[resource]]\nname = \"pg\"\nprotocol = \"postgres\"\naddresses = [\"10.0.0.1:5432\"]\n{rules}"
    );
    load_str(&[("t.toml", &text)]).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn at_equal_specificity_deny_beats_approval_beats_allow_then_first_wins() {
    let rule = |name: &str, action: &str| {
        let approval = if action == "require_approval" {
            "approval = { approver_groups = [\"x\"], timeout = \"1m\" }\n"
        } else {
            ""
        };
        format!(
            "[[rule]]\nname = \"{name}\"\ngroups = [\"g\"]\nresources = [\"pg\"]\nmatch = {{ sql = [\"read\"] }}\naction = \"{action}\"\n{approval}"
        )
    };
    let s = Subject {
        identity: "u".into(),
        groups: vec!["g".into()],
    };
    let set =
        one_resource(&(rule("a", "allow") + &rule("d", "deny") + &rule("r", "require_approval")));
    assert_eq!(short(&sql(&set, &s, "pg", "SELECT 1")), "D:d");
    let set = one_resource(&(rule("a", "allow") + &rule("r", "require_approval")));
    assert_eq!(short(&sql(&set, &s, "pg", "SELECT 1")), "R:r");
    let set = one_resource(&(rule("a1", "allow") + &rule("a2", "allow")));
    assert_eq!(short(&sql(&set, &s, "pg", "SELECT 1")), "A:a1");
    let set = one_resource(&(rule("a2", "allow") + &rule("a1", "allow")));
    assert_eq!(short(&sql(&set, &s, "pg", "SELECT 1")), "A:a2");
}

#[test]
fn more_conditions_and_literal_names_are_more_specific() {
    let set = one_resource(
        r#"
[[rule]]
name = "glob-deny"
groups = ["g"]
resources = ["p*"]
match = { sql = ["read"] }
action = "deny"

[[rule]]
name = "literal-allow"
groups = ["g"]
resources = ["pg"]
match = { sql = ["read"] }
action = "allow"

[[rule]]
name = "orders-approval"
groups = ["g"]
resources = ["p*"]
match = { sql = ["read"], tables = ["orders"] }
action = "require_approval"
approval = { approver_groups = ["x"], timeout = "1m" }
"#,
    );
    let s = Subject {
        identity: "u".into(),
        groups: vec!["g".into()],
    };
    assert_eq!(
        short(&sql(&set, &s, "pg", "SELECT * FROM customers")),
        "A:literal-allow"
    );
    assert_eq!(
        short(&sql(&set, &s, "pg", "SELECT * FROM orders")),
        "R:orders-approval"
    );
}

#[test]
fn allow_conditions_need_every_table_deny_conditions_any() {
    let set = one_resource(
        r#"
[[rule]]
name = "orders-only"
groups = ["g"]
resources = ["pg"]
match = { tables = ["orders", "public.order_*"] }
action = "allow"
"#,
    );
    let s = Subject {
        identity: "u".into(),
        groups: vec!["g".into()],
    };
    assert_eq!(
        short(&sql(&set, &s, "pg", "SELECT * FROM orders")),
        "A:orders-only"
    );
    assert_eq!(
        short(&sql(&set, &s, "pg", "SELECT * FROM public.order_lines")),
        "A:orders-only"
    );
    assert_eq!(
        short(&sql(
            &set,
            &s,
            "pg",
            "SELECT * FROM ORDERS o JOIN public.order_lines l ON true"
        )),
        "A:orders-only"
    );
    assert_eq!(
        short(&sql(
            &set,
            &s,
            "pg",
            "SELECT * FROM orders JOIN customers ON true"
        )),
        "D:default:resource:pg"
    );
    // Unknown text: its tables cannot be known, so a tables allow does not cover it.
    assert_eq!(
        short(&sql(&set, &s, "pg", "DO $$ BEGIN END $$")),
        "D:default:resource:pg"
    );
    // A bare `sql` allow still exempts transaction control.
    let set = one_resource(
        "[[rule]]\nname = \"r\"\ngroups = [\"g\"]\nresources = [\"pg\"]\nmatch = { sql = [\"read\"] }\naction = \"allow\"\n",
    );
    assert_eq!(short(&sql(&set, &s, "pg", "BEGIN")), "A:r");
    assert_eq!(short(&sql(&set, &s, "pg", "")), "A:r");
}

#[test]
fn destructive_condition() {
    let set = one_resource(
        r#"
[[rule]]
name = "bounded"
groups = ["g"]
resources = ["pg"]
match = { sql = ["write"], destructive = false }
action = "allow"

[[rule]]
name = "unbounded"
groups = ["g"]
resources = ["pg"]
match = { sql = ["write"], destructive = true }
action = "require_approval"
approval = { approver_groups = ["x"], timeout = "1m" }
"#,
    );
    let s = Subject {
        identity: "u".into(),
        groups: vec!["g".into()],
    };
    assert_eq!(
        short(&sql(&set, &s, "pg", "DELETE FROM t WHERE id = 1")),
        "A:bounded"
    );
    assert_eq!(short(&sql(&set, &s, "pg", "DELETE FROM t")), "R:unbounded");
    assert_eq!(
        short(&sql(&set, &s, "pg", "UPDATE t SET a = 1")),
        "R:unbounded"
    );
    assert_eq!(short(&sql(&set, &s, "pg", "TRUNCATE t")), "R:unbounded");
}

#[test]
fn addresses_resolve_to_resources() {
    let set = load_str(&[(
        "a.toml",
        r#"
[[resource]]
name = "exact"
protocol = "tcp"
addresses = ["10.1.2.3:80", "[fd00::1]:80"]

[[resource]]
name = "wide"
protocol = "tcp"
addresses = ["10.0.0.0/8:*"]

[[resource]]
name = "narrow"
protocol = "tcp"
addresses = ["10.1.0.0/16:80"]

[[resource]]
name = "by-name"
protocol = "tcp"
addresses = ["localhost:9999"]

[defaults]
unknown_destination = "deny"
"#,
    )])
    .unwrap();
    let at = |s: &str| {
        set.resource_for(s.parse::<SocketAddr>().unwrap())
            .map(|r| r.name.clone())
    };
    assert_eq!(at("10.1.2.3:80").as_deref(), Some("exact"));
    assert_eq!(
        at("[::ffff:10.1.2.3]:80").as_deref(),
        Some("exact"),
        "IPv4-mapped IPv6"
    );
    assert_eq!(at("[fd00::1]:80").as_deref(), Some("exact"));
    assert_eq!(at("10.1.9.9:80").as_deref(), Some("narrow"));
    assert_eq!(at("10.1.9.9:81").as_deref(), Some("wide"));
    assert_eq!(at("10.200.0.1:5432").as_deref(), Some("wide"));
    assert_eq!(at("11.0.0.1:80"), None);
    // DNS names match nothing until resolved.
    assert_eq!(at("127.0.0.1:9999"), None);
    set.install_dns(&[(
        ("localhost".into(), 9999),
        Some(vec!["127.0.0.1".parse().unwrap()]),
    )]);
    assert_eq!(at("127.0.0.1:9999").as_deref(), Some("by-name"));
    // A failed lookup keeps the previous answer.
    set.install_dns(&[(("localhost".into(), 9999), None)]);
    assert_eq!(at("127.0.0.1:9999").as_deref(), Some("by-name"));
    let eve = subject("eve");
    assert_eq!(
        short(&set.decide_connect(&eve, "11.0.0.1:80".parse().unwrap())),
        "D:default:unknown-destination"
    );
}

#[tokio::test]
async fn dns_names_are_resolved_by_refresh() {
    let set = load_str(&[(
        "a.toml",
        "[[resource]]\nname = \"n\"\nprotocol = \"tcp\"\naddresses = [\"localhost:9998\"]\n",
    )])
    .unwrap();
    set.refresh_dns().await;
    assert_eq!(
        set.resource_for("127.0.0.1:9998".parse().unwrap())
            .unwrap()
            .name,
        "n"
    );
}

#[test]
fn unknown_destination_can_be_opened_explicitly() {
    let set = load_str(&[(
        "a.toml",
        "[defaults]\nunknown_destination = \"allow\"\n[[resource]]\nname = \"n\"\nprotocol = \"tcp\"\naddresses = [\"10.0.0.1:1\"]\n",
    )])
    .unwrap();
    assert_eq!(
        short(&set.decide_connect(&subject("eve"), "8.8.8.8:53".parse().unwrap())),
        "A:default:unknown-destination"
    );
}

#[test]
fn a_resource_from_another_set_is_looked_up_by_name() {
    let a = load_str(&[("m.toml", MATRIX_POLICY)]).unwrap();
    let b = one_resource("");
    let pg_from_b = b.resource("pg").unwrap();
    // Same name, different index: found by name.
    assert_eq!(
        short(&a.decide(&subject("alice"), pg_from_b, &Action::Connect)),
        "A:analysts-read"
    );
    let stranger = load_str(&[(
        "x.toml",
        "[[resource]]\nname = \"zz\"\nprotocol = \"tcp\"\naddresses = [\"10.9.9.9:1\"]\n",
    )])
    .unwrap();
    let zz = stranger.resource("zz").unwrap();
    assert_eq!(
        short(&a.decide(&subject("alice"), zz, &Action::Connect)),
        "D:default:unknown-resource"
    );
}

#[test]
fn explain_lists_every_rule_that_applied() {
    let set = load_str(&[("m.toml", MATRIX_POLICY)]).unwrap();
    let r = set.resource("pg").unwrap();
    let c = Arc::new(classify("SELECT * FROM payroll", Dialect::Postgres));
    let ex = set.explain(&subject("alice"), r, &Action::Sql(c));
    assert_eq!(ex.decision.rule, "no-payroll");
    let names: Vec<_> = ex.candidates.iter().map(|c| c.rule.as_str()).collect();
    assert_eq!(names, vec!["no-payroll", "analysts-read"]);
    assert_eq!(ex.candidates[0].origin, "m.toml:54:8");
}

#[test]
fn bindings_prefer_literal_then_longest() {
    let set = load_str(&[(
        "b.toml",
        r#"
[[resource]]
name = "n"
protocol = "tcp"
addresses = ["10.0.0.1:1"]

[[binding]]
cgroup = "/agents/*"
identity = "svc-agents"

[[binding]]
cgroup = "/agents/special/*"
identity = "svc-special"
groups = ["analysts"]

[[binding]]
cgroup = "/agents/special/one.scope"
identity = "svc-one"
"#,
    )])
    .unwrap();
    assert_eq!(set.bindings().len(), 3);
    assert_eq!(
        set.binding_for("/agents/x.scope").unwrap().identity,
        "svc-agents"
    );
    assert_eq!(
        set.binding_for("/agents/special/two.scope")
            .unwrap()
            .identity,
        "svc-special"
    );
    assert_eq!(
        set.binding_for("/agents/special/one.scope")
            .unwrap()
            .identity,
        "svc-one"
    );
    assert!(set.binding_for("/other").is_none());
}

// ------------------------------------------------------------------ reload

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "agentgate-policy-test-{tag}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const GOOD_A: &str =
    "[[resource]]\nname = \"a\"\nprotocol = \"tcp\"\naddresses = [\"10.0.0.1:1\"]\n";
const GOOD_B: &str =
    "[[resource]]\nname = \"b\"\nprotocol = \"tcp\"\naddresses = [\"10.0.0.2:1\"]\n";

#[test]
fn invalid_reload_keeps_the_old_policy() {
    let dir = tempdir("reload");
    std::fs::write(dir.join("p.toml"), GOOD_A).unwrap();
    let store = PolicyStore::open(&dir, None).unwrap();
    let first = store.current();
    assert!(first.resource("a").is_some());

    std::fs::write(
        dir.join("p.toml"),
        "[[resource]]\nname = \"a\"\nprotocol = \"tcp\"\naddresses = []\n",
    )
    .unwrap();
    let err = store.reload(&dir).unwrap_err();
    assert!(
        err.to_string()
            .contains("p.toml:4:13: resource `a` has no addresses"),
        "{err}"
    );
    assert!(
        Arc::ptr_eq(&first, &store.current()),
        "old policy stays in force"
    );

    std::fs::write(dir.join("p.toml"), GOOD_B).unwrap();
    let outcome = store.reload(&dir).unwrap();
    assert_eq!(outcome.resources, 1);
    assert_ne!(outcome.digest, outcome.previous_digest);
    assert_eq!(outcome.previous_digest, first.digest());
    assert!(store.current().resource("b").is_some() && store.current().resource("a").is_none());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn watcher_reloads_on_change_and_reports_rejections() {
    let dir = tempdir("watch");
    std::fs::write(dir.join("p.toml"), GOOD_A).unwrap();
    let store = Arc::new(PolicyStore::open(&dir, None).unwrap());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(agentgate::policy::watch(
        store.clone(),
        WatchOptions {
            poll: Duration::from_millis(20),
            dns_refresh: Duration::from_hours(1),
        },
        move |e| {
            let _ = tx.send(e);
        },
        async move {
            let _ = stop_rx.await;
        },
    ));
    tokio::time::sleep(Duration::from_millis(60)).await;
    std::fs::write(dir.join("p.toml"), "this is not toml = = =\n").unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(ev, WatchEvent::Rejected(_)), "{ev:?}");
    assert!(store.current().resource("a").is_some());
    std::fs::write(dir.join("p.toml"), GOOD_B).unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(ev, WatchEvent::Reloaded(_)), "{ev:?}");
    assert!(store.current().resource("b").is_some());
    stop_tx.send(()).unwrap();
    task.await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn keyed_hash_uses_the_configured_key() {
    let text =
        format!("{GOOD_A}[[masking.column]]\ncolumns = [\"email\"]\nstrategy = \"keyed_hash\"\n");
    let set = load_str(&[("k.toml", &text)]).unwrap();
    let r = set.resource("a").unwrap().clone();
    let no_key = set
        .masking_for(&r)
        .mask_value("jane@example.com", Some(Strategy::KeyedHash));
    assert_eq!(no_key.text, "[REDACTED]");
    let set = set.with_mask_key(Some(&Arc::new(agentgate::mask::MaskKey::new([9; 32]))));
    let m = set.masking_for(&r);
    let strategy = m.column_rule(Some("users"), "EMAIL");
    assert_eq!(strategy, Some(Strategy::KeyedHash));
    let out = m.mask_value("jane@example.com", strategy);
    assert!(out.text.starts_with("[h:") && !out.text.contains("jane"));
}

/// `[[allow_unix]]`: exact paths, directories, abstract names; anything
/// else is an error at its position.
#[test]
fn allow_unix_entries_are_parsed_and_checked() {
    let text = "[[allow_unix]]\npath = \"/run/systemd/journal/socket\"\n\
                [[allow_unix]]\npath = \"/run/app/*\"\n\
                [[allow_unix]]\npath = \"@agent-bus\"\n\
                [[allow_unix]]\npath = \"@prefix*\"\n";
    let set = load_str(&[("u.toml", text)]).unwrap_or_else(|e| panic!("{e}"));
    let got: Vec<(&str, bool, &[u8])> = set
        .allow_unix()
        .iter()
        .map(|a| (a.pattern.as_str(), a.exact, a.prefix.as_slice()))
        .collect();
    assert_eq!(
        got,
        vec![
            (
                "/run/systemd/journal/socket",
                true,
                &b"/run/systemd/journal/socket"[..]
            ),
            ("/run/app/*", false, &b"/run/app/"[..]),
            ("@agent-bus", true, &b"\0agent-bus"[..]),
            ("@prefix*", false, &b"\0prefix"[..]),
        ]
    );
    for (bad, why) in [
        ("relative.sock", "absolute path"),
        ("/run/../var/run/postgresql/.s.PGSQL.5432", "`..`"),
        ("/run/./x", "`.`"),
        ("/run/*/x", "trailing `*`"),
        ("/run/app*", "ends in `/*`"),
        ("/run/app/", "does not end in `/`"),
        ("@", "abstract socket name"),
    ] {
        let text = format!("\n[[allow_unix]]\npath = \"{bad}\"\n");
        let err = load_str(&[("u.toml", &text)]).unwrap_err().to_string();
        assert!(err.starts_with("u.toml:3:8: "), "{bad}: {err}");
        assert!(err.contains(why), "{bad}: {err}");
    }
    let long = format!("/{}", "a".repeat(107));
    let err = load_str(&[("u.toml", &format!("[[allow_unix]]\npath = \"{long}\"\n"))])
        .unwrap_err()
        .to_string();
    assert!(err.contains("longer than 107 bytes"), "{err}");
}

/// A resource's `credential`: database protocols only, an absolute path to a
/// regular file that only its owner can access; errors name the file, line and column.
#[test]
fn credential_files_must_be_private_and_for_databases() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("pw");
    std::fs::write(&secret, "x\n").unwrap();
    let set_mode =
        |m: u32| std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(m)).unwrap();
    let policy = |protocol: &str, file: &str| {
        format!(
            "[[resource]]\nname = \"db\"\nprotocol = \"{protocol}\"\naddresses = [\"127.0.0.1:5432\"]\n\
             credential = {{ user = \"app\", password_file = \"{file}\" }}\n"
        )
    };
    let path = secret.display().to_string();
    set_mode(0o600);
    let set = load_str(&[("p.toml", &policy("postgres", &path))]).unwrap();
    let c = set.resources()[0].credential.clone().unwrap();
    assert_eq!(c.user, "app");
    assert_eq!(c.password_file, secret);
    let err = |text: String| {
        load_str(&[("p.toml", &text)])
            .expect_err("must be refused")
            .to_string()
    };
    set_mode(0o640);
    let e = err(policy("postgres", &path));
    assert!(e.starts_with("p.toml:5:"), "{e}");
    assert!(e.contains("mode 640") && e.contains("chmod 600"), "{e}");
    set_mode(0o604);
    assert!(err(policy("mysql", &path)).contains("chmod 600"));
    set_mode(0o600);
    assert!(err(policy("tcp", &path)).contains("for database resources"));
    assert!(err(policy("postgres", "pw")).contains("absolute path"));
    assert!(err(policy("postgres", "/nonexistent/agentgate/pw")).contains("No such file"));
}

#[test]
fn ssh_rules_match_classes_and_forward_destinations() {
    let text = r#"
[[resource]]
name = "ops"
protocol = "ssh"
addresses = ["10.0.0.9:22"]
default_action = "deny"

[[rule]]
name = "reads"
identities = ["u"]
resources = ["ops"]
action = "allow"
match = { ssh = ["read"] }

[[rule]]
name = "root"
identities = ["u"]
resources = ["ops"]
action = "require_approval"
match = { ssh = ["privileged", "shell"] }
approval = { approver_groups = ["x"], timeout = "1m" }

[[rule]]
name = "metrics-tunnel"
identities = ["u"]
resources = ["ops"]
action = "allow"
match = { ssh = ["forward"], ssh_destinations = ["127.0.0.1:9100"] }
"#;
    let set = load_str(&[("t.toml", text)]).unwrap_or_else(|e| panic!("{e}"));
    let r = set.resource("ops").unwrap();
    let u = Subject {
        identity: "u".into(),
        groups: Vec::new(),
    };
    let ssh = |class: &'static str, dest: Option<&str>| {
        short(&set.decide(
            &u,
            r,
            &Action::Ssh {
                class,
                destination: dest.map(str::to_owned),
            },
        ))
    };
    assert_eq!(ssh("read", None), "A:reads");
    assert_eq!(ssh("privileged", None), "R:root");
    assert_eq!(ssh("shell", None), "R:root");
    assert_eq!(ssh("dangerous", None), "D:default:resource:ops");
    assert_eq!(ssh("forward", Some("127.0.0.1:9100")), "A:metrics-tunnel");
    assert_eq!(
        ssh("forward", Some("10.0.0.1:5432")),
        "D:default:resource:ops"
    );
    assert_eq!(ssh("forward", None), "D:default:resource:ops");
    // An unknown class and SSH conditions on a Postgres resource are refused.
    let bad = load_str(&[(
        "t.toml",
        "[[resource]]\nname = \"ops\"\nprotocol = \"ssh\"\naddresses = [\"10.0.0.9:22\"]\n\
         [[rule]]\nname = \"r\"\nresources = [\"ops\"]\naction = \"allow\"\nmatch = { ssh = [\"reed\"] }\n",
    )])
    .unwrap_err()
    .to_string();
    assert!(bad.contains("unknown SSH class `reed`"), "{bad}");
    let bad = load_str(&[(
        "t.toml",
        "[[resource]]\nname = \"pg\"\nprotocol = \"postgres\"\naddresses = [\"10.0.0.1:5432\"]\n\
         [[rule]]\nname = \"r\"\nresources = [\"pg\"]\naction = \"allow\"\nmatch = { ssh = [\"read\"] }\n",
    )])
    .unwrap_err()
    .to_string();
    assert!(bad.contains("SSH conditions can never match"), "{bad}");
}

#[test]
fn the_policy_knows_every_class_the_ssh_classifier_returns() {
    for c in agentgate::protocol::ssh::classify::Class::ALL {
        assert!(
            agentgate::policy::SSH_CLASSES.contains(&c.as_str()),
            "{c} is not an SSH class policy files may name"
        );
    }
}

#[test]
fn http_rules_test_query_parameters_and_json_body_fields() {
    let text = r#"
[[resource]]
name = "payments"
protocol = "https"
addresses = ["10.0.0.9:443"]
default_action = "deny"

[[rule]]
name = "payments-allowed"
identities = ["a"]
resources = ["payments"]
action = "allow"
match = { http_methods = ["POST"], http_paths = ["/payments"] }

[[rule]]
name = "big-or-forced-payments-held"
identities = ["a"]
resources = ["payments"]
action = "require_approval"
approval = { approver_groups = ["x"], timeout = "1m" }
match = { http_methods = ["POST"], http_paths = ["/payments"], http_json = ["$.amount > 10000", "$.force == true"] }

[[rule]]
name = "no-forced-listing"
identities = ["a"]
resources = ["payments"]
action = "deny"
match = { http_methods = ["GET"], http_query = ["force == true"] }

[[rule]]
name = "listing"
identities = ["a"]
resources = ["payments"]
action = "allow"
match = { http_methods = ["GET"] }
"#;
    let set = load_str(&[("p.toml", text)]).unwrap_or_else(|e| panic!("{e}"));
    let r = set.resource("payments").unwrap();
    let who = subject("a");
    let req = |method: &str, query: Option<&str>, json: Option<serde_json::Value>| Action::Http {
        method: method.into(),
        host: "payments.test".into(),
        path: "/payments".into(),
        query: query.map(str::to_owned),
        json: json.map(Arc::new),
    };
    let rule = |a: &Action| set.decide(&who, r, a).rule;
    let small = req("POST", None, Some(serde_json::json!({"amount": 50})));
    assert!(set.http_needs_body(&who, r, &small));
    assert_eq!(rule(&small), "payments-allowed");
    for held in [
        serde_json::json!({"amount": 12000}),
        serde_json::json!({"amount": "12000"}),
        serde_json::json!({"amount": 5, "force": true}),
    ] {
        assert_eq!(
            rule(&req("POST", None, Some(held))),
            "big-or-forced-payments-held"
        );
    }
    let get = req("GET", Some("page=2"), None);
    assert!(!set.http_needs_body(&who, r, &get), "no body test for GET");
    assert_eq!(rule(&get), "listing");
    assert_eq!(
        rule(&req("GET", Some("page=2&for%63e=true"), None)),
        "no-forced-listing"
    );
    // Bad tests refuse to load, naming the position.
    let bad = text.replace("$.amount > 10000", "$.amount > lots");
    let e = load_str(&[("p.toml", &bad)]).unwrap_err().to_string();
    assert!(e.contains("p.toml:") && e.contains("http_json"), "{e}");
}
