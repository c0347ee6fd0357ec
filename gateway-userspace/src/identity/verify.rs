//! Token verification: JWS signature against the provider's JWKS, then the
//! claims (`iss`, `aud`, `azp`, `exp`, `iat`, `nbf`, `nonce`), then the mapping
//! to a [`VerifiedIdentity`]. Every check fails closed; nothing from the token is
//! used before the signature has been verified.
//!
//! Header fields that point at keys (`jwk`, `jku`, `x5u`, `x5c`) are ignored: keys
//! come only from the configured issuer's discovery document. A `crit` header is
//! refused, since we implement no JWS extensions.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};

use super::{IdentityError, http::Http, jwks::JwksCache};

/// Longest token accepted (ID tokens with many groups can be large, but not this large).
pub(crate) const MAX_TOKEN_LEN: usize = 64 * 1024;
const MAX_GROUPS: usize = 512;
const MAX_CLAIM_TEXT: usize = 256;

/// Who a verified token says the caller is.
///
/// Holds no token and no secret, so the derived `Debug` is safe to log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VerifiedIdentity {
    /// `sub`: stable, unique at the issuer.
    pub subject: String,
    /// Display and lookup name: `preferred_username`, else `email`, else `sub` for
    /// humans; the configured account name for service accounts.
    pub name: String,
    pub kind: IdentityKind,
    /// From the configured groups claim; empty when the token has none.
    pub groups: Vec<String>,
    pub issuer: String,
    /// When the proving token expires (its `exp`).
    #[serde(with = "unix_seconds")]
    pub expires_at: SystemTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityKind {
    Human,
    Service,
}

/// How the `nonce` claim is checked.
#[derive(Debug, Clone, Copy)]
pub(crate) enum NonceRule<'a> {
    /// Not checked (service-account access tokens have none).
    Ignore,
    /// Must be present and equal (the login's own ID token).
    Required(&'a str),
    /// If present, must be equal (ID tokens from a refresh, OIDC Core 12.2).
    IfPresent(&'a str),
}

/// What a token's claims must satisfy.
#[derive(Debug, Clone)]
pub(crate) struct ClaimRules<'a> {
    pub issuer: &'a str,
    /// The token's `aud` must contain at least one of these.
    pub audiences: &'a [String],
    /// If the token has an `azp`, it must be one of these.
    pub authorized_parties: &'a [String],
    pub nonce: NonceRule<'a>,
    pub leeway: u64,
    /// Whether `iat` must be present (ID tokens: yes).
    pub require_iat: bool,
}

pub(crate) struct Verifier {
    pub(crate) jwks: JwksCache,
    pub(crate) groups_claim: String,
}

#[derive(serde::Deserialize)]
struct RawHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<Value>,
}

/// The algorithm and key id a token claims, without trusting anything else in it.
pub(crate) fn parse_header(raw: &str) -> Result<(Algorithm, Option<String>), IdentityError> {
    let malformed = |reason: &str| IdentityError::MalformedToken {
        reason: reason.to_owned(),
    };
    if raw.len() > MAX_TOKEN_LEN {
        return Err(malformed("longer than 64 KiB"));
    }
    let mut parts = raw.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(malformed("not a compact JWS (three dot-separated parts)"));
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| malformed("header is not base64url"))?;
    let header: RawHeader = serde_json::from_slice(&bytes)
        .map_err(|e| malformed(&format!("header is not a JOSE header: {e}")))?;
    if header.crit.is_some() {
        return Err(malformed(
            "header has a crit parameter; no JWS extensions are supported",
        ));
    }
    let alg = header
        .alg
        .parse::<Algorithm>()
        .map_err(|_| IdentityError::UnsupportedAlgorithm {
            alg: super::http::sanitize(&header.alg, 32),
        })?;
    if let Some(kid) = &header.kid
        && (kid.len() > MAX_CLAIM_TEXT || kid.chars().any(char::is_control))
    {
        return Err(malformed("key id is too long or not printable"));
    }
    Ok((alg, header.kid))
}

/// True when `raw` looks like a JWS we should verify (rather than an opaque token).
pub(crate) fn looks_like_jws(raw: &str) -> bool {
    parse_header(raw).is_ok()
}

