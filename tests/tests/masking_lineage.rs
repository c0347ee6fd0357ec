//! Masking follows a protected value through any expression: re-encoding it
//! (functions, casts, hashes, JSON/XML, aggregates, windows, subqueries, CTEs,
//! set operations, views, `COPY`, cursors, binary results, pieces across
//! columns or rows) never gets it past the gateway, with no function deny list.
//! Every attempt is refused with the gateway's `42501` or comes back with the
//! checker finding no trace of any protected value; searches on protected
//! columns are refused; ordinary queries return what the server returns,
//! protected columns masked as configured.

use std::{fmt::Write as _, process::Command};

use agentgate_e2e::{
    DaemonOptions, Env,
    leak::Checker,
    pg::{PASSWORD, PG_BIN, PgServer},
};

const PSQL: &str = "/usr/lib/postgresql/15/bin/psql";

/// Attempts to get a protected value out, by kind of transform. A line break
/// separates the statements of one attempt (run in one session).
const LEAKS: &[(&str, &[&str])] = &[
    (
        "string",
        &[
            "SELECT upper(ssn) FROM customers",
            "SELECT upper(email) FROM customers",
            "SELECT initcap(email) FROM customers",
            "SELECT reverse(ssn) FROM customers",
            "SELECT reverse(card) FROM customers",
            "SELECT reverse(email) FROM customers",
            "SELECT replace(ssn, '-', '') FROM customers",
            "SELECT replace(email, '@', ' at ') FROM customers",
            "SELECT translate(ssn, '-', '') FROM customers",
            "SELECT translate(email, '@.', '  ') FROM customers",
            "SELECT overlay(ssn placing '' from 4 for 1) FROM customers",
            "SELECT overlay(card placing 'x' from 1 for 0) FROM customers",
            "SELECT regexp_replace(ssn, '-', '', 'g') FROM customers",
            "SELECT regexp_replace(ssn, '(\\d+)-(\\d+)-(\\d+)', '\\1/\\2/\\3') FROM customers",
            "SELECT lpad(ssn, 20, '#') FROM customers",
            "SELECT rpad(card, 30, '0') FROM customers",
            "SELECT ltrim(' ' || card) FROM customers",
            "SELECT repeat(ssn, 2) FROM customers",
            "SELECT concat('x', ssn, 'y') FROM customers",
            "SELECT concat_ws(',', ssn, card, email) FROM customers",
            "SELECT ssn || '' FROM customers",
            "SELECT format('%s', ssn) FROM customers",
            "SELECT format('%L', card) FROM customers",
            "SELECT quote_literal(ssn) FROM customers",
            "SELECT quote_ident(email) FROM customers",
            "SELECT substring(ssn from '\\d+-\\d+-\\d+') FROM customers",
            "SELECT substring(email from 1 for 5) FROM customers",
            "SELECT split_part(email, '@', 1) FROM customers",
            "SELECT regexp_matches(ssn, '\\d+', 'g') FROM customers",
            "SELECT regexp_split_to_array(ssn, '-') FROM customers",
            "SELECT regexp_split_to_table(ssn, '-') FROM customers",
            "SELECT string_to_array(ssn, '-') FROM customers",
            "SELECT string_to_array(card, NULL) FROM customers",
            "SELECT unnest(string_to_array(ssn, '-')) FROM customers",
            "SELECT ARRAY[ssn, card, email] FROM customers",
            "SELECT to_hex(ascii(substr(ssn, n, 1))) FROM customers, generate_series(1, 11) n ORDER BY id, n",
            "SELECT ascii(substr(ssn, n, 1)) FROM customers, generate_series(1, 11) n ORDER BY id, n",
            "SELECT chr(ascii(substr(card, n, 1))) FROM customers, generate_series(1, 16) n ORDER BY id, n",
            "SELECT string_agg(chr(ascii(c)), '') FROM customers, regexp_split_to_table(ssn, '') c GROUP BY id",
            "SELECT ssn COLLATE \"C\" FROM customers",
        ],
    ),
    (
        "cast",
        &[
            "SELECT ssn::bytea FROM customers",
            "SELECT card::bytea FROM customers",
            "SELECT ssn::varchar(3) FROM customers",
            "SELECT ssn::char(20) FROM customers",
            "SELECT ssn::xml FROM customers",
            "SELECT ssn::text::bytea::text FROM customers",
            "SELECT ('\"' || email || '\"')::json FROM customers",
            "SELECT card::numeric FROM customers",
            "SELECT card::numeric::float8 FROM customers",
            "SELECT replace(ssn, '-', '')::int FROM customers",
            "SELECT to_char(card::numeric, 'FM9999999999999999') FROM customers",
        ],
    ),
    (
        "hash/encode",
        &[
            "SELECT md5(ssn) FROM customers",
            "SELECT md5(card) FROM customers",
            "SELECT md5(email) FROM customers",
            "SELECT sha256(ssn::bytea) FROM customers",
            "SELECT encode(sha256(card::bytea), 'hex') FROM customers",
            "SELECT sha256(convert_to(email, 'UTF8')) FROM customers",
            "SELECT encode(ssn::bytea, 'hex') FROM customers",
            "SELECT encode(ssn::bytea, 'base64') FROM customers",
            "SELECT encode(email::bytea, 'base64') FROM customers",
            "SELECT encode(ssn::bytea, 'escape') FROM customers",
            "SELECT encode(convert_to(ssn, 'UTF8'), 'hex') FROM customers",
            "SELECT convert_to(card, 'LATIN1') FROM customers",
            "SELECT decode(card, 'hex') FROM customers",
            "SELECT translate(encode(ssn::bytea, 'base64'), '+/', '-_') FROM customers",
            "SELECT rtrim(encode(email::bytea, 'base64'), '=') FROM customers",
            "SELECT encode(('x' || ssn)::bytea, 'base64') FROM customers",
            "SELECT encode(('xy' || card)::bytea, 'base64') FROM customers",
            "SELECT encode(row_to_json(c)::text::bytea, 'base64') FROM customers c",
        ],
    ),
    (
        "json/xml",
        &[
            "SELECT row_to_json(c) FROM customers c",
            "SELECT row_to_json(t) FROM (SELECT reverse(ssn) AS r FROM customers) t",
            "SELECT to_jsonb(c) FROM customers c",
            "SELECT to_json(ssn) FROM customers",
            "SELECT json_build_object('s', ssn) FROM customers",
            "SELECT jsonb_build_object('s', reverse(ssn)) FROM customers",
            "SELECT json_build_array(ssn, card) FROM customers",
            "SELECT to_jsonb(c) ->> 'card' FROM customers c",
            "SELECT jsonb_path_query(to_jsonb(c), '$.ssn') FROM customers c",
            "SELECT jsonb_each_text(to_jsonb(c)) FROM customers c",
            "SELECT json_agg(ssn) FROM customers",
            "SELECT jsonb_agg(reverse(card)) FROM customers",
            "SELECT json_object_agg(id, ssn) FROM customers",
            "SELECT xmlelement(name s, ssn) FROM customers",
            "SELECT xmlelement(name s, reverse(ssn)) FROM customers",
            "SELECT xmlforest(ssn, card, email) FROM customers",
            "SELECT xpath('/a/text()', xmlelement(name a, card)) FROM customers",
        ],
    ),
    (
        "dynamic",
        &[
            "SELECT query_to_xml('SELECT ssn FROM customers', true, false, '')",
            "SELECT query_to_xml('SELECT reverse(card) AS r FROM customers', true, false, '')",
            "SELECT table_to_xml('customers', true, false, '')",
            "DO $$ BEGIN RAISE NOTICE '%', (SELECT string_agg(reverse(ssn), ',') FROM customers); END $$",
            "PREPARE p AS SELECT reverse(ssn) FROM customers\nEXECUTE p",
            "SELECT set_config('my.v', (SELECT ssn FROM customers WHERE id = 1), false)\nSELECT reverse(current_setting('my.v'))",
            "SELECT reverse(ssn) INTO TEMP leak FROM customers\nSELECT * FROM leak",
        ],
    ),
    (
        "aggregate/window",
        &[
            "SELECT min(ssn) FROM customers",
            "SELECT max(card) FROM customers",
            "SELECT max(reverse(ssn)) FROM customers",
            "SELECT string_agg(ssn, ',') FROM customers",
            "SELECT string_agg(reverse(ssn), ',' ORDER BY id) FROM customers",
            "SELECT array_agg(ssn) FROM customers",
            "SELECT mode() WITHIN GROUP (ORDER BY ssn) FROM customers",
            "SELECT string_agg(substr(ssn, n, 1), '' ORDER BY n) FROM customers, generate_series(1, 11) n GROUP BY id ORDER BY id",
            "SELECT sum(replace(ssn, '-', '')::bigint) FROM customers WHERE id = 1",
            "SELECT first_value(ssn) OVER (ORDER BY id) FROM customers",
            "SELECT lag(ssn) OVER (ORDER BY id) FROM customers",
            "SELECT lead(card) OVER (ORDER BY id) FROM customers",
            "SELECT nth_value(email, 2) OVER (ORDER BY id) FROM customers",
            "SELECT last_value(reverse(ssn)) OVER (ORDER BY id) FROM customers",
            "SELECT id, string_agg(ssn, '') OVER (ORDER BY id) FROM customers",
        ],
    ),
    (
        "subquery/cte",
        &[
            "SELECT (SELECT ssn FROM customers WHERE id = 1)",
            "SELECT (SELECT reverse(ssn) FROM customers c2 WHERE c2.id = c.id) FROM customers c",
            "SELECT id, (SELECT upper(email) FROM customers c2 WHERE c2.id = c.id) FROM customers c",
            "SELECT ARRAY(SELECT ssn FROM customers)",
            "SELECT s FROM (SELECT ssn AS s FROM customers) t",
            "SELECT r FROM (SELECT reverse(ssn) AS r FROM customers) t",
            "SELECT reverse(r) FROM (SELECT reverse(ssn) AS r FROM customers) t",
            "SELECT * FROM (SELECT id, ssn, card, email FROM customers) t",
            "WITH t AS (SELECT ssn FROM customers) SELECT * FROM t",
            "WITH t AS (SELECT reverse(ssn) AS r FROM customers) SELECT r FROM t",
            "WITH t AS MATERIALIZED (SELECT email AS e FROM customers) SELECT upper(e) FROM t",
            "WITH RECURSIVE r(id, pos, ch) AS (SELECT id, 1, substr(ssn, 1, 1) FROM customers UNION ALL SELECT r.id, pos + 1, substr(c.ssn, pos + 1, 1) FROM r JOIN customers c ON c.id = r.id WHERE pos < 11) SELECT ch FROM r ORDER BY id, pos",
            "WITH RECURSIVE r(id, pos, ch) AS (SELECT id, 1, substr(ssn, 1, 1) FROM customers UNION ALL SELECT r.id, pos + 1, substr(c.ssn, pos + 1, 1) FROM r JOIN customers c ON c.id = r.id WHERE pos < 11) SELECT string_agg(ch, '' ORDER BY pos) FROM r GROUP BY id",
            "WITH RECURSIVE s(n, acc) AS (SELECT 1, ''::text UNION ALL SELECT n + 1, acc || (SELECT substr(ssn, n, 1) FROM customers WHERE id = 1) FROM s WHERE n <= 11) SELECT acc FROM s ORDER BY n DESC LIMIT 1",
        ],
    ),
    (
        "set op/lateral",
        &[
            "SELECT ssn FROM customers UNION SELECT 'x'",
            "SELECT 'x' UNION ALL SELECT ssn FROM customers",
            "SELECT reverse(ssn) FROM customers UNION ALL SELECT name FROM customers",
            "SELECT name FROM customers UNION ALL SELECT email FROM customers",
            "SELECT name FROM customers WHERE id = 0 UNION ALL SELECT reverse(card) FROM customers",
            "SELECT id::text FROM customers UNION ALL SELECT replace(ssn, '-', '') FROM customers",
            "SELECT card FROM customers EXCEPT SELECT 'x'",
            "SELECT l.x FROM customers c, LATERAL (SELECT c.ssn AS x) l",
            "SELECT l.* FROM customers c CROSS JOIN LATERAL (SELECT reverse(c.card)) l",
            "SELECT t.ch FROM customers c, LATERAL unnest(string_to_array(c.ssn, NULL)) t(ch)",
            "SELECT l.e FROM customers c JOIN LATERAL (SELECT upper(c.email) AS e) l ON true",
            "SELECT v FROM customers c, LATERAL (VALUES (c.ssn), (c.card)) t(v)",
        ],
    ),
    (
        "conditional",
        &[
            "SELECT CASE WHEN id > 0 THEN ssn END FROM customers",
            "SELECT CASE WHEN true THEN reverse(ssn) ELSE '' END FROM customers",
            "SELECT CASE id WHEN 1 THEN card ELSE email END FROM customers",
            "SELECT COALESCE(ssn, 'x') FROM customers",
            "SELECT COALESCE(reverse(email), '') FROM customers",
            "SELECT GREATEST(ssn, '0') FROM customers",
            "SELECT LEAST(email, 'zzz') FROM customers",
        ],
    ),
    (
        "whole row/view",
        &[
            "SELECT c FROM customers c",
            "SELECT c::text FROM customers c",
            "SELECT (c).* FROM customers c",
            "SELECT ROW(ssn, card) FROM customers",
            "SELECT reverse(c::text) FROM customers c",
            "SELECT upper(c::text) FROM customers c",
            "SELECT array_agg(c) FROM customers c",
            "SELECT r FROM v_leak",
            "SELECT s FROM v_leak",
            "SELECT * FROM v_leak",
            "SELECT reverse(r) FROM v_leak",
            "SELECT upper(s) FROM v_leak",
        ],
    ),
    (
        "copy/cursor",
        &[
            "COPY (SELECT reverse(ssn) FROM customers) TO STDOUT",
            "COPY (SELECT ssn FROM customers) TO STDOUT",
            "COPY (SELECT md5(card) FROM customers) TO STDOUT",
            "COPY (SELECT upper(email), replace(ssn, '-', '') FROM customers) TO STDOUT",
            "COPY (SELECT * FROM v_leak) TO STDOUT",
            "BEGIN\nDECLARE k CURSOR FOR SELECT reverse(ssn) FROM customers\nFETCH ALL FROM k\nCOMMIT",
            "BEGIN\nDECLARE k CURSOR FOR SELECT encode(card::bytea, 'base64') FROM customers\nFETCH 5 FROM k\nFETCH ALL FROM k\nCOMMIT",
            "DECLARE k CURSOR WITH HOLD FOR SELECT md5(email) FROM customers\nFETCH ALL FROM k\nCLOSE k",
            "BEGIN\nDECLARE k SCROLL CURSOR FOR SELECT split_part(ssn, '-', 1), split_part(ssn, '-', 2), split_part(ssn, '-', 3) FROM customers\nFETCH ALL FROM k\nFETCH PRIOR FROM k\nCOMMIT",
        ],
    ),
    (
        "pieces",
        &[
            "SELECT substr(ssn, 1, 3), substr(ssn, 5, 2), substr(ssn, 8, 4) FROM customers",
            "SELECT id, substr(card, 1, 8), substr(card, 9, 8) FROM customers",
            "SELECT split_part(ssn, '-', 1), split_part(ssn, '-', 2), split_part(ssn, '-', 3) FROM customers",
            "SELECT left(ssn, 6), right(ssn, 5) FROM customers",
            "SELECT left(card, 4), substr(card, 5, 4), substr(card, 9, 4), right(card, 4) FROM customers",
            "SELECT substr(ssn, 1, 3) FROM customers WHERE id = 1 UNION ALL SELECT substr(ssn, 5, 2) FROM customers WHERE id = 1 UNION ALL SELECT substr(ssn, 8, 4) FROM customers WHERE id = 1",
            "SELECT substr(ssn, n, 1) FROM customers, generate_series(1, 11) n WHERE id = 1 ORDER BY n",
            "SELECT substr(card, n, 1) FROM customers, generate_series(1, 16) n ORDER BY id, n",
            "SELECT n, substr(email, n, 1) FROM customers, generate_series(1, 5) n WHERE id = 1 ORDER BY n",
            "SELECT substr(reverse(ssn), n, 2) FROM customers, generate_series(1, 11, 2) n WHERE id = 1 ORDER BY n",
            "SELECT get_byte(ssn::bytea, n) FROM customers, generate_series(0, 10) n WHERE id = 1 ORDER BY n",
            "SELECT substr(replace(ssn, '-', ''), 1, 5)::int, substr(replace(ssn, '-', ''), 6)::int FROM customers",
        ],
    ),
    (
        "error",
        &[
            "SELECT ssn::int FROM customers",
            "SELECT ssn::date FROM customers",
            "SELECT reverse(ssn)::numeric FROM customers",
            "SELECT email::int FROM customers",
        ],
    ),
];

