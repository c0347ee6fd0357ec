//! The approvals web page and its sign-in: OIDC authorization code with PKCE,
//! `state` and `nonce` (the `openidconnect` crate builds the request and
//! exchanges the code; the ID token is then verified by the identity module
//! against the same JWKS cache as every other token, with the nonce
//! required and this page's client as the audience).
//!
//! Sessions live in memory only (a daemon restart signs everyone out): a
//! random id in a `Secure; HttpOnly; SameSite=Strict` cookie, an expiry, and
//! a CSRF token every form carries and every POST must echo. Trade-off:
//! bounded tables (logins in flight, sessions) refuse new sign-ins when full
//! rather than evicting live sessions.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Form,
    extract::{Path, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{Html, IntoResponse, Redirect, Response},
    routing::{get, post},
};
use openidconnect::{
    AuthorizationCode, ClientId, CsrfToken, IssuerUrl, Nonce, PkceCodeChallenge, PkceCodeVerifier,
    RedirectUrl, Scope, TokenResponse as _,
    core::{CoreAuthenticationFlow, CoreClient, CoreProviderMetadata},
};
use serde::Deserialize;
use tokio::time::Instant;

use super::{ApiState, html, json::VoteBody};
use crate::{
    approval::Via,
    config::{ApiConfig, WebConfig},
    identity::VerifiedIdentity,
};

const SESSION_COOKIE: &str = "agentgate_session";
const LOGIN_COOKIE: &str = "agentgate_login";
/// Sign-ins in flight at once, and how long one may take.
const MAX_LOGINS: usize = 256;
const LOGIN_TTL: Duration = Duration::from_mins(10);
/// Signed-in sessions at once.
const MAX_SESSIONS: usize = 1024;
/// Longest `code` and `state` accepted on the callback.
const MAX_CALLBACK_PARAM: usize = 2048;

struct PendingLogin {
    verifier: PkceCodeVerifier,
    nonce: Nonce,
    /// The random value in this browser's login cookie.
    browser: String,
    started: Instant,
}

struct WebSession {
    identity: VerifiedIdentity,
    csrf: String,
    expires: Instant,
    /// The outcome of the last form, shown once by the page it redirects to.
    flash: Option<(String, bool)>,
}

/// The page's state: its OIDC client settings, logins in flight, sessions.
pub struct Web {
    client_id: String,
    redirect_url: RedirectUrl,
    session_ttl: Duration,
    http: reqwest::Client,
    metadata: tokio::sync::OnceCell<CoreProviderMetadata>,
    logins: Mutex<HashMap<String, PendingLogin>>,
    sessions: Mutex<HashMap<String, WebSession>>,
}

impl Web {
    pub fn new(api: &ApiConfig, web: &WebConfig, http_timeout: Duration) -> Result<Self, String> {
        let redirect = api.redirect_url().ok_or("no [api.web]")?;
        let redirect_url = RedirectUrl::new(redirect.clone())
            .map_err(|e| format!("[api.web] redirect_url {redirect:?}: {e}"))?;
        let http = reqwest::Client::builder()
            .timeout(http_timeout)
            .connect_timeout(http_timeout)
            // OAuth 2.0 Security BCP: never follow redirects on back-channel calls.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("agentgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            client_id: web.client_id.clone(),
            redirect_url,
            session_ttl: Duration::from_secs(web.session_secs),
            http,
            metadata: tokio::sync::OnceCell::new(),
            logins: Mutex::default(),
            sessions: Mutex::default(),
        })
    }

    async fn metadata(&self, issuer: &str) -> Result<&CoreProviderMetadata, String> {
        self.metadata
            .get_or_try_init(|| async {
                let issuer = IssuerUrl::new(issuer.to_owned()).map_err(|e| e.to_string())?;
                CoreProviderMetadata::discover_async(issuer, &self.http)
                    .await
                    .map_err(|e| format!("discovery failed: {e}"))
            })
            .await
    }

    fn session(&self, headers: &HeaderMap) -> Option<(String, VerifiedIdentity, String)> {
        let id = cookie(headers, SESSION_COOKIE)?;
        let mut sessions = self.sessions.lock().expect("sessions lock");
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        let s = sessions.get(&id)?;
        Some((id, s.identity.clone(), s.csrf.clone()))
    }

    /// Keeps a form's outcome for the page the browser is sent to next
    /// (post/redirect/get: reloading that page does not vote again).
    fn after_form(&self, sid: &str, message: String, error: bool) -> Response {
        if let Some(s) = self.sessions.lock().expect("sessions lock").get_mut(sid) {
            s.flash = Some((message, error));
        }
        Redirect::to("/").into_response()
    }

    fn take_flash(&self, sid: &str) -> Option<(String, bool)> {
        self.sessions
            .lock()
            .expect("sessions lock")
            .get_mut(sid)
            .and_then(|s| s.flash.take())
    }
}

