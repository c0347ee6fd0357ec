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
    pg::{PASSWORD, PG_BIN, PgServer},
};

const PSQL: &str = "/usr/lib/postgresql/15/bin/psql";

/// Attempts to get a protected value out, by kind of transform. A line break
/// separates the statements of one attempt (run in one session).
const LEAKS: &[(&str, &[&str])] = &[
    (
        "case",
        &[
            "SELECT upper(ssn) FROM customers",
            "SELECT lower(email) FROM customers",
            "SELECT upper(email) FROM customers",
            "SELECT initcap(email) FROM customers",
            "SELECT lower(upper(card)) FROM customers",
        ],
    ),
    (
        "reverse",
        &[
            "SELECT reverse(ssn) FROM customers",
            "SELECT reverse(card) FROM customers",
            "SELECT reverse(email) FROM customers",
            "SELECT reverse(reverse(ssn)) FROM customers",
        ],
    ),
    (
        "replace",
        &[
            "SELECT replace(ssn, '-', '') FROM customers",
            "SELECT replace(ssn, '-', ' ') FROM customers",
            "SELECT replace(email, '@', ' at ') FROM customers",
            "SELECT translate(ssn, '-', '') FROM customers",
            "SELECT translate(ssn, '-', '/') FROM customers",
            "SELECT translate(email, '@.', '  ') FROM customers",
            "SELECT overlay(ssn placing '' from 4 for 1) FROM customers",
            "SELECT overlay(card placing 'x' from 1 for 0) FROM customers",
            "SELECT regexp_replace(ssn, '-', '', 'g') FROM customers",
            "SELECT regexp_replace(ssn, '(\\d+)-(\\d+)-(\\d+)', '\\1/\\2/\\3') FROM customers",
        ],
    ),
    (
        "pad/trim",
        &[
            "SELECT lpad(ssn, 20, '#') FROM customers",
            "SELECT rpad(card, 30, '0') FROM customers",
            "SELECT trim(ssn) FROM customers",
            "SELECT btrim(' ' || ssn || ' ') FROM customers",
            "SELECT ltrim(' ' || card) FROM customers",
            "SELECT repeat(ssn, 2) FROM customers",
        ],
    ),
    (
        "concat",
        &[
            "SELECT concat(ssn, '') FROM customers",
            "SELECT concat('x', ssn, 'y') FROM customers",
            "SELECT concat_ws(',', ssn, card, email) FROM customers",
            "SELECT ssn || '' FROM customers",
            "SELECT 'ssn=' || ssn FROM customers",
            "SELECT textcat(card, '') FROM customers",
        ],
    ),
    (
        "format",
        &[
            "SELECT format('%s', ssn) FROM customers",
            "SELECT format('%I', email) FROM customers",
            "SELECT format('%L', card) FROM customers",
        ],
    ),
    (
        "quote",
        &[
            "SELECT quote_literal(ssn) FROM customers",
            "SELECT quote_ident(email) FROM customers",
            "SELECT quote_nullable(card) FROM customers",
        ],
    ),
    (
        "substring",
        &[
            "SELECT left(ssn, 100) FROM customers",
            "SELECT right(card, 16) FROM customers",
            "SELECT substr(ssn, 1) FROM customers",
            "SELECT substring(ssn, 1, 11) FROM customers",
            "SELECT substring(ssn from '\\d+-\\d+-\\d+') FROM customers",
            "SELECT substring(email from 1 for 5) FROM customers",
            "SELECT split_part(email, '@', 1) FROM customers",
        ],
    ),
    (
        "regexp",
        &[
            "SELECT regexp_matches(ssn, '\\d+', 'g') FROM customers",
            "SELECT regexp_split_to_array(ssn, '-') FROM customers",
            "SELECT regexp_split_to_table(ssn, '-') FROM customers",
        ],
    ),
    (
        "array",
        &[
            "SELECT string_to_array(ssn, '-') FROM customers",
            "SELECT string_to_array(card, NULL) FROM customers",
            "SELECT unnest(string_to_array(ssn, '-')) FROM customers",
            "SELECT ARRAY[ssn] FROM customers",
            "SELECT ARRAY[ssn, card, email] FROM customers",
            "SELECT array_to_string(ARRAY[ssn], ',') FROM customers",
        ],
    ),
    (
        "ascii",
        &[
            "SELECT to_hex(ascii(substr(ssn, n, 1))) FROM customers, generate_series(1, 11) n ORDER BY id, n",
            "SELECT ascii(substr(ssn, n, 1)) FROM customers, generate_series(1, 11) n ORDER BY id, n",
            "SELECT chr(ascii(substr(card, n, 1))) FROM customers, generate_series(1, 16) n ORDER BY id, n",
            "SELECT string_agg(chr(ascii(c)), '') FROM customers, regexp_split_to_table(ssn, '') c GROUP BY id",
        ],
    ),
    (
        "collate",
        &[
            "SELECT ssn COLLATE \"C\" FROM customers",
            "SELECT normalize(email) FROM customers",
        ],
    ),
    (
        "cast",
        &[
            "SELECT ssn::bytea FROM customers",
            "SELECT card::bytea FROM customers",
            "SELECT ssn::text FROM customers",
            "SELECT ssn::varchar(3) FROM customers",
            "SELECT ssn::char(20) FROM customers",
            "SELECT ssn::name FROM customers",
            "SELECT ssn::xml FROM customers",
            "SELECT CAST(email AS varchar) FROM customers",
            "SELECT ssn::text::bytea::text FROM customers",
            "SELECT ('\"' || email || '\"')::json FROM customers",
            "SELECT card::numeric FROM customers",
            "SELECT card::bigint + 0 FROM customers",
            "SELECT card::numeric::float8 FROM customers",
            "SELECT replace(ssn, '-', '')::int FROM customers",
            "SELECT to_char(card::numeric, 'FM9999999999999999') FROM customers",
        ],
    ),
    (
        "hash",
        &[
            "SELECT md5(ssn) FROM customers",
            "SELECT md5(card) FROM customers",
            "SELECT md5(email) FROM customers",
            "SELECT sha256(ssn::bytea) FROM customers",
            "SELECT encode(sha256(card::bytea), 'hex') FROM customers",
            "SELECT sha256(convert_to(email, 'UTF8')) FROM customers",
        ],
    ),
    (
        "encode",
        &[
            "SELECT encode(ssn::bytea, 'hex') FROM customers",
            "SELECT encode(ssn::bytea, 'base64') FROM customers",
            "SELECT encode(card::bytea, 'base64') FROM customers",
            "SELECT encode(email::bytea, 'base64') FROM customers",
            "SELECT encode(ssn::bytea, 'escape') FROM customers",
            "SELECT encode(convert_to(ssn, 'UTF8'), 'hex') FROM customers",
            "SELECT convert_to(card, 'LATIN1') FROM customers",
            "SELECT decode(encode(ssn::bytea, 'hex'), 'hex') FROM customers",
            "SELECT decode(card, 'hex') FROM customers",
            "SELECT convert_from(convert_to(email, 'UTF8'), 'UTF8') FROM customers",
            "SELECT translate(encode(ssn::bytea, 'base64'), '+/', '-_') FROM customers",
            "SELECT rtrim(encode(email::bytea, 'base64'), '=') FROM customers",
            "SELECT encode(('x' || ssn)::bytea, 'base64') FROM customers",
            "SELECT encode(('xy' || card)::bytea, 'base64') FROM customers",
            "SELECT encode(row_to_json(c)::text::bytea, 'base64') FROM customers c",
        ],
    ),
    (
        "json",
        &[
            "SELECT row_to_json(c) FROM customers c",
            "SELECT row_to_json(t) FROM (SELECT reverse(ssn) AS r FROM customers) t",
            "SELECT to_json(c) FROM customers c",
            "SELECT to_jsonb(c) FROM customers c",
            "SELECT to_jsonb(c) - 'name' FROM customers c",
            "SELECT to_json(ssn) FROM customers",
            "SELECT json_build_object('s', ssn) FROM customers",
            "SELECT jsonb_build_object('s', reverse(ssn)) FROM customers",
            "SELECT json_build_array(ssn, card) FROM customers",
            "SELECT json_build_object('s', ssn) ->> 's' FROM customers",
            "SELECT to_jsonb(c) ->> 'card' FROM customers c",
            "SELECT jsonb_path_query(to_jsonb(c), '$.ssn') FROM customers c",
            "SELECT jsonb_each_text(to_jsonb(c)) FROM customers c",
            "SELECT json_object(ARRAY['k', ssn]) FROM customers",
            "SELECT json_agg(ssn) FROM customers",
            "SELECT jsonb_agg(reverse(card)) FROM customers",
            "SELECT json_object_agg(id, ssn) FROM customers",
            "SELECT jsonb_object_agg(email, id) FROM customers",
        ],
    ),
    (
        "xml",
        &[
            "SELECT xmlelement(name s, ssn) FROM customers",
            "SELECT xmlelement(name s, reverse(ssn)) FROM customers",
            "SELECT xmlforest(ssn, card, email) FROM customers",
            "SELECT xmlagg(xmlelement(name s, ssn)) FROM customers",
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
        "aggregate",
        &[
            "SELECT min(ssn) FROM customers",
            "SELECT max(card) FROM customers",
            "SELECT max(reverse(ssn)) FROM customers",
            "SELECT string_agg(ssn, ',') FROM customers",
            "SELECT string_agg(reverse(ssn), ',' ORDER BY id) FROM customers",
            "SELECT array_agg(ssn) FROM customers",
            "SELECT array_agg(email ORDER BY id) FROM customers",
            "SELECT mode() WITHIN GROUP (ORDER BY ssn) FROM customers",
            "SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY card) FROM customers",
            "SELECT string_agg(substr(ssn, n, 1), '' ORDER BY n) FROM customers, generate_series(1, 11) n GROUP BY id ORDER BY id",
            "SELECT sum(replace(ssn, '-', '')::bigint) FROM customers WHERE id = 1",
        ],
    ),
    (
        "window",
        &[
            "SELECT first_value(ssn) OVER (ORDER BY id) FROM customers",
            "SELECT lag(ssn) OVER (ORDER BY id) FROM customers",
            "SELECT lead(card) OVER (ORDER BY id) FROM customers",
            "SELECT nth_value(email, 2) OVER (ORDER BY id) FROM customers",
            "SELECT last_value(reverse(ssn)) OVER (ORDER BY id) FROM customers",
            "SELECT id, string_agg(ssn, '') OVER (ORDER BY id) FROM customers",
            "SELECT max(ssn) OVER () FROM customers",
        ],
    ),
    (
        "subquery",
        &[
            "SELECT (SELECT ssn FROM customers WHERE id = 1)",
            "SELECT (SELECT reverse(ssn) FROM customers c2 WHERE c2.id = c.id) FROM customers c",
            "SELECT id, (SELECT upper(email) FROM customers c2 WHERE c2.id = c.id) FROM customers c",
            "SELECT ARRAY(SELECT ssn FROM customers)",
            "SELECT ARRAY(SELECT card FROM customers ORDER BY id)::text",
        ],
    ),
    (
        "derived table",
        &[
            "SELECT s FROM (SELECT ssn AS s FROM customers) t",
            "SELECT r FROM (SELECT reverse(ssn) AS r FROM customers) t",
            "SELECT reverse(r) FROM (SELECT reverse(ssn) AS r FROM customers) t",
            "SELECT x || '' FROM (SELECT card AS x FROM customers) t",
            "SELECT * FROM (SELECT id, ssn, card, email FROM customers) t",
        ],
    ),
    (
        "cte",
        &[
            "WITH t AS (SELECT ssn FROM customers) SELECT * FROM t",
            "WITH t AS (SELECT reverse(ssn) AS r FROM customers) SELECT r FROM t",
            "WITH t AS MATERIALIZED (SELECT email AS e FROM customers) SELECT upper(e) FROM t",
            "WITH RECURSIVE r(id, pos, ch) AS (SELECT id, 1, substr(ssn, 1, 1) FROM customers UNION ALL SELECT r.id, pos + 1, substr(c.ssn, pos + 1, 1) FROM r JOIN customers c ON c.id = r.id WHERE pos < 11) SELECT ch FROM r ORDER BY id, pos",
            "WITH RECURSIVE r(id, pos, ch) AS (SELECT id, 1, substr(ssn, 1, 1) FROM customers UNION ALL SELECT r.id, pos + 1, substr(c.ssn, pos + 1, 1) FROM r JOIN customers c ON c.id = r.id WHERE pos < 11) SELECT string_agg(ch, '' ORDER BY pos) FROM r GROUP BY id",
            "WITH RECURSIVE s(n, acc) AS (SELECT 1, ''::text UNION ALL SELECT n + 1, acc || (SELECT substr(ssn, n, 1) FROM customers WHERE id = 1) FROM s WHERE n <= 11) SELECT acc FROM s ORDER BY n DESC LIMIT 1",
        ],
    ),
    (
        "set operation",
        &[
            "SELECT ssn FROM customers UNION SELECT 'x'",
            "SELECT 'x' UNION ALL SELECT ssn FROM customers",
            "SELECT reverse(ssn) FROM customers UNION ALL SELECT name FROM customers",
            "SELECT name FROM customers UNION ALL SELECT email FROM customers",
            "SELECT name FROM customers WHERE id = 0 UNION ALL SELECT reverse(card) FROM customers",
            "SELECT id::text FROM customers UNION ALL SELECT replace(ssn, '-', '') FROM customers",
            "SELECT ssn FROM customers INTERSECT SELECT ssn FROM customers",
            "SELECT card FROM customers EXCEPT SELECT 'x'",
        ],
    ),
    (
        "lateral",
        &[
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
            "SELECT COALESCE(NULL, card) FROM customers",
            "SELECT COALESCE(reverse(email), '') FROM customers",
            "SELECT NULLIF(ssn, 'x') FROM customers",
            "SELECT GREATEST(ssn, '0') FROM customers",
            "SELECT LEAST(email, 'zzz') FROM customers",
        ],
    ),
    (
        "whole row",
        &[
            "SELECT c FROM customers c",
            "SELECT c::text FROM customers c",
            "SELECT (c).* FROM customers c",
            "SELECT customers FROM customers",
            "SELECT ROW(ssn, card) FROM customers",
            "SELECT reverse(c::text) FROM customers c",
            "SELECT upper(c::text) FROM customers c",
            "SELECT format('%s', c) FROM customers c",
            "SELECT array_agg(c) FROM customers c",
            "SELECT (SELECT c FROM customers c WHERE id = 1)",
        ],
    ),
    (
        "view",
        &[
            "SELECT r FROM v_leak",
            "SELECT s FROM v_leak",
            "SELECT * FROM v_leak",
            "SELECT reverse(r) FROM v_leak",
            "SELECT upper(s) FROM v_leak",
        ],
    ),
    (
        "copy",
        &[
            "COPY (SELECT reverse(ssn) FROM customers) TO STDOUT",
            "COPY (SELECT ssn FROM customers) TO STDOUT",
            "COPY (SELECT md5(card) FROM customers) TO STDOUT",
            "COPY (SELECT upper(email), replace(ssn, '-', '') FROM customers) TO STDOUT",
            "COPY (SELECT * FROM v_leak) TO STDOUT",
        ],
    ),
    (
        "cursor",
        &[
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
/// prints per attempt `{"rows": [[cell, ...], ...]}` or `{"error": "SQLSTATE message"}`.
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
fn psycopg(env: &Env, url: &str, attempts: &serde_json::Value) -> Vec<serde_json::Value> {
    let args = ["python3", "-c", PSYCOPG_RUNNER, url, &attempts.to_string()];
    let out = env.exec("demo", &args).output().unwrap();
    assert!(
        out.status.success(),
        "psycopg runner: {}",
        text(&out.stderr)
    );
    let so = text(&out.stdout);
    serde_json::from_str::<Vec<_>>(so.lines().last().unwrap_or_default()).unwrap()
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

/// How output is looked at: as text, as its digits only, as its letters and digits only.
#[derive(Clone, Copy, PartialEq)]
enum View {
    Text,
    Digits,
    Alnum,
}

/// One form of one protected value; `what` names the column and the transform,
/// never the value, so a failure can say what leaked without showing it.
struct Needle {
    what: String,
    text: String,
    view: View,
}

/// Finds any trace of any protected value of any row in an attempt's output.
struct Checker {
    needles: Vec<Needle>,
}

impl Checker {
    /// Reads the protected values from the server directly; hashes and base64
    /// (at each byte alignment, standard and URL-safe) come from Python.
    fn new(pg: &PgServer) -> Self {
        let rows = pg
            .admin_sql("SELECT ssn, card, email FROM customers ORDER BY id")
            .unwrap();
        let values: Vec<(&str, String)> = rows
            .lines()
            .flat_map(|l| ["ssn", "card", "email"].into_iter().zip(l.split('|')))
            .map(|(c, v)| (c, v.to_owned()))
            .collect();
        assert_eq!(values.len(), 30);
        let program = r#"
import base64, hashlib, json, sys
out = {}
for v in json.loads(sys.argv[1]):
    b, b64 = v.encode(), []
    for k in range(3):  # k bytes before the value: keep the 4-char groups made of it alone
        e = base64.b64encode(b"\0" * k + b).decode()
        b64 += [e[4 if k else 0:(k + len(b)) // 3 * 4]]
    b64 += [s.replace("+", "-").replace("/", "_") for s in b64]
    out[v] = {"md5": hashlib.md5(b).hexdigest(), "sha256": hashlib.sha256(b).hexdigest(), "base64": b64}
print(json.dumps(out))
"#;
        let all: Vec<&String> = values.iter().map(|(_, v)| v).collect();
        let out = Command::new("python3")
            .args(["-c", program, &serde_json::json!(all).to_string()])
            .output()
            .unwrap();
        let derived: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut needles = Vec::new();
        let mut add = |col: &str, how: &str, text: String, view| {
            needles.push(Needle {
                what: format!("{col} ({how})"),
                text: text.to_lowercase(),
                view,
            });
        };
        for (col, v) in &values {
            let rev = |s: &str| s.chars().rev().collect::<String>();
            let digits: String = v.chars().filter(char::is_ascii_digit).collect();
            let hex = v.bytes().fold(String::new(), |mut h, b| {
                let _ = write!(h, "{b:02x}");
                h
            });
            let codes: String = v.bytes().map(|b| b.to_string()).collect();
            add(col, "raw, any case", v.clone(), View::Text);
            add(col, "reversed", rev(v), View::Text);
            add(col, "hex of its bytes", hex, View::Text);
            add(col, "decimal byte codes", codes, View::Digits);
            let d = &derived[v.as_str()];
            add(col, "md5", d["md5"].as_str().unwrap().into(), View::Text);
            add(
                col,
                "sha256",
                d["sha256"].as_str().unwrap().into(),
                View::Text,
            );
            for b in d["base64"].as_array().unwrap() {
                add(col, "base64", b.as_str().unwrap().into(), View::Text);
            }
            if digits.len() >= 8 {
                add(col, "its digits", digits.clone(), View::Digits);
                add(col, "its digits reversed", rev(&digits), View::Digits);
            }
            if let Some((local, _)) = v.split_once('@') {
                add(col, "local part", local.into(), View::Alnum);
                add(col, "local part reversed", rev(local), View::Alnum);
            }
        }
        Self { needles }
    }

    /// The first leak in `rows` (and `extra`, e.g. error text), as "what, where".
    fn find_leak(&self, rows: &[Vec<String>], extra: &str) -> Option<String> {
        let only = |s: &str, f: fn(&char) -> bool| s.chars().filter(f).collect::<String>();
        let mut views: Vec<(View, &str, String)> = Vec::new();
        let mut push_all = |place, s: String| {
            views.push((View::Digits, place, only(&s, char::is_ascii_digit)));
            views.push((View::Alnum, place, only(&s, char::is_ascii_alphanumeric)));
            views.push((View::Text, place, s));
        };
        let cells: Vec<&str> = rows.iter().flatten().map(String::as_str).collect();
        let whole = format!("{}\n{extra}", cells.join("\n"));
        push_all(
            "output without whitespace",
            only(&whole, |c| !c.is_whitespace()),
        );
        push_all("output", whole);
        for r in rows {
            push_all("one row's cells joined", r.concat());
        }
        let width = rows.iter().map(Vec::len).max().unwrap_or(0);
        for i in 0..width {
            let col: String = rows
                .iter()
                .filter_map(|r| r.get(i))
                .map(String::as_str)
                .collect();
            push_all("one column across rows", col);
        }
        for (view, place, s) in &views {
            let s = s.to_lowercase();
            for n in self.needles.iter().filter(|n| n.view == *view) {
                if s.contains(&n.text) {
                    return Some(format!("{} in {place}", n.what));
                }
            }
        }
        None
    }
}

/// What the gateway did with an attempt.
enum Outcome {
    Refused,
    Masked,
    /// A server error whose message carries no protected value.
    ServerError(String),
    Leaked(String),
}

fn judge(checker: &Checker, rows: &[Vec<String>], ok: bool, err: &str) -> Outcome {
    if let Some(leak) = checker.find_leak(rows, err) {
        Outcome::Leaked(leak)
    } else if ok {
        Outcome::Masked
    } else if err.contains("42501") && err.contains("agentgate:") {
        Outcome::Refused
    } else {
        Outcome::ServerError(err.lines().next().unwrap_or_default().to_owned())
    }
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
        let out = agent_psql(&env, &url, &psql_args(sql));
        let (so, se) = (text(&out.stdout), text(&out.stderr));
        let outcome = judge(&checker, &psql_rows(&so), out.status.success(), &se);
        results.push((sql.replace('\n', "; "), family, outcome, shown));
    }
    let attempts: Vec<_> = PSYCOPG_LEAKS
        .iter()
        .flat_map(|s| [false, true].map(|b| serde_json::json!([s, [0], b])))
        .collect();
    let answers = psycopg(&env, &url, &serde_json::json!(attempts));
    for (a, r) in attempts.iter().zip(&answers) {
        let err = r["error"].as_str().unwrap_or_default();
        let outcome = judge(&checker, &json_rows(r), r.get("rows").is_some(), err);
        let mode = if a[2] == true { "binary" } else { "text" };
        let family = if mode == "binary" {
            "psycopg binary"
        } else {
            "psycopg text"
        };
        results.push((a[0].as_str().unwrap().to_owned(), family, outcome, false));
    }

    let (mut table, mut failures) = (String::new(), Vec::new());
    let (mut refused, mut masked, mut shown) = (0, 0, 0);
    for (i, (sql, family, outcome, direct_shown)) in results.iter().enumerate() {
        shown += usize::from(*direct_shown);
        let (verdict, ok) = match outcome {
            Outcome::Refused => ("refused".to_owned(), true),
            Outcome::Masked if *family == "search" => ("ANSWERED, not refused".to_owned(), false),
            Outcome::Masked => ("masked".to_owned(), true),
            Outcome::ServerError(e) => (format!("server error: {e}"), *family == "error"),
            Outcome::Leaked(what) => (format!("LEAKED {what}"), false),
        };
        match outcome {
            Outcome::Refused => refused += 1,
            Outcome::Masked => masked += 1,
            _ => {}
        }
        if !ok {
            failures.push(format!("#{i} [{family}] {sql}: {verdict}"));
        }
        let _ = writeln!(table, "{i:>3} {family:<15} {verdict:<10} {sql}");
    }
    println!("{table}");
    println!(
        "{} attempts: {refused} refused, {masked} answered, {} failed; {shown} show a value directly",
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

#[derive(Clone, Copy)]
enum Mask {
    Keep4,
    Redact,
}

impl Mask {
    /// What the gateway shows for `v` (see `mask::strategy`): `keep_last4` stars
    /// the letters and digits before the last four, or all of them if fewer than 8.
    fn apply(self, v: &str) -> String {
        match self {
            Mask::Redact => "[REDACTED]".into(),
            Mask::Keep4 => {
                let alnum = v.chars().filter(char::is_ascii_alphanumeric).count();
                let keep = if alnum >= 8 { 4 } else { 0 };
                let mut seen = 0;
                let mut out: Vec<char> = v.chars().rev().collect();
                for c in &mut out {
                    if c.is_ascii_alphanumeric() {
                        seen += 1;
                        if seen > keep {
                            *c = '*';
                        }
                    }
                }
                out.into_iter().rev().collect()
            }
        }
    }
}

const SSN: Mask = Mask::Keep4;
const CARD: Mask = Mask::Keep4;
const EMAIL: Mask = Mask::Redact;

/// Ordinary queries with no protected output column: byte-equal to the server's
/// answer. `{ssnN}`, `{emailN}` and `{card}` stand for customer N's values.
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
    "SELECT id FROM customers WHERE ssn IN ('{ssn2}', '{ssn5}') ORDER BY id",
    "SELECT id, name FROM customers WHERE email = '{email4}'",
    "SELECT count(*) FROM customers WHERE card = '{card}'",
];

type Masks = &'static [(usize, Mask)];

/// Ordinary queries with protected output columns (0-based), masked as configured.
const UTILITY_MASKED: &[(Masks, &str)] = &[
    (
        &[(2, EMAIL), (3, SSN), (4, CARD)],
        "SELECT * FROM customers ORDER BY id",
    ),
    (
        &[(0, SSN), (1, CARD), (2, EMAIL)],
        "SELECT ssn, card, email FROM customers WHERE id = 1",
    ),
    (
        &[(1, CARD)],
        "SELECT id, card FROM customers WHERE id BETWEEN 3 AND 5 ORDER BY id",
    ),
    (
        &[(1, EMAIL)],
        "SELECT id, email FROM customers WHERE id IN (2, 4) ORDER BY id",
    ),
    (
        &[(1, SSN)],
        "SELECT c.id, c.ssn, d.name FROM customers c JOIN customers d ON d.id = c.id WHERE c.id < 4 ORDER BY c.id",
    ),
    (
        &[(1, SSN)],
        "SELECT id, ssn FROM customers WHERE ssn = '{ssn3}'",
    ),
];

/// Through psycopg (prepared, text and binary): masks, SQL, parameters.
const UTILITY_PSYCOPG: &[(Masks, &str, &[&str])] = &[
    (
        &[],
        "SELECT id, name FROM customers WHERE ssn = %s",
        &["{ssn3}"],
    ),
    (
        &[],
        "SELECT count(*) FROM customers WHERE ssn IN (%s, %s)",
        &["{ssn1}", "{ssn2}"],
    ),
    (
        &[(1, SSN), (2, CARD), (3, EMAIL)],
        "SELECT id, ssn, card, email, balance FROM customers WHERE id = %s",
        &["2"],
    ),
];

/// Direct output with the expected masks applied to its protected columns.
fn masked_direct(direct: &str, masks: &[(usize, Mask)]) -> Vec<Vec<String>> {
    let mut rows: Vec<Vec<String>> = direct
        .lines()
        .map(|l| l.split('|').map(str::to_owned).collect())
        .collect();
    for r in &mut rows {
        for &(i, m) in masks {
            r[i] = m.apply(&r[i]);
        }
    }
    rows
}

#[test]
fn ordinary_queries_answer_like_the_server_with_protected_columns_masked() {
    let (env, pg) = masking_env("pgutility", "");
    let url = pg.url("127.0.0.1", "postgres", "postgres");
    let checker = Checker::new(&pg);
    let fill = |s: &str| {
        let mut s = s.to_owned();
        for (n, col) in [(1, "ssn"), (2, "ssn"), (3, "ssn"), (5, "ssn"), (4, "email")] {
            let v = pg
                .admin_sql(&format!("SELECT {col} FROM customers WHERE id = {n}"))
                .unwrap();
            s = s.replace(&format!("{{{col}{n}}}"), v.trim());
        }
        s.replace("{card}", "4111111111111111")
    };

    let plain = UTILITY.iter().map(|s| (&[][..], *s));
    for (i, (masks, sql)) in plain.chain(UTILITY_MASKED.iter().copied()).enumerate() {
        let (shown, sql) = (sql, fill(sql));
        let direct = direct_psql(&pg, &["-qAt", "-v", "ON_ERROR_STOP=1", "-c", &sql]);
        assert!(direct.status.success(), "utility #{i} is valid SQL");
        let expected = masked_direct(&text(&direct.stdout), masks);
        assert!(!expected.is_empty(), "utility #{i} returns rows");
        let out = agent_psql(&env, &url, &["-qAt", "-v", "ON_ERROR_STOP=1", "-c", &sql]);
        let so = text(&out.stdout);
        let got = masked_direct(&so, &[]);
        let leak = checker.find_leak(&got, "");
        assert!(leak.is_none(), "utility #{i} {shown}: {leak:?}");
        assert!(
            out.status.success(),
            "utility #{i} {}: {}",
            shown,
            text(&out.stderr)
        );
        assert!(got == expected, "utility #{i} {shown}: {so}");
    }
    let out = agent_psql(
        &env,
        &url,
        &[
            "-qAt",
            "-c",
            "SELECT ssn, card, email FROM customers WHERE id = 1",
        ],
    );
    assert_eq!(
        text(&out.stdout).trim(),
        "***-**-1001|************1111|[REDACTED]"
    );

    let mut attempts = Vec::new();
    let mut expected = Vec::new();
    for (masks, sql, params) in UTILITY_PSYCOPG {
        let params: Vec<String> = params.iter().map(|p| fill(p)).collect();
        let mut literal = (*sql).to_owned();
        for p in &params {
            literal = literal.replacen("%s", &format!("'{p}'"), 1);
        }
        let direct = direct_psql(&pg, &["-qAt", "-v", "ON_ERROR_STOP=1", "-c", &literal]);
        assert!(direct.status.success(), "{sql} is valid SQL");
        for binary in [false, true] {
            attempts.push(serde_json::json!([sql, params, binary]));
            expected.push((*sql, masked_direct(&text(&direct.stdout), masks)));
        }
    }
    let answers = psycopg(&env, &url, &serde_json::json!(attempts));
    for (r, (sql, want)) in answers.iter().zip(expected) {
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
        let out = agent_psql(&env, &url, &psql_args(sql));
        let se = text(&out.stderr);
        assert!(
            checker
                .find_leak(&psql_rows(&text(&out.stdout)), &se)
                .is_none(),
            "{sql}"
        );
        assert!(!out.status.success(), "{sql} is refused");
        assert!(
            se.contains("42501") && se.contains("agentgate:"),
            "{sql}: {se}"
        );
        assert!(
            se.contains("ssn"),
            "{sql}: the refusal names the column: {se}"
        );
    }
    let out = agent_psql(
        &env,
        &url,
        &["-qAt", "-c", "SELECT ssn, card FROM customers WHERE id = 1"],
    );
    assert_eq!(text(&out.stdout).trim(), "***-**-1001|************1111");
    // Other columns keep the default, `derived = "redact"`.
    let out = agent_psql(
        &env,
        &url,
        &psql_args("SELECT reverse(card), upper(email) FROM customers"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        checker
            .find_leak(&psql_rows(&text(&out.stdout)), "")
            .is_none()
    );
}
