//! The provider's signing keys (JWKS), cached.
//!
//! Trade-off: a key id we have not seen triggers one refetch (the provider may
//! have rotated keys), but at most once per `jwks_refetch_min_interval_secs`,
//! so tokens with made-up key ids cannot make us hammer the provider; within that
//! interval an unknown key id fails at once. The cache is refreshed after
//! `jwks_cache_ttl_secs`. If the JWKS cannot be fetched, verification fails
//! (closed): no token is accepted on a stale or missing key set.
//!
//! Only asymmetric signature keys are kept (RSA, EC P-256/P-384, Ed25519).
//! Symmetric (`oct`) keys and encryption keys are ignored, so a token can never
//! be "verified" with an HMAC over public key material.

use std::time::Duration;

use jsonwebtoken::{
    Algorithm, DecodingKey,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, PublicKeyUse},
};
use tokio::{sync::Mutex, time::Instant};

use super::{IdentityError, http::Http};

/// Most keys kept from one JWKS document.
const MAX_KEYS: usize = 64;

/// Signature algorithms accepted at all. Never `none`, never HMAC.
pub(crate) const ACCEPTED_ALGORITHMS: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyFamily {
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl KeyFamily {
    fn accepts(self, alg: Algorithm) -> bool {
        use Algorithm as A;
        match self {
            KeyFamily::Rsa => matches!(
                alg,
                A::RS256 | A::RS384 | A::RS512 | A::PS256 | A::PS384 | A::PS512
            ),
            KeyFamily::P256 => alg == A::ES256,
            KeyFamily::P384 => alg == A::ES384,
            KeyFamily::Ed25519 => alg == A::EdDSA,
        }
    }
}

struct VerifyKey {
    kid: Option<String>,
    family: KeyFamily,
    /// The JWK's own `alg`, if it names one: then only that algorithm is accepted.
    alg: Option<Algorithm>,
    key: DecodingKey,
}

#[derive(Default)]
struct State {
    keys: Vec<VerifyKey>,
    fetched_at: Option<Instant>,
    fetches: u64,
}

pub(crate) struct JwksCache {
    uri: String,
    ttl: Duration,
    min_refetch: Duration,
    state: Mutex<State>,
}

impl JwksCache {
    pub(crate) fn new(uri: String, ttl: Duration, min_refetch: Duration) -> Self {
        JwksCache {
            uri,
            ttl,
            min_refetch,
            state: Mutex::new(State::default()),
        }
    }

    pub(crate) fn uri(&self) -> &str {
        &self.uri
    }

    /// The key that must have signed a token with this header, and the algorithm to
    /// verify with. Fetches or refetches the JWKS as the module doc describes.
    pub(crate) async fn key_for(
        &self,
        http: &Http,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<(DecodingKey, Algorithm), IdentityError> {
        if !ACCEPTED_ALGORITHMS.contains(&alg) {
            return Err(IdentityError::UnsupportedAlgorithm {
                alg: format!("{alg:?}"),
            });
        }
        // Held across the fetch on purpose: concurrent verifications share one fetch.
        let mut state = self.state.lock().await;
        let now = Instant::now();
        let cache_expired = state
            .fetched_at
            .is_none_or(|at| now.duration_since(at) >= self.ttl);
        if cache_expired {
            self.fetch(http, &mut state).await?;
        }
        if let Some(found) = find(&state.keys, kid, alg)? {
            return Ok(found);
        }
        let may_refetch = !cache_expired
            && state
                .fetched_at
                .is_none_or(|at| now.duration_since(at) >= self.min_refetch);
        if may_refetch {
            tracing::info!(jwks_uri = %self.uri, kid = ?kid, "unknown signing key id; refetching the JWKS once");
            self.fetch(http, &mut state).await?;
            if let Some(found) = find(&state.keys, kid, alg)? {
                return Ok(found);
            }
        }
        Err(IdentityError::UnknownKey {
            kid: kid.map(str::to_owned),
        })
    }

    /// How many times the JWKS was fetched (for status output and tests).
    pub(crate) async fn fetch_count(&self) -> u64 {
        self.state.lock().await.fetches
    }

    async fn fetch(&self, http: &Http, state: &mut State) -> Result<(), IdentityError> {
        #[derive(serde::Deserialize)]
        struct Document {
            keys: Vec<serde_json::Value>,
        }
        state.fetches += 1;
        let doc: Document = http.get_json(&self.uri).await?;
        let mut keys = Vec::new();
        for value in doc.keys.into_iter().take(MAX_KEYS) {
            match serde_json::from_value::<Jwk>(value) {
                Ok(jwk) => {
                    if let Some(key) = usable(&jwk) {
                        keys.push(key);
                    }
                }
                Err(e) => {
                    tracing::debug!(jwks_uri = %self.uri, error = %e, "skipping a JWK we cannot parse");
                }
            }
        }
        if keys.is_empty() {
            return Err(IdentityError::IdpBadResponse {
                url: self.uri.clone(),
                reason: "the JWKS holds no usable signature key".to_owned(),
            });
        }
        tracing::debug!(jwks_uri = %self.uri, keys = keys.len(), "fetched JWKS");
        state.keys = keys;
        state.fetched_at = Some(Instant::now());
        Ok(())
    }
}

fn usable(jwk: &Jwk) -> Option<VerifyKey> {
    if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
        return None;
    }
    let family = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => KeyFamily::Rsa,
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => KeyFamily::P256,
            EllipticCurve::P384 => KeyFamily::P384,
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => KeyFamily::Ed25519,
            _ => return None,
        },
        AlgorithmParameters::OctetKey(_) => return None,
    };
    let alg = match jwk.common.key_algorithm {
        None => None,
        Some(ka) => Some(ka.to_string().parse::<Algorithm>().ok()?),
    };
    if alg.is_some_and(|a| !family.accepts(a)) {
        return None;
    }
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(VerifyKey {
        kid: jwk.common.key_id.clone(),
        family,
        alg,
        key,
    })
}

/// A key matching `kid` (or, when the token names none, the only key that fits `alg`).
/// A key with the right id but the wrong type for `alg` is an error, not a miss.
fn find(
    keys: &[VerifyKey],
    kid: Option<&str>,
    alg: Algorithm,
) -> Result<Option<(DecodingKey, Algorithm)>, IdentityError> {
    let fits = |k: &VerifyKey| k.family.accepts(alg) && k.alg.is_none_or(|a| a == alg);
    let Some(kid) = kid else {
        let mut candidates = keys.iter().filter(|k| fits(k));
        return match (candidates.next(), candidates.next()) {
            (Some(k), None) => Ok(Some((k.key.clone(), alg))),
            _ => Ok(None),
        };
    };
    let mut same_id = keys
        .iter()
        .filter(|k| k.kid.as_deref() == Some(kid))
        .peekable();
    if same_id.peek().is_none() {
        return Ok(None);
    }
    match same_id.find(|k| fits(k)) {
        Some(k) => Ok(Some((k.key.clone(), alg))),
        None => Err(IdentityError::UnsupportedAlgorithm {
            alg: format!("{alg:?} for key {kid:?}"),
        }),
    }
}
