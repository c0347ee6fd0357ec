//! agentgate's kernel half.
//!
//! - `ag_connect4` / `ag_connect6` (cgroup/connect4|6): for a TCP socket whose
//!   task sits in a tagged cgroup (or below one), record who connected and where
//!   it meant to go, keyed by socket cookie, and rewrite the destination to the
//!   proxy listener. Runs in the caller's context: pid, uid, comm and cgroup are
//!   the agent's.
//! - `ag_sock_ops`: re-key that record by the 4-tuple the proxy will see from
//!   `accept()`, delete both keys when the socket reaches TCP_CLOSE, and, with
//!   the fast path on, put the agent socket and the proxy's accepted socket in
//!   the SockHash. It never reads provenance: it does not run in the agent's context.
//! - `ag_sk_msg` (fast path): move bytes between the two sockets of a pair
//!   without the loopback TCP stack. An agent socket decides at its first
//!   write, once for its life: redirect if the proxy's socket is in the map
//!   by then, the ordinary path otherwise (so no write can overtake one still
//!   in the TCP stack). `ag_sk_skb_verdict` passes every skb; its
//!   only job is to keep sockets in the SockHash off the kernel 6.18 path where
//!   FIONREAD reads 0 and epoll wake-ups are lost (fix upstream 04af4efde58a).
//! - `ag_getpeername4|6`: a redirected socket reports the address it dialed.
//!
//! Containment (every route out of a tagged cgroup but the proxy is refused
//! and reported through `AG_EVENTS`):
//! - datagrams (`ag_connect4|6` for UDP, `ag_sendmsg4|6` for unconnected
//!   sends) reach only the configured DNS resolvers, rewritten to the
//!   daemon's forwarder for that resolver; `ag_recvmsg4|6` and getpeername
//!   show the resolver again;
//! - `ag_sock_create`: inet sockets are TCP or UDP only (no raw, ICMP,
//!   MPTCP, SCTP, UDP-Lite);
//! - `ag_lsm_socket_create` (BPF LSM, cgroup-scoped): families other than
//!   Unix, inet and netlink-route are refused;
//! - `ag_lsm_socket_connect|sendmsg`: Unix-socket connects and sends only to
//!   allowed absolute paths or abstract names (`AG_UNIX_ALLOW`);
//! - `ag_skb_ingress` (cgroup_skb ingress, when inbound is limited): packets
//!   from other hosts to a tagged process's sockets are dropped, so nothing
//!   dials in to a tagged listener (its answers would leave unobserved);
//! - `ag_tp_fork`, `ag_tp_exit`, `ag_tp_cgroup_attach` (tracepoints): the
//!   tasks of tagged cgroups are tracked, and one that moves to a cgroup that
//!   is not tagged is reported; userspace decides whether the destination is
//!   still governed (a cgroup below a tagged one is).
//!
//! Fails closed: a tagged task's connect is refused while the proxy
//! configuration is missing, and so is anything the rules above do not allow.
#![no_std]
#![no_main]

use agentgate_common::{
    AF_INET, AF_INET6, Config, Event, MAX_CGROUP_DEPTH, PeerKey, Provenance, SockAddr,
    SockPairKey, Tag, TaggedTask, UNIX_PATH_MAX, UnixPath, counter, event, fast_mode,
};
use aya_ebpf::{
    bindings::{
        BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE, sk_action,
    },
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_probe_read_kernel, bpf_probe_read_kernel_buf,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
            bpf_get_socket_cookie, bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
        },
    },
    macros::{
        cgroup_skb, cgroup_sock, cgroup_sock_addr, lsm_cgroup, map, sk_msg, sock_ops,
        stream_verdict, tracepoint,
    },
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf, SockHash, lpm_trie::Key},
    programs::{
        LsmContext, SkBuffContext, SkMsgContext, SockAddrContext, SockContext,
        SockOpsContext, TracePointContext,
    },
    EbpfContext as _,
};

const SOCK_STREAM: u32 = 1;
const SOCK_DGRAM: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const AF_UNIX: u16 = 1;
const AF_NETLINK: u16 = 16;
const NETLINK_ROUTE: u32 = 0;

/// Return values of cgroup programs (sock_addr, sock, lsm_cgroup).
const ALLOW: i32 = 1;
const REJECT: i32 = 0;

#[map(name = "AG_TAGGED")]
static TAGGED: HashMap<u64, Tag> = HashMap::with_max_entries(4096, 0);

#[map(name = "AG_CONFIG")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Provenance by socket cookie: written at connect, read by getpeername and
/// sock_ops, deleted at TCP_CLOSE. LRU so a socket that never reaches
/// sock_ops (connect failed before SYN) cannot leak an entry forever.
#[map(name = "AG_BY_COOKIE")]
static BY_COOKIE: LruHashMap<u64, Provenance> = LruHashMap::with_max_entries(65536, 0);

