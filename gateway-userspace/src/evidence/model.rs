//! The report model: what `evidence.json` holds (and `index.html` shows), and
//! the [`Collector`] that builds it from records streamed in seq order.
//!
//! Bounded by construction: every list keeps at most its cap of entries and
//! counts the rest (`omitted`), every text taken from a record is clipped to
//! [`TEXT_CAP`] characters, and state carried across records (open sessions,
//! bindings, pending approvals) is capped at [`OPEN_CAP`] entries, overflow counted
//! and reported. What a list leaves out is in the log and in `audit export`;
//! the report says how much that is, never silently less.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt::Write,
};

use serde::Serialize;
use serde_json::Value;

use crate::audit::{Kind, Record};

/// `schema` of `evidence.json` (docs/evidence.schema.json).
pub const SCHEMA: &str = "agentgate.evidence/2";
/// Entries kept per list (commands, denials, approvals, ...).
pub const LIST_CAP: usize = 500;
/// Records cited per answer or aggregate entry.
pub const CITE_CAP: usize = 20;
/// Distinct identities, workloads and resources kept.
pub const KEY_CAP: usize = 1000;
/// Characters kept of any text taken from a record.
pub const TEXT_CAP: usize = 300;
/// Sessions, bindings and approvals tracked across records.
pub const OPEN_CAP: usize = 20_000;
/// Timeline buckets at most (a 31-day window is drawn per hour).
pub const MAX_BUCKETS: u64 = 744;

/// A record the report relies on: `records.jsonl` holds it with its proof.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cite {
    pub seq: u64,
    pub hash: String,
    pub kind: &'static str,
    pub time: String,
}

/// A capped list: the first `cap` entries and a count of the rest.
#[derive(Debug, Clone, Serialize)]
pub struct Capped<T> {
    pub items: Vec<T>,
    pub omitted: u64,
    #[serde(skip)]
    cap: usize,
}

impl<T> Default for Capped<T> {
    fn default() -> Self {
        Capped::new(LIST_CAP)
    }
}

impl<T> Capped<T> {
    pub fn new(cap: usize) -> Self {
        Capped {
            items: Vec::new(),
            omitted: 0,
            cap,
        }
    }
    /// Keeps `item` if there is room; returns whether it was kept.
    pub fn push(&mut self, item: T) -> bool {
        if self.items.len() < self.cap {
            self.items.push(item);
            true
        } else {
            self.omitted += 1;
            false
        }
    }
    pub fn total(&self) -> u64 {
        self.items.len() as u64 + self.omitted
    }
}

/// Who and when the report covers.
#[derive(Debug, Clone, Serialize)]
pub struct Scope {
    pub identities: Vec<String>,
    /// RFC 3339, UTC; records at or after `from` and before `to`.
    pub from: String,
    pub to: String,
}

