//! A limit on `control.refused` records, shared by the control socket and the
//! approvals API. A refused caller is a tagged (possibly hostile) process, and
//! each record is a durable, fsynced append: unlimited, a loop could fill the
//! log's disk and slow every other record.
//!
//! Fixed windows of [`WINDOW`]: at most [`PER_CGROUP`] records per caller
//! cgroup (callers whose cgroup is unknown share one key) and [`GLOBAL`] in
//! all. Over the limit a request is still refused exactly as before; only its
//! record is left out and counted, and the next record written for that
//! cgroup carries the count (`"suppressed"`), so the log says how much it
//! does not show. Trade-off: it fails closed on access (every refusal still
//! refuses) and open on detail (past the limit the log holds a count, not one
//! record per request). Memory is bounded by [`MAX_KEYS`]; counts held for an
//! evicted cgroup go on the next record written as `"suppressed_evicted"`.

use std::{collections::HashMap, sync::Mutex};

use serde_json::Value;
use tokio::time::{Duration, Instant};

/// The length of one window.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Records per caller cgroup per window.
pub const PER_CGROUP: u32 = 10;
/// Records per window, all callers together.
pub const GLOBAL: u32 = 100;
/// Caller cgroups tracked at once; the least recently seen one goes first.
pub const MAX_KEYS: usize = 1024;

/// What to do with one refusal's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Write it, with what was left out before it.
    Record(Suppressed),
    /// Leave it out (the request is refused all the same); it is counted.
    Suppress,
}

/// Refusals left out of the log since the last record: this caller's, and
/// those of cgroups evicted while they had a count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Suppressed {
    pub caller: u64,
    pub evicted: u64,
}

impl Suppressed {
    /// Adds the counts that are not zero to a record's action object.
    pub fn annotate(self, action: &mut Value) {
        let Some(action) = action.as_object_mut() else {
            return;
        };
        if self.caller > 0 {
            action.insert("suppressed".into(), self.caller.into());
        }
        if self.evicted > 0 {
            action.insert("suppressed_evicted".into(), self.evicted.into());
        }
    }
}

/// The limiter. Its lock is a leaf: held for a map lookup, never across an
/// await or while another lock is taken.
#[derive(Debug, Default)]
pub struct RefusalLimit {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// By caller cgroup (relative to the cgroup2 mount); `None` is every
    /// caller whose cgroup is unknown.
    callers: HashMap<Option<String>, Caller>,
    global: Window,
    global_warned: bool,
    evicted: u64,
}

#[derive(Debug)]
struct Caller {
    window: Window,
    suppressed: u64,
    warned: bool,
    last_seen: Instant,
}

#[derive(Debug, Default)]
struct Window {
    start: Option<Instant>,
    used: u32,
}

impl Window {
    /// Starts a new window if the current one is over; true if it did.
    fn roll(&mut self, now: Instant) -> bool {
        if self.start.is_some_and(|s| now.duration_since(s) < WINDOW) {
            return false;
        }
        self.start = Some(now);
        self.used = 0;
        true
    }
}

