//! What a request is, for policy and the record: sans-IO checks and
//! redaction over the request head hyper parsed.
//!
//! hyper (httparse) already refuses bare CR, obs-fold, invalid header names
//! and conflicting `Content-Length` values, and reads `Content-Length` with
//! `Transfer-Encoding: chunked` as RFC 9112 says (chunked wins, the length is
//! dropped, the connection closes after the answer; every request is framed
//! anew toward the upstream, so nothing hidden in a body is ever parsed as a
//! request). This module refuses what hyper lets through but an upstream could
//! read differently (fails closed): both headers where they survive (HTTP/2
//! to HTTP/1.1), a `Transfer-Encoding`
//! other than a final `chunked`, dot segments and encoded slashes or dots in
//! the path (a rule on `/api/*` must not be walked around by `/api/../admin`),
//! a missing or conflicting host. The record keeps the path with query
//! values redacted and the headers with credentials removed.

use http::{HeaderMap, Method, Uri, Version, header};
use serde_json::{Map, Value, json};

/// Headers never recorded by value: credentials and cookies.
const CREDENTIAL_HEADERS: [&str; 8] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "api-key",
    "x-amz-security-token",
    "x-goog-api-key",
];
/// Headers recorded at most (the rest are counted).
pub const MAX_RECORDED_HEADERS: usize = 32;
/// Characters of one recorded header value at most.
pub const MAX_RECORDED_VALUE: usize = 256;

/// Why a request head is refused before policy sees it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub &'static str);

/// The parts of a request head policy and the record use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    /// Lowercase, without port.
    pub host: String,
    /// The path as sent (never decoded), without the query.
    pub path: String,
    pub query: Option<String>,
}

/// Checks a request head and extracts what policy decides on.
pub fn check(
    method: &Method,
    uri: &Uri,
    version: Version,
    headers: &HeaderMap,
) -> Result<Head, Malformed> {
    if headers.contains_key(header::CONTENT_LENGTH)
        && headers.contains_key(header::TRANSFER_ENCODING)
    {
        return Err(Malformed(
            "both Content-Length and Transfer-Encoding (request smuggling)",
        ));
    }
    let te: Vec<_> = headers.get_all(header::TRANSFER_ENCODING).iter().collect();
    if !te.is_empty() {
        let joined = te
            .iter()
            .map(|v| v.to_str().unwrap_or("\u{0}"))
            .collect::<Vec<_>>()
            .join(",");
        let codings: Vec<&str> = joined.split(',').map(str::trim).collect();
        if codings != ["chunked"] {
            return Err(Malformed("Transfer-Encoding other than chunked"));
        }
    }
    let host = host_of(uri, version, headers)?;
    if method == Method::CONNECT {
        // `CONNECT host:port`: policy matches the host; the path is the target.
        let Some(target) = uri.authority().filter(|_| uri.path_and_query().is_none()) else {
            return Err(Malformed("CONNECT takes host:port"));
        };
        return Ok(Head {
            method: method.as_str().to_owned(),
            host,
            path: target.as_str().to_owned(),
            query: None,
        });
    }
    let path = uri.path();
    if !path.starts_with('/') && path != "*" {
        return Err(Malformed("the request target is not a path"));
    }
    if has_dot_segment(path) {
        return Err(Malformed(
            "dot segments or encoded slashes, dots or NULs in the path",
        ));
    }
    Ok(Head {
        method: method.as_str().to_owned(),
        host,
        path: path.to_owned(),
        query: uri.query().map(str::to_owned),
    })
}

fn host_of(uri: &Uri, version: Version, headers: &HeaderMap) -> Result<String, Malformed> {
    let hosts: Vec<_> = headers.get_all(header::HOST).iter().collect();
    if hosts.len() > 1 {
        return Err(Malformed("more than one Host header"));
    }
    let from_header = hosts
        .first()
        .map(|h| h.to_str().map_err(|_| Malformed("Host is not ASCII")))
        .transpose()?;
    let from_uri = uri.authority().map(http::uri::Authority::as_str);
    let authority = match (from_uri, from_header) {
        (Some(a), Some(h)) if !a.eq_ignore_ascii_case(h) => {
            return Err(Malformed("the request target and Host disagree"));
        }
        (Some(a), _) => a,
        (None, Some(h)) => h,
        (None, None) if version == Version::HTTP_10 => "",
        (None, None) => return Err(Malformed("no Host")),
    };
    let host = strip_port(authority);
    if host.contains(['@', '/', ' ', '\\']) {
        return Err(Malformed("Host is not a host name"));
    }
    Ok(host.to_ascii_lowercase())
}

fn strip_port(a: &str) -> &str {
    if let Some(rest) = a.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match a.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => a,
    }
}

