//! The typed decision record: what the gate writes into an audit record's
//! `decision` and `approval` fields, and a command's `result`.
//!
//! One struct per field instead of `json!` at each call site, so every
//! protocol writes the same shapes (evidence and the OCSF export read them).
//! The trade-off: the shapes are frozen here, field for field, as they were
//! when the Postgres handler built them by hand (`reason: null` included);
//! a new field is a change to this file and to the readers, on purpose.

use serde::Serialize;
use serde_json::Value;

use crate::{
    audit::NewRecord,
    policy::{Decision, Verdict},
};

/// What the gate decided about one command, as the audit record states it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecisionRecord {
    pub verdict: RecordedVerdict,
    /// The rule (or `agentgate:...` check) that decided.
    pub rule: String,
    /// Why it was denied; `None` unless denied.
    pub reason: Option<String>,
    /// How the approval behind it ended, when the rule asks for one.
    pub approval: Option<ApprovalOutcome>,
}

/// The `decision.verdict` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordedVerdict {
    Allow,
    Deny,
    RequireApproval,
}

/// A command record's `approval` field: how its approval ended. (The
/// `approval.requested` record's own field is the broker's.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum ApprovalOutcome {
    /// Approvers approved the held command; `grant`: the window it opened.
    Approved {
        id: String,
        approvers: Vec<String>,
        grant: Option<String>,
    },
    /// A live grant covers it: nothing was held.
    Granted {
        grant: String,
        approvers: Vec<String>,
    },
    /// An approval given to an earlier message of the same command covers
    /// it (a Postgres `Parse`'s approval covers its first `Execute`).
    #[serde(rename = "granted")]
    Covered { covered_by: &'static str },
    /// An approver rejected it.
    Rejected {
        id: String,
        by: String,
        reason: String,
    },
    /// Nobody decided in time.
    Expired { id: String },
    /// Taken back while the client waited (its own cancel, or the daemon).
    Withdrawn { id: String, reason: String },
    /// The client went away while it was held.
    Cancelled { id: String },
    /// A policy reload allowed it while it was held (`held_by`: the rule
    /// that had asked for approval; `policy`: the digest now in force).
    Released {
        id: String,
        held_by: String,
        reason: String,
        policy: String,
    },
    /// A policy reload denied it while it was held.
    Refused {
        id: String,
        held_by: String,
        policy: String,
    },
}

#[derive(Serialize)]
struct DecisionField<'r> {
    verdict: RecordedVerdict,
    rule: &'r str,
    reason: Option<&'r str>,
}

impl DecisionRecord {
    /// The policy's decision, as recorded (the approval is added by the gate).
    pub fn of(decision: &Decision) -> Self {
        let (verdict, reason) = match &decision.verdict {
            Verdict::Allow => (RecordedVerdict::Allow, None),
            Verdict::Deny { reason } => (RecordedVerdict::Deny, Some(reason.clone())),
            Verdict::RequireApproval(_) => (RecordedVerdict::RequireApproval, None),
        };
        Self {
            verdict,
            rule: decision.rule.clone(),
            reason,
            approval: None,
        }
    }

    /// Allowed by `rule`, with the approval behind it if any.
    pub fn allowed(rule: &str, approval: Option<ApprovalOutcome>) -> Self {
        Self {
            verdict: RecordedVerdict::Allow,
            rule: rule.to_owned(),
            reason: None,
            approval,
        }
    }

    /// Denied by `rule` for `reason`.
    pub fn denied(rule: &str, reason: String, approval: Option<ApprovalOutcome>) -> Self {
        Self {
            verdict: RecordedVerdict::Deny,
            rule: rule.to_owned(),
            reason: Some(reason),
            approval,
        }
    }

    /// The `decision` field.
    pub fn decision_value(&self) -> Value {
        serde_json::to_value(DecisionField {
            verdict: self.verdict,
            rule: &self.rule,
            reason: self.reason.as_deref(),
        })
        .expect("a decision serialises")
    }

    /// The `approval` field.
    pub fn approval_value(&self) -> Option<Value> {
        self.approval
            .as_ref()
            .map(|a| serde_json::to_value(a).expect("an approval serialises"))
    }

    /// Writes both fields into `record`.
    pub fn write_into(&self, record: &mut NewRecord) {
        record.decision = Some(self.decision_value());
        record.approval = self.approval_value();
    }
}

