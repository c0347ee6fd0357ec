//! The broker: pending requests, votes and grants, and their lifecycle.
//!
//! pending → approved | rejected | expired | cancelled | withdrawn |
//! released | refused (a policy reload decided it again). Every
//! transition is serialized by one async lock (`transitions`) that is held
//! across its audit append, so two votes can never both release a command or
//! count twice; the record is written first and, if it cannot be, the vote
//! fails with `NotRecorded` and nothing changes. The in-memory state sits
//! behind a plain mutex that is never held across an await (lock order:
//! `transitions`, then `state`). Deadlines and grant windows are tokio
//! instants, so tests pause the clock; the store keeps wall-clock expiry.
//! Ending a request on the requester's side (expiry, a client that went
//! away) denies or drops the command even when its record fails: not
//! running it is the safe side, and the failure is logged.
//! Limits: a connection holds at most one command, so pending requests are
//! bounded by `[proxy] max_connections`; reasons and tickets by
//! [`MAX_REASON_CHARS`] and [`MAX_TICKET_CHARS`]; subscribers by [`EVENT_BUFFER`].

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::{
    sync::{broadcast, oneshot},
    time::Instant,
};

use super::{
    ApprovalError, ApprovalEvent, ApprovalRequest, Approver, ApproverKind, Decided, Grant,
    GrantScope, MAX_REASON_CHARS, MAX_TICKET_CHARS, NewApproval, Outcome, Recorder, Requester,
    Settings, Vote, VoteView,
    store::{Store, StoreError, Table},
};
use crate::audit::{Kind, NewRecord};

/// Events kept for a slow subscriber before it starts missing some.
const EVENT_BUFFER: usize = 1024;

/// Why the broker could not start (the daemon refuses to).
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "{0}; move it aside or fix its permissions to start (pending approvals and grants live there)"
    )]
    Store(#[from] StoreError),
    #[error("cannot record the cancellation of {id}, pending when the daemon stopped: {reason}")]
    Record { id: String, reason: String },
}

/// Result of [`Broker::submit`].
#[allow(clippy::large_enum_variant)] // one per held command, moved once
pub enum Submitted {
    /// A live grant covers it: run it, naming the grant (its use is counted).
    Covered { grant: Grant },
    /// Filed and on record: hold the command until the waiter resolves.
    Held {
        request: ApprovalRequest,
        waiter: Waiter,
    },
}

struct Pending {
    request: ApprovalRequest,
    tx: Option<oneshot::Sender<Outcome>>,
    redecide: Option<Arc<dyn super::Redecide>>,
}

struct LiveGrant {
    grant: Grant,
    until: Instant,
}

/// A grant as the store keeps it: with its wall-clock end.
#[derive(Serialize, Deserialize)]
struct StoredGrant {
    grant: Grant,
    expires_unix_ms: u64,
}

#[derive(Default)]
struct State {
    pending: BTreeMap<String, Pending>,
    grants: BTreeMap<String, LiveGrant>,
}

struct Inner {
    state: Mutex<State>,
    transitions: tokio::sync::Mutex<()>,
    recorder: Arc<dyn Recorder>,
    store: Option<Store>,
    settings: Settings,
    events: broadcast::Sender<ApprovalEvent>,
}

/// Pending requests and live grants. Cheap to clone.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

/// What a held command waits on. Dropping it before the outcome cancels the
/// request (the client went away).
pub struct Waiter {
    id: String,
    rx: Option<oneshot::Receiver<Outcome>>,
    deadline: Instant,
    broker: Broker,
    done: bool,
}

fn random_id(prefix: &str) -> String {
    let mut b = [0u8; 8];
    // getrandom only fails without an entropy source; a counter-free id
    // would then collide, so fall back to time and pid, still unique enough
    // within one daemon.
    if getrandom::getrandom(&mut b).is_err() {
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        b = (t ^ u64::from(std::process::id()).rotate_left(32)).to_be_bytes();
    }
    format!("{prefix}-{}", hex::encode(b))
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
        .try_into()
        .unwrap_or(u64::MAX)
}

