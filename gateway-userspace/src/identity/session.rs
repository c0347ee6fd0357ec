//! A verified session: the identity plus what is needed to renew it (a refresh
//! token for humans, the account's client credentials for services).
//!
//! Tokens are held as [`SecretString`] (zeroed on drop, redacted in `Debug`) and
//! leave this module only inside a [`LoginHandoff`] — the one JSON line the CLI
//! sends to the daemon over its control socket.

use std::time::{Duration, SystemTime};

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::{
    IdentityError, OidcClient, VerifiedIdentity,
    http::ClientAuth,
    verify::{IdentityKind, NonceRule},
};

/// How a session proves itself again.
#[derive(Clone)]
pub(crate) enum Credential {
    Human {
        client_id: String,
        refresh_token: Option<SecretString>,
        nonce: Option<String>,
    },
    Service {
        account: String,
    },
}

#[derive(Clone)]
pub struct Session {
    pub(crate) identity: VerifiedIdentity,
    pub(crate) credential: Credential,
    /// The last verified raw ID token (humans).
    pub(crate) id_token: Option<SecretString>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, refreshable) = match &self.credential {
            Credential::Human { refresh_token, .. } => ("human", refresh_token.is_some()),
            Credential::Service { .. } => ("service", true),
        };
        f.debug_struct("Session")
            .field("identity", &self.identity)
            .field("credential", &kind)
            .field("refreshable", &refreshable)
            .finish_non_exhaustive()
    }
}

/// Token endpoint answer (RFC 6749 5.1, OIDC Core 3.1.3.3).
#[derive(Deserialize)]
pub(crate) struct TokenResponse {
    pub access_token: SecretString,
    #[serde(default)]
    pub token_type: Option<String>,
    #[serde(default)]
    pub expires_in: Option<u64>,
    #[serde(default)]
    pub refresh_token: Option<SecretString>,
    #[serde(default)]
    pub id_token: Option<SecretString>,
}

/// What `agentgate login` hands to the daemon, as one JSON line. The daemon
/// re-verifies `id_token` itself ([`Session::from_handoff`]); nothing else here is
/// trusted. `Debug` redacts the tokens; `Serialize` writes them (it is the wire form).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginHandoff {
    /// Format version, currently 1.
    pub version: u32,
    pub issuer: String,
    /// The public client the tokens were issued to (refresh must use the same one).
    pub client_id: String,
    #[serde(serialize_with = "expose")]
    pub id_token: SecretString,
    #[serde(serialize_with = "expose_opt", default)]
    pub refresh_token: Option<SecretString>,
    /// The nonce the login sent; if the ID token carries a nonce, it must be this one.
    pub nonce: Option<String>,
}

impl std::fmt::Debug for LoginHandoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginHandoff")
            .field("version", &self.version)
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field("id_token", &"[redacted]")
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "[redacted]"),
            )
            .finish_non_exhaustive()
    }
}

/// Longest handoff line the daemon should read from the control socket.
pub const MAX_HANDOFF_LINE: usize = 256 * 1024;

fn expose<S: serde::Serializer>(v: &SecretString, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v.expose_secret())
}
#[expect(
    clippy::ref_option,
    reason = "serde's serialize_with passes &Option<T>"
)]
fn expose_opt<S: serde::Serializer>(v: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.serialize_some(v.expose_secret()),
        None => s.serialize_none(),
    }
}

impl Session {
    pub fn identity(&self) -> &VerifiedIdentity {
        &self.identity
    }

    /// Whether [`Session::refresh`] can renew this session.
    pub fn is_refreshable(&self) -> bool {
        match &self.credential {
            Credential::Human { refresh_token, .. } => refresh_token.is_some(),
            Credential::Service { .. } => true,
        }
    }

    /// The service account name, for service sessions.
    pub fn service_account(&self) -> Option<&str> {
        match &self.credential {
            Credential::Service { account } => Some(account),
            Credential::Human { .. } => None,
        }
    }

    /// The handoff for the daemon (human sessions only).
    pub fn handoff(&self) -> Option<LoginHandoff> {
        match &self.credential {
            Credential::Human {
                client_id,
                refresh_token,
                nonce,
            } => Some(LoginHandoff {
                version: 1,
                issuer: self.identity.issuer.clone(),
                client_id: client_id.clone(),
                id_token: self.id_token.clone()?,
                refresh_token: refresh_token.clone(),
                nonce: nonce.clone(),
            }),
            Credential::Service { .. } => None,
        }
    }

    /// Daemon side of `agentgate login`: verifies the handed-over ID token against
    /// this provider (signature, issuer, audience, expiry, nonce) and builds the session.
    pub async fn from_handoff(
        client: &OidcClient,
        handoff: LoginHandoff,
    ) -> Result<Session, IdentityError> {
        if handoff.version != 1 {
            return Err(IdentityError::MalformedToken {
                reason: format!("unknown handoff version {}", handoff.version),
            });
        }
        if handoff.issuer != client.config().issuer {
            return Err(IdentityError::WrongIssuer {
                expected: client.config().issuer.clone(),
                found: super::http::sanitize(&handoff.issuer, 256),
            });
        }
        let audiences = client.config().id_token_audiences();
        if !audiences.contains(&handoff.client_id) {
            return Err(IdentityError::WrongAudience {
                expected: audiences,
                found: vec![handoff.client_id],
            });
        }
        let nonce = handoff
            .nonce
            .as_deref()
            .map_or(NonceRule::Ignore, NonceRule::IfPresent);
        let identity = client
            .verify_id_token_with(
                handoff.id_token.expose_secret(),
                nonce,
                std::slice::from_ref(&handoff.client_id),
            )
            .await?;
        Ok(Session {
            identity,
            credential: Credential::Human {
                client_id: handoff.client_id,
                refresh_token: handoff.refresh_token,
                nonce: handoff.nonce,
            },
            id_token: Some(handoff.id_token),
        })
    }