pub fn routes() -> axum::Router<Arc<ApiState>> {
    axum::Router::new()
        .route("/", get(index))
        .route("/login", get(login))
        .route("/callback", get(callback))
        .route("/logout", post(logout))
        .route("/approvals/{id}/approve", post(approve))
        .route("/approvals/{id}/reject", post(reject))
        .route("/grants/{id}/revoke", post(revoke))
}

/// A random URL-safe token (256 bits).
fn random_token() -> String {
    use base64::Engine as _;
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b).expect("the OS random source");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
        .filter(|v| !v.is_empty() && v.len() <= 128)
}

fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// An HTML answer with the page's security headers.
fn html_response(status: StatusCode, body: String) -> Response {
    let mut r = (status, Html(body)).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    r
}

fn not_configured() -> Response {
    html_response(
        StatusCode::NOT_FOUND,
        html::page(
            "agentgate",
            "<p>The approvals page is not configured ([api.web]).</p>",
        ),
    )
}

async fn index(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    let Some(web) = state.web.as_ref() else {
        return not_configured();
    };
    match web.session(&headers) {
        Some((sid, who, csrf)) => {
            let flash = web.take_flash(&sid);
            let flash = flash.as_ref().map(|(m, e)| (m.as_str(), *e));
            render(&state, &who, &csrf, flash, StatusCode::OK)
        }
        None => html_response(StatusCode::OK, html::sign_in_page(None)),
    }
}

fn render(
    state: &ApiState,
    who: &VerifiedIdentity,
    csrf: &str,
    flash: Option<(&str, bool)>,
    status: StatusCode,
) -> Response {
    let requests: Vec<serde_json::Value> = state
        .shared
        .approvals
        .list()
        .iter()
        .filter_map(|r| serde_json::to_value(r).ok())
        .collect();
    let grants: Vec<serde_json::Value> = state
        .shared
        .approvals
        .grants()
        .iter()
        .filter_map(|g| serde_json::to_value(g).ok())
        .collect();
    html_response(
        status,
        html::approvals_page(&who.name, &who.groups, csrf, &requests, &grants, flash),
    )
}

fn login_error(message: &str) -> Response {
    html_response(
        StatusCode::BAD_REQUEST,
        html::sign_in_page(Some((message, true))),
    )
}

async fn login(State(state): State<Arc<ApiState>>) -> Response {
    let Some(web) = state.web.as_ref() else {
        return not_configured();
    };
    let Some(ids) = &state.shared.identities else {
        return login_error("no identity provider is configured");
    };
    let metadata = match web.metadata(&ids.client.config().issuer).await {
        Ok(m) => m.clone(),
        Err(e) => {
            tracing::warn!(event = "web.login", error = %e, "identity provider unavailable");
            return login_error("the identity provider cannot be reached; try again later");
        }
    };
    let client =
        CoreClient::from_provider_metadata(metadata, ClientId::new(web.client_id.clone()), None)
            .set_redirect_uri(web.redirect_url.clone());
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let (url, state_token, nonce) = client
        .authorize_url(
            CoreAuthenticationFlow::AuthorizationCode,
            CsrfToken::new_random,
            Nonce::new_random,
        )
        .add_scope(Scope::new("profile".into()))
        .add_scope(Scope::new("email".into()))
        .add_scope(Scope::new("groups".into()))
        .set_pkce_challenge(challenge)
        .url();
    let browser = random_token();
    {
        let mut logins = web.logins.lock().expect("logins lock");
        let now = Instant::now();
        logins.retain(|_, l| now.duration_since(l.started) < LOGIN_TTL);
        if logins.len() >= MAX_LOGINS {
            return login_error("too many sign-ins in progress; try again in a few minutes");
        }
        logins.insert(
            state_token.secret().clone(),
            PendingLogin {
                verifier,
                nonce,
                browser: browser.clone(),
                started: now,
            },
        );
    }
    let mut r = Redirect::to(url.as_str()).into_response();
    // Lax, not Strict: the provider's redirect back is a cross-site navigation.
    let c = format!(
        "{LOGIN_COOKIE}={browser}; Path=/callback; Max-Age={}; Secure; HttpOnly; SameSite=Lax",
        LOGIN_TTL.as_secs()
    );
    if let Ok(v) = HeaderValue::from_str(&c) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
    r
}

