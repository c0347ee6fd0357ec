//! Replays wire bytes captured from a real Postgres 15 server and `libpq` 18
//! (tests/fixtures/pg, see its README) through the codec, the session state and
//! the masker, as the proxy would see them.

use std::collections::HashMap;
use std::path::PathBuf;

use agentgate::protocol::postgres::codec::{
    Authentication, BackendMessage, FrontendMessage, Limits, StartupPacket, TxStatus,
    decode_backend, decode_frontend, decode_startup,
};
use agentgate::protocol::postgres::mask::{
    CopyKind, CopyPlan, MaskReport, MaskResult, RowMasker, RowPlan, Scratch, Unmaskable,
};
use agentgate::protocol::postgres::session::{
    BackendAction, DENIED_SQL, Disposition, Session, denial_error,
};
use agentgate::protocol::postgres::strip_channel_binding;
use bytes::{Bytes, BytesMut};

#[derive(Debug, Clone)]
enum Event {
    Startup(StartupPacket),
    /// One-byte answer to `SSLRequest` / `GSSENCRequest`.
    EncryptionAnswer(u8),
    Front(FrontendMessage),
    Back(BackendMessage),
}

#[derive(Default)]
struct Conn {
    client: BytesMut,
    server: BytesMut,
    started: bool,
    expect_answer: bool,
    events: Vec<Event>,
    /// Raw message-mode bytes per direction, for truncation tests.
    client_stream: Vec<u8>,
    server_stream: Vec<u8>,
    startup_packets: Vec<Vec<u8>>,
}

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pg")
}

fn load(name: &str) -> Vec<(u8, u8, Vec<u8>)> {
    let data = std::fs::read(fixture_dir().join(format!("{name}.pgcap"))).expect("fixture");
    let mut out = Vec::new();
    let mut i = 0;
    while i < data.len() {
        let dir = data[i];
        let conn = data[i + 1];
        let len = u32::from_be_bytes(data[i + 2..i + 6].try_into().unwrap()) as usize;
        out.push((dir, conn, data[i + 6..i + 6 + len].to_vec()));
        i += 6 + len;
    }
    out
}

/// Decode a fixture chunk by chunk; every message must re-encode to exactly the
/// bytes it was decoded from.
fn replay(name: &str) -> Vec<Conn> {
    let limits = Limits::default();
    let mut conns: Vec<Conn> = Vec::new();
    for (dir, conn, chunk) in load(name) {
        let conn = usize::from(conn);
        while conns.len() <= conn {
            conns.push(Conn::default());
        }
        let c = &mut conns[conn];
        if dir == b'F' {
            c.client.extend_from_slice(&chunk);
            loop {
                let before = c.client.clone();
                if c.started {
                    let Some(msg) = decode_frontend(&mut c.client, &limits)
                        .unwrap_or_else(|e| panic!("{name}: {e}"))
                    else {
                        break;
                    };
                    let raw = &before[..before.len() - c.client.len()];
                    let mut enc = BytesMut::new();
                    msg.encode(&mut enc);
                    assert_eq!(&enc[..], raw, "{name}: frontend {msg:?} re-encodes");
                    c.client_stream.extend_from_slice(raw);
                    c.events.push(Event::Front(msg));
                } else {
                    let Some(p) = decode_startup(&mut c.client, &limits)
                        .unwrap_or_else(|e| panic!("{name}: {e}"))
                    else {
                        break;
                    };
                    let raw = &before[..before.len() - c.client.len()];
                    let mut enc = BytesMut::new();
                    p.encode(&mut enc);
                    assert_eq!(&enc[..], raw, "{name}: startup {p:?} re-encodes");
                    c.startup_packets.push(raw.to_vec());
                    match p {
                        StartupPacket::SslRequest | StartupPacket::GssEncRequest => {
                            c.expect_answer = true;
                        }
                        _ => c.started = true,
                    }
                    c.events.push(Event::Startup(p));
                }
            }
        } else {
            c.server.extend_from_slice(&chunk);
            loop {
                if c.expect_answer {
                    if c.server.is_empty() {
                        break;
                    }
                    let b = c.server.split_to(1)[0];
                    c.expect_answer = false;
                    c.events.push(Event::EncryptionAnswer(b));
                    continue;
                }
                let before = c.server.clone();
                let Some(msg) = decode_backend(&mut c.server, &limits)
                    .unwrap_or_else(|e| panic!("{name}: {e}"))
                else {
                    break;
                };
                let raw = &before[..before.len() - c.server.len()];
                assert_eq!(
                    &msg.to_bytes()[..],
                    raw,
                    "{name}: backend {msg:?} re-encodes"
                );
                c.server_stream.extend_from_slice(raw);
                c.events.push(Event::Back(msg));
            }
        }
    }
    for c in &conns {
        assert!(c.client.is_empty(), "{name}: trailing client bytes");
        assert!(c.server.is_empty(), "{name}: trailing server bytes");
    }
    conns
}

