//! Upgraded connections: a WebSocket (`Upgrade: websocket`, answered 101)
//! or a `CONNECT` tunnel (answered 2xx). Once policy allowed the request
//! and the upstream switched protocols, both sides' bytes are relayed
//! unchanged, counted, until either side closes or the tunnel is idle.
//!
//! The relay is a byte relay, not a frame decoder: it is the piece a
//! profile reuses (Kubernetes exec and port-forward ride on it), and what
//! flows through it is not inspected. So it fails closed where inspection
//! is required: a resource whose responses must be masked refuses upgrades
//! unless `[proxy.http] uninspectable = "pass"`; the record says how many
//! bytes went each way and how the tunnel ended.

use std::time::Duration;

use http::{HeaderMap, Method, Version, header};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// What kind of upgrade a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upgrade {
    /// An HTTP/1.1 `GET` with `Upgrade: websocket`: decided as method
    /// `WEBSOCKET`, so a rule allowing `GET` does not open a channel.
    WebSocket,
    /// `CONNECT host:port`.
    Connect,
}

impl Upgrade {
    /// The method policy decides the request as.
    pub fn method(self) -> &'static str {
        match self {
            Upgrade::WebSocket => "WEBSOCKET",
            Upgrade::Connect => "CONNECT",
        }
    }
}

/// The upgrade a request asks for; `Err` for one the handler does not
/// relay (h2c, other protocols, WebSocket over anything but HTTP/1.1).
pub fn requested(
    method: &Method,
    version: Version,
    headers: &HeaderMap,
) -> Result<Option<Upgrade>, &'static str> {
    if method == Method::CONNECT {
        return Ok(Some(Upgrade::Connect));
    }
    let Some(up) = headers.get(header::UPGRADE) else {
        return Ok(None);
    };
    let websocket = up
        .to_str()
        .is_ok_and(|v| v.trim().eq_ignore_ascii_case("websocket"));
    if websocket && method == Method::GET && version == Version::HTTP_11 {
        Ok(Some(Upgrade::WebSocket))
    } else {
        Err("only WebSocket upgrades (HTTP/1.1 GET) and CONNECT are relayed")
    }
}

/// How a relay ended and what it carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Relayed {
    pub to_upstream: u64,
    pub to_client: u64,
    /// `closed` (both sides finished), `idle`, or `error`.
    pub ended: &'static str,
}

/// Relays bytes both ways until both sides have closed, one fails, or
/// nothing moved for `idle`. A side's close is passed on as a write
/// shutdown to the other (half-close), so a client that closes first still
/// gets the rest of the answer.
pub async fn relay<C, U>(client: C, upstream: U, idle: Duration) -> Relayed
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut ur, mut uw) = tokio::io::split(upstream);
    let mut cbuf = vec![0u8; 16 * 1024];
    let mut ubuf = vec![0u8; 16 * 1024];
    let mut out = Relayed {
        to_upstream: 0,
        to_client: 0,
        ended: "closed",
    };
    let (mut client_done, mut upstream_done) = (false, false);
    while !(client_done && upstream_done) {
        tokio::select! {
            r = cr.read(&mut cbuf), if !client_done => match eof_is_close(r) {
                Ok(0) => {
                    client_done = true;
                    let _ = uw.shutdown().await;
                }
                Ok(n) => {
                    if uw.write_all(&cbuf[..n]).await.is_err() {
                        out.ended = "error";
                        break;
                    }
                    out.to_upstream += n as u64;
                }
                Err(_) => {
                    out.ended = "error";
                    break;
                }
            },
            r = ur.read(&mut ubuf), if !upstream_done => match eof_is_close(r) {
                Ok(0) => {
                    upstream_done = true;
                    let _ = cw.shutdown().await;
                }
                Ok(n) => {
                    if cw.write_all(&ubuf[..n]).await.is_err() {
                        out.ended = "error";
                        break;
                    }
                    out.to_client += n as u64;
                }
                Err(_) => {
                    out.ended = "error";
                    break;
                }
            },
            () = tokio::time::sleep(idle) => {
                out.ended = "idle";
                break;
            }
        }
    }
    let _ = cw.shutdown().await;
    let _ = uw.shutdown().await;
    out
}

/// A TLS peer that closes its socket without `close_notify` (common once a
/// WebSocket's own close handshake is done) ends its side like a close.
fn eof_is_close(r: std::io::Result<usize>) -> std::io::Result<usize> {
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(0),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrades_are_recognised_and_others_refused() {
        let mut h = HeaderMap::new();
        assert_eq!(requested(&Method::GET, Version::HTTP_11, &h), Ok(None));
        h.insert(header::UPGRADE, "WebSocket".parse().unwrap());
        assert_eq!(
            requested(&Method::GET, Version::HTTP_11, &h),
            Ok(Some(Upgrade::WebSocket))
        );
        assert!(requested(&Method::POST, Version::HTTP_11, &h).is_err());
        h.insert(header::UPGRADE, "h2c".parse().unwrap());
        assert!(requested(&Method::GET, Version::HTTP_11, &h).is_err());
        assert_eq!(
            requested(&Method::CONNECT, Version::HTTP_11, &HeaderMap::new()),
            Ok(Some(Upgrade::Connect))
        );
    }

    #[tokio::test]
    async fn relay_counts_both_ways_and_passes_half_close_on() {
        let (client, mut agent) = tokio::io::duplex(64);
        let (upstream, mut server) = tokio::io::duplex(64);
        let task = tokio::spawn(relay(client, upstream, Duration::from_secs(5)));
        agent.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        agent.shutdown().await.unwrap();
        // The upstream sees the close and still answers.
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).await.unwrap();
        server.write_all(b"bye!!!").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        agent.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"bye!!!");
        let r = task.await.unwrap();
        assert_eq!(
            r,
            Relayed {
                to_upstream: 5,
                to_client: 6,
                ended: "closed"
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_tunnel_ends() {
        let (client, _agent) = tokio::io::duplex(64);
        let (upstream, _server) = tokio::io::duplex(64);
        let r = relay(client, upstream, Duration::from_secs(30)).await;
        assert_eq!(r.ended, "idle");
    }
}
