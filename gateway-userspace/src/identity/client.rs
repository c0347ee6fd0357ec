//! [`OidcClient`]: one configured provider — discovery (fetched lazily, cached),
//! the JWKS cache, and ID-token verification. The daemon builds one at start
//! (no network I/O then, so a provider that is down does not stop the daemon; it
//! only makes logins and refreshes fail) and shares it.

use std::{sync::Arc, time::Duration};

use serde::Deserialize;
use tokio::sync::OnceCell;

use super::{
    IdentityConfig, IdentityError,
    config::check_provider_url,
    http::Http,
    jwks::JwksCache,
    verify::{self, ClaimRules, IdentityKind, NonceRule, VerifiedIdentity, Verifier},
};

/// What the provider's discovery document says (the fields we use).
#[derive(Debug, Clone, Deserialize)]
pub struct ProviderMetadata {
    pub issuer: String,
    pub jwks_uri: String,
    pub token_endpoint: String,
    #[serde(default)]
    pub device_authorization_endpoint: Option<String>,
    #[serde(default)]
    pub revocation_endpoint: Option<String>,
    #[serde(default)]
    pub introspection_endpoint: Option<String>,
}

struct Discovered {
    metadata: ProviderMetadata,
    verifier: Verifier,
}

pub struct OidcClient {
    cfg: Arc<IdentityConfig>,
    http: Http,
    discovered: OnceCell<Arc<Discovered>>,
}

impl std::fmt::Debug for OidcClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcClient")
            .field("issuer", &self.cfg.issuer)
            .field("discovered", &self.discovered.initialized())
            .finish_non_exhaustive()
    }
}

impl OidcClient {
    /// Validates the configuration and builds the HTTP client. No network I/O.
    pub fn new(cfg: IdentityConfig) -> Result<Self, IdentityError> {
        cfg.validate()?;
        let http = Http::new(cfg.http_timeout())?;
        Ok(OidcClient {
            cfg: Arc::new(cfg),
            http,
            discovered: OnceCell::new(),
        })
    }

    pub fn config(&self) -> &IdentityConfig {
        &self.cfg
    }

    pub(crate) fn http(&self) -> &Http {
        &self.http
    }

    /// The provider's metadata, fetched on first use. A failed fetch is not cached.
    pub async fn metadata(&self) -> Result<&ProviderMetadata, IdentityError> {
        Ok(&self.discovered().await?.metadata)
    }

    async fn discovered(&self) -> Result<&Arc<Discovered>, IdentityError> {
        self.discovered.get_or_try_init(|| self.discover()).await
    }