const ALL: &[&str] = &[
    "auth_scram_sslrequest_refused_simple_queries",
    "auth_md5_password",
    "auth_cleartext_password",
    "extended_binary_results_named_and_unnamed",
    "pipeline_error_skips_to_sync",
    "copy_out_text_csv_and_copy_in",
    "error_in_block_fails_transaction",
    "cancel_request_carries_backend_key",
    "gssenc_request_server_says_g",
    "deny_replaced_in_block_fails_txn",
    "deny_replaced_parse_in_pipeline",
];

/// Run every event through a session with everything allowed; returns the
/// session and the backend actions in order.
fn run_session(events: &[Event]) -> (Session, Vec<(BackendMessage, BackendAction)>) {
    let mut s = Session::new(false);
    let mut actions = Vec::new();
    for e in events {
        match e {
            Event::Front(m) => {
                assert_ne!(s.disposition(m), Disposition::Discard, "{m:?}");
                let f = s.forward(m);
                assert_eq!(f.describe_first, None);
            }
            Event::Back(m) => {
                let a = s.backend(m).unwrap_or_else(|e| panic!("{m:?}: {e}"));
                actions.push((m.clone(), a));
            }
            _ => {}
        }
    }
    (s, actions)
}

fn statuses(actions: &[(BackendMessage, BackendAction)]) -> Vec<u8> {
    actions
        .iter()
        .filter_map(|(m, _)| match m {
            BackendMessage::ReadyForQuery(s) => Some(s.byte()),
            _ => None,
        })
        .collect()
}

fn command_tags(actions: &[(BackendMessage, BackendAction)]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|(m, _)| match m {
            BackendMessage::CommandComplete { tag } => {
                Some(String::from_utf8_lossy(tag).into_owned())
            }
            _ => None,
        })
        .collect()
}

#[test]
fn every_fixture_decodes_and_reencodes_byte_identical_and_session_ends_idle() {
    let mut messages = 0;
    for name in ALL {
        for c in replay(name) {
            messages += c.events.len();
            let (s, _) = run_session(&c.events);
            assert!(s.is_idle(), "{name}: requests left unanswered");
        }
    }
    assert!(messages > 200, "only {messages} messages decoded");
}

#[test]
fn every_truncation_of_every_fixture_stream_is_incomplete_never_an_error() {
    let limits = Limits::default();
    for name in ALL {
        for c in replay(name) {
            for (stream, backend) in [(&c.client_stream, false), (&c.server_stream, true)] {
                for cut in 0..stream.len() {
                    let mut buf = BytesMut::from(&stream[..cut]);
                    loop {
                        let r = if backend {
                            decode_backend(&mut buf, &limits).map(|m| m.is_some())
                        } else {
                            decode_frontend(&mut buf, &limits).map(|m| m.is_some())
                        };
                        match r {
                            Ok(true) => {}
                            Ok(false) => break,
                            Err(e) => panic!("{name}: cut at {cut}: {e}"),
                        }
                    }
                    assert!(buf.len() < stream.len());
                }
            }
            for p in &c.startup_packets {
                for cut in 0..p.len() {
                    let mut buf = BytesMut::from(&p[..cut]);
                    assert_eq!(
                        decode_startup(&mut buf, &limits),
                        Ok(None),
                        "{name} cut {cut}"
                    );
                    assert_eq!(buf.len(), cut, "nothing consumed");
                }
            }
        }
    }
}

