//! The HTTP handler's I/O: hyper toward the agent (HTTP/1.1, and HTTP/2 by
//! ALPN or prior knowledge), hyper's pooled client toward the upstream, the
//! gate between them.
//!
//! Lifecycle of one request, in order: the head is checked (`request`) and
//! decided by policy (method, host, path); a denial is answered before the
//! body is read (so `Expect: 100-continue` gets its 403, not a 100); the body
//! is read up to the inspection limit (the `openai` profile reads the call
//! and runs prompt DLP); the gate records and, for anything but a read, waits
//! until the record is durable (or holds for approval: the client waits);
//! then the request goes upstream and the response comes back streamed, or
//! inspected and masked when the resource's masking or profile asks.
//!
//! Fails closed: a request the handler cannot read, decide or record is
//! refused with a problem body (RFC 9457; a gRPC status for gRPC); a body
//! over the inspection limit, or a response that cannot be inspected while
//! masking applies, is refused unless `[proxy.http] uninspectable = "pass"`
//! (recorded either way). A WebSocket upgrade is decided as method
//! `WEBSOCKET` (a rule allowing `GET` does not open one) and `CONNECT` as
//! itself; allowed, they are relayed uninspected by [`super::tunnel`] (refused
//! where masking applies, unless `uninspectable = "pass"`). Rules testing
//! JSON body fields make the handler read the body before deciding. The trade-off: request bodies are buffered up to the limit
//! (their hash is in the write-ahead record), so a request body never streams.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::{Body, Frame, Incoming};
use hyper_util::{
    client::legacy::{
        Client,
        connect::{Connected, Connection},
    },
    rt::{TokioExecutor, TokioIo, TokioTimer},
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};
use tokio_rustls::rustls;

use super::{
    body::{self, Coding, Kind, Masked, SseMasker},
    config::{HttpConfig, Uninspectable},
    openai, request, tunnel,
};
use crate::{
    approval::Broker,
    audit::Kind as RecordKind,
    connection::LiveConnection,
    gate::{self, Command, DenialKind, Gate, ResultRecord},
    mask::MaskPolicy,
    policy::{
        Action, Decision, HttpProfile, PolicySet, PolicyStore, PromptDlp, Protocol, Resource,
        Subject, TlsMode, Verdict,
    },
    tls::LocalCa,
};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type HttpBody = BoxBody<Bytes, BoxError>;

/// Everything [`serve`] needs about one attributed connection.
pub struct HttpContext {
    pub conn: Arc<LiveConnection>,
    pub subject: Subject,
    pub resource: Resource,
    pub policy: Arc<PolicyStore>,
    pub approvals: Broker,
    pub audit: Arc<dyn gate::AuditSink>,
    pub correlation_key: [u8; 32],
    pub ca: Arc<LocalCa>,
    pub settings: HttpConfig,
    pub connect_timeout: Duration,
}

/// Errors that end a connection.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("TLS with the agent: {0}")]
    AgentTls(String),
    #[error("upstream TLS settings: {0}")]
    UpstreamTls(String),
    #[error("HTTP: {0}")]
    Serve(String),
}

impl HttpContext {
    fn gate(&self) -> Gate<'_> {
        Gate::new(
            &*self.conn,
            &self.subject,
            &self.resource,
            &*self.audit,
            &self.approvals,
        )
    }
}

/// Serves one agent connection until it closes.
pub async fn serve(client: TcpStream, ctx: HttpContext) -> Result<(), HttpError> {
    let _ = client.set_nodelay(true);
    let settings = ctx.settings.clone();
    let dest = ctx.conn.destination;
    let (io, sni, h2): (Box<dyn Io>, Option<String>, bool) =
        if ctx.resource.protocol == Protocol::Https {
            let hello =
                tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), client);
            let start = tokio::time::timeout(settings.header_timeout(), hello)
                .await
                .map_err(|_| HttpError::AgentTls("no ClientHello in time".into()))?
                .map_err(|e| HttpError::AgentTls(e.to_string()))?;
            let sni = start
                .client_hello()
                .server_name()
                .map(str::to_ascii_lowercase);
            let config = ctx.ca.server_config(dest.ip(), &[b"h2", b"http/1.1"]);
            let tls = tokio::time::timeout(settings.header_timeout(), start.into_stream(config))
                .await
                .map_err(|_| HttpError::AgentTls("handshake timed out".into()))?
                .map_err(|e| HttpError::AgentTls(e.to_string()))?;
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            (Box::new(tls), sni, h2)
        } else {
            (Box::new(client), None, false)
        };
    let https = ctx.resource.protocol == Protocol::Https;
    let upstream = Upstream::new(&ctx, sni.as_deref(), &[b"h2", b"http/1.1"])?;
    // Upgrades (WebSocket, CONNECT) take a connection of their own, HTTP/1.1.
    let tunnel_upstream = Upstream::new(&ctx, sni.as_deref(), &[b"http/1.1"])?;
    let session = ctx.conn.record(RecordKind::SessionStart).action(json!({
        "protocol": ctx.resource.protocol.as_str(),
        "sni": sni,
        "alpn": if h2 { Some("h2") } else if ctx.resource.protocol == Protocol::Https { Some("http/1.1") } else { None },
        "upstream_tls": upstream.tls.is_some(),
        "profile": ctx.resource.profile,
    }));
    ctx.audit.append_detached(session);
    let client = Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(settings.idle_timeout())
        .pool_max_idle_per_host(8)
        .build::<_, HttpBody>(upstream);
    let ctx = Arc::new(ctx);
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let ctx = ctx.clone();
        let client = client.clone();
        let tunnel_upstream = tunnel_upstream.clone();
        async move { Ok::<_, Infallible>(handle(req, ctx, client, tunnel_upstream).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_timeout())
        .max_buf_size(settings.max_header_bytes.max(8192))
        .max_headers(settings.max_headers)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(settings.max_streams)
        .max_header_list_size(settings.max_header_bytes as u32)
        .max_pending_accept_reset_streams(Some(20))
        .max_local_error_reset_streams(Some(64))
        .keep_alive_interval(Some(settings.idle_timeout()))
        .keep_alive_timeout(Duration::from_secs(20));
    // TLS says which by ALPN; plain HTTP may be HTTP/2 by prior knowledge.
    let builder = if h2 {
        builder.http2_only()
    } else if https {
        builder.http1_only()
    } else {
        builder
    };
    builder
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .await
        .map_err(|e| HttpError::Serve(error_chain(&*e)))
}

