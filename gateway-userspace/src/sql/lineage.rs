//! Column lineage: which table columns each output column of a statement
//! derives from, and how.
//!
//! Masking by the server's column attribution alone is defeated by any
//! expression (`reverse(ssn)` comes back as a computed column named
//! `reverse`). This module reads the statement instead: for every output
//! column it computes the set of source columns (`table.column`, or a whole
//! row) with the [`Flow`] through which each reaches the output, and it lists
//! the predicates (`WHERE`, `JOIN ON`, `HAVING`, `GROUP BY`, `ORDER BY`,
//! window partitions) and writes that read columns. A predicate is also every
//! use of a value that gives an answer without returning it (an [`Oracle`]):
//! a condition anywhere (`CASE`, `FILTER`, `GREATEST`, a boolean in the select
//! list), an operation that can fail on it, a sleep or a row count it drives.
//! Functions are classed by what they can do with a value; one not listed may
//! fail (closed by construction, not by a deny list). The result does not depend
//! on the policy, so it is cached with the statement's classification; the
//! masking policy is applied to it per result ([`crate::mask::lineage`]).
//!
//! The analysis over-approximates and never under-approximates: a name it
//! cannot resolve is attributed to every relation in scope (inner and outer),
//! any expression it does not model is [`Flow::Derived`] from every column it
//! mentions, a relation whose columns it cannot list (a function in `FROM`, a
//! column alias list over `*`) contributes a whole row, and a statement it
//! cannot analyse has [`Outputs::Unknown`]. Extra sources cost redaction,
//! never a leak. Names only: without the catalog, `ssn` in
//! `SELECT ssn FROM a JOIN b` is attributed to both `a.ssn` and `b.ssn`.

use std::{
    collections::{BTreeMap, HashMap},
    ops::ControlFlow,
};

use sqlparser::ast::{
    CastKind, DataType, Distinct, DuplicateTreatment, Expr, FromTable, Function, FunctionArg,
    FunctionArgExpr, FunctionArguments, GroupByExpr, Ident, JoinConstraint, JoinOperator,
    ObjectName, OrderByKind, Query, Select, SelectItem, SelectItemQualifiedWildcardKind, SetExpr,
    SetOperator, SetQuantifier, Statement, TableFactor, TableWithJoins, UnaryOperator, Value,
    Visit, Visitor,
};

use super::{Dialect, classify::object_name};

/// A source of data: a column of a relation (as named in the statement,
/// lower-cased unless quoted), or its whole row (`column: None`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Source {
    pub relation: String,
    pub column: Option<String>,
}

/// How a source's values reach an output, weakest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Flow {
    /// The value itself, under any alias and through any pass-through
    /// (subquery, CTE, view column, set operation).
    Direct,
    /// A value of the column, chosen but not changed: `min`/`max`,
    /// `COALESCE`, `CASE` results, `DISTINCT`, a cast to text, a scalar
    /// subquery.
    Preserved,
    /// Anything computed from it.
    Derived,
}

/// The sources of one value, each with the strongest flow it reaches it by.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lineage {
    pub sources: BTreeMap<Source, Flow>,
    /// Set when the value is a JSON object (or array of objects) built from
    /// named fields, so that protected fields can be masked inside it.
    pub json: Option<Box<JsonShape>>,
    /// A literal or parameter may reach the value (`VALUES`, a `UNION`
    /// arm, a `CASE` result, a `COALESCE` default): a value the statement's
    /// author chose, which a keyed hash must not be computed of.
    pub constant: bool,
}

/// A JSON value built by a known builder: `row_to_json(t)`, `to_json(t)`,
/// `to_jsonb(t)`, `json_agg(t)`, `jsonb_agg(t)` (keys: the row's columns) or
/// `json_build_object('k', v, ...)`, `jsonb_build_object(...)` with literal
/// keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonShape {
    /// Key `k`'s value is the field named `k` ([`Output::Star`]: any
    /// column of that relation).
    pub fields: Vec<Output>,
    /// An array of such objects (`json_agg`).
    pub array: bool,
}

impl Lineage {
    pub fn from_source(source: Source, flow: Flow) -> Self {
        let mut l = Lineage::default();
        l.sources.insert(source, flow);
        l
    }

    pub fn add(&mut self, source: Source, flow: Flow) {
        let f = self.sources.entry(source).or_insert(flow);
        if flow > *f {
            *f = flow;
        }
    }

    /// The union; a JSON shape survives only a union with nothing.
    pub fn merge(&mut self, other: &Lineage) {
        self.constant |= other.constant;
        if other.sources.is_empty() && other.json.is_none() {
            return;
        }
        if self.sources.is_empty() && self.json.is_none() {
            self.json.clone_from(&other.json);
        } else {
            self.json = None;
        }
        for (s, f) in &other.sources {
            self.add(s.clone(), *f);
        }
    }

    /// Every flow raised to at least `floor`.
    #[must_use]
    pub fn at_least(mut self, floor: Flow) -> Self {
        for f in self.sources.values_mut() {
            if *f < floor {
                *f = floor;
            }
        }
        self
    }

    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }
}

/// One item of a statement's result, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// One column.
    Column { name: String, lineage: Lineage },
    /// `*` or `t.*` over a table or view the statement names: its columns,
    /// as many as it has, each reported by the server with the relation's OID.
    Star { relation: String },
}

/// What a statement returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outputs {
    /// Not a statement that returns rows of its own.
    None,
    Known(Vec<Output>),
    /// Rows whose origin the statement does not show (`FETCH`, `EXECUTE`,
    /// `CALL`, `SHOW`), or a statement this module does not model.
    Unknown,
}

/// How a predicate uses the values it reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Test {
    /// `col = literal`, `col <> literal`, `col IN (literals)`, `col = ANY
    /// (ARRAY[literals])`, `NULLIF(col, literal)`, `CASE col WHEN literal`,
    /// `col IS [NOT] NULL`: answers only "is it one of these values".
    /// `values`: how many literals or parameters it compares with (`IS
    /// NULL`: none); the same for every statement of one shape.
    Equality { values: usize },
    /// Anything else, named for the reason it gives.
    Search(&'static str),
}

/// The kind of answer a condition or an operation on a value gives a
/// statement's author, whatever the result shows: what a refusal names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Oracle {
    /// Which rows come back, their number or their order (`WHERE`, `JOIN`,
    /// `HAVING`, `GROUP BY`, `ORDER BY`, `DISTINCT`, set operations, `LIMIT`).
    Search,
    /// Which branch or value is taken (`CASE`, `FILTER`, `NULLIF`,
    /// `COALESCE`, `GREATEST`/`LEAST`, `min`/`max`, a condition in the
    /// select list, a window's partitions and order).
    Conditional,
    /// Whether the statement fails (arithmetic, casts, functions that raise).
    Error,
    /// How long it takes (sleeps, repetition).
    Timing,
    /// How many rows a function returns.
    RowCount,
    /// More values compared by equality than a statement may use, or a
    /// number of them that is not bounded (an array literal or parameter).
    Enumeration,
    /// Whether a value can be written: a unique constraint (an error) or
    /// `ON CONFLICT` / `ON DUPLICATE KEY` (a row count) answers whether the
    /// value is already in the column.
    Uniqueness,
}

impl Oracle {
    pub fn as_str(self) -> &'static str {
        match self {
            Oracle::Search => "search",
            Oracle::Conditional => "conditional",
            Oracle::Error => "error",
            Oracle::Timing => "timing",
            Oracle::RowCount => "row-count",
            Oracle::Enumeration => "enumeration",
            Oracle::Uniqueness => "uniqueness",
        }
    }
}

/// A literal or parameter an equality test compares with.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Probe {
    /// The literal's text (unquoted).
    Literal(String),
    /// `$n` (1-based), bound at execution.
    Param(usize),
    /// Something else constant (a typed literal, an expression of literals).
    Other(String),
}

/// A condition, ordering or operation that reads columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Predicate {
    pub test: Test,
    pub oracle: Oracle,
    pub lineage: Lineage,
    /// For [`Test::Equality`]: the values compared with, in order. Only
    /// filled by [`lineage_with_probes`]: an analysis shared by statements
    /// of one shape must not carry one statement's literals.
    pub probes: Vec<Probe>,
}

/// Data a statement writes into a table (`INSERT ... SELECT`, `UPDATE ...
/// SET`, `CREATE TABLE AS`, `SELECT INTO`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub target: String,
    pub lineage: Lineage,
}

/// The lineage of one statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatementLineage {
    pub outputs: Outputs,
    pub predicates: Vec<Predicate>,
    pub writes: Vec<Write>,
    /// Function names called anywhere (lower-cased, unqualified), for the
    /// policy side to spot functions it cannot see into.
    pub functions: Vec<String>,
    /// `DECLARE name CURSOR FOR query`: the cursor and its query's outputs,
    /// which its `FETCH`es return.
    pub cursor: Option<(String, Outputs)>,
    /// `FETCH ... FROM name`: the cursor fetched from.
    pub fetch: Option<String>,
}

/// A relation named without its schema: in `schema` (`MySQL`'s current
/// database); a qualified name stays as written.
fn qualified(relation: &str, schema: &str) -> String {
    if relation.contains('.') {
        relation.to_owned()
    } else {
        format!("{schema}.{relation}")
    }
}

impl Lineage {
    /// Every source's relation qualified with `schema` where the statement
    /// named none ([`qualified`]).
    pub fn qualify(&mut self, schema: &str) {
        self.sources = std::mem::take(&mut self.sources)
            .into_iter()
            .map(|(mut s, f)| {
                s.relation = qualified(&s.relation, schema);
                (s, f)
            })
            .collect();
        if let Some(j) = self.json.as_mut() {
            qualify_outputs(&mut j.fields, schema);
        }
    }
}

fn qualify_outputs(outputs: &mut [Output], schema: &str) {
    for o in outputs {
        match o {
            Output::Column { lineage, .. } => lineage.qualify(schema),
            Output::Star { relation } => *relation = qualified(relation, schema),
        }
    }
}

impl StatementLineage {
    /// The statement as run in database `schema` (`MySQL`'s `USE`): every
    /// relation it names without a schema is in `schema`.
    pub fn qualify(&mut self, schema: &str) {
        if let Outputs::Known(o) = &mut self.outputs {
            qualify_outputs(o, schema);
        }
        if let Some((_, Outputs::Known(o))) = &mut self.cursor {
            qualify_outputs(o, schema);
        }
        for p in &mut self.predicates {
            p.lineage.qualify(schema);
        }
        for w in &mut self.writes {
            w.lineage.qualify(schema);
            w.target = qualified(&w.target, schema);
        }
    }
}

/// Lineage of every statement of a text; `None` when the text does not parse
/// (the statement is then classified `Unknown` and decided as such).
pub fn lineage(sql: &str, dialect: Dialect) -> Option<Vec<StatementLineage>> {
    if sql.len() > super::MAX_SQL_LEN {
        return None;
    }
    let statements = sqlparser::parser::Parser::new(dialect.parser_dialect())
        .with_recursion_limit(super::classify::PARSER_RECURSION_LIMIT)
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_statements())
        .ok()?;
    Some(of_statements(&statements))
}

/// [`lineage`] with the values each equality test compares with
/// ([`Predicate::probes`]), for the statement at hand only.
pub fn lineage_with_probes(sql: &str, dialect: Dialect) -> Option<Vec<StatementLineage>> {
    if sql.len() > super::MAX_SQL_LEN {
        return None;
    }
    let statements = sqlparser::parser::Parser::new(dialect.parser_dialect())
        .with_recursion_limit(super::classify::PARSER_RECURSION_LIMIT)
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_statements())
        .ok()?;
    let mut statements = statements;
    number_positional_placeholders(&mut statements);
    Some(statements.iter().map(|s| statement(s, true)).collect())
}

