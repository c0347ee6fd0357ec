//! The daemon's configuration file (TOML).
//!
//! Unknown keys are errors and every error names the file, line and column: a
//! bad config refuses to start, it never falls back to defaults silently. The
//! defaults below apply only to keys the file leaves out.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[derive(Default)]
pub struct Config {
    pub daemon: DaemonConfig,
    pub proxy: ProxyConfig,
    pub policy: PolicyConfig,
    pub audit: crate::audit::AuditConfig,
    /// `OpenID` provider and service accounts; without it only label identities exist.
    pub identity: Option<crate::identity::IdentityConfig>,
    pub containment: ContainmentConfig,
    /// `[api]`: the HTTP API, web page and metrics.
    pub api: ApiConfig,
    pub approvals: ApprovalsConfig,
}

/// `[approvals]`: who may vote besides verified identities, what a ticket
/// id looks like, and where decisions are announced.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ApprovalsConfig {
    /// Label identities (`[daemon] label_identities`) may vote. For local
    /// trials only: a label is a name anyone with root can claim, and the
    /// record marks such a vote `kind = "label"`.
    pub allow_labels: bool,
    /// A regular expression a ticket id must match entirely. Without one, a
    /// ticket is 1 to 128 characters of `A-Z a-z 0-9 . _ : / # -`.
    pub ticket_pattern: Option<String>,
    /// `[[approvals.webhook]]`: notified of each new request and decision.
    pub webhook: Vec<WebhookConfig>,
}

/// Longest `ticket_pattern` accepted.
pub const MAX_TICKET_PATTERN: usize = 1024;

impl ApprovalsConfig {
    /// The ticket pattern, compiled and anchored.
    pub fn ticket_regex(&self) -> Result<Option<regex::Regex>, String> {
        let Some(p) = &self.ticket_pattern else {
            return Ok(None);
        };
        if p.is_empty() || p.len() > MAX_TICKET_PATTERN {
            return Err(format!(
                "ticket_pattern must be 1 to {MAX_TICKET_PATTERN} bytes"
            ));
        }
        regex::RegexBuilder::new(&format!("^(?:{p})$"))
            .size_limit(1 << 20)
            .build()
            .map(Some)
            .map_err(|e| format!("ticket_pattern is not a valid regular expression: {e}"))
    }

    fn validate(&self) -> Result<(), String> {
        self.ticket_regex()?;
        for w in &self.webhook {
            w.validate()?;
        }
        Ok(())
    }
}

/// `[api]`: the daemon's HTTP server (JSON API, approvals page, `/metrics`).
/// Loopback by default; anywhere else it must serve TLS (rustls), and the
/// daemon refuses to start without `tls_cert` and `tls_key`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    pub enabled: bool,
    pub listen: std::net::SocketAddr,
    /// PEM certificate chain and private key (rustls).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Open connections at once; more are closed at accept.
    pub max_connections: usize,
    /// Largest request body (JSON or form).
    pub max_body_bytes: usize,
    /// From accept to a complete request head.
    pub header_timeout_secs: u64,
    /// From a complete head to the answer.
    pub request_timeout_secs: u64,
    /// `[api.web]`: the approvals page's OIDC login (authorization code +
    /// PKCE against `[identity]`'s issuer). Without it the page is off.
    pub web: Option<WebConfig>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WebConfig {
    /// The provider's client for the page (public, PKCE).
    pub client_id: String,
    /// Where the provider sends the browser back; default derived from
    /// `listen` (`http(s)://LISTEN/callback`).
    #[serde(default)]
    pub redirect_url: Option<String>,
    /// How long a signed-in page session lasts.
    #[serde(default = "default_session_secs")]
    pub session_secs: u64,
}

fn default_session_secs() -> u64 {
    3600
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            listen: (Ipv4Addr::LOCALHOST, 15080).into(),
            tls_cert: None,
            tls_key: None,
            max_connections: 256,
            max_body_bytes: 16 * 1024,
            header_timeout_secs: 10,
            request_timeout_secs: 30,
            web: None,
        }
    }
}

