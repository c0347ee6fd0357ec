//! Pure helpers the Postgres proxy uses to name what it masks: the table-OID
//! catalog it reads from the server, and the column lists of `COPY ... TO STDOUT`.
//!
//! # The catalog
//!
//! A `RowDescription` names each column's table only by OID. Column rules name
//! tables (`customers.ssn`), so the proxy maps OIDs to `schema.table` with its
//! own query ([`CATALOG_SQL`]) on the client's upstream connection, after
//! authentication and before the client's first statement, and again at the next
//! idle point whenever a row description names an OID it does not know (a table
//! created since). At most [`MAX_CATALOG_ROWS`] rows are read.
//!
//! What this catches: columns read straight from a table or a view (the server
//! reports the view's OID for view columns), under any alias (`SELECT ssn AS x`
//! keeps the table OID and column name: the server reports the *source* column
//! for a plain column reference; the alias only changes the reported name, which
//! is why rules are matched on the name Postgres reports *and* an OID-qualified
//! table). What this cannot catch: computed columns (`upper(email)`,
//! `row_to_json(c)`, `encode(ssn::bytea, 'hex')`, `ssn || ''`) carry table OID 0
//! and the output name of the expression, so column rules see no table and a
//! name such as `upper`; only value detectors see them, and a detector cannot
//! recognise a value the query re-encoded (hex, base64, reversed, split). The
//! policy must deny such functions on protected tables (`functions` conditions)
//! where that matters.
//!
//! Fails closed: until an unknown OID is resolved, rules apply to its columns as
//! if the table were unknown (every rule naming that column under any table, see
//! [`crate::mask::MaskPolicy::column_rule`]). An OID still unknown after a fresh
//! catalog (the catalog was cut at the row cap, or a race with DDL) makes rows
//! from it unmaskable: the proxy refuses them.

use std::collections::{HashMap, HashSet};

use sqlparser::ast::{CopyOption, CopySource, CopyTarget, Ident, ObjectName, Statement};

use super::codec::{DataRow, RowDescription};
use super::mask::CopyKind;
use crate::mask::lineage::{RelationKind, Relations, is_data_catalog};
use crate::sql::lineage::Lineage;

/// Most catalog rows the proxy reads (tables plus the columns of user tables).
pub const MAX_CATALOG_ROWS: usize = 100_000;

/// The proxy's own catalog query: every table-like relation's OID and name, and
/// the columns (in order) of those outside the system schemas, for `COPY`.
pub const CATALOG_SQL: &str = "(SELECT c.oid, n.nspname, c.relname, a.attname, a.attnum, c.relkind, \
CASE WHEN c.relkind IN ('v', 'm') AND a.attnum = 1 THEN pg_catalog.pg_get_viewdef(c.oid) END \
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped \
AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
WHERE c.relkind IN ('r', 'v', 'm', 'p', 'f') ORDER BY c.oid, a.attnum LIMIT 100001) \
UNION ALL (SELECT p.oid, n.nspname, p.proname, NULL, NULL, 'F', NULL \
FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace \
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') LIMIT 100001)";

/// A relation the catalog knows.
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    pub schema: String,
    pub name: String,
    /// Columns in attribute order (empty for system schemas).
    pub columns: Vec<String>,
    /// Their attribute numbers (dropped columns leave gaps).
    pub attnums: Vec<i16>,
    /// `pg_class.relkind`: `r` table, `v` view, `m` materialized view, ...
    pub kind: u8,
    /// A view's output columns and their lineage, from its definition;
    /// `None` when the definition was not read or does not analyse.
    pub view: Option<Vec<(String, Lineage)>>,
}

impl Relation {
    pub fn is_view(&self) -> bool {
        matches!(self.kind, b'v' | b'm') && !is_system_schema(&self.schema)
    }

    /// The real name of attribute `attnum` (a result column's alias is not).
    pub fn column_named(&self, attnum: i16) -> Option<&str> {
        let i = self.attnums.iter().position(|a| *a == attnum)?;
        self.columns.get(i).map(String::as_str)
    }
}

fn is_system_schema(schema: &str) -> bool {
    schema == "pg_catalog" || schema == "information_schema" || schema.starts_with("pg_toast")
}