#[derive(Deserialize)]
struct CallbackParams {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
}

async fn callback(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Query(p): Query<CallbackParams>,
) -> Response {
    let Some(web) = state.web.as_ref() else {
        return not_configured();
    };
    let Some(ids) = &state.shared.identities else {
        return login_error("no identity provider is configured");
    };
    if let Some(e) = p.error {
        let e: String = e.chars().filter(char::is_ascii_graphic).take(64).collect();
        return login_error(&format!("the identity provider refused the sign-in ({e})"));
    }
    let (Some(code), Some(st)) = (p.code, p.state) else {
        return login_error("the sign-in answer lacks code or state");
    };
    if code.len() > MAX_CALLBACK_PARAM || st.len() > MAX_CALLBACK_PARAM {
        return login_error("the sign-in answer is too long");
    }
    let pending = web.logins.lock().expect("logins lock").remove(&st);
    let Some(pending) = pending.filter(|l| l.started.elapsed() < LOGIN_TTL) else {
        return login_error("unknown or expired sign-in (state does not match); sign in again");
    };
    let browser_ok =
        cookie(&headers, LOGIN_COOKIE).is_some_and(|c| constant_time_eq(&c, &pending.browser));
    if !browser_ok {
        return login_error("this sign-in was started in another browser; sign in again");
    }
    let verified = match exchange(web, &ids.client, pending, code).await {
        Ok(v) => v,
        Err(message) => return login_error(&message),
    };
    let sid = random_token();
    {
        let mut sessions = web.sessions.lock().expect("sessions lock");
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        if sessions.len() >= MAX_SESSIONS {
            return login_error("too many sessions; try again later");
        }
        sessions.insert(
            sid.clone(),
            WebSession {
                identity: verified.clone(),
                csrf: random_token(),
                expires: now + web.session_ttl,
                flash: None,
            },
        );
    }
    tracing::info!(event = "web.login", identity = %verified.name, "approver signed in to the approvals page");
    // A page that moves on by itself rather than a redirect: a SameSite=Strict
    // cookie set during a cross-site navigation is not sent on its redirects.
    let body = html::page(
        "agentgate: signed in",
        &format!(
            "<p>Signed in as {}. <a id=\"continue\" href=\"/\">Continue</a></p>",
            html::esc(&verified.name)
        ),
    );
    let mut r = html_response(StatusCode::OK, body);
    let h = r.headers_mut();
    h.insert(header::REFRESH, HeaderValue::from_static("0; url=/"));
    let c = format!(
        "{SESSION_COOKIE}={sid}; Path=/; Max-Age={}; Secure; HttpOnly; SameSite=Strict",
        web.session_ttl.as_secs()
    );
    if let Ok(v) = HeaderValue::from_str(&c) {
        h.append(header::SET_COOKIE, v);
    }
    h.append(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "agentgate_login=; Path=/callback; Max-Age=0; Secure; HttpOnly; SameSite=Lax",
        ),
    );
    r
}

/// Exchanges the code (with the PKCE verifier) and verifies the ID token
/// (the login's nonce, this page's client as audience). `Err`: what the
/// person signing in is told.
async fn exchange(
    web: &Web,
    oidc: &crate::identity::OidcClient,
    pending: PendingLogin,
    code: String,
) -> Result<VerifiedIdentity, String> {
    let metadata = web.metadata.get().cloned().ok_or("sign in again")?;
    let client =
        CoreClient::from_provider_metadata(metadata, ClientId::new(web.client_id.clone()), None)
            .set_redirect_uri(web.redirect_url.clone());
    let request = client
        .exchange_code(AuthorizationCode::new(code))
        .map_err(|e| format!("the provider has no token endpoint: {e}"))?;
    let tokens = request
        .set_pkce_verifier(pending.verifier)
        .request_async(&web.http)
        .await
        .map_err(|e| {
            tracing::warn!(event = "web.login", error = %e, "code exchange failed");
            "the identity provider did not accept the sign-in code".to_owned()
        })?;
    let raw = tokens
        .id_token()
        .ok_or("the identity provider sent no ID token")?
        .to_string();
    oidc.verify_login_id_token(&raw, pending.nonce.secret(), &web.client_id)
        .await
        .map_err(|e| {
            tracing::warn!(event = "web.login", error = %e, "ID token refused");
            format!("the ID token was refused: {e}")
        })
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: String,
}

