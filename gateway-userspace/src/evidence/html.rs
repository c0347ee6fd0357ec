//! `index.html`: the report for a person. Self-contained (inline CSS and SVG,
//! no scripts, no external assets), one section per page when printed. Every
//! value from the log is HTML-escaped; citations link to the cited-records
//! appendix, whose entries name the record's seq and hash in records.jsonl.

use std::fmt::Write;

use super::model::{Capped, Cite, Denial, Report};

const CSS: &str = r"
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;color:#111;margin:2rem auto;max-width:1100px;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{border-bottom:2px solid #333;padding-bottom:.2rem;margin-top:2.5rem}
table{border-collapse:collapse;width:100%;margin:.5rem 0}th,td{border:1px solid #bbb;padding:.25rem .4rem;text-align:left;vertical-align:top}
th{background:#eee}td.num{text-align:right}code,.mono{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px;word-break:break-all}
.banner{padding:1rem;border:3px solid;font-weight:600;margin:1rem 0}.bad{color:#b00000;border-color:#b00000;background:#fff0f0}
.good{color:#0a5d1a;border-color:#0a5d1a;background:#f0fff3}.yes{color:#b00000;font-weight:700}.no{color:#0a5d1a;font-weight:700}
.muted{color:#555}.cites a{margin-right:.35rem}nav a{margin-right:.7rem}
@media print{nav{display:none}section{break-before:page}section:first-of-type{break-before:auto}body{margin:0;max-width:none}a{color:inherit;text-decoration:none}table{font-size:11px}}
";

/// Escapes text for HTML element and attribute content.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

fn opt(s: Option<&str>) -> String {
    s.map_or_else(|| "<span class=muted>–</span>".into(), esc)
}

pub(super) fn cite(c: &Cite) -> String {
    format!(
        "<a href=\"#r{0}\" title=\"{1} {2}\">#{0}</a>",
        c.seq,
        esc(c.kind),
        esc(&c.hash)
    )
}

pub(super) fn cites<'a>(cs: impl IntoIterator<Item = &'a Cite>, omitted: u64) -> String {
    let mut s = String::from("<span class=cites>");
    for c in cs {
        s.push_str(&cite(c));
    }
    if omitted > 0 {
        let _ = write!(s, "<span class=muted>(+{omitted} more)</span>");
    }
    s.push_str("</span>");
    s
}

fn omitted<T>(c: &Capped<T>) -> String {
    if c.omitted > 0 {
        format!(
            "<p class=muted>{} more not listed (cap {}); all are in the log (<code>agentgate audit export</code>).</p>",
            c.omitted,
            c.items.len()
        )
    } else {
        String::new()
    }
}

/// The whole page.
// One block per section, in the page's order; h is the page, r the report.
#[allow(clippy::too_many_lines, clippy::many_single_char_names)]
pub fn render(r: &Report) -> String {
    let mut h = String::with_capacity(64 << 10);
    let ids = r.scope.identities.join(", ");
    let _ = write!(
        h,
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>Evidence: {}</title><style>{CSS}</style></head><body>",
        esc(&ids)
    );
    let _ = write!(
        h,
        "<header><h1>Evidence package: {}</h1><p>Period {} to {} (UTC). Generated {} by {} from <code>{}</code>. Schema <code>{}</code>.</p>",
        esc(&ids),
        esc(&r.scope.from),
        esc(&r.scope.to),
        esc(&r.generated_at),
        esc(&r.generator),
        esc(&r.log_dir),
        esc(r.schema)
    );
    let i = &r.integrity;
    if let Some(f) = &i.failure {
        let _ = write!(
            h,
            "<div class='banner bad' id=not-intact>{}<br>Only records before it are vouched for and itemized below; see Integrity.</div>",
            esc(&f.summary)
        );
    } else if i.older_checkpoints.as_ref().is_some_and(|o| !o.consistent) {
        h.push_str("<div class='banner bad'>The log is NOT consistent with the exported checkpoint given.</div>");
    } else {
        let _ = write!(
            h,
            "<div class='banner good'>The log verifies: seqs {}..{}, {} signed checkpoint(s), root <code>{}</code>.</div>",
            i.first_seq,
            i.verified_to,
            i.checkpoints,
            esc(i.root.as_deref().unwrap_or(""))
        );
    }
    h.push_str("<nav><a href=#attestation>Attestation</a><a href=#integrity>Integrity</a><a href=#identities>Identities</a><a href=#workloads>Workloads</a><a href=#resources>Resources</a><a href=#timeline>Timeline</a><a href=#commands>Commands</a><a href=#masking>Masking</a><a href=#denials>Denials and failures</a><a href=#approvals>Approvals</a><a href=#policy>Policy in force</a><a href=#containment>Containment</a><a href=#controls>Controls</a><a href=#records>Cited records</a></nav></header>");

    // Attestation.
    h.push_str("<section id=attestation><h2>Offboarding attestation</h2>");
    for a in &r.attestations {
        let _ = write!(
            h,
            "<h3>{}</h3><table><tr><th>#</th><th>Question</th><th>Answer</th><th>Why</th><th>Records</th></tr>",
            esc(&a.identity)
        );
        for (n, q) in a.answers.iter().enumerate() {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td class={}>{}</td><td>{}</td><td>{}</td></tr>",
                n + 1,
                esc(q.question),
                // Green for the reassuring answer: "yes" only for q4 (in force).
                if (q.id == "q4") == (q.answer == "yes") {
                    "no"
                } else {
                    "yes"
                },
                if q.id == "q2" && q.detail.starts_with("See policy changes") {
                    "YES, <a href=#policy>see policy changes</a>".to_owned()
                } else {
                    q.answer.to_uppercase()
                },
                esc(&q.detail),
                cites(&q.records.items, q.records.omitted)
            );
        }
        h.push_str("</table>");
    }
    h.push_str("</section>");

    // Integrity.
    h.push_str("<section id=integrity><h2>Integrity</h2><table>");
    let row = |h: &mut String, k: &str, v: String| {
        let _ = write!(h, "<tr><th>{}</th><td>{v}</td></tr>", esc(k));
    };
    row(
        &mut h,
        "Result",
        if i.intact {
            "<span class=no>intact</span>: every segment, chain link, record hash, Merkle root and checkpoint signature checked".into()
        } else {
            format!(
                "<span class=yes>NOT intact</span>: {}",
                esc(i.failure.as_ref().map_or("", |f| f.summary.as_str()))
            )
        },
    );
    row(&mut h, "Segments", i.segments.to_string());
    row(
        &mut h,
        "Records verified",
        format!("seqs {}..{}", i.first_seq, i.verified_to),
    );
    row(&mut h, "Checkpoints verified", i.checkpoints.to_string());
    row(
        &mut h,
        "Merkle root",
        format!("<code>{}</code>", opt(i.root.as_deref())),
    );
    row(
        &mut h,
        "Head",
        format!("<code>{}</code>", opt(i.head.as_deref())),
    );
    row(
        &mut h,
        "Signing keys",
        format!("<code>{}</code>", esc(&i.keys.join(" → "))),
    );
    row(
        &mut h,
        "Newest checkpoint (proofs are against it)",
        i.newest_checkpoint.as_ref().map_or_else(
            || "none".into(),
            |c| {
                format!(
                    "size {} at {}, root <code>{}</code>, key <code>{}</code>",
                    c.size,
                    esc(&c.time),
                    esc(&c.root),
                    esc(&c.key)
                )
            },
        ),
    );
    row(
        &mut h,
        "Exported checkpoint",
        i.older_checkpoints.as_ref().map_or_else(
            || "none given (<code>--checkpoint</code>)".into(),
            |o| {
                format!(
                    "{}: {} ({} compared, {} predate retained data)",
                    esc(&o.file),
                    if o.consistent {
                        "<span class=no>consistent</span>"
                    } else {
                        "<span class=yes>INCONSISTENT</span>"
                    },
                    o.checked,
                    o.predating_retention
                )
            },
        ),
    );
    if let Some(a) = &i.after_break {
        row(
            &mut h,
            "After the break",
            format!(
                "{} line(s) not vouched for ({} unreadable, {} naming an identity in scope); not itemized in this report",
                a.lines, a.unreadable, a.in_scope
            ),
        );
    }
    row(
        &mut h,
        "Quarantined torn tails",
        if i.quarantined.is_empty() {
            "none".into()
        } else {
            esc(&i.quarantined.join(", "))
        },
    );
    row(
        &mut h,
        "Reads of the log in the period (audit.access)",
        i.log_reads.to_string(),
    );
    h.push_str("</table><h3>Gaps</h3>");
    if i.gaps.items.is_empty() {
        h.push_str("<p>None: the daemon was up, the log was writable and nothing was deleted in the period.</p>");
    } else {
        h.push_str(
            "<table><tr><th>Kind</th><th>From</th><th>To</th><th>What</th><th>Records</th></tr>",
        );
        for g in &i.gaps.items {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(g.kind),
                esc(&g.from),
                opt(g.to.as_deref()),
                esc(&g.detail),
                cites(&g.records, 0)
            );
        }
        h.push_str("</table>");
        h.push_str(&omitted(&i.gaps));
    }
    h.push_str("</section>");

    // Identities.
    h.push_str("<section id=identities><h2>Identities and how each was verified</h2><table><tr><th>Identity</th><th>Verified</th><th>How</th><th>Groups</th><th>First / last seen</th><th>Records</th></tr>");
    for e in &r.identities {
        let _ = write!(
            h,
            "<tr><td>{}</td><td class={}>{}</td><td>{}</td><td>{}</td><td>{}<br>{}</td><td>{}</td></tr>",
            esc(&e.subject),
            if e.verified { "no" } else { "yes" },
            if e.verified { "verified" } else { "UNVERIFIED" },
            esc(&e.how),
            esc(&e.groups.join(", ")),
            opt(e.first_seen.as_deref()),
            opt(e.last_seen.as_deref()),
            cites(&e.records.items, e.records.omitted)
        );
    }
    h.push_str("</table></section>");

    // Workloads.
    h.push_str("<section id=workloads><h2>Workloads</h2><table><tr><th>Identity</th><th>Host</th><th>Executable</th><th>Command line (redacted)</th><th>PIDs</th><th>UID</th><th>Cgroup</th><th>Connections</th><th>First / last seen</th><th>Records</th></tr>");
    for w in &r.workloads.items {
        let pids: Vec<String> = w.pids.items.iter().map(u32::to_string).collect();
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td class=mono>{}</td><td class=mono>{}</td><td>{}</td><td>{}</td><td class=mono>{}</td><td class=num>{}</td><td>{}<br>{}</td><td>{}</td></tr>",
            esc(&w.identity),
            esc(&w.host),
            opt(w.exe.as_deref()),
            opt(w.cmdline.as_deref()),
            esc(&pids.join(", ")),
            w.uid,
            opt(w.cgroup.as_deref()),
            w.connections,
            esc(&w.first_seen),
            esc(&w.last_seen),
            cites(&w.records.items, w.records.omitted)
        );
    }
    h.push_str("</table>");
    h.push_str(&omitted(&r.workloads));
    h.push_str("</section>");

    // Resources.
    h.push_str("<section id=resources><h2>Resources accessed</h2><table><tr><th>Resource</th><th>Protocols</th><th>Destinations</th><th>Tables</th><th>Connections</th><th>Commands</th><th>Denied</th><th>First / last seen</th><th>Records</th></tr>");
    for e in &r.resources.items {
        let j = |s: &std::collections::BTreeSet<String>| {
            esc(&s.iter().cloned().collect::<Vec<_>>().join(", "))
        };
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=num>{}</td><td class=num>{}</td><td class=num>{}</td><td>{}<br>{}</td><td>{}</td></tr>",
            esc(&e.name),
            j(&e.protocols),
            j(&e.destinations),
            j(&e.tables),
            e.connections,
            e.commands,
            e.denied,
            esc(&e.first_seen),
            esc(&e.last_seen),
            cites(&e.records.items, e.records.omitted)
        );
    }
    h.push_str("</table>");
    h.push_str(&omitted(&r.resources));
    h.push_str("</section>");

    // Timeline.
    h.push_str("<section id=timeline><h2>Activity timeline</h2>");
    h.push_str(&timeline_svg(r));
    h.push_str("</section>");

    // Commands.
    let c = &r.commands;
    let _ = write!(
        h,
        "<section id=commands><h2>Commands</h2><p>{} command(s). By decision: {}. By class: {}.</p>",
        c.total,
        esc(&kv(&c.by_decision)),
        esc(&kv(&c.by_class))
    );
    if let Some(items) = &c.items {
        h.push_str("<table><tr><th>Time</th><th>Identity</th><th>Resource</th><th>Class</th><th>Statement (literals redacted)</th><th>Decision</th><th>Rule</th><th>Approval</th><th>Record</th></tr>");
        for x in &items.items {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=mono>{}</td><td class={}>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&x.time),
                esc(&x.identity),
                opt(x.resource.as_deref()),
                opt(x.class.as_deref()),
                opt(x.summary.as_deref()),
                if x.decision == "deny" { "yes" } else { "" },
                esc(&x.decision),
                opt(x.rule.as_deref()),
                opt(x.approval.as_deref()),
                cite(&x.record)
            );
        }
        h.push_str("</table>");
        h.push_str(&omitted(items));
    }
    h.push_str("</section>");

    // Masking.
    let m = &r.masking;
    let _ = write!(
        h,
        "<section id=masking><h2>Masking</h2><p>{} result(s) masked; {} value(s) masked, {} nulled; {} result column(s) of protected lineage sent unmasked.</p><table><tr><th>Protected field</th><th>By</th><th>Results</th><th>Records</th></tr>",
        m.statements_masked, m.values_masked, m.values_nulled, m.columns_unmasked
    );
    for (name, f) in &m.fields {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td class=num>{}</td><td>{}</td></tr>",
            esc(name),
            esc(f.by),
            f.statements,
            cites(&f.records, 0)
        );
    }
    h.push_str("</table>");
    if !m.lineage.is_empty() {
        let _ = write!(
            h,
            "<p>Result columns by column lineage: {}.</p>",
            esc(&kv(&m.lineage))
        );
    }
    if let Some(f) = &m.failures {
        let _ = write!(
            h,
            "<p>Masking failures (value not sent, connection closed): {} {}</p>",
            f.total(),
            cites(&f.items, f.omitted)
        );
    }
    h.push_str("</section>");

    // Denials and failures.
    h.push_str("<section id=denials><h2>Denials and failures</h2><h3>Denied</h3>");
    denial_table(&mut h, &r.denials);
    h.push_str("<h3>Failures</h3>");
    denial_table(&mut h, &r.failures);
    h.push_str("</section>");

    // Approvals.
    h.push_str("<section id=approvals><h2>Approvals</h2><table><tr><th>Request</th><th>Requester</th><th>Resource / command</th><th>Rule</th><th>Requested</th><th>Outcome</th><th>Approvers (as verified)</th><th>Reasons / tickets</th><th>Decided</th><th>Grant / uses</th><th>Records</th></tr>");
    for a in &r.approvals.items {
        let _ = write!(
            h,
            "<tr><td class=mono>{}</td><td>{}</td><td>{}<br><span class=mono>{}</span></td><td>{}</td><td>{}</td><td class={}>{}</td><td>{}<br><small>{}</small></td><td>{} {}</td><td>{}</td><td>{}{}</td><td>{}</td></tr>",
            esc(&a.id),
            opt(a.requester.as_deref()),
            opt(a.resource.as_deref()),
            opt(a.summary.as_deref()),
            opt(a.rule.as_deref()),
            opt(a.requested_at.as_deref()),
            if a.outcome == "granted" { "no" } else { "yes" },
            esc(&a.outcome),
            esc(&a.approvers.join(", ")),
            esc(&a.votes.join("; ")),
            esc(&a.reasons.join("; ")),
            esc(&a.tickets.join(", ")),
            opt(a.decided_at.as_deref()),
            a.grant.as_deref().map_or_else(String::new, |g| format!(
                "<span class=mono>{}</span> until {}{}<br>",
                esc(g),
                opt(a.grant_expires.as_deref()),
                a.grant_revoked
                    .as_deref()
                    .map_or_else(String::new, |r| format!("; revoked {}", esc(r)))
            )),
            format_args!("{} use(s)", a.uses),
            cites(&a.records, 0)
        );
    }
    h.push_str("</table>");
    h.push_str(&omitted(&r.approvals));
    h.push_str("</section>");

    h.push_str(&r.model_channel.html());
    h.push_str(&r.ssh_sessions.html());

    // Containment.
    let _ = write!(
        h,
        "<section id=containment><h2>Containment</h2><p>{}</p>",
        esc(&kv(&r.containment.by_kind))
    );
    if let Some(items) = &r.containment.items {
        h.push_str("<table><tr><th>Time</th><th>Identity</th><th>Kind</th><th>What</th><th>Record</th></tr>");
        for e in &items.items {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td class=mono>{}</td><td>{}</td></tr>",
                esc(&e.time),
                opt(e.identity.as_deref()),
                esc(e.kind),
                esc(&e.what),
                cite(&e.record)
            );
        }
        h.push_str("</table>");
        h.push_str(&omitted(items));
    }
    h.push_str("</section>");

    // Controls.
    if let Some(p) = &r.policy {
        h.push_str(&super::policy::render_html(p));
    }
    h.push_str("<section id=controls><h2>Control mapping</h2><table><tr><th>Framework</th><th>Control</th><th>Requirement</th><th>Evidence here</th><th>Sections</th></tr>");
    for c in &r.controls {
        let links: Vec<String> = c
            .sections
            .iter()
            .map(|s| format!("<a href=#{s}>{s}</a>"))
            .collect();
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(c.framework),
            esc(c.id),
            esc(c.title),
            esc(c.evidence),
            links.join(" ")
        );
    }
    h.push_str("</table></section>");

    // Cited records.
    h.push_str("<section id=records><h2>Cited records</h2><p>Each is a line of <code>records.jsonl</code> with its inclusion proof against the newest checkpoint: save the line to a file and run <code>agentgate audit verify-proof FILE --key KEY</code>.</p><table><tr><th>Seq</th><th>Kind</th><th>Time</th><th>Hash</th></tr>");
    let mut all = std::collections::BTreeMap::new();
    collect(r, &mut all);
    for c in all.values() {
        let _ = write!(
            h,
            "<tr id=r{0}><td>{0}</td><td>{1}</td><td>{2}</td><td class=mono>{3}</td></tr>",
            c.seq,
            esc(c.kind),
            esc(&c.time),
            esc(&c.hash)
        );
    }
    h.push_str("</table>");
    if !r.unproven.is_empty() {
        h.push_str("<p>Without a proof:</p><ul>");
        for u in r.unproven.iter().take(100) {
            let _ = write!(h, "<li>seq {}: {}</li>", u.seq, esc(&u.reason));
        }
        h.push_str("</ul>");
    }
    if r.citations_omitted > 0 {
        let _ = write!(
            h,
            "<p class=muted>{} further cited record(s) are not in records.jsonl (cap).</p>",
            r.citations_omitted
        );
    }
    h.push_str("</section></body></html>\n");
    h
}

