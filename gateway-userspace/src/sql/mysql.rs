//! What sqlparser's `MySQL` dialect does not model, classified by keywords.
//!
//! - Executable comments (`/*! ... */`, `/*!50000 ... */`, `MariaDB`'s
//!   `/*M! ... */`) are code to the server: [`unwrap_executable_comments`]
//!   turns them into plain text before anything else looks at the SQL, so
//!   `SELECT 1 /*!, (SELECT ssn FROM t) */` is classified (and cached, and
//!   masked) as what the server runs.
//! - Statements the parser does not know (`LOAD DATA`, `HANDLER`, `XA`,
//!   `CREATE USER`, `SET PASSWORD`, `INSTALL PLUGIN`, `SHUTDOWN`, ...) get a
//!   class from their leading keywords ([`preclassify`]): file reads and
//!   writes and server control are `admin`, privileges `dcl`; never `read`.
//!   `SELECT ... INTO OUTFILE/DUMPFILE` anywhere is `admin` (a server file
//!   write). `PREPARE s FROM '...'` takes the class of the text it
//!   prepares; `PREPARE s FROM @v` is `unknown`.
//!
//! Fails closed: a keyword match only ever raises the class; a statement no
//! rule matches goes to the parser, and one that does not parse is
//! `unknown` as for every dialect.

use std::borrow::Cow;

use sqlparser::tokenizer::{Token, Tokenizer};

use super::{
    Dialect,
    classify::{PARSER_RECURSION_LIMIT, StatementClass, StatementInfo},
};

/// `PREPARE ... FROM 'PREPARE ... FROM ...'` is followed this deep.
const MAX_PREPARE_DEPTH: u8 = 2;

