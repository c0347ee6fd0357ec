//! The masking policy in force for one resource.

use std::{borrow::Cow, sync::Arc};

use super::{DetectorSet, MaskKey, Strategy, apply_into, fixed_text, scan_with};
use crate::policy::glob::Glob;

/// One column rule: `table.column` (either part may be a glob) or a bare column glob.
#[derive(Debug, Clone)]
pub struct ColumnRule {
    /// `None`: any table.
    pub table: Option<Glob>,
    pub column: Glob,
    pub strategy: Strategy,
}

impl ColumnRule {
    /// Parse `table.column`, `schema.table.column` or `column`; SQL names compare
    /// case-insensitively.
    pub fn parse(spec: &str, strategy: Strategy) -> Self {
        match spec.rsplit_once('.') {
            Some((table, column)) => ColumnRule {
                table: Some(Glob::new_case_insensitive(table)),
                column: Glob::new_case_insensitive(column),
                strategy,
            },
            None => ColumnRule {
                table: None,
                column: Glob::new_case_insensitive(spec),
                strategy,
            },
        }
    }

    fn matches(&self, table: Option<&str>, column: &str) -> bool {
        if !self.column.matches(column) {
            return false;
        }
        match (&self.table, table) {
            (None, _) | (Some(_), None) => true, // unknown table: fail closed
            (Some(pat), Some(t)) => {
                pat.matches(t)
                    || t.rsplit_once('.')
                        .is_some_and(|(_, unqualified)| pat.matches(unqualified))
            }
        }
    }
}

/// Column rules and detectors that apply to one resource.
#[derive(Debug, Clone)]
pub struct MaskPolicy {
    columns: Vec<ColumnRule>,
    detectors: DetectorSet,
    detector_strategy: Strategy,
    key: Option<Arc<MaskKey>>,
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
        }
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
        let hits = scan_with(value, self.detectors);
        if hits.is_empty() {
            return None;
        }
        let mut names: Vec<&'static str> = Vec::new();
        let mut last = 0;
        for hit in hits {
            out.push_str(&value[last..hit.range.start]);
            apply_into(
                self.detector_strategy,
                &value[hit.range.clone()],
                key,
                Some(hit.detector),
                out,
            );
            last = hit.range.end;
            if !names.contains(&hit.detector) {
                names.push(hit.detector);
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
