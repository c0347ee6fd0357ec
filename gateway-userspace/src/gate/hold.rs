//! Holding a command for approval: the request goes to the approval
//! [`Broker`](crate::approval::Broker), an `approval.requested` record is
//! written before the handler may tell the client, and the outcome becomes a
//! forward or a denial with its statement record.
//!
//! Fails closed: a request that cannot be recorded is withdrawn and the
//! command denied; a rejection, an expiry or a client that went away never
//! forwards. The trade-off: the handler reads nothing more from a client
//! whose command is held (its later commands may depend on it), so one held
//! command stalls its whole session until approvers answer or the deadline
//! passes.

use std::{future::Future, pin::Pin};

use serde_json::Value;

use super::{
    ApprovalOutcome, ApprovalRecord, Command, DecisionRecord, Denial, DenialKind, Gate,
    MAX_SUMMARY_CHARS, Outcome, RecordedVerdict, ResultRecord, record::NotRun, truncate_chars,
};
use crate::{
    approval::{self, NewApproval},
    audit::Kind,
    policy::{ApprovalSpec, Decision},
};

/// A command held for approval. Dropping it withdraws the request without a
/// record; [`Gate::withdraw`] records the withdrawal.
pub struct Hold {
    /// The approval request's id (approvers name it).
    pub request_id: String,
    /// When it expires (RFC 3339, UTC).
    pub deadline: String,
    action: Value,
    rule: String,
    outcome: Pin<Box<dyn Future<Output = approval::Outcome> + Send + Sync>>,
}

/// The approvers' answer to a [`Hold`], for [`Gate::release`].
#[derive(Debug)]
pub struct Answer(approval::Outcome);

impl Hold {
    /// Resolves once approvers decide or the deadline passes. Cancel-safe:
    /// a `select!` may poll it again.
    pub async fn decided(&mut self) -> Answer {
        Answer((&mut self.outcome).await)
    }
}

impl<'a> Gate<'a> {
    /// Files the approval request (unless a grant covers the command), records
    /// `approval.requested`, and holds.
    pub(super) async fn hold(
        &self,
        command: Command<'_>,
        decision: &Decision,
        spec: &ApprovalSpec,
    ) -> Outcome<'a> {
        let spec = approval::ApprovalSpec {
            approver_groups: spec.approver_groups.clone(),
            quorum: spec.quorum,
            timeout: spec.timeout,
            grant_window: spec.grant_window,
        };
        let new = NewApproval {
            identity: self.subject.identity.clone(),
            resource: self.resource.name.clone(),
            summary: truncate_chars(command.summary, MAX_SUMMARY_CHARS),
            statement_hash: command.fingerprint,
            rule: decision.rule.clone(),
        };
        match self.approvals.submit(new, &spec) {
            Err(approval::Outcome::Granted { approvers }) => {
                let record = DecisionRecord::allowed(
                    &decision.rule,
                    Some(ApprovalRecord::Outcome(ApprovalOutcome::Granted {
                        approvers,
                    })),
                );
                self.allow(command.action, &record, false).await
            }
            Err(other) => Outcome::Deny(
                self.approval_denied(command.action, &decision.rule, "?", &other)
                    .await,
            ),
            Ok((req, waiter)) => {
                let record = DecisionRecord {
                    verdict: RecordedVerdict::RequireApproval,
                    rule: decision.rule.clone(),
                    reason: None,
                    approval: Some(ApprovalRecord::Requested {
                        id: req.id.clone(),
                        approver_groups: req.approver_groups.clone(),
                        quorum: req.quorum,
                        deadline: req.deadline.clone(),
                    }),
                };
                let ev = self.event(Kind::ApprovalRequested, command.action.clone(), &record);
                if let Err(e) = self.audit.append(ev).await {
                    drop(waiter);
                    return Outcome::Deny(Denial {
                        kind: DenialKind::AuditUnavailable,
                        rule: decision.rule.clone(),
                        reason: e.to_string(),
                    });
                }
                tracing::info!(conn = self.origin.connection_id(), request = %req.id, rule = %decision.rule, "statement held for approval");
                Outcome::Held(Hold {
                    request_id: req.id,
                    deadline: req.deadline,
                    action: command.action,
                    rule: decision.rule.clone(),
                    outcome: Box::pin(waiter.outcome()),
                })
            }
        }
    }

    /// The approvers answered: forward once the statement record is durable,
    /// or deny with the approval's outcome on record.
    pub async fn release(&self, hold: Hold, answer: Answer) -> Outcome<'a> {
        match answer.0 {
            approval::Outcome::Approved { approvers } | approval::Outcome::Granted { approvers } => {
                let record = DecisionRecord::allowed(
                    &hold.rule,
                    Some(ApprovalRecord::Outcome(ApprovalOutcome::Approved {
                        id: hold.request_id,
                        approvers,
                    })),
                );
                self.allow(hold.action, &record, false).await
            }
            other => Outcome::Deny(
                self.approval_denied(hold.action, &hold.rule, &hold.request_id, &other)
                    .await,
            ),
        }
    }

    /// The client went away while its command was held: the request is
    /// withdrawn and the statement recorded as not run.
    pub async fn withdraw(&self, hold: Hold) {
        let Hold {
            request_id,
            action,
            rule,
            outcome,
            ..
        } = hold;
        drop(outcome);
        let record = DecisionRecord {
            verdict: RecordedVerdict::RequireApproval,
            rule,
            reason: None,
            approval: Some(ApprovalRecord::Outcome(ApprovalOutcome::Withdrawn {
                id: request_id.clone(),
            })),
        };
        let mut ev = self.event(Kind::Statement, action, &record);
        ev.result = Some(
            ResultRecord::NotRun {
                status: NotRun::NotRun,
                reason: "client disconnected while held",
            }
            .value(),
        );
        if let Err(e) = self.audit.append(ev).await {
            tracing::error!(error = %e, "audit append failed for a withdrawn statement");
        }
        tracing::info!(conn = self.origin.connection_id(), request = %request_id, "client left; approval request withdrawn");
    }

    /// A rejection or an expiry: the statement record says which, then the denial.
    async fn approval_denied(
        &self,
        action: Value,
        rule: &str,
        id: &str,
        outcome: &approval::Outcome,
    ) -> Denial {
        let (what, approval) = match outcome {
            approval::Outcome::Denied { by, reason } => (
                format!(
                    "denied by {by}{}",
                    reason
                        .as_deref()
                        .map(|r| format!(" ({r})"))
                        .unwrap_or_default()
                ),
                ApprovalOutcome::Denied {
                    id: id.to_owned(),
                    by: by.clone(),
                    reason: reason.clone(),
                },
            ),
            _ => (
                "expired without a decision".to_owned(),
                ApprovalOutcome::Expired { id: id.to_owned() },
            ),
        };
        let record =
            DecisionRecord::denied(rule, what.clone(), Some(ApprovalRecord::Outcome(approval)));
        let _ = self.record(Kind::Statement, action, &record).await;
        Denial {
            kind: DenialKind::Approval {
                request: id.to_owned(),
            },
            rule: rule.to_owned(),
            reason: what,
        }
    }
}
