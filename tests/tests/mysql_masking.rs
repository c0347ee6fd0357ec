//! Masking through the `MySQL` handler, against `MariaDB`: a protected value
//! never leaves the gateway in any form `MySQL`'s dialect offers (string
//! functions, encodings, casts, JSON, aggregates, windows, subqueries, set
//! operations, user variables, prepared statements, views, stored
//! functions, error messages, pieces across columns or rows). Every attempt
//! is refused with the gateway's `1142` or comes back with the checker
//! finding no trace of any protected value (raw, reversed, hex, base64,
//! digits only, md5/sha256, pieces across rows). Ordinary queries answer as
//! the server does, protected columns masked as configured.

use agentgate_e2e::{
    DaemonOptions, Env,
    leak::Checker,
    mysql::{MariaDb, PASSWORD},
};

/// Attempts to get a protected value out. A `;;` separates statements run
/// one after the other in one session; a `;` inside one is a multi-statement
/// query.
const LEAKS: &[&str] = &[
    // string functions
    "SELECT UPPER(ssn) FROM customers",
    "SELECT LOWER(email) FROM customers",
    "SELECT UCASE(email) FROM customers",
    "SELECT LCASE(card) FROM customers",
    "SELECT REVERSE(ssn) FROM customers",
    "SELECT REVERSE(card) FROM customers",
    "SELECT REVERSE(email) FROM customers",
    "SELECT REPLACE(ssn, '-', '') FROM customers",
    "SELECT REPLACE(email, '@', ' at ') FROM customers",
    "SELECT CONCAT('x', ssn, 'y') FROM customers",
    "SELECT CONCAT(ssn) FROM customers",
    "SELECT CONCAT_WS(',', ssn, card, email) FROM customers",
    "SELECT CONCAT_WS('', name, ssn) FROM customers",
    "SELECT LPAD(ssn, 20, '#') FROM customers",
    "SELECT RPAD(card, 30, '0') FROM customers",
    "SELECT TRIM(CONCAT(' ', card, ' ')) FROM customers",
    "SELECT LTRIM(ssn) FROM customers",
    "SELECT REPEAT(ssn, 2) FROM customers",
    "SELECT SUBSTRING(ssn, 1, 20) FROM customers",
    "SELECT SUBSTR(card FROM 1) FROM customers",
    "SELECT MID(email, 1, 40) FROM customers",
    "SELECT LEFT(card, 16) FROM customers",
    "SELECT RIGHT(ssn, 11) FROM customers",
    "SELECT SUBSTRING_INDEX(email, '@', 1) FROM customers",
    "SELECT SUBSTRING_INDEX(ssn, '-', -2) FROM customers",
    "SELECT INSERT(ssn, 4, 1, '') FROM customers",
    "SELECT INSERT(card, 1, 0, 'x') FROM customers",
    "SELECT ELT(1, ssn, card) FROM customers",
    "SELECT ELT(2, 'a', email) FROM customers",
    "SELECT FIELD(ssn, ssn), ssn FROM customers",
    "SELECT QUOTE(ssn) FROM customers",
    "SELECT REGEXP_REPLACE(ssn, '-', '') FROM customers",
    "SELECT REGEXP_SUBSTR(email, '[a-z0-9]+') FROM customers",
    "SELECT SOUNDEX(email), email FROM customers",
    "SELECT FORMAT(card, 0) FROM customers",
    "SELECT SPACE(1) || ssn FROM customers",
    "SELECT CHAR_LENGTH(ssn), ssn FROM customers",
    "SELECT TRANSLATE(ssn, '-', '') FROM customers",
    // encodings
    "SELECT HEX(ssn) FROM customers",
    "SELECT HEX(card) FROM customers",
    "SELECT HEX(email) FROM customers",
    "SELECT LOWER(HEX(ssn)) FROM customers",
    "SELECT UNHEX(HEX(ssn)) FROM customers",
    "SELECT TO_BASE64(ssn) FROM customers",
    "SELECT TO_BASE64(email) FROM customers",
    "SELECT FROM_BASE64(TO_BASE64(card)) FROM customers",
    "SELECT MD5(ssn) FROM customers",
    "SELECT SHA1(card) FROM customers",
    "SELECT SHA2(ssn, 256) FROM customers",
    "SELECT BIN(card) FROM customers",
    "SELECT OCT(card) FROM customers",
    "SELECT CONV(card, 10, 16) FROM customers",
    "SELECT CONV(REPLACE(ssn, '-', ''), 10, 36) FROM customers",
    "SELECT ORD(ssn), ssn FROM customers",
    "SELECT ASCII(SUBSTRING(ssn, 1, 1)), ASCII(SUBSTRING(ssn, 2, 1)), ASCII(SUBSTRING(ssn, 3, 1)) FROM customers",
    "SELECT ORD(SUBSTRING(card, 1, 1)), ORD(SUBSTRING(card, 2, 1)), ORD(SUBSTRING(card, 3, 1)), ORD(SUBSTRING(card, 4, 1)) FROM customers",
    "SELECT CHAR(ORD(SUBSTRING(ssn, 1, 1)), ORD(SUBSTRING(ssn, 2, 1)), ORD(SUBSTRING(ssn, 3, 1))) FROM customers",
    "SELECT CHAR(ssn) FROM customers",
    "SELECT AES_ENCRYPT(ssn, 'k') FROM customers",
    "SELECT HEX(AES_ENCRYPT(ssn, 'k')) FROM customers",
    "SELECT AES_DECRYPT(AES_ENCRYPT(ssn, 'k'), 'k') FROM customers",
    "SELECT COMPRESS(ssn) FROM customers",
    "SELECT UNCOMPRESS(COMPRESS(card)) FROM customers",
    "SELECT ENCODE(ssn, 'k') FROM customers",
    "SELECT DES_ENCRYPT(ssn) FROM customers",
    "SELECT INET_ATON(ssn), ssn FROM customers",
    "SELECT CRC32(ssn), ssn FROM customers",
    // casts and collations
    "SELECT CAST(ssn AS BINARY) FROM customers",
    "SELECT BINARY ssn FROM customers",
    "SELECT CAST(card AS CHAR) FROM customers",
    "SELECT CAST(card AS UNSIGNED) FROM customers",
    "SELECT CAST(card AS DECIMAL(30,0)) FROM customers",
    "SELECT CAST(card AS DOUBLE) FROM customers",
    "SELECT card + 0 FROM customers",
    "SELECT card * 1 FROM customers",
    "SELECT -card FROM customers",
    "SELECT card DIV 1 FROM customers",
    "SELECT CONVERT(ssn USING latin1) FROM customers",
    "SELECT CONVERT(email, CHAR) FROM customers",
    "SELECT ssn COLLATE utf8mb4_bin FROM customers",
    "SELECT CAST(REPLACE(ssn, '-', '') AS UNSIGNED) FROM customers",
    "SELECT REPLACE(ssn, '-', '') + 0 FROM customers",
    // JSON
    "SELECT JSON_OBJECT('s', ssn) FROM customers",
    "SELECT JSON_OBJECT('e', email, 'c', card) FROM customers",
    "SELECT JSON_ARRAY(ssn, card) FROM customers",
    "SELECT JSON_ARRAYAGG(ssn) FROM customers",
    "SELECT JSON_OBJECTAGG(id, card) FROM customers",
    "SELECT JSON_QUOTE(email) FROM customers",
    "SELECT JSON_EXTRACT(JSON_OBJECT('s', ssn), '$.s') FROM customers",
    "SELECT JSON_UNQUOTE(JSON_EXTRACT(JSON_ARRAY(card), '$[0]')) FROM customers",
    "SELECT JSON_VALUE(JSON_OBJECT('s', ssn), '$.s') FROM customers",
    "SELECT JSON_OBJECT(ssn, 1) FROM customers",
    // aggregates and windows
    "SELECT GROUP_CONCAT(ssn) FROM customers",
    "SELECT GROUP_CONCAT(card SEPARATOR '') FROM customers",
    "SELECT GROUP_CONCAT(email ORDER BY id SEPARATOR ';') FROM customers",
    "SELECT GROUP_CONCAT(DISTINCT REVERSE(ssn)) FROM customers",
    "SELECT MAX(ssn) FROM customers",
    "SELECT MIN(card) FROM customers",
    "SELECT MAX(REVERSE(email)) FROM customers",
    "SELECT ssn, COUNT(*) FROM customers GROUP BY ssn",
    "SELECT FIRST_VALUE(ssn) OVER (ORDER BY id) FROM customers",
    "SELECT LAG(card) OVER (ORDER BY id) FROM customers",
    "SELECT LEAD(REVERSE(ssn)) OVER (ORDER BY id) FROM customers",
    "SELECT NTH_VALUE(email, 2) OVER (ORDER BY id) FROM customers",
    // subqueries, CTEs, derived tables, set operations
    "SELECT x FROM (SELECT ssn AS x FROM customers) t",
    "SELECT REVERSE(x) FROM (SELECT ssn AS x FROM customers) t",
    "SELECT (SELECT ssn FROM customers WHERE id = 1)",
    "SELECT (SELECT REVERSE(card) FROM customers WHERE id = 1)",
    "WITH c AS (SELECT ssn FROM customers) SELECT * FROM c",
    "WITH c AS (SELECT ssn AS s FROM customers) SELECT HEX(s) FROM c",
    "WITH RECURSIVE r AS (SELECT 1 AS n) SELECT ssn FROM customers, r",
    "SELECT name FROM customers UNION SELECT ssn FROM customers",
    "SELECT name FROM customers UNION ALL SELECT REVERSE(ssn) FROM customers",
    "SELECT 'x' UNION SELECT TO_BASE64(card) FROM customers",
    "SELECT ssn FROM customers WHERE id IN (SELECT id FROM customers)",
    "SELECT c1.ssn FROM customers c1 JOIN customers c2 ON c1.id = c2.id",
    "SELECT t.* FROM (SELECT REVERSE(ssn) r FROM customers) t",
    "SELECT * FROM customers",
    "SELECT customers.* FROM customers",
    "SELECT *, REVERSE(ssn) FROM customers",
    // conditionals
    "SELECT CASE WHEN id > 0 THEN ssn END FROM customers",
    "SELECT CASE WHEN id > 0 THEN REVERSE(ssn) ELSE 'x' END FROM customers",
    "SELECT IF(id > 0, card, 'x') FROM customers",
    "SELECT IF(id > 0, HEX(card), 'x') FROM customers",
    "SELECT IFNULL(ssn, '') FROM customers",
    "SELECT COALESCE(NULL, email) FROM customers",
    "SELECT NULLIF(ssn, 'x') FROM customers",
    "SELECT GREATEST(ssn, '') FROM customers",
    "SELECT LEAST(card, 'z') FROM customers",
    "SELECT NVL(ssn, '') FROM customers",
    // pieces across columns and rows
    "SELECT SUBSTRING(ssn, 1, 3), SUBSTRING(ssn, 4, 4), SUBSTRING(ssn, 8) FROM customers",
    "SELECT LEFT(card, 8), RIGHT(card, 8) FROM customers",
    "SELECT SUBSTRING(ssn, 1, 6) FROM customers UNION ALL SELECT SUBSTRING(ssn, 7) FROM customers",
    "SELECT SUBSTRING_INDEX(email, '@', 1), SUBSTRING_INDEX(email, '@', -1) FROM customers",
    "SELECT SUBSTRING(card, 1, 4), SUBSTRING(card, 5, 4), SUBSTRING(card, 9, 4), SUBSTRING(card, 13, 4) FROM customers",
    // user variables
    "SELECT @x := ssn FROM customers",
    "SELECT @x := ssn FROM customers;; SELECT @x",
    "SELECT @x := REVERSE(ssn) FROM customers;; SELECT @x",
    "SET @x = (SELECT ssn FROM customers WHERE id = 1);; SELECT @x",
    "SET @x = (SELECT card FROM customers WHERE id = 1);; SELECT REVERSE(@x)",
    "SELECT ssn INTO @v FROM customers WHERE id = 1;; SELECT @v",
    "SELECT ssn, card INTO @a, @b FROM customers WHERE id = 2;; SELECT CONCAT(@a, @b)",
    "SELECT @s := '' ;; SELECT @s := CONCAT(@s, ssn) FROM customers ;; SELECT @s",
    "SELECT @@version, ssn FROM customers",
    // prepared statements (SQL level)
    "PREPARE s FROM 'SELECT ssn FROM customers';; EXECUTE s",
    "PREPARE s FROM 'SELECT REVERSE(ssn) FROM customers';; EXECUTE s",
    "SET @q = 'SELECT ssn FROM customers';; PREPARE s FROM @q;; EXECUTE s",
    "SET @q = CONCAT('SELECT ', 'ssn FROM customers');; PREPARE s FROM @q;; EXECUTE s",
    "EXECUTE IMMEDIATE 'SELECT ssn FROM customers'",
    // views and stored functions (created by the administrator)
    "SELECT ssn FROM v_customers",
    "SELECT REVERSE(ssn) FROM v_customers",
    "SELECT HEX(email) FROM v_customers",
    "SELECT echo_text(ssn) FROM customers",
    "SELECT echo_text(REVERSE(ssn)) FROM customers",
    "SELECT leak_ssn(1)",
    "SELECT leak_ssn(id) FROM customers",
    "CALL dump_ssn()",
    // multi-statement queries, and USE inside them (the rule names the
    // schema: names resolve in the database each statement runs in)
    "SELECT 1; SELECT REVERSE(ssn) FROM customers",
    "USE shop; SELECT REVERSE(ssn) FROM customers",
    "SELECT 1; USE shop; SELECT HEX(ssn) FROM customers",
    "USE information_schema;; SELECT REVERSE(ssn) FROM shop.customers",
    "USE information_schema; USE shop; SELECT TO_BASE64(ssn) FROM customers",
    "USE information_schema;; USE shop; SELECT ssn FROM customers",
    "SELECT name FROM customers; SELECT HEX(card) FROM customers",
    // errors that echo values
    "SELECT EXTRACTVALUE(1, CONCAT(0x7e, ssn)) FROM customers",
    "SELECT UPDATEXML(1, CONCAT(0x7e, (SELECT ssn FROM customers LIMIT 1)), 1)",
    "SELECT CAST(ssn AS UNSIGNED) FROM customers;; SHOW WARNINGS",
    "SELECT ssn + 0 FROM customers;; SHOW WARNINGS",
    "SELECT JSON_EXTRACT(ssn, '$') FROM customers",
    "SELECT ST_GeomFromText(ssn) FROM customers",
    "SELECT * FROM customers WHERE id = 1 AND ssn = 1;; SHOW WARNINGS",
    "SELECT DATE(ssn) FROM customers;; SHOW WARNINGS",
    "SELECT EXP(card) FROM customers",
    "SELECT 1 FROM customers WHERE id = 1 AND GTID_SUBSET(ssn, '1-1-1')",
    // files, server state, and the catalog
    "SELECT LOAD_FILE('/etc/hostname')",
    "SELECT ssn FROM customers INTO OUTFILE '/tmp/agentgate-leak'",
    "SELECT * FROM information_schema.columns WHERE table_name = 'customers'",
    "HANDLER customers OPEN;; HANDLER customers READ FIRST",
    "/*!50000 SELECT REVERSE(ssn) FROM customers */",
    "SELECT 1 /*!, REVERSE(ssn) */ FROM customers",
];

