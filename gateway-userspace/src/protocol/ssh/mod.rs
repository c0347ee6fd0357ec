//! SSH at L7 for `protocol = "ssh"` resources: every channel request
//! decided by the gate, sessions recorded, and the host's credential held
//! by the daemon.
//!
//! - [`classify`]: the `exec` command's class, from a shell-aware lexer (sans-IO, fuzzed).
//! - [`keys`]: the proxy's host CA and host key, user certificates, the
//!   `known_hosts` block.
//! - [`config`]: `[proxy.ssh]` (limits, env allow list, per-resource credentials).
//! - [`proxy`]: the connection (russh server to the agent, russh client to the host).
//! - [`sftp`]: the SFTP wire format the relay judges (sans-IO, fuzzed).
//!
//! Fails closed, as each module states: an unknown command is `dangerous`,
//! a host whose key is not in the resource's `known_hosts` is refused, a
//! request whose record or recording cannot be written is not run, and
//! what is not decoded (other subsystems, SFTP extensions, remote
//! forwarding) is refused. The agent trusts the proxy through the host CA:
//! the handler keeps an `@cert-authority` line for every SSH resource in a
//! marked block of `[proxy.ssh] known_hosts` (refreshed when the resources
//! change).

pub mod classify;
pub mod config;
pub mod keys;
pub mod proxy;
pub mod sftp;

use std::sync::{Arc, Mutex};

use tokio::net::TcpStream;

use super::{Attributed, BoxFuture, Handler, HandlerError, Registration, Services};
use crate::policy::{PolicySet, Protocol};

/// The SSH handler's place in [`super::REGISTRY`].
pub const REGISTRATION: Registration = Registration {
    protocol: Protocol::Ssh,
    section: "ssh",
    check: config::check,
    build: |section| {
        let c: config::SshConfig = match section {
            None => config::SshConfig::default(),
            Some(v) => v.clone().try_into().map_err(|e| e.to_string())?,
        };
        c.validate()?;
        Ok(Arc::new(Ssh {
            config: Arc::new(c),
            keys: Mutex::new(None),
            known_hosts: Mutex::new(Vec::new()),
        }))
    },
};

/// The handler: its section, its keys (loaded, or created, at the first
/// connection) and the `known_hosts` lines it last wrote.
pub struct Ssh {
    config: Arc<config::SshConfig>,
    keys: Mutex<Option<Arc<proxy::ProxyKeys>>>,
    known_hosts: Mutex<Vec<String>>,
}

impl Ssh {
    fn keys(&self) -> Result<Arc<proxy::ProxyKeys>, keys::KeyError> {
        let mut k = self.keys.lock().expect("keys lock");
        if let Some(k) = &*k {
            return Ok(k.clone());
        }
        let loaded = Arc::new(proxy::ProxyKeys {
            host_ca: keys::load_or_create(&self.config.host_ca_key, "agentgate ssh host CA")?,
            host_key: keys::load_or_create(&self.config.host_key, "agentgate ssh proxy")?,
        });
        *k = Some(loaded.clone());
        Ok(loaded)
    }

    /// Rewrites the `@cert-authority` block when the SSH resources changed.
    /// The agent's client reads `known_hosts` only after key exchange, so
    /// doing this as a connection starts is early enough for that connection.
    fn refresh_known_hosts(&self, pk: &proxy::ProxyKeys, policy: &PolicySet) {
        let mut patterns: Vec<String> = policy
            .resources()
            .iter()
            .filter(|r| r.protocol == Protocol::Ssh)
            .flat_map(|r| proxy::resource_names(r).1)
            .collect();
        patterns.sort();
        patterns.dedup();
        let mut last = self.known_hosts.lock().expect("known_hosts lock");
        if *last == patterns {
            return;
        }
        let lines = if patterns.is_empty() {
            Vec::new()
        } else {
            // The CA line for OpenSSH; the proxy's own key for clients that
            // do not read `@cert-authority` (paramiko).
            let plain = pk
                .host_key
                .public_key()
                .to_openssh()
                .map(|k| format!("{} {k}", patterns.join(",")));
            match keys::cert_authority_line(&pk.host_ca, &patterns).and_then(|ca| {
                plain
                    .map(|p| vec![ca, p])
                    .map_err(|e| keys::KeyError::Sign(e.to_string()))
            }) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "cannot write the SSH host CA line");
                    return;
                }
            }
        };
        match keys::write_known_hosts_block(&self.config.known_hosts, &lines) {
            Ok(()) => *last = patterns,
            Err(e) => tracing::error!(error = %e, "cannot write the SSH known_hosts block"),
        }
    }
}

impl Handler for Ssh {
    fn serve(
        &self,
        client: TcpStream,
        conn: Attributed,
        services: Services,
    ) -> BoxFuture<'_, Result<(), HandlerError>> {
        Box::pin(async move {
            let keys = self.keys()?;
            self.refresh_known_hosts(&keys, &services.policy.current());
            let ctx = proxy::SshContext {
                conn: conn.conn,
                subject: conn.subject,
                resource: conn.resource,
                audit_dir: services.audit_dir.clone(),
                services,
                config: self.config.clone(),
                keys,
            };
            proxy::serve(client, ctx).await.map_err(Into::into)
        })
    }

    fn refuse<'a>(
        &'a self,
        client: TcpStream,
        _rule: &'a str,
        _reason: &'a str,
    ) -> BoxFuture<'a, ()> {
        // SSH has no message before key exchange that a client shows; the
        // refusal is on record, the socket is closed.
        Box::pin(async move { drop(client) })
    }
}
