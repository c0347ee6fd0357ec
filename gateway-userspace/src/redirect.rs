//! Loads and attaches the eBPF programs, and owns their maps.
//!
//! Fail mode (see DESIGN.md): with `FailMode::Closed` the cgroup links are
//! pinned in bpffs, so when the daemon dies the connect hooks stay attached and
//! keep sending tagged sockets to a proxy port nobody listens on: tagged
//! processes get "connection refused" and nothing leaks past. With
//! `FailMode::Open` the links die with the daemon. Untagged processes are never
//! affected: the hooks return early for them, attached or not.
//!
//! A restart attaches the new programs first, then removes the previous run's
//! pinned links, so a tagged cgroup is never without a hook in between.
//!
//! The containment hooks attach here too: datagram, socket-creation and
//! (where the kernel runs BPF LSM) socket-family and Unix-path hooks on the
//! same cgroup, pinned the same way; the migration probes (kprobe and
//! tracepoint, global) live with the daemon, since only it can act on what
//! they report. A host without BPF LSM runs without the family and
//! Unix-path hooks, and `status` says so.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use agentgate_common::{
    AF_INET, AF_INET6, Config as KernelConfig, PeerKey, Provenance, SockAddr, Tag, TaggedTask,
    UNIX_PATH_MAX, UnixPath, counter, names,
};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, MapData, PerCpuArray, RingBuf, SockHash,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, LsmCgroup,
        SkMsg, SkSkb, SockOps, TracePoint,
        links::{FdLink, LinkError, PinnedLink},
    },
};
use serde::Serialize;

use crate::config::FailMode;

/// Tasks of a cgroup being tagged that are tracked at once, at most (the
/// kernel map holds 65536 in all).
const TRACKED_TASKS_AT_TAG: usize = 16_384;

/// The eBPF object built by build.rs from gateway-ebpf.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/gateway-ebpf.o"));

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("loading the eBPF object")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("eBPF program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("eBPF map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("eBPF link of {name}")]
    Link {
        name: &'static str,
        #[source]
        source: LinkError,
    },
    #[error("eBPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("opening attach cgroup {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("tracepoint format: {0}")]
    TracepointFormat(String),
    #[error("pinning links under {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

pub struct RedirectConfig<'a> {
    pub attach_cgroup: &'a Path,
    /// Drop packets from other hosts to tagged processes' sockets.
    pub inbound_loopback_only: bool,
    pub proxy4: SocketAddr,
    pub proxy6: SocketAddr,
    pub fast_path: bool,
    pub fail_mode: FailMode,
    pub bpffs_dir: &'a Path,
}

/// A kernel hook and whether it is in force.
#[derive(Debug, Clone, Serialize)]
pub struct Hook {
    pub name: &'static str,
    /// What it enforces, for `status`.
    pub role: &'static str,
    pub attached: bool,
    /// Why it is not attached.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The loaded programs and the maps userspace reads and writes.
pub struct Redirector {
    tagged: HashMap<MapData, u64, Tag>,
    tagged_tasks: HashMap<MapData, u32, TaggedTask>,
    resolvers: HashMap<MapData, SockAddr, SockAddr>,
    forwarders: HashMap<MapData, SockAddr, SockAddr>,
    unix_allow: LpmTrie<MapData, UnixPath, u32>,
    events: Option<RingBuf<MapData>>,
    hooks: Vec<Hook>,
    by_peer: HashMap<MapData, PeerKey, Provenance>,
    by_cookie: HashMap<MapData, u64, Provenance>,
    fast_mode: HashMap<MapData, agentgate_common::SockPairKey, u32>,
    counters: PerCpuArray<MapData, u64>,
    _sockhash: SockHash<MapData, agentgate_common::SockPairKey>,
    _config: Array<MapData, KernelConfig>,
    /// Unpinned links (fail-open) detach when this is dropped; pinned ones do not.
    _ebpf: Ebpf,
    _pinned: Vec<PinnedLink>,
}

impl std::fmt::Debug for Redirector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redirector").finish_non_exhaustive()
    }
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> RedirectError {
    move |e| RedirectError::Map {
        name,
        source: Box::new(e),
    }
}

