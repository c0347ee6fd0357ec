//! OAuth 2.0 device authorization grant (RFC 8628) with OIDC ID tokens.
//!
//! Polling follows the server's `interval` (5 s when it names none), adds 5 s
//! for every `slow_down`, keeps going on `authorization_pending`, and stops with a
//! distinct error on `expired_token` and `access_denied`. Network failures while
//! polling are retried with doubling backoff, at most three in a row. Everything
//! runs under one deadline (tokio time): the smaller of the server's `expires_in`
//! and `device_flow_max_wait_secs` (plus one polling interval when the server's
//! `expires_in` is the smaller, so its `expired_token` answer is what the user
//! sees).
//!
//! A nonce is sent with the device authorization request and, if the ID token
//! carries one, it must match. RFC 8628 and OIDC define no nonce for this flow
//! and many providers (oidc-provider among them) do not echo it, so it cannot be
//! required: the binding is the device code itself, exchanged by us directly at
//! the token endpoint, with no front channel a token could be injected through.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio::time::Instant;

use super::{
    IdentityError, OidcClient, Session,
    http::{ClientAuth, sanitize},
    session::{TokenResponse, check_token_type},
    verify::NonceRule,
};

const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
/// RFC 8628 3.5: the increase on `slow_down`.
const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);
const DEFAULT_INTERVAL: u64 = 5;
const MAX_INTERVAL: Duration = Duration::from_mins(1);
const MAX_TRANSIENT_FAILURES: u32 = 3;

/// What the user must do; shown by the CLI. Holds no credential (the device code
/// stays inside [`device_login`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePrompt {
    pub verification_uri: String,
    /// The URI with the code filled in, when the provider offers one.
    pub verification_uri_complete: Option<String>,
    pub user_code: String,
    /// How long the code stays valid (already capped by `device_flow_max_wait_secs`).
    pub expires_in: Duration,
}

#[derive(Deserialize)]
struct DeviceAuthorization {
    device_code: SecretString,
    user_code: String,
    // Some providers (Google) spell it verification_url.
    #[serde(alias = "verification_url")]
    verification_uri: String,
    #[serde(default)]
    verification_uri_complete: Option<String>,
    expires_in: u64,
    #[serde(default)]
    interval: Option<u64>,
}

/// Runs the device flow for the configured `client_id`: discovery, device
/// authorization request, `on_prompt`, polling, then ID-token verification.
pub async fn device_login(
    client: &OidcClient,
    on_prompt: impl FnOnce(&DevicePrompt),
) -> Result<Session, IdentityError> {
    let cfg = client.config();
    let client_id = cfg.client_id.clone().ok_or(IdentityError::Config {
        field: "client_id",
        reason:
            "no device-flow client_id configured (set [identity] client_id or pass --client-id)"
                .to_owned(),
    })?;
    let metadata = client.metadata().await?;
    let device_endpoint = metadata
        .device_authorization_endpoint
        .clone()
        .ok_or_else(|| IdentityError::IdpMissingEndpoint {
            issuer: cfg.issuer.clone(),
            what: "a device authorization endpoint",
        })?;
    let token_endpoint = metadata.token_endpoint.clone();
    let auth = ClientAuth::Public {
        client_id: &client_id,
    };
    let nonce = random_nonce()?;
    let scope = cfg.scopes.join(" ");

    let started = Instant::now();
    let da: DeviceAuthorization = client
        .http()
        .post_form(
            &device_endpoint,
            &auth,
            &[("scope", &scope), ("nonce", &nonce)],
        )
        .await?;
    let bad = |reason: &str| IdentityError::IdpBadResponse {
        url: device_endpoint.clone(),
        reason: reason.to_owned(),
    };
    for (field, value) in [
        ("user_code", &da.user_code),
        ("verification_uri", &da.verification_uri),
    ] {
        if value.is_empty() || value.len() > 2048 || value.chars().any(char::is_control) {
            return Err(bad(&format!("{field} is empty, too long or not printable")));
        }
    }
    if da.device_code.expose_secret().is_empty() || da.device_code.expose_secret().len() > 2048 {
        return Err(bad("device_code is empty or too long"));
    }
    let code_lifetime = Duration::from_secs(da.expires_in);
    let expires_in = code_lifetime.min(cfg.device_flow_max_wait());
    let interval =
        Duration::from_secs(da.interval.unwrap_or(DEFAULT_INTERVAL).max(1)).min(MAX_INTERVAL);
    // When the code's own lifetime is the limit, poll once more after it ends so the
    // provider's definitive `expired_token` (or a last-second approval) is seen.
    let deadline = if code_lifetime <= cfg.device_flow_max_wait() {
        started + code_lifetime + interval + Duration::from_secs(1)
    } else {
        started + expires_in
    };

    on_prompt(&DevicePrompt {
        verification_uri: sanitize(&da.verification_uri, 2048),
        verification_uri_complete: da
            .verification_uri_complete
            .as_deref()
            .filter(|u| u.len() <= 2048 && !u.chars().any(char::is_control))
            .map(str::to_owned),
        user_code: da.user_code.clone(),
        expires_in,
    });
    tracing::info!(issuer = %cfg.issuer, %client_id, "device login started; waiting for the user");

    let response = poll_for_token(
        client,
        &token_endpoint,
        &auth,
        &da.device_code,
        interval,
        (started, deadline),
    )
    .await?;
    check_token_type(&token_endpoint, &response)?;
    let id_token = response
        .id_token
        .as_ref()
        .ok_or_else(|| IdentityError::IdpBadResponse {
            url: token_endpoint.clone(),
            reason: "no id_token in the token response (is \"openid\" among the scopes?)"
                .to_owned(),
        })?;
    let identity = client
        .verify_id_token_with(
            id_token.expose_secret(),
            NonceRule::IfPresent(&nonce),
            std::slice::from_ref(&client_id),
        )
        .await?;
    tracing::info!(name = %identity.name, "device login verified");
    Ok(Session::human(identity, client_id, response, nonce))
}

