//! Policy types: the file format (`*Spec`, deserialized with unknown fields
//! rejected and spans kept for error positions) and the validated, runtime
//! form the daemon decides with. `policies/README.md` documents the format.

use std::{net::IpAddr, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use serde::Deserialize;
use toml::Spanned;

use super::glob::Glob;
use crate::sql::Classification;

// ---------------------------------------------------------------------------
// File format
// ---------------------------------------------------------------------------

/// One policy file. Every table rejects fields it does not know.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PolicyFileSpec {
    pub defaults: Option<DefaultsSpec>,
    #[serde(default, rename = "resource")]
    pub resources: Vec<Spanned<ResourceSpec>>,
    #[serde(default, rename = "rule")]
    pub rules: Vec<Spanned<RuleSpec>>,
    pub masking: Option<MaskingSpec>,
    #[serde(default, rename = "binding")]
    pub bindings: Vec<Spanned<BindingSpec>>,
    #[serde(default, rename = "allow_unix")]
    pub allow_unix: Vec<Spanned<AllowUnixSpec>>,
}

/// A Unix socket tagged processes may reach (everything else is refused).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AllowUnixSpec {
    pub path: Spanned<String>,
    #[allow(dead_code)]
    pub description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct DefaultsSpec {
    pub unknown_destination: Option<Spanned<UnknownDestination>>,
}

/// What happens to a tagged process's connection to an address no resource names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum UnknownDestination {
    #[default]
    Deny,
    Allow,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResourceSpec {
    pub name: Spanned<String>,
    #[allow(dead_code)]
    pub description: Option<String>,
    pub protocol: Spanned<Protocol>,
    pub addresses: Spanned<Vec<Spanned<String>>>,
    pub tls: Option<Spanned<TlsSpec>>,
    pub credential: Option<Spanned<CredentialSpec>>,
    pub default_action: Option<Spanned<ActionKind>>,
    pub default_approval: Option<Spanned<ApprovalSpecFile>>,
    /// HTTPS only: `false` relays the TLS connection unopened (pinned clients).
    pub intercept: Option<Spanned<bool>>,
    /// HTTP(S) only: an API profile (`openai`) with its own records and checks.
    pub profile: Option<Spanned<HttpProfile>>,
    /// `openai` profile: what a prompt carrying a detected value gets.
    pub prompt_dlp: Option<Spanned<PromptDlp>>,
}

/// What prompt DLP does with a model call whose body carries a detected value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptDlp {
    /// Replace each detected value in place and send the call.
    #[default]
    Mask,
    /// Refuse the call (403 with a problem body naming detector and path).
    Refuse,
}

/// An HTTP API whose calls the handler understands beyond method and path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpProfile {
    /// OpenAI-compatible model APIs: chat completions and Responses.
    Openai,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TlsSpec {
    pub mode: Option<TlsMode>,
    pub ca_file: Option<Spanned<PathBuf>>,
    pub server_name: Option<Spanned<String>>,
}

