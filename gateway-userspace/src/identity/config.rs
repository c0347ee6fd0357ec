//! `[identity]` configuration and service-account secret loading.
//!
//! ```toml
//! [identity]
//! issuer = "https://login.example.com/realms/bank"   # https, or http on loopback only
//! client_id = "agentgate-cli"          # public client for `agentgate login` (device flow)
//! scopes = ["openid", "profile", "email", "groups", "offline_access"]
//! groups_claim = "groups"              # claim name; a dotted path ("realm_access.roles") also works
//! audiences = []                       # extra accepted `aud` values besides client_id
//! http_timeout_secs = 10
//! device_flow_max_wait_secs = 600
//! jwks_cache_ttl_secs = 3600
//! jwks_refetch_min_interval_secs = 30
//! clock_leeway_secs = 30
//! refresh_before_expiry_secs = 60
//!
//! [[identity.service_account]]
//! name = "svc-reporting"               # the identity name used by exec/tag and policy
//! client_id = "svc-reporting"
//! secret_file = "/etc/agentgate/secrets/svc-reporting"   # mode 0600 (or 0400); or:
//! # secret_env = "AGENTGATE_SVC_REPORTING_SECRET"
//! scopes = ["reports:read"]
//! audience = "urn:agentgate"           # resource indicator requested; required `aud` of its tokens
//! ```

use std::{
    io::Read,
    os::unix::fs::{MetadataExt, OpenOptionsExt},
    path::{Path, PathBuf},
    time::Duration,
};

use secrecy::SecretString;
use serde::Deserialize;

use super::IdentityError;

/// Longest secret accepted from a file or the environment.
const MAX_SECRET_LEN: usize = 4096;

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// The `OpenID` provider's issuer identifier, exactly as its discovery document names it.
    pub issuer: String,
    /// Public client used by `agentgate login` (device authorization flow). Without it,
    /// only service accounts can log in.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Scopes requested by the device flow.
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    /// Claim that carries group names (array of strings, or one string).
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// `aud` values accepted besides `client_id` (ID tokens) or a service account's
    /// `audience` (access tokens).
    #[serde(default)]
    pub audiences: Vec<String>,
    #[serde(default)]
    pub service_account: Vec<ServiceAccountConfig>,
    /// Timeout of every single request to the provider (connect + answer).
    #[serde(default = "default_http_timeout")]
    pub http_timeout_secs: u64,
    /// Upper bound on how long `agentgate login` waits for the user, whatever the
    /// provider's `expires_in` says.
    #[serde(default = "default_device_max_wait")]
    pub device_flow_max_wait_secs: u64,
    /// How long a fetched JWKS is trusted before it is fetched again.
    #[serde(default = "default_jwks_ttl")]
    pub jwks_cache_ttl_secs: u64,
    /// Minimum time between two fetches caused by an unknown key id (so a flood of
    /// tokens with made-up `kid`s cannot turn us into a JWKS request amplifier).
    #[serde(default = "default_jwks_refetch")]
    pub jwks_refetch_min_interval_secs: u64,
    /// Clock skew tolerated on `exp`, `iat` and `nbf`.
    #[serde(default = "default_leeway")]
    pub clock_leeway_secs: u64,
    /// Sessions are refreshed this long before they expire.
    #[serde(default = "default_refresh_before")]
    pub refresh_before_expiry_secs: u64,
}

#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServiceAccountConfig {
    /// Identity name used by `exec --identity`, `tag --identity` and policy files.
    pub name: String,
    pub client_id: String,
    /// File holding the client secret; must not be accessible by group or others.
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// Environment variable holding the client secret.
    #[serde(default)]
    pub secret_env: Option<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Resource indicator (RFC 8707) to request; a JWT access token must carry it in `aud`.
    #[serde(default)]
    pub audience: Option<String>,
}

// Written by hand only to make the point that there is nothing secret here: the
// secret's location is shown, never its value.
impl std::fmt::Debug for ServiceAccountConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceAccountConfig")
            .field("name", &self.name)
            .field("client_id", &self.client_id)
            .field("secret_file", &self.secret_file)
            .field("secret_env", &self.secret_env)
            .field("scopes", &self.scopes)
            .field("audience", &self.audience)
            .finish()
    }
}