/// Searches on a protected column: refused (the rows would reveal it).
const SEARCHES: &[&str] = &[
    "SELECT id FROM customers WHERE ssn LIKE '1%'",
    "SELECT id FROM customers WHERE SUBSTRING(ssn, 1, 1) = '1'",
    "SELECT id FROM customers WHERE card > '4'",
    "SELECT id FROM customers ORDER BY ssn",
    "SELECT id FROM customers WHERE email REGEXP '^user1'",
    "SELECT id FROM customers WHERE LOCATE('1', ssn) = 1",
];

/// Ordinary queries: answered as the server answers them, protected
/// columns masked.
const UTILITY: &[&str] = &[
    "SELECT id, name, balance FROM customers ORDER BY id",
    "SELECT id, ssn, card, email FROM customers ORDER BY id",
    "SELECT * FROM customers ORDER BY id",
    "SELECT count(*), sum(balance), max(id) FROM customers",
    "SELECT name, ssn FROM customers WHERE id = 3",
    "SELECT c.id, c.email FROM customers c WHERE c.id < 4 ORDER BY c.id",
    "SELECT id, UPPER(name) FROM customers WHERE id BETWEEN 2 AND 5 ORDER BY id",
    "SELECT 1 + 1, 'text', NULL, 2.5",
    "SELECT id, balance * 2 FROM customers ORDER BY balance DESC LIMIT 3",
    "SELECT id, ssn FROM customers WHERE ssn = '102-12-1002'",
    "SELECT name, card FROM customers ORDER BY id LIMIT 2 OFFSET 1",
    "SELECT id FROM customers WHERE name LIKE 'Customer 1%' ORDER BY id",
];

