//! Pure rewriting of result rows (`DataRow`, `COPY TO STDOUT` data) for masking.
//!
//! The policy side supplies a [`RowMasker`]: which strategy applies to a column
//! (by table and column name) and how to mask a text value (by that strategy,
//! and/or by value detectors). This module knows the wire: field framing, text vs
//! binary formats, type OIDs, COPY text escaping. A [`RowPlan`] is built once per
//! `RowDescription`; each row is then rewritten with no allocation unless a value
//! changes, and the original bytes are passed on untouched when nothing does.
//!
//! # Fails closed
//!
//! Every error here means "do not send this row": the proxy ends the statement
//! with an error instead of passing data it could not mask.
//!
//! - A column from a table whose OID cannot be resolved to a name is an error
//!   ([`MaskError::UnresolvedTable`]): a rule for that table might apply.
//! - Text values (text format, or binary text-like types) that are not UTF-8
//!   cannot be matched or masked: refused when a rule or detector applies.
//! - Binary values of types that cannot carry masked text (integers, numeric,
//!   dates, ...) with a column rule are replaced by NULL, or the row is refused,
//!   per [`Unmaskable`]. NULL is the default: the session stays usable and the
//!   client sees a well-typed value; the audit record counts it in `values_nulled`.
//!   Detectors scan binary integers and numerics (a card number fits in an
//!   `int8`); a hit is handled the same way. Binary values of other types (bool,
//!   floats, dates, timestamps, uuid, arrays, composites) are not scanned by
//!   detectors: nothing in them is text a detector could match, except arrays and
//!   composites, a known gap (they are scanned in text format).
//! - `COPY TO STDOUT` in binary or CSV format is refused when anything applies;
//!   text format is parsed (tab-separated, backslash escapes, `\N`), one row per
//!   `CopyData` as the server sends it (a partial row is refused).
//! - The masker itself may refuse a value ([`MaskResult::Refuse`]).
//!
//! [`MaskReport`] names masked columns, counts values and names detectors; it
//! never holds a value.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use bytes::{BufMut, Bytes, BytesMut};

use super::codec::{CopyFormat, DataRow, RowDescription};

/// Type OIDs this module handles in binary format.
pub mod oid {
    pub const BOOL: u32 = 16;
    pub const BYTEA: u32 = 17;
    pub const NAME: u32 = 19;
    pub const INT8: u32 = 20;
    pub const INT2: u32 = 21;
    pub const INT4: u32 = 23;
    pub const TEXT: u32 = 25;
    pub const JSON: u32 = 114;
    pub const XML: u32 = 142;
    pub const BPCHAR: u32 = 1042;
    pub const VARCHAR: u32 = 1043;
    pub const NUMERIC: u32 = 1700;
    pub const JSONB: u32 = 3802;
    pub const UNKNOWN: u32 = 705;

    /// Types whose text form a masked text is not a value of: bool, int2/4/8,
    /// oid, float4/8, money, numeric, date, time, timestamp(tz), interval,
    /// uuid, and the arrays of text, varchar, bpchar, int2/4/8, numeric,
    /// float4/8, json and jsonb.
    pub const TYPED_TEXT: &[u32] = &[
        16, 20, 21, 23, 26, 700, 701, 790, 1700, 1082, 1083, 1114, 1184, 1186, 2950, 1009, 1015,
        1014, 1005, 1007, 1016, 1231, 1021, 1022, 199, 3807,
    ];
}

pub use crate::mask::{MaskResult, RowMasker};

/// What to do with a binary value whose type cannot carry masked text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Unmaskable {
    /// Send SQL NULL in its place.
    #[default]
    Null,
    /// Refuse the row (the statement fails).
    RefuseRow,
}

/// Why a row could not be masked. The proxy must not send the row.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaskError {
    #[error("proxy: table OID {table_oid} of column {column:?} is not resolved")]
    UnresolvedTable { table_oid: u32, column: String },
    #[error("server (upstream): row has {got} fields, its description {expected}")]
    FieldCount { expected: usize, got: usize },
    #[error("proxy: value in column {column:?} cannot be masked: {reason}")]
    Refused {
        column: String,
        reason: &'static str,
    },
    #[error("proxy: COPY data cannot be masked: {reason}")]
    Copy { reason: &'static str },
}

