//! The daemon: wires the kernel programs, the proxy and the control socket
//! together, and owns the lifecycle (start, tag/untag, exec cgroups, stop).
//!
//! Start-up order matters for fail-closed: listeners are bound before the
//! programs attach (so a redirected socket finds a listener), and persisted
//! bindings are re-tagged before the control socket accepts requests.

use std::{
    net::{SocketAddr, SocketAddrV6},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde_json::json;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, TcpSocket, UnixListener, UnixStream},
    sync::{Semaphore, watch},
};

use crate::{
    audit::{AuditLog, Kind, NewRecord},
    binding::{BindingKind, Bindings},
    cgroup::{self, Hierarchy},
    config::Config,
    config::PolicyConfig,
    control::{ErrorKind, MAX_REQUEST, Request, Response},
    policy::{PolicyStore, WatchEvent, WatchOptions},
    protocol::Handlers,
    proxy::{self, Registry, Shared},
    redirect::{RedirectConfig, Redirector},
};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("agentgate run must be started as root (it loads eBPF programs and manages cgroups)")]
    NotRoot,
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error(transparent)]
    Redirect(#[from] crate::redirect::RedirectError),
    #[error(transparent)]
    Binding(#[from] crate::binding::BindingError),
    #[error("audit log")]
    Audit(#[source] crate::audit::AuditError),
    #[error("[identity]: {0}")]
    Identity(String),
    #[error("approvals: {0}")]
    Approvals(String),
    #[error("{0}")]
    Containment(String),
    #[error("protocol handlers: {0}")]
    Handlers(String),
    #[error("{0}")]
    Api(String),
    #[error("policy is invalid; not starting:\n{errors}")]
    Policy { errors: crate::policy::PolicyErrors },
    #[error("binding proxy listener {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("local CA: {0}")]
    Ca(#[from] crate::tls::TlsError),
    #[error(transparent)]
    ProbeBudget(#[from] crate::mask::BudgetStoreError),
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Who is on the other end of a control connection, from its peer credentials.
struct Caller {
    pid: Option<u32>,
    uid: Option<u32>,
}

/// The `op` of a request line, for the audit record of a refused one: only
/// the name (never the arguments), and only if it looks like one.
fn request_op(line: &[u8]) -> String {
    let op = (line.len() <= MAX_REQUEST)
        .then(|| serde_json::from_slice::<serde_json::Value>(line).ok())
        .flatten()
        .and_then(|v| v.get("op").and_then(|o| o.as_str()).map(str::to_owned));
    match op {
        Some(op)
            if (1..=32).contains(&op.len())
                && op.bytes().all(|b| b.is_ascii_lowercase() || b == b'-') =>
        {
            op
        }
        Some(_) => "invalid".into(),
        None => "malformed".into(),
    }
}

/// Bounds of the walk that looks for cgroups the policy binds.
const POLICY_BINDING_MAX_DEPTH: usize = 8;
const POLICY_BINDING_MAX_CGROUPS: usize = 10_000;

struct Daemon {
    shared: Arc<Shared>,
    exec_root: PathBuf,
    bindings_path: PathBuf,
    exec_seq: AtomicU64,
    /// Pids of the `agentgate exec` processes whose control connection owns
    /// an exec cgroup: they wait there as root for their command, so the
    /// root-process scan of `status` leaves them out.
    exec_owners: Mutex<std::collections::HashSet<u32>>,
    containment: Containment,
    /// The HTTP API's and webhooks' counters (`status`, `/metrics`).
    api_metrics: Arc<crate::api::metrics::Metrics>,
}

/// The daemon's side of containment, for `status`.
struct Containment {
    /// (resolver, forwarder) pairs the kernel rewrites datagrams by.
    resolvers: Vec<(SocketAddr, SocketAddr)>,
    stats: Arc<crate::containment::events::ContainmentStats>,
    dns: Arc<DnsContext>,
}

type DnsContext =
    crate::containment::dns::DnsContext<crate::containment::udp_owner::TaggedUdpOwner>;

/// Runs until `shutdown` becomes true.
// The start-up sequence, one step per line in the order it must run;
// splitting it would hide that order.
#[allow(clippy::too_many_lines)]
pub async fn run(cfg: Config, mut shutdown: watch::Receiver<bool>) -> Result<(), DaemonError> {
    let (hierarchy, attach, exec_root) = prepare(&cfg)?;
    let state_dir = &cfg.daemon.state_dir;
    let p = &cfg.proxy;
    let (listener4, listener6, addr4, addr6) = listeners(p)?;
    let netns_cookie = netns_cookie(&listener4)?;

    let (mut redirector, events, forwarders) = load_kernel(&cfg, &attach, addr4, addr6).await?;
    let resolver_pairs: Vec<(SocketAddr, SocketAddr)> =
        forwarders.iter().map(|f| (f.resolver, f.local)).collect();

    let bindings_path = state_dir.join("bindings.json");
    let bindings = restore_bindings(&bindings_path, &mut redirector)?;
    let exec_bindings = exec_bindings(&bindings);

    let policy = load_policy(&cfg.policy, state_dir)?;
    policy.refresh_dns().await;
    redirector.set_unix_allow(policy.current().allow_unix())?;
    let hooks = redirector.hooks().to_vec();

    let identities = identities(cfg.identity.as_ref())?;
    let (audit, correlation_key) = open_audit(&cfg, &policy, &hooks, &resolver_pairs).await?;
    let approvals = open_approvals(&cfg, &audit).await?;
    let handlers = Handlers::from_sections(&cfg.proxy.handlers).map_err(DaemonError::Handlers)?;
    let shared = Arc::new(Shared {
        redirector: Mutex::new(redirector),
        bindings: Mutex::new(bindings),
        hierarchy,
        config: cfg.proxy.clone(),
        registry: Registry::default(),
        limit: Arc::new(Semaphore::new(cfg.proxy.max_connections)),
        netns_cookie,
        policy: policy.clone(),
        approvals,
        labels: cfg.daemon.label_identities.clone(),
        identities,
        audit: audit.clone(),
        correlation_key,
        handlers,
        sql_cache: Arc::default(),
        probes: Arc::new(crate::mask::ProbeBudget::open(
            &state_dir.join("probe-budget.redb"),
        )?),
        refusal_limit: crate::containment::refusals::RefusalLimit::default(),
        ca: Arc::new(crate::tls::LocalCa::load_or_create(state_dir)?),
    });
    let daemon = Arc::new(Daemon {
        shared: shared.clone(),
        exec_root,
        bindings_path,
        exec_seq: AtomicU64::new(0),
        exec_owners: Mutex::default(),
        containment: Containment {
            resolvers: resolver_pairs,
            stats: Arc::default(),
            dns: Arc::new(DnsContext::new(
                &cfg.containment,
                audit.clone(),
                crate::containment::udp_owner::TaggedUdpOwner(shared.clone()),
            )),
        },
        api_metrics: Arc::default(),
    });
    // Exec cgroups from a previous run go when their processes are gone.
    for (id, path) in exec_bindings {
        tokio::spawn(daemon.clone().release_exec(id, path));
    }

    let control = bind_control(&cfg.daemon.control_socket)?;
    tracing::info!(
        listen = %addr4,
        fast_path = p.fast_path,
        fail_mode = ?cfg.daemon.fail_mode,
        control = %cfg.daemon.control_socket.display(),
        "agentgate running"
    );

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(proxy::serve(listener4, shared.clone(), shutdown.clone()));
    if let Some(l6) = listener6 {
        tasks.spawn(proxy::serve(l6, shared.clone(), shutdown.clone()));
    }
    tasks.spawn(daemon.clone().serve_control(control, shutdown.clone()));
    spawn_http(&cfg, &shared, &daemon.api_metrics, &mut tasks, &shutdown)?;
    daemon.spawn_containment(
        &mut tasks,
        forwarders,
        events,
        cfg.containment.on_escape,
        &shutdown,
    );
    tasks.spawn(watch_policy(&shared, &cfg.policy, shutdown.clone()));
    daemon
        .clone()
        .spawn_background(&mut tasks, attach, &shutdown);
    let _ = shutdown.wait_for(|stop| *stop).await;
    tasks.shutdown().await;
    let _ = std::fs::remove_file(&cfg.daemon.control_socket);
    drop(shared);
    drop(daemon);
    close_audit(audit).await;
    tracing::info!("agentgate stopped");
    Ok(())
}

/// The HTTP API's listener (bound now: a busy port or a missing TLS key
/// refuses the start), its TLS acceptor and its state.
fn prepare_api(
    cfg: &Config,
    shared: &Arc<Shared>,
    metrics: &Arc<crate::api::metrics::Metrics>,
) -> Result<Option<crate::api::server::Bound>, DaemonError> {
    let api = &cfg.api;
    if !api.enabled {
        return Ok(None);
    }
    let tls = match (&api.tls_cert, &api.tls_key) {
        (Some(cert), Some(key)) => Some(
            crate::api::server::tls_acceptor(cert, key)
                .map_err(|e| DaemonError::Api(e.to_string()))?,
        ),
        _ if api.needs_tls() => {
            return Err(DaemonError::Api(format!(
                "[api] listen = {} is not loopback: tls_cert and tls_key are required",
                api.listen
            )));
        }
        _ => None,
    };
    let web = match (&api.web, &cfg.identity) {
        (Some(w), Some(i)) => {
            Some(crate::api::web::Web::new(api, w, i.http_timeout()).map_err(DaemonError::Api)?)
        }
        (Some(_), None) => {
            return Err(DaemonError::Api("[api.web] needs [identity]".into()));
        }
        _ => None,
    };
    let listener = crate::api::server::bind(api.listen).map_err(|e| {
        DaemonError::Api(format!(
            "{e}: {}",
            std::error::Error::source(&e)
                .map(ToString::to_string)
                .unwrap_or_default()
        ))
    })?;
    tracing::info!(listen = %api.listen, tls = tls.is_some(), web = web.is_some(), "HTTP API listening");
    let state = Arc::new(crate::api::ApiState {
        shared: shared.clone(),
        config: api.clone(),
        metrics: metrics.clone(),
        own_cgroup: crate::api::peer::own_cgroup(&shared.hierarchy),
        web,
    });
    Ok(Some(crate::api::server::Bound {
        listener,
        tls,
        state,
    }))
}

/// The HTTP server (bound here: a busy port or a bad TLS key refuses the
/// start), and webhook delivery: the broker's events, as
/// JSON, to each hook's queue.
fn spawn_http(
    cfg: &Config,
    shared: &Arc<Shared>,
    metrics: &Arc<crate::api::metrics::Metrics>,
    tasks: &mut tokio::task::JoinSet<()>,
    shutdown: &watch::Receiver<bool>,
) -> Result<(), DaemonError> {
    if let Some(bound) = prepare_api(cfg, shared, metrics)? {
        tasks.spawn(crate::api::server::serve(bound, shutdown.clone()));
    }
    let hooks = &cfg.approvals.webhook;
    if hooks.is_empty() {
        return Ok(());
    }
    let (tx, _) = tokio::sync::broadcast::channel::<serde_json::Value>(1024);
    crate::approval::webhook::spawn(hooks, &tx, &metrics.webhooks, tasks, shutdown)
        .map_err(|e| DaemonError::Api(e.to_string()))?;
    let mut events = shared.approvals.subscribe();
    // Masking alerts (an identity past its equality probe budget) go to
    // the same hooks, through the same queues.
    let mut alerts = shared.probes.subscribe();
    let mut stop = shutdown.clone();
    let dropped = metrics.webhooks.clone();
    tasks.spawn(async move {
        loop {
            let event = tokio::select! {
                e = events.recv() => e.map(|e| serde_json::to_value(&e).ok()),
                a = alerts.recv() => a.map(Some),
                _ = stop.wait_for(|s| *s) => return,
            };
            match event {
                Ok(e) => {
                    if let Some(v) = e {
                        let _ = tx.send(v);
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    dropped.dropped.fetch_add(n, Ordering::Relaxed);
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    Ok(())
}

/// The eBPF programs, their containment event ring, and the DNS forwarders
/// the kernel sends datagrams to.
async fn load_kernel(
    cfg: &Config,
    attach: &Path,
    addr4: SocketAddr,
    addr6: SocketAddr,
) -> Result<
    (
        Redirector,
        Option<aya::maps::RingBuf<aya::maps::MapData>>,
        Vec<crate::containment::dns::Forwarder>,
    ),
    DaemonError,
> {
    let mut redirector = Redirector::load(&RedirectConfig {
        attach_cgroup: attach,
        inbound_loopback_only: cfg.containment.inbound == crate::config::Inbound::Loopback,
        proxy4: addr4,
        proxy6: addr6,
        fast_path: cfg.proxy.fast_path,
        fail_mode: cfg.daemon.fail_mode,
        bpffs_dir: &cfg.daemon.bpffs_dir,
    })?;

    let events = redirector.take_events();
    let forwarders = crate::containment::dns::Forwarder::bind_all(&cfg.containment)
        .await
        .map_err(|e| DaemonError::Containment(format!("[containment] {e}")))?;
    let pairs: Vec<(SocketAddr, SocketAddr)> =
        forwarders.iter().map(|f| (f.resolver, f.local)).collect();
    redirector.set_resolvers(&pairs)?;
    Ok((redirector, events, forwarders))
}

/// The network namespace the kernel keys the proxy's records by.
fn netns_cookie(listener: &TcpListener) -> Result<u64, DaemonError> {
    crate::sys::netns_cookie(listener).map_err(|source| DaemonError::Io {
        what: "reading netns cookie of",
        path: "proxy listener".into(),
        source,
    })
}

/// Checks for root, finds the cgroups and makes the state directory.
fn prepare(cfg: &Config) -> Result<(Hierarchy, PathBuf, PathBuf), DaemonError> {
    if crate::sys::geteuid() != 0 {
        return Err(DaemonError::NotRoot);
    }
    let hierarchy = Hierarchy::discover()?;
    let attach = hierarchy.resolve(&cfg.daemon.attach_cgroup)?;
    let exec_root = exec_root(&hierarchy, &cfg.daemon.exec_cgroup)?;
    let state_dir = &cfg.daemon.state_dir;
    std::fs::create_dir_all(state_dir).map_err(|source| DaemonError::Io {
        what: "creating",
        path: state_dir.clone(),
        source,
    })?;

    Ok((hierarchy, attach, exec_root))
}

/// The approval broker over `<state_dir>/approvals.redb`. A store that
/// cannot be opened, or a request pending at the last stop whose
/// cancellation cannot be recorded, refuses the start (fails closed).
async fn open_approvals(
    cfg: &Config,
    audit: &AuditLog,
) -> Result<crate::approval::Broker, DaemonError> {
    let settings = crate::approval::Settings::from_config(&cfg.approvals)
        .map_err(|e| DaemonError::Approvals(format!("[approvals] {e}")))?;
    let path = cfg.daemon.state_dir.join("approvals.redb");
    crate::approval::Broker::open(Arc::new(audit.clone()), settings, &path)
        .await
        .map_err(|e| DaemonError::Approvals(e.to_string()))
}

/// Records the stop, then flushes and writes the final checkpoint.
async fn close_audit(audit: AuditLog) {
    let stop = NewRecord::new(Kind::DaemonStop).workload(crate::audit::Workload::current_process());
    if let Err(e) = audit.append(stop).await {
        tracing::error!(event = "log.failure", error = %e, "cannot record daemon.stop");
    }
    if let Err(e) = audit.close().await {
        tracing::error!(error = %e, "closing the audit log");
    }
}

/// The audit log's health for `agentgate status`: counters since the daemon
/// started (write failures mean records were refused and what they covered
/// denied).
fn audit_status(audit: &AuditLog) -> serde_json::Value {
    json!({
        "dir": audit.dir(),
        "durability": audit.durability(),
        "stats": audit.stats(),
    })
}

/// An identity event as an audit record. Logout and revocation end the
/// identity's session, so they are recorded as `identity.expiry` with the cause.
fn identity_record(event: &crate::identity::IdentityEvent) -> NewRecord {
    use crate::identity::IdentityEvent as E;
    let kind = match event {
        E::Login { .. } => Kind::IdentityLogin,
        E::Refresh { .. } => Kind::IdentityRefresh,
        E::Failure { .. } => Kind::IdentityFailure,
        E::Bind { .. } => Kind::IdentityBind,
        E::Unbind { .. } => Kind::IdentityUnbind,
        _ => Kind::IdentityExpiry,
    };
    let mut rec = NewRecord::new(kind)
        .workload(crate::audit::Workload::current_process())
        .action(json!(event));
    if let Some(name) = event.name() {
        rec = rec.identity(crate::audit::IdentityRef {
            subject: name.to_owned(),
            kind: "oidc".into(),
            groups: Vec::new(),
        });
    }
    rec
}

async fn audit_identity_event(audit: &AuditLog, event: &crate::identity::IdentityEvent) {
    if let Err(e) = audit.append(identity_record(event)).await {
        tracing::error!(event = "log.failure", error = %e, "cannot record an identity event");
    }
}

/// The policy in force at start, with the masking key (made on first start),
/// archived by digest under `<state_dir>/policies`. An invalid policy, or
/// one that cannot be archived, refuses the start.
fn load_policy(cfg: &PolicyConfig, state_dir: &Path) -> Result<Arc<PolicyStore>, DaemonError> {
    let mask_key_path = state_dir.join("mask.key");
    let mask_key =
        crate::keyfile::load_or_create(&mask_key_path).map_err(|source| DaemonError::Io {
            what: "loading masking key",
            path: mask_key_path,
            source,
        })?;
    let (store, archived) = PolicyStore::open_archived(
        &cfg.dir,
        Some(Arc::new(crate::mask::MaskKey::new(mask_key))),
        crate::policy::PolicyArchive::in_state_dir(state_dir),
    )
    .map_err(|errors| DaemonError::Policy { errors })?;
    tracing::info!(digest = %store.current().digest(), archive = %archived.display(), "policy in force");
    Ok(Arc::new(store))
}

fn identities(
    cfg: Option<&crate::identity::IdentityConfig>,
) -> Result<Option<Arc<proxy::Identities>>, DaemonError> {
    let Some(icfg) = cfg else { return Ok(None) };
    let client = crate::identity::OidcClient::new(icfg.clone())
        .map_err(|e| DaemonError::Identity(e.to_string()))?;
    let store = crate::identity::IdentityStore::for_config(icfg);
    Ok(Some(Arc::new(proxy::Identities {
        client,
        store: tokio::sync::Mutex::new(store),
    })))
}

/// The bindings `exec` made: id and cgroup.
fn exec_bindings(bindings: &Bindings) -> Vec<(u32, PathBuf)> {
    bindings
        .iter()
        .filter(|b| b.kind == BindingKind::Exec)
        .map(|b| (b.id, b.cgroup.clone()))
        .collect()
}

/// Loads persisted bindings and re-tags the cgroups that still exist (same
/// path, same id); bindings of cgroups that are gone are dropped.
fn restore_bindings(path: &Path, redirector: &mut Redirector) -> Result<Bindings, DaemonError> {
    let mut bindings = Bindings::load(path)?;
    let mut stale = Vec::new();
    for b in bindings.iter() {
        match cgroup::id(&b.cgroup) {
            Ok(id) if id == b.cgroup_id => redirector.tag(id, &b.cgroup, b.id)?,
            _ => stale.push(b.id),
        }
    }
    for id in stale {
        if let Some(b) = bindings.remove(id) {
            tracing::info!(cgroup = %b.cgroup.display(), identity = %b.identity, "dropping binding of a cgroup that no longer exists");
        }
    }
    bindings.save(path)?;
    Ok(bindings)
}

/// The cgroup `agentgate exec` creates its cgroups in (made if missing).
fn exec_root(hierarchy: &Hierarchy, configured: &Path) -> Result<PathBuf, DaemonError> {
    let path = hierarchy
        .mount()
        .join(configured.strip_prefix("/").unwrap_or(configured));
    cgroup::create(&path)?;
    Ok(hierarchy.resolve(&path)?)
}

/// Opens (and verifies) the audit log and records the start: no log, no start.
async fn open_audit(
    cfg: &Config,
    policy: &PolicyStore,
    hooks: &[crate::redirect::Hook],
    resolvers: &[(SocketAddr, SocketAddr)],
) -> Result<(AuditLog, [u8; 32]), DaemonError> {
    let audit = AuditLog::open(cfg.audit.clone())
        .await
        .map_err(DaemonError::Audit)?;
    let correlation_key = crate::audit::load_or_create_correlation_key(&cfg.daemon.state_dir)
        .map_err(DaemonError::Audit)?;
    let start = NewRecord::new(Kind::DaemonStart)
        .workload(crate::audit::Workload::current_process())
        .action(json!({
            "version": env!("CARGO_PKG_VERSION"),
            "fail_mode": format!("{:?}", cfg.daemon.fail_mode).to_lowercase(),
            "fast_path": cfg.proxy.fast_path,
            "policy_digest": policy.current().digest(),
            "containment": {
                "hooks": hooks,
                "dns_resolvers": resolvers.iter().map(|(r, _)| r.to_string()).collect::<Vec<_>>(),
                "allow_unix": policy.current().allow_unix().iter().map(|a| a.pattern.clone()).collect::<Vec<_>>(),
            },
        }));
    audit.append(start).await.map_err(DaemonError::Audit)?;
    Ok((audit, correlation_key))
}

/// Reloads the policy on SIGHUP and when its files change. A rejected policy
/// leaves the previous one in force; both outcomes are logged and audited.
fn watch_policy(
    shared: &Shared,
    cfg: &PolicyConfig,
    mut shutdown: watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let (store, audit) = (shared.policy.clone(), shared.audit.clone());
    let approvals = shared.approvals.clone();
    let opts = WatchOptions {
        poll: Duration::from_secs(cfg.watch_interval_secs),
        dns_refresh: Duration::from_secs(cfg.dns_refresh_secs),
    };
    async move {
        let file_audit = audit.clone();
        let (file_store, file_approvals) = (store.clone(), approvals.clone());
        let on_event = move |event: WatchEvent| match event {
            WatchEvent::Reloaded(o) => record_reload(
                &file_audit,
                "file-change",
                Ok(&o),
                Some((file_approvals.clone(), file_store.current())),
            ),
            WatchEvent::Rejected(errors) => {
                record_reload(&file_audit, "file-change", Err(&errors), None);
            }
        };
        let sighup_store = store.clone();
        let mut stop = shutdown.clone();
        let sighup = async move {
            let mut hup = match tokio::signal::unix::signal(
                tokio::signal::unix::SignalKind::hangup(),
            ) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot listen for SIGHUP; policy reloads on file change only");
                    return;
                }
            };
            loop {
                tokio::select! {
                    _ = hup.recv() => {
                        let r = sighup_store.reload(sighup_store.dir());
                        let after = r.is_ok().then(|| (approvals.clone(), sighup_store.current()));
                        record_reload(&audit, "SIGHUP", r.as_ref(), after);
                    }
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        };
        let watcher = crate::policy::watch(store, opts, on_event, async move {
            let _ = shutdown.wait_for(|s| *s).await;
        });
        tokio::join!(sighup, watcher);
    }
}

/// Records a reload; after an accepted one, `after` (the broker and the
/// policy now in force) decides the held commands again, once the reload
/// is on record.
fn record_reload(
    audit: &AuditLog,
    trigger: &'static str,
    outcome: Result<&crate::policy::ReloadOutcome, &crate::policy::PolicyErrors>,
    after: Option<(crate::approval::Broker, Arc<crate::policy::PolicySet>)>,
) {
    let result = match outcome {
        Ok(o) => {
            tracing::info!(event = "policy.reload", trigger, outcome = "accepted", digest = %o.digest, previous = %o.previous_digest);
            json!({
                "outcome": "accepted",
                "digest": o.digest,
                "previous_digest": o.previous_digest,
                "files": o.files,
                "rules": o.rules,
                "archived": o.archived,
                "file_stamps": o.stamps,
            })
        }
        Err(errors) => {
            tracing::error!(event = "policy.reload", trigger, outcome = "rejected", errors = %errors, "new policy rejected; the previous policy stays in force");
            json!({ "outcome": "rejected", "errors": errors.to_string() })
        }
    };
    let rec = NewRecord::new(Kind::PolicyReload)
        .workload(crate::audit::Workload::current_process())
        .action(json!({ "trigger": trigger }))
        .result(result);
    let audit = audit.clone();
    tokio::spawn(async move {
        if let Err(e) = audit.append(rec).await {
            tracing::error!(event = "log.failure", error = %e, "cannot record a policy reload");
        }
        if let Some((approvals, policy)) = after {
            for (id, outcome) in approvals.policy_reloaded(&policy).await {
                tracing::info!(request = %id, outcome, digest = %policy.digest(), "held command decided again after a policy reload");
            }
        }
    });
}

/// The IPv4 listener (required) and the IPv6 one (if the host has IPv6).
fn listeners(
    p: &crate::config::ProxyConfig,
) -> Result<(TcpListener, Option<TcpListener>, SocketAddr, SocketAddr), DaemonError> {
    let addr4 = SocketAddr::new(p.listen_v4.into(), p.port);
    let addr6 = SocketAddr::V6(SocketAddrV6::new(p.listen_v6, p.port, 0, 0));
    let listener4 = listen(addr4)?;
    let listener6 = match listen(addr6) {
        Ok(l) => Some(l),
        Err(e) => {
            // Tagged IPv6 connects still go to addr6 and are refused there: fails closed.
            tracing::warn!(error = %e, "no IPv6 listener; IPv6 connections of tagged processes will be refused");
            None
        }
    };
    Ok((listener4, listener6, addr4, addr6))
}

fn listen(addr: SocketAddr) -> Result<TcpListener, DaemonError> {
    let err = |source| DaemonError::Listen { addr, source };
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(err)?;
    sock.set_reuseaddr(true).map_err(err)?;
    sock.bind(addr).map_err(err)?;
    sock.listen(1024).map_err(err)
}

fn bind_control(path: &Path) -> Result<UnixListener, DaemonError> {
    let io = |what, source| DaemonError::Io {
        what,
        path: path.into(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io("creating directory of", e))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("removing stale", e)),
    }
    let listener = UnixListener::bind(path).map_err(|e| io("binding", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io("chmod", e))?;
    Ok(listener)
}

impl Daemon {
    async fn serve_control(
        self: Arc<Self>,
        listener: UnixListener,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = shutdown.changed() => return,
            };
            match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(self.clone().control_connection(stream));
                }
                Err(e) => tracing::warn!(error = %e, "control accept failed"),
            }
        }
    }

    async fn control_connection(self: Arc<Self>, stream: UnixStream) {
        let cred = stream.peer_cred().ok();
        let caller = Caller {
            pid: cred
                .and_then(|c| c.pid())
                .and_then(|p| u32::try_from(p).ok())
                .filter(|&p| p > 0),
            uid: cred.map(|c| c.uid()),
        };
        let mut reader = BufReader::new(stream);
        let mut owned_exec: Option<(u32, PathBuf)> = None;
        let mut line = Vec::new();
        loop {
            line.clear();
            let read = (&mut reader)
                .take(MAX_REQUEST as u64 + 1)
                .read_until(b'\n', &mut line)
                .await;
            let resp = match read {
                Ok(0) | Err(_) => break,
                Ok(_) => self.answer(&caller, &line, &mut owned_exec).await,
            };
            let mut out = serde_json::to_vec(&resp).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
            out.push(b'\n');
            if reader.get_mut().write_all(&out).await.is_err() {
                break;
            }
        }
        if let Some((id, path)) = owned_exec {
            if let Some(pid) = caller.pid {
                self.exec_owners
                    .lock()
                    .expect("exec owners lock")
                    .remove(&pid);
            }
            self.release_exec(id, path).await;
        }
    }

    /// One request line, checked in this order: the caller's cgroup (inside a
    /// tagged one: refused and recorded, whatever its uid), its size, root,
    /// well-formed; then handled.
    async fn answer(
        &self,
        caller: &Caller,
        line: &[u8],
        owned_exec: &mut Option<(u32, PathBuf)>,
    ) -> Response {
        if let Some((id, path)) = owned_exec.as_ref()
            && caller.uid == Some(0)
            && let Ok(Request::ContainmentReport {
                pid,
                call,
                family,
                sock_type,
                protocol,
            }) = serde_json::from_slice::<Request>(line)
        {
            let call = (call, family, sock_type, protocol);
            return self.containment_report(*id, path, pid, call).await;
        }
        if let Some(refused) = self.refuse_governed(caller, line).await {
            return refused;
        }
        if line.len() > MAX_REQUEST {
            return Response::err(ErrorKind::Usage, "request too long");
        }
        if caller.uid != Some(0) {
            return Response::err(ErrorKind::Usage, "permission denied: root only");
        }
        match serde_json::from_slice::<Request>(line) {
            Err(e) => Response::err(ErrorKind::Usage, format!("malformed request: {e}")),
            Ok(Request::Exec { .. }) if owned_exec.is_some() => {
                Response::err(ErrorKind::Usage, "one exec per connection")
            }
            Ok(req) => {
                let (resp, exec) = self.handle(req, caller).await;
                if exec.is_some()
                    && let Some(pid) = caller.pid
                {
                    self.exec_owners
                        .lock()
                        .expect("exec owners lock")
                        .insert(pid);
                }
                if owned_exec.is_none() {
                    *owned_exec = exec;
                }
                resp
            }
        }
    }

    /// A call the seccomp filter of an exec'd agent refused, reported by the
    /// `exec` process that owns the cgroup: recorded as `containment.refused`
    /// if the caller is in that cgroup (a report about anyone else is refused).
    async fn containment_report(
        &self,
        binding: u32,
        exec_cgroup: &Path,
        pid: u32,
        (call, family, sock_type, protocol): (String, i64, i64, i64),
    ) -> Response {
        let inside = self
            .shared
            .hierarchy
            .of_process(pid)
            .is_some_and(|p| p.starts_with(exec_cgroup));
        if !inside {
            return Response::err(
                ErrorKind::Usage,
                format!("process {pid} is not in this exec's cgroup"),
            );
        }
        self.containment
            .stats
            .seccomp_refused
            .fetch_add(1, Ordering::Relaxed);
        let identity = self
            .shared
            .bindings
            .lock()
            .expect("bindings lock")
            .get(binding)
            .map(|b| b.identity.clone());
        let action = crate::containment::events::describe_call(&call, family, sock_type, protocol);
        tracing::warn!(event = "containment.refused", pid, detail = %action, "seccomp");
        let mut rec = NewRecord::new(Kind::ContainmentRefused)
            .workload(crate::containment::udp_owner::workload_of(&self.shared, pid))
            .action(action)
            .decision(json!({ "verdict": "deny", "reason": "agentgate:exec-filter", "enforced_by": "seccomp" }));
        if let Some(name) = identity {
            rec = rec.identity(self.shared.identity_ref(&name).await);
        }
        match self.shared.audit.append(rec).await {
            Ok(_) => Response::ok(serde_json::Value::Null),
            Err(e) => Response::err(ErrorKind::Failure, format!("audit log unavailable: {e}")),
        }
    }

    /// The control plane refuses callers inside or below a tagged cgroup, and
    /// callers whose cgroup it cannot read (fail closed). Each refusal is a
    /// `control.refused` record naming the request's op, never its arguments,
    /// up to the limit per caller cgroup ([`crate::containment::refusals`]);
    /// the answer waits for that append and nothing else. A record that cannot
    /// be written, or is over the limit, is logged: the request is refused
    /// either way.
    async fn refuse_governed(&self, caller: &Caller, line: &[u8]) -> Option<Response> {
        use crate::containment::{ControlRefusal, refusals::Verdict};
        let refusal = {
            let bindings = self.shared.bindings.lock().expect("bindings lock");
            crate::containment::control_refusal(&self.shared.hierarchy, &bindings, caller.pid)
        }?;
        let message = refusal.message();
        let op = request_op(line);
        let cgroup = match &refusal {
            ControlRefusal::Governed { cgroup, .. } => Some(cgroup.as_str()),
            ControlRefusal::Unresolved => None,
        };
        let Verdict::Record(suppressed) = self.shared.refusal_limit.admit(cgroup) else {
            tracing::debug!(event = "control.refused", pid = ?caller.pid, uid = ?caller.uid, op, recorded = false, "{message}");
            return Some(Response::err(ErrorKind::Usage, message));
        };
        let mut action = json!({ "op": op });
        suppressed.annotate(&mut action);
        let mut rec = NewRecord::new(Kind::ControlRefused)
            .workload(crate::containment::process_workload(
                &self.shared.hierarchy,
                caller.pid,
                caller.uid,
                false,
            ))
            .action(action)
            .decision(json!({ "verdict": "deny", "reason": message }));
        if let ControlRefusal::Governed { identity, .. } = &refusal {
            rec = rec.identity(self.shared.identity_ref(identity).await);
        }
        tracing::warn!(event = "control.refused", pid = ?caller.pid, uid = ?caller.uid, op, "{message}");
        if let Err(e) = self.shared.audit.append(rec).await {
            tracing::error!(event = "log.failure", error = %e, "cannot record a refused control request");
        }
        Some(Response::err(ErrorKind::Usage, message))
    }

    async fn handle(&self, req: Request, caller: &Caller) -> (Response, Option<(u32, PathBuf)>) {
        match req {
            Request::Status => (Response::ok(self.status()), None),
            Request::Login { handoff } => (self.login(handoff).await, None),
            Request::Logout { identity } => (self.logout(&identity).await, None),
            Request::Exec {
                identity,
                privileged,
            } => match self.exec(identity, privileged, caller).await {
                Ok((id, path)) => (
                    Response::ok(json!({
                        "cgroup": path,
                        "binding": id,
                        "unix_paths_checked_by_kernel": self.unix_paths_checked_by_kernel(),
                    })),
                    Some((id, path)),
                ),
                Err(r) => (r, None),
            },
            Request::Tag { cgroup, identity } => (
                self.tag(&cgroup, identity).await.unwrap_or_else(|r| r),
                None,
            ),
            Request::Untag { cgroup } => (self.untag(&cgroup).await.unwrap_or_else(|r| r), None),
            Request::ContainmentReport { .. } => (
                Response::err(
                    ErrorKind::Usage,
                    "containment reports come only from the exec process that owns the cgroup",
                ),
                None,
            ),
            Request::AuditRotateKey => match self.shared.audit.rotate_key().await {
                Ok(public_key) => (Response::ok(json!({ "public_key": public_key })), None),
                Err(e) => (Response::err(ErrorKind::Failure, e.to_string()), None),
            },
            Request::ApprovalsList => (Response::ok(json!(self.shared.approvals.list())), None),
            Request::ApprovalsShow { id } => match self.shared.approvals.get(&id) {
                Some(r) => (Response::ok(json!(r)), None),
                None => (
                    Response::err(
                        ErrorKind::Usage,
                        crate::approval::ApprovalError::NotFound { id }.to_string(),
                    ),
                    None,
                ),
            },
            Request::ApprovalsDecide {
                id,
                approve,
                as_name,
                reason,
                ticket,
            } => {
                let vote = if approve {
                    crate::approval::Vote::Approve { reason, ticket }
                } else {
                    crate::approval::Vote::Reject {
                        reason: reason.unwrap_or_default(),
                        ticket,
                    }
                };
                (self.decide(&id, &as_name, vote).await, None)
            }
            Request::ApprovalsGrants => (Response::ok(json!(self.shared.approvals.grants())), None),
            Request::ApprovalsRevoke {
                grant,
                as_name,
                reason,
            } => (self.revoke_grant(&grant, &as_name, reason).await, None),
        }
    }

    async fn login(&self, handoff: crate::identity::LoginHandoff) -> Response {
        let Some(ids) = &self.shared.identities else {
            return Response::err(
                ErrorKind::Usage,
                "this daemon has no [identity] provider configured",
            );
        };
        let session = match crate::identity::Session::from_handoff(&ids.client, handoff).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(event = "identity.failure", stage = "handoff", error = %e);
                let rec = NewRecord::new(Kind::IdentityFailure)
                    .workload(crate::audit::Workload::current_process())
                    .action(json!({ "stage": "handoff", "error": e.to_string() }));
                let _ = self.record(rec).await;
                return Response::err(ErrorKind::Usage, format!("login refused: {e}"));
            }
        };
        let v = session.identity().clone();
        match ids
            .store
            .lock()
            .await
            .insert(session, crate::identity::LoginMethod::DeviceFlow)
        {
            Ok(event) => {
                tracing::info!(event = "identity.login", detail = %serde_json::to_string(&event).unwrap_or_default());
                audit_identity_event(&self.shared.audit, &event).await;
                Response::ok(json!({
                    "name": v.name,
                    "groups": v.groups,
                    "expires_at": crate::time::rfc3339(v.expires_at),
                }))
            }
            Err(e) => Response::err(ErrorKind::Usage, format!("login refused: {e}")),
        }
    }

    async fn logout(&self, identity: &str) -> Response {
        let Some(ids) = &self.shared.identities else {
            return Response::err(
                ErrorKind::Usage,
                "this daemon has no [identity] provider configured",
            );
        };
        let result = ids.store.lock().await.logout(identity);
        match result {
            Ok((session, event)) => {
                tracing::info!(event = "identity.logout", detail = %serde_json::to_string(&event).unwrap_or_default());
                audit_identity_event(&self.shared.audit, &event).await;
                let closed = self.shared.registry.close_identity(identity);
                if let Some(s) = session
                    && let Err(e) = s.revoke_at_provider(&ids.client).await
                {
                    tracing::warn!(identity, error = %e, "revoking the refresh token at the provider failed");
                }
                Response::ok(json!({ "identity": identity, "connections_closed": closed }))
            }
            Err(e) => Response::err(ErrorKind::Usage, e.to_string()),
        }
    }

    /// Expires, refreshes and logs in service accounts; an identity that ends
    /// loses its live connections (new ones already fail its subject lookup).
    async fn maintain_identities(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let Some(ids) = self.shared.identities.clone() else {
            return;
        };
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            for event in crate::identity::maintain(&ids.store, &ids.client).await {
                let detail = serde_json::to_string(&event).unwrap_or_default();
                tracing::info!(event = "identity.event", %detail);
                audit_identity_event(&self.shared.audit, &event).await;
                if event.ends_identity()
                    && let Some(name) = event.name()
                {
                    let n = self.shared.registry.close_identity(name);
                    tracing::info!(identity = name, connections_closed = n, "identity ended");
                }
            }
        }
    }

    /// The DNS forwarders and the containment event reader.
    fn spawn_containment(
        self: &Arc<Self>,
        tasks: &mut tokio::task::JoinSet<()>,
        forwarders: Vec<crate::containment::dns::Forwarder>,
        events: Option<aya::maps::RingBuf<aya::maps::MapData>>,
        on_escape: crate::config::OnEscape,
        shutdown: &watch::Receiver<bool>,
    ) {
        for fwd in forwarders {
            tasks.spawn(crate::containment::dns::serve(
                fwd,
                self.containment.dns.clone(),
                shutdown.clone(),
            ));
        }
        if let Some(ring) = events {
            tasks.spawn(crate::containment::events::run(
                ring,
                self.shared.clone(),
                on_escape,
                self.containment.stats.clone(),
                shutdown.clone(),
            ));
        }
    }

    /// Identity upkeep, following the policy, audit retention.
    fn spawn_background(
        self: Arc<Self>,
        tasks: &mut tokio::task::JoinSet<()>,
        attach: PathBuf,
        shutdown: &watch::Receiver<bool>,
    ) {
        tasks.spawn(self.clone().maintain_identities(shutdown.clone()));
        if let Some(days) = self.shared.audit.retain_days() {
            let audit = self.shared.audit.clone();
            tasks.spawn(crate::audit::enforce_retention(
                audit,
                days,
                shutdown.clone(),
            ));
        }
        tasks.spawn(self.follow_policy(attach, shutdown.clone()));
    }

    /// Keeps what the kernel holds from the policy in step with it, within
    /// two seconds of a reload: the cgroups `[[binding]]`s match, and the
    /// Unix allow list.
    async fn follow_policy(self: Arc<Self>, attach: PathBuf, mut shutdown: watch::Receiver<bool>) {
        let mut applied = self.shared.policy.current().allow_unix().to_vec();
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            let policy = self.shared.policy.current();
            self.sync_unix_allow(&policy, &mut applied);
            self.sync_policy_bindings(&attach, &policy).await;
        }
    }

    /// Makes the kernel's Unix allow list the policy's `[[allow_unix]]`
    /// when it changed since `applied`.
    fn sync_unix_allow(
        &self,
        policy: &crate::policy::PolicySet,
        applied: &mut Vec<crate::policy::UnixAllow>,
    ) {
        if policy.allow_unix() == applied.as_slice() {
            return;
        }
        let result = self
            .shared
            .redirector
            .lock()
            .expect("redirector lock")
            .set_unix_allow(policy.allow_unix());
        match result {
            Ok(()) => {
                *applied = policy.allow_unix().to_vec();
                tracing::info!(
                    event = "containment.allow_unix",
                    entries = applied.len(),
                    "Unix allow list updated"
                );
            }
            Err(e) => tracing::error!(error = %e, "updating the kernel's Unix allow list"),
        }
    }

    /// Keeps the cgroups that the policy's `[[binding]]`s match tagged with their
    /// service account, and untags them when the policy stops matching. A
    /// matched cgroup is tagged even before its identity is verified: its
    /// connections are then refused (fail closed), never let through unseen.
    async fn sync_policy_bindings(&self, attach: &Path, policy: &crate::policy::PolicySet) {
        let mut desired: std::collections::BTreeMap<u64, (PathBuf, String)> =
            std::collections::BTreeMap::new();
        if !policy.bindings().is_empty() {
            for path in cgroup::walk(attach, POLICY_BINDING_MAX_DEPTH, POLICY_BINDING_MAX_CGROUPS) {
                let rel = self.shared.hierarchy.relative(&path);
                if let Some(b) = policy.binding_for(&rel)
                    && let Ok(id) = cgroup::id(&path)
                {
                    desired.insert(id, (path, b.identity.clone()));
                }
            }
        }
        let current: Vec<(u32, u64, String, BindingKind)> = self
            .shared
            .bindings
            .lock()
            .expect("bindings lock")
            .iter()
            .map(|b| (b.id, b.cgroup_id, b.identity.clone(), b.kind))
            .collect();
        for (id, cgroup_id, identity, kind) in &current {
            let still = desired
                .get(cgroup_id)
                .is_some_and(|(_, want)| want == identity);
            if *kind == BindingKind::Policy
                && !still
                && let Err(e) = self.unbind(*id, *cgroup_id).await
            {
                tracing::error!(error = %e, "removing a policy binding");
            }
        }
        for (cgroup_id, (path, identity)) in desired {
            let bound = current.iter().any(|(_, c, who, kind)| {
                *c == cgroup_id && (*kind != BindingKind::Policy || *who == identity)
            });
            if !bound && let Err(r) = self.bind(identity, &path, BindingKind::Policy).await {
                tracing::error!(cgroup = %path.display(), error = ?r.error, "applying a policy binding");
            }
        }
    }

    /// The approver `name` stands for, as the daemon verified it: a held
    /// session (`agentgate login`, a service account) or, where allowed, a
    /// label identity; with the cgroups it is bound to.
    async fn approver(&self, name: &str) -> Result<crate::approval::Approver, Response> {
        use crate::approval::{Approver, ApproverKind, Via};
        let valid = !name.is_empty()
            && name.len() <= 256
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._@-+:".contains(c));
        if !valid {
            return Err(Response::err(
                ErrorKind::Usage,
                format!("invalid identity {name:?}: use letters, digits and ._@-+:"),
            ));
        }
        let verified = match &self.shared.identities {
            Some(ids) => ids.store.lock().await.get_verified(name).ok(),
            None => None,
        };
        let (subject, issuer, kind, groups) = if let Some(v) = verified {
            let kind = match v.kind {
                crate::identity::IdentityKind::Human => ApproverKind::Human,
                crate::identity::IdentityKind::Service => ApproverKind::Service,
            };
            (v.subject, Some(v.issuer), kind, v.groups)
        } else if let Some(l) = self.shared.labels.iter().find(|l| l.name == name) {
            (l.name.clone(), None, ApproverKind::Label, l.groups.clone())
        } else {
            return Err(Response::err(
                ErrorKind::Usage,
                format!(
                    "{name:?} has no verified session here: the approver logs in first with `agentgate login` (or is a configured service account)"
                ),
            ));
        };
        let (bound_cgroups, bound_cgroup_paths) = self.shared.bound_cgroups(name);
        Ok(Approver {
            name: name.to_owned(),
            subject,
            issuer,
            kind,
            groups,
            via: Via::Cli,
            bound_cgroups,
            bound_cgroup_paths,
        })
    }

    fn approval_error(e: &crate::approval::ApprovalError) -> Response {
        let kind = if e.is_usage() {
            ErrorKind::Usage
        } else {
            ErrorKind::Failure
        };
        Response::err(kind, e.to_string())
    }

    /// A vote from the control socket, as the identity `as_name` resolves to.
    async fn decide(&self, id: &str, as_name: &str, vote: crate::approval::Vote) -> Response {
        let who = match self.approver(as_name).await {
            Ok(w) => w,
            Err(r) => return r,
        };
        match self.shared.approvals.decide(id, &who, vote).await {
            Ok(d) => Response::ok(json!(d)),
            Err(e) => {
                tracing::warn!(event = "approval.refused", request = id, approver = %who.name, error = %e);
                Self::approval_error(&e)
            }
        }
    }

    async fn revoke_grant(&self, grant: &str, as_name: &str, reason: Option<String>) -> Response {
        let who = match self.approver(as_name).await {
            Ok(w) => w,
            Err(r) => return r,
        };
        match self.shared.approvals.revoke(grant, &who, reason).await {
            Ok(g) => Response::ok(json!(g)),
            Err(e) => Self::approval_error(&e),
        }
    }

    fn status(&self) -> serde_json::Value {
        let s = &self.shared;
        let (by_cookie, by_peer, fast_mode) =
            s.redirector.lock().expect("redirector lock").map_sizes();
        let counters = s.redirector.lock().expect("redirector lock").counters();
        let tagged: Vec<_> = s
            .bindings
            .lock()
            .expect("bindings lock")
            .iter()
            .cloned()
            .collect();
        let live = s.registry.snapshot();
        let connections: Vec<&proxy::LiveConnection> = live.iter().map(AsRef::as_ref).collect();
        let exempt: Vec<u32> = self
            .exec_owners
            .lock()
            .expect("exec owners lock")
            .iter()
            .copied()
            .collect();
        let root_processes = crate::containment::privileged::scan(
            &s.hierarchy,
            &tagged,
            &exempt,
            crate::containment::privileged::MAX_REPORTED,
        );
        json!({
            "tagged": tagged,
            "root_processes": root_processes,
            "connections": connections,
            "maps": { "by_cookie": by_cookie, "by_peer": by_peer, "fast_mode": fast_mode },
            "counters": {
                "redirected": counters[0], "refused_not_ready": counters[1],
                "established": counters[2], "closed": counters[3], "fast_path_inserted": counters[4],
                "fast_path_declined": counters[5],
                "stale_peer_removed": counters[agentgate_common::counter::STALE_PEER_REMOVED as usize],
            },
            "fast_path": s.config.fast_path,
            "audit": audit_status(&s.audit),
            "containment": self.containment_status(&counters),
            "webhooks": &*self.api_metrics.webhooks,
            "approvals": { "pending": s.approvals.pending_count(), "grants": s.approvals.grants().len() },
        })
    }

    /// Whether the kernel checks the paths of tagged processes' Unix sockets
    /// (the BPF LSM hooks are attached). If not, `exec` keeps its agents
    /// from making Unix sockets at all.
    fn unix_paths_checked_by_kernel(&self) -> bool {
        let r = self.shared.redirector.lock().expect("redirector lock");
        [
            agentgate_common::names::LSM_SOCKET_CONNECT,
            agentgate_common::names::LSM_SOCKET_SENDMSG,
        ]
        .iter()
        .all(|n| r.hooks().iter().any(|h| h.name == *n && h.attached))
    }

    /// What a tagged process can reach besides the proxy, and what was refused.
    fn containment_status(&self, counters: &[u64]) -> serde_json::Value {
        use agentgate_common::counter as k;
        let c = &self.containment;
        let hooks = self
            .shared
            .redirector
            .lock()
            .expect("redirector lock")
            .hooks()
            .to_vec();
        let n = |i: u32| counters.get(i as usize).copied().unwrap_or(0);
        json!({
            "hooks": hooks,
            "dns_resolvers": c.resolvers.iter().map(|(r, f)| json!({ "resolver": r.to_string(), "forwarder": f.to_string() })).collect::<Vec<_>>(),
            "allow_unix": self.shared.policy.current().allow_unix().iter().map(|a| a.pattern.clone()).collect::<Vec<_>>(),
            "refused": {
                "unix": n(k::UNIX_REFUSED),
                "datagram": n(k::DATAGRAM_REFUSED),
                "socket_type": n(k::INET_SOCKET_REFUSED),
                "socket_family": n(k::FAMILY_REFUSED),
                "exec_filter": c.stats.seccomp_refused.load(Ordering::Relaxed),
                "inbound": n(k::INBOUND_REFUSED),
            },
            "dns": {
                "rewritten": n(k::DNS_FORWARDED),
                "forwarded": c.dns.stats.forwarded.load(Ordering::Relaxed),
                "refused": c.dns.stats.refused.load(Ordering::Relaxed),
                "failed": c.dns.stats.failed.load(Ordering::Relaxed),
            },
            "escapes": &*c.stats,
            "events_lost": n(k::EVENTS_LOST),
        })
    }

    /// Only identities the daemon can vouch for may be bound: a verified OIDC
    /// session or service account, or a label the config declares.
    async fn validate_identity(&self, identity: &str) -> Result<(), Response> {
        let ok = !identity.is_empty()
            && identity.len() <= 256
            && identity
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._@-+:".contains(c));
        if !ok {
            return Err(Response::err(
                ErrorKind::Usage,
                format!("invalid identity {identity:?}: use letters, digits and ._@-+:"),
            ));
        }
        if self.shared.subject(identity).await.is_none() {
            return Err(Response::err(
                ErrorKind::Usage,
                format!(
                    "unknown identity {identity:?}: log in with `agentgate login`, or configure it as a service account"
                ),
            ));
        }
        Ok(())
    }

    /// Makes and binds an exec cgroup. A privileged one (the command runs as
    /// root) is recorded as `workload.privileged` first: if that record cannot
    /// be written, the cgroup is removed and the request refused, as in `bind`.
    async fn exec(
        &self,
        identity: String,
        privileged: bool,
        caller: &Caller,
    ) -> Result<(u32, PathBuf), Response> {
        self.validate_identity(&identity).await?;
        let failure = |e: &dyn std::fmt::Display| Response::err(ErrorKind::Failure, e.to_string());
        let name = format!(
            "exec-{}-{}",
            std::process::id(),
            self.exec_seq.fetch_add(1, Ordering::Relaxed)
        );
        let path = self.exec_root.join(name);
        cgroup::create(&path).map_err(|e| failure(&e))?;
        if privileged {
            let rec = NewRecord::new(Kind::WorkloadPrivileged)
                .identity(self.shared.identity_ref(&identity).await)
                .workload(crate::containment::process_workload(
                    &self.shared.hierarchy,
                    caller.pid,
                    caller.uid,
                    true,
                ))
                .action(json!({
                    "cgroup": path,
                    "run_as_uid": 0,
                    "via": "exec --allow-root",
                    "risk": "a root agent can leave its cgroup and reach the control plane's host",
                }));
            if let Err(r) = self.record(rec).await {
                let _ = cgroup::remove(&path);
                return Err(r);
            }
            tracing::warn!(event = "workload.privileged", identity = %identity, cgroup = %path.display(), pid = ?caller.pid, "exec as root");
        }
        let id = self
            .bind(identity, &path, BindingKind::Exec)
            .await
            .inspect_err(|_| {
                let _ = cgroup::remove(&path);
            })?;
        Ok((id, path))
    }

    async fn tag(&self, user_path: &Path, identity: String) -> Result<Response, Response> {
        self.validate_identity(&identity).await?;
        let path = self
            .shared
            .hierarchy
            .resolve(user_path)
            .map_err(|e| Response::err(ErrorKind::Usage, e.to_string()))?;
        let id = self.bind(identity, &path, BindingKind::Tag).await?;
        Ok(Response::ok(json!({ "cgroup": path, "binding": id })))
    }

    /// Records the binding, then makes it: a binding that cannot be audited is refused.
    async fn bind(
        &self,
        identity: String,
        path: &Path,
        kind: BindingKind,
    ) -> Result<u32, Response> {
        let rec = NewRecord::new(Kind::IdentityBind)
            .identity(self.shared.identity_ref(&identity).await)
            .workload(crate::audit::Workload::current_process())
            .action(json!({ "cgroup": path, "kind": kind }));
        self.record(rec).await?;
        self.bind_now(identity, path, kind)
    }

    async fn record(&self, rec: NewRecord) -> Result<(), Response> {
        self.shared.audit.append(rec).await.map(|_| ()).map_err(|e| {
            tracing::error!(event = "log.failure", error = %e, "cannot write the audit log; refusing");
            Response::err(ErrorKind::Failure, format!("audit log unavailable: {e}"))
        })
    }

    fn bind_now(&self, identity: String, path: &Path, kind: BindingKind) -> Result<u32, Response> {
        let failure = |e: &dyn std::fmt::Display| Response::err(ErrorKind::Failure, e.to_string());
        let cgroup_id = cgroup::id(path).map_err(|e| failure(&e))?;
        let mut bindings = self.shared.bindings.lock().expect("bindings lock");
        if let Some(existing) = bindings.by_cgroup_id(cgroup_id) {
            return Err(Response::err(
                ErrorKind::Usage,
                format!(
                    "{} is already tagged for {}; untag it first",
                    path.display(),
                    existing.identity
                ),
            ));
        }
        let b = bindings.add(identity, path.to_path_buf(), cgroup_id, kind);
        if let Err(e) = bindings.save(&self.bindings_path) {
            bindings.remove(b.id);
            return Err(failure(&e));
        }
        if let Err(e) = self
            .shared
            .redirector
            .lock()
            .expect("redirector lock")
            .tag(cgroup_id, path, b.id)
        {
            bindings.remove(b.id);
            let _ = bindings.save(&self.bindings_path);
            return Err(failure(&e));
        }
        tracing::info!(event = "identity.bind", identity = %b.identity, cgroup = %path.display(), binding = b.id);
        Ok(b.id)
    }

    async fn untag(&self, user_path: &Path) -> Result<Response, Response> {
        let path = self
            .shared
            .hierarchy
            .resolve(user_path)
            .map_err(|e| Response::err(ErrorKind::Usage, e.to_string()))?;
        let cgroup_id =
            cgroup::id(&path).map_err(|e| Response::err(ErrorKind::Failure, e.to_string()))?;
        let id = {
            let bindings = self.shared.bindings.lock().expect("bindings lock");
            match bindings.by_cgroup_id(cgroup_id) {
                Some(b) if b.kind == BindingKind::Tag => b.id,
                Some(_) => {
                    return Err(Response::err(
                        ErrorKind::Usage,
                        "cgroups made by `agentgate exec` go when their command exits",
                    ));
                }
                None => {
                    return Err(Response::err(
                        ErrorKind::Usage,
                        format!("{} is not tagged", path.display()),
                    ));
                }
            }
        };
        self.unbind(id, cgroup_id)
            .await
            .map_err(|e| Response::err(ErrorKind::Failure, e))?;
        Ok(Response::ok(json!({ "cgroup": path })))
    }

    async fn unbind(&self, id: u32, cgroup_id: u64) -> Result<(), String> {
        self.shared
            .redirector
            .lock()
            .expect("redirector lock")
            .untag(cgroup_id)
            .map_err(|e| e.to_string())?;
        let removed = {
            let mut bindings = self.shared.bindings.lock().expect("bindings lock");
            let removed = bindings.remove(id);
            bindings
                .save(&self.bindings_path)
                .map_err(|e| e.to_string())?;
            removed
        };
        if let Some(b) = removed {
            tracing::info!(event = "identity.unbind", identity = %b.identity, cgroup = %b.cgroup.display(), binding = id);
            let rec = NewRecord::new(Kind::IdentityUnbind)
                .identity(self.shared.identity_ref(&b.identity).await)
                .workload(crate::audit::Workload::current_process())
                .action(json!({ "cgroup": b.cgroup, "kind": b.kind }));
            if let Err(e) = self.shared.audit.append(rec).await {
                tracing::error!(event = "log.failure", error = %e, "cannot record an unbind");
            }
        }
        Ok(())
    }

    /// Waits until the exec cgroup is empty, then untags and removes it. The tag
    /// stays for as long as any process is inside: never fail open on a live agent.
    async fn release_exec(self: Arc<Self>, id: u32, path: PathBuf) {
        loop {
            if !cgroup::populated(&path) {
                let cgroup_id = cgroup::id(&path).ok();
                match cgroup::remove(&path) {
                    Ok(true) => {
                        if let Some(cid) = cgroup_id {
                            if let Err(e) = self.unbind(id, cid).await {
                                tracing::error!(error = %e, "removing exec binding");
                            }
                        } else if let Err(e) = self.unbind(id, 0).await {
                            tracing::error!(error = %e, "removing exec binding");
                        }
                        return;
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "removing exec cgroup"),
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
