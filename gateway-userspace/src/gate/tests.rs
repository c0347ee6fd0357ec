//! The gate on its own, with a collecting sink, the real broker and tokio's
//! clock paused: what each outcome is, and what is on record before it.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use serde_json::{Value, json};

use super::*;
use crate::{
    approval::{
        Requester, Settings, Vote,
        testing::{Kept, approver},
    },
    audit::NewRecord,
    policy::{ApprovalSpec, GrantScope, load_str},
};

/// Keeps records in call order; fails every append while `failing`.
#[derive(Default)]
struct Sink {
    records: Mutex<Vec<NewRecord>>,
    failing: AtomicBool,
}

impl AuditSink for Sink {
    fn append(&self, record: NewRecord) -> Recording<'_> {
        let failing = self.failing.load(Ordering::SeqCst);
        if !failing {
            self.records.lock().unwrap().push(record);
        }
        Box::pin(async move {
            if failing {
                Err(AuditUnavailable {
                    reason: "disk full".into(),
                })
            } else {
                Ok(())
            }
        })
    }

    fn append_detached(&self, record: NewRecord) {
        self.records.lock().unwrap().push(record);
    }
}

impl Sink {
    fn last(&self) -> NewRecord {
        self.records
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a record")
    }

    fn len(&self) -> usize {
        self.records.lock().unwrap().len()
    }
}

struct Conn;

impl Origin for Conn {
    fn record(&self, kind: Kind) -> NewRecord {
        NewRecord::new(kind).connection(7).resource("db")
    }

    fn connection_id(&self) -> u64 {
        7
    }

    fn requester(&self) -> Requester {
        Requester {
            identity: "agent".into(),
            identity_kind: "label".into(),
            subject: "agent".into(),
            pid: 42,
            uid: 1000,
            cgroup_id: 9,
            tagged_cgroup_id: 9,
            cgroup: "agents/a".into(),
            conn: 7,
            ..Requester::default()
        }
    }
}

struct Fixture {
    sink: Sink,
    kept: Kept,
    broker: Broker,
    subject: Subject,
    resource: Resource,
}

impl Fixture {
    fn new() -> Self {
        let set = load_str(&[(
            "p.toml",
            "[[resource]]\nname = \"db\"\nprotocol = \"postgres\"\naddresses = [\"127.0.0.1:1\"]\n",
        )])
        .unwrap();
        let kept = Kept::default();
        Self {
            sink: Sink::default(),
            broker: Broker::new(Arc::new(kept.clone()), Settings::default()),
            kept,
            subject: Subject {
                identity: "agent".into(),
                groups: vec![],
            },
            resource: set.resource("db").unwrap().clone(),
        }
    }

    fn gate(&self) -> Gate<'_> {
        Gate::new(
            &Conn,
            &self.subject,
            &self.resource,
            &self.sink,
            &self.broker,
        )
    }

    async fn vote(&self, vote: Vote) {
        let id = self.broker.list().pop().expect("a pending request").id;
        let bob = approver("bob", &["dba"]);
        self.broker.decide(&id, &bob, vote).await.unwrap();
    }
}

fn command(changes_state: bool) -> Command<'static> {
    Command {
        action: json!({"protocol": "test", "class": "write"}),
        fingerprint: "h1".into(),
        class: "write",
        summary: "DELETE FROM t WHERE id = ?",
        changes_state,
    }
}

fn decision(verdict: Verdict) -> Decision {
    Decision {
        verdict,
        rule: "r".into(),
    }
}

fn approval(grant_window: Option<Duration>) -> Decision {
    decision(Verdict::RequireApproval(ApprovalSpec {
        approver_groups: vec!["dba".into()],
        quorum: 1,
        timeout: Duration::from_mins(5),
        grant_window,
        grant_scope: GrantScope::Statement,
    }))
}

fn outcome_of(r: &NewRecord) -> Value {
    r.approval.clone().unwrap_or(Value::Null)["outcome"].clone()
}

