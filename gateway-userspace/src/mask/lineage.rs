//! The masking policy applied to column lineage ([`crate::sql::lineage`]):
//! which statements are refused, and how each result column is masked.
//!
//! A result column with a protected column in its lineage is masked by that
//! column's rule when the value reaches it unchanged ([`Flow::Direct`] or
//! [`Flow::Preserved`]), and redacted whole when it was computed from it
//! ([`Flow::Derived`]), whatever the function: the re-encoding class is
//! closed by construction, not by a list. A rule with `derived = "deny"`
//! refuses such statements instead; its `predicates` setting limits the
//! conditions a statement may put on the column, and with it every oracle
//! class (a value steering a condition, failing, sleeping, counting rows, or
//! compared with too many literals: [`check`]); equality tests admitted are
//! counted per identity ([`admit`], [`super::ProbeBudget`]). Built-in server
//! parameters are not data ([`Relations::builtin_parameter`]). Where lineage is not known
//! (a statement whose rows do not show their origin, a view whose definition
//! cannot be read), computed columns are redacted.

use std::{collections::HashMap, sync::Arc};

use crate::sql::lineage::{
    Flow, JsonShape, Lineage, Oracle, Output, Outputs, Probe, Source, StatementLineage, Test,
};

use super::{ColumnRule, Derived, EqualityLimits, MaskPolicy, Predicates, Strategy};

/// System relations that hold values of user tables (statistics, query
/// texts): treated as protected wholesale when any column rule exists.
pub const DATA_CATALOGS: &[&str] = &[
    "pg_stats",
    "pg_stats_ext",
    "pg_stats_ext_exprs",
    "pg_statistic",
    "pg_statistic_ext_data",
    "pg_stat_activity",
    "pg_stat_statements",
];

/// Views of views are followed this deep; deeper is unresolvable.
const MAX_VIEW_DEPTH: u8 = 8;

/// What a relation named in a statement is.
pub enum RelationKind<'a> {
    Table,
    /// A view or materialized view, with its definition's output columns
    /// (`None`: the definition could not be read or analysed).
    View(Option<&'a [(String, Lineage)]>),
    /// One of [`DATA_CATALOGS`].
    DataCatalog,
}

/// Resolves relation names (the proxy's catalog).
pub trait Relations {
    fn kind(&self, relation: &str) -> RelationKind<'_>;

    /// The relation's column names, when known.
    fn columns(&self, _relation: &str) -> Option<Vec<String>> {
        None
    }

    /// A function defined in the database (outside the system schemas):
    /// it may read any table, unseen by the statement's lineage.
    fn is_user_function(&self, _name: &str) -> bool {
        false
    }

    /// Whether a server parameter ([`crate::sql::lineage::PARAMETER`]) is
    /// built in: its value describes the server, not data, and is not
    /// masked. The default serves Postgres and `MySQL`: a plain name (`[a-z0-9_]`,
    /// no `.`: Postgres custom parameters are `x.y`), or a `MySQL` system
    /// variable (`@@name`); never a `MySQL` user variable (`@x`), a
    /// parameter whose name is an expression, or `application_name` (free
    /// text any session may set). A handler with its own list overrides it.
    fn builtin_parameter(&self, name: &str) -> bool {
        is_builtin_parameter(name)
    }
}

/// See [`Relations::builtin_parameter`].
pub fn is_builtin_parameter(name: &str) -> bool {
    let plain = name.strip_prefix("@@").unwrap_or(name);
    let plain_ok = !plain.is_empty()
        && (plain == "*"
            || plain
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
    plain_ok && (name.starts_with("@@") || plain != "*") && plain != "application_name"
}

/// Without a catalog: every relation is a table, but for [`DATA_CATALOGS`].
pub struct NoCatalog;

impl Relations for NoCatalog {
    fn kind(&self, relation: &str) -> RelationKind<'_> {
        if is_data_catalog(relation) {
            RelationKind::DataCatalog
        } else {
            RelationKind::Table
        }
    }
}

pub fn is_data_catalog(relation: &str) -> bool {
    let short = relation.rsplit('.').next().unwrap_or(relation);
    let schema_ok = relation
        .rsplit_once('.')
        .is_none_or(|(s, _)| s == "pg_catalog" || s == "public");
    schema_ok && DATA_CATALOGS.contains(&short)
}

/// A protected column a value derives from.
struct Hit<'p> {
    /// `None`: protected wholesale (an unresolvable view, a data catalog).
    rule: Option<&'p ColumnRule>,
    column: String,
    flow: Flow,
}

fn hits<'p>(policy: &'p MaskPolicy, rels: &dyn Relations, lineage: &Lineage) -> Vec<Hit<'p>> {
    let mut out = Vec::new();
    if policy.columns().is_empty() {
        return out;
    }
    for (src, flow) in &lineage.sources {
        expand(policy, rels, src, *flow, 0, &mut out);
    }
    out
}

/// [`hits`] for columns written. A row written without a column list
/// writes the columns the catalog lists for the table. A table the catalog
/// does not list (one made in this session) meets only rules that name it:
/// a rule for any table's `ssn` cannot tell whether it has one, and values
/// reach such a table only by writes this check sees (a copy of a
/// protected column is refused).
fn written_hits<'p>(
    policy: &'p MaskPolicy,
    rels: &dyn Relations,
    lineage: &Lineage,
) -> Vec<Hit<'p>> {
    let mut out = Vec::new();
    if policy.columns().is_empty() {
        return out;
    }
    for (src, flow) in &lineage.sources {
        if src.column.is_some() || !matches!(rels.kind(&src.relation), RelationKind::Table) {
            expand(policy, rels, src, *flow, 0, &mut out);
            continue;
        }
        match rels.columns(&src.relation) {
            Some(columns) => {
                for c in columns {
                    let one = Source {
                        relation: src.relation.clone(),
                        column: Some(c),
                    };
                    expand(policy, rels, &one, *flow, 0, &mut out);
                }
            }
            None => {
                if let Some(rule) = policy.rule_naming_table(&src.relation) {
                    out.push(Hit {
                        rule: Some(rule),
                        column: format!("{}.*", src.relation),
                        flow: Flow::Derived,
                    });
                }
            }
        }
    }
    out
}

fn expand<'p>(
    policy: &'p MaskPolicy,
    rels: &dyn Relations,
    src: &Source,
    flow: Flow,
    depth: u8,
    out: &mut Vec<Hit<'p>>,
) {
    let wholesale = |out: &mut Vec<Hit<'p>>, what: &str| {
        out.push(Hit {
            rule: None,
            column: what.to_owned(),
            flow: Flow::Derived,
        });
    };
    if src.relation == crate::sql::lineage::PARAMETER {
        // A parameter the session can set may carry a value out.
        let name = src.column.as_deref().unwrap_or_default();
        if !rels.builtin_parameter(name) {
            wholesale(out, &format!("parameter {name}"));
        }
        return;
    }
    match rels.kind(&src.relation) {
        RelationKind::View(Some(cols)) if depth < MAX_VIEW_DEPTH => {
            let mut found = false;
            for (name, l) in cols {
                let take = match &src.column {
                    Some(c) => name == c,
                    None => true,
                };
                if !take {
                    continue;
                }
                found = true;
                let floor = if src.column.is_some() {
                    flow
                } else {
                    Flow::Derived
                };
                for (s, f) in &l.sources {
                    expand(policy, rels, s, (*f).max(floor), depth + 1, out);
                }
            }
            if !found && src.column.is_some() {
                // A name the view does not have (a whole-row reference
                // spelled as a column, or a catalog out of date).
                wholesale(out, &src.relation);
            }
        }
        RelationKind::View(_) | RelationKind::DataCatalog => wholesale(out, &src.relation),
        RelationKind::Table => match &src.column {
            Some(c) => {
                if let Some(rule) = policy.rule_for(Some(&src.relation), c) {
                    out.push(Hit {
                        rule: Some(rule),
                        column: format!("{}.{c}", src.relation),
                        flow,
                    });
                }
            }
            None => {
                if let Some(rule) = policy.rule_for_any_column(Some(&src.relation)) {
                    out.push(Hit {
                        rule: Some(rule),
                        column: format!("{}.*", src.relation),
                        flow: Flow::Derived,
                    });
                }
            }
        },
    }
}

