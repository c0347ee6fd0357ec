//! Statement classification from the AST.
//!
//! Classes are ordered by danger (see [`StatementClass`]); a string with several
//! statements takes the class of its most dangerous one. Every decision that could
//! go either way goes the conservative way:
//!
//! - text over [`MAX_SQL_LEN`] bytes, or that does not parse (this includes
//!   `PostgreSQL` `DO` blocks, which sqlparser does not model), is `Unknown`;
//! - `EXECUTE` of a prepared statement and `CALL` of a procedure are `Unknown`
//!   (what runs is not in the text); `PREPARE` takes the class of the statement
//!   it prepares;
//! - a query whose `WITH` (or any nested position) holds `INSERT`/`UPDATE`/
//!   `DELETE`/`MERGE` is `Write`; `SELECT ... INTO new_table` is `Ddl`;
//!   `SELECT ... FOR UPDATE/SHARE` is `Write` (it takes row locks);
//! - `COPY ... TO/FROM 'file'` and `COPY ... PROGRAM` are `Admin` (server files
//!   and programs); `COPY ... TO STDOUT` is `Read`, `COPY ... FROM STDIN` `Write`;
//! - calls of functions that touch server files, run programs or control the
//!   server (`pg_read_file`, `lo_export`, `pg_terminate_backend`, `set_config`,
//!   `MySQL` `load_file`, ...) are `Admin`; calls of functions that run SQL given
//!   as a string, which we cannot see (`dblink*`, `query_to_xml`, `ts_stat`,
//!   `table_to_xml`, ...) are `Unknown`; `nextval`/`setval` and large-object
//!   writers are `Write`. See [`ADMIN_FUNCTIONS`], [`OPAQUE_SQL_FUNCTIONS`],
//!   [`WRITE_FUNCTIONS`].
//!
//! What this cannot see: user-defined functions with side effects look like
//! any other function call. Govern them with a rule's `functions` condition or
//! with database grants.

use std::ops::ControlFlow;

use serde::{Deserialize, Serialize};
use sqlparser::ast::{
    CopySource, CopyTarget, Expr, ObjectName, ObjectNamePart, ObjectType, Query, Reset, Select,
    Set, SetExpr, Statement, TableFactor, Visit, Visitor,
};

use sqlparser::tokenizer::{Token, Tokenizer};

use super::Dialect;

/// Longest SQL text handed to the parser. Longer text is `Unknown` without parsing:
/// parse time and memory grow with length, and a statement this long from an
/// agent is worth a human look anyway.
pub const MAX_SQL_LEN: usize = 1024 * 1024;

/// Nesting depth the parser accepts before giving up (then: `Unknown`).
pub(super) const PARSER_RECURSION_LIMIT: usize = 64;

/// What a statement does, ordered from least to most dangerous; `Ord` follows
/// danger, so the worst of several is their `max`.
///
/// `Transaction` (transaction control and session settings that change nothing
/// outside the session: `BEGIN`, `COMMIT`, `SAVEPOINT`, `SET application_name`,
/// `DISCARD ALL`, ...) sits below `Read`: on its own it neither discloses nor
/// changes data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StatementClass {
    Transaction,
    Read,
    Write,
    Ddl,
    Dcl,
    Admin,
    Unknown,
}

impl StatementClass {
    pub const ALL: [StatementClass; 7] = [
        StatementClass::Transaction,
        StatementClass::Read,
        StatementClass::Write,
        StatementClass::Ddl,
        StatementClass::Dcl,
        StatementClass::Admin,
        StatementClass::Unknown,
    ];

    /// The name used in policy files and records.
    pub fn as_str(self) -> &'static str {
        match self {
            StatementClass::Transaction => "transaction",
            StatementClass::Read => "read",
            StatementClass::Write => "write",
            StatementClass::Ddl => "ddl",
            StatementClass::Dcl => "dcl",
            StatementClass::Admin => "admin",
            StatementClass::Unknown => "unknown",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|c| c.as_str().eq_ignore_ascii_case(s))
    }
}

impl std::fmt::Display for StatementClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One statement of a (possibly multi-statement) string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatementInfo {
    pub class: StatementClass,
    /// Tables and views referenced, lower-cased unless quoted, `schema.table` when qualified.
    pub tables: Vec<String>,
    /// Functions called (including table functions), named as written (lower-cased unless quoted).
    pub functions: Vec<String>,
    /// `DELETE`/`UPDATE` without `WHERE`, `TRUNCATE`, `DROP ...`.
    pub destructive: bool,
    /// Why the class is higher than the statement kind alone suggests, if it is.
    pub note: Option<String>,
}

