//! The masking policy in force for one resource.

use std::{borrow::Cow, sync::Arc, time::Duration};

use super::{DetectorSet, MaskKey, Strategy, apply_into, fixed_text, scan_with};
use crate::policy::glob::Glob;

/// One column rule: `table.column` (either part may be a glob) or a bare column glob.
#[derive(Debug, Clone)]
pub struct ColumnRule {
    /// `None`: any table.
    pub table: Option<Glob>,
    /// For a schema-qualified `table`: its last part, which a table named
    /// without a schema may be (fails closed: the rule applies).
    pub unqualified: Option<Glob>,
    pub column: Glob,
    pub strategy: Strategy,
    /// Which conditions on the column a statement may use.
    pub predicates: Predicates,
    /// What happens to a value computed from the column.
    pub derived: Derived,
    /// How far equality tests on the column may go.
    pub equality: EqualityLimits,
    /// The rule as written, for refusals and records.
    pub spec: String,
}

/// Bounds on equality tests with literals, which `predicates = "equality"`
/// allows: each answers "is it this value", so many of them enumerate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EqualityLimits {
    /// Most values one statement may compare the column with (`IN` lists,
    /// `OR` chains, `= ANY(ARRAY[...])`, `CASE col WHEN ...`).
    pub max_values: usize,
    /// Most distinct values one identity may compare the column with
    /// within [`Self::window`] (each parameter execution counts as one
    /// value of its own); past it, statements comparing new values are
    /// refused and an alert is sent.
    pub budget: u32,
    pub window: Duration,
}

impl EqualityLimits {
    pub const DEFAULT_MAX_VALUES: usize = 10;
    pub const DEFAULT_BUDGET: u32 = 50;
    pub const DEFAULT_WINDOW: Duration = Duration::from_hours(24);
}

impl Default for EqualityLimits {
    fn default() -> Self {
        EqualityLimits {
            max_values: Self::DEFAULT_MAX_VALUES,
            budget: Self::DEFAULT_BUDGET,
            window: Self::DEFAULT_WINDOW,
        }
    }
}

/// Conditions a statement may put on a protected column (`WHERE`, `JOIN ON`,
/// `HAVING`, `GROUP BY`, `ORDER BY`): each lets an agent learn about values
/// it is not shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Predicates {
    /// Any condition.
    Any,
    /// Equality with literals or parameters (`=`, `<>`, `IN`, `IS NULL`):
    /// a lookup by a value the agent already has.
    #[default]
    Equality,
    /// None: the column may only be read (masked).
    None,
}

/// A value computed from a protected column (`reverse(ssn)`, `md5(email)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Derived {
    /// Redacted whole.
    #[default]
    Redact,
    /// The statement is refused.
    Deny,
}

impl ColumnRule {
    /// Parse `table.column`, `schema.table.column` or `column`; SQL names compare
    /// case-insensitively.
    pub fn parse(spec: &str, strategy: Strategy) -> Self {
        let (table, column) = match spec.rsplit_once('.') {
            Some((table, column)) => (Some(table), column),
            None => (None, spec),
        };
        let unqualified = table
            .and_then(|t| t.rsplit_once('.'))
            .map(|(_, last)| Glob::new_case_insensitive(last));
        ColumnRule {
            table: table.map(Glob::new_case_insensitive),
            unqualified,
            column: Glob::new_case_insensitive(column),
            strategy,
            predicates: Predicates::default(),
            derived: Derived::default(),
            equality: EqualityLimits::default(),
            spec: spec.to_owned(),
        }
    }

    /// With the rule's `predicates` and `derived` settings.
    #[must_use]
    pub fn with_modes(mut self, predicates: Predicates, derived: Derived) -> Self {
        self.predicates = predicates;
        self.derived = derived;
        self
    }

    /// With bounds on its equality tests.
    #[must_use]
    pub fn with_equality(mut self, equality: EqualityLimits) -> Self {
        self.equality = equality;
        self
    }

    /// Whether the rule may name a column of `table` (`None`: unknown table).
    pub fn covers_table(&self, table: Option<&str>) -> bool {
        match (&self.table, table) {
            (None, _) | (Some(_), None) => true,
            (Some(pat), Some(t)) => {
                pat.matches(t)
                    || t.rsplit_once('.')
                        .is_some_and(|(_, unqualified)| pat.matches(unqualified))
                    || (!t.contains('.') && self.unqualified.as_ref().is_some_and(|u| u.matches(t)))
            }
        }
    }

    pub(crate) fn matches(&self, table: Option<&str>, column: &str) -> bool {
        // An unknown table fails closed: the rule applies.
        self.column.matches(column) && self.covers_table(table)
    }
}

