//! Holding a command for approval: the request goes to the approval
//! [`Broker`](crate::approval::Broker), which writes `approval.requested`
//! before the request exists, and the outcome becomes a forward or a denial
//! with its command record. A command admitted with its decoded action
//! ([`Gate::admit_action`]) is decided again by the broker when the policy
//! is reloaded: released (recorded `approval.released`, then its command
//! record names the rule that now allows it) or denied like any policy
//! denial; the gate keeps what it needs (subject, resource, action) and
//! still imports no protocol.
//!
//! Fails closed: a request that cannot be recorded is a denial; a
//! rejection, an expiry, a withdrawal or a client that went away never
//! forwards. The trade-off: the handler reads nothing more from a client
//! whose command is held (its later commands may depend on it), so one held
//! command stalls its whole session until approvers answer or the deadline
//! passes.

use std::{future::Future, pin::Pin, sync::Arc};

use serde_json::Value;

use super::{
    ApprovalOutcome, Command, DecisionRecord, Denial, DenialKind, Gate, MAX_SUMMARY_CHARS, Outcome,
    ResultRecord, record::NotRun, truncate_chars,
};
use crate::{
    approval::{self, NewApproval, Redecide, Submitted},
    audit::Kind,
    policy::{Action, ApprovalSpec, Decision, PolicySet, Resource, Subject},
};

/// What the broker decides a held command again with when the policy is
/// reloaded: the subject, resource and decoded action the gate decided on.
struct Redecider {
    subject: Subject,
    resource: Resource,
    action: Action,
}

impl Redecide for Redecider {
    fn redecide(&self, policy: &PolicySet) -> Decision {
        policy.decide(&self.subject, &self.resource, &self.action)
    }
}

/// A command held for approval. Dropping it cancels the request (the
/// broker's waiter does) without a command record; [`Gate::cancel`] records it.
pub struct Hold {
    /// The approval request's id (approvers name it).
    pub request_id: String,
    /// When it expires (RFC 3339, UTC).
    pub deadline: String,
    action: Value,
    decision: DecisionRecord,
    outcome: Pin<Box<dyn Future<Output = approval::Outcome> + Send>>,
}

/// The approvers' answer to a [`Hold`], for [`Gate::release`].
#[derive(Debug)]
pub struct Answer(approval::Outcome);

impl Hold {
    /// Resolves once approvers decide, the deadline passes or the request is
    /// withdrawn. Cancel-safe: a `select!` may poll it again.
    pub async fn decided(&mut self) -> Answer {
        Answer((&mut self.outcome).await)
    }
}

