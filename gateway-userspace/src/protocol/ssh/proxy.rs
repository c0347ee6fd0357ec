//! The SSH connection: russh server toward the agent, russh client toward
//! the host, one task per session channel deciding each request through
//! [`crate::gate`].
//!
//! Lifecycle: the agent's client authenticates to the proxy with whatever it
//! offers (`none` is accepted: the kernel attributed the connection; the
//! record says what was offered). At that moment the daemon connects to the
//! host, checks its key against the resource's `known_hosts`, and logs in
//! with the resource's credential (a certificate it signs, or a key file);
//! if any of that fails the agent's authentication fails and the refusal is
//! recorded. Each session channel then gets one task that holds the
//! channel's requests: `pty-req` and allowed `env` are kept and forwarded
//! with the `exec`/`shell` the gate allows; everything else is refused.
//!
//! Fails closed: a request that cannot be classified is `dangerous`; one
//! whose record cannot be written is not run; a recording that cannot be
//! written ends the channel. Port forwarding, agent forwarding, X11 and
//! subsystems other than SFTP are refused unless stated otherwise below;
//! SFTP is decoded operation by operation (`proxy/sftp_relay.rs`). The
//! trade-off: while a request is held its channel keeps reading, up to
//! `MAX_HELD_MESSAGES` messages (typed-ahead input, replayed after the
//! approval), so the connection's other channels go on; past that the held
//! request is withdrawn and the channel closed. A channel whose host stops
//! reading (a full upstream window) still stops the whole connection's
//! reads: russh delivers every channel's messages from one loop, so one
//! blocked channel task holds them all (unresolved; see the README).

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use russh::{
    Channel, ChannelId, ChannelMsg, ChannelOpenFailure, MethodKind, MethodSet, Pty, client,
    keys::{PrivateKeyWithHashAlg, PublicKeyOrCertificate, ssh_key::PrivateKey},
    server::{self, Auth, Msg, Session},
};
use serde_json::{Value, json};
use tokio::net::TcpStream;

use super::{
    classify::{self, Class},
    config::{ResourceCredential, SshConfig},
    keys,
};
use crate::{
    audit::Kind,
    connection::{LiveConnection, Services},
    gate::{Command, Denial, DenialKind, Gate, Outcome, ResultRecord},
    mask::MaskPolicy,
    policy::{Action, PolicySet, Resource, Subject},
    recording::{Chunk, Header, Recorder},
};

mod sftp_relay;

/// Why an SSH connection ended badly.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("ssh: {0}")]
    Protocol(#[from] russh::Error),
    #[error("upstream: {0}")]
    Upstream(String),
    #[error("the agent did not finish key exchange and authentication in time")]
    HandshakeTimeout,
    #[error("the session reached its time limit")]
    SessionTimeout,
    #[error("keys: {0}")]
    Keys(#[from] keys::KeyError),
    #[error("audit log unavailable: {0}")]
    Audit(String),
}

/// The proxy's keys (loaded once by the handler).
pub struct ProxyKeys {
    pub host_ca: PrivateKey,
    pub host_key: PrivateKey,
}

/// Everything one connection needs.
pub struct SshContext {
    pub conn: Arc<LiveConnection>,
    pub subject: Subject,
    pub resource: Resource,
    pub services: Services,
    pub config: Arc<SshConfig>,
    pub keys: Arc<ProxyKeys>,
    /// Where recordings go: `<audit dir>/recordings/`.
    pub audit_dir: PathBuf,
}

struct Shared {
    ctx: SshContext,
    channels: AtomicU32,
    authenticated: AtomicBool,
    tasks: Mutex<tokio::task::JoinSet<()>>,
}

/// The names the agent may dial for `resource` (certificate principals) and
/// their `known_hosts` patterns (`[host]:port` off port 22).
pub fn resource_names(resource: &Resource) -> (Vec<String>, Vec<String>) {
    use crate::policy::AddressPattern;
    let mut names = Vec::new();
    let mut patterns = Vec::new();
    for a in &resource.addresses {
        let (host, port) = match a {
            AddressPattern::Exact(sa) => (sa.ip().to_string(), sa.port()),
            AddressPattern::Dns { host, port } => (host.clone(), *port),
            AddressPattern::Cidr { .. } => continue,
        };
        patterns.push(if port == 22 {
            host.clone()
        } else {
            format!("[{host}]:{port}")
        });
        if !names.contains(&host) {
            names.push(host);
        }
    }
    (names, patterns)
}

/// Serves one agent connection to an SSH resource.
pub async fn serve(client: TcpStream, ctx: SshContext) -> Result<(), SshError> {
    let cfg = ctx.config.clone();
    let (mut names, _) = resource_names(&ctx.resource);
    let dst = ctx.conn.destination.ip().to_string();
    if !names.contains(&dst) {
        names.push(dst);
    }
    let cert = keys::sign_host_cert(&ctx.keys.host_ca, &ctx.keys.host_key, &names)?;
    let server_config = Arc::new(server::Config {
        server_id: russh::SshId::Standard("SSH-2.0-agentgate".into()),
        methods: MethodSet::from(
            &[
                MethodKind::None,
                MethodKind::PublicKey,
                MethodKind::Password,
                MethodKind::KeyboardInteractive,
            ][..],
        ),
        auth_rejection_time: Duration::from_millis(200),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![ctx.keys.host_key.clone()],
        certificates: vec![cert],
        window_size: cfg.window_bytes,
        maximum_packet_size: cfg.max_packet_bytes,
        max_auth_attempts: cfg.max_auth_attempts,
        inactivity_timeout: Some(cfg.idle_timeout()),
        nodelay: true,
        ..server::Config::default()
    });
    let shared = Arc::new(Shared {
        ctx,
        channels: AtomicU32::new(0),
        authenticated: AtomicBool::new(false),
        tasks: Mutex::new(tokio::task::JoinSet::new()),
    });
    let handler = AgentSide {
        shared: shared.clone(),
        upstream: None,
        offered: Vec::new(),
        agent_user: String::new(),
    };
    // russh runs the session in a task of its own; it reads from our end
    // of an in-memory pipe, so dropping the pump (on a limit, or when the
    // accept path drops this future) ends the session and its channels.
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let run = async {
        let running = server::run_stream(server_config, theirs, handler).await?;
        running.await
    };
    let result = tokio::select! {
        r = run => r.map_err(SshError::from),
        r = pump(client, ours, &shared.ctx.conn) => r,
        e = watchdog(&shared) => Err(e),
    };
    // The channels' tasks end with their channels; give them a moment to
    // write their records, then stop what is left.
    let mut tasks = std::mem::take(&mut *shared.tasks.lock().expect("tasks lock"));
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    tasks.abort_all();
    let end = shared
        .ctx
        .conn
        .record(Kind::SessionEnd)
        .action(json!({"ssh": {"channels": shared.channels.load(Ordering::Relaxed)}}))
        .result(json!({"error": result.as_ref().err().map(ToString::to_string)}));
    if let Err(e) = shared.ctx.services.audit.append(end).await {
        tracing::error!(error = %e, "cannot record the SSH session's end");
    }
    result
}

/// Moves bytes between the agent's socket and the session's pipe, counting
/// them on the connection; ends when either side does.
async fn pump(
    client: TcpStream,
    session: tokio::io::DuplexStream,
    conn: &LiveConnection,
) -> Result<(), SshError> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = tokio::io::split(session);
    let up = async {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = cr.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            sw.write_all(&buf[..n]).await?;
            conn.bytes_up.fetch_add(n as u64, Ordering::Relaxed);
        }
    };
    let down = async {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = sr.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(());
            }
            cw.write_all(&buf[..n]).await?;
            conn.bytes_down.fetch_add(n as u64, Ordering::Relaxed);
        }
    };
    // Either direction ending ends the connection (SSH has no half-close
    // at the transport).
    tokio::select! {
        r = up => r,
        r = down => r,
    }
    .map_err(|e| SshError::Upstream(format!("agent connection: {e}")))
}

