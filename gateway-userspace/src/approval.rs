//! Just-in-time approvals: a command that needs a human is held until enough
//! approvers say yes, anyone allowed says no, or the deadline passes.
//!
//! Fails closed: a timeout is a denial, a requester can never approve their own
//! request, and a request whose client went away is withdrawn (nobody can
//! approve a command that will not run). Deadlines use tokio time, so tests
//! pause and advance the clock instead of sleeping.

pub mod webhook;

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::Serialize;
use tokio::{sync::oneshot, time::Instant};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApprovalError {
    #[error("no pending approval request {id}")]
    NotFound { id: String },
    #[error("{approver} requested {id} and cannot approve or deny it")]
    SelfApproval { id: String, approver: String },
    #[error("{approver} is not in an approver group of {id} ({groups})")]
    NotAnApprover {
        id: String,
        approver: String,
        groups: String,
    },
    #[error("{approver} already approved {id}")]
    AlreadyApproved { id: String, approver: String },
}

/// What the policy asked for.
#[derive(Debug, Clone)]
pub struct ApprovalSpec {
    pub approver_groups: Vec<String>,
    pub quorum: u32,
    pub timeout: Duration,
    /// After approval, the same statement by the same identity on the same
    /// resource is allowed without asking again for this long.
    pub grant_window: Option<Duration>,
}

/// A request as approvers see it. `summary` is already redacted: no literals.
#[derive(Debug, Clone, Serialize)]
pub struct ApprovalRequest {
    pub id: String,
    pub identity: String,
    pub resource: String,
    pub summary: String,
    /// Keyed hash of the full statement: what a grant is bound to.
    pub statement_hash: String,
    pub rule: String,
    pub approver_groups: Vec<String>,
    pub quorum: u32,
    pub approvals: Vec<String>,
    pub created: String,
    pub deadline: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Outcome {
    Approved {
        approvers: Vec<String>,
    },
    /// An allowed approver said no.
    Denied {
        by: String,
        reason: Option<String>,
    },
    /// Nobody decided in time.
    Expired,
    /// Covered by an earlier approval's grant window.
    Granted {
        approvers: Vec<String>,
    },
}

/// Who is deciding, and the groups their verified identity carries.
#[derive(Debug, Clone)]
pub struct Approver {
    pub name: String,
    pub groups: Vec<String>,
    /// Root on the control socket may approve for any group (it can rewrite
    /// the policy anyway); still never for itself.
    pub any_group: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Decided {
    /// Recorded; the quorum is not reached yet.
    Pending {
        approvals: u32,
        quorum: u32,
    },
    Approved,
    Denied,
}

struct Pending {
    request: ApprovalRequest,
    tx: Option<oneshot::Sender<Outcome>>,
}

#[derive(Hash, PartialEq, Eq, PartialOrd, Ord, Clone)]
struct GrantKey {
    identity: String,
    resource: String,
    statement_hash: String,
}

#[derive(Default)]
struct State {
    next: u64,
    pending: BTreeMap<String, Pending>,
    grants: BTreeMap<GrantKey, (Instant, Vec<String>)>,
    /// Grant windows of pending requests, applied when they are approved.
    windows: BTreeMap<String, Duration>,
}

/// Holds pending requests and active grants. Cheap to clone.
#[derive(Clone, Default)]
pub struct Broker {
    state: Arc<Mutex<State>>,
}

/// What a held command waits on. Dropping it withdraws the request.
pub struct Waiter {
    id: String,
    rx: Option<oneshot::Receiver<Outcome>>,
    deadline: Instant,
    broker: Broker,
}

pub struct NewApproval {
    pub identity: String,
    pub resource: String,
    pub summary: String,
    pub statement_hash: String,
    pub rule: String,
}

impl Broker {
    /// Files a request, unless an unexpired grant covers it (then `Err(outcome)`).
    pub fn submit(
        &self,
        new: NewApproval,
        spec: &ApprovalSpec,
    ) -> Result<(ApprovalRequest, Waiter), Outcome> {
        let now = Instant::now();
        let mut st = self.state.lock().expect("approval lock");
        st.grants.retain(|_, (until, _)| *until > now);
        let key = GrantKey {
            identity: new.identity.clone(),
            resource: new.resource.clone(),
            statement_hash: new.statement_hash.clone(),
        };
        if let Some((_, approvers)) = st.grants.get(&key) {
            return Err(Outcome::Granted {
                approvers: approvers.clone(),
            });
        }
        st.next += 1;
        let id = format!("apr-{}-{}", std::process::id(), st.next);
        let deadline_at = now + spec.timeout;
        let wall_deadline = std::time::SystemTime::now() + spec.timeout;
        let request = ApprovalRequest {
            id: id.clone(),
            identity: new.identity,
            resource: new.resource,
            summary: new.summary,
            statement_hash: new.statement_hash,
            rule: new.rule,
            approver_groups: spec.approver_groups.clone(),
            quorum: spec.quorum.max(1),
            approvals: Vec::new(),
            created: crate::time::now_rfc3339(),
            deadline: crate::time::rfc3339(wall_deadline),
        };
        let (tx, rx) = oneshot::channel();
        st.pending.insert(
            id.clone(),
            Pending {
                request: request.clone(),
                tx: Some(tx),
            },
        );
        if let Some(w) = spec.grant_window {
            st.windows.insert(id.clone(), w);
        }
        drop(st);
        Ok((
            request,
            Waiter {
                id,
                rx: Some(rx),
                deadline: deadline_at,
                broker: self.clone(),
            },
        ))
    }