#[test]
fn scram_after_refused_ssl_request_and_simple_queries() {
    let conns = replay("auth_scram_sslrequest_refused_simple_queries");
    let ev = &conns[0].events;
    assert!(matches!(ev[0], Event::Startup(StartupPacket::SslRequest)));
    assert!(matches!(ev[1], Event::EncryptionAnswer(b'N')));
    let Event::Startup(startup) = &ev[2] else {
        panic!("startup")
    };
    assert_eq!(startup.param("user"), Some("agent"));
    assert_eq!(startup.param("database"), Some("bank"));

    let mut sasl = ev
        .iter()
        .find_map(|e| match e {
            Event::Back(BackendMessage::Authentication(a @ Authentication::Sasl { .. })) => {
                Some(a.clone())
            }
            _ => None,
        })
        .expect("AuthenticationSASL");
    assert!(strip_channel_binding(&mut sasl));
    assert_eq!(
        sasl,
        Authentication::Sasl {
            mechanisms: vec![Bytes::from_static(b"SCRAM-SHA-256")]
        }
    );
    assert!(ev.iter().any(|e| matches!(
        e,
        Event::Back(BackendMessage::Authentication(Authentication::SaslFinal(_)))
    )));

    let (s, actions) = run_session(ev);
    assert!(s.backend_key().is_some());
    assert_eq!(s.server_param("application_name"), Some(&b"fixture2"[..]));
    assert_eq!(s.server_param("client_encoding"), Some(&b"UTF8"[..]));
    assert_eq!(
        command_tags(&actions),
        ["SELECT 3", "SELECT 1", "SELECT 1", "SET", "DO"]
    );
    assert!(
        actions
            .iter()
            .any(|(m, _)| matches!(m, BackendMessage::EmptyQueryResponse))
    );
    assert!(
        actions
            .iter()
            .any(|(m, _)| matches!(m, BackendMessage::NoticeResponse(n) if n.get(b'M') == Some(&b"notice from fixture"[..])))
    );
    // Every DataRow of a simple query is attributed to the RowDescription before it.
    let rows: Vec<_> = actions
        .iter()
        .filter_map(|(_, a)| match a {
            BackendAction::Row(d) => Some(d.clone().expect("columns known")),
            _ => None,
        })
        .collect();
    assert_eq!(rows.len(), 5);
    assert_eq!(rows[0].fields.len(), 10);
    assert_eq!(&rows[3].fields[0].name[..], b"one");
    assert_eq!(&rows[4].fields[0].name[..], b"two");
}

#[test]
fn md5_and_cleartext_authentication_pass_through() {
    let md5 = replay("auth_md5_password");
    assert!(md5[0].events.iter().any(|e| matches!(
        e,
        Event::Back(BackendMessage::Authentication(
            Authentication::Md5Password { .. }
        ))
    )));
    let clear = replay("auth_cleartext_password");
    assert!(clear[0].events.iter().any(|e| matches!(
        e,
        Event::Back(BackendMessage::Authentication(
            Authentication::CleartextPassword
        ))
    )));
    for c in md5.iter().chain(&clear) {
        assert!(c.events.iter().any(|e| matches!(
            e,
            Event::Back(BackendMessage::Authentication(Authentication::Ok))
        )));
        assert!(
            c.events
                .iter()
                .any(|e| matches!(e, Event::Front(FrontendMessage::AuthResponse(_))))
        );
    }
}