/// An error and its sources, `: `-joined (hyper's own text is terse).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !out.contains(&t) {
            out.push_str(": ");
            out.push_str(&t);
        }
        src = s.source();
    }
    out
}

// ---------------------------------------------------------------------------
// The request

/// The record of a request, its keyed fingerprint and summary.
struct Described {
    action: Value,
    fingerprint: String,
    summary: String,
}

fn describe(
    ctx: &HttpContext,
    head: &request::Head,
    headers: &HeaderMap,
    body: &[u8],
    tls: bool,
) -> Described {
    let body_hash =
        (!body.is_empty()).then(|| crate::audit::keyed_hash(&ctx.correlation_key, body));
    let mut whole = format!("{} {}{}", head.method, head.host, head.path);
    if let Some(q) = &head.query {
        whole.push('?');
        whole.push_str(q);
    }
    let target = format!(
        "{} {}{}",
        head.method,
        head.host,
        request::recorded_path(head)
    );
    let mut fp_input = whole.into_bytes();
    fp_input.extend_from_slice(body);
    Described {
        action: json!({
            "protocol": if tls { "https" } else { "http" },
            "method": head.method,
            "host": head.host,
            "path": request::recorded_path(head),
            "headers": request::recorded_headers(headers),
            "body_bytes": body.len(),
            "body_hash": body_hash,
            "request_hash": crate::audit::keyed_hash(&ctx.correlation_key, &fp_input),
        }),
        fingerprint: crate::audit::keyed_hash(&ctx.correlation_key, &fp_input),
        summary: target,
    }
}

/// A handler's own refusal, recorded through the gate like a policy denial.
async fn refuse_own(
    ctx: &HttpContext,
    action: Value,
    rule: &str,
    reason: String,
    status: StatusCode,
    grpc: bool,
) -> Response<HttpBody> {
    let decision = Decision {
        verdict: Verdict::Deny {
            reason: reason.clone(),
        },
        rule: rule.to_owned(),
    };
    let command = Command {
        action,
        fingerprint: String::new(),
        class: "write",
        summary: "",
        changes_state: true,
    };
    let d = ctx.gate().deny(command, &decision).await;
    problem(status, &d.rule, &d.reason, None, grpc)
}

