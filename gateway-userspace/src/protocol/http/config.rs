//! `[proxy.http]`: the HTTP handler's config section, parsed here (not in
//! `config.rs`). A bad value refuses to start, naming the file and line.

use std::time::Duration;

use serde::Deserialize;

/// `[proxy.http]`: what an HTTP client or server may send, how long it may
/// take, and what happens to a body the handler cannot inspect.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Largest request head (HTTP/1.1 buffer; HTTP/2 header list).
    pub max_header_bytes: usize,
    /// Most header fields in one HTTP/1.1 request.
    pub max_headers: usize,
    /// Largest body inspected (request bodies are read whole up to this,
    /// for their hash and prompt DLP; larger ones are refused with 413).
    pub max_inspect_bytes: usize,
    /// From accept (or the last response) to a complete request head; also
    /// the TLS handshake's limit. Slow senders (slowloris) are cut here.
    pub header_timeout_secs: u64,
    /// From forwarding a request to the upstream's response head (and for
    /// reading a request body).
    pub request_timeout_secs: u64,
    /// An idle keep-alive connection (upstream pool, HTTP/2 pings) ends after this.
    pub idle_timeout_secs: u64,
    /// Concurrent HTTP/2 streams per agent connection.
    pub max_streams: u32,
    /// A response that must be masked but cannot be read (binary, an
    /// encoding other than gzip, deflate, br or zstd, over `max_inspect_bytes`):
    /// `"refuse"` answers 502, `"pass"` lets it through. Recorded either way.
    pub uninspectable: Uninspectable,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Uninspectable {
    Refuse,
    Pass,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            max_inspect_bytes: 8 * 1024 * 1024,
            header_timeout_secs: 10,
            request_timeout_secs: 300,
            idle_timeout_secs: 60,
            max_streams: 100,
            uninspectable: Uninspectable::Refuse,
        }
    }
}

impl HttpConfig {
    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs(self.header_timeout_secs)
    }
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_secs)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(1024..=1024 * 1024).contains(&self.max_header_bytes) {
            return Err("max_header_bytes must be between 1024 and 1048576".into());
        }
        if !(8..=1000).contains(&self.max_headers) {
            return Err("max_headers must be between 8 and 1000".into());
        }
        if !(1024..=256 * 1024 * 1024).contains(&self.max_inspect_bytes) {
            return Err("max_inspect_bytes must be between 1024 and 268435456".into());
        }
        if self.header_timeout_secs == 0
            || self.request_timeout_secs == 0
            || self.idle_timeout_secs == 0
        {
            return Err("header_timeout_secs, request_timeout_secs and idle_timeout_secs must be at least 1".into());
        }
        if !(1..=1000).contains(&self.max_streams) {
            return Err("max_streams must be between 1 and 1000".into());
        }
        Ok(())
    }
}

/// The section in a whole config text, checked (errors carry line and column).
pub(super) fn check(text: &str) -> Result<(), String> {
    let Some(c) = super::super::section::<HttpConfig>(text, "http")
        .map_err(|e| e.to_string().trim_end().to_owned())?
    else {
        return Ok(());
    };
    c.validate().map_err(|e| {
        let line = text
            .lines()
            .position(|l| l.trim_start().starts_with("[proxy.http]"))
            .map_or_else(String::new, |n| format!("line {}: ", n + 1));
        format!("{line}[proxy.http] {e}")
    })
}
