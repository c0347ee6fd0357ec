//! Client bytes: startup packets, then messages, through the session's client side.
#![no_main]

use agentgate::protocol::postgres::codec::{
    Limits, StartupPacket, decode_frontend, decode_startup,
};
use agentgate::protocol::postgres::session::{Disposition, Session, denial_error};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_message_len: 1 << 16,
        max_sql_len: 1 << 12,
        ..Limits::default()
    };
    let mut buf = BytesMut::from(data);
    let mut started = false;
    let mut session = Session::new(true);
    let mut deny = false;
    loop {
        if !started {
            match decode_startup(&mut buf, &limits) {
                Ok(Some(StartupPacket::Startup { .. } | StartupPacket::CancelRequest { .. })) => {
                    started = true;
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            }
            continue;
        }
        match decode_frontend(&mut buf, &limits) {
            Ok(Some(msg)) => {
                let mut enc = BytesMut::new();
                msg.encode(&mut enc);
                let back = decode_frontend(&mut enc, &limits).expect("re-encoded message decodes");
                assert_eq!(back.as_ref(), Some(&msg));
                match session.disposition(&msg) {
                    Disposition::Discard => {}
                    Disposition::Decide if deny => {
                        let _ = session.deny(&msg, denial_error("fuzz"));
                    }
                    _ => {
                        session.forward(&msg);
                    }
                }
                deny = !deny;
            }
            Ok(None) | Err(_) => return,
        }
    }
});