/// Provenance by the 4-tuple the proxy sees. Userspace reads it at accept
/// and deletes it then; the close callback leaves it, so a connection that
/// closes before the proxy accepts it is still attributed and recorded. LRU
/// bounds what connections never accepted leave behind. A socket that reaches
/// the proxy without a connect record (an untagged process, or a direct dial
/// of the listener) deletes any entry for its own 4-tuple when it is
/// established, before the proxy can accept it: a reused tuple does not
/// inherit a closed connection's record (see `ag_sock_ops`).
#[map(name = "AG_BY_PEER")]
static BY_PEER: LruHashMap<PeerKey, Provenance> = LruHashMap::with_max_entries(65536, 0);

#[map(name = "AG_SOCKHASH")]
static SOCKHASH: SockHash<SockPairKey> = SockHash::with_max_entries(65536, 0);

/// Fast path: how each agent socket in the SockHash writes (`fast_mode`),
/// by its own (local, remote) pair. Written before the socket enters the
/// SockHash, deleted at TCP_CLOSE. Proxy sockets have no entry. Not LRU: an
/// evicted entry would make a live agent socket look like a proxy socket.
#[map(name = "AG_FAST_MODE")]
static FAST_MODE: HashMap<SockPairKey, u32> = HashMap::with_max_entries(65536, 0);

#[map(name = "AG_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::LEN, 0);

/// Configured DNS resolver -> the daemon's forwarder for it.
#[map(name = "AG_RESOLVERS")]
static RESOLVERS: HashMap<SockAddr, SockAddr> = HashMap::with_max_entries(16, 0);

/// Forwarder -> the resolver it stands for (replies and getpeername).
#[map(name = "AG_FORWARDERS")]
static FORWARDERS: HashMap<SockAddr, SockAddr> = HashMap::with_max_entries(16, 0);

/// Unix socket paths and abstract names a tagged task may reach.
#[map(name = "AG_UNIX_ALLOW")]
static UNIX_ALLOW: LpmTrie<UnixPath, u32> = LpmTrie::with_max_entries(256, 0);

/// Containment events for the daemon (refusals, migrations).
#[map(name = "AG_EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Tasks known to be in a tagged cgroup, by kernel pid (thread id): added
/// when a tagged task forks or a task moves into a tagged cgroup (userspace
/// adds those already inside when it tags a cgroup), removed at exit.
#[map(name = "AG_TAGGED_TASKS")]
static TAGGED_TASKS: LruHashMap<u32, TaggedTask> = LruHashMap::with_max_entries(65536, 0);

#[inline(always)]
fn bump(idx: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn config() -> Option<&'static Config> {
    CONFIG.get(0)
}

/// The tagged cgroup among `own` and its ancestors (`ancestor(level)`, root
/// first, as the kernel's ancestor helpers number them), nearest first.
#[inline(always)]
fn nearest_tagged(own: u64, ancestor: impl Fn(i32) -> u64) -> Option<(u64, Tag)> {
    // SAFETY: read-only lookup; Tag is Copy.
    if let Some(tag) = unsafe { TAGGED.get(&own) } {
        return Some((own, *tag));
    }
    let mut level: i32 = 0;
    while level < MAX_CGROUP_DEPTH as i32 {
        let id = ancestor(level);
        if id == 0 || id == own {
            break;
        }
        // SAFETY: as above.
        if let Some(tag) = unsafe { TAGGED.get(&id) } {
            return Some((id, *tag));
        }
        level += 1;
    }
    None
}

/// The tagged cgroup this task belongs to (itself or its nearest tagged ancestor).
#[inline(always)]
fn tagged_cgroup() -> Option<(u64, Tag)> {
    // SAFETY: helpers without pointer arguments.
    let own = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: as above.
    nearest_tagged(own, |level| unsafe { bpf_get_current_ancestor_cgroup_id(level) })
}

/// Reads `user_ip6` one 32-bit word at a time: the verifier only allows
/// aligned 4-byte context accesses at constant offsets, and a plain array copy
/// becomes a byte loop over the context.
#[inline(always)]
fn read_ip6(sa: &aya_ebpf::bindings::bpf_sock_addr) -> [u32; 4] {
    let p = sa.user_ip6.as_ptr();
    // SAFETY: p points at four u32 context fields.
    unsafe {
        [
            core::ptr::read_volatile(p),
            core::ptr::read_volatile(p.add(1)),
            core::ptr::read_volatile(p.add(2)),
            core::ptr::read_volatile(p.add(3)),
        ]
    }
}

#[inline(always)]
fn write_ip6(sa: &mut aya_ebpf::bindings::bpf_sock_addr, a: [u32; 4]) {
    let p = sa.user_ip6.as_mut_ptr();
    // SAFETY: as in read_ip6.
    unsafe {
        core::ptr::write_volatile(p, a[0]);
        core::ptr::write_volatile(p.add(1), a[1]);
        core::ptr::write_volatile(p.add(2), a[2]);
        core::ptr::write_volatile(p.add(3), a[3]);
    }
}