/// What masking did to a statement's results: names and counts, never values.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MaskReport {
    pub columns_masked: Vec<String>,
    pub values_masked: u64,
    /// Of `values_masked`, those replaced by NULL (binary types that cannot
    /// carry masked text).
    pub values_nulled: u64,
    pub detectors: BTreeSet<&'static str>,
}

impl MaskReport {
    fn note(&mut self, column: &str, detectors: &[&'static str], nulled: bool) {
        self.values_masked += 1;
        if nulled {
            self.values_nulled += 1;
        }
        if !self.columns_masked.iter().any(|c| c == column) {
            self.columns_masked.push(column.to_owned());
        }
        self.detectors.extend(detectors.iter().copied());
    }
}

/// Reusable buffers: one per connection keeps the hot path allocation-free.
#[derive(Debug, Default)]
pub struct Scratch {
    text: String,
    out: String,
}

/// Write the length of the message that starts at `start` (its type byte).
fn patch_len(out: &mut BytesMut, start: usize) {
    let len = (out.len() - start - 1) as i32;
    out[start + 1..start + 5].copy_from_slice(&len.to_be_bytes());
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Text format (any type but those below), or a binary text-like type:
    /// the bytes are the text.
    Text,
    /// Text format of a type a masked text is not a value of (numbers,
    /// dates, arrays, ...): masked values become NULL (or refuse the row).
    TypedText,
    /// JSON in text format, or binary `json`: a masked value must stay JSON.
    JsonText,
    Jsonb,
    Bytea,
    Int2,
    Int4,
    Int8,
    Numeric,
    /// Binary of any other type.
    Opaque,
}

#[derive(Debug, Clone)]
struct Col<S> {
    name: String,
    strategy: Option<S>,
    /// What `strategy` writes whatever the value ([`RowMasker::fixed_text`]).
    fixed: Option<&'static str>,
    kind: Kind,
    detect: bool,
}

impl<S> Col<S> {
    fn active(&self) -> bool {
        self.strategy.is_some() || self.detect
    }
}

/// Per-column masking decisions for one `RowDescription`.
#[derive(Debug, Clone)]
pub struct RowPlan<S> {
    cols: Vec<Col<S>>,
    unmaskable: Unmaskable,
    active: bool,
}

enum Outcome {
    Keep,
    /// New value in `scratch.out`; `jsonb`: after jsonb's version byte.
    Replace {
        jsonb: bool,
    },
    /// New value `text`, the same for every value of the column.
    Fixed {
        text: &'static str,
        jsonb: bool,
    },
    Null,
}

impl<S: Copy> RowPlan<S> {
    /// Decide per column. `table_name` resolves a table OID (from the proxy's
    /// catalog cache); a nonzero OID it cannot resolve is an error.
    pub fn new<M, F>(
        desc: &RowDescription,
        masker: &M,
        mut table_name: F,
        unmaskable: Unmaskable,
    ) -> Result<Self, MaskError>
    where
        M: RowMasker<Strategy = S>,
        F: FnMut(u32) -> Option<String>,
    {
        let mut strategies = Vec::with_capacity(desc.fields.len());
        for f in &desc.fields {
            let name = String::from_utf8_lossy(&f.name);
            let table = if f.table_oid == 0 {
                None
            } else {
                Some(
                    table_name(f.table_oid).ok_or_else(|| MaskError::UnresolvedTable {
                        table_oid: f.table_oid,
                        column: name.clone().into_owned(),
                    })?,
                )
            };
            strategies.push(masker.column_strategy(table.as_deref(), &name));
        }
        Ok(Self::with_strategies(desc, masker, &strategies, unmaskable))
    }

