//! The broker's lifecycle, with the tokio clock paused.

use std::{sync::Arc, time::Duration};

use super::{testing::*, *};
use crate::audit::{Kind, NewRecord};

fn spec(quorum: u32, timeout_s: u64) -> ApprovalSpec {
    ApprovalSpec {
        approver_groups: vec!["approvers".into()],
        quorum,
        timeout: Duration::from_secs(timeout_s),
        grant_window: None,
        grant_scope: GrantScope::Statement,
    }
}

fn requester(identity: &str) -> Requester {
    Requester {
        identity: identity.into(),
        identity_kind: "human".into(),
        issuer: Some("https://idp.test".into()),
        subject: format!("sub-{identity}"),
        groups: vec!["agents".into()],
        pid: 42,
        exe: Some("/usr/bin/psql".into()),
        uid: 0,
        cgroup_id: 1001,
        tagged_cgroup_id: 1000,
        cgroup: "/agentgate/exec-1/leaf".into(),
        conn: 7,
    }
}

fn new(identity: &str, s: &ApprovalSpec) -> NewApproval {
    NewApproval {
        requester: requester(identity),
        resource: "db".into(),
        summary: "DELETE FROM t WHERE id = ?".into(),
        statement_hash: "h1".into(),
        class: "write".into(),
        rule: "writes-need-approval".into(),
        spec: s.clone(),
        record: NewRecord::new(Kind::ApprovalRequested),
        redecide: None,
    }
}

fn approve() -> Vote {
    Vote::Approve {
        reason: None,
        ticket: None,
    }
}

fn held(s: Submitted) -> (ApprovalRequest, Waiter) {
    match s {
        Submitted::Held { request, waiter } => (request, waiter),
        Submitted::Covered { grant } => panic!("covered by {}", grant.id),
    }
}

fn broker(rec: &Kept) -> Broker {
    Broker::new(Arc::new(rec.clone()), Settings::default())
}

#[tokio::test(start_paused = true)]
async fn quorum_counts_distinct_verified_identities() {
    let rec = Kept::default();
    let b = broker(&rec);
    let (req, waiter) = held(b.submit(new("agent", &spec(2, 60))).await.unwrap());
    let task = tokio::spawn(waiter.outcome());
    let bob = approver("bob", &["approvers"]);
    assert_eq!(
        b.decide(&req.id, &bob, approve()).await.unwrap(),
        Decided::Pending {
            approvals: 1,
            quorum: 2
        }
    );
    // The same subject at the same issuer under another name counts once.
    let bob_again = Approver {
        name: "robert".into(),
        ..bob.clone()
    };
    assert!(matches!(
        b.decide(&req.id, &bob_again, approve()).await,
        Err(ApprovalError::AlreadyVoted { .. })
    ));
    let carol = approver("carol", &["approvers"]);
    assert_eq!(
        b.decide(&req.id, &carol, approve()).await.unwrap(),
        Decided::Approved { grant: None }
    );
    assert_eq!(
        task.await.unwrap(),
        Outcome::Approved {
            approvers: vec!["bob".into(), "carol".into()],
            grant: None
        }
    );
    assert!(b.list().is_empty());
    assert_eq!(
        rec.kinds(),
        ["approval.requested", "approval.vote", "approval.granted"]
    );
}

#[tokio::test(start_paused = true)]
async fn a_vote_that_cannot_be_recorded_changes_nothing() {
    let rec = Kept::default();
    let b = broker(&rec);
    let (req, waiter) = held(b.submit(new("agent", &spec(1, 60))).await.unwrap());
    let mut task = tokio::spawn(waiter.outcome());
    rec.fail(true);
    let bob = approver("bob", &["approvers"]);
    assert!(matches!(
        b.decide(&req.id, &bob, approve()).await,
        Err(ApprovalError::NotRecorded { .. })
    ));
    assert!(
        b.get(&req.id).unwrap().votes.is_empty(),
        "still pending, no vote"
    );
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(1), &mut task)
            .await
            .is_err(),
        "nothing released"
    );
    rec.fail(false);
    b.decide(&req.id, &bob, approve()).await.unwrap();
    assert!(matches!(task.await.unwrap(), Outcome::Approved { .. }));
}

