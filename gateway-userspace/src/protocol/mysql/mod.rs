//! `MySQL` / `MariaDB` client/server protocol for the L7 proxy.
//!
//! - [`codec`]: sans-IO framing (on `mysql_common`'s `PacketCodec`), the
//!   handshake, commands, and the state machine of a command's reply, with
//!   explicit [`codec::Limits`].
//! - [`rows`]: text and binary result rows, read and rewritten for masking.
//! - [`proxy`]: the tokio connection handler, the only I/O here.
//!
//! What fails closed, and why: bytes that do not frame or parse (a length
//! over the limit, a sequence id out of order, a capability the client was
//! not offered) end the connection with an `ERR` packet, and nothing of them
//! reaches the server: what cannot be read cannot be judged. A server reply
//! the proxy cannot follow ends the connection: rows could no longer be tied
//! to their columns.
//!
//! Authentication is relayed, not terminated: the proxy connects upstream
//! first and passes the server's own greeting (its version, its scramble)
//! to the client, so `mysql_native_password`, `caching_sha2_password` (fast
//! and full) and `MariaDB`'s `client_ed25519` work unchanged, auth switch
//! included. The proxy never holds a usable password; a cleartext password
//! (`caching_sha2_password` full authentication over TLS) passes through
//! its buffers and is never logged or recorded.
//!
//! Capabilities the proxy removes from the greeting: `CLIENT_COMPRESS` and
//! zstd (every byte must be read), `MySQL` 8 query attributes and optional
//! result metadata, `MariaDB`'s extended capabilities (cached metadata, bulk
//! execute, progress reports), and `CLIENT_SSL` (the agent's leg is loopback
//! on the same host; no local CA is configured for it).

pub mod catalog;
pub mod codec;
pub mod config;
pub mod credential;
pub mod proxy;
pub mod rows;

use std::{sync::Arc, time::Duration};

use tokio::net::TcpStream;

use super::{Attributed, BoxFuture, Handler, HandlerError, Registration, Services};
use crate::policy::Protocol;

/// The `MySQL` handler's place in [`super::REGISTRY`].
pub const REGISTRATION: Registration = Registration {
    protocol: Protocol::Mysql,
    section: "mysql",
    check: config::check,
    build: |section| {
        let c = match section {
            None => config::MysqlConfig::default(),
            Some(v) => v.clone().try_into().map_err(|e| e.to_string())?,
        };
        c.validate()?;
        Ok(Arc::new(Mysql { config: c }))
    },
};

/// The handler: its section (it keeps no state across connections).
pub struct Mysql {
    config: config::MysqlConfig,
}

impl Handler for Mysql {
    fn serve(
        &self,
        client: TcpStream,
        conn: Attributed,
        services: Services,
    ) -> BoxFuture<'_, Result<(), HandlerError>> {
        let ctx = proxy::MyContext {
            conn: conn.conn,
            subject: conn.subject,
            resource: conn.resource,
            policy: services.policy,
            approvals: services.approvals,
            audit: services.audit,
            correlation_key: services.correlation_key,
            settings: proxy::MySettings {
                limits: codec::Limits {
                    max_packet: self.config.max_packet_bytes,
                    max_sql_len: self.config.max_sql_bytes,
                    ..codec::Limits::default()
                },
                handshake_timeout: Duration::from_secs(self.config.handshake_timeout_secs),
                connect_timeout: services.upstream_connect_timeout,
            },
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
#[cfg(test)]
mod tests;
