//! The DNS forwarder: the only datagram route out of a tagged cgroup.
//!
//! The kernel rewrites a tagged process's datagrams to a configured resolver
//! (and only those) to this forwarder, one loopback socket per resolver, and
//! shows the resolver as the source of the replies. Each query is checked for
//! a tunnel's shape (one question, a known type, short labels and names),
//! recorded (`dns.query`, durable before the query leaves the host), then
//! sent on from the daemon's own, untagged socket; its answer count and rcode
//! follow in a second record. Refused queries get `REFUSED` and never leave.
//! Trade-off: names are recorded as asked (they are not personal data, and an
//! examiner needs them); a query whose record cannot be written is answered
//! `SERVFAIL`, never forwarded.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use std::fmt::Write as _;

use serde::Serialize;
use serde_json::json;
use tokio::{net::UdpSocket, sync::Semaphore};

use crate::audit::{AuditLog, Kind, NewRecord};

/// Largest DNS message accepted from a client or a resolver (EDNS payloads
/// above this are not offered by common stub resolvers).
pub const MAX_MESSAGE: usize = 4096;

const RCODE_FORMERR: u8 = 1;
const RCODE_SERVFAIL: u8 = 2;
const RCODE_REFUSED: u8 = 5;

/// Query types by mnemonic (the ones a config may name).
const QTYPES: &[(&str, u16)] = &[
    ("A", 1),
    ("NS", 2),
    ("CNAME", 5),
    ("SOA", 6),
    ("NULL", 10),
    ("PTR", 12),
    ("HINFO", 13),
    ("MX", 15),
    ("TXT", 16),
    ("AAAA", 28),
    ("SRV", 33),
    ("NAPTR", 35),
    ("DS", 43),
    ("DNSKEY", 48),
    ("SVCB", 64),
    ("HTTPS", 65),
    ("CAA", 257),
];

/// The numeric code of a query type mnemonic (case-insensitive).
pub fn qtype_code(name: &str) -> Option<u16> {
    QTYPES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|&(_, c)| c)
}

fn qtype_name(code: u16) -> String {
    QTYPES
        .iter()
        .find(|&&(_, c)| c == code)
        .map_or_else(|| format!("TYPE{code}"), |(n, _)| (*n).to_owned())
}

/// What a query may look like.
#[derive(Debug, Clone)]
pub struct QueryShape {
    pub max_label: usize,
    pub max_name: usize,
    pub types: Vec<u16>,
}

impl QueryShape {
    pub fn from_config(c: &crate::config::ContainmentConfig) -> Self {
        Self {
            max_label: c.dns_max_label_bytes,
            max_name: c.dns_max_name_bytes,
            types: c
                .dns_query_types
                .iter()
                .filter_map(|t| qtype_code(t))
                .collect(),
        }
    }
}

/// A parsed query: its id, the question, and where the question ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub id: u16,
    /// Dotted, bytes outside `[A-Za-z0-9_-]` escaped as `\DDD`.
    pub name: String,
    pub qtype: u16,
    question_end: usize,
}

/// Why a query is not forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not a query this forwarder can read: answered FORMERR if it has a header.
    Malformed(&'static str),
    /// Readable, but shaped like a tunnel or of a type not allowed: REFUSED.
    Shape(Query, String),
}