#[test]
fn cancel_request_carries_the_key_from_backend_key_data() {
    let conns = replay("cancel_request_carries_backend_key");
    assert_eq!(conns.len(), 2);
    let (s, actions) = run_session(&conns[0].events);
    let key = s.backend_key().expect("key").clone();
    let Event::Startup(StartupPacket::CancelRequest { pid, secret }) = &conns[1].events[0] else {
        panic!("cancel request")
    };
    assert_eq!((*pid, secret), (key.pid, &key.secret));
    let canceled = actions.iter().any(|(m, _)| matches!(m, BackendMessage::ErrorResponse(e) if e.sqlstate() == Some(&b"57014"[..])));
    assert!(canceled, "query_canceled error");
}

#[test]
fn gssenc_request_is_decoded_and_server_answer_is_g() {
    let conns = replay("gssenc_request_server_says_g");
    assert!(matches!(
        conns[0].events[0],
        Event::Startup(StartupPacket::GssEncRequest)
    ));
    assert!(matches!(conns[0].events[1], Event::EncryptionAnswer(b'G')));
}

#[test]
fn error_in_block_leaves_transaction_failed_until_it_ends() {
    let conns = replay("error_in_block_fails_transaction");
    let (s, actions) = run_session(&conns[0].events);
    assert_eq!(statuses(&actions), b"ITTEEII");
    assert_eq!(
        command_tags(&actions),
        ["BEGIN", "SELECT 1", "ROLLBACK", "SELECT 1"]
    );
    assert_eq!(s.tx_status(), TxStatus::Idle);
}

#[test]
fn pipeline_error_mid_batch_is_followed_without_desync() {
    let conns = replay("pipeline_error_skips_to_sync");
    let (s, actions) = run_session(&conns[0].events);
    let errors: Vec<_> = actions
        .iter()
        .filter_map(|(m, _)| match m {
            BackendMessage::ErrorResponse(e) => e.sqlstate().map(<[u8]>::to_vec),
            _ => None,
        })
        .collect();
    assert_eq!(errors, [b"22012".to_vec()]);
    let rows: Vec<_> = actions
        .iter()
        .filter_map(|(_, a)| match a {
            BackendAction::Row(d) => {
                Some(String::from_utf8_lossy(&d.clone().unwrap().fields[0].name).into_owned())
            }
            _ => None,
        })
        .collect();
    // The statement after the failing one was skipped by the server; the next
    // pipeline ran.
    assert_eq!(rows, ["ssn", "card_pan", "name"]);
    assert!(s.is_idle());
}

// ---------------------------------------------------------------------------
// Masking against captured rows

#[derive(Clone, Copy, Debug, PartialEq)]
enum Rule {
    Redact,
}

struct TestMasker;

fn looks_like_pan(s: &str) -> bool {
    s.len() == 16 && s.bytes().all(|b| b.is_ascii_digit()) && matches!(s.as_bytes()[0], b'4' | b'5')
}

impl RowMasker for TestMasker {
    type Strategy = Rule;
    fn column_strategy(&self, table: Option<&str>, column: &str) -> Option<Rule> {
        match (table, column) {
            (Some("customers"), "ssn" | "balance" | "notes") => Some(Rule::Redact),
            _ => None,
        }
    }
    fn has_detectors(&self) -> bool {
        true
    }
    fn mask_text(&self, value: &str, strategy: Option<Rule>, out: &mut String) -> MaskResult {
        if strategy.is_some() {
            out.push_str("REDACTED");
            return MaskResult::Masked { detectors: vec![] };
        }
        if looks_like_pan(value) {
            out.push_str("************");
            out.push_str(&value[12..]);
            return MaskResult::Masked {
                detectors: vec!["pan"],
            };
        }
        MaskResult::Unchanged
    }
}

