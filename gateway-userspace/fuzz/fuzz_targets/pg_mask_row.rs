//! A RowDescription and DataRows from fuzz bytes through the masker: no panic, and
//! a masked row is a well-formed DataRow with the same field count and no
//! unmasked value in a ruled column.
#![no_main]

use agentgate::protocol::postgres::codec::{BackendMessage, Limits, decode_backend};
use agentgate::protocol::postgres::mask::{
    MaskReport, MaskResult, RowMasker, RowPlan, Scratch, Unmaskable,
};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

struct M;
impl RowMasker for M {
    type Strategy = ();
    fn column_strategy(&self, _t: Option<&str>, c: &str) -> Option<()> {
        c.contains('s').then_some(())
    }
    fn has_detectors(&self) -> bool {
        true
    }
    fn mask_text(&self, v: &str, s: Option<()>, out: &mut String) -> MaskResult {
        if s.is_some() || v.contains("4111") {
            out.push_str("MASKED");
            MaskResult::Masked {
                detectors: vec!["d"],
            }
        } else if v.contains('!') {
            MaskResult::Refuse
        } else {
            MaskResult::Unchanged
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_message_len: 1 << 16,
        ..Limits::default()
    };
    let mut buf = BytesMut::from(data);
    let Ok(Some(BackendMessage::RowDescription(desc))) = decode_backend(&mut buf, &limits) else {
        return;
    };
    let Ok(plan) = RowPlan::new(
        &desc,
        &M,
        |oid| (oid % 2 == 0).then(|| "t".to_owned()),
        Unmaskable::Null,
    ) else {
        return;
    };
    let mut scratch = Scratch::default();
    let mut report = MaskReport::default();
    while let Ok(Some(msg)) = decode_backend(&mut buf, &limits) {
        let BackendMessage::DataRow(row) = msg else {
            continue;
        };
        let Ok(out) = plan.mask_row(&M, &row, &mut scratch, &mut report) else {
            continue;
        };
        let Some(out) = out else { continue };
        let mut wire = BytesMut::from(&BackendMessage::DataRow(out).to_bytes()[..]);
        let Ok(Some(BackendMessage::DataRow(back))) = decode_backend(&mut wire, &limits) else {
            panic!("masked row does not decode");
        };
        assert_eq!(back.len(), row.len());
        for (f, v) in desc.fields.iter().zip(back.fields()) {
            if String::from_utf8_lossy(&f.name).contains('s') {
                // JSON columns carry the replacement as a JSON string.
                let masked: [&[u8]; 4] = [b"MASKED", b"\x01MASKED", b"\"MASKED\"", b"\x01\"MASKED\""];
                assert!(v.is_none() || masked.iter().any(|m| v == Some(*m)));
            }
        }
    }
});