fn prog_err(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> RedirectError {
    move |e| RedirectError::Program {
        name,
        source: Box::new(e),
    }
}

impl Redirector {
    pub fn load(cfg: &RedirectConfig<'_>) -> Result<Self, RedirectError> {
        let mut ebpf = EbpfLoader::new()
            .load(OBJECT)
            .map_err(|e| RedirectError::Load(Box::new(e)))?;

        // Kept for the programs' life: dropping it closes the map they use.
        let config = write_kernel_config(&mut ebpf, cfg)?;
        let sockhash: SockHash<MapData, agentgate_common::SockPairKey> =
            take_map(&mut ebpf, names::SOCKHASH)?;

        let cgroup = fs::File::open(cfg.attach_cgroup).map_err(|source| RedirectError::Cgroup {
            path: cfg.attach_cgroup.into(),
            source,
        })?;
        let mut fd_links: Vec<(&'static str, FdLink)> = Vec::new();
        // Loads a cgroup program and attaches it; fail-closed keeps the link
        // for pinning. cgroup bpf_links are always multi-attach; the kernel
        // rejects BPF_F_ALLOW_MULTI on them, so the mode is Single (flags 0).
        macro_rules! attach_to_cgroup {
            ($ty:ty, $name:expr $(, $kind:expr)?) => {{
                let name = $name;
                let prog: &mut $ty = program(&mut ebpf, name)?;
                prog.load().map_err(prog_err(name))?;
                let id = prog
                    .attach(&cgroup, $($kind,)? CgroupAttachMode::Single)
                    .map_err(prog_err(name))?;
                if cfg.fail_mode == FailMode::Closed {
                    let link = prog.take_link(id).map_err(prog_err(name))?;
                    let fd = FdLink::try_from(link)
                        .map_err(|source| RedirectError::Link { name, source })?;
                    fd_links.push((name, fd));
                }
            }};
        }
        for name in [
            names::CONNECT4,
            names::CONNECT6,
            names::GETPEERNAME4,
            names::GETPEERNAME6,
            names::SENDMSG4,
            names::SENDMSG6,
            names::RECVMSG4,
            names::RECVMSG6,
        ] {
            attach_to_cgroup!(CgroupSockAddr, name);
        }
        attach_to_cgroup!(CgroupSock, names::SOCK_CREATE);
        if cfg.inbound_loopback_only {
            attach_to_cgroup!(CgroupSkb, names::SKB_INGRESS, CgroupSkbAttachType::Ingress);
        }
        attach_to_cgroup!(SockOps, names::SOCK_OPS);
        let mut hooks = vec![
            Hook::on(
                names::CONNECT4,
                "TCP redirect; datagrams only to the DNS forwarder",
            ),
            Hook::on(
                names::SENDMSG4,
                "unconnected datagrams only to the DNS forwarder",
            ),
            Hook::on(names::SOCK_CREATE, "inet sockets: TCP and UDP only"),
        ];
        if cfg.inbound_loopback_only {
            hooks.push(Hook::on(
                names::SKB_INGRESS,
                "inbound packets from loopback only",
            ));
        }
        hooks.extend(attach_lsm(
            &mut ebpf,
            &cgroup,
            cfg.fail_mode,
            &mut fd_links,
        )?);
        {
            let prog: &mut SkMsg = program(&mut ebpf, names::SK_MSG)?;
            prog.load().map_err(prog_err(names::SK_MSG))?;
            prog.attach(sockhash.fd())
                .map_err(prog_err(names::SK_MSG))?;
            let prog: &mut SkSkb = program(&mut ebpf, names::SK_SKB_VERDICT)?;
            prog.load().map_err(prog_err(names::SK_SKB_VERDICT))?;
            prog.attach(sockhash.fd())
                .map_err(prog_err(names::SK_SKB_VERDICT))?;
        }
        hooks.push(attach_task_tracking(&mut ebpf)?);

        let pinned = repin(cfg.bpffs_dir, fd_links)?;

        Ok(Self {
            resolvers: take_map(&mut ebpf, names::RESOLVERS)?,
            forwarders: take_map(&mut ebpf, names::FORWARDERS)?,
            unix_allow: take_map(&mut ebpf, names::UNIX_ALLOW)?,
            events: Some(take_map(&mut ebpf, names::EVENTS)?),
            hooks,
            tagged: take_map(&mut ebpf, names::TAGGED_CGROUPS)?,
            tagged_tasks: take_map(&mut ebpf, names::TAGGED_TASKS)?,
            by_peer: take_map(&mut ebpf, names::BY_PEER)?,
            by_cookie: take_map(&mut ebpf, names::BY_COOKIE)?,
            fast_mode: take_map(&mut ebpf, names::FAST_MODE)?,
            counters: take_map(&mut ebpf, names::COUNTERS)?,
            _sockhash: sockhash,
            _config: config,
            _ebpf: ebpf,
            _pinned: pinned,
        })
    }

    /// Tags a cgroup (and so its descendants): their TCP connects are
    /// redirected, and the tasks already inside are tracked so that one
    /// leaving is noticed (new ones are tracked by the kernel as they come).
    pub fn tag(&mut self, cgroup_id: u64, path: &Path, binding: u32) -> Result<(), RedirectError> {
        self.tagged
            .insert(cgroup_id, Tag { binding, pad: 0 }, 0)
            .map_err(map_err(names::TAGGED_CGROUPS))?;
        let task = TaggedTask {
            tagged_cgroup_id: cgroup_id,
            binding,
            pad: 0,
        };
        for tid in crate::cgroup::tasks_below(path, TRACKED_TASKS_AT_TAG) {
            // A full map only weakens escape detection for old tasks.
            let _ = self.tagged_tasks.insert(tid, task, 0);
        }
        Ok(())
    }

    pub fn untag(&mut self, cgroup_id: u64) -> Result<(), RedirectError> {
        match self.tagged.remove(&cgroup_id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(names::TAGGED_CGROUPS)(e)),
        }
    }

    /// Points datagrams of tagged processes to each resolver at its
    /// forwarder (and nowhere else): `(resolver, forwarder)` pairs.
    pub fn set_resolvers(
        &mut self,
        pairs: &[(SocketAddr, SocketAddr)],
    ) -> Result<(), RedirectError> {
        for (resolver, forwarder) in pairs {
            let (r, f) = (sock_addr(*resolver), sock_addr(*forwarder));
            self.resolvers
                .insert(r, f, 0)
                .map_err(map_err(names::RESOLVERS))?;
            self.forwarders
                .insert(f, r, 0)
                .map_err(map_err(names::FORWARDERS))?;
        }
        Ok(())
    }

    /// Makes the kernel's Unix allow list exactly `allowed`.
    pub fn set_unix_allow(
        &mut self,
        allowed: &[crate::policy::UnixAllow],
    ) -> Result<(), RedirectError> {
        let want: Vec<LpmKey<UnixPath>> = allowed.iter().map(unix_key).collect();
        let have: Vec<LpmKey<UnixPath>> = self.unix_allow.keys().filter_map(Result::ok).collect();
        for k in &have {
            if !want.iter().any(|w| same_key(w, k)) {
                self.unix_allow
                    .remove(k)
                    .map_err(map_err(names::UNIX_ALLOW))?;
            }
        }
        for k in &want {
            self.unix_allow
                .insert(k, 1, 0)
                .map_err(map_err(names::UNIX_ALLOW))?;
        }
        Ok(())
    }

    /// The containment event ring buffer (once: its reader owns it).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// The kernel hooks and whether each is in force.
    pub fn hooks(&self) -> &[Hook] {
        &self.hooks
    }

    /// The record the connect hook made for the connection the proxy
    /// accepted, taken out of the map: each record attributes one accept.
    /// (The kernel leaves it there when the socket closes, so a connection
    /// that closed before its accept is still attributed.)
    pub fn take_provenance(&mut self, key: &PeerKey) -> Option<Provenance> {
        let prov = self.by_peer.get(key, 0).ok()?;
        if let Err(e) = self.by_peer.remove(key) {
            // Left behind it is evicted (LRU) or deleted when its 4-tuple is
            // next used by a socket without a connect record.
            tracing::warn!(error = %e, "cannot delete a provenance record after reading it");
        }
        Some(prov)
    }

    /// Entries in the per-socket maps, for leak checks: (provenance by
    /// socket cookie, provenance by peer, fast-path modes).
    pub fn map_sizes(&self) -> (usize, usize, usize) {
        (
            self.by_cookie.keys().count(),
            self.by_peer.keys().count(),
            self.fast_mode.keys().count(),
        )
    }

    /// Kernel-side counters summed over CPUs, indexed by
    /// `agentgate_common::counter`.
    pub fn counters(&self) -> [u64; counter::LEN as usize] {
        let mut out = [0u64; counter::LEN as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(values) = self.counters.get(&(i as u32), 0) {
                *slot = values.iter().sum();
            }
        }
        out
    }
}

impl Hook {
    fn on(name: &'static str, role: &'static str) -> Self {
        Self {
            name,
            role,
            attached: true,
            error: None,
        }
    }
}

/// Writes the programs' one-entry configuration; from then on they act.
fn write_kernel_config(
    ebpf: &mut Ebpf,
    cfg: &RedirectConfig<'_>,
) -> Result<Array<MapData, KernelConfig>, RedirectError> {
    let offsets = TracepointOffsets::read()?;
    let mut kernel_cfg: Array<MapData, KernelConfig> = take_map(ebpf, names::CONFIG)?;
    kernel_cfg
        .set(
            0,
            KernelConfig {
                proxy4: sock_addr(cfg.proxy4),
                proxy6: sock_addr(cfg.proxy6),
                daemon_tgid: std::process::id(),
                fast_path: u32::from(cfg.fast_path),
                ready: 1,
                tp_attach_pid_offset: offsets.attach_pid,
                tp_attach_dst_id_offset: offsets.attach_dst_id,
                tp_fork_child_pid_offset: offsets.fork_child_pid,
            },
            0,
        )
        .map_err(map_err(names::CONFIG))?;
    Ok(kernel_cfg)
}

/// Task tracking for escape detection: global tracepoints, only useful
/// while the daemon runs (it acts on what they report).
fn attach_task_tracking(ebpf: &mut Ebpf) -> Result<Hook, RedirectError> {
    for (name, category, event) in [
        (names::TP_FORK, "sched", "sched_process_fork"),
        (names::TP_EXIT, "sched", "sched_process_exit"),
        (names::TP_ATTACH, "cgroup", "cgroup_attach_task"),
    ] {
        let prog: &mut TracePoint = program(ebpf, name)?;
        prog.load().map_err(prog_err(name))?;
        prog.attach(category, event).map_err(prog_err(name))?;
    }
    Ok(Hook::on(
        names::TP_ATTACH,
        "processes leaving a tagged cgroup",
    ))
}

/// The BPF LSM hooks, scoped to the attach cgroup. Not fatal where the
/// kernel lacks BPF LSM: the hooks are then reported as not attached.
fn attach_lsm(
    ebpf: &mut Ebpf,
    cgroup: &fs::File,
    fail_mode: FailMode,
    fd_links: &mut Vec<(&'static str, FdLink)>,
) -> Result<Vec<Hook>, RedirectError> {
    const LSM: [(&str, &str, &str); 3] = [
        (
            names::LSM_SOCKET_CREATE,
            "socket_create",
            "socket families: Unix, inet and route netlink only",
        ),
        (
            names::LSM_SOCKET_CONNECT,
            "socket_connect",
            "Unix-socket connects only to allowed paths",
        ),
        (
            names::LSM_SOCKET_SENDMSG,
            "socket_sendmsg",
            "Unix datagrams only to allowed paths",
        ),
    ];
    // Whether BPF LSM is on shows in /sys/kernel/security/lsm (securityfs
    // may not be mounted); the load itself is the test that counts.
    let lsm_note = match fs::read_to_string("/sys/kernel/security/lsm") {
        Ok(l) if !l.trim().split(',').any(|m| m == "bpf") => {
            " (BPF LSM is not in the kernel's lsm= list)"
        }
        _ => "",
    };
    let btf = Btf::from_sys_fs().map_err(|e| RedirectError::Program {
        name: names::LSM_SOCKET_CREATE,
        source: Box::new(aya::programs::ProgramError::Btf(e)),
    })?;
    let mut hooks = Vec::new();
    for (name, hook, role) in LSM {
        let prog: &mut LsmCgroup = program(ebpf, name)?;
        let attached = prog.load(hook, &btf).and_then(|()| prog.attach(cgroup));
        match attached {
            Ok(id) => {
                if fail_mode == FailMode::Closed {
                    let link = prog.take_link(id).map_err(prog_err(name))?;
                    fd_links.push((name, FdLink::from(link)));
                }
                hooks.push(Hook::on(name, role));
            }
            Err(e) => {
                // aya appends the verifier's log, empty for a refused program type.
                let error = e.to_string();
                let error = error.split(". Verifier output:").next().unwrap_or_default();
                let why = format!("the kernel refused the BPF LSM program{lsm_note}: {error}");
                tracing::debug!(hook = name, reason = %why, "containment hook not attached");
                hooks.push(Hook {
                    name,
                    role,
                    attached: false,
                    error: Some(why),
                });
            }
        }
    }
    // One line, not one per hook: a kernel without BPF LSM is a known host
    // kind with a documented fallback; `status` keeps each hook's reason.
    let missing: Vec<&str> = hooks
        .iter()
        .filter(|h| !h.attached)
        .map(|h| h.name)
        .collect();
    if !missing.is_empty() {
        tracing::warn!(
            hooks = %missing.join(","),
            "this kernel cannot load BPF LSM programs{lsm_note}: agents started by \
             `agentgate exec` get a seccomp filter for socket families and Unix sockets \
             instead (README, Containment: \"Hosts without BPF LSM\"); `agentgate status` \
             shows each hook"
        );
    }
    Ok(hooks)
}

/// Field offsets of the tracepoints the task tracking reads.
struct TracepointOffsets {
    attach_pid: u32,
    attach_dst_id: u32,
    fork_child_pid: u32,
}

impl TracepointOffsets {
    fn read() -> Result<Self, RedirectError> {
        let attach = tracepoint_format("cgroup/cgroup_attach_task")?;
        let fork = tracepoint_format("sched/sched_process_fork")?;
        let field = |format: &str, decl: &str, size: u32| {
            tracepoint_field(format, decl, size).ok_or_else(|| {
                RedirectError::TracepointFormat(format!("no `{decl}` field of {size} bytes"))
            })
        };
        Ok(Self {
            attach_pid: field(&attach, "int pid", 4)?,
            attach_dst_id: field(&attach, "u64 dst_id", 8)?,
            fork_child_pid: field(&fork, "pid_t child_pid", 4)?,
        })
    }
}

fn tracepoint_format(event: &str) -> Result<String, RedirectError> {
    let read = || {
        ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
            .iter()
            .find_map(|d| fs::read_to_string(format!("{d}/events/{event}/format")).ok())
    };
    if let Some(f) = read() {
        return Ok(f);
    }
    // tracefs is usually mounted; where it is not, mount it where aya looks.
    let _ = std::process::Command::new("mount")
        .args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"])
        .status();
    read().ok_or_else(|| {
            RedirectError::TracepointFormat(format!(
                "{event}: no format file under /sys/kernel/tracing or /sys/kernel/debug/tracing (is tracefs mounted?)"
            ))
        })
}

/// The offset of `field` (type and name as the format file writes them),
/// if its size is `size`.
fn tracepoint_field(format: &str, field: &str, size: u32) -> Option<u32> {
    format.lines().find_map(|l| {
        let mut parts = l.trim().split(';').map(str::trim);
        let decl = parts.next()?.strip_prefix("field:")?;
        if decl != field {
            return None;
        }
        let offset = parts.next()?.strip_prefix("offset:")?.parse().ok()?;
        let sz: u32 = parts.next()?.strip_prefix("size:")?.parse().ok()?;
        (sz == size).then_some(offset)
    })
}

fn unix_key(a: &crate::policy::UnixAllow) -> LpmKey<UnixPath> {
    let mut bytes = [0u8; UNIX_PATH_MAX];
    let n = a.prefix.len().min(UNIX_PATH_MAX);
    bytes[..n].copy_from_slice(&a.prefix[..n]);
    // An exact entry covers its terminating NUL (the kernel side zero-pads).
    let bits = if a.exact {
        (n + 1).min(UNIX_PATH_MAX)
    } else {
        n
    } * 8;
    LpmKey::new(bits as u32, UnixPath { bytes })
}

fn same_key(a: &LpmKey<UnixPath>, b: &LpmKey<UnixPath>) -> bool {
    a.prefix_len() == b.prefix_len() && a.data().bytes == b.data().bytes
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, RedirectError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(RedirectError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(map_err(name))
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, RedirectError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf.program_mut(name).ok_or(RedirectError::Missing {
        kind: "program",
        name,
    })?;
    prog.try_into().map_err(prog_err(name))
}

/// Pins this run's links (if any), then removes every pin of earlier runs.
fn repin(dir: &Path, links: Vec<(&'static str, FdLink)>) -> Result<Vec<PinnedLink>, RedirectError> {
    let pin_err = |source: Box<dyn std::error::Error + Send + Sync>| RedirectError::Pin {
        path: dir.into(),
        source,
    };
    let old: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(entries) => entries.filter_map(Result::ok).map(|e| e.path()).collect(),
        Err(_) => Vec::new(),
    };
    let mut pinned = Vec::new();
    if !links.is_empty() {
        fs::create_dir_all(dir).map_err(|e| pin_err(Box::new(e)))?;
        let run = format!("{}-{}", std::process::id(), now_nanos());
        for (name, link) in links {
            // bpffs refuses names with a dot.
            let path = dir.join(format!("{name}-{run}"));
            pinned.push(link.pin(&path).map_err(|e| pin_err(Box::new(e)))?);
        }
    }
    for path in old {
        // Dropping the unpinned link releases the last reference: it detaches.
        match PinnedLink::from_pin(&path) {
            Ok(link) => drop(link.unpin().map_err(|e| pin_err(Box::new(e)))?),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "stale entry in bpffs pin directory");
            }
        }
    }
    Ok(pinned)
}

/// Removes all pinned links under `dir`: tagged cgroups become unrestricted
/// (used by tests and by operators decommissioning a host).
pub fn unpin_all(dir: &Path) -> std::io::Result<usize> {
    let mut n = 0;
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.filter_map(Result::ok) {
            if let Ok(link) = PinnedLink::from_pin(e.path())
                && let Ok(fd) = link.unpin()
            {
                drop(fd);
                n += 1;
            }
        }
    }
    let _ = fs::remove_dir(dir);
    Ok(n)
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// A socket address in the kernel-shared layout (IPv4-mapped IPv6 normalised to IPv4).
pub fn sock_addr(addr: SocketAddr) -> SockAddr {
    match addr.ip() {
        IpAddr::V4(ip) => v4(ip, addr.port()),
        IpAddr::V6(ip) => {
            if let Some(v4ip) = ip.to_ipv4_mapped() {
                v4(v4ip, addr.port())
            } else {
                let o = ip.octets();
                let mut a = [0u32; 4];
                for (i, w) in a.iter_mut().enumerate() {
                    *w = u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]]);
                }
                SockAddr {
                    family: AF_INET6,
                    port: addr.port(),
                    addr: a,
                }
            }
        }
    }
}