    /// Renews the session at the provider: the refresh-token grant for humans (the
    /// new ID token is verified like the first, and must name the same subject), the
    /// client-credentials grant again for services. On error the session is unchanged;
    /// [`IdentityError::is_grant_revoked`] tells a revoked grant from a passing failure.
    pub async fn refresh(&mut self, client: &OidcClient) -> Result<(), IdentityError> {
        match &self.credential {
            Credential::Service { account } => {
                let fresh = super::service::service_account_login(client, account).await?;
                self.identity = fresh.identity;
                Ok(())
            }
            Credential::Human {
                client_id,
                refresh_token,
                nonce,
            } => {
                let refresh_token = refresh_token
                    .as_ref()
                    .ok_or(IdentityError::NoRefreshToken)?;
                let token_endpoint = client.metadata().await?.token_endpoint.clone();
                let response: TokenResponse = client
                    .http()
                    .post_form(
                        &token_endpoint,
                        &ClientAuth::Public { client_id },
                        &[
                            ("grant_type", "refresh_token"),
                            ("refresh_token", refresh_token.expose_secret()),
                        ],
                    )
                    .await?;
                check_token_type(&token_endpoint, &response)?;
                let identity = if let Some(id_token) = &response.id_token {
                    let rule = nonce
                        .as_deref()
                        .map_or(NonceRule::Ignore, NonceRule::IfPresent);
                    let fresh = client
                        .verify_id_token_with(
                            id_token.expose_secret(),
                            rule,
                            std::slice::from_ref(client_id),
                        )
                        .await?;
                    if fresh.subject != self.identity.subject {
                        return Err(IdentityError::SubjectChanged {
                            before: self.identity.subject.clone(),
                            after: fresh.subject,
                        });
                    }
                    fresh
                } else {
                    // OIDC Core 12.2: the answer may lack an ID token. The grant is still
                    // alive, which is what was asked; extend by the access token's lifetime.
                    let lifetime =
                        Duration::from_secs(response.expires_in.unwrap_or(300).min(3600));
                    VerifiedIdentity {
                        expires_at: SystemTime::now() + lifetime,
                        ..self.identity.clone()
                    }
                };
                let nonce = nonce.clone();
                let client_id = client_id.clone();
                let refresh_token = response
                    .refresh_token
                    .or_else(|| Some(refresh_token.clone()));
                self.identity = identity;
                if response.id_token.is_some() {
                    self.id_token = response.id_token;
                }
                self.credential = Credential::Human {
                    client_id,
                    refresh_token,
                    nonce,
                };
                Ok(())
            }
        }
    }

    /// Revokes the refresh token at the provider (RFC 7009), for `agentgate logout`.
    /// Best effort by nature: the daemon forgets the session whatever this returns.
    pub async fn revoke_at_provider(&self, client: &OidcClient) -> Result<(), IdentityError> {
        let Credential::Human {
            client_id,
            refresh_token: Some(token),
            ..
        } = &self.credential
        else {
            return Ok(());
        };
        let metadata = client.metadata().await?;
        let Some(url) = metadata.revocation_endpoint.clone() else {
            return Err(IdentityError::IdpMissingEndpoint {
                issuer: client.config().issuer.clone(),
                what: "a revocation endpoint",
            });
        };
        revoke_token(client, &url, client_id, token).await
    }
}

pub(crate) async fn revoke_token(
    client: &OidcClient,
    url: &str,
    client_id: &str,
    token: &SecretString,
) -> Result<(), IdentityError> {
    client
        .http()
        .post_form_raw(
            url,
            &ClientAuth::Public { client_id },
            &[
                ("token", token.expose_secret()),
                ("token_type_hint", "refresh_token"),
            ],
        )
        .await?;
    Ok(())
}

pub(crate) fn check_token_type(url: &str, response: &TokenResponse) -> Result<(), IdentityError> {
    match response.token_type.as_deref() {
        Some(t) if t.eq_ignore_ascii_case("bearer") || t.eq_ignore_ascii_case("dpop") => Ok(()),
        None => Ok(()),
        Some(other) => Err(IdentityError::IdpBadResponse {
            url: url.to_owned(),
            reason: format!(
                "unexpected token_type {:?}",
                super::http::sanitize(other, 32)
            ),
        }),
    }
}

impl Session {
    pub(crate) fn human(
        identity: VerifiedIdentity,
        client_id: String,
        response: TokenResponse,
        nonce: String,
    ) -> Self {
        Session {
            identity,
            credential: Credential::Human {
                client_id,
                refresh_token: response.refresh_token,
                nonce: Some(nonce),
            },
            id_token: response.id_token,
        }
    }

    pub(crate) fn service(identity: VerifiedIdentity, account: String) -> Self {
        debug_assert_eq!(identity.kind, IdentityKind::Service);
        Session {
            identity,
            credential: Credential::Service { account },
            id_token: None,
        }
    }

    /// Identity key for name conflicts: same issuer, subject and kind.
    pub(crate) fn same_principal(&self, other: &Session) -> bool {
        self.identity.issuer == other.identity.issuer
            && self.identity.subject == other.identity.subject
            && self.identity.kind == other.identity.kind
    }
}
