//! The per-identity budget of equality probes on protected columns.
//!
//! `predicates = "equality"` lets a statement look rows up by a value the
//! agent already has (`WHERE ssn = '...'`). Each such test answers "is it
//! this value", so many of them enumerate the column. The masking check
//! bounds one statement ([`super::EqualityLimits::max_values`]); this store
//! bounds them over time: per identity, resource and column rule, the
//! distinct values compared within the rule's window. A statement whose new
//! values would pass the budget is refused (the handler records the refusal,
//! naming the enumeration oracle and the column) and an alert goes to the
//! webhooks, once per window and key.
//!
//! Values are kept as keyed hashes, never as text. A value bound as a
//! parameter counts once per execution when its bytes are not known. Fails
//! closed: the store holds at most [`MAX_KEYS`] keys; when it is full of
//! live ones, statements with new keys are refused.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::lineage::{EqualityUse, Refusal};
use crate::sql::lineage::{Oracle, Probe};

/// Most (identity, resource, rule) keys held.
pub const MAX_KEYS: usize = 100_000;

const HASH_DOMAIN: &[u8] = b"agentgate.mask.probe.v1\0";

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    identity: String,
    resource: String,
    rule: String,
}

#[derive(Debug, Default)]
struct Seen {
    /// When each value was first compared in the window, oldest first.
    values: VecDeque<(Instant, [u8; 16])>,
    /// The last alert for this key.
    alerted: Option<Instant>,
}

impl Seen {
    fn expire(&mut self, now: Instant, window: Duration) {
        while self
            .values
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) >= window)
        {
            self.values.pop_front();
        }
    }
}

/// Shared by every connection of a daemon.
pub struct ProbeBudget {
    seen: Mutex<HashMap<Key, Seen>>,
    /// A random key for the value hashes (they never leave the process).
    key: [u8; 32],
    /// Unique stand-ins for parameters whose values are not known.
    unknown: std::sync::atomic::AtomicU64,
    alerts: broadcast::Sender<Value>,
}

impl Default for ProbeBudget {
    fn default() -> Self {
        let mut key = [0u8; 32];
        // A fixed key would let nobody learn more (hashes never leave the
        // process); random keeps two daemons' memory unrelated.
        let _ = getrandom::getrandom(&mut key);
        ProbeBudget {
            seen: Mutex::default(),
            key,
            unknown: std::sync::atomic::AtomicU64::new(0),
            alerts: broadcast::channel(256).0,
        }
    }
}

/// The equality tests of one statement text, with the values each compares.
pub struct Probes<'a> {
    pub uses: &'a [EqualityUse],
    /// The values an equality test compares with.
    pub values: &'a dyn Fn(&EqualityUse) -> Vec<Probe>,
    /// The bytes bound to parameter `$n`, when known.
    pub param: &'a dyn Fn(usize) -> Option<Vec<u8>>,
}

impl ProbeBudget {
    /// Alerts (`masking.probe_budget_exceeded`), for the webhooks.
    pub fn subscribe(&self) -> broadcast::Receiver<Value> {
        self.alerts.subscribe()
    }

    /// Counts a statement's equality probes against `identity`'s budget on
    /// `resource`, or refuses it (nothing counted) when a rule's budget
    /// would be passed.
    pub fn charge(
        &self,
        identity: &str,
        resource: &str,
        probes: &Probes<'_>,
    ) -> Result<(), Refusal> {
        self.charge_at(identity, resource, probes, Instant::now())
    }

    pub(crate) fn charge_at(
        &self,
        identity: &str,
        resource: &str,
        probes: &Probes<'_>,
        now: Instant,
    ) -> Result<(), Refusal> {
        if probes.uses.is_empty() {
            return Ok(());
        }
        // The new values per key, before anything is counted.
        let mut wanted: Vec<(Key, &EqualityUse, Vec<[u8; 16]>)> = Vec::new();
        for u in probes.uses {
            let key = Key {
                identity: identity.to_owned(),
                resource: resource.to_owned(),
                rule: u.rule.clone(),
            };
            let hashes: Vec<[u8; 16]> = (probes.values)(u)
                .iter()
                .map(|p| self.hash(p, probes.param))
                .collect();
            match wanted.iter_mut().find(|(k, _, _)| *k == key) {
                Some((_, _, h)) => h.extend(hashes),
                None => wanted.push((key, u, hashes)),
            }
        }
        let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        for (key, u, hashes) in &mut wanted {
            let window = u.limits.window;
            let entry = seen.get_mut(key);
            let known: Vec<[u8; 16]> = entry.map_or_else(Vec::new, |s| {
                s.expire(now, window);
                s.values.iter().map(|(_, h)| *h).collect()
            });
            hashes.sort_unstable();
            hashes.dedup();
            hashes.retain(|h| !known.contains(h));
            if known.len() + hashes.len() > u.limits.budget as usize {
                let s = seen.entry(key.clone()).or_default();
                let alert = s
                    .alerted
                    .is_none_or(|t| now.saturating_duration_since(t) >= window);
                if alert {
                    s.alerted = Some(now);
                    let _ = self.alerts.send(json!({
                        "event": "masking.probe_budget_exceeded",
                        "identity": identity,
                        "resource": resource,
                        "rule": u.rule,
                        "column": u.column,
                        "oracle": Oracle::Enumeration.as_str(),
                        "budget": u.limits.budget,
                        "window_seconds": window.as_secs(),
                        "time": crate::time::now_rfc3339(),
                    }));
                }
                tracing::warn!(
                    identity,
                    resource,
                    rule = %u.rule,
                    column = %u.column,
                    "equality probe budget exceeded; statement refused"
                );
                return Err(Refusal {
                    rule: u.rule.clone(),
                    column: u.column.clone(),
                    oracle: Some(Oracle::Enumeration),
                    reason: format!(
                        "more than {} distinct values compared by equality with a protected column within {} enumerate it (enumeration oracle, across statements; the budget renews as values age out of the window)",
                        u.limits.budget,
                        shown(window)
                    ),
                });
            }
        }
        if seen.len() >= MAX_KEYS {
            seen.retain(|_, s| !s.values.is_empty());
        }
        for (key, _, hashes) in wanted {
            if hashes.is_empty() {
                continue;
            }
            if !seen.contains_key(&key) && seen.len() >= MAX_KEYS {
                return Err(Refusal {
                    rule: key.rule,
                    column: String::new(),
                    oracle: Some(Oracle::Enumeration),
                    reason: "the equality probe budget cannot hold another identity (fails closed)"
                        .into(),
                });
            }
            let s = seen.entry(key).or_default();
            s.values.extend(hashes.into_iter().map(|h| (now, h)));
        }
        Ok(())
    }