    pub fn list(&self) -> Vec<ApprovalRequest> {
        self.state
            .lock()
            .expect("approval lock")
            .pending
            .values()
            .map(|p| p.request.clone())
            .collect()
    }

    pub fn get(&self, id: &str) -> Option<ApprovalRequest> {
        self.state
            .lock()
            .expect("approval lock")
            .pending
            .get(id)
            .map(|p| p.request.clone())
    }

    /// Records an approver's decision.
    pub fn decide(
        &self,
        id: &str,
        who: &Approver,
        approve: bool,
        reason: Option<String>,
    ) -> Result<Decided, ApprovalError> {
        let mut st = self.state.lock().expect("approval lock");
        let pending = st
            .pending
            .get_mut(id)
            .ok_or_else(|| ApprovalError::NotFound { id: id.into() })?;
        let req = &mut pending.request;
        if who.name == req.identity {
            return Err(ApprovalError::SelfApproval {
                id: id.into(),
                approver: who.name.clone(),
            });
        }
        if !who.any_group && !who.groups.iter().any(|g| req.approver_groups.contains(g)) {
            return Err(ApprovalError::NotAnApprover {
                id: id.into(),
                approver: who.name.clone(),
                groups: req.approver_groups.join(", "),
            });
        }
        if !approve {
            let outcome = Outcome::Denied {
                by: who.name.clone(),
                reason,
            };
            if let Some(tx) = st.pending.remove(id).and_then(|p| p.tx) {
                let _ = tx.send(outcome);
            }
            return Ok(Decided::Denied);
        }
        if req.approvals.contains(&who.name) {
            return Err(ApprovalError::AlreadyApproved {
                id: id.into(),
                approver: who.name.clone(),
            });
        }
        req.approvals.push(who.name.clone());
        let (n, quorum) = (req.approvals.len() as u32, req.quorum);
        if n < quorum {
            return Ok(Decided::Pending {
                approvals: n,
                quorum,
            });
        }
        let p = st.pending.remove(id).expect("present above");
        let approvers = p.request.approvals.clone();
        if let Some(window) = st.windows.remove(id) {
            st.grants.insert(
                GrantKey {
                    identity: p.request.identity.clone(),
                    resource: p.request.resource.clone(),
                    statement_hash: p.request.statement_hash.clone(),
                },
                (Instant::now() + window, approvers.clone()),
            );
        }
        if let Some(tx) = p.tx {
            let _ = tx.send(Outcome::Approved { approvers });
        }
        Ok(Decided::Approved)
    }

