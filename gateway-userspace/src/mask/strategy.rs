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

/// [`apply`], appending to `out` (no allocation of its own: the row masker
/// calls this for every masked value).
pub fn apply_into(
    strategy: Strategy,
    value: &str,
    key: Option<&MaskKey>,
    label: Option<&str>,
    out: &mut String,
) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    match (strategy, key) {
        (Strategy::KeepLast4, _) => keep_last4(value, out),
        (Strategy::KeyedHash, Some(key)) => {
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
        (Strategy::Redact | Strategy::KeyedHash, _) => match label {
            Some(l) => {
                out.push_str("[REDACTED:");
                out.push_str(l);
                out.push(']');
            }
            None => out.push_str("[REDACTED]"),
        },
    }
}

fn keep_last4(value: &str, out: &mut String) {
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
}
