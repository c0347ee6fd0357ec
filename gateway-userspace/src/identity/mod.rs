//! OIDC identities: who a tagged workload acts for (DESIGN.md, "Identity").
//!
//! Humans log in with the device authorization flow ([`device_login`], run by
//! `agentgate login` in the CLI process), which hands the tokens to the daemon
//! ([`LoginHandoff`]); the daemon verifies the ID token again itself
//! ([`Session::from_handoff`]) and keeps the session in memory only
//! ([`IdentityStore`]). Service accounts use client credentials
//! ([`service_account_login`]) with the secret read from a 0600 file or the
//! environment. Sessions are renewed before they expire ([`maintain`]); an
//! expired, revoked or logged-out identity is refused.
//!
//! Fails closed, everywhere: a provider that is down, slow, or answers anything
//! unexpected makes logins and refreshes fail with an error naming the URL; a
//! token is accepted only with a valid signature from the configured issuer's
//! JWKS and correct `iss`/`aud`/`exp`/`iat`/`nonce`. The cost is availability:
//! while the provider is unreachable no new login succeeds, and sessions end
//! at their tokens' expiry.
//!
//! Built directly on `reqwest` (rustls) and `jsonwebtoken` rather than the
//! `openidconnect` crate: we need the same JWKS cache (with a rate-limited
//! refetch on unknown key ids) for ID tokens and for service accounts' RFC 9068
//! access tokens, per-request deadlines in tokio time, response size caps, and
//! errors that say which check failed; `openidconnect` verifies ID tokens only
//! and leaves key fetching, caching and limits to the caller anyway. (The
//! approvals page's browser sign-in, `api::web`, does use `openidconnect` for
//! the authorization-code request and the code exchange, then verifies the
//! ID token here: [`OidcClient::verify_login_id_token`].)
//!
//! Nothing here logs or displays a token or secret: tokens are `SecretString`s,
//! `Debug` impls redact them, errors carry URLs and OAuth error codes only.

mod client;
mod config;
mod device;
mod error;
mod event;
mod http;
mod jwks;
mod service;
mod session;
mod store;
mod verify;

pub use client::{OidcClient, ProviderMetadata};
pub use config::{IdentityConfig, ServiceAccountConfig};
pub use device::{DevicePrompt, device_login};
pub use error::{ErrorOrigin, IdentityError};
pub use event::{FailureStage, IdentityEvent, LoginMethod};
pub use service::service_account_login;
pub use session::{LoginHandoff, MAX_HANDOFF_LINE, Session};
pub use store::{IdentityStatus, IdentityStore, RefreshTicket, maintain};
pub use verify::{IdentityKind, VerifiedIdentity};
