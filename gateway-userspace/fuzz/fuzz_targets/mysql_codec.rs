//! MySQL bytes from either side: framing (16 MiB chunks, sequence ids,
//! limits), the greeting and handshake response, commands, a command's reply
//! state machine and row rewriting. No input may panic; a packet re-encoded
//! decodes to itself.
#![no_main]

use agentgate::protocol::mysql::{
    codec::{self, ColumnDef, Framer, Packet, Reply, Response},
    rows::{self, Edit},
};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mysql_common::constants::{CapabilityFlags, ColumnType};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut buf = BytesMut::from(rest);
    let mut f = Framer::new(1 << 16);
    let mut first = true;
    let replies = [
        Reply::Simple,
        Reply::Statistics,
        Reply::ResultSets { binary: false },
        Reply::ResultSets { binary: true },
        Reply::Prepare,
        Reply::FieldList,
    ];
    let mut resp = Response::new(replies[usize::from(mode >> 1) % replies.len()], mode & 1 == 1);
    let mut types: Vec<ColumnType> = Vec::new();
    while let Ok(Some(mut p)) = f.decode(&mut buf) {
        // Re-framed, a packet decodes to itself.
        let mut enc = BytesMut::new();
        let mut g = Framer::new(1 << 17);
        g.encode(&p, &mut enc).expect("within the limit");
        let mut h = Framer::new(1 << 17);
        assert_eq!(h.decode(&mut enc).expect("decodes").as_deref(), Some(&p[..]));
        if mode & 0x80 == 0 {
            // Client side: a handshake response, then commands.
            if first {
                let _ = codec::parse_client_hello(&p, CapabilityFlags::all());
            } else if let Ok(cmd) = codec::parse_command(&p, 1 << 12) {
                let _ = cmd.reply();
            }
            f.reset();
        } else if first {
            let _ = codec::rewrite_greeting(&mut p, codec::stripped_capabilities());
        } else if !resp.done() {
            match resp.feed(&p) {
                Ok(Packet::ColumnCount(_)) => types.clear(),
                Ok(Packet::Column(_) | Packet::PrepareColumn(_)) => {
                    if let Ok(c) = ColumnDef::parse(&p) {
                        types.push(c.column_type);
                    }
                }
                Ok(Packet::Row) => {
                    let _ = rows::rewrite(&p, &types, resp.binary(), |i, v| match (i % 3, v) {
                        (0, Some(_)) => Edit::Null,
                        (1, Some(v)) => Edit::Text(String::from_utf8_lossy(v).chars().rev().collect()),
                        _ => Edit::Keep,
                    });
                }
                Ok(Packet::LocalInfile { .. }) => resp.infile_sent(),
                Ok(_) => {}
                Err(_) => return,
            }
        }
        first = false;
    }
});
