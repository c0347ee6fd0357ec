//! Masking strategies: what a sensitive value is replaced with.

use std::fmt;

use serde::{Deserialize, Serialize};

/// How a masked value is rewritten. Ordered by how much each reveals, least
/// last: when several column rules match, the one revealing least wins
/// (`Redact` > `KeyedHash` > `KeepLast4`, see [`Strategy::strength`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Replace the whole value with `[REDACTED]` (`[REDACTED:<detector>]` for a detector hit).
    Redact,
    /// Replace every letter and digit but the last four with `*`, keeping
    /// punctuation (`***-**-6789`). Values with fewer than eight letters and
    /// digits are masked entirely: keeping four of them would reveal too much.
    KeepLast4,
    /// Replace with `[h:<16 hex>]`, a keyed BLAKE3 hash (64 bits) of the value:
    /// equal values stay equal (joins, counting) without revealing them. The key
    /// comes from the daemon configuration; without one this falls back to `Redact`.
    KeyedHash,
}

impl Strategy {
    /// Higher reveals less.
    pub fn strength(self) -> u8 {
        match self {
            Strategy::KeepLast4 => 0,
            Strategy::KeyedHash => 1,
            Strategy::Redact => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Redact => "redact",
            Strategy::KeepLast4 => "keep_last4",
            Strategy::KeyedHash => "keyed_hash",
        }
    }
}

/// The 32-byte key for [`Strategy::KeyedHash`]. Its `Debug` never prints it.
#[derive(Clone)]
pub struct MaskKey([u8; 32]);

impl MaskKey {
    pub fn new(bytes: [u8; 32]) -> Self {
        MaskKey(bytes)
    }
}

impl fmt::Debug for MaskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MaskKey(..)")
    }
}

const HASH_DOMAIN: &[u8] = b"agentgate.mask.keyed_hash.v1\0";

/// Apply `strategy` to `value`. `label` names the detector for redactions of detector hits.
pub fn apply(
    strategy: Strategy,
    value: &str,
    key: Option<&MaskKey>,
    label: Option<&str>,
) -> String {
    let mut out = String::with_capacity(value.len().max(20));
    apply_into(strategy, value, key, label, &mut out);
    out
}

/// What [`Strategy::Redact`] writes in place of a whole value.
pub const REDACTED: &str = "[REDACTED]";

/// What [`apply_into`] writes for `strategy` without a detector label,
/// whatever the value, when that does not depend on the value.
pub fn fixed_text(strategy: Strategy, key: Option<&MaskKey>) -> Option<&'static str> {
    match (strategy, key) {
        (Strategy::KeepLast4, _) | (Strategy::KeyedHash, Some(_)) => None,
        (Strategy::Redact | Strategy::KeyedHash, _) => Some(REDACTED),
    }
}

/// [`apply`], appending to `out` (no allocation of its own: the row masker
/// calls this for every masked value).
pub fn apply_into(
    strategy: Strategy,
    value: &str,
    key: Option<&MaskKey>,
    label: Option<&str>,
    out: &mut String,
) {
    match (strategy, key) {
        (Strategy::KeepLast4, _) => keep_last4(value, out),
        (Strategy::KeyedHash, Some(key)) => keyed_hash(value, key, out),
        (Strategy::Redact | Strategy::KeyedHash, _) => match label {
            Some(l) => {
                out.push_str("[REDACTED:");
                out.push_str(l);
                out.push(']');
            }
            None => out.push_str(REDACTED),
        },
    }
}