impl RefusalLimit {
    /// Decides about the record of one refusal of a caller in `cgroup`
    /// (`None`: not known).
    pub fn admit(&self, cgroup: Option<&str>) -> Verdict {
        let now = Instant::now();
        let mut state = self.state.lock().expect("refusal limit lock");
        let State {
            callers,
            global,
            global_warned,
            evicted,
        } = &mut *state;
        let key = cgroup.map(str::to_owned);
        if !callers.contains_key(&key) && callers.len() >= MAX_KEYS {
            let oldest = callers
                .iter()
                .min_by_key(|(_, c)| c.last_seen)
                .map(|(k, _)| k.clone());
            if let Some(c) = oldest.and_then(|k| callers.remove(&k)) {
                *evicted += c.suppressed;
            }
        }
        let caller = callers.entry(key).or_insert_with(|| Caller {
            window: Window::default(),
            suppressed: 0,
            warned: false,
            last_seen: now,
        });
        caller.last_seen = now;
        if caller.window.roll(now) {
            caller.warned = false;
        }
        if global.roll(now) {
            *global_warned = false;
        }
        if caller.window.used < PER_CGROUP && global.used < GLOBAL {
            caller.window.used += 1;
            global.used += 1;
            return Verdict::Record(Suppressed {
                caller: std::mem::take(&mut caller.suppressed),
                evicted: std::mem::take(evicted),
            });
        }
        caller.suppressed += 1;
        if caller.window.used >= PER_CGROUP {
            if !std::mem::replace(&mut caller.warned, true) {
                tracing::warn!(
                    event = "control.refused.suppressed",
                    cgroup = cgroup.unwrap_or("(unknown)"),
                    limit = PER_CGROUP,
                    window_secs = WINDOW.as_secs(),
                    "refusals of this cgroup go unrecorded until the window ends; the next record counts them"
                );
            }
        } else if !std::mem::replace(global_warned, true) {
            tracing::warn!(
                event = "control.refused.suppressed",
                limit = GLOBAL,
                window_secs = WINDOW.as_secs(),
                "refusals go unrecorded until the window ends (all callers); the next record of each cgroup counts them"
            );
        }
        Verdict::Suppress
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(s: u64) -> Verdict {
        Verdict::Record(Suppressed {
            caller: s,
            evicted: 0,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn under_the_limit_every_refusal_is_recorded() {
        let l = RefusalLimit::default();
        for _ in 0..PER_CGROUP {
            assert_eq!(l.admit(Some("/agent")), record(0));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn over_the_limit_refusals_are_counted_and_the_next_record_carries_the_count() {
        let l = RefusalLimit::default();
        for _ in 0..PER_CGROUP {
            l.admit(Some("/agent"));
        }
        for _ in 0..40 {
            assert_eq!(l.admit(Some("/agent")), Verdict::Suppress);
        }
        tokio::time::advance(WINDOW / 2).await;
        assert_eq!(l.admit(Some("/agent")), Verdict::Suppress);
        tokio::time::advance(WINDOW / 2).await;
        assert_eq!(l.admit(Some("/agent")), record(41));
        // Counted once: the record after it starts from zero.
        assert_eq!(l.admit(Some("/agent")), record(0));
    }

    #[tokio::test(start_paused = true)]
    async fn cgroups_are_limited_apart_and_unknown_callers_share_one_key() {
        let l = RefusalLimit::default();
        for _ in 0..=PER_CGROUP {
            l.admit(Some("/a"));
            l.admit(None);
        }
        assert_eq!(l.admit(Some("/a")), Verdict::Suppress);
        assert_eq!(l.admit(None), Verdict::Suppress);
        assert_eq!(l.admit(Some("/b")), record(0));
        tokio::time::advance(WINDOW).await;
        assert_eq!(l.admit(Some("/a")), record(2));
        assert_eq!(l.admit(None), record(2));
        assert_eq!(l.admit(Some("/b")), record(0));
    }

    #[tokio::test(start_paused = true)]
    async fn the_global_cap_holds_across_cgroups() {
        let l = RefusalLimit::default();
        let mut recorded = 0;
        for i in 0..GLOBAL * 2 {
            if l.admit(Some(&format!("/c{i}"))) != Verdict::Suppress {
                recorded += 1;
            }
        }
        assert_eq!(recorded, GLOBAL);
        tokio::time::advance(WINDOW).await;
        assert_eq!(l.admit(Some(&format!("/c{GLOBAL}"))), record(1));
    }

    #[tokio::test(start_paused = true)]
    async fn keys_are_bounded_and_an_evicted_count_is_not_lost() {
        let l = RefusalLimit::default();
        for _ in 0..=PER_CGROUP {
            l.admit(Some("/first"));
        }
        for i in 0..MAX_KEYS * 2 {
            tokio::time::advance(Duration::from_millis(1)).await;
            l.admit(Some(&format!("/c{i}")));
            assert!(l.state.lock().unwrap().callers.len() <= MAX_KEYS);
        }
        assert!(
            !l.state
                .lock()
                .unwrap()
                .callers
                .contains_key(&Some("/first".to_owned()))
        );
        tokio::time::advance(WINDOW).await;
        let Verdict::Record(s) = l.admit(Some("/new")) else {
            panic!("a new window records");
        };
        // The global cap left all but the first 90 of `/c0..` unrecorded, one
        // each. Evicted with a count: `/first`, `/c90..=/c1023`, and `/c1024`
        // (to make room for `/new`).
        let held_over = MAX_KEYS as u64 - u64::from(GLOBAL - PER_CGROUP);
        assert_eq!(s.caller, 0);
        assert_eq!(s.evicted, 1 + held_over + 1);
    }

    #[test]
    fn counts_are_added_to_the_action_only_when_there_are_any() {
        let mut a = serde_json::json!({ "op": "status" });
        Suppressed::default().annotate(&mut a);
        assert_eq!(a, serde_json::json!({ "op": "status" }));
        Suppressed {
            caller: 3,
            evicted: 2,
        }
        .annotate(&mut a);
        assert_eq!(
            a,
            serde_json::json!({ "op": "status", "suppressed": 3, "suppressed_evicted": 2 })
        );
    }
}
