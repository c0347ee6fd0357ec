//! Matching: which rule decides an action.
//!
//! Semantics (also in policies/README.md, and pinned by tests):
//!
//! 1. A rule *applies* when the subject matches (its identity matches one of
//!    `identities`, or one of its groups matches one of `groups`), the resource
//!    matches one of `resources`, and every condition in `match` holds.
//! 2. Of the applicable rules, the most specific wins, compared in this order:
//!    a. more conditions set in `match`;
//!    b. subject: literal identity (3) > identity glob (2) > group (1) > `*` (0);
//!    c. resource: literal name (1) > glob (0);
//!    d. at equal specificity the most restrictive action:
//!    deny > `require_approval` > allow;
//!    e. then the rule loaded first (files by name, rules in file order).
//! 3. No rule applies: the resource's `default_action` (rule `default:resource:<name>`).
//! 4. A destination no resource names: `[defaults] unknown_destination`, deny
//!    unless set otherwise (rule `default:unknown-destination`).
//!
//! Conditions are read in the direction that fails closed. For a statement
//! string with several statements, or touching several tables:
//! - an `allow` rule's `sql`, `tables`, `functions` conditions must hold for
//!   *every* statement / table / function (transaction-control statements are
//!   exempt from `sql`), and never hold for an `unknown` statement's tables or
//!   functions, which cannot be known;
//! - a `deny` or `require_approval` rule's conditions hold if *any* statement /
//!   table / function matches, and always hold for an `unknown` statement's
//!   tables and functions.
//!
//! `Connect` (opening the connection) is decided by the rules without
//! conditions; if none applies, the connection is allowed when some rule with
//! conditions could allow or approve a command for this subject, otherwise the
//! resource default decides.

use std::net::SocketAddr;

use super::{
    PolicySet,
    model::{
        Action, ActionKind, Conditions, Decision, Resource, Rule, RuleAction, Subject,
        UnknownDestination, Verdict,
    },
};
use crate::{
    policy::glob::Glob,
    sql::{Classification, StatementClass},
};

/// One rule that applied, for `policy explain`.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub rule: String,
    pub origin: String,
    pub action: &'static str,
    /// (conditions, subject, resource, severity): compared lexicographically.
    pub specificity: (u32, u8, u8, u8),
}

/// A decision and every rule that applied.
#[derive(Debug, Clone)]
pub struct Explanation {
    pub decision: Decision,
    pub candidates: Vec<Candidate>,
}

fn severity(a: &RuleAction) -> u8 {
    match a.kind() {
        ActionKind::Allow => 0,
        ActionKind::RequireApproval => 1,
        ActionKind::Deny => 2,
    }
}

fn verdict_of(action: &RuleAction, reason: impl FnOnce() -> String) -> Verdict {
    match action {
        RuleAction::Allow => Verdict::Allow,
        RuleAction::Deny => Verdict::Deny { reason: reason() },
        RuleAction::RequireApproval(spec) => Verdict::RequireApproval(spec.clone()),
    }
}

/// The subject-specificity of `rule` for `subject`, `None` if it does not match.
fn subject_score(rule: &Rule, subject: &Subject) -> Option<u8> {
    let mut best: Option<u8> = None;
    for g in &rule.identities {
        if g.matches(&subject.identity) {
            let s = if g.is_literal() {
                3
            } else if g.is_match_all() {
                0
            } else {
                2
            };
            best = Some(best.map_or(s, |b| b.max(s)));
        }
    }
    if best.is_some_and(|b| b >= 1) {
        return best;
    }
    for g in &rule.groups {
        if subject.groups.iter().any(|sg| g.matches(sg)) {
            let s = u8::from(!g.is_match_all());
            best = Some(best.map_or(s, |b| b.max(s)));
        }
    }
    best
}

/// How specifically `rule` names `subject` and the resource `name`: `None`
/// if it does not apply to the subject.
pub(crate) fn rule_scores(rule: &Rule, subject: &Subject, name: &str) -> Option<(u8, u8)> {
    Some((subject_score(rule, subject)?, resource_score(rule, name)))
}

fn resource_score(rule: &Rule, name: &str) -> u8 {
    rule.resources
        .iter()
        .filter(|g| g.matches(name))
        .map(|g| u8::from(g.is_literal()))
        .max()
        .unwrap_or(0)
}

fn table_matches(pats: &[Glob], table: &str) -> bool {
    pats.iter().any(|p| {
        p.matches(table)
            || table
                .rsplit_once('.')
                .is_some_and(|(_, unqualified)| p.matches(unqualified))
    })
}