/// Out of line: the hasher's state is about 2 KiB of stack, which every call
/// of [`apply_into`] would otherwise set up.
#[inline(never)]
fn keyed_hash(value: &str, key: &MaskKey, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut h = blake3::Hasher::new_keyed(&key.0);
    h.update(HASH_DOMAIN);
    h.update(value.as_bytes());
    let digest = h.finalize();
    out.push_str("[h:");
    for byte in &digest.as_bytes()[..8] {
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    out.push(']');
}

fn keep_last4(value: &str, out: &mut String) {
    if value.is_ascii() {
        keep_last4_ascii(value, out);
    } else {
        keep_last4_chars(value, out);
    }
}

/// The common case (SSNs, card numbers): find where the kept last four
/// alphanumerics start, star the alphanumerics before it in chunks.
fn keep_last4_ascii(value: &str, out: &mut String) {
    let bytes = value.as_bytes();
    let alnum = bytes.iter().filter(|b| b.is_ascii_alphanumeric()).count();
    let cut = if alnum >= 8 {
        let mut left = 4;
        bytes
            .iter()
            .rposition(|b| {
                left -= usize::from(b.is_ascii_alphanumeric());
                left == 0
            })
            .unwrap_or(0)
    } else {
        bytes.len()
    };
    let mut buf = [0u8; 64];
    for chunk in bytes[..cut].chunks(buf.len()) {
        for (o, &b) in buf.iter_mut().zip(chunk) {
            *o = if b.is_ascii_alphanumeric() { b'*' } else { b };
        }
        out.push_str(std::str::from_utf8(&buf[..chunk.len()]).expect("ASCII in, ASCII out"));
    }
    out.push_str(&value[cut..]);
}

fn keep_last4_chars(value: &str, out: &mut String) {
    let alnum = value.chars().filter(|c| c.is_alphanumeric()).count();
    let keep_from = if alnum >= 8 { alnum - 4 } else { usize::MAX };
    let mut seen = 0;
    out.extend(value.chars().map(|c| {
        if c.is_alphanumeric() {
            seen += 1;
            if seen > keep_from { c } else { '*' }
        } else {
            c
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_last4_keeps_shape() {
        assert_eq!(
            apply(Strategy::KeepLast4, "123-45-6789", None, None),
            "***-**-6789"
        );
        assert_eq!(
            apply(Strategy::KeepLast4, "4111 1111 1111 1111", None, None),
            "**** **** **** 1111"
        );
        assert_eq!(apply(Strategy::KeepLast4, "1234567", None, None), "*******");
    }

    #[test]
    fn keep_last4_ascii_path_agrees_with_the_general_one() {
        for v in [
            "",
            "1",
            "1234567",
            "12345678",
            "-12345678-",
            "4111-1111-1111-1111",
            "ab cd ef gh ij",
            "  9999 8888 7777 6666  ",
            "x1y2z3w4v5",
            &"7".repeat(150),
            &"1-".repeat(80),
        ] {
            let (mut fast, mut general) = (String::new(), String::new());
            keep_last4_ascii(v, &mut fast);
            keep_last4_chars(v, &mut general);
            assert_eq!(fast, general, "{v}");
        }
    }

    #[test]
    fn keep_last4_counts_non_ascii_letters_like_ascii_ones() {
        // The ASCII fast path and the general one agree.
        for v in ["José 1234 5678", "Jose 1234 5678"] {
            assert_eq!(
                apply(Strategy::KeepLast4, v, None, None),
                "**** **** 5678",
                "{v}"
            );
        }
    }

    #[test]
    fn keyed_hash_is_stable_keyed_and_falls_back() {
        let k1 = MaskKey::new([1; 32]);
        let k2 = MaskKey::new([2; 32]);
        let a = apply(Strategy::KeyedHash, "jane@example.com", Some(&k1), None);
        assert_eq!(
            a,
            apply(Strategy::KeyedHash, "jane@example.com", Some(&k1), None)
        );
        assert_ne!(
            a,
            apply(Strategy::KeyedHash, "jane@example.com", Some(&k2), None)
        );
        assert!(a.starts_with("[h:") && a.len() == 20 && !a.contains("jane"));
        assert_eq!(
            apply(Strategy::KeyedHash, "x", None, Some("email")),
            "[REDACTED:email]"
        );
        assert_eq!(format!("{k1:?}"), "MaskKey(..)");
    }

    #[test]
    fn fixed_text_is_what_apply_writes_whenever_the_value_does_not_matter() {
        let key = MaskKey::new([7; 32]);
        for strategy in [Strategy::Redact, Strategy::KeepLast4, Strategy::KeyedHash] {
            for key in [None, Some(&key)] {
                let a = apply(strategy, "123-45-6789", key, None);
                let b = apply(strategy, "jane@example.com", key, None);
                let fixed = (a == b).then_some(a);
                assert_eq!(
                    fixed_text(strategy, key).map(str::to_owned),
                    fixed,
                    "{strategy:?}, key: {}",
                    key.is_some()
                );
            }
        }
    }
}