/// `MySQL`'s positional `?` placeholders become `$n` (1-based, in the order
/// they appear in the text, which is the order of a `COM_STMT_EXECUTE`'s
/// values), so each equality test knows which bound value it compares with.
/// Fails safe: when two placeholders cannot be told apart by position,
/// every `?` becomes a parameter whose value is never known (each
/// execution then counts as a new value).
fn number_positional_placeholders(statements: &mut Vec<Statement>) {
    use sqlparser::ast::{visit_expressions, visit_expressions_mut};
    let is_positional = |e: &Expr| match e {
        Expr::Value(v) => matches!(&v.value, Value::Placeholder(p) if p == "?"),
        _ => false,
    };
    let mut at = Vec::new();
    let _ = visit_expressions(statements, |e| {
        if let (true, Expr::Value(v)) = (is_positional(e), e) {
            at.push((v.span.start.line, v.span.start.column));
        }
        ControlFlow::<()>::Continue(())
    });
    if at.is_empty() {
        return;
    }
    at.sort_unstable();
    let distinct = at.windows(2).all(|w| w[0] != w[1]);
    let _ = visit_expressions_mut(statements, |e| {
        if is_positional(e)
            && let Expr::Value(v) = e
        {
            let key = (v.span.start.line, v.span.start.column);
            let n = match at.binary_search(&key) {
                Ok(i) if distinct => i + 1,
                _ => usize::MAX,
            };
            v.value = Value::Placeholder(format!("${n}"));
        }
        ControlFlow::<()>::Continue(())
    });
}

/// Lineage of statements already parsed.
pub(super) fn of_statements(statements: &[Statement]) -> Vec<StatementLineage> {
    statements.iter().map(|s| statement(s, false)).collect()
}