fn default_scopes() -> Vec<String> {
    ["openid", "profile", "email", "groups", "offline_access"]
        .into_iter()
        .map(String::from)
        .collect()
}
fn default_groups_claim() -> String {
    "groups".to_owned()
}
fn default_http_timeout() -> u64 {
    10
}
fn default_device_max_wait() -> u64 {
    600
}
fn default_jwks_ttl() -> u64 {
    3600
}
fn default_jwks_refetch() -> u64 {
    30
}
fn default_leeway() -> u64 {
    30
}
fn default_refresh_before() -> u64 {
    60
}

impl IdentityConfig {
    /// A configuration with every default, for `agentgate login --issuer URL --client-id ID`
    /// without a config file.
    pub fn new(issuer: impl Into<String>, client_id: Option<String>) -> Self {
        IdentityConfig {
            issuer: issuer.into(),
            client_id,
            scopes: default_scopes(),
            groups_claim: default_groups_claim(),
            audiences: Vec::new(),
            service_account: Vec::new(),
            http_timeout_secs: default_http_timeout(),
            device_flow_max_wait_secs: default_device_max_wait(),
            jwks_cache_ttl_secs: default_jwks_ttl(),
            jwks_refetch_min_interval_secs: default_jwks_refetch(),
            clock_leeway_secs: default_leeway(),
            refresh_before_expiry_secs: default_refresh_before(),
        }
    }

    /// Checks what serde cannot: URL scheme, ranges, uniqueness. Called by
    /// [`super::OidcClient::new`], so a bad section refuses to start.
    pub fn validate(&self) -> Result<(), IdentityError> {
        check_provider_url("issuer", &self.issuer)?;
        if let Some(id) = &self.client_id {
            check_token("client_id", id)?;
        }
        check_token("groups_claim", &self.groups_claim)?;
        for aud in &self.audiences {
            check_token("audiences", aud)?;
        }
        for scope in &self.scopes {
            check_scope("scopes", scope)?;
        }
        range("http_timeout_secs", self.http_timeout_secs, 1, 300)?;
        range(
            "device_flow_max_wait_secs",
            self.device_flow_max_wait_secs,
            1,
            3600,
        )?;
        range(
            "jwks_cache_ttl_secs",
            self.jwks_cache_ttl_secs,
            1,
            7 * 24 * 3600,
        )?;
        range(
            "jwks_refetch_min_interval_secs",
            self.jwks_refetch_min_interval_secs,
            0,
            3600,
        )?;
        range("clock_leeway_secs", self.clock_leeway_secs, 0, 600)?;
        range(
            "refresh_before_expiry_secs",
            self.refresh_before_expiry_secs,
            0,
            3600,
        )?;
        let mut names = std::collections::HashSet::new();
        for sa in &self.service_account {
            check_token("service_account.name", &sa.name)?;
            check_token("service_account.client_id", &sa.client_id)?;
            if !names.insert(sa.name.as_str()) {
                return Err(IdentityError::Config {
                    field: "service_account.name",
                    reason: format!("{:?} is configured twice", sa.name),
                });
            }
            match (&sa.secret_file, &sa.secret_env) {
                (Some(_), None) | (None, Some(_)) => {}
                _ => {
                    return Err(IdentityError::Config {
                        field: "service_account",
                        reason: format!(
                            "{:?}: set exactly one of secret_file and secret_env",
                            sa.name
                        ),
                    });
                }
            }
            for scope in &sa.scopes {
                check_scope("service_account.scopes", scope)?;
            }
            if let Some(aud) = &sa.audience {
                check_token("service_account.audience", aud)?;
            }
        }
        Ok(())
    }

    pub fn service_account(&self, name: &str) -> Result<&ServiceAccountConfig, IdentityError> {
        self.service_account
            .iter()
            .find(|sa| sa.name == name)
            .ok_or_else(|| IdentityError::UnknownServiceAccount {
                name: name.to_owned(),
            })
    }