/// OID → relation map, and which OIDs could not be resolved.
#[derive(Debug, Default)]
pub struct Catalog {
    relations: HashMap<u32, Relation>,
    /// Rows of the load in progress.
    loading: Option<(HashMap<u32, Relation>, usize, HashSet<String>)>,
    /// Functions defined outside the system schemas, by name.
    functions: HashSet<String>,
    loaded: bool,
    truncated: bool,
    /// A load is wanted at the next idle point.
    stale: bool,
    failures: u32,
    /// Seen unknown since the last load: treated as "table unknown" until then.
    pending_unknown: HashSet<u32>,
    /// Still unknown after a load that began after they were seen.
    unresolvable: HashSet<u32>,
}

/// How a column's table is known, for masking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TableName {
    /// Not from a table (OID 0).
    None,
    Known(String),
    /// Not known yet: rules apply as for an unknown table.
    Pending,
    /// Unknown after a fresh catalog: rows cannot be masked.
    Unresolvable,
}

impl Catalog {
    /// Loads after this many failed attempts are not retried on this connection.
    pub const MAX_FAILURES: u32 = 3;

    pub fn is_loaded(&self) -> bool {
        self.loaded
    }

    pub fn is_truncated(&self) -> bool {
        self.truncated
    }

    pub fn len(&self) -> usize {
        self.relations.len()
    }

    pub fn is_empty(&self) -> bool {
        self.relations.is_empty()
    }

    /// A (re)load should run at the next idle point.
    pub fn wants_load(&self) -> bool {
        (self.stale || !self.loaded) && self.failures < Self::MAX_FAILURES
    }

    pub fn mark_stale(&mut self) {
        self.stale = true;
    }

    /// Start reading the rows of [`CATALOG_SQL`].
    pub fn begin(&mut self) {
        self.loading = Some((HashMap::new(), 0, HashSet::new()));
    }

    /// One `DataRow` of the catalog query. Malformed rows are skipped (they can
    /// only make the map smaller, which fails closed).
    pub fn row(&mut self, row: &DataRow) {
        let Some((map, n, functions)) = self.loading.as_mut() else {
            return;
        };
        *n += 1;
        if *n > MAX_CATALOG_ROWS {
            return;
        }
        let f: Vec<Option<&[u8]>> = row.fields().collect();
        let (Some(Some(oid)), Some(Some(schema)), Some(Some(name))) =
            (f.first(), f.get(1), f.get(2))
        else {
            return;
        };
        let Some(oid) = std::str::from_utf8(oid)
            .ok()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            return;
        };
        let (Ok(schema), Ok(name)) = (std::str::from_utf8(schema), std::str::from_utf8(name))
        else {
            return;
        };
        let kind = f
            .get(5)
            .copied()
            .flatten()
            .and_then(|k| k.first().copied())
            .unwrap_or(b'r');
        if kind == b'F' {
            functions.insert(name.to_owned());
            return;
        }
        let rel = map.entry(oid).or_insert_with(|| Relation {
            schema: schema.to_owned(),
            name: name.to_owned(),
            columns: Vec::new(),
            attnums: Vec::new(),
            kind,
            view: None,
        });
        if let Some(Some(col)) = f.get(3)
            && let Ok(col) = std::str::from_utf8(col)
        {
            let attnum = f
                .get(4)
                .copied()
                .flatten()
                .and_then(|a| std::str::from_utf8(a).ok())
                .and_then(|a| a.parse::<i16>().ok())
                .unwrap_or(0);
            rel.columns.push(col.to_owned());
            rel.attnums.push(attnum);
        }
        if let Some(Some(def)) = f.get(6)
            && let Ok(def) = std::str::from_utf8(def)
        {
            rel.view = crate::sql::lineage::view_columns(def);
        }
    }

    /// The catalog query completed.
    pub fn finish(&mut self) {
        let Some((map, n, functions)) = self.loading.take() else {
            return;
        };
        self.relations = map;
        self.functions = functions;
        self.truncated = n > MAX_CATALOG_ROWS;
        self.loaded = true;
        self.stale = false;
        for oid in self.pending_unknown.drain() {
            if !self.relations.contains_key(&oid) {
                self.unresolvable.insert(oid);
            }
        }
    }

    /// The catalog query failed; the old map stays.
    pub fn failed(&mut self) {
        self.loading = None;
        self.failures += 1;
    }

    /// The relation with this OID, if known.
    pub fn relation(&self, oid: u32) -> Option<&Relation> {
        self.relations.get(&oid)
    }

    /// The table of a column with this OID; notes unknown OIDs for a reload.
    pub fn table(&mut self, oid: u32) -> TableName {
        if oid == 0 {
            return TableName::None;
        }
        if let Some(r) = self.relations.get(&oid) {
            return TableName::Known(format!("{}.{}", r.schema, r.name));
        }
        if self.unresolvable.contains(&oid) {
            return TableName::Unresolvable;
        }
        self.pending_unknown.insert(oid);
        self.stale = true;
        TableName::Pending
    }

    /// Does any column of `desc` come from an OID not known yet? (Marks it.)
    pub fn note_unknown(&mut self, desc: &RowDescription) {
        for f in &desc.fields {
            let _ = self.table(f.table_oid);
        }
    }

    /// The relation `name` (as written in SQL, `schema.table` or `table`)
    /// refers to. `None` when unknown or ambiguous (same name in two schemas
    /// and no schema given).
    pub fn resolve(&self, name: &SqlName) -> Option<&Relation> {
        let mut found = self
            .relations
            .values()
            .filter(|r| r.name == name.name && name.schema.as_ref().is_none_or(|s| *s == r.schema));
        let first = found.next()?;
        match found.next() {
            Some(_) => None,
            None => Some(first),
        }
    }
}

