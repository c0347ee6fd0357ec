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
//!
//! The daemon keeps the budget in `<state_dir>/probe-budget.redb` ([`ProbeBudget::open`]):
//! a restart does not renew it. Each statement that compares new values is
//! written there (one durable redb commit) before it is admitted; a budget
//! that cannot be written refuses the statement.

use std::{
    collections::{HashMap, VecDeque},
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
    time::{Duration, Instant, SystemTime},
};

use redb::{ReadableDatabase as _, ReadableTable as _, TableDefinition};

use serde_json::{Value, json};
use tokio::sync::broadcast;

use super::lineage::{EqualityUse, Refusal};
use crate::sql::lineage::{Oracle, Probe};

/// Most (identity, resource, rule) keys held.
pub const MAX_KEYS: usize = 100_000;

const HASH_DOMAIN: &[u8] = b"agentgate.mask.probe.v1\0";

/// The hash key (`"key"`, 32 bytes).
const META: TableDefinition<'static, &'static str, &'static [u8]> = TableDefinition::new("meta");
/// Per `[identity, resource, rule]` (JSON): the last alert and each value's
/// first use, as unix milliseconds (u64 LE, 0: never) and 16-byte hashes.
const SEEN: TableDefinition<'static, &'static str, &'static [u8]> = TableDefinition::new("seen");

/// Values older than this are dropped when the store is opened: no rule's
/// window is longer (`policy::load::MAX_EQUALITY_WINDOW`).
const KEEP: Duration = Duration::from_hours(30 * 24);

/// Why the budget's store cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("probe budget store {}: {reason}", path.display())]
pub struct StoreError {
    pub path: PathBuf,
    pub reason: String,
}

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