/// The result of classifying one SQL string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Classification {
    /// The most dangerous class among the statements.
    pub class: StatementClass,
    pub statements: Vec<StatementInfo>,
    /// Union of the statements' tables, first-seen order.
    pub tables: Vec<String>,
    /// Union of the statements' functions, first-seen order.
    pub functions: Vec<String>,
    /// Any statement is destructive.
    pub destructive: bool,
    /// Set when the text was not parsed (too long, parse error): why it is `Unknown`.
    pub reason: Option<String>,
}

impl Classification {
    fn unparsed(reason: String) -> Self {
        Classification {
            class: StatementClass::Unknown,
            statements: Vec::new(),
            tables: Vec::new(),
            functions: Vec::new(),
            destructive: false,
            reason: Some(reason),
        }
    }
}

/// A parser error without the token it found: that token may be a literal
/// (an SSN, a card number), and the reason goes into audit records. Keeps
/// what was expected and where; any quoted text left is replaced by `'?'`.
fn literal_free_error(msg: &str) -> String {
    let (body, at) = match msg.rfind(" at Line: ") {
        Some(i) => (&msg[..i], &msg[i..]),
        None => (msg, ""),
    };
    let body = body.find(", found: ").map_or(body, |i| &body[..i]);
    let mut out = String::with_capacity(body.len() + at.len());
    let mut quoted = false;
    for c in body.chars() {
        match (c, quoted) {
            ('\'', false) => {
                out.push_str("'?'");
                quoted = true;
            }
            ('\'', true) => quoted = false,
            (_, true) => {}
            (c, false) => out.push(c),
        }
    }
    out.push_str(at);
    out
}

/// Classify SQL text. Never fails: what cannot be classified is `Unknown`.
pub fn classify(sql: &str, dialect: Dialect) -> Classification {
    classify_at(sql, dialect, 0)
}

/// [`classify`], `depth` levels into `PREPARE ... FROM '...'` texts.
pub(super) fn classify_at(sql: &str, dialect: Dialect, depth: u8) -> Classification {
    if sql.len() > MAX_SQL_LEN {
        return Classification::unparsed(format!(
            "SQL text is {} bytes, over the {MAX_SQL_LEN}-byte limit",
            sql.len()
        ));
    }
    if dialect == Dialect::MySql {
        let sql = super::mysql::unwrap_executable_comments(sql);
        if let Some(segments) = super::mysql::preclassify(&sql, depth) {
            return combine(super::mysql::classify_segments(&segments));
        }
        return classify_plain(&sql, dialect);
    }
    classify_plain(sql, dialect)
}

fn classify_plain(sql: &str, dialect: Dialect) -> Classification {
    if sql.len() > MAX_SQL_LEN {
        return Classification::unparsed(format!(
            "SQL text is {} bytes, over the {MAX_SQL_LEN}-byte limit",
            sql.len()
        ));
    }
    let parsed = sqlparser::parser::Parser::new(dialect.parser_dialect())
        .with_recursion_limit(PARSER_RECURSION_LIMIT)
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_statements());
    let infos: Vec<StatementInfo> = match parsed {
        Ok(statements) => return classify_parsed(&statements),
        Err(e) => {
            let Some(pieces) = cursor_move_pieces(sql, dialect) else {
                return Classification::unparsed(format!(
                    "does not parse: {}",
                    literal_free_error(&e.to_string())
                ));
            };
            let mut infos = Vec::with_capacity(pieces.len());
            for piece in &pieces {
                match piece {
                    // A read of no table: its query was decided at `DECLARE`.
                    Piece::CursorMove(_) => infos.push(StatementInfo {
                        class: StatementClass::Read,
                        tables: Vec::new(),
                        functions: Vec::new(),
                        destructive: false,
                        note: None,
                    }),
                    Piece::Parsed(statements) => {
                        infos.extend(statements.iter().map(classify_statement));
                    }
                }
            }
            infos
        }
    };
    combine(infos)
}

