//! Types shared by agentgate's eBPF programs and its userspace daemon.
//!
//! Every type here crosses the kernel/user boundary through a BPF map, so it is
//! `#[repr(C)]`, has no padding the kernel could leave uninitialised (explicit
//! `pad` fields instead), and holds addresses and ports in one documented byte
//! order. Userspace gets `aya::Pod` impls behind the `user` feature.
#![no_std]

/// `AF_INET`, as the kernel reports it in socket contexts.
pub const AF_INET: u16 = 2;
/// `AF_INET6`.
pub const AF_INET6: u16 = 10;

/// Deepest cgroup level the connect hook walks when it looks for a tagged ancestor.
/// cgroup v2 hierarchies on agent hosts are shallow (systemd: about 4 levels).
pub const MAX_CGROUP_DEPTH: u32 = 32;

/// Names of the maps and programs, shared so userspace cannot drift from the object.
pub mod names {
    pub const TAGGED_CGROUPS: &str = "AG_TAGGED";
    pub const CONFIG: &str = "AG_CONFIG";
    pub const BY_COOKIE: &str = "AG_BY_COOKIE";
    pub const BY_PEER: &str = "AG_BY_PEER";
    pub const SOCKHASH: &str = "AG_SOCKHASH";
    pub const FAST_MODE: &str = "AG_FAST_MODE";
    pub const COUNTERS: &str = "AG_COUNTERS";
    pub const RESOLVERS: &str = "AG_RESOLVERS";
    pub const FORWARDERS: &str = "AG_FORWARDERS";
    pub const UNIX_ALLOW: &str = "AG_UNIX_ALLOW";
    pub const EVENTS: &str = "AG_EVENTS";
    pub const TAGGED_TASKS: &str = "AG_TAGGED_TASKS";

    pub const CONNECT4: &str = "ag_connect4";
    pub const CONNECT6: &str = "ag_connect6";
    pub const GETPEERNAME4: &str = "ag_getpeername4";
    pub const GETPEERNAME6: &str = "ag_getpeername6";
    pub const SOCK_OPS: &str = "ag_sock_ops";
    pub const SK_MSG: &str = "ag_sk_msg";
    pub const SK_SKB_VERDICT: &str = "ag_sk_skb_verdict";
    pub const SENDMSG4: &str = "ag_sendmsg4";
    pub const SENDMSG6: &str = "ag_sendmsg6";
    pub const RECVMSG4: &str = "ag_recvmsg4";
    pub const RECVMSG6: &str = "ag_recvmsg6";
    pub const SOCK_CREATE: &str = "ag_sock_create";
    pub const LSM_SOCKET_CREATE: &str = "ag_lsm_socket_create";
    pub const LSM_SOCKET_CONNECT: &str = "ag_lsm_socket_connect";
    pub const LSM_SOCKET_SENDMSG: &str = "ag_lsm_socket_sendmsg";
    pub const TP_ATTACH: &str = "ag_tp_cgroup_attach";
    pub const TP_FORK: &str = "ag_tp_fork";
    pub const TP_EXIT: &str = "ag_tp_exit";
    pub const SKB_INGRESS: &str = "ag_skb_ingress";
}

/// An IPv4 or IPv6 socket address.
///
/// `addr` holds the address in network byte order as the kernel's `user_ip6`
/// does; an IPv4 address uses `addr[0]` only (IPv4-mapped IPv6 addresses are
/// normalised to IPv4 before they become keys). `port` is in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockAddr {
    pub family: u16,
    pub port: u16,
    pub addr: [u32; 4],
}

/// The proxy listener and switches, written by userspace into a one-entry array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Config {
    /// Listener for IPv4 destinations (and IPv4-mapped IPv6 ones).
    pub proxy4: SockAddr,
    /// Listener for IPv6 destinations.
    pub proxy6: SockAddr,
    /// The daemon's own process: its sockets are never redirected.
    pub daemon_tgid: u32,
    /// 1 when the `sk_msg` fast path is on.
    pub fast_path: u32,
    /// 1 once userspace has written this entry; until then nothing is redirected
    /// *or let through* for tagged cgroups (see the connect hook).
    pub ready: u32,
    /// Offsets of `pid` and `dst_id` in the `cgroup:cgroup_attach_task`
    /// tracepoint record and of `child_pid` in `sched:sched_process_fork`,
    /// read by userspace from their format files.
    pub tp_attach_pid_offset: u32,
    pub tp_attach_dst_id_offset: u32,
    pub tp_fork_child_pid_offset: u32,
}

/// Longest Unix socket path (`sizeof(sun_path)`).
pub const UNIX_PATH_MAX: usize = 108;

/// Key data of the Unix-path allow list (an LPM trie over path bytes): an
/// absolute path or an abstract name (leading NUL), zero-padded. An exact
/// entry includes the terminating NUL in its prefix; a directory entry
/// (`/run/x/*`) ends at the slash.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnixPath {
    pub bytes: [u8; UNIX_PATH_MAX],
}

/// What a containment event reports (`Event::kind`).
pub mod event {
    /// A Unix-socket connect or send to a path the config does not allow.
    pub const UNIX_REFUSED: u32 = 1;
    /// A datagram (or datagram connect) to anything but a configured resolver.
    pub const DATAGRAM_REFUSED: u32 = 2;
    /// An inet socket of a type or protocol outside the allowed set.
    pub const INET_SOCKET_REFUSED: u32 = 3;
    /// A socket of a family outside the allowed set.
    pub const FAMILY_REFUSED: u32 = 4;
    /// A packet from another host (not loopback) to a socket of a tagged
    /// process: someone dialing in, or answering a datagram.
    pub const INBOUND_REFUSED: u32 = 6;
    /// A task that was in a tagged cgroup moved to a cgroup that is not
    /// itself tagged (userspace decides whether an ancestor governs it).
    pub const MIGRATED: u32 = 5;
}