/// Resolves when the handshake or the session runs over its limit.
async fn watchdog(shared: &Shared) -> SshError {
    let cfg = &shared.ctx.config;
    tokio::time::sleep(Duration::from_secs(cfg.handshake_timeout_secs)).await;
    if !shared.authenticated.load(Ordering::Acquire) {
        return SshError::HandshakeTimeout;
    }
    tokio::time::sleep(Duration::from_secs(
        cfg.max_session_secs
            .saturating_sub(cfg.handshake_timeout_secs),
    ))
    .await;
    SshError::SessionTimeout
}

/// The russh server handler: authentication, channel opens, global requests.
struct AgentSide {
    shared: Arc<Shared>,
    upstream: Option<Arc<client::Handle<HostCheck>>>,
    offered: Vec<String>,
    agent_user: String,
}

impl AgentSide {
    /// The agent authenticated (by `method`): log in upstream, once.
    async fn login(&mut self, user: &str, method: String) -> Auth {
        if self.upstream.is_some() {
            return Auth::Accept;
        }
        if self.offered.len() < 8 {
            self.offered.push(method);
        }
        self.agent_user = classify::redact(user, 64);
        match connect_upstream(&self.shared, &self.agent_user, &self.offered).await {
            Ok(h) => {
                self.upstream = Some(Arc::new(h));
                self.shared.authenticated.store(true, Ordering::Release);
                Auth::Accept
            }
            Err(e) => {
                tracing::warn!(conn = self.shared.ctx.conn.id, error = %e, "upstream login refused");
                Auth::reject()
            }
        }
    }

    async fn refuse_forward(&self, what: &str, destination: String) -> bool {
        let ctx = &self.shared.ctx;
        let policy = ctx.services.policy.current();
        let action = Action::Ssh {
            class: "forward",
            destination: Some(destination.clone()),
        };
        let gate = gate_of(ctx);
        let decision = gate.decide(&policy, &action);
        let summary = format!("{what} {destination}");
        let cmd = Command {
            action: json!({"ssh": {"request": what, "destination": destination, "class": "forward"}}),
            fingerprint: crate::audit::keyed_hash(
                &ctx.services.correlation_key,
                summary.as_bytes(),
            ),
            class: "forward",
            summary: &summary,
            changes_state: true,
        };
        // Forwarding cannot wait for an approver (the client's forward
        // would time out): only an `allow` rule lets it through.
        if matches!(decision.verdict, crate::policy::Verdict::Allow) {
            matches!(
                gate.admit(cmd, &decision, None).await,
                Outcome::Forward { .. }
            )
        } else {
            let mut d = decision.clone();
            if !matches!(d.verdict, crate::policy::Verdict::Deny { .. }) {
                d.verdict = crate::policy::Verdict::Deny {
                    reason: "port forwarding needs an allow rule; it cannot wait for approval"
                        .into(),
                };
            }
            let _ = gate.deny(cmd, &d).await;
            false
        }
    }
}

fn gate_of(ctx: &SshContext) -> Gate<'_> {
    Gate::new(
        &*ctx.conn,
        &ctx.subject,
        &ctx.resource,
        &*ctx.services.audit,
        &ctx.services.approvals,
    )
}