/// Classify statements already parsed (from text under [`MAX_SQL_LEN`]).
pub(super) fn classify_parsed(statements: &[Statement]) -> Classification {
    combine(statements.iter().map(classify_statement).collect())
}

fn combine(infos: Vec<StatementInfo>) -> Classification {
    let mut out = Classification {
        class: infos
            .iter()
            .map(|s| s.class)
            .max()
            .unwrap_or(StatementClass::Transaction),
        tables: Vec::new(),
        functions: Vec::new(),
        destructive: infos.iter().any(|s| s.destructive),
        reason: None,
        statements: Vec::new(),
    };
    for info in &infos {
        for t in &info.tables {
            push_unique(&mut out.tables, t);
        }
        for f in &info.functions {
            push_unique(&mut out.functions, f);
        }
    }
    out.statements = infos;
    out
}

/// One statement of a text the parser refused as a whole, from
/// [`cursor_move_pieces`].
pub(super) enum Piece {
    /// A cursor move: its tokens, without whitespace and comments.
    CursorMove(Vec<Token>),
    /// Any other statement, parsed on its own.
    Parsed(Vec<Statement>),
}

/// The statements of a Postgres text the parser refused because some of them
/// are cursor moves it does not know (`MOVE`; `FETCH` without a direction or
/// with a signed count). Such a move is a read of no table (the query was
/// decided at its `DECLARE`), like the `FETCH` forms the parser knows. The
/// other statements must parse on their own. `None` when no statement is such
/// a move, or another does not parse: the text stays unparsed (`Unknown`).
pub(super) fn cursor_move_pieces(sql: &str, dialect: Dialect) -> Option<Vec<Piece>> {
    if dialect != Dialect::Postgres || sql.len() > MAX_SQL_LEN {
        return None;
    }
    let tokens = Tokenizer::new(dialect.parser_dialect(), sql)
        .tokenize()
        .ok()?;
    let mut pieces = Vec::new();
    // The tokenizer keeps a quoted `;` inside its literal: a `SemiColon`
    // token ends a statement.
    for segment in tokens.split(|t| *t == Token::SemiColon) {
        let words: Vec<Token> = segment
            .iter()
            .filter(|t| !matches!(t, Token::Whitespace(_)))
            .cloned()
            .collect();
        if words.is_empty() {
            continue;
        }
        if is_cursor_move(&words) {
            pieces.push(Piece::CursorMove(words));
            continue;
        }
        let statements = sqlparser::parser::Parser::new(dialect.parser_dialect())
            .with_recursion_limit(PARSER_RECURSION_LIMIT)
            .with_tokens(segment.to_vec())
            .parse_statements()
            .ok()?;
        pieces.push(Piece::Parsed(statements));
    }
    pieces
        .iter()
        .any(|p| matches!(p, Piece::CursorMove(_)))
        .then_some(pieces)
}

/// `{FETCH | MOVE} [direction] [FROM | IN] cursor` (Postgres' grammar), the
/// statement's tokens without whitespace and comments.
fn is_cursor_move(t: &[Token]) -> bool {
    let word = |i: usize| match t.get(i) {
        Some(Token::Word(w)) if w.quote_style.is_none() => Some(w.value.to_ascii_uppercase()),
        _ => None,
    };
    // Tokens taken by a count (`5`, `-1`, `+2`) at `i`, if there is one.
    let count = |i: usize| {
        let int = |n: &str| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit());
        match (t.get(i), t.get(i + 1)) {
            (Some(Token::Minus | Token::Plus), Some(Token::Number(n, _))) if int(n) => Some(2),
            (Some(Token::Number(n, _)), _) if int(n) => Some(1),
            _ => None,
        }
    };
    if !matches!(word(0).as_deref(), Some("FETCH" | "MOVE")) {
        return false;
    }
    let mut i = 1;
    match word(i).as_deref() {
        Some("NEXT" | "PRIOR" | "FIRST" | "LAST" | "ALL") => i += 1,
        Some("ABSOLUTE" | "RELATIVE") => match count(i + 1) {
            Some(n) => i += 1 + n,
            None => return false,
        },
        Some("FORWARD" | "BACKWARD") => {
            i += 1;
            if word(i).as_deref() == Some("ALL") {
                i += 1;
            } else if let Some(n) = count(i) {
                i += n;
            }
        }
        _ => i += count(i).unwrap_or(0),
    }
    if matches!(word(i).as_deref(), Some("FROM" | "IN")) {
        i += 1;
    }
    matches!(t.get(i), Some(Token::Word(_))) && i + 1 == t.len()
}