impl Verifier {
    /// Verifies the signature and returns the claims, unchecked otherwise.
    pub(crate) async fn verified_claims(
        &self,
        http: &Http,
        raw: &str,
    ) -> Result<Map<String, Value>, IdentityError> {
        let (alg, kid) = parse_header(raw)?;
        let (key, alg) = self.jwks.key_for(http, kid.as_deref(), alg).await?;
        let mut validation = Validation::new(alg);
        // Claims are checked by `check_claims`, with our leeway and error messages.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims.clear();
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(raw, &key, &validation).map_err(|e| {
                use jsonwebtoken::errors::ErrorKind as K;
                match e.kind() {
                    K::InvalidSignature
                    | K::InvalidEcdsaKey
                    | K::InvalidRsaKey(_)
                    | K::InvalidKeyFormat => IdentityError::BadSignature { kid: kid.clone() },
                    K::InvalidAlgorithm => IdentityError::UnsupportedAlgorithm {
                        alg: format!("{alg:?}"),
                    },
                    other => IdentityError::MalformedToken {
                        reason: format!("{other:?}"),
                    },
                }
            })?;
        Ok(data.claims)
    }
}

/// Checks the claims of a signature-verified token at `now` (unix seconds).
pub(crate) fn check_claims(
    claims: &Map<String, Value>,
    rules: &ClaimRules<'_>,
    now: u64,
) -> Result<(), IdentityError> {
    let iss = string_claim(claims, "iss")?.ok_or(IdentityError::MissingClaim { claim: "iss" })?;
    if iss != rules.issuer {
        return Err(IdentityError::WrongIssuer {
            expected: rules.issuer.to_owned(),
            found: short(iss),
        });
    }
    let aud: Vec<String> = match claims.get("aud") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("aud", "not a string or an array of strings"))?,
        Some(_) => return Err(bad("aud", "not a string or an array of strings")),
        None => return Err(IdentityError::MissingClaim { claim: "aud" }),
    };
    if !aud.iter().any(|a| rules.audiences.contains(a)) {
        return Err(IdentityError::WrongAudience {
            expected: rules.audiences.to_vec(),
            found: aud.iter().take(8).map(|a| short(a)).collect(),
        });
    }
    if let Some(azp) = string_claim(claims, "azp")?
        && !rules.authorized_parties.iter().any(|p| p == azp)
    {
        return Err(IdentityError::WrongAuthorizedParty {
            expected: rules.authorized_parties.join(" "),
            found: short(azp),
        });
    }
    let exp = time_claim(claims, "exp")?.ok_or(IdentityError::MissingClaim { claim: "exp" })?;
    if now > exp.saturating_add(rules.leeway) {
        return Err(IdentityError::TokenExpired { exp, now });
    }
    match time_claim(claims, "iat")? {
        Some(iat) if iat > now.saturating_add(rules.leeway) => {
            return Err(IdentityError::IssuedInFuture { iat, now });
        }
        None if rules.require_iat => return Err(IdentityError::MissingClaim { claim: "iat" }),
        Some(_) | None => {}
    }
    if let Some(nbf) = time_claim(claims, "nbf")?
        && nbf > now.saturating_add(rules.leeway)
    {
        return Err(IdentityError::NotYetValid { nbf, now });
    }
    let nonce = string_claim(claims, "nonce")?;
    match (rules.nonce, nonce) {
        (NonceRule::Ignore, _) | (NonceRule::IfPresent(_), None) => {}
        (NonceRule::Required(want) | NonceRule::IfPresent(want), Some(got)) => {
            if !constant_time_eq(want.as_bytes(), got.as_bytes()) {
                return Err(IdentityError::NonceMismatch);
            }
        }
        (NonceRule::Required(_), None) => return Err(IdentityError::NonceMismatch),
    }
    Ok(())
}