    /// With each column's strategy decided by the caller (`strategies[i]`
    /// for field `i`; missing entries have none).
    pub fn with_strategies<M>(
        desc: &RowDescription,
        masker: &M,
        strategies: &[Option<S>],
        unmaskable: Unmaskable,
    ) -> Self
    where
        M: RowMasker<Strategy = S>,
    {
        let detectors = masker.has_detectors();
        let mut cols = Vec::with_capacity(desc.fields.len());
        for (i, f) in desc.fields.iter().enumerate() {
            let name = String::from_utf8_lossy(&f.name).into_owned();
            let strategy = strategies.get(i).copied().flatten();
            let kind = if f.format == 0 {
                match f.type_oid {
                    oid::JSON | oid::JSONB => Kind::JsonText,
                    t if oid::TYPED_TEXT.contains(&t) => Kind::TypedText,
                    _ => Kind::Text,
                }
            } else {
                match f.type_oid {
                    oid::TEXT
                    | oid::VARCHAR
                    | oid::BPCHAR
                    | oid::NAME
                    | oid::XML
                    | oid::UNKNOWN => Kind::Text,
                    oid::JSON => Kind::JsonText,
                    oid::JSONB => Kind::Jsonb,
                    oid::BYTEA => Kind::Bytea,
                    oid::INT2 => Kind::Int2,
                    oid::INT4 => Kind::Int4,
                    oid::INT8 => Kind::Int8,
                    oid::NUMERIC => Kind::Numeric,
                    _ => Kind::Opaque,
                }
            };
            let detect = detectors && kind != Kind::Opaque;
            cols.push(Col {
                name,
                strategy,
                fixed: strategy.and_then(|s| masker.fixed_text(s)),
                kind,
                detect,
            });
        }
        let active = cols.iter().any(Col::active);
        Self {
            cols,
            unmaskable,
            active,
        }
    }

    /// False when no column has a rule or detectors: rows pass untouched.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Names of the columns a rule applies to.
    pub fn ruled_columns(&self) -> impl Iterator<Item = &str> {
        self.cols
            .iter()
            .filter(|c| c.strategy.is_some())
            .map(|c| c.name.as_str())
    }

    /// Mask one row. `Ok(None)`: nothing changed, send the original.
    /// (The proxy uses [`RowPlan::mask_row_into`], which saves a copy.)
    pub fn mask_row<M>(
        &self,
        masker: &M,
        row: &DataRow,
        scratch: &mut Scratch,
        report: &mut MaskReport,
    ) -> Result<Option<DataRow>, MaskError>
    where
        M: RowMasker<Strategy = S>,
    {
        let mut out = BytesMut::new();
        if !self.mask_row_into(masker, row, scratch, report, &mut out)? {
            return Ok(None);
        }
        // 'D', the length, then the body.
        let body = out.split_off(5).freeze();
        Ok(Some(DataRow::from_valid_body(row.len() as u16, body)))
    }

    /// Append the row to `out` as a complete `DataRow` message, masked where
    /// the plan says; returns whether any value changed. Writes into `out`
    /// directly (no intermediate row), and leaves `out` as it was on error.
    pub fn mask_row_into<M>(
        &self,
        masker: &M,
        row: &DataRow,
        scratch: &mut Scratch,
        report: &mut MaskReport,
        out: &mut BytesMut,
    ) -> Result<bool, MaskError>
    where
        M: RowMasker<Strategy = S>,
    {
        if row.len() != self.cols.len() {
            return Err(MaskError::FieldCount {
                expected: self.cols.len(),
                got: row.len(),
            });
        }
        let body = row.body();
        let start = out.len();
        out.reserve(5 + body.len() + 16);
        out.put_u8(b'D');
        out.put_i32(0); // patched below
        if !self.active {
            out.put_slice(body);
            patch_len(out, start);
            return Ok(false);
        }
        // Unchanged fields are copied in runs: `copied` is how much of `body`
        // is in `out` already.
        let mut copied = 0usize;
        let mut changed = false;
        let mut pos = 2usize;
        for (col, value) in self.cols.iter().zip(row.fields()) {
            let field_start = pos;
            pos += 4 + value.map_or(0, <[u8]>::len);
            let outcome = match value {
                Some(v) if col.active() => match self.mask_value(masker, col, v, scratch, report) {
                    Ok(o) => o,
                    Err(e) => {
                        out.truncate(start);
                        return Err(e);
                    }
                },
                _ => Outcome::Keep,
            };
            let new = match outcome {
                Outcome::Keep => continue,
                Outcome::Null => None,
                Outcome::Replace { jsonb } => Some((scratch.out.as_str(), jsonb)),
                Outcome::Fixed { text, jsonb } => Some((text, jsonb)),
            };
            out.put_slice(&body[copied..field_start]);
            copied = pos;
            changed = true;
            match new {
                None => out.put_i32(-1),
                Some((text, jsonb)) => {
                    let len = text.len() + usize::from(jsonb);
                    // A masked value is short (a hash, stars, a label) next to
                    // the message limit; the row's total is checked below.
                    out.put_i32(i32::try_from(len).unwrap_or(i32::MAX));
                    if jsonb {
                        out.put_u8(1);
                    }
                    out.put_slice(text.as_bytes());
                }
            }
        }
        out.put_slice(&body[copied..]);
        if i32::try_from(out.len() - start - 1).is_err() {
            out.truncate(start);
            return Err(MaskError::Refused {
                column: "?".into(),
                reason: "the masked row is larger than a message can be",
            });
        }
        patch_len(out, start);
        Ok(changed)
    }