/// Searches on protected columns: the match (ids, counts, order) is the leak,
/// so the gateway must refuse these.
const SEARCHES: &[&str] = &[
    "SELECT id FROM customers WHERE ssn LIKE '1%'",
    "SELECT count(*) FROM customers WHERE ssn > '5'",
    "SELECT id FROM customers ORDER BY ssn",
    "SELECT count(*) FROM customers GROUP BY ssn",
    "SELECT id FROM customers WHERE substr(ssn, 1, 1) = '1'",
    "SELECT id FROM customers WHERE position('1' in ssn) > 0",
    "SELECT id FROM customers WHERE strpos(email, '1') > 0",
    "SELECT id FROM customers WHERE ssn ~ '^1'",
    "SELECT id FROM customers WHERE ssn ILIKE '%01'",
    "SELECT id FROM customers WHERE left(card, 1) = '4'",
    "SELECT id FROM customers WHERE email LIKE 'user1%'",
    "SELECT id FROM customers WHERE length(ssn) = 11",
    "SELECT id FROM customers WHERE ssn BETWEEN '100' AND '200'",
    "SELECT id FROM customers ORDER BY reverse(ssn) LIMIT 1",
    "SELECT id FROM customers WHERE ascii(ssn) = 49",
    "SELECT id FROM customers WHERE md5(ssn) LIKE 'a%'",
    "SELECT id FROM customers c WHERE EXISTS (SELECT 1 FROM customers d WHERE d.id = c.id AND d.ssn LIKE '1%')",
];