/// Reads a client's message and checks it against `shape`.
pub fn parse_query(msg: &[u8], shape: &QueryShape) -> Result<Query, Refusal> {
    if msg.len() < 12 {
        return Err(Refusal::Malformed("shorter than a DNS header"));
    }
    let id = u16::from_be_bytes([msg[0], msg[1]]);
    let flags = u16::from_be_bytes([msg[2], msg[3]]);
    let count = |i: usize| u16::from_be_bytes([msg[i], msg[i + 1]]);
    if flags & 0x8000 != 0 || (flags >> 11) & 0xf != 0 {
        return Err(Refusal::Malformed("not a standard query"));
    }
    if count(4) != 1 || count(6) != 0 || count(8) != 0 {
        return Err(Refusal::Malformed("a query carries exactly one question"));
    }
    let mut name = String::new();
    let mut labels_too_long = false;
    let mut name_len = 0usize;
    let mut i = 12;
    loop {
        let len = *msg.get(i).ok_or(Refusal::Malformed("question cut short"))? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        if len & 0xc0 != 0 {
            return Err(Refusal::Malformed(
                "compressed or extended label in a question",
            ));
        }
        let label = msg
            .get(i..i + len)
            .ok_or(Refusal::Malformed("question cut short"))?;
        i += len;
        labels_too_long |= len > shape.max_label;
        name_len += len + 1;
        if name_len > 255 {
            return Err(Refusal::Malformed("name longer than 255 bytes"));
        }
        if !name.is_empty() {
            name.push('.');
        }
        for &b in label {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
                name.push(char::from(b));
            } else {
                let _ = write!(name, "\\{b:03}");
            }
        }
    }
    let tail = msg
        .get(i..i + 4)
        .ok_or(Refusal::Malformed("question cut short"))?;
    let qtype = u16::from_be_bytes([tail[0], tail[1]]);
    let query = Query {
        id,
        name,
        qtype,
        question_end: i + 4,
    };
    if labels_too_long {
        let max = shape.max_label;
        return Err(Refusal::Shape(
            query,
            format!("a label is longer than {max} bytes (tunnel-shaped)"),
        ));
    }
    // Presentation length: labels and the dots between them.
    if name_len.saturating_sub(1) > shape.max_name {
        let max = shape.max_name;
        return Err(Refusal::Shape(
            query,
            format!("name longer than {max} bytes (tunnel-shaped)"),
        ));
    }
    if !shape.types.contains(&qtype) {
        let t = qtype_name(qtype);
        return Err(Refusal::Shape(
            query,
            format!("query type {t} is not allowed"),
        ));
    }
    Ok(query)
}

/// An answer with only the header and, if known, the question.
fn error_response(msg: &[u8], question_end: Option<usize>, rcode: u8) -> Vec<u8> {
    let end = question_end.unwrap_or(12).min(msg.len());
    let mut out = msg[..end].to_vec();
    // QR=1, keep opcode and RD, RA=1, rcode.
    out[2] = 0x80 | (msg[2] & 0x79);
    out[3] = 0x80 | (rcode & 0x0f);
    let qd: u16 = u16::from(question_end.is_some());
    out[4..6].copy_from_slice(&qd.to_be_bytes());
    out[6..12].fill(0);
    out
}

/// (answer count, rcode) of a resolver's response to query `id`.
fn response_summary(msg: &[u8], id: u16) -> Option<(u16, u8)> {
    if msg.len() < 12 || u16::from_be_bytes([msg[0], msg[1]]) != id || msg[2] & 0x80 == 0 {
        return None;
    }
    Some((u16::from_be_bytes([msg[6], msg[7]]), msg[3] & 0x0f))
}

/// Who sent a query: the identity and workload the audit record names.
pub struct Attribution {
    pub identity: Option<crate::audit::IdentityRef>,
    pub workload: Option<crate::audit::Workload>,
}

/// Finds who sent a datagram from `client` (a loopback address and port).
pub trait Attribute: Send + Sync + 'static {
    fn attribute(
        &self,
        client: SocketAddr,
    ) -> impl std::future::Future<Output = Attribution> + Send;
}

/// Counters for `status`.
#[derive(Debug, Default, Serialize)]
pub struct DnsStats {
    pub forwarded: AtomicU64,
    pub refused: AtomicU64,
    pub failed: AtomicU64,
}

/// One forwarder: a loopback socket standing for one resolver.
pub struct Forwarder {
    pub resolver: SocketAddr,
    /// Where it listens (what the kernel rewrites datagrams to).
    pub local: SocketAddr,
    pub socket: Arc<UdpSocket>,
}

impl Forwarder {
    /// Binds a forwarder for `resolver` on loopback (same family), any port.
    pub async fn bind(resolver: SocketAddr) -> std::io::Result<Self> {
        let local: SocketAddr = if resolver.is_ipv4() {
            (Ipv4Addr::LOCALHOST, 0).into()
        } else {
            (Ipv6Addr::LOCALHOST, 0).into()
        };
        let socket = UdpSocket::bind(local).await?;
        Ok(Self {
            resolver,
            local: socket.local_addr()?,
            socket: Arc::new(socket),
        })
    }

    /// One forwarder per configured resolver.
    pub async fn bind_all(cfg: &crate::config::ContainmentConfig) -> Result<Vec<Self>, String> {
        let mut out = Vec::new();
        for r in cfg.resolvers()? {
            out.push(
                Self::bind(r)
                    .await
                    .map_err(|e| format!("binding the DNS forwarder for {r}: {e}"))?,
            );
        }
        Ok(out)
    }
}