    fn mask_value<M>(
        &self,
        masker: &M,
        col: &Col<S>,
        value: &[u8],
        scratch: &mut Scratch,
        report: &mut MaskReport,
    ) -> Result<Outcome, MaskError>
    where
        M: RowMasker<Strategy = S>,
    {
        let refused = |reason| MaskError::Refused {
            column: col.name.clone(),
            reason,
        };
        match col.kind {
            Kind::TypedText => {
                let text = std::str::from_utf8(value).map_err(|_| refused("not UTF-8"))?;
                if col.strategy.is_some() {
                    return self.unmaskable(col, &[], report);
                }
                scratch.out.clear();
                match masker.mask_text(text, None, &mut scratch.out) {
                    MaskResult::Unchanged => Ok(Outcome::Keep),
                    MaskResult::Refuse => Err(refused("refused by masker")),
                    MaskResult::Masked { detectors } => self.unmaskable(col, &detectors, report),
                }
            }
            Kind::JsonText | Kind::Jsonb => Self::mask_json(masker, col, value, scratch, report),
            Kind::Text => {
                let text = std::str::from_utf8(value).map_err(|_| refused("not UTF-8"))?;
                if let Some(fixed) = col.fixed {
                    report.note(&col.name, &[], false);
                    return Ok(Outcome::Fixed {
                        text: fixed,
                        jsonb: false,
                    });
                }
                scratch.out.clear();
                match masker.mask_text(text, col.strategy, &mut scratch.out) {
                    MaskResult::Unchanged => Ok(Outcome::Keep),
                    MaskResult::Refuse => Err(refused("refused by masker")),
                    MaskResult::Masked { detectors } => {
                        report.note(&col.name, &detectors, false);
                        Ok(Outcome::Replace { jsonb: false })
                    }
                }
            }
            Kind::Bytea => {
                // A rule masks the hex form Postgres would show in text; detectors
                // look at the bytes when they are text.
                scratch.text.clear();
                let text: &str = if col.strategy.is_some() {
                    scratch.text.push_str("\\x");
                    for b in value {
                        let _ = write!(scratch.text, "{b:02x}");
                    }
                    &scratch.text
                } else {
                    match std::str::from_utf8(value) {
                        Ok(t) => t,
                        Err(_) => return Ok(Outcome::Keep),
                    }
                };
                scratch.out.clear();
                match masker.mask_text(text, col.strategy, &mut scratch.out) {
                    MaskResult::Unchanged => Ok(Outcome::Keep),
                    MaskResult::Refuse => Err(refused("refused by masker")),
                    MaskResult::Masked { detectors } => {
                        report.note(&col.name, &detectors, false);
                        Ok(Outcome::Replace { jsonb: false })
                    }
                }
            }
            Kind::Int2 | Kind::Int4 | Kind::Int8 | Kind::Numeric | Kind::Opaque => {
                if col.strategy.is_some() {
                    return self.unmaskable(col, &[], report);
                }
                scratch.text.clear();
                let ok = match (col.kind, value.len()) {
                    (Kind::Int2, 2) => {
                        write!(scratch.text, "{}", i16::from_be_bytes([value[0], value[1]])).is_ok()
                    }
                    (Kind::Int4, 4) => write!(
                        scratch.text,
                        "{}",
                        i32::from_be_bytes([value[0], value[1], value[2], value[3]])
                    )
                    .is_ok(),
                    (Kind::Int8, 8) => {
                        let mut a = [0u8; 8];
                        a.copy_from_slice(value);
                        write!(scratch.text, "{}", i64::from_be_bytes(a)).is_ok()
                    }
                    (Kind::Numeric, _) => numeric_to_text(value, &mut scratch.text),
                    (Kind::Opaque, _) => return Ok(Outcome::Keep),
                    _ => false,
                };
                if !ok {
                    return Err(refused("malformed binary value"));
                }
                scratch.out.clear();
                match masker.mask_text(&scratch.text, None, &mut scratch.out) {
                    MaskResult::Unchanged => Ok(Outcome::Keep),
                    MaskResult::Refuse => Err(refused("refused by masker")),
                    MaskResult::Masked { detectors } => self.unmaskable(col, &detectors, report),
                }
            }
        }
    }

