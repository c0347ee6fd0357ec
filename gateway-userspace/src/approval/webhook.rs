//! Webhooks: each approval event (a new request, a decision) is `POST`ed to the
//! configured URLs, as the event's JSON or as a Slack message, signed with
//! HMAC-SHA256 of the body (`X-Agentgate-Signature: sha256=<hex>`).
//!
//! Trade-off: notification is best effort and never holds up the proxy. The
//! broker publishes on a broadcast channel and moves on; each hook has its own
//! bounded queue and one delivery task that retries with exponential backoff
//! up to `max_attempts`. An event that does not fit the queue, or that fails
//! every attempt, is dropped and counted (`agentgate status`, `/metrics`):
//! the audit log, not the webhook, is the record of what happened.
//! Nothing secret is logged: the key is read once at start and only its MAC
//! leaves the process; URLs are logged without their query string.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use hmac::{Hmac, Mac as _};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::sync::{broadcast, mpsc, watch};

use crate::config::{WebhookConfig, WebhookFormat};

/// Longest secret accepted from `secret_file`.
const MAX_SECRET_LEN: usize = 4096;
/// Longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_mins(1);
/// Most of a receiver's answer read (and then ignored).
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Counters over all hooks since the daemon started.
#[derive(Debug, Default, serde::Serialize)]
pub struct WebhookStats {
    /// Events a receiver accepted (2xx).
    pub delivered: AtomicU64,
    /// Attempts that failed (an error or a non-2xx answer), retried or not.
    pub attempts_failed: AtomicU64,
    /// Events given up after `max_attempts`.
    pub failed: AtomicU64,
    /// Events dropped because a hook's queue was full or fell behind.
    pub dropped: AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("[[approvals.webhook]] {0}")]
    Config(String),
    #[error("[[approvals.webhook]] secret_file {path}: {reason}")]
    Secret { path: String, reason: String },
}

/// One configured hook, ready to deliver.
struct Hook {
    url: reqwest::Url,
    /// For logs: scheme, host, port and path only.
    shown: String,
    format: WebhookFormat,
    key: Option<Vec<u8>>,
    max_attempts: u32,
    backoff: Duration,
    client: reqwest::Client,
}

/// Starts one delivery task per hook, fed from `events`. The secrets are read
/// now: a hook whose secret cannot be read refuses the daemon's start.
pub fn spawn(
    hooks: &[WebhookConfig],
    events: &broadcast::Sender<Value>,
    stats: &Arc<WebhookStats>,
    tasks: &mut tokio::task::JoinSet<()>,
    shutdown: &watch::Receiver<bool>,
) -> Result<(), WebhookError> {
    for cfg in hooks {
        let hook = Arc::new(Hook::new(cfg)?);
        let (tx, rx) = mpsc::channel::<Vec<u8>>(cfg.queue);
        tasks.spawn(feed(
            events.subscribe(),
            hook.clone(),
            tx,
            stats.clone(),
            shutdown.clone(),
        ));
        tasks.spawn(deliver(hook, rx, stats.clone(), shutdown.clone()));
    }
    Ok(())
}

