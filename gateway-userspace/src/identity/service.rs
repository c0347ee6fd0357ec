//! Service accounts: OAuth 2.0 client credentials (RFC 6749 4.4).
//!
//! What is verified, exactly:
//! - The provider authenticated the client (`client_secret_basic` with the secret
//!   read now from its 0600 file or the environment) and issued an access token.
//! - If the access token is a JWS (RFC 9068 JWT access token, what Keycloak, Okta,
//!   Entra ID and Auth0 issue): its signature against the provider's JWKS, `iss`,
//!   `aud` (the account's `audience`, else `audiences`), `exp`, `iat`/`nbf`, and
//!   that `client_id` (or `azp`) is the account's client. Groups come from the
//!   groups claim.
//! - If it is opaque: token introspection (RFC 7662) with the same client
//!   credentials must say `active: true`, name the account's `client_id`, and give
//!   an `exp` in the future; groups come from the groups member, if any.
//! - A provider with neither fails the login (closed): client authentication
//!   alone is not taken as proof.
//!
//! The secret is held as a `SecretString`, is sent only in the Authorization
//! header, and is never logged or put in an error.

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{
    IdentityError, OidcClient, Session,
    http::ClientAuth,
    session::{TokenResponse, check_token_type},
    verify::{self, IdentityKind, VerifiedIdentity, looks_like_jws},
};

/// Logs the configured service account `name` in with its client credentials.
pub async fn service_account_login(
    client: &OidcClient,
    name: &str,
) -> Result<Session, IdentityError> {
    let cfg = client.config();
    let account = cfg.service_account(name)?;
    let secret = account.load_secret()?;
    let metadata = client.metadata().await?;
    let token_endpoint = metadata.token_endpoint.clone();
    let auth = ClientAuth::Basic {
        client_id: &account.client_id,
        secret: &secret,
    };
    let scope = account.scopes.join(" ");
    let mut form = vec![("grant_type", "client_credentials")];
    if !scope.is_empty() {
        form.push(("scope", &scope));
    }
    if let Some(aud) = &account.audience {
        form.push(("resource", aud));
    }
    let response: TokenResponse = client
        .http()
        .post_form(&token_endpoint, &auth, &form)
        .await?;
    check_token_type(&token_endpoint, &response)?;
    let token = response.access_token.expose_secret();
    let identity = if looks_like_jws(token) {
        let audiences: Vec<String> = match &account.audience {
            Some(aud) => vec![aud.clone()],
            None => cfg.audiences.clone(),
        };
        if audiences.is_empty() {
            return Err(IdentityError::Config {
                field: "service_account.audience",
                reason: format!(
                    "{name:?}: the provider issues JWT access tokens; set the audience they must carry"
                ),
            });
        }
        client
            .verify_service_access_token(token, name, &account.client_id, &audiences)
            .await?
    } else {
        introspect(client, name, &account.client_id, &secret, &response).await?
    };
    tracing::info!(service_account = %name, groups = identity.groups.len(), "service account logged in");
    Ok(Session::service(identity, name.to_owned()))
}

#[derive(Deserialize)]
struct Introspection {
    active: bool,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    exp: Option<u64>,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    iss: Option<String>,
    #[serde(flatten)]
    rest: serde_json::Map<String, serde_json::Value>,
}

async fn introspect(
    client: &OidcClient,
    name: &str,
    client_id: &str,
    secret: &SecretString,
    response: &TokenResponse,
) -> Result<VerifiedIdentity, IdentityError> {
    let cfg = client.config();
    let metadata = client.metadata().await?;
    let url = metadata.introspection_endpoint.clone().ok_or_else(|| IdentityError::IdpMissingEndpoint {
        issuer: cfg.issuer.clone(),
        what: "JWT access tokens or an introspection endpoint (needed to verify a service account)",
    })?;
    let answer: Introspection = client
        .http()
        .post_form(
            &url,
            &ClientAuth::Basic { client_id, secret },
            &[
                ("token", response.access_token.expose_secret()),
                ("token_type_hint", "access_token"),
            ],
        )
        .await?;
    if !answer.active {
        return Err(IdentityError::Revoked {
            name: name.to_owned(),
            reason: "introspection says inactive".to_owned(),
        });
    }
    if answer.client_id.as_deref() != Some(client_id) {
        return Err(IdentityError::WrongAuthorizedParty {
            expected: client_id.to_owned(),
            found: answer
                .client_id
                .as_deref()
                .map(|c| super::http::sanitize(c, 128))
                .unwrap_or_default(),
        });
    }
    if let Some(iss) = &answer.iss
        && iss != &cfg.issuer
    {
        return Err(IdentityError::WrongIssuer {
            expected: cfg.issuer.clone(),
            found: super::http::sanitize(iss, 256),
        });
    }
    let now = verify::unix_now();
    let exp = answer
        .exp
        .or_else(|| response.expires_in.map(|e| now + e))
        .ok_or(IdentityError::MissingClaim { claim: "exp" })?;
    if now > exp.saturating_add(cfg.clock_leeway_secs) {
        return Err(IdentityError::TokenExpired { exp, now });
    }
    // Reuse the claim mapping for groups; the fields it needs are filled from the answer.
    let mut claims = answer.rest;
    claims.insert(
        "sub".into(),
        answer.sub.unwrap_or_else(|| client_id.to_owned()).into(),
    );
    claims.insert("exp".into(), exp.into());
    claims.insert("iss".into(), cfg.issuer.clone().into());
    verify::identity_from_claims(
        &claims,
        IdentityKind::Service,
        Some(name),
        &cfg.groups_claim,
    )
}
