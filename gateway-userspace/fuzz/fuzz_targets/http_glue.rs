//! The HTTP handler's parsing glue from fuzz bytes: a request head (the
//! smuggling and path checks, the recorded path and headers), a response
//! body through decoding and masking (JSON and text), an event stream fed in
//! fuzz-sized chunks, model-call bodies through the openai profile, JSON
//! path rules and body/query conditions, and protected-value fingerprints.
//! No panic; an accepted head never carries a dot segment or a host with
//! '/'; a field a JSON rule names is never left holding a number, boolean,
//! array or object (it is masked to a string, or stays null).
#![no_main]

use agentgate::mask::{DetectorSet, JsonFieldRule, JsonPath, MaskPolicy, Strategy, fingerprints};
use agentgate::policy::field_test::{JsonTest, QueryTest};
use agentgate::protocol::http::{body, openai, request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let policy = MaskPolicy::new(Vec::new(), DetectorSet::ALL, Strategy::Redact);
    match mode % 6 {
        0 => head(rest),
        1 => {
            let coding = [
                body::Coding::Identity,
                body::Coding::Gzip,
                body::Coding::Deflate,
                body::Coding::Brotli,
                body::Coding::Zstd,
            ][usize::from(mode / 6) % 5];
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
            let step = usize::from(mode / 6).max(1);
            for chunk in rest.chunks(step) {
                if s.feed(&policy, chunk, |_| {}).is_err() {
                    return;
                }
            }
            let _ = s.finish(&policy);
        }
        4 => json_rules(rest),
        5 => {
            // Values file, then text to scan.
            let text = String::from_utf8_lossy(rest);
            let (values, scanned) = text.split_once("\n\n").unwrap_or((&text, ""));
            if let Ok(p) = fingerprints::ProtectedValues::from_lines(values) {
                let mut last = 0;
                for r in p.find(scanned) {
                    assert!(r.start >= last && r.end > r.start, "{r:?}");
                    let _ = &scanned[r.clone()];
                    last = r.end;
                }
                let policy = policy.clone().with_protected_values(Some(std::sync::Arc::new(p)));
                let _ = policy.mask_value(scanned, None);
            }
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

/// A JSON path (first line), then a JSON document: masked by the path's
/// rule; the path also read as a body condition, and the rest as a query.
fn json_rules(bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    let (spec, doc) = text.split_once('\n').unwrap_or((&text, ""));
    if let Ok(t) = JsonTest::parse(spec)
        && let Ok(v) = serde_json::from_str::<serde_json::Value>(doc)
    {
        let _ = (t.holds(&v, true), t.holds(&v, false));
    }
    if let Ok(t) = QueryTest::parse(spec) {
        let _ = (t.holds(Some(doc), true), t.holds(Some(doc), false));
    }
    let Ok(path) = JsonPath::parse(spec) else { return };
    let Ok(mut v) = serde_json::from_str::<serde_json::Value>(doc) else { return };
    let policy = MaskPolicy::new(Vec::new(), DetectorSet::ALL, Strategy::Redact).with_json_fields(vec![
        JsonFieldRule { path: path.clone(), strategy: Strategy::KeepLast4 },
    ]);
    let mut hits = Vec::new();
    agentgate::mask::json_path::mask_document(&policy, &mut v, &mut hits);
    for named in path.select(&v, 1024) {
        assert!(named.is_string() || named.is_null(), "{named:?} left unmasked at {}", path.as_str());
    }
}

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