    /// A JSON value (text format, binary `json` or `jsonb`): what a strategy
    /// writes is kept only if it is JSON (fields masked inside), otherwise it
    /// becomes a JSON string, so the client still reads JSON.
    fn mask_json<M>(
        masker: &M,
        col: &Col<S>,
        value: &[u8],
        scratch: &mut Scratch,
        report: &mut MaskReport,
    ) -> Result<Outcome, MaskError>
    where
        M: RowMasker<Strategy = S>,
    {
        let refused = |reason| MaskError::Refused {
            column: col.name.clone(),
            reason,
        };
        let text = if col.kind == Kind::Jsonb {
            match value.split_first() {
                Some((1, rest)) => rest,
                _ => return Err(refused("unknown jsonb version")),
            }
        } else {
            value
        };
        let text = std::str::from_utf8(text).map_err(|_| refused("not UTF-8"))?;
        let jsonb = col.kind == Kind::Jsonb;
        scratch.out.clear();
        let detectors = match col.fixed {
            Some(fixed) => {
                scratch.out.push_str(fixed);
                Vec::new()
            }
            None => match masker.mask_text(text, col.strategy, &mut scratch.out) {
                MaskResult::Unchanged => return Ok(Outcome::Keep),
                MaskResult::Refuse => return Err(refused("refused by masker")),
                MaskResult::Masked { detectors } => detectors,
            },
        };
        // What a strategy writes is not JSON unless it kept the
        // structure (fields masked inside): then as a JSON string.
        if serde_json::from_str::<serde::de::IgnoredAny>(&scratch.out).is_err() {
            let quoted = serde_json::Value::String(std::mem::take(&mut scratch.out));
            scratch.out = quoted.to_string();
        }
        report.note(&col.name, &detectors, false);
        Ok(Outcome::Replace { jsonb })
    }

    fn unmaskable(
        &self,
        col: &Col<S>,
        detectors: &[&'static str],
        report: &mut MaskReport,
    ) -> Result<Outcome, MaskError> {
        match self.unmaskable {
            Unmaskable::Null => {
                report.note(&col.name, detectors, true);
                Ok(Outcome::Null)
            }
            Unmaskable::RefuseRow => Err(MaskError::Refused {
                column: col.name.clone(),
                reason: "binary type cannot carry a masked value",
            }),
        }
    }
}

/// Render a binary `numeric` as decimal text. False if malformed.
fn numeric_to_text(v: &[u8], out: &mut String) -> bool {
    if v.len() < 8 || !(v.len() - 8).is_multiple_of(2) {
        return false;
    }
    let ndigits = i16::from_be_bytes([v[0], v[1]]);
    let weight = i32::from(i16::from_be_bytes([v[2], v[3]]));
    let sign = u16::from_be_bytes([v[4], v[5]]);
    let dscale = usize::from(u16::from_be_bytes([v[6], v[7]]) & 0x3fff);
    if ndigits < 0 || v.len() != 8 + 2 * ndigits as usize {
        return false;
    }
    let digits: Vec<i16> = v[8..]
        .chunks_exact(2)
        .map(|c| i16::from_be_bytes([c[0], c[1]]))
        .collect();
    if digits.iter().any(|d| !(0..10_000).contains(d)) {
        return false;
    }
    match sign {
        0x0000 => {}
        0x4000 => out.push('-'),
        0xC000 => {
            out.push_str("NaN");
            return true;
        }
        0xD000 => {
            out.push_str("Infinity");
            return true;
        }
        0xF000 => {
            out.push_str("-Infinity");
            return true;
        }
        _ => return false,
    }
    let digit = |i: i32| -> i16 {
        usize::try_from(i)
            .ok()
            .and_then(|i| digits.get(i).copied())
            .unwrap_or(0)
    };
    if weight < 0 {
        out.push('0');
    } else {
        // Weight is bounded by i16, so this loop is at most 32768 groups.
        for i in 0..=weight {
            let d = digit(i);
            let _ = if i == 0 {
                write!(out, "{d}")
            } else {
                write!(out, "{d:04}")
            };
        }
    }
    if dscale > 0 {
        out.push('.');
        let start = out.len();
        let mut i = weight + 1;
        while out.len() - start < dscale {
            let _ = write!(out, "{:04}", digit(i));
            i += 1;
        }
        out.truncate(start + dscale);
    }
    true
}

// ---------------------------------------------------------------------------
// COPY TO STDOUT

/// How the COPY statement asked for its data (the wire does not say text vs CSV).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyKind {
    Text,
    Csv,
    Binary,
}

/// Per-column decisions for a `COPY ... TO STDOUT`.
#[derive(Debug, Clone)]
pub struct CopyPlan<S> {
    cols: Vec<Col<S>>,
    /// Columns unknown: detectors apply to every field, no rules.
    detect_all: bool,
    active: bool,
}

impl<S: Copy> CopyPlan<S> {
    /// Columns in output order, as the proxy resolved them from the COPY statement
    /// and the catalog: (table name, column name).
    pub fn new<M>(columns: &[(Option<&str>, &str)], masker: &M) -> Self
    where
        M: RowMasker<Strategy = S>,
    {
        let detect = masker.has_detectors();
        let cols: Vec<Col<S>> = columns
            .iter()
            .map(|(t, c)| Col {
                name: (*c).to_owned(),
                strategy: masker.column_strategy(*t, c),
                // COPY rows go through `mask_text` for every rule.
                fixed: None,
                kind: Kind::Text,
                detect,
            })
            .collect();
        let active = cols.iter().any(Col::active);
        Self {
            cols,
            detect_all: false,
            active,
        }
    }