impl ApiConfig {
    /// Whether the server must (and does) serve TLS: anywhere but loopback.
    pub fn needs_tls(&self) -> bool {
        !self.listen.ip().is_loopback()
    }

    /// The page's OIDC redirect URL.
    pub fn redirect_url(&self) -> Option<String> {
        let web = self.web.as_ref()?;
        Some(web.redirect_url.clone().unwrap_or_else(|| {
            let scheme = if self.tls_cert.is_some() {
                "https"
            } else {
                "http"
            };
            format!("{scheme}://{}/callback", self.listen)
        }))
    }

    fn validate(&self) -> Result<(), String> {
        if self.needs_tls() && (self.tls_cert.is_none() || self.tls_key.is_none()) {
            return Err(format!(
                "listen = \"{}\" is not loopback: set tls_cert and tls_key (the API is served over TLS only there)",
                self.listen
            ));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err("set both tls_cert and tls_key, or neither".into());
        }
        if !(1..=65_536).contains(&self.max_connections) {
            return Err("max_connections must be between 1 and 65536".into());
        }
        if !(1024..=1024 * 1024).contains(&self.max_body_bytes) {
            return Err("max_body_bytes must be between 1024 and 1048576".into());
        }
        if !(1..=300).contains(&self.header_timeout_secs)
            || !(1..=300).contains(&self.request_timeout_secs)
        {
            return Err(
                "header_timeout_secs and request_timeout_secs must be between 1 and 300".into(),
            );
        }
        if let Some(web) = &self.web {
            if web.client_id.is_empty() || web.client_id.len() > 256 {
                return Err("web.client_id must be 1 to 256 characters".into());
            }
            if !(60..=86_400).contains(&web.session_secs) {
                return Err("web.session_secs must be between 60 and 86400".into());
            }
            if let Some(u) = &web.redirect_url
                && url::Url::parse(u).is_err()
            {
                return Err(format!("web.redirect_url {u:?} is not a URL"));
            }
            if web.redirect_url.is_none() && self.listen.ip().is_unspecified() {
                return Err(format!(
                    "listen = \"{}\" names no host a browser can come back to: set web.redirect_url",
                    self.listen
                ));
            }
        }
        Ok(())
    }
}

/// `[[approvals.webhook]]`: where approval events are sent (`POST`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub url: String,
    #[serde(default)]
    pub format: WebhookFormat,
    /// File holding the HMAC-SHA256 key (mode 0600 or 0400); the body's MAC
    /// goes in `X-Agentgate-Signature: sha256=<hex>`.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Attempts per event, the first included (exponential backoff between).
    #[serde(default = "default_webhook_attempts")]
    pub max_attempts: u32,
    /// Delay before the first retry; doubled each time, at most 60 s.
    #[serde(default = "default_webhook_backoff")]
    pub backoff_ms: u64,
    /// Per delivery attempt.
    #[serde(default = "default_webhook_timeout")]
    pub timeout_ms: u64,
    /// Events waiting for this hook; more are dropped (and counted).
    #[serde(default = "default_webhook_queue")]
    pub queue: usize,
}

#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum WebhookFormat {
    #[default]
    Json,
    Slack,
}

fn default_webhook_attempts() -> u32 {
    5
}
fn default_webhook_backoff() -> u64 {
    500
}
fn default_webhook_timeout() -> u64 {
    5000
}
fn default_webhook_queue() -> usize {
    256
}

