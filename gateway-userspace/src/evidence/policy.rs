//! The package's "Policy in force" section, and the part of question 2 that
//! depends on it: which policy versions were in force during the period,
//! what each change did rule by rule, and which commands ran only because of
//! a change.
//!
//! Versions come from the log (`daemon.start` names the digest it started
//! with, an accepted `policy.reload` the digest it put in force); their rules
//! come from the daemon's policy archive (`<state_dir>/policies/<digest>`),
//! checked against the digest before use. Fails closed: a command that ran
//! under a version the archive does not hold, or while the version at the
//! start of the period is unknown, cannot be judged, and is listed as such;
//! it turns question 2 to "yes" like a command allowed by a change, because
//! the report cannot show that it needed no approval.
//!
//! The judgement is rule level (see [`RULE`]), so an examiner can repeat it by
//! hand from the two versions' texts; it errs towards listing a command (a
//! loosened rule lists every command it allowed, even one the old rule would
//! have allowed too). Memory: versions and listed commands are capped at
//! [`LIST_CAP`], the rest counted.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use super::model::{CITE_CAP, Capped, Cite, LIST_CAP, Report, clip};
use crate::{
    audit::{Kind, Record},
    policy::{
        PolicyArchive, PolicySet,
        diff::{self, PolicyDiff, RuleChange},
    },
};

/// The rule question 2 applies to policy changes, as the report states it.
pub const RULE: &str = "A command is listed as allowed only by a policy change when it ran (its record's decision is allow) in the period under a policy version other than the one in force at the start of the period, and, comparing that version with the one at the start (agentgate policy diff START THEN), either (a) the rule its record names was added or loosened, or (b) a rule whose action at the start was deny or require_approval, and whose resources at the start matched the command's resource, was removed or loosened. Loosened means: a less strict action (deny > require_approval > allow); a wider match (a pattern added to identities, groups, resources or a match list, or a match condition dropped) on a rule that allows or asks for approval; a narrower match (a pattern removed, a condition added) on a rule that denies or asks for approval; and, for approval rules, a smaller quorum, an added approver group, a grant window added or longer, or grant scope statement widened to class. Resource defaults count as rules named default:resource:NAME. Any listed command turns question 2 to yes.";

/// One version of the policy and how it came into force.
#[derive(Debug, Clone, Serialize)]
pub struct Version {
    pub digest: String,
    /// When it took effect (the record's time).
    pub since: String,
    /// `daemon start`, `SIGHUP` or `file-change`.
    pub trigger: String,
    /// Who or what changed the files, as far as the host can tell: each
    /// file's owner and modification time, from the reload record.
    pub changed_by: Vec<String>,
    /// Whether the archive holds this version (its rules can be shown).
    pub archived: bool,
    pub rules: Option<usize>,
    /// Rule-level changes from the version before it (none for the first).
    pub changes: Vec<RuleChange>,
    pub record: Cite,
}

/// A command that ran only because of a policy change (or that cannot be judged).
#[derive(Debug, Clone, Serialize)]
pub struct Listed {
    pub time: String,
    pub identity: String,
    pub resource: Option<String>,
    pub summary: Option<String>,
    /// The rule its record names.
    pub rule: String,
    /// The version in force when it ran.
    pub policy: String,
    /// The changes (from the version at the start) that let it through, `name (kind)`.
    pub because: Vec<String>,
    pub record: Cite,
}

/// `evidence.json`'s `policy` section.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyInForce {
    /// The rule applied, in words.
    pub rule: &'static str,
    /// The policy archive read.
    pub archive: Option<String>,
    /// The version in force at the start of the period (`None`: the log
    /// does not show one before the period).
    pub at_start: Option<Version>,
    /// Versions that took effect during the period, in order.
    pub changed: Capped<Version>,
    /// Commands that ran only because a rule was added or loosened.
    pub allowed_by_change: Capped<Listed>,
    /// Commands under a version that could not be compared with the start.
    pub not_judged: Capped<Listed>,
}

#[derive(Debug, Clone)]
struct Seen {
    digest: String,
    since: String,
    trigger: String,
    changed_by: Vec<String>,
    cite: Cite,
}

#[derive(Debug, Clone)]
struct Candidate {
    who: String,
    rule: String,
    resource: Option<String>,
    summary: Option<String>,
    digest: String,
    cite: Cite,
}

