//! Postgres v3 wire protocol for the L7 proxy: codec, session state, row masking.
//!
//! - [`codec`]: sans-IO decoder/encoder for startup packets and frontend/backend
//!   messages, with explicit [`codec::Limits`].
//! - [`session`]: pure state the proxy loop drives (transaction status, prepared
//!   statements and portals, request/response matching, skip-until-Sync, how a
//!   denial is placed).
//! - [`mask`]: rewriting `DataRow` and `COPY TO STDOUT` data per masking rules.
//! - [`catalog`]: table-OID names and `COPY` column lists for the masker (pure).
//! - [`proxy`]: the tokio connection handler that drives all of the above,
//!   with [`upstream`] (the connection to the server, TLS) the only I/O in
//!   this module; [`cancel`] keeps the cancel keys it issued, [`error`] says
//!   why a connection ended.
//!
//! What fails closed here, and why:
//!
//! - Malformed or oversize client input is a [`codec::ProtocolError`]; the proxy
//!   answers `ErrorResponse` 08P01 and closes, sending nothing upstream: bytes it
//!   cannot frame cannot be judged.
//! - A server stream that stops matching the requests sent is a
//!   [`session::SessionError`]: rows could no longer be tied to their columns.
//! - Rows that cannot be masked are not sent ([`mask::MaskError`]).
//!
//! Authentication is passed through (cleartext, MD5, SCRAM-SHA-256): the proxy
//! never sees a usable password hash for SCRAM and does not need one; unless
//! the resource names a `credential`, when the proxy logs in upstream itself
//! and the agent's password is never asked for (`credential`). SCRAM
//! channel binding (`SCRAM-SHA-256-PLUS`) binds the exchange to the TLS channel
//! the client sees; when the proxy terminates TLS that is not the server's
//! channel, so binding cannot pass. The proxy offers the client only the
//! mechanisms without `-PLUS` ([`strip_channel_binding`]) and authentication runs
//! without channel binding. The GS2 flag the client then sends is signed into the
//! SCRAM proof and cannot be rewritten: a client that talks TLS to the proxy and
//! supports binding sends `y` ("I could bind, you did not offer it"), which a
//! server that itself offers `-PLUS` (TLS upstream) rejects as a downgrade. So:
//! with TLS upstream, the client leg must be plain (the proxy answers
//! `SSLRequest` with `N`; the leg is loopback on the same host) for SCRAM to work;
//! a client set to `channel_binding=require` cannot connect through the proxy.
//!
//! `GSSENCRequest` is answered `N` by the proxy itself (an encrypted stream cannot
//! be inspected); it is never forwarded. `SSLRequest` is answered by the proxy per
//! its own TLS configuration.

pub mod cancel;
pub mod catalog;
pub mod codec;
pub mod config;
pub mod credential;
pub mod error;
pub mod mask;
pub mod proxy;
pub mod session;
mod upstream;

use std::sync::Arc;

use bytes::Bytes;
use codec::Authentication;
use tokio::net::TcpStream;

use super::{Attributed, BoxFuture, Handler, HandlerError, Registration, Services};
use crate::policy::Protocol;

/// The Postgres handler's place in [`super::REGISTRY`].
pub const REGISTRATION: Registration = Registration {
    protocol: Protocol::Postgres,
    section: "postgres",
    check: config::check,
    build: |section| {
        let c = match section {
            None => config::PostgresConfig::default(),
            Some(v) => v.clone().try_into().map_err(|e| e.to_string())?,
        };
        c.validate()?;
        Ok(Arc::new(Postgres {
            config: c,
            cancel_keys: proxy::CancelKeys::default(),
        }))
    },
};

/// The handler: its section and its state (the cancel keys of every live
/// Postgres session of the daemon).
pub struct Postgres {
    config: config::PostgresConfig,
    cancel_keys: proxy::CancelKeys,
}

impl Handler for Postgres {
    fn serve(
        &self,
        client: TcpStream,
        conn: Attributed,
        services: Services,
    ) -> BoxFuture<'_, Result<(), HandlerError>> {
        let ctx = proxy::PgContext {
            conn: conn.conn,
            subject: conn.subject,
            resource: conn.resource,
            policy: services.policy,
            approvals: services.approvals,
            audit: services.audit,
            correlation_key: services.correlation_key,
            settings: proxy::PgSettings::from_config(
                &self.config,
                services.upstream_connect_timeout,
            ),
            cancel_keys: self.cancel_keys.clone(),
            sql_cache: services.sql_cache,
            probes: services.probes,
        };
        Box::pin(async move { proxy::serve(client, ctx).await.map_err(Into::into) })
    }

    fn refuse<'a>(
        &'a self,
        client: TcpStream,
        rule: &'a str,
        reason: &'a str,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            if let Err(e) = proxy::refuse(client, rule, reason).await {
                tracing::debug!(error = %e, "refusal not delivered");
            }
        })
    }
}

/// Remove channel-binding SASL mechanisms (`*-PLUS`) from an
/// `AuthenticationSASL` before it reaches the client. Returns whether a usable
/// mechanism is left.
pub fn strip_channel_binding(auth: &mut Authentication) -> bool {
    match auth {
        Authentication::Sasl { mechanisms } => {
            mechanisms.retain(|m: &Bytes| !m.ends_with(b"-PLUS"));
            !mechanisms.is_empty()
        }
        _ => true,
    }
}