fn push_unique(v: &mut Vec<String>, s: &str) {
    if !v.iter().any(|x| x == s) {
        v.push(s.to_owned());
    }
}

/// Functions that read or write server files, run programs, or control the
/// server or other sessions: `Admin`. Matched on the unqualified, lower-cased name.
pub const ADMIN_FUNCTIONS: &[&str] = &[
    // PostgreSQL server files
    "pg_read_file",
    "pg_read_binary_file",
    "pg_stat_file",
    "pg_ls_dir",
    "pg_ls_logdir",
    "pg_ls_waldir",
    "pg_ls_tmpdir",
    "pg_ls_archive_statusdir",
    "pg_ls_logicalsnapdir",
    "pg_ls_logicalmapdir",
    "pg_ls_replslotdir",
    "pg_logdir_ls",
    "lo_import",
    "lo_export",
    // server control and other sessions
    "pg_terminate_backend",
    "pg_cancel_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_switch_wal",
    "pg_create_restore_point",
    "pg_promote",
    "pg_backup_start",
    "pg_backup_stop",
    "pg_start_backup",
    "pg_stop_backup",
    "pg_create_physical_replication_slot",
    "pg_create_logical_replication_slot",
    "pg_drop_replication_slot",
    "pg_logical_emit_message",
    "pg_wal_replay_pause",
    "pg_wal_replay_resume",
    "set_config",
    // MySQL
    "load_file",
    "sys_exec",
    "sys_eval",
];

/// Name prefixes treated like [`ADMIN_FUNCTIONS`] (adminpack's `pg_file_write`,
/// `pg_file_unlink`, ..., and any `pg_write_*`).
pub const ADMIN_FUNCTION_PREFIXES: &[&str] = &["pg_file_", "pg_write_", "pg_ls_"];

/// Functions that run SQL passed as a string (or read a table named by a string),
/// so the statement that really runs is invisible here: `Unknown`.
pub const OPAQUE_SQL_FUNCTIONS: &[&str] = &[
    "query_to_xml",
    "query_to_xmlschema",
    "query_to_xml_and_xmlschema",
    "cursor_to_xml",
    "cursor_to_xmlschema",
    "table_to_xml",
    "table_to_xmlschema",
    "table_to_xml_and_xmlschema",
    "schema_to_xml",
    "schema_to_xmlschema",
    "schema_to_xml_and_xmlschema",
    "database_to_xml",
    "database_to_xmlschema",
    "database_to_xml_and_xmlschema",
    "ts_stat",
];

/// Prefixes treated like [`OPAQUE_SQL_FUNCTIONS`] (`dblink`, `dblink_exec`, ...).
pub const OPAQUE_SQL_FUNCTION_PREFIXES: &[&str] = &["dblink"];

/// Functions that change data although called from a `SELECT`: `Write`.
pub const WRITE_FUNCTIONS: &[&str] = &[
    "nextval",
    "setval",
    "lo_create",
    "lo_creat",
    "lo_unlink",
    "lo_put",
    "lo_from_bytea",
    "lowrite",
    "lo_truncate",
    "lo_truncate64",
];

/// Session settings that change nothing outside the session: `SET` of these is
/// `Transaction`. Any other `SET` is `Admin`; `SET ROLE` and `SET SESSION
/// AUTHORIZATION` are `Dcl`.
const BENIGN_SETTINGS: &[&str] = &[
    "application_name",
    "client_encoding",
    "client_min_messages",
    "datestyle",
    "intervalstyle",
    "timezone",
    "time zone",
    "extra_float_digits",
    "search_path",
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "standard_conforming_strings",
    "bytea_output",
    "default_transaction_isolation",
    "default_transaction_read_only",
    "transaction_isolation",
    "transaction_read_only",
    "names",
    "character_set_client",
    "character_set_results",
    "character_set_connection",
    "collation_connection",
    "autocommit",
    "sql_select_limit",
    "max_execution_time",
    "net_read_timeout",
    "net_write_timeout",
    "wait_timeout",
    "time_zone",
    "sql_mode",
];

