//! JSON field rules: a field named by a JSON path (`$.customers[*].ssn`,
//! `$..ssn`) is masked whole with the rule's strategy, whatever it holds;
//! every other string value still goes through the value detectors. The
//! HTTP handler applies this to JSON bodies (and event-stream `data:` lines);
//! policy conditions on request bodies select fields with the same paths.
//!
//! The path language is a small, explicit subset of RFC 9535: `$`, `.name`,
//! `['name']`, `[n]`, `[*]`, `.*` and the descendant forms `..name`, `..*`,
//! `..[n]`. Filters, slices and unions are refused when the policy loads (a
//! rule the masker cannot apply exactly must not load and mask less).
//!
//! Fails closed: a matched field that is an object or array is redacted
//! whole (a partial strategy over nested text would reveal its parts);
//! numbers and booleans are masked as their text and become strings.
//! Bounded: a path has at most [`MAX_SEGMENTS`] segments and
//! [`MAX_DESCENDANTS`] descendant segments, so matching stays cheap.

use std::fmt::Write as _;

use serde_json::Value;

use super::{MaskPolicy, Strategy};

/// Most segments in one path.
pub const MAX_SEGMENTS: usize = 32;
/// Most descendant (`..`) segments in one path.
pub const MAX_DESCENDANTS: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Selector {
    Key(String),
    Index(usize),
    Any,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Segment {
    selector: Selector,
    /// `..`: at any depth below the previous segment.
    descendant: bool,
}

/// One step of a concrete location in a document.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

impl Selector {
    fn matches(&self, step: Step<'_>) -> bool {
        match (self, step) {
            (Selector::Any, _) => true,
            (Selector::Key(k), Step::Key(s)) => k == s,
            (Selector::Index(i), Step::Index(s)) => *i == s,
            _ => false,
        }
    }
}

/// A parsed JSON path (the subset in the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPath {
    segments: Vec<Segment>,
    /// As written, for records and refusals.
    spec: String,
}

/// A path that is not in the supported subset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("JSON path `{path}`: {reason}")]
pub struct PathError {
    pub path: String,
    pub reason: String,
}

impl JsonPath {
    /// Parses `spec`, e.g. `$.customers[*].ssn`, `$..ssn`, `$['a b'][0]`.
    pub fn parse(spec: &str) -> Result<Self, PathError> {
        let err = |reason: &str| PathError {
            path: spec.to_owned(),
            reason: reason.to_owned(),
        };
        let rest = spec
            .strip_prefix('$')
            .ok_or_else(|| err("must start with `$`"))?;
        let b = rest.as_bytes();
        let mut i = 0;
        let mut segments = Vec::new();
        while i < b.len() {
            let mut descendant = false;
            match b[i] {
                b'.' if b.get(i + 1) == Some(&b'.') => {
                    descendant = true;
                    i += 2;
                    if b.get(i) != Some(&b'[') {
                        let (sel, n) = name(&rest[i..]).map_err(&err)?;
                        segments.push(Segment {
                            selector: sel,
                            descendant,
                        });
                        i += n;
                        continue;
                    }
                }
                b'.' => {
                    i += 1;
                    let (sel, n) = name(&rest[i..]).map_err(&err)?;
                    segments.push(Segment {
                        selector: sel,
                        descendant,
                    });
                    i += n;
                    continue;
                }
                b'[' => {}
                _ => return Err(err("expected `.`, `..` or `[`")),
            }
            // A bracket: `[*]`, `[n]`, `['name']`, `["name"]`.
            let (sel, n) = bracket(&rest[i..]).map_err(&err)?;
            segments.push(Segment {
                selector: sel,
                descendant,
            });
            i += n;
        }
        if segments.is_empty() {
            return Err(err("names no field (`$` alone is the whole document)"));
        }
        if segments.len() > MAX_SEGMENTS {
            return Err(err(&format!("more than {MAX_SEGMENTS} segments")));
        }
        if segments.iter().filter(|s| s.descendant).count() > MAX_DESCENDANTS {
            return Err(err(&format!(
                "more than {MAX_DESCENDANTS} descendant (`..`) segments"
            )));
        }
        Ok(Self {
            segments,
            spec: spec.to_owned(),
        })
    }

    /// The path as written.
    pub fn as_str(&self) -> &str {
        &self.spec
    }