/// `credential = { user = "...", password_file = "/..." }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CredentialSpec {
    pub user: Spanned<String>,
    pub password_file: Spanned<PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ApprovalSpecFile {
    pub approver_groups: Spanned<Vec<Spanned<String>>>,
    pub quorum: Option<Spanned<i64>>,
    pub timeout: Spanned<String>,
    pub grant_window: Option<Spanned<String>>,
    pub grant_scope: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RuleSpec {
    pub name: Spanned<String>,
    #[allow(dead_code)]
    pub description: Option<String>,
    #[serde(default)]
    pub identities: Vec<Spanned<String>>,
    #[serde(default)]
    pub groups: Vec<Spanned<String>>,
    pub resources: Spanned<Vec<Spanned<String>>>,
    #[serde(rename = "match")]
    pub conditions: Option<Spanned<MatchSpec>>,
    pub action: Spanned<ActionKind>,
    pub approval: Option<Spanned<ApprovalSpecFile>>,
    /// SSH resources: the login on the host (the certificate's principal).
    pub ssh_user: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct MatchSpec {
    pub sql: Option<Spanned<Vec<Spanned<String>>>>,
    pub tables: Option<Spanned<Vec<Spanned<String>>>>,
    pub functions: Option<Spanned<Vec<Spanned<String>>>>,
    pub destructive: Option<Spanned<bool>>,
    pub http_methods: Option<Spanned<Vec<Spanned<String>>>>,
    pub http_hosts: Option<Spanned<Vec<Spanned<String>>>>,
    pub http_paths: Option<Spanned<Vec<Spanned<String>>>>,
    pub http_query: Option<Spanned<Vec<Spanned<String>>>>,
    pub http_json: Option<Spanned<Vec<Spanned<String>>>>,
    pub kube_verbs: Option<Spanned<Vec<Spanned<String>>>>,
    pub kube_resources: Option<Spanned<Vec<Spanned<String>>>>,
    pub kube_namespaces: Option<Spanned<Vec<Spanned<String>>>>,
    pub ssh: Option<Spanned<Vec<Spanned<String>>>>,
    pub ssh_destinations: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MaskingSpec {
    pub detectors: Option<Spanned<Vec<Spanned<String>>>>,
    pub detector_strategy: Option<Spanned<crate::mask::Strategy>>,
    pub detector_resources: Option<Spanned<Vec<Spanned<String>>>>,
    /// Values found by keyed fingerprint wherever the detectors run.
    pub protected_values_file: Option<Spanned<PathBuf>>,
    #[serde(default)]
    pub column: Vec<Spanned<ColumnSpec>>,
    /// `[[masking.json]]`: JSON field rules for HTTP bodies.
    #[serde(default)]
    pub json: Vec<Spanned<JsonMaskSpec>>,
}

/// `[[masking.json]] paths = ["$.customers[*].ssn"], strategy = "..."`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JsonMaskSpec {
    pub paths: Spanned<Vec<Spanned<String>>>,
    pub strategy: Spanned<crate::mask::Strategy>,
    pub resources: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ColumnSpec {
    pub columns: Spanned<Vec<Spanned<String>>>,
    pub strategy: Spanned<crate::mask::Strategy>,
    pub resources: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub predicates: crate::mask::Predicates,
    #[serde(default)]
    pub derived: crate::mask::Derived,
    /// Bounds on equality tests (see `mask::EqualityLimits`).
    pub max_equality_values: Option<Spanned<usize>>,
    pub equality_budget: Option<Spanned<u32>>,
    pub equality_window: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct BindingSpec {
    pub cgroup: Spanned<String>,
    pub identity: Spanned<String>,
    #[serde(default)]
    pub groups: Vec<Spanned<String>>,
}

/// The action a rule (or a resource default) takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    Allow,
    Deny,
    RequireApproval,
}

// ---------------------------------------------------------------------------
// Runtime form
// ---------------------------------------------------------------------------

/// Wire protocol of a resource; selects the protocol handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Postgres,
    Mysql,
    Http,
    /// HTTP inside TLS: the agent's TLS ends at the gateway (a leaf from the
    /// local CA), the upstream gets TLS again.
    Https,
    Tcp,
    Ssh,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Postgres => "postgres",
            Protocol::Mysql => "mysql",
            Protocol::Http => "http",
            Protocol::Https => "https",
            Protocol::Tcp => "tcp",
            Protocol::Ssh => "ssh",
        }
    }

    /// The SQL dialect for SQL protocols.
    pub fn sql_dialect(self) -> Option<crate::sql::Dialect> {
        match self {
            Protocol::Postgres => Some(crate::sql::Dialect::Postgres),
            Protocol::Mysql => Some(crate::sql::Dialect::MySql),
            Protocol::Http | Protocol::Https | Protocol::Tcp | Protocol::Ssh => None,
        }
    }

    /// Served by the HTTP handler.
    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Https)
    }
}

/// Upstream TLS verification mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// Plain TCP to the upstream.
    Disable,
    /// TLS, certificate chain and host name verified (the default when `[resource.tls]` is present).
    #[default]
    VerifyFull,
}

/// How the daemon connects to the upstream. Absent: plain TCP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    pub mode: TlsMode,
    /// Trust anchors; `None`: the platform's roots.
    pub ca_file: Option<PathBuf>,
    /// Name to verify and send as SNI; `None`: the DNS name the agent dialled, if any.
    pub server_name: Option<String>,
}

/// A database login the daemon holds for a resource (`credential`): the
/// handler logs in upstream as `user` with the secret in `password_file`
/// (read at each login, never logged), whatever the agent sent. Records name
/// the user and the file, never the secret. Any database handler uses it
/// (Postgres: SCRAM-SHA-256, MD5 or cleartext, as the server asks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    pub user: String,
    /// Absolute; readable by its owner only (checked when the policy loads).
    pub password_file: PathBuf,
}

/// Longest secret read from a `password_file`.
pub const MAX_SECRET_BYTES: u64 = 4096;