fn function_class(name: &str) -> Option<(StatementClass, &'static str)> {
    let base = name.rsplit('.').next().unwrap_or(name).to_ascii_lowercase();
    let base = base.as_str();
    if OPAQUE_SQL_FUNCTIONS.contains(&base)
        || OPAQUE_SQL_FUNCTION_PREFIXES
            .iter()
            .any(|p| base.starts_with(p))
    {
        return Some((
            StatementClass::Unknown,
            "runs SQL text that cannot be inspected",
        ));
    }
    if ADMIN_FUNCTIONS.contains(&base)
        || ADMIN_FUNCTION_PREFIXES.iter().any(|p| base.starts_with(p))
    {
        return Some((
            StatementClass::Admin,
            "touches server files, programs or other sessions",
        ));
    }
    if WRITE_FUNCTIONS.contains(&base) {
        return Some((StatementClass::Write, "changes data"));
    }
    None
}

pub(crate) fn object_name(name: &ObjectName) -> String {
    let mut out = String::new();
    for (i, part) in name.0.iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        match part {
            ObjectNamePart::Identifier(id) => {
                if id.quote_style.is_some() {
                    out.push_str(&id.value);
                } else {
                    out.push_str(&id.value.to_lowercase());
                }
            }
            ObjectNamePart::Function(f) => out.push_str(&f.to_string()),
        }
    }
    out
}

fn setting_class(name: &ObjectName, global: bool) -> StatementClass {
    let n = object_name(name);
    if n.starts_with('@') && !n.starts_with("@@") {
        // MySQL user variable: session-local by definition.
        return StatementClass::Transaction;
    }
    let n = n
        .trim_start_matches("@@")
        .trim_start_matches("session.")
        .trim_start_matches("local.");
    if global || n.starts_with("global.") {
        return StatementClass::Admin;
    }
    if BENIGN_SETTINGS.contains(&n) {
        StatementClass::Transaction
    } else if n == "role" || n == "session_authorization" {
        StatementClass::Dcl
    } else {
        StatementClass::Admin
    }
}

fn set_class(set: &Set) -> StatementClass {
    use sqlparser::ast::ContextModifier;
    let is_global =
        |scope: &Option<ContextModifier>| matches!(scope, Some(ContextModifier::Global));
    match set {
        Set::SingleAssignment {
            scope, variable, ..
        } => setting_class(variable, is_global(scope)),
        Set::ParenthesizedAssignments { variables, .. } => variables
            .iter()
            .map(|v| setting_class(v, false))
            .max()
            .unwrap_or(StatementClass::Admin),
        Set::MultipleAssignments { assignments } => assignments
            .iter()
            .map(|a| setting_class(&a.name, is_global(&a.scope)))
            .max()
            .unwrap_or(StatementClass::Admin),
        Set::SetRole { .. } | Set::SetSessionAuthorization(_) => StatementClass::Dcl,
        Set::SetTransaction { .. }
        | Set::SetTimeZone { .. }
        | Set::SetNames { .. }
        | Set::SetNamesDefault {} => StatementClass::Transaction,
        Set::SetSessionParam(_) => StatementClass::Admin,
    }
}