    /// Columns not known (e.g. `COPY (SELECT ...) TO STDOUT`): detectors only.
    /// Column rules cannot apply: the proxy must refuse such a COPY if a rule
    /// could name its source.
    pub fn detectors_only<M>(masker: &M) -> Self
    where
        M: RowMasker<Strategy = S>,
    {
        Self {
            cols: Vec::new(),
            detect_all: masker.has_detectors(),
            active: masker.has_detectors(),
        }
    }

    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Mask one `CopyData` payload. `Ok(None)`: unchanged, send the original.
    pub fn mask_copy_data<M>(
        &self,
        masker: &M,
        kind: CopyKind,
        format: &CopyFormat,
        data: &[u8],
        scratch: &mut Scratch,
        report: &mut MaskReport,
    ) -> Result<Option<Bytes>, MaskError>
    where
        M: RowMasker<Strategy = S>,
    {
        if !self.active {
            return Ok(None);
        }
        if kind == CopyKind::Binary || format.overall != 0 {
            return Err(MaskError::Copy {
                reason: "binary COPY format",
            });
        }
        if kind == CopyKind::Csv {
            return Err(MaskError::Copy {
                reason: "CSV COPY format",
            });
        }
        let Some(line) = data.strip_suffix(b"\n") else {
            return Err(MaskError::Copy {
                reason: "CopyData is not one whole row",
            });
        };
        #[allow(clippy::naive_bytecount)] // rows are short; not worth a crate
        let n_fields = line.iter().filter(|&&b| b == b'\t').count() + 1;
        if !self.detect_all && n_fields != self.cols.len() {
            return Err(MaskError::FieldCount {
                expected: self.cols.len(),
                got: n_fields,
            });
        }
        let detect_col = Col {
            name: String::from("?column?"),
            strategy: None,
            fixed: None,
            kind: Kind::Text,
            detect: true,
        };
        let mut out: Option<BytesMut> = None;
        let mut consumed = 0usize;
        let mut start = 0usize;
        for (i, raw) in line.split(|&b| b == b'\t').enumerate() {
            let field_start = start;
            start += raw.len() + 1;
            let col = if self.detect_all {
                &detect_col
            } else {
                &self.cols[i]
            };
            if raw == b"\\N" || !col.active() {
                continue;
            }
            let text = copy_unescape(raw, &mut scratch.text).ok_or_else(|| MaskError::Refused {
                column: col.name.clone(),
                reason: "bad COPY escape or not UTF-8",
            })?;
            scratch.out.clear();
            match masker.mask_text(text, col.strategy, &mut scratch.out) {
                MaskResult::Unchanged => {}
                MaskResult::Refuse => {
                    return Err(MaskError::Refused {
                        column: col.name.clone(),
                        reason: "refused by masker",
                    });
                }
                MaskResult::Masked { detectors } => {
                    report.note(&col.name, &detectors, false);
                    let o = out.get_or_insert_with(|| BytesMut::with_capacity(data.len() + 16));
                    o.put_slice(&line[consumed..field_start]);
                    copy_escape(&scratch.out, o);
                    consumed = field_start + raw.len();
                }
            }
        }
        Ok(out.map(|mut o| {
            o.put_slice(&line[consumed..]);
            o.put_u8(b'\n');
            o.freeze()
        }))
    }
}

/// Decode a COPY text field into `buf` (or borrow it when it has no escapes).
#[allow(clippy::many_single_char_names)] // i: index, b: byte, e: escape, v: value, n: digits
fn copy_unescape<'a>(raw: &'a [u8], buf: &'a mut String) -> Option<&'a str> {
    if !raw.contains(&b'\\') {
        return std::str::from_utf8(raw).ok();
    }
    let mut bytes = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        i += 1;
        if b != b'\\' {
            bytes.push(b);
            continue;
        }
        let e = *raw.get(i)?;
        i += 1;
        match e {
            b'b' => bytes.push(8),
            b'f' => bytes.push(12),
            b'n' => bytes.push(b'\n'),
            b'r' => bytes.push(b'\r'),
            b't' => bytes.push(b'\t'),
            b'v' => bytes.push(11),
            b'0'..=b'7' => {
                let mut v = u32::from(e - b'0');
                for _ in 0..2 {
                    match raw.get(i) {
                        Some(d @ b'0'..=b'7') => {
                            v = v * 8 + u32::from(d - b'0');
                            i += 1;
                        }
                        _ => break,
                    }
                }
                bytes.push((v & 0xff) as u8);
            }
            b'x' => {
                let mut v = 0u8;
                let mut n = 0;
                while n < 2 {
                    match raw.get(i).and_then(|d| char::from(*d).to_digit(16)) {
                        Some(d) => {
                            v = v * 16 + d as u8;
                            i += 1;
                            n += 1;
                        }
                        None => break,
                    }
                }
                if n == 0 {
                    bytes.push(b'x');
                } else {
                    bytes.push(v);
                }
            }
            other => bytes.push(other),
        }
    }
    *buf = String::from_utf8(bytes).ok()?;
    Some(buf.as_str())
}