/// The lineage of a view's (or materialized view's) defining query, from its
/// definition text: its output columns, by name. `None`: not analysable.
pub fn view_columns(definition: &str) -> Option<Vec<(String, Lineage)>> {
    let all = lineage(definition, Dialect::Postgres)?;
    let [one] = all.as_slice() else { return None };
    let Outputs::Known(outputs) = &one.outputs else {
        return None;
    };
    outputs
        .iter()
        .map(|o| match o {
            Output::Column { name, lineage } => Some((name.clone(), lineage.clone())),
            Output::Star { .. } => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------
// Scopes

/// A relation in a `FROM` clause, by the name that qualifies its columns.
#[derive(Debug, Clone)]
struct Rel {
    alias: String,
    body: Body,
}

#[derive(Debug, Clone)]
enum Body {
    /// A table or view named in the statement: columns resolve by name.
    Named { relation: String },
    /// A subquery or CTE: its outputs, in order.
    Derived(Vec<Output>),
    /// Columns unknown (a function in `FROM`, aliases over `*`): every
    /// column carries this lineage.
    Opaque(Lineage),
}

impl Rel {
    /// The lineage of column `name` of this relation, if it may have one.
    fn column(&self, name: &str) -> Option<Lineage> {
        match &self.body {
            Body::Named { relation } => Some(Lineage::from_source(
                Source {
                    relation: relation.clone(),
                    column: Some(name.to_owned()),
                },
                Flow::Direct,
            )),
            Body::Derived(outputs) => {
                let mut found = None::<Lineage>;
                for o in outputs {
                    match o {
                        Output::Column { name: n, lineage } if n == name => {
                            // Postgres refuses an ambiguous name; take both.
                            found.get_or_insert_with(Lineage::default).merge(lineage);
                        }
                        Output::Star { relation } => {
                            found.get_or_insert_with(Lineage::default).add(
                                Source {
                                    relation: relation.clone(),
                                    column: Some(name.to_owned()),
                                },
                                Flow::Direct,
                            );
                        }
                        Output::Column { .. } => {}
                    }
                }
                found
            }
            Body::Opaque(l) => Some(l.clone()),
        }
    }

    /// The whole row (`t`, `t.*` as a value): every column, derived.
    fn whole_row(&self) -> Lineage {
        match &self.body {
            Body::Named { relation } => Lineage::from_source(
                Source {
                    relation: relation.clone(),
                    column: None,
                },
                Flow::Derived,
            ),
            Body::Derived(outputs) => all_of(outputs).at_least(Flow::Derived),
            Body::Opaque(l) => l.clone().at_least(Flow::Derived),
        }
    }

    /// Its columns as outputs of `*`.
    fn star(&self) -> Vec<Output> {
        match &self.body {
            Body::Named { relation } => vec![Output::Star {
                relation: relation.clone(),
            }],
            Body::Derived(outputs) => outputs.clone(),
            Body::Opaque(l) => vec![Output::Column {
                name: "?column?".into(),
                lineage: l.clone().at_least(Flow::Derived),
            }],
        }
    }
}

/// Union of every output's lineage; a star over a named relation is its
/// whole row.
fn all_of(outputs: &[Output]) -> Lineage {
    let mut l = Lineage::default();
    for o in outputs {
        match o {
            Output::Column { lineage, .. } => l.merge(lineage),
            Output::Star { relation } => l.add(
                Source {
                    relation: relation.clone(),
                    column: None,
                },
                Flow::Direct,
            ),
        }
    }
    l
}

/// Name resolution context: `FROM` relations per query level (innermost
/// last) and CTEs per `WITH` level.
#[derive(Default)]
struct Scope {
    levels: Vec<Vec<Rel>>,
    ctes: Vec<HashMap<String, Vec<Output>>>,
}

impl Scope {
    fn cte(&self, name: &str) -> Option<&Vec<Output>> {
        self.ctes.iter().rev().find_map(|m| m.get(name))
    }

    fn rel(&self, alias: &str) -> Option<&Rel> {
        self.levels
            .iter()
            .rev()
            .find_map(|l| l.iter().rev().find(|r| r.alias == alias))
    }

    /// A column reference. Unqualified names are looked up at every level:
    /// without the catalog a named table "has" every column, so stopping at
    /// the innermost level could miss an outer reference.
    fn resolve(&self, parts: &[String]) -> Lineage {
        let mut out = Lineage::default();
        match parts {
            [] => {}
            [name] => {
                for rel in self.levels.iter().flatten() {
                    if let Some(l) = rel.column(name) {
                        out.merge(&l);
                    }
                    if rel.alias == *name {
                        out.merge(&rel.whole_row());
                    }
                }
            }
            [.., qual, name] => match self.rel(qual) {
                Some(rel) => {
                    if let Some(l) = rel.column(name) {
                        out.merge(&l);
                    }
                }
                None => {
                    // `schema.table.col` with the table not aliased, or a
                    // composite field: take every relation's column and row.
                    for rel in self.levels.iter().flatten() {
                        if let Some(l) = rel.column(name) {
                            out.merge(&l);
                        }
                        out.merge(&rel.whole_row());
                    }
                }
            },
        }
        out
    }

    fn all_rows(&self) -> Lineage {
        let mut out = Lineage::default();
        for rel in self.levels.iter().flatten() {
            out.merge(&rel.whole_row());
        }
        out
    }
}

// ---------------------------------------------------------------------------
// Statements

#[derive(Default)]
struct Ctx {
    scope: Scope,
    predicates: Vec<Predicate>,
    writes: Vec<Write>,
    functions: Vec<String>,
    /// Fill [`Predicate::probes`].
    probes: bool,
}

#[allow(clippy::too_many_lines)] // one arm per statement kind
fn statement(stmt: &Statement, probes: bool) -> StatementLineage {
    let mut cx = Ctx {
        probes,
        ..Ctx::default()
    };
    let mut cursor = None;
    let mut fetch = None;
    let outputs = match stmt {
        Statement::Query(q) => {
            let outs = cx.query(q);
            if let SetExpr::Select(s) = q.body.as_ref()
                && s.into.is_some()
            {
                cx.writes.push(Write {
                    target: "SELECT INTO".into(),
                    lineage: all_of(&outs),
                });
                Outputs::None
            } else {
                Outputs::Known(outs)
            }
        }
        Statement::Insert(ins) => {
            let target = ins.table.to_string().to_lowercase();
            cx.inserted(&target, ins);
            if let Some(src) = &ins.source {
                let outs = cx.query(src);
                let lineage = all_of(&outs);
                if !lineage.is_empty() {
                    cx.writes.push(Write {
                        target: target.clone(),
                        lineage,
                    });
                }
            }
            match &ins.returning {
                Some(items) => {
                    cx.scope.levels.push(vec![Rel {
                        alias: target.rsplit('.').next().unwrap_or(&target).to_owned(),
                        body: Body::Named {
                            relation: target.clone(),
                        },
                    }]);
                    Outputs::Known(cx.projection(items))
                }
                None => Outputs::None,
            }
        }
        Statement::Update(up) => {
            let mut rels = Vec::new();
            cx.scope.levels.push(Vec::new());
            cx.relations_of(&up.table, &mut rels);
            if let Some(from) = &up.from {
                let tables = match from {
                    sqlparser::ast::UpdateTableFromKind::BeforeSet(t)
                    | sqlparser::ast::UpdateTableFromKind::AfterSet(t) => t,
                };
                for t in tables {
                    cx.relations_of(t, &mut rels);
                }
            }
            let target = match &up.table.relation {
                TableFactor::Table { name, .. } => object_name(name),
                _ => "?".into(),
            };
            cx.assigned(&target, &up.assignments);
            for a in &up.assignments {
                let l = cx.expr(&a.value);
                if !l.is_empty() {
                    cx.writes.push(Write {
                        target: target.clone(),
                        lineage: l,
                    });
                }
            }
            if let Some(w) = &up.selection {
                cx.predicate(w);
            }
            match &up.returning {
                Some(items) => Outputs::Known(cx.projection(items)),
                None => Outputs::None,
            }
        }
        Statement::Delete(del) => {
            let mut rels = Vec::new();
            cx.scope.levels.push(Vec::new());
            let tables = match &del.from {
                FromTable::WithFromKeyword(t) | FromTable::WithoutKeyword(t) => t,
            };
            for t in tables {
                cx.relations_of(t, &mut rels);
            }
            if let Some(using) = &del.using {
                for t in using {
                    cx.relations_of(t, &mut rels);
                }
            }
            if let Some(w) = &del.selection {
                cx.predicate(w);
            }
            match &del.returning {
                Some(items) => Outputs::Known(cx.projection(items)),
                None => Outputs::None,
            }
        }
        Statement::CreateTable(ct) => {
            if let Some(q) = &ct.query {
                let outs = cx.query(q);
                cx.writes.push(Write {
                    target: object_name(&ct.name),
                    lineage: all_of(&outs),
                });
            }
            Outputs::None
        }
        Statement::CreateView(v) => {
            // Reading through the view is analysed when it is read; the
            // definition's predicates are checked now.
            let _ = cx.query(&v.query);
            Outputs::None
        }
        Statement::Copy {
            source: sqlparser::ast::CopySource::Query(q),
            ..
        } => Outputs::Known(cx.query(q)),
        Statement::Copy {
            source:
                sqlparser::ast::CopySource::Table {
                    table_name,
                    columns,
                },
            to: false,
            ..
        } => {
            let target = object_name(table_name);
            let columns: Vec<String> = columns.iter().map(ident).collect();
            cx.written_unseen(&target, &columns, "values written by COPY");
            Outputs::None
        }
        Statement::Declare { stmts } => {
            for d in stmts {
                if let Some(q) = &d.for_query {
                    let outs = cx.query(q);
                    if let [name] = d.names.as_slice() {
                        cursor = Some((ident(name), Outputs::Known(outs)));
                    }
                }
            }
            Outputs::None
        }
        Statement::Fetch { name, .. } => {
            fetch = Some(ident(name));
            Outputs::Unknown
        }
        Statement::Explain {
            statement: inner, ..
        } => {
            // The plan is text about the query, not its data; the query's
            // predicates still count (EXPLAIN ANALYZE runs it and counts rows).
            cx.absorb(self::statement(inner, cx.probes));
            Outputs::Known(vec![Output::Column {
                name: "QUERY PLAN".into(),
                lineage: Lineage::default(),
            }])
        }
        Statement::Merge(m) => {
            // Not modelled in detail: every table it names, whole, may be
            // written anywhere it writes.
            let mut l = Lineage::default();
            let _ = sqlparser::ast::visit_relations(m, |r| {
                l.add(
                    Source {
                        relation: object_name(r),
                        column: None,
                    },
                    Flow::Derived,
                );
                ControlFlow::<()>::Continue(())
            });
            cx.writes.push(Write {
                target: "MERGE".into(),
                lineage: l,
            });
            Outputs::Unknown
        }
        Statement::Prepare {
            statement: inner, ..
        } => {
            // Its rows come with `EXECUTE`, of unknown origin there; its
            // conditions and writes are checked now.
            cx.absorb(self::statement(inner, cx.probes));
            Outputs::None
        }
        Statement::ShowVariable { variable } => {
            let name = variable.iter().map(ident).collect::<Vec<_>>().join(".");
            if name == "all" {
                // Every parameter, custom ones too.
                Outputs::Unknown
            } else {
                Outputs::Known(vec![Output::Column {
                    lineage: parameter(&name),
                    name,
                }])
            }
        }
        Statement::ShowCreate { obj_type, .. } => {
            // MySQL: the object's definition as the server keeps it (names,
            // types, defaults, a view's or routine's text): a description
            // of the schema, never its rows.
            use sqlparser::ast::ShowCreateObject as O;
            let names: &[&str] = match obj_type {
                O::Table => &["Table", "Create Table"],
                O::View => &[
                    "View",
                    "Create View",
                    "character_set_client",
                    "collation_connection",
                ],
                O::Function | O::Procedure | O::Trigger | O::Event => &[],
            };
            Outputs::Known(
                names
                    .iter()
                    .map(|n| Output::Column {
                        name: (*n).to_owned(),
                        lineage: Lineage::default(),
                    })
                    .collect(),
            )
        }
        Statement::ShowVariables { .. } => {
            // MySQL: system variables only (never user variables).
            Outputs::Known(vec![
                Output::Column {
                    name: "Variable_name".into(),
                    lineage: Lineage::default(),
                },
                Output::Column {
                    name: "Value".into(),
                    lineage: parameter("@@*"),
                },
            ])
        }
        Statement::StartTransaction { .. }
        | Statement::Commit { .. }
        | Statement::Rollback { .. }
        | Statement::Savepoint { .. }
        | Statement::ReleaseSavepoint { .. }
        | Statement::Set(_)
        | Statement::Discard { .. }
        | Statement::Deallocate { .. }
        | Statement::Close { .. }
        | Statement::Drop { .. }
        | Statement::Truncate { .. } => Outputs::None,
        _ => Outputs::Unknown,
    };
    StatementLineage {
        outputs,
        predicates: cx.predicates,
        writes: cx.writes,
        functions: cx.functions,
        cursor,
        fetch,
    }
}

impl Ctx {
    /// The conditions, writes and calls of a statement run on behalf of
    /// this one (`EXPLAIN`, `PREPARE`).
    fn absorb(&mut self, l: StatementLineage) {
        self.predicates.extend(l.predicates);
        self.writes.extend(l.writes);
        self.functions.extend(l.functions);
    }

    /// A query's outputs; its predicates and writes are collected in `self`.
    fn query(&mut self, q: &Query) -> Vec<Output> {
        let mut ctes = 0;
        if let Some(with) = &q.with {
            self.scope.ctes.push(HashMap::new());
            ctes = 1;
            for cte in &with.cte_tables {
                let name = ident(&cte.alias.name);
                let mut outs = if with.recursive {
                    self.recursive_cte(&name, &cte.query)
                } else {
                    self.query(&cte.query)
                };
                rename(
                    &mut outs,
                    &cte.alias
                        .columns
                        .iter()
                        .map(|c| ident(&c.name))
                        .collect::<Vec<_>>(),
                );
                self.scope
                    .ctes
                    .last_mut()
                    .expect("pushed above")
                    .insert(name, outs);
            }
        }
        let outs = self.set_expr(&q.body, q.order_by.as_ref());
        // How many rows come back is itself an answer: `LIMIT (SELECT
        // length(ssn) ...)`.
        let mut bounds = Lineage::default();
        for e in q
            .limit_clause
            .iter()
            .map(|l| l as &dyn VisitDyn)
            .chain(q.fetch.iter().map(|f| f as &dyn VisitDyn))
        {
            let l = self.top_level(e);
            bounds.merge(&l);
        }
        self.search(bounds, "LIMIT");
        if ctes > 0 {
            self.scope.ctes.pop();
        }
        outs
    }

    /// A recursive CTE: its outputs until the lineage stops growing (each
    /// round can only add sources, and there are finitely many).
    fn recursive_cte(&mut self, name: &str, q: &Query) -> Vec<Output> {
        let mut current: Vec<Output> = Vec::new();
        for _ in 0..8 {
            self.scope
                .ctes
                .last_mut()
                .expect("the WITH level")
                .insert(name.to_owned(), current.clone());
            let next = self.query(q);
            if next == current {
                return next;
            }
            current = widen(&current, next);
        }
        // Not converged: every column is every source, derived.
        let all = all_of(&current).at_least(Flow::Derived);
        current
            .iter()
            .map(|o| Output::Column {
                name: output_name(o),
                lineage: all.clone(),
            })
            .collect()
    }

    fn set_expr(
        &mut self,
        body: &SetExpr,
        order_by: Option<&sqlparser::ast::OrderBy>,
    ) -> Vec<Output> {
        match body {
            SetExpr::Select(s) => self.select(s, order_by),
            SetExpr::Query(q) => {
                let outs = self.query(q);
                self.order_by(order_by, &outs);
                outs
            }
            SetExpr::SetOperation {
                left,
                right,
                op,
                set_quantifier,
            } => {
                let l = self.set_expr(left, None);
                let r = self.set_expr(right, None);
                let outs = union_positional(l, r);
                // Anything but `UNION ALL` compares the rows of both sides:
                // `SELECT ssn ... INTERSECT VALUES ('guess')`.
                let all = matches!(
                    set_quantifier,
                    SetQuantifier::All | SetQuantifier::AllByName
                );
                if !(all && matches!(op, SetOperator::Union)) {
                    let l = all_of(&outs);
                    self.search(l, "a set operation (it compares rows)");
                }
                self.order_by(order_by, &outs);
                outs
            }
            SetExpr::Values(v) => {
                let width = v.rows.first().map_or(0, |r| r.content.len());
                let mut cols = vec![Lineage::default(); width];
                for row in &v.rows {
                    for (i, e) in row.content.iter().enumerate() {
                        let l = self.expr(e);
                        if let Some(c) = cols.get_mut(i) {
                            c.merge(&l);
                        }
                    }
                }
                cols.into_iter()
                    .enumerate()
                    .map(|(i, lineage)| Output::Column {
                        name: format!("column{}", i + 1),
                        lineage,
                    })
                    .collect()
            }
            SetExpr::Table(t) => {
                let name = t.table_name.clone().unwrap_or_default().to_lowercase();
                match self.scope.cte(&name) {
                    Some(outs) => outs.clone(),
                    None => vec![Output::Star { relation: name }],
                }
            }
            SetExpr::Insert(s) | SetExpr::Update(s) | SetExpr::Delete(s) | SetExpr::Merge(s) => {
                // A data-modifying CTE: its RETURNING list, if modelled.
                let l = statement(s, self.probes);
                self.predicates.extend(l.predicates);
                self.writes.extend(l.writes);
                match l.outputs {
                    Outputs::Known(o) => o,
                    Outputs::None | Outputs::Unknown => Vec::new(),
                }
            }
        }
    }

    fn select(&mut self, s: &Select, order_by: Option<&sqlparser::ast::OrderBy>) -> Vec<Output> {
        self.scope.levels.push(Vec::new());
        let mut rels = Vec::new();
        for t in &s.from {
            self.relations_of(t, &mut rels);
        }
        if let Some(w) = &s.selection {
            self.predicate(w);
        }
        if let Some(w) = &s.prewhere {
            self.predicate(w);
        }
        if let Some(h) = &s.having {
            self.predicate(h);
        }
        if let Some(q) = &s.qualify {
            self.predicate(q);
        }
        let mut outs = self.projection(&s.projection);
        match &s.group_by {
            GroupByExpr::Expressions(exprs, _) => {
                for e in exprs {
                    let l = self.output_ref(e, &outs);
                    self.search(l, "GROUP BY");
                }
            }
            GroupByExpr::All(_) => {
                let l = all_of(&outs);
                self.search(l, "GROUP BY");
            }
        }
        match &s.distinct {
            Some(Distinct::On(exprs)) => {
                for e in exprs {
                    let l = self.output_ref(e, &outs);
                    self.search(l, "DISTINCT ON");
                }
            }
            Some(Distinct::Distinct) => {
                let l = all_of(&outs);
                self.search(l, "DISTINCT (it compares rows)");
                for o in &mut outs {
                    if let Output::Column { lineage, .. } = o {
                        *lineage = std::mem::take(lineage).at_least(Flow::Preserved);
                    }
                }
            }
            _ => {}
        }
        for w in &s.named_window {
            // Named windows partition and order: searches on their columns.
            let l = self.top_level(w);
            self.flag(
                l,
                Oracle::Conditional,
                "a window's partitions, order or frame",
            );
        }
        self.order_by(order_by, &outs);
        self.scope.levels.pop();
        outs
    }

    fn order_by(&mut self, order_by: Option<&sqlparser::ast::OrderBy>, outs: &[Output]) {
        let Some(ob) = order_by else { return };
        match &ob.kind {
            OrderByKind::Expressions(items) => {
                for i in items {
                    let l = self.output_ref(&i.expr, outs);
                    self.search(l, "ORDER BY");
                }
            }
            OrderByKind::All(_) => {
                let l = all_of(outs);
                self.search(l, "ORDER BY");
            }
        }
    }

    /// An `ORDER BY`/`GROUP BY` item: an output position, an output name, or
    /// an expression over the `FROM` scope.
    fn output_ref(&mut self, e: &Expr, outs: &[Output]) -> Lineage {
        if let Expr::Value(v) = e
            && let Value::Number(n, _) = &v.value
            && let Ok(i) = n.parse::<usize>()
        {
            return match outs.get(i.wrapping_sub(1)) {
                Some(Output::Column { lineage, .. }) => lineage.clone(),
                Some(o @ Output::Star { .. }) => all_of(std::slice::from_ref(o)),
                None => all_of(outs),
            };
        }
        let mut l = if let Expr::Identifier(id) = e {
            let name = ident(id);
            let mut found = Lineage::default();
            for o in outs {
                if let Output::Column { name: n, lineage } = o
                    && *n == name
                {
                    found.merge(lineage);
                }
            }
            found
        } else {
            Lineage::default()
        };
        if self.scope.levels.last().is_some_and(|l| !l.is_empty()) || l.is_empty() {
            l.merge(&self.expr(e));
        }
        l
    }

    /// A condition that selects or orders rows.
    fn search(&mut self, lineage: Lineage, why: &'static str) {
        self.flag(lineage, Oracle::Search, why);
    }

    /// Values of `lineage` used where they can give an answer of `oracle`'s
    /// kind.
    fn flag(&mut self, lineage: Lineage, oracle: Oracle, why: &'static str) {
        if !lineage.is_empty() {
            self.predicates.push(Predicate {
                test: Test::Search(why),
                oracle,
                lineage,
                probes: Vec::new(),
            });
        }
    }

    fn projection(&mut self, items: &[SelectItem]) -> Vec<Output> {
        let mut outs = Vec::new();
        for item in items {
            match item {
                SelectItem::UnnamedExpr(e) => {
                    let lineage = self.expr(e);
                    outs.push(Output::Column {
                        name: expr_name(e),
                        lineage,
                    });
                }
                SelectItem::ExprWithAlias { expr, alias } => {
                    let lineage = self.expr(expr);
                    outs.push(Output::Column {
                        name: ident(alias),
                        lineage,
                    });
                }
                SelectItem::ExprWithAliases { expr, aliases } => {
                    let lineage = self.expr(expr);
                    for a in aliases {
                        outs.push(Output::Column {
                            name: ident(a),
                            lineage: lineage.clone(),
                        });
                    }
                }
                SelectItem::Wildcard(_) => {
                    let level = self.scope.levels.last().cloned().unwrap_or_default();
                    for rel in &level {
                        outs.extend(rel.star());
                    }
                }
                SelectItem::QualifiedWildcard(kind, _) => match kind {
                    SelectItemQualifiedWildcardKind::ObjectName(n) => {
                        let name = object_name(n);
                        let alias = name.rsplit('.').next().unwrap_or(&name).to_owned();
                        match self.scope.rel(&alias) {
                            Some(rel) => outs.extend(rel.star()),
                            None => outs.push(Output::Column {
                                name: alias,
                                lineage: self.scope.all_rows(),
                            }),
                        }
                    }
                    SelectItemQualifiedWildcardKind::Expr(e) => {
                        // `(expr).*`: every field of a composite value.
                        let lineage = self.expr(e).at_least(Flow::Derived);
                        outs.push(Output::Column {
                            name: "?column?".into(),
                            lineage,
                        });
                    }
                },
            }
        }
        outs
    }

    /// Adds the relations of one `FROM` item (with its joins) to the
    /// innermost scope level, in order, so that `LATERAL` items see those
    /// before them.
    fn relations_of(&mut self, t: &TableWithJoins, rels: &mut Vec<Rel>) {
        self.factor(&t.relation, rels);
        for j in &t.joins {
            self.factor(&j.relation, rels);
            let constraint = match &j.join_operator {
                JoinOperator::Join(c)
                | JoinOperator::Inner(c)
                | JoinOperator::Left(c)
                | JoinOperator::LeftOuter(c)
                | JoinOperator::Right(c)
                | JoinOperator::RightOuter(c)
                | JoinOperator::FullOuter(c)
                | JoinOperator::CrossJoin(c)
                | JoinOperator::Semi(c)
                | JoinOperator::LeftSemi(c)
                | JoinOperator::RightSemi(c)
                | JoinOperator::Anti(c)
                | JoinOperator::LeftAnti(c)
                | JoinOperator::RightAnti(c)
                | JoinOperator::StraightJoin(c) => Some(c),
                JoinOperator::AsOf {
                    match_condition,
                    constraint,
                } => {
                    self.predicate(match_condition);
                    Some(constraint)
                }
                JoinOperator::CrossApply
                | JoinOperator::OuterApply
                | JoinOperator::ArrayJoin
                | JoinOperator::LeftArrayJoin
                | JoinOperator::InnerArrayJoin => None,
            };
            match constraint {
                Some(JoinConstraint::On(e)) => self.predicate(e),
                Some(JoinConstraint::Using(cols)) => {
                    let mut l = Lineage::default();
                    for c in cols {
                        l.merge(&self.scope.resolve(&[object_name(c)]));
                    }
                    self.search(l, "JOIN USING");
                }
                Some(JoinConstraint::Natural) => {
                    let l = self.scope.all_rows();
                    self.search(l, "NATURAL JOIN");
                }
                Some(JoinConstraint::None) | None => {}
            }
        }
    }

    fn factor(&mut self, f: &TableFactor, rels: &mut Vec<Rel>) {
        let rel = match f {
            TableFactor::Table {
                name, alias, args, ..
            } => {
                let relation = object_name(name);
                let short = relation.rsplit('.').next().unwrap_or(&relation).to_owned();
                let body = if let Some(args) = args {
                    // `FROM f(args)` parsed as a table with arguments.
                    self.functions.push(short.clone());
                    let mut l = Lineage::default();
                    for a in &args.args {
                        l.merge(&self.arg(a));
                    }
                    self.flag(l.clone(), Oracle::RowCount, ROWS_OF_FUNCTION);
                    Body::Opaque(l.at_least(Flow::Derived))
                } else if name.0.len() == 1
                    && let Some(outs) = self.scope.cte(&relation)
                {
                    Body::Derived(outs.clone())
                } else {
                    Body::Named {
                        relation: relation.clone(),
                    }
                };
                aliased(short, alias.as_ref(), body)
            }
            TableFactor::Derived {
                subquery, alias, ..
            } => {
                let outs = self.query(subquery);
                aliased(String::new(), alias.as_ref(), Body::Derived(outs))
            }
            TableFactor::Function {
                name, args, alias, ..
            } => {
                self.functions.push(last_part(name));
                let mut l = Lineage::default();
                for a in args {
                    l.merge(&self.arg(a));
                }
                self.flag(l.clone(), Oracle::RowCount, ROWS_OF_FUNCTION);
                aliased(
                    last_part(name),
                    alias.as_ref(),
                    Body::Opaque(l.at_least(Flow::Derived)),
                )
            }
            TableFactor::UNNEST {
                alias, array_exprs, ..
            } => {
                let mut l = Lineage::default();
                for e in array_exprs {
                    l.merge(&self.expr(e));
                }
                self.flag(l.clone(), Oracle::RowCount, ROWS_OF_FUNCTION);
                aliased(
                    "unnest".into(),
                    alias.as_ref(),
                    Body::Opaque(l.at_least(Flow::Derived)),
                )
            }
            TableFactor::NestedJoin {
                table_with_joins,
                alias,
            } => {
                let mut inner = Vec::new();
                self.relations_of(table_with_joins, &mut inner);
                if alias.is_none() {
                    // Its relations are visible by their own names.
                    return;
                }
                let mut outs = Vec::new();
                for r in &inner {
                    outs.extend(r.star());
                }
                aliased(String::new(), alias.as_ref(), Body::Derived(outs))
            }
            other => {
                // Anything else (JSON_TABLE, PIVOT, ...): every expression in
                // it, derived, for every column.
                let l = self.top_level(other);
                self.flag(l.clone(), Oracle::RowCount, ROWS_OF_FUNCTION);
                let l = l.at_least(Flow::Derived);
                Rel {
                    alias: String::new(),
                    body: Body::Opaque(l),
                }
            }
        };
        rels.push(rel.clone());
        self.scope
            .levels
            .last_mut()
            .expect("a scope level for FROM")
            .push(rel);
    }

    fn arg(&mut self, a: &FunctionArg) -> Lineage {
        let e = match a {
            FunctionArg::Named { arg, .. } | FunctionArg::Unnamed(arg) => arg,
            FunctionArg::ExprNamed { name, arg, .. } => {
                let mut l = self.expr(name);
                l.merge(&self.arg_expr(arg));
                return l;
            }
        };
        self.arg_expr(e)
    }

    fn arg_expr(&mut self, e: &FunctionArgExpr) -> Lineage {
        match e {
            FunctionArgExpr::Expr(e) => self.expr(e),
            FunctionArgExpr::QualifiedWildcard(n) => {
                let name = object_name(n);
                let alias = name.rsplit('.').next().unwrap_or(&name);
                self.scope
                    .rel(alias)
                    .map_or_else(|| self.scope.all_rows(), Rel::whole_row)
            }
            // `count(*)` reads no value.
            FunctionArgExpr::Wildcard | FunctionArgExpr::WildcardWithOptions(_) => {
                Lineage::default()
            }
        }
    }

    /// The lineage of an expression's value. A condition in it is recorded
    /// as a predicate ([`Oracle::Conditional`]), and so is every use of a
    /// value that can make the statement fail, take longer or return more
    /// rows ([`Self::function`], [`Self::generic`]).
    fn expr(&mut self, e: &Expr) -> Lineage {
        if is_condition(e) {
            return self
                .condition(e, Oracle::Conditional)
                .at_least(Flow::Derived);
        }
        match e {
            Expr::Identifier(id) if id.quote_style.is_none() && id.value.starts_with('@') => {
                // MySQL: `@@[scope.]name` a system variable, `@name` a user
                // variable (which can carry any value: never built in).
                match id.value.strip_prefix("@@") {
                    Some(v) => parameter(&format!("@@{}", v.rsplit('.').next().unwrap_or(v))),
                    None => parameter(&id.value),
                }
            }
            Expr::Identifier(id) => self.scope.resolve(&[ident(id)]),
            Expr::CompoundIdentifier(ids) => {
                let parts: Vec<String> = ids.iter().map(ident).collect();
                self.scope.resolve(&parts)
            }
            Expr::Nested(inner) => self.expr(inner),
            Expr::Value(_) | Expr::TypedString(_) => Lineage {
                constant: true,
                ..Lineage::default()
            },
            Expr::Cast {
                kind,
                expr,
                data_type,
                format: None,
                ..
            } if matches!(kind, CastKind::Cast | CastKind::DoubleColon)
                && is_text_type(data_type) =>
            {
                self.expr(expr).at_least(Flow::Preserved)
            }
            Expr::Case {
                operand,
                conditions,
                else_result,
                ..
            } => {
                // The branch taken depends on the conditions: derived from
                // them, and each is a predicate; the results pass through.
                let mut tests = Lineage::default();
                match operand {
                    Some(op) => {
                        let l = self.expr(op);
                        let whens: Vec<&Expr> = conditions.iter().map(|c| &c.condition).collect();
                        if whens.iter().all(|w| is_constant(w)) {
                            self.equality(l.clone(), &whens, Oracle::Conditional, "CASE");
                        } else {
                            let mut all = l.clone();
                            for w in whens {
                                all.merge(&self.expr(w));
                            }
                            tests.merge(&all);
                            self.flag(all, Oracle::Conditional, "CASE");
                        }
                        tests.merge(&l);
                    }
                    None => {
                        for c in conditions {
                            let l = self.condition(&c.condition, Oracle::Conditional);
                            tests.merge(&l);
                        }
                    }
                }
                let mut results = Lineage::default();
                for c in conditions {
                    results.merge(&self.expr(&c.result));
                }
                if let Some(e) = else_result {
                    results.merge(&self.expr(e));
                }
                let mut l = results.at_least(Flow::Preserved);
                l.merge(&tests.at_least(Flow::Derived));
                l
            }
            Expr::Function(f) => self.function(f),
            Expr::Subquery(q) => {
                let outs = self.query(q);
                all_of(&outs).at_least(Flow::Preserved)
            }
            Expr::Substring {
                expr,
                substring_from,
                substring_for,
                ..
            } => {
                // Total on the value; a position or length from a value can
                // make it fail.
                let mut l = self.expr(expr);
                let mut control = Lineage::default();
                for x in substring_from.iter().chain(substring_for) {
                    control.merge(&self.expr(x));
                }
                self.flag(control.clone(), Oracle::Error, CONTROL_ARGUMENT);
                l.merge(&control);
                l.json = None;
                l.at_least(Flow::Derived)
            }
            _ => self.generic(e),
        }
    }

    #[allow(clippy::too_many_lines)] // one place for what each kind of function may do with a value
    fn function(&mut self, f: &Function) -> Lineage {
        let name = last_part(&f.name);
        self.functions.push(name.clone());
        if let Some(l) = server_parameter(&name, f) {
            return l;
        }
        let mut args = Vec::new();
        let mut arg_exprs: Vec<Option<&Expr>> = Vec::new();
        let mut extra = Lineage::default();
        let mut distinct = false;
        match &f.args {
            FunctionArguments::None => {}
            FunctionArguments::Subquery(q) => {
                let outs = self.query(q);
                extra.merge(&all_of(&outs));
            }
            FunctionArguments::List(list) => {
                distinct = matches!(list.duplicate_treatment, Some(DuplicateTreatment::Distinct));
                for a in &list.args {
                    args.push(self.arg(a));
                    arg_exprs.push(match a {
                        FunctionArg::Unnamed(FunctionArgExpr::Expr(e))
                        | FunctionArg::Named {
                            arg: FunctionArgExpr::Expr(e),
                            ..
                        } => Some(e),
                        _ => None,
                    });
                }
                for c in &list.clauses {
                    extra.merge(&self.top_level(c));
                }
            }
        }
        if let FunctionArguments::List(p) = &f.parameters {
            for a in &p.args {
                extra.merge(&self.arg(a));
            }
        }
        if let Some(filter) = &f.filter {
            extra.merge(&self.condition(filter, Oracle::Conditional));
        }
        for o in &f.within_group {
            extra.merge(&self.expr(&o.expr));
        }
        if let Some(over) = &f.over {
            // Partitions, order and frame choose which rows a value comes
            // from.
            let w = self.top_level(over);
            self.flag(
                w.clone(),
                Oracle::Conditional,
                "a window's partitions, order or frame",
            );
            extra.merge(&w);
        }
        let mut all_args = Lineage::default();
        for a in &args {
            all_args.merge(a);
        }
        if distinct {
            self.search(all_args.clone(), "DISTINCT (it compares rows)");
        }
        match function_kind(&name) {
            FunctionKind::Total { control_from } => {
                for (i, a) in args.iter().enumerate() {
                    let control = match control_from {
                        Control::From(n) => i >= n,
                        Control::EvenPositions => i % 2 == 0,
                    };
                    if control {
                        self.flag(a.clone(), Oracle::Error, CONTROL_ARGUMENT);
                    }
                }
            }
            FunctionKind::Orders => {
                if args.len() > 1 || matches!(name.as_str(), "min" | "max") {
                    self.flag(
                        all_args.clone(),
                        Oracle::Conditional,
                        "an ordering (GREATEST, LEAST, min, max)",
                    );
                }
            }
            FunctionKind::Coalesce => {
                // Which argument comes back says which were NULL.
                for (a, e) in args
                    .iter()
                    .zip(&arg_exprs)
                    .take(args.len().saturating_sub(1))
                {
                    let _ = e;
                    self.equality(a.clone(), &[], Oracle::Conditional, "COALESCE");
                }
            }
            FunctionKind::NullIf => match (args.first(), arg_exprs.get(1).copied().flatten()) {
                (Some(a), Some(b))
                    if is_constant(b) && args.get(1).is_none_or(Lineage::is_empty) =>
                {
                    self.equality(a.clone(), &[b], Oracle::Conditional, "NULLIF");
                }
                _ => self.flag(all_args.clone(), Oracle::Conditional, "NULLIF"),
            },
            FunctionKind::Timing => {
                let mut l = all_args.clone();
                l.merge(&extra);
                self.flag(
                    l,
                    Oracle::Timing,
                    "a sleep or repetition whose cost follows the value",
                );
            }
            FunctionKind::Rows => {
                self.flag(all_args.clone(), Oracle::RowCount, ROWS_OF_FUNCTION);
            }
            FunctionKind::Other => {
                self.flag(all_args.clone(), Oracle::Error, "a function that can fail");
            }
        }
        let shape = if f.over.is_none() && extra.is_empty() {
            self.json_shape(&name, f, &args)
        } else {
            None
        };
        let chooses = f.over.is_none()
            && extra.is_empty()
            && matches!(
                name.as_str(),
                "min" | "max" | "coalesce" | "greatest" | "least" | "any_value"
            );
        let mut l = all_args;
        let mut l = if chooses {
            std::mem::take(&mut l).at_least(Flow::Preserved)
        } else {
            std::mem::take(&mut l).at_least(Flow::Derived)
        };
        l.merge(&extra.at_least(Flow::Derived));
        l.json = shape.map(Box::new);
        l
    }

    /// The shape of a known JSON builder's result.
    fn json_shape(&self, name: &str, f: &Function, args: &[Lineage]) -> Option<JsonShape> {
        let FunctionArguments::List(list) = &f.args else {
            return None;
        };
        let array = matches!(name, "json_agg" | "jsonb_agg");
        match name {
            "row_to_json" | "to_json" | "to_jsonb" | "json_agg" | "jsonb_agg" => {
                if list.duplicate_treatment.is_some() || !list.clauses.is_empty() {
                    return None;
                }
                let first = list.args.first()?;
                let rel = match first {
                    FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Identifier(id))) => {
                        self.scope.rel(&ident(id))
                    }
                    FunctionArg::Unnamed(FunctionArgExpr::QualifiedWildcard(n)) => {
                        let n = object_name(n);
                        self.scope.rel(n.rsplit('.').next().unwrap_or(&n))
                    }
                    _ => None,
                };
                if let Some(rel) = rel {
                    let fields = match &rel.body {
                        Body::Named { relation } => vec![Output::Star {
                            relation: relation.clone(),
                        }],
                        Body::Derived(outs) => outs.clone(),
                        Body::Opaque(_) => return None,
                    };
                    return Some(JsonShape { fields, array });
                }
                // An aggregate of objects built by a known builder.
                let inner = args.first()?.json.as_deref()?;
                (array && !inner.array && list.args.len() == 1).then(|| JsonShape {
                    fields: inner.fields.clone(),
                    array: true,
                })
            }
            "json_build_object" | "jsonb_build_object" => {
                if list.args.len() % 2 != 0 {
                    return None;
                }
                let mut fields = Vec::new();
                for (pair, lin) in list.args.chunks(2).zip(args.chunks(2)) {
                    let FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Value(v))) = &pair[0]
                    else {
                        return None;
                    };
                    let key = match &v.value {
                        Value::SingleQuotedString(k) => k.clone(),
                        _ => return None,
                    };
                    fields.push(Output::Column {
                        name: key,
                        lineage: lin[1].clone(),
                    });
                }
                Some(JsonShape {
                    fields,
                    array: false,
                })
            }
            _ => None,
        }
    }

    /// Any other expression: derived from its operands (subqueries in it
    /// analysed in their own scope), and a predicate of the kind its
    /// operation can answer ([`hazard`]).
    fn generic(&mut self, e: &Expr) -> Lineage {
        let l = self.operands(e);
        if let Some((oracle, why)) = hazard(e) {
            self.flag(l.clone(), oracle, why);
        }
        l
    }

    /// The lineage of an expression's direct operands, derived.
    fn operands(&mut self, e: &Expr) -> Lineage {
        let mut found = Children::new(1);
        let _ = e.visit(&mut found);
        self.children(&found)
    }

    /// The lineage of the outermost expressions (and queries) in an AST
    /// node of any type, derived.
    fn top_level(&mut self, node: &dyn VisitDyn) -> Lineage {
        let mut found = Children::new(0);
        node.visit_dyn(&mut found);
        self.children(&found)
    }

    fn children(&mut self, found: &Children) -> Lineage {
        let mut l = Lineage::default();
        for q in &found.queries {
            let outs = self.query(q);
            l.merge(&all_of(&outs));
        }
        for x in &found.exprs {
            l.merge(&self.expr(x));
        }
        // An operator over a JSON value may move values between keys.
        l.json = None;
        l.at_least(Flow::Derived)
    }

    /// A boolean condition that selects rows (`WHERE`, `ON`, `HAVING`).
    fn predicate(&mut self, e: &Expr) {
        let _ = self.condition(e, Oracle::Search);
    }

    /// A boolean condition: split at `AND`/`OR`/`NOT`; each leaf is an
    /// equality test or a search, recorded as answering `oracle`. Returns
    /// what the condition reads.
    #[allow(clippy::too_many_lines)] // one arm per kind of test
    fn condition(&mut self, e: &Expr, oracle: Oracle) -> Lineage {
        use sqlparser::ast::BinaryOperator as B;
        match e {
            Expr::Nested(inner) => self.condition(inner, oracle),
            Expr::UnaryOp {
                op: UnaryOperator::Not,
                expr,
            }
            | Expr::IsTrue(expr)
            | Expr::IsFalse(expr)
            | Expr::IsNotTrue(expr)
            | Expr::IsNotFalse(expr)
            | Expr::IsUnknown(expr)
            | Expr::IsNotUnknown(expr) => self.condition(expr, oracle),
            Expr::BinaryOp {
                left,
                op: B::And | B::Or,
                right,
            } => {
                let mut l = self.condition(left, oracle);
                l.merge(&self.condition(right, oracle));
                l
            }
            Expr::BinaryOp {
                left,
                op: B::Eq | B::NotEq,
                right,
            }
            | Expr::IsDistinctFrom(left, right)
            | Expr::IsNotDistinctFrom(left, right)
                if is_constant(right) || is_constant(left) =>
            {
                let (col, lit) = if is_constant(right) {
                    (left, right)
                } else {
                    (right, left)
                };
                let l = self.expr(col);
                self.equality(l.clone(), &[lit.as_ref()], oracle, "a comparison");
                l
            }
            Expr::InList { expr, list, .. } if list.iter().all(is_constant) => {
                let l = self.expr(expr);
                let values: Vec<&Expr> = list.iter().collect();
                self.equality(l.clone(), &values, oracle, "IN");
                l
            }
            Expr::AnyOp {
                left,
                compare_op: B::Eq,
                right,
                ..
            }
            | Expr::AllOp {
                left,
                compare_op: B::NotEq,
                right,
            } if is_constant(right) || matches!(right.as_ref(), Expr::Array(_)) => {
                let l = self.expr(left);
                match right.as_ref() {
                    Expr::Array(a) if a.elem.iter().all(is_constant) => {
                        let values: Vec<&Expr> = a.elem.iter().collect();
                        self.equality(l.clone(), &values, oracle, "= ANY");
                    }
                    Expr::Array(a) => {
                        let mut all = l.clone();
                        for x in &a.elem {
                            all.merge(&self.expr(x));
                        }
                        self.flag(all, oracle, "= ANY");
                    }
                    _ => self.flag(
                        l.clone(),
                        Oracle::Enumeration,
                        "= ANY over an array literal or parameter (its number of values is not bounded)",
                    ),
                }
                l
            }
            Expr::IsNull(x) | Expr::IsNotNull(x) => {
                let l = self.expr(x);
                self.equality(l.clone(), &[], oracle, "IS NULL");
                l
            }
            other => {
                let l = if is_condition(other) {
                    self.operands(other)
                } else {
                    self.expr(other)
                };
                let why = match other {
                    Expr::Like { .. } | Expr::ILike { .. } => "LIKE",
                    Expr::SimilarTo { .. } | Expr::RLike { .. } => "a pattern match",
                    Expr::Between { .. } => "BETWEEN",
                    Expr::BinaryOp {
                        op: B::Lt | B::LtEq | B::Gt | B::GtEq,
                        ..
                    } => "a range comparison",
                    Expr::BinaryOp {
                        op: B::Eq | B::NotEq,
                        ..
                    } => "a comparison with a column or an expression",
                    Expr::BinaryOp { .. } => "an operator",
                    Expr::InList { .. } => "IN with expressions",
                    Expr::InSubquery { .. } => "IN (subquery)",
                    _ => "an expression",
                };
                self.flag(l.clone(), oracle, why);
                l
            }
        }
    }

    /// Values written into a table's columns meet every value already there
    /// in its unique constraints (and in `ON CONFLICT` / `ON DUPLICATE KEY`):
    /// writing a guess answers whether it exists. Each column written is an
    /// equality test with the values written ([`Oracle::Uniqueness`]), or a
    /// search when they are read from columns or a query, or when the
    /// statement does not name its columns.
    fn inserted(&mut self, target: &str, ins: &sqlparser::ast::Insert) {
        let columns: Vec<String> = ins.columns.iter().map(last_part).collect();
        if !ins.assignments.is_empty() {
            // MySQL's `INSERT ... SET col = value`.
            self.assigned(target, &ins.assignments);
            return;
        }
        let Some(source) = &ins.source else { return };
        let rows = match source.body.as_ref() {
            SetExpr::Values(v) if source.with.is_none() => Some(&v.rows),
            _ => None,
        };
        match rows {
            Some(rows) if !columns.is_empty() => {
                for (i, column) in columns.iter().enumerate() {
                    let values: Vec<&Expr> = rows.iter().filter_map(|r| r.get(i)).collect();
                    self.written(target, column, &values);
                }
            }
            Some(_) => self.written_unseen(target, &columns, "a row written without a column list"),
            None => self.written_unseen(target, &columns, "values written from a query"),
        }
    }

    /// `UPDATE ... SET col = value` (and `MySQL`'s `INSERT ... SET`).
    fn assigned(&mut self, target: &str, assignments: &[sqlparser::ast::Assignment]) {
        for a in assignments {
            match &a.target {
                sqlparser::ast::AssignmentTarget::ColumnName(c) => {
                    self.written(target, &last_part(c), &[&a.value]);
                }
                sqlparser::ast::AssignmentTarget::Tuple(cs) => {
                    let cs: Vec<String> = cs.iter().map(last_part).collect();
                    self.written_unseen(target, &cs, "values written from a query");
                }
            }
        }
    }

    /// `values` written into `target.column`: an equality test with them
    /// when they are constants, a search when they read columns.
    fn written(&mut self, target: &str, column: &str, values: &[&Expr]) {
        let lineage = Lineage::from_source(
            Source {
                relation: target.to_owned(),
                column: Some(column.to_owned()),
            },
            Flow::Direct,
        );
        let why = "a value computed from columns written";
        if values.iter().all(|v| reads_no_column(v)) {
            self.equality(lineage, values, Oracle::Uniqueness, why);
        } else {
            self.flag(lineage, Oracle::Uniqueness, why);
        }
    }

    /// Values the statement does not show written into `columns` of
    /// `target` (all of them when empty).
    fn written_unseen(&mut self, target: &str, columns: &[String], why: &'static str) {
        let mut lineage = Lineage::default();
        if columns.is_empty() {
            lineage.add(
                Source {
                    relation: target.to_owned(),
                    column: None,
                },
                Flow::Direct,
            );
        }
        for c in columns {
            lineage.add(
                Source {
                    relation: target.to_owned(),
                    column: Some(c.clone()),
                },
                Flow::Direct,
            );
        }
        self.flag(lineage, Oracle::Uniqueness, why);
    }

    /// `lineage` compared for equality with `values` (literals or
    /// parameters): an equality test when the value compared is the
    /// column's own (not computed from it), a search otherwise.
    fn equality(&mut self, lineage: Lineage, values: &[&Expr], oracle: Oracle, why: &'static str) {
        if lineage.is_empty() {
            return;
        }
        let direct = lineage.sources.values().all(|f| *f <= Flow::Preserved);
        if !direct {
            self.flag(lineage, oracle, why);
            return;
        }
        let probes = if self.probes {
            values.iter().map(|v| probe(v)).collect()
        } else {
            Vec::new()
        };
        self.predicates.push(Predicate {
            test: Test::Equality {
                values: values.len(),
            },
            oracle,
            lineage,
            probes,
        });
    }
}