impl WebhookConfig {
    pub fn validate(&self) -> Result<(), String> {
        let u =
            url::Url::parse(&self.url).map_err(|e| format!("webhook url {:?}: {e}", self.url))?;
        let loopback = u.host_str().is_some_and(|h| {
            h == "localhost"
                || h.trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        });
        match u.scheme() {
            "https" => {}
            "http" if loopback => {}
            _ => {
                return Err(format!(
                    "webhook url {:?}: https, or http on loopback only",
                    self.url
                ));
            }
        }
        if !(1..=20).contains(&self.max_attempts) {
            return Err("webhook max_attempts must be between 1 and 20".into());
        }
        if !(10..=60_000).contains(&self.backoff_ms) {
            return Err("webhook backoff_ms must be between 10 and 60000".into());
        }
        if !(100..=60_000).contains(&self.timeout_ms) {
            return Err("webhook timeout_ms must be between 100 and 60000".into());
        }
        if !(1..=100_000).contains(&self.queue) {
            return Err("webhook queue must be between 1 and 100000".into());
        }
        Ok(())
    }
}

/// `[containment]`: what a tagged process may reach besides the proxy, and
/// what happens to one that leaves its cgroup. Unix-socket paths are policy
/// (`[[allow_unix]]`); these are host settings.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ContainmentConfig {
    /// DNS resolvers tagged processes may query (through the daemon's
    /// forwarder, which logs each query). Empty: the `nameserver`s of
    /// /etc/resolv.conf at start. Port 53 unless given (`"10.0.0.2:5353"`).
    pub dns_resolvers: Vec<String>,
    /// Longest label and longest name a query may carry; longer ones look
    /// like a tunnel and are refused (DNS allows 63 and 253).
    pub dns_max_label_bytes: usize,
    pub dns_max_name_bytes: usize,
    /// Query types forwarded; any other type is refused.
    pub dns_query_types: Vec<String>,
    /// Queries in flight at once, over all tagged processes; more are refused.
    pub dns_max_in_flight: usize,
    /// How long the forwarder waits for a resolver.
    pub dns_timeout_ms: u64,
    /// A process that leaves a tagged cgroup for an ungoverned one:
    /// `"kill"` (SIGKILL, then the record) or `"record"`.
    pub on_escape: OnEscape,
    /// Packets to tagged processes' sockets: `"loopback"` only (nothing
    /// dials in from another host) or `"any"` (agents that serve others).
    pub inbound: Inbound,
}

#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Inbound {
    Loopback,
    Any,
}

#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnEscape {
    Kill,
    Record,
}

impl Default for ContainmentConfig {
    fn default() -> Self {
        Self {
            dns_resolvers: Vec::new(),
            dns_max_label_bytes: 40,
            dns_max_name_bytes: 160,
            dns_query_types: [
                "A", "AAAA", "CNAME", "PTR", "MX", "SRV", "TXT", "NS", "SOA", "HTTPS", "SVCB",
            ]
            .map(String::from)
            .to_vec(),
            dns_max_in_flight: 256,
            dns_timeout_ms: 5000,
            on_escape: OnEscape::Kill,
            inbound: Inbound::Loopback,
        }
    }
}

impl ContainmentConfig {
    /// The resolvers, parsed: the configured ones, or /etc/resolv.conf's.
    pub fn resolvers(&self) -> Result<Vec<std::net::SocketAddr>, String> {
        if self.dns_resolvers.is_empty() {
            let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
            return Ok(resolv_conf_nameservers(&text));
        }
        self.dns_resolvers
            .iter()
            .map(|r| {
                parse_resolver(r)
                    .ok_or_else(|| format!("dns_resolvers: `{r}` is not an IP address or IP:port"))
            })
            .collect()
    }

    fn validate(&self) -> Result<(), String> {
        self.resolvers()?;
        if self.resolvers()?.len() > MAX_RESOLVERS {
            return Err(format!("at most {MAX_RESOLVERS} dns_resolvers"));
        }
        if !(1..=63).contains(&self.dns_max_label_bytes) {
            return Err("dns_max_label_bytes must be between 1 and 63".into());
        }
        if !(1..=253).contains(&self.dns_max_name_bytes) {
            return Err("dns_max_name_bytes must be between 1 and 253".into());
        }
        for t in &self.dns_query_types {
            if crate::containment::dns::qtype_code(t).is_none() {
                return Err(format!("dns_query_types: unknown type `{t}`"));
            }
        }
        if !(1..=65_536).contains(&self.dns_max_in_flight) {
            return Err("dns_max_in_flight must be between 1 and 65536".into());
        }
        if !(100..=60_000).contains(&self.dns_timeout_ms) {
            return Err("dns_timeout_ms must be between 100 and 60000".into());
        }
        Ok(())
    }
}