#[inline(always)]
fn is_v4_mapped(a: &[u32; 4]) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == u32::to_be(0x0000_ffff)
}

#[inline(always)]
fn v4(addr: u32, port: u16) -> SockAddr {
    SockAddr { family: AF_INET, port, addr: [addr, 0, 0, 0] }
}

/// An IPv6 address, or the IPv4 address it maps.
#[inline(always)]
fn v6_normalized(addr: [u32; 4], port: u16) -> SockAddr {
    if is_v4_mapped(&addr) {
        v4(addr[3], port)
    } else {
        SockAddr { family: AF_INET6, port, addr }
    }
}

#[inline(always)]
fn same_endpoint(a: &SockAddr, b: &SockAddr) -> bool {
    a.family == b.family && a.port == b.port && a.addr == b.addr
}

#[cgroup_sock_addr(connect4)]
pub fn ag_connect4(ctx: SockAddrContext) -> i32 {
    connect(&ctx, false)
}

#[cgroup_sock_addr(connect6)]
pub fn ag_connect6(ctx: SockAddrContext) -> i32 {
    connect(&ctx, true)
}

#[inline(always)]
fn connect(ctx: &SockAddrContext, ipv6: bool) -> i32 {
    let Some((tagged_id, tag)) = tagged_cgroup() else {
        return ALLOW;
    };
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let port = u16::from_be(sa.user_port as u16);
    let Some(cfg) = config() else {
        bump(counter::NOT_READY_DENIED);
        return REJECT;
    };
    if cfg.ready != 1 {
        bump(counter::NOT_READY_DENIED);
        return REJECT;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    if tgid == cfg.daemon_tgid {
        return ALLOW;
    }
    let dst = if ipv6 { v6_normalized(read_ip6(sa), port) } else { v4(sa.user_ip4, port) };
    if sa.type_ != SOCK_STREAM {
        // Only TCP is proxied; datagrams go to the DNS forwarder or nowhere.
        return datagram(sa, ipv6, dst, tagged_id, tag);
    }
    // A dial of the proxy itself keeps its destination and gets no record, so
    // the proxy refuses it (and nothing loops back into the proxy).
    if same_endpoint(&dst, &cfg.proxy4) || same_endpoint(&dst, &cfg.proxy6) {
        return ALLOW;
    }

    let uid_gid = bpf_get_current_uid_gid();
    let ctx_ptr = ctx.as_ptr();
    // SAFETY: sock_addr contexts are valid arguments for both cookie helpers.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx_ptr) };
    // SAFETY: as above.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx_ptr) };
    let prov = Provenance {
        orig_dst: dst,
        tgid,
        pid: pid_tgid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        binding: tag.binding,
        // SAFETY: no pointer arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        tagged_cgroup_id: tagged_id,
        netns_cookie,
        socket_cookie,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
    };
    if BY_COOKIE.insert(&socket_cookie, &prov, 0).is_err() {
        // Without a record the proxy could not attribute the connection.
        return REJECT;
    }

    if dst.family == AF_INET {
        if ipv6 {
            // IPv4-mapped destination on an IPv6 socket: stay mapped.
            write_ip6(sa, [0, 0, u32::to_be(0x0000_ffff), cfg.proxy4.addr[0]]);
        } else {
            sa.user_ip4 = cfg.proxy4.addr[0];
        }
        sa.user_port = u32::from(u16::to_be(cfg.proxy4.port));
    } else {
        write_ip6(sa, cfg.proxy6.addr);
        sa.user_port = u32::from(u16::to_be(cfg.proxy6.port));
    }
    bump(counter::REDIRECTED);
    ALLOW
}

#[cgroup_sock_addr(getpeername4)]
pub fn ag_getpeername4(ctx: SockAddrContext) -> i32 {
    getpeername(&ctx, false)
}

#[cgroup_sock_addr(getpeername6)]
pub fn ag_getpeername6(ctx: SockAddrContext) -> i32 {
    getpeername(&ctx, true)
}

#[inline(always)]
fn getpeername(ctx: &SockAddrContext, ipv6: bool) -> i32 {
    // SAFETY: sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    // SAFETY: read-only lookup of a Copy value.
    let dst = if let Some(prov) = unsafe { BY_COOKIE.get(&cookie) } {
        prov.orig_dst
    } else {
        // A datagram socket connected to a DNS forwarder sees its resolver.
        let port = u16::from_be(sa.user_port as u16);
        let peer = if ipv6 { v6_normalized(read_ip6(sa), port) } else { v4(sa.user_ip4, port) };
        // SAFETY: read-only lookup of a Copy value.
        match unsafe { FORWARDERS.get(&peer) } {
            Some(resolver) => *resolver,
            None => return ALLOW,
        }
    };
    if ipv6 {
        let a = if dst.family == AF_INET { [0, 0, u32::to_be(0x0000_ffff), dst.addr[0]] } else { dst.addr };
        write_ip6(sa, a);
    } else {
        sa.user_ip4 = dst.addr[0];
    }
    sa.user_port = u32::from(u16::to_be(dst.port));
    ALLOW
}

/// A tagged task's datagram (connect or unconnected send) to `dst`: to a
/// configured resolver it goes to that resolver's forwarder; anything else is
/// refused.
#[inline(always)]
fn datagram(
    sa: &mut aya_ebpf::bindings::bpf_sock_addr,
    ipv6: bool,
    dst: SockAddr,
    tagged_id: u64,
    tag: Tag,
) -> i32 {
    // SAFETY: read-only lookup of a Copy value.
    let Some(fwd) = (unsafe { RESOLVERS.get(&dst) }).copied() else {
        emit(event::DATAGRAM_REFUSED, counter::DATAGRAM_REFUSED, tagged_id, tag, |e| {
            e.addr = dst;
            e.family = u32::from(if ipv6 { AF_INET6 } else { AF_INET });
            e.sock_type = sa.type_;
            e.protocol = sa.protocol;
        });
        return REJECT;
    };
    if !rewrite(sa, ipv6, &fwd) {
        return REJECT;
    }
    bump(counter::DNS_FORWARDED);
    ALLOW
}

/// Points a sock_addr context at `to` (IPv4 on an IPv6 socket stays mapped).
/// False when an IPv4 socket cannot carry `to` (an IPv6 address). The
/// `ipv6` test comes first so IPv4 programs never touch `user_ip6`, which
/// their context does not allow.
#[inline(always)]
fn rewrite(sa: &mut aya_ebpf::bindings::bpf_sock_addr, ipv6: bool, to: &SockAddr) -> bool {
    if ipv6 {
        if to.family == AF_INET {
            write_ip6(sa, [0, 0, u32::to_be(0x0000_ffff), to.addr[0]]);
        } else {
            write_ip6(sa, to.addr);
        }
    } else {
        if to.family != AF_INET {
            return false;
        }
        sa.user_ip4 = to.addr[0];
    }
    sa.user_port = u32::from(u16::to_be(to.port));
    true
}

/// Sends a containment event (the counter counts it even if the ring is full).
#[inline(always)]
fn emit(kind: u32, counter_idx: u32, tagged_id: u64, tag: Tag, fill: impl FnOnce(&mut Event)) {
    bump(counter_idx);
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        bump(counter::EVENTS_LOST);
        return;
    };
    let p = entry.as_mut_ptr();
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: p points at a reserved, exclusively owned Event-sized slot;
    // zeroing it first leaves no field uninitialised.
    unsafe {
        core::ptr::write_bytes(p, 0, 1);
        let e = &mut *p;
        e.kind = kind;
        e.tgid = (pid_tgid >> 32) as u32;
        e.pid = pid_tgid as u32;
        let uid_gid = bpf_get_current_uid_gid();
        e.uid = uid_gid as u32;
        e.gid = (uid_gid >> 32) as u32;
        e.binding = tag.binding;
        e.cgroup_id = bpf_get_current_cgroup_id();
        e.tagged_cgroup_id = tagged_id;
        e.comm = bpf_get_current_comm().unwrap_or([0; 16]);
        fill(e);
    }
    entry.submit(0);
}