/// Whether `path` is `prefix` or below it (cgroup paths, `/`-separated).
fn path_within(path: &str, prefix: &str) -> bool {
    if prefix.is_empty() || path.is_empty() {
        return false;
    }
    let prefix = prefix.trim_end_matches('/');
    prefix.is_empty() || path == prefix || path.starts_with(&format!("{prefix}/"))
}

impl Broker {
    /// A broker that keeps nothing across restarts (tests, and tools).
    pub fn new(recorder: Arc<dyn Recorder>, settings: Settings) -> Self {
        Self::with_store(recorder, settings, None)
    }

    fn with_store(recorder: Arc<dyn Recorder>, settings: Settings, store: Option<Store>) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::default(),
                transitions: tokio::sync::Mutex::new(()),
                recorder,
                store,
                settings,
                events: broadcast::channel(EVENT_BUFFER).0,
            }),
        }
    }

    /// Opens the durable broker at `path`: requests pending when the daemon
    /// stopped are recorded `approval.cancelled` (their clients' connections
    /// are gone) and dropped; grants come back until they expire.
    pub async fn open(
        recorder: Arc<dyn Recorder>,
        settings: Settings,
        path: &Path,
    ) -> Result<Self, OpenError> {
        let store = Store::open(path)?;
        let pending: Vec<(String, ApprovalRequest)> = store.all(Table::Pending)?;
        let grants: Vec<(String, StoredGrant)> = store.all(Table::Grants)?;
        for (id, request) in pending {
            let rec = requester_record(Kind::ApprovalCancelled, &request).approval(json!({
                "id": id,
                "outcome": "cancelled",
                "reason": "daemon restarted; the client's connection is gone",
                "votes": request.votes,
                "quorum": request.quorum,
            }));
            recorder
                .record(rec)
                .await
                .map_err(|reason| OpenError::Record {
                    id: id.clone(),
                    reason,
                })?;
            store.remove(Table::Pending, &id)?;
            tracing::info!(event = "approval.cancelled", request = %id, "pending at restart");
        }
        let broker = Self::with_store(recorder, settings, Some(store));
        let now_wall = SystemTime::now();
        let now = Instant::now();
        {
            let mut st = broker.inner.state.lock().expect("approval state");
            for (id, g) in grants {
                let end = UNIX_EPOCH + Duration::from_millis(g.expires_unix_ms);
                match end.duration_since(now_wall) {
                    Ok(left) if !left.is_zero() => {
                        st.grants.insert(
                            id,
                            LiveGrant {
                                grant: g.grant,
                                until: now + left,
                            },
                        );
                    }
                    _ => broker.store_remove(Table::Grants, &id),
                }
            }
        }
        Ok(broker)
    }

    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    fn store_put<T: Serialize>(&self, table: Table, id: &str, value: &T) {
        if let Some(s) = &self.inner.store
            && let Err(e) = s.put(table, id, value)
        {
            tracing::error!(error = %e, id, "approval store write failed; carrying on in memory");
        }
    }

    fn store_remove(&self, table: Table, id: &str) {
        if let Some(s) = &self.inner.store
            && let Err(e) = s.remove(table, id)
        {
            tracing::error!(error = %e, id, "approval store write failed; carrying on in memory");
        }
    }

    fn emit(&self, event: ApprovalEvent) {
        // No subscriber is not an error.
        let _ = self.inner.events.send(event);
    }

    /// New requests and decisions, after their records. A subscriber that
    /// falls more than [`EVENT_BUFFER`] behind misses the oldest (`Lagged`).
    pub fn subscribe(&self) -> broadcast::Receiver<ApprovalEvent> {
        self.inner.events.subscribe()
    }

    pub fn pending_count(&self) -> usize {
        self.inner
            .state
            .lock()
            .expect("approval state")
            .pending
            .len()
    }

    /// Pending requests, oldest id first.
    pub fn list(&self) -> Vec<ApprovalRequest> {
        self.inner
            .state
            .lock()
            .expect("approval state")
            .pending
            .values()
            .map(|p| p.request.clone())
            .collect()
    }

    pub fn get(&self, id: &str) -> Option<ApprovalRequest> {
        self.inner
            .state
            .lock()
            .expect("approval state")
            .pending
            .get(id)
            .map(|p| p.request.clone())
    }

    /// Drops grants whose window has closed (memory and store).
    fn purge_grants(st: &mut State) -> Vec<String> {
        let now = Instant::now();
        let gone: Vec<String> = st
            .grants
            .iter()
            .filter(|(_, g)| g.until <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            st.grants.remove(id);
        }
        gone
    }

    /// Live grants.
    pub fn grants(&self) -> Vec<Grant> {
        let (gone, live) = {
            let mut st = self.inner.state.lock().expect("approval state");
            let gone = Self::purge_grants(&mut st);
            let live = st.grants.values().map(|g| g.grant.clone()).collect();
            (gone, live)
        };
        for id in gone {
            self.store_remove(Table::Grants, &id);
        }
        live
    }

    /// Files a request, unless a live grant covers it. The `approval.requested`
    /// record is written before the request exists; `NotRecorded` if it cannot be.
    pub async fn submit(&self, new: NewApproval) -> Result<Submitted, ApprovalError> {
        let spec = &new.spec;
        if spec.grant_window.is_some() {
            let key = match spec.grant_scope {
                GrantScope::Statement => &new.statement_hash,
                GrantScope::Class => &new.class,
            };
            let (gone, covered) = {
                let mut st = self.inner.state.lock().expect("approval state");
                let gone = Self::purge_grants(&mut st);
                let covered = st.grants.values_mut().find(|g| {
                    let g = &g.grant;
                    g.identity == new.requester.identity
                        && g.issuer == new.requester.issuer
                        && g.resource == new.resource
                        && g.rule == new.rule
                        && g.scope == spec.grant_scope
                        && g.key == *key
                });
                let covered = covered.map(|g| {
                    g.grant.uses += 1;
                    StoredGrant {
                        grant: g.grant.clone(),
                        expires_unix_ms: unix_ms(
                            SystemTime::now() + g.until.saturating_duration_since(Instant::now()),
                        ),
                    }
                });
                (gone, covered)
            };
            for id in gone {
                self.store_remove(Table::Grants, &id);
            }
            if let Some(g) = covered {
                self.store_put(Table::Grants, &g.grant.id, &g);
                return Ok(Submitted::Covered { grant: g.grant });
            }
        }
        let id = random_id("apr");
        let quorum = spec.quorum.max(1);
        let request = ApprovalRequest {
            id: id.clone(),
            requester: new.requester,
            resource: new.resource,
            summary: new.summary,
            statement_hash: new.statement_hash,
            class: new.class,
            rule: new.rule,
            approver_groups: spec.approver_groups.clone(),
            quorum,
            votes: Vec::new(),
            created: crate::time::now_rfc3339(),
            deadline: crate::time::rfc3339(SystemTime::now() + spec.timeout),
            grant_window_secs: spec.grant_window.map(|w| w.as_secs()),
            grant_scope: spec.grant_scope,
        };
        let mut rec = new.record.approval(json!({
            "id": id,
            "approver_groups": request.approver_groups,
            "quorum": quorum,
            "deadline": request.deadline,
            "grant_window_secs": request.grant_window_secs,
            "grant_scope": request.grant_scope,
        }));
        rec.kind = Kind::ApprovalRequested;
        self.inner
            .recorder
            .record(rec)
            .await
            .map_err(|reason| ApprovalError::NotRecorded { reason })?;
        self.store_put(Table::Pending, &id, &request);
        let (tx, rx) = oneshot::channel();
        self.inner
            .state
            .lock()
            .expect("approval state")
            .pending
            .insert(
                id.clone(),
                Pending {
                    request: request.clone(),
                    tx: Some(tx),
                    redecide: new.redecide,
                },
            );
        self.emit(ApprovalEvent::Requested {
            request: request.clone(),
        });
        Ok(Submitted::Held {
            request,
            waiter: Waiter {
                id,
                rx: Some(rx),
                deadline: Instant::now() + spec.timeout,
                broker: self.clone(),
                done: false,
            },
        })
    }

    fn check_text(what: &str, text: &str, max: usize) -> Result<(), ApprovalError> {
        if text.chars().count() > max || text.chars().any(char::is_control) {
            return Err(ApprovalError::BadInput {
                what: format!(
                    "{what} must be at most {max} characters, without control characters"
                ),
            });
        }
        Ok(())
    }

    fn check_ticket(&self, ticket: Option<&str>) -> Result<(), ApprovalError> {
        let Some(t) = ticket else { return Ok(()) };
        let ok = match &self.inner.settings.ticket_pattern {
            _ if t.is_empty() || t.chars().count() > MAX_TICKET_CHARS => false,
            Some(re) => re.is_match(t),
            None => t
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._:/#-".contains(c)),
        };
        if ok {
            return Ok(());
        }
        let pattern = match &self.inner.settings.ticket_pattern {
            Some(re) => re
                .as_str()
                .strip_prefix("^(?:")
                .and_then(|p| p.strip_suffix(")$"))
                .unwrap_or(re.as_str())
                .to_owned(),
            None => format!("[A-Za-z0-9._:/#-]{{1,{MAX_TICKET_CHARS}}}"),
        };
        Err(ApprovalError::BadTicket { pattern })
    }

    fn check_label(&self, who: &Approver) -> Result<(), ApprovalError> {
        if who.kind == ApproverKind::Label && !self.inner.settings.allow_labels {
            return Err(ApprovalError::LabelNotAllowed {
                approver: who.name.clone(),
            });
        }
        Ok(())
    }

    /// Separation of duties: why `who` may not vote on `req`, if so.
    fn conflict(who: &Approver, r: &Requester) -> Option<String> {
        if who.name == r.identity {
            return Some(format!("{} is the requester", who.name));
        }
        if who.issuer == r.issuer && who.subject == r.subject {
            return Some("it is the requester's identity at the issuer".into());
        }
        let ids = [r.cgroup_id, r.tagged_cgroup_id];
        if who.bound_cgroups.iter().any(|c| *c != 0 && ids.contains(c))
            || who
                .bound_cgroup_paths
                .iter()
                .any(|p| path_within(&r.cgroup, p))
        {
            return Some(format!(
                "{} is bound to the requesting cgroup {}",
                who.name, r.cgroup
            ));
        }
        None
    }

    /// Records a vote, then acts on it: a rejection or the quorum's last
    /// approval ends the request and releases (or denies) the command.
    #[allow(clippy::too_many_lines)] // one transition, checked, recorded, applied, in order
    pub async fn decide(
        &self,
        id: &str,
        who: &Approver,
        vote: Vote,
    ) -> Result<Decided, ApprovalError> {
        let (reason, ticket, approve) = match &vote {
            Vote::Approve { reason, ticket } => (reason.clone(), ticket.clone(), true),
            Vote::Reject { reason, ticket } => {
                if reason.trim().is_empty() {
                    return Err(ApprovalError::ReasonRequired);
                }
                (Some(reason.clone()), ticket.clone(), false)
            }
        };
        if let Some(r) = &reason {
            Self::check_text("reason", r, MAX_REASON_CHARS)?;
        }
        self.check_ticket(ticket.as_deref())?;

        let _serial = self.inner.transitions.lock().await;
        let req = self
            .get(id)
            .ok_or_else(|| ApprovalError::NotFound { id: id.into() })?;
        self.check_label(who)?;
        if let Some(why) = Self::conflict(who, &req.requester) {
            return Err(ApprovalError::SelfApproval {
                id: id.into(),
                approver: who.name.clone(),
                why,
            });
        }
        if !who.groups.iter().any(|g| req.approver_groups.contains(g)) {
            return Err(ApprovalError::NotAnApprover {
                id: id.into(),
                approver: who.name.clone(),
                groups: req.approver_groups.join(", "),
            });
        }
        if approve
            && req
                .votes
                .iter()
                .any(|v| v.issuer == who.issuer && v.subject == who.subject)
        {
            return Err(ApprovalError::AlreadyVoted {
                id: id.into(),
                approver: who.name.clone(),
            });
        }
        let view = VoteView {
            approver: who.name.clone(),
            subject: who.subject.clone(),
            issuer: who.issuer.clone(),
            kind: who.kind,
            via: who.via,
            vote: if approve { "approve" } else { "reject" }.into(),
            reason: reason.clone(),
            ticket: ticket.clone(),
            at: crate::time::now_rfc3339(),
        };
        let approvals = req.votes.len() as u32 + u32::from(approve);
        let (kind, decided, grant) = if !approve {
            (Kind::ApprovalDenied, Decided::Rejected, None)
        } else if approvals < req.quorum {
            (
                Kind::ApprovalVote,
                Decided::Pending {
                    approvals,
                    quorum: req.quorum,
                },
                None,
            )
        } else {
            let grant = req.grant_window_secs.map(|secs| {
                let mut approvers: Vec<String> =
                    req.votes.iter().map(|v| v.approver.clone()).collect();
                approvers.push(who.name.clone());
                let window = Duration::from_secs(secs);
                (
                    Grant {
                        id: random_id("grt"),
                        identity: req.requester.identity.clone(),
                        issuer: req.requester.issuer.clone(),
                        resource: req.resource.clone(),
                        scope: req.grant_scope,
                        key: match req.grant_scope {
                            GrantScope::Statement => req.statement_hash.clone(),
                            GrantScope::Class => req.class.clone(),
                        },
                        summary: req.summary.clone(),
                        rule: req.rule.clone(),
                        approver_groups: req.approver_groups.clone(),
                        approvers,
                        request: req.id.clone(),
                        created: crate::time::now_rfc3339(),
                        expires: crate::time::rfc3339(SystemTime::now() + window),
                        uses: 0,
                    },
                    window,
                )
            });
            let grant_id = grant.as_ref().map(|(g, _)| g.id.clone());
            (
                Kind::ApprovalGranted,
                Decided::Approved { grant: grant_id },
                grant,
            )
        };
        let mut votes = req.votes.clone();
        votes.push(view.clone());
        let rec = approver_record(kind, who, &req).approval(json!({
            "id": id,
            "approver": who.name,
            "vote": view.vote,
            "reason": reason,
            "ticket": ticket,
            "via": who.via,
            "votes": votes.iter().filter(|v| v.vote == "approve").count(),
            "quorum": req.quorum,
            "approvers": votes.iter().map(|v| v.approver.clone()).collect::<Vec<_>>(),
            "grant": grant.as_ref().map(|(g, _)| json!({
                "id": g.id, "scope": g.scope, "expires": g.expires,
            })),
        }));
        self.inner
            .recorder
            .record(rec)
            .await
            .map_err(|reason| ApprovalError::NotRecorded { reason })?;

        // On record: now it takes effect.
        tracing::info!(event = kind.as_str(), request = id, approver = %who.name, via = ?who.via);
        match &decided {
            Decided::Pending { .. } => {
                let updated = {
                    let mut st = self.inner.state.lock().expect("approval state");
                    st.pending.get_mut(id).map(|p| {
                        p.request.votes = votes;
                        p.request.clone()
                    })
                };
                if let Some(r) = updated {
                    self.store_put(Table::Pending, id, &r);
                }
            }
            Decided::Rejected => {
                let outcome = Outcome::Rejected {
                    by: who.name.clone(),
                    reason: reason.clone().unwrap_or_default(),
                };
                self.finish(
                    id,
                    Some(outcome),
                    "rejected",
                    vec![who.name.clone()],
                    reason,
                );
            }
            Decided::Approved { .. } => {
                let approvers: Vec<String> = votes.iter().map(|v| v.approver.clone()).collect();
                if let Some((g, window)) = grant {
                    let stored = StoredGrant {
                        expires_unix_ms: unix_ms(SystemTime::now() + window),
                        grant: g.clone(),
                    };
                    self.store_put(Table::Grants, &g.id, &stored);
                    self.inner
                        .state
                        .lock()
                        .expect("approval state")
                        .grants
                        .insert(
                            g.id.clone(),
                            LiveGrant {
                                grant: g,
                                until: Instant::now() + window,
                            },
                        );
                }
                let grant = match &decided {
                    Decided::Approved { grant } => grant.clone(),
                    _ => None,
                };
                let outcome = Outcome::Approved {
                    approvers: approvers.clone(),
                    grant,
                };
                self.finish(id, Some(outcome), "approved", approvers, reason);
            }
        }
        Ok(decided)
    }

    /// Removes a decided request, tells its waiter and the subscribers.
    fn finish(
        &self,
        id: &str,
        outcome: Option<Outcome>,
        name: &str,
        by: Vec<String>,
        reason: Option<String>,
    ) {
        let removed = self
            .inner
            .state
            .lock()
            .expect("approval state")
            .pending
            .remove(id);
        self.store_remove(Table::Pending, id);
        let Some(p) = removed else { return };
        if let (Some(tx), Some(o)) = (p.tx, outcome) {
            let _ = tx.send(o);
        }
        self.emit(ApprovalEvent::Decided {
            request: p.request,
            outcome: name.into(),
            by,
            reason,
        });
    }

    /// Ends a request from the requester's side (expired, cancelled,
    /// withdrawn): the record, then the removal. The command does not run
    /// either way, so a record that fails is logged and the request still
    /// ends. `false` if it was no longer pending.
    async fn end(&self, id: &str, kind: Kind, reason: &str, outcome: Option<Outcome>) -> bool {
        self.end_with(id, kind, reason, outcome, None).await
    }

    /// [`Broker::end`] with more fields for the record. `extra` also makes
    /// the record a precondition: when it is given and the record cannot be
    /// written, nothing changes (a release must be on record before the
    /// command runs).
    async fn end_with(
        &self,
        id: &str,
        kind: Kind,
        reason: &str,
        outcome: Option<Outcome>,
        extra: Option<serde_json::Value>,
    ) -> bool {
        let _serial = self.inner.transitions.lock().await;
        let Some(req) = self.get(id) else {
            return false;
        };
        let name = kind.as_str().trim_start_matches("approval.");
        let mut fields = json!({
            "id": id,
            "outcome": name,
            "reason": reason,
            "votes": req.votes.len(),
            "quorum": req.quorum,
        });
        let strict = extra.is_some();
        if let (Some(serde_json::Value::Object(more)), Some(f)) = (extra, fields.as_object_mut()) {
            f.extend(more);
        }
        let rec = requester_record(kind, &req).approval(fields);
        if let Err(e) = self.inner.recorder.record(rec).await {
            if strict {
                tracing::error!(event = "log.failure", request = id, error = %e, "cannot record a policy re-decision; the request stays pending");
                return false;
            }
            tracing::error!(event = "log.failure", request = id, error = %e, "cannot record the end of an approval request; the command does not run");
        }
        tracing::info!(event = kind.as_str(), request = id, reason);
        self.finish(id, outcome, name, Vec::new(), Some(reason.into()));
        true
    }

    /// The client went away while its command was held.
    pub async fn cancel(&self, id: &str, reason: &str) -> bool {
        self.end(id, Kind::ApprovalCancelled, reason, None).await
    }

    /// Takes a request back while its client waits: the command is denied.
    pub async fn withdraw(&self, id: &str, reason: &str) -> bool {
        self.end(
            id,
            Kind::ApprovalWithdrawn,
            reason,
            Some(Outcome::Withdrawn {
                reason: reason.into(),
            }),
        )
        .await
    }

    /// The policy was reloaded: decides every held command that carries a
    /// [`Redecide`](super::Redecide) again under `policy`. One the new policy
    /// allows is released (`approval.released`, naming the rule and the
    /// policy digest, written before it runs; if it cannot be written the
    /// request stays pending); one it denies is denied (`approval.refused`).
    /// One that still needs approval keeps waiting as it was filed (its
    /// approvers, quorum and deadline). Returns `(request id, outcome)` for
    /// each request that ended.
    pub async fn policy_reloaded(
        &self,
        policy: &crate::policy::PolicySet,
    ) -> Vec<(String, &'static str)> {
        use crate::policy::Verdict;
        let held: Vec<(String, String, Arc<dyn super::Redecide>)> = {
            let st = self.inner.state.lock().expect("approval state");
            st.pending
                .iter()
                .filter_map(|(id, p)| {
                    p.redecide
                        .clone()
                        .map(|r| (id.clone(), p.request.rule.clone(), r))
                })
                .collect()
        };
        let digest = policy.digest().to_owned();
        let short = crate::policy::diff::short(&digest).to_owned();
        let mut ended = Vec::new();
        for (id, held_by, r) in held {
            let d = r.redecide(policy);
            let (kind, reason, outcome, name) = match d.verdict {
                Verdict::RequireApproval(_) => continue,
                Verdict::Allow => {
                    let reason = format!(
                        "policy {short} now in force allows it by rule `{}` (held under rule `{held_by}`)",
                        d.rule
                    );
                    (
                        Kind::ApprovalReleased,
                        reason.clone(),
                        Outcome::Released {
                            rule: d.rule.clone(),
                            reason,
                            policy: digest.clone(),
                        },
                        "released",
                    )
                }
                Verdict::Deny { reason: why } => {
                    let reason = format!(
                        "policy {short} now in force denies it by rule `{}`: {why}",
                        d.rule
                    );
                    (
                        Kind::ApprovalRefused,
                        reason.clone(),
                        Outcome::Refused {
                            rule: d.rule.clone(),
                            reason,
                            policy: digest.clone(),
                        },
                        "refused",
                    )
                }
            };
            let extra = json!({ "rule": d.rule, "held_by": held_by, "policy_digest": digest });
            if self
                .end_with(&id, kind, &reason, Some(outcome), Some(extra))
                .await
            {
                ended.push((id, name));
            }
        }
        ended
    }

    /// Withdraws every request held for proxy connection `conn` (its client
    /// cancelled the statement); returns how many.
    pub async fn withdraw_connection(&self, conn: u64, reason: &str) -> usize {
        let ids: Vec<String> = self
            .list()
            .into_iter()
            .filter(|r| r.requester.conn == conn)
            .map(|r| r.id)
            .collect();
        let mut n = 0;
        for id in ids {
            if self.withdraw(&id, reason).await {
                n += 1;
            }
        }
        n
    }

    /// Ends a grant early. Members of its approver groups, or its own
    /// identity, may; `grant.revoked` is written first.
    pub async fn revoke(
        &self,
        grant: &str,
        who: &Approver,
        reason: Option<String>,
    ) -> Result<Grant, ApprovalError> {
        if let Some(r) = &reason {
            Self::check_text("reason", r, MAX_REASON_CHARS)?;
        }
        self.check_label(who)?;
        let _serial = self.inner.transitions.lock().await;
        let g = self
            .grants()
            .into_iter()
            .find(|g| g.id == grant)
            .ok_or_else(|| ApprovalError::GrantNotFound { id: grant.into() })?;
        let own = who.name == g.identity;
        if !own && !who.groups.iter().any(|x| g.approver_groups.contains(x)) {
            return Err(ApprovalError::NotAnApprover {
                id: g.id.clone(),
                approver: who.name.clone(),
                groups: g.approver_groups.join(", "),
            });
        }
        let rec = NewRecord::new(Kind::GrantRevoked)
            .identity(who.identity_ref())
            .workload(crate::audit::Workload::current_process())
            .resource(g.resource.clone())
            .action(json!({
                "grant": g.id,
                "identity": g.identity,
                "scope": g.scope,
                "summary": g.summary,
                "rule": g.rule,
                "request": g.request,
                "uses": g.uses,
            }))
            .approval(json!({
                "grant": g.id,
                "by": who.name,
                "reason": reason,
                "via": who.via,
            }));
        self.inner
            .recorder
            .record(rec)
            .await
            .map_err(|reason| ApprovalError::NotRecorded { reason })?;
        self.inner
            .state
            .lock()
            .expect("approval state")
            .grants
            .remove(grant);
        self.store_remove(Table::Grants, grant);
        tracing::info!(event = "grant.revoked", grant, by = %who.name);
        Ok(g)
    }
}