/// What every forwarder shares.
pub struct DnsContext<A> {
    pub shape: QueryShape,
    pub audit: AuditLog,
    pub attribute: A,
    pub in_flight: Arc<Semaphore>,
    pub timeout: Duration,
    pub stats: DnsStats,
    pub seq: AtomicU64,
}

impl<A: Attribute> DnsContext<A> {
    pub fn new(cfg: &crate::config::ContainmentConfig, audit: AuditLog, attribute: A) -> Self {
        Self {
            shape: QueryShape::from_config(cfg),
            audit,
            attribute,
            in_flight: Arc::new(Semaphore::new(cfg.dns_max_in_flight)),
            timeout: Duration::from_millis(cfg.dns_timeout_ms),
            stats: DnsStats::default(),
            seq: AtomicU64::new(0),
        }
    }
}

/// Serves one forwarder until `shutdown`.
pub async fn serve<A: Attribute>(
    fwd: Forwarder,
    ctx: Arc<DnsContext<A>>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let (n, client) = tokio::select! {
            r = fwd.socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "dns forwarder receive failed");
                    continue;
                }
            },
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let msg = buf[..n].to_vec();
        let Ok(permit) = ctx.in_flight.clone().try_acquire_owned() else {
            ctx.stats.refused.fetch_add(1, Ordering::Relaxed);
            if msg.len() >= 12 {
                let _ = fwd
                    .socket
                    .send_to(&error_response(&msg, None, RCODE_REFUSED), client)
                    .await;
            }
            continue;
        };
        let ctx = ctx.clone();
        let socket = fwd.socket.clone();
        let resolver = fwd.resolver;
        tokio::spawn(async move {
            let reply = handle(&ctx, resolver, client, &msg).await;
            drop(permit);
            if let Some(reply) = reply {
                let _ = socket.send_to(&reply, client).await;
            }
        });
    }
}

/// Decides, records and (if allowed) forwards one query; returns the reply.
async fn handle<A: Attribute>(
    ctx: &DnsContext<A>,
    resolver: SocketAddr,
    client: SocketAddr,
    msg: &[u8],
) -> Option<Vec<u8>> {
    let who = ctx.attribute.attribute(client).await;
    let id = format!("dns-{}", ctx.seq.fetch_add(1, Ordering::Relaxed));
    let record = |action: serde_json::Value| {
        let mut r = NewRecord::new(Kind::DnsQuery)
            .resource(format!("dns:{resolver}"))
            .action(action);
        if let Some(i) = &who.identity {
            r = r.identity(i.clone());
        }
        if let Some(w) = &who.workload {
            r = r.workload(w.clone());
        }
        r
    };
    let (query, refusal) = match parse_query(msg, &ctx.shape) {
        Ok(q) => (q, None),
        Err(Refusal::Shape(q, reason)) => (q, Some(reason)),
        Err(Refusal::Malformed(reason)) => {
            ctx.stats.refused.fetch_add(1, Ordering::Relaxed);
            let rec = record(json!({ "query": id }))
                .decision(json!({ "verdict": "deny", "reason": reason }));
            let _ = ctx.audit.append(rec).await;
            return (msg.len() >= 12).then(|| error_response(msg, None, RCODE_FORMERR));
        }
    };
    let action = json!({
        "query": id,
        "name": query.name,
        "type": qtype_name(query.qtype),
    });
    let verdict = match &refusal {
        None => json!({ "verdict": "allow" }),
        Some(reason) => json!({ "verdict": "deny", "reason": reason }),
    };
    // Durable before anything leaves: a tunnel's payload is the question.
    let written = ctx.audit.append(record(action).decision(verdict)).await;
    if let Some(reason) = refusal {
        tracing::info!(event = "dns.refused", name = %query.name, %reason);
        ctx.stats.refused.fetch_add(1, Ordering::Relaxed);
        return Some(error_response(msg, Some(query.question_end), RCODE_REFUSED));
    }
    if let Err(e) = written {
        tracing::error!(event = "log.failure", error = %e, "cannot record a DNS query; answering SERVFAIL");
        ctx.stats.failed.fetch_add(1, Ordering::Relaxed);
        return Some(error_response(
            msg,
            Some(query.question_end),
            RCODE_SERVFAIL,
        ));
    }
    let answer = match forward(resolver, msg, query.id, ctx.timeout).await {
        Ok(a) => a,
        Err(e) => {
            ctx.stats.failed.fetch_add(1, Ordering::Relaxed);
            let rec = record(json!({ "query": id })).result(json!({ "error": e.to_string() }));
            let _ = ctx.audit.append_detached(rec);
            return Some(error_response(
                msg,
                Some(query.question_end),
                RCODE_SERVFAIL,
            ));
        }
    };
    ctx.stats.forwarded.fetch_add(1, Ordering::Relaxed);
    let (answers, rcode) = response_summary(&answer, query.id).unwrap_or((0, RCODE_SERVFAIL));
    let rec = record(json!({ "query": id })).result(json!({ "answers": answers, "rcode": rcode }));
    let _ = ctx.audit.append_detached(rec);
    Some(answer)
}