/// Takes back the values just added (a statement refused after all).
fn undo(seen: &mut HashMap<Key, Seen>, added: &[(Key, usize)]) {
    for (key, n) in added {
        if let Some(s) = seen.get_mut(key) {
            for _ in 0..*n {
                s.values.pop_back();
            }
        }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Key {
    fn stored(&self) -> String {
        serde_json::to_string(&[&self.identity, &self.resource, &self.rule]).unwrap_or_default()
    }

    fn from_stored(s: &str) -> Option<Key> {
        let [identity, resource, rule]: [String; 3] = serde_json::from_str(s).ok()?;
        Some(Key {
            identity,
            resource,
            rule,
        })
    }
}

impl Seen {
    /// `now` (monotonic) is `wall` (unix ms): instants are stored as the
    /// wall-clock time they stand for.
    fn stored(&self, now: Instant, wall: u64) -> Vec<u8> {
        let at = |t: Instant| {
            let ago =
                u64::try_from(now.saturating_duration_since(t).as_millis()).unwrap_or(u64::MAX);
            wall.saturating_sub(ago).max(1)
        };
        let mut out = Vec::with_capacity(8 + self.values.len() * 24);
        out.extend_from_slice(&self.alerted.map_or(0, at).to_le_bytes());
        for (t, h) in &self.values {
            out.extend_from_slice(&at(*t).to_le_bytes());
            out.extend_from_slice(h);
        }
        out
    }

    /// The inverse of [`Seen::stored`]; values older than [`KEEP`] are
    /// dropped, times in the future (a clock set back) count as now.
    fn from_stored(b: &[u8], now: Instant, wall: u64) -> Option<Seen> {
        let (alerted, rest) = b.split_first_chunk::<8>()?;
        if rest.len() % 24 != 0 {
            return None;
        }
        let back = |ms: u64| {
            let ago = Duration::from_millis(wall.saturating_sub(ms));
            (ago < KEEP).then(|| now.checked_sub(ago).unwrap_or(now))
        };
        let alerted = match u64::from_le_bytes(*alerted) {
            0 => None,
            ms => back(ms),
        };
        let mut values = VecDeque::with_capacity(rest.len() / 24);
        for chunk in rest.chunks_exact(24) {
            let (ms, h) = chunk.split_at(8);
            let ms = u64::from_le_bytes(ms.try_into().ok()?);
            if let Some(t) = back(ms) {
                values.push_back((t, h.try_into().ok()?));
            }
        }
        Some(Seen { values, alerted })
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
    /// Where the budget is kept across restarts (`None`: memory only).
    store: Option<(redb::Database, PathBuf)>,
}

impl Default for ProbeBudget {
    /// A budget in memory only, with a random hash key.
    fn default() -> Self {
        let mut key = [0u8; 32];
        // Random keeps two daemons' stores unrelated; the hashes never
        // leave the state directory.
        let _ = getrandom::getrandom(&mut key);
        ProbeBudget {
            seen: Mutex::default(),
            key,
            unknown: std::sync::atomic::AtomicU64::new(0),
            alerts: broadcast::channel(256).0,
            store: None,
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
    /// The budget kept at `path` (created 0600 with a new hash key when
    /// absent): what was counted before a restart still counts. An entry
    /// that does not parse is an error, not a fresh budget.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let err = |e: &dyn std::fmt::Display| StoreError {
            path: path.into(),
            reason: e.to_string(),
        };
        let fresh = !path.exists();
        let db = redb::Database::create(path).map_err(|e| err(&e))?;
        if fresh {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| err(&e))?;
        }
        let mut budget = ProbeBudget::default();
        let tx = db.begin_write().map_err(|e| err(&e))?;
        {
            let mut meta = tx.open_table(META).map_err(|e| err(&e))?;
            let stored = meta
                .get("key")
                .map_err(|e| err(&e))?
                .map(|v| v.value().to_vec());
            match stored {
                Some(k) => {
                    budget.key = k
                        .try_into()
                        .map_err(|_| err(&"the hash key is not 32 bytes"))?;
                }
                None => {
                    meta.insert("key", budget.key.as_slice())
                        .map_err(|e| err(&e))?;
                }
            }
            tx.open_table(SEEN).map_err(|e| err(&e))?;
        }
        tx.commit().map_err(|e| err(&e))?;
        let (now, wall) = (Instant::now(), unix_ms(SystemTime::now()));
        let tx = db.begin_read().map_err(|e| err(&e))?;
        let table = tx.open_table(SEEN).map_err(|e| err(&e))?;
        let mut seen = HashMap::new();
        for entry in table.iter().map_err(|e| err(&e))? {
            let (k, v) = entry.map_err(|e| err(&e))?;
            let key =
                Key::from_stored(k.value()).ok_or_else(|| err(&"an entry's key does not parse"))?;
            let s = Seen::from_stored(v.value(), now, wall)
                .ok_or_else(|| err(&"an entry's values do not parse"))?;
            if !s.values.is_empty() && seen.len() < MAX_KEYS {
                seen.insert(key, s);
            }
        }
        drop(table);
        drop(tx);
        budget.seen = Mutex::new(seen);
        budget.store = Some((db, path.into()));
        Ok(budget)
    }

    /// Writes the entries of `keys` durably (removed when empty).
    fn persist(
        &self,
        seen: &HashMap<Key, Seen>,
        keys: &[&Key],
        now: Instant,
    ) -> Result<(), String> {
        let Some((db, _)) = &self.store else {
            return Ok(());
        };
        let wall = unix_ms(SystemTime::now());
        let tx = db.begin_write().map_err(|e| e.to_string())?;
        {
            let mut t = tx.open_table(SEEN).map_err(|e| e.to_string())?;
            for key in keys {
                let stored = key.stored();
                match seen.get(*key) {
                    Some(s) if !s.values.is_empty() => {
                        let bytes = s.stored(now, wall);
                        t.insert(stored.as_str(), bytes.as_slice())
                            .map_err(|e| e.to_string())?;
                    }
                    _ => {
                        t.remove(stored.as_str()).map_err(|e| e.to_string())?;
                    }
                }
            }
        }
        tx.commit().map_err(|e| e.to_string())
    }

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
                return Err(self.exceeded(&mut seen, key, u, identity, resource, now));
            }
        }
        if seen.len() >= MAX_KEYS {
            seen.retain(|_, s| !s.values.is_empty());
        }
        let mut added: Vec<(Key, usize)> = Vec::new();
        for (key, _, hashes) in wanted {
            if hashes.is_empty() {
                continue;
            }
            if !seen.contains_key(&key) && seen.len() >= MAX_KEYS {
                undo(&mut seen, &added);
                return Err(Refusal {
                    rule: key.rule,
                    column: String::new(),
                    oracle: Some(Oracle::Enumeration),
                    reason: "the equality probe budget cannot hold another identity (fails closed)"
                        .into(),
                });
            }
            let s = seen.entry(key.clone()).or_default();
            s.values.extend(hashes.iter().map(|h| (now, *h)));
            added.push((key, hashes.len()));
        }
        if !added.is_empty() {
            let keys: Vec<&Key> = added.iter().map(|(k, _)| k).collect();
            if let Err(e) = self.persist(&seen, &keys, now) {
                undo(&mut seen, &added);
                let path = self.store.as_ref().map(|(_, p)| p.display().to_string());
                tracing::error!(
                    store = path.as_deref().unwrap_or_default(),
                    error = %e,
                    "the equality probe budget cannot be written; statement refused"
                );
                let u = probes.uses[0].clone();
                return Err(Refusal {
                    rule: u.rule,
                    column: u.column,
                    oracle: Some(Oracle::Enumeration),
                    reason: "the equality probe budget cannot be written (fails closed)".into(),
                });
            }
        }
        Ok(())
    }

    /// The refusal for a statement that would pass `u`'s budget, with the
    /// alert (once per window and key, its time kept with the budget).
    fn exceeded(
        &self,
        seen: &mut HashMap<Key, Seen>,
        key: &Key,
        u: &EqualityUse,
        identity: &str,
        resource: &str,
        now: Instant,
    ) -> Refusal {
        let window = u.limits.window;
        let alert = {
            let s = seen.entry(key.clone()).or_default();
            let due = s
                .alerted
                .is_none_or(|t| now.saturating_duration_since(t) >= window);
            if due {
                s.alerted = Some(now);
            }
            due
        };
        if alert {
            if let Err(e) = self.persist(seen, &[key], now) {
                // The refusal stands; at worst a restart alerts again.
                tracing::warn!(error = %e, "the probe budget's alert time was not written");
            }
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
        Refusal {
            rule: u.rule.clone(),
            column: u.column.clone(),
            oracle: Some(Oracle::Enumeration),
            reason: format!(
                "more than {} distinct values compared by equality with a protected column within {} enumerate it (enumeration oracle, across statements; the budget renews as values age out of the window)",
                u.limits.budget,
                shown(window)
            ),
        }
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
    fn the_budget_survives_a_restart_and_a_damaged_store_is_an_error() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("probe-budget.redb");
        let uses = [use_of(3, Duration::from_hours(1))];
        let charge = |b: &ProbeBudget, v: &[&str]| {
            let values = lits(v);
            let probes = Probes {
                uses: &uses,
                values: &|_| values.clone(),
                param: &|_| None,
            };
            b.charge("a", "pg", &probes)
        };
        {
            let b = ProbeBudget::open(&path).unwrap();
            assert!(charge(&b, &["1", "2", "3"]).is_ok());
        }
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        {
            // Restarted: the three values are still counted (same key, so
            // they cost nothing again), a fourth passes the budget.
            let b = ProbeBudget::open(&path).unwrap();
            let mut alerts = b.subscribe();
            assert!(charge(&b, &["3", "2"]).is_ok());
            assert!(charge(&b, &["4"]).is_err());
            assert!(alerts.try_recv().is_ok());
        }
        {
            // The alert time was kept: no second alert in the window.
            let b = ProbeBudget::open(&path).unwrap();
            let mut alerts = b.subscribe();
            assert!(charge(&b, &["5"]).is_err());
            assert!(alerts.try_recv().is_err());
        }
        // A damaged entry is an error naming the store, not a fresh budget.
        {
            let db = redb::Database::create(&path).unwrap();
            let tx = db.begin_write().unwrap();
            tx.open_table(SEEN)
                .unwrap()
                .insert("[\"a\",\"pg\",\"r\"]", [1u8, 2, 3].as_slice())
                .unwrap();
            tx.commit().unwrap();
        }
        let e = ProbeBudget::open(&path).err().unwrap();
        assert!(e.to_string().contains("probe-budget.redb"), "{e}");
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
