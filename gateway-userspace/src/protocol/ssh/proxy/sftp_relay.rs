//! `subsystem sftp` on a session channel: every request packet decoded
//! ([`crate::protocol::ssh::sftp`]) and judged before it reaches the host.
//!
//! - Opening a file (`sftp-read`, or `sftp-write` with any of write,
//!   append, create, truncate), listing a directory (`sftp-read`) and every
//!   change by path (remove, rename, mkdir, rmdir, setstat, symlink,
//!   posix-rename, hardlink, lsetstat: `sftp-write`) are decided by rule on
//!   the path after `.`/`..` ([`sftp::normalize`]); a held one waits for the
//!   approver like an `exec`. A denied one is answered `PERMISSION_DENIED`
//!   with the rule and reason, and the session goes on.
//! - Reads, writes and closes go only through handles this relay saw opened
//!   (a write only through one opened for writing); their bytes are counted
//!   and recorded when the handle closes.
//! - Names and attributes (stat, lstat, realpath, readlink, statvfs, fstat)
//!   pass undecided: a session allowed to open the subsystem sees the file
//!   system's names, not its contents. File contents are not masked.
//! - Anything else (an unknown extension such as `copy-data`) is refused;
//!   an undecodable or oversized packet ends the channel (fails closed).

use std::collections::HashMap;

use super::{
    Channel, ChannelMsg, ChannelTask, Denial, DenialKind, Instant, Msg, Outcome, ResultRecord,
    Value, denial_text, gate_of, json, redact_command,
};
use crate::{
    policy::{Action, Decision, Verdict},
    protocol::ssh::sftp::{self, Framer, Handle, Op, Reply},
};

/// Requests the host has not answered yet.
const MAX_PENDING: usize = 1024;
/// Files and directories open at once.
const MAX_HANDLES: usize = 128;

/// A handle the host gave for a decided open.
struct OpenFile {
    action: Value,
    write: bool,
    dir: bool,
    read: u64,
    written: u64,
    started: Instant,
}

/// What a forwarded request was, for its reply.
enum Pending {
    Open {
        action: Value,
        write: bool,
        dir: bool,
        started: Instant,
    },
    Read(Handle),
    Close(Handle),
    Change {
        action: Value,
        started: Instant,
    },
    Pass,
}

#[derive(Default)]
struct Sftp {
    from_agent: Framer,
    from_host: Framer,
    pending: HashMap<u32, Pending>,
    handles: HashMap<Handle, OpenFile>,
    seq: u64,
}

impl Sftp {
    fn opening(&self) -> usize {
        self.handles.len()
            + self
                .pending
                .values()
                .filter(|p| matches!(p, Pending::Open { .. }))
                .count()
    }
}

enum Next {
    Agent(Option<ChannelMsg>),
    Up(Option<ChannelMsg>),
}

impl ChannelTask {
    /// Runs the channel as an SFTP session until it closes; `false`.
    pub(super) async fn sftp(
        &mut self,
        agent: &mut Channel<Msg>,
        backlog: &mut Vec<ChannelMsg>,
    ) -> bool {
        let ctx = self.ctx();
        let start = ctx.conn.record(crate::audit::Kind::Statement).action(
            json!({"ssh": {"request": "subsystem", "subsystem": "sftp", "channel": self.index}}),
        );
        if let Err(e) = ctx.services.audit.append(start).await {
            tracing::error!(error = %e, "cannot record the sftp session; refused");
            let _ = self.handle.channel_failure(self.id).await;
            return true;
        }
        if self.up.request_subsystem(true, "sftp").await.is_err() {
            let _ = self.handle.channel_failure(self.id).await;
            return false;
        }
        let mut s = Sftp::default();
        loop {
            let next = if backlog.is_empty() {
                tokio::select! {
                    m = agent.wait() => Next::Agent(m),
                    m = self.up.wait() => Next::Up(m),
                }
            } else {
                Next::Agent(Some(backlog.remove(0)))
            };
            let go_on = match next {
                Next::Agent(Some(ChannelMsg::Data { data })) => {
                    s.from_agent.push(&data);
                    self.sftp_requests(&mut s, agent, backlog).await
                }
                Next::Agent(Some(ChannelMsg::Eof)) => {
                    let _ = self.up.eof().await;
                    true
                }
                Next::Agent(None | Some(ChannelMsg::Close)) => {
                    let _ = self.up.close().await;
                    false
                }
                Next::Agent(Some(_)) => true,
                Next::Up(Some(ChannelMsg::Data { data })) => {
                    s.from_host.push(&data);
                    self.sftp_replies(&mut s).await
                }
                Next::Up(Some(ChannelMsg::ExtendedData { data, ext })) => {
                    self.handle.extended_data(self.id, ext, data).await.is_ok()
                }
                Next::Up(Some(m)) => self.on_upstream(m).await,
                Next::Up(None) => false,
            };
            if !go_on {
                break;
            }
        }
        for (_, f) in s.handles.drain() {
            self.sftp_file_done(f, "closed with the channel");
        }
        false
    }