#[cgroup_sock_addr(sendmsg4)]
pub fn ag_sendmsg4(ctx: SockAddrContext) -> i32 {
    sendmsg(&ctx, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn ag_sendmsg6(ctx: SockAddrContext) -> i32 {
    sendmsg(&ctx, true)
}

/// An unconnected UDP send (connected sockets were decided at connect).
#[inline(always)]
fn sendmsg(ctx: &SockAddrContext, ipv6: bool) -> i32 {
    let Some((tagged_id, tag)) = tagged_cgroup() else {
        return ALLOW;
    };
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let port = u16::from_be(sa.user_port as u16);
    let dst = if ipv6 { v6_normalized(read_ip6(sa), port) } else { v4(sa.user_ip4, port) };
    datagram(sa, ipv6, dst, tagged_id, tag)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn ag_recvmsg4(ctx: SockAddrContext) -> i32 {
    recvmsg(&ctx, false)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn ag_recvmsg6(ctx: SockAddrContext) -> i32 {
    recvmsg(&ctx, true)
}

/// A reply from a forwarder shows the resolver it stands for as its source.
/// recvmsg programs must return 1.
#[inline(always)]
fn recvmsg(ctx: &SockAddrContext, ipv6: bool) -> i32 {
    if tagged_cgroup().is_none() {
        return ALLOW;
    }
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    let port = u16::from_be(sa.user_port as u16);
    let src = if ipv6 { v6_normalized(read_ip6(sa), port) } else { v4(sa.user_ip4, port) };
    // SAFETY: read-only lookup of a Copy value.
    if let Some(resolver) = unsafe { FORWARDERS.get(&src) } {
        let resolver = *resolver;
        let _ = rewrite(sa, ipv6, &resolver);
    }
    ALLOW
}

/// Inet sockets of a tagged task: TCP (proxied) and UDP (DNS only), nothing
/// else: no raw or packet-level sockets, ICMP, MPTCP, SCTP or UDP-Lite.
#[cgroup_sock(sock_create)]
pub fn ag_sock_create(ctx: SockContext) -> i32 {
    let Some((tagged_id, tag)) = tagged_cgroup() else {
        return ALLOW;
    };
    // SAFETY: the context pointer is valid for the program's run.
    let sk = unsafe { &*ctx.sock };
    let (family, ty, proto) = (sk.family, sk.type_, sk.protocol);
    let allowed = (ty == SOCK_STREAM && proto == IPPROTO_TCP) || (ty == SOCK_DGRAM && proto == IPPROTO_UDP);
    if allowed {
        return ALLOW;
    }
    emit(event::INET_SOCKET_REFUSED, counter::INET_SOCKET_REFUSED, tagged_id, tag, |e| {
        e.family = family;
        e.sock_type = ty;
        e.protocol = proto;
    });
    REJECT
}

/// Socket families a tagged task may create: Unix (paths checked at
/// connect), inet (checked by `ag_sock_create`) and route netlink (local
/// configuration reads). Packet, vsock, Bluetooth, CAN, XDP, other netlink
/// kinds and every family added later are refused.
#[lsm_cgroup(hook = "socket_create")]
pub fn ag_lsm_socket_create(ctx: LsmContext) -> i32 {
    let family: i32 = ctx.arg(0);
    let ty: i32 = ctx.arg(1);
    let protocol: i32 = ctx.arg(2);
    let kern: i32 = ctx.arg(3);
    if kern != 0 {
        return ALLOW;
    }
    let Some((tagged_id, tag)) = tagged_cgroup() else {
        return ALLOW;
    };
    let family = family as u16;
    let allowed = family == AF_UNIX
        || family == AF_INET
        || family == AF_INET6
        || (family == AF_NETLINK && protocol as u32 == NETLINK_ROUTE);
    if allowed {
        return ALLOW;
    }
    emit(event::FAMILY_REFUSED, counter::FAMILY_REFUSED, tagged_id, tag, |e| {
        e.family = u32::from(family);
        e.sock_type = ty as u32;
        e.protocol = protocol as u32;
    });
    REJECT
}

/// `connect()` of a Unix socket: only to allowed paths.
#[lsm_cgroup(hook = "socket_connect")]
pub fn ag_lsm_socket_connect(ctx: LsmContext) -> i32 {
    let addr: *const u8 = ctx.arg(1);
    let len: i32 = ctx.arg(2);
    unix_destination(addr, len)
}

/// `sendmsg()` with an address (an unconnected Unix datagram): only to
/// allowed paths. `msg_name` and `msg_namelen` open `struct msghdr` (offsets
/// 0 and 8 on 64-bit kernels since long before BPF LSM existed).
#[lsm_cgroup(hook = "socket_sendmsg")]
pub fn ag_lsm_socket_sendmsg(ctx: LsmContext) -> i32 {
    let msg: *const u8 = ctx.arg(1);
    if msg.is_null() {
        return ALLOW;
    }
    // SAFETY: reads of kernel memory through the helper, which fails safely.
    let Ok(name) = (unsafe { bpf_probe_read_kernel(msg.cast::<*const u8>()) }) else {
        return ALLOW;
    };
    if name.is_null() {
        return ALLOW;
    }
    // SAFETY: as above.
    let len = unsafe { bpf_probe_read_kernel(msg.add(8).cast::<i32>()) }.unwrap_or(0);
    unix_destination(name, len)
}

/// Decides a Unix-socket destination (a kernel copy of the caller's
/// `sockaddr`). Other families pass: the cgroup inet hooks decide those.
#[inline(always)]
fn unix_destination(addr: *const u8, len: i32) -> i32 {
    if addr.is_null() {
        return ALLOW;
    }
    // SAFETY: kernel read through the helper.
    let Ok(family) = (unsafe { bpf_probe_read_kernel(addr.cast::<u16>()) }) else {
        return ALLOW;
    };
    if family != AF_UNIX {
        return ALLOW;
    }
    let Some((tagged_id, tag)) = tagged_cgroup() else {
        return ALLOW;
    };
    let mut key = Key::new((UNIX_PATH_MAX * 8) as u32, UnixPath { bytes: [0; UNIX_PATH_MAX] });
    // The kernel copied the whole sockaddr_storage (128 bytes): reading the
    // full sun_path is in bounds; bytes past the caller's length are cleared.
    // SAFETY: kernel read through the helper into a buffer of that size.
    if unsafe { bpf_probe_read_kernel_buf(addr.add(2), &mut key.data.bytes) }.is_err() {
        return refuse_unix(tagged_id, tag, &key.data);
    }
    let n = (len - 2).clamp(0, UNIX_PATH_MAX as i32) as usize;
    let path = &mut key.data.bytes;
    let abstract_name = n > 0 && path[0] == 0;
    let mut ended = false;
    let mut i = 0;
    while i < UNIX_PATH_MAX {
        if i >= n || ended {
            path[i] = 0;
        } else if !abstract_name && path[i] == 0 {
            ended = true;
        }
        i += 1;
    }
    if !abstract_name && !clean_absolute(path) {
        return refuse_unix(tagged_id, tag, &key.data);
    }
    if UNIX_ALLOW.get(&key).is_some() {
        return ALLOW;
    }
    refuse_unix(tagged_id, tag, &key.data)
}

/// An absolute path without `.` or `..` components (which could climb out
/// of an allowed directory). Empty and relative paths are not clean.
#[inline(always)]
fn clean_absolute(p: &[u8; UNIX_PATH_MAX]) -> bool {
    if p[0] != b'/' {
        return false;
    }
    let mut i = 0;
    while i + 3 < UNIX_PATH_MAX {
        if p[i] == b'/' && p[i + 1] == b'.' {
            let c = p[i + 2];
            if c == b'/' || c == 0 {
                return false;
            }
            if c == b'.' && (p[i + 3] == b'/' || p[i + 3] == 0) {
                return false;
            }
        }
        i += 1;
    }
    true
}

#[inline(always)]
fn refuse_unix(tagged_id: u64, tag: Tag, path: &UnixPath) -> i32 {
    emit(event::UNIX_REFUSED, counter::UNIX_REFUSED, tagged_id, tag, |e| {
        e.family = u32::from(AF_UNIX);
        e.path = path.bytes;
    });
    REJECT
}

/// The tagged cgroup a packet's socket belongs to (itself or its nearest
/// tagged ancestor).
#[inline(always)]
fn tagged_socket(ctx: &SkBuffContext) -> Option<(u64, Tag)> {
    // SAFETY: the program's own skb.
    let own = unsafe { bpf_skb_cgroup_id(ctx.skb.skb) };
    // SAFETY: as above.
    nearest_tagged(own, |level| unsafe { bpf_skb_ancestor_cgroup_id(ctx.skb.skb, level) })
}

/// Packets to a tagged process's sockets come from loopback only (the proxy,
/// the DNS forwarder, local processes); anything from another host is
/// dropped and reported. Returns 1 to pass, 0 to drop.
#[cgroup_skb(ingress)]
pub fn ag_skb_ingress(ctx: SkBuffContext) -> i32 {
    let Some((tagged_id, tag)) = tagged_socket(&ctx) else {
        return 1;
    };
    // The skb starts at the IP header.
    let Ok(first) = ctx.load::<u8>(0) else { return 0 };
    let (src, loopback) = match first >> 4 {
        4 => {
            let Ok(a) = ctx.load::<u32>(12) else { return 0 };
            (v4(a, 0), a.to_ne_bytes()[0] == 127)
        }
        6 => {
            let mut a = [0u32; 4];
            let mut i = 0;
            while i < 4 {
                let Ok(w) = ctx.load::<u32>(8 + 4 * i) else { return 0 };
                a[i] = w;
                i += 1;
            }
            let src = v6_normalized(a, 0);
            let loopback = if src.family == AF_INET {
                src.addr[0].to_ne_bytes()[0] == 127
            } else {
                a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == u32::to_be(1)
            };
            (src, loopback)
        }
        _ => return 0,
    };
    if loopback {
        return 1;
    }
    bump(counter::INBOUND_REFUSED);
    // Not in any task's context here: the event names the socket's cgroup
    // and binding, no process.
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        bump(counter::EVENTS_LOST);
        return 0;
    };
    let p = entry.as_mut_ptr();
    // SAFETY: p points at a reserved, exclusively owned Event-sized slot;
    // zeroing it first leaves no field uninitialised.
    unsafe {
        core::ptr::write_bytes(p, 0, 1);
        let e = &mut *p;
        e.kind = event::INBOUND_REFUSED;
        e.binding = tag.binding;
        e.cgroup_id = bpf_skb_cgroup_id(ctx.skb.skb);
        e.tagged_cgroup_id = tagged_id;
        e.addr = src;
    }
    entry.submit(0);
    0
}

/// A tagged task forked (process or thread): the child is tagged too.
/// Runs in the parent's context.
#[tracepoint(category = "sched", name = "sched_process_fork")]
pub fn ag_tp_fork(ctx: TracePointContext) -> u32 {
    let Some((tagged_id, tag)) = tagged_cgroup() else {
        return 0;
    };
    let Some(cfg) = config() else { return 0 };
    // SAFETY: offset from the tracepoint's format file; read through the helper.
    let Ok(child) = (unsafe { ctx.read_at::<i32>(cfg.tp_fork_child_pid_offset as usize) }) else {
        return 0;
    };
    let t = TaggedTask { tagged_cgroup_id: tagged_id, binding: tag.binding, pad: 0 };
    let _ = TAGGED_TASKS.insert(&(child as u32), &t, 0);
    0
}

/// A task exits: forget it. Runs in the exiting task's context.
#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn ag_tp_exit(_ctx: TracePointContext) -> u32 {
    let tid = bpf_get_current_pid_tgid() as u32;
    let _ = TAGGED_TASKS.remove(&tid);
    0
}

/// A task moved to another cgroup (fires after the move, once per thread).
/// Into a tagged cgroup: it is tagged from now on. Out of a tagged one into
/// a cgroup that is not itself tagged: reported; userspace decides whether
/// a tagged ancestor still governs it.
#[tracepoint(category = "cgroup", name = "cgroup_attach_task")]
pub fn ag_tp_cgroup_attach(ctx: TracePointContext) -> u32 {
    let Some(cfg) = config() else { return 0 };
    // SAFETY: offsets from the tracepoint's format file; reads through the helper.
    let Ok(pid) = (unsafe { ctx.read_at::<i32>(cfg.tp_attach_pid_offset as usize) }) else {
        return 0;
    };
    // SAFETY: as above.
    let Ok(dst) = (unsafe { ctx.read_at::<u64>(cfg.tp_attach_dst_id_offset as usize) }) else {
        return 0;
    };
    let tid = pid as u32;
    // SAFETY: read-only lookup of a Copy value.
    if let Some(tag) = unsafe { TAGGED.get(&dst) } {
        let t = TaggedTask { tagged_cgroup_id: dst, binding: tag.binding, pad: 0 };
        let _ = TAGGED_TASKS.insert(&tid, &t, 0);
        return 0;
    }
    // SAFETY: read-only lookup of a Copy value.
    let Some(was) = (unsafe { TAGGED_TASKS.get(&tid) }).copied() else {
        return 0;
    };
    let tag = Tag { binding: was.binding, pad: 0 };
    emit(event::MIGRATED, counter::MIGRATIONS, was.tagged_cgroup_id, tag, |e| {
        e.target_pid = tid;
        e.target_cgroup_id = dst;
    });
    0
}

/// (local, remote) of a sock_ops socket, IPv4-mapped addresses normalised.
#[inline(always)]
fn sock_ops_pair(ctx: &SockOpsContext) -> SockPairKey {
    // remote_port: network order in the upper 16 bits; local_port: host order.
    let remote_port = u16::from_be((ctx.remote_port() >> 16) as u16);
    let local_port = ctx.local_port() as u16;
    if ctx.family() == u32::from(AF_INET6) {
        SockPairKey {
            local: v6_normalized(ctx.local_ip6(), local_port),
            remote: v6_normalized(ctx.remote_ip6(), remote_port),
        }
    } else {
        SockPairKey {
            local: v4(ctx.local_ip4(), local_port),
            remote: v4(ctx.remote_ip4(), remote_port),
        }
    }
}

#[sock_ops]
pub fn ag_sock_ops(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB
        && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB
        && op != BPF_SOCK_OPS_STATE_CB
    {
        return 0;
    }
    let ctx_ptr = ctx.as_ptr();
    // SAFETY: sock_ops contexts are valid arguments for the cookie helpers.
    let cookie = unsafe { bpf_get_socket_cookie(ctx_ptr) };
    match op {
        BPF_SOCK_OPS_TCP_CONNECT_CB => {
            // SAFETY: presence check only.
            if unsafe { BY_COOKIE.get(&cookie) }.is_some() {
                // Ask for state callbacks so the records go at TCP_CLOSE,
                // including for a connect that never completes.
                let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
            }
        }
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            // SAFETY: read-only lookup of a Copy value.
            let Some(prov) = (unsafe { BY_COOKIE.get(&cookie) }).copied() else {
                // No connect record: this socket was not redirected. If it
                // reached the proxy, a record left for its 4-tuple belongs to
                // a closed socket that used the tuple before (see AG_BY_PEER):
                // delete it before this handshake completes on the proxy's
                // side, so the proxy finds nothing and refuses.
                let pair = sock_ops_pair(&ctx);
                if config().is_some_and(|c| {
                    same_endpoint(&pair.remote, &c.proxy4) || same_endpoint(&pair.remote, &c.proxy6)
                }) {
                    // SAFETY: sock_ops context.
                    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx_ptr) };
                    let key = PeerKey { peer: pair.local, local: pair.remote, netns_cookie };
                    if BY_PEER.remove(&key).is_ok() {
                        bump(counter::STALE_PEER_REMOVED);
                    }
                }
                return 0;
            };
            let pair = sock_ops_pair(&ctx);
            // SAFETY: sock_ops context.
            let netns_cookie = unsafe { bpf_get_netns_cookie(ctx_ptr) };
            let key = PeerKey { peer: pair.local, local: pair.remote, netns_cookie };
            let _ = BY_PEER.insert(&key, &prov, 0);
            bump(counter::ESTABLISHED);
            // Without its mode entry the socket stays out of the SockHash:
            // ag_sk_msg would take it for a proxy socket and always redirect.
            if fast_path_on() && FAST_MODE.insert(&pair, &fast_mode::UNDECIDED, 0).is_ok() {
                let mut k = pair;
                // SAFETY: ctx.ops is the live bpf_sock_ops of this callback.
                if SOCKHASH.update(&mut k, unsafe { &mut *ctx.ops }, 0).is_ok() {
                    bump(counter::FAST_PATH_INSERTED);
                } else {
                    let _ = FAST_MODE.remove(&pair);
                }
            }
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            // The proxy's side of a redirected connection: its (local, remote)
            // is the agent's (remote, local).
            if !fast_path_on() {
                return 0;
            }
            let pair = sock_ops_pair(&ctx);
            // SAFETY: sock_ops context.
            let netns_cookie = unsafe { bpf_get_netns_cookie(ctx_ptr) };
            let key = PeerKey { peer: pair.remote, local: pair.local, netns_cookie };
            // SAFETY: presence check only.
            if unsafe { BY_PEER.get(&key) }.is_some() {
                let mut k = pair;
                // SAFETY: as above.
                if SOCKHASH.update(&mut k, unsafe { &mut *ctx.ops }, 0).is_ok() {
                    bump(counter::FAST_PATH_INSERTED);
                }
            }
        }
        BPF_SOCK_OPS_STATE_CB => {
            if ctx.arg(1) == BPF_TCP_CLOSE {
                // SAFETY: presence check only.
                if unsafe { BY_COOKIE.get(&cookie) }.is_some() {
                    // AG_BY_PEER stays until the proxy has read it.
                    let pair = sock_ops_pair(&ctx);
                    let _ = BY_COOKIE.remove(&cookie);
                    let _ = FAST_MODE.remove(&pair);
                    bump(counter::CLOSED);
                }
            }
        }
        _ => {}
    }
    0
}