    /// Whether the path names the location `steps` (from the root).
    pub fn matches(&self, steps: &[Step<'_>]) -> bool {
        matches(&self.segments, steps)
    }

    /// Whether some location below `steps` could still match (so a walk
    /// need not go deeper when none can).
    fn may_match_below(&self, steps: &[Step<'_>]) -> bool {
        prefix_may_match(&self.segments, steps)
    }

    /// The values this path names in `doc` (at most `limit` of them).
    pub fn select<'v>(&self, doc: &'v Value, limit: usize) -> Vec<&'v Value> {
        let mut out = Vec::new();
        let mut steps = Vec::new();
        select(self, doc, &mut steps, &mut out, limit);
        out
    }
}

fn select<'v>(
    path: &JsonPath,
    v: &'v Value,
    steps: &mut Vec<Step<'v>>,
    out: &mut Vec<&'v Value>,
    limit: usize,
) {
    if out.len() >= limit {
        return;
    }
    if !steps.is_empty() && path.matches(steps) {
        out.push(v);
    }
    if !path.may_match_below(steps) {
        return;
    }
    match v {
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                steps.push(Step::Index(i));
                select(path, item, steps, out, limit);
                steps.pop();
            }
        }
        Value::Object(map) => {
            for (k, item) in map {
                steps.push(Step::Key(k));
                select(path, item, steps, out, limit);
                steps.pop();
            }
        }
        _ => {}
    }
}

fn name(s: &str) -> Result<(Selector, usize), &'static str> {
    if s.starts_with('*') {
        return Ok((Selector::Any, 1));
    }
    let n = s.find(['.', '[']).unwrap_or(s.len());
    let k = &s[..n];
    if k.is_empty() {
        return Err("a `.` must be followed by a name or `*`");
    }
    if k.contains([']', '\'', '"', ' ', '*', '?', '(', ')', ',', ':']) {
        return Err(
            "a name after `.` may not hold brackets, quotes, spaces or filter syntax (use ['name'])",
        );
    }
    Ok((Selector::Key(k.to_owned()), n))
}

fn bracket(s: &str) -> Result<(Selector, usize), &'static str> {
    let inner_end = |from: usize| s[from..].find(']').map(|e| from + e);
    let b = s.as_bytes();
    match b.get(1) {
        Some(b'*') if b.get(2) == Some(&b']') => Ok((Selector::Any, 3)),
        Some(q @ (b'\'' | b'"')) => {
            // A quoted name; `\` escapes the next character.
            let mut key = String::new();
            let mut chars = s[2..].char_indices();
            while let Some((j, c)) = chars.next() {
                if c == '\\' {
                    let (_, e) = chars.next().ok_or("unterminated quoted name")?;
                    key.push(e);
                } else if c as u32 == u32::from(*q) {
                    let close = 2 + j + 1;
                    if b.get(close) != Some(&b']') {
                        return Err("a quoted name must be followed by `]`");
                    }
                    return Ok((Selector::Key(key), close + 1));
                } else {
                    key.push(c);
                }
            }
            Err("unterminated quoted name")
        }
        Some(_) => {
            let end = inner_end(1).ok_or("unterminated `[`")?;
            let inner = &s[1..end];
            let n: usize = inner.parse().map_err(|_| {
                "only `[*]`, `[n]` and `['name']` are supported (no filters, slices, unions or negative indexes)"
            })?;
            Ok((Selector::Index(n), end + 1))
        }
        None => Err("unterminated `[`"),
    }
}

