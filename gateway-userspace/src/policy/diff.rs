//! Rule-level changes between two policy versions: what `agentgate policy
//! diff` prints and what the evidence package's "Policy in force" section
//! lists for each reload.
//!
//! Rules are matched by name (names are unique within a policy); resource
//! defaults are compared as pseudo-rules named `default:resource:<name>`, and
//! `[defaults] unknown_destination` as `default:unknown-destination`, the
//! names decision records use. A change is *loosening* when it can let
//! through a command the old version stopped (denied, or held for approval):
//!
//! - an added rule whose action is `allow` or `require_approval`;
//! - a removed `deny` or `require_approval` rule;
//! - a less strict action (deny > `require_approval` > allow);
//! - a wider match on a rule that allows or asks for approval (an identity,
//!   group, resource, table, function, class, method, host, path, verb or
//!   namespace pattern added, or a `match` condition dropped);
//! - a narrower match on a rule that denies or asks for approval (a pattern
//!   removed, or a condition added);
//! - on a rule that asks for approval in both versions: a smaller quorum, an
//!   approver group added, a grant window added or longer, grant scope
//!   `statement` widened to `class`.
//!
//! Patterns are compared as written, not by what they match (`db-*` and
//! `db-1` are different entries): a pattern swapped for another counts as
//! both wider and narrower, so the comparison errs towards calling a change
//! loosening, never towards hiding one. Changes that are not loosening are
//! `tightened` (the mirror image) or `changed` (an approval timeout).

use std::{fmt::Write as _, time::Duration};

use serde::Serialize;

use super::{
    PolicySet, UnknownDestination,
    glob::Glob,
    model::{ActionKind, ApprovalSpec, Conditions, GrantScope, Resource, Rule, RuleAction},
};

/// How a rule differs between two versions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Added,
    Removed,
    Loosened,
    Tightened,
    Changed,
}

impl ChangeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "added",
            Self::Removed => "removed",
            Self::Loosened => "loosened",
            Self::Tightened => "tightened",
            Self::Changed => "changed",
        }
    }
}

/// One rule (or resource default) that differs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleChange {
    /// The rule's name, or `default:resource:<name>` / `default:unknown-destination`.
    pub name: String,
    pub change: ChangeKind,
    /// It can let through a command the old version stopped (see the module doc).
    pub loosens: bool,
    /// What changed, one line each (`action: require_approval -> allow`).
    pub how: Vec<String>,
    pub old_action: Option<&'static str>,
    pub new_action: Option<&'static str>,
    /// The resource patterns the old and new rule name.
    pub old_resources: Vec<String>,
    pub new_resources: Vec<String>,
    /// The rule as each version states it (canonical TOML, with where it was written).
    pub old_text: Option<String>,
    pub new_text: Option<String>,
}

impl RuleChange {
    /// Whether the old version of this rule stopped commands (deny or
    /// `require_approval`) on `resource`.
    pub fn stopped_on(&self, resource: &str) -> bool {
        matches!(self.old_action, Some("deny" | "require_approval"))
            && self
                .old_resources
                .iter()
                .any(|p| Glob::new(p).matches(resource))
    }
}

/// Every rule-level change from `old` to `new`, rules in the new version's
/// order, then removed ones in the old version's order, then defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PolicyDiff {
    pub old_digest: String,
    pub new_digest: String,
    pub changes: Vec<RuleChange>,
}

impl PolicyDiff {
    /// The loosening change to `rule` itself, if any.
    pub fn loosened(&self, rule: &str) -> Option<&RuleChange> {
        self.changes.iter().find(|c| c.loosens && c.name == rule)
    }

    /// What lets a command allowed by `rule` on `resource` through in the new
    /// version that the old one may have stopped: its own rule added or
    /// loosened, else a loosened or removed rule that used to deny it or ask
    /// for approval on that resource.
    pub fn lets_through(&self, rule: &str, resource: Option<&str>) -> Vec<&RuleChange> {
        if let Some(c) = self.loosened(rule) {
            return vec![c];
        }
        self.changes
            .iter()
            .filter(|c| c.loosens && resource.is_some_and(|r| c.stopped_on(r)))
            .collect()
    }
}

