//! The evidence package's SSH section: each SSH channel the identities ran
//! (`exec` command, interactive shell, SFTP session) with its host, upstream
//! login, decision, approvers, exit status and duration, read from the SSH
//! handler's records; and, for recorded channels, a transcript of the
//! recording's output rendered into the page (no player, nothing fetched at
//! view time).
//!
//! A transcript is shown only if the recording still matches its
//! `recording.chunk` records (the digests `audit verify` checks); otherwise
//! the page says it was changed and shows nothing of it (fails closed).
//! Transcripts pass every value detector again (a shell is recorded
//! unmasked) and are cut to [`MAX_TRANSCRIPT`] characters, at most
//! [`MAX_TRANSCRIPTS`] of them; sessions past [`super::model::LIST_CAP`]
//! are counted, not listed.

use std::{collections::HashMap, path::Path};

use serde::Serialize;
use serde_json::Value;

use super::model::{Cite, LIST_CAP, clip};
use crate::{
    audit::{Kind, Record},
    recording::Chunk,
};

/// Characters of one transcript kept.
pub const MAX_TRANSCRIPT: usize = 16 * 1024;
/// Transcripts rendered at most.
pub const MAX_TRANSCRIPTS: usize = 64;
/// Chunk records kept per recording (a longer recording is not rendered).
const MAX_CHUNKS: usize = 256;

/// One SSH channel.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SshSession {
    /// The channel's (last) decision record.
    pub cite: Option<Cite>,
    pub identity: String,
    pub resource: Option<String>,
    pub connection_id: Option<u64>,
    pub channel: u64,
    pub host: Option<String>,
    pub upstream_user: Option<String>,
    /// `exec`, `shell` or `sftp`.
    pub request: String,
    /// The redacted command, `interactive shell`, or `sftp`.
    pub command: String,
    pub class: Option<String>,
    pub verdict: Option<String>,
    pub rule: Option<String>,
    pub approvers: Vec<String>,
    /// `exit-status N` as recorded.
    pub exit_status: Option<String>,
    pub duration_ms: Option<u64>,
    pub bytes: Option<u64>,
    /// SFTP: operations decided, and how many were denied.
    pub sftp_ops: u64,
    pub sftp_denied: u64,
    /// The recording's file name in `<audit dir>/recordings/`.
    pub recording: Option<String>,
    /// The rendered output, or why there is none.
    pub transcript: Option<String>,
    #[serde(skip)]
    chunks: Vec<(u64, Chunk)>,
}

/// The section.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SshSessions {
    pub sessions: Vec<SshSession>,
    pub omitted: u64,
    #[serde(skip)]
    index: HashMap<(u64, u64), usize>,
    /// Connection -> (host, upstream user), from `session.start`.
    #[serde(skip)]
    hosts: HashMap<u64, (Option<String>, Option<String>)>,
}

fn s(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(clip)
}

impl SshSessions {
    /// Takes one record in scope (`who`'s, in the period).
    pub fn observe(&mut self, seq: u64, hash: &str, rec: &Record, who: &str) {
        let Some(conn) = rec.connection_id else {
            return;
        };
        let Some(ssh) = rec.action.as_ref().and_then(|a| a.get("ssh")) else {
            return;
        };
        match rec.kind {
            Kind::SessionStart if self.hosts.len() < super::model::OPEN_CAP => {
                self.hosts
                    .insert(conn, (s(ssh, "host"), s(ssh, "upstream_user")));
            }
            Kind::RecordingChunk => {
                let Some(ch) = ssh.get("channel").and_then(Value::as_u64) else {
                    return;
                };
                let Some(chunk) = rec
                    .result
                    .clone()
                    .and_then(|v| serde_json::from_value::<Chunk>(v).ok())
                else {
                    return;
                };
                if let Some(e) = self.entry(conn, ch, None) {
                    e.recording.get_or_insert_with(|| chunk.file.clone());
                    if e.chunks.len() < MAX_CHUNKS {
                        e.chunks.push((seq, chunk));
                    } else {
                        e.transcript = Some("(recording too long to render here)".into());
                    }
                }
            }
            Kind::Statement => self.statement(seq, hash, rec, who, conn, ssh),
            _ => {}
        }
    }