/// Resolvers the kernel map holds at most (one forwarder each).
pub const MAX_RESOLVERS: usize = 16;

fn parse_resolver(text: &str) -> Option<std::net::SocketAddr> {
    text.parse::<std::net::SocketAddr>().ok().or_else(|| {
        text.parse::<std::net::IpAddr>()
            .ok()
            .map(|ip| (ip, 53).into())
    })
}

/// `nameserver` lines of resolv.conf (port 53), in order, at most `MAX_RESOLVERS`.
pub fn resolv_conf_nameservers(text: &str) -> Vec<std::net::SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| {
            let ip = rest.split_whitespace().next()?;
            // A scoped IPv6 address (`fe80::1%eth0`) keeps no scope here.
            ip.split('%').next()?.parse::<std::net::IpAddr>().ok()
        })
        .map(|ip| (ip, 53).into())
        .take(MAX_RESOLVERS)
        .collect()
}

/// What happens to tagged cgroups when the daemon is not running.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum FailMode {
    /// Programs stay attached (pinned links): tagged processes reach nothing.
    Closed,
    /// Programs detach with the daemon: tagged processes connect directly.
    Open,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Bindings, keys and (by default) the audit log live here.
    pub state_dir: PathBuf,
    pub control_socket: PathBuf,
    /// cgroup the eBPF programs attach to, relative to the cgroup2 mount.
    /// Every cgroup that can be tagged must be at or below it.
    pub attach_cgroup: PathBuf,
    /// Where `agentgate exec` creates its cgroups, relative to the cgroup2 mount.
    pub exec_cgroup: PathBuf,
    pub fail_mode: FailMode,
    /// bpffs directory for pinned links (fail-closed mode).
    pub bpffs_dir: PathBuf,
    /// Identities accepted without OIDC verification, for local trials and
    /// tests. Audit records mark them `kind = "label"`. Production configs
    /// should list none: then only verified identities can be bound.
    pub label_identities: Vec<LabelIdentity>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LabelIdentity {
    pub name: String,
    #[serde(default)]
    pub groups: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Directory of policy files (`agentgate policy check DIR` validates it).
    pub dir: PathBuf,
    /// How often the directory is checked for changes (SIGHUP reloads at once).
    pub watch_interval_secs: u64,
    /// How often DNS names in resource addresses are resolved again.
    pub dns_refresh_secs: u64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            dir: "/etc/agentgate/policies".into(),
            watch_interval_secs: 2,
            dns_refresh_secs: 60,
        }
    }
}

impl Default for DaemonConfig {
    fn default() -> Self {
        Self {
            state_dir: "/var/lib/agentgate".into(),
            control_socket: "/run/agentgate/control.sock".into(),
            attach_cgroup: "/".into(),
            exec_cgroup: "agentgate".into(),
            fail_mode: FailMode::Closed,
            bpffs_dir: "/sys/fs/bpf/agentgate".into(),
            label_identities: Vec::new(),
        }
    }
}

/// `[proxy]`. Not `deny_unknown_fields` (serde cannot combine it with
/// `flatten`): keys it does not know land in `handlers`, and
/// [`crate::protocol::check_sections`] refuses those no handler owns.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ProxyConfig {
    pub listen_v4: Ipv4Addr,
    pub listen_v6: Ipv6Addr,
    pub port: u16,
    /// `sk_msg` fast path between agent and proxy sockets (see DESIGN.md); on
    /// by default, `false` keeps every byte on the loopback TCP path.
    pub fast_path: bool,
    /// Live proxied connections; more are refused.
    pub max_connections: usize,
    pub upstream_connect_timeout_ms: u64,
    /// Relay buffer per direction.
    pub buffer_bytes: usize,
    /// `[proxy.<handler>]` sections (e.g. `[proxy.postgres]`), kept as TOML:
    /// each is parsed and checked by its protocol handler (see
    /// [`crate::protocol`]); a section no handler registered is an error.
    #[serde(flatten)]
    pub handlers: toml::Table,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen_v4: Ipv4Addr::LOCALHOST,
            listen_v6: Ipv6Addr::LOCALHOST,
            port: 15001,
            fast_path: true,
            max_connections: 4096,
            upstream_connect_timeout_ms: 5000,
            buffer_bytes: 64 * 1024,
            handlers: toml::Table::new(),
        }
    }
}

