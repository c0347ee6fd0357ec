//! Containment events from the kernel, turned into audit records.
//!
//! Refusals (Unix paths, datagrams, socket types and families) become
//! `containment.refused`; a task that a tagged task moved into a cgroup that
//! no binding governs becomes `workload.escaped` and, with `on_escape =
//! "kill"`, is killed first (the record says so), since every moment outside
//! its cgroup is a moment unobserved. Trade-off: records are capped at
//! `MAX_RECORDS_PER_SEC` so a hostile agent cannot flood the log; the kernel
//! counters in `status` count every refusal, and the next record written
//! says how many were summarised.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use agentgate_common::{AF_INET, AF_INET6, Event, Provenance, SockAddr, event};
use aya::maps::{MapData, RingBuf};
use std::fmt::Write as _;

use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::{
    audit::{Kind, NewRecord},
    config::OnEscape,
    proxy::Shared,
};

/// Refusal records written per second at most; the rest are counted.
pub const MAX_RECORDS_PER_SEC: u32 = 100;

/// What `status` reports beside the kernel counters (escapes, and refusals
/// counted in userspace).
#[derive(Debug, Default, Serialize)]
pub struct ContainmentStats {
    pub escapes_detected: AtomicU64,
    pub escapes_killed: AtomicU64,
    pub refusal_records_suppressed: AtomicU64,
    /// Calls refused by the seccomp filter of agents started by `exec`.
    pub seccomp_refused: AtomicU64,
}

