//! The handler against a scripted server (no `MySQL` 8 is installable here,
//! so `caching_sha2_password` fast and full authentication are exercised
//! this way; `MariaDB` itself is in the end-to-end tests) and hostile clients.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::BytesMut;
use mysql_common::{
    constants::{CapabilityFlags, ColumnType, StatusFlags},
    packets::{Column, HandshakePacket, HandshakeResponse},
    proto::MySerialize as _,
};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

use super::{
    codec::{Framer, Limits},
    proxy::{MyContext, MySettings, serve},
};
use crate::{
    approval::Broker,
    audit::NewRecord,
    connection::LiveConnection,
    gate::{AuditSink, AuditUnavailable},
    policy::{PolicyStore, Subject, load_str},
};

const POLICY: &str = r#"
[[resource]]
name = "db"
protocol = "mysql"
addresses = ["127.0.0.1:3306"]
default_action = "deny"
[[rule]]
name = "reads"
identities = ["agent"]
resources = ["db"]
action = "allow"
match = { sql = ["read", "transaction"] }
[[rule]]
name = "no-ddl"
identities = ["agent"]
resources = ["db"]
action = "deny"
match = { sql = ["ddl", "admin", "dcl", "unknown"] }
"#;

/// The cleartext password a client sends on `caching_sha2_password` full
/// authentication (test-only).
const PASSWORD: &[u8] = b"sha2-full-auth-test-password";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Auth {
    /// `mysql_native_password`: the server says OK at once.
    Native,
    /// `caching_sha2_password`, cached: `0x01 0x03`, then OK.
    Sha2Fast,
    /// `caching_sha2_password`, full: `0x01 0x04`, the client's cleartext
    /// password, then OK.
    Sha2Full,
}

fn server_caps() -> CapabilityFlags {
    CapabilityFlags::CLIENT_PROTOCOL_41
        | CapabilityFlags::CLIENT_SECURE_CONNECTION
        | CapabilityFlags::CLIENT_PLUGIN_AUTH
        | CapabilityFlags::CLIENT_LONG_PASSWORD
        | CapabilityFlags::CLIENT_TRANSACTIONS
        | CapabilityFlags::CLIENT_MULTI_STATEMENTS
        | CapabilityFlags::CLIENT_MULTI_RESULTS
        | CapabilityFlags::CLIENT_DEPRECATE_EOF
        | CapabilityFlags::CLIENT_COMPRESS
        | CapabilityFlags::CLIENT_SSL
        | CapabilityFlags::CLIENT_CONNECT_WITH_DB
}

const OK: &[u8] = &[0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00];

