//! The HTTP handler for `http` and `https` resources (and the `openai`
//! profile on either): each request is a command the gate decides on by
//! method, host and path; responses are masked by the value detectors;
//! model calls are recorded (model, tokens, tool names) and their prompts
//! checked before they leave.
//!
//! - [`request`]: sans-IO checks of a request head (smuggling shapes, path
//!   tricks) and what the record keeps of it (query values and credentials out).
//! - [`body`]: content codings, detectors over JSON and text, event streams.
//! - [`openai`]: the model-call profile and prompt DLP.
//! - [`tunnel`]: upgraded connections (WebSocket, `CONNECT`), relayed and counted.
//! - [`proxy`]: the I/O (hyper server toward the agent, client toward the
//!   upstream) and the request lifecycle.
//!
//! Fails closed everywhere its module docs say; see [`proxy`] for the order.

pub mod body;
pub mod config;
pub mod openai;
pub mod proxy;
pub mod request;
pub mod tunnel;

use std::sync::Arc;

use tokio::net::TcpStream;

use super::{Attributed, BoxFuture, Handler, HandlerError, Registration, Services};
use crate::policy::Protocol;

fn build(section: Option<&toml::Value>) -> Result<super::SharedHandler, String> {
    let c = match section {
        None => config::HttpConfig::default(),
        Some(v) => v.clone().try_into().map_err(|e| e.to_string())?,
    };
    c.validate()?;
    Ok(Arc::new(Http { config: c }))
}

/// The handler's places in [`super::REGISTRY`]: plain HTTP and HTTPS share
/// one section and one handler type.
pub const REGISTRATION: Registration = Registration {
    protocol: Protocol::Http,
    section: "http",
    check: config::check,
    build,
};
pub const REGISTRATION_TLS: Registration = Registration {
    protocol: Protocol::Https,
    section: "http",
    check: config::check,
    build,
};

/// The handler: its `[proxy.http]` section.
pub struct Http {
    config: config::HttpConfig,
}

impl Handler for Http {
    fn serve(
        &self,
        client: TcpStream,
        conn: Attributed,
        services: Services,
    ) -> BoxFuture<'_, Result<(), HandlerError>> {
        let ctx = proxy::HttpContext {
            conn: conn.conn,
            subject: conn.subject,
            resource: conn.resource,
            policy: services.policy,
            approvals: services.approvals,
            audit: services.audit,
            correlation_key: services.correlation_key,
            ca: services.ca,
            settings: self.config.clone(),
            connect_timeout: services.upstream_connect_timeout,
        };
        Box::pin(async move { proxy::serve(client, ctx).await.map_err(Into::into) })
    }

    /// A denied connection is closed: the agent's TLS cannot be answered
    /// with a readable refusal before a handshake, and plain HTTP clients
    /// see the reset; the `connection.open` record names the rule.
    fn refuse<'a>(
        &'a self,
        client: TcpStream,
        _rule: &'a str,
        _reason: &'a str,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move { drop(client) })
    }
}