fn v4(ip: Ipv4Addr, port: u16) -> SockAddr {
    SockAddr {
        family: AF_INET,
        port,
        addr: [u32::from_ne_bytes(ip.octets()), 0, 0, 0],
    }
}

/// The inverse of [`sock_addr`].
pub fn socket_addr(a: &SockAddr) -> SocketAddr {
    if a.family == AF_INET {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a.addr[0].to_ne_bytes())), a.port)
    } else {
        let mut o = [0u8; 16];
        for (i, w) in a.addr.iter().enumerate() {
            o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
        }
        SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), a.port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_through_the_kernel_layout() {
        for s in [
            "127.0.0.1:5432",
            "[::1]:443",
            "[2001:db8::7]:8080",
            "10.1.2.3:1",
        ] {
            let a: SocketAddr = s.parse().unwrap();
            assert_eq!(socket_addr(&sock_addr(a)), a);
        }
    }

    #[test]
    fn ipv4_mapped_becomes_ipv4() {
        let a: SocketAddr = "[::ffff:127.0.0.1]:7".parse().unwrap();
        assert_eq!(
            socket_addr(&sock_addr(a)),
            "127.0.0.1:7".parse::<SocketAddr>().unwrap()
        );
    }

    #[test]
    fn tracepoint_offsets_from_the_format_file() {
        let format = "name: cgroup_attach_task\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\tfield:u64 dst_id;\toffset:16;\tsize:8;\tsigned:0;\n\tfield:int pid;\toffset:24;\tsize:4;\tsigned:1;\n";
        assert_eq!(tracepoint_field(format, "int pid", 4), Some(24));
        assert_eq!(tracepoint_field(format, "u64 dst_id", 8), Some(16));
        assert_eq!(
            tracepoint_field(format, "u64 dst_id", 4),
            None,
            "size checked"
        );
        assert_eq!(tracepoint_field(format, "int dst_level", 4), None);
    }

    #[test]
    fn unix_keys_cover_exact_paths_with_their_nul() {
        let exact = crate::policy::unix_allow("/dev/log").unwrap();
        assert_eq!(unix_key(&exact).prefix_len(), 9 * 8);
        let dir = crate::policy::unix_allow("/run/app/*").unwrap();
        assert_eq!(unix_key(&dir).prefix_len(), 9 * 8);
        let abs = crate::policy::unix_allow("@agent").unwrap();
        assert_eq!(&unix_key(&abs).data().bytes[..6], b"\0agent");
    }

    #[test]
    fn ipv4_is_in_network_byte_order() {
        let a = sock_addr("127.0.0.1:1".parse().unwrap());
        assert_eq!(a.addr[0].to_ne_bytes(), [127, 0, 0, 1]);
    }
}
