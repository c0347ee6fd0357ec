//! Masking: rewrite sensitive values before they reach the agent.
//!
//! Two mechanisms, both defined by policy: column rules (a column named in a
//! rule is masked whole, whatever it holds) and value detectors (free text is
//! scanned and each detected value is masked in place). This module evaluates a
//! value or a column; protocol handlers apply it to rows. It fails closed:
//! when a column's table is unknown, a rule naming that column under any table
//! applies; a keyed hash without a key becomes a redaction.

mod budget;
mod detectors;
pub mod fingerprints;
pub mod json_path;
pub mod lineage;
mod masker;
mod rules;
mod strategy;

pub use budget::{ProbeBudget, Probes, StoreError as BudgetStoreError};
pub use detectors::{Detection, Detector, DetectorSet, scan, scan_with};
pub use json_path::{JsonFieldRule, JsonHit, JsonPath};
pub use masker::{ColumnStrategy, MaskResult, Masker, ResultMasks, RowMasker};
pub use rules::{ColumnRule, Derived, EqualityLimits, MaskOutcome, MaskPolicy, Predicates};
pub use strategy::{MaskKey, Strategy, apply, apply_into, fixed_text};