fn matches(pat: &[Segment], steps: &[Step<'_>]) -> bool {
    let Some((first, rest)) = pat.split_first() else {
        return steps.is_empty();
    };
    if first.descendant {
        (0..steps.len()).any(|i| first.selector.matches(steps[i]) && matches(rest, &steps[i + 1..]))
    } else {
        !steps.is_empty() && first.selector.matches(steps[0]) && matches(rest, &steps[1..])
    }
}

/// Whether `steps` can be extended to a location `pat` names.
fn prefix_may_match(pat: &[Segment], steps: &[Step<'_>]) -> bool {
    let Some((first, rest)) = pat.split_first() else {
        return false;
    };
    if first.descendant {
        // The descendant can still be found below.
        return true;
    }
    match steps.split_first() {
        None => true,
        Some((s, more)) => first.selector.matches(*s) && prefix_may_match(rest, more),
    }
}

/// A field rule: the fields `path` names are masked with `strategy`.
#[derive(Debug, Clone)]
pub struct JsonFieldRule {
    pub path: JsonPath,
    pub strategy: Strategy,
}

/// One masked field: the rule (its path as written) or the detector that
/// masked it, and the concrete location (`$.customers[1].ssn`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonHit {
    Rule { rule: String, at: String },
    Detector { detector: &'static str, at: String },
}

/// Masks `doc` in place: the fields the policy's JSON rules name, with the
/// strongest matching rule's strategy; then every other string value by the
/// detectors. Each change is appended to `hits` (locations, never values).
pub fn mask_document(policy: &MaskPolicy, doc: &mut Value, hits: &mut Vec<JsonHit>) {
    walk(policy, doc, &mut Vec::new(), hits);
}

/// A step of the walk's current location (owned: the walk mutates values).
#[derive(Debug, Clone)]
enum Owned {
    Key(String),
    Index(usize),
}

impl Owned {
    fn step(&self) -> Step<'_> {
        match self {
            Owned::Key(k) => Step::Key(k),
            Owned::Index(i) => Step::Index(*i),
        }
    }
}

/// `$.a.b` for plain keys, `$['a b']` otherwise, `[n]` for indexes.
fn render(at: &[Owned]) -> String {
    let mut out = "$".to_owned();
    for s in at {
        match s {
            Owned::Index(i) => {
                let _ = write!(out, "[{i}]");
            }
            Owned::Key(k) => push_key(&mut out, k),
        }
    }
    out
}

/// Appends `.k` (plain keys) or `['k']` to a rendered path.
pub fn push_key(path: &mut String, k: &str) {
    if !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        path.push('.');
        path.push_str(k);
    } else {
        path.push_str("['");
        path.push_str(&k.replace('\\', "\\\\").replace('\'', "\\'"));
        path.push_str("']");
    }
}

