//! The transparent proxy: accept, attribute, connect upstream, relay.
//!
//! Lifecycle of one connection, in order:
//! 1. accept on the loopback listener the connect hook sends tagged sockets to;
//! 2. look the peer 4-tuple up in the kernel's provenance map. No record means
//!    the socket was not redirected (any local process can dial the listener):
//!    it is closed at once. Fails closed;
//! 3. resolve the binding (cgroup -> identity); a binding that is gone (untagged,
//!    logged out) refuses the connection;
//! 4. enrich the workload from /proc;
//! 5. ask the policy about the destination: an unknown destination or a denied
//!    connection is closed (fails closed);
//! 6. hand the connection to the resource's protocol handler. Plain `tcp`
//!    resources are relayed: connect to the original destination from the
//!    daemon's own, untagged context (the connect hook skips the daemon's pid),
//!    bounded by a timeout, and copy both ways with half-close: EOF from one
//!    side becomes a write shutdown on the other, and the other direction keeps
//!    flowing. Protocols without a handler yet are refused, not relayed blind.
//!
//! Limits: `max_connections` live connections (more are refused), one relay
//! buffer per direction, a connect timeout.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use agentgate_common::PeerKey;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, watch},
};

pub use crate::connection::{LiveConnection, Verified};
use crate::{
    approval::Broker,
    audit::{AuditLog, IdentityRef, Kind, NewRecord},
    binding::Bindings,
    cgroup::Hierarchy,
    config::{LabelIdentity, ProxyConfig},
    connection::{Attributed, Services},
    policy::{PolicyStore, Protocol, Resource, Subject, Verdict},
    protocol::Handlers,
    provenance::Workload,
    redirect::{self, Redirector},
};

/// Everything the accept loops share.
pub struct Shared {
    pub redirector: Mutex<Redirector>,
    pub bindings: Mutex<Bindings>,
    pub hierarchy: Hierarchy,
    pub config: ProxyConfig,
    pub registry: Registry,
    pub limit: Arc<Semaphore>,
    /// The listeners' network namespace, as the kernel keys its records.
    pub netns_cookie: u64,
    pub policy: Arc<PolicyStore>,
    pub approvals: Broker,
    pub labels: Vec<LabelIdentity>,
    /// Verified OIDC identities, when `[identity]` is configured.
    pub identities: Option<Arc<Identities>>,
    /// Every connection and command is recorded here before it proceeds.
    pub audit: AuditLog,
    /// Key of the keyed hashes that correlate redacted statements.
    pub correlation_key: [u8; 32],
    /// The protocol handlers, by the resource's `protocol` (each owns its state).
    pub handlers: Handlers,
    /// Statement analyses by shape (class, tables, redacted text).
    pub sql_cache: Arc<crate::sql::AnalysisCache>,
    /// Equality probes on protected columns per identity, for every SQL
    /// handler ([`crate::mask::ProbeBudget`]).
    pub probes: Arc<crate::mask::ProbeBudget>,
    /// How many `control.refused` records a caller may cause (control socket
    /// and approvals API together).
    pub refusal_limit: crate::containment::refusals::RefusalLimit,
    /// The local CA that TLS-intercepting handlers present leaves from.
    pub ca: Arc<crate::tls::LocalCa>,
}

/// The `OpenID` provider client and the sessions the daemon holds.
pub struct Identities {
    pub client: crate::identity::OidcClient,
    pub store: tokio::sync::Mutex<crate::identity::IdentityStore>,
}

impl Shared {
    /// What a handler gets besides its connection.
    pub fn services(&self) -> Services {
        Services {
            policy: self.policy.clone(),
            approvals: self.approvals.clone(),
            audit: Arc::new(self.audit.clone()),
            correlation_key: self.correlation_key,
            sql_cache: self.sql_cache.clone(),
            probes: self.probes.clone(),
            upstream_connect_timeout: self.config.upstream_connect_timeout(),
            ca: self.ca.clone(),
            audit_dir: self.audit.dir().to_path_buf(),
        }
    }

    /// The policy subject for an identity name: its groups come from the
    /// verified identity (or the configured label).
    pub async fn subject(&self, identity: &str) -> Option<Subject> {
        if let Some(l) = self.labels.iter().find(|l| l.name == identity) {
            return Some(Subject {
                identity: l.name.clone(),
                groups: l.groups.clone(),
            });
        }
        let ids = self.identities.as_ref()?;
        let verified = ids.store.lock().await.get_verified(identity).ok()?;
        Some(Subject {
            identity: identity.to_owned(),
            groups: verified.groups,
        })
    }