fn customers_oid(actions: &[(BackendMessage, BackendAction)]) -> u32 {
    actions
        .iter()
        .find_map(|(m, _)| match m {
            BackendMessage::RowDescription(d) => d
                .fields
                .iter()
                .find(|f| f.table_oid != 0)
                .map(|f| f.table_oid),
            _ => None,
        })
        .expect("a table column")
}

/// Mask every row the session attributes to columns; returns the rows as the
/// client would receive them, re-decoded from their encoding.
fn mask_rows(
    actions: &[(BackendMessage, BackendAction)],
    report: &mut MaskReport,
) -> Vec<Vec<Option<Vec<u8>>>> {
    let oid = customers_oid(actions);
    let mut scratch = Scratch::default();
    let mut out = Vec::new();
    for (m, a) in actions {
        let (BackendMessage::DataRow(row), BackendAction::Row(Some(desc))) = (m, a) else {
            continue;
        };
        let plan = RowPlan::new(
            desc,
            &TestMasker,
            |o| (o == oid).then(|| "customers".to_owned()),
            Unmaskable::Null,
        )
        .expect("plan");
        let masked = plan
            .mask_row(&TestMasker, row, &mut scratch, report)
            .expect("mask");
        let sent = BackendMessage::DataRow(masked.unwrap_or_else(|| row.clone()));
        // Lengths are fixed up: what is sent decodes as a valid DataRow.
        let mut wire = BytesMut::from(&sent.to_bytes()[..]);
        let Some(BackendMessage::DataRow(back)) =
            decode_backend(&mut wire, &Limits::default()).unwrap()
        else {
            panic!("re-decode")
        };
        out.push(back.fields().map(|f| f.map(<[u8]>::to_vec)).collect());
    }
    out
}

#[test]
fn masking_text_results_of_a_simple_query() {
    let conns = replay("auth_scram_sslrequest_refused_simple_queries");
    let (_, actions) = run_session(&conns[0].events);
    let mut report = MaskReport::default();
    let rows = mask_rows(&actions, &mut report);
    let first = &rows[0];
    assert_eq!(first[2].as_deref(), Some(&b"REDACTED"[..]), "ssn by rule");
    assert_eq!(
        first[3].as_deref(),
        Some(&b"************1111"[..]),
        "pan by detector"
    );
    assert_eq!(
        first[4], None,
        "balance by rule (text format): a numeric cannot hold a masked text, NULL"
    );
    assert_eq!(first[1].as_deref(), Some(&b"Alice Example"[..]));
    assert_eq!(rows[2][3], None, "NULL stays NULL");
    assert_eq!(
        report.columns_masked,
        ["ssn", "card_pan", "balance", "notes"]
    );
    assert_eq!(
        report.detectors.iter().copied().collect::<Vec<_>>(),
        ["pan"]
    );
    // 3 rows: ssn 3, pan 2, balance 3, notes 2 (one NULL).
    assert_eq!(report.values_masked, 10);
    let dbg = format!("{report:?}");
    assert!(
        !dbg.contains("123-45-6789") && !dbg.contains("4111"),
        "report holds no values"
    );
}

#[test]
fn masking_binary_results_of_extended_queries() {
    let conns = replay("extended_binary_results_named_and_unnamed");
    let (_, actions) = run_session(&conns[0].events);
    // Binary columns reach the masker with their binary formats.
    let binary_rows = actions
        .iter()
        .filter(|(_, a)| matches!(a, BackendAction::Row(Some(d)) if d.fields.iter().all(|f| f.format == 1)))
        .count();
    assert!(binary_rows >= 5, "{binary_rows}");
    let mut report = MaskReport::default();
    let rows = mask_rows(&actions, &mut report);
    let first = &rows[0];
    assert_eq!(
        first[2].as_deref(),
        Some(&b"REDACTED"[..]),
        "binary varchar ssn masked"
    );
    assert_eq!(
        first[3].as_deref(),
        Some(&b"************1111"[..]),
        "binary text pan by detector"
    );
    assert_eq!(first[4], None, "binary numeric under a rule becomes NULL");
    assert_eq!(
        first[5].as_deref(),
        Some(&b"\x01\"REDACTED\""[..]),
        "jsonb keeps its version byte and stays JSON"
    );
    assert!(report.values_nulled >= 3);
    for r in &rows {
        for v in r.iter().flatten() {
            let s = String::from_utf8_lossy(v);
            assert!(
                !s.contains("123-45-6789") && !s.contains("4111111111111111"),
                "{s}"
            );
        }
    }
}