/// A scripted server: greets, authenticates per `auth`, answers `SELECT`s
/// with one row (`t.x` = the text after `SELECT `) and anything else with
/// OK. Records every packet it receives after the greeting.
async fn fake_server(listener: TcpListener, auth: Auth, seen: Arc<Mutex<Vec<Vec<u8>>>>) {
    let (mut s, _) = listener.accept().await.unwrap();
    let mut f = Framer::new(1 << 24);
    let mut inb = BytesMut::new();
    let plugin: &[u8] = if auth == Auth::Native {
        b"mysql_native_password"
    } else {
        b"caching_sha2_password"
    };
    let mut greeting = Vec::new();
    HandshakePacket::new(
        10,
        &b"10.11.6-MariaDB-fake"[..],
        42,
        [1; 8],
        Some(&[2u8; 12][..]),
        server_caps(),
        45,
        StatusFlags::SERVER_STATUS_AUTOCOMMIT,
        Some(plugin),
    )
    .serialize(&mut greeting);
    let mut out = BytesMut::new();
    f.encode(&greeting, &mut out).unwrap();
    s.write_all(&out).await.unwrap();
    let read = async |f: &mut Framer, s: &mut TcpStream, inb: &mut BytesMut| loop {
        if let Some(p) = f.decode(inb).unwrap() {
            return Some(p.to_vec());
        }
        if s.read_buf(inb).await.unwrap() == 0 {
            return None;
        }
    };
    let Some(hello) = read(&mut f, &mut s, &mut inb).await else {
        return;
    };
    seen.lock().unwrap().push(hello.clone());
    let deprecate = u32::from_le_bytes([hello[0], hello[1], hello[2], hello[3]])
        & CapabilityFlags::CLIENT_DEPRECATE_EOF.bits()
        != 0;
    let send = |f: &mut Framer, p: &[u8], out: &mut BytesMut| f.encode(p, out).unwrap();
    let mut out = BytesMut::new();
    match auth {
        Auth::Native => {}
        Auth::Sha2Fast => send(&mut f, &[0x01, 0x03], &mut out),
        Auth::Sha2Full => {
            send(&mut f, &[0x01, 0x04], &mut out);
            s.write_all(&out).await.unwrap();
            out.clear();
            let pw = read(&mut f, &mut s, &mut inb).await.unwrap();
            assert_eq!(&pw[..pw.len() - 1], PASSWORD);
        }
    }
    send(&mut f, OK, &mut out);
    s.write_all(&out).await.unwrap();
    loop {
        f.reset();
        let Some(cmd) = read(&mut f, &mut s, &mut inb).await else {
            return;
        };
        seen.lock().unwrap().push(cmd.clone());
        let mut out = BytesMut::new();
        match cmd[0] {
            0x01 => return,
            0x03 if cmd[1..].starts_with(b"SELECT ") => {
                send(&mut f, &[1], &mut out);
                let mut col = Vec::new();
                Column::new(ColumnType::MYSQL_TYPE_VAR_STRING)
                    .with_schema(b"db")
                    .with_table(b"t")
                    .with_org_table(b"t")
                    .with_name(b"x")
                    .with_org_name(b"x")
                    .with_character_set(45)
                    .serialize(&mut col);
                send(&mut f, &col, &mut out);
                if !deprecate {
                    send(&mut f, &[0xFE, 0, 0, 2, 0], &mut out);
                }
                let v = &cmd[8..];
                let mut row = vec![v.len() as u8];
                row.extend_from_slice(v);
                send(&mut f, &row, &mut out);
                if deprecate {
                    send(&mut f, &[0xFE, 0, 0, 2, 0, 0, 0], &mut out);
                } else {
                    send(&mut f, &[0xFE, 0, 0, 2, 0], &mut out);
                }
            }
            _ => send(&mut f, OK, &mut out),
        }
        s.write_all(&out).await.unwrap();
    }
}

/// Takes every record at once (or fails those `fail` picks), keeping them.
struct Sink {
    records: Arc<Mutex<Vec<String>>>,
    fail: fn(&NewRecord) -> bool,
}

impl AuditSink for Sink {
    fn append(
        &self,
        r: NewRecord,
    ) -> Pin<Box<dyn Future<Output = Result<(), AuditUnavailable>> + Send + '_>> {
        let fail = (self.fail)(&r);
        self.records
            .lock()
            .unwrap()
            .push(serde_json::to_string(&r.action).unwrap());
        Box::pin(async move {
            if fail {
                Err(AuditUnavailable {
                    reason: "disk full".into(),
                })
            } else {
                Ok(())
            }
        })
    }

    fn append_detached(&self, r: NewRecord) {
        self.records
            .lock()
            .unwrap()
            .push(serde_json::to_string(&r.action).unwrap());
    }
}

fn ctx(dest: SocketAddr, audit: Arc<dyn AuditSink>) -> MyContext {
    let set = load_str(&[("p.toml", POLICY)]).unwrap();
    let resource = set.resource("db").unwrap().clone();
    let policy = Arc::new(PolicyStore::from_set(
        std::path::Path::new("/nonexistent"),
        set,
        None,
    ));
    let conn = Arc::new(LiveConnection::for_test(dest, "db"));
    MyContext {
        conn,
        subject: Subject {
            identity: "agent".into(),
            groups: vec![],
        },
        resource,
        policy,
        approvals: Broker::new(
            Arc::new(crate::approval::testing::Accepting),
            crate::approval::Settings::default(),
        ),
        audit,
        correlation_key: [7; 32],
        sql_cache: Arc::default(),
        probes: Arc::default(),
        settings: MySettings {
            limits: Limits {
                max_packet: 1 << 20,
                ..Limits::default()
            },
            ..MySettings::default()
        },
    }
}