#[allow(clippy::too_many_lines)] // the request lifecycle, phase by phase, as the module doc lists it
async fn handle(
    req: Request<Incoming>,
    ctx: Arc<HttpContext>,
    client: Client<Upstream, HttpBody>,
    tunnel_upstream: Upstream,
) -> Response<HttpBody> {
    let started = Instant::now();
    let (mut parts, incoming) = req.into_parts();
    let grpc = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"));
    let tls = ctx.resource.protocol == Protocol::Https;
    let mut head = match request::check(&parts.method, &parts.uri, parts.version, &parts.headers) {
        Ok(h) => h,
        Err(m) => {
            let action = json!({
                "protocol": if tls { "https" } else { "http" },
                "method": parts.method.as_str(),
                "malformed": m.0,
            });
            return refuse_own(
                &ctx,
                action,
                "agentgate:http-malformed",
                format!("malformed request: {}", m.0),
                StatusCode::BAD_REQUEST,
                grpc,
            )
            .await;
        }
    };
    let upgrade = tunnel::requested(&parts.method, parts.version, &parts.headers);
    if let Ok(Some(u)) = upgrade {
        u.method().clone_into(&mut head.method);
    }
    let described = describe(&ctx, &head, &parts.headers, &[], tls);
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(why) => {
            return refuse_own(
                &ctx,
                described.action,
                "agentgate:http-upgrade",
                why.into(),
                StatusCode::FORBIDDEN,
                grpc,
            )
            .await;
        }
    };
    let set = ctx.policy.current();
    if upgrade.is_some()
        && set.masking_for(&ctx.resource).inspects_bodies()
        && ctx.settings.uninspectable == Uninspectable::Refuse
    {
        return refuse_own(
            &ctx,
            described.action,
            "agentgate:http-uninspectable",
            "a WebSocket or CONNECT tunnel cannot be inspected, and this resource's responses are masked; refused".into(),
            StatusCode::FORBIDDEN,
            grpc,
        )
        .await;
    }
    let client_upgrade =
        upgrade.and_then(|_| parts.extensions.remove::<hyper::upgrade::OnUpgrade>());
    let gate = ctx.gate();
    let mut action = Action::Http {
        method: head.method.clone(),
        host: head.host.clone(),
        path: head.path.clone(),
        query: head.query.clone(),
        json: None,
    };
    // A rule that could apply tests JSON body fields: the body is read
    // before any decision, and one that cannot be read is refused.
    let needs_body = set.http_needs_body(&ctx.subject, &ctx.resource, &action);
    let mut decision = gate.decide(&set, &action);
    let command = |d: &Described| Command {
        action: d.action.clone(),
        fingerprint: d.fingerprint.clone(),
        class: request::class(&head.method),
        summary: "",
        changes_state: request::changes_state(&head.method),
    };
    if !needs_body && matches!(decision.verdict, Verdict::Deny { .. }) {
        let d = gate.deny(command(&described), &decision).await;
        return render_denial(&d, grpc);
    }
    // The body, bounded: read only once the policy may allow the request.
    let limit = ctx.settings.max_inspect_bytes;
    let (body_rule, body_note) = if needs_body {
        (
            "agentgate:http-body-unreadable",
            "; a rule tests this request's JSON body, so it is refused",
        )
    } else {
        ("agentgate:http-body-limit", "")
    };
    let body_status = |s: StatusCode| if needs_body { StatusCode::FORBIDDEN } else { s };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return refuse_own(
            &ctx,
            described.action,
            body_rule,
            format!("the request body is over the inspection limit of {limit} bytes{body_note}"),
            body_status(StatusCode::PAYLOAD_TOO_LARGE),
            grpc,
        )
        .await;
    }
    let collected = match tokio::time::timeout(
        ctx.settings.request_timeout(),
        http_body_util::Limited::new(incoming, limit).collect(),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            let too_large = e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            let (status, why) = if too_large {
                (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "the request body is over the inspection limit of {limit} bytes{body_note}"
                    ),
                )
            } else {
                (
                    StatusCode::BAD_REQUEST,
                    format!("reading the request body: {}", error_chain(&*e)),
                )
            };
            return refuse_own(
                &ctx,
                described.action,
                body_rule,
                why,
                body_status(status),
                grpc,
            )
            .await;
        }
        Err(_) => {
            return refuse_own(
                &ctx,
                described.action,
                "agentgate:http-timeout",
                "the request body did not arrive in time".into(),
                StatusCode::REQUEST_TIMEOUT,
                grpc,
            )
            .await;
        }
    };
    let trailers = collected.trailers().cloned();
    let mut body = collected.to_bytes();
    if needs_body {
        let encoded = Coding::parse(
            parts
                .headers
                .get(header::CONTENT_ENCODING)
                .and_then(|v| v.to_str().ok()),
        ) != Some(Coding::Identity);
        let doc = (!encoded)
            .then(|| serde_json::from_slice::<Value>(&body).ok())
            .flatten();
        let Some(doc) = doc else {
            let d = describe(&ctx, &head, &parts.headers, &body, tls);
            return refuse_own(
                &ctx,
                d.action,
                body_rule,
                "the request body is not JSON the gateway can read; a rule tests this request's JSON body, so it is refused".into(),
                StatusCode::FORBIDDEN,
                grpc,
            )
            .await;
        };
        if let Action::Http { json, .. } = &mut action {
            *json = Some(Arc::new(doc));
        }
        decision = gate.decide(&set, &action);
        if matches!(decision.verdict, Verdict::Deny { .. }) {
            let d = describe(&ctx, &head, &parts.headers, &body, tls);
            let d = gate.deny(command(&d), &decision).await;
            return render_denial(&d, grpc);
        }
    }
    // The openai profile: read the call, and keep the prompt's protected values in.
    let mut call = None;
    let mut dlp = None;
    if ctx.resource.profile == Some(HttpProfile::Openai)
        && openai::is_model_call(&head.method, &head.path)
    {
        let Ok(mut v) = serde_json::from_slice::<Value>(&body) else {
            return refuse_own(
                &ctx,
                described.action,
                "agentgate:openai-unreadable",
                "a model call whose body is not JSON cannot be checked".into(),
                StatusCode::BAD_REQUEST,
                grpc,
            )
            .await;
        };
        let c = openai::read_call(&v, &ctx.correlation_key);
        let dlp_policy = dlp_policy(&set, &ctx.resource);
        let hits = openai::scan_prompt(&dlp_policy, &mut v);
        if !hits.is_empty() {
            let mut action = described.action.clone();
            action["llm"] = c.record();
            action["dlp"] = hits.record();
            if ctx.resource.prompt_dlp == PromptDlp::Refuse {
                let names: Vec<String> = hits
                    .hits
                    .iter()
                    .take(8)
                    .map(|(d, p)| format!("{d} at {p}"))
                    .collect();
                let reason = format!(
                    "the prompt carries protected data ({}); refused by prompt DLP",
                    names.join(", ")
                );
                return refuse_own(
                    &ctx,
                    action,
                    "agentgate:prompt-dlp",
                    reason,
                    StatusCode::FORBIDDEN,
                    grpc,
                )
                .await;
            }
            body = Bytes::from(serde_json::to_vec(&v).expect("a JSON value serialises"));
            dlp = Some(hits.record());
        }
        call = Some(c);
    }
    let mut described = describe(&ctx, &head, &parts.headers, &body, tls);
    if let Some(c) = &call {
        described.action["llm"] = c.record();
    }
    if let Some(d) = &dlp {
        described.action["dlp"] = d.clone();
        described.action["dlp"]["action"] = json!("masked");
    }
    let summary = described.summary.clone();
    let cmd = Command {
        summary: &summary,
        ..command(&described)
    };
    let mut outcome = gate.admit_action(cmd, &decision, None, &action).await;
    if let gate::Outcome::Held(hold) = outcome {
        tracing::info!(conn = ctx.conn.id, request = %hold.request_id, "HTTP request held for approval");
        // The client may leave while it waits (hyper then drops this
        // future): the guard records the request cancelled and not run.
        let mut guard = HeldGuard {
            ctx: ctx.clone(),
            hold: Some(hold),
        };
        let answer = guard.hold.as_mut().expect("held").decided().await;
        let hold = guard.hold.take().expect("held");
        outcome = gate.release(hold, answer).await;
    }
    let recording = match outcome {
        gate::Outcome::ForwardNow { recording } => Some(recording),
        gate::Outcome::Forward { .. } => None,
        gate::Outcome::Deny(d) => return render_denial(&d, grpc),
        gate::Outcome::Held(_) => {
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "agentgate:gate",
                "held twice",
                None,
                grpc,
            );
        }
    };
    if let (Some(kind), Some(client_upgrade)) = (upgrade, client_upgrade) {
        if let Some(r) = recording
            && r.await.is_err()
        {
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "agentgate:audit",
                "the audit log cannot take the record",
                None,
                grpc,
            );
        }
        let done = Done {
            ctx: ctx.clone(),
            action: json!({ "protocol": described.action["protocol"], "method": head.method, "host": head.host, "path": described.action["path"], "request_hash": described.fingerprint, "upgrade": kind.method() }),
            started,
        };
        return open_tunnel(&parts, kind, client_upgrade, tunnel_upstream, done, grpc).await;
    }
    let masking = set.masking_for(&ctx.resource);
    let inspect = masking.inspects_bodies() || call.is_some();
    let upstream_req = match upstream_request(
        &parts,
        &head,
        body,
        trailers,
        inspect,
        ctx.resource.protocol == Protocol::Https
            || ctx
                .resource
                .tls
                .as_ref()
                .is_some_and(|t| t.mode == TlsMode::VerifyFull),
    ) {
        Ok(r) => r,
        Err(e) => {
            return problem(
                StatusCode::BAD_REQUEST,
                "agentgate:http-malformed",
                &e,
                None,
                grpc,
            );
        }
    };
    let exchange =
        tokio::time::timeout(ctx.settings.request_timeout(), client.request(upstream_req));
    let (upstream_answer, durable) = match recording {
        Some(r) => {
            let (answer, durable) = tokio::join!(exchange, r);
            (answer, durable.is_ok())
        }
        None => (exchange.await, true),
    };
    if !durable {
        let mut r = problem(
            StatusCode::SERVICE_UNAVAILABLE,
            "agentgate:audit",
            "the audit log cannot take the record",
            None,
            grpc,
        );
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return r;
    }
    let done = Done {
        ctx: ctx.clone(),
        action: json!({ "protocol": described.action["protocol"], "method": head.method, "host": head.host, "path": described.action["path"], "request_hash": described.fingerprint }),
        started,
    };
    let resp = match upstream_answer {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let why = format!("upstream: {}", error_chain(&e));
            tracing::warn!(conn = ctx.conn.id, error = %why, "upstream request failed");
            done.record(None, 502, 0, "error");
            return problem(
                StatusCode::BAD_GATEWAY,
                "agentgate:upstream",
                &why,
                None,
                grpc,
            );
        }
        Err(_) => {
            done.record(None, 504, 0, "error");
            return problem(
                StatusCode::GATEWAY_TIMEOUT,
                "agentgate:upstream",
                "the upstream did not answer in time",
                None,
                grpc,
            );
        }
    };
    respond(resp, done, set, call.is_some(), grpc).await
}