/// A command's `result` field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ResultRecord {
    /// The command ran; what came back.
    Completed {
        /// `ok` or `error`.
        status: &'static str,
        /// The protocol's completion tag (Postgres `CommandComplete`).
        command: Option<String>,
        rows: u64,
        bytes: u64,
        duration_ms: u64,
        /// The protocol's error code, if it failed.
        sqlstate: Option<String>,
    },
    /// The command never ran.
    NotRun {
        status: NotRun,
        reason: &'static str,
    },
}

/// Marker serialised as `"not_run"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NotRun {
    NotRun,
}

impl ResultRecord {
    pub fn value(&self) -> Value {
        serde_json::to_value(self).expect("a result serialises")
    }
}

/// `s` cut to `max` characters, marked with `…` when cut.
pub fn truncate_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// The shapes as the Postgres handler wrote them with `json!` before the
    /// gate existed; evidence and the OCSF export read these.
    #[test]
    fn shapes_are_the_ones_the_readers_know() {
        let allow = DecisionRecord::allowed("reads", None);
        assert_eq!(
            allow.decision_value(),
            json!({"verdict": "allow", "rule": "reads", "reason": null})
        );
        assert_eq!(allow.approval_value(), None);
        let held = DecisionRecord::of(&Decision {
            verdict: Verdict::RequireApproval(crate::policy::ApprovalSpec {
                approver_groups: vec!["dba".into()],
                quorum: 1,
                timeout: std::time::Duration::from_mins(1),
                grant_window: None,
                grant_scope: crate::policy::GrantScope::default(),
            }),
            rule: "w".into(),
        });
        assert_eq!(
            held.decision_value(),
            json!({"verdict": "require_approval", "rule": "w", "reason": null})
        );
        let cases = [
            (
                ApprovalOutcome::Approved {
                    id: "a".into(),
                    approvers: vec!["x".into()],
                    grant: Some("grt-1".into()),
                },
                json!({"id": "a", "outcome": "approved", "approvers": ["x"], "grant": "grt-1"}),
            ),
            (
                ApprovalOutcome::Granted {
                    grant: "grt-1".into(),
                    approvers: vec!["x".into()],
                },
                json!({"outcome": "granted", "grant": "grt-1", "approvers": ["x"]}),
            ),
            (
                ApprovalOutcome::Covered {
                    covered_by: "the approval of its parse",
                },
                json!({"outcome": "granted", "covered_by": "the approval of its parse"}),
            ),
            (
                ApprovalOutcome::Rejected {
                    id: "a".into(),
                    by: "bob".into(),
                    reason: "no".into(),
                },
                json!({"id": "a", "outcome": "rejected", "by": "bob", "reason": "no"}),
            ),
            (
                ApprovalOutcome::Expired { id: "a".into() },
                json!({"id": "a", "outcome": "expired"}),
            ),
            (
                ApprovalOutcome::Withdrawn {
                    id: "a".into(),
                    reason: "cancelled".into(),
                },
                json!({"id": "a", "outcome": "withdrawn", "reason": "cancelled"}),
            ),
            (
                ApprovalOutcome::Cancelled { id: "a".into() },
                json!({"id": "a", "outcome": "cancelled"}),
            ),
        ];
        for (outcome, want) in cases {
            let d = DecisionRecord::denied("r", "why".into(), Some(outcome));
            assert_eq!(
                d.decision_value(),
                json!({"verdict": "deny", "rule": "r", "reason": "why"})
            );
            assert_eq!(d.approval_value(), Some(want));
        }
        assert_eq!(
            ResultRecord::NotRun {
                status: NotRun::NotRun,
                reason: "client disconnected while held"
            }
            .value(),
            json!({"status": "not_run", "reason": "client disconnected while held"})
        );
        assert_eq!(
            ResultRecord::Completed {
                status: "ok",
                command: Some("SELECT 1".into()),
                rows: 1,
                bytes: 5,
                duration_ms: 0,
                sqlstate: None
            }
            .value(),
            json!({"status": "ok", "command": "SELECT 1", "rows": 1, "bytes": 5, "duration_ms": 0, "sqlstate": null})
        );
    }

    #[test]
    fn truncation_counts_characters_not_bytes() {
        assert_eq!(truncate_chars("ééé", 2), "éé…");
        assert_eq!(truncate_chars("ab", 2), "ab");
    }
}