/// Why a statement is refused: the rule, the protected column, the kind of
/// answer it would have given ([`Oracle`]; `None` for a refusal that is not
/// about a search: a copy, a computed value under `derived = "deny"`), the
/// reason. Never a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub rule: String,
    pub column: String,
    pub oracle: Option<Oracle>,
    pub reason: String,
}

/// An equality test on a protected column in a statement the policy
/// admits: what the per-identity budget counts ([`super::ProbeBudget`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EqualityUse {
    /// Index of the statement in its text (set by [`admit`]).
    pub statement: usize,
    /// Index of the predicate in [`StatementLineage::predicates`].
    pub predicate: usize,
    /// The rule as written (the budget is kept per rule).
    pub rule: String,
    /// The protected column, as the statement names it.
    pub column: String,
    pub limits: EqualityLimits,
}

/// Refuses a statement whose conditions search a protected column beyond
/// its rule's `predicates` (any use of a value that answers a question of
/// an [`Oracle`] kind other than an equality test with literals), that
/// compares it with more literals than `max_equality_values`, that copies a
/// protected column into a table, or that computes from a column whose rule
/// says `derived = "deny"`. Admitted: the equality tests on protected
/// columns, for the budget.
#[allow(clippy::too_many_lines)] // the refusals in the order they are checked
pub fn check(
    policy: &MaskPolicy,
    rels: &dyn Relations,
    stmt: &StatementLineage,
) -> Result<Vec<EqualityUse>, Refusal> {
    let mut uses = Vec::new();
    if policy.columns().is_empty() {
        return Ok(uses);
    }
    let wholesale = EqualityLimits::default();
    // The refusal names the most telling class when several apply (a
    // sleep inside a CASE is a timing oracle).
    let rank = |o: Oracle| match o {
        Oracle::Timing => 6,
        Oracle::RowCount => 5,
        Oracle::Error => 4,
        Oracle::Uniqueness => 3,
        Oracle::Enumeration => 2,
        Oracle::Conditional => 1,
        Oracle::Search => 0,
    };
    let mut worst: Option<Refusal> = None;
    for (i, p) in stmt.predicates.iter().enumerate() {
        let found = if p.oracle == Oracle::Uniqueness {
            written_hits(policy, rels, &p.lineage)
        } else {
            hits(policy, rels, &p.lineage)
        };
        for h in found {
            let mode = h.rule.map_or(Predicates::Equality, |r| r.predicates);
            let allowed = match (mode, p.test) {
                (Predicates::Any, _) | (Predicates::Equality, Test::Equality { .. }) => true,
                (Predicates::Equality, Test::Search(_)) | (Predicates::None, _) => false,
            };
            if !allowed {
                let what = match p.test {
                    Test::Equality { .. } => "an equality test",
                    Test::Search(why) => why,
                };
                if worst
                    .as_ref()
                    .is_some_and(|w| w.oracle.map_or(0, rank) >= rank(p.oracle))
                {
                    continue;
                }
                worst = Some(Refusal {
                    rule: rule_name(h.rule),
                    column: h.column,
                    oracle: Some(p.oracle),
                    reason: format!(
                        "{what} on a protected column lets its values be found by search ({} oracle; the rule allows {})",
                        p.oracle.as_str(),
                        match mode {
                            Predicates::Any => "any condition",
                            Predicates::Equality => "only equality with literals or parameters",
                            Predicates::None => "no condition",
                        }
                    ),
                });
                continue;
            }
            if mode == Predicates::Equality && matches!(p.test, Test::Equality { .. }) {
                uses.push(EqualityUse {
                    statement: 0,
                    predicate: i,
                    rule: rule_name(h.rule),
                    column: h.column,
                    limits: h.rule.map_or(wholesale, |r| r.equality),
                });
            }
        }
    }
    if let Some(r) = worst {
        return Err(r);
    }
    // Values per rule and column, over every test of the statement (`OR`
    // chains, several `IN` lists).
    let mut counted: Vec<(&str, &str, usize, usize)> = Vec::new();
    for u in &uses {
        let Test::Equality { values } = stmt.predicates[u.predicate].test else {
            continue;
        };
        match counted
            .iter_mut()
            .find(|(r, c, _, _)| *r == u.rule && *c == u.column)
        {
            Some(entry) => entry.2 += values,
            None => counted.push((&u.rule, &u.column, values, u.limits.max_values)),
        }
    }
    if let Some((rule, column, n, max)) = counted.into_iter().find(|(_, _, n, max)| n > max) {
        return Err(Refusal {
            rule: rule.to_owned(),
            column: column.to_owned(),
            oracle: Some(Oracle::Enumeration),
            reason: format!(
                "{n} values compared by equality with a protected column in one statement enumerate it (enumeration oracle; the rule allows {max})"
            ),
        });
    }
    for w in &stmt.writes {
        if let Some(h) = hits(policy, rels, &w.lineage).into_iter().next() {
            return Err(Refusal {
                rule: rule_name(h.rule),
                column: h.column,
                oracle: None,
                reason: format!(
                    "copies a protected column into {} (where it would no longer be masked)",
                    w.target
                ),
            });
        }
    }
    // Computed columns of unknown origin are redacted; where a rule on a
    // table the statement names says `derived = "deny"`, it is refused.
    let unknown = (matches!(stmt.outputs, Outputs::Unknown) && stmt.fetch.is_none())
        || stmt.functions.iter().any(|f| rels.is_user_function(f));
    if unknown && let Some((rule, relation)) = deny_rule_touched(policy, stmt) {
        return Err(Refusal {
            rule: rule_name(Some(rule)),
            column: format!("{relation}.*"),
            oracle: None,
            reason: "the origin of its result cannot be established (a function defined in the database, or rows of unknown origin) and the rule says derived = \"deny\"".into(),
        });
    }
    if let Outputs::Known(outputs) = &stmt.outputs {
        for o in outputs {
            let Output::Column { lineage, .. } = o else {
                continue;
            };
            for h in hits(policy, rels, lineage) {
                if h.flow == Flow::Derived
                    && let Some(rule) = h.rule
                    && rule.derived == Derived::Deny
                {
                    return Err(Refusal {
                        rule: rule_name(h.rule),
                        column: h.column,
                        oracle: None,
                        reason: "computes a value from a protected column (the rule says derived = \"deny\")".into(),
                    });
                }
            }
        }
    }
    Ok(uses)
}

/// The values bound to a statement's parameters.
pub enum Params<'a> {
    /// Not bound yet (a `Parse`, a `PREPARE`): parameters are not counted
    /// now; each execution is.
    NotBound,
    /// Bound: the bytes of `$n` (1-based), `None` when not known (then each
    /// execution counts as a value of its own).
    Bound(&'a (dyn Fn(usize) -> Option<Vec<u8>> + Sync)),
}

/// What a SQL handler asks before it forwards a statement text: refused
/// (the first refusal of any statement in it, see [`check`]) or admitted,
/// with its equality tests on protected columns counted against the
/// identity's budget on the resource ([`ProbeBudget`](super::ProbeBudget)).
/// `statements`: the text's lineage, possibly shared by its shape; the
/// values compared are read from `sql` itself.
#[allow(clippy::too_many_arguments)] // each is one thing the decision needs
pub fn admit(
    policy: &MaskPolicy,
    rels: &dyn Relations,
    budget: &super::ProbeBudget,
    identity: &str,
    resource: &str,
    sql: &str,
    dialect: crate::sql::Dialect,
    statements: &[StatementLineage],
    params: &Params<'_>,
) -> Result<(), Refusal> {
    let mut uses = Vec::new();
    for (i, s) in statements.iter().enumerate() {
        for mut u in check(policy, rels, s)? {
            u.statement = i;
            uses.push(u);
        }
    }
    if uses.is_empty() {
        return Ok(());
    }
    let fresh = crate::sql::lineage::lineage_with_probes(sql, dialect);
    let values = |u: &EqualityUse| -> Vec<Probe> {
        let probes = fresh
            .as_ref()
            .and_then(|f| f.get(u.statement))
            .and_then(|s| s.predicates.get(u.predicate))
            .map(|p| p.probes.clone());
        let probes = probes.unwrap_or_else(|| {
            // Not re-read (cannot happen for a text that parsed): each
            // value counts as new.
            vec![Probe::Param(usize::MAX)]
        });
        match params {
            Params::NotBound => probes
                .into_iter()
                .filter(|p| !matches!(p, Probe::Param(_)))
                .collect(),
            Params::Bound(_) => probes,
        }
    };
    let param = |n: usize| match params {
        Params::Bound(f) if n != usize::MAX => f(n),
        _ => None,
    };
    budget.charge(
        identity,
        resource,
        &super::Probes {
            uses: &uses,
            values: &values,
            param: &param,
        },
    )
}