struct Harness {
    c: TcpStream,
    f: Framer,
    inb: BytesMut,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
    records: Arc<Mutex<Vec<String>>>,
    /// The capabilities of the greeting the client saw.
    offered: CapabilityFlags,
}

impl Harness {
    async fn start(auth: Auth, fail: fn(&NewRecord) -> bool) -> Self {
        let upstream = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let records = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::new(Sink {
            records: records.clone(),
            fail,
        });
        let ctx = ctx(upstream.local_addr().unwrap(), sink);
        tokio::spawn(fake_server(upstream, auth, seen.clone()));
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = front.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = front.accept().await.unwrap();
            let _ = serve(s, ctx).await;
        });
        let c = TcpStream::connect(addr).await.unwrap();
        let mut h = Harness {
            c,
            f: Framer::new(1 << 24),
            inb: BytesMut::new(),
            seen,
            records,
            offered: CapabilityFlags::empty(),
        };
        let g = h.read().await.expect("a greeting");
        let p: HandshakePacket<'_> = mysql_common::io::ParseBuf(&g).parse(()).unwrap();
        assert_eq!(&*p.server_version_str(), "10.11.6-MariaDB-fake");
        h.offered = p.capabilities();
        h
    }

    async fn read(&mut self) -> Option<Vec<u8>> {
        loop {
            match self.f.decode(&mut self.inb) {
                Ok(Some(p)) => return Some(p.to_vec()),
                Ok(None) => {}
                Err(_) => return None,
            }
            let r = tokio::time::timeout(Duration::from_secs(5), self.c.read_buf(&mut self.inb))
                .await
                .expect("an answer in time");
            if r.unwrap_or(0) == 0 {
                return None;
            }
        }
    }

    async fn send(&mut self, payload: &[u8]) {
        let mut out = BytesMut::new();
        self.f.encode(payload, &mut out).unwrap();
        self.c.write_all(&out).await.unwrap();
    }

    fn hello(caps: CapabilityFlags) -> Vec<u8> {
        let mut b = Vec::new();
        HandshakeResponse::new(
            Some(&[9u8; 20][..]),
            (10, 11, 6),
            Some(&b"app"[..]),
            Some(&b"db"[..]),
            None,
            caps,
            None,
            1 << 24,
        )
        .serialize(&mut b);
        b
    }

    fn client_caps(&self) -> CapabilityFlags {
        self.offered
            & (CapabilityFlags::CLIENT_PROTOCOL_41
                | CapabilityFlags::CLIENT_SECURE_CONNECTION
                | CapabilityFlags::CLIENT_LONG_PASSWORD
                | CapabilityFlags::CLIENT_TRANSACTIONS
                | CapabilityFlags::CLIENT_MULTI_STATEMENTS
                | CapabilityFlags::CLIENT_MULTI_RESULTS
                | CapabilityFlags::CLIENT_DEPRECATE_EOF)
    }

    /// Logs in; returns the server's final authentication packet.
    async fn login(&mut self) -> Vec<u8> {
        let hello = Self::hello(self.client_caps());
        self.send(&hello).await;
        self.read().await.expect("an answer to the login")
    }

    async fn query(&mut self, sql: &str) -> Vec<Vec<u8>> {
        self.f.reset();
        let mut p = vec![0x03];
        p.extend_from_slice(sql.as_bytes());
        self.send(&p).await;
        let mut out = Vec::new();
        loop {
            let Some(p) = self.read().await else { break };
            let end = p[0] == 0xFF || p[0] == 0x00 && out.is_empty() || p[0] == 0xFE;
            out.push(p);
            if end {
                break;
            }
        }
        out
    }

    /// Packets the server received after the login.
    fn commands(&self) -> Vec<Vec<u8>> {
        self.seen.lock().unwrap().iter().skip(1).cloned().collect()
    }
}

