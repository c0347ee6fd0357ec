//! The masking policy as a database handler's row masker sees it: the
//! [`RowMasker`] trait a wire-level row rewriter calls, the [`Masker`] that
//! implements it over a [`MaskPolicy`], and [`ResultMasks::plan`], which turns
//! a result's columns (as the server attributes them) and the statement's
//! lineage into one strategy per column. Shared by every SQL handler, so that
//! a column is masked the same way whatever the wire protocol.
//!
//! Fails closed like [`super::lineage::plan`]: a column whose origin is not
//! known is redacted when the statement may read a protected column.

use std::sync::Arc;

use serde_json::{Value, json};

use super::{
    MaskPolicy, Strategy,
    lineage::{self, ColumnMask, Field, JsonMask, Relations},
};
use crate::sql::lineage::Outputs;

/// The policy side of masking. `Strategy` is the policy's own strategy type
/// (e.g. `crate::mask::Strategy`); this module only passes it back.
pub trait RowMasker {
    type Strategy: Copy;

    /// The strategy for a column, if a rule names it. `table` is `None` for a
    /// computed column (no table OID).
    fn column_strategy(&self, table: Option<&str>, column: &str) -> Option<Self::Strategy>;

    /// Whether value detectors are configured (if not, columns without a rule are
    /// not looked at).
    fn has_detectors(&self) -> bool;

    /// The text `strategy` puts in place of any value, if it does not depend
    /// on the value (a redaction): such columns skip [`Self::mask_text`].
    fn fixed_text(&self, _strategy: Self::Strategy) -> Option<&'static str> {
        None
    }

    /// Mask `value`: with `strategy` for a rule column, and/or by detectors. On
    /// [`MaskResult::Masked`] the replacement is in `out` (cleared by the caller).
    fn mask_text(
        &self,
        value: &str,
        strategy: Option<Self::Strategy>,
        out: &mut String,
    ) -> MaskResult;
}

/// What [`RowMasker::mask_text`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MaskResult {
    Unchanged,
    /// Replacement written to `out`; detector names that fired (empty for a rule).
    Masked {
        detectors: Vec<&'static str>,
    },
    /// The value cannot be masked: the row must not be sent.
    Refuse,
}

/// How one result column is masked: a strategy for the whole value, or a
/// JSON value's protected fields masked inside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnStrategy {
    Value(Strategy),
    /// An index into [`Masker::json`].
    Json(usize),
}

/// The masking policy as the row masker sees it (public so benchmarks measure
/// exactly this adapter).
pub struct Masker<'m> {
    pub policy: &'m MaskPolicy,
    pub json: &'m [Arc<lineage::JsonMask>],
}

impl<'m> Masker<'m> {
    pub fn new(policy: &'m MaskPolicy) -> Self {
        Masker { policy, json: &[] }
    }
}

impl RowMasker for Masker<'_> {
    type Strategy = ColumnStrategy;

    fn column_strategy(&self, table: Option<&str>, column: &str) -> Option<ColumnStrategy> {
        self.policy
            .column_rule(table, column)
            .map(ColumnStrategy::Value)
    }

    fn has_detectors(&self) -> bool {
        self.policy.detectors_enabled()
    }

    fn fixed_text(&self, strategy: ColumnStrategy) -> Option<&'static str> {
        match strategy {
            ColumnStrategy::Value(s) => self.policy.fixed_replacement(s),
            ColumnStrategy::Json(_) => None,
        }
    }

    fn mask_text(
        &self,
        value: &str,
        strategy: Option<ColumnStrategy>,
        out: &mut String,
    ) -> MaskResult {
        let strategy = match strategy {
            Some(ColumnStrategy::Json(i)) => {
                let Some(mask) = self.json.get(i) else {
                    return MaskResult::Refuse;
                };
                let mut fields = String::new();
                if !mask.apply(self.policy, value, &mut fields) {
                    return self.mask_text(value, None, out);
                }
                // Then the detectors, over what is left.
                let detectors = self
                    .policy
                    .mask_value_into(&fields, None, out)
                    .unwrap_or_else(|| {
                        out.push_str(&fields);
                        Vec::new()
                    });
                return MaskResult::Masked { detectors };
            }
            Some(ColumnStrategy::Value(s)) => Some(s),
            None => None,
        };
        match self.policy.mask_value_into(value, strategy, out) {
            Some(detectors) => MaskResult::Masked { detectors },
            None => MaskResult::Unchanged,
        }
    }
}

/// One result's masks: a strategy per column, the JSON masks they point
/// into, and the lineage decisions its record names.
#[derive(Debug, Clone, Default)]
pub struct ResultMasks {
    pub strategies: Vec<Option<ColumnStrategy>>,
    /// What [`ColumnStrategy::Json`] indexes.
    pub json: Vec<Arc<JsonMask>>,
    /// Per protected column: its index and the decision (`direct`,
    /// `preserved`, `derived-redacted`, ...).
    pub decided: Vec<(usize, &'static str)>,
}

impl ResultMasks {
    /// The masks for a result whose columns the server describes as
    /// `fields`, of a statement with `outputs` (a `FETCH`'s: its cursor's;
    /// `None`: not known) calling `functions`.
    pub fn plan(
        policy: &MaskPolicy,
        rels: &dyn Relations,
        outputs: Option<&Outputs>,
        functions: &[String],
        fields: &[Field],
    ) -> Self {
        let masks = lineage::plan(policy, rels, outputs, functions, fields);
        let mut out = ResultMasks::default();
        for (i, m) in masks.iter().enumerate() {
            out.strategies.push(match m {
                ColumnMask::Json(j) => {
                    out.json.push(Arc::clone(j));
                    Some(ColumnStrategy::Json(out.json.len() - 1))
                }
                m => m.strategy().map(ColumnStrategy::Value),
            });
            if let Some(l) = m.label() {
                out.decided.push((i, l));
            }
        }
        out
    }

    /// The decisions as a record shows them, columns by name; `None` when no
    /// protected column is in the result.
    pub fn record(&self, name: impl Fn(usize) -> String) -> Option<Value> {
        (!self.decided.is_empty()).then(|| {
            Value::Array(
                self.decided
                    .iter()
                    .map(|(i, l)| json!({"column": name(*i), "lineage": l}))
                    .collect(),
            )
        })
    }

    /// The masker for these columns' rows.
    pub fn masker<'m>(&'m self, policy: &'m MaskPolicy) -> Masker<'m> {
        Masker {
            policy,
            json: &self.json,
        }
    }
}