impl server::Handler for AgentSide {
    type Error = russh::Error;

    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        Ok(self.login(user, "none".into()).await)
    }

    async fn auth_password(&mut self, user: &str, _password: &str) -> Result<Auth, Self::Error> {
        // The password is neither checked nor kept: the proxy does not use it.
        Ok(self.login(user, "password".into()).await)
    }

    async fn auth_publickey(
        &mut self,
        user: &str,
        key: server::VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        let fp = keys::fingerprint(key.public_key);
        Ok(self.login(user, format!("publickey {fp}")).await)
    }

    async fn auth_openssh_certificate(
        &mut self,
        user: &str,
        certificate: &russh::keys::Certificate,
    ) -> Result<Auth, Self::Error> {
        let id = classify::redact(certificate.key_id(), 128);
        Ok(self.login(user, format!("certificate {id}")).await)
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        user: &str,
        _submethods: &str,
        _response: Option<server::Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        Ok(self.login(user, "keyboard-interactive".into()).await)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: server::ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let n = self.shared.channels.fetch_add(1, Ordering::Relaxed);
        let Some(up) = self.upstream.clone() else {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        if n >= self.shared.ctx.config.max_channels {
            tracing::warn!(conn = self.shared.ctx.conn.id, "SSH channel limit reached");
            reply.reject(ChannelOpenFailure::ResourceShortage).await;
            return Ok(());
        }
        let upch = match up.channel_open_session().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "upstream session channel refused");
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
                return Ok(());
            }
        };
        reply.accept().await;
        let task = ChannelTask {
            shared: self.shared.clone(),
            id: channel.id(),
            index: n,
            handle: session.handle(),
            up: upch,
            pty: None,
            env: Vec::new(),
            refused_env: Vec::new(),
            running: None,
            closed: false,
        };
        self.shared
            .tasks
            .lock()
            .expect("tasks lock")
            .spawn(task.run(channel));
        Ok(())
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let dest = format!(
            "{}:{port_to_connect}",
            classify::redact(host_to_connect, 255)
        );
        let n = self.shared.channels.fetch_add(1, Ordering::Relaxed);
        let allowed = n < self.shared.ctx.config.max_channels
            && self.refuse_forward("direct-tcpip", dest).await;
        let Some(up) = self.upstream.clone().filter(|_| allowed) else {
            reply
                .reject(ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        match up
            .channel_open_direct_tcpip(host_to_connect, port_to_connect, "127.0.0.1", 0)
            .await
        {
            Ok(upch) => {
                reply.accept().await;
                self.shared
                    .tasks
                    .lock()
                    .expect("tasks lock")
                    .spawn(relay(channel, upch));
            }
            Err(_) => reply.reject(ChannelOpenFailure::ConnectFailed).await,
        }
        Ok(())
    }

    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        // Remote forwarding is never relayed (not supported); the request is
        // still decided and recorded so a denial is on file.
        let dest = format!("{}:{port}", classify::redact(address, 255));
        let _ = self.refuse_forward("tcpip-forward", dest).await;
        Ok(false)
    }

    async fn streamlocal_forward(
        &mut self,
        socket_path: &str,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let _ = self
            .refuse_forward("streamlocal-forward", classify::redact(socket_path, 255))
            .await;
        Ok(false)
    }
}

/// A permitted `direct-tcpip` channel: bytes both ways until either closes.
#[allow(clippy::collapsible_match)]
async fn relay(mut agent: Channel<Msg>, mut up: Channel<client::Msg>) {
    loop {
        tokio::select! {
            m = agent.wait() => match m {
                Some(ChannelMsg::Data { data }) => { if up.data_bytes(data).await.is_err() { break; } }
                Some(ChannelMsg::Eof) => { let _ = up.eof().await; }
                None | Some(ChannelMsg::Close) => { let _ = up.close().await; break; }
                _ => {}
            },
            m = up.wait() => match m {
                Some(ChannelMsg::Data { data }) => { if agent.data_bytes(data).await.is_err() { break; } }
                Some(ChannelMsg::Eof) => { let _ = agent.eof().await; }
                None | Some(ChannelMsg::Close) => { let _ = agent.close().await; break; }
                _ => {}
            },
        }
    }
}

/// Checks the host's key against the resource's `known_hosts`, or its
/// host certificate against the resource's host CA.
struct HostCheck {
    known_hosts: Option<PathBuf>,
    host_ca: Option<russh::keys::ssh_key::PublicKey>,
    /// The names a host certificate may be for (the resource's, and the
    /// address dialled).
    names: Vec<String>,
    host: String,
    port: u16,
    seen: Arc<Mutex<HostKeySeen>>,
}

#[derive(Default, Clone)]
struct HostKeySeen {
    fingerprint: Option<String>,
    verdict: &'static str,
}

impl client::Handler for HostCheck {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let (key, verdict) = match (key, &self.host_ca) {
            (PublicKeyOrCertificate::Certificate(c), Some(ca)) => {
                let now =
                    u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp()).unwrap_or(0);
                let verdict = match keys::check_host_cert(c, ca, &self.names, now) {
                    Ok(()) => "match",
                    Err(why) => why,
                };
                (
                    russh::keys::ssh_key::PublicKey::new(c.public_key().clone(), ""),
                    verdict,
                )
            }
            (PublicKeyOrCertificate::Certificate(c), None) => (
                russh::keys::ssh_key::PublicKey::new(c.public_key().clone(), ""),
                "a host certificate, but the resource names no host_ca",
            ),
            (PublicKeyOrCertificate::PublicKey { key, .. }, _) => {
                let verdict = match &self.known_hosts {
                    None => "no host certificate (the resource trusts only its host_ca)",
                    Some(path) => {
                        match russh::keys::check_known_hosts_path(&self.host, self.port, key, path)
                        {
                            Ok(true) => "match",
                            Ok(false) => "unknown host",
                            Err(russh::keys::Error::KeyChanged { .. }) => "mismatch",
                            Err(_) => "known_hosts unreadable",
                        }
                    }
                };
                (key.clone(), verdict)
            }
        };
        let mut seen = self.seen.lock().expect("seen lock");
        seen.fingerprint = Some(keys::fingerprint(&key));
        seen.verdict = verdict;
        Ok(verdict == "match")
    }
}