#[test]
fn masking_copy_out_text_rows_and_refusing_csv() {
    let conns = replay("copy_out_text_csv_and_copy_in");
    let (_, actions) = run_session(&conns[0].events);
    let copies: Vec<_> = actions
        .iter()
        .filter_map(|(m, a)| match (m, a) {
            (BackendMessage::CopyData(d), BackendAction::CopyOut(f)) => {
                Some((d.clone(), f.clone()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(copies.len(), 6, "3 text rows, 3 CSV rows");
    let cols: Vec<(Option<&str>, &str)> = ["id", "name", "ssn", "card_pan", "notes"]
        .iter()
        .map(|c| (Some("customers"), *c))
        .collect();
    let plan = CopyPlan::new(&cols, &TestMasker);
    let mut scratch = Scratch::default();
    let mut report = MaskReport::default();
    let mut lines = Vec::new();
    for (data, fmt) in &copies[..3] {
        let out = plan
            .mask_copy_data(
                &TestMasker,
                CopyKind::Text,
                fmt,
                data,
                &mut scratch,
                &mut report,
            )
            .expect("text COPY masks");
        lines.push(String::from_utf8(out.unwrap_or_else(|| data.clone()).to_vec()).unwrap());
    }
    assert_eq!(
        lines[0],
        "1\tAlice Example\tREDACTED\t************1111\tREDACTED\n"
    );
    // The name (stored as `Carol<TAB>Quote\"Back\\slash`) passes with its COPY escapes intact.
    assert_eq!(
        lines[2],
        "3\tCarol Tab\\tQuote\\\\\"Back\\\\\\\\slash\tREDACTED\t\\N\t\\N\n"
    );
    assert_eq!(report.values_masked, 3 + 2 + 2);
    let (data, fmt) = &copies[3];
    let csv_plan = CopyPlan::new(&cols[..3], &TestMasker);
    assert!(
        csv_plan
            .mask_copy_data(
                &TestMasker,
                CopyKind::Csv,
                fmt,
                data,
                &mut scratch,
                &mut report
            )
            .is_err()
    );
    assert!(
        command_tags(&actions).contains(&"COPY 2".to_owned()),
        "COPY FROM STDIN completed"
    );
}

// ---------------------------------------------------------------------------
// Denials, against what the real server answered to the replacement statement

/// Replay a fixture in which the proxy replaced one statement by `DENIED_SQL`:
/// the client's original message is `original`. Returns what the client receives.
fn replay_with_denial(
    name: &str,
    original: &FrontendMessage,
    extra_client_msgs_after_denial: &[FrontendMessage],
) -> (Session, Vec<BackendMessage>) {
    let conns = replay(name);
    let mut s = Session::new(false);
    let mut to_client = Vec::new();
    for e in &conns[0].events {
        match e {
            Event::Front(m) => {
                let is_replacement = matches!(m, FrontendMessage::Query { sql } | FrontendMessage::Parse { sql, .. } if &sql[..] == DENIED_SQL);
                if is_replacement {
                    assert_eq!(s.disposition(original), Disposition::Decide);
                    let injected = s
                        .deny(original, denial_error("no_deletes"))
                        .expect("injection");
                    assert_eq!(&injected, m, "the session injects what the server saw");
                    for extra in extra_client_msgs_after_denial {
                        assert_eq!(s.disposition(extra), Disposition::Discard, "{extra:?}");
                    }
                } else {
                    assert_ne!(s.disposition(m), Disposition::Discard);
                    s.forward(m);
                }
            }
            Event::Back(m) => match s.backend(m).expect("in sync") {
                BackendAction::Replace(r) => to_client.push(r),
                BackendAction::Drop => {}
                _ => to_client.push(m.clone()),
            },
            _ => {}
        }
    }
    (s, to_client)
}

fn client_view(msgs: &[BackendMessage]) -> Vec<String> {
    msgs.iter()
        .filter_map(|m| match m {
            BackendMessage::ErrorResponse(e) => Some(format!(
                "E {} {}",
                String::from_utf8_lossy(e.sqlstate().unwrap()),
                String::from_utf8_lossy(e.get(b'M').unwrap())
            )),
            BackendMessage::ReadyForQuery(s) => Some(format!("Z {}", char::from(s.byte()))),
            BackendMessage::CommandComplete { tag } => {
                Some(format!("C {}", String::from_utf8_lossy(tag)))
            }
            BackendMessage::DataRow(_) => Some("D".into()),
            _ => None,
        })
        .collect()
}

#[test]
fn denial_inside_a_block_fails_the_transaction_like_postgres() {
    let original = FrontendMessage::Query {
        sql: Bytes::from_static(b"DELETE FROM customers"),
    };
    let (s, msgs) = replay_with_denial("deny_replaced_in_block_fails_txn", &original, &[]);
    let view = client_view(&msgs);
    let start = view.iter().position(|v| v == "C BEGIN").unwrap();
    assert_eq!(
        &view[start..],
        [
            "C BEGIN",
            "Z T",
            "D",
            "C SELECT 1",
            "Z T",
            "E 42501 agentgate: statement denied by policy rule \"no_deletes\"",
            "Z E",
            "C ROLLBACK",
            "Z I",
            "D",
            "C SELECT 1",
            "Z I",
        ]
    );
    assert!(s.is_idle());
}

#[test]
fn denied_parse_mid_pipeline_errors_in_order_and_skips_to_sync() {
    let original = FrontendMessage::Parse {
        statement: Bytes::from_static(b"s_denied"),
        sql: Bytes::from_static(b"DELETE FROM customers"),
        param_types: vec![],
    };
    // The client's Describe of the denied statement is dropped by the proxy.
    let extra = [FrontendMessage::Describe {
        target: agentgate::protocol::postgres::codec::Target::Statement,
        name: Bytes::from_static(b"s_denied"),
    }];
    let (s, msgs) = replay_with_denial("deny_replaced_parse_in_pipeline", &original, &extra);
    let view = client_view(&msgs);
    let start = view.iter().position(|v| v == "D").unwrap();
    assert_eq!(
        &view[start..],
        [
            "D",
            "C SELECT 1",
            "E 42501 agentgate: statement denied by policy rule \"no_deletes\"",
            "Z I",
            "D",
            "C SELECT 1",
            "Z I",
        ]
    );
    assert!(s.is_idle());
    assert!(s.statement(b"s_denied").is_none());
}

#[test]
fn named_statement_executed_without_describe_gets_columns_from_its_statement() {
    let conns = replay("extended_binary_results_named_and_unnamed");
    let mut per_sql: HashMap<String, usize> = HashMap::new();
    let (_, actions) = run_session(&conns[0].events);
    for (_, a) in &actions {
        if let BackendAction::Row(d) = a {
            let d = d.as_ref().expect("every row's columns known");
            let names: Vec<_> = d
                .fields
                .iter()
                .map(|f| String::from_utf8_lossy(&f.name).into_owned())
                .collect();
            *per_sql.entry(names.join(",")).or_default() += 1;
        }
    }
    assert_eq!(per_sql.get("name,ssn"), Some(&2), "{per_sql:?}");
}
