//! A checker for protected values in output: finds a value of any protected
//! column of any row in any re-encoded form the tests know (case, reversal,
//! digits only, hex, decimal byte codes, base64 at any alignment, md5 and
//! sha256), also when split across the cells of a row or the rows of a column.
//! Its findings name the column and the transform, never the value.

use std::{fmt::Write as _, process::Command};

use crate::pg::PgServer;

/// How output is looked at: as text, as its digits only, as its letters and digits only.
#[derive(Clone, Copy, PartialEq)]
enum View {
    Text,
    Digits,
    Alnum,
}

/// One form of one protected value; `what` names the column and the transform,
/// never the value, so a failure can say what leaked without showing it.
struct Needle {
    what: String,
    text: String,
    view: View,
}

/// Finds any trace of any protected value of any row in an attempt's output.
pub struct Checker {
    needles: Vec<Needle>,
}

impl Checker {
    /// Reads the protected values from the server directly; hashes and base64
    /// (at each byte alignment, standard and URL-safe) come from Python.
    pub fn new(pg: &PgServer) -> Self {
        let rows = pg
            .admin_sql("SELECT ssn, card, email FROM customers ORDER BY id")
            .unwrap();
        Self::of_rows(&rows, '|')
    }

    /// From `ssn`, `card`, `email` rows of 10 customers, cells separated by `sep`.
    pub fn of_rows(rows: &str, sep: char) -> Self {
        let values: Vec<(&str, String)> = rows
            .lines()
            .flat_map(|l| ["ssn", "card", "email"].into_iter().zip(l.split(sep)))
            .map(|(c, v)| (c, v.to_owned()))
            .collect();
        assert_eq!(values.len(), 30);
        let program = r#"
import base64, hashlib, json, sys
out = {}
for v in json.loads(sys.argv[1]):
    b, b64 = v.encode(), []
    for k in range(3):  # k bytes before the value: keep the 4-char groups made of it alone
        e = base64.b64encode(b"\0" * k + b).decode()
        b64 += [e[4 if k else 0:(k + len(b)) // 3 * 4]]
    b64 += [s.replace("+", "-").replace("/", "_") for s in b64]
    out[v] = {"md5": hashlib.md5(b).hexdigest(), "sha256": hashlib.sha256(b).hexdigest(), "base64": b64}
print(json.dumps(out))
"#;
        let all: Vec<&String> = values.iter().map(|(_, v)| v).collect();
        let out = Command::new("python3")
            .args(["-c", program, &serde_json::json!(all).to_string()])
            .output()
            .unwrap();
        let derived: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let mut needles = Vec::new();
        let mut add = |col: &str, how: &str, text: String, view| {
            needles.push(Needle {
                what: format!("{col} ({how})"),
                text: text.to_lowercase(),
                view,
            });
        };
        for (col, v) in &values {
            let rev = |s: &str| s.chars().rev().collect::<String>();
            let digits: String = v.chars().filter(char::is_ascii_digit).collect();
            let hex = v.bytes().fold(String::new(), |mut h, b| {
                let _ = write!(h, "{b:02x}");
                h
            });
            let codes: String = v.bytes().map(|b| b.to_string()).collect();
            add(col, "raw, any case", v.clone(), View::Text);
            add(col, "reversed", rev(v), View::Text);
            add(col, "hex of its bytes", hex, View::Text);
            add(col, "decimal byte codes", codes, View::Digits);
            let d = &derived[v.as_str()];
            add(col, "md5", d["md5"].as_str().unwrap().into(), View::Text);
            add(
                col,
                "sha256",
                d["sha256"].as_str().unwrap().into(),
                View::Text,
            );
            for b in d["base64"].as_array().unwrap() {
                add(col, "base64", b.as_str().unwrap().into(), View::Text);
            }
            if digits.len() >= 8 {
                add(col, "its digits", digits.clone(), View::Digits);
                add(col, "its digits reversed", rev(&digits), View::Digits);
            }
            if let Some((local, _)) = v.split_once('@') {
                add(col, "local part", local.into(), View::Alnum);
                add(col, "local part reversed", rev(local), View::Alnum);
            }
        }
        Self { needles }
    }

    /// The first leak in `rows` (and `extra`, e.g. error text), as "what, where".
    pub fn find_leak(&self, rows: &[Vec<String>], extra: &str) -> Option<String> {
        let only = |s: &str, f: fn(&char) -> bool| s.chars().filter(f).collect::<String>();
        let mut views: Vec<(View, &str, String)> = Vec::new();
        let mut push_all = |place, s: String| {
            views.push((View::Digits, place, only(&s, char::is_ascii_digit)));
            views.push((View::Alnum, place, only(&s, char::is_ascii_alphanumeric)));
            views.push((View::Text, place, s));
        };
        for r in rows {
            push_all("one row's cells joined", r.concat());
        }
        let width = rows.iter().map(Vec::len).max().unwrap_or(0);
        for i in 0..width {
            let col: String = rows
                .iter()
                .filter_map(|r| r.get(i))
                .map(String::as_str)
                .collect();
            push_all("one column across rows", col);
        }
        let cells: Vec<&str> = rows.iter().flatten().map(String::as_str).collect();
        let whole = format!("{}\n{extra}", cells.join("\n"));
        let bare = only(&whole, |c| !c.is_whitespace());
        views.push((View::Text, "output without whitespace", bare));
        views.push((View::Text, "output", whole));
        for (view, place, s) in &views {
            let s = s.to_lowercase();
            for n in self.needles.iter().filter(|n| n.view == *view) {
                if s.contains(&n.text) {
                    return Some(format!("{} in {place}", n.what));
                }
            }
        }
        None
    }
}