/// Connects to the host as the resource's credential says; records the
/// session's start (or why it was refused) before returning.
async fn connect_upstream(
    shared: &Shared,
    agent_user: &str,
    offered: &[String],
) -> Result<client::Handle<HostCheck>, SshError> {
    let ctx = &shared.ctx;
    let seen = Arc::new(Mutex::new(HostKeySeen::default()));
    let mut start = json!({
        "agent_user": agent_user,
        "agent_auth": offered,
        "host": ctx.conn.destination.to_string(),
    });
    let result = login_upstream(ctx, &seen, &mut start).await;
    let seen = seen.lock().expect("seen lock").clone();
    start["host_key"] = json!(seen.fingerprint);
    start["host_key_check"] = json!(seen.verdict);
    let rec = ctx
        .conn
        .record(Kind::SessionStart)
        .action(json!({ "ssh": start }))
        .result(match &result {
            Ok(_) => json!({"status": "ok"}),
            Err(e) => json!({"status": "refused", "reason": e.to_string()}),
        });
    // Write-ahead: nothing runs on the host before the session is on record.
    ctx.services
        .audit
        .append(rec)
        .await
        .map_err(|e| SshError::Audit(e.to_string()))?;
    result
}

// The login's steps in order: credential, connect, host check, authenticate.
#[allow(clippy::too_many_lines)]
async fn login_upstream(
    ctx: &SshContext,
    seen: &Arc<Mutex<HostKeySeen>>,
    start: &mut Value,
) -> Result<client::Handle<HostCheck>, SshError> {
    let cred: &ResourceCredential =
        ctx.config
            .resources
            .get(&ctx.resource.name)
            .ok_or_else(|| {
                SshError::Upstream(format!(
                    "no credential for resource {} in [proxy.ssh.resources]",
                    ctx.resource.name
                ))
            })?;
    // The login: the most specific applicable rule's `ssh_user`, else the
    // resource's `user`.
    let policy = ctx.services.policy.current();
    let user = match policy.ssh_user_for(&ctx.subject, &ctx.resource) {
        Some((rule, u)) => {
            start["upstream_user_rule"] = json!(rule);
            u.to_owned()
        }
        None => cred.user.clone(),
    };
    start["upstream_user"] = json!(user);
    let dst: SocketAddr = ctx.conn.destination;
    let tcp = tokio::time::timeout(
        ctx.services.upstream_connect_timeout,
        TcpStream::connect(dst),
    )
    .await
    .map_err(|_| SshError::Upstream("connect timed out".into()))?
    .map_err(|e| SshError::Upstream(format!("connect: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let host_ca = cred.host_ca.as_deref().map(keys::load_public).transpose()?;
    if let Some(ca) = &host_ca {
        start["host_ca"] = json!(keys::fingerprint(ca));
    }
    let mut names = resource_names(&ctx.resource).0;
    names.push(dst.ip().to_string());
    let mut preferred = russh::Preferred::default();
    if host_ca.is_some() {
        // Ask the host for its certificate (OpenSSH presents one when it
        // has a `HostCertificate`).
        preferred.host_key_certificates = std::borrow::Cow::Owned(vec![
            russh::keys::Algorithm::Ed25519,
            russh::keys::Algorithm::Ecdsa {
                curve: russh::keys::EcdsaCurve::NistP256,
            },
            russh::keys::Algorithm::Rsa {
                hash: Some(russh::keys::HashAlg::Sha512),
            },
        ]);
    }
    let check = HostCheck {
        host_ca,
        names,
        known_hosts: cred.known_hosts.clone(),
        host: dst.ip().to_string(),
        port: dst.port(),
        seen: seen.clone(),
    };
    let config = Arc::new(client::Config {
        preferred,
        inactivity_timeout: None,
        window_size: ctx.config.window_bytes,
        maximum_packet_size: ctx.config.max_packet_bytes,
        nodelay: true,
        ..client::Config::default()
    });
    let mut handle = tokio::time::timeout(
        Duration::from_secs(ctx.config.handshake_timeout_secs),
        client::connect_stream(config, tcp, check),
    )
    .await
    .map_err(|_| SshError::Upstream("key exchange timed out".into()))?
    .map_err(|e| {
        let v = seen.lock().expect("seen lock").verdict;
        if v.is_empty() || v == "match" {
            SshError::Upstream(format!("key exchange: {e}"))
        } else {
            SshError::Upstream(format!("host key refused: {v}"))
        }
    })?;
    let auth = if let Some(ca_path) = &cred.user_ca_key {
        let ca = keys::load(ca_path)?;
        let key = keys::generate()?;
        let key_id = format!("{} conn-{}", ctx.conn.audit_identity.subject, ctx.conn.id);
        let cert = keys::sign_user_cert(
            &ca,
            &key,
            &user,
            &key_id,
            Duration::from_secs(cred.cert_minutes * 60),
        )?;
        start["credential"] = json!({
            "kind": "user-certificate",
            "id": key_id,
            "ca": keys::fingerprint(ca.public_key()),
            "valid_minutes": cred.cert_minutes,
        });
        handle
            .authenticate_openssh_cert(user.clone(), Arc::new(key), cert)
            .await?
    } else if let Some(path) = &cred.key_file {
        let key = keys::load(path)?;
        start["credential"] = json!({
            "kind": "key-file",
            "id": keys::fingerprint(key.public_key()),
        });
        handle
            .authenticate_publickey(
                user.clone(),
                PrivateKeyWithHashAlg::new(Arc::new(key), None),
            )
            .await?
    } else {
        return Err(SshError::Upstream(
            "the resource names no credential".into(),
        ));
    };
    if !auth.success() {
        return Err(SshError::Upstream(format!(
            "the host refused the credential for {user}"
        )));
    }
    Ok(handle)
}

/// A `pty-req`, kept until the shell or command it is for is allowed.
struct PtyReq {
    term: String,
    cols: u32,
    rows: u32,
    pix_w: u32,
    pix_h: u32,
    modes: Vec<(Pty, u32)>,
}

/// What an allowed request is doing.
struct Running {
    request: &'static str,
    hash: String,
    recorder: Recorder,
    started: Instant,
    exit_status: Option<u32>,
    /// Exec output masking: the resource's detectors, with a line buffer per stream.
    masker: Option<LineMasker>,
    detectors_hit: Vec<&'static str>,
}

/// One session channel's requests, in order.
struct ChannelTask {
    shared: Arc<Shared>,
    id: ChannelId,
    index: u32,
    handle: server::Handle,
    up: Channel<client::Msg>,
    pty: Option<PtyReq>,
    env: Vec<(String, String)>,
    refused_env: Vec<String>,
    running: Option<Running>,
    closed: bool,
}

/// Messages kept while a request is held (the agent may type ahead).
const MAX_HELD_MESSAGES: usize = 64;

impl ChannelTask {
    async fn run(mut self, mut agent: Channel<Msg>) {
        let mut backlog: Vec<ChannelMsg> = Vec::new();
        loop {
            let next = if backlog.is_empty() {
                let pending = self
                    .running
                    .as_ref()
                    .and_then(|r| r.masker.as_ref())
                    .is_some_and(LineMasker::has_pending);
                tokio::select! {
                    m = agent.wait() => Side::Agent(m),
                    m = self.up.wait(), if self.running.is_some() => Side::Up(m),
                    () = tokio::time::sleep(LineMasker::HOLD), if pending => Side::Tick,
                }
            } else {
                Side::Agent(Some(backlog.remove(0)))
            };
            let go_on = match next {
                Side::Agent(None) | Side::Up(None) => false,
                Side::Agent(Some(m)) => self.on_agent(m, &mut agent, &mut backlog).await,
                Side::Up(Some(m)) => self.on_upstream(m).await,
                Side::Tick => self.flush_masked().await,
            };
            if !go_on {
                break;
            }
        }
        self.finish();
    }

    fn ctx(&self) -> &SshContext {
        &self.shared.ctx
    }

    /// Handles one message from the agent; `false` ends the channel.
    // One arm per channel message, in the RFC 4254 order.
    #[allow(clippy::too_many_lines, clippy::collapsible_match)]
    async fn on_agent(
        &mut self,
        m: ChannelMsg,
        agent: &mut Channel<Msg>,
        backlog: &mut Vec<ChannelMsg>,
    ) -> bool {
        match m {
            ChannelMsg::RequestPty {
                term,
                col_width,
                row_height,
                pix_width,
                pix_height,
                terminal_modes,
                ..
            } => {
                self.pty = Some(PtyReq {
                    term: classify::redact(&term, 64),
                    cols: col_width,
                    rows: row_height,
                    pix_w: pix_width,
                    pix_h: pix_height,
                    modes: terminal_modes,
                });
                let _ = self.handle.channel_success(self.id).await;
            }
            ChannelMsg::SetEnv {
                variable_name,
                variable_value,
                ..
            } => {
                if self.ctx().config.env_allowed(&variable_name) && self.env.len() < 32 {
                    self.env.push((variable_name, variable_value));
                } else if self.refused_env.len() < 32 {
                    self.refused_env.push(classify::redact(&variable_name, 64));
                }
            }
            ChannelMsg::Exec { command, .. } => {
                let text = String::from_utf8_lossy(&command).into_owned();
                return self.request("exec", Some(text), agent, backlog).await;
            }
            ChannelMsg::RequestShell { .. } => {
                return self.request("shell", None, agent, backlog).await;
            }
            ChannelMsg::RequestSubsystem { name, .. }
                if name == "sftp" && self.running.is_none() =>
            {
                return self.sftp(agent, backlog).await;
            }
            ChannelMsg::RequestSubsystem { name, .. } => {
                let name = classify::redact(&name, 64);
                self.refuse_request(
                    "subsystem",
                    json!({"subsystem": name}),
                    &format!("the {name} subsystem is not supported through agentgate"),
                )
                .await;
            }
            ChannelMsg::RequestX11 { .. } | ChannelMsg::AgentForward { .. } => {
                let what = if matches!(m, ChannelMsg::RequestX11 { .. }) {
                    "x11-req"
                } else {
                    "auth-agent-req"
                };
                self.refuse_request(what, json!({}), &format!("{what} is refused"))
                    .await;
            }
            ChannelMsg::Data { data } => {
                if let Some(r) = &mut self.running {
                    if r.request == "shell" || r.request == "exec" {
                        let chunk = r.recorder.input(&data);
                        if !self.chunk(chunk) {
                            return false;
                        }
                    }
                    if self.up.data_bytes(data).await.is_err() {
                        return false;
                    }
                }
            }
            ChannelMsg::Eof => {
                if self.running.is_some() {
                    let _ = self.up.eof().await;
                }
            }
            ChannelMsg::Close => {
                let _ = self.up.close().await;
                return self.running.is_some() && !self.closed;
            }
            ChannelMsg::WindowChange {
                col_width,
                row_height,
                pix_width,
                pix_height,
            } => {
                if let Some(r) = &mut self.running {
                    let chunk = r.recorder.resize(col_width, row_height);
                    if !self.chunk(chunk) {
                        return false;
                    }
                    let _ = self
                        .up
                        .window_change(col_width, row_height, pix_width, pix_height)
                        .await;
                }
            }
            ChannelMsg::Signal { signal } => {
                if self.running.is_some() {
                    let _ = self.up.signal(signal).await;
                }
            }
            _ => {}
        }
        true
    }

    /// Appends a written chunk's record; `false` if the recording failed.
    fn chunk(&mut self, c: Result<Option<Chunk>, crate::recording::RecordingError>) -> bool {
        match c {
            Ok(None) => true,
            Ok(Some(chunk)) => {
                self.append_chunk(&chunk);
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "recording failed; ending the channel");
                false
            }
        }
    }

    fn append_chunk(&self, chunk: &Chunk) {
        let rec = self
            .ctx()
            .conn
            .record(Kind::RecordingChunk)
            .action(json!({"ssh": {"channel": self.index}}))
            .result(chunk.value());
        self.ctx().services.audit.append_detached(rec);
    }

    /// A request the handler refuses itself (no policy can allow it).
    async fn refuse_request(&mut self, what: &str, detail: Value, reason: &str) {
        let ctx = self.ctx();
        let gate = gate_of(ctx);
        let decision = crate::policy::Decision {
            verdict: crate::policy::Verdict::Deny {
                reason: reason.to_owned(),
            },
            rule: format!("agentgate:ssh-{what}"),
        };
        let mut action = json!({"request": what, "channel": self.index});
        if let (Some(a), Some(d)) = (action.as_object_mut(), detail.as_object()) {
            a.extend(d.clone());
        }
        let cmd = Command {
            action: json!({ "ssh": action }),
            fingerprint: String::new(),
            class: "dangerous",
            summary: reason,
            changes_state: true,
        };
        let _ = gate.deny(cmd, &decision).await;
        let _ = self.handle.channel_failure(self.id).await;
    }

    /// `exec` or `shell`: classify, decide (hold if the rule says so), then
    /// start it upstream or refuse it.
    // The gate's phases in order: classify, decide, hold, answer.
    #[allow(clippy::too_many_lines)]
    async fn request(
        &mut self,
        request: &'static str,
        command: Option<String>,
        agent: &mut Channel<Msg>,
        backlog: &mut Vec<ChannelMsg>,
    ) -> bool {
        if self.running.is_some() {
            let _ = self.handle.channel_failure(self.id).await;
            return true;
        }
        let (class, programs, why) = match &command {
            Some(c) => {
                let k = classify::classify(c);
                (k.class, k.programs, k.why)
            }
            None => (Class::Shell, Vec::new(), None),
        };
        let redacted = command.as_deref().map(redact_command);
        let shared = self.shared.clone();
        let ctx = &shared.ctx;
        let hash = crate::audit::keyed_hash(
            &ctx.services.correlation_key,
            command.as_deref().unwrap_or("shell").as_bytes(),
        );
        let summary = match &redacted {
            Some(c) => c.clone(),
            None => format!(
                "interactive shell{}",
                if self.pty.is_some() { " (pty)" } else { "" }
            ),
        };
        let action = json!({"ssh": {
            "request": request,
            "channel": self.index,
            "command": redacted,
            "class": class.as_str(),
            "programs": programs,
            "why": why,
            "pty": self.pty.as_ref().map(|p| &p.term),
            "env": self.env.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            "env_refused": self.refused_env,
            "hash": hash,
        }});
        let policy: Arc<PolicySet> = ctx.services.policy.current();
        let gate = gate_of(ctx);
        let decided_on = Action::Ssh {
            class: class.as_str(),
            destination: None,
        };
        let decision = gate.decide(&policy, &decided_on);
        let cmd = Command {
            action,
            fingerprint: hash.clone(),
            class: class.as_str(),
            summary: &summary,
            changes_state: class.changes_state(),
        };
        let mut outcome = gate.admit_action(cmd, &decision, None, &decided_on).await;
        if let Outcome::Held(mut hold) = outcome {
            let note = format!(
                "agentgate: held for approval as request {} (until {}); waiting\r\n",
                hold.request_id, hold.deadline
            );
            let _ = self
                .handle
                .extended_data(self.id, 1, bytes::Bytes::from(note.into_bytes()))
                .await;
            let answer = loop {
                tokio::select! {
                    a = hold.decided() => break Some(a),
                    m = agent.wait() => match m {
                        None | Some(ChannelMsg::Close) => break None,
                        Some(m) if backlog.len() < MAX_HELD_MESSAGES => backlog.push(m),
                        Some(_) => break None,
                    },
                }
            };
            let Some(a) = answer else {
                gate.cancel(hold).await;
                self.closed = true;
                return false;
            };
            outcome = gate.release(hold, a).await;
        }
        match outcome {
            Outcome::ForwardNow { recording } => {
                if let Err(e) = recording.await {
                    self.deny(&Denial {
                        kind: DenialKind::AuditUnavailable,
                        rule: decision.rule.clone(),
                        reason: e.to_string(),
                    })
                    .await;
                    return true;
                }
            }
            Outcome::Forward { .. } => {}
            Outcome::Deny(d) => {
                self.deny(&d).await;
                return true;
            }
            Outcome::Held(_) => unreachable!("released above"),
        }
        self.start(request, command, redacted, hash, &policy).await
    }

    /// Denied: the request is answered, then one line on stderr, exit
    /// status 126, EOF and close. Not a channel failure: OpenSSH's client
    /// answers a failed `exec` with its own message and exit status 255,
    /// dropping the reason; this way every client shows the rule and gets
    /// the shell's "cannot execute" status.
    async fn deny(&mut self, d: &Denial) {
        let _ = self.handle.channel_success(self.id).await;
        let line = format!("{}\r\n", denial_text(d));
        let _ = self
            .handle
            .extended_data(self.id, 1, bytes::Bytes::from(line.into_bytes()))
            .await;
        let _ = self.handle.exit_status_request(self.id, 126).await;
        let _ = self.handle.eof(self.id).await;
        let _ = self.handle.close(self.id).await;
        let _ = self.up.close().await;
        self.closed = true;
    }

    /// Allowed: open the recording, then forward pty, env and the request.
    async fn start(
        &mut self,
        request: &'static str,
        command: Option<String>,
        redacted: Option<String>,
        hash: String,
        policy: &PolicySet,
    ) -> bool {
        let ctx = &self.shared.ctx;
        let header = Header {
            width: self.pty.as_ref().map_or(80, |p| p.cols),
            height: self.pty.as_ref().map_or(24, |p| p.rows),
            timestamp: time::OffsetDateTime::now_utc().unix_timestamp(),
            command: redacted.or_else(|| Some("shell".into())),
            title: Some(format!("{} on {}", ctx.conn.identity, ctx.resource.name)),
        };
        let name = format!("conn-{}-ch{}-{}", ctx.conn.id, self.index, &hash[..12]);
        let recorder = match Recorder::create(&ctx.audit_dir, &name, &header) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot create the recording");
                self.deny(&Denial {
                    kind: DenialKind::AuditUnavailable,
                    rule: "agentgate:recording".into(),
                    reason: e.to_string(),
                })
                .await;
                return true;
            }
        };
        let masking: &MaskPolicy = policy.masking_for(&ctx.resource);
        let masker = (request == "exec" && masking.detectors_enabled())
            .then(|| LineMasker::new(masking.clone()));
        if let Some(p) = &self.pty {
            let _ = self
                .up
                .request_pty(false, &p.term, p.cols, p.rows, p.pix_w, p.pix_h, &p.modes)
                .await;
        }
        for (k, v) in &self.env {
            let _ = self.up.set_env(false, k.as_str(), v.as_str()).await;
        }
        let sent = match &command {
            Some(c) => self.up.exec(true, c.as_bytes()).await,
            None => self.up.request_shell(true).await,
        };
        self.running = Some(Running {
            request,
            hash,
            recorder,
            started: Instant::now(),
            exit_status: None,
            masker,
            detectors_hit: Vec::new(),
        });
        sent.is_ok()
    }

    /// Handles one message from the host; `false` ends the channel.
    async fn on_upstream(&mut self, m: ChannelMsg) -> bool {
        match m {
            ChannelMsg::Data { data } => return self.output(None, &data).await,
            ChannelMsg::ExtendedData { ext, data } => return self.output(Some(ext), &data).await,
            ChannelMsg::ExitStatus { exit_status } => {
                if let Some(r) = &mut self.running {
                    r.exit_status = Some(exit_status);
                }
                let _ = self.handle.exit_status_request(self.id, exit_status).await;
            }
            ChannelMsg::ExitSignal {
                signal_name,
                core_dumped,
                error_message,
                lang_tag,
            } => {
                let _ = self
                    .handle
                    .exit_signal_request(self.id, signal_name, core_dumped, error_message, lang_tag)
                    .await;
            }
            ChannelMsg::Success => {
                let _ = self.handle.channel_success(self.id).await;
            }
            ChannelMsg::Failure => {
                let _ = self.handle.channel_failure(self.id).await;
            }
            ChannelMsg::Eof => {
                if !self.flush_masked().await {
                    return false;
                }
                let _ = self.handle.eof(self.id).await;
            }
            ChannelMsg::Close => {
                let _ = self.flush_masked().await;
                let _ = self.handle.close(self.id).await;
                self.closed = true;
                return false;
            }
            _ => {}
        }
        true
    }

    /// Output toward the agent: masked (exec, by rule), recorded, sent.
    async fn output(&mut self, ext: Option<u32>, data: &[u8]) -> bool {
        let Some(r) = &mut self.running else {
            return true;
        };
        let stream = usize::from(ext.is_some());
        let out: Vec<u8> = match &mut r.masker {
            Some(m) => {
                let (bytes, hit) = m.push(stream, data);
                for h in hit {
                    if !r.detectors_hit.contains(&h) {
                        r.detectors_hit.push(h);
                    }
                }
                bytes
            }
            None => data.to_vec(),
        };
        self.send_out(ext, out).await
    }

    async fn send_out(&mut self, ext: Option<u32>, out: Vec<u8>) -> bool {
        if out.is_empty() {
            return true;
        }
        let Some(r) = &mut self.running else {
            return true;
        };
        let chunk = r.recorder.output(&out);
        if !self.chunk(chunk) {
            return false;
        }
        match ext {
            None => self
                .handle
                .data(self.id, bytes::Bytes::from(out))
                .await
                .is_ok(),
            Some(e) => self
                .handle
                .extended_data(self.id, e, bytes::Bytes::from(out))
                .await
                .is_ok(),
        }
    }

    async fn flush_masked(&mut self) -> bool {
        let Some(m) = self.running.as_mut().and_then(|r| r.masker.as_mut()) else {
            return true;
        };
        let (out, err, hit) = m.flush();
        if let Some(r) = &mut self.running {
            for h in hit {
                if !r.detectors_hit.contains(&h) {
                    r.detectors_hit.push(h);
                }
            }
        }
        self.send_out(None, out).await && self.send_out(Some(1), err).await
    }

    /// The channel ended: the last chunk and the command's result.
    fn finish(&mut self) {
        let Some(r) = self.running.take() else {
            return;
        };
        let Running {
            request,
            hash,
            recorder,
            started,
            exit_status,
            detectors_hit,
            ..
        } = r;
        let bytes = recorder.output_bytes;
        match recorder.finish(exit_status) {
            Ok(chunk) => self.append_chunk(&chunk),
            Err(e) => tracing::error!(error = %e, "recording's last chunk not written"),
        }
        let status = if exit_status == Some(0) {
            "ok"
        } else {
            "error"
        };
        let transform =
            (!detectors_hit.is_empty()).then(|| json!({"masked": {"detectors": detectors_hit}}));
        let gate = gate_of(self.ctx());
        gate.completed(
            json!({"ssh": {"request": request, "channel": self.index, "hash": hash}}),
            transform,
            &ResultRecord::Completed {
                status,
                command: exit_status.map(|s| format!("exit-status {s}")),
                rows: 0,
                bytes,
                duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                sqlstate: None,
            },
        );
    }
}

