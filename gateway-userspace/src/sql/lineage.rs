//! Column lineage: which table columns each output column of a statement
//! derives from, and how.
//!
//! Masking by the server's column attribution alone is defeated by any
//! expression (`reverse(ssn)` comes back as a computed column named
//! `reverse`). This module reads the statement instead: for every output
//! column it computes the set of source columns (`table.column`, or a whole
//! row) with the [`Flow`] through which each reaches the output, and it lists
//! the predicates (`WHERE`, `JOIN ON`, `HAVING`, `GROUP BY`, `ORDER BY`,
//! window partitions) and writes that read columns. The result does not depend
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
    CastKind, DataType, Distinct, Expr, FromTable, Function, FunctionArg, FunctionArgExpr,
    FunctionArguments, GroupByExpr, Ident, JoinConstraint, JoinOperator, ObjectName, OrderByKind,
    Query, Select, SelectItem, SelectItemQualifiedWildcardKind, SetExpr, Statement, TableFactor,
    TableWithJoins, UnaryOperator, Value, Visit, Visitor, visit_expressions,
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
    /// `col = literal`, `col <> literal`, `col IN (literals)`, `col IS [NOT]
    /// NULL`: answers only "is it this value".
    Equality,
    /// Anything else, named for the reason it gives.
    Search(&'static str),
}

/// A condition or ordering that reads columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Predicate {
    pub test: Test,
    pub lineage: Lineage,
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

/// Lineage of statements already parsed.
pub(super) fn of_statements(statements: &[Statement]) -> Vec<StatementLineage> {
    statements.iter().map(statement).collect()
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
}