    fn withdraw(&self, id: &str) {
        let mut st = self.state.lock().expect("approval lock");
        st.pending.remove(id);
        st.windows.remove(id);
    }
}

impl Waiter {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Waits for the decision; past the deadline the answer is `Expired`.
    pub async fn outcome(mut self) -> Outcome {
        let rx = self.rx.take().expect("outcome awaited once");
        match tokio::time::timeout_at(self.deadline, rx).await {
            Ok(Ok(outcome)) => outcome,
            // Sender dropped without a decision cannot happen while pending; treat as expiry.
            Ok(Err(_)) | Err(_) => Outcome::Expired,
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        self.broker.withdraw(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(quorum: u32, timeout_s: u64) -> ApprovalSpec {
        ApprovalSpec {
            approver_groups: vec!["approvers".into()],
            quorum,
            timeout: Duration::from_secs(timeout_s),
            grant_window: None,
        }
    }

    fn new(identity: &str) -> NewApproval {
        NewApproval {
            identity: identity.into(),
            resource: "db".into(),
            summary: "DELETE FROM t WHERE id = ?".into(),
            statement_hash: "h1".into(),
            rule: "writes-need-approval".into(),
        }
    }

    fn approver(name: &str) -> Approver {
        Approver {
            name: name.into(),
            groups: vec!["approvers".into()],
            any_group: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn quorum_of_two_distinct_approvers() {
        let b = Broker::default();
        let (req, waiter) = b.submit(new("alice"), &spec(2, 60)).unwrap();
        let task = tokio::spawn(waiter.outcome());
        assert_eq!(
            b.decide(&req.id, &approver("bob"), true, None),
            Ok(Decided::Pending {
                approvals: 1,
                quorum: 2
            })
        );
        assert!(matches!(
            b.decide(&req.id, &approver("bob"), true, None),
            Err(ApprovalError::AlreadyApproved { .. })
        ));
        assert_eq!(
            b.decide(&req.id, &approver("carol"), true, None),
            Ok(Decided::Approved)
        );
        assert_eq!(
            task.await.unwrap(),
            Outcome::Approved {
                approvers: vec!["bob".into(), "carol".into()]
            }
        );
        assert!(b.list().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn requester_cannot_approve_and_outsiders_cannot_either() {
        let b = Broker::default();
        let (req, _w) = b.submit(new("alice"), &spec(1, 60)).unwrap();
        assert!(matches!(
            b.decide(&req.id, &approver("alice"), true, None),
            Err(ApprovalError::SelfApproval { .. })
        ));
        let outsider = Approver {
            name: "mallory".into(),
            groups: vec!["analysts".into()],
            any_group: false,
        };
        assert!(matches!(
            b.decide(&req.id, &outsider, true, None),
            Err(ApprovalError::NotAnApprover { .. })
        ));
        let root = Approver {
            name: "alice".into(),
            groups: vec![],
            any_group: true,
        };
        assert!(
            matches!(
                b.decide(&req.id, &root, true, None),
                Err(ApprovalError::SelfApproval { .. })
            ),
            "not even root, for itself"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn timeout_is_a_denial_and_withdraws_the_request() {
        let b = Broker::default();
        let (req, waiter) = b.submit(new("alice"), &spec(1, 30)).unwrap();
        let task = tokio::spawn(waiter.outcome());
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(task.await.unwrap(), Outcome::Expired);
        assert!(b.get(&req.id).is_none());
        assert!(matches!(
            b.decide(&req.id, &approver("bob"), true, None),
            Err(ApprovalError::NotFound { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_denial_ends_it_at_once_with_the_reason() {
        let b = Broker::default();
        let (req, waiter) = b.submit(new("alice"), &spec(2, 30)).unwrap();
        let task = tokio::spawn(waiter.outcome());
        assert_eq!(
            b.decide(&req.id, &approver("bob"), false, Some("no ticket".into())),
            Ok(Decided::Denied)
        );
        assert_eq!(
            task.await.unwrap(),
            Outcome::Denied {
                by: "bob".into(),
                reason: Some("no ticket".into())
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_goes_away_withdraws_its_request() {
        let b = Broker::default();
        let (req, waiter) = b.submit(new("alice"), &spec(1, 30)).unwrap();
        drop(waiter);
        assert!(b.get(&req.id).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn grant_window_covers_the_same_statement_only_until_it_ends() {
        let b = Broker::default();
        let s = ApprovalSpec {
            grant_window: Some(Duration::from_mins(10)),
            ..spec(1, 30)
        };
        let (req, waiter) = b.submit(new("alice"), &s).unwrap();
        let task = tokio::spawn(waiter.outcome());
        b.decide(&req.id, &approver("bob"), true, None).unwrap();
        task.await.unwrap();
        assert!(matches!(
            b.submit(new("alice"), &s),
            Err(Outcome::Granted { .. })
        ));
        let mut other = new("alice");
        other.statement_hash = "h2".into();
        assert!(
            b.submit(other, &s).is_ok(),
            "a different statement needs its own approval"
        );
        assert!(
            b.submit(new("carol"), &s).is_ok(),
            "grants are per identity"
        );
        tokio::time::advance(Duration::from_secs(601)).await;
        assert!(b.submit(new("alice"), &s).is_ok(), "the window has closed");
    }
}