/// Sends an allowed upgrade request upstream on a connection of its own;
/// when the upstream switches protocols (101 for a WebSocket, 2xx for
/// `CONNECT`), answers the agent the same way and relays the two upgraded
/// connections in a task of their own, recording the byte counts when the
/// tunnel ends. Any other answer goes back as an ordinary response.
#[allow(clippy::too_many_lines)] // one exchange: request, answer, then the relay task
async fn open_tunnel(
    parts: &http::request::Parts,
    kind: tunnel::Upgrade,
    client_upgrade: hyper::upgrade::OnUpgrade,
    mut upstream: Upstream,
    done: Done,
    grpc: bool,
) -> Response<HttpBody> {
    use tower::Service as _;
    let ctx = done.ctx.clone();
    let target = match kind {
        tunnel::Upgrade::Connect => parts
            .uri
            .authority()
            .map_or_else(String::new, ToString::to_string),
        tunnel::Upgrade::WebSocket => parts
            .uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), ToString::to_string),
    };
    let mut headers = parts.headers.clone();
    strip_hop_by_hop(&mut headers);
    if kind == tunnel::Upgrade::WebSocket {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    let mut b = Request::builder()
        .method(parts.method.clone())
        .uri(target.as_str())
        .version(http::Version::HTTP_11);
    *b.headers_mut().expect("a valid builder") = headers;
    let Ok(req) = b.body(Full::new(Bytes::new())) else {
        done.record(None, 400, 0, "error");
        return problem(
            StatusCode::BAD_REQUEST,
            "agentgate:http-malformed",
            "the upgrade request cannot be sent on",
            None,
            grpc,
        );
    };
    let exchange = async {
        let io = upstream
            .call(Uri::from_static("/"))
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| error_chain(&e))?;
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
        });
        sender.send_request(req).await.map_err(|e| error_chain(&e))
    };
    let mut resp = match tokio::time::timeout(ctx.settings.request_timeout(), exchange).await {
        Ok(Ok(r)) => r,
        Ok(Err(why)) => {
            done.record(None, 502, 0, "error");
            return problem(
                StatusCode::BAD_GATEWAY,
                "agentgate:upstream",
                &format!("upstream: {why}"),
                None,
                grpc,
            );
        }
        Err(_) => {
            done.record(None, 504, 0, "error");
            return problem(
                StatusCode::GATEWAY_TIMEOUT,
                "agentgate:upstream",
                "the upstream did not answer in time",
                None,
                grpc,
            );
        }
    };
    let switched = match kind {
        tunnel::Upgrade::WebSocket => resp.status() == StatusCode::SWITCHING_PROTOCOLS,
        tunnel::Upgrade::Connect => resp.status().is_success(),
    };
    let status = resp.status().as_u16();
    if !switched {
        let (parts, body) = resp.into_parts();
        let n = body
            .collect()
            .await
            .map(http_body_util::Collected::to_bytes)
            .unwrap_or_default();
        done.record(None, status, n.len() as u64, "error");
        return Response::from_parts(
            parts,
            Full::new(n).map_err(|e: Infallible| match e {}).boxed(),
        );
    }
    let upstream_upgrade = hyper::upgrade::on(&mut resp);
    let idle = ctx.settings.idle_timeout();
    tokio::spawn(async move {
        let (c, u) = tokio::join!(client_upgrade, upstream_upgrade);
        let (Ok(c), Ok(u)) = (c, u) else {
            done.record(
                Some(json!({ "tunnel": "not established" })),
                status,
                0,
                "error",
            );
            return;
        };
        let r = tunnel::relay(TokioIo::new(c), TokioIo::new(u), idle).await;
        tracing::info!(
            conn = done.ctx.conn.id,
            to_upstream = r.to_upstream,
            to_client = r.to_client,
            ended = r.ended,
            "tunnel closed"
        );
        done.record(
            Some(json!({
                "tunnel": kind.method(),
                "inspected": false,
                "to_upstream": r.to_upstream,
                "to_client": r.to_client,
                "ended": r.ended,
            })),
            status,
            r.to_upstream + r.to_client,
            if r.ended == "error" { "error" } else { "ok" },
        );
    });
    let (parts, _) = resp.into_parts();
    Response::from_parts(
        parts,
        Full::new(Bytes::new())
            .map_err(|e: Infallible| match e {})
            .boxed(),
    )
}