    pub fn http_timeout(&self) -> Duration {
        Duration::from_secs(self.http_timeout_secs)
    }
    pub fn device_flow_max_wait(&self) -> Duration {
        Duration::from_secs(self.device_flow_max_wait_secs)
    }
    pub fn refresh_before_expiry(&self) -> Duration {
        Duration::from_secs(self.refresh_before_expiry_secs)
    }

    /// `aud` values an ID token may carry: the device-flow client and `audiences`.
    pub(crate) fn id_token_audiences(&self) -> Vec<String> {
        self.client_id
            .iter()
            .chain(&self.audiences)
            .cloned()
            .collect()
    }
}

impl ServiceAccountConfig {
    /// Reads the client secret now (so a rotated file is picked up on the next login).
    /// The file must be a regular file that neither group nor others can access.
    pub fn load_secret(&self) -> Result<SecretString, IdentityError> {
        match (&self.secret_file, &self.secret_env) {
            (Some(path), _) => secret_from_file(path),
            (None, Some(var)) => {
                let value = std::env::var(var)
                    .map_err(|_| IdentityError::SecretEnvMissing { var: var.clone() })?;
                let value = value.trim_end_matches(['\r', '\n']);
                if value.is_empty() || value.len() > MAX_SECRET_LEN {
                    return Err(IdentityError::SecretEnvMissing { var: var.clone() });
                }
                Ok(SecretString::from(value))
            }
            (None, None) => Err(IdentityError::Config {
                field: "service_account",
                reason: format!("{:?}: no secret_file or secret_env", self.name),
            }),
        }
    }
}

fn secret_from_file(path: &Path) -> Result<SecretString, IdentityError> {
    let io_err = |source| IdentityError::SecretFile {
        path: path.to_owned(),
        source,
    };
    // O_NOFOLLOW: a planted symlink cannot make us send another file (say a private key)
    // to the provider as a client secret. Metadata comes from the open handle, so the
    // file checked is the file read.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    if !meta.is_file() {
        return Err(IdentityError::SecretFileContent {
            path: path.to_owned(),
            reason: "not a regular file",
        });
    }
    // Owned by us (root, for the daemon): a file someone else owns could be swapped.
    let own_uid = std::fs::metadata("/proc/self").map_err(io_err)?.uid();
    if meta.uid() != own_uid && meta.uid() != 0 {
        return Err(IdentityError::SecretFileContent {
            path: path.to_owned(),
            reason: "owned by another user (it must belong to root or to the daemon's user)",
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::SecretFileMode {
            path: path.to_owned(),
            mode,
        });
    }
    if meta.len() > MAX_SECRET_LEN as u64 {
        return Err(IdentityError::SecretFileContent {
            path: path.to_owned(),
            reason: "larger than 4 KiB",
        });
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    file.by_ref()
        .take(MAX_SECRET_LEN as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(io_err)?;
    let text = String::from_utf8(buf).map_err(|_| IdentityError::SecretFileContent {
        path: path.to_owned(),
        reason: "not UTF-8",
    })?;
    let secret = SecretString::from(text.trim_end_matches(['\r', '\n']));
    // `text` still holds the bytes; overwrite before it is freed.
    zeroize_string(text);
    if secrecy::ExposeSecret::expose_secret(&secret).is_empty() {
        return Err(IdentityError::SecretFileContent {
            path: path.to_owned(),
            reason: "empty",
        });
    }
    Ok(secret)
}

fn zeroize_string(s: String) {
    let mut bytes = s.into_bytes();
    bytes.fill(0);
    std::hint::black_box(&bytes);
}

fn range(field: &'static str, value: u64, min: u64, max: u64) -> Result<(), IdentityError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(IdentityError::Config {
            field,
            reason: format!("{value} is outside {min}..={max}"),
        })
    }
}

/// Identifiers we put in requests, records and logs: printable, no spaces, bounded.
fn check_token(field: &'static str, value: &str) -> Result<(), IdentityError> {
    if value.is_empty()
        || value.len() > 256
        || value.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(IdentityError::Config {
            field,
            reason: format!("{value:?} must be 1..=256 printable characters without spaces"),
        });
    }
    Ok(())
}

