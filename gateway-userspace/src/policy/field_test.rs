//! Rule conditions on an HTTP request's query parameters (`match.http_query`)
//! and JSON body fields (`match.http_json`): a name or JSON path alone tests
//! presence, `NAME OP LITERAL` compares (`==`, `!=`, `>`, `>=`, `<`, `<=`),
//! e.g. `force == "true"`, `$.amount > 10000`, `$.force == true`.
//!
//! Read in the direction that fails closed, like SQL conditions: a field
//! that appears several times (repeated query parameter, `[*]` path) holds a
//! test when *any* occurrence does for a deny or approval rule, and only
//! when *every* occurrence does for an allow rule. A number written as a
//! string (`"20000"`) compares as the number, so quoting a value does not
//! step around `amount > 10000`. Query names and values are compared
//! percent-decoded. The handler reads the body before deciding only when a
//! rule that could apply has a body test, and refuses a body it cannot read
//! then (see `protocol::http::proxy`).

use serde_json::Value;

use crate::mask::JsonPath;

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
}

/// One test: a field, and an optional comparison with a JSON literal.
#[derive(Debug, Clone)]
pub struct FieldTest<T> {
    pub field: T,
    pub cmp: Option<(Op, Value)>,
    /// As written, for records and `policy explain`.
    pub spec: String,
}

/// A test on a query parameter (by its decoded name).
pub type QueryTest = FieldTest<String>;
/// A test on a JSON body field.
pub type JsonTest = FieldTest<JsonPath>;

/// Most occurrences of one field a test looks at; past it, the test reads
/// the request as failing closed (see [`JsonTest::holds`]).
pub const MAX_OCCURRENCES: usize = 256;

/// Splits `NAME OP LITERAL` at the first operator outside quotes.
/// An operator and the literal it compares with.
type Comparison = Option<(Op, Value)>;

fn split(spec: &str) -> Result<(&str, Comparison), String> {
    let b = spec.as_bytes();
    let mut quote = None;
    for i in 0..b.len() {
        match (quote, b[i]) {
            (Some(q), c) if c == q => quote = None,
            (None, q @ (b'\'' | b'"')) => quote = Some(q),
            (None, b'=' | b'!' | b'>' | b'<') => {
                let two = b.get(i + 1) == Some(&b'=');
                let op = match (b[i], two) {
                    (b'=', true) => Op::Eq,
                    (b'!', true) => Op::Ne,
                    (b'>', true) => Op::Ge,
                    (b'<', true) => Op::Le,
                    (b'>', false) => Op::Gt,
                    (b'<', false) => Op::Lt,
                    _ => return Err("operators are ==, !=, >, >=, <, <=".into()),
                };
                let name = spec[..i].trim();
                let lit = spec[i + if two { 2 } else { 1 }..].trim();
                let value: Value = serde_json::from_str(lit).map_err(|_| {
                    format!("`{lit}` is not a JSON literal (numbers, true, false, null, \"text\")")
                })?;
                if value.is_object() || value.is_array() {
                    return Err("compare with a number, string, boolean or null".into());
                }
                if matches!(op, Op::Gt | Op::Ge | Op::Lt | Op::Le) && !value.is_number() {
                    return Err("`>`, `>=`, `<`, `<=` compare with a number".into());
                }
                return Ok((name, Some((op, value))));
            }
            _ => {}
        }
    }
    Ok((spec.trim(), None))
}

impl QueryTest {
    /// Parses `name` or `name OP literal`.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (name, cmp) = split(spec)?;
        if name.is_empty() || name.contains(['&', '=', ' ']) {
            return Err(format!("`{name}` is not a query parameter name"));
        }
        Ok(Self {
            field: name.to_owned(),
            cmp,
            spec: spec.to_owned(),
        })
    }

    /// Whether the test holds for the raw query string `query`.
    pub fn holds(&self, query: Option<&str>, permissive: bool) -> bool {
        let values: Vec<Value> = url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
            .filter(|(k, _)| *k == self.field)
            .take(MAX_OCCURRENCES + 1)
            .map(|(_, v)| Value::String(v.into_owned()))
            .collect();
        self.holds_for(&values.iter().collect::<Vec<_>>(), permissive)
    }
}

impl JsonTest {
    /// Parses `$.path` or `$.path OP literal`.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let (path, cmp) = split(spec)?;
        let field = JsonPath::parse(path).map_err(|e| e.to_string())?;
        Ok(Self {
            field,
            cmp,
            spec: spec.to_owned(),
        })
    }

    /// Whether the test holds for the body `doc`.
    pub fn holds(&self, doc: &Value, permissive: bool) -> bool {
        let found = self.field.select(doc, MAX_OCCURRENCES + 1);
        self.holds_for(&found, permissive)
    }
}