    fn statement(&mut self, seq: u64, hash: &str, rec: &Record, who: &str, conn: u64, ssh: &Value) {
        let Some(ch) = ssh.get("channel").and_then(Value::as_u64) else {
            return;
        };
        let request = s(ssh, "request").unwrap_or_default();
        let decision = rec.decision.as_ref();
        let creates = matches!(request.as_str(), "exec" | "shell" | "subsystem")
            && (decision.is_some() || request == "subsystem");
        let host = self.hosts.get(&conn).cloned();
        let Some(e) = self.entry(conn, ch, creates.then_some(who)) else {
            return;
        };
        if e.resource.is_none() {
            e.resource.clone_from(&rec.resource);
            if let Some((h, u)) = host {
                e.host = h;
                e.upstream_user = u;
            }
        }
        match request.as_str() {
            "exec" | "shell" if decision.is_some() => {
                e.request.clone_from(&request);
                e.command = s(ssh, "command").unwrap_or_else(|| "interactive shell".into());
                e.class = s(ssh, "class");
                e.cite = Some(Cite {
                    seq,
                    hash: hash.to_owned(),
                    kind: rec.kind.as_str(),
                    time: rec.time.clone(),
                });
                e.verdict = decision.and_then(|d| s(d, "verdict"));
                e.rule = decision.and_then(|d| s(d, "rule"));
                if let Some(a) = rec.approval.as_ref().and_then(|a| a.get("approvers")) {
                    e.approvers = a
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .take(8)
                        .map(clip)
                        .collect();
                } else if let Some(by) = rec.approval.as_ref().and_then(|a| s(a, "by")) {
                    e.approvers = vec![format!("{by} (rejected)")];
                }
            }
            "exec" | "shell" => {
                if let Some(r) = &rec.result {
                    e.exit_status = s(r, "command");
                    e.duration_ms = r.get("duration_ms").and_then(Value::as_u64);
                    e.bytes = r.get("bytes").and_then(Value::as_u64);
                }
            }
            "subsystem" => {
                e.request = "sftp".into();
                e.command = "sftp".into();
                e.cite.get_or_insert_with(|| Cite {
                    seq,
                    hash: hash.to_owned(),
                    kind: rec.kind.as_str(),
                    time: rec.time.clone(),
                });
            }
            "sftp" => {
                if let Some(d) = decision {
                    e.sftp_ops += 1;
                    if d.get("verdict").and_then(Value::as_str) == Some("deny") {
                        e.sftp_denied += 1;
                    }
                }
                if let Some(r) = &rec.result {
                    *e.bytes.get_or_insert(0) +=
                        r.get("bytes").and_then(Value::as_u64).unwrap_or(0);
                }
            }
            _ => {}
        }
    }

    /// The channel's entry; created (for `who`) if `create` and under the cap.
    fn entry(&mut self, conn: u64, ch: u64, create: Option<&str>) -> Option<&mut SshSession> {
        if let Some(&i) = self.index.get(&(conn, ch)) {
            return self.sessions.get_mut(i);
        }
        let who = create?;
        if self.sessions.len() >= LIST_CAP {
            self.omitted += 1;
            return None;
        }
        self.index.insert((conn, ch), self.sessions.len());
        self.sessions.push(SshSession {
            identity: who.to_owned(),
            connection_id: Some(conn),
            channel: ch,
            ..SshSession::default()
        });
        self.sessions.last_mut()
    }

    /// Renders each recording's output into its session's transcript, from
    /// `<audit_dir>/recordings/`, if its bytes match their chunk records.
    pub fn attach_transcripts(&mut self, audit_dir: &Path) {
        let mut rendered = 0;
        for e in &mut self.sessions {
            if e.recording.is_none() || e.transcript.is_some() {
                continue;
            }
            if rendered >= MAX_TRANSCRIPTS {
                e.transcript = Some("(not rendered: too many recordings in the period)".into());
                continue;
            }
            rendered += 1;
            e.transcript = Some(
                match crate::recording::verify_chunks(audit_dir, &e.chunks) {
                    Err(m) => format!(
                        "(not shown: the recording does not match its records: {})",
                        m.what
                    ),
                    Ok(()) => match e.chunks.iter().find(|(_, c)| c.last) {
                        None => "(not shown: the recording has no final chunk on record)".into(),
                        Some((_, last)) => {
                            let path = audit_dir.join("recordings").join(&last.file);
                            match std::fs::read(&path) {
                                Ok(b) => {
                                    let end = usize::try_from(last.offset + last.len).unwrap_or(0);
                                    transcript(&b[..end.min(b.len())])
                                }
                                Err(err) => format!("(not shown: {err})"),
                            }
                        }
                    },
                },
            );
        }
    }
}

/// The output events of an asciicast v2 recording as plain text: terminal
/// escape sequences removed, every value detector's hits redacted, cut to
/// [`MAX_TRANSCRIPT`] characters.
pub fn transcript(cast: &[u8]) -> String {
    let mut out = String::new();
    for line in cast.split(|&b| b == b'\n').skip(1) {
        let Ok(Value::Array(ev)) = serde_json::from_slice::<Value>(line) else {
            continue;
        };
        if ev.get(1).and_then(Value::as_str) == Some("o")
            && let Some(t) = ev.get(2).and_then(Value::as_str)
        {
            out.push_str(t);
            if out.len() > MAX_TRANSCRIPT * 2 {
                break;
            }
        }
    }
    let plain = strip_escapes(&out);
    let all = crate::mask::MaskPolicy::new(
        Vec::new(),
        crate::mask::DetectorSet::ALL,
        crate::mask::Strategy::Redact,
    );
    let masked = all.mask_value(&plain, None).text.into_owned();
    crate::gate::truncate_chars(&masked, MAX_TRANSCRIPT)
}