fn walk(policy: &MaskPolicy, v: &mut Value, at: &mut Vec<Owned>, hits: &mut Vec<JsonHit>) {
    let rules = policy.json_fields();
    if !at.is_empty() && !rules.is_empty() {
        let steps: Vec<Step<'_>> = at.iter().map(Owned::step).collect();
        if let Some(rule) = rules
            .iter()
            .filter(|r| r.path.matches(&steps))
            .max_by_key(|r| r.strategy.strength())
        {
            if mask_field(policy, v, rule.strategy) {
                hits.push(JsonHit::Rule {
                    rule: rule.path.as_str().to_owned(),
                    at: render(at),
                });
            }
            return;
        }
    }
    match v {
        Value::String(s) => {
            let out = policy.mask_value(s, None);
            if out.changed {
                let rendered = render(at);
                for d in &out.detectors_hit {
                    hits.push(JsonHit::Detector {
                        detector: d,
                        at: rendered.clone(),
                    });
                }
                *s = out.text.into_owned();
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                at.push(Owned::Index(i));
                walk(policy, item, at, hits);
                at.pop();
            }
        }
        Value::Object(map) => {
            for (k, item) in map.iter_mut() {
                at.push(Owned::Key(k.clone()));
                walk(policy, item, at, hits);
                at.pop();
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// Masks one named field whole. `false`: nothing to mask (`null`).
fn mask_field(policy: &MaskPolicy, v: &mut Value, strategy: Strategy) -> bool {
    let text = match v {
        Value::Null => return false,
        Value::String(s) => std::mem::take(s),
        Value::Bool(_) | Value::Number(_) => v.to_string(),
        Value::Array(_) | Value::Object(_) => {
            *v = Value::String(super::strategy::REDACTED.to_owned());
            return true;
        }
    };
    let out = policy.mask_value(&text, Some(strategy));
    *v = Value::String(out.text.into_owned());
    true
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::mask::DetectorSet;

    fn policy(paths: &[(&str, Strategy)]) -> MaskPolicy {
        MaskPolicy::new(Vec::new(), DetectorSet::ALL, Strategy::Redact).with_json_fields(
            paths
                .iter()
                .map(|(p, s)| JsonFieldRule {
                    path: JsonPath::parse(p).unwrap(),
                    strategy: *s,
                })
                .collect(),
        )
    }

    #[test]
    fn paths_parse_and_refuse_what_is_not_supported() {
        for ok in [
            "$.a",
            "$.customers[*].ssn",
            "$..ssn",
            "$..*",
            "$['a b'][0]",
            "$[\"x\"].y",
            "$.a.*",
            "$..[0]",
        ] {
            JsonPath::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "a.b",
            "$",
            "$.",
            "$[?(@.x)]",
            "$[0:2]",
            "$[-1]",
            "$['a'",
            "$.a b",
            "$[1,2]",
            "$..a..b..c..d..e",
        ] {
            assert!(JsonPath::parse(bad).is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn matching_follows_the_path_and_descendants() {
        let p = JsonPath::parse("$.customers[*].ssn").unwrap();
        assert!(p.matches(&[Step::Key("customers"), Step::Index(3), Step::Key("ssn")]));
        // `[*]` is every child, of an object too (RFC 9535); `[0]` only indexes.
        assert!(p.matches(&[Step::Key("customers"), Step::Key("x"), Step::Key("ssn")]));
        let first = JsonPath::parse("$.customers[0].ssn").unwrap();
        assert!(!first.matches(&[Step::Key("customers"), Step::Key("0"), Step::Key("ssn")]));
        assert!(!p.matches(&[Step::Key("customers"), Step::Index(3)]));
        let d = JsonPath::parse("$..ssn").unwrap();
        assert!(d.matches(&[Step::Key("ssn")]));
        assert!(d.matches(&[Step::Key("a"), Step::Index(0), Step::Key("ssn")]));
        assert!(!d.matches(&[Step::Key("ssn"), Step::Key("x")]));
        let q = JsonPath::parse("$['a.b']").unwrap();
        assert!(q.matches(&[Step::Key("a.b")]));
    }

    #[test]
    fn rule_fields_are_masked_whole_and_detectors_run_elsewhere() {
        let p = policy(&[
            ("$.customers[*].ssn", Strategy::KeepLast4),
            ("$..secret", Strategy::Redact),
        ]);
        let mut doc = json!({
            "customers": [
                {"name": "Ann", "ssn": "483279150", "note": "mail ann@example.com"},
                {"name": "Bob", "ssn": 123_456_789, "profile": {"secret": {"pin": "1234"}}},
                {"name": "Cy", "ssn": null}
            ],
            "ssn": "555-44-3333"
        });
        let mut hits = Vec::new();
        mask_document(&p, &mut doc, &mut hits);
        let text = doc.to_string();
        for raw in [
            "483279150",
            "123456789",
            "ann@example.com",
            "1234",
            "555-44-3333",
        ] {
            assert!(!text.contains(raw), "{raw} leaked: {text}");
        }
        assert_eq!(doc["customers"][0]["ssn"], "*****9150");
        assert_eq!(doc["customers"][1]["ssn"], "*****6789");
        assert_eq!(doc["customers"][1]["profile"]["secret"], "[REDACTED]");
        assert_eq!(doc["customers"][2]["ssn"], Value::Null);
        assert_eq!(doc["customers"][0]["name"], "Ann");
        let rules: Vec<_> = hits
            .iter()
            .filter_map(|h| match h {
                JsonHit::Rule { rule, at } => Some((rule.as_str(), at.as_str())),
                JsonHit::Detector { .. } => None,
            })
            .collect();
        assert_eq!(
            rules,
            [
                ("$.customers[*].ssn", "$.customers[0].ssn"),
                ("$..secret", "$.customers[1].profile.secret"),
                ("$.customers[*].ssn", "$.customers[1].ssn"),
            ]
        );
        // The top-level ssn is no rule's: the detector masked it.
        assert!(hits.contains(&JsonHit::Detector {
            detector: "us_ssn",
            at: "$.ssn".into()
        }));
        assert!(!format!("{hits:?}").contains("9150"));
    }

    #[test]
    fn the_strongest_matching_rule_wins() {
        let p = policy(&[
            ("$..ssn", Strategy::KeepLast4),
            ("$.a.ssn", Strategy::Redact),
        ]);
        let mut doc = json!({"a": {"ssn": "483279150"}, "b": {"ssn": "483279150"}});
        mask_document(&p, &mut doc, &mut Vec::new());
        assert_eq!(doc["a"]["ssn"], "[REDACTED]");
        assert_eq!(doc["b"]["ssn"], "*****9150");
    }

    #[test]
    fn select_finds_named_values() {
        let doc = json!({"amount": 12000, "items": [{"force": true}, {"force": false}]});
        let p = JsonPath::parse("$.items[*].force").unwrap();
        assert_eq!(p.select(&doc, 10), [&json!(true), &json!(false)]);
        assert_eq!(
            JsonPath::parse("$..amount").unwrap().select(&doc, 10),
            [&json!(12000)]
        );
        assert!(
            JsonPath::parse("$.nope")
                .unwrap()
                .select(&doc, 10)
                .is_empty()
        );
    }
}
