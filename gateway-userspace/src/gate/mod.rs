//! The command gate: protocol handlers decode and render; the gate decides.
//!
//! For each classified command a handler asks the gate, which decides by
//! policy (subject, resource, action), appends the write-ahead record, holds
//! for approval, and records denials and results. It answers with one
//! [`Outcome`]: forward now, forward (the record is durable), deny, or held;
//! the handler renders that in its own protocol (a Postgres `ErrorResponse`,
//! a `MySQL` `ERR` packet, an HTTP 403) and keeps its wire state machine.
//! Every record the gate writes carries the same [`DecisionRecord`] shape
//! whatever the protocol.
//!
//! Fails closed: a command that can change state is forwarded only once its
//! record is durable, and denied if it cannot be written; a read may go at
//! once, but the handler must withhold what it causes until its
//! [`Recording`] resolves, and end the session if it fails. An approval
//! request that cannot be recorded is a denial. The trade-off: reads pay no
//! log round trip before they run (pipelining), at the price of the handler
//! buffering their results; writes pay one durable append each.
//!
//! - [`sink`]: where records go ([`AuditSink`]).
//! - [`record`]: the typed decision, approval and result fields.
//! - [`hold`]: a command waiting for approvers ([`Hold`]).
//!
//! The gate borrows what it needs from the handler's per-connection context
//! and imports no protocol.

pub mod hold;
pub mod record;
pub mod sink;
#[cfg(test)]
mod tests;

use serde_json::Value;

pub use hold::Hold;
pub use record::{ApprovalOutcome, DecisionRecord, RecordedVerdict, ResultRecord, truncate_chars};
pub use sink::{AuditSink, AuditUnavailable, Recording};

use crate::{
    approval::{Broker, Requester},
    audit::{Kind, NewRecord},
    policy::{Action, Decision, PolicySet, Resource, Subject, Verdict},
};

/// Redacted command text kept in an approval request's summary.
pub const MAX_SUMMARY_CHARS: usize = 2000;

/// Who acted and from where: the connection a command came on. Fills in
/// identity, workload, session and resource of every record the gate writes.
pub trait Origin: Send + Sync {
    /// A record of `kind` with who, from where and to what filled in.
    fn record(&self, kind: Kind) -> NewRecord;
    /// The connection id, for logs.
    fn connection_id(&self) -> u64;
    /// Who asks when a command is held: identity and kernel provenance.
    fn requester(&self) -> Requester;
}

/// One connection's gate. Cheap to copy: it borrows the connection's context.
#[derive(Clone, Copy)]
pub struct Gate<'a> {
    origin: &'a dyn Origin,
    subject: &'a Subject,
    resource: &'a Resource,
    audit: &'a dyn AuditSink,
    approvals: &'a Broker,
}

/// A command, as the handler describes it to the gate.
pub struct Command<'s> {
    /// The record's `action`: the protocol's own description of the command
    /// (redacted text, keyed hash, class, tables...). Never a raw value.
    pub action: Value,
    /// Keyed hash of the full command: what a `statement` grant is bound to.
    pub fingerprint: String,
    /// The command's class (`read`, `write`, `ddl`, ...): what a `class`
    /// grant is bound to.
    pub class: &'s str,
    /// Redacted text approvers see (the gate cuts it to
    /// [`MAX_SUMMARY_CHARS`]); only read when the command is held.
    pub summary: &'s str,
    /// Forwarding it may change state: its record must be durable first.
    /// `false` only for reads (and transaction control) that change nothing.
    pub changes_state: bool,
}

/// What the handler does with a command.
#[must_use]
pub enum Outcome<'a> {
    /// Forward now; the record is being written. Nothing the command causes
    /// may reach the client before `recording` resolves; if it fails, the
    /// handler withholds everything not yet released and ends the session.
    ForwardNow { recording: Recording<'a> },
    /// Forward: the write-ahead record is durable. `approved`: an approval
    /// (or a grant, or an approval covering it) stands behind it.
    Forward { approved: bool },
    /// Do not forward; answer with a protocol-native error.
    Deny(Denial),
    /// Held for approval: tell the client (`hold.request_id`,
    /// `hold.deadline`), read nothing more from it, wait on
    /// [`Hold::decided`], then pass the answer to [`Gate::release`].
    Held(Hold),
}

/// Why a command is not run, for the handler to render.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub kind: DenialKind,
    /// The rule that decided (for a held command: the rule that asked for approval).
    pub rule: String,
    /// The recorded reason.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenialKind {
    /// A policy rule (or a handler's own check, named like a rule) denies it.
    Policy,
    /// Its approval request `request` was rejected or expired; `reason` says which.
    Approval { request: String },
    /// Its approval request was withdrawn while the client waited (the
    /// client's own cancel): Postgres `57014`.
    Withdrawn { request: String },
    /// Its record could not be written, so it was not run (Postgres `58030`,
    /// HTTP 503).
    AuditUnavailable,
}

/// An approval given earlier that stands for this command (see
/// [`ApprovalOutcome::Covered`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Covered {
    /// Which approval, in the record's words.
    pub by: &'static str,
}