#[tokio::test(start_paused = true)]
async fn the_requester_never_votes_nor_anyone_bound_to_its_cgroup() {
    let rec = Kept::default();
    let b = broker(&rec);
    let (req, _w) = held(b.submit(new("agent", &spec(1, 60))).await.unwrap());
    let as_itself = approver("agent", &["approvers"]);
    assert!(matches!(
        b.decide(&req.id, &as_itself, approve()).await,
        Err(ApprovalError::SelfApproval { .. })
    ));
    // Another name, the same subject at the same issuer.
    let alias = Approver {
        name: "agent-alias".into(),
        ..as_itself
    };
    assert!(matches!(
        b.decide(&req.id, &alias, approve()).await,
        Err(ApprovalError::SelfApproval { .. })
    ));
    // A different person whose session is bound to the requesting cgroup
    // (by id), or to an ancestor of it (by path).
    let mut bound = approver("bob", &["approvers"]);
    bound.bound_cgroups = vec![1000];
    let e = b.decide(&req.id, &bound, approve()).await.unwrap_err();
    assert!(matches!(e, ApprovalError::SelfApproval { .. }), "{e}");
    assert!(
        e.to_string().contains("bound to the requesting cgroup"),
        "{e}"
    );
    let mut above = approver("bob", &["approvers"]);
    above.bound_cgroup_paths = vec!["/agentgate/exec-1".into()];
    assert!(matches!(
        b.decide(&req.id, &above, approve()).await,
        Err(ApprovalError::SelfApproval { .. })
    ));
    let mut sibling = approver("bob", &["approvers"]);
    sibling.bound_cgroup_paths = vec!["/agentgate/exec-10".into()];
    sibling.bound_cgroups = vec![2000];
    assert_eq!(
        b.decide(&req.id, &sibling, approve()).await.unwrap(),
        Decided::Approved { grant: None },
        "a sibling cgroup is someone else's workload"
    );
    assert_eq!(
        rec.kinds(),
        ["approval.requested", "approval.granted"],
        "refused votes write nothing"
    );
}

#[tokio::test(start_paused = true)]
async fn only_members_vote_and_labels_only_where_allowed() {
    let rec = Kept::default();
    let b = broker(&rec);
    let (req, _w) = held(b.submit(new("agent", &spec(1, 60))).await.unwrap());
    let analyst = approver("alice", &["analysts"]);
    let e = b.decide(&req.id, &analyst, approve()).await.unwrap_err();
    assert!(matches!(e, ApprovalError::NotAnApprover { .. }), "{e}");
    let label = Approver {
        issuer: None,
        subject: "approver".into(),
        kind: ApproverKind::Label,
        ..approver("approver", &["approvers"])
    };
    assert!(matches!(
        b.decide(&req.id, &label, approve()).await,
        Err(ApprovalError::LabelNotAllowed { .. })
    ));
    let lenient = Broker::new(
        Arc::new(rec.clone()),
        Settings {
            allow_labels: true,
            ..Settings::default()
        },
    );
    let (req2, _w2) = held(lenient.submit(new("agent", &spec(1, 60))).await.unwrap());
    lenient.decide(&req2.id, &label, approve()).await.unwrap();
    let granted = rec.records.lock().unwrap().last().cloned().unwrap();
    assert_eq!(granted.kind, Kind::ApprovalGranted);
    assert_eq!(granted.identity.unwrap().kind, "label");
}