/// Column rules and detectors that apply to one resource.
#[derive(Debug, Clone)]
pub struct MaskPolicy {
    columns: Vec<ColumnRule>,
    detectors: DetectorSet,
    detector_strategy: Strategy,
    key: Option<Arc<MaskKey>>,
    /// JSON field rules (HTTP bodies), see [`super::json_path`].
    json: Vec<super::json_path::JsonFieldRule>,
    /// Values found by keyed fingerprint where the detectors run, see
    /// [`super::fingerprints`].
    protected: Option<Arc<super::fingerprints::ProtectedValues>>,
}

/// The result of masking one value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskOutcome<'a> {
    pub text: Cow<'a, str>,
    /// Names of the detectors that fired (each once), for the audit record.
    pub detectors_hit: Vec<&'static str>,
    pub changed: bool,
}

impl Default for MaskPolicy {
    fn default() -> Self {
        Self::none()
    }
}

impl MaskPolicy {
    pub fn new(
        columns: Vec<ColumnRule>,
        detectors: DetectorSet,
        detector_strategy: Strategy,
    ) -> Self {
        MaskPolicy {
            columns,
            detectors,
            detector_strategy,
            key: None,
            json: Vec::new(),
            protected: None,
        }
    }

    /// With protected values found by keyed fingerprint (wherever the
    /// detectors run: they are masked as a detector hit named
    /// `protected_value`).
    #[must_use]
    pub fn with_protected_values(
        mut self,
        values: Option<Arc<super::fingerprints::ProtectedValues>>,
    ) -> Self {
        self.protected = values;
        self
    }

    pub fn protected_values(&self) -> Option<&Arc<super::fingerprints::ProtectedValues>> {
        self.protected.as_ref()
    }

    /// With JSON field rules (for JSON bodies).
    #[must_use]
    pub fn with_json_fields(mut self, rules: Vec<super::json_path::JsonFieldRule>) -> Self {
        self.json = rules;
        self
    }

    pub fn json_fields(&self) -> &[super::json_path::JsonFieldRule] {
        &self.json
    }

    /// Whether a body must be read to mask it: detectors or JSON field rules.
    pub fn inspects_bodies(&self) -> bool {
        self.detectors_enabled() || !self.json.is_empty()
    }

    /// Masks nothing.
    pub fn none() -> Self {
        Self::new(Vec::new(), DetectorSet::NONE, Strategy::Redact)
    }

    /// Set the key for [`Strategy::KeyedHash`].
    #[must_use]
    pub fn with_key(mut self, key: Option<Arc<MaskKey>>) -> Self {
        self.key = key;
        self
    }

    pub fn columns(&self) -> &[ColumnRule] {
        &self.columns
    }

    pub fn detectors(&self) -> DetectorSet {
        self.detectors
    }

    pub fn detector_strategy(&self) -> Strategy {
        self.detector_strategy
    }

    /// The strategy for a column, the strongest of all rules that match.
    /// `table` is `None` when the handler does not know it: then rules naming
    /// the column under any table apply.
    pub fn column_rule(&self, table: Option<&str>, column: &str) -> Option<Strategy> {
        self.columns
            .iter()
            .filter(|r| r.matches(table, column))
            .map(|r| r.strategy)
            .max_by_key(|s| s.strength())
    }

    /// The strongest rule naming `column` of `table`, if any.
    pub fn rule_for(&self, table: Option<&str>, column: &str) -> Option<&ColumnRule> {
        self.columns
            .iter()
            .filter(|r| r.matches(table, column))
            .max_by_key(|r| r.strategy.strength())
    }

    /// The strongest rule naming any column of `table`: a whole row of it
    /// carries that column.
    pub fn rule_for_any_column(&self, table: Option<&str>) -> Option<&ColumnRule> {
        self.columns
            .iter()
            .filter(|r| r.covers_table(table))
            .max_by_key(|r| r.strategy.strength())
    }

    /// The strongest rule that names `table` itself (not a pattern such as
    /// `*.ssn` that covers every table).
    pub fn rule_naming_table(&self, table: &str) -> Option<&ColumnRule> {
        self.columns
            .iter()
            .filter(|r| {
                r.table
                    .as_ref()
                    .is_some_and(crate::policy::glob::Glob::is_literal)
                    && r.covers_table(Some(table))
            })
            .max_by_key(|r| r.strategy.strength())
    }

    pub fn detectors_enabled(&self) -> bool {
        !self.detectors.is_empty()
    }