fn has_dot_segment(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f")
        || lower.contains("%2e")
        || lower.contains("%5c")
        || lower.contains("%00")
        || path.contains('\\')
    {
        return true;
    }
    path.split('/').any(|seg| seg == "." || seg == "..")
}

/// A read (`GET`, `HEAD`, `OPTIONS`) changes nothing; anything else may.
pub fn changes_state(method: &str) -> bool {
    !matches!(method, "GET" | "HEAD" | "OPTIONS")
}

/// The command class grants and rules name: `read` or `write`.
pub fn class(method: &str) -> &'static str {
    if changes_state(method) {
        "write"
    } else {
        "read"
    }
}

/// The query with every value replaced: `a=…&b=…` (names kept).
pub fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) => format!("{k}=…"),
            None => kv.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// The path as recorded: query values redacted.
pub fn recorded_path(head: &Head) -> String {
    match &head.query {
        Some(q) => format!("{}?{}", head.path, redact_query(q)),
        None => head.path.clone(),
    }
}

fn is_credential(name: &str) -> bool {
    CREDENTIAL_HEADERS.contains(&name)
        || name.contains("token")
        || name.contains("secret")
        || name.contains("password")
        || name.ends_with("-key")
}

/// Headers as recorded: credentials as `[removed]`, values cut, at most
/// [`MAX_RECORDED_HEADERS`] (the number left out is given).
pub fn recorded_headers(headers: &HeaderMap) -> Value {
    let mut out = Map::new();
    let mut left_out = 0usize;
    for (name, value) in headers {
        let n = name.as_str();
        if out.len() >= MAX_RECORDED_HEADERS && !out.contains_key(n) {
            left_out += 1;
            continue;
        }
        let v = if is_credential(n) {
            "[removed]".to_owned()
        } else {
            crate::gate::truncate_chars(
                &String::from_utf8_lossy(value.as_bytes()),
                MAX_RECORDED_VALUE,
            )
        };
        match out.get_mut(n) {
            Some(Value::String(prev)) => {
                prev.push_str(", ");
                prev.push_str(&v);
            }
            _ => {
                out.insert(n.to_owned(), Value::String(v));
            }
        }
    }
    if left_out > 0 {
        out.insert("agentgate-left-out".into(), json!(left_out));
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(method: &str, uri: &str, headers: &[(&str, &str)]) -> Result<Head, Malformed> {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        check(
            &method.parse().unwrap(),
            &uri.parse().unwrap(),
            Version::HTTP_11,
            &h,
        )
    }

    #[test]
    fn smuggling_shapes_are_refused() {
        assert!(
            head(
                "POST",
                "/a",
                &[
                    ("host", "x"),
                    ("content-length", "5"),
                    ("transfer-encoding", "chunked")
                ]
            )
            .is_err()
        );
        assert!(
            head(
                "POST",
                "/a",
                &[("host", "x"), ("transfer-encoding", "gzip, chunked")]
            )
            .is_err()
        );
        assert!(
            head(
                "POST",
                "/a",
                &[("host", "x"), ("transfer-encoding", "chunked")]
            )
            .is_ok()
        );
        assert!(head("GET", "/a", &[("host", "x"), ("host", "y")]).is_err());
        assert!(head("GET", "/a", &[]).is_err(), "HTTP/1.1 needs a Host");
        assert!(head("GET", "http://a.test/x", &[("host", "b.test")]).is_err());
    }

    #[test]
    fn paths_that_a_server_would_read_differently_are_refused() {
        for p in [
            "/api/../admin",
            "/api/./x",
            "/api/%2e%2e/admin",
            "/api%2Fadmin",
            "/a%00b",
        ] {
            assert!(head("GET", p, &[("host", "x")]).is_err(), "{p}");
        }
        let h = head(
            "GET",
            "/api/v1/items?id=7&q=secret",
            &[("host", "API.Test:8443")],
        )
        .unwrap();
        assert_eq!(h.host, "api.test");
        assert_eq!(h.path, "/api/v1/items");
        assert_eq!(recorded_path(&h), "/api/v1/items?id=…&q=…");
    }

    #[test]
    fn credentials_are_never_recorded() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer sk-live-123".parse().unwrap());
        h.insert("x-api-key", "k".parse().unwrap());
        h.insert("x-auth-token", "t".parse().unwrap());
        h.insert("accept", "application/json".parse().unwrap());
        let r = recorded_headers(&h);
        let text = r.to_string();
        assert!(
            !text.contains("sk-live") && !text.contains("\"k\"") && !text.contains("\"t\""),
            "{text}"
        );
        assert_eq!(r["accept"], "application/json");
        assert_eq!(r["authorization"], "[removed]");
    }
}
