//! Just-in-time approvals: a command that needs a human is held until enough
//! approvers say yes, one says no, the deadline passes, or its client goes.
//!
//! Protocol-neutral: a handler submits a [`NewApproval`] and waits on the
//! [`Waiter`]; approvers vote through [`Broker::decide`] from the control
//! socket, the HTTP API or the web page, always as an [`Approver`] the daemon
//! verified. Fails closed: every transition is an audit record written
//! before it takes effect (no record, no change), a timeout is a denial,
//! the requester (or anyone bound to its cgroup) never votes, and a store
//! that cannot be opened refuses the start. [`broker`] holds the lifecycle,
//! [`store`] the redb file that carries pending requests and grants across
//! a restart.

pub mod broker;
pub mod store;
#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;
pub mod webhook;

use std::{future::Future, pin::Pin};

use serde::{Deserialize, Serialize};

pub use crate::policy::{ApprovalSpec, GrantScope};
pub use broker::{Broker, Submitted, Waiter};

/// Longest reason, in characters.
pub const MAX_REASON_CHARS: usize = 1024;
/// Longest ticket id when no `ticket_pattern` is configured (and always).
pub const MAX_TICKET_CHARS: usize = 128;

/// Where audit records of approval transitions go. The daemon passes its
/// audit log; tests inject one that fails.
pub trait Recorder: Send + Sync + 'static {
    /// Appends `record` durably; `Err` is why it could not be written.
    fn record(
        &self,
        record: crate::audit::NewRecord,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>>;
}

impl Recorder for crate::audit::AuditLog {
    fn record(
        &self,
        record: crate::audit::NewRecord,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        let appended = self.append(record);
        Box::pin(async move { appended.await.map(|_| ()).map_err(|e| e.to_string()) })
    }
}

/// Decides a held command again under another policy: the gate supplies
/// one per held command (subject, resource and the decoded action it
/// decided on), so the broker can re-decide on a reload without knowing the
/// protocol.
pub trait Redecide: Send + Sync {
    fn redecide(&self, policy: &crate::policy::PolicySet) -> crate::policy::Decision;
}

/// The broker's settings, from `[approvals]`.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// Label identities may vote (local trials).
    pub allow_labels: bool,
    /// Anchored pattern a ticket id must match.
    pub ticket_pattern: Option<regex::Regex>,
}

impl Settings {
    pub fn from_config(cfg: &crate::config::ApprovalsConfig) -> Result<Self, String> {
        Ok(Self {
            allow_labels: cfg.allow_labels,
            ticket_pattern: cfg.ticket_regex()?,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error("no pending approval request {id}; `agentgate approvals list` shows the pending ones")]
    NotFound { id: String },
    #[error("{approver} cannot vote on {id}: {why} (separation of duties: ask another approver)")]
    SelfApproval {
        id: String,
        approver: String,
        why: String,
    },
    #[error("{approver} is not in an approver group of {id} ({groups}); ask a member to vote")]
    NotAnApprover {
        id: String,
        approver: String,
        groups: String,
    },
    #[error("{approver} already voted on {id}; the quorum needs another approver")]
    AlreadyVoted { id: String, approver: String },
    #[error(
        "{approver} is a label identity, which may not vote here; log in with `agentgate login` (or set [approvals] allow_labels = true for local trials)"
    )]
    LabelNotAllowed { approver: String },
    #[error("a rejection needs a reason (--reason TEXT)")]
    ReasonRequired,
    #[error("{what}")]
    BadInput { what: String },
    #[error("ticket id does not match the configured pattern {pattern}")]
    BadTicket { pattern: String },
    #[error("the audit log could not record this ({reason}); nothing changed, try again")]
    NotRecorded { reason: String },
    #[error("no live grant {id}; `agentgate approvals grants` lists them")]
    GrantNotFound { id: String },
}

impl ApprovalError {
    /// Whether this is the caller's to fix (the CLI exits 2), rather than the daemon's (1).
    pub fn is_usage(&self) -> bool {
        !matches!(self, Self::NotRecorded { .. })
    }
}

/// How an approver's identity was established.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApproverKind {
    /// A verified OIDC session of a person.
    Human,
    /// A verified service account.
    Service,
    /// A configured label, not verified (only where `allow_labels`).
    Label,
}

impl ApproverKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Human => "human",
            Self::Service => "service",
            Self::Label => "label",
        }
    }
}

/// Which interface a vote came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    Cli,
    Api,
    Web,
}

/// Who votes, as the daemon verified them. Never typed free text.
#[derive(Debug, Clone, Serialize)]
pub struct Approver {
    /// Display/lookup name (`VerifiedIdentity::name`, or the label).
    pub name: String,
    /// `sub` at the issuer; the label's name for labels.
    pub subject: String,
    /// `None` for labels.
    pub issuer: Option<String>,
    pub kind: ApproverKind,
    pub groups: Vec<String>,
    pub via: Via,
    /// Ids of the cgroups this identity is bound to (tagged).
    pub bound_cgroups: Vec<u64>,
    /// The same cgroups as paths relative to the cgroup2 mount
    /// (`/agentgate/exec-1`): a request from below one of them is the
    /// approver's own workload.
    #[serde(default)]
    pub bound_cgroup_paths: Vec<String>,
}

impl Approver {
    /// The identity an audit record names: `name (issuer#sub)` when verified.
    pub fn identity_ref(&self) -> crate::audit::IdentityRef {
        crate::audit::IdentityRef {
            subject: match &self.issuer {
                Some(iss) => format!("{} ({iss}#{})", self.name, self.subject),
                None => self.name.clone(),
            },
            kind: self.kind.as_str().into(),
            groups: self.groups.clone(),
        }
    }
}

