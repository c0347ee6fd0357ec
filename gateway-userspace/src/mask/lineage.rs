//! The masking policy applied to column lineage ([`crate::sql::lineage`]):
//! which statements are refused, and how each result column is masked.
//!
//! A result column with a protected column in its lineage is masked by that
//! column's rule when the value reaches it unchanged ([`Flow::Direct`] or
//! [`Flow::Preserved`]), and redacted whole when it was computed from it
//! ([`Flow::Derived`]), whatever the function: the re-encoding class is
//! closed by construction, not by a list. A rule with `derived = "deny"`
//! refuses such statements instead; its `predicates` setting limits the
//! conditions a statement may put on the column. Where lineage is not known
//! (a statement whose rows do not show their origin, a view whose definition
//! cannot be read), computed columns are redacted.

use crate::sql::lineage::{Flow, Lineage, Output, Outputs, Source, StatementLineage, Test};

use super::{ColumnRule, Derived, MaskPolicy, Predicates, Strategy};

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
    match rels.kind(&src.relation) {
        RelationKind::DataCatalog => wholesale(out, &src.relation),
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
        RelationKind::View(_) => wholesale(out, &src.relation),
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

/// Why a statement is refused: the rule, the protected column, the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub rule: String,
    pub column: String,
    pub reason: String,
}

/// Refuses a statement whose conditions search a protected column beyond
/// its rule's `predicates`, that copies a protected column into a table, or
/// that computes from a column whose rule says `derived = "deny"`.
pub fn check(
    policy: &MaskPolicy,
    rels: &dyn Relations,
    stmt: &StatementLineage,
) -> Result<(), Refusal> {
    if policy.columns().is_empty() {
        return Ok(());
    }
    for p in &stmt.predicates {
        for h in hits(policy, rels, &p.lineage) {
            let mode = h.rule.map_or(Predicates::Equality, |r| r.predicates);
            let allowed = match (mode, p.test) {
                (Predicates::Any, _) | (Predicates::Equality, Test::Equality) => true,
                (Predicates::Equality, Test::Search(_)) | (Predicates::None, _) => false,
            };
            if !allowed {
                let what = match p.test {
                    Test::Equality => "an equality test",
                    Test::Search(why) => why,
                };
                return Err(Refusal {
                    rule: rule_name(h.rule),
                    column: h.column,
                    reason: format!(
                        "{what} on a protected column lets the values be found by search (the rule allows {})",
                        match mode {
                            Predicates::Any => "any condition",
                            Predicates::Equality => "only equality with literals or parameters",
                            Predicates::None => "no condition",
                        }
                    ),
                });
            }
        }
    }
    for w in &stmt.writes {
        if let Some(h) = hits(policy, rels, &w.lineage).into_iter().next() {
            return Err(Refusal {
                rule: rule_name(h.rule),
                column: h.column,
                reason: format!(
                    "copies a protected column into {} (where it would no longer be masked)",
                    w.target
                ),
            });
        }
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
                        reason: "computes a value from a protected column (the rule says derived = \"deny\")".into(),
                    });
                }
            }
        }
    }
    Ok(())
}

fn rule_name(rule: Option<&ColumnRule>) -> String {
    rule.map_or_else(
        || "masking: protected wholesale".to_owned(),
        |r| format!("masking.column {}", r.spec),
    )
}

/// How one result column is masked, and why (for the record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnMask {
    /// No protected column in its lineage: detectors only.
    Pass,
    /// The rule's strategy: the value is the protected value itself.
    Rule { strategy: Strategy, flow: Flow },
    /// Redacted whole: computed from a protected column, or of unknown
    /// lineage in a statement that may read one.
    Redact { unknown: bool },
}

impl ColumnMask {
    pub fn strategy(self) -> Option<Strategy> {
        match self {
            ColumnMask::Pass => None,
            ColumnMask::Rule { strategy, .. } => Some(strategy),
            ColumnMask::Redact { .. } => Some(Strategy::Redact),
        }
    }