/// A held request's hold while its client waits. Dropped with the hold
/// still in it (the client left: hyper dropped the request's future), it
/// cancels the approval request and records the request as not run, as
/// the other handlers do when their client leaves.
struct HeldGuard {
    ctx: Arc<HttpContext>,
    hold: Option<gate::Hold>,
}

impl Drop for HeldGuard {
    fn drop(&mut self) {
        let Some(hold) = self.hold.take() else {
            return;
        };
        let ctx = self.ctx.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { ctx.gate().cancel(hold).await });
        } else {
            tracing::error!(
                conn = ctx.conn.id,
                "a held request's client left outside the runtime; its cancellation is not recorded"
            );
        }
    }
}

/// The detectors prompt DLP runs: the resource's, or all when it names
/// none; and the policy's protected values, by keyed fingerprint.
fn dlp_policy(set: &PolicySet, resource: &Resource) -> MaskPolicy {
    let m = set.masking_for(resource);
    let detectors = if m.detectors_enabled() {
        m.detectors()
    } else {
        crate::mask::DetectorSet::ALL
    };
    MaskPolicy::new(Vec::new(), detectors, crate::mask::Strategy::Redact)
        .with_protected_values(m.protected_values().cloned())
}

const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "te",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "expect",
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .collect();
    for n in HOP_BY_HOP.iter().map(|s| (*s).to_owned()).chain(named) {
        h.remove(n.as_str());
    }
}

fn upstream_request(
    parts: &http::request::Parts,
    head: &request::Head,
    body: Bytes,
    trailers: Option<HeaderMap>,
    inspect: bool,
    tls: bool,
) -> Result<Request<HttpBody>, String> {
    let authority = parts
        .uri
        .authority()
        .map(ToString::to_string)
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| head.host.clone());
    let pq = parts
        .uri
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    let uri: Uri = format!("{}://{authority}{pq}", if tls { "https" } else { "http" })
        .parse()
        .map_err(|e| format!("request target: {e}"))?;
    let mut headers = parts.headers.clone();
    strip_hop_by_hop(&mut headers);
    if parts
        .headers
        .get(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if inspect {
        // Ask only for codings the handler can read back.
        let accepted = parts
            .headers
            .get(header::ACCEPT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        let readable: Vec<&str> = Coding::READABLE
            .into_iter()
            .filter(|c| {
                accepted.split(',').any(|t| {
                    let mut p = t.split(';').map(str::trim);
                    p.next() == Some(*c)
                        && !p.any(|q| {
                            q.strip_prefix("q=")
                                .is_some_and(|v| v.parse::<f32>().is_ok_and(|q| q <= 0.0))
                        })
                })
            })
            .collect();
        let value = if readable.is_empty() {
            "identity".to_owned()
        } else {
            readable.join(", ")
        };
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_str(&value).expect("ASCII"),
        );
    }
    let mut b = Request::builder()
        .method(parts.method.clone())
        .uri(uri)
        .version(http::Version::HTTP_11);
    *b.headers_mut().expect("a valid builder") = headers;
    let body = Once {
        data: Some(body).filter(|b| !b.is_empty()),
        trailers,
    };
    b.body(body.map_err(|e: Infallible| match e {}).boxed())
        .map_err(|e| e.to_string())
}

// ---------------------------------------------------------------------------
// The response

/// Records a request's completion (through the gate, once).
struct Done {
    ctx: Arc<HttpContext>,
    action: Value,
    started: Instant,
}

impl Done {
    fn record(&self, transform: Option<Value>, status: u16, bytes: u64, outcome: &'static str) {
        let result = ResultRecord::Completed {
            status: outcome,
            command: Some(format!("HTTP {status}")),
            rows: 0,
            bytes,
            duration_ms: self.started.elapsed().as_millis() as u64,
            sqlstate: None,
        };
        self.ctx
            .gate()
            .completed(self.action.clone(), transform, &result);
    }
}