    /// The cgroups bound to `identity`: their ids and their paths relative to
    /// the cgroup2 mount. An approver bound to a request's cgroup (or one
    /// above it) is the requester's own workload and may not vote.
    pub fn bound_cgroups(&self, identity: &str) -> (Vec<u64>, Vec<String>) {
        let bindings = self.bindings.lock().expect("bindings lock");
        bindings
            .iter()
            .filter(|b| b.identity == identity)
            .map(|b| (b.cgroup_id, self.hierarchy.relative(&b.cgroup)))
            .unzip()
    }

    /// The identity as audit records name it: label, human or service, with groups.
    pub async fn identity_ref(&self, identity: &str) -> IdentityRef {
        self.identity_of(identity).await.0
    }

    /// [`Shared::identity_ref`], and the issuer and `sub` of a verified identity.
    async fn identity_of(&self, identity: &str) -> (IdentityRef, Option<Verified>) {
        if let Some(l) = self.labels.iter().find(|l| l.name == identity) {
            let r = IdentityRef {
                subject: l.name.clone(),
                kind: "label".into(),
                groups: l.groups.clone(),
            };
            return (r, None);
        }
        if let Some(ids) = &self.identities
            && let Ok(v) = ids.store.lock().await.get_verified(identity)
        {
            let kind = match v.kind {
                crate::identity::IdentityKind::Human => "human",
                crate::identity::IdentityKind::Service => "service",
            };
            let r = IdentityRef {
                subject: format!("{} ({}#{})", identity, v.issuer, v.subject),
                kind: kind.into(),
                groups: v.groups,
            };
            let verified = Verified {
                issuer: v.issuer,
                subject: v.subject,
            };
            return (r, Some(verified));
        }
        let r = IdentityRef {
            subject: identity.to_owned(),
            kind: "unknown".into(),
            groups: Vec::new(),
        };
        (r, None)
    }
}

/// Live connections, for `agentgate status`.
#[derive(Default)]
pub struct Registry {
    next_id: AtomicU64,
    live: Mutex<BTreeMap<u64, Arc<LiveConnection>>>,
}

impl Registry {
    pub fn snapshot(&self) -> Vec<Arc<LiveConnection>> {
        self.live
            .lock()
            .expect("registry lock")
            .values()
            .cloned()
            .collect()
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn insert(&self, c: Arc<LiveConnection>) {
        self.live.lock().expect("registry lock").insert(c.id, c);
    }

    /// Ends every live connection of `identity`; returns how many.
    pub fn close_identity(&self, identity: &str) -> usize {
        let live = self.live.lock().expect("registry lock");
        let mut n = 0;
        for c in live.values().filter(|c| c.identity == identity) {
            c.close.notify_one();
            n += 1;
        }
        n
    }

    fn remove(&self, id: u64) {
        self.live.lock().expect("registry lock").remove(&id);
    }
}

/// Accepts until `shutdown` flips to true.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => return,
        };
        let (client, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(reason) = handle(client, peer, &shared).await {
                tracing::info!(%peer, reason, "connection refused");
            }
        });
    }
}

/// Phase 2: the kernel's record of this connection (taken from the map). No
/// record: not redirected, not ours to serve (an unattributed dial is only
/// logged: any local process can make one, and it names no identity).
fn provenance(
    client: &TcpStream,
    peer: SocketAddr,
    shared: &Shared,
) -> Result<agentgate_common::Provenance, &'static str> {
    let local = client.local_addr().map_err(|_| "no local address")?;
    let key = PeerKey {
        peer: redirect::sock_addr(peer),
        local: redirect::sock_addr(local),
        netns_cookie: shared.netns_cookie,
    };
    shared
        .redirector
        .lock()
        .expect("redirector lock")
        .take_provenance(&key)
        .ok_or("not redirected: no provenance record")
}

/// A tagged connection refused before it got a connection id (its binding
/// is gone, or the connection limit): recorded like a policy denial, with
/// the workload the kernel saw, then closed.
async fn refuse_attributed(
    workload: &Workload,
    identity: Option<IdentityRef>,
    destination: SocketAddr,
    rule: &str,
    reason: &'static str,
    shared: &Shared,
) -> &'static str {
    let mut rec = NewRecord::new(Kind::ConnectionOpen)
        .workload(workload.to_audit())
        .action(serde_json::json!({ "destination": destination.to_string() }))
        .decision(serde_json::json!({ "verdict": "deny", "rule": rule, "detail": reason }));
    if let Some(identity) = identity {
        rec = rec.identity(identity);
    }
    if let Err(e) = shared.audit.append(rec).await {
        tracing::error!(event = "log.failure", error = %e, "cannot record a refused connection");
    }
    reason
}