    /// The record's name for the decision; `None` for [`ColumnMask::Pass`].
    pub fn label(self) -> Option<&'static str> {
        match self {
            ColumnMask::Pass => None,
            ColumnMask::Rule {
                flow: Flow::Direct, ..
            } => Some("direct"),
            ColumnMask::Rule { .. } => Some("preserved"),
            ColumnMask::Redact { unknown: false } => Some("derived-redacted"),
            ColumnMask::Redact { unknown: true } => Some("unknown-redacted"),
        }
    }

    fn strength(self) -> u8 {
        match self {
            ColumnMask::Pass => 0,
            ColumnMask::Rule { strategy, .. } => 1 + strategy.strength(),
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
    let mut mask = ColumnMask::Pass;
    for h in hits {
        let m = match (h.rule, h.flow) {
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
/// outputs; `None` when the statement is not known.
pub fn plan(
    policy: &MaskPolicy,
    rels: &dyn Relations,
    outputs: Option<&Outputs>,
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
    let outputs = match outputs {
        Some(Outputs::Known(o)) => o,
        _ => {
            // Rows of unknown origin (FETCH, EXECUTE, CALL): computed
            // columns could be anything.
            for (m, f) in masks.iter_mut().zip(fields) {
                if f.computed {
                    *m = m.max(ColumnMask::Redact { unknown: true });
                }
            }
            return masks;
        }
    };
    match align(rels, outputs, fields) {
        Some(aligned) => {
            for (m, l) in masks.iter_mut().zip(aligned) {
                if let Some(l) = l {
                    *m = m.max(column(policy, rels, l));
                }
            }
        }
        None => {
            // The result does not line up with the statement (a `*` the
            // server expanded differently): every computed column may carry
            // anything the statement reads.
            let mut all = Lineage::default();
            for o in outputs {
                if let Output::Column { lineage, .. } = o {
                    all.merge(lineage);
                }
            }
            let all = all.at_least(Flow::Derived);
            let m_all = column(policy, rels, &all);
            for (m, f) in masks.iter_mut().zip(fields) {
                if f.computed {
                    *m = m.max(match m_all {
                        ColumnMask::Pass => ColumnMask::Pass,
                        _ => ColumnMask::Redact { unknown: true },
                    });
                }
            }
        }
    }
    masks
}

/// Each field's lineage, by position: a column output takes one field, a
/// `*` over a named relation the fields the server attributes to it (which
/// the server's attribution masks). `None`: they do not line up.
fn align<'o>(
    rels: &dyn Relations,
    outputs: &'o [Output],
    fields: &[Field],
) -> Option<Vec<Option<&'o Lineage>>> {
    let _ = rels;
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
    use crate::mask::DetectorSet;
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
        plan(&policy(Derived::Redact), &NoCatalog, Some(&s.outputs), fields)
            .into_iter()
            .map(ColumnMask::label)
            .collect()
    }

    #[test]
    fn computed_columns_are_redacted_and_values_keep_their_rule() {
        assert_eq!(
            labels("SELECT id, reverse(ssn), max(ssn), ssn AS x FROM customers", &computed(4)),
            [None, Some("derived-redacted"), Some("preserved"), Some("direct")]
        );
        let p = policy(Derived::Redact);
        let s = stmt("SELECT max(ssn) FROM customers");
        assert_eq!(
            plan(&p, &NoCatalog, Some(&s.outputs), &computed(1))[0].strategy(),
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
        let m = plan(&p, &NoCatalog, Some(&Outputs::Unknown), &computed(1));
        assert_eq!(m[0].label(), Some("unknown-redacted"));
    }

    #[test]
    fn refusals_name_the_rule_and_column() {
        let p = policy(Derived::Redact);
        assert!(check(&p, &NoCatalog, &stmt("SELECT id FROM customers WHERE ssn = '1'")).is_ok());
        let r = check(&p, &NoCatalog, &stmt("SELECT id FROM customers WHERE ssn LIKE '1%'")).unwrap_err();
        assert_eq!(r.rule, "masking.column customers.ssn");
        assert_eq!(r.column, "customers.ssn");
        assert!(r.reason.starts_with("LIKE"), "{}", r.reason);
        assert!(check(&p, &NoCatalog, &stmt("SELECT reverse(ssn) FROM customers")).is_ok());
        let deny = policy(Derived::Deny);
        assert!(check(&deny, &NoCatalog, &stmt("SELECT reverse(ssn) FROM customers")).is_err());
        assert!(check(&deny, &NoCatalog, &stmt("SELECT ssn FROM customers")).is_ok());
        assert!(check(&p, &NoCatalog, &stmt("INSERT INTO t SELECT ssn FROM customers")).is_err());
        assert!(check(&p, &NoCatalog, &stmt("SELECT id FROM orders WHERE ssn LIKE '1%'")).is_ok());
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
}
