//! `GET /metrics`: the daemon's counters in the Prometheus text format
//! (version 0.0.4). Read from what the daemon already keeps (the proxy's
//! registry and kernel counters, the audit log's stats, the broker) plus the
//! API's and webhooks' own counters, at scrape time: no work on the hot path
//! beyond the atomic increments.

use std::{
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use axum::{extract::State, http::header, response::IntoResponse, routing::get};

use super::ApiState;

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The API's own counters, and the webhooks'.
#[derive(Debug, Default)]
pub struct Metrics {
    pub api_connections: Counter,
    pub api_refused_limit: Counter,
    pub api_refused_governed: Counter,
    pub webhooks: Arc<crate::approval::webhook::WebhookStats>,
}

pub fn routes() -> axum::Router<Arc<ApiState>> {
    axum::Router::new().route("/metrics", get(metrics))
}

async fn metrics(State(state): State<Arc<ApiState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render(&state),
    )
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(&str, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, v) in samples {
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {v}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {v}");
        }
    }
}

#[allow(clippy::too_many_lines)] // one metric after another, in exposition order
pub fn render(state: &ApiState) -> String {
    let s = &state.shared;
    let mut out = String::with_capacity(4096);
    let open = s.registry.snapshot().len() as u64;
    let counters = s.redirector.lock().expect("redirector lock").counters();
    let at = |i: usize| counters.get(i).copied().unwrap_or(0);
    metric(
        &mut out,
        "agentgate_connections_open",
        "gauge",
        "Proxied connections open now.",
        &[("", open)],
    );
    metric(
        &mut out,
        "agentgate_connections_total",
        "counter",
        "Connections of tagged workloads the kernel redirected to the proxy, established and closed.",
        &[
            ("state=\"redirected\"", at(0)),
            ("state=\"established\"", at(2)),
            ("state=\"closed\"", at(3)),
            ("state=\"refused_not_ready\"", at(1)),
        ],
    );
    let audit = s.audit.stats();
    let st = &audit.statements;
    metric(
        &mut out,
        "agentgate_statements_total",
        "counter",
        "Statements recorded before they run, by the decision they run under (a held one: allow once approved, deny once rejected).",
        &[
            ("decision=\"allow\"", st.allow),
            ("decision=\"deny\"", st.deny),
            ("decision=\"require_approval\"", st.require_approval),
            ("decision=\"other\"", st.other),
        ],
    );
    metric(
        &mut out,
        "agentgate_approval_requests_total",
        "counter",
        "Commands held for approval (approval.requested records).",
        &[("", audit.approval_requests)],
    );
    metric(
        &mut out,
        "agentgate_approvals_pending",
        "gauge",
        "Approval requests waiting for a decision.",
        &[("", s.approvals.pending_count() as u64)],
    );
    metric(
        &mut out,
        "agentgate_approval_grants",
        "gauge",
        "Live approval grants.",
        &[("", s.approvals.grants().len() as u64)],
    );
    metric(
        &mut out,
        "agentgate_audit_appends_total",
        "counter",
        "Audit records appended.",
        &[("", audit.appends)],
    );
    metric(
        &mut out,
        "agentgate_audit_fsyncs_total",
        "counter",
        "fdatasync calls on the audit log.",
        &[("", audit.fsyncs)],
    );
    metric(
        &mut out,
        "agentgate_audit_fsync_seconds_total",
        "counter",
        "Time spent in fdatasync on the audit log (divide by agentgate_audit_fsyncs_total for the mean).",
        &[],
    );
    let _ = writeln!(
        out,
        "agentgate_audit_fsync_seconds_total {}",
        audit.fsync_micros_total as f64 / 1e6
    );
    metric(
        &mut out,
        "agentgate_audit_fsync_seconds_max",
        "gauge",
        "Longest fdatasync on the audit log since start.",
        &[],
    );
    let _ = writeln!(
        out,
        "agentgate_audit_fsync_seconds_max {}",
        audit.fsync_micros_max as f64 / 1e6
    );
    metric(
        &mut out,
        "agentgate_audit_failures_total",
        "counter",
        "Audit writes that failed (what they carried was refused).",
        &[("", audit.log_failures)],
    );
    metric(
        &mut out,
        "agentgate_audit_failing",
        "gauge",
        "1 while the audit log refuses appends.",
        &[("", u64::from(audit.failing))],
    );
    let w = &state.metrics.webhooks;
    metric(
        &mut out,
        "agentgate_webhook_deliveries_total",
        "counter",
        "Webhook events, by what became of them.",
        &[
            ("result=\"delivered\"", w.delivered.load(Ordering::Relaxed)),
            ("result=\"failed\"", w.failed.load(Ordering::Relaxed)),
            ("result=\"dropped\"", w.dropped.load(Ordering::Relaxed)),
        ],
    );
    metric(
        &mut out,
        "agentgate_webhook_attempts_failed_total",
        "counter",
        "Webhook delivery attempts that failed (retried or given up).",
        &[("", w.attempts_failed.load(Ordering::Relaxed))],
    );
    let m = &state.metrics;
    metric(
        &mut out,
        "agentgate_api_connections_total",
        "counter",
        "Connections accepted by the HTTP API.",
        &[("", m.api_connections.get())],
    );
    metric(
        &mut out,
        "agentgate_api_refused_total",
        "counter",
        "HTTP API connections or requests refused.",
        &[
            ("reason=\"connection_limit\"", m.api_refused_limit.get()),
            ("reason=\"governed_caller\"", m.api_refused_governed.get()),
        ],
    );
    out
}