    /// The text a column `strategy` writes whatever the value, if it is fixed:
    /// a redaction, or a keyed hash without a key (redacted instead).
    pub fn fixed_replacement(&self, strategy: Strategy) -> Option<&'static str> {
        fixed_text(strategy, self.key.as_deref())
    }

    /// Mask one value: the column strategy if there is one (the whole value),
    /// otherwise each detected value in place.
    pub fn mask_value<'a>(
        &self,
        value: &'a str,
        column_strategy: Option<Strategy>,
    ) -> MaskOutcome<'a> {
        let mut out = String::new();
        match self.mask_value_into(value, column_strategy, &mut out) {
            None => MaskOutcome {
                text: Cow::Borrowed(value),
                detectors_hit: Vec::new(),
                changed: false,
            },
            Some(detectors_hit) => MaskOutcome {
                text: Cow::Owned(out),
                detectors_hit,
                changed: true,
            },
        }
    }

    /// [`Self::mask_value`], appending the masked text to `out`. `None`: the
    /// value is unchanged and nothing was appended; `Some(detectors)`: masked
    /// (the detectors that fired, each once; empty for a column strategy).
    pub fn mask_value_into(
        &self,
        value: &str,
        column_strategy: Option<Strategy>,
        out: &mut String,
    ) -> Option<Vec<&'static str>> {
        let key = self.key.as_deref();
        if let Some(strategy) = column_strategy {
            apply_into(strategy, value, key, None, out);
            return Some(Vec::new());
        }
        if self.detectors.is_empty() {
            return None;
        }
        let mut hits: Vec<(std::ops::Range<usize>, &'static str)> =
            scan_with(value, self.detectors)
                .into_iter()
                .map(|d| (d.range, d.detector))
                .collect();
        if let Some(p) = &self.protected {
            let before = hits.len();
            for r in p.find(value) {
                if !hits[..before]
                    .iter()
                    .any(|(h, _)| h.start < r.end && r.start < h.end)
                {
                    hits.push((r, super::fingerprints::DETECTOR));
                }
            }
            if hits.len() > before {
                hits.sort_by_key(|(r, _)| r.start);
            }
        }
        if hits.is_empty() {
            return None;
        }
        let mut names: Vec<&'static str> = Vec::new();
        let mut last = 0;
        for (range, detector) in hits {
            out.push_str(&value[last..range.start]);
            apply_into(
                self.detector_strategy,
                &value[range.clone()],
                key,
                Some(detector),
                out,
            );
            last = range.end;
            if !names.contains(&detector) {
                names.push(detector);
            }
        }
        out.push_str(&value[last..]);
        Some(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> MaskPolicy {
        MaskPolicy::new(
            vec![
                ColumnRule::parse("customers.ssn", Strategy::KeepLast4),
                ColumnRule::parse("*.email", Strategy::KeyedHash),
                ColumnRule::parse("card_*", Strategy::Redact),
                ColumnRule::parse("customers.card_number", Strategy::KeepLast4),
            ],
            DetectorSet::ALL,
            Strategy::Redact,
        )
    }

    #[test]
    fn a_schema_qualified_rule_covers_its_table_named_with_or_without_a_schema() {
        let r = ColumnRule::parse("shop.customers.ssn", Strategy::Redact);
        assert!(r.matches(Some("shop.customers"), "ssn"));
        // Named without a schema, it may be that table: the rule applies.
        assert!(r.matches(Some("customers"), "ssn"));
        assert!(!r.matches(Some("other.customers"), "ssn"));
        assert!(!r.matches(Some("orders"), "ssn"));
        let r = ColumnRule::parse("customers.ssn", Strategy::Redact);
        assert!(r.matches(Some("other.customers"), "ssn"));
    }

    #[test]
    fn column_rules_match_and_strongest_wins() {
        let p = policy();
        assert_eq!(
            p.column_rule(Some("customers"), "ssn"),
            Some(Strategy::KeepLast4)
        );
        assert_eq!(
            p.column_rule(Some("public.customers"), "SSN"),
            Some(Strategy::KeepLast4)
        );
        assert_eq!(p.column_rule(Some("orders"), "ssn"), None);
        assert_eq!(
            p.column_rule(None, "ssn"),
            Some(Strategy::KeepLast4),
            "unknown table fails closed"
        );
        assert_eq!(p.column_rule(Some("x"), "email"), Some(Strategy::KeyedHash));
        assert_eq!(
            p.column_rule(Some("customers"), "card_number"),
            Some(Strategy::Redact)
        );
        assert_eq!(p.column_rule(Some("customers"), "name"), None);
    }

    #[test]
    fn mask_value_column_then_detectors() {
        let p = policy().with_key(Some(Arc::new(MaskKey::new([7; 32]))));
        let o = p.mask_value("123-45-6789", Some(Strategy::KeepLast4));
        assert_eq!(o.text, "***-**-6789");
        assert!(o.changed);
        let o = p.mask_value("reach me at jane@example.com or 555-867-5309", None);
        assert_eq!(o.text, "reach me at [REDACTED:email] or [REDACTED:phone]");
        assert_eq!(o.detectors_hit, vec!["email", "phone"]);
        let o = p.mask_value("nothing here 42", None);
        assert!(matches!(o.text, Cow::Borrowed(_)) && !o.changed);
        let o = MaskPolicy::none().mask_value("123-45-6789", None);
        assert!(!o.changed);
    }
}