#[allow(clippy::too_many_lines)] // one arm per statement kind
fn statement(stmt: &Statement) -> StatementLineage {
    let mut cx = Ctx::default();
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
            cx.absorb(self::statement(inner));
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
            cx.absorb(self::statement(inner));
            Outputs::None
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
            e.each_expr(&mut |x| bounds.merge(&self.expr(x)));
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
            SetExpr::SetOperation { left, right, .. } => {
                let l = self.set_expr(left, None);
                let r = self.set_expr(right, None);
                let outs = union_positional(l, r);
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
                let l = statement(s);
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
                for o in &mut outs {
                    if let Output::Column { lineage, .. } = o {
                        *lineage = std::mem::take(lineage).at_least(Flow::Preserved);
                    }
                }
            }
            _ => {}
        }
        for w in &s.named_window {
            let mut l = Lineage::default();
            // Named windows partition and order: searches on their columns.
            let _ = visit_expressions(w, |e| {
                l.merge(&self.expr(e));
                ControlFlow::<()>::Continue(())
            });
            self.search(l, "window ordering");
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

    fn search(&mut self, lineage: Lineage, why: &'static str) {
        if !lineage.is_empty() {
            self.predicates.push(Predicate {
                test: Test::Search(why),
                lineage,
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
                let mut l = Lineage::default();
                let _ = visit_expressions(other, |e| {
                    l.merge(&self.expr(e));
                    ControlFlow::<()>::Continue(())
                });
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

    /// The lineage of an expression's value.
    fn expr(&mut self, e: &Expr) -> Lineage {
        match e {
            Expr::Identifier(id) => self.scope.resolve(&[ident(id)]),
            Expr::CompoundIdentifier(ids) => {
                let parts: Vec<String> = ids.iter().map(ident).collect();
                self.scope.resolve(&parts)
            }
            Expr::Nested(inner) => self.expr(inner),
            Expr::Value(_) | Expr::TypedString(_) => Lineage::default(),
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
                // them; the results pass through.
                let mut tests = Lineage::default();
                if let Some(op) = operand {
                    tests.merge(&self.expr(op));
                }
                let mut results = Lineage::default();
                for c in conditions {
                    tests.merge(&self.expr(&c.condition));
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
            _ => self.generic(e),
        }
    }

    fn function(&mut self, f: &Function) -> Lineage {
        let name = last_part(&f.name);
        self.functions.push(name.clone());
        let mut args = Vec::new();
        let mut extra = Lineage::default();
        match &f.args {
            FunctionArguments::None => {}
            FunctionArguments::Subquery(q) => {
                let outs = self.query(q);
                extra.merge(&all_of(&outs));
            }
            FunctionArguments::List(list) => {
                for a in &list.args {
                    args.push(self.arg(a));
                }
                for c in &list.clauses {
                    let _ = visit_expressions(c, |e| {
                        extra.merge(&self.expr(e));
                        ControlFlow::<()>::Continue(())
                    });
                }
            }
        }
        if let FunctionArguments::List(p) = &f.parameters {
            for a in &p.args {
                extra.merge(&self.arg(a));
            }
        }
        if let Some(filter) = &f.filter {
            extra.merge(&self.expr(filter));
        }
        for o in &f.within_group {
            extra.merge(&self.expr(&o.expr));
        }
        if let Some(over) = &f.over {
            let _ = visit_expressions(over, |e| {
                extra.merge(&self.expr(e));
                ControlFlow::<()>::Continue(())
            });
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
        let mut l = Lineage::default();
        for a in args {
            l.merge(&a);
        }
        let mut l = if chooses {
            l.at_least(Flow::Preserved)
        } else {
            l.at_least(Flow::Derived)
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

    /// Any other expression: derived from every column it mentions, and
    /// from every subquery in it (analysed in its own scope).
    fn generic(&mut self, e: &Expr) -> Lineage {
        let mut found = TopLevel::default();
        let _ = e.visit(&mut found);
        let mut l = Lineage::default();
        for x in &found.exprs {
            match x {
                Expr::Subquery(q)
                | Expr::Exists { subquery: q, .. }
                | Expr::InSubquery { subquery: q, .. } => {
                    let outs = self.query(q);
                    l.merge(&all_of(&outs));
                }
                other => l.merge(&self.expr(other)),
            }
        }
        // An operator over a JSON value may move values between keys.
        l.json = None;
        l.at_least(Flow::Derived)
    }

    /// A boolean condition: split at `AND`/`OR`/`NOT`; each leaf is an
    /// equality test or a search.
    fn predicate(&mut self, e: &Expr) {
        use sqlparser::ast::BinaryOperator as B;
        match e {
            Expr::Nested(inner) => self.predicate(inner),
            Expr::UnaryOp {
                op: UnaryOperator::Not,
                expr,
            } => self.predicate(expr),
            Expr::BinaryOp {
                left,
                op: B::And | B::Or,
                right,
            } => {
                self.predicate(left);
                self.predicate(right);
            }
            Expr::BinaryOp {
                left,
                op: B::Eq | B::NotEq,
                right,
            } if is_constant(right) || is_constant(left) => {
                let col = if is_constant(right) { left } else { right };
                self.leaf(col, "a comparison");
            }
            Expr::InList { expr, list, .. } if list.iter().all(is_constant) => {
                self.leaf(expr, "IN");
            }
            Expr::IsNull(x) | Expr::IsNotNull(x) => self.leaf(x, "IS NULL"),
            other => {
                let l = self.expr(other);
                let why = match other {
                    Expr::Like { .. } | Expr::ILike { .. } => "LIKE",
                    Expr::SimilarTo { .. } | Expr::RLike { .. } => "a pattern match",
                    Expr::Between { .. } => "BETWEEN",
                    Expr::BinaryOp {
                        op: B::Lt | B::LtEq | B::Gt | B::GtEq,
                        ..
                    } => "a range comparison",
                    Expr::BinaryOp { .. } => "an operator",
                    _ => "an expression",
                };
                self.search(l, why);
            }
        }
    }

    /// One side of an equality test with a constant.
    fn leaf(&mut self, col: &Expr, why: &'static str) {
        let l = self.expr(col);
        if l.is_empty() {
            return;
        }
        let direct = l.sources.values().all(|f| *f <= Flow::Preserved);
        self.predicates.push(Predicate {
            test: if direct {
                Test::Equality
            } else {
                Test::Search(why)
            },
            lineage: l,
        });
    }
}

// ---------------------------------------------------------------------------
// Helpers

/// Visits the expressions of an AST node of any type.
trait VisitDyn {
    fn each_expr(&self, f: &mut dyn FnMut(&Expr));
}

impl<T: Visit> VisitDyn for T {
    fn each_expr(&self, f: &mut dyn FnMut(&Expr)) {
        let _ = visit_expressions(self, |e| {
            f(e);
            ControlFlow::<()>::Continue(())
        });
    }
}

/// The column references, function calls and subqueries of an expression
/// that are not inside a subquery (those resolve in the subquery's scope).
#[derive(Default)]
struct TopLevel {
    depth: usize,
    /// Inside a function call or subquery already collected.
    covered: usize,
    exprs: Vec<Expr>,
}

impl Visitor for TopLevel {
    type Break = ();

    fn pre_visit_query(&mut self, _q: &Query) -> ControlFlow<()> {
        self.depth += 1;
        ControlFlow::Continue(())
    }

    fn post_visit_query(&mut self, _q: &Query) -> ControlFlow<()> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        if self.depth == 0 && self.covered == 0 {
            match e {
                Expr::Identifier(_) | Expr::CompoundIdentifier(_) => self.exprs.push(e.clone()),
                Expr::Function(_)
                | Expr::Subquery(_)
                | Expr::Exists { .. }
                | Expr::InSubquery { .. } => {
                    self.exprs.push(e.clone());
                    if let Expr::InSubquery { expr, .. } = e {
                        self.exprs.push(expr.as_ref().clone());
                    }
                    self.covered += 1;
                    return ControlFlow::Continue(());
                }
                _ => {}
            }
        }
        if self.covered > 0 && is_covering(e) {
            self.covered += 1;
        }
        ControlFlow::Continue(())
    }

    fn post_visit_expr(&mut self, e: &Expr) -> ControlFlow<()> {
        if self.covered > 0 && is_covering(e) {
            self.covered -= 1;
        }
        ControlFlow::Continue(())
    }
}

fn is_covering(e: &Expr) -> bool {
    matches!(
        e,
        Expr::Function(_) | Expr::Subquery(_) | Expr::Exists { .. } | Expr::InSubquery { .. }
    )
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
                Test::Equality => None,
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
            ["an operator: customers.ssn orders.ssn"]
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
