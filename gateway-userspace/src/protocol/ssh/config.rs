//! `[proxy.ssh]`: the SSH handler's keys, limits and per-resource upstream
//! credentials. Unknown keys are refused; a resource whose credential cannot
//! be read refuses its connections (fails closed), it never falls back to
//! the agent's own keys.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::Deserialize;

/// The whole section.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct SshConfig {
    /// The proxy's host CA key (created 0600 if absent).
    pub host_ca_key: PathBuf,
    /// The proxy's own host key, which the CA certifies per connection.
    pub host_key: PathBuf,
    /// The `known_hosts` file whose marked block holds the host CA's
    /// `@cert-authority` line for every SSH resource's names.
    pub known_hosts: PathBuf,
    /// Longest packet either side may send (bytes).
    pub max_packet_bytes: u32,
    /// Flow-control window offered per channel (bytes).
    pub window_bytes: u32,
    /// Channels a connection may open over its life.
    pub max_channels: u32,
    /// Authentication attempts before the connection is closed.
    pub max_auth_attempts: usize,
    /// Nothing received for this long: closed.
    pub idle_timeout_secs: u64,
    /// A connection's whole life.
    pub max_session_secs: u64,
    /// Key exchange and authentication must finish within this.
    pub handshake_timeout_secs: u64,
    /// Environment variables passed on (`env` requests); `*` ends a prefix.
    pub env_allow: Vec<String>,
    /// Upstream credentials by resource name.
    pub resources: BTreeMap<String, ResourceCredential>,
}

impl Default for SshConfig {
    fn default() -> Self {
        Self {
            host_ca_key: PathBuf::from("/var/lib/agentgate/ssh/host_ca"),
            host_key: PathBuf::from("/var/lib/agentgate/ssh/proxy_host_key"),
            known_hosts: PathBuf::from("/etc/ssh/ssh_known_hosts"),
            max_packet_bytes: 32 * 1024,
            window_bytes: 2 * 1024 * 1024,
            max_channels: 16,
            max_auth_attempts: 6,
            idle_timeout_secs: 600,
            max_session_secs: 8 * 3600,
            handshake_timeout_secs: 20,
            env_allow: vec!["LANG".into(), "LC_*".into(), "TERM".into()],
            resources: BTreeMap::new(),
        }
    }
}

/// How the daemon logs in to one SSH resource's host.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ResourceCredential {
    /// The login on the host (the certificate's principal).
    pub user: String,
    /// A CA private key the host trusts (`TrustedUserCAKeys`): the daemon
    /// signs a short-lived certificate per connection. Preferred.
    pub user_ca_key: Option<PathBuf>,
    /// Or a private key the host accepts (`authorized_keys`).
    pub key_file: Option<PathBuf>,
    /// How long a signed certificate is valid.
    #[serde(default = "default_cert_minutes")]
    pub cert_minutes: u64,
    /// The host keys to accept (OpenSSH `known_hosts` format).
    pub known_hosts: Option<PathBuf>,
    /// Or the public key of a host CA: the host must present a host
    /// certificate it signed, valid now, for the address or name dialled.
    /// At least one of the two; a host matching neither is refused.
    pub host_ca: Option<PathBuf>,
}

fn default_cert_minutes() -> u64 {
    5
}

impl SshConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(1024..=256 * 1024).contains(&self.max_packet_bytes) {
            return Err("max_packet_bytes must be 1024..=262144".into());
        }
        if !(self.max_packet_bytes..=64 * 1024 * 1024).contains(&self.window_bytes) {
            return Err("window_bytes must be max_packet_bytes..=64 MiB".into());
        }
        if self.max_channels == 0 || self.max_auth_attempts == 0 {
            return Err("max_channels and max_auth_attempts must be at least 1".into());
        }
        for (name, r) in &self.resources {
            match (&r.user_ca_key, &r.key_file) {
                (Some(_), None) | (None, Some(_)) => {}
                _ => {
                    return Err(format!(
                        "resources.{name}: exactly one of user_ca_key and key_file"
                    ));
                }
            }
            if r.known_hosts.is_none() && r.host_ca.is_none() {
                return Err(format!(
                    "resources.{name}: known_hosts or host_ca (or both) must be set"
                ));
            }
            if r.user.is_empty() || r.cert_minutes == 0 || r.cert_minutes > 24 * 60 {
                return Err(format!(
                    "resources.{name}: user must be set and cert_minutes 1..=1440"
                ));
            }
        }
        Ok(())
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }

    /// Is `name` on the `env` allow list?
    pub fn env_allowed(&self, name: &str) -> bool {
        self.env_allow.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => p == name,
        })
    }
}

/// Checks `[proxy.ssh]` in a whole config text (errors with line and column).
pub fn check(text: &str) -> Result<(), String> {
    let c = super::super::section::<SshConfig>(text, "ssh")
        .map_err(|e| format!("[proxy.ssh]: {}", e.to_string().trim_end()))?;
    if let Some(c) = c {
        c.validate().map_err(|e| format!("[proxy.ssh]: {e}"))?;
    }
    Ok(())
}