/// Whether a statement reads a protected column anywhere (its result, its
/// conditions, what it writes): the server's error messages about it may
/// quote a value (`invalid input syntax for type integer: "..."`). A
/// statement not known (`None`, or rows of unknown origin) counts as reading.
pub fn reads_protected(
    policy: &MaskPolicy,
    rels: &dyn Relations,
    stmt: Option<&StatementLineage>,
) -> bool {
    if policy.columns().is_empty() {
        return false;
    }
    let Some(stmt) = stmt else { return true };
    let reads = |l: &Lineage| !hits(policy, rels, l).is_empty();
    let returns = |o: &Outputs| match o {
        Outputs::None => false,
        Outputs::Unknown => true,
        Outputs::Known(o) => o.iter().any(|o| match o {
            Output::Column { lineage, .. } => reads(lineage),
            Output::Star { relation } => reads(&Lineage::from_source(
                Source {
                    relation: relation.clone(),
                    column: None,
                },
                Flow::Direct,
            )),
        }),
    };
    returns(&stmt.outputs)
        || stmt.predicates.iter().any(|p| reads(&p.lineage))
        || stmt.writes.iter().any(|w| reads(&w.lineage))
        || stmt.cursor.as_ref().is_some_and(|(_, o)| returns(o))
}

/// The SQLSTATE a client sees for an error of a statement that reads a
/// protected column ([`reads_protected`]): the class only (`22012` →
/// `22000`), so that which error it was (division by zero rather than an
/// invalid cast, a unique violation rather than a check) does not tell
/// which branch a value took. Statements whose success itself could depend
/// on a protected value beyond a budgeted equality test are refused before
/// they run ([`check`]); what is left to the class is the rest. Kept whole:
/// the classes that describe the connection or transaction, not a value,
/// and that clients act on (`08` connection, `25` transaction state, `40`
/// rollback and serialization, `53` resources, `57` operator intervention).
pub fn withheld_sqlstate(code: &str) -> String {
    if code.len() != 5 || !code.is_ascii() {
        return "XX000".into();
    }
    match &code[..2] {
        "08" | "25" | "40" | "53" | "57" => code.to_owned(),
        class => format!("{class}000"),
    }
}

/// A rule with `derived = "deny"` on a table the statement names.
fn deny_rule_touched<'p>(
    policy: &'p MaskPolicy,
    stmt: &StatementLineage,
) -> Option<(&'p ColumnRule, String)> {
    let mut relations = std::collections::BTreeSet::new();
    let mut lineages: Vec<&Lineage> = Vec::new();
    if let Outputs::Known(outputs) = &stmt.outputs {
        for o in outputs {
            match o {
                Output::Column { lineage, .. } => lineages.push(lineage),
                Output::Star { relation } => {
                    relations.insert(relation.clone());
                }
            }
        }
    }
    lineages.extend(stmt.predicates.iter().map(|p| &p.lineage));
    lineages.extend(stmt.writes.iter().map(|w| &w.lineage));
    for l in lineages {
        relations.extend(l.sources.keys().map(|s| s.relation.clone()));
    }
    relations.into_iter().find_map(|r| {
        policy
            .columns()
            .iter()
            .find(|rule| rule.derived == Derived::Deny && rule.covers_table(Some(&r)))
            .map(|rule| (rule, r))
    })
}

fn rule_name(rule: Option<&ColumnRule>) -> String {
    rule.map_or_else(
        || "masking: protected wholesale".to_owned(),
        |r| format!("masking.column {}", r.spec),
    )
}

/// How one result column is masked, and why (for the record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnMask {
    /// No protected column in its lineage: detectors only.
    Pass,
    /// The rule's strategy: the value is the protected value itself.
    Rule { strategy: Strategy, flow: Flow },
    /// Redacted whole: computed from a protected column, or of unknown
    /// lineage in a statement that may read one.
    Redact { unknown: bool },
    /// A JSON object (or array of objects) built from named fields: each
    /// protected field masked inside it.
    Json(Arc<JsonMask>),
}

impl ColumnMask {
    /// The strategy for the whole value (`None` for [`ColumnMask::Pass`] and
    /// [`ColumnMask::Json`]).
    pub fn strategy(&self) -> Option<Strategy> {
        match self {
            ColumnMask::Pass | ColumnMask::Json(_) => None,
            ColumnMask::Rule { strategy, .. } => Some(*strategy),
            ColumnMask::Redact { .. } => Some(Strategy::Redact),
        }
    }

    /// The record's name for the decision; `None` for [`ColumnMask::Pass`].
    pub fn label(&self) -> Option<&'static str> {
        match self {
            ColumnMask::Pass => None,
            ColumnMask::Rule {
                flow: Flow::Direct, ..
            } => Some("direct"),
            ColumnMask::Rule { .. } => Some("preserved"),
            ColumnMask::Redact { unknown: false } => Some("derived-redacted"),
            ColumnMask::Redact { unknown: true } => Some("unknown-redacted"),
            ColumnMask::Json(_) => Some("json-fields-masked"),
        }
    }

    fn strength(&self) -> u8 {
        match self {
            ColumnMask::Pass => 0,
            ColumnMask::Rule { strategy, .. } => 1 + strategy.strength(),
            ColumnMask::Json(_) => 9,
            ColumnMask::Redact { .. } => 10,
        }
    }

    fn max(self, other: ColumnMask) -> ColumnMask {
        if other.strength() > self.strength() {
            other
        } else {
            self
        }
    }
}

/// The mask for a value of `lineage`.
pub fn column(policy: &MaskPolicy, rels: &dyn Relations, lineage: &Lineage) -> ColumnMask {
    let hits = hits(policy, rels, lineage);
    if hits.is_empty() {
        return ColumnMask::Pass;
    }
    if let Some(shape) = &lineage.json
        && let Some(m) = json_mask(policy, rels, shape)
    {
        return ColumnMask::Json(Arc::new(m));
    }
    // A keyed hash of a value the statement's author chose (a literal, a
    // row of a table without the rule) would let it test guesses against
    // the hashes of the protected values: `SELECT email ... UNION ALL
    // VALUES ('guess')`. Such a column is redacted instead.
    let mixed = lineage.constant
        || lineage.sources.iter().any(|(s, f)| {
            let mut one = Vec::new();
            expand(policy, rels, s, *f, 0, &mut one);
            one.is_empty()
        });
    let mut mask = ColumnMask::Pass;
    for h in hits {
        let m = match (h.rule, h.flow) {
            (Some(rule), _) if mixed && rule.strategy == Strategy::KeyedHash => {
                ColumnMask::Redact { unknown: false }
            }
            (Some(rule), flow @ (Flow::Direct | Flow::Preserved)) => ColumnMask::Rule {
                strategy: rule.strategy,
                flow,
            },
            _ => ColumnMask::Redact { unknown: false },
        };
        mask = mask.max(m);
    }
    mask
}

/// How each key of a built JSON object is masked; a key not listed is
/// redacted (it cannot be told apart from a protected one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonMask {
    pub keys: HashMap<String, Option<Strategy>>,
    pub array: bool,
}