    fn hash(&self, p: &Probe, param: &dyn Fn(usize) -> Option<Vec<u8>>) -> [u8; 16] {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(HASH_DOMAIN);
        match p {
            Probe::Literal(s) | Probe::Other(s) => {
                h.update(b"v");
                h.update(s.as_bytes());
            }
            Probe::Param(n) => {
                if let Some(bytes) = param(*n) {
                    h.update(b"v");
                    h.update(&bytes);
                } else {
                    let n = self
                        .unknown
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    h.update(b"u");
                    h.update(&n.to_le_bytes());
                }
            }
        }
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.finalize().as_bytes()[..16]);
        out
    }
}

/// `24h`, `90m`, `45s`.
fn shown(d: Duration) -> String {
    let s = d.as_secs();
    if s > 0 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s > 0 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::EqualityLimits;

    fn use_of(budget: u32, window: Duration) -> EqualityUse {
        EqualityUse {
            statement: 0,
            predicate: 0,
            rule: "masking.column customers.ssn".into(),
            column: "customers.ssn".into(),
            limits: EqualityLimits {
                max_values: 10,
                budget,
                window,
            },
        }
    }

    fn lits(v: &[&str]) -> Vec<Probe> {
        v.iter().map(|s| Probe::Literal((*s).to_owned())).collect()
    }

    #[test]
    fn distinct_values_are_counted_per_identity_and_the_window_renews_them() {
        let b = ProbeBudget::default();
        let mut alerts = b.subscribe();
        let uses = [use_of(3, Duration::from_mins(1))];
        let t0 = Instant::now();
        let charge = |who: &str, v: &[&str], at: Instant| {
            let values = lits(v);
            let probes = Probes {
                uses: &uses,
                values: &|_| values.clone(),
                param: &|_| None,
            };
            b.charge_at(who, "pg", &probes, at)
        };
        assert!(charge("a", &["1", "2"], t0).is_ok());
        // The same values again cost nothing.
        assert!(charge("a", &["1", "2", "1"], t0).is_ok());
        assert!(charge("a", &["3"], t0).is_ok());
        let r = charge("a", &["4"], t0).unwrap_err();
        assert_eq!(r.oracle, Some(Oracle::Enumeration));
        assert_eq!(r.column, "customers.ssn");
        assert!(!r.reason.contains('4'), "no value in the reason");
        let alert = alerts.try_recv().unwrap();
        assert_eq!(alert["identity"], "a");
        assert_eq!(alert["column"], "customers.ssn");
        // One alert per window; still refused; nothing counted.
        assert!(charge("a", &["5"], t0).is_err());
        assert!(alerts.try_recv().is_err());
        assert!(charge("a", &["1"], t0).is_ok());
        // Another identity has its own budget.
        assert!(charge("b", &["4", "5", "6"], t0).is_ok());
        // After the window the budget is whole again.
        let later = t0 + Duration::from_secs(61);
        assert!(charge("a", &["4", "5", "6"], later).is_ok());
        assert!(charge("a", &["7"], later).is_err());
    }

    #[test]
    fn parameters_count_by_their_bytes_or_once_per_execution() {
        let b = ProbeBudget::default();
        let uses = [use_of(2, Duration::from_mins(1))];
        let t0 = Instant::now();
        let values = vec![Probe::Param(1)];
        let known = Probes {
            uses: &uses,
            values: &|_| values.clone(),
            param: &|_| Some(b"123-45-6789".to_vec()),
        };
        for _ in 0..5 {
            assert!(b.charge_at("a", "pg", &known, t0).is_ok());
        }
        let unknown = Probes {
            uses: &uses,
            values: &|_| values.clone(),
            param: &|_| None,
        };
        assert!(b.charge_at("a", "pg", &unknown, t0).is_ok());
        assert!(b.charge_at("a", "pg", &unknown, t0).is_err());
    }
}