fn policy(port: u16) -> String {
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
name = "no-ddl-or-admin"
identities = ["demo"]
resources = ["shop"]
action = "deny"
match = {{ sql = ["write", "ddl", "dcl", "admin", "unknown"] }}

[masking]
detectors = ["all"]

[[masking.column]]
columns = ["shop.customers.ssn", "customers.card"]
strategy = "keep_last4"

[[masking.column]]
columns = ["customers.email"]
strategy = "redact"
"#
    )
}

/// Runs attempts (lists of statements) with `PyMySQL`, one session each;
/// prints one JSON list: per attempt `ok`, `rows` (every result set's rows
/// as text, with each result's column names first) and `error`.
const RUNNER: &str = r#"
import json, os, sys, pymysql
out = []
for stmts in json.loads(sys.argv[1]):
    rec = {"ok": True, "rows": [], "error": "", "names": []}
    try:
        conn = pymysql.connect(host='127.0.0.1', port=int(os.environ['PORT']), user='app',
            password=os.environ['PW'], database='shop',
            client_flag=pymysql.constants.CLIENT.MULTI_STATEMENTS, autocommit=True)
    except Exception as e:
        rec.update(ok=False, error=repr(e)); out.append(rec); continue
    cur = conn.cursor()
    for s in stmts:
        try:
            cur.execute(s)
            while True:
                if cur.description:
                    rec["names"].append([d[0] for d in cur.description])
                    for r in cur.fetchall():
                        rec["rows"].append(["NULL" if v is None else (v.decode('latin1') if isinstance(v, (bytes, bytearray)) else str(v)) for v in r])
                if not cur.nextset():
                    break
        except Exception as e:
            rec["ok"] = False
            rec["error"] += repr(e.args) + "\n"
    try:
        conn.close()
    except Exception:
        pass
    out.append(rec)