fn accept_all(_: &NewRecord) -> bool {
    false
}

#[tokio::test]
async fn the_greeting_is_the_servers_with_compression_and_tls_removed() {
    let h = Harness::start(Auth::Native, accept_all).await;
    assert!(!h.offered.contains(CapabilityFlags::CLIENT_COMPRESS));
    assert!(!h.offered.contains(CapabilityFlags::CLIENT_SSL));
    assert!(h.offered.contains(CapabilityFlags::CLIENT_DEPRECATE_EOF));
    assert!(h.offered.contains(CapabilityFlags::CLIENT_MULTI_STATEMENTS));
}

#[tokio::test]
async fn caching_sha2_fast_and_full_authentication_are_relayed_and_the_password_never_recorded() {
    let mut h = Harness::start(Auth::Sha2Fast, accept_all).await;
    assert_eq!(h.login().await, [0x01, 0x03]);
    assert_eq!(h.read().await.unwrap()[0], 0x00, "OK after fast auth");
    let rows = h.query("SELECT fast").await;
    assert_eq!(rows[2], b"\x04fast");

    let mut h = Harness::start(Auth::Sha2Full, accept_all).await;
    assert_eq!(h.login().await, [0x01, 0x04]);
    let mut pw = PASSWORD.to_vec();
    pw.push(0);
    h.send(&pw).await;
    assert_eq!(h.read().await.unwrap()[0], 0x00, "OK after full auth");
    let rows = h.query("SELECT full").await;
    assert_eq!(rows[2], b"\x04full");
    let records = h.records.lock().unwrap().join("\n");
    assert!(records.contains("session.start") || records.contains("\"protocol\":\"mysql\""));
    assert!(
        !records.contains(std::str::from_utf8(PASSWORD).unwrap()),
        "{records}"
    );
}

#[tokio::test]
async fn a_denied_statement_gets_1142_never_reaches_the_server_and_the_session_goes_on() {
    let mut h = Harness::start(Auth::Native, accept_all).await;
    assert_eq!(h.login().await[0], 0x00);
    let r = h.query("DROP TABLE t").await;
    assert_eq!(r.len(), 1);
    assert_eq!(&r[0][..3], &[0xFF, 0x76, 0x04], "ERR 1142");
    let text = String::from_utf8_lossy(&r[0]);
    assert!(text.contains("#42000"), "{text}");
    assert!(text.contains("no-ddl"), "{text}");
    // One denied statement among several: none of them runs.
    let r = h.query("SELECT 1; DROP TABLE t").await;
    assert_eq!(r[0][0], 0xFF);
    // Executable comments are code.
    let r = h.query("SELECT 1 /*!50000 ; DROP TABLE t */").await;
    assert_eq!(r[0][0], 0xFF);
    let r = h.query("SELECT after").await;
    assert_eq!(r[2], b"\x05after");
    let cmds = h.commands();
    assert_eq!(cmds.len(), 1, "only the last SELECT reached the server");
    assert_eq!(cmds[0], b"\x03SELECT after");
}

#[tokio::test]
async fn a_read_whose_record_fails_never_shows_its_result() {
    fn fail_reads(r: &NewRecord) -> bool {
        r.action.as_ref().is_some_and(|a| a["class"] == "read")
    }
    let mut h = Harness::start(Auth::Native, fail_reads).await;
    assert_eq!(h.login().await[0], 0x00);
    // Allowed, sent while its record is written; the record fails, so the
    // row is withheld and the connection ends.
    let r = h.query("SELECT secret").await;
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0][0], 0xFF);
    assert!(String::from_utf8_lossy(&r[0]).contains("audit log unavailable"));
    assert!(h.read().await.is_none(), "closed");
}