/// Phase 3 and the connection limit: the identity the connection's cgroup
/// is bound to, and a connection slot. A refusal here is recorded.
async fn admit(
    prov: &agentgate_common::Provenance,
    workload: &Workload,
    destination: SocketAddr,
    shared: &Shared,
) -> Result<(String, tokio::sync::OwnedSemaphorePermit), &'static str> {
    let binding = shared
        .bindings
        .lock()
        .expect("bindings lock")
        .get(prov.binding)
        .map(|b| b.identity.clone());
    let Some(identity) = binding else {
        let reason = "cgroup binding is gone";
        return Err(refuse_attributed(
            workload,
            None,
            destination,
            "agentgate:binding-gone",
            reason,
            shared,
        )
        .await);
    };
    let Ok(permit) = shared.limit.clone().try_acquire_owned() else {
        tracing::warn!(
            max = shared.config.max_connections,
            "connection limit reached"
        );
        let who = shared.identity_ref(&identity).await;
        let reason = "connection limit reached";
        return Err(refuse_attributed(
            workload,
            Some(who),
            destination,
            "agentgate:connection-limit",
            reason,
            shared,
        )
        .await);
    };
    Ok((identity, permit))
}

async fn handle(client: TcpStream, peer: SocketAddr, shared: &Shared) -> Result<(), &'static str> {
    let prov = provenance(&client, peer, shared)?;
    let workload = Workload::from_kernel(&prov, &shared.hierarchy);
    let destination = redirect::socket_addr(&prov.orig_dst);
    let (identity, permit) = admit(&prov, &workload, destination, shared).await?;
    let policy = shared.policy.current();
    // An identity whose session ended (expired, revoked, logged out) is denied
    // like any other denial: recorded, and answered in the protocol's own terms.
    let subject = shared.subject(&identity).await;
    let decision = match &subject {
        Some(subject) => policy.decide_connect(subject, destination),
        None => crate::policy::Decision {
            verdict: Verdict::Deny {
                reason: format!("{identity} has no valid session; log in again"),
            },
            rule: "identity:no-valid-session".into(),
        },
    };
    let resource = policy.resource_for(destination);
    let protocol = resource.map_or(Protocol::Tcp, |r| r.protocol);
    let (audit_identity, verified) = shared.identity_of(&identity).await;
    let conn = Arc::new(LiveConnection {
        id: shared.registry.next_id(),
        audit_identity,
        verified,
        identity,
        workload,
        destination,
        since: crate::time::now_rfc3339(),
        bytes_up: AtomicU64::new(0),
        bytes_down: AtomicU64::new(0),
        close: tokio::sync::Notify::new(),
        resource: resource.map(|r| r.name.clone()),
        started: Instant::now(),
    });
    let allowed = matches!(decision.verdict, Verdict::Allow);
    // Write-ahead: the connection is recorded before anything reaches the
    // destination; if it cannot be recorded it does not happen.
    let open = conn
        .record(Kind::ConnectionOpen)
        .action(serde_json::json!({ "destination": destination.to_string(), "protocol": format!("{protocol:?}").to_lowercase() }))
        .decision(serde_json::json!({ "verdict": if allowed { "allow" } else { "deny" }, "rule": decision.rule, "detail": format!("{:?}", decision.verdict) }));
    if let Err(e) = shared.audit.append(open).await {
        tracing::error!(event = "log.failure", conn = conn.id, error = %e, "cannot record the connection; refusing it");
        return Err("audit log unavailable");
    }
    if !allowed {
        if let Some(handler) = shared.handlers.get(protocol) {
            // A protocol-native refusal: the client sees which rule, not a reset.
            let reason = match &decision.verdict {
                Verdict::Deny { reason } => reason.clone(),
                _ => "the connection needs an approval, which a connection cannot wait for".into(),
            };
            handler.refuse(client, &decision.rule, &reason).await;
        }
        tracing::info!(
            event = "connection.denied",
            conn = conn.id,
            identity = %conn.identity,
            pid = conn.workload.pid,
            exe = conn.workload.exe.as_deref().unwrap_or("?"),
            %destination,
            rule = %decision.rule,
            verdict = ?decision.verdict,
        );
        return Err("denied by policy");
    }
    let Some(subject) = subject else {
        return Err("identity is no longer valid"); // never allowed, see above
    };
    tracing::info!(
        event = "connection.open",
        conn = conn.id,
        identity = %conn.identity,
        pid = conn.workload.pid,
        uid = conn.workload.uid,
        exe = conn.workload.exe.as_deref().unwrap_or("?"),
        cgroup = conn.workload.cgroup.as_deref().unwrap_or("?"),
        %destination,
    );
    shared.registry.insert(conn.clone());
    let result = dispatch(client, &conn, resource.cloned(), subject, shared).await;
    shared.registry.remove(conn.id);
    drop(permit);
    record_close(&conn, &result, shared).await;
    Ok(())
}

