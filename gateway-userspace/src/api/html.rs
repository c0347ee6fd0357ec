//! Server-rendered HTML for the approvals page: no scripts, no external
//! assets, every value HTML-escaped ([`esc`]) where it is written.

use std::fmt::Write as _;

use serde_json::Value;

/// Escapes text for an HTML element or a double-quoted attribute.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A JSON value as display text (strings unquoted), escaped.
fn text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => esc(s),
        Value::Array(a) => esc(&a
            .iter()
            .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join(", ")),
        other => esc(&other.to_string()),
    }
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:1.5rem;color:#1d2330;background:#f7f8fa}\
h1{font-size:1.4rem;margin:0 0 .2rem}h2{font-size:1.1rem;margin-top:1.6rem}\
header{display:flex;justify-content:space-between;align-items:center;border-bottom:1px solid #d8dce3;padding-bottom:.6rem}\
table{border-collapse:collapse;width:100%;background:#fff}th,td{border:1px solid #d8dce3;padding:.45rem .5rem;text-align:left;vertical-align:top;font-size:.9rem}\
th{background:#eef1f5}code{font-family:ui-monospace,monospace;font-size:.85rem;background:#f1f3f6;padding:.1rem .25rem;border-radius:3px;white-space:pre-wrap;word-break:break-word}\
code.id{white-space:nowrap}.muted{color:#5b6475;font-size:.8rem}form{display:flex;gap:.3rem;margin:.2rem 0;flex-wrap:wrap}\
input[type=text]{padding:.25rem;border:1px solid #b9c0cc;border-radius:3px;min-width:9rem}\
button{padding:.3rem .7rem;border-radius:3px;border:1px solid #8a93a3;background:#fff;cursor:pointer}\
button.approve{background:#1f7a3a;color:#fff;border-color:#1f7a3a}button.reject{background:#a32020;color:#fff;border-color:#a32020}\
.notice{padding:.5rem .8rem;margin:.8rem 0;border-radius:4px;background:#e8f1ff;border:1px solid #9bbcf0}\
.notice.error{background:#fdecec;border-color:#e3a1a1}";

/// A full page around `body`.
pub fn page(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{}</title><style>{STYLE}</style></head><body>{body}</body></html>",
        esc(title)
    )
}

/// A notice (`error` styles it as one).
pub fn notice(message: &str, error: bool) -> String {
    format!(
        "<div class=\"notice{}\" role=\"status\">{}</div>",
        if error { " error" } else { "" },
        esc(message)
    )
}

/// Seconds between now and an RFC 3339 time (positive: in the past).
fn seconds_since(t: &Value) -> Option<i64> {
    let t =
        time::OffsetDateTime::parse(t.as_str()?, &time::format_description::well_known::Rfc3339)
            .ok()?;
    Some((time::OffsetDateTime::now_utc() - t).whole_seconds())
}

fn duration(secs: i64) -> String {
    let s = secs.unsigned_abs();
    if s < 120 {
        format!("{s} s")
    } else if s < 7200 {
        format!("{} min", s / 60)
    } else {
        format!("{} h", s / 3600)
    }
}

/// The signed-in page: pending requests with their forms, then grants.
#[allow(clippy::too_many_lines)] // the page's markup, top to bottom
pub fn approvals_page(
    who: &str,
    groups: &[String],
    csrf: &str,
    requests: &[Value],
    grants: &[Value],
    flash: Option<(&str, bool)>,
) -> String {
    let mut b = String::new();
    let _ = write!(
        b,
        "<header><div><h1>agentgate approvals</h1><div class=\"muted\">Held commands wait here for a verified approver.</div></div>\
         <div>Signed in as <strong id=\"who\">{}</strong> <span class=\"muted\">({})</span>\
         <form method=\"post\" action=\"/logout\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><button type=\"submit\">Sign out</button></form></div></header>",
        esc(who),
        esc(&groups.join(", ")),
        esc(csrf)
    );
    if let Some((m, error)) = flash {
        b.push_str(&notice(m, error));
    }
    let _ = write!(b, "<h2>Pending requests ({})</h2>", requests.len());
    if requests.is_empty() {
        b.push_str("<p class=\"muted\" id=\"no-requests\">Nothing is waiting for approval.</p>");
    } else {
        b.push_str(
            "<table id=\"requests\"><thead><tr><th>Request</th><th>Requester</th><th>Workload</th><th>Resource</th>\
             <th>Command (redacted)</th><th>Rule</th><th>Age</th><th>Deadline</th><th>Decide</th></tr></thead><tbody>",
        );
        for r in requests {
            let id = r["id"].as_str().unwrap_or_default();
            let q = &r["requester"];
            let votes = r["votes"].as_array().map_or(0, Vec::len);
            let age = seconds_since(&r["created"])
                .map(duration)
                .unwrap_or_default();
            let left = seconds_since(&r["deadline"])
                .map(|s| {
                    if s >= 0 {
                        "passed".to_owned()
                    } else {
                        format!("in {}", duration(s))
                    }
                })
                .unwrap_or_default();
            let _ = write!(
                b,
                "<tr data-id=\"{eid}\"><td><code class=\"id\">{eid}</code><div class=\"muted\">votes {votes}/{quorum}; groups {groups}</div></td>\
                 <td>{identity}<div class=\"muted\">{kind}</div></td>\
                 <td>{exe}<div class=\"muted\">pid {pid}, uid {uid}<br>cgroup {cgroup}</div></td>\
                 <td>{resource}</td><td><code>{summary}</code></td><td>{rule}</td><td>{age}</td>\
                 <td>{deadline}<div class=\"muted\">{left}</div></td><td>\
                 <form method=\"post\" action=\"/approvals/{eid}/approve\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
                 <input type=\"text\" name=\"reason\" placeholder=\"reason (optional)\" maxlength=\"4096\">\
                 <input type=\"text\" name=\"ticket\" placeholder=\"ticket (optional)\" maxlength=\"128\">\
                 <button class=\"approve\" type=\"submit\">Approve</button></form>\
                 <form method=\"post\" action=\"/approvals/{eid}/reject\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
                 <input type=\"text\" name=\"reason\" placeholder=\"reason (required)\" required maxlength=\"4096\">\
                 <input type=\"hidden\" name=\"ticket\" value=\"\">\
                 <button class=\"reject\" type=\"submit\">Reject</button></form></td></tr>",
                eid = esc(id),
                quorum = text(&r["quorum"]),
                groups = text(&r["approver_groups"]),
                identity = text(&q["identity"]),
                kind = text(&q["identity_kind"]),
                exe = text(&q["exe"]),
                pid = text(&q["pid"]),
                uid = text(&q["uid"]),
                cgroup = text(&q["cgroup"]),
                resource = text(&r["resource"]),
                summary = text(&r["summary"]),
                rule = text(&r["rule"]),
                deadline = text(&r["deadline"]),
                csrf = esc(csrf),
            );
        }
        b.push_str("</tbody></table>");
    }
    let _ = write!(b, "<h2>Grants ({})</h2>", grants.len());
    if grants.is_empty() {
        b.push_str("<p class=\"muted\">No live grants.</p>");
    } else {
        b.push_str(
            "<table id=\"grants\"><thead><tr><th>Grant</th><th>Identity</th><th>Resource</th><th>Scope</th>\
             <th>Command (redacted)</th><th>Approvers</th><th>Expires</th><th>Uses</th><th></th></tr></thead><tbody>",
        );
        for g in grants {
            let id = g["id"].as_str().unwrap_or_default();
            let _ = write!(
                b,
                "<tr data-id=\"{eid}\"><td><code>{eid}</code></td><td>{identity}</td><td>{resource}</td><td>{scope}</td>\
                 <td><code>{summary}</code></td><td>{approvers}</td><td>{expires}</td><td>{uses}</td><td>\
                 <form method=\"post\" action=\"/grants/{eid}/revoke\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
                 <input type=\"text\" name=\"reason\" placeholder=\"reason\" maxlength=\"4096\">\
                 <button type=\"submit\">Revoke</button></form></td></tr>",
                eid = esc(id),
                identity = text(&g["identity"]),
                resource = text(&g["resource"]),
                scope = text(&g["scope"]),
                summary = text(&g["summary"]),
                approvers = text(&g["approvers"]),
                expires = text(&g["expires"]),
                uses = text(&g["uses"]),
                csrf = esc(csrf),
            );
        }
        b.push_str("</tbody></table>");
    }
    page("agentgate approvals", &b)
}

/// The page before sign-in.
pub fn sign_in_page(flash: Option<(&str, bool)>) -> String {
    let mut b = String::from(
        "<header><div><h1>agentgate approvals</h1><div class=\"muted\">Held commands wait here for a verified approver.</div></div></header>",
    );
    if let Some((m, error)) = flash {
        b.push_str(&notice(m, error));
    }
    b.push_str("<p>Approvers sign in with the organisation's identity provider.</p><p><a id=\"sign-in\" href=\"/login\">Sign in</a></p>");
    page("agentgate approvals: sign in", &b)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn every_value_is_escaped() {
        let hostile = "<script>alert(1)</script>\"'&";
        let r = json!({"id": "apr-1", "requester": {"identity": hostile, "exe": hostile, "cgroup": hostile},
            "resource": hostile, "summary": hostile, "rule": hostile, "approver_groups": [hostile]});
        let g =
            json!({"id": hostile, "identity": hostile, "approvers": [hostile], "summary": hostile});
        let html = approvals_page(
            hostile,
            &[hostile.into()],
            hostile,
            &[r],
            &[g],
            Some((hostile, true)),
        );
        assert!(!html.contains("<script>"), "{html}");
        assert!(!html.contains("\"'&\""));
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;&amp;"));
    }
}
