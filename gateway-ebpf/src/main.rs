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
//! Fails closed: a tagged task's non-TCP connect (other than DNS) is refused, and
//! a tagged task's connect is refused while the proxy configuration is missing.
#![no_std]
#![no_main]

use agentgate_common::{
    AF_INET, AF_INET6, Config, MAX_CGROUP_DEPTH, PeerKey, Provenance, SockAddr, SockPairKey, Tag,
    counter, fast_mode,
};
use aya_ebpf::{
    bindings::{
        BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE, sk_action,
    },
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
            bpf_get_socket_cookie,
        },
    },
    macros::{cgroup_sock_addr, map, sk_msg, sock_ops, stream_verdict},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, SockHash},
    programs::{SkBuffContext, SkMsgContext, SockAddrContext, SockOpsContext},
    EbpfContext as _,
};

const SOCK_STREAM: u32 = 1;
const DNS_PORT: u16 = 53;

/// Return values of cgroup/connect and getpeername programs.
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

/// Provenance by the 4-tuple the proxy sees; userspace reads it at accept.
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

/// The tagged cgroup this task belongs to (itself or its nearest tagged ancestor).
#[inline(always)]
fn tagged_cgroup() -> Option<(u64, Tag)> {
    // SAFETY: helpers without pointer arguments.
    let current = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: read-only lookup; Tag is Copy.
    if let Some(tag) = unsafe { TAGGED.get(&current) } {
        return Some((current, *tag));
    }
    let mut level: i32 = 0;
    while level < MAX_CGROUP_DEPTH as i32 {
        // SAFETY: as above.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 || id == current {
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
    if sa.type_ != SOCK_STREAM {
        // Only TCP is proxied. DNS stays reachable so names resolve; anything
        // else from a tagged task would leave unobserved, so it is refused.
        return if port == DNS_PORT { ALLOW } else { REJECT };
    }
    let dst = if ipv6 { v6_normalized(read_ip6(sa), port) } else { v4(sa.user_ip4, port) };
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
    // SAFETY: read-only lookup of a Copy value.
    let Some(prov) = (unsafe { BY_COOKIE.get(&cookie) }) else {
        return ALLOW;
    };
    let dst = prov.orig_dst;
    // SAFETY: the context pointer is valid for the program's run.
    let sa = unsafe { &mut *ctx.sock_addr };
    if ipv6 {
        let a = if dst.family == AF_INET { [0, 0, u32::to_be(0x0000_ffff), dst.addr[0]] } else { dst.addr };
        write_ip6(sa, a);
    } else {
        sa.user_ip4 = dst.addr[0];
    }
    sa.user_port = u32::from(u16::to_be(dst.port));
    ALLOW
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
                    let pair = sock_ops_pair(&ctx);
                    // SAFETY: sock_ops context.
                    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx_ptr) };
                    let key = PeerKey { peer: pair.local, local: pair.remote, netns_cookie };
                    let _ = BY_PEER.remove(&key);
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