#[tokio::test]
async fn a_write_is_forwarded_only_once_its_record_is_durable() {
    let f = Fixture::new();
    let out = f
        .gate()
        .admit(command(true), &decision(Verdict::Allow), None)
        .await;
    assert!(matches!(out, Outcome::Forward { approved: false }));
    let r = f.sink.last();
    assert_eq!(r.kind, Kind::Statement);
    assert_eq!(
        r.decision,
        Some(json!({"verdict": "allow", "rule": "r", "reason": null}))
    );

    f.sink.failing.store(true, Ordering::SeqCst);
    let out = f
        .gate()
        .admit(command(true), &decision(Verdict::Allow), None)
        .await;
    let Outcome::Deny(d) = out else {
        panic!("an unrecorded write must not be forwarded")
    };
    assert_eq!(d.kind, DenialKind::AuditUnavailable);
}

#[tokio::test]
async fn a_read_goes_at_once_and_its_recording_reports_failure() {
    let f = Fixture::new();
    let Outcome::ForwardNow { recording } = f
        .gate()
        .admit(command(false), &decision(Verdict::Allow), None)
        .await
    else {
        panic!("a read is forwarded while its record is written")
    };
    assert!(recording.await.is_ok());

    f.sink.failing.store(true, Ordering::SeqCst);
    let Outcome::ForwardNow { recording } = f
        .gate()
        .admit(command(false), &decision(Verdict::Allow), None)
        .await
    else {
        panic!("a read is forwarded while its record is written")
    };
    assert!(
        recording.await.is_err(),
        "the handler must learn the record failed"
    );
}

#[tokio::test]
async fn a_denial_is_recorded_with_its_reason() {
    let f = Fixture::new();
    let deny = decision(Verdict::Deny {
        reason: "no DDL".into(),
    });
    let out = f.gate().admit(command(true), &deny, None).await;
    let Outcome::Deny(d) = out else {
        panic!("denied")
    };
    assert_eq!(d.kind, DenialKind::Policy);
    assert_eq!(d.rule, "r");
    assert_eq!(
        f.sink.last().decision,
        Some(json!({"verdict": "deny", "rule": "r", "reason": "no DDL"}))
    );
}

#[tokio::test(start_paused = true)]
async fn a_held_command_is_forwarded_after_approval_and_the_record_names_the_approver() {
    let f = Fixture::new();
    let Outcome::Held(mut hold) = f.gate().admit(command(true), &approval(None), None).await else {
        panic!("held")
    };
    assert_eq!(f.kept.kinds(), ["approval.requested"]);
    let requested = f.kept.records.lock().unwrap()[0].clone();
    assert_eq!(requested.action, Some(command(true).action));
    assert_eq!(requested.decision.unwrap()["verdict"], "require_approval");
    assert_eq!(f.sink.len(), 0, "nothing is forwarded or recorded as run");

    f.vote(Vote::Approve {
        reason: None,
        ticket: None,
    })
    .await;
    let answer = hold.decided().await;
    let out = f.gate().release(hold, answer).await;
    assert!(matches!(out, Outcome::Forward { approved: true }));
    let r = f.sink.last();
    assert_eq!(r.decision.as_ref().unwrap()["verdict"], "allow");
    assert_eq!(outcome_of(&r), "approved");
    assert_eq!(r.approval.unwrap()["approvers"][0], "bob");
}

#[tokio::test(start_paused = true)]
async fn a_rejection_is_a_denial_with_the_approvers_reason() {
    let f = Fixture::new();
    let Outcome::Held(mut hold) = f.gate().admit(command(true), &approval(None), None).await else {
        panic!("held")
    };
    f.vote(Vote::Reject {
        reason: "not in the change window".into(),
        ticket: None,
    })
    .await;
    let answer = hold.decided().await;
    let Outcome::Deny(d) = f.gate().release(hold, answer).await else {
        panic!("denied")
    };
    assert!(matches!(d.kind, DenialKind::Approval { .. }));
    assert!(
        d.reason
            .contains("rejected by bob (not in the change window)"),
        "{}",
        d.reason
    );
    let r = f.sink.last();
    assert_eq!(r.decision.as_ref().unwrap()["verdict"], "deny");
    assert_eq!(outcome_of(&r), "rejected");
}

#[tokio::test(start_paused = true)]
async fn nobody_deciding_in_time_is_an_expiry() {
    let f = Fixture::new();
    let Outcome::Held(mut hold) = f.gate().admit(command(true), &approval(None), None).await else {
        panic!("held")
    };
    tokio::time::advance(Duration::from_mins(6)).await;
    let answer = hold.decided().await;
    let Outcome::Deny(d) = f.gate().release(hold, answer).await else {
        panic!("denied")
    };
    assert_eq!(d.reason, "expired without a decision");
    assert_eq!(outcome_of(&f.sink.last()), "expired");
    assert!(f.kept.kinds().contains(&"approval.expired"));
}