// ---------------------------------------------------------------------------
// Helpers

/// Visits the expressions of an AST node of any type.
trait VisitDyn {
    fn visit_dyn(&self, v: &mut Children);
}

impl<T: Visit> VisitDyn for T {
    fn visit_dyn(&self, v: &mut Children) {
        let _ = self.visit(v);
    }
}

/// The expressions one level below the root (`level` 1 for an expression's
/// operands, 0 for the outermost expressions of another node), and the
/// queries at that level that are not expressions (`EXISTS`, `IN`). What is
/// inside a subquery resolves in the subquery's scope and is not collected.
struct Children {
    level: usize,
    depth: usize,
    in_query: usize,
    exprs: Vec<Expr>,
    queries: Vec<Query>,
}

impl Children {
    fn new(level: usize) -> Self {
        Children {
            level,
            depth: 0,
            in_query: 0,
            exprs: Vec::new(),
            queries: Vec::new(),
        }
    }
}

impl Visitor for Children {
    type Break = ();

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<()> {
        if self.in_query == 0 && self.depth == self.level {
            self.queries.push(q.clone());
        }
        self.in_query += 1;
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _q: &Query) -> ControlFlow<()> {
        self.in_query -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        if self.in_query == 0 && self.depth == self.level {
            self.exprs.push(e.clone());
        }
        self.depth += 1;
        ControlFlow::Continue(())
    }

