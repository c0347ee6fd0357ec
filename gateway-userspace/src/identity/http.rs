//! The one HTTP client used to talk to the identity provider, with the limits
//! every outside input gets: a per-request deadline (tokio time, covering
//! connect, headers and body), a response size cap, no redirects, and errors
//! that name the URL. Request bodies (which carry secrets) are never logged.

use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;

use super::IdentityError;

/// Largest response body accepted from the provider (discovery, JWKS, tokens).
pub(crate) const MAX_RESPONSE_BYTES: usize = 1 << 20;
/// Longest OAuth `error_description` we repeat to users and records.
const MAX_DESCRIPTION: usize = 200;

#[derive(Debug, Clone)]
pub(crate) struct Http {
    client: reqwest::Client,
    timeout: Duration,
}

/// Client authentication on token, revocation and introspection endpoints.
pub(crate) enum ClientAuth<'a> {
    /// Public client: `client_id` in the form (RFC 6749 2.3, `none`).
    Public { client_id: &'a str },
    /// `client_secret_basic` (RFC 6749 2.3.1, with the form-encoding it requires).
    Basic {
        client_id: &'a str,
        secret: &'a SecretString,
    },
}

impl Http {
    pub(crate) fn new(timeout: Duration) -> Result<Self, IdentityError> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("agentgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| IdentityError::Config {
                field: "http client",
                reason: e.to_string(),
            })?;
        Ok(Http { client, timeout })
    }

    pub(crate) async fn get_json<T: DeserializeOwned>(
        &self,
        url: &str,
    ) -> Result<T, IdentityError> {
        tracing::debug!(%url, "GET from identity provider");
        let request = self
            .client
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json");
        let (status, body) = self.send(url, request).await?;
        if !status.is_success() {
            return Err(IdentityError::IdpHttpStatus {
                url: url.to_owned(),
                status: status.as_u16(),
            });
        }
        parse_json(url, &body)
    }

    /// POSTs a form to an OAuth endpoint. A 2xx answer is parsed as `T`; a 4xx answer
    /// carrying an OAuth error object becomes [`IdentityError::OAuth`].
    pub(crate) async fn post_form<T: DeserializeOwned>(
        &self,
        url: &str,
        auth: &ClientAuth<'_>,
        form: &[(&str, &str)],
    ) -> Result<T, IdentityError> {
        let body = self.post_form_raw(url, auth, form).await?;
        parse_json(url, &body)
    }

    /// Like [`Http::post_form`] for endpoints whose success answer has no useful body
    /// (revocation, RFC 7009).
    pub(crate) async fn post_form_raw(
        &self,
        url: &str,
        auth: &ClientAuth<'_>,
        form: &[(&str, &str)],
    ) -> Result<Vec<u8>, IdentityError> {
        tracing::debug!(%url, "POST to identity provider");
        let mut body = String::new();
        let mut push = |k: &str, v: &str| {
            if !body.is_empty() {
                body.push('&');
            }
            body.extend(url::form_urlencoded::byte_serialize(k.as_bytes()));
            body.push('=');
            body.extend(url::form_urlencoded::byte_serialize(v.as_bytes()));
        };
        for (k, v) in form {
            push(k, v);
        }
        let mut request = self
            .client
            .post(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            );
        match auth {
            ClientAuth::Public { client_id } => push("client_id", client_id),
            ClientAuth::Basic { client_id, secret } => {
                let enc = |s: &str| {
                    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>()
                };
                request = request.basic_auth(enc(client_id), Some(enc(secret.expose_secret())));
            }
        }
        let request = request.body(body);
        let (status, body) = self.send(url, request).await?;
        if status.is_success() {
            return Ok(body);
        }
        if status.is_client_error()
            && let Ok(err) = serde_json::from_slice::<OAuthErrorBody>(&body)
        {
            return Err(IdentityError::OAuth {
                url: url.to_owned(),
                error: sanitize(&err.error, 64),
                description: err.error_description.map(|d| sanitize(&d, MAX_DESCRIPTION)),
            });
        }
        Err(IdentityError::IdpHttpStatus {
            url: url.to_owned(),
            status: status.as_u16(),
        })
    }

    async fn send(
        &self,
        url: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<(reqwest::StatusCode, Vec<u8>), IdentityError> {
        let exchange = async {
            let mut response = request.send().await.map_err(|e| self.map_err(url, e))?;
            let status = response.status();
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(|e| self.map_err(url, e))? {
                if body.len() + chunk.len() > MAX_RESPONSE_BYTES {
                    return Err(IdentityError::IdpBadResponse {
                        url: url.to_owned(),
                        reason: format!("response larger than {MAX_RESPONSE_BYTES} bytes"),
                    });
                }
                body.extend_from_slice(&chunk);
            }
            Ok((status, body))
        };
        // reqwest's own timeout covers the same span; this one is tokio time, so the
        // deadline holds whatever the transport does and tests can reason about it.
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(IdentityError::IdpTimeout {
                    url: url.to_owned(),
                    timeout: self.timeout,
                })
            })
    }

    fn map_err(&self, url: &str, e: reqwest::Error) -> IdentityError {
        if e.is_timeout() {
            IdentityError::IdpTimeout {
                url: url.to_owned(),
                timeout: self.timeout,
            }
        } else {
            // The request body (where secrets live) is never part of reqwest's error.
            IdentityError::IdpUnreachable {
                url: url.to_owned(),
                source: e.without_url(),
            }
        }
    }
}

#[derive(serde::Deserialize)]
struct OAuthErrorBody {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

fn parse_json<T: DeserializeOwned>(url: &str, body: &[u8]) -> Result<T, IdentityError> {
    serde_json::from_slice(body).map_err(|e| IdentityError::IdpBadResponse {
        url: url.to_owned(),
        reason: format!("invalid JSON: {e}"),
    })
}

/// Text from the provider that we repeat: printable, bounded.
pub(crate) fn sanitize(text: &str, max: usize) -> String {
    let mut out: String = text.chars().filter(|c| !c.is_control()).take(max).collect();
    if text.chars().count() > max {
        out.push('…');
    }
    out
}