impl Hook {
    fn new(cfg: &WebhookConfig) -> Result<Self, WebhookError> {
        cfg.validate().map_err(WebhookError::Config)?;
        let url = reqwest::Url::parse(&cfg.url).map_err(|e| WebhookError::Config(e.to_string()))?;
        let shown = format!(
            "{}://{}{}",
            url.scheme(),
            url.host_str().unwrap_or(""),
            url.port().map(|p| format!(":{p}")).unwrap_or_default()
        ) + url.path();
        let key = cfg.secret_file.as_deref().map(read_secret).transpose()?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(cfg.timeout_ms))
            .connect_timeout(Duration::from_millis(cfg.timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("agentgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| WebhookError::Config(e.to_string()))?;
        Ok(Hook {
            url,
            shown,
            format: cfg.format,
            key,
            max_attempts: cfg.max_attempts,
            backoff: Duration::from_millis(cfg.backoff_ms),
            client,
        })
    }
}

/// The key in `path`: a regular file neither group nor others can read,
/// at most 4 KiB, trailing newline ignored.
fn read_secret(path: &Path) -> Result<Vec<u8>, WebhookError> {
    use std::os::unix::fs::MetadataExt as _;
    let err = |reason: String| WebhookError::Secret {
        path: path.display().to_string(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    if meta.mode() & 0o077 != 0 {
        return Err(err(format!(
            "mode {:o} lets group or others read it; chmod 600",
            meta.mode() & 0o777
        )));
    }
    if meta.len() > MAX_SECRET_LEN as u64 {
        return Err(err("longer than 4 KiB".into()));
    }
    let mut bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    if bytes.is_empty() {
        return Err(err("empty".into()));
    }
    Ok(bytes)
}

/// `sha256=<hex>` of HMAC-SHA256(key, body): the `X-Agentgate-Signature` value.
pub fn signature(key: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The body a hook sends for an event.
pub fn body(format: WebhookFormat, event: &Value) -> Vec<u8> {
    let value = match format {
        WebhookFormat::Json => event.clone(),
        WebhookFormat::Slack => slack(event),
    };
    serde_json::to_vec(&value).unwrap_or_default()
}

/// A Slack-compatible message (`text` for notifications, `blocks` for the
/// channel). Slack's mrkdwn has no escaping for `*_~`; `<>&` are escaped as
/// its docs require, so a summary cannot inject links or mentions.
fn slack(event: &Value) -> Value {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let req = &event["request"];
    let text_of = |v: &Value| v.as_str().map(esc).unwrap_or_default();
    if event["event"] == "masking.probe_budget_exceeded" {
        let text = format!(
            "Masking alert: {} passed the equality probe budget on {} ({}, {} values per {} s); its statements comparing new values are refused",
            text_of(&event["identity"]),
            text_of(&event["resource"]),
            text_of(&event["column"]),
            event["budget"],
            event["window_seconds"],
        );
        return json!({"text": text});
    }
    let id = text_of(&req["id"]);
    let who = text_of(&req["requester"]["identity"]);
    let resource = text_of(&req["resource"]);
    let summary = text_of(&req["summary"]);
    let requested = matches!(event["event"].as_str(), Some("requested" | "Requested"));
    let headline = if requested {
        format!("Approval requested: {id} by {who} on {resource}")
    } else {
        let outcome = text_of(&event["outcome"]);
        let by: Vec<String> = event["by"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).map(esc).collect())
            .unwrap_or_default();
        if by.is_empty() {
            format!("Approval {id} {outcome} ({who} on {resource})")
        } else {
            format!(
                "Approval {id} {outcome} by {} ({who} on {resource})",
                by.join(", ")
            )
        }
    };
    json!({
        "text": headline,
        "blocks": [
            { "type": "section", "text": { "type": "mrkdwn", "text": format!("*{headline}*") } },
            { "type": "section", "text": { "type": "mrkdwn", "text": format!("```{summary}```") } },
        ],
    })
}

/// Moves events from the broadcast into the hook's queue, never waiting.
async fn feed(
    mut events: broadcast::Receiver<Value>,
    hook: Arc<Hook>,
    queue: mpsc::Sender<Vec<u8>>,
    stats: Arc<WebhookStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let event = tokio::select! {
            e = events.recv() => e,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        match event {
            Ok(event) => {
                if queue.try_send(body(hook.format, &event)).is_err() {
                    stats.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(event = "webhook.dropped", url = %hook.shown, "webhook queue full; event dropped");
                }
            }
            Err(broadcast::error::RecvError::Lagged(n)) => {
                stats.dropped.fetch_add(n, Ordering::Relaxed);
                tracing::warn!(event = "webhook.dropped", url = %hook.shown, events = n, "webhook fell behind; events dropped");
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

async fn deliver(
    hook: Arc<Hook>,
    mut queue: mpsc::Receiver<Vec<u8>>,
    stats: Arc<WebhookStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let body = tokio::select! {
            b = queue.recv() => match b { Some(b) => b, None => return },
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let mut wait = hook.backoff;
        for attempt in 1..=hook.max_attempts {
            match hook.post(&body).await {
                Ok(()) => {
                    stats.delivered.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(event = "webhook.delivered", url = %hook.shown, attempt);
                    break;
                }
                Err(reason) => {
                    stats.attempts_failed.fetch_add(1, Ordering::Relaxed);
                    if attempt == hook.max_attempts {
                        stats.failed.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(event = "webhook.failed", url = %hook.shown, attempt, %reason, "giving up on this event");
                        break;
                    }
                    tracing::warn!(event = "webhook.retry", url = %hook.shown, attempt, %reason, retry_in_ms = wait.as_millis() as u64);
                    tokio::select! {
                        () = tokio::time::sleep(wait) => {}
                        _ = shutdown.wait_for(|s| *s) => return,
                    }
                    wait = (wait * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

impl Hook {
    async fn post(&self, body: &[u8]) -> Result<(), String> {
        let mut req = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_vec());
        if let Some(key) = &self.key {
            req = req.header("X-Agentgate-Signature", signature(key, body));
        }
        let mut resp = req.send().await.map_err(|e| e.without_url().to_string())?;
        let status = resp.status();
        // Read (a bounded part of) the answer so the connection can be reused.
        let mut read = 0;
        while let Ok(Some(chunk)) = resp.chunk().await {
            read += chunk.len();
            if read > MAX_ANSWER_BYTES {
                break;
            }
        }
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("HTTP {}", status.as_u16()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        let mac = signature(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            mac,
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn slack_format_escapes_and_names_the_request() {
        let ev = json!({"event": "requested", "request": {"id": "apr-1",
            "requester": {"identity": "svc<x>"}, "resource": "db", "summary": "DROP TABLE t"}});
        let v: Value = serde_json::from_slice(&body(WebhookFormat::Slack, &ev)).unwrap();
        assert_eq!(v["text"], "Approval requested: apr-1 by svc&lt;x&gt; on db");
        assert_eq!(v["blocks"][1]["text"]["text"], "```DROP TABLE t```");
        let ev = json!({"event": "decided", "outcome": "approved", "by": ["bob"],
            "request": {"id": "apr-1", "requester": {"identity": "svc"}, "resource": "db"}});
        let v: Value = serde_json::from_slice(&body(WebhookFormat::Slack, &ev)).unwrap();
        assert_eq!(v["text"], "Approval apr-1 approved by bob (svc on db)");
    }

    #[test]
    fn secret_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, "k3y\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(read_secret(&p).is_err());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret(&p).unwrap(), b"k3y");
    }

    /// A real HTTP receiver on loopback that fails twice, then accepts:
    /// the third attempt delivers, and each attempt carries the signature.
    #[tokio::test]
    async fn retries_with_backoff_until_the_receiver_accepts() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for i in 0..3 {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 8192];
                let mut n = 0;
                loop {
                    n += s.read(&mut buf[n..]).await.unwrap();
                    let text = String::from_utf8_lossy(&buf[..n]);
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len: usize = text
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap();
                        if n >= end + 4 + len {
                            break;
                        }
                    }
                }
                seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                let status = if i < 2 {
                    "500 Internal Server Error"
                } else {
                    "204 No Content"
                };
                s.write_all(
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await
                .unwrap();
            }
            seen
        });
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("s");
        std::fs::write(&secret, "hook-secret").unwrap();
        std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let cfg = WebhookConfig {
            url: format!("http://127.0.0.1:{port}/hook"),
            format: WebhookFormat::Json,
            secret_file: Some(secret),
            max_attempts: 5,
            backoff_ms: 20,
            timeout_ms: 2000,
            queue: 4,
        };
        let (tx, _) = broadcast::channel(16);
        let stats = Arc::new(WebhookStats::default());
        let (_stop_tx, stop) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        spawn(&[cfg], &tx, &stats, &mut tasks, &stop).unwrap();
        let event = json!({"event": "requested", "request": {"id": "apr-9"}});
        tx.send(event.clone()).unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .unwrap()
            .unwrap();
        let want_body = String::from_utf8(body(WebhookFormat::Json, &event)).unwrap();
        let want_sig = signature(b"hook-secret", want_body.as_bytes());
        for req in &seen {
            assert!(req.starts_with("POST /hook HTTP/1.1"), "{req}");
            assert!(
                req.to_ascii_lowercase()
                    .contains(&format!("x-agentgate-signature: {want_sig}")),
                "{req}"
            );
            assert!(req.ends_with(&want_body), "{req}");
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while stats.delivered.load(Ordering::Relaxed) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "never counted as delivered"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(stats.attempts_failed.load(Ordering::Relaxed), 2);
        assert_eq!(stats.failed.load(Ordering::Relaxed), 0);
    }
}