    fn post_visit_expr(&mut self, _e: &Expr) -> ControlFlow<()> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }
}

/// The relation of a [`Source`] that is a server parameter (`SHOW x`,
/// `current_setting('x')`, `version()`, `MySQL` `@@x`, `@x`): its column is
/// the parameter's name (`@@name` for a `MySQL` system variable, `@name` for
/// a user variable). The policy side decides which are built in (not data,
/// [`crate::mask::lineage::Relations::builtin_parameter`]).
pub const PARAMETER: &str = "(server parameter)";

fn parameter(name: &str) -> Lineage {
    Lineage::from_source(
        Source {
            relation: PARAMETER.into(),
            column: Some(name.to_lowercase()),
        },
        Flow::Direct,
    )
}

/// `version()`, `current_setting('name' [, missing_ok])`: the parameter
/// read. A name that is not a literal is a parameter of unknown name.
fn server_parameter(name: &str, f: &Function) -> Option<Lineage> {
    let FunctionArguments::List(list) = &f.args else {
        return (name == "version" && matches!(f.args, FunctionArguments::None))
            .then(|| parameter("server_version"));
    };
    match (name, list.args.first()) {
        ("version", None) => Some(parameter("server_version")),
        ("current_setting", Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Value(v)))))
            if list.args.len() <= 2 && f.over.is_none() && f.filter.is_none() =>
        {
            Some(match &v.value {
                Value::SingleQuotedString(s) => parameter(s),
                _ => parameter("(expression)"),
            })
        }
        _ => None,
    }
}