    async fn discover(&self) -> Result<Arc<Discovered>, IdentityError> {
        let issuer = &self.cfg.issuer;
        let url = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let metadata: ProviderMetadata = self.http.get_json(&url).await?;
        // OIDC Discovery 4.3: the issuer in the document must be exactly the configured one.
        if &metadata.issuer != issuer {
            return Err(IdentityError::DiscoveryIssuerMismatch {
                url,
                expected: issuer.clone(),
                found: super::http::sanitize(&metadata.issuer, 256),
            });
        }
        let endpoint = |field: &'static str, value: &str| {
            check_provider_url(field, value).map_err(|e| IdentityError::IdpBadResponse {
                url: url.clone(),
                reason: e.to_string(),
            })
        };
        endpoint("jwks_uri", &metadata.jwks_uri)?;
        endpoint("token_endpoint", &metadata.token_endpoint)?;
        for (field, value) in [
            (
                "device_authorization_endpoint",
                &metadata.device_authorization_endpoint,
            ),
            ("revocation_endpoint", &metadata.revocation_endpoint),
            ("introspection_endpoint", &metadata.introspection_endpoint),
        ] {
            if let Some(v) = value {
                endpoint(field, v)?;
            }
        }
        tracing::info!(%issuer, "discovered identity provider");
        let verifier = Verifier {
            jwks: JwksCache::new(
                metadata.jwks_uri.clone(),
                Duration::from_secs(self.cfg.jwks_cache_ttl_secs),
                Duration::from_secs(self.cfg.jwks_refetch_min_interval_secs),
            ),
            groups_claim: self.cfg.groups_claim.clone(),
        };
        Ok(Arc::new(Discovered { metadata, verifier }))
    }

    /// Verifies an ID token from this provider: signature against its JWKS, `iss`,
    /// `aud` (the configured `client_id` or one of `audiences`), `azp`, `exp`, `iat`,
    /// `nbf` (with `clock_leeway_secs`), and, when `nonce` is given, that the token
    /// carries exactly that nonce (use [`super::Session::from_handoff`] for device-flow
    /// tokens, which may lack one). This is what
    /// the daemon calls on a token handed over by `agentgate login`: it trusts no
    /// claim the CLI made about it.
    pub async fn verify_id_token(
        &self,
        raw: &str,
        nonce: Option<&str>,
    ) -> Result<VerifiedIdentity, IdentityError> {
        let rule = nonce.map_or(NonceRule::Ignore, NonceRule::Required);
        self.verify_id_token_with(raw, rule, &self.cfg.id_token_audiences())
            .await
    }

    pub(crate) async fn verify_id_token_with(
        &self,
        raw: &str,
        nonce: NonceRule<'_>,
        audiences: &[String],
    ) -> Result<VerifiedIdentity, IdentityError> {
        let discovered = self.discovered().await?;
        if audiences.is_empty() {
            return Err(IdentityError::Config {
                field: "client_id",
                reason: "no client_id or audiences configured to check ID tokens against"
                    .to_owned(),
            });
        }
        let claims = discovered.verifier.verified_claims(&self.http, raw).await?;
        let rules = ClaimRules {
            issuer: &self.cfg.issuer,
            audiences,
            authorized_parties: audiences,
            nonce,
            leeway: self.cfg.clock_leeway_secs,
            require_iat: true,
        };
        verify::check_claims(&claims, &rules, verify::unix_now())?;
        verify::identity_from_claims(
            &claims,
            IdentityKind::Human,
            None,
            &discovered.verifier.groups_claim,
        )
    }

    /// Verifies a service account's JWT access token (RFC 9068): signature, `iss`,
    /// `aud` (the account's `audience` or one of `audiences`), `exp`, `iat`, `nbf`,
    /// and that `client_id` (or `azp`) is the account's client.
    pub(crate) async fn verify_service_access_token(
        &self,
        raw: &str,
        account_name: &str,
        client_id: &str,
        audiences: &[String],
    ) -> Result<VerifiedIdentity, IdentityError> {
        let discovered = self.discovered().await?;
        let claims = discovered.verifier.verified_claims(&self.http, raw).await?;
        let parties = [client_id.to_owned()];
        let rules = ClaimRules {
            issuer: &self.cfg.issuer,
            audiences,
            authorized_parties: &parties,
            nonce: NonceRule::Ignore,
            leeway: self.cfg.clock_leeway_secs,
            require_iat: false,
        };
        verify::check_claims(&claims, &rules, verify::unix_now())?;
        let token_client = claims
            .get("client_id")
            .or_else(|| claims.get("azp"))
            .and_then(serde_json::Value::as_str)
            .ok_or(IdentityError::MissingClaim { claim: "client_id" })?;
        if token_client != client_id {
            return Err(IdentityError::WrongAuthorizedParty {
                expected: client_id.to_owned(),
                found: super::http::sanitize(token_client, 128),
            });
        }
        verify::identity_from_claims(
            &claims,
            IdentityKind::Service,
            Some(account_name),
            &discovered.verifier.groups_claim,
        )
    }

    /// Verifies a bearer token presented to the daemon's HTTP API: an RFC 9068
    /// access token of a configured service account (picked by the token's
    /// `client_id`; then its `aud` must be the account's `audience` or one of
    /// `audiences`), else an ID token (`aud`: `client_id`, `audiences` or one
    /// of `extra_audiences`, such as the web page's client). Signature, `iss`,
    /// `aud`, `exp` are checked as for every other token; nothing in the token
    /// is trusted before its signature is verified (the `client_id` peek only
    /// chooses which checks apply).
    pub async fn verify_bearer(
        &self,
        raw: &str,
        extra_audiences: &[String],
    ) -> Result<VerifiedIdentity, IdentityError> {
        verify::parse_header(raw)?;
        let client_id = unverified_claim(raw, "client_id");
        if let Some(sa) = client_id
            .as_deref()
            .and_then(|c| self.cfg.service_account.iter().find(|sa| sa.client_id == c))
        {
            let audiences: Vec<String> = sa
                .audience
                .iter()
                .chain(&self.cfg.audiences)
                .cloned()
                .collect();
            return self
                .verify_service_access_token(raw, &sa.name, &sa.client_id, &audiences)
                .await;
        }
        let mut audiences = self.cfg.id_token_audiences();
        audiences.extend(extra_audiences.iter().cloned());
        self.verify_id_token_with(raw, NonceRule::Ignore, &audiences)
            .await
    }

    /// Verifies the ID token of a browser login (authorization code flow) for
    /// `client_id`: as [`Self::verify_id_token`], with that client as the only
    /// accepted audience and the login's nonce required.
    pub async fn verify_login_id_token(
        &self,
        raw: &str,
        nonce: &str,
        client_id: &str,
    ) -> Result<VerifiedIdentity, IdentityError> {
        self.verify_id_token_with(raw, NonceRule::Required(nonce), &[client_id.to_owned()])
            .await
    }

    /// How many times the JWKS was fetched (status output, tests).
    pub async fn jwks_fetch_count(&self) -> u64 {
        match self.discovered.get() {
            Some(d) => d.verifier.jwks.fetch_count().await,
            None => 0,
        }
    }

    /// The JWKS URI in use, once discovered.
    pub fn jwks_uri(&self) -> Option<&str> {
        self.discovered.get().map(|d| d.verifier.jwks.uri())
    }
}

/// A string claim of a token read WITHOUT verifying it: only to choose which
/// verification applies, never to decide anything.
fn unverified_claim(raw: &str, name: &str) -> Option<String> {
    use base64::Engine as _;
    let payload = raw.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes).ok()?;
    claims.get(name)?.as_str().map(str::to_owned)
}