/// Reads the ring buffer until `shutdown`.
pub async fn run(
    ring: RingBuf<MapData>,
    shared: Arc<Shared>,
    on_escape: OnEscape,
    stats: Arc<ContainmentStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut fd = match crate::sys::async_ring(ring) {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(error = %e, "cannot poll the containment event ring; refusals are counted but not recorded");
            return;
        }
    };
    let mut limiter = Limiter::new();
    let mut recent_escapes: Vec<(u32, Instant)> = Vec::new();
    loop {
        let mut guard = tokio::select! {
            g = fd.readable_mut() => match g {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!(error = %e, "containment event ring failed");
                    return;
                }
            },
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let mut batch = Vec::new();
        while let Some(item) = guard.get_inner_mut().next() {
            if let Some(e) = crate::sys::read_pod::<Event>(&item) {
                batch.push(e);
            }
        }
        guard.clear_ready();
        for e in batch {
            if e.kind == event::MIGRATED {
                // One record per process: a process moves one thread at a time.
                let tgid = crate::provenance::thread_group(e.target_pid);
                recent_escapes.retain(|(_, at)| at.elapsed().as_secs() < 10);
                if recent_escapes.iter().any(|(g, _)| *g == tgid) {
                    continue;
                }
                if migrated(&shared, &e, tgid, on_escape, &stats).await {
                    recent_escapes.push((tgid, Instant::now()));
                }
            } else if let Some(suppressed) = limiter.admit() {
                refused(&shared, &e, suppressed).await;
            } else {
                stats
                    .refusal_records_suppressed
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// A fixed one-second window.
struct Limiter {
    window: Instant,
    used: u32,
    suppressed: u64,
}

impl Limiter {
    fn new() -> Self {
        Self {
            window: Instant::now(),
            used: 0,
            suppressed: 0,
        }
    }

    /// `Some(n)`: write, mentioning `n` records suppressed before it.
    fn admit(&mut self) -> Option<u64> {
        if self.window.elapsed().as_secs() >= 1 {
            self.window = Instant::now();
            self.used = 0;
        }
        if self.used >= MAX_RECORDS_PER_SEC {
            self.suppressed += 1;
            return None;
        }
        self.used += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// The identity and workload an event names (the task's /proc, if it is
/// still there; the kernel's fields always).
/// The identity of the binding an event names.
async fn identity_of(shared: &Shared, e: &Event) -> Option<crate::audit::IdentityRef> {
    let name = shared
        .bindings
        .lock()
        .expect("bindings lock")
        .get(e.binding)
        .map(|b| b.identity.clone())?;
    Some(shared.identity_ref(&name).await)
}

async fn who(
    shared: &Shared,
    e: &Event,
    pid: u32,
) -> (Option<crate::audit::IdentityRef>, crate::audit::Workload) {
    let identity = identity_of(shared, e).await;
    let prov = Provenance {
        orig_dst: SockAddr::default(),
        tgid: pid,
        pid,
        uid: e.uid,
        gid: e.gid,
        binding: e.binding,
        cgroup_id: e.cgroup_id,
        tagged_cgroup_id: e.tagged_cgroup_id,
        netns_cookie: 0,
        socket_cookie: 0,
        comm: e.comm,
    };
    let workload = crate::provenance::Workload::from_kernel(&prov, &shared.hierarchy).to_audit();
    (identity, workload)
}

/// What a refusal was about, for the record (never a payload).
pub fn describe(e: &Event) -> (&'static str, Value) {
    match e.kind {
        event::UNIX_REFUSED => (
            "unix",
            json!({ "route": "unix", "address": unix_address(&e.path) }),
        ),
        event::DATAGRAM_REFUSED => (
            "datagram",
            json!({
                "route": "datagram",
                "destination": crate::redirect::socket_addr(&e.addr).to_string(),
                "protocol": e.protocol,
            }),
        ),
        event::INBOUND_REFUSED => (
            "inbound",
            json!({
                "route": "inbound",
                "source": crate::redirect::socket_addr(&e.addr).ip().to_string(),
            }),
        ),
        event::INET_SOCKET_REFUSED => (
            "socket",
            json!({
                "route": "socket",
                "family": family_name(e.family),
                "type": socket_type_name(e.sock_type),
                "protocol": protocol_name(e.protocol),
            }),
        ),
        _ => (
            "family",
            json!({
                "route": "socket",
                "family": family_name(e.family),
                "type": socket_type_name(e.sock_type),
                "protocol": e.protocol,
            }),
        ),
    }
}

/// A call refused by an exec'd agent's seccomp filter, for the record.
pub fn describe_call(call: &str, family: i64, sock_type: i64, protocol: i64) -> Value {
    match call {
        "io_uring_setup" => json!({ "route": "io_uring", "call": call }),
        _ => json!({
            "route": "socket",
            "call": call,
            "family": family_name(family as u32),
            "type": socket_type_name(sock_type as u32),
            "protocol": protocol,
        }),
    }
}

async fn refused(shared: &Shared, e: &Event, suppressed: u64) {
    let (route, mut action) = describe(e);
    if suppressed > 0 {
        action["suppressed_before"] = json!(suppressed);
    }
    // An inbound packet is refused outside any process's context.
    let (identity, workload) = if e.kind == event::INBOUND_REFUSED {
        (identity_of(shared, e).await, None)
    } else {
        let (i, w) = who(shared, e, e.tgid).await;
        (i, Some(w))
    };
    tracing::warn!(event = "containment.refused", route, pid = e.tgid, detail = %action);
    let mut rec = NewRecord::new(Kind::ContainmentRefused)
        .action(action)
        .decision(json!({ "verdict": "deny", "reason": refusal_reason(e.kind) }));
    if let Some(i) = identity {
        rec = rec.identity(i);
    }
    if let Some(w) = workload {
        rec = rec.workload(w);
    }
    if let Err(err) = shared.audit.append(rec).await {
        tracing::error!(event = "log.failure", error = %err, "cannot record a containment refusal");
    }
}

fn refusal_reason(kind: u32) -> &'static str {
    match kind {
        event::UNIX_REFUSED => "agentgate:unix-path-not-allowed",
        event::DATAGRAM_REFUSED => "agentgate:datagram-not-to-a-resolver",
        event::INBOUND_REFUSED => "agentgate:inbound-from-another-host",
        event::INET_SOCKET_REFUSED => "agentgate:socket-type-not-allowed",
        _ => "agentgate:socket-family-not-allowed",
    }
}

/// A task that left a tagged cgroup: an escape if no binding governs where
/// it went. True when it was recorded as one.
async fn migrated(
    shared: &Shared,
    e: &Event,
    pid: u32,
    on_escape: OnEscape,
    stats: &ContainmentStats,
) -> bool {
    let Some(path) = shared.hierarchy.of_process(e.target_pid) else {
        return false; // already gone
    };
    let (governed, from) = {
        let bindings = shared.bindings.lock().expect("bindings lock");
        let from = bindings
            .by_cgroup_id(e.tagged_cgroup_id)
            .map(|b| shared.hierarchy.relative(&b.cgroup));
        (super::governing(&bindings, &path).is_some(), from)
    };
    if governed {
        return false;
    }
    stats.escapes_detected.fetch_add(1, Ordering::Relaxed);
    let killed = on_escape == OnEscape::Kill && crate::sys::kill(pid, libc::SIGKILL).is_ok();
    if killed {
        stats.escapes_killed.fetch_add(1, Ordering::Relaxed);
    }
    let (identity, workload) = who(shared, e, pid).await;
    let to = shared.hierarchy.relative(&path);
    tracing::error!(event = "workload.escaped", pid, to = %to, mover = e.tgid, killed);
    let mut rec = NewRecord::new(Kind::WorkloadEscaped)
        .workload(workload)
        .action(json!({
            "moved_pid": pid,
            "moved_by_pid": e.tgid,
            "from_cgroup": from,
            "tagged_cgroup_id": e.tagged_cgroup_id,
            "to_cgroup": to,
        }))
        .result(json!({ "killed": killed, "on_escape": on_escape }));
    if let Some(i) = identity {
        rec = rec.identity(i);
    }
    if let Err(err) = shared.audit.append(rec).await {
        tracing::error!(event = "log.failure", error = %err, "cannot record an escape");
    }
    true
}

/// A Unix address for a record: the path, or `@name` for an abstract one,
/// bytes outside printable ASCII escaped.
pub fn unix_address(path: &[u8]) -> String {
    let (prefix, body) = match path.first() {
        Some(0) => ("@", &path[1..]),
        _ => ("", path),
    };
    let end = if prefix.is_empty() {
        body.iter().position(|&b| b == 0).unwrap_or(body.len())
    } else {
        body.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1)
    };
    let mut out = String::from(prefix);
    for &b in &body[..end] {
        if b.is_ascii_graphic() {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "\\x{b:02x}");
        }
    }
    out
}

fn family_name(f: u32) -> Value {
    match f as u16 {
        1 => json!("unix"),
        AF_INET => json!("inet"),
        AF_INET6 => json!("inet6"),
        16 => json!("netlink"),
        17 => json!("packet"),
        31 => json!("bluetooth"),
        38 => json!("alg"),
        40 => json!("vsock"),
        44 => json!("xdp"),
        _ => json!(f),
    }
}

fn socket_type_name(t: u32) -> Value {
    match t & 0xf {
        1 => json!("stream"),
        2 => json!("dgram"),
        3 => json!("raw"),
        5 => json!("seqpacket"),
        _ => json!(t),
    }
}

fn protocol_name(p: u32) -> Value {
    match p {
        1 => json!("icmp"),
        6 => json!("tcp"),
        17 => json!("udp"),
        58 => json!("icmpv6"),
        132 => json!("sctp"),
        136 => json!("udplite"),
        262 => json!("mptcp"),
        255 => json!("raw"),
        _ => json!(p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_addresses_are_readable() {
        let mut p = [0u8; 108];
        p[..8].copy_from_slice(b"/dev/log");
        assert_eq!(unix_address(&p), "/dev/log");
        let mut a = [0u8; 108];
        a[1..6].copy_from_slice(b"agent");
        assert_eq!(unix_address(&a), "@agent");
        let mut odd = [0u8; 108];
        odd[..3].copy_from_slice(b"/a\n");
        assert_eq!(unix_address(&odd), "/a\\x0a");
    }

    #[test]
    fn limiter_caps_and_reports_what_it_held_back() {
        let mut l = Limiter::new();
        for _ in 0..MAX_RECORDS_PER_SEC {
            assert_eq!(l.admit(), Some(0));
        }
        assert_eq!(l.admit(), None);
        assert_eq!(l.admit(), None);
        l.window -= std::time::Duration::from_secs(1);
        assert_eq!(
            l.admit(),
            Some(2),
            "the next record counts the two held back"
        );
    }
}