/// A denial in one line, as the client shows it (`agentgate: ...`).
fn denial_text(d: &Denial) -> String {
    let why = match &d.kind {
        DenialKind::Policy => format!("denied by rule {}: {}", d.rule, d.reason),
        DenialKind::Approval { request } | DenialKind::Withdrawn { request } => {
            format!("not approved (request {request}): {}", d.reason)
        }
        DenialKind::AuditUnavailable => {
            format!("not run: the audit log is unavailable ({})", d.reason)
        }
    };
    format!("agentgate: {}", why.replace(['\r', '\n'], " "))
}

/// The command as records, approvers and recordings see it: secret-looking
/// arguments replaced ([`classify::redact`]) and every value detector's
/// hits redacted, whatever the masking rules (raw PII never enters the log).
fn redact_command(c: &str) -> String {
    let text = classify::redact(c, crate::gate::MAX_SUMMARY_CHARS);
    let all = MaskPolicy::new(
        Vec::new(),
        crate::mask::DetectorSet::ALL,
        crate::mask::Strategy::Redact,
    );
    all.mask_value(&text, None).text.into_owned()
}

enum Side {
    Agent(Option<ChannelMsg>),
    Up(Option<ChannelMsg>),
    /// Output held for a line end waited long enough.
    Tick,
}