/// Compares two loaded policies rule by rule.
pub fn diff(old: &PolicySet, new: &PolicySet) -> PolicyDiff {
    let mut changes = Vec::new();
    for n in new.rules() {
        match old.rules().iter().find(|o| o.name == n.name) {
            None => changes.push(RuleChange {
                name: n.name.clone(),
                change: ChangeKind::Added,
                loosens: n.action.kind() != ActionKind::Deny,
                how: vec![format!("added, action {}", n.action.as_str())],
                old_action: None,
                new_action: Some(n.action.as_str()),
                old_resources: Vec::new(),
                new_resources: globs(&n.resources),
                old_text: None,
                new_text: Some(rule_text(n)),
            }),
            Some(o) => {
                if let Some(c) = compare_rules(o, n) {
                    changes.push(c);
                }
            }
        }
    }
    for o in old.rules() {
        if !new.rules().iter().any(|n| n.name == o.name) {
            changes.push(RuleChange {
                name: o.name.clone(),
                change: ChangeKind::Removed,
                loosens: o.action.kind() != ActionKind::Allow,
                how: vec![format!("removed, was {}", o.action.as_str())],
                old_action: Some(o.action.as_str()),
                new_action: None,
                old_resources: globs(&o.resources),
                new_resources: Vec::new(),
                old_text: Some(rule_text(o)),
                new_text: None,
            });
        }
    }
    resource_defaults(old, new, &mut changes);
    if old.unknown_destination() != new.unknown_destination() {
        let name = |u| match u {
            UnknownDestination::Allow => "allow",
            UnknownDestination::Deny => "deny",
        };
        let loosens = new.unknown_destination() == UnknownDestination::Allow;
        changes.push(RuleChange {
            name: "default:unknown-destination".into(),
            change: if loosens {
                ChangeKind::Loosened
            } else {
                ChangeKind::Tightened
            },
            loosens,
            how: vec![format!(
                "unknown_destination: {} -> {}",
                name(old.unknown_destination()),
                name(new.unknown_destination())
            )],
            old_action: Some(name(old.unknown_destination())),
            new_action: Some(name(new.unknown_destination())),
            old_resources: vec!["*".into()],
            new_resources: vec!["*".into()],
            old_text: Some(format!(
                "[defaults]\nunknown_destination = \"{}\"",
                name(old.unknown_destination())
            )),
            new_text: Some(format!(
                "[defaults]\nunknown_destination = \"{}\"",
                name(new.unknown_destination())
            )),
        });
    }
    PolicyDiff {
        old_digest: old.digest().to_owned(),
        new_digest: new.digest().to_owned(),
        changes,
    }
}

fn globs(g: &[Glob]) -> Vec<String> {
    g.iter().map(|g| g.as_str().to_owned()).collect()
}

fn severity(k: ActionKind) -> u8 {
    match k {
        ActionKind::Allow => 0,
        ActionKind::RequireApproval => 1,
        ActionKind::Deny => 2,
    }
}

/// Wider and narrower findings for one rule, each a line of `how`.
#[derive(Default)]
struct Findings {
    looser: Vec<String>,
    tighter: Vec<String>,
    other: Vec<String>,
}

/// A list of patterns: entries added make the match wider, removed narrower.
fn compare_list(f: &mut Findings, what: &str, old: &[String], new: &[String], stops: (bool, bool)) {
    let added: Vec<&String> = new.iter().filter(|p| !old.contains(p)).collect();
    let removed: Vec<&String> = old.iter().filter(|p| !new.contains(p)).collect();
    widened(f, !added.is_empty(), stops, || {
        format!("{what}: added {}", quoted(&added))
    });
    narrowed(f, !removed.is_empty(), stops, || {
        format!("{what}: removed {}", quoted(&removed))
    });
}