fn kv<K: std::fmt::Display, V: std::fmt::Display>(m: &std::collections::BTreeMap<K, V>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn denial_table(h: &mut String, d: &Capped<Denial>) {
    if d.items.is_empty() {
        h.push_str("<p>None.</p>");
        return;
    }
    h.push_str("<table><tr><th>Time</th><th>Identity</th><th>Kind</th><th>Resource</th><th>What</th><th>Rule</th><th>Reason</th><th>Record</th></tr>");
    for x in &d.items {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=mono>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&x.time),
            esc(&x.identity),
            esc(x.kind),
            opt(x.resource.as_deref()),
            opt(x.what.as_deref()),
            opt(x.rule.as_deref()),
            opt(x.reason.as_deref()),
            cite(&x.record)
        );
    }
    h.push_str("</table>");
    h.push_str(&omitted(d));
}

/// Every citation in the report, by seq.
fn collect(r: &Report, out: &mut std::collections::BTreeMap<u64, Cite>) {
    fn walk(v: &serde_json::Value, out: &mut std::collections::BTreeMap<u64, Cite>) {
        match v {
            serde_json::Value::Object(m) => {
                if let (Some(seq), Some(hash), Some(kind), Some(time)) = (
                    m.get("seq").and_then(serde_json::Value::as_u64),
                    m.get("hash").and_then(serde_json::Value::as_str),
                    m.get("kind").and_then(serde_json::Value::as_str),
                    m.get("time").and_then(serde_json::Value::as_str),
                ) {
                    out.entry(seq).or_insert_with(|| Cite {
                        seq,
                        hash: hash.to_owned(),
                        kind: leak_kind(kind),
                        time: time.to_owned(),
                    });
                }
                m.values().for_each(|x| walk(x, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(&serde_json::to_value(r).unwrap_or_default(), out);
}

/// Kind names are a closed set: map back to the static name.
fn leak_kind(k: &str) -> &'static str {
    serde_json::from_value::<crate::audit::Kind>(serde_json::Value::String(k.to_owned()))
        .map_or("record", crate::audit::Kind::as_str)
}

/// Commands per time bucket by decision, as stacked bars.
#[allow(clippy::many_single_char_names)] // coordinates
fn timeline_svg(r: &Report) -> String {
    let t = &r.timeline;
    let (width, hgt, pad) = (1000.0_f64, 180.0_f64, 30.0_f64);
    let count = t.buckets.len().max(1) as f64;
    let max = t
        .buckets
        .iter()
        .map(|b| b[0] + b[1] + b[2])
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let bw = (width - pad) / count;
    let mut svg = format!(
        "<p>Commands per {} hour(s) from {} (UTC): <span style='color:#2e7d32'>■ allowed</span> <span style='color:#c62828'>■ denied</span> <span style='color:#ef8f00'>■ allowed after approval</span>. Highest bar: {} command(s).</p><svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {width} {}' width='100%' role='img' aria-label='commands per hour by decision'>",
        t.bucket_hours,
        esc(&t.start),
        max as u64,
        hgt + 20.0
    );
    let _ = write!(
        svg,
        "<line x1='{pad}' y1='{hgt}' x2='{width}' y2='{hgt}' stroke='#333'/><text x='0' y='12' font-size='11'>{}</text><text x='0' y='{hgt}' font-size='11'>0</text>",
        max as u64
    );
    for (i, bucket) in t.buckets.iter().enumerate() {
        let x = pad + i as f64 * bw;
        let mut y = hgt;
        for (k, color) in [(0, "#2e7d32"), (1, "#c62828"), (2, "#ef8f00")] {
            if bucket[k] == 0 {
                continue;
            }
            let bh = (bucket[k] as f64 / max) * (hgt - 10.0);
            y -= bh;
            let _ = write!(
                svg,
                "<rect x='{x:.2}' y='{y:.2}' width='{:.2}' height='{bh:.2}' fill='{color}'><title>bucket {i}: {}</title></rect>",
                (bw * 0.9).max(0.5),
                bucket[k]
            );
        }
    }
    let _ = write!(
        svg,
        "<text x='{pad}' y='{}' font-size='11'>{}</text><text x='{width}' y='{}' font-size='11' text-anchor='end'>{}</text></svg>",
        hgt + 15.0,
        esc(&t.start),
        hgt + 15.0,
        esc(&r.scope.to)
    );
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            esc("<a href='x'>&\"</a>"),
            "&lt;a href=&#39;x&#39;&gt;&amp;&quot;&lt;/a&gt;"
        );
    }
}