#[tokio::test(start_paused = true)]
async fn a_rejection_needs_a_reason_and_reaches_the_client_with_it() {
    let rec = Kept::default();
    let b = broker(&rec);
    let (req, waiter) = held(b.submit(new("agent", &spec(2, 60))).await.unwrap());
    let task = tokio::spawn(waiter.outcome());
    let bob = approver("bob", &["approvers"]);
    let reject = |reason: &str| Vote::Reject {
        reason: reason.into(),
        ticket: None,
    };
    assert!(matches!(
        b.decide(&req.id, &bob, reject("  ")).await,
        Err(ApprovalError::ReasonRequired)
    ));
    assert_eq!(
        b.decide(&req.id, &bob, reject("no change ticket"))
            .await
            .unwrap(),
        Decided::Rejected,
        "one rejection ends it, whatever the quorum"
    );
    assert_eq!(
        task.await.unwrap(),
        Outcome::Rejected {
            by: "bob".into(),
            reason: "no change ticket".into()
        }
    );
    let denied = rec.records.lock().unwrap().last().cloned().unwrap();
    assert_eq!(denied.kind, Kind::ApprovalDenied);
    assert_eq!(denied.approval.unwrap()["reason"], "no change ticket");
}

#[tokio::test(start_paused = true)]
async fn tickets_match_the_configured_pattern_or_the_safe_default() {
    let rec = Kept::default();
    let vote = |t: &str| Vote::Approve {
        reason: None,
        ticket: Some(t.into()),
    };
    let bob = approver("bob", &["approvers"]);
    let b = broker(&rec);
    let (req, _w) = held(b.submit(new("agent", &spec(2, 60))).await.unwrap());
    for bad in ["", "has space", "semi;colon", &"x".repeat(129)] {
        assert!(
            matches!(
                b.decide(&req.id, &bob, vote(bad)).await,
                Err(ApprovalError::BadTicket { .. })
            ),
            "{bad:?}"
        );
    }
    b.decide(&req.id, &bob, vote("JIRA-12/a#3")).await.unwrap();

    let strict = Broker::new(
        Arc::new(rec.clone()),
        Settings {
            ticket_pattern: Some(regex::Regex::new("^(?:CHG-[0-9]{4})$").unwrap()),
            ..Settings::default()
        },
    );
    let (req, _w) = held(strict.submit(new("agent", &spec(2, 60))).await.unwrap());
    let e = strict
        .decide(&req.id, &bob, vote("CHG-12"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("CHG-[0-9]{4}"), "{e}");
    strict
        .decide(&req.id, &bob, vote("CHG-1234"))
        .await
        .unwrap();
    let v = rec.records.lock().unwrap().last().cloned().unwrap();
    assert_eq!(v.approval.unwrap()["ticket"], "CHG-1234");
}

#[tokio::test(start_paused = true)]
async fn the_deadline_records_expiry_then_denies() {
    let rec = Kept::default();
    let b = broker(&rec);
    let mut events = b.subscribe();
    let (req, waiter) = held(b.submit(new("agent", &spec(1, 30))).await.unwrap());
    let task = tokio::spawn(waiter.outcome());
    tokio::time::advance(Duration::from_secs(29)).await;
    assert_eq!(b.pending_count(), 1);
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(task.await.unwrap(), Outcome::Expired);
    assert_eq!(rec.kinds(), ["approval.requested", "approval.expired"]);
    assert!(b.get(&req.id).is_none());
    assert!(matches!(
        b.decide(&req.id, &approver("bob", &["approvers"]), approve())
            .await,
        Err(ApprovalError::NotFound { .. })
    ));
    assert!(matches!(
        events.recv().await.unwrap(),
        ApprovalEvent::Requested { .. }
    ));
    match events.recv().await.unwrap() {
        ApprovalEvent::Decided { outcome, .. } => assert_eq!(outcome, "expired"),
        e @ ApprovalEvent::Requested { .. } => panic!("{e:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_client_that_goes_away_cancels_its_request_on_record() {
    let rec = Kept::default();
    let b = broker(&rec);
    let (req, waiter) = held(b.submit(new("agent", &spec(1, 30))).await.unwrap());
    drop(waiter);
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(b.get(&req.id).is_none());
    assert_eq!(rec.kinds(), ["approval.requested", "approval.cancelled"]);
    assert!(!b.cancel(&req.id, "again").await, "ends once");
}

#[tokio::test(start_paused = true)]
async fn a_request_that_cannot_be_recorded_is_not_filed() {
    let rec = Kept::default();
    let b = broker(&rec);
    rec.fail(true);
    assert!(matches!(
        b.submit(new("agent", &spec(1, 30))).await,
        Err(ApprovalError::NotRecorded { .. })
    ));
    assert_eq!(b.pending_count(), 0);
}

fn windowed(scope: GrantScope) -> ApprovalSpec {
    ApprovalSpec {
        grant_window: Some(Duration::from_mins(10)),
        grant_scope: scope,
        ..spec(1, 30)
    }
}

async fn approve_one(b: &Broker, n: NewApproval) -> Option<String> {
    let (req, waiter) = held(b.submit(n).await.unwrap());
    let task = tokio::spawn(waiter.outcome());
    b.decide(&req.id, &approver("bob", &["approvers"]), approve())
        .await
        .unwrap();
    match task.await.unwrap() {
        Outcome::Approved { grant, .. } => grant,
        o => panic!("{o:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_grant_covers_the_same_statement_within_its_window_only() {
    let rec = Kept::default();
    let b = broker(&rec);
    let s = windowed(GrantScope::Statement);
    let grant = approve_one(&b, new("agent", &s)).await.expect("a grant");
    assert!(grant.starts_with("grt-"), "{grant}");
    for _ in 0..2 {
        match b.submit(new("agent", &s)).await.unwrap() {
            Submitted::Covered { grant: g } => assert_eq!(g.id, grant),
            Submitted::Held { .. } => panic!("held within the window"),
        }
    }
    assert_eq!(b.grants()[0].uses, 2);
    let mut other = new("agent", &s);
    other.statement_hash = "h2".into();
    assert!(
        matches!(b.submit(other).await.unwrap(), Submitted::Held { .. }),
        "another statement needs its own approval"
    );
    assert!(
        matches!(
            b.submit(new("other-agent", &s)).await.unwrap(),
            Submitted::Held { .. }
        ),
        "grants are per identity"
    );
    tokio::time::advance(Duration::from_secs(601)).await;
    assert!(
        matches!(
            b.submit(new("agent", &s)).await.unwrap(),
            Submitted::Held { .. }
        ),
        "the window has closed"
    );
    assert!(b.grants().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_class_grant_covers_other_statements_of_the_class_on_the_resource() {
    let rec = Kept::default();
    let b = broker(&rec);
    let s = windowed(GrantScope::Class);
    approve_one(&b, new("agent", &s)).await.expect("a grant");
    let mut other = new("agent", &s);
    other.statement_hash = "h2".into();
    assert!(matches!(
        b.submit(other).await.unwrap(),
        Submitted::Covered { .. }
    ));
    let mut ddl = new("agent", &s);
    ddl.class = "ddl".into();
    assert!(matches!(
        b.submit(ddl).await.unwrap(),
        Submitted::Held { .. }
    ));
    let mut elsewhere = new("agent", &s);
    elsewhere.resource = "other-db".into();
    assert!(matches!(
        b.submit(elsewhere).await.unwrap(),
        Submitted::Held { .. }
    ));
}

#[tokio::test(start_paused = true)]
async fn revoking_a_grant_is_recorded_first_and_ends_it() {
    let rec = Kept::default();
    let b = broker(&rec);
    let s = windowed(GrantScope::Statement);
    let grant = approve_one(&b, new("agent", &s)).await.unwrap();
    let outsider = approver("alice", &["analysts"]);
    assert!(matches!(
        b.revoke(&grant, &outsider, None).await,
        Err(ApprovalError::NotAnApprover { .. })
    ));
    let bob = approver("bob", &["approvers"]);
    rec.fail(true);
    assert!(matches!(
        b.revoke(&grant, &bob, None).await,
        Err(ApprovalError::NotRecorded { .. })
    ));
    assert_eq!(b.grants().len(), 1, "unrecorded: still live");
    rec.fail(false);
    let g = b
        .revoke(&grant, &bob, Some("incident over".into()))
        .await
        .unwrap();
    assert_eq!(g.id, grant);
    assert_eq!(rec.kinds().last(), Some(&"grant.revoked"));
    assert!(b.grants().is_empty());
    assert!(matches!(
        b.submit(new("agent", &s)).await.unwrap(),
        Submitted::Held { .. }
    ));
    assert!(matches!(
        b.revoke(&grant, &bob, None).await,
        Err(ApprovalError::GrantNotFound { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn a_reopened_store_cancels_what_was_pending_and_keeps_grants_until_they_end() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("approvals.redb");
    let rec = Kept::default();
    let s = windowed(GrantScope::Statement);
    let (grant, pending_id) = {
        let b = Broker::open(Arc::new(rec.clone()), Settings::default(), &path)
            .await
            .unwrap();
        let grant = approve_one(&b, new("agent", &s)).await.unwrap();
        let (req, waiter) = held(b.submit(new("other-agent", &s)).await.unwrap());
        // The daemon dies: the waiter goes without a runtime to record its
        // cancellation, and the store still holds the request.
        std::thread::spawn(move || drop(waiter)).join().unwrap();
        (grant, req.id)
    };
    let after = Kept::default();
    let b = Broker::open(Arc::new(after.clone()), Settings::default(), &path)
        .await
        .unwrap();
    let recs = after.records.lock().unwrap().clone();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].kind, Kind::ApprovalCancelled);
    let a = recs[0].approval.clone().unwrap();
    assert_eq!(a["id"], pending_id.as_str());
    assert!(a["reason"].as_str().unwrap().contains("daemon restarted"));
    assert_eq!(recs[0].identity.as_ref().unwrap().kind, "human");
    assert!(b.list().is_empty());
    match b.submit(new("agent", &s)).await.unwrap() {
        Submitted::Covered { grant: g } => assert_eq!(g.id, grant),
        Submitted::Held { .. } => panic!("the grant did not survive the restart"),
    }
    drop(b);
    // Once more: nothing pending any more, and the use count was kept.
    let b = Broker::open(Arc::new(after.clone()), Settings::default(), &path)
        .await
        .unwrap();
    assert_eq!(after.records.lock().unwrap().len(), 1);
    assert_eq!(b.grants()[0].uses, 1);
}

#[tokio::test(start_paused = true)]
async fn a_store_that_cannot_be_opened_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("approvals.redb");
    std::fs::write(&path, b"garbage").unwrap();
    let e = Broker::open(Arc::new(Accepting), Settings::default(), &path)
        .await
        .err()
        .expect("refused");
    assert!(e.to_string().contains("approvals.redb"), "{e}");
}

#[tokio::test(start_paused = true)]
async fn concurrent_votes_release_once() {
    let rec = Kept::default();
    let b = broker(&rec);
    let (req, waiter) = held(b.submit(new("agent", &spec(1, 60))).await.unwrap());
    let task = tokio::spawn(waiter.outcome());
    let votes: Vec<_> = ["bob", "carol", "dave"]
        .into_iter()
        .map(|n| {
            let (b, id) = (b.clone(), req.id.clone());
            tokio::spawn(
                async move { b.decide(&id, &approver(n, &["approvers"]), approve()).await },
            )
        })
        .collect();
    let mut approved = 0;
    for v in votes {
        match v.await.unwrap() {
            Ok(Decided::Approved { .. }) => approved += 1,
            Err(ApprovalError::NotFound { .. }) => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(approved, 1);
    assert!(matches!(task.await.unwrap(), Outcome::Approved { .. }));
    assert_eq!(
        rec.kinds()
            .iter()
            .filter(|k| **k == "approval.granted")
            .count(),
        1
    );
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_statement_withdraws_its_request_and_is_denied() {
    let rec = Kept::default();
    let b = broker(&rec);
    let (req, waiter) = held(b.submit(new("agent", &spec(1, 60))).await.unwrap());
    let task = tokio::spawn(waiter.outcome());
    assert_eq!(b.withdraw_connection(8, "other connection").await, 0);
    assert_eq!(b.withdraw_connection(7, "the client cancelled").await, 1);
    assert_eq!(
        task.await.unwrap(),
        Outcome::Withdrawn {
            reason: "the client cancelled".into()
        }
    );
    assert!(b.get(&req.id).is_none());
    assert_eq!(rec.kinds(), ["approval.requested", "approval.withdrawn"]);
}
