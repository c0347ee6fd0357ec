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
use serde::Serialize;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    sync::{Semaphore, watch},
};

use crate::{
    approval::Broker,
    audit::{AuditLog, IdentityRef, Kind, NewRecord},
    binding::Bindings,
    cgroup::Hierarchy,
    config::{LabelIdentity, ProxyConfig},
    policy::{PolicyStore, Protocol, Resource, Subject, Verdict},
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
    /// Cancel keys of the live Postgres sessions.
    pub pg_cancel_keys: crate::protocol::postgres::proxy::CancelKeys,
    /// The SSH handler (its keys and `known_hosts` block).
    pub ssh: Arc<crate::protocol::ssh::Ssh>,
    /// Statement analyses by shape (class, tables, redacted text).
    pub sql_cache: Arc<crate::sql::AnalysisCache>,
    /// How many `control.refused` records a caller may cause (control socket
    /// and approvals API together).
    pub refusal_limit: crate::containment::refusals::RefusalLimit,
}

/// The `OpenID` provider client and the sessions the daemon holds.
pub struct Identities {
    pub client: crate::identity::OidcClient,
    pub store: tokio::sync::Mutex<crate::identity::IdentityStore>,
}

impl Shared {
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

#[derive(Debug, Serialize)]
pub struct LiveConnection {
    pub id: u64,
    pub identity: String,
    pub workload: Workload,
    pub destination: SocketAddr,
    pub since: String,
    #[serde(serialize_with = "ser_atomic")]
    pub bytes_up: AtomicU64,
    #[serde(serialize_with = "ser_atomic")]
    pub bytes_down: AtomicU64,
    /// Signalled to end the connection (its identity expired or logged out).
    #[serde(skip)]
    pub close: tokio::sync::Notify,
    /// The policy resource the destination belongs to.
    pub resource: Option<String>,
    /// The identity as audit records name it.
    #[serde(skip)]
    pub audit_identity: IdentityRef,
    /// Issuer and `sub` of the identity, when the daemon verified it.
    #[serde(skip)]
    pub verified: Option<Verified>,
    #[serde(skip)]
    pub started: Instant,
}

/// Who a verified identity is at its issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub issuer: String,
    pub subject: String,
}

impl LiveConnection {
    /// Who asks when one of this connection's commands is held: its
    /// identity (issuer and `sub` when verified; a label is its own
    /// subject) and its kernel provenance.
    pub fn requester(&self) -> crate::approval::Requester {
        let w = &self.workload;
        crate::approval::Requester {
            identity: self.identity.clone(),
            identity_kind: self.audit_identity.kind.clone(),
            issuer: self.verified.as_ref().map(|v| v.issuer.clone()),
            subject: self
                .verified
                .as_ref()
                .map_or_else(|| self.identity.clone(), |v| v.subject.clone()),
            groups: self.audit_identity.groups.clone(),
            pid: w.pid,
            exe: w.exe.clone(),
            uid: w.uid,
            cgroup_id: w.cgroup_id,
            tagged_cgroup_id: w.tagged_cgroup_id,
            cgroup: w.cgroup.clone().unwrap_or_default(),
            conn: self.id,
        }
    }

    /// A record about this connection, with who, from where and to what filled in.
    pub fn record(&self, kind: Kind) -> NewRecord {
        let mut rec = NewRecord::new(kind)
            .connection(self.id)
            .session(format!("conn-{}", self.id))
            .identity(self.audit_identity.clone())
            .workload(self.workload.to_audit());
        if let Some(r) = &self.resource {
            rec = rec.resource(r.clone());
        }
        rec
    }
}

impl crate::gate::Origin for LiveConnection {
    fn record(&self, kind: Kind) -> NewRecord {
        LiveConnection::record(self, kind)
    }

    fn connection_id(&self) -> u64 {
        self.id
    }

    fn requester(&self) -> crate::approval::Requester {
        LiveConnection::requester(self)
    }
}

fn ser_atomic<S: serde::Serializer>(v: &AtomicU64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(v.load(Ordering::Relaxed))
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

/// Phase 2 and 3: the kernel's record of this connection and the identity
/// its cgroup is bound to. No record, or no binding: not ours to serve.
fn attribute(
    client: &TcpStream,
    peer: SocketAddr,
    shared: &Shared,
) -> Result<(agentgate_common::Provenance, String), &'static str> {
    let local = client.local_addr().map_err(|_| "no local address")?;
    let key = PeerKey {
        peer: redirect::sock_addr(peer),
        local: redirect::sock_addr(local),
        netns_cookie: shared.netns_cookie,
    };
    let prov = shared
        .redirector
        .lock()
        .expect("redirector lock")
        .provenance(&key)
        .ok_or("not redirected: no provenance record")?;
    let identity = shared
        .bindings
        .lock()
        .expect("bindings lock")
        .get(prov.binding)
        .map(|b| b.identity.clone())
        .ok_or("cgroup binding is gone")?;
    Ok((prov, identity))
}