/// Phase 6: the resource's protocol handler, until it ends or the identity's
/// session does (dropping the handler closes both sockets).
async fn dispatch(
    client: TcpStream,
    conn: &Arc<LiveConnection>,
    resource: Option<Resource>,
    subject: Subject,
    shared: &Shared,
) -> std::io::Result<()> {
    let handler = async {
        let Some(resource) = resource else {
            return connect_and_relay(client, conn, &shared.config).await;
        };
        // Plain TCP, and HTTPS a pinned client speaks (`intercept = false`):
        // relayed unopened and recorded as a connection only.
        if resource.protocol == Protocol::Tcp
            || (resource.protocol == Protocol::Https && !resource.intercept)
        {
            return connect_and_relay(client, conn, &shared.config).await;
        }
        let Some(handler) = shared.handlers.get(resource.protocol) else {
            return Err(std::io::Error::other(format!(
                "no handler for {} resources yet",
                resource.protocol.as_str()
            )));
        };
        let attributed = Attributed {
            conn: conn.clone(),
            subject,
            resource,
        };
        handler
            .serve(client, attributed, shared.services())
            .await
            .map_err(std::io::Error::other)
    };
    tokio::select! {
        r = handler => r,
        () = conn.close.notified() => Err(std::io::Error::other("closed: the identity's session ended")),
    }
}

async fn record_close(conn: &LiveConnection, result: &std::io::Result<()>, shared: &Shared) {
    let (up, down) = (
        conn.bytes_up.load(Ordering::Relaxed),
        conn.bytes_down.load(Ordering::Relaxed),
    );
    let duration_ms = conn.started.elapsed().as_millis() as u64;
    let error = result.as_ref().err().map(ToString::to_string);
    tracing::info!(
        event = "connection.close",
        conn = conn.id,
        bytes_up = up,
        bytes_down = down,
        duration_ms,
        error
    );
    let close = conn
        .record(Kind::ConnectionClose)
        .result(serde_json::json!({
            "bytes_up": up, "bytes_down": down, "duration_ms": duration_ms, "error": error,
        }));
    if let Err(e) = shared.audit.append(close).await {
        tracing::error!(event = "log.failure", conn = conn.id, error = %e, "cannot record the connection's close");
    }
}

async fn connect_and_relay(
    client: TcpStream,
    conn: &LiveConnection,
    cfg: &ProxyConfig,
) -> std::io::Result<()> {
    let upstream = tokio::time::timeout(
        cfg.upstream_connect_timeout(),
        TcpStream::connect(conn.destination),
    )
    .await
    .map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::TimedOut, "upstream connect timed out")
    })??;
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    tokio::try_join!(
        pipe(cr, uw, &conn.bytes_up, cfg.buffer_bytes),
        pipe(ur, cw, &conn.bytes_down, cfg.buffer_bytes),
    )?;
    Ok(())
}

/// Copies until EOF, then shuts the writer down (half-close). Backpressure
/// comes from awaiting each write before the next read.
async fn pipe<R, W>(mut r: R, mut w: W, counter: &AtomicU64, buf_len: usize) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; buf_len];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            w.shutdown().await?;
            return Ok(());
        }
        w.write_all(&buf[..n]).await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pipe_half_closes_and_counts() {
        let (mut a, b) = tokio::io::duplex(64);
        let (c, mut d) = tokio::io::duplex(64);
        let counter = AtomicU64::new(0);
        let writer = async {
            a.write_all(&[7u8; 1000]).await.unwrap();
            a.shutdown().await.unwrap();
        };
        let reader = async {
            let mut got = Vec::new();
            d.read_to_end(&mut got).await.unwrap();
            got
        };
        let ((), res, got) = tokio::join!(writer, pipe(b, c, &counter, 4096), reader);
        res.unwrap();
        assert_eq!(got.len(), 1000);
        assert_eq!(counter.load(Ordering::Relaxed), 1000);
    }
}