fn check_scope(field: &'static str, value: &str) -> Result<(), IdentityError> {
    // RFC 6749 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
    if value.is_empty()
        || value.len() > 256
        || !value
            .bytes()
            .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
    {
        return Err(IdentityError::Config {
            field,
            reason: format!("{value:?} is not a valid scope"),
        });
    }
    Ok(())
}

/// Provider URLs must be https, except on loopback (tests, a local provider).
pub(crate) fn check_provider_url(
    field: &'static str,
    value: &str,
) -> Result<reqwest::Url, IdentityError> {
    let url = reqwest::Url::parse(value).map_err(|e| IdentityError::Config {
        field,
        reason: format!("{value:?} is not a URL: {e}"),
    })?;
    if url.query().is_some()
        || url.fragment().is_some()
        || !url.username().is_empty()
        || url.password().is_some()
    {
        return Err(IdentityError::Config {
            field,
            reason: format!("{value:?} must not carry credentials, a query or a fragment"),
        });
    }
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback(&url) => Ok(url),
        _ => Err(IdentityError::Config {
            field,
            reason: format!("{value:?} must use https (plain http is accepted only on loopback)"),
        }),
    }
}

pub(crate) fn is_loopback(url: &reqwest::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<IdentityConfig, String> {
        #[derive(Deserialize)]
        struct File {
            identity: IdentityConfig,
        }
        toml::from_str::<File>(text)
            .map(|f| f.identity)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn parses_full_section_with_defaults() {
        let cfg = parse(
            r#"
            [identity]
            issuer = "https://idp.example.com"
            client_id = "agentgate-cli"
            [[identity.service_account]]
            name = "svc-reporting"
            client_id = "svc-reporting"
            secret_env = "SVC_SECRET"
            scopes = ["reports:read"]
            "#,
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.groups_claim, "groups");
        assert_eq!(cfg.http_timeout(), Duration::from_secs(10));
        assert_eq!(
            cfg.service_account("svc-reporting").unwrap().scopes,
            ["reports:read"]
        );
        assert!(matches!(
            cfg.service_account("nope"),
            Err(IdentityError::UnknownServiceAccount { .. })
        ));
    }

    #[test]
    fn unknown_field_is_rejected_with_line() {
        let err = parse("[identity]\nissuer = \"https://idp\"\nclientid = \"x\"\n").unwrap_err();
        assert!(err.contains("clientid"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn plain_http_only_on_loopback() {
        assert!(
            IdentityConfig::new("http://127.0.0.1:8080", None)
                .validate()
                .is_ok()
        );
        assert!(
            IdentityConfig::new("http://localhost:8080", None)
                .validate()
                .is_ok()
        );
        assert!(
            IdentityConfig::new("http://[::1]:8080", None)
                .validate()
                .is_ok()
        );
        let err = IdentityConfig::new("http://idp.example.com", None)
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("https"), "{err}");
        assert!(
            IdentityConfig::new("https://u:p@idp.example.com", None)
                .validate()
                .is_err()
        );
    }

    #[test]
    fn service_account_needs_exactly_one_secret_source() {
        let mut cfg = IdentityConfig::new("https://idp.example.com", None);
        cfg.service_account.push(ServiceAccountConfig {
            name: "svc".into(),
            client_id: "svc".into(),
            secret_file: Some("/x".into()),
            secret_env: Some("X".into()),
            scopes: vec![],
            audience: None,
        });
        assert!(matches!(
            cfg.validate(),
            Err(IdentityError::Config {
                field: "service_account",
                ..
            })
        ));
        cfg.service_account[0].secret_env = None;
        cfg.validate().unwrap();
        cfg.service_account.push(cfg.service_account[0].clone());
        assert!(cfg.validate().unwrap_err().to_string().contains("twice"));
    }

    #[test]
    fn out_of_range_timeout_is_rejected() {
        let mut cfg = IdentityConfig::new("https://idp.example.com", None);
        cfg.http_timeout_secs = 0;
        assert!(
            cfg.validate()
                .unwrap_err()
                .to_string()
                .contains("http_timeout_secs")
        );
    }
}