/// The class a statement has by its kind alone (nested content is added by the walker).
#[allow(clippy::too_many_lines)]
fn base_class(stmt: &Statement) -> (StatementClass, bool) {
    use StatementClass as C;
    let class = match stmt {
        Statement::Query(_)
        | Statement::ExplainTable { .. }
        | Statement::Explain { .. }
        | Statement::Declare { .. }
        | Statement::Fetch { .. }
        | Statement::ShowFunctions { .. }
        | Statement::ShowVariable { .. }
        | Statement::ShowStatus { .. }
        | Statement::ShowVariables { .. }
        | Statement::ShowCreate { .. }
        | Statement::ShowColumns { .. }
        | Statement::ShowCatalogs { .. }
        | Statement::ShowDatabases { .. }
        | Statement::ShowSchemas { .. }
        | Statement::ShowCharset(_)
        | Statement::ShowObjects(_)
        | Statement::ShowTables { .. }
        | Statement::ShowViews { .. }
        | Statement::ShowCollation { .. }
        | Statement::LISTEN { .. }
        | Statement::UNLISTEN { .. } => C::Read,
        Statement::Insert(_)
        | Statement::Merge(_)
        | Statement::NOTIFY { .. }
        | Statement::Lock(_)
        | Statement::LockTables { .. } => C::Write,
        Statement::Update(u) => return (C::Write, u.selection.is_none()),
        Statement::Delete(d) => return (C::Write, d.selection.is_none()),
        Statement::Truncate(_) => return (C::Write, true),
        Statement::Copy {
            source, to, target, ..
        } => match (target, to, source) {
            (CopyTarget::File { .. } | CopyTarget::Program { .. }, _, _) => C::Admin,
            (CopyTarget::Stdout, true, _) => C::Read,
            (CopyTarget::Stdin, false, CopySource::Table { .. }) => C::Write,
            _ => C::Unknown,
        },
        Statement::Drop { object_type, .. } => {
            let class = match object_type {
                ObjectType::Role | ObjectType::User => C::Dcl,
                _ => C::Ddl,
            };
            return (class, true);
        }
        Statement::DropFunction(_)
        | Statement::DropDomain(_)
        | Statement::DropProcedure { .. }
        | Statement::DropExtension(_)
        | Statement::DropOperator(_)
        | Statement::DropOperatorFamily(_)
        | Statement::DropOperatorClass(_)
        | Statement::DropTrigger(_) => return (C::Ddl, true),
        Statement::DropPolicy(_) => return (C::Dcl, true),
        Statement::CreateView(_)
        | Statement::CreateTable(_)
        | Statement::CreateVirtualTable { .. }
        | Statement::CreateIndex(_)
        | Statement::CreateOperator(_)
        | Statement::CreateOperatorFamily(_)
        | Statement::CreateOperatorClass(_)
        | Statement::CreateTextSearch(_)
        | Statement::AlterTable(_)
        | Statement::AlterSchema(_)
        | Statement::AlterIndex { .. }
        | Statement::AlterView { .. }
        | Statement::AlterFunction(_)
        | Statement::AlterType(_)
        | Statement::AlterCollation(_)
        | Statement::AlterOperator(_)
        | Statement::AlterOperatorFamily(_)
        | Statement::AlterOperatorClass(_)
        | Statement::AlterTextSearch(_)
        | Statement::CreateExtension(_)
        | Statement::CreateCollation(_)
        | Statement::Comment { .. }
        | Statement::CreateSchema { .. }
        | Statement::CreateDatabase { .. }
        | Statement::CreateFunction(_)
        | Statement::CreateTrigger(_)
        | Statement::CreateProcedure { .. }
        | Statement::CreateSequence { .. }
        | Statement::CreateDomain(_)
        | Statement::CreateType { .. }
        | Statement::RenameTable(_) => C::Ddl,
        Statement::Grant(_)
        | Statement::Revoke(_)
        | Statement::Deny(_)
        | Statement::CreateRole(_)
        | Statement::AlterRole { .. }
        | Statement::CreateUser(_)
        | Statement::AlterUser(_)
        | Statement::CreatePolicy(_)
        | Statement::AlterPolicy(_) => C::Dcl,
        Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. }
        | Statement::Savepoint { .. }
        | Statement::ReleaseSavepoint { .. }
        | Statement::Close { .. }
        | Statement::Discard { .. }
        | Statement::Deallocate { .. }
        | Statement::Prepare { .. }
        | Statement::Use(_)
        | Statement::UnlockTables => C::Transaction,
        Statement::Reset(r) => match &r.reset {
            Reset::ALL => C::Transaction,
            Reset::SessionAuthorization => C::Dcl,
            Reset::ConfigurationParameter(name) => setting_class(name, false),
        },
        Statement::Set(set) => set_class(set),
        Statement::ShowProcessList { .. }
        | Statement::Analyze(_)
        | Statement::Vacuum(_)
        | Statement::OptimizeTable { .. }
        | Statement::Flush { .. }
        | Statement::Kill { .. }
        | Statement::Install { .. }
        | Statement::Load { .. }
        | Statement::LoadData { .. }
        | Statement::Directory { .. }
        | Statement::AttachDatabase { .. }
        | Statement::AlterSession { .. }
        | Statement::CreateServer(_)
        | Statement::CreateSecret { .. }
        | Statement::CreateConnector(_)
        | Statement::Msck(_)
        | Statement::Cache { .. }
        | Statement::UNCache { .. }
        | Statement::Pragma { .. }
        | Statement::ExportData(_)
        | Statement::Unload { .. } => C::Admin,
        // EXECUTE, CALL, procedural blocks and anything not listed above.
        _ => C::Unknown,
    };
    (class, false)
}