impl<T> FieldTest<T> {
    fn holds_for(&self, found: &[&Value], permissive: bool) -> bool {
        // Too many occurrences to judge: an allow rule does not hold, a
        // deny or approval rule does.
        if found.len() > MAX_OCCURRENCES {
            return !permissive;
        }
        let present: Vec<&Value> = found.iter().copied().filter(|v| !v.is_null()).collect();
        let Some((op, lit)) = &self.cmp else {
            return !present.is_empty();
        };
        let test = |v: &Value| compare(v, *op, lit);
        if permissive {
            !found.is_empty() && found.iter().all(|v| test(v))
        } else {
            found.iter().any(|v| test(v))
        }
    }
}

/// A number, or a string that reads as one.
fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok().filter(|f| f.is_finite()),
        _ => None,
    }
}

fn compare(v: &Value, op: Op, lit: &Value) -> bool {
    // Exact equality is meant: `== 10000` is that number, not a range.
    #[allow(clippy::float_cmp)]
    let equal = || match (number(v), lit) {
        (Some(a), Value::Number(_)) => number(lit).is_some_and(|b| a == b),
        _ => match (v, lit) {
            // A query value is text: `force == true` matches `force=true`.
            (Value::String(s), Value::Bool(b)) => s == if *b { "true" } else { "false" },
            (Value::String(s), Value::Null) => s == "null",
            _ => v == lit,
        },
    };
    match op {
        Op::Eq => equal(),
        Op::Ne => !equal(),
        Op::Gt | Op::Ge | Op::Lt | Op::Le => {
            let (Some(a), Some(b)) = (number(v), number(lit)) else {
                return false;
            };
            match op {
                Op::Gt => a > b,
                Op::Ge => a >= b,
                Op::Lt => a < b,
                _ => a <= b,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn tests_parse_and_bad_ones_are_refused() {
        assert!(JsonTest::parse("$.amount > 10000").is_ok());
        assert!(JsonTest::parse("$.force == true").is_ok());
        assert!(JsonTest::parse("$['a>b'] == \"x\"").is_ok());
        assert!(JsonTest::parse("$.note").is_ok());
        assert!(QueryTest::parse("force == \"true\"").is_ok());
        assert!(QueryTest::parse("dry_run").is_ok());
        for bad in [
            "amount > 1",
            "$.amount > \"x\"",
            "$.a = 1",
            "$.a == [1]",
            "$.a == nope",
        ] {
            assert!(JsonTest::parse(bad).is_err(), "{bad}");
        }
        assert!(QueryTest::parse("a b").is_err());
    }

    #[test]
    fn json_tests_fail_closed_by_rule_kind() {
        let big = JsonTest::parse("$.amount > 10000").unwrap();
        assert!(big.holds(&json!({"amount": 12000}), false));
        assert!(
            big.holds(&json!({"amount": "12000"}), false),
            "quoted numbers count"
        );
        assert!(!big.holds(&json!({"amount": 9000}), false));
        assert!(!big.holds(&json!({}), false));
        let force = JsonTest::parse("$.force == true").unwrap();
        assert!(force.holds(&json!({"force": true}), false));
        assert!(!force.holds(&json!({"force": "yes"}), false));
        let any = JsonTest::parse("$.items[*].qty > 5").unwrap();
        let doc = json!({"items": [{"qty": 1}, {"qty": 9}]});
        assert!(any.holds(&doc, false), "deny: any occurrence");
        assert!(!any.holds(&doc, true), "allow: every occurrence");
        let small = JsonTest::parse("$.amount <= 100").unwrap();
        assert!(small.holds(&json!({"amount": 100}), true));
        assert!(!small.holds(&json!({}), true), "allow needs the field");
        let present = JsonTest::parse("$..override").unwrap();
        assert!(present.holds(&json!({"a": {"override": 1}}), false));
        assert!(!present.holds(&json!({"override": null}), false));
    }

    #[test]
    fn query_tests_decode_and_fail_closed() {
        let force = QueryTest::parse("force == true").unwrap();
        assert!(force.holds(Some("a=1&force=true"), false));
        assert!(force.holds(Some("a=1&for%63e=tru%65"), false), "decoded");
        assert!(force.holds(Some("force=false&force=true"), false));
        assert!(!force.holds(Some("force=false&force=true"), true));
        assert!(!force.holds(None, false));
        let limit = QueryTest::parse("limit > 1000").unwrap();
        assert!(limit.holds(Some("limit=5000"), false));
        assert!(!limit.holds(Some("limit=50"), false));
        assert!(
            QueryTest::parse("dry_run")
                .unwrap()
                .holds(Some("dry_run"), false)
        );
    }
}