/// Polls the token endpoint until the user acts, the code expires or `deadline` passes.
async fn poll_for_token(
    client: &OidcClient,
    token_endpoint: &str,
    auth: &ClientAuth<'_>,
    device_code: &SecretString,
    mut interval: Duration,
    (started, deadline): (Instant, Instant),
) -> Result<TokenResponse, IdentityError> {
    let mut backoff = interval;
    let mut transient_failures = 0;
    loop {
        let wake = Instant::now() + backoff;
        if wake >= deadline {
            tokio::time::sleep_until(deadline).await;
            return Err(IdentityError::DeviceFlowTimeout {
                waited: started.elapsed(),
            });
        }
        tokio::time::sleep_until(wake).await;
        let form = [
            ("grant_type", DEVICE_CODE_GRANT),
            ("device_code", device_code.expose_secret()),
        ];
        let poll = client
            .http()
            .post_form::<TokenResponse>(token_endpoint, auth, &form);
        let Ok(result) = tokio::time::timeout_at(deadline, poll).await else {
            return Err(IdentityError::DeviceFlowTimeout {
                waited: started.elapsed(),
            });
        };
        match result {
            Ok(response) => return Ok(response),
            Err(IdentityError::OAuth { error, .. }) if error == "authorization_pending" => {
                transient_failures = 0;
                backoff = interval;
            }
            Err(IdentityError::OAuth { error, .. }) if error == "slow_down" => {
                transient_failures = 0;
                interval = (interval + SLOW_DOWN_STEP).min(MAX_INTERVAL);
                backoff = interval;
                tracing::debug!(interval = ?interval, "identity provider asked to slow down");
            }
            Err(IdentityError::OAuth { error, .. }) if error == "expired_token" => {
                return Err(IdentityError::DeviceCodeExpired);
            }
            Err(IdentityError::OAuth { error, .. }) if error == "access_denied" => {
                return Err(IdentityError::AccessDenied);
            }
            Err(e) if e.is_transient() && transient_failures + 1 < MAX_TRANSIENT_FAILURES => {
                transient_failures += 1;
                backoff = (backoff * 2).min(MAX_INTERVAL);
                tracing::warn!(error = %e, retry_in = ?backoff, "polling the identity provider failed; retrying");
            }
            Err(e) => return Err(e),
        }
    }
}

fn random_nonce() -> Result<String, IdentityError> {
    let mut bytes = [0u8; 18];
    getrandom::getrandom(&mut bytes).map_err(|e| IdentityError::Config {
        field: "nonce",
        reason: format!("no randomness: {e}"),
    })?;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        use std::fmt::Write as _;
        let _ = write!(out, "{b:02x}");
    }
    Ok(out)
}