/// Encode text as a COPY text field.
fn copy_escape(s: &str, out: &mut BytesMut) {
    for b in s.bytes() {
        match b {
            b'\\' => out.put_slice(b"\\\\"),
            b'\t' => out.put_slice(b"\\t"),
            b'\n' => out.put_slice(b"\\n"),
            b'\r' => out.put_slice(b"\\r"),
            8 => out.put_slice(b"\\b"),
            12 => out.put_slice(b"\\f"),
            11 => out.put_slice(b"\\v"),
            _ => out.put_u8(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::numeric_to_text;

    fn numeric(ndigits: i16, weight: i16, sign: u16, dscale: u16, digits: &[i16]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&ndigits.to_be_bytes());
        v.extend_from_slice(&weight.to_be_bytes());
        v.extend_from_slice(&sign.to_be_bytes());
        v.extend_from_slice(&dscale.to_be_bytes());
        for d in digits {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v
    }

    fn text(v: &[u8]) -> Option<String> {
        let mut s = String::new();
        numeric_to_text(v, &mut s).then_some(s)
    }

    #[test]
    fn binary_numeric_renders_as_postgres_prints_it() {
        assert_eq!(
            text(&numeric(2, 0, 0, 2, &[1200, 5000])).as_deref(),
            Some("1200.50")
        );
        assert_eq!(
            text(&numeric(2, 0, 0x4000, 2, &[3, 2500])).as_deref(),
            Some("-3.25")
        );
        assert_eq!(text(&numeric(0, 0, 0, 2, &[])).as_deref(), Some("0.00"));
        assert_eq!(
            text(&numeric(2, -1, 0, 7, &[1, 2340])).as_deref(),
            Some("0.0001234")
        );
        assert_eq!(
            text(&numeric(1, 2, 0, 0, &[12])).as_deref(),
            Some("1200000000")
        );
        assert_eq!(text(&numeric(0, 0, 0xC000, 0, &[])).as_deref(), Some("NaN"));
        assert_eq!(
            text(&numeric(1, 0, 0, 0, &[10_000])),
            None,
            "digit out of range"
        );
        assert_eq!(
            text(&numeric(2, 0, 0, 0, &[1])),
            None,
            "digit count mismatch"
        );
        assert_eq!(text(&numeric(0, 0, 0x1234, 0, &[])), None, "bad sign");
        assert_eq!(text(&[0, 0, 0]), None, "short header");
    }
}
