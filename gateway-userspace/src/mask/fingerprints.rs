//! Protected values found by keyed fingerprint: values the policy names
//! (`[masking] protected_values_file`, one a line: account numbers, case
//! ids, a customer's SSN) that no pattern detector would know. Only keyed
//! hashes are kept (a key made at load, never written anywhere); the values
//! themselves are dropped once hashed, so memory, records and logs never
//! hold them. Text is scanned token by token (runs of letters, digits and
//! `@._+-`), each token hashed in lower case and, when it is mostly digits,
//! as its digits alone, so `483-27-9150` and `483279150` are the same value.
//!
//! Trade-off: a value is found when it is one token of the text; a value
//! split by spaces (`483 27 9150`) or inside a longer word is not (the pattern
//! detectors still run). Values shorter than [`MIN_VALUE_CHARS`] are refused
//! when the policy loads: they would match ordinary words.

use std::{collections::HashSet, ops::Range};

/// The name records give a fingerprint hit.
pub const DETECTOR: &str = "protected_value";
/// Shortest value accepted.
pub const MIN_VALUE_CHARS: usize = 6;
/// Most values in one file.
pub const MAX_VALUES: usize = 1_000_000;
/// Largest file read.
pub const MAX_FILE_BYTES: u64 = 64 * 1024 * 1024;
/// Longest token hashed (longer runs are not values someone listed).
const MAX_TOKEN_BYTES: usize = 256;

/// The keyed fingerprints of a policy's protected values.
pub struct ProtectedValues {
    key: [u8; 32],
    set: HashSet<u64>,
    count: usize,
}

impl std::fmt::Debug for ProtectedValues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ProtectedValues({} values)", self.count)
    }
}

fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'@' | b'.' | b'_' | b'+' | b'-')
}

fn is_edge_punct(b: u8) -> bool {
    matches!(b, b'.' | b'_' | b'+' | b'-' | b'@')
}

/// The digits of `s` when it is digits and separators with at least six digits.
fn digits(s: &str) -> Option<String> {
    let d: String = s.chars().filter(char::is_ascii_digit).collect();
    (d.len() >= 6
        && s.bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'.' | b' ')))
    .then_some(d)
}

impl ProtectedValues {
    /// Hashes the values of `text` (one a line; blank lines and `#`
    /// comments skipped). `Err` names the first bad line (never its value).
    pub fn from_lines(text: &str) -> Result<Self, String> {
        let mut key = [0u8; 32];
        getrandom::getrandom(&mut key).map_err(|e| format!("no randomness for the key: {e}"))?;
        let mut p = Self {
            key,
            set: HashSet::new(),
            count: 0,
        };
        for (n, line) in text.lines().enumerate() {
            let v = line.trim();
            if v.is_empty() || v.starts_with('#') {
                continue;
            }
            if v.chars().count() < MIN_VALUE_CHARS {
                return Err(format!(
                    "line {}: a protected value must have at least {MIN_VALUE_CHARS} characters",
                    n + 1
                ));
            }
            if !v.bytes().all(is_token_byte) {
                return Err(format!(
                    "line {}: a protected value is one token (letters, digits and @._+-; no spaces)",
                    n + 1
                ));
            }
            p.count += 1;
            if p.count > MAX_VALUES {
                return Err(format!("more than {MAX_VALUES} values"));
            }
            let lower = v.to_ascii_lowercase();
            p.set.insert(p.hash(&lower));
            if let Some(d) = digits(v) {
                p.set.insert(p.hash(&d));
            }
        }
        Ok(p)
    }

    /// How many values were loaded.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn hash(&self, s: &str) -> u64 {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(b"agentgate.mask.protected.v1\0");
        h.update(s.as_bytes());
        let mut out = [0u8; 8];
        out.copy_from_slice(&h.finalize().as_bytes()[..8]);
        u64::from_le_bytes(out)
    }

    fn holds(&self, token: &str) -> bool {
        if token.len() < MIN_VALUE_CHARS || token.len() > MAX_TOKEN_BYTES {
            return false;
        }
        if self.set.contains(&self.hash(&token.to_ascii_lowercase())) {
            return true;
        }
        digits(token).is_some_and(|d| self.set.contains(&self.hash(&d)))
    }

    /// Where protected values occur in `text`, in order, non-overlapping.
    pub fn find(&self, text: &str) -> Vec<Range<usize>> {
        let b = text.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < b.len() {
            if !is_token_byte(b[i]) {
                i += 1;
                continue;
            }
            let start = i;
            while i < b.len() && is_token_byte(b[i]) {
                i += 1;
            }
            // Sentence punctuation around a value is not part of it.
            let (mut s, mut e) = (start, i);
            while s < e && is_edge_punct(b[s]) {
                s += 1;
            }
            while e > s && is_edge_punct(b[e - 1]) {
                e -= 1;
            }
            if e > s && self.holds(&text[s..e]) {
                out.push(s..e);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_found_as_tokens_in_either_form() {
        let p =
            ProtectedValues::from_lines("# accounts\nACCT-99417-BRAVO\n483-27-9150\n\n").unwrap();
        assert_eq!(p.len(), 2);
        let text = "see acct-99417-bravo, and ssn 483279150. Not ACCT-99417-BRAVOX or 1483-27-9150";
        let found: Vec<&str> = p.find(text).into_iter().map(|r| &text[r]).collect();
        assert_eq!(found, ["acct-99417-bravo", "483279150"]);
        assert!(
            p.find("483 27 9150 is split").is_empty(),
            "documented: one token only"
        );
        assert!(
            !format!("{p:?}").contains("BRAVO"),
            "Debug never shows values"
        );
    }

    #[test]
    fn short_or_spaced_values_are_refused_by_line() {
        let e = ProtectedValues::from_lines("ok-value-1\nabc\n").unwrap_err();
        assert!(e.starts_with("line 2:") && !e.contains("abc"), "{e}");
        assert!(ProtectedValues::from_lines("two words here\n").is_err());
    }
}