#[allow(clippy::too_many_lines)] // one branch per body kind: streamed, event stream, inspected whole
async fn respond(
    resp: Response<Incoming>,
    mut done: Done,
    set: Arc<PolicySet>,
    llm: bool,
    grpc: bool,
) -> Response<HttpBody> {
    let (mut parts, incoming) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let status = parts.status.as_u16();
    let ok = if status < 400 { "ok" } else { "error" };
    let ctx = done.ctx.clone();
    let masking = set.masking_for(&ctx.resource);
    let inspect = masking.inspects_bodies() || llm;
    let kind = Kind::of(
        parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
    );
    let coding = Coding::parse(
        parts
            .headers
            .get(header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok()),
    );
    if !inspect
        || parts.status == StatusCode::NO_CONTENT
        || parts.status == StatusCode::NOT_MODIFIED
    {
        let tap = Tap::new(incoming, done, status, None, set.clone());
        return Response::from_parts(parts, tap.boxed());
    }
    let uninspectable = |why: String, done: &Done| -> Option<Response<HttpBody>> {
        done.record(Some(json!({ "uninspectable": why, "passed": ctx.settings.uninspectable == Uninspectable::Pass })), status, 0, ok);
        match ctx.settings.uninspectable {
            Uninspectable::Pass => None,
            Uninspectable::Refuse => Some(problem(
                StatusCode::BAD_GATEWAY,
                "agentgate:http-uninspectable",
                &format!("the response cannot be inspected ({why}); refused"),
                None,
                grpc,
            )),
        }
    };
    match (kind, coding) {
        (Kind::Opaque, _) if masking.inspects_bodies() && !is_empty_body(&parts.headers) => {
            if let Some(r) = uninspectable(
                format!("content type {:?}", parts.headers.get(header::CONTENT_TYPE)),
                &done,
            ) {
                return r;
            }
            done.action["recorded"] = json!("uninspectable, passed");
            return Response::from_parts(
                parts,
                Tap::new(incoming, done, status, None, set.clone()).boxed(),
            );
        }
        (Kind::Opaque, _) => {
            return Response::from_parts(
                parts,
                Tap::new(incoming, done, status, None, set.clone()).boxed(),
            );
        }
        (_, None) => {
            let enc = parts.headers.get(header::CONTENT_ENCODING).cloned();
            if let Some(r) = uninspectable(format!("content encoding {enc:?}"), &done) {
                return r;
            }
            return Response::from_parts(
                parts,
                Tap::new(incoming, done, status, None, set.clone()).boxed(),
            );
        }
        (Kind::EventStream, Some(Coding::Identity)) => {
            let sse = SseMasker::new(ctx.settings.max_inspect_bytes);
            parts.headers.remove(header::CONTENT_LENGTH);
            let tap = Tap::new(
                incoming,
                done,
                status,
                Some((sse, llm.then(openai::Answer::default))),
                set.clone(),
            );
            return Response::from_parts(parts, tap.boxed());
        }
        _ => {}
    }
    let coding = coding.expect("handled above");
    let limit = ctx.settings.max_inspect_bytes;
    let raw = match http_body_util::Limited::new(incoming, limit)
        .collect()
        .await
    {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            let why = if e
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                format!("the body is over the inspection limit of {limit} bytes")
            } else {
                format!("reading the upstream body: {}", error_chain(&*e))
            };
            return uninspectable(why.clone(), &done).unwrap_or_else(|| {
                problem(
                    StatusCode::BAD_GATEWAY,
                    "agentgate:http-uninspectable",
                    &why,
                    None,
                    grpc,
                )
            });
        }
    };
    let plain = match body::decode(coding, &raw, limit) {
        Ok(p) => p,
        Err(e) => {
            if let Some(r) = uninspectable(e.0, &done) {
                return r;
            }
            let n = raw.len() as u64;
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
            return Response::from_parts(
                parts,
                Full::new(raw).map_err(|e: Infallible| match e {}).boxed(),
            );
        }
    };
    let mut masked = Masked::default();
    let mut answer = None;
    if llm
        && kind == Kind::Json
        && let Ok(v) = serde_json::from_slice::<Value>(&plain)
    {
        let mut a = openai::Answer::default();
        a.absorb(&v);
        answer = Some(a);
    }
    let out = match body::mask_body(masking, kind, &plain, &mut masked) {
        Some(m) => Bytes::from(body::encode(coding, &m)),
        None => raw,
    };
    if let Some(a) = &answer {
        done.action["llm"] = a.record();
    }
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(out.len() as u64));
    done.record(
        (!masked.is_empty()).then(|| masked.record()),
        status,
        out.len() as u64,
        ok,
    );
    Response::from_parts(
        parts,
        Full::new(out).map_err(|e: Infallible| match e {}).boxed(),
    )
}

fn is_empty_body(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_LENGTH)
        .is_some_and(|v| v.as_bytes() == b"0")
}

/// A response body streamed to the agent: counted, event streams masked a
/// line at a time, its completion recorded at its end (or when dropped).
struct Tap {
    inner: Incoming,
    done: Option<Done>,
    status: u16,
    bytes: u64,
    sse: Option<(SseMasker, Option<openai::Answer>)>,
    set: Arc<PolicySet>,
    resource: Resource,
    ended: bool,
}

impl Tap {
    fn new(
        inner: Incoming,
        done: Done,
        status: u16,
        sse: Option<(SseMasker, Option<openai::Answer>)>,
        set: Arc<PolicySet>,
    ) -> Self {
        let resource = done.ctx.resource.clone();
        Self {
            inner,
            done: Some(done),
            status,
            bytes: 0,
            sse,
            set,
            resource,
            ended: false,
        }
    }

