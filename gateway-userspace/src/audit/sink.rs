//! Exporting checkpoints off the host: a file (another mount or host) and/or a
//! webhook.
//!
//! Fails open, deliberately: the log itself holds every checkpoint, so a sink
//! that is down must not stop the gateway; each failure is a tracing error and
//! a counter (`AuditStats::sink_failures`). The webhook is a minimal HTTP/1.1
//! POST over a plain TCP connection (`http://` only, no TLS, no redirects):
//! point it at a local relay or collector.

use std::{
    io::Write,
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use super::checkpoint::Checkpoint;

const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_RESPONSE_BYTES: usize = 8192;

/// `host:port` and path of an `http://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HttpUrl {
    pub authority: String,
    pub host_header: String,
    pub path: String,
}

pub(crate) fn parse_http_url(url: &str) -> Result<HttpUrl, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?}: only http:// URLs are supported"))?;
    let (auth, path) = rest
        .find('/')
        .map_or((rest, "/"), |i| (&rest[..i], &rest[i..]));
    if auth.is_empty() || auth.contains('@') || auth.len() > 255 {
        return Err(format!("{url:?}: bad host"));
    }
    if path.len() > 2048
        || path
            .bytes()
            .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(format!("{url:?}: bad path"));
    }
    let authority = if auth
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        && !auth.ends_with(']')
    {
        auth.to_owned()
    } else {
        format!("{auth}:80")
    };
    Ok(HttpUrl {
        authority,
        host_header: auth.to_owned(),
        path: path.to_owned(),
    })
}

/// Appends the checkpoint as one line to `path` and fsyncs it.
pub(crate) fn write_file(path: &Path, cp: &Checkpoint) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(cp).map_err(std::io::Error::other)?;
    line.push(b'\n');
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    f.write_all(&line)?;
    f.sync_data()
}

/// POSTs the checkpoint as JSON; any 2xx status is success.
pub(crate) async fn post(url: &HttpUrl, cp: &Checkpoint) -> Result<(), String> {
    let body = serde_json::to_vec(cp).map_err(|e| e.to_string())?;
    let work = async {
        let mut s = TcpStream::connect(&url.authority)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let head = format!(
            "POST {} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\nUser-Agent: agentgate-audit\r\n\r\n",
            url.path,
            url.host_header,
            body.len()
        );
        s.write_all(head.as_bytes())
            .await
            .map_err(|e| format!("send: {e}"))?;
        s.write_all(&body).await.map_err(|e| format!("send: {e}"))?;
        let mut resp = Vec::with_capacity(256);
        let mut chunk = [0u8; 1024];
        while !resp.windows(2).any(|w| w == b"\r\n") && resp.len() < MAX_RESPONSE_BYTES {
            let n = s
                .read(&mut chunk)
                .await
                .map_err(|e| format!("receive: {e}"))?;
            if n == 0 {
                break;
            }
            resp.extend_from_slice(&chunk[..n]);
        }
        let status_line = resp.split(|b| *b == b'\n').next().unwrap_or_default();
        let status = std::str::from_utf8(status_line)
            .ok()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse::<u16>().ok())
            .ok_or_else(|| "no HTTP status line in the response".to_string())?;
        if (200..300).contains(&status) {
            Ok(())
        } else {
            Err(format!("HTTP status {status}"))
        }
    };
    tokio::time::timeout(WEBHOOK_TIMEOUT, work)
        .await
        .map_err(|_| format!("no answer within {WEBHOOK_TIMEOUT:?}"))?
}

/// Where checkpoints go besides the log.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sinks {
    pub file: Option<PathBuf>,
    pub webhook: Option<HttpUrl>,
}

impl Sinks {
    pub fn is_empty(&self) -> bool {
        self.file.is_none() && self.webhook.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = parse_http_url("http://127.0.0.1:9000/cp").unwrap();
        assert_eq!(u.authority, "127.0.0.1:9000");
        assert_eq!(u.path, "/cp");
        assert_eq!(parse_http_url("http://siem").unwrap().authority, "siem:80");
        assert!(parse_http_url("https://x/").is_err());
        assert!(parse_http_url("http:///x").is_err());
    }
}