/// Through psycopg's extended protocol, prepared (`prepare=True`), each in text
/// and in binary results. `%s` is bound to 0.
const PSYCOPG_LEAKS: &[&str] = &[
    "SELECT reverse(ssn) FROM customers WHERE id > %s",
    "SELECT ssn::bytea FROM customers WHERE id > %s",
    "SELECT encode(card::bytea, 'base64') FROM customers WHERE id > %s",
    "SELECT md5(email) FROM customers WHERE id > %s",
    "SELECT sha256(ssn::bytea) FROM customers WHERE id > %s",
    "SELECT convert_to(email, 'UTF8') FROM customers WHERE id > %s",
    "SELECT card::numeric FROM customers WHERE id > %s",
    "SELECT card::numeric::float8 FROM customers WHERE id > %s",
    "SELECT replace(ssn, '-', '')::bigint FROM customers WHERE id > %s",
    "SELECT row_to_json(c) FROM customers c WHERE id > %s",
    "SELECT to_jsonb(c) FROM customers c WHERE id > %s",
    "SELECT string_to_array(ssn, '-') FROM customers WHERE id > %s",
    "SELECT ARRAY[ssn, card] FROM customers WHERE id > %s",
    "SELECT substr(ssn, 1, 3), substr(ssn, 5, 2), substr(ssn, 8, 4) FROM customers WHERE id > %s",
    "SELECT xmlforest(ssn, email) FROM customers WHERE id > %s",
];