/// Why a value used by a function in `FROM` (or a set-returning one) is
/// a search: how many rows come back follows it.
const ROWS_OF_FUNCTION: &str = "a set-returning function (its number of rows follows the value)";
/// Why a value used as a position, length or count is a search.
const CONTROL_ARGUMENT: &str =
    "a value used as a function's position, length, count or key (the call can fail)";

/// Which arguments of a total function are not the value it works on.
#[derive(Debug, Clone, Copy)]
enum Control {
    From(usize),
    /// `json_build_object(key, value, ...)`: the keys.
    EvenPositions,
}

/// What a function can do with a value that reaches it.
#[derive(Debug, Clone, Copy)]
enum FunctionKind {
    /// Never fails on the value it works on, and costs about its length;
    /// arguments from `control_from` on steer it (a position, a length).
    Total {
        control_from: Control,
    },
    /// Chooses by comparing: `greatest`, `least`, `min`, `max`.
    Orders,
    Coalesce,
    NullIf,
    /// Takes a time that follows its arguments.
    Timing,
    /// Returns a number of rows that follows its arguments.
    Rows,
    /// Anything else: it may fail.
    Other,
}

/// Functions (Postgres and `MySQL` names) by what they can do with a value.
/// A function not listed is [`FunctionKind::Other`]: it may fail.
fn function_kind(name: &str) -> FunctionKind {
    use FunctionKind as K;
    match name {
        "upper" | "lower" | "ucase" | "lcase" | "initcap" | "reverse" | "length"
        | "char_length" | "character_length" | "octet_length" | "bit_length" | "md5" | "ascii"
        | "concat" | "concat_ws" | "quote_literal" | "quote_ident" | "quote_nullable"
        | "to_json" | "to_jsonb" | "row_to_json" | "json_build_array" | "jsonb_build_array"
        | "json_agg" | "jsonb_agg" | "array_agg" | "string_agg" | "group_concat" | "count"
        | "any_value" | "strpos" | "array_to_string" | "cardinality" | "json_array"
        | "json_arrayagg" => K::Total {
            control_from: Control::From(usize::MAX),
        },
        "substr" | "substring" | "left" | "right" | "lpad" | "rpad" | "split_part" | "replace"
        | "translate" | "btrim" | "ltrim" | "rtrim" | "trim" | "mid" => K::Total {
            control_from: Control::From(1),
        },
        "json_build_object" | "jsonb_build_object" | "json_object" => K::Total {
            control_from: Control::EvenPositions,
        },
        "greatest" | "least" | "min" | "max" => K::Orders,
        "coalesce" | "ifnull" | "nvl" => K::Coalesce,
        "nullif" => K::NullIf,
        "pg_sleep" | "pg_sleep_for" | "pg_sleep_until" | "sleep" | "benchmark" | "repeat" => {
            K::Timing
        }
        "generate_series"
        | "generate_subscripts"
        | "unnest"
        | "regexp_matches"
        | "regexp_split_to_table"
        | "string_to_table"
        | "json_array_elements"
        | "json_array_elements_text"
        | "jsonb_array_elements"
        | "jsonb_array_elements_text"
        | "json_each"
        | "json_each_text"
        | "jsonb_each"
        | "jsonb_each_text"
        | "json_object_keys"
        | "jsonb_object_keys"
        | "jsonb_path_query"
        | "json_populate_recordset"
        | "jsonb_populate_recordset"
        | "json_to_recordset"
        | "jsonb_to_recordset"
        | "json_table" => K::Rows,
        _ => K::Other,
    }
}

/// Whether an expression is a condition (its value is a truth value
/// computed by comparing).
fn is_condition(e: &Expr) -> bool {
    use sqlparser::ast::BinaryOperator as B;
    match e {
        Expr::BinaryOp { op, .. } => matches!(
            op,
            B::Eq
                | B::NotEq
                | B::Lt
                | B::LtEq
                | B::Gt
                | B::GtEq
                | B::Spaceship
                | B::And
                | B::Or
                | B::Xor
                | B::Match
                | B::Regexp
                | B::Glob
                | B::PGOverlap
                | B::PGRegexMatch
                | B::PGRegexIMatch
                | B::PGRegexNotMatch
                | B::PGRegexNotIMatch
                | B::PGLikeMatch
                | B::PGILikeMatch
                | B::PGNotLikeMatch
                | B::PGNotILikeMatch
                | B::PGStartsWith
                | B::AtAt
                | B::AtArrow
                | B::ArrowAt
        ),
        Expr::UnaryOp {
            op: UnaryOperator::Not,
            ..
        }
        | Expr::IsFalse(_)
        | Expr::IsNotFalse(_)
        | Expr::IsTrue(_)
        | Expr::IsNotTrue(_)
        | Expr::IsNull(_)
        | Expr::IsNotNull(_)
        | Expr::IsUnknown(_)
        | Expr::IsNotUnknown(_)
        | Expr::IsDistinctFrom(..)
        | Expr::IsNotDistinctFrom(..)
        | Expr::IsJson { .. }
        | Expr::IsNormalized { .. }
        | Expr::InList { .. }
        | Expr::InSubquery { .. }
        | Expr::InUnnest { .. }
        | Expr::Between { .. }
        | Expr::Like { .. }
        | Expr::ILike { .. }
        | Expr::SimilarTo { .. }
        | Expr::RLike { .. }
        | Expr::AnyOp { .. }
        | Expr::AllOp { .. }
        | Expr::Exists { .. }
        | Expr::MatchAgainst { .. }
        | Expr::MemberOf(_) => true,
        _ => false,
    }
}