impl ProxyConfig {
    pub fn upstream_connect_timeout(&self) -> Duration {
        Duration::from_millis(self.upstream_connect_timeout_ms)
    }
}

impl Config {
    /// Reads and parses a config file. A missing file is an error: callers that
    /// want the built-in defaults say so explicitly with `Config::default()`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses config text; `path` is used for messages and to resolve relative paths.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let mut cfg: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        cfg.validate(path)?;
        crate::protocol::check_sections(text, cfg.proxy.handlers.keys()).map_err(|message| {
            ConfigError::Parse {
                path: path.into(),
                message,
            }
        })?;
        // Relative file paths in the config are relative to the config file.
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut cfg.daemon.state_dir,
            &mut cfg.daemon.control_socket,
            &mut cfg.daemon.bpffs_dir,
        ]
        .into_iter()
        .chain(cfg.api.tls_cert.as_mut())
        .chain(cfg.api.tls_key.as_mut())
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: path.into(),
            message,
        };
        self.audit
            .validate()
            .map_err(|e| invalid(format!("[audit] {e}")))?;
        if self.proxy.port == 0 {
            return Err(invalid(
                "proxy.port must not be 0: the kernel programs need a fixed port".into(),
            ));
        }
        if self.policy.watch_interval_secs == 0 || self.policy.dns_refresh_secs == 0 {
            return Err(invalid(
                "policy.watch_interval_secs and policy.dns_refresh_secs must be at least 1".into(),
            ));
        }
        if self.proxy.max_connections == 0 {
            return Err(invalid("proxy.max_connections must be at least 1".into()));
        }
        if !(4096..=16 * 1024 * 1024).contains(&self.proxy.buffer_bytes) {
            return Err(invalid(
                "proxy.buffer_bytes must be between 4096 and 16777216".into(),
            ));
        }
        self.containment
            .validate()
            .map_err(|e| invalid(format!("[containment] {e}")))?;
        self.approvals
            .validate()
            .map_err(|e| invalid(format!("[approvals] {e}")))?;
        self.api
            .validate()
            .map_err(|e| invalid(format!("[api] {e}")))?;
        if self.api.web.is_some() && self.identity.is_none() {
            return Err(invalid(
                "[api.web] needs [identity]: the page signs approvers in with its issuer".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_documented_defaults() {
        let c = Config::parse(Path::new("/etc/agentgate/agentgate.toml"), "").unwrap();
        assert_eq!(c.proxy.port, 15001);
        assert_eq!(c.daemon.fail_mode, FailMode::Closed);
        assert!(c.proxy.fast_path);
    }

    #[test]
    fn unknown_key_is_rejected_with_its_line() {
        let err =
            Config::parse(Path::new("a.toml"), "[proxy]\nport = 1\nfastpath = true\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("a.toml: "), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
        assert!(msg.contains("fastpath"), "{msg}");
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let c = Config::parse(
            Path::new("/x/y/agentgate.toml"),
            "[daemon]\nstate_dir = \"state\"\n",
        )
        .unwrap();
        assert_eq!(c.daemon.state_dir, Path::new("/x/y/state"));
    }

    #[test]
    fn containment_resolvers_and_limits() {
        let c = Config::parse(
            Path::new("a.toml"),
            "[containment]\ndns_resolvers = [\"127.0.0.53\", \"[::1]:5353\"]\non_escape = \"record\"\n",
        )
        .unwrap();
        assert_eq!(
            c.containment.resolvers().unwrap(),
            vec![
                "127.0.0.53:53".parse::<std::net::SocketAddr>().unwrap(),
                "[::1]:5353".parse().unwrap()
            ]
        );
        assert_eq!(c.containment.on_escape, OnEscape::Record);
        for bad in [
            "dns_resolvers = [\"resolver.local\"]",
            "dns_max_label_bytes = 64",
            "dns_query_types = [\"BOGUS\"]",
            "on_escape = \"ignore\"",
        ] {
            let err = Config::parse(Path::new("a.toml"), &format!("[containment]\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("a.toml: "), "{bad}: {err}");
        }
    }

    #[test]
    fn resolv_conf_nameservers_in_order() {
        let text = "# comment\nsearch example\nnameserver 10.0.0.2\nnameserver fe80::1%eth0\noptions edns0\nnameserver bogus\n";
        assert_eq!(
            resolv_conf_nameservers(text),
            vec![
                "10.0.0.2:53".parse::<std::net::SocketAddr>().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn api_defaults_to_loopback_and_needs_tls_elsewhere() {
        let c = Config::parse(Path::new("a.toml"), "").unwrap();
        assert_eq!(c.api.listen.to_string(), "127.0.0.1:15080");
        assert!(c.api.enabled && !c.api.needs_tls());
        let err = Config::parse(Path::new("a.toml"), "[api]\nlisten = \"0.0.0.0:15080\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("tls_cert"), "{err}");
        let c = Config::parse(
            Path::new("/etc/a.toml"),
            "[api]\nlisten = \"0.0.0.0:8443\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n",
        )
        .unwrap();
        assert_eq!(c.api.tls_cert.as_deref(), Some(Path::new("/etc/c.pem")));
        let err = Config::parse(Path::new("a.toml"), "[api.web]\nclient_id = \"w\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("[identity]"), "{err}");
    }

    #[test]
    fn approvals_section_is_read_and_checked() {
        let c = Config::parse(
            Path::new("a.toml"),
            "[approvals]\nallow_labels = true\nticket_pattern = \"CHG-[0-9]+\"\n",
        )
        .unwrap();
        assert!(c.approvals.allow_labels);
        let re = c.approvals.ticket_regex().unwrap().unwrap();
        assert!(re.is_match("CHG-42"));
        assert!(!re.is_match("xCHG-42"), "anchored");
        for bad in ["ticket_pattern = \"(\"", "allow_label = true"] {
            let err = Config::parse(Path::new("a.toml"), &format!("[approvals]\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("a.toml: "), "{bad}: {err}");
        }
    }

    #[test]
    fn webhooks_are_read_and_checked() {
        let c = Config::parse(
            Path::new("a.toml"),
            "[[approvals.webhook]]\nurl = \"https://hooks.example/a\"\nformat = \"slack\"\n",
        )
        .unwrap();
        assert_eq!(c.approvals.webhook[0].format, WebhookFormat::Slack);
        assert_eq!(c.approvals.webhook[0].max_attempts, 5);
        for bad in [
            "url = \"http://hooks.example/a\"",
            "url = \"ftp://127.0.0.1/a\"",
            "url = \"https://h/a\"\nmax_attempts = 0",
            "url = \"https://h/a\"\nqueue = 0",
        ] {
            let err = Config::parse(
                Path::new("a.toml"),
                &format!("[[approvals.webhook]]\n{bad}\n"),
            )
            .unwrap_err()
            .to_string();
            assert!(err.starts_with("a.toml: "), "{bad}: {err}");
        }
        Config::parse(
            Path::new("a.toml"),
            "[[approvals.webhook]]\nurl = \"http://127.0.0.1:9/a\"\n",
        )
        .unwrap();
    }

    #[test]
    fn port_zero_is_invalid() {
        assert!(Config::parse(Path::new("a.toml"), "[proxy]\nport = 0\n").is_err());
    }
}