/// Runs `[[sql, params, binary], ...]` (argv[2], JSON) prepared through psycopg;
/// prints per attempt `{"rows": [[cell, ...], ...]}` or `{"error": "SQLSTATE message"}`
/// (`"client: ..."` when psycopg cannot decode a value).
const PSYCOPG_RUNNER: &str = r#"
import json, sys, psycopg
def cell(v):
    return bytes(v).hex() if isinstance(v, (bytes, bytearray, memoryview)) else str(v)
conn, out = None, []
for sql, params, binary in json.loads(sys.argv[2]):
    try:
        if conn is None or conn.broken or conn.closed:
            conn = psycopg.connect(sys.argv[1], autocommit=True)
        cur = conn.cursor(binary=binary)
        cur.execute(sql, params, prepare=True)
        out.append({"rows": [[cell(v) for v in r] for r in cur.fetchall()]})
    except psycopg.Error as e:
        out.append({"error": "%s %s" % (e.sqlstate, e)})
    except Exception as e:  # a value the client cannot decode
        out.append({"error": "client: %s %s" % (type(e).__name__, e)})
print(json.dumps(out))
"#;

/// Like the L7 policy of `postgres.rs` (reads and transactions for `demo`, DDL
/// denied) but with no function deny list: masking alone must hold.
fn policy(ssn_rule_extra: &str) -> String {
    format!(
        r#"
[defaults]
unknown_destination = "deny"

[[resource]]
name = "pg"
protocol = "postgres"
addresses = ["127.0.0.1:5432", "[::1]:5432"]
default_action = "deny"

[[rule]]
name = "demo-reads"
identities = ["demo"]
resources = ["pg"]
action = "allow"
match = {{ sql = ["read", "transaction"] }}

[[rule]]
name = "no-ddl-or-admin"
identities = ["demo"]
resources = ["pg"]
action = "deny"
match = {{ sql = ["ddl", "dcl", "admin", "unknown"] }}

[masking]
detectors = ["all"]

[[masking.column]]
columns = ["customers.ssn"]
strategy = "keep_last4"
{ssn_rule_extra}

[[masking.column]]
columns = ["customers.card"]
strategy = "keep_last4"

[[masking.column]]
columns = ["customers.email"]
strategy = "redact"
"#
    )
}

