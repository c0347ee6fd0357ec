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

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use agentgate_common::{
    AF_INET, AF_INET6, Config as KernelConfig, PeerKey, Provenance, SockAddr, Tag, counter, names,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, SockHash},
    programs::{
        CgroupAttachMode, CgroupSockAddr, SkMsg, SkSkb, SockOps,
        links::{FdLink, LinkError, PinnedLink},
    },
};

use crate::config::FailMode;

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
    #[error("pinning links under {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

pub struct RedirectConfig<'a> {
    pub attach_cgroup: &'a Path,
    pub proxy4: SocketAddr,
    pub proxy6: SocketAddr,
    pub fast_path: bool,
    pub fail_mode: FailMode,
    pub bpffs_dir: &'a Path,
}

/// The loaded programs and the maps userspace reads and writes.
pub struct Redirector {
    tagged: HashMap<MapData, u64, Tag>,
    by_peer: HashMap<MapData, PeerKey, Provenance>,
    by_cookie: HashMap<MapData, u64, Provenance>,
    fast_mode: HashMap<MapData, agentgate_common::SockPairKey, u32>,
    counters: PerCpuArray<MapData, u64>,
    _sockhash: SockHash<MapData, agentgate_common::SockPairKey>,
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

        let mut kernel_cfg: Array<MapData, KernelConfig> = take_map(&mut ebpf, names::CONFIG)?;
        kernel_cfg
            .set(
                0,
                KernelConfig {
                    proxy4: sock_addr(cfg.proxy4),
                    proxy6: sock_addr(cfg.proxy6),
                    daemon_tgid: std::process::id(),
                    fast_path: u32::from(cfg.fast_path),
                    ready: 1,
                    pad: 0,
                },
                0,
            )
            .map_err(map_err(names::CONFIG))?;
        let sockhash: SockHash<MapData, agentgate_common::SockPairKey> =
            take_map(&mut ebpf, names::SOCKHASH)?;

        let cgroup = fs::File::open(cfg.attach_cgroup).map_err(|source| RedirectError::Cgroup {
            path: cfg.attach_cgroup.into(),
            source,
        })?;
        let mut fd_links: Vec<(&'static str, FdLink)> = Vec::new();
        // cgroup bpf_links are always multi-attach; the kernel rejects
        // BPF_F_ALLOW_MULTI on them, so the mode here is Single (flags 0).
        for name in [
            names::CONNECT4,
            names::CONNECT6,
            names::GETPEERNAME4,
            names::GETPEERNAME6,
        ] {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().map_err(prog_err(name))?;
            let id = prog
                .attach(&cgroup, CgroupAttachMode::Single)
                .map_err(prog_err(name))?;
            if cfg.fail_mode == FailMode::Closed {
                let link = prog.take_link(id).map_err(prog_err(name))?;
                let fd = FdLink::try_from(link)
                    .map_err(|source| RedirectError::Link { name, source })?;
                fd_links.push((name, fd));
            }
        }
        {
            let name = names::SOCK_OPS;
            let prog: &mut SockOps = program(&mut ebpf, name)?;
            prog.load().map_err(prog_err(name))?;
            let id = prog
                .attach(&cgroup, CgroupAttachMode::Single)
                .map_err(prog_err(name))?;
            if cfg.fail_mode == FailMode::Closed {
                let link = prog.take_link(id).map_err(prog_err(name))?;
                let fd = FdLink::try_from(link)
                    .map_err(|source| RedirectError::Link { name, source })?;
                fd_links.push((name, fd));
            }
        }
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

        let pinned = repin(cfg.bpffs_dir, fd_links)?;

        Ok(Self {
            tagged: take_map(&mut ebpf, names::TAGGED_CGROUPS)?,
            by_peer: take_map(&mut ebpf, names::BY_PEER)?,
            by_cookie: take_map(&mut ebpf, names::BY_COOKIE)?,
            fast_mode: take_map(&mut ebpf, names::FAST_MODE)?,
            counters: take_map(&mut ebpf, names::COUNTERS)?,
            _sockhash: sockhash,
            _ebpf: ebpf,
            _pinned: pinned,
        })
    }

    /// Tags a cgroup (and so its descendants): their TCP connects are redirected.
    pub fn tag(&mut self, cgroup_id: u64, binding: u32) -> Result<(), RedirectError> {
        self.tagged
            .insert(cgroup_id, Tag { binding, pad: 0 }, 0)
            .map_err(map_err(names::TAGGED_CGROUPS))
    }

    pub fn untag(&mut self, cgroup_id: u64) -> Result<(), RedirectError> {
        match self.tagged.remove(&cgroup_id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(names::TAGGED_CGROUPS)(e)),
        }
    }

    /// The record the connect hook made for the connection the proxy accepted.
    pub fn provenance(&self, key: &PeerKey) -> Option<Provenance> {
        self.by_peer.get(key, 0).ok()
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

    /// Kernel-side counters summed over CPUs: (redirected, refused-not-ready,
    /// established, closed, fast-path inserts, agent sockets the fast path
    /// declined because they wrote before their proxy socket was in the map).
    pub fn counters(&self) -> [u64; 6] {
        let mut out = [0u64; 6];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(values) = self.counters.get(&(i as u32), 0) {
                *slot = values.iter().sum();
            }
        }
        let _ = counter::LEN;
        out
    }
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
    fn ipv4_is_in_network_byte_order() {
        let a = sock_addr("127.0.0.1:1".parse().unwrap());
        assert_eq!(a.addr[0].to_ne_bytes(), [127, 0, 0, 1]);
    }
}
