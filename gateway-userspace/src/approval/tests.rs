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