#[tokio::test]
async fn replication_and_cursor_commands_are_refused() {
    let mut h = Harness::start(Auth::Native, accept_all).await;
    assert_eq!(h.login().await[0], 0x00);
    for cmd in [
        &[0x12u8, 4, 0, 0, 0, 0, 0, 1, 0, 0, 0][..],
        &[0x1C, 1, 0, 0, 0, 1, 0, 0, 0],
    ] {
        h.f.reset();
        h.send(cmd).await;
        let r = h.read().await.unwrap();
        assert_eq!(&r[..3], &[0xFF, 0x76, 0x04]);
    }
    assert!(h.commands().is_empty());
    let r = h.query("SELECT still").await;
    assert_eq!(r[2], b"\x05still");
}

// ---------------------------------------------------------------------------
// Hostile input: an ERR or a close, no panic, nothing reaches the server.

async fn hostile(bytes: &[u8]) -> (Option<Vec<u8>>, Vec<Vec<u8>>) {
    let mut h = Harness::start(Auth::Native, accept_all).await;
    h.c.write_all(bytes).await.unwrap();
    let answer = h.read().await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let seen = h.seen.lock().unwrap().clone();
    (answer, seen)
}

#[tokio::test]
async fn garbage_before_the_handshake_is_refused_and_never_forwarded() {
    // An HTTP request where the handshake response should be.
    let (a, seen) = hostile(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(a.is_none_or(|p| p[0] == 0xFF));
    assert!(seen.is_empty());
}

#[tokio::test]
async fn a_wrong_sequence_id_is_refused() {
    let h = Harness::start(Auth::Native, accept_all).await;
    let hello = Harness::hello(h.client_caps());
    drop(h);
    let mut bad = vec![hello.len() as u8, 0, 0, 7];
    bad.extend_from_slice(&hello);
    let (a, seen) = hostile(&bad).await;
    assert!(a.is_none_or(|p| p[0] == 0xFF));
    assert!(seen.is_empty());
}

#[tokio::test]
async fn an_oversized_packet_is_refused() {
    // A handshake response claiming 16 MiB - 1 (over the 64 KiB login limit).
    let (a, seen) = hostile(&[0xFF, 0xFF, 0xFF, 1, 0, 0]).await;
    assert!(a.is_none_or(|p| p[0] == 0xFF));
    assert!(seen.is_empty());
}

#[tokio::test]
async fn a_client_that_claims_capabilities_it_was_not_offered_is_refused() {
    let mut h = Harness::start(Auth::Native, accept_all).await;
    let hello = Harness::hello(h.client_caps() | CapabilityFlags::CLIENT_COMPRESS);
    h.send(&hello).await;
    let a = h.read().await.unwrap();
    assert_eq!(a[0], 0xFF);
    assert!(String::from_utf8_lossy(&a).contains("not offered"));
    // An SSLRequest: told which setting is missing.
    let mut h = Harness::start(Auth::Native, accept_all).await;
    let caps = h.client_caps() | CapabilityFlags::CLIENT_SSL;
    let mut req = caps.bits().to_le_bytes().to_vec();
    req.extend_from_slice(&[0; 28]);
    h.send(&req).await;
    let a = h.read().await.unwrap();
    assert!(String::from_utf8_lossy(&a).contains("no local CA"));
    assert!(h.seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn oversized_and_truncated_commands_end_the_session_unforwarded() {
    let mut h = Harness::start(Auth::Native, accept_all).await;
    assert_eq!(h.login().await[0], 0x00);
    // A COM_STMT_EXECUTE too short to hold its fixed fields.
    h.f.reset();
    h.send(&[0x17, 1, 0]).await;
    let a = h.read().await.unwrap();
    assert_eq!(a[0], 0xFF);
    assert!(h.commands().is_empty());
    // Over the 1 MiB packet limit of this harness.
    let mut h = Harness::start(Auth::Native, accept_all).await;
    assert_eq!(h.login().await[0], 0x00);
    h.f.reset();
    let mut big = vec![0x03];
    big.extend(std::iter::repeat_n(b'x', (1 << 20) + 10));
    let mut out = BytesMut::new();
    h.f.encode(&big, &mut out).unwrap();
    let _ = h.c.write_all(&out).await;
    let a = h.read().await;
    assert!(a.is_none_or(|p| p[0] == 0xFF));
    assert!(h.commands().is_empty());
}