/// The verification result and every gap.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Integrity {
    pub intact: bool,
    /// The first record not intact, and why (null when intact).
    pub failure: Option<Failure>,
    pub first_seq: u64,
    /// Records verified (seqs `first_seq..verified_to`).
    pub verified_to: u64,
    pub segments: usize,
    pub checkpoints: u64,
    pub root: Option<String>,
    pub head: Option<String>,
    pub keys: Vec<String>,
    pub newest_checkpoint: Option<CheckpointRef>,
    /// `--checkpoint`: older exported checkpoints compared with the log.
    pub older_checkpoints: Option<OlderCheckpoints>,
    pub quarantined: Vec<String>,
    /// Lines after a break: not vouched for, so not itemized, only counted.
    pub after_break: Option<AfterBreak>,
    pub gaps: Capped<Gap>,
    /// `audit.access` records in the period (reads of the log).
    pub log_reads: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub segment: Option<String>,
    pub seq: Option<u64>,
    pub offset: Option<u64>,
    pub what: String,
    /// One sentence for the top of the report.
    pub summary: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckpointRef {
    pub size: u64,
    pub root: String,
    pub time: String,
    pub key: String,
    pub origin: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct OlderCheckpoints {
    pub file: String,
    pub consistent: bool,
    pub checked: usize,
    pub predating_retention: usize,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct AfterBreak {
    pub lines: u64,
    pub unreadable: u64,
    /// Parseable records after the break naming an identity in scope.
    pub in_scope: u64,
}

/// A stretch of time the log does not vouch for, or a deliberate deletion.
#[derive(Debug, Clone, Serialize)]
pub struct Gap {
    /// `daemon_down`, `log_failure`, `quarantined_tail`, `retention`.
    pub kind: &'static str,
    pub from: String,
    pub to: Option<String>,
    pub detail: String,
    pub records: Vec<Cite>,
}

#[derive(Debug, Clone, Serialize)]
pub struct IdentityEntry {
    pub subject: String,
    /// `human`, `service`, `label`, ...as the records name it.
    pub kinds: Vec<String>,
    pub verified: bool,
    /// How the identity was established, in words.
    pub how: String,
    pub issuer: Option<String>,
    /// The `sub` claim the provider vouched for (from `identity.login`).
    pub oidc_subject: Option<String>,
    pub groups: Vec<String>,
    pub first_seen: Option<String>,
    pub last_seen: Option<String>,
    pub records: Capped<Cite>,
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkloadEntry {
    pub identity: String,
    pub host: String,
    pub exe: Option<String>,
    /// As recorded: credentials and arguments already redacted by the gateway.
    pub cmdline: Option<String>,
    pub uid: u32,
    pub cgroup: Option<String>,
    pub pids: Capped<u32>,
    pub connections: u64,
    pub first_seen: String,
    pub last_seen: String,
    pub records: Capped<Cite>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ResourceEntry {
    pub name: String,
    pub protocols: BTreeSet<String>,
    pub destinations: BTreeSet<String>,
    pub tables: BTreeSet<String>,
    pub connections: u64,
    pub commands: u64,
    pub denied: u64,
    pub first_seen: String,
    pub last_seen: String,
    pub records: Capped<Cite>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Command {
    pub time: String,
    pub identity: String,
    pub resource: Option<String>,
    pub class: Option<String>,
    /// The statement as recorded (literals already redacted), clipped.
    pub summary: Option<String>,
    pub decision: String,
    pub rule: Option<String>,
    pub reason: Option<String>,
    pub approval: Option<String>,
    pub record: Cite,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Commands {
    pub total: u64,
    pub by_decision: BTreeMap<String, u64>,
    pub by_class: BTreeMap<String, u64>,
    pub items: Option<Capped<Command>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Timeline {
    pub start: String,
    pub bucket_hours: u64,
    /// Per bucket: commands allowed, denied, allowed after approval.
    pub buckets: Vec<[u64; 3]>,
}

/// A statement record's `approval.outcome` under which it ran authorized:
/// `approved` (its own request was approved) or `granted` (it ran under a
/// grant an approval left).
const AUTHORIZED_OUTCOMES: [&str; 2] = ["approved", "granted"];

/// Column lineage decisions (`transform.masking.lineage[].lineage` in result
/// records) under which the value sent is masked. Any other decision a record
/// states means the value went out as it was: fail closed, an unknown word is
/// not taken for masking.
pub const MASKING_DECISIONS: [&str; 5] = [
    "direct",
    "preserved",
    "derived-redacted",
    "unknown-redacted",
    "json-fields-masked",
];

#[derive(Debug, Clone, Serialize, Default)]
pub struct FieldMasking {
    /// `rule` (a column rule) or `detector`.
    pub by: &'static str,
    pub statements: u64,
    pub records: Vec<Cite>,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Masking {
    pub statements_masked: u64,
    pub values_masked: u64,
    pub values_nulled: u64,
    /// Result columns that reached the agent as they were although their
    /// lineage involves a protected column: a lineage decision in a result
    /// record other than the masking ones ([`MASKING_DECISIONS`]), such as
    /// `raw`. 0 when every protected column was masked.
    pub columns_unmasked: u64,
    /// Protected field (column or detector name) -> how it was masked.
    pub fields: BTreeMap<String, FieldMasking>,
    pub fields_omitted: u64,
    /// Result columns by how column lineage decided them (`direct`,
    /// `preserved`, `derived-redacted`, `unknown-redacted`,
    /// `json-fields-masked`), from results that record it.
    pub lineage: BTreeMap<String, u64>,
    /// `masking.failure` records: the value was not sent, the connection closed.
    pub failures: Option<Capped<Cite>>,
    /// Statements the masking refused as searches on a protected column, by
    /// the kind of answer they sought (`search`, `conditional`, `error`,
    /// `timing`, `row-count`, `enumeration`): an agent probing for values.
    pub refusals: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Denial {
    pub time: String,
    pub identity: String,
    pub kind: &'static str,
    pub resource: Option<String>,
    pub what: Option<String>,
    pub rule: Option<String>,
    pub reason: Option<String>,
    pub record: Cite,
}

#[derive(Debug, Clone, Serialize)]
pub struct Approval {
    pub id: String,
    pub requester: Option<String>,
    pub resource: Option<String>,
    pub summary: Option<String>,
    pub rule: Option<String>,
    pub approver_groups: Vec<String>,
    pub requested_at: Option<String>,
    pub deadline: Option<String>,
    /// `pending`, `granted`, `denied`, `expired`, `cancelled`, `withdrawn`.
    pub outcome: String,
    pub approvers: Vec<String>,
    /// Each vote as the daemon verified the voter: name, the identity the
    /// record names (`NAME (ISSUER#SUB)` when verified by OIDC), its kind
    /// (`human`, `service`, `label`: a label is NOT verified) and the interface.
    pub votes: Vec<String>,
    /// The grant the approval left (`grt-...`), its scope and expiry.
    pub grant: Option<String>,
    pub grant_expires: Option<String>,
    /// Who revoked the grant, and why, when it was revoked.
    pub grant_revoked: Option<String>,
    pub reasons: Vec<String>,
    pub tickets: Vec<String>,
    pub decided_at: Option<String>,
    /// Commands that ran under this approval.
    pub uses: u64,
    pub records: Vec<Cite>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ContainmentEvent {
    pub time: String,
    pub identity: Option<String>,
    pub kind: &'static str,
    pub what: String,
    pub record: Cite,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Containment {
    pub by_kind: BTreeMap<&'static str, u64>,
    pub items: Option<Capped<ContainmentEvent>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Answer {
    pub id: &'static str,
    pub question: &'static str,
    /// `yes` or `no`.
    pub answer: &'static str,
    pub detail: String,
    pub records: Capped<Cite>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Attestation {
    pub identity: String,
    pub answers: Vec<Answer>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Control {
    pub framework: &'static str,
    pub id: &'static str,
    pub title: &'static str,
    pub evidence: &'static str,
    /// Section ids of this report.
    pub sections: &'static [&'static str],
}

/// `evidence.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub schema: &'static str,
    pub generated_at: String,
    pub generator: String,
    pub log_dir: String,
    pub scope: Scope,
    pub integrity: Integrity,
    pub attestations: Vec<Attestation>,
    pub identities: Vec<IdentityEntry>,
    pub workloads: Capped<WorkloadEntry>,
    pub resources: Capped<ResourceEntry>,
    pub commands: Commands,
    pub timeline: Timeline,
    pub masking: Masking,
    pub denials: Capped<Denial>,
    pub failures: Capped<Denial>,
    pub approvals: Capped<Approval>,
    pub containment: Containment,
    /// Model API calls and prompt DLP (`evidence::model_channel`).
    pub model_channel: super::model_channel::ModelChannel,
    /// SSH channels and their recordings (`evidence::ssh_sessions`).
    pub ssh_sessions: super::ssh_sessions::SshSessions,
    /// Policy versions in force and what their changes let through
    /// (evidence/policy.rs); `None` until added by the builder.
    pub policy: Option<super::policy::PolicyInForce>,
    pub controls: Vec<Control>,
    /// Records cited but left out of `records.jsonl` (over its cap).
    pub citations_omitted: u64,
    /// Cited records without a proof (after the newest checkpoint), with why.
    pub unproven: Vec<Unproven>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Unproven {
    pub seq: u64,
    pub reason: String,
}

/// The control mapping (EVIDENCE.md): each row names the sections behind it.
pub fn controls() -> Vec<Control> {
    vec![
        Control {
            framework: "FFIEC IT Handbook, Information Security",
            id: "II.C.15",
            title: "Privileged access",
            evidence: "Each identity and how it was verified; every command with the rule that allowed it; approvals per command (just in time) with approvers who are not the requester; the policy versions in force and any command a policy change let through.",
            sections: &[
                "identities",
                "commands",
                "approvals",
                "policy",
                "attestation",
            ],
        },
        Control {
            framework: "FFIEC IT Handbook, Information Security",
            id: "II.C.15(d)",
            title: "Remote access logged: date, time, user, location, duration, activity",
            evidence: "Workloads (host, process, cgroup) per identity; resources and destinations; each command with its UTC time; sessions open at the end.",
            sections: &["workloads", "resources", "commands", "timeline"],
        },
        Control {
            framework: "FFIEC IT Handbook, Information Security",
            id: "II.C.18",
            title: "Application accounts accessing databases",
            evidence: "Database sessions attributed to verified identities; statements classified and decided per rule; protected fields masked.",
            sections: &["identities", "resources", "commands", "masking"],
        },
        Control {
            framework: "FFIEC IT Handbook, Information Security",
            id: "II.C.22",
            title: "Log management: integrity, no modification, retention, gaps",
            evidence: "Hash chain, Merkle tree and signed checkpoints verified; consistency with the exported checkpoint; every gap (daemon down, log failures, quarantined tails, retention deletions); each cited record with its inclusion proof.",
            sections: &["integrity", "records"],
        },
        Control {
            framework: "PCI DSS v4.0",
            id: "10.2.1",
            title: "Audit logs capture access, administrative actions, invalid attempts, log start/stop, reads of the log",
            evidence: "Commands, denials and failures, approvals, containment refusals, daemon starts and stops, `audit.access` reads.",
            sections: &[
                "commands",
                "denials",
                "approvals",
                "containment",
                "integrity",
            ],
        },
        Control {
            framework: "PCI DSS v4.0",
            id: "10.2.2",
            title: "Each record: user, event type, date and time, success or failure, origin, affected resource",
            evidence: "Every record names identity, kind, UTC time, decision and result, workload (host, process) and resource; records.jsonl holds them verbatim.",
            sections: &["commands", "workloads", "records"],
        },
        Control {
            framework: "PCI DSS v4.0",
            id: "10.3",
            title: "Audit logs protected from modification",
            evidence: "Verification result naming the first record not intact, signed checkpoints kept off the host, inclusion proofs.",
            sections: &["integrity", "records"],
        },
        Control {
            framework: "PCI DSS v4.0",
            id: "10.7",
            title: "Failures of audit logging detected and reported",
            evidence: "log.failure and log.recovered records as gaps; the gateway denies what it cannot log (fails closed).",
            sections: &["integrity", "attestation"],
        },
    ]
}

/// Clips `s` to [`TEXT_CAP`] characters.
pub fn clip(s: &str) -> String {
    match s.char_indices().nth(TEXT_CAP) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_owned(),
    }
}

/// Whether a record's subject names `identity`: the same text, or the
/// verified form `identity (ISSUER#SUB)` the proxy writes.
pub(crate) fn names(subject: &str, identity: &str) -> bool {
    subject == identity
        || subject
            .strip_prefix(identity)
            .and_then(|rest| rest.strip_prefix(" ("))
            .is_some_and(|rest| rest.ends_with(')') && rest.contains('#'))
}

fn field<'a>(v: Option<&'a Value>, key: &str) -> Option<&'a Value> {
    v?.get(key).filter(|x| !x.is_null())
}

fn text(v: Option<&Value>, key: &str) -> Option<String> {
    field(v, key).map(|x| match x {
        Value::String(s) => clip(s),
        other => clip(&other.to_string()),
    })
}

fn strings(v: Option<&Value>, key: &str) -> Vec<String> {
    field(v, key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .take(CITE_CAP)
                .map(|x| x.as_str().map_or_else(|| clip(&x.to_string()), clip))
                .collect()
        })
        .unwrap_or_default()
}

/// Per-identity findings behind the attestation answers.
#[derive(Debug)]
struct Findings {
    unmasked: Capped<Cite>,
    masked: Capped<Cite>,
    unauthorized: Capped<Cite>,
    authorized: Capped<Cite>,
    escapes: Capped<Cite>,
    refused: Capped<Cite>,
}

impl Findings {
    fn new() -> Self {
        Findings {
            unmasked: Capped::new(CITE_CAP),
            masked: Capped::new(CITE_CAP),
            unauthorized: Capped::new(CITE_CAP),
            authorized: Capped::new(CITE_CAP),
            escapes: Capped::new(CITE_CAP),
            refused: Capped::new(CITE_CAP),
        }
    }
}

#[derive(Debug, Clone)]
struct Open {
    identity: String,
    what: String,
    cite: Cite,
}

/// The daemon's state as the records show it.
#[derive(Debug, Default)]
struct DaemonState {
    /// The start record of the running daemon and its fail mode.
    running: Option<(Cite, String)>,
    /// The stop record, while stopped.
    stopped: Option<Cite>,
    /// Time of the last record seen.
    last_time: Option<String>,
    /// Hooks the running daemon could not attach.
    unattached: Vec<String>,
    unattached_cite: Option<Cite>,
}

/// Builds a [`Report`] from records in seq order.
pub struct Collector {
    scope: Scope,
    start_hour: i64,
    bucket_hours: u64,
    buckets: Vec<[u64; 3]>,
    integrity: Integrity,
    identities: BTreeMap<String, IdentityEntry>,
    workloads: BTreeMap<(String, String, String, u32, String, String), WorkloadEntry>,
    workloads_omitted: u64,
    resources: BTreeMap<String, ResourceEntry>,
    resources_omitted: u64,
    commands: Commands,
    masking: Masking,
    denials: Capped<Denial>,
    failures: Capped<Denial>,
    approvals: BTreeMap<String, Approval>,
    approvals_omitted: u64,
    /// Grant id -> the approval that left it.
    grant_of: HashMap<String, String>,
    /// Grants of identities in scope not revoked: (identity, expiry, record).
    grants: HashMap<String, (Open, Option<String>)>,
    containment: Containment,
    model_channel: super::model_channel::ModelChannel,
    ssh_sessions: super::ssh_sessions::SshSessions,
    findings: BTreeMap<String, Findings>,
    sessions: HashMap<String, Open>,
    /// Sign-ins the daemon holds, by identity, with their expiry (unix seconds).
    logins: HashMap<String, (Open, i64)>,
    bindings: HashMap<(String, String), Open>,
    /// Approval requests not yet decided, by id.
    pending: HashMap<String, Open>,
    open_overflow: u64,
    daemon: DaemonState,
    /// Gateway not in force: daemon down with fail mode open.
    not_in_force: Capped<Cite>,
    /// Policy versions and the commands they let through.
    policy: super::policy::Tracker,
}

impl Collector {
    /// `from` and `to` are RFC 3339 in the writer's UTC format (fixed width,
    /// so they compare as strings).
    pub fn new(scope: Scope) -> Collector {
        let hour = |t: &str| {
            crate::audit::parse_time(t).map_or(0, |t| t.unix_timestamp().div_euclid(3600))
        };
        let (h0, h1) = (hour(&scope.from), hour(&scope.to));
        let hours = u64::try_from((h1 - h0).max(1)).unwrap_or(1);
        let bucket_hours = hours.div_ceil(MAX_BUCKETS).max(1);
        let buckets = vec![[0u64; 3]; usize::try_from(hours.div_ceil(bucket_hours)).unwrap_or(1)];
        let findings = scope
            .identities
            .iter()
            .map(|i| (i.clone(), Findings::new()))
            .collect();
        Collector {
            start_hour: h0,
            bucket_hours,
            buckets,
            integrity: Integrity {
                gaps: Capped::new(LIST_CAP),
                ..Integrity::default()
            },
            identities: BTreeMap::new(),
            workloads: BTreeMap::new(),
            workloads_omitted: 0,
            resources: BTreeMap::new(),
            resources_omitted: 0,
            commands: Commands {
                items: Some(Capped::new(LIST_CAP)),
                ..Commands::default()
            },
            masking: Masking {
                failures: Some(Capped::new(LIST_CAP)),
                ..Masking::default()
            },
            denials: Capped::new(LIST_CAP),
            failures: Capped::new(LIST_CAP),
            approvals: BTreeMap::new(),
            approvals_omitted: 0,
            grant_of: HashMap::new(),
            grants: HashMap::new(),
            containment: Containment {
                items: Some(Capped::new(LIST_CAP)),
                ..Containment::default()
            },
            model_channel: super::model_channel::ModelChannel::default(),
            ssh_sessions: super::ssh_sessions::SshSessions::default(),
            findings,
            sessions: HashMap::new(),
            logins: HashMap::new(),
            bindings: HashMap::new(),
            pending: HashMap::new(),
            open_overflow: 0,
            daemon: DaemonState::default(),
            not_in_force: Capped::new(CITE_CAP),
            policy: super::policy::Tracker::default(),
            scope,
        }
    }

    fn cite(seq: u64, hash: &str, rec: &Record) -> Cite {
        Cite {
            seq,
            hash: hash.to_owned(),
            kind: rec.kind.as_str(),
            time: rec.time.clone(),
        }
    }

    fn in_period(&self, time: &str) -> bool {
        time >= self.scope.from.as_str() && time < self.scope.to.as_str()
    }

    /// The identity in scope a record is about, if any.
    /// The identity in scope a record is about. Records name a verified
    /// identity `NAME (ISSUER#SUB)` and a label by its name; either matches
    /// `--identity NAME`.
    fn subject_of(&self, rec: &Record) -> Option<String> {
        let named = |s: &str| self.scope.identities.iter().find(|i| names(s, i)).cloned();
        if let Some(i) = &rec.identity
            && let Some(who) = named(&i.subject)
        {
            return Some(who);
        }
        // An approver's record names the requester in its action.
        if matches!(
            rec.kind,
            Kind::ApprovalGranted
                | Kind::ApprovalDenied
                | Kind::ApprovalVote
                | Kind::ApprovalExpired
                | Kind::ApprovalCancelled
                | Kind::ApprovalWithdrawn
                | Kind::ApprovalReleased
                | Kind::ApprovalRefused
        ) && let Some(r) = field(rec.action.as_ref(), "requester").and_then(Value::as_str)
        {
            return named(r);
        }
        // A revoked grant names the identity it was for.
        if rec.kind == Kind::GrantRevoked
            && let Some(r) = field(rec.action.as_ref(), "identity").and_then(Value::as_str)
        {
            return named(r);
        }
        None
    }

    /// The policy versions seen, for the "Policy in force" section (taken
    /// once, before [`Collector::finish`]).
    pub fn take_policy(&mut self) -> super::policy::Tracker {
        std::mem::take(&mut self.policy)
    }

    /// Takes one verified record (seq order); `hash` is its hash (hex).
    pub fn observe(&mut self, seq: u64, hash: &str, rec: &Record) {
        if rec.time.as_str() >= self.scope.to.as_str() {
            return;
        }
        let in_period = self.in_period(&rec.time);
        self.observe_log(seq, hash, rec, in_period);
        let who = self.subject_of(rec);
        self.policy
            .observe(seq, hash, rec, who.as_deref(), in_period);
        if let Some(who) = who {
            self.track_open(seq, hash, rec, &who);
            if in_period {
                self.observe_identity(seq, hash, rec, &who);
                self.model_channel.observe(seq, rec);
                self.ssh_sessions.observe(seq, hash, rec, &who);
            }
        }
        self.daemon.last_time = Some(rec.time.clone());
    }

    /// Records about the log and the daemon, whoever they name.
    fn observe_log(&mut self, seq: u64, hash: &str, rec: &Record, in_period: bool) {
        match rec.kind {
            Kind::DaemonStart => {
                let cite = in_period.then(|| Self::cite(seq, hash, rec));
                let fail_mode = text(rec.action.as_ref(), "fail_mode").unwrap_or_default();
                let down_from = match (&self.daemon.stopped, &self.daemon.running) {
                    (Some(stop), _) => Some((stop.time.clone(), "the daemon was stopped".to_owned(), Some(stop.clone()))),
                    (None, Some(_)) => self.daemon.last_time.clone().map(|t| {
                        (t, "the daemon ended without a daemon.stop record (crash or kill); down from its last record".to_owned(), None)
                    }),
                    (None, None) => None,
                };
                if let Some((from, why, stop_cite)) = down_from {
                    let prev_mode = self
                        .daemon
                        .running
                        .as_ref()
                        .map(|(_, m)| m.clone())
                        .unwrap_or_default();
                    self.gap_overlapping(
                        "daemon_down",
                        &from,
                        Some(&rec.time),
                        format!(
                            "{why} until this start{}",
                            if prev_mode == "open" {
                                " (fail mode open: tagged processes were not governed)"
                            } else {
                                " (fail mode closed: tagged processes could not connect)"
                            }
                        ),
                        stop_cite.into_iter().chain(cite.clone()).collect(),
                        prev_mode == "open",
                    );
                }
                let unattached: Vec<String> = field(rec.action.as_ref(), "containment")
                    .and_then(|c| c.get("hooks"))
                    .and_then(Value::as_array)
                    .map(|hooks| {
                        hooks
                            .iter()
                            .filter(|h| h.get("attached") == Some(&Value::Bool(false)))
                            .filter_map(|h| h.get("name").and_then(Value::as_str).map(clip))
                            .collect()
                    })
                    .unwrap_or_default();
                let c = Self::cite(seq, hash, rec);
                self.daemon.unattached_cite = (!unattached.is_empty()).then_some(c.clone());
                self.daemon.unattached = unattached;
                self.daemon.running = Some((c, fail_mode));
                self.daemon.stopped = None;
            }
            Kind::DaemonStop => {
                self.daemon.stopped = Some(Self::cite(seq, hash, rec));
            }
            Kind::LogFailure | Kind::LogRecovered | Kind::Retention if in_period => {
                let c = Self::cite(seq, hash, rec);
                let (kind, detail) = match rec.kind {
                    Kind::LogFailure => (
                        "log_failure",
                        format!(
                            "the log could not be written; what it would have recorded was denied (fails closed): {}",
                            text(rec.result.as_ref(), "error")
                                .or_else(|| rec.result.as_ref().map(|r| clip(&r.to_string())))
                                .unwrap_or_default()
                        ),
                    ),
                    Kind::LogRecovered => (
                        "quarantined_tail",
                        format!(
                            "after a crash a torn last line was moved to quarantine: {}",
                            rec.result
                                .as_ref()
                                .map(|r| clip(&r.to_string()))
                                .unwrap_or_default()
                        ),
                    ),
                    _ => (
                        "retention",
                        format!(
                            "retention deleted older segments (not tampering: the deletion is this signed record; the chain continues from its anchor): records before seq {}",
                            field(rec.result.as_ref(), "anchor")
                                .and_then(|a| a.get("first_seq"))
                                .map_or_else(|| "?".into(), ToString::to_string)
                        ),
                    ),
                };
                self.integrity.gaps.push(Gap {
                    kind,
                    from: rec.time.clone(),
                    to: None,
                    detail,
                    records: vec![c],
                });
            }
            Kind::AuditAccess if in_period => {
                self.integrity.log_reads += 1;
            }
            _ => {}
        }
    }

    /// A gap `[from, to)` if it overlaps the period (clipped to it).
    fn gap_overlapping(
        &mut self,
        kind: &'static str,
        from: &str,
        to: Option<&str>,
        detail: String,
        mut records: Vec<Cite>,
        not_in_force: bool,
    ) {
        if to.is_some_and(|t| t <= self.scope.from.as_str()) || from >= self.scope.to.as_str() {
            return;
        }
        records.dedup();
        if not_in_force {
            for c in &records {
                self.not_in_force.push(c.clone());
            }
        }
        let from = from.max(self.scope.from.as_str()).to_owned();
        let to = to.map(|t| t.min(self.scope.to.as_str()).to_owned());
        self.integrity.gaps.push(Gap {
            kind,
            from,
            to,
            detail,
            records,
        });
    }

    /// Sessions, bindings and approvals open at the end of the period.
    fn track_open(&mut self, seq: u64, hash: &str, rec: &Record, who: &str) {
        match rec.kind {
            Kind::ConnectionOpen => {
                if let Some(id) = &rec.session_id {
                    let what = format!(
                        "session {id} to {}",
                        rec.resource.as_deref().map_or_else(|| "?".into(), clip)
                    );
                    let cite = Self::cite(seq, hash, rec);
                    self.open_insert_session(id.clone(), who, what, cite);
                }
            }
            Kind::ConnectionClose => {
                if let Some(id) = &rec.session_id {
                    self.sessions.remove(id);
                }
            }
            Kind::ApprovalRequested => {
                if let Some(id) = text(rec.approval.as_ref(), "id") {
                    if self.pending.len() < OPEN_CAP {
                        let what = format!("approval {id} pending");
                        let cite = Self::cite(seq, hash, rec);
                        self.pending.insert(
                            id,
                            Open {
                                identity: who.to_owned(),
                                what,
                                cite,
                            },
                        );
                    } else {
                        self.open_overflow += 1;
                    }
                }
            }
            Kind::ApprovalGranted
            | Kind::ApprovalDenied
            | Kind::ApprovalExpired
            | Kind::ApprovalCancelled
            | Kind::ApprovalWithdrawn
            | Kind::ApprovalReleased
            | Kind::ApprovalRefused => {
                if let Some(id) = text(rec.approval.as_ref(), "id") {
                    self.pending.remove(&id);
                }
                if rec.kind == Kind::ApprovalGranted {
                    self.open_grant(seq, hash, rec, who);
                }
            }
            Kind::GrantRevoked => {
                if let Some(gid) = text(rec.approval.as_ref(), "grant") {
                    self.grants.remove(&gid);
                }
            }
            Kind::Statement | Kind::Decision
                if field(rec.approval.as_ref(), "outcome").is_some() =>
            {
                if let Some(id) = text(rec.approval.as_ref(), "id") {
                    self.pending.remove(&id);
                }
            }
            Kind::IdentityLogin | Kind::IdentityRefresh => self.open_login(seq, hash, rec, who),
            Kind::IdentityExpiry => {
                self.logins.remove(who);
            }
            Kind::IdentityBind | Kind::IdentityUnbind => {
                let cgroup = text(rec.action.as_ref(), "cgroup").unwrap_or_default();
                let key = (who.to_owned(), cgroup.clone());
                if rec.kind == Kind::IdentityUnbind {
                    self.bindings.remove(&key);
                } else if self.bindings.len() < OPEN_CAP {
                    let cite = Self::cite(seq, hash, rec);
                    self.bindings.insert(
                        key,
                        Open {
                            identity: who.to_owned(),
                            what: format!("cgroup {cgroup} bound"),
                            cite,
                        },
                    );
                } else {
                    self.open_overflow += 1;
                }
            }
            _ => {}
        }
    }

    /// A sign-in (or its refresh) the daemon holds until `expires_at`.
    fn open_login(&mut self, seq: u64, hash: &str, rec: &Record, who: &str) {
        let expires = field(rec.action.as_ref(), "expires_at").and_then(Value::as_i64);
        if let Some(expires) = expires {
            let cite = Self::cite(seq, hash, rec);
            let how = text(rec.action.as_ref(), "method").unwrap_or_default();
            let open = Open {
                identity: who.to_owned(),
                what: format!("signed-in session ({how}) held by the daemon"),
                cite,
            };
            let room = self.logins.len() < OPEN_CAP;
            match self.logins.get_mut(who) {
                // A refresh keeps the sign-in's record, moves its expiry.
                Some(l) if rec.kind == Kind::IdentityRefresh => l.1 = expires,
                Some(l) => *l = (open, expires),
                None if room => {
                    self.logins.insert(who.to_owned(), (open, expires));
                }
                None => self.open_overflow += 1,
            }
        }
    }

    /// The grant an approval left, live until it expires or is revoked.
    fn open_grant(&mut self, seq: u64, hash: &str, rec: &Record, who: &str) {
        let Some(g) = field(rec.approval.as_ref(), "grant") else {
            return;
        };
        let Some(gid) = text(Some(g), "id") else {
            return;
        };
        if self.grants.len() < OPEN_CAP {
            let open = Open {
                identity: who.to_owned(),
                what: format!(
                    "grant {gid} ({}) until {}",
                    text(Some(g), "scope").unwrap_or_default(),
                    text(Some(g), "expires").unwrap_or_else(|| "?".into())
                ),
                cite: Self::cite(seq, hash, rec),
            };
            self.grants.insert(gid, (open, text(Some(g), "expires")));
        } else {
            self.open_overflow += 1;
        }
    }

    fn open_insert_session(&mut self, id: String, who: &str, what: String, cite: Cite) {
        if self.sessions.len() < OPEN_CAP {
            self.sessions.insert(
                id,
                Open {
                    identity: who.to_owned(),
                    what,
                    cite,
                },
            );
        } else {
            self.open_overflow += 1;
        }
    }

    #[allow(clippy::too_many_lines)] // one arm per record kind
    fn observe_identity(&mut self, seq: u64, hash: &str, rec: &Record, who: &str) {
        let cite = Self::cite(seq, hash, rec);
        self.note_identity(rec, who, &cite);
        let action = rec.action.as_ref();
        let decision = rec.decision.as_ref();
        let verdict = text(decision, "verdict");
        match rec.kind {
            Kind::ConnectionOpen | Kind::SessionStart => {
                self.note_workload(rec, who, &cite);
                let r = self.note_resource(rec, &cite);
                if let Some(r) = r {
                    if rec.kind == Kind::ConnectionOpen {
                        r.connections += 1;
                    }
                    if let Some(p) = text(action, "protocol") {
                        insert_capped(&mut r.protocols, p);
                    }
                    if let Some(d) = text(action, "destination") {
                        insert_capped(&mut r.destinations, d);
                    }
                }
                if verdict.as_deref() == Some("deny") {
                    self.deny(rec, who, &cite, text(action, "destination"));
                }
            }
            Kind::Statement | Kind::Decision
                if text(action, "phase").as_deref() == Some("completed") =>
            {
                self.observe_result(rec, who, &cite);
            }
            Kind::Statement | Kind::Decision => {
                self.observe_command(rec, who, &cite, verdict);
            }
            // The held command's own record follows with the outcome.
            Kind::ApprovalRequested => {
                self.note_resource(rec, &cite);
                self.approval_requested(rec, who, &cite);
            }
            Kind::ApprovalGranted
            | Kind::ApprovalDenied
            | Kind::ApprovalExpired
            | Kind::ApprovalVote
            | Kind::ApprovalCancelled
            | Kind::ApprovalWithdrawn
            | Kind::ApprovalReleased
            | Kind::ApprovalRefused => {
                self.observe_approval_decision(rec, &cite);
            }
            Kind::GrantRevoked => self.grant_revoked(rec, &cite),
            Kind::MaskingFailure => {
                if let Some(f) = self.masking.failures.as_mut() {
                    f.push(cite.clone());
                }
                self.failures.push(Denial {
                    time: rec.time.clone(),
                    identity: who.to_owned(),
                    kind: rec.kind.as_str(),
                    resource: rec.resource.clone(),
                    what: Some("a value could not be masked: not sent, connection closed".into()),
                    rule: None,
                    reason: rec.result.as_ref().map(|r| clip(&r.to_string())),
                    record: cite,
                });
            }
            Kind::IdentityFailure => {
                self.failures.push(Denial {
                    time: rec.time.clone(),
                    identity: who.to_owned(),
                    kind: rec.kind.as_str(),
                    resource: None,
                    what: text(action, "stage"),
                    rule: None,
                    reason: text(action, "error"),
                    record: cite,
                });
            }
            Kind::WorkloadPrivileged
            | Kind::WorkloadEscaped
            | Kind::ContainmentRefused
            | Kind::ControlRefused
            | Kind::DnsQuery => {
                let kind = rec.kind.as_str();
                // A refusal record also counts those the daemon left out of
                // the log (rate-limited) before it.
                let left_out = ["suppressed", "suppressed_evicted"]
                    .iter()
                    .filter_map(|k| action.and_then(|a| a.get(*k)).and_then(Value::as_u64))
                    .sum::<u64>();
                *self.containment.by_kind.entry(kind).or_default() += 1 + left_out;
                let what = action.map(|a| clip(&a.to_string())).unwrap_or_default();
                if let Some(items) = self.containment.items.as_mut() {
                    items.push(ContainmentEvent {
                        time: rec.time.clone(),
                        identity: Some(who.to_owned()),
                        kind,
                        what,
                        record: cite.clone(),
                    });
                }
                let f = self.findings.get_mut(who).expect("identity in scope");
                match rec.kind {
                    Kind::WorkloadPrivileged | Kind::WorkloadEscaped => {
                        f.escapes.push(cite);
                    }
                    Kind::ContainmentRefused | Kind::ControlRefused => {
                        f.refused.push(cite);
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }

    fn observe_result(&mut self, rec: &Record, who: &str, cite: &Cite) {
        if let Some(m) = field(rec.transform.as_ref(), "masking") {
            let n = |k: &str| m.get(k).and_then(Value::as_u64).unwrap_or(0);
            let (masked, nulled) = (n("values_masked"), n("values_nulled"));
            self.masking.values_masked += masked;
            self.masking.values_nulled += nulled;
            if masked + nulled > 0 {
                self.masking.statements_masked += 1;
            }
            let mut unmasked = 0;
            for column in m
                .get("lineage")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                // A decision that is not a masking one (or none at all) for a
                // column the lineage names: its values went out as they were.
                let label = column.get("lineage").and_then(Value::as_str);
                if !label.is_some_and(|l| MASKING_DECISIONS.contains(&l)) {
                    unmasked += 1;
                }
                let label = label.unwrap_or("(none)");
                if self.masking.lineage.len() < KEY_CAP || self.masking.lineage.contains_key(label)
                {
                    *self.masking.lineage.entry(clip(label)).or_default() += 1;
                }
            }
            self.masking.columns_unmasked += unmasked;
            for (by, key) in [("rule", "columns"), ("detector", "detectors")] {
                for name in strings(Some(m), key) {
                    let known = self.masking.fields.contains_key(&name);
                    if !known && self.masking.fields.len() >= KEY_CAP {
                        self.masking.fields_omitted += 1;
                        continue;
                    }
                    let e = self.masking.fields.entry(name).or_insert(FieldMasking {
                        by,
                        ..FieldMasking::default()
                    });
                    e.statements += 1;
                    if e.records.len() < CITE_CAP {
                        e.records.push(cite.clone());
                    }
                }
            }
            let f = self.findings.get_mut(who).expect("identity in scope");
            if unmasked > 0 {
                f.unmasked.push(cite.clone());
            } else if masked + nulled > 0 {
                f.masked.push(cite.clone());
            }
        }
        let status = text(rec.result.as_ref(), "status");
        if status.as_deref().is_some_and(|s| s != "ok") {
            self.failures.push(Denial {
                time: rec.time.clone(),
                identity: who.to_owned(),
                kind: rec.kind.as_str(),
                resource: rec.resource.clone(),
                what: text(rec.result.as_ref(), "command"),
                rule: None,
                reason: text(rec.result.as_ref(), "sqlstate").or(status),
                record: cite.clone(),
            });
        }
    }

    /// A statement the masking refused as a search, by oracle class.
    fn count_masking_refusal(&mut self, action: Option<&Value>) {
        if let Some(oracle) = text(field(action, "masking_refusal"), "oracle")
            && (self.masking.refusals.len() < KEY_CAP
                || self.masking.refusals.contains_key(&oracle))
        {
            *self.masking.refusals.entry(clip(&oracle)).or_default() += 1;
        }
    }

    fn observe_command(&mut self, rec: &Record, who: &str, cite: &Cite, verdict: Option<String>) {
        let action = rec.action.as_ref();
        self.count_masking_refusal(action);
        let approval = rec.approval.as_ref();
        let verdict = verdict.unwrap_or_else(|| "none".into());
        let approved = verdict == "allow"
            && text(approval, "outcome").is_some_and(|o| AUTHORIZED_OUTCOMES.contains(&o.as_str()));
        let decision = if approved {
            "allow after approval".to_owned()
        } else {
            verdict.clone()
        };
        let class = text(action, "class");
        let bucket = match decision.as_str() {
            "allow" => Some(0),
            "deny" => Some(1),
            "allow after approval" => Some(2),
            _ => None,
        };
        if let Some(bucket) = bucket
            && let Some(t) = crate::audit::parse_time(&rec.time)
        {
            let h = t.unix_timestamp().div_euclid(3600) - self.start_hour;
            if let Some(b) = u64::try_from(h)
                .ok()
                .and_then(|h| usize::try_from(h / self.bucket_hours).ok())
                .and_then(|i| self.buckets.get_mut(i))
            {
                b[bucket] += 1;
            }
        }
        self.commands.total += 1;
        *self
            .commands
            .by_decision
            .entry(decision.clone())
            .or_default() += 1;
        if let Some(c) = &class
            && (self.commands.by_class.len() < KEY_CAP || self.commands.by_class.contains_key(c))
        {
            *self.commands.by_class.entry(c.clone()).or_default() += 1;
        }
        if let Some(r) = self.note_resource(rec, cite) {
            r.commands += 1;
            if decision == "deny" {
                r.denied += 1;
            }
            for t in strings(action, "tables") {
                insert_capped(&mut r.tables, t);
            }
        }
        let approval_text = approval.map(|a| {
            let outcome = text(Some(a), "outcome").unwrap_or_else(|| "requested".into());
            let mut s = outcome;
            let people: Vec<String> = strings(Some(a), "approvers")
                .into_iter()
                .chain(text(Some(a), "by"))
                .collect();
            if !people.is_empty() {
                s.push_str(" by ");
                s.push_str(&people.join(", "));
            }
            if let Some(id) = text(Some(a), "id") {
                let _ = write!(s, " ({id})");
            }
            s
        });
        let command = Command {
            time: rec.time.clone(),
            identity: who.to_owned(),
            resource: rec.resource.clone(),
            class,
            summary: text(action, "sql").or_else(|| text(action, "summary")),
            decision: decision.clone(),
            rule: text(rec.decision.as_ref(), "rule"),
            reason: text(rec.decision.as_ref(), "reason"),
            approval: approval_text,
            record: cite.clone(),
        };
        if decision == "deny" {
            self.denials.push(Denial {
                time: command.time.clone(),
                identity: who.to_owned(),
                kind: rec.kind.as_str(),
                resource: command.resource.clone(),
                what: command.summary.clone(),
                rule: command.rule.clone(),
                reason: command.reason.clone(),
                record: cite.clone(),
            });
        }
        if let Some(items) = self.commands.items.as_mut() {
            items.push(command);
        }
        if let Some(a) = approval {
            self.approval_used(a, who, cite, &verdict);
        }
    }

    fn approval_requested(&mut self, rec: &Record, who: &str, cite: &Cite) {
        let a = rec.approval.as_ref();
        let Some(id) = text(a, "id") else { return };
        if !self.approvals.contains_key(&id) && self.approvals.len() >= LIST_CAP {
            self.approvals_omitted += 1;
            return;
        }
        self.approvals.insert(
            id.clone(),
            Approval {
                id,
                requester: Some(who.to_owned()),
                resource: rec.resource.clone(),
                summary: text(rec.action.as_ref(), "sql"),
                rule: text(rec.decision.as_ref(), "rule"),
                approver_groups: strings(a, "approver_groups"),
                requested_at: Some(rec.time.clone()),
                deadline: text(a, "deadline"),
                outcome: "pending".into(),
                approvers: Vec::new(),
                votes: Vec::new(),
                grant: None,
                grant_expires: None,
                grant_revoked: None,
                reasons: Vec::new(),
                tickets: Vec::new(),
                decided_at: None,
                uses: 0,
                records: vec![cite.clone()],
            },
        );
    }

    /// A command that ran or was refused under an approval.
    fn approval_used(&mut self, a: &Value, who: &str, cite: &Cite, decision: &str) {
        let outcome = text(Some(a), "outcome").unwrap_or_default();
        let approvers = strings(Some(a), "approvers");
        let f = self.findings.get_mut(who).expect("identity in scope");
        // Released by a policy reload: no approval was asked of anyone; the
        // policy section judges it (evidence/policy.rs).
        if decision == "allow" && outcome != "released" {
            if !AUTHORIZED_OUTCOMES.contains(&outcome.as_str())
                || approvers.iter().any(|p| p == who)
            {
                // Ran without a grant, or approved by the requester.
                f.unauthorized.push(cite.clone());
            } else {
                f.authorized.push(cite.clone());
            }
        }
        let id = text(Some(a), "id")
            .or_else(|| text(Some(a), "grant").and_then(|g| self.grant_of.get(&g).cloned()));
        if let Some(id) = id
            && let Some(entry) = self.approvals.get_mut(&id)
        {
            if decision == "allow" {
                entry.uses += 1;
            }
            if entry.records.len() < CITE_CAP {
                entry.records.push(cite.clone());
            }
        }
    }

    fn observe_approval_decision(&mut self, rec: &Record, cite: &Cite) {
        let a = rec.approval.as_ref();
        let Some(id) = text(a, "id") else { return };
        let outcome = match rec.kind {
            Kind::ApprovalGranted => "granted",
            Kind::ApprovalDenied => "denied",
            Kind::ApprovalVote => "pending",
            Kind::ApprovalCancelled => "cancelled",
            Kind::ApprovalWithdrawn => "withdrawn",
            Kind::ApprovalReleased => "released",
            Kind::ApprovalRefused => "refused",
            _ => "expired",
        };
        // Approver-side records carry the voter; the requester's side (expiry,
        // cancellation, withdrawal) carries no approver.
        let voted = matches!(
            rec.kind,
            Kind::ApprovalGranted | Kind::ApprovalDenied | Kind::ApprovalVote
        );
        let requester = text(rec.action.as_ref(), "requester");
        let approver = if voted {
            text(a, "approver").or_else(|| rec.identity.as_ref().map(|i| clip(&i.subject)))
        } else {
            None
        };
        let vote = voted.then(|| vote_text(rec, outcome, approver.as_deref()));
        if !self.approvals.contains_key(&id) && self.approvals.len() >= LIST_CAP {
            // Counted at its request (or requested before the period).
            return;
        }
        let entry = self
            .approvals
            .entry(id.clone())
            .or_insert_with(|| Approval {
                id,
                requester: requester.clone(),
                resource: rec.resource.clone(),
                summary: text(rec.action.as_ref(), "summary"),
                rule: text(rec.action.as_ref(), "rule"),
                approver_groups: Vec::new(),
                requested_at: None,
                deadline: None,
                outcome: "pending".into(),
                approvers: Vec::new(),
                votes: Vec::new(),
                grant: None,
                grant_expires: None,
                grant_revoked: None,
                reasons: Vec::new(),
                tickets: Vec::new(),
                decided_at: None,
                uses: 0,
                records: Vec::new(),
            });
        // A granted approval may need a quorum: the outcome is the last word;
        // a vote short of quorum leaves it pending.
        if rec.kind != Kind::ApprovalVote {
            entry.outcome = outcome.into();
            entry.decided_at = Some(rec.time.clone());
        }
        if let Some(p) = approver.clone()
            && !entry.approvers.contains(&p)
            && entry.approvers.len() < CITE_CAP
        {
            entry.approvers.push(p);
        }
        if let Some(v) = vote
            && entry.votes.len() < CITE_CAP
        {
            entry.votes.push(v);
        }
        if rec.kind == Kind::ApprovalGranted
            && let Some(g) = field(a, "grant")
            && let Some(gid) = text(Some(g), "id")
        {
            entry.grant_expires = text(Some(g), "expires");
            if self.grant_of.len() < LIST_CAP {
                self.grant_of.insert(gid.clone(), entry.id.clone());
            }
            entry.grant = Some(gid);
        }
        if let Some(r) = text(a, "reason")
            && entry.reasons.len() < CITE_CAP
        {
            entry.reasons.push(r);
        }
        if let Some(t) = text(a, "ticket")
            && entry.tickets.len() < CITE_CAP
        {
            entry.tickets.push(t);
        }
        if entry.records.len() < CITE_CAP {
            entry.records.push(cite.clone());
        }
        // Approving one's own request (or voting on it) is not an approval.
        if (outcome == "granted" || rec.kind == Kind::ApprovalVote)
            && let (Some(req), Some(by)) = (requester, approver)
            && req == by
            && let Some(f) = self.findings.get_mut(&req)
        {
            f.unauthorized.push(cite.clone());
        }
    }

    fn grant_revoked(&mut self, rec: &Record, cite: &Cite) {
        let a = rec.approval.as_ref();
        let Some(gid) = text(a, "grant") else { return };
        let Some(entry) = self
            .grant_of
            .get(&gid)
            .and_then(|id| self.approvals.get_mut(id))
        else {
            return;
        };
        entry.grant_revoked = Some(format!(
            "{} by {}{}",
            rec.time,
            rec.identity
                .as_ref()
                .map_or_else(|| text(a, "by").unwrap_or_default(), |i| clip(&i.subject)),
            text(a, "reason")
                .map(|r| format!(": {r}"))
                .unwrap_or_default()
        ));
        if entry.records.len() < CITE_CAP {
            entry.records.push(cite.clone());
        }
    }

    fn deny(&mut self, rec: &Record, who: &str, cite: &Cite, what: Option<String>) {
        self.denials.push(Denial {
            time: rec.time.clone(),
            identity: who.to_owned(),
            kind: rec.kind.as_str(),
            resource: rec.resource.clone(),
            what,
            rule: text(rec.decision.as_ref(), "rule"),
            reason: text(rec.decision.as_ref(), "reason")
                .or_else(|| text(rec.decision.as_ref(), "detail")),
            record: cite.clone(),
        });
    }

    fn note_identity(&mut self, rec: &Record, who: &str, cite: &Cite) {
        let entry = self
            .identities
            .entry(who.to_owned())
            .or_insert_with(|| IdentityEntry {
                subject: who.to_owned(),
                kinds: Vec::new(),
                verified: false,
                how: String::new(),
                issuer: None,
                oidc_subject: None,
                groups: Vec::new(),
                first_seen: None,
                last_seen: None,
                records: Capped::new(CITE_CAP),
            });
        entry.first_seen.get_or_insert_with(|| rec.time.clone());
        entry.last_seen = Some(rec.time.clone());
        if let Some(i) = rec.identity.as_ref().filter(|i| names(&i.subject, who)) {
            // `NAME (ISSUER#SUB)`: where the daemon verified it, when no
            // login record in the period says so.
            if entry.issuer.is_none()
                && let Some((issuer, sub)) = i
                    .subject
                    .strip_prefix(who)
                    .and_then(|r| r.strip_prefix(" ("))
                    .and_then(|r| r.strip_suffix(')'))
                    .and_then(|r| r.rsplit_once('#'))
            {
                entry.issuer = Some(clip(issuer));
                entry.oidc_subject = Some(clip(sub));
            }
            if !entry.kinds.contains(&i.kind) && entry.kinds.len() < CITE_CAP {
                entry.kinds.push(clip(&i.kind));
                entry.records.push(cite.clone());
            }
            for g in &i.groups {
                if !entry.groups.contains(g) && entry.groups.len() < CITE_CAP {
                    entry.groups.push(clip(g));
                }
            }
        }
        if rec.kind == Kind::IdentityLogin {
            let a = rec.action.as_ref();
            entry.issuer = text(a, "issuer");
            entry.oidc_subject = text(a, "subject");
            for g in strings(a, "groups") {
                if !entry.groups.contains(&g) && entry.groups.len() < CITE_CAP {
                    entry.groups.push(g);
                }
            }
            entry.records.push(cite.clone());
        }
        let verified_kinds = ["human", "service", "oidc"];
        entry.verified = !entry.kinds.is_empty()
            && entry
                .kinds
                .iter()
                .all(|k| verified_kinds.contains(&k.as_str()));
        entry.how = if entry.verified {
            format!(
                "OIDC: ID token or client credentials verified by the daemon (signature against the provider's keys, issuer, audience, expiry){}",
                entry
                    .issuer
                    .as_deref()
                    .map(|i| format!("; issuer {i}"))
                    .unwrap_or_default()
                    + &entry
                        .oidc_subject
                        .as_deref()
                        .map(|s| format!(", subject {s}"))
                        .unwrap_or_default()
            )
        } else if entry.kinds.iter().any(|k| k == "label") {
            "UNVERIFIED label: a local name from the daemon's configuration, not checked against any identity provider".into()
        } else {
            format!("as recorded: {}", entry.kinds.join(", "))
        };
    }

    fn note_workload(&mut self, rec: &Record, who: &str, cite: &Cite) {
        let Some(w) = &rec.workload else { return };
        let key = (
            who.to_owned(),
            rec.host.clone(),
            w.exe.clone().unwrap_or_default(),
            w.uid,
            w.cgroup.clone().unwrap_or_default(),
            w.cmdline.clone().unwrap_or_default(),
        );
        if !self.workloads.contains_key(&key) && self.workloads.len() >= KEY_CAP {
            self.workloads_omitted += 1;
            return;
        }
        let e = self.workloads.entry(key).or_insert_with(|| WorkloadEntry {
            identity: who.to_owned(),
            host: clip(&rec.host),
            exe: w.exe.as_deref().map(clip),
            cmdline: w.cmdline.as_deref().map(clip),
            uid: w.uid,
            cgroup: w.cgroup.as_deref().map(clip),
            pids: Capped::new(CITE_CAP),
            connections: 0,
            first_seen: rec.time.clone(),
            last_seen: rec.time.clone(),
            records: Capped::new(CITE_CAP),
        });
        if rec.kind == Kind::ConnectionOpen {
            e.connections += 1;
        }
        if !e.pids.items.contains(&w.pid) {
            e.pids.push(w.pid);
        }
        e.last_seen.clone_from(&rec.time);
        e.records.push(cite.clone());
    }

    fn note_resource(&mut self, rec: &Record, cite: &Cite) -> Option<&mut ResourceEntry> {
        let name = rec.resource.as_ref()?;
        if !self.resources.contains_key(name) && self.resources.len() >= KEY_CAP {
            self.resources_omitted += 1;
            return None;
        }
        let e = self
            .resources
            .entry(name.clone())
            .or_insert_with(|| ResourceEntry {
                name: clip(name),
                protocols: BTreeSet::new(),
                destinations: BTreeSet::new(),
                tables: BTreeSet::new(),
                connections: 0,
                commands: 0,
                denied: 0,
                first_seen: rec.time.clone(),
                last_seen: rec.time.clone(),
                records: Capped::new(CITE_CAP),
            });
        e.last_seen.clone_from(&rec.time);
        e.records.push(cite.clone());
        Some(e)
    }

    /// The log starts at `first` (seq > 0): retention deleted what came
    /// before. A gap if the period reaches back before it.
    pub fn retained_from(&mut self, first: Cite) {
        if first.time.as_str() > self.scope.from.as_str() {
            let to = first.time.clone();
            self.gap_overlapping(
                "retention",
                &self.scope.from.clone(),
                Some(&to),
                format!(
                    "records before seq {} were deleted by retention (not tampering: anchor.json, vouched for by a signed retention record, carries the chain and Merkle tree over them); the period reaches back before the oldest record kept",
                    first.seq
                ),
                vec![first],
                false,
            );
        }
    }

    /// The verification result, once the pass is over.
    pub fn set_integrity(&mut self, f: impl FnOnce(&mut Integrity)) {
        f(&mut self.integrity);
    }

    /// The report. `end_of_log` is the time of the last record read.
    #[allow(clippy::too_many_lines)] // the five answers, in order
    pub fn finish(mut self, generated_at: String, log_dir: String) -> Report {
        // Still down at the end of the log.
        if let Some(stop) = self.daemon.stopped.clone() {
            let mode = self
                .daemon
                .running
                .as_ref()
                .map(|(_, m)| m.clone())
                .unwrap_or_default();
            self.gap_overlapping(
                "daemon_down",
                &stop.time.clone(),
                None,
                "the daemon was stopped and the log shows no start after it".into(),
                vec![stop],
                mode == "open",
            );
        }
        let integrity_problem = !self.integrity.intact
            || self
                .integrity
                .older_checkpoints
                .as_ref()
                .is_some_and(|o| !o.consistent);
        let gap_cites: Vec<Cite> = self
            .integrity
            .gaps
            .items
            .iter()
            .flat_map(|g| g.records.iter().cloned())
            .take(CITE_CAP)
            .collect();
        let mut attestations = Vec::new();
        for who in self.scope.identities.clone() {
            let f = self.findings.remove(&who).expect("identity in scope");
            let mut answers = Vec::new();
            // 1. Unmasked protected fields.
            let (ans, detail, cites) = if f.unmasked.total() > 0 {
                (
                    "yes",
                    format!(
                        "{} result record(s) name a column whose lineage involves a protected column and whose values were sent as they were (a lineage decision that is not a masking one)",
                        f.unmasked.total()
                    ),
                    f.unmasked,
                )
            } else {
                (
                    "no",
                    format!(
                        "{} result(s) had protected values masked (the records below); in every result record, each column whose lineage involves a protected column was masked by its recorded decision, and a value that cannot be masked is never sent ({} masking failure(s), each closing its connection)",
                        f.masked.total(),
                        self.masking.failures.as_ref().map_or(0, Capped::total)
                    ),
                    f.masked,
                )
            };
            answers.push(answer(
                "q1",
                "Did any protected field reach its agents unmasked?",
                ans,
                detail,
                cites,
            ));
            // 2. Authorization.
            let (ans, detail, cites) = if f.unauthorized.total() > 0 {
                (
                    "yes",
                    format!(
                        "{} command(s) ran without a valid grant, or were approved by the requester",
                        f.unauthorized.total()
                    ),
                    f.unauthorized,
                )
            } else {
                (
                    "no",
                    format!(
                        "every command that needed approval ran only after a grant by someone other than the requester ({} such command(s), below); every other command was allowed by the rule its record names",
                        f.authorized.total()
                    ),
                    f.authorized,
                )
            };
            answers.push(answer(
                "q2",
                "Did any command run without the authorization its rule required?",
                ans,
                detail,
                cites,
            ));
            // 3. Gaps and integrity.
            let mut cites = Capped::new(CITE_CAP);
            let detail = if integrity_problem {
                format!(
                    "the log is not intact: {}",
                    self.integrity
                        .failure
                        .as_ref()
                        .map_or("inconsistent with the given checkpoint", |f| f
                            .summary
                            .as_str())
                )
            } else if self.integrity.gaps.total() > 0 {
                format!(
                    "the log verifies, but the period has {} gap(s) listed under Integrity",
                    self.integrity.gaps.total()
                )
            } else {
                format!(
                    "the log verifies (chain, Merkle tree, {} signed checkpoint(s)) and the period has no gap; the newest checkpoint is cited by every proof in records.jsonl",
                    self.integrity.checkpoints
                )
            };
            for c in &gap_cites {
                cites.push(c.clone());
            }
            let ans = if integrity_problem || self.integrity.gaps.total() > 0 {
                "yes"
            } else {
                "no"
            };
            answers.push(answer(
                "q3",
                "Is there any gap or integrity failure in the period?",
                ans,
                detail,
                cites,
            ));
            // 4. In force.
            let mut cites = Capped::new(CITE_CAP);
            let mut problems = Vec::new();
            if f.escapes.total() > 0 {
                problems.push(format!(
                    "{} workload.privileged / workload.escaped record(s): a root process in a tagged cgroup or a process that left one",
                    f.escapes.total()
                ));
                for c in &f.escapes.items {
                    cites.push(c.clone());
                }
            }
            if self.not_in_force.total() > 0 {
                problems.push("the daemon was down with fail mode open".into());
                for c in &self.not_in_force.items {
                    cites.push(c.clone());
                }
            }
            if integrity_problem {
                problems.push("the log is not intact, so the period cannot be vouched for".into());
            }
            let mut notes = Vec::new();
            if let Some((c, mode)) = &self.daemon.running {
                notes.push(format!(
                    "daemon started at {} with fail mode {mode}",
                    c.time
                ));
                cites.push(c.clone());
            }
            if !self.daemon.unattached.is_empty() {
                notes.push(format!(
                    "hooks not attached on this host: {} (see Containment for the fallback)",
                    self.daemon.unattached.join(", ")
                ));
                if let Some(c) = &self.daemon.unattached_cite {
                    cites.push(c.clone());
                }
            }
            if f.refused.total() > 0 {
                notes.push(format!("{} escape attempt(s) refused", f.refused.total()));
                for c in &f.refused.items {
                    cites.push(c.clone());
                }
            }
            let ans = if problems.is_empty() && self.daemon.running.is_some() {
                "yes"
            } else {
                "no"
            };
            if self.daemon.running.is_none() {
                problems.push("no daemon.start record precedes the end of the period".into());
            }
            let detail = if problems.is_empty() {
                format!(
                    "in force: daemon up or failing closed throughout; {}",
                    notes.join("; ")
                )
            } else {
                format!("{}; {}", problems.join("; "), notes.join("; "))
            };
            answers.push(answer(
                "q4",
                "Was the gateway in force for the whole period?",
                ans,
                detail,
                cites,
            ));
            // 5. Live at the end.
            let mut cites = Capped::new(CITE_CAP);
            let end = crate::audit::parse_time(&self.scope.to)
                .map_or(0, time::OffsetDateTime::unix_timestamp);
            let mut live: Vec<&Open> = self
                .sessions
                .values()
                .chain(
                    self.logins
                        .values()
                        .filter(|(_, expires)| *expires > end)
                        .map(|(o, _)| o),
                )
                .chain(self.bindings.values())
                .chain(self.pending.values())
                .chain(
                    self.grants
                        .values()
                        .filter(|(_, expires)| {
                            expires
                                .as_deref()
                                .and_then(crate::audit::parse_time)
                                .is_none_or(|t| t.unix_timestamp() > end)
                        })
                        .map(|(o, _)| o),
                )
                .filter(|o| o.identity == who)
                .collect();
            live.sort_by_key(|o| o.cite.seq);
            let mut what: Vec<String> = Vec::new();
            for o in &live {
                if cites.push(o.cite.clone()) {
                    what.push(o.what.clone());
                }
            }
            let n = live.len();
            let ans = if n > 0 || self.open_overflow > 0 {
                "yes"
            } else {
                "no"
            };
            let detail = if n > 0 {
                format!("{n} live at {}: {}", self.scope.to, what.join("; "))
            } else if self.open_overflow > 0 {
                format!(
                    "{} open session(s) were past the tracking cap; treat as live",
                    self.open_overflow
                )
            } else {
                format!(
                    "no sign-in, session, cgroup binding, pending approval or unexpired grant of this identity was open at {}",
                    self.scope.to
                )
            };
            answers.push(answer(
                "q5",
                "Which sessions and grants were still live at the end of the period?",
                ans,
                detail,
                cites,
            ));
            attestations.push(Attestation {
                identity: who,
                answers,
            });
        }
        let mut approvals = Capped::new(LIST_CAP);
        approvals.omitted = self.approvals_omitted;
        let mut all: Vec<Approval> = self.approvals.into_values().collect();
        all.sort_by(|a, b| {
            a.requested_at
                .cmp(&b.requested_at)
                .then(a.decided_at.cmp(&b.decided_at))
        });
        for a in all {
            approvals.push(a);
        }
        let identities = self
            .scope
            .identities
            .iter()
            .map(|who| {
                self.identities
                    .remove(who)
                    .unwrap_or_else(|| IdentityEntry {
                        subject: who.clone(),
                        kinds: Vec::new(),
                        verified: false,
                        how: "no record of this identity in the period".into(),
                        issuer: None,
                        oidc_subject: None,
                        groups: Vec::new(),
                        first_seen: None,
                        last_seen: None,
                        records: Capped::new(CITE_CAP),
                    })
            })
            .collect();
        let mut workloads = Capped::new(KEY_CAP);
        workloads.omitted = self.workloads_omitted;
        for w in self.workloads.into_values() {
            workloads.push(w);
        }
        let mut resources = Capped::new(KEY_CAP);
        resources.omitted = self.resources_omitted;
        for r in self.resources.into_values() {
            resources.push(r);
        }
        Report {
            schema: SCHEMA,
            generated_at,
            generator: format!("agentgate {}", env!("CARGO_PKG_VERSION")),
            log_dir,
            timeline: Timeline {
                start: self.scope.from.clone(),
                bucket_hours: self.bucket_hours,
                buckets: self.buckets,
            },
            scope: self.scope,
            integrity: self.integrity,
            attestations,
            identities,
            workloads,
            resources,
            commands: self.commands,
            masking: self.masking,
            denials: self.denials,
            failures: self.failures,
            approvals,
            containment: self.containment,
            model_channel: self.model_channel,
            ssh_sessions: self.ssh_sessions,
            policy: None,
            controls: controls(),
            citations_omitted: 0,
            unproven: Vec::new(),
        }
    }
}

/// One vote as the daemon verified the voter: time, vote, the identity the
/// record names, its kind and the interface used.
fn vote_text(rec: &Record, outcome: &str, approver: Option<&str>) -> String {
    let a = rec.approval.as_ref();
    let i = rec.identity.as_ref();
    format!(
        "{}: {} by {} [{}{}]",
        rec.time,
        text(a, "vote").unwrap_or_else(|| outcome.to_owned()),
        i.map_or_else(
            || approver.unwrap_or_default().to_owned(),
            |i| clip(&i.subject)
        ),
        i.map_or("unknown", |i| i.kind.as_str()),
        text(a, "via")
            .map(|v| format!(", via {v}"))
            .unwrap_or_default()
    )
}

fn answer(
    id: &'static str,
    question: &'static str,
    answer: &'static str,
    detail: String,
    mut records: Capped<Cite>,
) -> Answer {
    let mut seen = BTreeSet::new();
    records.items.retain(|c| seen.insert(c.seq));
    Answer {
        id,
        question,
        answer,
        detail,
        records,
    }
}

fn insert_capped(set: &mut BTreeSet<String>, v: String) {
    if set.len() < CITE_CAP {
        set.insert(v);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::audit::IdentityRef;

    fn scope() -> Scope {
        Scope {
            identities: vec!["ann".into()],
            from: "2026-01-01T00:00:00.000000000Z".into(),
            to: "2026-01-02T00:00:00.000000000Z".into(),
        }
    }

    fn rec(seq: u64, time: &str, kind: Kind, who: Option<(&str, &str)>) -> Record {
        Record {
            v: 1,
            seq,
            time: format!("2026-01-01T{time}.000000000Z"),
            host: "h".into(),
            kind,
            session_id: Some("s1".into()),
            connection_id: Some(1),
            identity: who.map(|(s, k)| IdentityRef {
                subject: s.into(),
                kind: k.into(),
                groups: vec![],
            }),
            workload: None,
            resource: Some("db".into()),
            action: None,
            decision: None,
            transform: None,
            approval: None,
            result: None,
            prev: String::new(),
        }
    }

    fn run(records: &[Record]) -> Report {
        let mut c = Collector::new(scope());
        for r in records {
            c.observe(r.seq, &"0".repeat(64), r);
        }
        c.set_integrity(|i| i.intact = true);
        c.finish("now".into(), "dir".into())
    }

    fn answer_of(r: &Report, id: &str) -> (&'static str, Vec<u64>) {
        let a = r.attestations[0]
            .answers
            .iter()
            .find(|a| a.id == id)
            .unwrap();
        (a.answer, a.records.items.iter().map(|c| c.seq).collect())
    }

    fn statement(seq: u64, time: &str, verdict: &str) -> Record {
        let mut r = rec(seq, time, Kind::Statement, Some(("ann", "human")));
        r.action = Some(json!({"class": "read", "sql": "SELECT ?"}));
        r.decision = Some(json!({"verdict": verdict, "rule": "r"}));
        r
    }

    #[test]
    fn refusals_left_out_of_the_log_are_counted() {
        let mut first = rec(0, "01:00:00", Kind::ControlRefused, Some(("ann", "human")));
        first.action = Some(json!({"op": "status"}));
        let mut later = rec(1, "01:00:20", Kind::ControlRefused, Some(("ann", "human")));
        later.action = Some(json!({"op": "status", "suppressed": 40}));
        let r = run(&[first, later]);
        assert_eq!(r.containment.by_kind["control.refused"], 42);
    }

    #[test]
    fn lists_are_capped_and_count_what_they_leave_out() {
        let records: Vec<Record> = (0..LIST_CAP as u64 + 7)
            .map(|i| statement(i, "01:00:00", "allow"))
            .collect();
        let r = run(&records);
        let items = r.commands.items.as_ref().unwrap();
        assert_eq!(items.items.len(), LIST_CAP);
        assert_eq!(items.omitted, 7);
        assert_eq!(r.commands.total, LIST_CAP as u64 + 7);
        assert_eq!(r.timeline.bucket_hours, 1);
        assert_eq!(r.timeline.buckets[1][0], LIST_CAP as u64 + 7);
    }

    #[test]
    fn only_the_identities_and_the_period_are_itemized() {
        let mut other = statement(1, "02:00:00", "allow");
        other.identity.as_mut().unwrap().subject = "bob".into();
        let mut late = statement(2, "02:00:00", "allow");
        late.time = "2026-01-02T00:00:00.000000000Z".into();
        let r = run(&[statement(0, "02:00:00", "deny"), other, late]);
        assert_eq!(r.commands.total, 1);
        assert_eq!(r.denials.items.len(), 1);
        assert_eq!(r.denials.items[0].record.seq, 0);
    }

    #[test]
    fn a_start_without_a_stop_is_a_daemon_down_gap() {
        let mut s1 = rec(0, "01:00:00", Kind::DaemonStart, None);
        s1.action = Some(json!({"fail_mode": "open"}));
        let mid = statement(1, "02:00:00", "allow");
        let mut s2 = rec(2, "05:00:00", Kind::DaemonStart, None);
        s2.action = Some(json!({"fail_mode": "closed"}));
        let r = run(&[s1, mid, s2]);
        let g = &r.integrity.gaps.items[0];
        assert_eq!(g.kind, "daemon_down");
        assert!(g.from.starts_with("2026-01-01T02:00:00"), "{}", g.from);
        assert!(g.detail.contains("fail mode open"), "{}", g.detail);
        assert_eq!(answer_of(&r, "q3").0, "yes");
        // Down with fail mode open: the gateway was not in force.
        assert_eq!(answer_of(&r, "q4").0, "no");
    }

    #[test]
    fn an_approval_by_the_requester_is_not_authorization() {
        let mut granted = rec(
            0,
            "01:00:00",
            Kind::ApprovalGranted,
            Some(("ann", "approver")),
        );
        granted.approval = Some(json!({"id": "apr-1", "approver": "ann"}));
        granted.action = Some(json!({"requester": "ann"}));
        let mut ran = statement(1, "01:00:01", "allow");
        ran.approval = Some(json!({"id": "apr-1", "outcome": "granted", "approvers": ["ann"]}));
        let r = run(&[granted, ran]);
        let (ans, seqs) = answer_of(&r, "q2");
        assert_eq!(ans, "yes");
        assert_eq!(seqs, [0, 1]);
    }

    /// A result record as the Postgres proxy writes it after masking.
    fn result(seq: u64, lineage: &Value) -> Record {
        let mut done = rec(seq, "01:00:00", Kind::Statement, Some(("ann", "human")));
        done.action = Some(json!({"phase": "completed"}));
        done.result = Some(json!({"status": "ok", "command": "SELECT 3", "rows": 3}));
        done.transform = Some(json!({"masking": {"columns": ["ssn"], "values_masked": 3,
            "values_nulled": 0, "detectors": [], "lineage": lineage.clone()}}));
        done
    }

    #[test]
    fn a_verified_identity_is_found_by_its_name() {
        let verified = "ann (https://idp.example#u-123)";
        assert!(names(verified, "ann"));
        assert!(names("ann", "ann"));
        assert!(!names("anna (https://idp.example#u-9)", "ann"));
        assert!(!names("ann (not verified)", "ann"));
        let mut open = rec(
            0,
            "01:00:00",
            Kind::ConnectionOpen,
            Some((verified, "human")),
        );
        open.action = Some(json!({"destination": "127.0.0.1:5432"}));
        let r = run(&[open]);
        let id = &r.identities[0];
        assert_eq!(id.subject, "ann");
        assert!(id.verified);
        assert_eq!(id.issuer.as_deref(), Some("https://idp.example"));
        assert_eq!(id.oidc_subject.as_deref(), Some("u-123"));
        assert_eq!(answer_of(&r, "q5").0, "yes");
    }

    #[test]
    fn a_sign_in_held_past_the_end_is_live_until_it_expires_or_ends() {
        // 2026-01-02T00:00:00Z is 1767312000: the period's end.
        let login = |seq, expires: i64| {
            let mut r = rec(seq, "01:00:00", Kind::IdentityLogin, Some(("ann", "oidc")));
            r.action =
                Some(json!({"event": "login", "method": "device_flow", "expires_at": expires}));
            r
        };
        let r = run(&[login(0, 1_767_312_000 + 300)]);
        assert_eq!(answer_of(&r, "q5"), ("yes", vec![0]));
        let r = run(&[login(0, 1_767_312_000 - 300)]);
        assert_eq!(answer_of(&r, "q5").0, "no");
        let logout = rec(1, "02:00:00", Kind::IdentityExpiry, Some(("ann", "oidc")));
        let r = run(&[login(0, 1_767_312_000 + 300), logout]);
        assert_eq!(answer_of(&r, "q5").0, "no");
    }

    #[test]
    fn a_statement_run_on_its_approved_request_is_authorized() {
        let mut ran = statement(1, "01:00:00", "allow");
        ran.approval = Some(json!({"id": "apr-1", "outcome": "approved", "approvers": ["bob"]}));
        let r = run(&[ran]);
        assert_eq!(answer_of(&r, "q2").0, "no");
        assert_eq!(r.commands.by_decision["allow after approval"], 1);
    }

    /// An approver's record as the broker writes it (issue 15).
    fn vote(seq: u64, kind: Kind, who: &str, approval: Value) -> Record {
        let mut r = rec(seq, "01:00:00", kind, Some((who, "human")));
        r.action = Some(json!({"request": "apr-1", "requester": "ann", "summary": "UPDATE t"}));
        r.approval = Some(approval);
        r
    }

    #[test]
    fn votes_grants_their_uses_and_revocation_are_reported() {
        let mut asked = rec(
            0,
            "01:00:00",
            Kind::ApprovalRequested,
            Some(("ann", "human")),
        );
        asked.approval = Some(json!({"id": "apr-1", "approver_groups": ["dba"], "quorum": 2}));
        let first = vote(
            1,
            Kind::ApprovalVote,
            "bob (https://idp#b1)",
            json!({"id": "apr-1",
            "approver": "bob", "vote": "approve", "via": "cli", "ticket": "CHG-7"}),
        );
        let grant = json!({"id": "grt-9", "scope": "class", "expires": "2026-01-02T03:00:00Z"});
        let second = vote(
            2,
            Kind::ApprovalGranted,
            "cy (https://idp#c2)",
            json!({"id": "apr-1",
            "approver": "cy", "vote": "approve", "via": "web", "grant": grant}),
        );
        let mut ran = statement(3, "01:00:01", "allow");
        ran.approval =
            Some(json!({"id": "apr-1", "outcome": "approved", "approvers": ["bob", "cy"]}));
        let mut again = statement(4, "01:00:02", "allow");
        again.approval =
            Some(json!({"outcome": "granted", "grant": "grt-9", "approvers": ["bob", "cy"]}));
        let r = run(&[
            asked.clone(),
            first.clone(),
            second.clone(),
            ran.clone(),
            again.clone(),
        ]);
        let a = &r.approvals.items[0];
        assert_eq!(a.outcome, "granted");
        assert_eq!(a.approvers, ["bob", "cy"]);
        assert!(
            a.votes[0].contains("bob (https://idp#b1) [human, via cli]"),
            "{:?}",
            a.votes
        );
        assert_eq!(a.tickets, ["CHG-7"]);
        assert_eq!(a.grant.as_deref(), Some("grt-9"));
        assert_eq!(a.uses, 2);
        assert_eq!(answer_of(&r, "q2").0, "no");
        // The grant outlives the period (ends 2026-01-02): live at the end.
        let (ans, seqs) = answer_of(&r, "q5");
        assert_eq!((ans, seqs), ("yes", vec![2]));
        // Revoked: no longer live, and the approval says by whom.
        let mut revoked = rec(
            5,
            "02:00:00",
            Kind::GrantRevoked,
            Some(("bob (https://idp#b1)", "human")),
        );
        revoked.action = Some(json!({"grant": "grt-9", "identity": "ann"}));
        revoked.approval = Some(json!({"grant": "grt-9", "by": "bob", "reason": "done"}));
        let r = run(&[asked, first, second, ran, again, revoked]);
        assert_eq!(answer_of(&r, "q5").0, "no");
        let a = &r.approvals.items[0];
        assert!(
            a.grant_revoked
                .as_deref()
                .unwrap()
                .ends_with("by bob (https://idp#b1): done")
        );
    }

    #[test]
    fn masked_protected_columns_answer_no_with_their_records() {
        let r = run(&[result(
            3,
            &json!([{"column": "x", "lineage": "derived-redacted"}, {"column": "ssn", "lineage": "direct"}]),
        )]);
        assert_eq!(answer_of(&r, "q1"), ("no", vec![3]));
        assert_eq!(r.masking.columns_unmasked, 0);
        assert_eq!(r.masking.values_masked, 3);
        assert_eq!(r.masking.fields["ssn"].statements, 1);
        assert_eq!(r.masking.lineage["derived-redacted"], 1);
    }

    #[test]
    fn a_protected_column_passed_raw_answers_yes_with_its_record() {
        let masked = result(2, &json!([{"column": "ssn", "lineage": "direct"}]));
        let raw = result(
            3,
            &json!([{"column": "ssn", "lineage": "direct"}, {"column": "card", "lineage": "raw"}]),
        );
        // No decision at all for a column the lineage names is not masking either.
        let silent = result(4, &json!([{"column": "email"}]));
        let r = run(&[masked, raw, silent]);
        assert_eq!(answer_of(&r, "q1"), ("yes", vec![3, 4]));
        assert_eq!(r.masking.columns_unmasked, 2);
        assert_eq!(r.masking.lineage["raw"], 1);
        assert_eq!(r.masking.lineage["direct"], 2);
    }

    #[test]
    fn sessions_open_at_the_end_are_live_and_labels_are_unverified() {
        let open = rec(0, "01:00:00", Kind::ConnectionOpen, Some(("ann", "label")));
        let r = run(&[open]);
        assert_eq!(answer_of(&r, "q5"), ("yes", vec![0]));
        assert!(!r.identities[0].verified);
        assert!(r.identities[0].how.contains("UNVERIFIED"));
        let mut close = rec(1, "01:00:01", Kind::ConnectionClose, Some(("ann", "label")));
        close.session_id = Some("s1".into());
        let r = run(&[
            rec(0, "01:00:00", Kind::ConnectionOpen, Some(("ann", "label"))),
            close,
        ]);
        assert_eq!(answer_of(&r, "q5").0, "no");
    }

    #[test]
    fn an_approval_requested_before_the_period_and_never_decided_is_live() {
        let mut req = rec(
            0,
            "00:00:00",
            Kind::ApprovalRequested,
            Some(("ann", "human")),
        );
        req.time = "2025-12-31T23:00:00.000000000Z".into();
        req.approval = Some(json!({"id": "apr-9"}));
        let r = run(&[req.clone()]);
        assert_eq!(answer_of(&r, "q5"), ("yes", vec![0]));
        let mut denied = rec(1, "01:00:00", Kind::Statement, Some(("ann", "human")));
        denied.approval = Some(json!({"id": "apr-9", "outcome": "expired"}));
        denied.decision = Some(json!({"verdict": "deny", "rule": "r"}));
        let r = run(&[req, denied]);
        assert_eq!(answer_of(&r, "q5").0, "no");
    }

    #[test]
    fn masking_refusals_are_counted_by_oracle() {
        let mut recs = Vec::new();
        for (i, oracle) in ["enumeration", "error", "enumeration"].iter().enumerate() {
            let mut r = rec(
                i as u64,
                "01:00:00",
                Kind::Statement,
                Some(("ann", "human")),
            );
            r.action = Some(
                json!({"class": "read", "masking_refusal": {"oracle": oracle, "column": "customers.ssn"}}),
            );
            r.decision = Some(json!({"verdict": "deny", "rule": "masking.column customers.ssn"}));
            recs.push(r);
        }
        let r = run(&recs);
        assert_eq!(r.masking.refusals.get("enumeration"), Some(&2));
        assert_eq!(r.masking.refusals.get("error"), Some(&1));
    }

    #[test]
    fn texts_are_clipped() {
        let long = "x".repeat(TEXT_CAP * 3);
        assert_eq!(clip(&long).chars().count(), TEXT_CAP + 1);
    }
}