/// Builds the identity from checked claims.
pub(crate) fn identity_from_claims(
    claims: &Map<String, Value>,
    kind: IdentityKind,
    service_name: Option<&str>,
    groups_claim: &str,
) -> Result<VerifiedIdentity, IdentityError> {
    let subject =
        string_claim(claims, "sub")?.ok_or(IdentityError::MissingClaim { claim: "sub" })?;
    check_text("sub", subject)?;
    let name = if let Some(name) = service_name {
        name.to_owned()
    } else {
        let name = ["preferred_username", "email"]
            .into_iter()
            .find_map(|c| {
                claims
                    .get(c)
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
            })
            .unwrap_or(subject);
        check_text("preferred_username", name)?;
        name.to_owned()
    };
    let groups = groups(claims, groups_claim)?;
    let exp = time_claim(claims, "exp")?.ok_or(IdentityError::MissingClaim { claim: "exp" })?;
    let iss = string_claim(claims, "iss")?.ok_or(IdentityError::MissingClaim { claim: "iss" })?;
    Ok(VerifiedIdentity {
        subject: subject.to_owned(),
        name,
        kind,
        groups,
        issuer: iss.to_owned(),
        expires_at: UNIX_EPOCH + Duration::from_secs(exp),
    })
}

/// Groups from `claim`: the claim itself if present (Auth0-style names contain dots),
/// else a dotted path into nested objects (Keycloak's `realm_access.roles`).
fn groups(claims: &Map<String, Value>, claim: &str) -> Result<Vec<String>, IdentityError> {
    let value = claims.get(claim).or_else(|| {
        let mut parts = claim.split('.');
        let first = claims.get(parts.next()?)?;
        parts.try_fold(first, |v, p| v.get(p))
    });
    let list = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad(claim, "not a string or an array of strings"))?,
        Some(_) => return Err(bad(claim, "not a string or an array of strings")),
    };
    if list.len() > MAX_GROUPS {
        return Err(bad(claim, "more than 512 groups"));
    }
    for g in &list {
        check_text(claim, g)?;
    }
    Ok(list)
}

fn check_text(claim: &str, value: &str) -> Result<(), IdentityError> {
    if value.is_empty() || value.len() > MAX_CLAIM_TEXT || value.chars().any(char::is_control) {
        return Err(bad(claim, "empty, longer than 256 bytes, or not printable"));
    }
    Ok(())
}

fn string_claim<'a>(
    claims: &'a Map<String, Value>,
    name: &str,
) -> Result<Option<&'a str>, IdentityError> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(bad(name, "not a string")),
    }
}

fn time_claim(claims: &Map<String, Value>, name: &str) -> Result<Option<u64>, IdentityError> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n
            .as_u64()
            .or_else(|| {
                n.as_f64()
                    .filter(|f| f.is_finite() && *f >= 0.0)
                    .map(|f| f as u64)
            })
            .map(Some)
            .ok_or_else(|| bad(name, "not a non-negative NumericDate")),
        Some(_) => Err(bad(name, "not a NumericDate")),
    }
}

fn bad(claim: &str, reason: &str) -> IdentityError {
    IdentityError::BadClaim {
        claim: claim.to_owned(),
        reason: reason.to_owned(),
    }
}

