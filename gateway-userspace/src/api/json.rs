//! The JSON API. Every route takes `Authorization: Bearer <JWT>` (an OIDC ID
//! token or a service account's RFC 9068 access token), verified against the
//! provider's JWKS before anything else; the broker then decides whether that
//! identity may vote (separation of duties lives there, not here).

use std::sync::Arc;

use axum::{
    Json,
    extract::{Path, State},
    http::HeaderMap,
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{ApiError, ApiState};
use crate::approval::{Approver, Via, Vote};

/// Longest reason and ticket accepted (the broker checks the ticket's pattern).
pub const MAX_REASON: usize = 4096;
pub const MAX_TICKET: usize = 128;
/// Longest id in a path.
const MAX_ID: usize = 128;

pub fn routes() -> axum::Router<Arc<ApiState>> {
    axum::Router::new()
        .route("/api/approvals", get(list))
        .route("/api/approvals/{id}", get(show))
        .route("/api/approvals/{id}/approve", post(approve))
        .route("/api/approvals/{id}/reject", post(reject))
        .route("/api/grants", get(grants))
        .route("/api/grants/{id}/revoke", post(revoke))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VoteBody {
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub ticket: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeBody {
    #[serde(default)]
    pub reason: Option<String>,
}

/// The verified caller, from its bearer token.
pub async fn caller(state: &ApiState, headers: &HeaderMap) -> Result<Approver, ApiError> {
    let Some(ids) = &state.shared.identities else {
        return Err(ApiError::unauthorized(
            "this daemon has no [identity] provider: the HTTP API accepts no caller",
        ));
    };
    let raw = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::unauthorized("send Authorization: Bearer <JWT from the identity provider>")
        })?;
    let extra: Vec<String> = state
        .config
        .web
        .iter()
        .map(|w| w.client_id.clone())
        .collect();
    let verified = ids.client.verify_bearer(raw, &extra).await.map_err(|e| {
        tracing::info!(event = "api.unauthorized", error = %e, "bearer token refused");
        ApiError::unauthorized(format!("token refused: {e}"))
    })?;
    Ok(state.approver(&verified, Via::Api))
}

/// An optional JSON body: empty means every field's default.
fn parse_body<T: Default + serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("malformed JSON body: {e}")))
}

fn check_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty()
        || id.len() > MAX_ID
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(ApiError::not_found("no such id"));
    }
    Ok(())
}

/// The vote a body asks for, with its limits checked.
pub fn vote(approve: bool, body: VoteBody) -> Result<Vote, ApiError> {
    if body.reason.as_ref().is_some_and(|r| r.len() > MAX_REASON) {
        return Err(ApiError::invalid("reason is longer than 4096 bytes"));
    }
    if body.ticket.as_ref().is_some_and(|t| t.len() > MAX_TICKET) {
        return Err(ApiError::invalid("ticket is longer than 128 bytes"));
    }
    let reason = body.reason.filter(|r| !r.trim().is_empty());
    let ticket = body.ticket.filter(|t| !t.trim().is_empty());
    Ok(if approve {
        Vote::Approve { reason, ticket }
    } else {
        Vote::Reject {
            reason: reason.unwrap_or_default(),
            ticket,
        }
    })
}

async fn list(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    caller(&state, &headers).await?;
    Ok(Json(json!({ "approvals": state.shared.approvals.list() })))
}

async fn show(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    caller(&state, &headers).await?;
    check_id(&id)?;
    state
        .shared
        .approvals
        .get(&id)
        .map(|r| Json(json!(r)))
        .ok_or_else(|| ApiError::not_found(format!("no pending approval request {id}")))
}

async fn approve(
    state: State<Arc<ApiState>>,
    headers: HeaderMap,
    id: Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    decide(state, headers, id, true, body).await
}

async fn reject(
    state: State<Arc<ApiState>>,
    headers: HeaderMap,
    id: Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    decide(state, headers, id, false, body).await
}

async fn decide(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    approve: bool,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&state, &headers).await?;
    check_id(&id)?;
    let vote = vote(approve, parse_body(&body)?)?;
    let decided = state.shared.approvals.decide(&id, &who, vote).await?;
    tracing::info!(event = "api.vote", id, approver = %who.name, approve, "vote accepted");
    Ok(Json(json!({ "id": id, "result": decided })))
}

async fn grants(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    caller(&state, &headers).await?;
    Ok(Json(json!({ "grants": state.shared.approvals.grants() })))
}

async fn revoke(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    let who = caller(&state, &headers).await?;
    check_id(&id)?;
    let reason = parse_body::<RevokeBody>(&body)?
        .reason
        .filter(|r| !r.trim().is_empty());
    if reason.as_ref().is_some_and(|r| r.len() > MAX_REASON) {
        return Err(ApiError::invalid("reason is longer than 4096 bytes"));
    }
    let grant = state.shared.approvals.revoke(&id, &who, reason).await?;
    Ok(Json(json!({ "revoked": grant })))
}