impl Relations for Catalog {
    /// A name as written in a statement. Unqualified and matching several
    /// relations (one per schema): a view among them wins, so its definition
    /// is followed; two views are unresolvable.
    fn kind(&self, relation: &str) -> RelationKind<'_> {
        if is_data_catalog(relation) {
            return RelationKind::DataCatalog;
        }
        let (schema, name) = match relation.rsplit_once('.') {
            Some((s, n)) => (Some(s.rsplit('.').next().unwrap_or(s)), n),
            None => (None, relation),
        };
        let mut views = self
            .relations
            .values()
            .filter(|r| r.name == name && schema.is_none_or(|s| s == r.schema) && r.is_view());
        match (views.next(), views.next()) {
            (None, _) => RelationKind::Table,
            (Some(v), None) => RelationKind::View(v.view.as_deref()),
            (Some(_), Some(_)) => RelationKind::View(None),
        }
    }

    fn columns(&self, relation: &str) -> Option<Vec<String>> {
        let name = match relation.rsplit_once('.') {
            Some((s, n)) => SqlName {
                schema: Some(s.rsplit('.').next().unwrap_or(s).to_owned()),
                name: n.to_owned(),
            },
            None => SqlName {
                schema: None,
                name: relation.to_owned(),
            },
        };
        let r = self.resolve(&name)?;
        (!r.columns.is_empty()).then(|| r.columns.clone())
    }

    /// After a truncated load every function might be one.
    fn is_user_function(&self, name: &str) -> bool {
        self.truncated || self.functions.contains(name)
    }
}

/// A possibly schema-qualified SQL name, normalised as Postgres does
/// (unquoted parts lower-cased).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqlName {
    pub schema: Option<String>,
    pub name: String,
}

fn ident(i: &Ident) -> String {
    if i.quote_style.is_some() {
        i.value.clone()
    } else {
        i.value.to_lowercase()
    }
}

fn sql_name(o: &ObjectName) -> Option<SqlName> {
    let parts: Vec<String> =
        o.0.iter()
            .map(|p| p.as_ident().map(ident))
            .collect::<Option<_>>()?;
    match parts.as_slice() {
        [name] => Some(SqlName {
            schema: None,
            name: name.clone(),
        }),
        [schema, name] => Some(SqlName {
            schema: Some(schema.clone()),
            name: name.clone(),
        }),
        [_db, schema, name] => Some(SqlName {
            schema: Some(schema.clone()),
            name: name.clone(),
        }),
        _ => None,
    }
}

/// One `COPY ... TO STDOUT` statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyOut {
    /// `COPY table [(columns)] TO STDOUT` with only default text options.
    Table {
        table: SqlName,
        /// Empty: every column, in table order.
        columns: Vec<String>,
    },
    /// `COPY (query) TO STDOUT`: output columns are not known.
    Query,
    /// Options the masker cannot follow (CSV, binary, another delimiter or
    /// NULL string, legacy options).
    Unmaskable { reason: &'static str },
}

impl CopyOut {
    /// The wire format the masker must parse, for `Table` and `Query`.
    pub fn kind(&self) -> CopyKind {
        CopyKind::Text
    }
}