fn short(s: &str) -> String {
    super::http::sanitize(s, 128)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub(crate) mod unix_seconds {
    use std::time::{SystemTime, UNIX_EPOCH};

    pub fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn claims(v: Value) -> Map<String, Value> {
        let Value::Object(map) = v else {
            panic!("not an object")
        };
        map
    }

    fn rules<'a>(aud: &'a [String], nonce: NonceRule<'a>) -> ClaimRules<'a> {
        ClaimRules {
            issuer: "https://idp",
            audiences: aud,
            authorized_parties: aud,
            nonce,
            leeway: 5,
            require_iat: true,
        }
    }

    fn good() -> Value {
        json!({"iss": "https://idp", "aud": "cli", "sub": "u1", "exp": 1000, "iat": 900, "nonce": "n1"})
    }

    #[test]
    fn accepts_good_claims_and_honours_leeway() {
        let aud = vec!["cli".to_owned()];
        let c = claims(good());
        check_claims(&c, &rules(&aud, NonceRule::Required("n1")), 1000).unwrap();
        check_claims(&c, &rules(&aud, NonceRule::Required("n1")), 1005).unwrap();
        assert!(matches!(
            check_claims(&c, &rules(&aud, NonceRule::Required("n1")), 1006),
            Err(IdentityError::TokenExpired {
                exp: 1000,
                now: 1006
            })
        ));
    }

    #[test]
    fn rejects_each_bad_claim() {
        let aud = vec!["cli".to_owned()];
        let r = rules(&aud, NonceRule::Required("n1"));
        let with = |k: &str, v: Value| {
            let mut c = claims(good());
            c.insert(k.to_owned(), v);
            c
        };
        assert!(matches!(
            check_claims(&with("iss", json!("https://evil")), &r, 950),
            Err(IdentityError::WrongIssuer { .. })
        ));
        assert!(matches!(
            check_claims(&with("aud", json!(["other", "x"])), &r, 950),
            Err(IdentityError::WrongAudience { .. })
        ));
        assert!(matches!(
            check_claims(&with("azp", json!("other")), &r, 950),
            Err(IdentityError::WrongAuthorizedParty { .. })
        ));
        assert!(matches!(
            check_claims(&with("iat", json!(2000)), &r, 950),
            Err(IdentityError::IssuedInFuture { .. })
        ));
        assert!(matches!(
            check_claims(&with("nbf", json!(2000)), &r, 950),
            Err(IdentityError::NotYetValid { .. })
        ));
        assert!(matches!(
            check_claims(&with("nonce", json!("n2")), &r, 950),
            Err(IdentityError::NonceMismatch)
        ));
        assert!(matches!(
            check_claims(&with("exp", json!("soon")), &r, 950),
            Err(IdentityError::BadClaim { .. })
        ));
        let mut no_nonce = claims(good());
        no_nonce.remove("nonce");
        assert!(matches!(
            check_claims(&no_nonce, &r, 950),
            Err(IdentityError::NonceMismatch)
        ));
        check_claims(&no_nonce, &rules(&aud, NonceRule::IfPresent("n1")), 950).unwrap();
        let mut no_exp = claims(good());
        no_exp.remove("exp");
        assert!(matches!(
            check_claims(&no_exp, &r, 950),
            Err(IdentityError::MissingClaim { claim: "exp" })
        ));
    }

    #[test]
    fn audience_array_containing_ours_is_accepted() {
        let aud = vec!["cli".to_owned()];
        let mut c = claims(good());
        c.insert("aud".into(), json!(["api", "cli"]));
        c.insert("azp".into(), json!("cli"));
        check_claims(&c, &rules(&aud, NonceRule::Required("n1")), 950).unwrap();
    }

    #[test]
    fn identity_name_and_groups() {
        let c = claims(
            json!({"iss": "https://idp", "sub": "u1", "exp": 1000, "email": "a@x",
                               "realm_access": {"roles": ["r1", "r2"]}, "https://x.io/groups": "g"}),
        );
        let id = identity_from_claims(&c, IdentityKind::Human, None, "realm_access.roles").unwrap();
        assert_eq!(id.name, "a@x");
        assert_eq!(id.groups, ["r1", "r2"]);
        let id =
            identity_from_claims(&c, IdentityKind::Human, None, "https://x.io/groups").unwrap();
        assert_eq!(id.groups, ["g"]);
        let id = identity_from_claims(&c, IdentityKind::Service, Some("svc"), "groups").unwrap();
        assert_eq!((id.name.as_str(), id.groups.len()), ("svc", 0));
        let bad_groups = claims(json!({"iss": "i", "sub": "u1", "exp": 1, "groups": [1, 2]}));
        assert!(identity_from_claims(&bad_groups, IdentityKind::Human, None, "groups").is_err());
    }

    #[test]
    fn header_parsing_refuses_none_hmac_garbage_and_crit() {
        let enc = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let tok = |h: Value| format!("{}.e30.c2ln", enc(h));
        assert!(matches!(
            parse_header(&tok(json!({"alg": "none"}))),
            Err(IdentityError::UnsupportedAlgorithm { .. })
        ));
        // HS256 parses as an algorithm; it is refused by the key lookup (ACCEPTED_ALGORITHMS).
        assert!(
            !super::super::jwks::ACCEPTED_ALGORITHMS
                .contains(&parse_header(&tok(json!({"alg": "HS256"}))).unwrap().0)
        );
        assert!(matches!(
            parse_header("abc"),
            Err(IdentityError::MalformedToken { .. })
        ));
        assert!(matches!(
            parse_header(&tok(json!({"alg": "RS256", "crit": ["exp"]}))),
            Err(IdentityError::MalformedToken { .. })
        ));
        assert_eq!(
            parse_header(&tok(json!({"alg": "ES256", "kid": "k1"}))).unwrap(),
            (Algorithm::ES256, Some("k1".into()))
        );
    }
}