/// A `match` condition: absent means any.
fn compare_condition(
    f: &mut Findings,
    what: &str,
    old: Option<Vec<String>>,
    new: Option<Vec<String>>,
    stops: (bool, bool),
) {
    match (old, new) {
        (None, None) => {}
        (Some(o), None) => widened(f, true, stops, || {
            format!(
                "match.{what}: dropped (was {}; now any)",
                quoted(&o.iter().collect::<Vec<_>>())
            )
        }),
        (None, Some(n)) => narrowed(f, true, stops, || {
            format!(
                "match.{what}: added {}",
                quoted(&n.iter().collect::<Vec<_>>())
            )
        }),
        (Some(o), Some(n)) => compare_list(f, &format!("match.{what}"), &o, &n, stops),
    }
}

/// `stops`: (the old rule stops commands, the new rule lets commands through
/// or holds them). Widening a rule that lets through loosens; widening one
/// that stops tightens.
fn widened(
    f: &mut Findings,
    happened: bool,
    (_, new_passes): (bool, bool),
    line: impl FnOnce() -> String,
) {
    if !happened {
        return;
    }
    if new_passes {
        f.looser.push(line());
    } else {
        f.tighter.push(line());
    }
}

fn narrowed(
    f: &mut Findings,
    happened: bool,
    (old_stops, _): (bool, bool),
    line: impl FnOnce() -> String,
) {
    if !happened {
        return;
    }
    if old_stops {
        f.looser.push(line());
    } else {
        f.tighter.push(line());
    }
}