/// What an operation (not a function call or a condition) can answer about
/// its operands: arithmetic and casts can fail; concatenation, JSON field
/// access, arrays, rows, `SUBSTRING`, `TRIM`, `POSITION` and casts to text
/// types cannot. An operation not listed may fail.
fn hazard(e: &Expr) -> Option<(Oracle, &'static str)> {
    use sqlparser::ast::BinaryOperator as B;
    const ARITHMETIC: &str = "arithmetic (it can fail: division by zero, overflow)";
    match e {
        Expr::BinaryOp { op, .. } => match op {
            B::StringConcat | B::Arrow | B::LongArrow | B::HashArrow | B::HashLongArrow => None,
            B::Plus
            | B::Minus
            | B::Multiply
            | B::Divide
            | B::Modulo
            | B::DuckIntegerDivide
            | B::MyIntegerDivide
            | B::PGExp => Some((Oracle::Error, ARITHMETIC)),
            _ => Some((Oracle::Error, "an operator that can fail")),
        },
        Expr::UnaryOp {
            op: UnaryOperator::Plus,
            ..
        }
        | Expr::Nested(_)
        | Expr::Collate { .. }
        | Expr::Array(_)
        | Expr::Tuple(_)
        | Expr::Trim { .. }
        | Expr::Position { .. }
        | Expr::CompoundFieldAccess { .. }
        | Expr::JsonAccess { .. }
        | Expr::Value(_)
        | Expr::TypedString(_)
        | Expr::Identifier(_)
        | Expr::CompoundIdentifier(_)
        | Expr::Interval(_)
        | Expr::Named { .. } => None,
        Expr::UnaryOp { .. } => Some((Oracle::Error, ARITHMETIC)),
        Expr::Cast { data_type, .. } if is_text_like(data_type) => None,
        Expr::Cast { .. } | Expr::Convert { .. } => Some((Oracle::Error, "a cast (it can fail)")),
        _ => Some((Oracle::Error, "an expression that can fail")),
    }
}

/// A text type, bounded or not: a cast to it never fails.
fn is_text_like(t: &DataType) -> bool {
    match t {
        DataType::Text
        | DataType::Varchar(_)
        | DataType::CharacterVarying(_)
        | DataType::CharVarying(_)
        | DataType::Char(_)
        | DataType::Character(_)
        | DataType::String(_)
        | DataType::Nvarchar(_) => true,
        DataType::Custom(name, _) => {
            matches!(last_part(name).as_str(), "name" | "bpchar" | "citext")
        }
        _ => false,
    }
}

/// An expression of constants only (`DEFAULT`, literals, parameters,
/// functions of them): no column and no subquery is read.
fn reads_no_column(e: &Expr) -> bool {
    let found = sqlparser::ast::visit_expressions(e, |x| match x {
        Expr::Identifier(i) if !i.value.eq_ignore_ascii_case("default") => ControlFlow::Break(()),
        Expr::CompoundIdentifier(_)
        | Expr::Subquery(_)
        | Expr::Exists { .. }
        | Expr::InSubquery { .. } => ControlFlow::Break(()),
        _ => ControlFlow::Continue(()),
    });
    found.is_continue()
}

/// The value a constant stands for.
fn probe(e: &Expr) -> Probe {
    match e {
        Expr::Value(v) => match &v.value {
            Value::Placeholder(p) => p
                .strip_prefix('$')
                .and_then(|n| n.parse().ok())
                .map_or_else(|| Probe::Other(p.clone()), Probe::Param),
            Value::Number(n, _) => Probe::Literal(n.clone()),
            other => other
                .clone()
                .into_string()
                .map_or_else(|| Probe::Other(other.to_string()), Probe::Literal),
        },
        Expr::Cast { expr, .. } | Expr::Nested(expr) => probe(expr),
        other => Probe::Other(other.to_string()),
    }
}

fn ident(i: &Ident) -> String {
    if i.quote_style.is_some() {
        i.value.clone()
    } else {
        i.value.to_lowercase()
    }
}

fn last_part(n: &ObjectName) -> String {
    let full = object_name(n);
    full.rsplit('.').next().unwrap_or(&full).to_owned()
}

fn aliased(default: String, alias: Option<&sqlparser::ast::TableAlias>, body: Body) -> Rel {
    match alias {
        None => Rel {
            alias: default,
            body,
        },
        Some(a) => {
            let names: Vec<String> = a.columns.iter().map(|c| ident(&c.name)).collect();
            let body = match body {
                Body::Derived(mut outs) if !names.is_empty() => {
                    if outs.iter().any(|o| matches!(o, Output::Star { .. })) {
                        // Positions behind `*` are unknown: every column
                        // could be any of them.
                        Body::Opaque(all_of(&outs).at_least(Flow::Direct))
                    } else {
                        rename(&mut outs, &names);
                        Body::Derived(outs)
                    }
                }
                Body::Named { relation } if !names.is_empty() => {
                    Body::Opaque(Lineage::from_source(
                        Source {
                            relation,
                            column: None,
                        },
                        Flow::Direct,
                    ))
                }
                b => b,
            };
            Rel {
                alias: ident(&a.name),
                body,
            }
        }
    }
}

/// Column aliases (`t(a, b)`, `WITH x(a, b)`) rename outputs by position.
fn rename(outs: &mut [Output], names: &[String]) {
    if names.is_empty() {
        return;
    }
    if outs.iter().any(|o| matches!(o, Output::Star { .. })) {
        let all = all_of(outs);
        for o in outs.iter_mut() {
            *o = Output::Column {
                name: String::new(),
                lineage: all.clone(),
            };
        }
    }
    for (o, n) in outs.iter_mut().zip(names) {
        if let Output::Column { name, .. } = o {
            name.clone_from(n);
        }
    }
}

fn output_name(o: &Output) -> String {
    match o {
        Output::Column { name, .. } => name.clone(),
        Output::Star { relation } => relation.clone(),
    }
}

/// Set operations: column i is the union of both sides' column i. With a
/// `*` over a named relation on either side the positions are unknown, so
/// every column is the union of everything.
fn union_positional(l: Vec<Output>, r: Vec<Output>) -> Vec<Output> {
    let starred = |v: &[Output]| v.iter().any(|o| matches!(o, Output::Star { .. }));
    if starred(&l) || starred(&r) || l.len() != r.len() {
        let mut all = all_of(&l);
        all.merge(&all_of(&r));
        let width = l.len().max(r.len()).max(1);
        return (0..width)
            .map(|i| Output::Column {
                name: l.get(i).map(output_name).unwrap_or_default(),
                lineage: all.clone(),
            })
            .collect();
    }
    l.into_iter()
        .zip(r)
        .map(|(a, b)| match (a, b) {
            (Output::Column { name, mut lineage }, Output::Column { lineage: rl, .. }) => {
                lineage.merge(&rl);
                Output::Column { name, lineage }
            }
            _ => unreachable!("no stars here"),
        })
        .collect()
}

/// The recursive CTE's next approximation: the union with the previous one.
fn widen(prev: &[Output], next: Vec<Output>) -> Vec<Output> {
    if prev.is_empty() {
        return next;
    }
    union_positional(prev.to_vec(), next)
}

/// The name Postgres gives an unaliased output column.
fn expr_name(e: &Expr) -> String {
    match e {
        Expr::Identifier(id) => ident(id),
        Expr::CompoundIdentifier(ids) => ids.last().map(ident).unwrap_or_default(),
        Expr::Function(f) => last_part(&f.name),
        Expr::Cast { expr, .. } | Expr::Nested(expr) => expr_name(expr),
        Expr::Case { .. } => "case".into(),
        _ => "?column?".into(),
    }
}

fn is_text_type(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Text
            | DataType::Varchar(None)
            | DataType::CharacterVarying(None)
            | DataType::String(None)
    )
}