/// Masks exec output line by line (a value split across packets is still
/// seen whole): bytes up to the last newline are scanned and sent; the rest
/// waits for more, up to [`LineMasker::MAX_LINE`] bytes or
/// [`LineMasker::HOLD`] (a prompt or a protocol like `scp` waits for an
/// answer to output that has no line end). Output that is not UTF-8 is
/// scanned and sent as its lossy text (binary transfers under a detector
/// rule are altered: masking wins over byte fidelity).
struct LineMasker {
    policy: MaskPolicy,
    pending: [Vec<u8>; 2],
}

impl LineMasker {
    /// A longer line is scanned and sent as it is.
    const MAX_LINE: usize = 16 * 1024;
    /// How long a line without its end is held.
    const HOLD: Duration = Duration::from_millis(50);

    fn has_pending(&self) -> bool {
        self.pending.iter().any(|p| !p.is_empty())
    }

    fn new(policy: MaskPolicy) -> Self {
        Self {
            policy,
            pending: [Vec::new(), Vec::new()],
        }
    }

    fn push(&mut self, stream: usize, data: &[u8]) -> (Vec<u8>, Vec<&'static str>) {
        let p = &mut self.pending[stream];
        p.extend_from_slice(data);
        let cut = if p.len() > Self::MAX_LINE {
            p.len()
        } else {
            match memchr::memrchr(b'\n', p) {
                Some(i) => i + 1,
                None => return (Vec::new(), Vec::new()),
            }
        };
        let ready: Vec<u8> = p.drain(..cut).collect();
        self.mask(&ready)
    }