    /// Judges every whole request buffered; `false` ends the channel.
    async fn sftp_requests(
        &mut self,
        s: &mut Sftp,
        agent: &mut Channel<Msg>,
        backlog: &mut Vec<ChannelMsg>,
    ) -> bool {
        loop {
            let packet = match s.from_agent.next_packet() {
                Ok(Some(p)) => p,
                Ok(None) => return true,
                Err(e) => {
                    tracing::warn!(conn = self.ctx().conn.id, error = %e, "sftp request refused; channel closed");
                    return false;
                }
            };
            let req = match sftp::parse_request(&packet) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(conn = self.ctx().conn.id, error = %e, "sftp request undecodable; channel closed");
                    return false;
                }
            };
            let Some(id) = req.id else {
                // INIT: the version exchange.
                if !self.to_host(packet).await {
                    return false;
                }
                continue;
            };
            if s.pending.len() >= MAX_PENDING || s.pending.contains_key(&id) {
                if !self
                    .to_agent(sftp::status_packet(
                        id,
                        sftp::status::FAILURE,
                        "agentgate: too many requests in flight",
                    ))
                    .await
                {
                    return false;
                }
                continue;
            }
            let verdict = self.sftp_judge(s, id, req.op, agent, backlog).await;
            let sent = match verdict {
                Ok(p) => {
                    s.pending.insert(id, p);
                    self.to_host(packet).await
                }
                Err((code, why)) => self.to_agent(sftp::status_packet(id, code, &why)).await,
            };
            if !sent {
                return false;
            }
        }
    }

    /// What to do with one request: forward it (remembering what it is) or
    /// answer it with a status.
    async fn sftp_judge(
        &mut self,
        s: &mut Sftp,
        id: u32,
        op: Op,
        agent: &mut Channel<Msg>,
        backlog: &mut Vec<ChannelMsg>,
    ) -> Result<Pending, (u32, String)> {
        use sftp::status::{FAILURE, OP_UNSUPPORTED, PERMISSION_DENIED};
        let unknown = || (FAILURE, "agentgate: unknown handle".to_owned());
        match op {
            Op::Init | Op::Meta { .. } => Ok(Pending::Pass),
            Op::HandleMeta { handle, .. } | Op::Readdir { handle } => s
                .handles
                .get(&handle)
                .map(|_| Pending::Pass)
                .ok_or_else(unknown),
            Op::Read { handle, .. } => match s.handles.get(&handle) {
                Some(f) if !f.dir => Ok(Pending::Read(handle)),
                _ => Err(unknown()),
            },
            Op::Write { handle, len } => match s.handles.get_mut(&handle) {
                Some(f) if f.write => {
                    f.written += len as u64;
                    Ok(Pending::Pass)
                }
                Some(_) => Err((
                    PERMISSION_DENIED,
                    "agentgate: the file was not opened for writing".into(),
                )),
                None => Err(unknown()),
            },
            Op::HandleChange { handle, .. } => match s.handles.get(&handle) {
                Some(f) if f.write => Ok(Pending::Pass),
                Some(_) => Err((
                    PERMISSION_DENIED,
                    "agentgate: the file was not opened for writing".into(),
                )),
                None => Err(unknown()),
            },
            Op::Close { handle } => s
                .handles
                .contains_key(&handle)
                .then_some(Pending::Close(handle))
                .ok_or_else(unknown),
            Op::Open { path, write } => {
                if s.opening() >= MAX_HANDLES {
                    return Err((FAILURE, "agentgate: too many open files".into()));
                }
                let class = if write { "sftp-write" } else { "sftp-read" };
                let op = if write { "open-write" } else { "open-read" };
                let action = self
                    .sftp_decide(s, class, op, &[path], agent, backlog)
                    .await
                    .map_err(|d| (PERMISSION_DENIED, d))?;
                Ok(Pending::Open {
                    action,
                    write,
                    dir: false,
                    started: Instant::now(),
                })
            }
            Op::Opendir { path } => {
                if s.opening() >= MAX_HANDLES {
                    return Err((FAILURE, "agentgate: too many open files".into()));
                }
                let action = self
                    .sftp_decide(s, "sftp-read", "opendir", &[path], agent, backlog)
                    .await
                    .map_err(|d| (PERMISSION_DENIED, d))?;
                Ok(Pending::Open {
                    action,
                    write: false,
                    dir: true,
                    started: Instant::now(),
                })
            }
            Op::Change { op, paths } => {
                let action = self
                    .sftp_decide(s, "sftp-write", op, &paths, agent, backlog)
                    .await
                    .map_err(|d| (PERMISSION_DENIED, d))?;
                Ok(Pending::Change {
                    action,
                    started: Instant::now(),
                })
            }
            Op::Unsupported { name } => {
                let name = redact_command(&name);
                let reason = format!("sftp {name} is not supported through agentgate");
                let d = self.refuse_sftp(id, &name, &reason).await;
                Err((OP_UNSUPPORTED, denial_text(&d)))
            }
        }
    }

    /// Records a refusal the handler makes itself.
    async fn refuse_sftp(&self, id: u32, name: &str, reason: &str) -> Denial {
        let decision = Decision {
            verdict: Verdict::Deny {
                reason: reason.to_owned(),
            },
            rule: "agentgate:sftp-unsupported".into(),
        };
        let cmd = crate::gate::Command {
            action: json!({"ssh": {"request": "sftp", "channel": self.index, "op": name, "id": id}}),
            fingerprint: String::new(),
            class: "dangerous",
            summary: reason,
            changes_state: true,
        };
        gate_of(self.ctx()).deny(cmd, &decision).await
    }

    /// Decides `op` on `paths` (every path must be allowed; the strictest
    /// decision wins), records it, holds it if the rule says so. `Ok`: the
    /// record's action (for the result); `Err`: the line the client gets.
    #[allow(clippy::too_many_arguments)]
    async fn sftp_decide(
        &mut self,
        s: &mut Sftp,
        class: &'static str,
        op: &str,
        paths: &[String],
        agent: &mut Channel<Msg>,
        backlog: &mut Vec<ChannelMsg>,
    ) -> Result<Value, String> {
        let shared = self.shared.clone();
        let ctx = &shared.ctx;
        let policy = ctx.services.policy.current();
        let gate = gate_of(ctx);
        let normalized: Vec<String> = paths.iter().map(|p| sftp::normalize(p)).collect();
        let mut chosen: Option<(Decision, Action)> = None;
        for p in &normalized {
            let action = Action::Ssh {
                class,
                destination: Some(p.clone()),
            };
            let d = gate.decide(&policy, &action);
            let rank = |d: &Decision| match d.verdict {
                Verdict::Allow => 0,
                Verdict::RequireApproval(_) => 1,
                Verdict::Deny { .. } => 2,
            };
            if chosen.as_ref().is_none_or(|(c, _)| rank(&d) > rank(c)) {
                chosen = Some((d, action));
            }
        }
        let Some((decision, decided_on)) = chosen else {
            return Err("agentgate: no path".into());
        };
        s.seq += 1;
        let shown: Vec<String> = normalized.iter().map(|p| redact_command(p)).collect();
        let summary = format!("sftp {op} {}", shown.join(" -> "));
        let hash = crate::audit::keyed_hash(
            &ctx.services.correlation_key,
            format!("sftp {op} {}", normalized.join("\0")).as_bytes(),
        );
        let action = json!({"ssh": {
            "request": "sftp",
            "channel": self.index,
            "seq": s.seq,
            "op": op,
            "class": class,
            "path": shown[0],
            "to": shown.get(1),
            "hash": hash,
        }});
        let cmd = crate::gate::Command {
            action: action.clone(),
            fingerprint: hash,
            class,
            summary: &summary,
            changes_state: class == "sftp-write",
        };
        let mut outcome = gate.admit_action(cmd, &decision, None, &decided_on).await;
        if let Outcome::Held(mut hold) = outcome {
            let note = format!(
                "agentgate: {summary} held for approval as request {} (until {}); waiting\r\n",
                hold.request_id, hold.deadline
            );
            let _ = self
                .handle
                .extended_data(self.id, 1, bytes::Bytes::from(note.into_bytes()))
                .await;
            let answer = loop {
                tokio::select! {
                    a = hold.decided() => break Some(a),
                    m = agent.wait() => match m {
                        None | Some(ChannelMsg::Close) => break None,
                        Some(m) if backlog.len() < super::MAX_HELD_MESSAGES => backlog.push(m),
                        Some(_) => break None,
                    },
                }
            };
            let Some(a) = answer else {
                gate.cancel(hold).await;
                backlog.push(ChannelMsg::Close);
                return Err("agentgate: the client left".into());
            };
            outcome = gate.release(hold, a).await;
        }
        match outcome {
            Outcome::ForwardNow { recording } => match recording.await {
                Ok(()) => Ok(action),
                Err(e) => Err(denial_text(&Denial {
                    kind: DenialKind::AuditUnavailable,
                    rule: decision.rule.clone(),
                    reason: e.to_string(),
                })),
            },
            Outcome::Forward { .. } => Ok(action),
            Outcome::Deny(d) => Err(denial_text(&d)),
            Outcome::Held(_) => unreachable!("released above"),
        }
    }

    /// Follows every whole reply buffered and passes it on; `false` ends
    /// the channel.
    async fn sftp_replies(&mut self, s: &mut Sftp) -> bool {
        let mut out = Vec::new();
        loop {
            let packet = match s.from_host.next_packet() {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(conn = self.ctx().conn.id, error = %e, "sftp reply refused; channel closed");
                    return false;
                }
            };
            let reply = match sftp::parse_reply(&packet) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(conn = self.ctx().conn.id, error = %e, "sftp reply undecodable; channel closed");
                    return false;
                }
            };
            self.sftp_follow(s, reply);
            out.extend_from_slice(&packet);
            if out.len() >= 64 * 1024 && !self.to_agent(std::mem::take(&mut out)).await {
                return false;
            }
        }
        self.to_agent(out).await
    }

    fn sftp_follow(&self, s: &mut Sftp, reply: Reply) {
        let id = match &reply {
            Reply::Version => return,
            Reply::Status { id, .. }
            | Reply::Handle { id, .. }
            | Reply::Data { id, .. }
            | Reply::Other { id } => *id,
        };
        let Some(p) = s.pending.remove(&id) else {
            return;
        };
        match (p, reply) {
            (
                Pending::Open {
                    action,
                    write,
                    dir,
                    started,
                },
                Reply::Handle { handle, .. },
            ) => {
                // A handle the host reuses replaces the old one's entry.
                if let Some(old) = s.handles.insert(
                    handle,
                    OpenFile {
                        action,
                        write,
                        dir,
                        read: 0,
                        written: 0,
                        started,
                    },
                ) {
                    self.sftp_file_done(old, "handle reused");
                }
            }
            (
                Pending::Open {
                    action, started, ..
                }
                | Pending::Change { action, started },
                r,
            ) => {
                let code = match r {
                    Reply::Status { code, .. } => code,
                    _ => sftp::status::FAILURE,
                };
                self.sftp_result(action, code, 0, started, None);
            }
            (Pending::Read(h), Reply::Data { len, .. }) => {
                if let Some(f) = s.handles.get_mut(&h) {
                    f.read += len as u64;
                }
            }
            (Pending::Close(h), _) => {
                if let Some(f) = s.handles.remove(&h) {
                    self.sftp_file_done(f, "closed");
                }
            }
            _ => {}
        }
    }

    fn sftp_file_done(&self, f: OpenFile, how: &str) {
        let mut action = f.action;
        if let Some(a) = action["ssh"].as_object_mut() {
            a.insert("read_bytes".into(), json!(f.read));
            a.insert("written_bytes".into(), json!(f.written));
        }
        self.sftp_result(
            action,
            sftp::status::OK,
            f.read + f.written,
            f.started,
            Some(how),
        );
    }

    fn sftp_result(
        &self,
        action: Value,
        code: u32,
        bytes: u64,
        started: Instant,
        how: Option<&str>,
    ) {
        let status = if code == sftp::status::OK {
            "ok"
        } else {
            "error"
        };
        gate_of(self.ctx()).completed(
            action,
            None,
            &ResultRecord::Completed {
                status,
                command: Some(match how {
                    Some(h) => h.to_owned(),
                    None => format!("status {code}"),
                }),
                rows: 0,
                bytes,
                duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                sqlstate: None,
            },
        );
    }

    async fn to_host(&self, packet: Vec<u8>) -> bool {
        self.up.data_bytes(packet).await.is_ok()
    }

    async fn to_agent(&self, packets: Vec<u8>) -> bool {
        if packets.is_empty() {
            return true;
        }
        self.handle
            .data(self.id, bytes::Bytes::from(packets))
            .await
            .is_ok()
    }
}