#[inline(always)]
fn fast_path_on() -> bool {
    config().is_some_and(|c| c.fast_path == 1)
}

#[sk_msg]
pub fn ag_sk_msg(ctx: SkMsgContext) -> u32 {
    // SAFETY: the context pointer is valid for the program's run.
    let md = unsafe { &*ctx.msg };
    let remote_port = u16::from_be((md.remote_port >> 16) as u16);
    let local_port = md.local_port as u16;
    let (local, remote) = if md.family == u32::from(AF_INET6) {
        (v6_normalized(md.local_ip6, local_port), v6_normalized(md.remote_ip6, remote_port))
    } else {
        (v4(md.local_ip4, local_port), v4(md.remote_ip4, remote_port))
    };
    let own = SockPairKey { local, remote };
    // The peer socket's own key is our pair reversed.
    let mut peer = SockPairKey { local: remote, remote: local };
    // With a redirect set, SK_PASS means "redirect"; if the peer is not in the
    // map the helper sets none and SK_PASS sends the bytes the ordinary way.
    let Some(mode) = FAST_MODE.get_ptr_mut(&own) else {
        // A proxy socket: its agent socket entered the map before the
        // handshake completed, so its first write already finds it.
        let _ = SOCKHASH.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS));
        return sk_action::SK_PASS;
    };
    // An agent socket. Bytes it wrote the ordinary way may still be in the
    // TCP stack or unread in the proxy socket's receive queue; a redirected
    // write would be read before them. So the first write decides for good.
    // Writes to one socket are serialised by its lock: no race on `mode`.
    // SAFETY: a live value of this map, u32-aligned.
    match unsafe { *mode } {
        fast_mode::REDIRECT => {
            let _ = SOCKHASH.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS));
        }
        fast_mode::UNDECIDED => {
            let redirected = SOCKHASH.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS))
                == i64::from(sk_action::SK_PASS);
            let decided = if redirected {
                fast_mode::REDIRECT
            } else {
                bump(counter::FAST_PATH_DECLINED);
                fast_mode::ORDINARY
            };
            // SAFETY: as above.
            unsafe { *mode = decided };
        }
        _ => {}
    }
    sk_action::SK_PASS
}

#[stream_verdict]
pub fn ag_sk_skb_verdict(_ctx: SkBuffContext) -> u32 {
    sk_action::SK_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
