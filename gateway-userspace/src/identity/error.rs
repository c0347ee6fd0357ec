//! Identity errors. Each variant says where it came from ([`ErrorOrigin`]) so
//! the daemon can carry that tag into audit records and the CLI can tell the
//! user whose problem it is. No variant carries a token or a secret: only URLs,
//! names, claim values that are not credentials, and OAuth error codes.

use std::{path::PathBuf, time::Duration};

/// Where an [`IdentityError`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorOrigin {
    /// Our configuration or local files (secret file, config values).
    Config,
    /// The identity provider: unreachable, slow, or said no.
    Idp,
    /// A token that failed verification (signature, claims).
    Token,
    /// The end user (denied the login, let the code expire).
    User,
    /// The daemon's session store (unknown, expired, revoked identity).
    Store,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    // ---- configuration -------------------------------------------------------
    #[error("identity configuration: {field}: {reason}")]
    Config { field: &'static str, reason: String },
    #[error("no service account named {name:?} is configured")]
    UnknownServiceAccount { name: String },
    #[error("service account secret file {}: {source}", path.display())]
    SecretFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "service account secret file {} has mode {mode:o}: it must not be readable or writable by group or others (chmod 600)",
        path.display()
    )]
    SecretFileMode { path: PathBuf, mode: u32 },
    #[error("service account secret file {}: {reason}", path.display())]
    SecretFileContent { path: PathBuf, reason: &'static str },
    #[error("service account secret environment variable {var} is not set or not valid UTF-8")]
    SecretEnvMissing { var: String },

    // ---- the identity provider ------------------------------------------------
    #[error("identity provider unreachable at {url}: {source}")]
    IdpUnreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("identity provider at {url} did not answer within {timeout:?}")]
    IdpTimeout { url: String, timeout: Duration },
    #[error("identity provider at {url} answered HTTP {status}")]
    IdpHttpStatus { url: String, status: u16 },
    #[error("identity provider at {url} sent an unusable response: {reason}")]
    IdpBadResponse { url: String, reason: String },
    #[error(
        "identity provider discovery document at {url} names issuer {found:?}, expected {expected:?}"
    )]
    DiscoveryIssuerMismatch {
        url: String,
        expected: String,
        found: String,
    },
    #[error("identity provider {issuer} does not offer {what}")]
    IdpMissingEndpoint { issuer: String, what: &'static str },
    #[error("identity provider refused the request at {url}: {error}{}", description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    OAuth {
        url: String,
        /// The OAuth `error` code (RFC 6749 5.2), e.g. `invalid_client`.
        error: String,
        description: Option<String>,
    },

    // ---- the user (device flow) ----------------------------------------------
    #[error("login denied: the user refused the request at the identity provider (access_denied)")]
    AccessDenied,
    #[error("login code expired before the user approved it (expired_token); run the login again")]
    DeviceCodeExpired,
    #[error("gave up waiting for the user to approve the login after {waited:?}")]
    DeviceFlowTimeout { waited: Duration },

    // ---- token verification -------------------------------------------------
    #[error("malformed token: {reason}")]
    MalformedToken { reason: String },
    #[error("token signed with algorithm {alg}, which is not accepted")]
    UnsupportedAlgorithm { alg: String },
    #[error("token signed by key id {kid:?}, which the identity provider's JWKS does not publish")]
    UnknownKey { kid: Option<String> },
    #[error(
        "token signature does not verify against key {kid:?} from the identity provider's JWKS"
    )]
    BadSignature { kid: Option<String> },
    #[error("token issuer {found:?} is not the configured issuer {expected:?}")]
    WrongIssuer { expected: String, found: String },
    #[error("token audience {found:?} contains none of the accepted audiences {expected:?}")]
    WrongAudience {
        expected: Vec<String>,
        found: Vec<String>,
    },
    #[error("token authorized party (azp) {found:?} is not the client {expected:?}")]
    WrongAuthorizedParty { expected: String, found: String },
    #[error("token expired at {exp} (unix seconds), now is {now}")]
    TokenExpired { exp: u64, now: u64 },
    #[error("token issued in the future (iat {iat}, now {now})")]
    IssuedInFuture { iat: u64, now: u64 },
    #[error("token not valid before {nbf} (unix seconds), now is {now}")]
    NotYetValid { nbf: u64, now: u64 },
    #[error("token nonce does not match the one this login sent")]
    NonceMismatch,
    #[error("token lacks required claim {claim}")]
    MissingClaim { claim: &'static str },
    #[error("token claim {claim}: {reason}")]
    BadClaim { claim: String, reason: String },
    #[error("ID token subject changed on refresh (was {before:?}, now {after:?})")]
    SubjectChanged { before: String, after: String },

    // ---- the session store ----------------------------------------------------
    #[error(
        "unknown identity {name:?}: log in first (`agentgate login`) or configure it as a service account"
    )]
    UnknownIdentity { name: String },
    #[error("identity {name:?} has expired; log in again")]
    IdentityExpired { name: String },
    #[error("identity {name:?} was revoked ({reason})")]
    Revoked { name: String, reason: String },
    #[error(
        "identity name {name:?} is already held by a different subject; refusing to replace it"
    )]
    NameConflict { name: String },
    #[error("session has no refresh token; log in again")]
    NoRefreshToken,
}

impl IdentityError {
    /// Where this error came from, for audit records and exit codes.
    pub fn origin(&self) -> ErrorOrigin {
        use IdentityError as E;
        match self {
            E::Config { .. }
            | E::UnknownServiceAccount { .. }
            | E::SecretFile { .. }
            | E::SecretFileMode { .. }
            | E::SecretFileContent { .. }
            | E::SecretEnvMissing { .. } => ErrorOrigin::Config,
            E::IdpUnreachable { .. }
            | E::IdpTimeout { .. }
            | E::IdpHttpStatus { .. }
            | E::IdpBadResponse { .. }
            | E::DiscoveryIssuerMismatch { .. }
            | E::IdpMissingEndpoint { .. }
            | E::OAuth { .. } => ErrorOrigin::Idp,
            E::AccessDenied | E::DeviceCodeExpired | E::DeviceFlowTimeout { .. } => {
                ErrorOrigin::User
            }
            E::MalformedToken { .. }
            | E::UnsupportedAlgorithm { .. }
            | E::UnknownKey { .. }
            | E::BadSignature { .. }
            | E::WrongIssuer { .. }
            | E::WrongAudience { .. }
            | E::WrongAuthorizedParty { .. }
            | E::TokenExpired { .. }
            | E::IssuedInFuture { .. }
            | E::NotYetValid { .. }
            | E::NonceMismatch
            | E::MissingClaim { .. }
            | E::BadClaim { .. }
            | E::SubjectChanged { .. } => ErrorOrigin::Token,
            E::UnknownIdentity { .. }
            | E::IdentityExpired { .. }
            | E::Revoked { .. }
            | E::NameConflict { .. }
            | E::NoRefreshToken => ErrorOrigin::Store,
        }
    }

    /// True when the identity provider said the grant behind a session is gone
    /// (`invalid_grant` on refresh: revoked, expired or already used), so the
    /// session must be treated as revoked rather than retried.
    pub fn is_grant_revoked(&self) -> bool {
        matches!(self, IdentityError::OAuth { error, .. } if error == "invalid_grant")
    }

    /// True for failures that may go away by themselves (network, provider 5xx):
    /// a refresh that fails this way is retried before the session expires.
    pub fn is_transient(&self) -> bool {
        match self {
            IdentityError::IdpUnreachable { .. } | IdentityError::IdpTimeout { .. } => true,
            IdentityError::IdpHttpStatus { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}