/// One containment event, from the kernel to the daemon through a ring buffer.
/// Read in the acting task's context: pid, uid, comm and cgroups are its own.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Event {
    pub kind: u32,
    pub tgid: u32,
    pub pid: u32,
    pub uid: u32,
    pub binding: u32,
    /// Socket family, type and protocol (socket events).
    pub family: u32,
    pub sock_type: u32,
    pub protocol: u32,
    /// `MIGRATED`: the task (thread) that was moved.
    pub target_pid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    pub tagged_cgroup_id: u64,
    /// `MIGRATED`: the cgroup the task was moved into.
    pub target_cgroup_id: u64,
    /// `DATAGRAM_REFUSED`: where the datagram was going; `INBOUND_REFUSED`:
    /// where the packet came from.
    pub addr: SockAddr,
    pub comm: [u8; 16],
    /// `UNIX_REFUSED`: the path (or abstract name, leading NUL) dialed.
    pub path: [u8; UNIX_PATH_MAX],
}

/// A task (thread) known to be in a tagged cgroup (`AG_TAGGED_TASKS`, by
/// its kernel pid): so that leaving it can be told from any other move.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TaggedTask {
    pub tagged_cgroup_id: u64,
    pub binding: u32,
    pub pad: u32,
}

/// Tag value stored per cgroup id in the tagged-cgroups map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tag {
    /// A number userspace chose for the binding (identity lookup happens in userspace).
    pub binding: u32,
    pub pad: u32,
}

/// What the connect hook learned about the process that called `connect()`.
///
/// Read in the caller's context, so it is the agent's own pid, uid and cgroup.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Provenance {
    /// Where the process meant to go.
    pub orig_dst: SockAddr,
    pub tgid: u32,
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    /// The binding number of the tagged cgroup.
    pub binding: u32,
    /// The cgroup the task was in (not the tagged ancestor).
    pub cgroup_id: u64,
    /// The tagged cgroup (itself or an ancestor) that made this socket eligible.
    pub tagged_cgroup_id: u64,
    pub netns_cookie: u64,
    pub socket_cookie: u64,
    pub comm: [u8; 16],
}

/// The connection as the proxy sees it from `accept()`: peer (the agent's
/// socket) and local (the proxy listener), in the listener's network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct PeerKey {
    pub peer: SockAddr,
    pub local: SockAddr,
    pub netns_cookie: u64,
}

/// Key of the fast-path `SockHash`: a socket's own (local, remote) pair, in the
/// shape `bpf_sock_hash_update` and `bpf_msg_redirect_hash` hash it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockPairKey {
    pub local: SockAddr,
    pub remote: SockAddr,
}

/// How an agent socket's writes travel, decided at its first write and kept
/// for the socket's life (the values of the `AG_FAST_MODE` map).
pub mod fast_mode {
    /// In the `SockHash`, nothing written yet.
    pub const UNDECIDED: u32 = 0;
    /// Every write goes straight to the proxy socket's receive queue.
    pub const REDIRECT: u32 = 1;
    /// The first write found no proxy socket in the map: every write takes
    /// the ordinary TCP path, so none can overtake an earlier one.
    pub const ORDINARY: u32 = 2;
}

/// Indices into the per-CPU counters array.
pub mod counter {
    pub const REDIRECTED: u32 = 0;
    pub const NOT_READY_DENIED: u32 = 1;
    pub const ESTABLISHED: u32 = 2;
    pub const CLOSED: u32 = 3;
    pub const FAST_PATH_INSERTED: u32 = 4;
    /// Agent sockets that wrote before the proxy's socket was in the
    /// `SockHash`, and so stay on the ordinary path for their whole life.
    pub const FAST_PATH_DECLINED: u32 = 5;
    /// Containment refusals by kind (see `event`), counted even when the
    /// ring buffer is full and the event itself is lost.
    pub const UNIX_REFUSED: u32 = 6;
    pub const DATAGRAM_REFUSED: u32 = 7;
    pub const INET_SOCKET_REFUSED: u32 = 8;
    pub const FAMILY_REFUSED: u32 = 9;
    /// Datagrams rewritten to the daemon's DNS forwarder.
    pub const DNS_FORWARDED: u32 = 10;
    /// Tasks moved to another cgroup by a tagged task.
    pub const MIGRATIONS: u32 = 12;
    /// Packets from other hosts dropped before a tagged process's socket.
    pub const INBOUND_REFUSED: u32 = 13;
    /// Records of closed connections deleted because a socket without a
    /// connect record reached the proxy from the same 4-tuple.
    pub const STALE_PEER_REMOVED: u32 = 14;
    /// Events that did not fit in the ring buffer.
    pub const EVENTS_LOST: u32 = 11;
    pub const LEN: u32 = 16;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are #[repr(C)], Copy, made only of integers, with explicit padding.
    unsafe impl aya::Pod for super::SockAddr {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::Tag {}
    unsafe impl aya::Pod for super::Provenance {}
    unsafe impl aya::Pod for super::PeerKey {}
    unsafe impl aya::Pod for super::SockPairKey {}
    unsafe impl aya::Pod for super::UnixPath {}
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::TaggedTask {}
}