    fn finish(&mut self, outcome: &'static str) {
        let Some(mut done) = self.done.take() else {
            return;
        };
        let mut transform = None;
        if let Some((sse, answer)) = &self.sse {
            if let Some(a) = answer {
                done.action["llm"] = a.record();
            }
            if !sse.masked.is_empty() {
                transform = Some(sse.masked.record());
            }
        }
        let ok = if outcome == "ok" && self.status < 400 {
            "ok"
        } else {
            "error"
        };
        done.record(transform, self.status, self.bytes, ok);
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.finish("error");
    }
}

impl Body for Tap {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                None => {
                    this.ended = true;
                    let rest = match &mut this.sse {
                        Some((sse, _)) => sse.finish(this.set.masking_for(&this.resource)),
                        None => Bytes::new(),
                    };
                    this.bytes += rest.len() as u64;
                    this.finish("ok");
                    if !rest.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(rest))));
                    }
                    return Poll::Ready(None);
                }
                Some(Err(e)) => {
                    this.finish("error");
                    return Poll::Ready(Some(Err(e.into())));
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let Some((sse, answer)) = &mut this.sse else {
                            this.bytes += data.len() as u64;
                            return Poll::Ready(Some(Ok(Frame::data(data))));
                        };
                        let policy = this.set.masking_for(&this.resource);
                        let out = sse.feed(policy, &data, |line| {
                            if let Some(a) = answer.as_mut()
                                && let Some(d) = line.strip_prefix(b"data:")
                                && let Ok(v) = serde_json::from_slice::<Value>(d.trim_ascii())
                            {
                                a.absorb(&v);
                            }
                        });
                        match out {
                            Ok(b) if b.is_empty() => {}
                            Ok(b) => {
                                this.bytes += b.len() as u64;
                                return Poll::Ready(Some(Ok(Frame::data(b))));
                            }
                            Err(e) => {
                                this.finish("error");
                                return Poll::Ready(Some(Err(e.0.into())));
                            }
                        }
                    }
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
            }
        }
    }
}

/// One data frame then the trailers, if any.
struct Once {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for Once {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(d) = this.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        hyper::body::SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

// ---------------------------------------------------------------------------
// Denials

fn render_denial(d: &gate::Denial, grpc: bool) -> Response<HttpBody> {
    let (status, approval) = match &d.kind {
        DenialKind::AuditUnavailable => (StatusCode::SERVICE_UNAVAILABLE, None),
        DenialKind::Approval { request } | DenialKind::Withdrawn { request } => {
            (StatusCode::FORBIDDEN, Some(request.as_str()))
        }
        DenialKind::Policy => (StatusCode::FORBIDDEN, None),
    };
    problem(status, &d.rule, &d.reason, approval, grpc)
}

/// An RFC 9457 problem body naming the rule; it also carries an OpenAI-style
/// `error` object so model SDKs show the reason. gRPC gets a trailers-only
/// answer with its status instead.
fn problem(
    status: StatusCode,
    rule: &str,
    detail: &str,
    approval: Option<&str>,
    grpc: bool,
) -> Response<HttpBody> {
    if grpc {
        let code = match status {
            StatusCode::FORBIDDEN => "7",
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::BAD_GATEWAY => "14",
            StatusCode::GATEWAY_TIMEOUT | StatusCode::REQUEST_TIMEOUT => "4",
            StatusCode::PAYLOAD_TOO_LARGE => "8",
            _ => "3",
        };
        let msg: String = format!("agentgate: {detail} (rule {rule})")
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b" .-_:()".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        return Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/grpc")
            .header("grpc-status", code)
            .header("grpc-message", msg)
            .body(
                Full::new(Bytes::new())
                    .map_err(|e: Infallible| match e {})
                    .boxed(),
            )
            .expect("a valid response");
    }
    let title = match status {
        StatusCode::FORBIDDEN => "Forbidden by agentgate",
        StatusCode::SERVICE_UNAVAILABLE => "agentgate cannot record the request",
        StatusCode::PAYLOAD_TOO_LARGE => "Body over agentgate's inspection limit",
        StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT => "Upstream failure",
        _ => "Refused by agentgate",
    };
    let body = json!({
        "type": format!("urn:agentgate:problem:{}", if status == StatusCode::FORBIDDEN { "denied" } else { "refused" }),
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
        "rule": rule,
        "approval_request": approval,
        "error": { "message": format!("agentgate: {detail} (rule {rule})"), "type": "agentgate_denied", "code": rule },
    });
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/problem+json")
        .body(
            Full::new(Bytes::from(body.to_string()))
                .map_err(|e: Infallible| match e {})
                .boxed(),
        )
        .expect("a valid response")
}

// ---------------------------------------------------------------------------
// The upstream connector

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Connects to the agent's original destination (never where the URI
/// points: the agent chose the address, policy matched it), with TLS when
/// the resource says so.
#[derive(Clone)]
struct Upstream {
    addr: SocketAddr,
    tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls_pki_types::ServerName<'static>,
    )>,
    timeout: Duration,
}

impl Upstream {
    fn new(ctx: &HttpContext, sni: Option<&str>, alpn: &[&[u8]]) -> Result<Self, HttpError> {
        let https = ctx.resource.protocol == Protocol::Https;
        let tls = match (&ctx.resource.tls, https) {
            (Some(t), true) if t.mode == TlsMode::Disable => {
                return Err(HttpError::UpstreamTls("an https resource is never relayed to its upstream in plaintext (tls.mode = \"disable\")".into()));
            }
            (Some(t), _) if t.mode == TlsMode::VerifyFull => {
                Some((t.ca_file.as_deref(), t.server_name.clone()))
            }
            (_, true) => Some((None, None)),
            _ => None,
        };
        let tls = match tls {
            None => None,
            Some((ca_file, server_name)) => {
                let cfg =
                    crate::tls::client_config(ca_file, alpn).map_err(HttpError::UpstreamTls)?;
                let name = match server_name.or_else(|| sni.map(str::to_owned)) {
                    Some(n) => rustls_pki_types::ServerName::try_from(n.clone())
                        .map_err(|e| HttpError::UpstreamTls(format!("server name {n:?}: {e}")))?,
                    None => {
                        rustls_pki_types::ServerName::IpAddress(ctx.conn.destination.ip().into())
                    }
                };
                Some((Arc::new(cfg), name))
            }
        };
        Ok(Self {
            addr: ctx.conn.destination,
            tls,
            timeout: ctx.connect_timeout,
        })
    }
}

impl tower::Service<Uri> for Upstream {
    type Response = UpstreamIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<UpstreamIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let tcp = tokio::time::timeout(this.timeout, TcpStream::connect(this.addr))
                .await
                .map_err(|_| format!("connecting to {} timed out", this.addr))??;
            let _ = tcp.set_nodelay(true);
            let Some((cfg, name)) = this.tls else {
                return Ok(UpstreamIo {
                    io: TokioIo::new(Box::new(tcp) as Box<dyn Io>),
                    h2: false,
                });
            };
            let tls = tokio::time::timeout(
                this.timeout,
                tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
            )
            .await
            .map_err(|_| format!("TLS handshake with {} timed out", this.addr))?
            .map_err(|e| format!("TLS with the upstream {}: {e}", this.addr))?;
            let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
            Ok(UpstreamIo {
                io: TokioIo::new(Box::new(tls) as Box<dyn Io>),
                h2,
            })
        })
    }
}

