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