/// A daemon with [`policy`], a server with 10 customers and the view `v_leak`.
fn masking_env(name: &str, ssn_rule_extra: &str) -> (Env, PgServer) {
    let opts = DaemonOptions {
        policies: vec![("pg.toml".into(), policy(ssn_rule_extra))],
        ..DaemonOptions::default()
    };
    let env = Env::new(name, opts).unwrap();
    let pg = PgServer::start(&env.netns, 5432, false).unwrap();
    pg.seed_customers(10).unwrap();
    pg.admin_sql("CREATE VIEW v_leak AS SELECT id, reverse(ssn) AS r, ssn AS s FROM customers")
        .unwrap();
    (env, pg)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// psql flags: unaligned, cells split by 0x1f and rows by 0x1e (values may hold
/// `|` and line breaks), stop at the first error, SQLSTATE in messages; each
/// line of `sql` is one `-c`.
fn psql_args(sql: &str) -> Vec<&str> {
    let mut a = vec!["-qAt", "-F", "\u{1f}", "-R", "\u{1e}"];
    a.extend(["-v", "ON_ERROR_STOP=1", "-v", "VERBOSITY=verbose"]);
    for stmt in sql.lines() {
        a.extend(["-c", stmt]);
    }
    a
}

/// psql through the gateway, tagged as `demo`.
fn agent_psql(env: &Env, url: &str, args: &[&str]) -> std::process::Output {
    let mut a = vec![PSQL, url];
    a.extend_from_slice(args);
    env.exec("demo", &a).output().unwrap()
}

/// One attempt through the gateway: success, rows, error text.
fn attempt(env: &Env, url: &str, sql: &str) -> (bool, Vec<Vec<String>>, String) {
    let out = agent_psql(env, url, &psql_args(sql));
    let rows = psql_rows(&text(&out.stdout));
    (out.status.success(), rows, text(&out.stderr))
}

/// psql as the superuser over the server's unix socket, not through the gateway.
fn direct_psql(pg: &PgServer, args: &[&str]) -> std::process::Output {
    Command::new("runuser")
        .args(["-u", "postgres", "--", &format!("{PG_BIN}/psql"), "-h"])
        .arg(&pg.dir)
        .args([
            "-p",
            &pg.port.to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
        ])
        .args(args)
        .env("PGPASSWORD", PASSWORD)
        .output()
        .unwrap()
}

/// Runs [`PSYCOPG_RUNNER`] as `demo`; one JSON value per attempt.
fn psycopg(env: &Env, url: &str, attempts: &[serde_json::Value]) -> Vec<serde_json::Value> {
    let json = serde_json::json!(attempts).to_string();
    let args = ["python3", "-c", PSYCOPG_RUNNER, url, &json];
    let out = env.exec("demo", &args).output().unwrap();
    assert!(
        out.status.success(),
        "psycopg runner: {}",
        text(&out.stderr)
    );
    let so = text(&out.stdout);
    let answers: Vec<_> = serde_json::from_str(so.lines().last().unwrap_or_default()).unwrap();
    assert_eq!(answers.len(), attempts.len());
    answers
}

/// psql output as rows of cells (`COPY` output: tabs and line breaks).
fn psql_rows(stdout: &str) -> Vec<Vec<String>> {
    stdout
        .split(['\u{1e}', '\n'])
        .filter(|r| !r.is_empty())
        .map(|r| r.split(['\u{1f}', '\t']).map(str::to_owned).collect())
        .collect()
}

fn json_rows(v: &serde_json::Value) -> Vec<Vec<String>> {
    serde_json::from_value(v["rows"].clone()).unwrap_or_default()
}

/// What the gateway did with an attempt.
enum Outcome {
    /// By the rule named.
    Refused(String),
    Masked,
    /// Any other error (server, connection, client decoding), with no
    /// protected value in its message.
    Error(String),
    Leaked(String),
}

fn judge(checker: &Checker, rows: &[Vec<String>], ok: bool, err: &str) -> Outcome {
    if let Some(leak) = checker.find_leak(rows, err) {
        Outcome::Leaked(leak)
    } else if ok {
        Outcome::Masked
    } else if refused(err) {
        // "denied by policy rule \"R\"" or "denied by masking rule \"R\""
        let rule = err
            .split("rule \"")
            .nth(1)
            .and_then(|r| r.split('"').next());
        Outcome::Refused(rule.unwrap_or("?").to_owned())
    } else {
        let mut lines = err.lines().filter(|l| !l.starts_with("agentgate: warning"));
        Outcome::Error(lines.next().unwrap_or("no message").to_owned())
    }
}

/// The gateway's refusal: `42501` from agentgate (not the exec warning).
fn refused(err: &str) -> bool {
    err.lines()
        .any(|l| l.contains("42501") && l.contains("agentgate:"))
}

#[test]
fn re_encoded_protected_values_never_leave_the_gateway() {
    let (env, pg) = masking_env("pglineage", "");
    let url = pg.url("127.0.0.1", "postgres", "postgres");
    let checker = Checker::new(&pg);

    // (label, family, outcome, shown directly by the server in a form the checker finds)
    let mut results: Vec<(String, &str, Outcome, bool)> = Vec::new();
    let searches = SEARCHES.iter().map(|s| ("search", *s));
    let leaks = LEAKS
        .iter()
        .flat_map(|(f, sqls)| sqls.iter().map(move |s| (*f, *s)));
    for (family, sql) in leaks.chain(searches) {
        let direct = direct_psql(&pg, &psql_args(sql));
        assert_eq!(
            direct.status.success(),
            family != "error",
            "the attempt itself must be valid SQL (and `error` ones fail): {sql}"
        );
        let shown = checker
            .find_leak(&psql_rows(&text(&direct.stdout)), &text(&direct.stderr))
            .is_some();
        let (ok, rows, err) = attempt(&env, &url, sql);
        let outcome = judge(&checker, &rows, ok, &err);
        results.push((sql.replace('\n', "; "), family, outcome, shown));
    }
    let attempts: Vec<_> = PSYCOPG_LEAKS
        .iter()
        .flat_map(|s| [false, true].map(|b| serde_json::json!([s, [0], b])))
        .collect();
    let answers = psycopg(&env, &url, &attempts);
    for (a, r) in attempts.iter().zip(&answers) {
        let err = r["error"].as_str().unwrap_or_default();
        let outcome = judge(&checker, &json_rows(r), r.get("rows").is_some(), err);
        let family = ["psycopg text", "psycopg binary"][usize::from(a[2] == true)];
        results.push((a[0].as_str().unwrap().to_owned(), family, outcome, false));
    }

    let (mut table, mut failures) = (String::new(), Vec::new());
    let (mut refused, mut masked, mut shown) = (0, 0, 0);
    for (i, (sql, family, outcome, direct_shown)) in results.iter().enumerate() {
        shown += usize::from(*direct_shown);
        let (verdict, ok) = match outcome {
            Outcome::Refused(rule) => (format!("refused ({rule})"), true),
            Outcome::Masked if *family == "search" => ("ANSWERED, not refused".to_owned(), false),
            Outcome::Masked => ("masked".to_owned(), true),
            Outcome::Error(e) if *family == "error" => (format!("error: {e}"), true),
            Outcome::Error(e) => (format!("ERROR, not the gateway's 42501: {e}"), false),
            Outcome::Leaked(what) => (format!("LEAKED {what}"), false),
        };
        match outcome {
            Outcome::Refused(_) if ok => refused += 1,
            Outcome::Masked if ok => masked += 1,
            _ => {}
        }
        if !ok {
            failures.push(format!("#{i} [{family}] {sql}: {verdict}"));
        }
        let _ = writeln!(table, "{i:>3} {family:<15} {verdict:<10} {sql}");
    }
    println!("{table}");
    println!(
        "{} attempts: {refused} refused, {masked} masked, {} failed; {shown} show a value directly",
        results.len(),
        failures.len()
    );
    // The checker can fail: run directly against the server, most attempts
    // show a protected value in a form it finds.
    assert!(
        shown >= 150,
        "only {shown} attempts are caught when run directly"
    );
    assert!(
        failures.is_empty(),
        "{} of {} attempts got a protected value out or were not refused by the gateway:\n{}",
        failures.len(),
        results.len(),
        failures.join("\n")
    );
}

/// Ordinary queries: the gateway answers exactly what the server answers, with
/// the output columns named `ssn` and `card` kept to their last 4 and `email`
/// redacted. `{ssnN}`, `{emailN}` and `{card}` stand for customer N's values.
const UTILITY: &[&str] = &[
    "SELECT count(*) FROM customers",
    "SELECT id, name, balance FROM customers ORDER BY id",
    "SELECT id, name FROM customers WHERE balance > 50 ORDER BY balance DESC",
    "SELECT name FROM customers ORDER BY name LIMIT 3",
    "SELECT sum(balance), avg(balance), min(id), max(id) FROM customers",
    "SELECT a.id, b.name FROM customers a JOIN customers b ON b.id = a.id + 1 ORDER BY a.id",
    "SELECT count(*) FROM customers a JOIN customers b USING (id)",
    "SELECT id % 3 AS g, count(*), sum(balance) FROM customers GROUP BY 1 ORDER BY 1",
    "SELECT upper(name), length(name) FROM customers WHERE id <= 3 ORDER BY id",
    "SELECT id, name, balance FROM customers WHERE name LIKE 'Customer 1%' ORDER BY id",
    "SELECT count(*) FILTER (WHERE balance > 20), count(*) FROM customers",
    "SELECT id, name FROM customers ORDER BY balance DESC, id LIMIT 5",
    "WITH t AS (SELECT id, balance FROM customers) SELECT max(balance) FROM t",
    "SELECT 1 + 1, current_user",
    "SELECT * FROM customers ORDER BY id",
    "SELECT ssn, card, email FROM customers WHERE id = 1",
    "SELECT id, card FROM customers WHERE id BETWEEN 3 AND 5 ORDER BY id",
    "SELECT id, email FROM customers WHERE id IN (2, 4) ORDER BY id",
    "SELECT c.id, c.ssn, d.name FROM customers c JOIN customers d ON d.id = c.id WHERE c.id < 4",
    "SELECT id, ssn FROM customers WHERE ssn = '{ssn3}'",
    "SELECT id FROM customers WHERE ssn IN ('{ssn2}', '{ssn5}') ORDER BY id",
    "SELECT id, name FROM customers WHERE email = '{email4}'",
    "SELECT count(*) FROM customers WHERE card = '{card}'",
];

/// The same through psycopg (prepared, text and binary results), values bound
/// as parameters.
const UTILITY_PSYCOPG: &[&str] = &[
    "SELECT id, name FROM customers WHERE ssn = %(ssn3)s",
    "SELECT count(*) FROM customers WHERE ssn IN (%(ssn1)s, %(ssn2)s)",
    "SELECT id, ssn, card, email, balance FROM customers WHERE id = %(id)s",
];

/// What the gateway shows for value `v` of output column `name` (see
/// `mask::strategy`): `keep_last4` stars the letters and digits before the last
/// four (all of them if fewer than 8).
fn mask(name: &str, v: &str) -> String {
    match name {
        "email" => "[REDACTED]".into(),
        "ssn" | "card" => {
            let keep = if v.chars().filter(char::is_ascii_alphanumeric).count() >= 8 {
                4
            } else {
                0
            };
            let mut seen = 0;
            let starred: String = v
                .chars()
                .rev()
                .map(|c| {
                    seen += usize::from(c.is_ascii_alphanumeric());
                    if c.is_ascii_alphanumeric() && seen > keep {
                        '*'
                    } else {
                        c
                    }
                })
                .collect();
            starred.chars().rev().collect()
        }
        _ => v.into(),
    }
}

/// The server's answer to `sql`, run directly, with its protected columns masked.
fn expected(pg: &PgServer, sql: &str) -> Vec<Vec<String>> {
    let out = direct_psql(
        pg,
        &[
            "-qA",
            "-P",
            "footer=off",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ],
    );
    assert!(out.status.success(), "valid SQL: {}", text(&out.stderr));
    let so = text(&out.stdout);
    let mut lines = so.lines().map(|l| l.split('|').collect::<Vec<_>>());
    let names = lines.next().unwrap_or_default();
    let rows: Vec<Vec<String>> = lines
        .map(|r| names.iter().zip(r).map(|(n, v)| mask(n, v)).collect())
        .collect();
    assert!(!rows.is_empty(), "returns rows");
    rows
}

#[test]
fn ordinary_queries_answer_like_the_server_with_protected_columns_masked() {
    let (env, pg) = masking_env("pgutility", "");
    let url = pg.url("127.0.0.1", "postgres", "postgres");
    let checker = Checker::new(&pg);
    let mut values = serde_json::json!({"card": "4111111111111111", "id": "2"});
    for (col, n) in [("ssn", 1), ("ssn", 2), ("ssn", 3), ("ssn", 5), ("email", 4)] {
        let v = pg.admin_sql(&format!("SELECT {col} FROM customers WHERE id = {n}"));
        values[format!("{col}{n}")] = v.unwrap().trim().into();
    }
    let fill = |sql: &str, wrap: fn(&str) -> String| {
        let map = values.as_object().unwrap();
        map.iter().fold(sql.to_owned(), |s, (k, v)| {
            s.replace(&wrap(k), &format!("'{}'", v.as_str().unwrap()))
        })
    };

    for sql in UTILITY {
        let literal = fill(sql, |k| format!("'{{{k}}}'"));
        let want = expected(&pg, &literal);
        let out = agent_psql(
            &env,
            &url,
            &["-qAt", "-v", "ON_ERROR_STOP=1", "-c", &literal],
        );
        let so = text(&out.stdout);
        let got: Vec<Vec<String>> = so
            .lines()
            .map(|l| l.split('|').map(Into::into).collect())
            .collect();
        let leak = checker.find_leak(&got, "");
        assert!(leak.is_none(), "{sql}: {leak:?}");
        assert!(out.status.success(), "{sql}: {}", text(&out.stderr));
        assert!(got == want, "{sql}: {so}");
    }
    let out = agent_psql(&env, &url, &["-qAt", "-c", UTILITY[15]]);
    assert_eq!(
        text(&out.stdout).trim(),
        "***-**-1001|************1111|[REDACTED]"
    );

    let attempts: Vec<_> = UTILITY_PSYCOPG
        .iter()
        .flat_map(|s| [false, true].map(|b| serde_json::json!([s, values, b])))
        .collect();
    let answers = psycopg(&env, &url, &attempts);
    for (a, r) in attempts.iter().zip(&answers) {
        let sql = a[0].as_str().unwrap();
        let want = expected(&pg, &fill(sql, |k| format!("%({k})s")));
        let got = json_rows(r);
        assert!(checker.find_leak(&got, "").is_none(), "psycopg {sql}");
        assert!(got == want, "psycopg {sql}: {r}");
    }
}

/// `derived = "deny"` on a column rule: reading the column is masked as usual,
/// any value computed from it is refused with `42501` naming the column.
#[test]
fn derived_deny_refuses_values_computed_from_the_column() {
    let (env, pg) = masking_env("pgderived", "derived = \"deny\"");
    let url = pg.url("127.0.0.1", "postgres", "postgres");
    let checker = Checker::new(&pg);
    for sql in [
        "SELECT reverse(ssn) FROM customers",
        "SELECT md5(ssn) FROM customers",
        "SELECT upper(ssn) FROM customers",
        "SELECT substr(ssn, 1, 3), substr(ssn, 5, 2), substr(ssn, 8, 4) FROM customers",
        "SELECT json_build_object('s', ssn) FROM customers",
        "SELECT r FROM v_leak",
    ] {
        let (ok, rows, err) = attempt(&env, &url, sql);
        assert!(checker.find_leak(&rows, &err).is_none(), "{sql}");
        assert!(!ok, "{sql} is refused");
        assert!(refused(&err), "{sql}: {err}");
        assert!(
            err.contains("ssn"),
            "{sql}: the refusal names the column: {err}"
        );
    }
    let out = agent_psql(
        &env,
        &url,
        &["-qAt", "-c", "SELECT ssn, card FROM customers WHERE id = 1"],
    );
    assert_eq!(text(&out.stdout).trim(), "***-**-1001|************1111");
    // Other columns keep the default, `derived = "redact"`.
    let (ok, rows, err) = attempt(
        &env,
        &url,
        "SELECT reverse(card), upper(email) FROM customers",
    );
    assert!(ok, "{err}");
    assert!(checker.find_leak(&rows, "").is_none());
}

/// Each result's record names, per protected output column, how its lineage
/// was decided; a refusal names the rule and the column; no record holds a
/// protected value.
#[test]
fn lineage_decisions_are_recorded_without_values() {
    let (env, pg) = masking_env("pglinrec", "");
    let url = pg.url("127.0.0.1", "postgres", "postgres");
    let checker = Checker::new(&pg);
    let (ok, rows, err) = attempt(
        &env,
        &url,
        "SELECT id, reverse(ssn) AS r, coalesce(email, '') AS e, ssn AS x, \
         row_to_json(c) AS j FROM customers c WHERE id = 1",
    );
    assert!(ok, "{err}");
    // Values as each decision says; the JSON keeps its shape, fields masked.
    assert_eq!(
        rows[0][..4],
        ["1", "[REDACTED]", "[REDACTED]", "***-**-1001"].map(String::from)
    );
    let j: serde_json::Value = serde_json::from_str(&rows[0][4]).expect("still JSON");
    assert_eq!(j["id"], 1);
    assert_eq!(j["name"], "Customer 1");
    assert_eq!(j["ssn"], "***-**-1001");
    assert_eq!(j["card"], "************1111");
    assert_eq!(j["email"], "[REDACTED]");
    let (ok, _, err) = attempt(&env, &url, "SELECT id FROM customers WHERE ssn LIKE '1%'");
    assert!(!ok && refused(&err), "{err}");

    let recs = env.audit_records().unwrap();
    let lineage = recs
        .iter()
        .find_map(|r| r["transform"]["masking"]["lineage"].as_array().cloned())
        .expect("a result record with lineage decisions");
    let decided: Vec<(String, String)> = lineage
        .iter()
        .map(|d| {
            (
                d["column"].as_str().unwrap().to_owned(),
                d["lineage"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let want = [
        ("r", "derived-redacted"),
        ("e", "preserved"),
        ("x", "direct"),
        ("j", "json-fields-masked"),
    ];
    assert_eq!(
        decided,
        want.map(|(c, l)| (c.to_owned(), l.to_owned())).to_vec(),
        "id is not protected and not listed"
    );
    let refusal = recs
        .iter()
        .find(|r| r["decision"]["verdict"] == "deny")
        .expect("the refused search is recorded");
    assert_eq!(refusal["decision"]["rule"], "masking.column customers.ssn");
    assert!(
        refusal["decision"]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("LIKE") && r.contains("customers.ssn")),
        "{refusal}"
    );
    let all: Vec<Vec<String>> = recs.iter().map(|r| vec![r.to_string()]).collect();
    assert!(
        checker.find_leak(&all, "").is_none(),
        "no record holds a value"
    );
}
