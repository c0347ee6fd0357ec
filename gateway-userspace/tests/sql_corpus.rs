//! SQL classification: the corpus in `fixtures/sql_corpus.tsv`, table and
//! function extraction, limits, and literal redaction for the audit log.

use agentgate::sql::{
    AnalysisCache, Dialect, MAX_SQL_LEN, StatementClass, classify, redact_literals,
};

fn unescape(s: &str) -> String {
    s.replace("\\n", "\n").replace("\\t", "\t")
}

#[test]
fn corpus_classes() {
    let text = include_str!("fixtures/sql_corpus.tsv");
    let mut failures = Vec::new();
    let mut count = 0;
    let cache = AnalysisCache::default();
    for (lineno, line) in text.lines().enumerate() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let mut parts = line.splitn(3, '\t');
        let (Some(class), Some(dialect), Some(sql)) = (parts.next(), parts.next(), parts.next())
        else {
            panic!("fixtures/sql_corpus.tsv:{}: malformed line", lineno + 1);
        };
        let want = StatementClass::parse(class).unwrap_or_else(|| panic!("bad class {class}"));
        let dialect = match dialect {
            "pg" => Dialect::Postgres,
            "my" => Dialect::MySql,
            other => panic!("bad dialect {other}"),
        };
        let sql = unescape(sql);
        let got = classify(&sql, dialect);
        // Through one shared shape cache (twice: miss, then hit), every
        // statement keeps its own class: no two corpus shapes collide.
        for _ in 0..2 {
            let cached = cache.analyze(&sql, dialect);
            assert_eq!(cached.classification.class, got.class, "cached: {sql:?}");
        }
        count += 1;
        if got.class != want {
            failures.push(format!(
                "line {}: {sql:?}: want {want}, got {} ({:?})",
                lineno + 1,
                got.class,
                got.reason
                    .clone()
                    .or_else(|| got.statements.iter().find_map(|s| s.note.clone()))
            ));
        }
    }
    assert!(count >= 150, "corpus has only {count} statements");
    assert!(
        failures.is_empty(),
        "{} of {count} misclassified:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn tables_and_functions_are_extracted() {
    let c = classify(
        "WITH recent AS (SELECT * FROM Orders) SELECT c.name, lower(c.email) FROM public.customers c JOIN recent r ON r.cid = c.id JOIN \"Mixed\".\"Case\" m ON true",
        Dialect::Postgres,
    );
    assert_eq!(c.class, StatementClass::Read);
    assert_eq!(
        c.tables,
        vec!["orders", "public.customers", "Mixed.Case"],
        "CTE names are not tables"
    );
    assert_eq!(c.functions, vec!["lower"]);

    let c = classify(
        "SELECT * FROM generate_series(1, 3) g, accounts",
        Dialect::Postgres,
    );
    assert_eq!(c.tables, vec!["accounts"]);
    assert_eq!(c.functions, vec!["generate_series"]);

    let c = classify(
        "INSERT INTO archive SELECT * FROM orders; DELETE FROM orders",
        Dialect::Postgres,
    );
    assert_eq!(c.statements.len(), 2);
    assert_eq!(c.statements[0].tables, vec!["archive", "orders"]);
    assert!(!c.statements[0].destructive);
    assert!(
        c.statements[1].destructive,
        "DELETE without WHERE is destructive"
    );
    assert!(c.destructive);

    let c = classify(
        "UPDATE accounts SET balance = 0 WHERE id = 1",
        Dialect::Postgres,
    );
    assert!(!c.destructive);
    assert_eq!(c.tables, vec!["accounts"]);

    let c = classify(
        "SELECT pg_catalog.pg_read_file('/etc/passwd')",
        Dialect::Postgres,
    );
    assert_eq!(c.functions, vec!["pg_catalog.pg_read_file"]);
    assert!(
        c.statements[0]
            .note
            .as_deref()
            .is_some_and(|n| n.contains("pg_read_file"))
    );

    let c = classify("EXPLAIN DELETE FROM customers", Dialect::Postgres);
    assert_eq!(c.class, StatementClass::Read);
    assert_eq!(c.tables, vec!["customers"]);
}

#[test]
fn multi_statement_takes_the_worst_and_keeps_each() {
    use StatementClass::{Dcl, Read, Transaction, Write};
    let c = classify(
        "BEGIN; SELECT 1; UPDATE t SET a = 1 WHERE b = 2; GRANT SELECT ON t TO x; COMMIT",
        Dialect::Postgres,
    );
    let classes: Vec<_> = c.statements.iter().map(|s| s.class).collect();
    assert_eq!(classes, vec![Transaction, Read, Write, Dcl, Transaction]);
    assert_eq!(c.class, Dcl);
}