impl<'a> Gate<'a> {
    pub fn new(
        origin: &'a dyn Origin,
        subject: &'a Subject,
        resource: &'a Resource,
        audit: &'a dyn AuditSink,
        approvals: &'a Broker,
    ) -> Self {
        Self {
            origin,
            subject,
            resource,
            audit,
            approvals,
        }
    }

    /// The policy's decision on `action` by this connection's subject on its resource.
    pub fn decide(&self, policy: &PolicySet, action: &Action) -> Decision {
        policy.decide(self.subject, self.resource, action)
    }

    /// Carries out `decision` on `command`: records it and says what to do.
    /// `covered`: an approval already given stands for this command (only
    /// consulted when the rule asks for approval). A command held here is
    /// not decided again when the policy is reloaded: handlers whose
    /// commands can be held use [`Gate::admit_action`] (every handler does;
    /// this form is for tests and commands that are never held).
    pub async fn admit(
        &self,
        command: Command<'_>,
        decision: &Decision,
        covered: Option<Covered>,
    ) -> Outcome<'a> {
        self.admit_inner(command, decision, covered, None).await
    }

    /// [`Gate::admit`] for a command decided on `action`: held for
    /// approval, it is decided again on `action` when the policy is reloaded
    /// (the broker releases it if the new policy allows it, denies it if the
    /// new policy denies it; see [`Broker::policy_reloaded`]).
    pub async fn admit_action(
        &self,
        command: Command<'_>,
        decision: &Decision,
        covered: Option<Covered>,
        action: &Action,
    ) -> Outcome<'a> {
        self.admit_inner(command, decision, covered, Some(action))
            .await
    }

    async fn admit_inner(
        &self,
        command: Command<'_>,
        decision: &Decision,
        covered: Option<Covered>,
        action: Option<&Action>,
    ) -> Outcome<'a> {
        match (&decision.verdict, covered) {
            (Verdict::Allow, _) => {
                let record = DecisionRecord::allowed(&decision.rule, None);
                self.allow(command.action, &record, !command.changes_state)
                    .await
            }
            (Verdict::Deny { .. }, _) => Outcome::Deny(self.deny(command, decision).await),
            (Verdict::RequireApproval(_), Some(c)) => {
                let record = DecisionRecord::allowed(
                    &decision.rule,
                    Some(ApprovalOutcome::Covered { covered_by: c.by }),
                );
                self.allow(command.action, &record, false).await
            }
            (Verdict::RequireApproval(spec), None) => {
                self.hold(command, decision, spec, action).await
            }
        }
    }

    /// Records a denial (best effort: the command does not run either way).
    /// For a handler's own refusals too (a check the policy cannot express),
    /// with a `decision` naming it.
    pub async fn deny(&self, command: Command<'_>, decision: &Decision) -> Denial {
        let record = DecisionRecord::of(decision);
        let _ = self.record(Kind::Statement, command.action, &record).await;
        Denial {
            kind: DenialKind::Policy,
            rule: decision.rule.clone(),
            reason: record.reason.unwrap_or_default(),
        }
    }

    /// A command's result, once it ran (not awaited: it already ran; durable
    /// with the next awaited record). `action` names the command (by its
    /// keyed hash); `transform` says what was changed on the way back.
    pub fn completed(&self, action: Value, transform: Option<Value>, result: &ResultRecord) {
        let mut ev = self.origin.record(Kind::Statement).action(action);
        ev.transform = transform;
        ev.result = Some(result.value());
        self.audit.append_detached(ev);
    }

    /// Write-ahead: the record is durable before the command is forwarded;
    /// a read goes at once and the handler holds its results for the record.
    async fn allow(&self, action: Value, record: &DecisionRecord, read_only: bool) -> Outcome<'a> {
        // A release by a policy reload is no approval: nothing it covers later.
        let approved = record
            .approval
            .as_ref()
            .is_some_and(|a| !matches!(a, ApprovalOutcome::Released { .. }));
        if read_only {
            let ev = self.event(Kind::Statement, action, record);
            return Outcome::ForwardNow {
                recording: self.audit.append(ev),
            };
        }
        match self.record(Kind::Statement, action, record).await {
            Ok(()) => Outcome::Forward { approved },
            Err(e) => Outcome::Deny(Denial {
                kind: DenialKind::AuditUnavailable,
                rule: record.rule.clone(),
                reason: e.to_string(),
            }),
        }
    }

    fn event(&self, kind: Kind, action: Value, record: &DecisionRecord) -> NewRecord {
        let mut ev = self.origin.record(kind).action(action);
        record.write_into(&mut ev);
        ev
    }

    /// Appends a record and waits until it is durable.
    async fn record(
        &self,
        kind: Kind,
        action: Value,
        record: &DecisionRecord,
    ) -> Result<(), AuditUnavailable> {
        let r = self.audit.append(self.event(kind, action, record)).await;
        if let Err(e) = &r {
            tracing::error!(conn = self.origin.connection_id(), error = %e, "audit append failed");
        }
        r
    }
}