fn names_hold(pats: &[Glob], names: &[String], c: &Classification, permissive: bool) -> bool {
    let unknown = c.class == StatementClass::Unknown;
    if permissive {
        !unknown && names.iter().all(|n| table_matches(pats, n))
    } else {
        unknown || names.iter().any(|n| table_matches(pats, n))
    }
}

fn sql_holds(cond: &Conditions, c: &Classification, permissive: bool) -> bool {
    if let Some(classes) = &cond.sql {
        let ok = if c.statements.is_empty() {
            // Unparsed (Unknown) or empty text (Transaction).
            if permissive && c.class == StatementClass::Transaction {
                true
            } else {
                classes.contains(&c.class)
            }
        } else if permissive {
            c.statements
                .iter()
                .all(|s| s.class == StatementClass::Transaction || classes.contains(&s.class))
        } else {
            c.statements.iter().any(|s| classes.contains(&s.class))
        };
        if !ok {
            return false;
        }
    }
    if let Some(pats) = &cond.tables
        && !names_hold(pats, &c.tables, c, permissive)
    {
        return false;
    }
    if let Some(pats) = &cond.functions
        && !names_hold(pats, &c.functions, c, permissive)
    {
        return false;
    }
    if let Some(d) = cond.destructive {
        // Unknown text may be destructive: a deny/approval rule on destructive
        // statements holds for it; an allow rule on non-destructive ones does not.
        let destructive = c.destructive || c.class == StatementClass::Unknown;
        if permissive {
            if d != c.destructive || (!d && c.class == StatementClass::Unknown) {
                return false;
            }
        } else if d != destructive {
            return false;
        }
    }
    true
}

fn any_glob(pats: Option<&Vec<Glob>>, v: &str) -> bool {
    pats.is_none_or(|p| p.iter().any(|g| g.matches(v)))
}

/// The conditions on an HTTP request's head (all but the body tests).
fn http_head_holds(
    cond: &Conditions,
    method: &str,
    host: &str,
    path: &str,
    query: Option<&str>,
    permissive: bool,
) -> bool {
    cond.http_methods
        .as_ref()
        .is_none_or(|m| m.iter().any(|x| x == "*" || x.eq_ignore_ascii_case(method)))
        && any_glob(cond.http_hosts.as_ref(), host)
        && any_glob(cond.http_paths.as_ref(), path)
        && cond
            .http_query
            .as_ref()
            .is_none_or(|tests| tests.iter().any(|t| t.holds(query, permissive)))
}

/// Do `cond` hold for `action`? `None`: the rule does not apply to this kind of action.
fn conditions_hold(cond: &Conditions, action: &Action, permissive: bool) -> bool {
    match action {
        Action::Connect => cond.count() == 0,
        Action::Sql(c) => {
            !cond.has_http()
                && !cond.has_kube()
                && !cond.has_ssh()
                && sql_holds(cond, c, permissive)
        }
        Action::Http {
            method,
            host,
            path,
            query,
            json,
        } => {
            !cond.has_sql()
                && !cond.has_kube()
                && !cond.has_ssh()
                && http_head_holds(cond, method, host, path, query.as_deref(), permissive)
                && cond.http_json.as_ref().is_none_or(|tests| {
                    json.as_deref()
                        .is_some_and(|doc| tests.iter().any(|t| t.holds(doc, permissive)))
                })
        }
        Action::Kube {
            verb,
            resource,
            namespace,
        } => {
            !cond.has_sql()
                && !cond.has_http()
                && !cond.has_ssh()
                && any_glob(cond.kube_verbs.as_ref(), verb)
                && any_glob(cond.kube_resources.as_ref(), resource)
                && cond.kube_namespaces.as_ref().is_none_or(|p| {
                    namespace
                        .as_deref()
                        .is_some_and(|ns| p.iter().any(|g| g.matches(ns)))
                })
        }
        Action::Ssh { class, destination } => {
            !cond.has_sql()
                && !cond.has_http()
                && !cond.has_kube()
                && cond
                    .ssh
                    .as_ref()
                    .is_none_or(|c| c.iter().any(|x| x == class))
                && cond.ssh_destinations.as_ref().is_none_or(|p| {
                    destination
                        .as_deref()
                        .is_some_and(|d| p.iter().any(|g| g.matches(d)))
                })
        }
    }
}