/// Every `COPY ... TO STDOUT` in `sql`, in order. `None` when the text does not
/// parse (the caller fails closed).
pub fn copy_outs(sql: &str) -> Option<Vec<CopyOut>> {
    let statements = sqlparser::parser::Parser::new(&sqlparser::dialect::PostgreSqlDialect {})
        .with_recursion_limit(64)
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_statements())
        .ok()?;
    let mut out = Vec::new();
    for s in statements {
        let Statement::Copy {
            source,
            to: true,
            target: CopyTarget::Stdout,
            options,
            legacy_options,
            ..
        } = s
        else {
            continue;
        };
        let bad_option = options.iter().find_map(|o| match o {
            CopyOption::Format(f) if f.value.eq_ignore_ascii_case("text") => None,
            CopyOption::Format(f) if f.value.eq_ignore_ascii_case("csv") => Some("CSV format"),
            CopyOption::Format(_) => Some("binary format"),
            CopyOption::Freeze(_) | CopyOption::Encoding(_) => None,
            _ => Some("COPY options other than FORMAT text"),
        });
        if let Some(reason) = bad_option {
            out.push(CopyOut::Unmaskable { reason });
            continue;
        }
        if !legacy_options.is_empty() {
            out.push(CopyOut::Unmaskable {
                reason: "legacy COPY options (BINARY, CSV, DELIMITER, NULL)",
            });
            continue;
        }
        out.push(match source {
            CopySource::Query(_) => CopyOut::Query,
            CopySource::Table {
                table_name,
                columns,
            } => match sql_name(&table_name) {
                Some(table) => CopyOut::Table {
                    table,
                    columns: columns.iter().map(ident).collect(),
                },
                None => CopyOut::Unmaskable {
                    reason: "table name not understood",
                },
            },
        });
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(vals: &[Option<&str>]) -> DataRow {
        DataRow::from_fields(vals.iter().map(|v| v.map(str::as_bytes)))
    }

    #[test]
    fn catalog_loads_resolves_and_fails_closed_on_unknown_oids() {
        let mut c = Catalog::default();
        assert!(c.wants_load());
        assert_eq!(c.table(42), TableName::Pending, "unknown before any load");
        c.begin();
        c.row(&row(&[
            Some("16384"),
            Some("public"),
            Some("customers"),
            Some("id"),
        ]));
        c.row(&row(&[
            Some("16384"),
            Some("public"),
            Some("customers"),
            Some("ssn"),
        ]));
        c.row(&row(&[
            Some("1259"),
            Some("pg_catalog"),
            Some("pg_class"),
            None,
        ]));
        c.row(&row(&[Some("junk"), Some("x"), Some("y"), None]));
        c.finish();
        assert!(c.is_loaded() && !c.wants_load());
        assert_eq!(c.table(16384), TableName::Known("public.customers".into()));
        assert_eq!(c.table(0), TableName::None);
        assert_eq!(
            c.table(42),
            TableName::Unresolvable,
            "seen before a load that did not find it"
        );
        assert_eq!(c.table(99), TableName::Pending);
        assert!(c.wants_load(), "a new unknown OID asks for a reload");
        let name = SqlName {
            schema: None,
            name: "customers".into(),
        };
        assert_eq!(c.resolve(&name).unwrap().columns, vec!["id", "ssn"]);
    }

    #[test]
    fn catalog_rows_beyond_the_cap_are_not_kept() {
        let mut c = Catalog::default();
        c.begin();
        for i in 0..=MAX_CATALOG_ROWS as u32 + 5 {
            let oid = (i + 1).to_string();
            c.row(&row(&[Some(&oid), Some("s"), Some("t"), None]));
        }
        c.finish();
        assert!(c.is_truncated());
        assert_eq!(c.len(), MAX_CATALOG_ROWS);
    }

    #[test]
    fn copy_statements_are_understood() {
        let v = copy_outs(
            "COPY customers TO STDOUT; COPY public.\"Cust\" (id, SSN) TO STDOUT; \
             COPY (SELECT 1) TO STDOUT; COPY t TO STDOUT WITH (FORMAT csv); \
             COPY t TO STDOUT (DELIMITER ','); COPY t FROM STDIN; SELECT 1",
        )
        .unwrap();
        assert_eq!(
            v,
            vec![
                CopyOut::Table {
                    table: SqlName {
                        schema: None,
                        name: "customers".into()
                    },
                    columns: vec![]
                },
                CopyOut::Table {
                    table: SqlName {
                        schema: Some("public".into()),
                        name: "Cust".into()
                    },
                    columns: vec!["id".into(), "ssn".into()]
                },
                CopyOut::Query,
                CopyOut::Unmaskable {
                    reason: "CSV format"
                },
                CopyOut::Unmaskable {
                    reason: "COPY options other than FORMAT text"
                },
            ]
        );
        assert!(copy_outs("COPY garbage (").is_none());
    }
}