/// A vote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vote {
    Approve {
        reason: Option<String>,
        ticket: Option<String>,
    },
    /// A rejection ends the request at once; the reason is required.
    Reject {
        reason: String,
        ticket: Option<String>,
    },
}

/// Who asked, from the connection's kernel provenance and its verified identity.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Requester {
    pub identity: String,
    /// `human`, `service`, `label` or `unknown`.
    pub identity_kind: String,
    pub issuer: Option<String>,
    /// `sub` at the issuer; the name itself for labels.
    pub subject: String,
    #[serde(default)]
    pub groups: Vec<String>,
    pub pid: u32,
    pub exe: Option<String>,
    pub uid: u32,
    /// The process's own cgroup.
    pub cgroup_id: u64,
    /// The tagged cgroup it is in (itself or an ancestor).
    #[serde(default)]
    pub tagged_cgroup_id: u64,
    /// Path of `cgroup_id` relative to the cgroup2 mount (empty if unknown).
    pub cgroup: String,
    /// The proxy connection id.
    pub conn: u64,
}

impl Requester {
    fn identity_ref(&self) -> crate::audit::IdentityRef {
        crate::audit::IdentityRef {
            subject: match &self.issuer {
                Some(iss) => format!("{} ({iss}#{})", self.identity, self.subject),
                None => self.identity.clone(),
            },
            kind: self.identity_kind.clone(),
            groups: self.groups.clone(),
        }
    }

    fn workload(&self) -> crate::audit::Workload {
        crate::audit::Workload {
            pid: self.pid,
            exe: self.exe.clone(),
            cmdline: None,
            uid: self.uid,
            cgroup: (!self.cgroup.is_empty()).then(|| self.cgroup.clone()),
        }
    }
}

/// One vote as approvers and records see it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VoteView {
    pub approver: String,
    pub subject: String,
    pub issuer: Option<String>,
    pub kind: ApproverKind,
    pub via: Via,
    /// `approve` or `reject`.
    pub vote: String,
    pub reason: Option<String>,
    pub ticket: Option<String>,
    pub at: String,
}

/// A pending request as approvers see it. `summary` is redacted: no literals.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApprovalRequest {
    pub id: String,
    pub requester: Requester,
    pub resource: String,
    pub summary: String,
    /// Keyed hash of the full statement: what a `statement` grant is bound to.
    pub statement_hash: String,
    /// Statement class (`write`, `ddl`, ...): what a `class` grant is bound to.
    pub class: String,
    pub rule: String,
    pub approver_groups: Vec<String>,
    pub quorum: u32,
    pub votes: Vec<VoteView>,
    pub created: String,
    pub deadline: String,
    /// Seconds an approval grants, when the rule has a `grant_window`.
    pub grant_window_secs: Option<u64>,
    pub grant_scope: GrantScope,
}

/// A window in which the same identity may repeat an approved command.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Grant {
    /// `grt-...`
    pub id: String,
    pub identity: String,
    /// Issuer of the identity (`None` for labels): a grant covers the same
    /// verified identity only.
    pub issuer: Option<String>,
    pub resource: String,
    pub scope: GrantScope,
    /// The statement hash (`statement` scope) or class (`class` scope).
    pub key: String,
    pub summary: String,
    pub rule: String,
    pub approver_groups: Vec<String>,
    pub approvers: Vec<String>,
    /// The request whose approval made it.
    pub request: String,
    pub created: String,
    pub expires: String,
    /// Statements that ran under it.
    pub uses: u64,
}

/// What a submitting handler supplies. `record` is the base of the
/// `approval.requested` record (connection, identity, workload, action,
/// decision already filled in); the broker adds the approval part.
pub struct NewApproval {
    pub requester: Requester,
    pub resource: String,
    pub summary: String,
    pub statement_hash: String,
    pub class: String,
    pub rule: String,
    pub spec: ApprovalSpec,
    pub record: crate::audit::NewRecord,
    /// Decides the command again when the policy is reloaded
    /// ([`Broker::policy_reloaded`]); `None`: it waits for approvers whatever
    /// the policy says.
    pub redecide: Option<std::sync::Arc<dyn Redecide>>,
}

/// How a held command ends, as its handler sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Outcome {
    Approved {
        approvers: Vec<String>,
        /// The grant this approval opened, when the rule has a window.
        grant: Option<String>,
    },
    /// An approver said no.
    Rejected { by: String, reason: String },
    /// Nobody decided in time.
    Expired,
    /// Taken back while the client still waits (its own cancel, or the
    /// daemon is stopping): denied.
    Withdrawn { reason: String },
    /// A policy reload allows it now (`rule`, in policy `policy`): it runs
    /// without approvers.
    Released {
        rule: String,
        reason: String,
        policy: String,
    },
    /// A policy reload denies it now (`rule`): it is denied.
    Refused {
        rule: String,
        reason: String,
        policy: String,
    },
}

/// What a vote did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum Decided {
    /// Recorded; the quorum is not reached yet.
    Pending { approvals: u32, quorum: u32 },
    /// The command is released.
    Approved { grant: Option<String> },
    /// The command is denied.
    Rejected,
}

/// Announced to subscribers (webhooks, the web page) after the record.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum ApprovalEvent {
    Requested {
        request: ApprovalRequest,
    },
    Decided {
        request: ApprovalRequest,
        /// approved | rejected | expired | cancelled | withdrawn
        outcome: String,
        by: Vec<String>,
        reason: Option<String>,
    },
}