impl PolicySet {
    /// Decide an action by `subject` on `resource`.
    pub fn decide(&self, subject: &Subject, resource: &Resource, action: &Action) -> Decision {
        self.decide_inner(subject, resource, action, None)
    }

    /// [`PolicySet::decide`] plus every rule that applied.
    pub fn explain(&self, subject: &Subject, resource: &Resource, action: &Action) -> Explanation {
        let mut candidates = Vec::new();
        let decision = self.decide_inner(subject, resource, action, Some(&mut candidates));
        candidates.sort_by_key(|c| std::cmp::Reverse(c.specificity));
        Explanation {
            decision,
            candidates,
        }
    }

    /// Decide a new connection to `dst`. A destination no resource names gets
    /// `[defaults] unknown_destination` (deny unless set otherwise).
    pub fn decide_connect(&self, subject: &Subject, dst: SocketAddr) -> Decision {
        match self.resource_for(dst) {
            Some(r) => self.decide(subject, r, &Action::Connect),
            None => Decision {
                verdict: match self.unknown_destination {
                    UnknownDestination::Deny => Verdict::Deny {
                        reason: format!("{dst} is not a resource in the policy"),
                    },
                    UnknownDestination::Allow => Verdict::Allow,
                },
                rule: "default:unknown-destination".to_owned(),
            },
        }
    }

    /// Whether a rule that could apply to this HTTP request (subject,
    /// resource and head conditions hold) tests JSON body fields: then the
    /// handler must read the body before deciding, and refuse one it cannot read.
    pub fn http_needs_body(&self, subject: &Subject, resource: &Resource, action: &Action) -> bool {
        let Action::Http {
            method,
            host,
            path,
            query,
            ..
        } = action
        else {
            return false;
        };
        let Some(ri) = self.index_of(resource) else {
            return false;
        };
        self.rules_for[ri].iter().any(|&i| {
            let rule = &self.rules[i];
            let c = &rule.conditions;
            c.http_json.is_some()
                && !c.has_sql()
                && !c.has_kube()
                && !c.has_ssh()
                && subject_score(rule, subject).is_some()
                && http_head_holds(
                    c,
                    method,
                    host,
                    path,
                    query.as_deref(),
                    matches!(rule.action, RuleAction::Allow),
                )
        })
    }

    fn decide_inner(
        &self,
        subject: &Subject,
        resource: &Resource,
        action: &Action,
        mut explain: Option<&mut Vec<Candidate>>,
    ) -> Decision {
        let Some(ri) = self.index_of(resource) else {
            return Decision {
                verdict: Verdict::Deny {
                    reason: format!("resource `{}` is not in the policy in force", resource.name),
                },
                rule: "default:unknown-resource".to_owned(),
            };
        };
        let resource = &self.resources[ri];
        let mut best: Option<((u32, u8, u8, u8), usize)> = None;
        let mut could_allow: Option<usize> = None;
        for &i in &self.rules_for[ri] {
            let rule = &self.rules[i];
            let Some(subj) = subject_score(rule, subject) else {
                continue;
            };
            let permissive = matches!(rule.action, RuleAction::Allow);
            if !conditions_hold(&rule.conditions, action, permissive) {
                if matches!(action, Action::Connect)
                    && could_allow.is_none()
                    && severity(&rule.action) < 2
                {
                    could_allow = Some(i);
                }
                continue;
            }
            let spec = (
                rule.conditions.count(),
                subj,
                resource_score(rule, &resource.name),
                severity(&rule.action),
            );
            if let Some(list) = explain.as_deref_mut() {
                list.push(Candidate {
                    rule: rule.name.clone(),
                    origin: rule.origin.clone(),
                    action: rule.action.as_str(),
                    specificity: spec,
                });
            }
            // Strictly greater: on a full tie the earlier rule stays.
            if best.is_none_or(|(b, _)| spec > b) {
                best = Some((spec, i));
            }
        }
        if let Some((_, i)) = best {
            let rule = &self.rules[i];
            return Decision {
                verdict: verdict_of(&rule.action, || format!("denied by rule `{}`", rule.name)),
                rule: rule.name.clone(),
            };
        }
        if let Some(i) = could_allow {
            return Decision {
                verdict: Verdict::Allow,
                rule: self.rules[i].name.clone(),
            };
        }
        Decision {
            verdict: verdict_of(&resource.default, || {
                format!(
                    "no rule allows this on `{}` (resource default: deny)",
                    resource.name
                )
            }),
            rule: format!("default:resource:{}", resource.name),
        }
    }
}