#[test]
fn length_cap_and_parse_errors_are_unknown_with_a_reason() {
    let long = format!("SELECT '{}'", "x".repeat(MAX_SQL_LEN));
    let c = classify(&long, Dialect::Postgres);
    assert_eq!(c.class, StatementClass::Unknown);
    assert!(c.reason.as_deref().is_some_and(|r| r.contains("limit")));
    let c = classify("SELEC 1", Dialect::Postgres);
    assert_eq!(c.class, StatementClass::Unknown);
    assert!(
        c.reason
            .as_deref()
            .is_some_and(|r| r.contains("does not parse"))
    );
    // Just under the cap still parses.
    let ok = format!("SELECT '{}'", "x".repeat(MAX_SQL_LEN - 20));
    assert_eq!(classify(&ok, Dialect::Postgres).class, StatementClass::Read);
}

#[test]
fn classes_order_by_danger() {
    use StatementClass::{Admin, Dcl, Ddl, Read, Transaction, Unknown, Write};
    let order = [Transaction, Read, Write, Ddl, Dcl, Admin, Unknown];
    assert!(order.windows(2).all(|w| w[0] < w[1]));
}

#[test]
fn redaction_removes_every_literal() {
    let cases = [
        (
            "SELECT * FROM customers WHERE ssn = '123-45-6789' AND id = 42",
            "SELECT * FROM customers WHERE ssn = ? AND id = ?",
        ),
        (
            "INSERT INTO t (a, b) VALUES ('jane@example.com', 3.14)",
            "INSERT INTO t (a, b) VALUES (?, ?)",
        ),
        (
            "SELECT $$secret$$, E'x\\ny', B'1010', X'ff'",
            "SELECT ?, ?, ?, ?",
        ),
        ("select 1 -- comment with 4111111111111111\n", "SELECT ?"),
        (
            "CREATE ROLE bob LOGIN PASSWORD 'hunter2'",
            "CREATE ROLE bob LOGIN PASSWORD ?",
        ),
        (
            "COMMENT ON TABLE t IS 'owner: jane@example.com'",
            "COMMENT ON TABLE t IS ?",
        ),
        (
            "SELECT * FROM t WHERE d > DATE '2024-01-01' LIMIT 5",
            "SELECT * FROM t WHERE d > DATE ? LIMIT ?",
        ),
        // Cursor moves the parser does not know, beside a statement it does.
        (
            "MOVE 5 IN c; /* 4111111111111111 */ FETCH ABSOLUTE -1 FROM \"Cur\"; SELECT 'x'",
            "MOVE ? IN c; FETCH ABSOLUTE - ? FROM \"Cur\"; SELECT ?",
        ),
    ];
    for (input, want) in cases {
        let got = redact_literals(input, Dialect::Postgres).unwrap();
        assert_eq!(got, want, "input: {input}");
    }
    let my = redact_literals(
        "SELECT * FROM t WHERE name = \"Jane Doe\" AND x = 'y'",
        Dialect::MySql,
    )
    .unwrap();
    assert!(!my.contains("Jane") && !my.contains("'y'"), "{my}");
}

#[test]
fn unparsable_text_is_never_passed_through() {
    let secret = "DO $$ BEGIN PERFORM 'jane@example.com'; END $$";
    assert!(redact_literals(secret, Dialect::Postgres).is_err());
    assert_eq!(
        agentgate::sql::redact_for_log(secret, Dialect::Postgres),
        format!("<unparsed: {} bytes>", secret.len())
    );
}

#[test]
fn a_parse_error_never_repeats_a_literal_it_found() {
    for sql in [
        "SELECT * FROM t WHERE ssn = '123-45-6789' '987-65-4321'",
        "UPDATE t SET email = 'a@b.c' 'john@example.com'",
        "SELECT 1 FROM t WHERE card = 4111111111111111 4111111111111112",
        "SELECT $$x$$ $$secret$$ FROM",
    ] {
        let c = classify(sql, Dialect::Postgres);
        assert_eq!(c.class, StatementClass::Unknown, "{sql}");
        let reason = c.reason.expect("a reason");
        for secret in [
            "987-65-4321",
            "john@example.com",
            "4111111111111112",
            "secret",
        ] {
            assert!(!reason.contains(secret), "{reason}");
        }
        assert!(reason.starts_with("does not parse"), "{reason}");
    }
}
