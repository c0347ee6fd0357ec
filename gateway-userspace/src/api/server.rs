//! Accepting connections: the connection limit, the peer check at accept,
//! TLS when configured, the request-head timeout (hyper) and the answer
//! timeout; then the router.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use axum::{extract::Request, middleware::Next, response::IntoResponse as _};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::TcpListener,
    sync::{Semaphore, watch},
};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

use super::{ApiError, ApiState, peer};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("[api] binding {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("[api] TLS: {0}")]
    Tls(String),
}

/// Binds the listener (at start, so a busy port refuses the start).
pub fn bind(addr: SocketAddr) -> Result<TcpListener, ServeError> {
    let err = |source| ServeError::Bind { addr, source };
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(err)?;
    sock.set_reuseaddr(true).map_err(err)?;
    sock.bind(addr).map_err(err)?;
    sock.listen(1024).map_err(err)
}

/// The rustls server config from PEM files.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, ServeError> {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| ServeError::Tls(format!("{}: {e}", cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| ServeError::Tls(format!("{}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(ServeError::Tls(format!(
            "{}: no certificate",
            cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| ServeError::Tls(format!("{}: {e}", key.display())))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServeError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ServeError::Tls(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A bound listener, its TLS acceptor (if any) and the handlers' state.
pub struct Bound {
    pub listener: TcpListener,
    pub tls: Option<TlsAcceptor>,
    pub state: Arc<ApiState>,
}

/// Serves until `shutdown`.
pub async fn serve(bound: Bound, mut shutdown: watch::Receiver<bool>) {
    let Bound {
        listener,
        tls,
        state,
    } = bound;
    let limit = Arc::new(Semaphore::new(state.config.max_connections));
    let router = super::router(state.clone());
    let header_timeout = Duration::from_secs(state.config.header_timeout_secs);
    let answer_timeout = Duration::from_secs(state.config.request_timeout_secs);
    loop {
        let (stream, remote) = tokio::select! {
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "api accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopped(&mut shutdown) => return,
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            state.metrics.api_refused_limit.inc();
            tracing::warn!(peer = %remote, "api connection limit reached; closing");
            continue;
        };
        let Ok(local) = stream.local_addr() else {
            continue;
        };
        let peer = {
            let bindings = state.shared.bindings.lock().expect("bindings lock");
            peer::check(
                local,
                remote,
                state.own_cgroup,
                &state.shared.hierarchy,
                &bindings,
            )
        };
        tokio::spawn(connection(
            stream,
            Arc::new(peer),
            router.clone(),
            tls.clone(),
            Timeouts {
                header: header_timeout,
                answer: answer_timeout,
            },
            shutdown.clone(),
            (permit, state.metrics.clone()),
        ));
    }
}

#[derive(Clone, Copy)]
struct Timeouts {
    header: Duration,
    answer: Duration,
}

/// One connection: TLS if configured, then HTTP/1.1 with the head timeout,
/// each request bounded by the answer timeout and tagged with its peer.
async fn connection(
    stream: tokio::net::TcpStream,
    peer: Arc<peer::Peer>,
    router: axum::Router,
    tls: Option<TlsAcceptor>,
    timeouts: Timeouts,
    mut stop: watch::Receiver<bool>,
    (permit, metrics): (
        tokio::sync::OwnedSemaphorePermit,
        Arc<super::metrics::Metrics>,
    ),
) {
    let _permit = permit;
    metrics.api_connections.inc();
    let service =
        hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(peer.clone());
            let router = router.clone();
            async move {
                let answer = tokio::time::timeout(
                    timeouts.answer,
                    router.oneshot(req.map(axum::body::Body::new)),
                )
                .await;
                Ok::<_, std::convert::Infallible>(match answer {
                    Ok(Ok(r)) => r,
                    Ok(Err(never)) => match never {},
                    Err(_) => ApiError::new(
                        axum::http::StatusCode::SERVICE_UNAVAILABLE,
                        "timeout",
                        "the answer took too long",
                    )
                    .into_response(),
                })
            }
        });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.header)
        .max_buf_size(64 * 1024);
    let result = if let Some(acceptor) = tls {
        let Ok(Ok(tls_stream)) =
            tokio::time::timeout(timeouts.header, acceptor.accept(stream)).await
        else {
            return;
        };
        let conn = builder.serve_connection(TokioIo::new(tls_stream), service);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            () = stopped(&mut stop) => { conn.as_mut().graceful_shutdown(); conn.await }
        }
    } else {
        let conn = builder.serve_connection(TokioIo::new(stream), service);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            () = stopped(&mut stop) => { conn.as_mut().graceful_shutdown(); conn.await }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "api connection ended with an error");
    }
}

/// Resolves once the daemon is stopping (holding no guard across awaits).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Middleware: a refused peer gets 403 on every route, and each refused
/// request is recorded.
pub async fn refuse_governed(
    axum::extract::State(state): axum::extract::State<Arc<ApiState>>,
    req: Request,
    next: Next,
) -> axum::response::Response {
    let peer = req.extensions().get::<Arc<peer::Peer>>().cloned();
    let Some(peer) = peer else {
        // Not from our accept loop: cannot tell who it is.
        return ApiError::forbidden("unknown peer").into_response();
    };
    if let Some(refusal) = &peer.refused {
        let route = format!("{} {}", req.method(), route_name(req.uri().path()));
        state.record_refusal(&peer, refusal, &route).await;
        state.metrics.api_refused_governed.inc();
        return ApiError::forbidden(refusal.message()).into_response();
    }
    next.run(req).await
}

/// The path with ids replaced, so records name routes and not arguments.
fn route_name(path: &str) -> String {
    let parts: Vec<&str> = path
        .split('/')
        .take(6)
        .map(|p| {
            const KNOWN: &[&str] = &[
                "",
                "api",
                "approvals",
                "grants",
                "approve",
                "reject",
                "revoke",
                "metrics",
                "login",
                "callback",
                "logout",
            ];
            if KNOWN.contains(&p) { p } else { "{id}" }
        })
        .collect();
    parts.join("/")
}