fn json_mask(policy: &MaskPolicy, rels: &dyn Relations, shape: &JsonShape) -> Option<JsonMask> {
    let mut keys: HashMap<String, ColumnMask> = HashMap::new();
    let mut put = |k: String, m: ColumnMask| {
        let e = keys.remove(&k).unwrap_or(ColumnMask::Pass);
        keys.insert(k, e.max(m));
    };
    for f in &shape.fields {
        match f {
            Output::Column { name, lineage } => put(name.clone(), column(policy, rels, lineage)),
            Output::Star { relation } => {
                for c in rels.columns(relation)? {
                    let l = Lineage::from_source(
                        Source {
                            relation: relation.clone(),
                            column: Some(c.clone()),
                        },
                        Flow::Direct,
                    );
                    let m = column(policy, rels, &l);
                    put(c, m);
                }
            }
        }
    }
    Some(JsonMask {
        keys: keys
            .into_iter()
            .map(|(k, m)| {
                let s = match m {
                    ColumnMask::Pass => None,
                    // A nested structure is redacted whole.
                    ColumnMask::Json(_) => Some(Strategy::Redact),
                    other => other.strategy(),
                };
                (k, s)
            })
            .collect(),
        array: shape.array,
    })
}

impl JsonMask {
    /// Mask the protected fields of `text` (JSON as the server wrote it,
    /// order and spacing kept) into `out`. `false`: nothing changed. Text
    /// that is not the expected shape is redacted whole.
    pub fn apply(&self, policy: &MaskPolicy, text: &str, out: &mut String) -> bool {
        let mut edits = Vec::new();
        let ok = json::top(text.as_bytes(), self.array, &mut |key, range| {
            let Ok(key) = serde_json::from_str::<String>(key) else {
                return false;
            };
            match self.keys.get(&key) {
                Some(None) => {}
                Some(Some(s)) => edits.push((range, Some(*s))),
                None => edits.push((range, None)),
            }
            true
        });
        if !ok {
            out.push_str("\"[REDACTED]\"");
            return true;
        }
        if edits.is_empty() {
            return false;
        }
        let mut last = 0;
        for (range, strategy) in edits {
            out.push_str(&text[last..range.start]);
            let raw = &text[range.clone()];
            let value = match serde_json::from_str::<serde_json::Value>(raw) {
                Ok(serde_json::Value::Null) => None,
                Ok(serde_json::Value::String(v)) => Some(v),
                Ok(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
                    Some(v.to_string())
                }
                _ => Some(String::new()),
            };
            match (value, strategy) {
                (None, _) => out.push_str("null"),
                (Some(v), Some(s)) if !raw.starts_with(['{', '[']) => {
                    let masked = policy.mask_value(&v, Some(s));
                    out.push_str(&serde_json::Value::String(masked.text.into_owned()).to_string());
                }
                _ => out.push_str("\"[REDACTED]\""),
            }
            last = range.end;
        }
        out.push_str(&text[last..]);
        true
    }
}

/// A scanner for the JSON the server writes: finds each top-level object's
/// keys and the byte range of their values, without building a tree.
mod json {
    use std::ops::Range;

    /// `array`: an array of objects (or null elements); otherwise one object.
    /// `field(key_text, value_range)` is called for each member; `false`
    /// from it or malformed input ends the scan with `false`.
    pub fn top(b: &[u8], array: bool, field: &mut dyn FnMut(&str, Range<usize>) -> bool) -> bool {
        let mut i = ws(b, 0);
        let ok = if array {
            if b.get(i) != Some(&b'[') {
                return false;
            }
            i = ws(b, i + 1);
            if b.get(i) == Some(&b']') {
                i += 1;
                true
            } else {
                loop {
                    if b[i..].starts_with(b"null") {
                        i += 4;
                    } else {
                        match object(b, i, field) {
                            Some(e) => i = e,
                            None => return false,
                        }
                    }
                    i = ws(b, i);
                    match b.get(i) {
                        Some(b',') => i = ws(b, i + 1),
                        Some(b']') => {
                            i += 1;
                            break true;
                        }
                        _ => return false,
                    }
                }
            }
        } else {
            match object(b, i, field) {
                Some(e) => {
                    i = e;
                    true
                }
                None => false,
            }
        };
        ok && ws(b, i) == b.len()
    }

    fn ws(b: &[u8], mut i: usize) -> usize {
        while b.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        i
    }

    fn object(
        b: &[u8],
        i: usize,
        field: &mut dyn FnMut(&str, Range<usize>) -> bool,
    ) -> Option<usize> {
        if b.get(i) != Some(&b'{') {
            return None;
        }
        let mut i = ws(b, i + 1);
        if b.get(i) == Some(&b'}') {
            return Some(i + 1);
        }
        loop {
            let k_end = string(b, i)?;
            let key = std::str::from_utf8(&b[i..k_end]).ok()?;
            i = ws(b, k_end);
            if b.get(i) != Some(&b':') {
                return None;
            }
            let v_start = ws(b, i + 1);
            let v_end = value(b, v_start)?;
            if !field(key, v_start..v_end) {
                return None;
            }
            i = ws(b, v_end);
            match b.get(i) {
                Some(b',') => i = ws(b, i + 1),
                Some(b'}') => return Some(i + 1),
                _ => return None,
            }
        }
    }

    /// End of the string starting at `i` (a `"`).
    fn string(b: &[u8], i: usize) -> Option<usize> {
        if b.get(i) != Some(&b'"') {
            return None;
        }
        let mut j = i + 1;
        loop {
            match b.get(j)? {
                b'\\' => j += 2,
                b'"' => return Some(j + 1),
                _ => j += 1,
            }
        }
    }

    /// End of the value starting at `i`.
    fn value(b: &[u8], i: usize) -> Option<usize> {
        match b.get(i)? {
            b'"' => string(b, i),
            b'{' | b'[' => {
                let mut depth = 0usize;
                let mut j = i;
                loop {
                    match b.get(j)? {
                        b'"' => {
                            j = string(b, j)?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                return Some(j + 1);
                            }
                        }
                        _ => {}
                    }
                    j += 1;
                }
            }
            _ => {
                let mut j = i;
                while b
                    .get(j)
                    .is_some_and(|c| !matches!(c, b',' | b'}' | b']') && !c.is_ascii_whitespace())
                {
                    j += 1;
                }
                (j > i).then_some(j)
            }
        }
    }
}

/// One field of a result, as the server describes it.
#[derive(Debug, Clone)]
pub struct Field {
    /// The relation the server attributes it to (`None` for a computed
    /// column, or when its OID is not resolved yet).
    pub relation: Option<String>,
    /// The relation's column (its real name, not the alias), or the reported
    /// name when the relation is not known.
    pub column: String,
    /// The server reports no table for it.
    pub computed: bool,
}

/// Per field, the mask from the server's attribution and from the
/// statement's lineage, the stronger of the two. `outputs`: the statement's
/// outputs (a `FETCH`'s: its cursor's); `None` when the statement is not
/// known. `functions`: the functions it calls; one defined in the database
/// makes its computed columns' lineage unknown.
pub fn plan(
    policy: &MaskPolicy,
    rels: &dyn Relations,
    outputs: Option<&Outputs>,
    functions: &[String],
    fields: &[Field],
) -> Vec<ColumnMask> {
    let mut masks: Vec<ColumnMask> = fields
        .iter()
        .map(|f| match &f.relation {
            Some(r) => column(
                policy,
                rels,
                &Lineage::from_source(
                    Source {
                        relation: r.clone(),
                        column: Some(f.column.clone()),
                    },
                    Flow::Direct,
                ),
            ),
            None if f.computed => ColumnMask::Pass,
            // A table not resolved yet: every rule naming the column.
            None => policy
                .rule_for(None, &f.column)
                .map_or(ColumnMask::Pass, |r| ColumnMask::Rule {
                    strategy: r.strategy,
                    flow: Flow::Direct,
                }),
        })
        .collect();
    if policy.columns().is_empty() {
        return masks;
    }
    let unknown = |masks: &mut Vec<ColumnMask>| {
        for (m, f) in masks.iter_mut().zip(fields) {
            if f.computed {
                *m = std::mem::replace(m, ColumnMask::Pass)
                    .max(ColumnMask::Redact { unknown: true });
            }
        }
    };
    let Some(Outputs::Known(outputs)) = outputs else {
        // Rows of unknown origin (EXECUTE, CALL): computed columns could be
        // anything.
        unknown(&mut masks);
        return masks;
    };
    if functions.iter().any(|f| rels.is_user_function(f)) {
        unknown(&mut masks);
    }
    if let Some(aligned) = align(outputs, fields) {
        for (m, l) in masks.iter_mut().zip(aligned) {
            if let Some(l) = l {
                *m = std::mem::replace(m, ColumnMask::Pass).max(column(policy, rels, l));
            }
        }
        return masks;
    }
    // The result does not line up with the statement (a `*` the server
    // expanded differently): every computed column may carry anything the
    // statement reads.
    let mut all = Lineage::default();
    for o in outputs {
        if let Output::Column { lineage, .. } = o {
            all.merge(lineage);
        }
    }
    all.json = None;
    if column(policy, rels, &all.at_least(Flow::Derived)) != ColumnMask::Pass {
        unknown(&mut masks);
    }
    masks
}