    fn flush(&mut self) -> (Vec<u8>, Vec<u8>, Vec<&'static str>) {
        let out = std::mem::take(&mut self.pending[0]);
        let err = std::mem::take(&mut self.pending[1]);
        let (o, mut h1) = self.mask(&out);
        let (e, h2) = self.mask(&err);
        h1.extend(h2);
        (o, e, h1)
    }

    fn mask(&self, bytes: &[u8]) -> (Vec<u8>, Vec<&'static str>) {
        if bytes.is_empty() {
            return (Vec::new(), Vec::new());
        }
        // Output that is not UTF-8 is scanned as its lossy text: masking
        // wins over byte fidelity for exec output under a detector rule.
        let text = String::from_utf8_lossy(bytes);
        let m = self.policy.mask_value(&text, None);
        if m.changed {
            (m.text.into_owned().into_bytes(), m.detectors_hit)
        } else {
            (bytes.to_vec(), Vec::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::{DetectorSet, Strategy};

    #[test]
    fn the_line_masker_masks_values_split_across_packets() {
        let policy = MaskPolicy::new(Vec::new(), DetectorSet::ALL, Strategy::Redact);
        let mut m = LineMasker::new(policy);
        let (a, _) = m.push(0, b"ssn 123-45-");
        assert!(a.is_empty());
        let (b, hit) = m.push(0, b"6789 ok\nnext");
        let b = String::from_utf8(b).unwrap();
        assert!(!b.contains("6789"), "{b}");
        assert_eq!(hit, ["us_ssn"]);
        let (rest, _, _) = m.flush();
        assert_eq!(rest, b"next");
    }
}
