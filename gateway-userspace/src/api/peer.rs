//! Who is on the other end of an HTTP connection, for one rule: the governed
//! side never votes. A loopback peer's socket is looked up with `sock_diag`
//! (`INET_DIAG_CGROUP_ID`, the cgroup the socket was created in, and its
//! inode) and refused when that cgroup is tagged or below a tagged one, or
//! when the socket is the daemon's own: the daemon never calls its own API,
//! so a peer socket the daemon holds is the proxy relaying a tagged
//! workload's connection. That is told apart exactly (the daemon's
//! descriptors), not by cgroup: an untagged shell that shares the daemon's
//! cgroup is served. Fails closed: a loopback peer whose socket cannot be
//! looked up, or whose owner cannot be checked, is refused. A peer whose
//! socket the kernel does not hold in this network namespace is on another
//! host: not governed here (the API is TLS-only there).

use std::net::SocketAddr;

use crate::{binding::Bindings, cgroup::Hierarchy};

/// How deep below a tagged cgroup the search for a peer's cgroup goes, and
/// how many cgroups it looks at in all (a bound on work per connection).
const MAX_DEPTH: usize = 8;
const MAX_CGROUPS: usize = 4096;

/// Why a peer is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Inside or below a tagged cgroup.
    Governed { cgroup: String, identity: String },
    /// The daemon's own socket: a tagged workload's connection relayed by the proxy.
    Relayed,
    /// A local peer whose cgroup could not be read.
    Unresolved(String),
}

impl Refusal {
    pub fn message(&self) -> String {
        match self {
            Self::Governed { cgroup, identity } => format!(
                "the approvals API refuses processes inside a tagged cgroup ({cgroup}, identity {identity})"
            ),
            Self::Relayed => "the approvals API refuses connections relayed by the agentgate proxy (they come from a tagged workload)".into(),
            Self::Unresolved(why) => format!(
                "the approvals API cannot tell which cgroup this local caller is in ({why}), and refuses it"
            ),
        }
    }
}

/// The verdict on a connection, decided once at accept.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The peer socket's cgroup id, when local and known.
    pub cgroup_id: Option<u64>,
    pub refused: Option<Refusal>,
}

/// Decides about the peer of a connection accepted at `local` from `remote`.
pub fn check(
    local: SocketAddr,
    remote: SocketAddr,
    own_cgroup: Option<u64>,
    hierarchy: &Hierarchy,
    bindings: &Bindings,
) -> Peer {
    let mut peer = Peer {
        addr: remote,
        cgroup_id: None,
        refused: None,
    };
    let loopback = remote.ip().is_loopback() || is_mapped_loopback(remote);
    // Every peer is looked up, not only loopback ones: a local process may
    // dial one of the host's other addresses (and the proxy relays from
    // whatever source address the destination needs). A socket the kernel
    // does not know in this namespace is a remote peer's.
    let diag = match crate::sys::tcp_socket_diag(remote, local) {
        Ok(Some(d)) => d,
        Ok(None) if !loopback => return peer,
        Ok(None) => {
            peer.refused = Some(Refusal::Unresolved("no such socket".into()));
            return peer;
        }
        Err(e) => {
            peer.refused = Some(Refusal::Unresolved(e.to_string()));
            return peer;
        }
    };
    let id = diag.cgroup;
    peer.cgroup_id = Some(id);
    // Only a socket made in the daemon's cgroup can be the daemon's; the
    // descriptor scan is skipped for everyone else.
    if own_cgroup == Some(id) {
        match crate::sys::holds_socket(diag.inode) {
            Ok(true) => {
                peer.refused = Some(Refusal::Relayed);
                return peer;
            }
            Ok(false) => {}
            Err(e) => {
                peer.refused = Some(Refusal::Unresolved(format!(
                    "cannot read the daemon's descriptors: {e}"
                )));
                return peer;
            }
        }
    }
    peer.refused = governing(id, hierarchy, bindings);
    peer
}

fn is_mapped_loopback(a: SocketAddr) -> bool {
    match a {
        SocketAddr::V6(v6) => v6.ip().to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
        SocketAddr::V4(_) => false,
    }
}

/// The binding governing cgroup `id`: a tagged cgroup with that id, or one
/// with a descendant of that id.
fn governing(id: u64, hierarchy: &Hierarchy, bindings: &Bindings) -> Option<Refusal> {
    for b in bindings.iter() {
        let found = if b.cgroup_id == id {
            Some(b.cgroup.clone())
        } else {
            crate::cgroup::walk(&b.cgroup, MAX_DEPTH, MAX_CGROUPS)
                .into_iter()
                .find(|p| crate::cgroup::id(p).is_ok_and(|i| i == id))
        };
        if let Some(path) = found {
            return Some(Refusal::Governed {
                cgroup: hierarchy.relative(&path),
                identity: b.identity.clone(),
            });
        }
    }
    None
}

/// The cgroup id of this process (the daemon), or `None` if unreadable.
pub fn own_cgroup(hierarchy: &Hierarchy) -> Option<u64> {
    hierarchy
        .of_process(std::process::id())
        .and_then(|p| crate::cgroup::id(&p).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel names this process's cgroup for a socket it made, and an
    /// untagged, non-daemon peer is allowed; a peer socket the daemon itself
    /// holds is refused (a relayed connection), another process's socket in
    /// the daemon's cgroup is not.
    #[test]
    fn sock_diag_finds_the_peer_sockets_cgroup() {
        let Ok(h) = Hierarchy::discover() else {
            panic!("cgroup v2 is required for this test");
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let local = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(local).unwrap();
        let (_server, remote) = listener.accept().unwrap();
        assert_eq!(remote, client.local_addr().unwrap());
        let mine = own_cgroup(&h).expect("own cgroup");
        let bindings = Bindings::default();
        let peer = check(local, remote, None, &h, &bindings);
        assert_eq!(peer.cgroup_id, Some(mine), "{peer:?}");
        assert!(peer.refused.is_none(), "{peer:?}");
        // This process holds the peer socket: in the daemon's place, that is
        // the proxy relaying.
        let peer = check(local, remote, Some(mine), &h, &bindings);
        assert_eq!(peer.refused, Some(Refusal::Relayed));
        // Another process in the same cgroup (a shell beside the daemon) is
        // served: the cgroup alone does not make a peer the proxy.
        let mut other = std::process::Command::new("python3")
            .args([
                "-c",
                "import socket,sys,time; s=socket.create_connection(('127.0.0.1',int(sys.argv[1]))); sys.stdin.read()",
                &local.port().to_string(),
            ])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("python3 (the test's other process)");
        let (_theirs, theirs) = listener.accept().unwrap();
        let peer = check(local, theirs, Some(mine), &h, &bindings);
        drop(other.stdin.take());
        let _ = other.wait();
        assert_eq!(peer.cgroup_id, Some(mine), "{peer:?}");
        assert!(peer.refused.is_none(), "{peer:?}");
        // A socket that does not exist is not guessed at: refused.
        let gone: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let peer = check(local, gone, None, &h, &bindings);
        assert!(
            matches!(peer.refused, Some(Refusal::Unresolved(_))),
            "{peer:?}"
        );
        // A remote peer is not looked up.
        let far: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        assert!(check(local, far, None, &h, &bindings).refused.is_none());
    }
}
