//! The HTTP handler's parsing glue from fuzz bytes: a request head (the
//! smuggling and path checks, the recorded path and headers), a response
//! body through decoding and masking (JSON and text), an event stream fed in
//! fuzz-sized chunks, and model-call bodies through the openai profile. No
//! panic; an accepted head never carries a dot segment or a host with '/'.
#![no_main]

use agentgate::mask::{DetectorSet, MaskPolicy, Strategy};
use agentgate::protocol::http::{body, openai, request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let policy = MaskPolicy::new(Vec::new(), DetectorSet::ALL, Strategy::Redact);
    match mode % 4 {
        0 => head(rest),
        1 => {
            let coding = [body::Coding::Identity, body::Coding::Gzip, body::Coding::Deflate][usize::from(mode / 4) % 3];
            if let Ok(plain) = body::decode(coding, rest, 1 << 16) {
                let mut m = body::Masked::default();
                for kind in [body::Kind::Json, body::Kind::Text] {
                    if let Some(out) = body::mask_body(&policy, kind, &plain, &mut m) {
                        let _ = body::encode(coding, &out);
                    }
                }
                let _ = m.record();
            }
        }
        2 => {
            let mut s = body::SseMasker::new(4096);
            let step = usize::from(mode / 4).max(1);
            for chunk in rest.chunks(step) {
                if s.feed(&policy, chunk, |_| {}).is_err() {
                    return;
                }
            }
            let _ = s.finish(&policy);
        }
        _ => {
            if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(rest) {
                let _ = openai::read_call(&v, &[7; 32]).record();
                let _ = openai::scan_prompt(&policy, &mut v).record();
                let mut a = openai::Answer::default();
                a.absorb(&v);
                let _ = a.record();
            }
        }
    }
});

/// Head bytes: "METHOD TARGET\n" then "name: value" lines.
fn head(bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    let mut lines = text.split('\n');
    let Some(first) = lines.next() else { return };
    let mut parts = first.splitn(2, ' ');
    let (Some(m), Some(t)) = (parts.next(), parts.next()) else {
        return;
    };
    let mut b = http::Request::builder().method(m).uri(t);
    for l in lines.take(64) {
        if let Some((k, v)) = l.split_once(':') {
            b = b.header(k.trim(), v.trim());
        }
    }
    let Ok(req) = b.body(()) else { return };
    let (parts, ()) = req.into_parts();
    if let Ok(h) = request::check(&parts.method, &parts.uri, parts.version, &parts.headers) {
        assert!(!h.path.split('/').any(|s| s == ".." || s == "."), "{h:?}");
        assert!(!h.host.contains('/') && !h.host.contains('@'), "{h:?}");
        let _ = request::recorded_path(&h);
    }
    let _ = request::recorded_headers(&parts.headers);
}