/// Removes CSI (`ESC [ ... final`), OSC (`ESC ] ... BEL|ST`) and other
/// two-byte escapes, carriage returns and other control characters but
/// newline and tab.
fn strip_escapes(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            '\u{1b}' => match it.next() {
                Some('[') => {
                    for d in it.by_ref() {
                        if ('@'..='~').contains(&d) {
                            break;
                        }
                    }
                }
                Some(']') => {
                    while let Some(d) = it.next() {
                        if d == '\u{7}' {
                            break;
                        }
                        if d == '\u{1b}' {
                            it.next();
                            break;
                        }
                    }
                }
                _ => {}
            },
            '\n' | '\t' => o.push(c),
            c if c.is_control() => {}
            c => o.push(c),
        }
    }
    o
}

impl SshSessions {
    /// The section of `index.html`.
    pub fn html(&self) -> String {
        use super::html::esc;
        use std::fmt::Write as _;
        let mut h = format!(
            "<section id=ssh-sessions><h2>SSH sessions</h2><p>{} SSH channel(s){}. Each row is an <code>exec</code> command, an interactive shell or an SFTP session; recorded ones show their output below (from the recording file, checked against its digests in the log; values matching a detector redacted).</p><table><tr><th>Record</th><th>Identity</th><th>Resource</th><th>Host</th><th>As</th><th>Command</th><th>Decision</th><th>Approvers</th><th>Exit</th><th>Duration</th></tr>",
            self.sessions.len(),
            if self.omitted > 0 {
                format!(" ({} more not listed)", self.omitted)
            } else {
                String::new()
            }
        );
        for e in &self.sessions {
            let decision = match (&e.verdict, &e.rule) {
                (Some(v), Some(r)) => format!("{v} ({r})"),
                _ if e.request == "sftp" => {
                    format!("{} operation(s), {} denied", e.sftp_ops, e.sftp_denied)
                }
                _ => String::new(),
            };
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                e.cite
                    .as_ref()
                    .map(|c| format!("#{}", c.seq))
                    .unwrap_or_default(),
                esc(&e.identity),
                esc(e.resource.as_deref().unwrap_or("")),
                esc(e.host.as_deref().unwrap_or("")),
                esc(e.upstream_user.as_deref().unwrap_or("")),
                esc(&e.command),
                esc(&decision),
                esc(&e.approvers.join(", ")),
                esc(e.exit_status.as_deref().unwrap_or("")),
                e.duration_ms.map(|d| format!("{d} ms")).unwrap_or_default(),
            );
        }
        h.push_str("</table>");
        for e in &self.sessions {
            if let (Some(file), Some(t)) = (&e.recording, &e.transcript) {
                let _ = write!(
                    h,
                    "<details class=recording><summary>{} on {}: <code>{}</code> ({})</summary><pre>{}</pre></details>",
                    esc(&e.identity),
                    esc(e.resource.as_deref().unwrap_or("")),
                    esc(&e.command),
                    esc(file),
                    esc(t)
                );
            }
        }
        h.push_str("</section>");
        h
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[allow(clippy::needless_pass_by_value)]
    fn rec(
        seq: u64,
        kind: &str,
        action: Value,
        decision: Option<Value>,
        approval: Option<Value>,
        result: Option<Value>,
    ) -> Record {
        serde_json::from_value(json!({
            "v": 1, "seq": seq, "time": "2026-12-07T00:00:00.000000000Z", "host": "h",
            "kind": kind, "session_id": null, "connection_id": 7, "identity": null,
            "workload": null, "resource": "ops", "action": action, "decision": decision,
            "transform": null, "approval": approval, "result": result, "prev": "00"
        }))
        .unwrap()
    }