print(json.dumps(out))
"#;

fn run(cmd: std::process::Command, attempts: &[Vec<String>]) -> Vec<serde_json::Value> {
    let mut cmd = cmd;
    let out = cmd
        .arg(serde_json::json!(attempts).to_string())
        .output()
        .unwrap();
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "the runner failed ({}): stderr: {se}\nstdout: {so}",
        out.status
    );
    let answers: Vec<serde_json::Value> =
        serde_json::from_str(so.lines().last().unwrap_or_default()).unwrap_or_else(|e| {
            panic!("the runner's answer does not parse ({e}): stdout: {so}\nstderr: {se}")
        });
    assert_eq!(answers.len(), attempts.len(), "stderr: {se}");
    answers
}

fn setup(name: &str) -> (Env, MariaDb, Checker) {
    let opts = DaemonOptions {
        policies: vec![("shop.toml".into(), policy(3306))],
        ..DaemonOptions::default()
    };
    let env = Env::new(name, opts).unwrap();
    let db = MariaDb::start(&env.netns, 3306).unwrap();
    db.seed_customers(10).unwrap();
    db.admin_sql(
        "CREATE VIEW shop.v_customers AS SELECT id, ssn, email FROM shop.customers;\n\
         CREATE FUNCTION shop.echo_text(x TEXT) RETURNS TEXT DETERMINISTIC RETURN x;\n\
         CREATE FUNCTION shop.leak_ssn(i INT) RETURNS TEXT READS SQL DATA RETURN (SELECT REVERSE(ssn) FROM shop.customers WHERE id = i);\n\
         CREATE PROCEDURE shop.dump_ssn() SELECT REVERSE(ssn) FROM shop.customers;",
    )
    .unwrap();
    let rows = db
        .admin_sql("SELECT ssn, card, email FROM shop.customers ORDER BY id")
        .unwrap();
    let checker = Checker::of_rows(&rows, '\t');
    (env, db, checker)
}