#[tokio::test(start_paused = true)]
async fn a_withdrawn_request_is_its_own_denial() {
    let f = Fixture::new();
    let Outcome::Held(mut hold) = f.gate().admit(command(true), &approval(None), None).await else {
        panic!("held")
    };
    assert_eq!(
        f.broker
            .withdraw_connection(7, "the client cancelled")
            .await,
        1
    );
    let answer = hold.decided().await;
    let Outcome::Deny(d) = f.gate().release(hold, answer).await else {
        panic!("denied")
    };
    assert!(matches!(d.kind, DenialKind::Withdrawn { .. }));
    assert_eq!(outcome_of(&f.sink.last()), "withdrawn");
}

#[tokio::test(start_paused = true)]
async fn a_client_that_leaves_cancels_its_request_on_record() {
    let f = Fixture::new();
    let Outcome::Held(hold) = f.gate().admit(command(true), &approval(None), None).await else {
        panic!("held")
    };
    f.gate().cancel(hold).await;
    assert!(f.broker.list().is_empty());
    assert!(f.kept.kinds().contains(&"approval.cancelled"));
    let r = f.sink.last();
    assert_eq!(outcome_of(&r), "cancelled");
    assert_eq!(r.result.unwrap()["status"], "not_run");
}

#[tokio::test(start_paused = true)]
async fn a_grant_covers_the_same_command_until_its_window_ends() {
    let f = Fixture::new();
    let rule = approval(Some(Duration::from_mins(10)));
    let Outcome::Held(mut hold) = f.gate().admit(command(true), &rule, None).await else {
        panic!("held")
    };
    f.vote(Vote::Approve {
        reason: None,
        ticket: None,
    })
    .await;
    let answer = hold.decided().await;
    assert!(matches!(
        f.gate().release(hold, answer).await,
        Outcome::Forward { approved: true }
    ));
    let grant = f.sink.last().approval.unwrap()["grant"].clone();
    assert!(grant.as_str().is_some_and(|g| g.starts_with("grt-")));

    let out = f.gate().admit(command(true), &rule, None).await;
    assert!(matches!(out, Outcome::Forward { approved: true }));
    let r = f.sink.last();
    assert_eq!(outcome_of(&r), "granted");
    assert_eq!(r.approval.unwrap()["grant"], grant);

    tokio::time::advance(Duration::from_mins(11)).await;
    let out = f.gate().admit(command(true), &rule, None).await;
    assert!(
        matches!(out, Outcome::Held(_)),
        "held again after the window"
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_that_cannot_be_recorded_is_denied() {
    let f = Fixture::new();
    f.kept.fail(true);
    let Outcome::Deny(d) = f.gate().admit(command(true), &approval(None), None).await else {
        panic!("denied")
    };
    assert_eq!(d.kind, DenialKind::AuditUnavailable);
    assert!(f.broker.list().is_empty());
}

#[tokio::test]
async fn an_approval_that_covers_the_command_is_named_in_its_record() {
    let f = Fixture::new();
    let covered = Covered {
        by: "the approval of its parse",
    };
    let out = f
        .gate()
        .admit(command(false), &approval(None), Some(covered))
        .await;
    assert!(matches!(out, Outcome::Forward { approved: true }));
    assert_eq!(
        f.sink.last().approval,
        Some(json!({"outcome": "granted", "covered_by": "the approval of its parse"}))
    );
}

/// The held command's policy, then the reloads that decide it again: `r`
/// asks for approval of DDL; `after` is what the reloaded policy says.
fn policies(after: &str) -> (PolicySet, PolicySet) {
    let base =
        "[[resource]]\nname = \"db\"\nprotocol = \"postgres\"\naddresses = [\"127.0.0.1:1\"]\n";
    let held = format!(
        "{base}[[rule]]\nname = \"r\"\nidentities = [\"agent\"]\nresources = [\"db\"]\nmatch = {{ sql = [\"ddl\"] }}\naction = \"require_approval\"\napproval = {{ approver_groups = [\"dba\"], timeout = \"5m\" }}\n"
    );
    let now = format!(
        "{base}[[rule]]\nname = \"r2\"\nidentities = [\"agent\"]\nresources = [\"db\"]\nmatch = {{ sql = [\"ddl\"] }}\naction = \"{after}\"\n"
    );
    (
        load_str(&[("p.toml", &held)]).unwrap(),
        load_str(&[("p.toml", &now)]).unwrap(),
    )
}

fn drop_table() -> Action {
    Action::Sql(Arc::new(crate::sql::classify(
        "DROP TABLE t",
        crate::sql::Dialect::Postgres,
    )))
}

/// Holds DROP TABLE under `held`'s rule, with `held`'s resource.
async fn hold_under(f: &Fixture, filed: &PolicySet) -> Hold {
    let action = drop_table();
    let resource = filed.resource("db").unwrap();
    let gate = Gate::new(&Conn, &f.subject, resource, &f.sink, &f.broker);
    let decision = gate.decide(filed, &action);
    assert_eq!(decision.rule, "r");
    let Outcome::Held(hold) = gate
        .admit_action(command(true), &decision, None, &action)
        .await
    else {
        panic!("held")
    };
    hold
}

#[tokio::test(start_paused = true)]
async fn a_reload_that_allows_a_held_command_releases_it_on_record() {
    let f = Fixture::new();
    let (filed, now) = policies("allow");
    let mut hold = hold_under(&f, &filed).await;
    let id = hold.request_id.clone();
    assert_eq!(
        f.broker.policy_reloaded(&now).await,
        [(id.clone(), "released")]
    );
    assert!(f.broker.list().is_empty());
    let kept = f.kept.records.lock().unwrap().last().cloned().unwrap();
    assert_eq!(kept.kind, Kind::ApprovalReleased);
    let a = kept.approval.unwrap();
    assert_eq!(
        (a["id"].as_str(), a["rule"].as_str(), a["held_by"].as_str()),
        (Some(id.as_str()), Some("r2"), Some("r"))
    );
    assert_eq!(a["policy_digest"], now.digest());
    let answer = hold.decided().await;
    let out = f.gate().release(hold, answer).await;
    assert!(
        matches!(out, Outcome::Forward { approved: false }),
        "released, not approved"
    );
    let r = f.sink.last();
    assert_eq!(
        r.decision,
        Some(json!({"verdict": "allow", "rule": "r2", "reason": null}))
    );
    assert_eq!(outcome_of(&r), "released");
    assert_eq!(r.approval.unwrap()["held_by"], "r");
}

#[tokio::test(start_paused = true)]
async fn a_reload_that_denies_a_held_command_denies_it_on_record() {
    let f = Fixture::new();
    let (filed, now) = policies("deny");
    let mut hold = hold_under(&f, &filed).await;
    assert_eq!(f.broker.policy_reloaded(&now).await.len(), 1);
    assert_eq!(f.kept.kinds().last().copied(), Some("approval.refused"));
    let answer = hold.decided().await;
    let Outcome::Deny(d) = f.gate().release(hold, answer).await else {
        panic!("denied")
    };
    assert_eq!((d.kind, d.rule.as_str()), (DenialKind::Policy, "r2"));
    assert!(d.reason.contains("denied by rule `r2`"), "{}", d.reason);
    let r = f.sink.last();
    assert_eq!(r.decision.as_ref().unwrap()["verdict"], "deny");
    assert_eq!(outcome_of(&r), "refused");
}

#[tokio::test(start_paused = true)]
async fn a_reload_that_still_asks_leaves_the_request_and_a_failed_record_releases_nothing() {
    let f = Fixture::new();
    let (filed, allow) = policies("allow");
    let hold = hold_under(&f, &filed).await;
    // The same policy again: still held, as filed.
    assert!(f.broker.policy_reloaded(&filed).await.is_empty());
    assert_eq!(f.broker.list().len(), 1);
    // The release cannot be recorded: it does not happen.
    f.kept.fail(true);
    assert!(f.broker.policy_reloaded(&allow).await.is_empty());
    assert_eq!(f.broker.list()[0].id, hold.request_id);
    f.kept.fail(false);
    // A command held without its action waits for approvers whatever the policy.
    let other = f.gate().admit(command(true), &approval(None), None).await;
    assert!(matches!(other, Outcome::Held(_)));
    assert_eq!(f.broker.policy_reloaded(&allow).await.len(), 1);
    assert_eq!(f.broker.list().len(), 1);
}
