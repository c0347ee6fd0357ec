//! Server bytes: messages through the decoder and the session's server side.
#![no_main]

use agentgate::protocol::postgres::codec::{FrontendMessage, Limits, decode_backend};
use agentgate::protocol::postgres::session::Session;
use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_message_len: 1 << 16,
        ..Limits::default()
    };
    // A session with a few requests in flight, so responses have something to match.
    let mut session = Session::new(true);
    for m in [
        FrontendMessage::Parse {
            statement: Bytes::new(),
            sql: Bytes::from_static(b"SELECT 1"),
            param_types: vec![],
        },
        FrontendMessage::Describe {
            target: agentgate::protocol::postgres::codec::Target::Statement,
            name: Bytes::new(),
        },
        FrontendMessage::Execute {
            portal: Bytes::new(),
            max_rows: 0,
        },
        FrontendMessage::Sync,
        FrontendMessage::Query {
            sql: Bytes::from_static(b"SELECT 1"),
        },
    ] {
        session.forward(&m);
    }
    let mut buf = BytesMut::from(data);
    loop {
        match decode_backend(&mut buf, &limits) {
            Ok(Some(msg)) => {
                let mut enc = BytesMut::from(&msg.to_bytes()[..]);
                let back = decode_backend(&mut enc, &limits).expect("re-encoded message decodes");
                assert_eq!(back.as_ref(), Some(&msg));
                if session.backend(&msg).is_err() {
                    return;
                }
            }
            Ok(None) | Err(_) => return,
        }
    }
});