impl Credential {
    /// The secret: the file's content without its trailing newline.
    pub fn read_secret(&self) -> std::io::Result<secrecy::SecretString> {
        use std::io::Read as _;
        let mut text = String::new();
        std::fs::File::open(&self.password_file)?
            .take(MAX_SECRET_BYTES + 1)
            .read_to_string(&mut text)?;
        if text.len() as u64 > MAX_SECRET_BYTES {
            return Err(std::io::Error::other(format!(
                "longer than {MAX_SECRET_BYTES} bytes"
            )));
        }
        let trimmed = text.trim_end_matches(['\n', '\r']).len();
        text.truncate(trimmed);
        Ok(secrecy::SecretString::from(text))
    }

    /// What records say about it (never the secret).
    pub fn describe(&self) -> serde_json::Value {
        serde_json::json!({ "user": self.user, "password_file": self.password_file.display().to_string() })
    }
}

/// One entry of a resource's `addresses`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressPattern {
    /// `127.0.0.1:5432`, `[::1]:5432`.
    Exact(SocketAddr),
    /// `10.1.0.0/16:5432`, `[fd00::/8]:*`, `10.0.0.7:*` (`port: None` = any port).
    Cidr {
        net: IpAddr,
        prefix: u8,
        port: Option<u16>,
    },
    /// `db.internal:5432`: resolved at load and refreshed; matches the addresses it resolves to.
    Dns { host: String, port: u16 },
}

impl AddressPattern {
    pub(crate) fn cidr_contains(net: IpAddr, prefix: u8, ip: IpAddr) -> bool {
        match (net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = if prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(prefix))
                };
                (u32::from(n) & mask) == (u32::from(a) & mask)
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = if prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(prefix))
                };
                (u128::from(n) & mask) == (u128::from(a) & mask)
            }
            _ => false,
        }
    }
}

/// An approval requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalSpec {
    /// Members of any of these groups may approve (never the requester).
    pub approver_groups: Vec<String>,
    /// Distinct approvals needed.
    pub quorum: u32,
    /// Undecided after this long: denied.
    pub timeout: Duration,
    /// When set, an approval also grants the same requester the same command
    /// ([`GrantScope`]) on the same resource, under the same rule, for this long.
    pub grant_window: Option<Duration>,
    /// What a grant covers.
    pub grant_scope: GrantScope,
}

/// What a grant made by an approval covers (with the same identity, resource
/// and rule).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GrantScope {
    /// The same statement text (compared by its keyed hash).
    #[default]
    Statement,
    /// Any statement of the same class (`write`, `ddl`, ...).
    Class,
}

impl GrantScope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Statement => "statement",
            Self::Class => "class",
        }
    }
}

/// What a rule or default does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuleAction {
    Allow,
    Deny,
    RequireApproval(ApprovalSpec),
}

impl RuleAction {
    pub(crate) fn kind(&self) -> ActionKind {
        match self {
            RuleAction::Allow => ActionKind::Allow,
            RuleAction::Deny => ActionKind::Deny,
            RuleAction::RequireApproval(_) => ActionKind::RequireApproval,
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            RuleAction::Allow => "allow",
            RuleAction::Deny => "deny",
            RuleAction::RequireApproval(_) => "require_approval",
        }
    }
}

/// A named upstream the proxy may connect agents to.
#[derive(Debug, Clone)]
pub struct Resource {
    pub name: String,
    pub protocol: Protocol,
    pub addresses: Vec<AddressPattern>,
    pub tls: Option<UpstreamTls>,
    /// The upstream login the daemon holds for this resource; `None`:
    /// the agent's own login is passed through.
    pub credential: Option<Credential>,
    /// Applies when no rule matches.
    pub default: RuleAction,
    /// HTTPS: terminate the agent's TLS and decide per request (the
    /// default); `false`: relay the connection and record it only.
    pub intercept: bool,
    /// HTTP(S): the API profile, if any.
    pub profile: Option<HttpProfile>,
    /// `openai` profile: mask or refuse a prompt carrying a detected value.
    pub prompt_dlp: PromptDlp,
    /// Index in its `PolicySet` (a fast path; lookups fall back to the name).
    pub(crate) index: usize,
}

/// Conditions over a decoded action. Within a list: any entry. Across fields: all.
#[derive(Debug, Clone, Default)]
pub struct Conditions {
    pub sql: Option<Vec<crate::sql::StatementClass>>,
    pub tables: Option<Vec<Glob>>,
    pub functions: Option<Vec<Glob>>,
    pub destructive: Option<bool>,
    pub http_methods: Option<Vec<String>>,
    pub http_hosts: Option<Vec<Glob>>,
    pub http_paths: Option<Vec<Glob>>,
    /// Query parameter tests (see [`super::field_test`]).
    pub http_query: Option<Vec<super::field_test::QueryTest>>,
    /// JSON body field tests (see [`super::field_test`]).
    pub http_json: Option<Vec<super::field_test::JsonTest>>,
    pub kube_verbs: Option<Vec<Glob>>,
    pub kube_resources: Option<Vec<Glob>>,
    pub kube_namespaces: Option<Vec<Glob>>,
    /// SSH request classes (names from [`SSH_CLASSES`]).
    pub ssh: Option<Vec<String>>,
    /// Forwarding destinations (`host:port`) and SFTP paths.
    pub ssh_destinations: Option<Vec<Glob>>,
}

