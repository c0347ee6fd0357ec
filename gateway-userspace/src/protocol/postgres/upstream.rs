//! The connection to the server: TCP to the agent's original destination,
//! from the daemon's untagged context (so it is never redirected), then,
//! when the resource's `tls` says `verify-full`, `SSLRequest` and TLS with
//! rustls ([`crate::tls::client`], shared with every handler). Fails closed:
//! a server that refuses TLS when it is required is an error, never a
//! plaintext fallback.

use std::{net::SocketAddr, time::Duration};

use bytes::BytesMut;
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _},
    net::TcpStream,
};

use super::{codec::StartupPacket, error::PgProxyError};
use crate::policy::{TlsMode, UpstreamTls};

/// The server's stream, TLS or not.
pub(super) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Connects to `addr`; `true` when the stream is TLS.
pub(super) async fn connect(
    addr: SocketAddr,
    tls: Option<&UpstreamTls>,
    timeout: Duration,
) -> Result<(Box<dyn Io>, bool), PgProxyError> {
    let mut tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| PgProxyError::Connect {
            addr,
            reason: "timed out".into(),
        })?
        .map_err(|e| PgProxyError::Connect {
            addr,
            reason: e.to_string(),
        })?;
    let _ = tcp.set_nodelay(true);
    let Some(tls) = tls.filter(|t| t.mode == TlsMode::VerifyFull) else {
        return Ok((Box::new(tcp), false));
    };
    let tls_err = |reason: String| PgProxyError::Tls { addr, reason };
    let mut req = BytesMut::new();
    StartupPacket::SslRequest.encode(&mut req);
    tcp.write_all(&req)
        .await
        .map_err(|source| PgProxyError::UpstreamIo { source })?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer)
        .await
        .map_err(|source| PgProxyError::UpstreamIo { source })?;
    if answer[0] != b'S' {
        return Err(tls_err(
            "the server does not accept TLS (answered the SSLRequest with N)".into(),
        ));
    }
    let stream = crate::tls::client::connect(tcp, tls, addr)
        .await
        .map_err(tls_err)?;
    Ok((Box::new(stream), true))
}