/// Each field's lineage, by position: a column output takes one field, a
/// `*` over a named relation the fields the server attributes to it (which
/// the server's attribution masks). `None`: they do not line up.
fn align<'o>(outputs: &'o [Output], fields: &[Field]) -> Option<Vec<Option<&'o Lineage>>> {
    let mut out = Vec::with_capacity(fields.len());
    let mut i = 0;
    for o in outputs {
        match o {
            Output::Column { lineage, .. } => {
                fields.get(i)?;
                out.push(Some(lineage));
                i += 1;
            }
            Output::Star { relation } => {
                while let Some(f) = fields.get(i) {
                    let same = !f.computed
                        && f.relation
                            .as_deref()
                            .is_some_and(|r| same_relation(r, relation));
                    if !same {
                        break;
                    }
                    out.push(None);
                    i += 1;
                }
            }
        }
    }
    (i == fields.len()).then_some(out)
}

/// `public.customers` and `customers` name the same relation here (the
/// statement's name is as written; the catalog's is qualified).
fn same_relation(catalog: &str, written: &str) -> bool {
    catalog == written
        || catalog
            .rsplit_once('.')
            .is_some_and(|(_, short)| short == written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::{DetectorSet, EqualityLimits};
    use crate::sql::{Dialect, lineage::lineage};

    fn policy(derived: Derived) -> MaskPolicy {
        MaskPolicy::new(
            vec![
                ColumnRule::parse("customers.ssn", Strategy::KeepLast4)
                    .with_modes(Predicates::Equality, derived),
                ColumnRule::parse("customers.email", Strategy::Redact),
            ],
            DetectorSet::ALL,
            Strategy::Redact,
        )
    }

    fn stmt(sql: &str) -> StatementLineage {
        lineage(sql, Dialect::Postgres).unwrap().remove(0)
    }

    fn computed(n: usize) -> Vec<Field> {
        (0..n)
            .map(|i| Field {
                relation: None,
                column: format!("c{i}"),
                computed: true,
            })
            .collect()
    }

    fn labels(sql: &str, fields: &[Field]) -> Vec<Option<&'static str>> {
        let s = stmt(sql);
        plan(
            &policy(Derived::Redact),
            &NoCatalog,
            Some(&s.outputs),
            &s.functions,
            fields,
        )
        .iter()
        .map(ColumnMask::label)
        .collect()
    }

    #[test]
    fn computed_columns_are_redacted_and_values_keep_their_rule() {
        assert_eq!(
            labels(
                "SELECT id, reverse(ssn), max(ssn), ssn AS x FROM customers",
                &computed(4)
            ),
            [
                None,
                Some("derived-redacted"),
                Some("preserved"),
                Some("direct")
            ]
        );
        let p = policy(Derived::Redact);
        let s = stmt("SELECT max(ssn) FROM customers");
        assert_eq!(
            plan(&p, &NoCatalog, Some(&s.outputs), &[], &computed(1))[0].strategy(),
            Some(Strategy::KeepLast4)
        );
        assert_eq!(labels("SELECT 1, now()", &computed(2)), [None, None]);
    }

    #[test]
    fn stars_line_up_with_the_servers_fields() {
        let mut fields = vec![
            Field {
                relation: Some("public.customers".into()),
                column: "id".into(),
                computed: false,
            },
            Field {
                relation: Some("public.customers".into()),
                column: "ssn".into(),
                computed: false,
            },
        ];
        fields.extend(computed(1));
        assert_eq!(
            labels("SELECT *, md5(email) FROM customers", &fields),
            [None, Some("direct"), Some("derived-redacted")]
        );
        // Not lining up: every computed column is redacted.
        assert_eq!(
            labels("SELECT *, md5(email) FROM customers", &computed(3)),
            [Some("unknown-redacted"); 3]
        );
        // Unknown statements: computed columns redacted.
        let p = policy(Derived::Redact);
        let m = plan(&p, &NoCatalog, Some(&Outputs::Unknown), &[], &computed(1));
        assert_eq!(m[0].label(), Some("unknown-redacted"));
    }

    #[test]
    fn refusals_name_the_rule_and_column() {
        let p = policy(Derived::Redact);
        assert!(
            check(
                &p,
                &NoCatalog,
                &stmt("SELECT id FROM customers WHERE ssn = '1'")
            )
            .is_ok()
        );
        let r = check(
            &p,
            &NoCatalog,
            &stmt("SELECT id FROM customers WHERE ssn LIKE '1%'"),
        )
        .unwrap_err();
        assert_eq!(r.rule, "masking.column customers.ssn");
        assert_eq!(r.column, "customers.ssn");
        assert!(r.reason.starts_with("LIKE"), "{}", r.reason);
        assert!(check(&p, &NoCatalog, &stmt("SELECT reverse(ssn) FROM customers")).is_ok());
        let deny = policy(Derived::Deny);
        assert!(
            check(
                &deny,
                &NoCatalog,
                &stmt("SELECT reverse(ssn) FROM customers")
            )
            .is_err()
        );
        assert!(check(&deny, &NoCatalog, &stmt("SELECT ssn FROM customers")).is_ok());
        assert!(
            check(
                &p,
                &NoCatalog,
                &stmt("INSERT INTO t SELECT ssn FROM customers")
            )
            .is_err()
        );
        assert!(
            check(
                &p,
                &NoCatalog,
                &stmt("SELECT id FROM orders WHERE ssn LIKE '1%'")
            )
            .is_ok()
        );
    }

    #[test]
    fn refusals_name_the_oracle_and_equality_is_bounded() {
        let p = policy(Derived::Redact);
        let r = check(
            &p,
            &NoCatalog,
            &stmt("SELECT CASE WHEN substr(ssn, 1, 1) = '1' THEN 1 / 0 END FROM customers WHERE id = 1"),
        )
        .unwrap_err();
        assert_eq!(r.oracle, Some(Oracle::Conditional));
        assert_eq!(r.column, "customers.ssn");
        let r = check(&p, &NoCatalog, &stmt("SELECT ssn::int FROM customers")).unwrap_err();
        assert_eq!(r.oracle, Some(Oracle::Error));
        let list: Vec<String> = (0..11).map(|i| format!("'{i}'")).collect();
        let sql = format!(
            "SELECT id FROM customers WHERE ssn IN ({})",
            list.join(", ")
        );
        let r = check(&p, &NoCatalog, &stmt(&sql)).unwrap_err();
        assert_eq!(r.oracle, Some(Oracle::Enumeration));
        assert!(r.reason.starts_with("11 values"), "{}", r.reason);
        // Ten are allowed; an OR chain counts like a list.
        let sql = format!(
            "SELECT id FROM customers WHERE ssn IN ({})",
            list[..10].join(", ")
        );
        assert_eq!(check(&p, &NoCatalog, &stmt(&sql)).unwrap().len(), 1);
        let chain: Vec<String> = list.iter().map(|v| format!("ssn = {v}")).collect();
        let sql = format!("SELECT id FROM customers WHERE {}", chain.join(" OR "));
        assert!(check(&p, &NoCatalog, &stmt(&sql)).is_err());
        // Other columns are not bounded.
        let sql = format!("SELECT id FROM customers WHERE id IN ({})", list.join(", "));
        assert!(check(&p, &NoCatalog, &stmt(&sql)).unwrap().is_empty());
    }

    #[test]
    fn writes_into_a_protected_column_are_probes_of_it() {
        // A unique constraint on ssn answers "is this value there" for every
        // value written (23505, or `ON CONFLICT DO NOTHING`'s row count).
        let p = MaskPolicy::new(
            vec![
                ColumnRule::parse("customers.ssn", Strategy::KeepLast4).with_equality(
                    EqualityLimits {
                        max_values: 10,
                        budget: 3,
                        window: std::time::Duration::from_hours(1),
                    },
                ),
            ],
            DetectorSet::NONE,
            Strategy::Redact,
        );
        let budget = crate::mask::ProbeBudget::default();
        let run = |who: &str, sql: &str, dialect: Dialect| {
            let s = lineage(sql, dialect).unwrap();
            admit(
                &p,
                &NoCatalog,
                &budget,
                who,
                "db",
                sql,
                dialect,
                &s,
                &Params::NotBound,
            )
        };
        let pg = Dialect::Postgres;
        // Writing other columns is not a probe.
        assert!(run("a", "INSERT INTO customers (id, name) VALUES (1, 'x')", pg).is_ok());
        assert!(run("a", "UPDATE customers SET name = 'y' WHERE id = 1", pg).is_ok());
        // Each value written into ssn counts against the budget, as a
        // WHERE ssn = ... would, and the same value twice counts once.
        assert!(
            run(
                "a",
                "INSERT INTO customers (id, ssn) VALUES (2, '111-11-1111') ON CONFLICT DO NOTHING",
                pg
            )
            .is_ok()
        );
        assert!(
            run(
                "a",
                "UPDATE customers SET ssn = '111-11-1111' WHERE id = 2",
                pg
            )
            .is_ok()
        );
        assert!(
            run(
                "a",
                "INSERT INTO customers (id, ssn) VALUES (3, '222-22-2222'), (4, '333-33-3333')",
                pg
            )
            .is_ok()
        );
        let r = run(
            "a",
            "REPLACE INTO customers (id, ssn) VALUES (5, '444-44-4444')",
            Dialect::MySql,
        )
        .unwrap_err();
        assert_eq!(r.oracle, Some(Oracle::Enumeration));
        assert_eq!(r.column, "customers.ssn");
        // MySQL's INSERT ... SET is the same write.
        assert!(
            run(
                "b",
                "INSERT INTO customers SET id = 6, ssn = '555-55-5555'",
                Dialect::MySql
            )
            .is_ok()
        );
        // Too many values in one statement enumerate the column.
        let rows: Vec<String> = (0..11)
            .map(|i| format!("({i}, '{i:03}-00-0000')"))
            .collect();
        let sql = format!("INSERT INTO customers (id, ssn) VALUES {}", rows.join(", "));
        let r = run("c", &sql, pg).unwrap_err();
        assert_eq!(r.oracle, Some(Oracle::Enumeration));
        // Values the statement does not show are a search: from a query,
        // without a column list, by COPY, or computed from a column.
        for sql in [
            "INSERT INTO customers (id, ssn) SELECT id, guess FROM guesses",
            "INSERT INTO customers VALUES (7, 'z', '666-66-6666')",
            "COPY customers (id, ssn) FROM STDIN",
            "UPDATE customers SET ssn = name WHERE id = 1",
        ] {
            let r = run("d", sql, pg).unwrap_err();
            assert_eq!(r.oracle, Some(Oracle::Uniqueness), "{sql}");
            assert!(
                r.reason.contains("uniqueness oracle"),
                "{sql}: {}",
                r.reason
            );
        }
        // A table without protected columns is written freely.
        assert!(run("d", "INSERT INTO orders SELECT * FROM staging", pg).is_ok());
        assert!(run("d", "COPY orders FROM STDIN", pg).is_ok());
    }

    #[test]
    fn a_row_written_without_a_column_list_writes_the_columns_the_catalog_lists() {
        struct Listed;
        impl Relations for Listed {
            fn kind(&self, relation: &str) -> RelationKind<'_> {
                NoCatalog.kind(relation)
            }
            fn columns(&self, relation: &str) -> Option<Vec<String>> {
                match relation {
                    "orders" => Some(vec!["id".into(), "total".into()]),
                    "customers" => Some(vec!["id".into(), "ssn".into()]),
                    _ => None,
                }
            }
        }
        // Under a rule for any table's ssn (the FFIEC pack's `*.ssn`), a
        // table the catalog lists without ssn is written freely; one with
        // ssn, or one the catalog does not know, is refused.
        let p = MaskPolicy::new(
            vec![ColumnRule::parse("*.ssn", Strategy::Redact)],
            DetectorSet::NONE,
            Strategy::Redact,
        );
        let run = |sql: &str| check(&p, &Listed, &stmt(sql));
        assert!(run("INSERT INTO orders VALUES (1, 2)").is_ok());
        assert!(run("INSERT INTO orders SELECT 1, 2").is_ok());
        let r = run("INSERT INTO customers VALUES (1, '123-45-6789')").unwrap_err();
        assert_eq!(r.column, "customers.ssn");
        assert_eq!(r.oracle, Some(Oracle::Uniqueness));
        // A table the catalog does not list (made in this session) meets
        // only rules that name it.
        assert!(run("INSERT INTO scratch VALUES (1)").is_ok());
        let named = MaskPolicy::new(
            vec![ColumnRule::parse("scratch.ssn", Strategy::Redact)],
            DetectorSet::NONE,
            Strategy::Redact,
        );
        let r = check(&named, &Listed, &stmt("INSERT INTO scratch VALUES (1)")).unwrap_err();
        assert_eq!(r.column, "scratch.*");
        assert!(r.reason.contains("without a column list"), "{}", r.reason);
        // Reads keep treating a whole row as every column (unchanged).
        assert!(run("SELECT o FROM orders o").is_ok());
    }

    #[test]
    fn admit_counts_equality_probes_against_the_identity_budget() {
        let p = MaskPolicy::new(
            vec![
                ColumnRule::parse("customers.ssn", Strategy::KeepLast4).with_equality(
                    EqualityLimits {
                        max_values: 10,
                        budget: 3,
                        window: std::time::Duration::from_hours(1),
                    },
                ),
            ],
            DetectorSet::NONE,
            Strategy::Redact,
        );
        let budget = crate::mask::ProbeBudget::default();
        let run = |who: &str, sql: &str| {
            let s = lineage(sql, Dialect::Postgres).unwrap();
            admit(
                &p,
                &NoCatalog,
                &budget,
                who,
                "pg",
                sql,
                Dialect::Postgres,
                &s,
                &Params::NotBound,
            )
        };
        assert!(run("a", "SELECT id FROM customers WHERE ssn IN ('1', '2')").is_ok());
        // The same shape, other literals: the values of this text count.
        assert!(run("a", "SELECT id FROM customers WHERE ssn IN ('1', '3')").is_ok());
        let r = run("a", "SELECT id FROM customers WHERE ssn = '4'").unwrap_err();
        assert_eq!(r.oracle, Some(Oracle::Enumeration));
        assert!(run("b", "SELECT id FROM customers WHERE ssn = '4'").is_ok());
        // Parameters are counted when bound, not at parse.
        for _ in 0..3 {
            assert!(run("a", "SELECT id FROM customers WHERE ssn = $1").is_ok());
        }
    }

    #[test]
    fn a_keyed_hash_is_never_computed_of_a_value_the_agent_chose() {
        let p = MaskPolicy::new(
            vec![ColumnRule::parse("customers.email", Strategy::KeyedHash)],
            DetectorSet::NONE,
            Strategy::Redact,
        )
        .with_key(Some(Arc::new(crate::mask::MaskKey::new([3; 32]))));
        let label = |sql: &str| {
            let s = stmt(sql);
            plan(&p, &NoCatalog, Some(&s.outputs), &[], &computed(1))[0].label()
        };
        assert_eq!(label("SELECT email FROM customers"), Some("direct"));
        assert_eq!(label("SELECT max(email) FROM customers"), Some("preserved"));
        for sql in [
            "SELECT email FROM customers UNION ALL SELECT 'guess'",
            "SELECT email FROM customers WHERE false UNION ALL VALUES ('a'), ('b')",
            "SELECT coalesce(email, 'guess') FROM customers",
            "SELECT CASE WHEN id = 1 THEN email ELSE 'guess' END FROM customers",
            "SELECT email FROM customers UNION ALL SELECT g FROM guesses",
        ] {
            assert_eq!(label(sql), Some("derived-redacted"), "{sql}");
        }
    }

    #[test]
    fn errors_of_statements_reading_protected_columns_keep_their_class_only() {
        assert_eq!(withheld_sqlstate("22012"), "22000");
        assert_eq!(withheld_sqlstate("22P02"), "22000");
        assert_eq!(withheld_sqlstate("23505"), "23000");
        assert_eq!(withheld_sqlstate("P0001"), "P0000");
        assert_eq!(withheld_sqlstate("40001"), "40001");
        assert_eq!(withheld_sqlstate("57014"), "57014");
        assert_eq!(withheld_sqlstate("bad"), "XX000");
    }

    #[test]
    fn built_in_server_parameters_are_not_data_settable_ones_are() {
        let label = |sql: &str, dialect: Dialect| {
            let s = lineage(sql, dialect).unwrap().remove(0);
            plan(
                &policy(Derived::Redact),
                &NoCatalog,
                Some(&s.outputs),
                &s.functions,
                &computed(1),
            )[0]
            .label()
        };
        for sql in [
            "SHOW server_version_num",
            "SHOW standard_conforming_strings",
            "SELECT version()",
            "SELECT current_setting('server_version_num')",
            "SELECT pg_catalog.current_setting('TimeZone')",
        ] {
            assert_eq!(label(sql, Dialect::Postgres), None, "{sql}");
        }
        for sql in [
            "SHOW my.v",
            "SHOW ALL",
            "SELECT current_setting('my.v')",
            "SELECT current_setting('application_name')",
        ] {
            assert!(label(sql, Dialect::Postgres).is_some(), "{sql}");
        }
        assert_eq!(label("SELECT @@version", Dialect::MySql), None);
        assert_eq!(label("SELECT @@session.sql_mode", Dialect::MySql), None);
        assert_eq!(
            label("SHOW VARIABLES LIKE 'version%'", Dialect::MySql),
            None
        );
        assert!(label("SELECT @x", Dialect::MySql).is_some());
        // Without column rules nothing is masked at all.
        let s = stmt("SHOW my.v");
        let none = MaskPolicy::none();
        assert_eq!(
            plan(&none, &NoCatalog, Some(&s.outputs), &[], &computed(1))[0],
            ColumnMask::Pass
        );
    }

    struct Cols;
    impl Relations for Cols {
        fn kind(&self, relation: &str) -> RelationKind<'_> {
            NoCatalog.kind(relation)
        }
        fn columns(&self, relation: &str) -> Option<Vec<String>> {
            (relation == "customers")
                .then(|| ["id", "name", "ssn", "email"].map(String::from).to_vec())
        }
    }

    fn json_of(sql: &str, rels: &dyn Relations, text: &str) -> Option<String> {
        let p = policy(Derived::Redact);
        let s = stmt(sql);
        let m = plan(&p, rels, Some(&s.outputs), &[], &computed(1)).remove(0);
        let ColumnMask::Json(j) = m else {
            return None;
        };
        let mut out = String::new();
        Some(if j.apply(&p, text, &mut out) {
            out
        } else {
            text.to_owned()
        })
    }

    #[test]
    fn json_builders_mask_protected_fields_inside() {
        let row = r#"{"id":1,"name":"Customer 1","ssn":"101-11-1001","email":"user1@example.com"}"#;
        assert_eq!(
            json_of("SELECT row_to_json(c) FROM customers c", &Cols, row).unwrap(),
            r#"{"id":1,"name":"Customer 1","ssn":"***-**-1001","email":"[REDACTED]"}"#
        );
        let agg = format!("[{row}, \n {row}]");
        let out = json_of("SELECT json_agg(c) FROM customers c", &Cols, &agg).unwrap();
        assert_eq!(out.matches("***-**-1001").count(), 2, "{out}");
        assert!(!out.contains("101-11"), "{out}");
        let built = r#"{"a" : "101-11-1001", "b" : "101-11-1001", "n" : 1}"#;
        assert_eq!(
            json_of(
                "SELECT jsonb_build_object('a', ssn, 'b', reverse(ssn), 'n', id) FROM customers",
                &NoCatalog,
                built
            )
            .unwrap(),
            r#"{"a" : "***-**-1001", "b" : "[REDACTED]", "n" : 1}"#
        );
        // A key the builder did not name, or text not of the shape: redacted.
        assert_eq!(
            json_of(
                "SELECT row_to_json(c) FROM customers c",
                &Cols,
                r#"{"zz":"101-11-1001"}"#
            )
            .unwrap(),
            r#"{"zz":"[REDACTED]"}"#
        );
        assert_eq!(
            json_of(
                "SELECT row_to_json(c) FROM customers c",
                &Cols,
                "101-11-1001"
            )
            .unwrap(),
            r#""[REDACTED]""#
        );
        // Without the table's columns, or after an operator: redacted whole.
        assert!(json_of("SELECT row_to_json(c) FROM customers c", &NoCatalog, row).is_none());
        assert!(json_of("SELECT to_jsonb(c) - 'id' FROM customers c", &Cols, row).is_none());
        assert!(
            json_of(
                "SELECT upper(row_to_json(c)::text) FROM customers c",
                &Cols,
                row
            )
            .is_none()
        );
    }

    struct OneView(Vec<(String, Lineage)>);
    impl Relations for OneView {
        fn kind(&self, relation: &str) -> RelationKind<'_> {
            match relation {
                "v" => RelationKind::View(Some(&self.0)),
                "broken" => RelationKind::View(None),
                r => NoCatalog.kind(r),
            }
        }
    }

    #[test]
    fn views_resolve_to_their_definition() {
        let v = OneView(
            crate::sql::lineage::view_columns(
                "SELECT id, reverse(ssn) AS r, ssn AS s FROM customers",
            )
            .unwrap(),
        );
        let p = policy(Derived::Redact);
        let rels = v;
        let l = |c: &str| {
            Lineage::from_source(
                Source {
                    relation: "v".into(),
                    column: Some(c.into()),
                },
                Flow::Direct,
            )
        };
        assert_eq!(column(&p, &rels, &l("id")), ColumnMask::Pass);
        assert_eq!(column(&p, &rels, &l("r")).label(), Some("derived-redacted"));
        assert_eq!(column(&p, &rels, &l("s")).label(), Some("direct"));
        let broken = Lineage::from_source(
            Source {
                relation: "broken".into(),
                column: Some("id".into()),
            },
            Flow::Direct,
        );
        assert_eq!(column(&p, &rels, &broken).label(), Some("derived-redacted"));
        let stats = Lineage::from_source(
            Source {
                relation: "pg_catalog.pg_stats".into(),
                column: Some("most_common_vals".into()),
            },
            Flow::Direct,
        );
        assert_eq!(column(&p, &rels, &stats).label(), Some("derived-redacted"));
    }

    mod property {
        use super::{computed, policy, stmt};
        use crate::mask::{
            Derived,
            lineage::{ColumnMask, NoCatalog, check, plan},
        };
        use crate::sql::lineage::Flow;
        use proptest::prelude::*;

        /// An expression and whether a protected column (ssn, email) is in
        /// it, and whether it is a bare column reference.
        #[derive(Debug, Clone)]
        #[allow(clippy::struct_excessive_bools)] // what the property checks, one flag each
        struct Gen {
            sql: String,
            protected: bool,
            bare: bool,
            /// A protected value reaches it through a computation.
            derived: bool,
            /// A protected value steers a condition, can make it fail or
            /// is ordered in it: the statement must be refused.
            hazard: bool,
        }

        fn column() -> impl Strategy<Value = Gen> {
            prop_oneof![
                Just(("id", false)),
                Just(("name", false)),
                Just(("ssn", true)),
                Just(("email", true)),
                Just(("c.ssn", true)),
                Just(("c.balance", false)),
            ]
            .prop_map(|(c, p)| Gen {
                sql: c.into(),
                protected: p,
                bare: true,
                derived: false,
                hazard: false,
            })
        }

        #[allow(clippy::too_many_lines)] // one generator, one arm per form
        fn expr() -> impl Strategy<Value = Gen> {
            let leaf = prop_oneof![
                4 => column(),
                1 => Just(Gen { sql: "'lit'".into(), protected: false, bare: false, derived: false, hazard: false }),
                1 => Just(Gen { sql: "42".into(), protected: false, bare: false, derived: false, hazard: false }),
            ];
            leaf.prop_recursive(4, 24, 3, |inner| {
                let f1 = prop_oneof![
                    Just("upper"),
                    Just("reverse"),
                    Just("md5"),
                    Just("length"),
                    Just("initcap"),
                    Just("to_jsonb"),
                    Just("quote_literal"),
                    Just("max"),
                    Just("min"),
                    Just("string_agg_one"),
                    Just("coalesce"),
                    Just("btrim"),
                ];
                let hazard_ops = prop_oneof![
                    Just("case_like"),
                    Just("cast_int"),
                    Just("divide"),
                    Just("nullif"),
                    Just("greatest"),
                ];
                prop_oneof![
                    4 => (f1, inner.clone()).prop_map(|(f, a)| {
                        let sql = if f == "string_agg_one" {
                            format!("string_agg({}, ',')", a.sql)
                        } else {
                            format!("{f}({})", a.sql)
                        };
                        let chooses = matches!(f, "max" | "min" | "coalesce");
                        Gen {
                            sql,
                            protected: a.protected,
                            bare: false,
                            derived: a.derived || (a.protected && !chooses),
                            hazard: a.hazard || (a.protected && matches!(f, "max" | "min")),
                        }
                    }),
                    2 => (inner.clone(), inner.clone()).prop_map(|(a, b)| Gen {
                        sql: format!("({} || {})", a.sql, b.sql),
                        protected: a.protected || b.protected,
                        bare: false,
                        derived: a.protected || b.protected,
                        hazard: a.hazard || b.hazard,
                    }),
                    2 => (inner.clone(), inner.clone(), inner.clone()).prop_map(|(a, b, c)| Gen {
                        sql: format!(
                            "CASE WHEN {} = 'x' THEN {} ELSE {} END",
                            a.sql, b.sql, c.sql
                        ),
                        protected: a.protected || b.protected || c.protected,
                        bare: false,
                        derived: a.protected || b.derived || c.derived,
                        hazard: a.hazard || b.hazard || c.hazard || (a.protected && a.derived),
                    }),
                    2 => inner.clone().prop_map(|a| Gen {
                        sql: format!("{}::text", a.sql),
                        protected: a.protected,
                        bare: false,
                        derived: a.derived,
                        hazard: a.hazard,
                    }),
                    2 => inner.clone().prop_map(|a| Gen {
                        sql: format!("substr({}::text, 2, 3)", a.sql),
                        protected: a.protected,
                        bare: false,
                        derived: a.protected,
                        hazard: a.hazard,
                    }),
                    2 => inner.clone().prop_map(|a| Gen {
                        sql: format!(
                            "(SELECT {} FROM customers c2 LIMIT 1)",
                            a.sql.replace("c.", "c2.")
                        ),
                        protected: a.protected,
                        bare: false,
                        derived: a.derived,
                        hazard: a.hazard,
                    }),
                    2 => inner.clone().prop_map(|a| Gen {
                        sql: format!("first_value({}) OVER (PARTITION BY id)", a.sql),
                        protected: a.protected,
                        bare: false,
                        derived: a.protected,
                        hazard: a.hazard,
                    }),
                    // Conditions, failures and orderings on values.
                    3 => (hazard_ops, inner.clone(), inner).prop_map(|(op, a, b)| {
                        let sql = match op {
                            "case_like" => format!("CASE WHEN {} LIKE 'x%' THEN {} END", a.sql, b.sql),
                            "cast_int" => format!("({})::int", a.sql),
                            "divide" => format!("1 / length(({})::text)", a.sql),
                            "nullif" => format!("nullif({}, 'x')", a.sql),
                            _ => format!("greatest({}, {})", a.sql, b.sql),
                        };
                        let uses_b = matches!(op, "case_like" | "greatest");
                        let protected = a.protected || (uses_b && b.protected);
                        let hazard = a.hazard
                            || (uses_b && b.hazard)
                            || match op {
                                "nullif" => a.protected && a.derived,
                                "greatest" => protected,
                                _ => a.protected,
                            };
                        Gen {
                            sql,
                            protected,
                            bare: false,
                            derived: match op {
                                "nullif" => a.derived,
                                "case_like" => a.protected || b.derived,
                                "greatest" => a.derived || b.derived,
                                _ => a.protected,
                            },
                            hazard,
                        }
                    }),
                ]
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            /// Whatever the select list, no output column with a protected
            /// column in it is passed raw; a bare reference keeps its rule.
            #[test]
            #[allow(clippy::too_many_lines)]
            fn no_protected_column_is_ever_passed_raw(
                items in proptest::collection::vec(expr(), 1..5),
                wrap in 0u8..3,
            ) {
                let list: Vec<String> =
                    items.iter().enumerate().map(|(i, g)| format!("{} AS o{i}", g.sql)).collect();
                let inner = format!("SELECT {} FROM customers c", list.join(", "));
                let sql = match wrap {
                    0 => inner,
                    1 => format!("SELECT * FROM ({inner}) t"),
                    _ => format!("WITH w AS ({inner}) SELECT * FROM w"),
                };
                let s = stmt(&sql);
                let p = policy(Derived::Redact);
                // Every column computed as far as the server tells: the
                // lineage alone must protect them.
                let masks = plan(&p, &NoCatalog, Some(&s.outputs), &s.functions, &computed(items.len()));
                for (g, m) in items.iter().zip(&masks) {
                    if g.protected {
                        prop_assert!(*m != ColumnMask::Pass, "{sql}: {} passed raw", g.sql);
                    }
                    if g.protected && g.bare {
                        prop_assert!(matches!(m, ColumnMask::Rule { flow: Flow::Direct, .. }), "{sql}: {m:?}");
                    }
                    if !g.protected {
                        prop_assert!(*m == ColumnMask::Pass, "{sql}: {} masked as {m:?}", g.sql);
                    }
                }
            }

            /// A protected value in a condition, an operation that can fail
            /// or an ordering is refused under the default settings,
            /// wherever it sits in the statement.
            #[test]
            fn searches_through_any_expression_are_refused(
                items in proptest::collection::vec(expr(), 1..4),
                wrap in 0u8..3,
            ) {
                let list: Vec<String> =
                    items.iter().enumerate().map(|(i, g)| format!("{} AS o{i}", g.sql)).collect();
                let inner = format!("SELECT {} FROM customers c", list.join(", "));
                let sql = match wrap {
                    0 => inner,
                    1 => format!("SELECT * FROM ({inner}) t"),
                    _ => format!("WITH w AS ({inner}) SELECT count(*) FROM w"),
                };
                let s = stmt(&sql);
                let refused = check(&policy(Derived::Redact), &NoCatalog, &s).is_err();
                if items.iter().any(|g| g.hazard) {
                    prop_assert!(refused, "{sql}: admitted");
                }
            }
        }
    }
}