/// The classes an SSH request has (`protocol::ssh::classify` and the
/// handler's own: `sftp-read`, `sftp-write`, `forward`).
pub const SSH_CLASSES: &[&str] = &[
    "read",
    "write",
    "delete",
    "service",
    "package",
    "database",
    "privileged",
    "shell",
    "dangerous",
    "sftp-read",
    "sftp-write",
    "forward",
];

impl Conditions {
    /// How many fields are set: the first key of rule specificity.
    pub fn count(&self) -> u32 {
        u32::from(self.sql.is_some())
            + u32::from(self.tables.is_some())
            + u32::from(self.functions.is_some())
            + u32::from(self.destructive.is_some())
            + u32::from(self.http_methods.is_some())
            + u32::from(self.http_hosts.is_some())
            + u32::from(self.http_paths.is_some())
            + u32::from(self.http_query.is_some())
            + u32::from(self.http_json.is_some())
            + u32::from(self.kube_verbs.is_some())
            + u32::from(self.kube_resources.is_some())
            + u32::from(self.kube_namespaces.is_some())
            + u32::from(self.ssh.is_some())
            + u32::from(self.ssh_destinations.is_some())
    }

    pub(crate) fn has_sql(&self) -> bool {
        self.sql.is_some()
            || self.tables.is_some()
            || self.functions.is_some()
            || self.destructive.is_some()
    }
    pub(crate) fn has_http(&self) -> bool {
        self.http_methods.is_some()
            || self.http_hosts.is_some()
            || self.http_paths.is_some()
            || self.http_query.is_some()
            || self.http_json.is_some()
    }
    pub(crate) fn has_ssh(&self) -> bool {
        self.ssh.is_some() || self.ssh_destinations.is_some()
    }
    pub(crate) fn has_kube(&self) -> bool {
        self.kube_verbs.is_some() || self.kube_resources.is_some() || self.kube_namespaces.is_some()
    }
}

/// A validated rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub identities: Vec<Glob>,
    pub groups: Vec<Glob>,
    pub resources: Vec<Glob>,
    pub conditions: Conditions,
    pub action: RuleAction,
    /// SSH resources: the login on the host for this rule's subjects
    /// ([`super::PolicySet::ssh_user_for`]).
    pub ssh_user: Option<String>,
    /// `file:line:col` of the rule, for `policy explain`.
    pub origin: String,
}

/// A Unix socket address tagged processes may connect or send to: an
/// absolute path, or an abstract name (`@name`); `exact` false means any
/// address that starts with `prefix` (written `/dir/*` or `@prefix*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixAllow {
    /// As written in the policy.
    pub pattern: String,
    /// The address bytes the kernel compares (abstract names start with NUL).
    pub prefix: Vec<u8>,
    pub exact: bool,
}

/// Binds the processes of cgroups whose path matches `cgroup` to a service account.
#[derive(Debug, Clone)]
pub struct CgroupBinding {
    pub cgroup: Glob,
    pub identity: String,
    pub groups: Vec<String>,
}

/// Who is acting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub identity: String,
    pub groups: Vec<String>,
}

/// What is being attempted, decoded by a protocol handler.
#[derive(Debug, Clone)]
pub enum Action {
    /// Opening the connection (before any command).
    Connect,
    Sql(Arc<Classification>),
    Http {
        method: String,
        host: String,
        path: String,
        /// The raw query string (without `?`).
        query: Option<String>,
        /// The JSON body, when a rule that could apply tests its fields
        /// (`None`: not read; such tests then do not hold).
        json: Option<Arc<serde_json::Value>>,
    },
    Kube {
        verb: String,
        resource: String,
        namespace: Option<String>,
    },
    /// An SSH channel request: its class and, for forwarding and SFTP, what
    /// it reaches (`host:port`, a path).
    Ssh {
        class: &'static str,
        destination: Option<String>,
    },
}

/// The outcome of a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny { reason: String },
    RequireApproval(ApprovalSpec),
}

/// A verdict and what produced it: a rule name, or `default:...`
/// (`default:unknown-destination`, `default:resource:<name>`, `default:unknown-resource`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub rule: String,
}