fn quoted(v: &[&String]) -> String {
    v.iter()
        .map(|s| format!("\"{s}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

fn condition_lists(c: &Conditions) -> Vec<(&'static str, Option<Vec<String>>)> {
    let g = |v: &Option<Vec<Glob>>| v.as_ref().map(|v| globs(v));
    vec![
        (
            "sql",
            c.sql
                .as_ref()
                .map(|v| v.iter().map(|s| s.as_str().to_owned()).collect()),
        ),
        ("tables", g(&c.tables)),
        ("functions", g(&c.functions)),
        ("destructive", c.destructive.map(|d| vec![d.to_string()])),
        ("http_methods", c.http_methods.clone()),
        ("http_hosts", g(&c.http_hosts)),
        ("http_paths", g(&c.http_paths)),
        ("kube_verbs", g(&c.kube_verbs)),
        ("kube_resources", g(&c.kube_resources)),
        ("kube_namespaces", g(&c.kube_namespaces)),
    ]
}

fn compare_approvals(f: &mut Findings, old: &ApprovalSpec, new: &ApprovalSpec) {
    if new.quorum < old.quorum {
        f.looser
            .push(format!("quorum: {} -> {}", old.quorum, new.quorum));
    } else if new.quorum > old.quorum {
        f.tighter
            .push(format!("quorum: {} -> {}", old.quorum, new.quorum));
    }
    let og: Vec<String> = old.approver_groups.clone();
    let ng: Vec<String> = new.approver_groups.clone();
    let added: Vec<&String> = ng.iter().filter(|g| !og.contains(g)).collect();
    let removed: Vec<&String> = og.iter().filter(|g| !ng.contains(g)).collect();
    if !added.is_empty() {
        f.looser
            .push(format!("approver_groups: added {}", quoted(&added)));
    }
    if !removed.is_empty() {
        f.tighter
            .push(format!("approver_groups: removed {}", quoted(&removed)));
    }
    match (old.grant_window, new.grant_window) {
        (before, after) if before == after => {}
        (None, Some(after)) => f
            .looser
            .push(format!("grant_window: none -> {}", secs(after))),
        (Some(before), None) => f
            .tighter
            .push(format!("grant_window: {} -> none", secs(before))),
        (Some(before), Some(after)) if after > before => {
            f.looser
                .push(format!("grant_window: {} -> {}", secs(before), secs(after)));
        }
        (Some(before), Some(after)) => {
            f.tighter
                .push(format!("grant_window: {} -> {}", secs(before), secs(after)));
        }
        (None, None) => {}
    }
    match (old.grant_scope, new.grant_scope) {
        (GrantScope::Statement, GrantScope::Class) => {
            f.looser.push("grant_scope: statement -> class".into());
        }
        (GrantScope::Class, GrantScope::Statement) => {
            f.tighter.push("grant_scope: class -> statement".into());
        }
        _ => {}
    }
    if old.timeout != new.timeout {
        f.other.push(format!(
            "approval timeout: {} -> {}",
            secs(old.timeout),
            secs(new.timeout)
        ));
    }
}

fn compare_actions(f: &mut Findings, o: &RuleAction, n: &RuleAction) {
    let (so, sn) = (severity(o.kind()), severity(n.kind()));
    if sn < so {
        f.looser
            .push(format!("action: {} -> {}", o.as_str(), n.as_str()));
    } else if sn > so {
        f.tighter
            .push(format!("action: {} -> {}", o.as_str(), n.as_str()));
    } else if let (RuleAction::RequireApproval(a), RuleAction::RequireApproval(b)) = (o, n) {
        compare_approvals(f, a, b);
    }
}

fn compare_rules(o: &Rule, n: &Rule) -> Option<RuleChange> {
    let (ot, nt) = (rule_text(o), rule_text(n));
    if strip_origin(&ot) == strip_origin(&nt) {
        return None;
    }
    let mut f = Findings::default();
    compare_actions(&mut f, &o.action, &n.action);
    let stops = (
        o.action.kind() != ActionKind::Allow,
        n.action.kind() != ActionKind::Deny,
    );
    compare_list(
        &mut f,
        "identities",
        &globs(&o.identities),
        &globs(&n.identities),
        stops,
    );
    compare_list(
        &mut f,
        "groups",
        &globs(&o.groups),
        &globs(&n.groups),
        stops,
    );
    compare_list(
        &mut f,
        "resources",
        &globs(&o.resources),
        &globs(&n.resources),
        stops,
    );
    for ((what, oc), (_, nc)) in condition_lists(&o.conditions)
        .into_iter()
        .zip(condition_lists(&n.conditions))
    {
        compare_condition(&mut f, what, oc, nc, stops);
    }
    let change = if !f.looser.is_empty() {
        ChangeKind::Loosened
    } else if !f.tighter.is_empty() {
        ChangeKind::Tightened
    } else {
        ChangeKind::Changed
    };
    let mut how = f.looser;
    how.extend(f.tighter);
    how.extend(f.other);
    Some(RuleChange {
        name: n.name.clone(),
        change,
        loosens: change == ChangeKind::Loosened,
        how,
        old_action: Some(o.action.as_str()),
        new_action: Some(n.action.as_str()),
        old_resources: globs(&o.resources),
        new_resources: globs(&n.resources),
        old_text: Some(ot),
        new_text: Some(nt),
    })
}

fn resource_defaults(old: &PolicySet, new: &PolicySet, changes: &mut Vec<RuleChange>) {
    for n in new.resources() {
        let name = format!("default:resource:{}", n.name);
        match old.resource(&n.name) {
            None => changes.push(RuleChange {
                name,
                change: ChangeKind::Added,
                loosens: n.default.kind() != ActionKind::Deny,
                how: vec![format!(
                    "resource added, default_action {}",
                    n.default.as_str()
                )],
                old_action: None,
                new_action: Some(n.default.as_str()),
                old_resources: Vec::new(),
                new_resources: vec![n.name.clone()],
                old_text: None,
                new_text: Some(default_text(n)),
            }),
            Some(o) if o.default != n.default => {
                let mut f = Findings::default();
                compare_actions(&mut f, &o.default, &n.default);
                let change = if !f.looser.is_empty() {
                    ChangeKind::Loosened
                } else if !f.tighter.is_empty() {
                    ChangeKind::Tightened
                } else {
                    ChangeKind::Changed
                };
                let mut how = f.looser;
                how.extend(f.tighter);
                how.extend(f.other);
                changes.push(RuleChange {
                    name,
                    change,
                    loosens: change == ChangeKind::Loosened,
                    how,
                    old_action: Some(o.default.as_str()),
                    new_action: Some(n.default.as_str()),
                    old_resources: vec![o.name.clone()],
                    new_resources: vec![n.name.clone()],
                    old_text: Some(default_text(o)),
                    new_text: Some(default_text(n)),
                });
            }
            Some(_) => {}
        }
    }
    for o in old.resources() {
        if new.resource(&o.name).is_none() {
            let loosens = new.unknown_destination() == UnknownDestination::Allow;
            changes.push(RuleChange {
                name: format!("default:resource:{}", o.name),
                change: ChangeKind::Removed,
                loosens,
                how: vec![format!(
                    "resource removed (its addresses are now unknown destinations: {})",
                    if loosens { "allowed" } else { "denied" }
                )],
                old_action: Some(o.default.as_str()),
                new_action: None,
                old_resources: vec![o.name.clone()],
                new_resources: Vec::new(),
                old_text: Some(default_text(o)),
                new_text: None,
            });
        }
    }
}

fn secs(d: Duration) -> String {
    format!("{}s", d.as_secs())
}

fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
}

fn list(v: &[String]) -> String {
    format!(
        "[{}]",
        v.iter().map(|s| q(s)).collect::<Vec<_>>().join(", ")
    )
}

fn approval_text(a: &ApprovalSpec) -> String {
    let mut s = format!(
        "{{ approver_groups = {}, quorum = {}, timeout = {}",
        list(&a.approver_groups),
        a.quorum,
        q(&secs(a.timeout))
    );
    if let Some(w) = a.grant_window {
        let _ = write!(
            s,
            ", grant_window = {}, grant_scope = {}",
            q(&secs(w)),
            q(a.grant_scope.as_str())
        );
    }
    s.push_str(" }");
    s
}

const ORIGIN: &str = "# at ";

fn strip_origin(text: &str) -> &str {
    text.rsplit_once(&format!("\n{ORIGIN}"))
        .map_or(text, |(t, _)| t)
}

/// A rule as canonical TOML (defaults written out, durations in seconds),
/// followed by a comment naming where it was written.
pub fn rule_text(r: &Rule) -> String {
    let mut s = format!("[[rule]]\nname = {}\n", q(&r.name));
    if !r.identities.is_empty() {
        let _ = writeln!(s, "identities = {}", list(&globs(&r.identities)));
    }
    if !r.groups.is_empty() {
        let _ = writeln!(s, "groups = {}", list(&globs(&r.groups)));
    }
    let _ = writeln!(s, "resources = {}", list(&globs(&r.resources)));
    let conds: Vec<String> = condition_lists(&r.conditions)
        .into_iter()
        .filter_map(|(k, v)| {
            v.map(|v| {
                if k == "destructive" {
                    format!("{k} = {}", v.join(""))
                } else {
                    format!("{k} = {}", list(&v))
                }
            })
        })
        .collect();
    if !conds.is_empty() {
        let _ = writeln!(s, "match = {{ {} }}", conds.join(", "));
    }
    let _ = writeln!(s, "action = {}", q(r.action.as_str()));
    if let Some(u) = &r.ssh_user {
        let _ = writeln!(s, "ssh_user = {}", q(u));
    }
    if let RuleAction::RequireApproval(a) = &r.action {
        let _ = writeln!(s, "approval = {}", approval_text(a));
    }
    s.push_str(ORIGIN);
    s.push_str(&r.origin);
    s
}

fn default_text(r: &Resource) -> String {
    let mut s = format!(
        "[[resource]]\nname = {}\nprotocol = {}\ndefault_action = {}",
        q(&r.name),
        q(r.protocol.as_str()),
        q(r.default.as_str())
    );
    if let RuleAction::RequireApproval(a) = &r.default {
        let _ = write!(s, "\ndefault_approval = {}", approval_text(a));
    }
    s
}

/// The change list as text, one block per rule: what `policy diff` prints
/// and the package shows.
pub fn render_text(d: &PolicyDiff) -> String {
    let mut s = format!(
        "policy {} -> {}: {} change(s), {} loosening\n",
        short(&d.old_digest),
        short(&d.new_digest),
        d.changes.len(),
        d.changes.iter().filter(|c| c.loosens).count()
    );
    for c in &d.changes {
        let _ = write!(
            s,
            "\n{} {}{}\n",
            c.change.as_str().to_uppercase(),
            c.name,
            if c.loosens { "  (loosens)" } else { "" }
        );
        for h in &c.how {
            let _ = writeln!(s, "  {h}");
        }
        if let Some(t) = &c.old_text {
            s.push_str("  --- old\n");
            for l in t.lines() {
                let _ = writeln!(s, "  - {l}");
            }
        }
        if let Some(t) = &c.new_text {
            s.push_str("  +++ new\n");
            for l in t.lines() {
                let _ = writeln!(s, "  + {l}");
            }
        }
    }
    s
}

/// The first 12 hex digits of a digest, as reports show it.
pub fn short(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::load_str;

    const RES: &str = r#"
[[resource]]
name = "db"
protocol = "postgres"
addresses = ["127.0.0.1:5432"]
"#;

    fn set(rules: &str) -> PolicySet {
        load_str(&[("p.toml", &format!("{RES}\n{rules}"))]).unwrap()
    }

    fn one(old: &str, new: &str) -> Vec<RuleChange> {
        diff(&set(old), &set(new)).changes
    }

    const APPROVE: &str = r#"
[[rule]]
name = "r"
identities = ["a"]
resources = ["db"]
match = { sql = ["ddl"] }
action = "require_approval"
approval = { approver_groups = ["ops"], quorum = 2, timeout = "60s" }
"#;

    #[test]
    fn identical_policies_have_no_changes() {
        assert!(one(APPROVE, APPROVE).is_empty());
    }

    #[test]
    fn an_added_allow_rule_loosens_an_added_deny_rule_does_not() {
        let allow = r#"
[[rule]]
name = "x"
identities = ["a"]
resources = ["db"]
action = "allow"
"#;
        let c = one("", allow);
        assert_eq!(c.len(), 1);
        assert_eq!((c[0].change, c[0].loosens), (ChangeKind::Added, true));
        assert!(
            c[0].new_text
                .as_deref()
                .unwrap()
                .contains("action = \"allow\"")
        );
        let c = one("", &allow.replace("allow", "deny"));
        assert_eq!((c[0].change, c[0].loosens), (ChangeKind::Added, false));
    }

    #[test]
    fn a_removed_approval_rule_loosens_a_removed_allow_rule_does_not() {
        let c = one(APPROVE, "");
        assert_eq!((c[0].change, c[0].loosens), (ChangeKind::Removed, true));
        assert!(c[0].stopped_on("db"));
        assert!(!c[0].stopped_on("other"));
        let allow = APPROVE
            .replace("\"require_approval\"", "\"allow\"")
            .replace("approval = {", "# {");
        let c = one(&allow, "");
        assert_eq!((c[0].change, c[0].loosens), (ChangeKind::Removed, false));
    }

    #[test]
    fn a_less_strict_action_loosens() {
        let allow = APPROVE
            .replace("\"require_approval\"", "\"allow\"")
            .replace("approval = {", "# {");
        let c = one(APPROVE, &allow);
        assert_eq!(c[0].change, ChangeKind::Loosened);
        assert_eq!(c[0].how, ["action: require_approval -> allow"]);
        let c = one(&allow, APPROVE);
        assert_eq!((c[0].change, c[0].loosens), (ChangeKind::Tightened, false));
        let deny = allow.replace("\"allow\"", "\"deny\"");
        assert!(one(&deny, APPROVE)[0].loosens);
    }

    #[test]
    fn fewer_approvers_more_groups_and_longer_grants_loosen() {
        let c = one(APPROVE, &APPROVE.replace("quorum = 2", "quorum = 1"));
        assert_eq!(c[0].how, ["quorum: 2 -> 1"]);
        assert!(c[0].loosens);
        let c = one(
            APPROVE,
            &APPROVE.replace("[\"ops\"]", "[\"ops\", \"devs\"]"),
        );
        assert_eq!(c[0].how, ["approver_groups: added \"devs\""]);
        assert!(c[0].loosens);
        let c = one(
            APPROVE,
            &APPROVE.replace(
                "timeout = \"60s\"",
                "timeout = \"60s\", grant_window = \"1h\"",
            ),
        );
        assert!(c[0].loosens, "{c:?}");
        // A longer timeout is a change, not a loosening.
        let c = one(APPROVE, &APPROVE.replace("\"60s\"", "\"120s\""));
        assert_eq!((c[0].change, c[0].loosens), (ChangeKind::Changed, false));
        assert_eq!(c[0].how, ["approval timeout: 60s -> 120s"]);
    }

    #[test]
    fn a_wider_allow_or_approval_rule_loosens_a_wider_deny_rule_tightens() {
        let allow = r#"
[[rule]]
name = "reads"
identities = ["a"]
resources = ["db"]
match = { sql = ["read"], tables = ["public.orders"] }
action = "allow"
"#;
        let wider = allow.replace(
            "[\"public.orders\"]",
            "[\"public.orders\", \"public.customers\"]",
        );
        let c = one(allow, &wider);
        assert_eq!(c[0].how, ["match.tables: added \"public.customers\""]);
        assert!(c[0].loosens);
        // A dropped condition matches anything: wider.
        let c = one(allow, &allow.replace(", tables = [\"public.orders\"]", ""));
        assert!(c[0].loosens, "{c:?}");
        // A wider identity match.
        let c = one(allow, &allow.replace("[\"a\"]", "[\"a\", \"b*\"]"));
        assert_eq!(c[0].how, ["identities: added \"b*\""]);
        assert!(c[0].loosens);
        // Widening an approval rule can make approvable what was denied
        // (and hold what was allowed): counted as loosening.
        let c = one(
            APPROVE,
            &APPROVE.replace("[\"ddl\"]", "[\"ddl\", \"write\"]"),
        );
        assert_eq!((c[0].change, c[0].loosens), (ChangeKind::Loosened, true));
        // Widening a deny rule only stops more: tightens.
        let deny = APPROVE
            .replace("\"require_approval\"", "\"deny\"")
            .replace("approval = {", "# {");
        let c = one(&deny, &deny.replace("[\"ddl\"]", "[\"ddl\", \"write\"]"));
        assert_eq!((c[0].change, c[0].loosens), (ChangeKind::Tightened, false));
        // Narrowing an approval rule lets the rest through: loosens.
        let c = one(
            &APPROVE.replace("[\"ddl\"]", "[\"ddl\", \"write\"]"),
            APPROVE,
        );
        assert_eq!(c[0].how, ["match.sql: removed \"write\""]);
        assert!(c[0].loosens);
    }

    #[test]
    fn resource_defaults_and_unknown_destinations_are_compared() {
        let old = load_str(&[("p.toml", RES)]).unwrap();
        let new = load_str(&[(
            "p.toml",
            &format!(
                "[defaults]\nunknown_destination = \"allow\"\n{}",
                RES.replace(
                    "addresses = [\"127.0.0.1:5432\"]",
                    "addresses = [\"127.0.0.1:5432\"]\ndefault_action = \"allow\"",
                )
            ),
        )])
        .unwrap();
        let d = diff(&old, &new);
        let names: Vec<(&str, bool)> = d
            .changes
            .iter()
            .map(|c| (c.name.as_str(), c.loosens))
            .collect();
        assert_eq!(
            names,
            [
                ("default:resource:db", true),
                ("default:unknown-destination", true)
            ]
        );
        assert_eq!(d.lets_through("default:resource:db", Some("db")).len(), 1);
    }

    #[test]
    fn a_command_allowed_by_an_unchanged_rule_is_let_through_by_a_removed_stop() {
        let allow = r#"
[[rule]]
name = "all"
identities = ["*"]
resources = ["db"]
action = "allow"
"#;
        let d = diff(&set(&format!("{allow}{APPROVE}")), &set(allow));
        let why = d.lets_through("all", Some("db"));
        assert_eq!(why.len(), 1);
        assert_eq!(why[0].name, "r");
        assert!(d.lets_through("all", Some("elsewhere")).is_empty());
    }
}
