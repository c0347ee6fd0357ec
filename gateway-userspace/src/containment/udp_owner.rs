//! Who sent a datagram to the DNS forwarder.
//!
//! A datagram carries no peer credentials. The forwarder knows the sender's
//! loopback address and port; /proc/net/udp{,6} maps that to a socket inode,
//! and the processes of tagged cgroups are searched for a descriptor of that
//! inode. Bounded: at most `MAX_PIDS` processes are looked at per query.
//! Trade-off: a process that exits between its send and the lookup is not
//! found; its query is still recorded, without identity or workload.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
};

use agentgate_common::{Provenance, SockAddr};

use super::dns::{Attribute, Attribution};
use crate::proxy::Shared;

/// Processes searched per lookup, at most.
pub const MAX_PIDS: usize = 4096;

/// [`Attribute`] over the daemon's bindings.
pub struct TaggedUdpOwner(pub Arc<Shared>);

impl Attribute for TaggedUdpOwner {
    async fn attribute(&self, client: SocketAddr) -> Attribution {
        let shared = self.0.clone();
        let found = tokio::task::spawn_blocking(move || find(&shared, client))
            .await
            .ok()
            .flatten();
        let Some((pid, identity)) = found else {
            return Attribution {
                identity: None,
                workload: None,
            };
        };
        let identity = match identity {
            Some(name) => Some(self.0.identity_ref(&name).await),
            None => None,
        };
        Attribution {
            identity,
            workload: Some(workload_of(&self.0, pid)),
        }
    }
}

/// (pid, identity of the governing binding) of the tagged process that owns
/// the UDP socket bound to `client`.
fn find(shared: &Shared, client: SocketAddr) -> Option<(u32, Option<String>)> {
    let inode = ["/proc/net/udp", "/proc/net/udp6"]
        .iter()
        .find_map(|f| socket_inode(&fs::read_to_string(f).ok()?, client))?;
    let needle = format!("socket:[{inode}]");
    let cgroups: Vec<(std::path::PathBuf, String)> = shared
        .bindings
        .lock()
        .expect("bindings lock")
        .iter()
        .map(|b| (b.cgroup.clone(), b.identity.clone()))
        .collect();
    let mut seen = 0;
    for (root, identity) in cgroups {
        for cg in crate::cgroup::walk(&root, 8, 1024) {
            let Ok(procs) = fs::read_to_string(cg.join("cgroup.procs")) else {
                continue;
            };
            for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                seen += 1;
                if seen > MAX_PIDS {
                    return None;
                }
                let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
                    continue;
                };
                for fd in fds.filter_map(Result::ok) {
                    if fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == needle.as_str()) {
                        return Some((pid, Some(identity)));
                    }
                }
            }
        }
    }
    None
}

/// The inode of the socket bound to `local` in a /proc/net/udp{,6} table.
/// Addresses there are hex, each 32-bit word in host byte order; an IPv4
/// client may also appear as an IPv4-mapped address in the udp6 table.
pub fn socket_inode(table: &str, local: SocketAddr) -> Option<u64> {
    let v4 = match local.ip() {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(ip) => ip.to_ipv4_mapped(),
    };
    table.lines().skip(1).find_map(|line| {
        let mut cols = line.split_whitespace();
        let addr = cols.nth(1)?;
        let inode = cols.nth(7)?;
        let (ip_hex, port_hex) = addr.split_once(':')?;
        if u16::from_str_radix(port_hex, 16).ok()? != local.port() {
            return None;
        }
        let ip = parse_hex_ip(ip_hex)?;
        let same = match (ip, v4) {
            (IpAddr::V4(a), Some(b)) => a == b || a.is_unspecified(),
            (IpAddr::V6(a), Some(b)) => a.to_ipv4_mapped() == Some(b) || a.is_unspecified(),
            (IpAddr::V6(a), None) => Some(a) == v6(local) || a.is_unspecified(),
            (IpAddr::V4(_), None) => false,
        };
        same.then(|| inode.parse().ok()).flatten()
    })
}

fn v6(a: SocketAddr) -> Option<Ipv6Addr> {
    match a.ip() {
        IpAddr::V6(ip) => Some(ip),
        IpAddr::V4(_) => None,
    }
}

fn parse_hex_ip(hex: &str) -> Option<IpAddr> {
    let word = |s: &str| u32::from_str_radix(s, 16).ok().map(u32::to_ne_bytes);
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(hex)?))),
        32 => {
            let mut o = [0u8; 16];
            for i in 0..4 {
                o[4 * i..4 * i + 4].copy_from_slice(&word(&hex[8 * i..8 * i + 8])?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(o)))
        }
        _ => None,
    }
}

/// A workload from /proc alone (for a process found by its socket).
pub fn workload_of(shared: &Shared, pid: u32) -> crate::audit::Workload {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let id_field = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(u32::MAX)
    };
    let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let mut comm_bytes = [0u8; 16];
    let c = comm.trim_end().as_bytes();
    let n = c.len().min(15);
    comm_bytes[..n].copy_from_slice(&c[..n]);
    let cgroup_id = shared
        .hierarchy
        .of_process(pid)
        .and_then(|p| crate::cgroup::id(&p).ok())
        .unwrap_or(0);
    let prov = Provenance {
        orig_dst: SockAddr::default(),
        tgid: pid,
        pid,
        uid: id_field("Uid:"),
        gid: id_field("Gid:"),
        binding: 0,
        cgroup_id,
        tagged_cgroup_id: 0,
        netns_cookie: 0,
        socket_cookie: 0,
        comm: comm_bytes,
    };
    crate::provenance::Workload::from_kernel(&prov, &shared.hierarchy).to_audit()
}

#[cfg(test)]
mod tests {
    use super::*;

    const UDP: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
  1: 0100007F:A1B2 0100007F:0035 01 00000000:00000000 00:00000000 00000000     0        0 123456 2 0000000000000000 0\n\
  2: 00000000:0044 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 777 2 0000000000000000 0\n";

    const UDP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
  5: 0000000000000000FFFF00000100007F:C350 0000000000000000FFFF00000100007F:0035 01 00000000:00000000 00:00000000 00000000  1000        0 999 2 0000000000000000 0\n\
  6: 00000000000000000000000001000000:C351 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000  1000        0 4242 2 0000000000000000 0\n";

    #[test]
    fn finds_ipv4_sockets_by_address_and_port() {
        assert_eq!(
            socket_inode(UDP, "127.0.0.1:41394".parse().unwrap()),
            Some(123_456)
        );
        assert_eq!(
            socket_inode(UDP, "127.0.0.1:68".parse().unwrap()),
            Some(777),
            "bound to any"
        );
        assert_eq!(socket_inode(UDP, "127.0.0.1:9".parse().unwrap()), None);
    }

    #[test]
    fn finds_mapped_and_ipv6_sockets() {
        assert_eq!(
            socket_inode(UDP6, "127.0.0.1:50000".parse().unwrap()),
            Some(999)
        );
        assert_eq!(
            socket_inode(UDP6, "[::1]:50001".parse().unwrap()),
            Some(4242)
        );
    }
}