/// Sends a query to the resolver from a fresh socket and waits for the
/// response with the same id.
async fn forward(
    resolver: SocketAddr,
    msg: &[u8],
    id: u16,
    timeout: Duration,
) -> std::io::Result<Vec<u8>> {
    let local: SocketAddr = match resolver.ip() {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(local).await?;
    sock.connect(resolver).await?;
    sock.send(msg).await?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let n = tokio::time::timeout_at(deadline, sock.recv(&mut buf))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "resolver did not answer")
            })??;
        if response_summary(&buf[..n], id).is_some() {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> QueryShape {
        QueryShape::from_config(&crate::config::ContainmentConfig::default())
    }

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut m = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.').filter(|l| !l.is_empty()) {
            m.push(label.len() as u8);
            m.extend_from_slice(label.as_bytes());
        }
        m.push(0);
        m.extend_from_slice(&qtype.to_be_bytes());
        m.extend_from_slice(&1u16.to_be_bytes());
        m
    }

    #[test]
    fn ordinary_query_passes() {
        let q = parse_query(&query("db.internal.example", 1), &shape()).unwrap();
        assert_eq!(q.id, 0x1234);
        assert_eq!(q.name, "db.internal.example");
        assert_eq!(q.qtype, 1);
    }

    #[test]
    fn tunnel_shapes_are_refused() {
        let long_label = format!("{}.t.example", "a".repeat(41));
        assert!(matches!(
            parse_query(&query(&long_label, 16), &shape()),
            Err(Refusal::Shape(_, r)) if r.contains("label")
        ));
        let long_name = (0..12)
            .map(|_| "abcdefghijklmn")
            .collect::<Vec<_>>()
            .join(".");
        assert!(matches!(
            parse_query(&query(&long_name, 1), &shape()),
            Err(Refusal::Shape(_, r)) if r.contains("name longer")
        ));
        assert!(matches!(
            parse_query(&query("x.example", 10), &shape()),
            Err(Refusal::Shape(_, r)) if r.contains("NULL")
        ));
    }

    #[test]
    fn malformed_messages_are_refused() {
        assert!(matches!(
            parse_query(&[0; 5], &shape()),
            Err(Refusal::Malformed(_))
        ));
        let mut two = query("a.example", 1);
        two[5] = 2;
        assert!(matches!(
            parse_query(&two, &shape()),
            Err(Refusal::Malformed(_))
        ));
        let mut response = query("a.example", 1);
        response[2] |= 0x80;
        assert!(matches!(
            parse_query(&response, &shape()),
            Err(Refusal::Malformed(_))
        ));
        let mut cut = query("a.example", 1);
        cut.truncate(cut.len() - 3);
        assert!(matches!(
            parse_query(&cut, &shape()),
            Err(Refusal::Malformed(_))
        ));
        let mut pointer = query("a.example", 1);
        pointer[12] = 0xc0;
        assert!(matches!(
            parse_query(&pointer, &shape()),
            Err(Refusal::Malformed(_))
        ));
    }

    #[test]
    fn refused_answer_echoes_the_question() {
        let m = query("x.example", 10);
        let Err(Refusal::Shape(q, _)) = parse_query(&m, &shape()) else {
            panic!("refused")
        };
        let r = error_response(&m, Some(q.question_end), RCODE_REFUSED);
        assert_eq!(&r[..2], &m[..2], "same id");
        assert_eq!(r[2] & 0x80, 0x80, "a response");
        assert_eq!(r[3] & 0x0f, RCODE_REFUSED);
        assert_eq!(&r[12..], &m[12..], "the question");
        assert_eq!(response_summary(&r, 0x1234), Some((0, RCODE_REFUSED)));
    }

    #[test]
    fn odd_bytes_in_names_are_escaped() {
        let mut m = query("ab.example", 1);
        m[14] = b' ';
        assert_eq!(parse_query(&m, &shape()).unwrap().name, "a\\032.example");
    }
}