/// Walks one top-level statement and everything nested in it.
struct Walker {
    class: StatementClass,
    destructive: bool,
    note: Option<String>,
    tables: Vec<String>,
    functions: Vec<String>,
    table_functions: Vec<String>,
    ctes: Vec<String>,
    /// Depth of `EXPLAIN` (without `ANALYZE`) we are inside: nested statements
    /// there are not run, so they add tables but not their class.
    explain_depth: usize,
}

impl Walker {
    fn raise(&mut self, class: StatementClass, why: impl FnOnce() -> String) {
        if self.explain_depth > 0 {
            return;
        }
        if class > self.class {
            self.class = class;
            self.note = Some(why());
        }
    }
}

impl Visitor for Walker {
    type Break = ();

    fn pre_visit_statement(&mut self, stmt: &Statement) -> ControlFlow<()> {
        let (class, destructive) = base_class(stmt);
        if self.explain_depth == 0 {
            if class > self.class {
                self.class = class;
            }
            self.destructive |= destructive;
        }
        if let Statement::Explain { analyze: false, .. } = stmt {
            self.explain_depth += 1;
        }
        if let Statement::Call(f) = stmt {
            push_unique(&mut self.functions, &object_name(&f.name));
        }
        ControlFlow::Continue(())
    }

    fn post_visit_statement(&mut self, stmt: &Statement) -> ControlFlow<()> {
        if let Statement::Explain { analyze: false, .. } = stmt {
            self.explain_depth -= 1;
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if let Some(with) = &query.with {
            for cte in &with.cte_tables {
                let name = if cte.alias.name.quote_style.is_some() {
                    cte.alias.name.value.clone()
                } else {
                    cte.alias.name.value.to_lowercase()
                };
                push_unique(&mut self.ctes, &name);
            }
        }
        if !query.locks.is_empty() {
            self.raise(StatementClass::Write, || {
                "SELECT ... FOR UPDATE/SHARE takes row locks".into()
            });
        }
        if matches!(
            *query.body,
            SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_)
        ) {
            self.raise(StatementClass::Write, || {
                "data-modifying statement nested in a query".into()
            });
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, select: &Select) -> ControlFlow<()> {
        if select.into.is_some() {
            self.raise(StatementClass::Ddl, || {
                "SELECT ... INTO creates a table".into()
            });
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_relation(&mut self, relation: &ObjectName) -> ControlFlow<()> {
        push_unique(&mut self.tables, &object_name(relation));
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, tf: &TableFactor) -> ControlFlow<()> {
        let name = match tf {
            TableFactor::Table {
                name,
                args: Some(_),
                ..
            }
            | TableFactor::Function { name, .. } => Some(object_name(name)),
            _ => None,
        };
        if let Some(name) = name {
            self.note_function(&name);
            push_unique(&mut self.table_functions, &name);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if let Expr::Function(f) = expr {
            self.note_function(&object_name(&f.name));
        }
        ControlFlow::Continue(())
    }
}

impl Walker {
    fn note_function(&mut self, name: &str) {
        push_unique(&mut self.functions, name);
        if let Some((class, why)) = function_class(name) {
            self.raise(class, || format!("calls {name}: {why}"));
        }
    }
}

pub(super) fn classify_statement(stmt: &Statement) -> StatementInfo {
    let mut w = Walker {
        class: StatementClass::Transaction,
        destructive: false,
        note: None,
        tables: Vec::new(),
        functions: Vec::new(),
        table_functions: Vec::new(),
        ctes: Vec::new(),
        explain_depth: 0,
    };
    let _ = stmt.visit(&mut w);
    if let Statement::Execute { .. } = stmt {
        w.note = Some("EXECUTE runs a prepared statement not visible here".into());
    } else if let Statement::Call(_) = stmt {
        w.note = Some("CALL runs a procedure not visible here".into());
    }
    let Walker {
        class,
        destructive,
        note,
        tables,
        functions,
        table_functions,
        ctes,
        ..
    } = w;
    let tables = tables
        .into_iter()
        .filter(|t| !ctes.contains(t) && !table_functions.contains(t))
        .collect();
    StatementInfo {
        class,
        tables,
        functions,
        destructive,
        note,
    }
}