impl<'a> Gate<'a> {
    /// Files the approval request (the broker records `approval.requested`),
    /// unless a live grant covers the command, and holds.
    pub(super) async fn hold(
        &self,
        command: Command<'_>,
        decision: &Decision,
        spec: &ApprovalSpec,
        action: Option<&Action>,
    ) -> Outcome<'a> {
        let held = DecisionRecord::of(decision);
        let redecide = action.map(|a| {
            Arc::new(Redecider {
                subject: self.subject.clone(),
                resource: self.resource.clone(),
                action: a.clone(),
            }) as Arc<dyn Redecide>
        });
        let base = self.event(Kind::ApprovalRequested, command.action.clone(), &held);
        let new = NewApproval {
            requester: self.origin.requester(),
            resource: self.resource.name.clone(),
            summary: truncate_chars(command.summary, MAX_SUMMARY_CHARS),
            statement_hash: command.fingerprint,
            class: command.class.to_owned(),
            rule: decision.rule.clone(),
            spec: spec.clone(),
            record: base,
            redecide,
        };
        match self.approvals.submit(new).await {
            Ok(Submitted::Covered { grant }) => {
                let record = DecisionRecord::allowed(
                    &decision.rule,
                    Some(ApprovalOutcome::Granted {
                        grant: grant.id,
                        approvers: grant.approvers,
                    }),
                );
                self.allow(command.action, &record, false).await
            }
            Err(e) => {
                tracing::error!(conn = self.origin.connection_id(), error = %e, "approval request not recorded");
                Outcome::Deny(Denial {
                    kind: DenialKind::AuditUnavailable,
                    rule: decision.rule.clone(),
                    reason: e.to_string(),
                })
            }
            Ok(Submitted::Held { request, waiter }) => {
                tracing::info!(conn = self.origin.connection_id(), request = %request.id, rule = %decision.rule, "statement held for approval");
                Outcome::Held(Hold {
                    request_id: request.id,
                    deadline: request.deadline,
                    action: command.action,
                    decision: held,
                    outcome: Box::pin(waiter.outcome()),
                })
            }
        }
    }

    /// The approvers answered: forward once the command record is durable,
    /// or deny with the approval's outcome on record.
    pub async fn release(&self, hold: Hold, answer: Answer) -> Outcome<'a> {
        let Hold {
            request_id: id,
            action,
            decision,
            ..
        } = hold;
        let rule = decision.rule;
        let (what, outcome, kind) = match answer.0 {
            approval::Outcome::Approved { approvers, grant } => {
                let approved = ApprovalOutcome::Approved {
                    id,
                    approvers,
                    grant,
                };
                let record = DecisionRecord::allowed(&rule, Some(approved));
                return self.allow(action, &record, false).await;
            }
            approval::Outcome::Rejected { by, reason } => (
                format!("rejected by {by} ({reason})"),
                ApprovalOutcome::Rejected {
                    id: id.clone(),
                    by,
                    reason,
                },
                DenialKind::Approval {
                    request: id.clone(),
                },
            ),
            approval::Outcome::Withdrawn { reason } => (
                format!("withdrawn ({reason})"),
                ApprovalOutcome::Withdrawn {
                    id: id.clone(),
                    reason,
                },
                DenialKind::Withdrawn {
                    request: id.clone(),
                },
            ),
            approval::Outcome::Released {
                rule: now,
                reason,
                policy,
            } => {
                let released = ApprovalOutcome::Released {
                    id,
                    held_by: rule,
                    reason,
                    policy,
                };
                let record = DecisionRecord::allowed(&now, Some(released));
                return self.allow(action, &record, false).await;
            }
            approval::Outcome::Refused {
                rule: now,
                reason,
                policy,
            } => {
                let refused = ApprovalOutcome::Refused {
                    id,
                    held_by: rule,
                    policy,
                };
                let record = DecisionRecord::denied(&now, reason.clone(), Some(refused));
                let _ = self.record(Kind::Statement, action, &record).await;
                return Outcome::Deny(Denial {
                    kind: DenialKind::Policy,
                    rule: now,
                    reason,
                });
            }
            approval::Outcome::Expired => (
                "expired without a decision".to_owned(),
                ApprovalOutcome::Expired { id: id.clone() },
                DenialKind::Approval {
                    request: id.clone(),
                },
            ),
        };
        let record = DecisionRecord::denied(&rule, what.clone(), Some(outcome));
        let _ = self.record(Kind::Statement, action, &record).await;
        Outcome::Deny(Denial {
            kind,
            rule,
            reason: what,
        })
    }

    /// The client went away while its command was held: the request is
    /// cancelled (the broker records `approval.cancelled`) and the command
    /// recorded as not run.
    pub async fn cancel(&self, hold: Hold) {
        let Hold {
            request_id: id,
            action,
            mut decision,
            outcome,
            ..
        } = hold;
        drop(outcome);
        self.approvals
            .cancel(&id, "the client disconnected while the statement was held")
            .await;
        decision.approval = Some(ApprovalOutcome::Cancelled { id: id.clone() });
        let mut ev = self.event(Kind::Statement, action, &decision);
        ev.result = Some(
            ResultRecord::NotRun {
                status: NotRun::NotRun,
                reason: "client disconnected while held",
            }
            .value(),
        );
        if let Err(e) = self.audit.append(ev).await {
            tracing::error!(error = %e, "audit append failed for a cancelled statement");
        }
        tracing::info!(conn = self.origin.connection_id(), request = %id, "client left; approval request cancelled");
    }
}