/// A literal or a parameter (`$1`, `?`), possibly cast or negated.
fn is_constant(e: &Expr) -> bool {
    match e {
        Expr::Value(_) | Expr::TypedString(_) => true,
        Expr::Cast { expr, .. }
        | Expr::Nested(expr)
        | Expr::UnaryOp {
            op: UnaryOperator::Minus | UnaryOperator::Plus,
            expr,
        } => is_constant(expr),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(sql: &str) -> StatementLineage {
        let mut all = lineage(sql, Dialect::Postgres).expect("parses");
        assert_eq!(all.len(), 1, "{sql}");
        all.remove(0)
    }

    /// Output columns as `name: relation.column/flow, ...`.
    fn outs(sql: &str) -> Vec<String> {
        let Outputs::Known(o) = one(sql).outputs else {
            panic!("{sql}: outputs not known")
        };
        o.iter()
            .map(|o| match o {
                Output::Star { relation } => format!("*{relation}"),
                Output::Column { name, lineage } => {
                    let srcs: Vec<String> = lineage
                        .sources
                        .iter()
                        .map(|(s, f)| {
                            format!(
                                "{}.{}/{f:?}",
                                s.relation,
                                s.column.as_deref().unwrap_or("*")
                            )
                        })
                        .collect();
                    format!("{name}: {}", srcs.join(" "))
                }
            })
            .collect()
    }

    fn searches(sql: &str) -> Vec<String> {
        one(sql)
            .predicates
            .iter()
            .filter_map(|p| match p.test {
                Test::Search(why) => Some(format!(
                    "{why}: {}",
                    p.lineage
                        .sources
                        .keys()
                        .map(|s| format!("{}.{}", s.relation, s.column.as_deref().unwrap_or("*")))
                        .collect::<Vec<_>>()
                        .join(" ")
                )),
                Test::Equality { .. } => None,
            })
            .collect()
    }

    #[test]
    fn direct_references_keep_their_source_under_any_alias_and_depth() {
        assert_eq!(
            outs("SELECT ssn AS x, c.card FROM customers c"),
            ["x: customers.ssn/Direct", "card: customers.card/Direct"]
        );
        assert_eq!(
            outs("WITH a AS (SELECT ssn AS s FROM customers) SELECT t.s FROM (SELECT s FROM a) t"),
            ["s: customers.ssn/Direct"]
        );
        assert_eq!(
            outs("SELECT x FROM (SELECT * FROM customers) t(x)"),
            ["x: customers.*/Direct"]
        );
    }

    #[test]
    fn expressions_are_derived_and_choices_preserved() {
        assert_eq!(
            outs("SELECT reverse(ssn) FROM customers"),
            ["reverse: customers.ssn/Derived"]
        );
        assert_eq!(
            outs("SELECT ssn || '' FROM customers"),
            ["?column?: customers.ssn/Derived"]
        );
        assert_eq!(
            outs("SELECT max(ssn) FROM customers"),
            ["max: customers.ssn/Preserved"]
        );
        assert_eq!(
            outs("SELECT ssn::text FROM customers"),
            ["ssn: customers.ssn/Preserved"]
        );
        assert_eq!(
            outs("SELECT ssn::varchar(3) FROM customers"),
            ["ssn: customers.ssn/Derived"]
        );
        assert_eq!(
            outs("SELECT CASE WHEN id > 1 THEN ssn ELSE email END FROM customers"),
            ["case: customers.email/Preserved customers.id/Derived customers.ssn/Preserved"]
        );
        assert_eq!(
            outs("SELECT CASE WHEN ssn LIKE '1%' THEN 1 END FROM customers"),
            ["case: customers.ssn/Derived"]
        );
        assert_eq!(
            outs("SELECT first_value(id) OVER (ORDER BY ssn) FROM customers"),
            ["first_value: customers.id/Derived customers.ssn/Derived"]
        );
        assert_eq!(outs("SELECT count(*) FROM customers"), ["count: "]);
        assert_eq!(
            outs("SELECT (SELECT ssn FROM customers LIMIT 1)"),
            ["?column?: customers.ssn/Preserved"]
        );
    }

    #[test]
    fn whole_rows_stars_and_unknown_relations() {
        assert_eq!(
            outs("SELECT c FROM customers c"),
            ["c: customers.*/Derived customers.c/Direct"]
        );
        assert_eq!(
            outs("SELECT row_to_json(c) FROM customers c"),
            ["row_to_json: customers.*/Derived customers.c/Derived"]
        );
        assert_eq!(
            outs("SELECT to_jsonb(c.*) FROM customers c"),
            ["to_jsonb: customers.*/Derived"]
        );
        assert_eq!(outs("SELECT * FROM customers"), ["*customers"]);
        assert_eq!(
            outs("SELECT * FROM (SELECT id, reverse(ssn) r FROM customers) t"),
            ["id: customers.id/Direct", "r: customers.ssn/Derived"]
        );
        assert_eq!(
            outs("SELECT p FROM customers c, LATERAL unnest(string_to_array(c.ssn, '-')) p"),
            ["p: customers.p/Direct customers.ssn/Derived"]
        );
        assert_eq!(one("FETCH ALL FROM c").outputs, Outputs::Unknown);
    }

    #[test]
    fn set_operations_and_recursive_ctes_union_their_sides() {
        assert_eq!(
            outs("SELECT id, name FROM customers UNION SELECT 1, ssn FROM customers"),
            [
                "id: customers.id/Direct",
                "name: customers.name/Direct customers.ssn/Direct"
            ]
        );
        let o = outs(
            "WITH RECURSIVE r(i, ch) AS (SELECT 1, substr(ssn, 1, 1) FROM customers \
             UNION ALL SELECT i + 1, substr(ssn, i + 1, 1) FROM r, customers WHERE i < 11) \
             SELECT ch FROM r",
        );
        assert!(o[0].contains("customers.ssn/Derived"), "{o:?}");
    }

    #[test]
    fn searches_on_columns_are_listed_equality_is_not() {
        assert!(
            searches("SELECT id FROM customers WHERE ssn = '1' AND id IN (1, 2) OR ssn IS NULL")
                .is_empty()
        );
        assert!(searches("SELECT id FROM customers WHERE ssn = $1").is_empty());
        assert_eq!(
            searches("SELECT id FROM customers WHERE ssn LIKE '1%'"),
            ["LIKE: customers.ssn"]
        );
        assert_eq!(
            searches("SELECT id FROM customers WHERE ssn > '5'"),
            ["a range comparison: customers.ssn"]
        );
        assert_eq!(
            searches("SELECT id FROM customers ORDER BY ssn"),
            ["ORDER BY: customers.ssn"]
        );
        assert_eq!(
            searches("SELECT ssn AS s FROM customers ORDER BY 1"),
            ["ORDER BY: customers.ssn"]
        );
        assert_eq!(
            searches("SELECT count(*) FROM customers GROUP BY ssn"),
            ["GROUP BY: customers.ssn"]
        );
        assert_eq!(
            searches("SELECT id FROM customers WHERE substr(ssn, 1, 1) = '1'"),
            ["a comparison: customers.ssn"]
        );
        assert_eq!(
            searches("SELECT (SELECT count(*) FROM customers WHERE ssn LIKE '1%')"),
            ["LIKE: customers.ssn"]
        );
        assert_eq!(
            searches("SELECT id FROM customers LIMIT (SELECT length(ssn) FROM customers LIMIT 1)"),
            ["LIMIT: customers.ssn"]
        );
        assert_eq!(
            searches("SELECT o.id FROM orders o JOIN customers c ON c.ssn = o.ssn"),
            ["a comparison with a column or an expression: customers.ssn orders.ssn"]
        );
    }

    /// The oracle class of every predicate that reads `ssn`: `E<n>` for an
    /// equality test with n values, else the class.
    fn oracles(sql: &str) -> Vec<String> {
        one(sql)
            .predicates
            .iter()
            .filter(|p| {
                p.lineage
                    .sources
                    .keys()
                    .any(|s| s.column.as_deref() == Some("ssn"))
            })
            .map(|p| match p.test {
                Test::Equality { values } => format!("E{values}"),
                Test::Search(_) => p.oracle.as_str().to_owned(),
            })
            .collect()
    }

    #[test]
    #[allow(clippy::too_many_lines)] // one table of cases
    fn a_value_that_steers_control_flow_is_a_predicate_wherever_it_is() {
        for (sql, want) in [
            // Conditions in the select list, CASE, FILTER, NULLIF, COALESCE.
            (
                "SELECT CASE WHEN substr(ssn, 1, 1) = '1' THEN 1 END FROM customers",
                &["conditional"][..],
            ),
            (
                "SELECT CASE WHEN ssn = '123-45-6789' THEN 1 END FROM customers",
                &["E1"],
            ),
            (
                "SELECT CASE ssn WHEN 'a' THEN 1 WHEN 'b' THEN 2 END FROM customers",
                &["E2"],
            ),
            ("SELECT ssn LIKE '1%' FROM customers", &["conditional"]),
            (
                "SELECT count(*) FILTER (WHERE ssn > '5') FROM customers",
                &["conditional"],
            ),
            ("SELECT nullif(ssn, 'x') FROM customers", &["E1"]),
            ("SELECT nullif(ssn, name) FROM customers", &["conditional"]),
            ("SELECT coalesce(ssn, 'x') FROM customers", &["E0"]),
            ("SELECT greatest(ssn, '5') FROM customers", &["conditional"]),
            ("SELECT max(ssn) FROM customers", &["conditional"]),
            (
                "SELECT first_value(id) OVER (PARTITION BY ssn) FROM customers",
                &["conditional"],
            ),
            // Failing operations: arithmetic, casts, raising functions.
            (
                "SELECT 1 / (ascii(ssn) - 49) FROM customers",
                &["error", "error"],
            ),
            ("SELECT ssn::int FROM customers", &["error"]),
            (
                "SELECT chr(ascii(substr(ssn, 12, 1))) FROM customers",
                &["error"],
            ),
            (
                "SELECT substr('abc', length(ssn)) FROM customers",
                &["error"],
            ),
            (
                "SELECT json_build_object(ssn, 1) FROM customers",
                &["error"],
            ),
            // Timing and row counts.
            ("SELECT pg_sleep(length(ssn)) FROM customers", &["timing"]),
            ("SELECT md5(repeat(ssn, 1000)) FROM customers", &["timing"]),
            (
                "SELECT count(*) FROM customers c, generate_series(1, ascii(c.ssn))",
                &["row-count"],
            ),
            (
                "SELECT regexp_matches(ssn, '1', 'g') FROM customers",
                &["row-count"],
            ),
            // Set operations and DISTINCT compare rows.
            (
                "SELECT ssn FROM customers INTERSECT SELECT 'x'",
                &["search"],
            ),
            ("SELECT DISTINCT ssn FROM customers", &["search"]),
            ("SELECT count(DISTINCT ssn) FROM customers", &["search"]),
            // Enumeration: counted values, unbounded arrays.
            (
                "SELECT id FROM customers WHERE ssn IN ('a', 'b', 'c')",
                &["E3"],
            ),
            (
                "SELECT id FROM customers WHERE ssn = ANY(ARRAY['a', 'b'])",
                &["E2"],
            ),
            (
                "SELECT id FROM customers WHERE ssn = ANY('{a,b}')",
                &["enumeration"],
            ),
            (
                "SELECT id FROM customers WHERE ssn = ANY($1)",
                &["enumeration"],
            ),
            (
                "SELECT id FROM customers WHERE ssn = 'a' OR ssn = 'b'",
                &["E1", "E1"],
            ),
            // Joins against values or other tables are searches.
            (
                "SELECT c.id FROM customers c JOIN (VALUES ('a')) v(x) ON c.ssn = v.x",
                &["search"],
            ),
            (
                "SELECT id FROM customers WHERE ssn IN (SELECT x FROM probes)",
                &["search"],
            ),
        ] {
            assert_eq!(oracles(sql), want, "{sql}");
        }
        // What cannot fail, choose or take longer is not a predicate.
        for sql in [
            "SELECT reverse(ssn), upper(ssn), md5(ssn), length(ssn) FROM customers",
            "SELECT substr(ssn, 1, 3), left(ssn, 2), replace(ssn, '-', '') FROM customers",
            "SELECT ssn || 'x', ssn::text, ssn::varchar(3), row_to_json(c) FROM customers c",
            "SELECT string_agg(ssn, ',') FROM customers",
            "SELECT ssn FROM customers UNION ALL SELECT 'x'",
            "SELECT json_build_object('s', ssn) FROM customers",
        ] {
            assert!(oracles(sql).is_empty(), "{sql}: {:?}", oracles(sql));
        }
    }

    #[test]
    fn probes_are_read_only_when_asked_for() {
        let sql =
            "SELECT id FROM customers WHERE ssn IN ('123-45-6789', $2) OR nullif(ssn, 'z') IS NULL";
        let cached = one(sql);
        assert!(cached.predicates.iter().all(|p| p.probes.is_empty()));
        let fresh = lineage_with_probes(sql, Dialect::Postgres)
            .unwrap()
            .remove(0);
        let probes: Vec<&Probe> = fresh.predicates.iter().flat_map(|p| &p.probes).collect();
        assert_eq!(
            probes,
            [
                &Probe::Literal("123-45-6789".into()),
                &Probe::Param(2),
                &Probe::Literal("z".into())
            ]
        );
        // Same predicates, same order.
        assert_eq!(cached.predicates.len(), fresh.predicates.len());
    }

    #[test]
    fn positional_placeholders_are_numbered_in_text_order() {
        // MySQL's `?`: the n-th in the text is the n-th bound value.
        let sql =
            "SELECT id FROM customers WHERE name = ? AND (ssn = ? OR ssn IN (?, 'x')) LIMIT ?";
        let fresh = lineage_with_probes(sql, Dialect::MySql).unwrap().remove(0);
        let probes: Vec<&Probe> = fresh.predicates.iter().flat_map(|p| &p.probes).collect();
        assert!(probes.contains(&&Probe::Param(2)), "{probes:?}");
        assert!(probes.contains(&&Probe::Param(3)), "{probes:?}");
        assert!(
            !probes
                .iter()
                .any(|p| matches!(p, Probe::Other(o) if o.contains('?'))),
            "{probes:?}"
        );
    }

    #[test]
    fn writes_that_copy_columns_are_listed() {
        let w = one("INSERT INTO t SELECT reverse(ssn) FROM customers").writes;
        assert_eq!(w.len(), 1);
        assert!(
            w[0].lineage
                .sources
                .keys()
                .any(|s| s.column.as_deref() == Some("ssn"))
        );
        let w = one("UPDATE customers SET name = ssn WHERE id = 1").writes;
        assert_eq!(w[0].target, "customers");
        assert!(one("INSERT INTO t VALUES (1, 'x')").writes.is_empty());
        assert_eq!(
            one("CREATE TABLE t AS SELECT ssn FROM customers")
                .writes
                .len(),
            1
        );
    }

    #[test]
    fn the_mysql_dialect_gets_the_same_lineage() {
        let l = lineage(
            "SELECT `c`.`id`, REVERSE(c.ssn) AS r, MAX(email) FROM customers c WHERE c.ssn LIKE '1%'",
            Dialect::MySql,
        )
        .unwrap()
        .remove(0);
        let Outputs::Known(o) = &l.outputs else {
            panic!("known outputs")
        };
        let flows: Vec<Vec<Flow>> = o
            .iter()
            .map(|o| match o {
                Output::Column { lineage, .. } => lineage.sources.values().copied().collect(),
                Output::Star { .. } => Vec::new(),
            })
            .collect();
        assert_eq!(
            flows,
            [
                vec![Flow::Direct],
                vec![Flow::Derived],
                vec![Flow::Preserved]
            ]
        );
        assert!(matches!(l.predicates[0].test, Test::Search("LIKE")));
    }

    #[test]
    fn views_are_read_from_their_definition() {
        let v = view_columns(" SELECT customers.id, reverse(customers.ssn) AS r FROM customers;")
            .unwrap();
        assert_eq!(v[1].0, "r");
        assert_eq!(v[1].1.sources.values().next(), Some(&Flow::Derived));
    }
}
