//! `cargo xtask bench policy` (or `cargo bench -p agentgate --bench policy`):
//! policy decisions per second on a cached classification, SQL classification
//! time, and detector throughput on mixed text. Prints a table; single thread.
//!
//! Targets (issue 4): >= 1,000,000 decisions/s, <= 20 us per typical
//! classification, >= 300 MB/s detector throughput with all detectors on.
//! `AGENTGATE_BENCH_MS` sets the time budget per line (default 1500 ms).

use std::{
    hint::black_box,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use agentgate::{
    mask,
    policy::{Action, Subject, load_dir},
    sql::{Dialect, classify},
};

/// Run `f` repeatedly for about `budget`; return (iterations, elapsed).
fn run(budget: Duration, mut f: impl FnMut()) -> (u64, Duration) {
    for _ in 0..1000 {
        f();
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < budget {
        for _ in 0..1000 {
            f();
        }
        n += 1000;
    }
    (n, start.elapsed())
}

#[allow(clippy::too_many_lines)]
fn main() {
    let budget = Duration::from_millis(
        std::env::var("AGENTGATE_BENCH_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1500),
    );
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned();
    println!("{:<58} {:>16}  target", "benchmark", "result");
    println!("{}", "-".repeat(90));

    // ---- decisions on a cached classification
    let set = load_dir(&root.join("policies")).expect("ffiec baseline loads");
    let db = set.resource("core-banking-db").unwrap();
    let eng = Subject {
        identity: "e1".into(),
        groups: vec!["engineers".into(), "staff".into()],
    };
    for (label, sql) in [
        (
            "decide: read allowed (ffiec baseline)",
            "SELECT id, balance FROM accounts WHERE id = $1",
        ),
        (
            "decide: destructive write -> approval",
            "DELETE FROM accounts",
        ),
        ("decide: GRANT -> deny", "GRANT SELECT ON accounts TO x"),
    ] {
        let action = Action::Sql(Arc::new(classify(sql, Dialect::Postgres)));
        let (n, t) = run(budget, || {
            black_box(set.decide(black_box(&eng), black_box(db), black_box(&action)));
        });
        let per_s = n as f64 / t.as_secs_f64();
        println!("{label:<58} {per_s:>13.0} /s  >= 1,000,000/s");
    }
    let dst = "10.40.12.7:3306".parse().unwrap();
    let (n, t) = run(budget, || {
        black_box(set.decide_connect(black_box(&eng), black_box(dst)));
    });
    println!(
        "{:<58} {:>13.0} /s",
        "decide_connect: CIDR lookup + connect decision",
        n as f64 / t.as_secs_f64()
    );

    // ---- classification
    let statements = [
        (
            "classify: point select",
            "SELECT id, name, email FROM customers WHERE id = 42",
        ),
        (
            "classify: join + aggregate",
            "SELECT c.id, count(o.id) FROM public.customers c JOIN orders o ON o.customer_id = c.id \
             WHERE o.created_at > now() - interval '7 days' GROUP BY c.id ORDER BY 2 DESC LIMIT 20",
        ),
        (
            "classify: insert returning",
            "INSERT INTO orders (customer_id, amount, status) VALUES (7, 19.99, 'new') RETURNING id",
        ),
        (
            "classify: update",
            "UPDATE accounts SET balance = balance - 10 WHERE id = 1",
        ),
        (
            "classify: data-modifying CTE",
            "WITH moved AS (DELETE FROM orders WHERE status = 'old' RETURNING *) INSERT INTO archive SELECT * FROM moved",
        ),
        (
            "classify: BEGIN; UPDATE; COMMIT",
            "BEGIN; UPDATE t SET a = 1 WHERE id = 2; COMMIT",
        ),
        (
            "classify: DDL",
            "CREATE TABLE t (id bigint primary key, name text not null, created timestamptz default now())",
        ),
        (
            "classify: parse error (unknown)",
            "DO $$ BEGIN DELETE FROM customers; END $$",
        ),
    ];
    for (label, sql) in statements {
        let (n, t) = run(budget / 2, || {
            black_box(classify(black_box(sql), Dialect::Postgres));
        });
        let us = t.as_secs_f64() * 1e6 / n as f64;
        println!("{label:<58} {us:>13.2} us  <= 20 us");
    }
    // ---- column lineage (computed once per statement shape, with the
    // classification) and the masking policy applied to it
    let lineage_statements = [
        (
            "lineage: point select",
            "SELECT id, name, email FROM customers WHERE id = 42",
        ),
        (
            "lineage: join + aggregate",
            "SELECT c.id, count(o.id) FROM public.customers c JOIN orders o ON o.customer_id = c.id \
             WHERE o.created_at > now() - interval '7 days' GROUP BY c.id ORDER BY 2 DESC LIMIT 20",
        ),
        (
            "lineage: worst case (CTEs, recursion, set ops, JSON)",
            "WITH RECURSIVE r(i, ch) AS (SELECT 1, substr(ssn, 1, 1) FROM customers \
             UNION ALL SELECT i + 1, substr(c.ssn, i + 1, 1) FROM r, customers c WHERE i < 11), \
             w AS (SELECT id, row_to_json(c) AS j, coalesce(email, name) AS e FROM customers c) \
             SELECT t.*, (SELECT max(ch) FROM r) AS m, jsonb_build_object('a', w.e, 'b', w.j) \
             FROM (SELECT id, reverse(ssn) AS x FROM customers UNION SELECT id, email FROM customers) t \
             JOIN w ON w.id = t.id, LATERAL unnest(string_to_array(t.x, '-')) p WHERE t.id IN (1, 2, 3)",
        ),
    ];
    for (label, sql) in lineage_statements {
        let (n, t) = run(budget / 2, || {
            black_box(agentgate::sql::lineage::lineage(
                black_box(sql),
                Dialect::Postgres,
            ));
        });
        let us = t.as_secs_f64() * 1e6 / n as f64;
        println!("{label:<58} {us:>13.2} us");
    }
    let masked = set.masking_for(db);
    let worst = agentgate::sql::lineage::lineage(lineage_statements[2].1, Dialect::Postgres)
        .expect("parses")
        .remove(0);
    let (n, t) = run(budget / 2, || {
        black_box(mask::lineage::check(masked, &mask::lineage::NoCatalog, black_box(&worst)).ok());
    });
    println!(
        "{:<58} {:>13.2} us",
        "lineage check (refusals), worst case, ffiec pack",
        t.as_secs_f64() * 1e6 / n as f64
    );

    let redact_sql = "SELECT * FROM customers WHERE ssn = '123-45-6789' AND id = 42";
    let (n, t) = run(budget / 2, || {
        black_box(agentgate::sql::redact_literals(black_box(redact_sql), Dialect::Postgres).ok());
    });
    println!(
        "{:<58} {:>13.2} us",
        "redact_literals: select with two literals",
        t.as_secs_f64() * 1e6 / n as f64
    );

    // ---- detectors
    let mixed = mixed_text(16 * 1024 * 1024);
    let prose = prose_text(16 * 1024 * 1024);
    for (label, text) in [
        (
            "scan (all detectors): mixed text with numbers and PII",
            &mixed,
        ),
        ("scan (all detectors): prose without digits", &prose),
    ] {
        let mut hits = 0;
        let start = Instant::now();
        let mut bytes = 0usize;
        while start.elapsed() < budget {
            hits = mask::scan_with(black_box(text), mask::DetectorSet::ALL).len();
            bytes += text.len();
        }
        let mbs = bytes as f64 / start.elapsed().as_secs_f64() / 1e6;
        println!("{label:<58} {mbs:>11.0} MB/s  >= 300 MB/s  ({hits} hits/pass)");
    }
    let policy = set.masking_for(db);
    let row_values = [
        "Jane Doe",
        "jane.doe@example.com",
        "4111 1111 1111 1111",
        "1200.50",
        "2024-01-31",
        "no digits in this comment",
        "Account opened 2019, SSN on file 123-45-6789",
    ];
    let (n, t) = run(budget / 2, || {
        for v in &row_values {
            black_box(policy.mask_value(black_box(v), None));
        }
    });
    println!(
        "{:<58} {:>13.0} /s",
        "mask_value: 7-value row, detectors on (rows)",
        n as f64 / t.as_secs_f64()
    );
}

/// Deterministic text: prose, ids, amounts, dates, and a sprinkling of PII.
fn mixed_text(len: usize) -> String {
    let chunks = [
        "The customer called about order 184467 placed on 2024-03-14; amount 129.99 USD was refunded. ",
        "Contact: jane.doe@example.com, phone (555) 867-5309. ",
        "Ticket #88213 escalated to tier 2 after 3 attempts at 09:41. ",
        "Wire to DE89 3704 0044 0532 0130 00 settled; routing 021000021 confirmed. ",
        "Card on file 4111 1111 1111 1111 exp 12/27, SSN 123-45-6789 verified by agent 42. ",
        "Balance as of Q3: 10,482.17; 12 pending transactions, 0 disputes, version 1.4.2. ",
        "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt. ",
        "Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip ex ea. ",
    ];
    // Mostly prose and ordinary numbers; PII in about one chunk in four.
    let order = [0, 6, 2, 7, 5, 1, 6, 3, 7, 0, 4, 6];
    let mut s = String::with_capacity(len + 200);
    let mut i = 0usize;
    while s.len() < len {
        s.push_str(chunks[order[i % order.len()]]);
        i += 1;
    }
    s
}

fn prose_text(len: usize) -> String {
    let p = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut labore et dolore magna aliqua. ";
    p.repeat(len / p.len() + 1)
}
