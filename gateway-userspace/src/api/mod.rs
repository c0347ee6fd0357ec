//! The daemon's HTTP server: the approvals JSON API (bearer JWT), the
//! approvals web page (OIDC login), and `/metrics` (Prometheus text).
//!
//! Trade-offs: it is a second way in to the approval workflow, so it is as
//! strict as the control socket: loopback by default and TLS-only anywhere
//! else; every vote comes from a verified identity (a JWT checked against the
//! provider's JWKS, or a page session made by an OIDC login), never from
//! typed names; callers inside a tagged cgroup are refused and recorded
//! ([`peer`]). Fails closed: an identity provider that is down means nobody
//! votes over HTTP (the CLI still works). Every input has a limit: request
//! body, time to send a request head, time to answer, open connections.

pub mod json;
pub mod metrics;
pub mod peer;
pub mod server;
pub mod web;

mod html;

use std::sync::Arc;

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::json;

use crate::{
    approval::{ApprovalError, Approver, ApproverKind, Via},
    audit::{Kind, NewRecord},
    config::ApiConfig,
    identity::{IdentityKind, VerifiedIdentity},
    proxy::Shared,
};

/// What the handlers share. One per daemon.
pub struct ApiState {
    pub shared: Arc<Shared>,
    pub config: ApiConfig,
    pub metrics: Arc<metrics::Metrics>,
    /// The daemon's own cgroup (a peer there is the proxy relaying).
    pub own_cgroup: Option<u64>,
    pub web: Option<web::Web>,
}

/// An error as the API answers it: `{"error": code, "message": text}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({ "error": self.code, "message": self.message })),
        )
            .into_response()
    }
}

/// The HTTP status for what the broker said.
impl From<ApprovalError> for ApiError {
    fn from(e: ApprovalError) -> Self {
        use ApprovalError as E;
        let (status, code) = match &e {
            E::NotFound { .. } | E::GrantNotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
            E::SelfApproval { .. } => (StatusCode::FORBIDDEN, "self_approval"),
            E::NotAnApprover { .. } => (StatusCode::FORBIDDEN, "not_an_approver"),
            E::LabelNotAllowed { .. } => (StatusCode::FORBIDDEN, "label_not_allowed"),
            E::AlreadyVoted { .. } => (StatusCode::CONFLICT, "already_voted"),
            E::ReasonRequired => (StatusCode::UNPROCESSABLE_ENTITY, "reason_required"),
            E::BadTicket { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "bad_ticket"),
            E::BadInput { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
            E::NotRecorded { .. } => (StatusCode::SERVICE_UNAVAILABLE, "not_recorded"),
            #[allow(unreachable_patterns)]
            _ => (StatusCode::CONFLICT, "conflict"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl ApiState {
    /// The approver a verified token (or page login) stands for, with the
    /// cgroups the daemon has bound to that identity (the broker refuses an
    /// approver bound to the requesting workload).
    pub fn approver(&self, v: &VerifiedIdentity, via: Via) -> Approver {
        let (bound_cgroups, bound_cgroup_paths) = self.shared.bound_cgroups(&v.name);
        Approver {
            name: v.name.clone(),
            subject: v.subject.clone(),
            issuer: Some(v.issuer.clone()),
            kind: match v.kind {
                IdentityKind::Human => ApproverKind::Human,
                IdentityKind::Service => ApproverKind::Service,
            },
            groups: v.groups.clone(),
            via,
            bound_cgroups,
            bound_cgroup_paths,
        }
    }

    /// Records a refused caller as `control.refused` (as the control socket
    /// does, and within the same limit per caller cgroup:
    /// [`crate::containment::refusals`]), naming the route, never its arguments.
    pub async fn record_refusal(&self, p: &peer::Peer, refusal: &peer::Refusal, route: &str) {
        use crate::containment::refusals::Verdict;
        let message = refusal.message();
        let cgroup = match refusal {
            peer::Refusal::Governed { cgroup, .. } => Some(cgroup.as_str()),
            peer::Refusal::Relayed | peer::Refusal::Unresolved(_) => None,
        };
        let Verdict::Record(suppressed) = self.shared.refusal_limit.admit(cgroup) else {
            tracing::debug!(event = "control.refused", via = "api", peer = %p.addr, route, recorded = false, "{message}");
            return;
        };
        let mut action = json!({
            "op": route,
            "via": "api",
            "peer": p.addr.to_string(),
            "peer_cgroup_id": p.cgroup_id,
        });
        suppressed.annotate(&mut action);
        let mut rec = NewRecord::new(Kind::ControlRefused)
            .workload(crate::audit::Workload {
                pid: 0,
                exe: None,
                cmdline: None,
                uid: u32::MAX,
                cgroup: match refusal {
                    peer::Refusal::Governed { cgroup, .. } => Some(cgroup.clone()),
                    _ => None,
                },
            })
            .action(action)
            .decision(json!({ "verdict": "deny", "reason": message }));
        if let peer::Refusal::Governed { identity, .. } = refusal {
            rec = rec.identity(self.shared.identity_ref(identity).await);
        }
        tracing::warn!(event = "control.refused", via = "api", peer = %p.addr, route, "{message}");
        if let Err(e) = self.shared.audit.append(rec).await {
            tracing::error!(event = "log.failure", error = %e, "cannot record a refused API request");
        }
    }
}

/// The whole router: JSON API, page, metrics.
pub fn router(state: Arc<ApiState>) -> axum::Router {
    let max_body = state.config.max_body_bytes;
    json::routes()
        .merge(web::routes())
        .merge(metrics::routes())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            server::refuse_governed,
        ))
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .with_state(state)
}