#[derive(Deserialize)]
struct VoteForm {
    csrf: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    ticket: Option<String>,
}

/// The session a POST acts for, if its CSRF token matches.
fn authorized(
    web: &Web,
    headers: &HeaderMap,
    csrf: &str,
) -> Result<(String, VerifiedIdentity, String), Box<Response>> {
    let Some((sid, who, token)) = web.session(headers) else {
        return Err(Box::new(html_response(
            StatusCode::UNAUTHORIZED,
            html::sign_in_page(Some(("Your session has ended; sign in again.", true))),
        )));
    };
    if !constant_time_eq(&token, csrf) {
        tracing::warn!(event = "web.csrf", identity = %who.name, "form without the session's CSRF token refused");
        return Err(Box::new(html_response(
            StatusCode::FORBIDDEN,
            html::page(
                "agentgate",
                &html::notice(
                    "The form is stale or forged (CSRF token mismatch). Reload the page.",
                    true,
                ),
            ),
        )));
    }
    Ok((sid, who, token))
}

async fn logout(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Form(f): Form<CsrfForm>,
) -> Response {
    let Some(web) = state.web.as_ref() else {
        return not_configured();
    };
    let (sid, _, _) = match authorized(web, &headers, &f.csrf) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    web.sessions.lock().expect("sessions lock").remove(&sid);
    let mut r = Redirect::to("/").into_response();
    r.headers_mut().append(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "agentgate_session=; Path=/; Max-Age=0; Secure; HttpOnly; SameSite=Strict",
        ),
    );
    r
}

async fn approve(
    state: State<Arc<ApiState>>,
    headers: HeaderMap,
    id: Path<String>,
    f: Form<VoteForm>,
) -> Response {
    vote(state, headers, id, true, f).await
}

async fn reject(
    state: State<Arc<ApiState>>,
    headers: HeaderMap,
    id: Path<String>,
    f: Form<VoteForm>,
) -> Response {
    vote(state, headers, id, false, f).await
}

async fn vote(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    approve: bool,
    Form(f): Form<VoteForm>,
) -> Response {
    let Some(web) = state.web.as_ref() else {
        return not_configured();
    };
    let (sid, who, _) = match authorized(web, &headers, &f.csrf) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let result = match super::json::vote(
        approve,
        VoteBody {
            reason: f.reason,
            ticket: f.ticket,
        },
    ) {
        Ok(v) => state
            .shared
            .approvals
            .decide(&id, &state.approver(&who, Via::Web), v)
            .await
            .map_err(super::ApiError::from),
        Err(e) => Err(e),
    };
    match result {
        Ok(d) => {
            let verb = if approve { "Approved" } else { "Rejected" };
            let d = serde_json::to_value(&d).unwrap_or_default();
            let msg = format!(
                "{verb} {id}: {}",
                d.get("result")
                    .and_then(|v| v.as_str())
                    .unwrap_or("recorded")
            );
            web.after_form(&sid, msg, false)
        }
        Err(e) => web.after_form(&sid, format!("Not recorded: {}", e.message), true),
    }
}

async fn revoke(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(f): Form<VoteForm>,
) -> Response {
    let Some(web) = state.web.as_ref() else {
        return not_configured();
    };
    let (sid, who, _) = match authorized(web, &headers, &f.csrf) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let reason = f
        .reason
        .filter(|r| !r.trim().is_empty() && r.len() <= super::json::MAX_REASON);
    match state
        .shared
        .approvals
        .revoke(&id, &state.approver(&who, Via::Web), reason)
        .await
    {
        Ok(_) => web.after_form(&sid, format!("Revoked {id}"), false),
        Err(e) => {
            let e = super::ApiError::from(e);
            web.after_form(&sid, format!("Not revoked: {}", e.message), true)
        }
    }
}