    fn cast(dir: &Path, name: &str, body: &str) -> Chunk {
        let d = dir.join("recordings");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(name), body).unwrap();
        Chunk {
            file: name.into(),
            index: 0,
            offset: 0,
            len: body.len() as u64,
            blake3: blake3::hash(body.as_bytes()).to_hex().to_string(),
            last: true,
        }
    }

    #[test]
    #[allow(clippy::too_many_lines)] // one scenario, record by record
    fn sessions_list_host_command_approver_exit_and_transcript() {
        let dir = tempfile::tempdir().unwrap();
        let body = "{\"version\":2,\"width\":80,\"height\":24}\n[0.1,\"o\",\"\\u001b[1mroot\\u001b[0m\\r\\n\"]\n[0.2,\"i\",\"typed\"]\n[0.3,\"o\",\"ssn 123-45-6789\\n\"]\n";
        let chunk = cast(dir.path(), "conn-7-ch0-x.cast", body);
        let mut s = SshSessions::default();
        let obs = |s: &mut SshSessions, r: Record| s.observe(r.seq, "ab", &r, "demo");
        obs(
            &mut s,
            rec(
                1,
                "session.start",
                json!({"ssh": {"host": "10.0.0.5:22", "upstream_user": "deploy"}}),
                None,
                None,
                Some(json!({"status": "ok"})),
            ),
        );
        obs(
            &mut s,
            rec(
                2,
                "statement",
                json!({"ssh": {"request": "exec", "channel": 0, "command": "sudo id", "class": "privileged"}}),
                Some(json!({"verdict": "allow", "rule": "ops-sudo"})),
                Some(json!({"outcome": "approved", "approvers": ["bob"]})),
                None,
            ),
        );
        obs(
            &mut s,
            rec(
                3,
                "recording.chunk",
                json!({"ssh": {"channel": 0}}),
                None,
                None,
                Some(chunk.value()),
            ),
        );
        obs(
            &mut s,
            rec(
                4,
                "statement",
                json!({"ssh": {"request": "exec", "channel": 0, "hash": "h"}}),
                None,
                None,
                Some(
                    json!({"status": "ok", "command": "exit-status 0", "duration_ms": 12, "bytes": 20}),
                ),
            ),
        );
        // A denied command of another channel, and an SFTP session.
        obs(
            &mut s,
            rec(
                5,
                "statement",
                json!({"ssh": {"request": "exec", "channel": 1, "command": "rm -rf /", "class": "delete"}}),
                Some(json!({"verdict": "deny", "rule": "no-deletes"})),
                None,
                None,
            ),
        );
        obs(
            &mut s,
            rec(
                6,
                "statement",
                json!({"ssh": {"request": "subsystem", "subsystem": "sftp", "channel": 2}}),
                None,
                None,
                None,
            ),
        );
        obs(
            &mut s,
            rec(
                7,
                "statement",
                json!({"ssh": {"request": "sftp", "channel": 2, "op": "open-write", "path": "/x"}}),
                Some(json!({"verdict": "deny", "rule": "r"})),
                None,
                None,
            ),
        );
        // Not SSH, or no channel: ignored.
        obs(
            &mut s,
            rec(
                8,
                "statement",
                json!({"sql": "select 1"}),
                Some(json!({"verdict": "allow", "rule": "r"})),
                None,
                None,
            ),
        );
        s.attach_transcripts(dir.path());
        assert_eq!(s.sessions.len(), 3, "{s:#?}");
        let e = &s.sessions[0];
        assert_eq!(e.host.as_deref(), Some("10.0.0.5:22"));
        assert_eq!(e.upstream_user.as_deref(), Some("deploy"));
        assert_eq!(e.command, "sudo id");
        assert_eq!(e.approvers, ["bob"]);
        assert_eq!(e.exit_status.as_deref(), Some("exit-status 0"));
        assert_eq!(e.duration_ms, Some(12));
        assert_eq!(e.cite.as_ref().unwrap().seq, 2);
        let t = e.transcript.as_deref().unwrap();
        assert!(t.starts_with("root\n"), "{t:?}");
        assert!(!t.contains("typed") && !t.contains("6789"), "{t:?}");
        assert!(t.contains("[REDACTED:us_ssn]"), "{t:?}");
        assert_eq!(s.sessions[1].verdict.as_deref(), Some("deny"));
        assert_eq!(
            (
                s.sessions[2].request.as_str(),
                s.sessions[2].sftp_ops,
                s.sessions[2].sftp_denied
            ),
            ("sftp", 1, 1)
        );
        let html = s.html();
        assert!(
            html.contains("sudo id") && html.contains("bob") && html.contains("[REDACTED:us_ssn]"),
            "{html}"
        );
        assert!(
            !html.contains("<script") && !html.contains("http"),
            "the page fetches nothing"
        );

        // A changed byte: the transcript is withheld.
        let mut b = std::fs::read(dir.path().join("recordings/conn-7-ch0-x.cast")).unwrap();
        let at = b.len() - 5;
        b[at] ^= 1;
        std::fs::write(dir.path().join("recordings/conn-7-ch0-x.cast"), b).unwrap();
        s.sessions[0].transcript = None;
        s.attach_transcripts(dir.path());
        let t = s.sessions[0].transcript.as_deref().unwrap();
        assert!(
            t.starts_with("(not shown: the recording does not match"),
            "{t}"
        );
    }
}
