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

pub mod codec;
pub mod proxy;
pub mod rows;
#[cfg(test)]
mod tests;