async fn handle(client: TcpStream, peer: SocketAddr, shared: &Shared) -> Result<(), &'static str> {
    let (prov, identity) = attribute(&client, peer, shared)?;
    let Ok(permit) = shared.limit.clone().try_acquire_owned() else {
        tracing::warn!(
            max = shared.config.max_connections,
            "connection limit reached"
        );
        return Err("connection limit reached");
    };
    let workload = Workload::from_kernel(&prov, &shared.hierarchy);
    let destination = redirect::socket_addr(&prov.orig_dst);
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
        if protocol == Protocol::Postgres {
            // A protocol-native refusal: the client sees which rule, not a reset.
            let reason = match &decision.verdict {
                Verdict::Deny { reason } => reason.clone(),
                _ => "the connection needs an approval, which Postgres connections cannot wait for"
                    .into(),
            };
            let _ = crate::protocol::postgres::proxy::refuse(client, &decision.rule, &reason).await;
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
        match resource.protocol {
            Protocol::Tcp => connect_and_relay(client, conn, &shared.config).await,
            Protocol::Postgres => {
                let ctx = crate::protocol::postgres::proxy::PgContext {
                    conn: conn.clone(),
                    subject,
                    resource,
                    policy: shared.policy.clone(),
                    approvals: shared.approvals.clone(),
                    audit: Arc::new(shared.audit.clone()),
                    correlation_key: shared.correlation_key,
                    settings: crate::protocol::postgres::proxy::PgSettings::from_config(
                        &shared.config.postgres,
                        shared.config.upstream_connect_timeout(),
                    ),
                    cancel_keys: shared.pg_cancel_keys.clone(),
                    sql_cache: shared.sql_cache.clone(),
                };
                crate::protocol::postgres::proxy::serve(client, ctx)
                    .await
                    .map_err(std::io::Error::other)
            }
            Protocol::Ssh => {
                let services = crate::protocol::ssh::proxy::SshServices {
                    policy: shared.policy.clone(),
                    approvals: shared.approvals.clone(),
                    audit: Arc::new(shared.audit.clone()),
                    correlation_key: shared.correlation_key,
                    upstream_connect_timeout: shared.config.upstream_connect_timeout(),
                };
                shared
                    .ssh
                    .serve(
                        client,
                        conn.clone(),
                        subject,
                        resource,
                        services,
                        shared.audit.dir().to_path_buf(),
                    )
                    .await
                    .map_err(std::io::Error::other)
            }
            protocol @ (Protocol::Mysql | Protocol::Http) => Err(std::io::Error::other(format!(
                "no handler for {protocol:?} resources yet"
            ))),
        }
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

    #[test]
    fn the_requester_comes_from_the_connection_and_its_verified_identity() {
        let conn = |subject: &str, kind: &str, verified: Option<Verified>| LiveConnection {
            id: 9,
            identity: "bob".into(),
            workload: crate::provenance::Workload {
                pid: 77,
                tid: 77,
                uid: 1000,
                gid: 1000,
                comm: "psql".into(),
                exe: Some("/usr/bin/psql".into()),
                cmdline: None,
                ppid: None,
                cgroup: Some("/agentgate/exec-1".into()),
                cgroup_id: 5,
                tagged_cgroup_id: 5,
            },
            destination: "127.0.0.1:5432".parse().unwrap(),
            since: String::new(),
            bytes_up: std::sync::atomic::AtomicU64::new(0),
            bytes_down: std::sync::atomic::AtomicU64::new(0),
            close: tokio::sync::Notify::new(),
            resource: Some("db".into()),
            audit_identity: crate::audit::IdentityRef {
                subject: subject.into(),
                kind: kind.into(),
                groups: vec!["approvers".into()],
            },
            verified,
            started: std::time::Instant::now(),
        };
        let verified = Verified {
            issuer: "https://idp.test".into(),
            subject: "u-42".into(),
        };
        let r = conn("bob (https://idp.test#u-42)", "human", Some(verified)).requester();
        assert_eq!(
            (r.issuer.as_deref(), r.subject.as_str()),
            (Some("https://idp.test"), "u-42")
        );
        assert_eq!((r.pid, r.uid, r.conn, r.cgroup_id), (77, 1000, 9, 5));
        assert_eq!(r.cgroup, "/agentgate/exec-1");
        // A label has no issuer; its subject is its name.
        let r = conn("bob", "label", None).requester();
        assert_eq!((r.issuer, r.subject.as_str()), (None, "bob"));
    }

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