/// `/*!` comments are code; everything else is kept as it is.
pub fn unwrap_executable_comments(sql: &str) -> Cow<'_, str> {
    if !sql.contains("/*!") && !sql.contains("/*M!") {
        return Cow::Borrowed(sql);
    }
    let b = sql.as_bytes();
    let mut out = String::with_capacity(sql.len());
    let mut i = 0;
    let mut last = 0;
    let mut in_exec = false;
    while i < b.len() {
        match b[i] {
            q @ (b'\'' | b'"' | b'`') => {
                // Quoted: skip to the closing quote (backslash escapes and doubled quotes).
                i += 1;
                while i < b.len() {
                    if b[i] == b'\\' && q != b'`' {
                        i += 2;
                        continue;
                    }
                    if b[i] == q {
                        if b.get(i + 1) == Some(&q) {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
                i += 1;
            }
            b'#' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'-' if b.get(i + 1) == Some(&b'-')
                && b.get(i + 2).is_none_or(u8::is_ascii_whitespace) =>
            {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'*' if in_exec && b.get(i + 1) == Some(&b'/') => {
                out.push_str(&sql[last..i]);
                out.push_str("  ");
                i += 2;
                last = i;
                in_exec = false;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let exec = match (b.get(i + 2), b.get(i + 3)) {
                    (Some(b'!'), _) => Some(3),
                    (Some(b'M'), Some(b'!')) => Some(4),
                    _ => None,
                };
                match exec {
                    Some(skip) if !in_exec => {
                        out.push_str(&sql[last..i]);
                        let mut j = i + skip;
                        while j < b.len() && b[j].is_ascii_digit() {
                            j += 1;
                        }
                        out.push(' ');
                        i = j;
                        last = i;
                        in_exec = true;
                    }
                    _ => {
                        // A plain comment: kept whole.
                        let end = sql[i + 2..].find("*/").map_or(b.len(), |e| i + 2 + e + 2);
                        i = end;
                    }
                }
            }
            _ => i += 1,
        }
    }
    out.push_str(&sql[last.min(sql.len())..]);
    Cow::Owned(out)
}

/// Whether the text stores a value in a user variable (`@x := ...`,
/// `SET @x = ...`, `SELECT ... INTO @x`): a value there is beyond masking
/// (a later `SELECT @x` has no lineage). Text that does not tokenize counts.
pub fn assigns_user_variable(sql: &str) -> bool {
    let sql = unwrap_executable_comments(sql);
    let Ok(tokens) = Tokenizer::new(Dialect::MySql.parser_dialect(), &sql).tokenize() else {
        return true;
    };
    let is_var = |t: &Token| match t {
        Token::Word(w) => w.value.starts_with('@') && !w.value.starts_with("@@"),
        Token::AtSign => true,
        _ => false,
    };
    for segment in tokens.split(|t| *t == Token::SemiColon) {
        let sig: Vec<&Token> = segment
            .iter()
            .filter(|t| !matches!(t, Token::Whitespace(_)))
            .collect();
        if sig.iter().any(|t| matches!(t, Token::Assignment)) {
            return true;
        }
        let first_set =
            matches!(sig.first(), Some(Token::Word(w)) if w.value.eq_ignore_ascii_case("SET"));
        if first_set && sig.iter().any(|t| is_var(t)) {
            return true;
        }
        let into_var = sig.windows(2).any(|p| {
            matches!(p[0], Token::Word(w) if w.value.eq_ignore_ascii_case("INTO")) && is_var(p[1])
        });
        if into_var {
            return true;
        }
    }
    false
}

/// The database each statement of a text runs in, in order (`MySQL`'s
/// `USE db` changes it for the statements after it): `current` until a
/// `USE`; and the database after the text. `None` when the statements cannot be told apart by their
/// semicolons (a compound statement, a text that does not tokenize): the
/// caller then leaves names unqualified, which rules match as any schema's.
pub fn databases_per_statement(
    sql: &str,
    current: Option<&str>,
) -> Option<(Vec<Option<String>>, Option<String>)> {
    let tokens = Tokenizer::new(Dialect::MySql.parser_dialect(), sql)
        .tokenize()
        .ok()?;
    let mut db = current.map(str::to_owned);
    let mut out = Vec::new();
    for segment in tokens.split(|t| *t == Token::SemiColon) {
        let mut words = segment
            .iter()
            .filter(|t| !matches!(t, Token::Whitespace(_)))
            .peekable();
        let Some(first) = words.next() else { continue };
        let is = |t: Option<&&Token>, k: &str| matches!(t, Some(Token::Word(w)) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(k));
        let compound = (is(Some(&first), "CREATE")
            && segment.iter().any(|t| is(Some(&t), "BEGIN")))
            || (is(Some(&first), "BEGIN") && is(words.peek(), "NOT"));
        if compound {
            // A stored program or `BEGIN NOT ATOMIC`: its inner semicolons
            // are not statement ends.
            return None;
        }
        out.push(db.clone());
        if is(Some(&first), "USE") {
            match (words.next(), words.next()) {
                (Some(Token::Word(name)), None) => db = Some(name.value.clone()),
                _ => return None,
            }
        }
    }
    Some((out, db))
}

/// The note of a statement the keywords decide describes the schema
/// (`SHOW CREATE DATABASE`): a read whose result is no table's rows.
pub(super) const SCHEMA_DESCRIPTION: &str = "schema description: SHOW CREATE DATABASE";

/// Whether every statement of a pre-classified text only describes the
/// schema: then its results are not data (each statement's lineage has no
/// source), else they are of unknown origin.
pub(super) fn only_schema_descriptions(segments: &[Segment]) -> bool {
    segments.iter().all(|s| {
        s.info
            .as_ref()
            .is_some_and(|i| i.note.as_deref() == Some(SCHEMA_DESCRIPTION))
    })
}

/// One statement's class from its keywords, if the keywords decide it.
fn by_keywords(words: &[String]) -> Option<StatementInfo> {
    let w = |i: usize| words.get(i).map_or("", String::as_str);
    let info = |class: StatementClass, note: &str| StatementInfo {
        class,
        tables: Vec::new(),
        functions: Vec::new(),
        destructive: false,
        note: Some(note.to_owned()),
    };
    let has = |a: &str, b: &str| words.windows(2).any(|p| p[0] == a && p[1] == b);
    if has("INTO", "OUTFILE") || has("INTO", "DUMPFILE") {
        return Some(info(
            StatementClass::Admin,
            "file write: SELECT ... INTO OUTFILE/DUMPFILE writes a file on the server",
        ));
    }
    let admin = |note: &str| Some(info(StatementClass::Admin, note));
    let dcl = |note: &str| Some(info(StatementClass::Dcl, note));
    match (w(0), w(1)) {
        ("LOAD", "DATA" | "XML") => {
            let mut i = info(
                StatementClass::Admin,
                if words.iter().any(|x| x == "LOCAL") {
                    "file read: LOAD DATA LOCAL reads a file on the agent's host"
                } else {
                    "file read: LOAD DATA reads a file on the server"
                },
            );
            if let Some(p) = words
                .windows(3)
                .position(|p| p[0] == "INTO" && p[1] == "TABLE")
            {
                i.tables.push(words[p + 2].to_ascii_lowercase());
            }
            i.destructive = false;
            Some(i)
        }
        ("SHOW", "CREATE") if matches!(w(2), "DATABASE" | "SCHEMA") => {
            Some(info(StatementClass::Read, SCHEMA_DESCRIPTION))
        }
        ("SHOW", "CREATE") if w(2) == "USER" => {
            dcl("privilege: account definitions (with password hashes)")
        }
        ("LOAD" | "CACHE", "INDEX") => admin("admin: key cache control"),
        ("HANDLER", _) => admin("HANDLER reads table rows outside SQL (no lineage, no WHERE)"),
        ("CREATE" | "ALTER" | "DROP" | "RENAME", "USER" | "ROLE") => {
            dcl("privilege: account management")
        }
        ("SET", "PASSWORD" | "DEFAULT") | ("GRANT" | "REVOKE", _) => {
            dcl("privilege: grants or passwords")
        }
        ("SET", "GLOBAL" | "PERSIST" | "PERSIST_ONLY") => {
            admin("admin: changes a server-wide setting")
        }
        ("SET", v) if v.starts_with("@@GLOBAL.") || v.starts_with("@@PERSIST") => {
            admin("admin: changes a server-wide setting")
        }
        ("INSTALL" | "UNINSTALL", _) => admin("admin: installs or removes server code"),
        ("CREATE" | "DROP", "FUNCTION") if words.iter().any(|x| x == "SONAME") => {
            admin("admin: loads a shared library into the server")
        }
        ("CREATE" | "ALTER" | "DROP", "SERVER") => admin("admin: federated server definition"),
        (
            "SHUTDOWN" | "RESTART" | "KILL" | "FLUSH" | "RESET" | "PURGE" | "BINLOG" | "BACKUP",
            _,
        ) => admin("admin: server control"),
        ("CHANGE", "MASTER" | "REPLICATION") | ("START" | "STOP", "SLAVE" | "REPLICA" | "ALL") => {
            admin("admin: replication control")
        }
        ("OPTIMIZE" | "REPAIR" | "CHECKSUM", _) | ("ANALYZE" | "CHECK", "TABLE") => {
            admin("admin: table maintenance")
        }
        ("XA", _) => Some(info(StatementClass::Transaction, "XA transaction control")),
        ("LOCK", "TABLE" | "TABLES") => Some(info(StatementClass::Write, "takes table locks")),
        ("UNLOCK", "TABLE" | "TABLES") => {
            Some(info(StatementClass::Transaction, "releases table locks"))
        }
        ("DEALLOCATE" | "DROP", "PREPARE") => Some(info(
            StatementClass::Transaction,
            "releases a prepared statement",
        )),
        _ => None,
    }
}

/// The statements of `sql` (already through [`unwrap_executable_comments`]),
/// each with its class when keywords decide it. `None`: no statement is one
/// the keywords decide (the parser classifies the whole text), or the text
/// does not tokenize.
pub(super) fn preclassify(sql: &str, depth: u8) -> Option<Vec<Segment>> {
    let tokens = Tokenizer::new(Dialect::MySql.parser_dialect(), sql)
        .tokenize()
        .ok()?;
    let mut out = Vec::new();
    let mut any = false;
    for segment in tokens.split(|t| *t == Token::SemiColon) {
        let words: Vec<String> = segment
            .iter()
            .filter_map(|t| match t {
                Token::Word(w) if w.quote_style.is_none() => Some(w.value.to_ascii_uppercase()),
                _ => None,
            })
            .collect();
        let significant = segment.iter().any(|t| !matches!(t, Token::Whitespace(_)));
        if !significant {
            continue;
        }
        let mut info = by_keywords(&words);
        if words.first().map(String::as_str) == Some("PREPARE") {
            info = Some(prepared_text(segment, depth));
        }
        any |= info.is_some();
        out.push(Segment {
            tokens: segment.to_vec(),
            info,
        });
    }
    any.then_some(out)
}

/// One statement of a text: its tokens, and its class when keywords decide it.
pub(super) struct Segment {
    pub tokens: Vec<Token>,
    pub info: Option<StatementInfo>,
}

/// `PREPARE name FROM 'text'`: the text classified (one level deep).
fn prepared_text(segment: &[Token], depth: u8) -> StatementInfo {
    let significant: Vec<&Token> = segment
        .iter()
        .filter(|t| !matches!(t, Token::Whitespace(_)))
        .collect();
    let from = significant
        .iter()
        .position(|t| matches!(t, Token::Word(w) if w.value.eq_ignore_ascii_case("FROM")));
    let text = from.and_then(|i| match significant.get(i + 1) {
        Some(Token::SingleQuotedString(s) | Token::DoubleQuotedString(s)) => Some(s.clone()),
        _ => None,
    });
    let unknown = |note: &str| StatementInfo {
        class: StatementClass::Unknown,
        tables: Vec::new(),
        functions: Vec::new(),
        destructive: false,
        note: Some(note.to_owned()),
    };
    match text {
        Some(s) if depth < MAX_PREPARE_DEPTH => {
            let c = super::classify::classify_at(&s, Dialect::MySql, depth + 1);
            StatementInfo {
                class: c.class,
                tables: c.tables,
                functions: c.functions,
                destructive: c.destructive,
                note: Some("PREPARE: classified by the text it prepares".into()),
            }
        }
        Some(_) => unknown("PREPARE of a PREPARE, nested too deep"),
        None => unknown("PREPARE ... FROM a variable: the text is not visible here"),
    }
}

/// Classifies each segment: the keywords' class, or the parser's.
pub(super) fn classify_segments(segments: &[Segment]) -> Vec<StatementInfo> {
    let mut infos = Vec::with_capacity(segments.len());
    for s in segments {
        if let Some(i) = &s.info {
            infos.push(i.clone());
            continue;
        }
        let parsed = sqlparser::parser::Parser::new(Dialect::MySql.parser_dialect())
            .with_recursion_limit(PARSER_RECURSION_LIMIT)
            .with_tokens(s.tokens.clone())
            .parse_statements();
        match parsed {
            Ok(statements) => {
                infos.extend(statements.iter().map(super::classify::classify_statement));
            }
            Err(_) => infos.push(StatementInfo {
                class: StatementClass::Unknown,
                tables: Vec::new(),
                functions: Vec::new(),
                destructive: false,
                note: Some("does not parse".into()),
            }),
        }
    }
    infos
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::classify;

    fn class(sql: &str) -> StatementClass {
        classify(sql, Dialect::MySql).class
    }

    #[test]
    fn executable_comments_are_code() {
        assert_eq!(
            unwrap_executable_comments("/*!50000 DROP TABLE t */").trim(),
            "DROP TABLE t"
        );
        assert_eq!(class("/*!50000 DROP TABLE t */"), StatementClass::Ddl);
        assert_eq!(class("/*M!100000 DROP TABLE t */"), StatementClass::Ddl);
        assert_eq!(class("SELECT 1 /*! ; DROP TABLE t */"), StatementClass::Ddl);
        // Inside a string it is a string.
        assert_eq!(
            unwrap_executable_comments("SELECT '/*!50000 DROP TABLE t */'"),
            "SELECT '/*!50000 DROP TABLE t */'"
        );
        assert_eq!(class("SELECT '/*! DROP TABLE t */'"), StatementClass::Read);
        // A plain comment stays a comment.
        assert_eq!(class("SELECT 1 /* DROP TABLE t */"), StatementClass::Read);
    }

    #[test]
    fn statements_the_parser_does_not_know_get_a_precise_class() {
        let cases = [
            (
                "LOAD DATA LOCAL INFILE '/etc/passwd' INTO TABLE t",
                StatementClass::Admin,
            ),
            (
                "LOAD DATA INFILE '/var/lib/x' INTO TABLE t",
                StatementClass::Admin,
            ),
            (
                "SELECT * FROM t INTO OUTFILE '/tmp/x'",
                StatementClass::Admin,
            ),
            (
                "SELECT ssn FROM t INTO DUMPFILE '/tmp/x'",
                StatementClass::Admin,
            ),
            ("HANDLER t OPEN", StatementClass::Admin),
            ("HANDLER t READ FIRST", StatementClass::Admin),
            ("CREATE USER 'a'@'%' IDENTIFIED BY 'x'", StatementClass::Dcl),
            ("ALTER USER 'a'@'%' IDENTIFIED BY 'x'", StatementClass::Dcl),
            ("DROP USER 'a'@'%'", StatementClass::Dcl),
            (
                "SET PASSWORD FOR 'a'@'%' = PASSWORD('x')",
                StatementClass::Dcl,
            ),
            ("GRANT ALL ON *.* TO 'a'@'%'", StatementClass::Dcl),
            ("INSTALL PLUGIN x SONAME 'x.so'", StatementClass::Admin),
            ("INSTALL SONAME 'auth_ed25519'", StatementClass::Admin),
            ("SHUTDOWN", StatementClass::Admin),
            ("KILL 12", StatementClass::Admin),
            ("KILL QUERY 12", StatementClass::Admin),
            ("FLUSH PRIVILEGES", StatementClass::Admin),
            ("SET GLOBAL general_log = 1", StatementClass::Admin),
            ("SET @@global.general_log = 1", StatementClass::Admin),
            ("PURGE BINARY LOGS TO 'x'", StatementClass::Admin),
            ("CHANGE MASTER TO MASTER_HOST='x'", StatementClass::Admin),
            ("XA START 'x'", StatementClass::Transaction),
            ("PREPARE s FROM 'DELETE FROM t'", StatementClass::Write),
            ("PREPARE s FROM 'SELECT 1'", StatementClass::Read),
            ("PREPARE s FROM @q", StatementClass::Unknown),
            (
                "CREATE FUNCTION f RETURNS STRING SONAME 'x.so'",
                StatementClass::Admin,
            ),
            (
                "SELECT 1; LOAD DATA LOCAL INFILE 'x' INTO TABLE t",
                StatementClass::Admin,
            ),
            ("SELECT 1; SELECT 2", StatementClass::Read),
            ("SHOW CREATE DATABASE shop", StatementClass::Read),
            ("SHOW CREATE SCHEMA shop", StatementClass::Read),
            ("SHOW CREATE USER app", StatementClass::Dcl),
        ];
        for (sql, want) in cases {
            assert_eq!(class(sql), want, "{sql}");
        }
        let c = classify("LOAD DATA LOCAL INFILE 'x' INTO TABLE t", Dialect::MySql);
        assert_eq!(c.tables, ["t"]);
        assert!(
            c.statements[0]
                .note
                .as_deref()
                .unwrap()
                .starts_with("file read")
        );
    }

    #[test]
    fn schema_descriptions_are_not_data_and_anything_else_unparsed_is_unknown() {
        use crate::sql::{analyze_uncached, lineage::Outputs};
        let a = analyze_uncached("SHOW CREATE DATABASE shop", Dialect::MySql);
        let l = a.lineage.expect("a schema description has lineage");
        assert!(matches!(&l[0].outputs, Outputs::Known(o) if o.is_empty()));
        let a = analyze_uncached("SHOW CREATE TABLE customers", Dialect::MySql);
        assert!(matches!(
            &a.lineage.unwrap()[0].outputs,
            Outputs::Known(o) if o.len() == 2
        ));
        for sql in [
            "SHOW CREATE DATABASE shop; HANDLER t OPEN",
            "SHOW CREATE USER app",
            "LOAD DATA LOCAL INFILE 'x' INTO TABLE t",
        ] {
            assert!(
                analyze_uncached(sql, Dialect::MySql).lineage.is_none(),
                "{sql}"
            );
        }
    }

    #[test]
    fn use_inside_a_text_moves_the_statements_after_it() {
        let (dbs, after) = databases_per_statement(
            "SELECT 1; USE `other`; SELECT ssn FROM customers; use shop ; SELECT 2; USE x",
            Some("shop"),
        )
        .unwrap();
        assert_eq!(after.as_deref(), Some("x"));
        let want = [
            Some("shop"),
            Some("shop"),
            Some("other"),
            Some("other"),
            Some("shop"),
            Some("shop"),
        ];
        assert_eq!(dbs, want.map(|d| d.map(str::to_owned)));
        assert_eq!(
            databases_per_statement("SELECT ';'; SELECT 2", None).unwrap(),
            (vec![None, None], None)
        );
        assert!(
            databases_per_statement("CREATE PROCEDURE p() BEGIN SELECT 1; SELECT 2; END", None)
                .is_none()
        );
        assert!(databases_per_statement("BEGIN NOT ATOMIC SELECT 1; END", None).is_none());
        assert_eq!(
            databases_per_statement("BEGIN; SELECT 1", None)
                .unwrap()
                .0
                .len(),
            2
        );
        // And the lineage of the statement after the USE names `other`'s table.
        let mut l =
            crate::sql::lineage::lineage("SELECT REVERSE(ssn) FROM customers", Dialect::MySql)
                .unwrap()
                .remove(0);
        l.qualify("other");
        let crate::sql::lineage::Outputs::Known(o) = &l.outputs else {
            panic!()
        };
        let crate::sql::lineage::Output::Column { lineage, .. } = &o[0] else {
            panic!()
        };
        assert!(
            lineage
                .sources
                .keys()
                .all(|s| s.relation == "other.customers"),
            "{lineage:?}"
        );
    }

    #[test]
    fn user_variable_assignments_are_found() {
        for sql in [
            "SELECT @x := ssn FROM t",
            "SET @x = (SELECT ssn FROM t)",
            "SELECT ssn INTO @v FROM t",
            "SELECT a, b INTO @a, @b FROM t",
            "SELECT 1; SET @y = 2",
            "/*!50000 SET @x = 1 */",
        ] {
            assert!(assigns_user_variable(sql), "{sql}");
        }
        for sql in [
            "SELECT @x",
            "SELECT ssn FROM t WHERE id = @id",
            "SELECT @@version",
            "SET NAMES utf8mb4",
            "SELECT ':=' FROM t",
        ] {
            assert!(!assigns_user_variable(sql), "{sql}");
        }
    }

    #[test]
    fn a_keyword_statement_among_parsed_ones_keeps_the_others_classes() {
        let c = classify("XA START 'x'; DELETE FROM t; XA END 'x'", Dialect::MySql);
        assert_eq!(c.class, StatementClass::Write);
        assert_eq!(c.statements.len(), 3);
        let c = classify("XA START 'x'; this is not sql", Dialect::MySql);
        assert_eq!(c.class, StatementClass::Unknown);
    }
}