struct UpstreamIo {
    io: TokioIo<Box<dyn Io>>,
    h2: bool,
}

impl Connection for UpstreamIo {
    fn connected(&self) -> Connected {
        let c = Connected::new();
        if self.h2 { c.negotiated_h2() } else { c }
    }
}

impl hyper::rt::Read for UpstreamIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for UpstreamIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::{
        approval::{Settings, testing::Accepting},
        audit::NewRecord,
        gate::AuditUnavailable,
        policy::load_str,
    };

    struct Sink;
    impl gate::AuditSink for Sink {
        fn append(
            &self,
            _r: NewRecord,
        ) -> Pin<Box<dyn Future<Output = Result<(), AuditUnavailable>> + Send + '_>> {
            Box::pin(async { Ok(()) })
        }
        fn append_detached(&self, _r: NewRecord) {}
    }

    /// An upstream that counts the connections it gets (and answers nothing).
    async fn counting_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let n = Arc::new(AtomicUsize::new(0));
        let seen = n.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                seen.fetch_add(1, Ordering::SeqCst);
                drop(s);
            }
        });
        (addr, n)
    }

    fn context(upstream: SocketAddr, dir: &std::path::Path) -> HttpContext {
        let text = format!(
            "[[resource]]\nname = \"api\"\nprotocol = \"http\"\naddresses = [\"{upstream}\"]\ndefault_action = \"allow\"\n"
        );
        let set = load_str(&[("p.toml", &text)]).unwrap();
        let resource = set.resource("api").unwrap().clone();
        HttpContext {
            conn: Arc::new(LiveConnection::for_test(upstream, "api")),
            subject: Subject {
                identity: "agent".into(),
                groups: vec![],
            },
            resource,
            policy: Arc::new(PolicyStore::from_set(
                std::path::Path::new("/nonexistent"),
                set,
                None,
            )),
            approvals: Broker::new(Arc::new(Accepting), Settings::default()),
            audit: Arc::new(Sink),
            correlation_key: [7; 32],
            ca: Arc::new(LocalCa::load_or_create(dir).unwrap()),
            settings: HttpConfig::default(),
            connect_timeout: Duration::from_secs(2),
        }
    }

    /// HTTP/2 rapid reset (CVE-2023-44487): streams opened and reset at
    /// once, by the thousand. The handler answers with GOAWAY, ends the
    /// connection without a panic, and no request reaches the upstream.
    #[tokio::test]
    async fn an_http2_rapid_reset_flood_is_cut_and_reaches_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (upstream, reached) = counting_upstream().await;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front = l.local_addr().unwrap();
        let ctx = context(upstream, dir.path());
        let served = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            serve(s, ctx).await
        });
        let tcp = TcpStream::connect(front).await.unwrap();
        let (mut send, conn) = h2::client::handshake(tcp).await.unwrap();
        let driver = tokio::spawn(conn);
        let mut opened = 0;
        for i in 0..5000 {
            let req = Request::get(format!("http://api.test/flood/{i}"))
                .body(())
                .unwrap();
            let Ok(s) = send.ready().await else { break };
            send = s;
            let Ok((_resp, mut stream)) = send.send_request(req, true) else {
                break;
            };
            stream.send_reset(h2::Reason::CANCEL);
            opened += 1;
        }
        let ended = tokio::time::timeout(Duration::from_secs(10), driver)
            .await
            .expect("the handler ends the flooded connection");
        // The client's own side may see only the closed socket (its frames
        // were still queued); the handler's side says why it closed.
        drop(ended);
        let served = tokio::time::timeout(Duration::from_secs(10), served)
            .await
            .expect("serve returns")
            .expect("no panic");
        let why = served
            .expect_err("the flooded connection ends in error")
            .to_string();
        assert!(
            why.contains("excessive load"),
            "GOAWAY ENHANCE_YOUR_CALM: {why} (after {opened} streams queued)"
        );
        assert_eq!(
            reached.load(Ordering::SeqCst),
            0,
            "no flooded request reached the upstream"
        );
    }
}