/// What the records say about the request itself.
fn request_action(req: &ApprovalRequest) -> serde_json::Value {
    json!({
        "request": req.id,
        "requester": req.requester.identity,
        "summary": req.summary,
        "sql_hash": req.statement_hash,
        "class": req.class,
        "rule": req.rule,
    })
}

/// A record of an approver's act on `req`.
fn approver_record(kind: Kind, who: &Approver, req: &ApprovalRequest) -> NewRecord {
    NewRecord::new(kind)
        .identity(who.identity_ref())
        .workload(crate::audit::Workload::current_process())
        .connection(req.requester.conn)
        .resource(req.resource.clone())
        .action(request_action(req))
}

/// A record of the requester's side ending `req`.
fn requester_record(kind: Kind, req: &ApprovalRequest) -> NewRecord {
    NewRecord::new(kind)
        .identity(req.requester.identity_ref())
        .workload(req.requester.workload())
        .connection(req.requester.conn)
        .session(format!("conn-{}", req.requester.conn))
        .resource(req.resource.clone())
        .action(request_action(req))
}

impl Waiter {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Waits for the decision. At the deadline the request is recorded
    /// `approval.expired` and the answer is `Expired`.
    pub async fn outcome(mut self) -> Outcome {
        let mut rx = self.rx.take().expect("outcome awaited once");
        let got = tokio::select! {
            r = &mut rx => Some(r),
            () = tokio::time::sleep_until(self.deadline) => None,
        };
        let out = match got {
            Some(Ok(o)) => o,
            Some(Err(_)) => Outcome::Withdrawn {
                reason: "the request ended without a decision".into(),
            },
            None => {
                let expired = self
                    .broker
                    .end(
                        &self.id,
                        Kind::ApprovalExpired,
                        "nobody decided before the deadline",
                        None,
                    )
                    .await;
                if expired {
                    Outcome::Expired
                } else {
                    // Decided while the deadline passed: that decision stands.
                    rx.try_recv().unwrap_or(Outcome::Expired)
                }
            }
        };
        self.done = true;
        out
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let (broker, id) = (self.broker.clone(), self.id.clone());
        let reason = "the client's connection closed while the command was held";
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { broker.cancel(&id, reason).await });
        } else {
            // No runtime (the daemon is going): the store keeps it, and the
            // next start records it cancelled.
            broker
                .inner
                .state
                .lock()
                .expect("approval state")
                .pending
                .remove(&id);
        }
    }
}
