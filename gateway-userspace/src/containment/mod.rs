//! Containment: every route out of a tagged cgroup other than the proxy is
//! refused or recorded.
//!
//! The kernel half (gateway-ebpf) refuses Unix-socket connects to paths the
//! config does not allow, datagrams other than DNS to the configured
//! resolvers, socket types and families outside the allowed set, and reports
//! processes that leave a tagged cgroup. This module is the userspace half:
//! which cgroup a caller is governed by, the DNS forwarder that logs every
//! query, the escape watcher, and root processes inside tagged cgroups.
//! Trade-off: the checks key on cgroup membership, so a process that shares
//! descriptors with an untagged one (passed sockets, shared files) is out of
//! scope, as the README's threat model says.

use std::path::Path;

use crate::binding::{Binding, Bindings};

/// The binding that governs a cgroup: its own, or that of the nearest tagged
/// ancestor. `None` means the cgroup is not governed.
pub fn governing<'a>(bindings: &'a Bindings, cgroup: &Path) -> Option<&'a Binding> {
    cgroup
        .ancestors()
        .filter_map(|p| crate::cgroup::id(p).ok())
        .find_map(|id| bindings.by_cgroup_id(id))
}

pub mod dns;
pub mod events;
pub mod privileged;
pub mod refusals;
pub mod udp_owner;

/// Why the control plane refuses a caller (see [`control_refusal`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlRefusal {
    /// The caller is inside or below a tagged cgroup.
    Governed {
        /// The caller's cgroup, relative to the cgroup2 mount.
        cgroup: String,
        /// The identity of the binding that governs it.
        identity: String,
    },
    /// The caller's cgroup could not be read (it exited, or its pid is not
    /// visible from the daemon's pid namespace).
    Unresolved,
}

impl ControlRefusal {
    /// What the caller is told (and exits 2 with).
    pub fn message(&self) -> String {
        match self {
            Self::Governed { cgroup, identity } => format!(
                "permission denied: the control socket refuses processes inside a tagged cgroup ({cgroup}, identity {identity})"
            ),
            Self::Unresolved => "permission denied: the control socket cannot tell which cgroup the caller is in, and refuses it".into(),
        }
    }
}

/// Whether the control plane refuses a caller, from the pid its socket's
/// peer credentials name. Fails closed: no pid, or no readable cgroup, is a
/// refusal. The pid is read when each request arrives, so a process that
/// connected before it moved into a tagged cgroup (`agentgate exec` does)
/// is refused from then on. Limitation: the peer credentials name the
/// process that connected; if it exited and its pid was reused, the check
/// reads the new process's cgroup.
pub fn control_refusal(
    hierarchy: &crate::cgroup::Hierarchy,
    bindings: &Bindings,
    pid: Option<u32>,
) -> Option<ControlRefusal> {
    let Some(path) = pid.and_then(|p| hierarchy.of_process(p)) else {
        return Some(ControlRefusal::Unresolved);
    };
    governing(bindings, &path).map(|b| ControlRefusal::Governed {
        cgroup: hierarchy.relative(&path),
        identity: b.identity.clone(),
    })
}

/// A process as an audit record names it, read from /proc by pid: exe and
/// cgroup when readable, and the command line (capped and redacted as
/// [`crate::provenance::redact_cmdline`] does) only when `cmdline` is set.
/// Records about control requests leave it out: an approver's command line
/// carries its reason text, and those records carry no arguments.
pub fn process_workload(
    hierarchy: &crate::cgroup::Hierarchy,
    pid: Option<u32>,
    uid: Option<u32>,
    cmdline: bool,
) -> crate::audit::Workload {
    let Some(pid) = pid else {
        return crate::audit::Workload {
            uid: uid.unwrap_or(u32::MAX),
            ..crate::audit::Workload::default()
        };
    };
    let cmdline = cmdline
        .then(|| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
        .flatten()
        .filter(|raw| !raw.is_empty())
        .map(|raw| {
            let raw = &raw[..raw.len().min(crate::provenance::MAX_CMDLINE)];
            let args: Vec<String> = raw
                .split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            crate::provenance::redact_cmdline(&args)
        });
    crate::audit::Workload {
        pid,
        exe: std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .map(|p| p.display().to_string()),
        cmdline,
        uid: uid.unwrap_or(u32::MAX),
        cgroup: hierarchy
            .of_process(pid)
            .map(|path| hierarchy.relative(&path)),
    }
}