fn agent(env: &Env, db: &MariaDb) -> std::process::Command {
    let mut c = env.exec("demo", &["python3", "-c", RUNNER]);
    c.env("PW", PASSWORD).env("PORT", db.port.to_string());
    c
}

/// The same runner, untagged inside the test's network namespace: straight
/// to the server.
fn direct(env: &Env, db: &MariaDb) -> std::process::Command {
    let mut c = env.netns.command("python3");
    c.args(["-c", RUNNER])
        .env("PW", PASSWORD)
        .env("PORT", db.port.to_string());
    c
}

fn rows(v: &serde_json::Value) -> Vec<Vec<String>> {
    serde_json::from_value(v["rows"].clone()).unwrap_or_default()
}

fn refused(v: &serde_json::Value) -> bool {
    let e = v["error"].as_str().unwrap_or_default();
    e.contains("1142") && e.contains("agentgate:")
}

#[test]
fn re_encoded_protected_values_never_leave_the_gateway() {
    let (env, db, checker) = setup("myleak");
    assert!(LEAKS.len() >= 150, "{} attempts", LEAKS.len());
    let attempts: Vec<Vec<String>> = LEAKS
        .iter()
        .chain(SEARCHES)
        .map(|a| a.split(";;").map(|s| s.trim().to_owned()).collect())
        .collect();
    let answers = run(agent(&env, &db), &attempts);
    // The checker must see what the server gives away directly, or a pass
    // would prove nothing.
    let raw = run(direct(&env, &db), &attempts);
    let mut shown_directly = 0;
    let mut failures = Vec::new();
    let (mut n_refused, mut n_masked) = (0, 0);
    for (i, sql) in LEAKS.iter().chain(SEARCHES).enumerate() {
        let a = &answers[i];
        if checker
            .find_leak(&rows(&raw[i]), raw[i]["error"].as_str().unwrap_or_default())
            .is_some()
        {
            shown_directly += 1;
        }
        if let Some(leak) = checker.find_leak(&rows(a), a["error"].as_str().unwrap_or_default()) {
            failures.push(format!("LEAK {sql}: {leak}"));
        } else if refused(a) {
            n_refused += 1;
        } else if SEARCHES.contains(sql) {
            failures.push(format!("search not refused: {sql}"));
        } else {
            n_masked += 1;
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(
        shown_directly >= LEAKS.len() * 3 / 5,
        "the checker finds the values in {shown_directly} direct answers only"
    );
    eprintln!(
        "{} attempts: {n_refused} refused, {n_masked} answered with no trace ({shown_directly} leak when run directly)",
        attempts.len()
    );
}

/// What the gateway shows for value `v` of output column `name`.
fn mask(name: &str, v: &str) -> String {
    match name {
        "email" if v != "NULL" => "[REDACTED]".into(),
        "ssn" | "card" if v != "NULL" => {
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

#[test]
fn ordinary_queries_answer_like_the_server_with_protected_columns_masked() {
    let (env, db, checker) = setup("myutility");
    let attempts: Vec<Vec<String>> = UTILITY.iter().map(|s| vec![(*s).to_owned()]).collect();
    let answers = run(agent(&env, &db), &attempts);
    let raw = run(direct(&env, &db), &attempts);
    // Every difference is collected and named (the statement, what the
    // server answered directly, masked as configured, and what came back).
    let mut differ = Vec::new();
    for (i, sql) in UTILITY.iter().enumerate() {
        assert!(
            raw[i]["ok"].as_bool() == Some(true),
            "{sql} directly: {}",
            raw[i]["error"]
        );
        let names: Vec<String> =
            serde_json::from_value(raw[i]["names"][0].clone()).unwrap_or_default();
        let want: Vec<Vec<String>> = rows(&raw[i])
            .iter()
            .map(|r| names.iter().zip(r).map(|(n, v)| mask(n, v)).collect())
            .collect();
        assert!(!want.is_empty(), "{sql} returns rows");
        let got = rows(&answers[i]);
        if answers[i]["ok"].as_bool() != Some(true)
            || answers[i]["names"] != raw[i]["names"]
            || got != want
        {
            differ.push(format!(
                "{sql}\n  want (direct, masked): {:?} {want:?}\n  got (via gateway):    {} {got:?} {}",
                raw[i]["names"], answers[i]["names"], answers[i]["error"]
            ));
        }
        assert!(checker.find_leak(&got, "").is_none(), "{sql}");
    }
    assert!(
        differ.is_empty(),
        "{} of {} differ:\n{}",
        differ.len(),
        UTILITY.len(),
        differ.join("\n")
    );
}