/// Follows the policy versions through the log; the collector feeds it.
#[derive(Debug, Default)]
pub struct Tracker {
    current: Option<Seen>,
    at_start: Option<Seen>,
    changed: Vec<Seen>,
    changed_omitted: u64,
    /// Commands allowed under a version other than the one at the start.
    candidates: Vec<Candidate>,
    candidates_omitted: u64,
}

fn text(v: Option<&Value>, key: &str) -> Option<String> {
    v.and_then(|v| v.get(key)).and_then(Value::as_str).map(clip)
}

/// `name: owner uid N (user), modified T` for each file of a reload.
fn changed_by(rec: &Record) -> Vec<String> {
    rec.result
        .as_ref()
        .and_then(|r| r.get("file_stamps"))
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .take(CITE_CAP)
                .map(|s| {
                    clip(&format!(
                        "{}: owner uid {}{}, modified {}",
                        s.get("name").and_then(Value::as_str).unwrap_or("?"),
                        s.get("owner_uid").and_then(Value::as_u64).unwrap_or(0),
                        s.get("owner")
                            .and_then(Value::as_str)
                            .map(|o| format!(" ({o})"))
                            .unwrap_or_default(),
                        s.get("modified")
                            .and_then(Value::as_str)
                            .unwrap_or("unknown"),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

impl Tracker {
    /// Takes one verified record before the end of the period, in seq
    /// order; `who` is the identity in scope it names, `in_period` whether
    /// it falls in the period.
    pub fn observe(
        &mut self,
        seq: u64,
        hash: &str,
        rec: &Record,
        who: Option<&str>,
        in_period: bool,
    ) {
        let cite = || Cite {
            seq,
            hash: hash.to_owned(),
            kind: rec.kind.as_str(),
            time: rec.time.clone(),
        };
        let seen = match rec.kind {
            Kind::DaemonStart => text(rec.action.as_ref(), "policy_digest").map(|d| Seen {
                digest: d,
                since: rec.time.clone(),
                trigger: "daemon start".into(),
                changed_by: vec![format!(
                    "the daemon started with it (pid {})",
                    rec.workload.as_ref().map_or(0, |w| w.pid)
                )],
                cite: cite(),
            }),
            Kind::PolicyReload
                if text(rec.result.as_ref(), "outcome").as_deref() == Some("accepted") =>
            {
                text(rec.result.as_ref(), "digest").map(|d| Seen {
                    digest: d,
                    since: rec.time.clone(),
                    trigger: text(rec.action.as_ref(), "trigger").unwrap_or_else(|| "?".into()),
                    changed_by: changed_by(rec),
                    cite: cite(),
                })
            }
            _ => None,
        };
        if let Some(v) = seen {
            if self.current.as_ref().is_some_and(|c| c.digest == v.digest) {
                return;
            }
            // The first version seen, if the log shows none before the
            // period, is the one the period starts with.
            if in_period && self.current.is_some() {
                if self.changed.len() < LIST_CAP {
                    self.changed.push(v.clone());
                } else {
                    self.changed_omitted += 1;
                }
            } else {
                self.at_start = Some(v.clone());
            }
            self.current = Some(v);
            return;
        }
        let (Some(who), true) = (who, in_period) else {
            return;
        };
        if !matches!(rec.kind, Kind::Statement | Kind::Decision)
            || text(rec.decision.as_ref(), "verdict").as_deref() != Some("allow")
        {
            return;
        }
        // No version on record at all (a log from before versions were
        // recorded): no change is on record either.
        let Some(digest) = self.current.as_ref().map(|c| c.digest.clone()) else {
            return;
        };
        if self.at_start.as_ref().is_some_and(|c| c.digest == digest) {
            return;
        }
        if self.candidates.len() >= LIST_CAP {
            self.candidates_omitted += 1;
            return;
        }
        self.candidates.push(Candidate {
            who: who.to_owned(),
            rule: text(rec.decision.as_ref(), "rule").unwrap_or_default(),
            resource: rec.resource.clone(),
            summary: text(rec.action.as_ref(), "sql")
                .or_else(|| text(rec.action.as_ref(), "summary")),
            digest,
            cite: cite(),
        });
    }

    /// The section, with each version's rules read from `archive`.
    pub fn finish(self, archive: Option<&PolicyArchive>) -> PolicyInForce {
        let mut loaded: BTreeMap<String, Option<PolicySet>> = BTreeMap::new();
        let mut load = |d: &str| -> bool {
            if !loaded.contains_key(d) {
                let set = archive.and_then(|a| match a.load(d) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        tracing::warn!(digest = d, error = %e, "policy version not usable from the archive");
                        None
                    }
                });
                loaded.insert(d.to_owned(), set);
            }
            loaded[d].is_some()
        };
        let mut versions: Vec<&Seen> = self.at_start.iter().chain(&self.changed).collect();
        versions.dedup_by(|a, b| a.digest == b.digest);
        for v in &versions {
            load(&v.digest);
        }
        for c in &self.candidates {
            load(&c.digest);
        }
        let set = |d: &str| loaded.get(d).and_then(Option::as_ref);
        let version = |v: &Seen, prev: Option<&Seen>| Version {
            digest: v.digest.clone(),
            since: v.since.clone(),
            trigger: v.trigger.clone(),
            changed_by: v.changed_by.clone(),
            archived: set(&v.digest).is_some(),
            rules: set(&v.digest).map(|s| s.rules().len()),
            changes: match (prev.and_then(|p| set(&p.digest)), set(&v.digest)) {
                (Some(old), Some(new)) => diff::diff(old, new).changes,
                _ => Vec::new(),
            },
            record: v.cite.clone(),
        };
        let at_start = self.at_start.as_ref().map(|v| version(v, None));
        let mut changed = Capped::new(LIST_CAP);
        changed.omitted = self.changed_omitted;
        let mut prev = self.at_start.as_ref();
        for v in &self.changed {
            changed.push(version(v, prev));
            prev = Some(v);
        }
        let start_set = self.at_start.as_ref().and_then(|v| set(&v.digest));
        let mut diffs: BTreeMap<String, PolicyDiff> = BTreeMap::new();
        let mut allowed_by_change = Capped::new(LIST_CAP);
        let mut not_judged = Capped::new(LIST_CAP);
        not_judged.omitted = self.candidates_omitted;
        for c in self.candidates {
            let listed = |because: Vec<String>| Listed {
                time: c.cite.time.clone(),
                identity: c.who.clone(),
                resource: c.resource.clone(),
                summary: c.summary.clone(),
                rule: c.rule.clone(),
                policy: c.digest.clone(),
                because,
                record: c.cite.clone(),
            };
            let (Some(old), Some(new)) = (start_set, set(&c.digest)) else {
                not_judged.push(listed(vec![if start_set.is_none() {
                    "the version in force at the start of the period is not known or not archived"
                        .into()
                } else {
                    format!("version {} is not in the archive", diff::short(&c.digest))
                }]));
                continue;
            };
            let d = diffs
                .entry(c.digest.clone())
                .or_insert_with(|| diff::diff(old, new));
            let why = d.lets_through(&c.rule, c.resource.as_deref());
            if !why.is_empty() {
                allowed_by_change.push(listed(
                    why.iter()
                        .map(|w| format!("{} ({})", w.name, w.change.as_str()))
                        .collect(),
                ));
            }
        }
        PolicyInForce {
            rule: RULE,
            archive: archive.map(|a| a.dir().display().to_string()),
            at_start,
            changed,
            allowed_by_change,
            not_judged,
        }
    }
}

/// Adds the section to `report` and turns question 2 to "yes" for each
/// identity with a command allowed only by a change (or not judged), citing
/// the commands and the reloads.
pub fn apply(report: &mut Report, section: PolicyInForce) {
    for a in &mut report.attestations {
        let mine = |l: &&Listed| l.identity == a.identity;
        let by_change: Vec<&Listed> = section
            .allowed_by_change
            .items
            .iter()
            .filter(mine)
            .collect();
        let unjudged: Vec<&Listed> = section.not_judged.items.iter().filter(mine).collect();
        // Counts past the caps are not per identity: any overflow counts for all.
        let over = section.allowed_by_change.omitted + section.not_judged.omitted;
        if by_change.is_empty() && unjudged.is_empty() && over == 0 {
            continue;
        }
        let Some(q2) = a.answers.iter_mut().find(|q| q.id == "q2") else {
            continue;
        };
        let mut parts = Vec::new();
        if !by_change.is_empty() {
            parts.push(format!(
                "{} command(s) ran only because a rule was added or loosened during the period (Policy in force: allowed only by a policy change)",
                by_change.len()
            ));
        }
        if !unjudged.is_empty() || over > 0 {
            parts.push(format!(
                "{} command(s) ran under a policy version that cannot be compared with the one at the start (not archived), so they cannot be shown to have needed no approval",
                unjudged.len() as u64 + over
            ));
        }
        let mut records = Capped::new(CITE_CAP);
        for l in by_change.iter().chain(&unjudged) {
            records.push(l.record.clone());
        }
        for v in &section.changed.items {
            records.push(v.record.clone());
        }
        for c in &q2.records.items {
            records.push(c.clone());
        }
        let was = if q2.answer == "yes" {
            format!("; also: {}", q2.detail)
        } else {
            String::new()
        };
        q2.answer = "yes";
        q2.detail = format!("See policy changes: {}{was}", parts.join("; "));
        q2.records = records;
    }
    report.policy = Some(section);
}

fn change_rows(h: &mut String, changes: &[RuleChange]) {
    use super::html::esc;
    use std::fmt::Write;
    if changes.is_empty() {
        return;
    }
    h.push_str("<table><tr><th>Rule</th><th>Change</th><th>What changed</th><th>Before</th><th>After</th></tr>");
    for c in changes {
        let pre = |t: &Option<String>| {
            t.as_deref().map_or_else(
                || "<span class=muted>–</span>".to_owned(),
                |t| format!("<pre class=mono>{}</pre>", esc(t)),
            )
        };
        let _ = write!(
            h,
            "<tr><td><code>{}</code></td><td class={}>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&c.name),
            if c.loosens { "yes" } else { "no" },
            esc(&format!(
                "{}{}",
                c.change.as_str(),
                if c.loosens { " (loosens)" } else { "" }
            )),
            c.how
                .iter()
                .map(|x| esc(x))
                .collect::<Vec<_>>()
                .join("<br>"),
            pre(&c.old_text),
            pre(&c.new_text),
        );
    }
    h.push_str("</table>");
}

fn version_row(h: &mut String, v: &Version) {
    use super::html::{cite, esc};
    use std::fmt::Write;
    let _ = write!(
        h,
        "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
        esc(&v.digest),
        esc(&v.since),
        esc(&v.trigger),
        v.changed_by
            .iter()
            .map(|x| esc(x))
            .collect::<Vec<_>>()
            .join("<br>"),
        match (v.archived, v.rules) {
            (true, Some(n)) => format!("{n} rule(s), archived"),
            _ => "<span class=yes>not in the archive</span>".to_owned(),
        },
        cite(&v.record)
    );
}

fn listed_table(h: &mut String, l: &Capped<Listed>) {
    use super::html::{cite, esc};
    use std::fmt::Write;
    h.push_str("<table><tr><th>Time</th><th>Identity</th><th>Resource / command</th><th>Rule its record names</th><th>Policy in force</th><th>Let through by</th><th>Record</th></tr>");
    for x in &l.items {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}<br><code>{}</code></td><td><code>{}</code></td><td><code>{}</code></td><td>{}</td><td>{}</td></tr>",
            esc(&x.time),
            esc(&x.identity),
            esc(x.resource.as_deref().unwrap_or("–")),
            esc(x.summary.as_deref().unwrap_or("")),
            esc(&x.rule),
            esc(diff::short(&x.policy)),
            x.because
                .iter()
                .map(|b| esc(b))
                .collect::<Vec<_>>()
                .join("<br>"),
            cite(&x.record)
        );
    }
    h.push_str("</table>");
    if l.omitted > 0 {
        let _ = write!(h, "<p class=muted>{} more not listed.</p>", l.omitted);
    }
}

/// The section of `index.html`.
pub fn render_html(p: &PolicyInForce) -> String {
    use super::html::esc;
    use std::fmt::Write;
    let mut h = String::from("<section id=policy><h2>Policy in force</h2>");
    let _ = write!(
        h,
        "<p>Every policy version in force during the period, when it took effect and what triggered it, from <code>daemon.start</code> and <code>policy.reload</code> records; rules from the policy archive <code>{}</code> (each version checked against its digest; compare two with <code>agentgate policy diff OLD NEW</code>).</p>",
        esc(p.archive.as_deref().unwrap_or("(none given)"))
    );
    h.push_str("<table><tr><th>Digest</th><th>In force from</th><th>Trigger</th><th>Who or what changed the files (as the host reports)</th><th>Rules</th><th>Record</th></tr>");
    match &p.at_start {
        Some(v) => version_row(&mut h, v),
        None => h.push_str("<tr><td colspan=6 class=yes>The log shows no policy version in force at the start of the period.</td></tr>"),
    }
    for v in &p.changed.items {
        version_row(&mut h, v);
    }
    h.push_str("</table>");
    if p.changed.items.is_empty() {
        h.push_str("<p>No policy change took effect during the period.</p>");
    }
    for v in &p.changed.items {
        let _ = write!(
            h,
            "<h3>Change at {} to <code>{}</code> ({})</h3>",
            esc(&v.since),
            esc(diff::short(&v.digest)),
            esc(&v.trigger)
        );
        if v.changes.is_empty() {
            h.push_str("<p class=muted>No rule-level change shown (same rules, or a version not in the archive).</p>");
        }
        change_rows(&mut h, &v.changes);
    }
    let _ = write!(
        h,
        "<h3 id=allowed-by-change>Allowed only by a policy change</h3><p><b>The rule applied:</b> {}</p>",
        esc(p.rule)
    );
    if p.allowed_by_change.total() == 0 {
        h.push_str("<p>None.</p>");
    } else {
        listed_table(&mut h, &p.allowed_by_change);
    }
    if p.not_judged.total() > 0 {
        h.push_str("<h3>Not judged (policy version not available)</h3>");
        listed_table(&mut h, &p.not_judged);
    }
    h.push_str("</section>");
    h
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{
        audit::IdentityRef,
        evidence::model::{Collector, Scope},
        policy::load_str,
    };

    const BASE: &str = r#"
[[resource]]
name = "db"
protocol = "postgres"
addresses = ["127.0.0.1:5432"]

[[rule]]
name = "reads"
identities = ["ann"]
resources = ["db"]
match = { sql = ["read"] }
action = "allow"
"#;
    const DDL_NEEDS_APPROVAL: &str = r#"
[[rule]]
name = "ddl"
identities = ["ann"]
resources = ["db"]
match = { sql = ["ddl"] }
action = "require_approval"
approval = { approver_groups = ["ops"], timeout = "60s" }
"#;

    fn rec(seq: u64, time: &str, kind: Kind) -> Record {
        Record {
            v: 1,
            seq,
            time: format!("2026-01-01T{time}.000000000Z"),
            host: "h".into(),
            kind,
            session_id: Some("s1".into()),
            connection_id: Some(1),
            identity: None,
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

    fn start(seq: u64, time: &str, digest: &str) -> Record {
        let mut r = rec(seq, time, Kind::DaemonStart);
        r.action = Some(json!({"policy_digest": digest, "fail_mode": "closed"}));
        r
    }

    fn reload(seq: u64, time: &str, digest: &str) -> Record {
        let mut r = rec(seq, time, Kind::PolicyReload);
        r.action = Some(json!({"trigger": "SIGHUP"}));
        r.result = Some(json!({"outcome": "accepted", "digest": digest,
            "file_stamps": [{"name": "p.toml", "owner_uid": 0, "owner": "root", "modified": "2026-01-01T01:00:00Z"}]}));
        r
    }

    fn ran(seq: u64, time: &str, rule: &str) -> Record {
        let mut r = rec(seq, time, Kind::Statement);
        r.identity = Some(IdentityRef {
            subject: "ann".into(),
            kind: "label".into(),
            groups: vec![],
        });
        r.action = Some(json!({"sql": "DROP TABLE t", "class": "ddl"}));
        r.decision = Some(json!({"verdict": "allow", "rule": rule, "reason": null}));
        r
    }

    /// Archives `texts` as versions; returns the archive and their digests.
    fn archive(dir: &std::path::Path, texts: &[&str]) -> (PolicyArchive, Vec<String>) {
        let a = PolicyArchive::in_state_dir(dir);
        let digests = texts
            .iter()
            .map(|t| {
                let set = load_str(&[("p.toml", t)]).unwrap();
                a.store(&set).unwrap();
                set.digest().to_owned()
            })
            .collect();
        (a, digests)
    }

    fn report(records: &[Record], archive: &PolicyArchive) -> Report {
        let mut c = Collector::new(Scope {
            identities: vec!["ann".into()],
            from: "2026-01-01T01:00:00.000000000Z".into(),
            to: "2026-01-02T00:00:00.000000000Z".into(),
        });
        for r in records {
            c.observe(r.seq, &"0".repeat(64), r);
        }
        c.set_integrity(|i| i.intact = true);
        let t = c.take_policy();
        let mut r = c.finish("now".into(), "dir".into());
        apply(&mut r, t.finish(Some(archive)));
        r
    }

    fn q2(r: &Report) -> (&'static str, String) {
        let a = r.attestations[0]
            .answers
            .iter()
            .find(|a| a.id == "q2")
            .unwrap();
        (a.answer, a.detail.clone())
    }

    #[test]
    fn a_command_allowed_only_by_a_loosening_reload_turns_question_2_to_yes() {
        let tmp = tempfile::tempdir().unwrap();
        let baseline = format!("{BASE}{DDL_NEEDS_APPROVAL}");
        let looser = baseline
            .replace("\"require_approval\"", "\"allow\"")
            .replace("approval = {", "# {");
        let (a, d) = archive(tmp.path(), &[&baseline, &looser]);
        let records = [
            start(0, "00:00:00", &d[0]),
            reload(1, "02:00:00", &d[1]),
            ran(2, "02:01:00", "ddl"),
            reload(3, "02:02:00", &d[0]),
        ];
        let r = report(&records, &a);
        let (ans, detail) = q2(&r);
        assert_eq!(ans, "yes");
        assert!(
            detail.starts_with("See policy changes: 1 command(s)"),
            "{detail}"
        );
        let p = r.policy.as_ref().unwrap();
        assert_eq!(p.at_start.as_ref().unwrap().digest, d[0]);
        let versions: Vec<&str> = p.changed.items.iter().map(|v| v.digest.as_str()).collect();
        assert_eq!(versions, [d[1].as_str(), d[0].as_str()]);
        let first = &p.changed.items[0];
        assert_eq!(first.trigger, "SIGHUP");
        assert!(
            first.changed_by[0].contains("owner uid 0 (root)"),
            "{:?}",
            first.changed_by
        );
        assert_eq!(first.changes.len(), 1);
        assert_eq!(first.changes[0].name, "ddl");
        assert_eq!(first.changes[0].how, ["action: require_approval -> allow"]);
        assert_eq!(
            p.changed.items[1].changes[0].change,
            diff::ChangeKind::Tightened
        );
        let listed = &p.allowed_by_change.items;
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].record.seq, 2);
        assert_eq!(listed[0].because, ["ddl (loosened)"]);
        let schema: Value = serde_json::from_str(
            &std::fs::read_to_string(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../docs/evidence.schema.json"),
            )
            .unwrap(),
        )
        .unwrap();
        let errors: Vec<String> = jsonschema::validator_for(&schema)
            .unwrap()
            .iter_errors(&serde_json::to_value(&r).unwrap())
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{errors:?}");
        let html = crate::evidence::html::render(&r);
        assert!(html.contains("Allowed only by a policy change"));
        assert!(html.contains("see policy changes"));
    }

    #[test]
    fn without_a_change_or_under_an_unchanged_rule_nothing_is_listed() {
        let tmp = tempfile::tempdir().unwrap();
        let baseline = format!("{BASE}{DDL_NEEDS_APPROVAL}");
        // A tightening elsewhere: the reads rule is untouched.
        let other = baseline.replace("timeout = \"60s\"", "timeout = \"90s\"");
        let (a, d) = archive(tmp.path(), &[&baseline, &other]);
        let r = report(
            &[start(0, "00:00:00", &d[0]), ran(1, "02:00:00", "reads")],
            &a,
        );
        assert_eq!(q2(&r).0, "no");
        let r = report(
            &[
                start(0, "00:00:00", &d[0]),
                reload(1, "02:00:00", &d[1]),
                ran(2, "02:01:00", "reads"),
            ],
            &a,
        );
        assert_eq!(q2(&r).0, "no", "{:?}", r.policy);
        assert_eq!(
            r.policy.unwrap().changed.items[0].changes[0].change,
            diff::ChangeKind::Changed
        );
    }

    #[test]
    fn a_version_missing_from_the_archive_cannot_be_judged_and_fails_closed() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, d) = archive(tmp.path(), &[BASE]);
        let r = report(
            &[
                start(0, "00:00:00", &d[0]),
                reload(1, "02:00:00", &"f".repeat(64)),
                ran(2, "02:01:00", "reads"),
            ],
            &a,
        );
        assert_eq!(q2(&r).0, "yes");
        let p = r.policy.unwrap();
        assert_eq!(p.not_judged.items.len(), 1);
        assert!(!p.changed.items[0].archived);
    }
}
