//! Bodies the handler inspects: content codings decoded and encoded again,
//! value detectors over JSON string values (parsed, so escapes cannot hide a
//! value) or over text, and a line-at-a-time rewriter for server-sent events.
//!
//! Bounded: a body is inspected only up to a byte limit, decoded output too
//! (a gzip bomb stops at the limit); past it the caller refuses or passes by
//! rule. The detectors' replacements hold no quote or backslash, so masking
//! text in place keeps JSON inside it valid.

use std::io::Read as _;

use bytes::Bytes;
use serde_json::Value;

use crate::mask::{JsonHit, MaskPolicy};

/// A content coding the handler can decode and encode again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Identity,
    Gzip,
    Deflate,
    Brotli,
    Zstd,
}

impl Coding {
    /// The codings the handler reads, as `Accept-Encoding` names them.
    pub const READABLE: [&'static str; 4] = ["gzip", "deflate", "br", "zstd"];

    /// `None`: a coding the handler cannot read (compress, stacked codings,
    /// unknown names); the caller passes or refuses the body by rule.
    pub fn parse(header: Option<&str>) -> Option<Self> {
        match header.map(|h| h.trim().to_ascii_lowercase()).as_deref() {
            None | Some("" | "identity") => Some(Self::Identity),
            Some("gzip" | "x-gzip") => Some(Self::Gzip),
            Some("deflate") => Some(Self::Deflate),
            Some("br") => Some(Self::Brotli),
            Some("zstd") => Some(Self::Zstd),
            _ => None,
        }
    }
}

/// The body could not be inspected within the limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Uninspectable(pub String);

/// Decodes `body`, refusing output past `limit` bytes.
pub fn decode(coding: Coding, body: &[u8], limit: usize) -> Result<Vec<u8>, Uninspectable> {
    let mut out = Vec::new();
    let read = match coding {
        Coding::Identity => return Ok(body.to_vec()),
        Coding::Gzip => flate2::read::GzDecoder::new(body)
            .take(limit as u64 + 1)
            .read_to_end(&mut out),
        Coding::Deflate => flate2::read::ZlibDecoder::new(body)
            .take(limit as u64 + 1)
            .read_to_end(&mut out),
        Coding::Brotli => brotli::Decompressor::new(body, 8192)
            .take(limit as u64 + 1)
            .read_to_end(&mut out),
        Coding::Zstd => zstd::stream::read::Decoder::new(body).and_then(|d| {
            // The decoder's window is bounded (zstd's default, 128 MiB at most)
            // and its output by the limit.
            d.take(limit as u64 + 1).read_to_end(&mut out)
        }),
    };
    read.map_err(|e| Uninspectable(format!("the body does not decode: {e}")))?;
    if out.len() > limit {
        return Err(Uninspectable(format!(
            "the decoded body is over the inspection limit of {limit} bytes"
        )));
    }
    Ok(out)
}

/// Encodes `body` in `coding` again.
pub fn encode(coding: Coding, body: &[u8]) -> Vec<u8> {
    use std::io::Write as _;
    match coding {
        Coding::Identity => body.to_vec(),
        Coding::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(body).expect("writing to memory");
            e.finish().expect("writing to memory")
        }
        Coding::Deflate => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(body).expect("writing to memory");
            e.finish().expect("writing to memory")
        }
        Coding::Brotli => {
            let mut out = Vec::new();
            {
                let mut e = brotli::CompressorWriter::new(&mut out, 8192, 4, 22);
                e.write_all(body).expect("writing to memory");
            }
            out
        }
        Coding::Zstd => zstd::stream::encode_all(body, 3).expect("writing to memory"),
    }
}

/// What masking changed: detector name and JSON path (or `text`) per hit.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Masked {
    pub hits: Vec<(&'static str, String)>,
    /// Fields a JSON rule masked: (the rule's path as written, the location).
    pub rules: Vec<(String, String)>,
}

impl Masked {
    pub fn is_empty(&self) -> bool {
        self.hits.is_empty() && self.rules.is_empty()
    }

    fn len(&self) -> usize {
        self.hits.len() + self.rules.len()
    }
    /// The record's `transform` field: counts by detector, paths (never values).
    pub fn record(&self) -> Value {
        let mut counts = std::collections::BTreeMap::<&str, u64>::new();
        for (d, _) in &self.hits {
            *counts.entry(d).or_default() += 1;
        }
        let mut by_rule = std::collections::BTreeMap::<&str, u64>::new();
        for (r, _) in &self.rules {
            *by_rule.entry(r).or_default() += 1;
        }
        let paths: Vec<&str> = self
            .rules
            .iter()
            .map(|(_, p)| p.as_str())
            .chain(self.hits.iter().map(|(_, p)| p.as_str()))
            .take(64)
            .collect();
        let mut r = serde_json::json!({ "masked": counts, "paths": paths, "fields": self.len() });
        if !by_rule.is_empty() {
            r["json_rules"] = serde_json::json!(by_rule);
        }
        r
    }
}

/// The kind of body, from its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Json,
    EventStream,
    Text,
    /// Binary or unknown: detectors cannot read it.
    Opaque,
}

impl Kind {
    pub fn of(content_type: Option<&str>) -> Self {
        let Some(ct) = content_type else {
            return Self::Opaque;
        };
        let mime = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if mime == "application/json" || mime.ends_with("+json") {
            Self::Json
        } else if mime == "text/event-stream" {
            Self::EventStream
        } else if mime.starts_with("text/")
            || mime == "application/xml"
            || mime.ends_with("+xml")
            || mime == "application/x-www-form-urlencoded"
            || mime == "application/x-ndjson"
        {
            Self::Text
        } else {
            Self::Opaque
        }
    }
}

/// Masks `v`: the policy's JSON field rules, then the detectors over every
/// other string value (see [`crate::mask::json_path`]), noting where.
pub fn mask_json(policy: &MaskPolicy, v: &mut Value, masked: &mut Masked) {
    let mut hits = Vec::new();
    crate::mask::json_path::mask_document(policy, v, &mut hits);
    for h in hits {
        match h {
            JsonHit::Rule { rule, at } => masked.rules.push((rule, at)),
            JsonHit::Detector { detector, at } => masked.hits.push((detector, at)),
        }
    }
}

/// Masks a whole body of `kind` (decoded). `None`: nothing changed.
pub fn mask_body(
    policy: &MaskPolicy,
    kind: Kind,
    body: &[u8],
    masked: &mut Masked,
) -> Option<Vec<u8>> {
    match kind {
        Kind::Json => {
            if let Ok(mut v) = serde_json::from_slice::<Value>(body) {
                let before = masked.len();
                mask_json(policy, &mut v, masked);
                return (masked.len() > before)
                    .then(|| serde_json::to_vec(&v).expect("a JSON value serialises"));
            }
            // Declared JSON that does not parse: read it as text.
            mask_text(policy, body, masked)
        }
        Kind::Text | Kind::EventStream => mask_text(policy, body, masked),
        Kind::Opaque => None,
    }
}

fn mask_text(policy: &MaskPolicy, body: &[u8], masked: &mut Masked) -> Option<Vec<u8>> {
    let text = String::from_utf8_lossy(body);
    let out = policy.mask_value(&text, None);
    if !out.changed {
        return None;
    }
    for d in &out.detectors_hit {
        masked.hits.push((d, "text".to_owned()));
    }
    Some(out.text.into_owned().into_bytes())
}

/// Rewrites a server-sent event stream a line at a time: each complete line
/// is masked (a `data:` line's JSON by value, else as text) and released;
/// a partial line waits for its end, up to `max_line` bytes.
pub struct SseMasker {
    pending: Vec<u8>,
    max_line: usize,
    pub masked: Masked,
}

impl SseMasker {
    pub fn new(max_line: usize) -> Self {
        Self {
            pending: Vec::new(),
            max_line,
            masked: Masked::default(),
        }
    }

    /// Feeds a chunk; returns what may go to the client now.
    pub fn feed(
        &mut self,
        policy: &MaskPolicy,
        chunk: &[u8],
        mut on_line: impl FnMut(&[u8]),
    ) -> Result<Bytes, Uninspectable> {
        let mut pending = std::mem::take(&mut self.pending);
        pending.extend_from_slice(chunk);
        let mut out = Vec::with_capacity(pending.len());
        let mut start = 0;
        while let Some(nl) = memchr::memchr(b'\n', &pending[start..]) {
            let line = &pending[start..start + nl];
            on_line(line);
            out.extend_from_slice(&self.mask_line(policy, line));
            out.push(b'\n');
            start += nl + 1;
        }
        pending.drain(..start);
        self.pending = pending;
        if self.pending.len() > self.max_line {
            return Err(Uninspectable(format!(
                "an event-stream line is over the inspection limit of {} bytes",
                self.max_line
            )));
        }
        Ok(Bytes::from(out))
    }

    /// The end of the stream: the last partial line, masked.
    pub fn finish(&mut self, policy: &MaskPolicy) -> Bytes {
        let line = std::mem::take(&mut self.pending);
        Bytes::from(self.mask_line(policy, &line))
    }

    fn mask_line(&mut self, policy: &MaskPolicy, line: &[u8]) -> Vec<u8> {
        if let Some(data) = line.strip_prefix(b"data:") {
            let trimmed = data.strip_prefix(b" ").unwrap_or(data);
            if let Some(v) = mask_body(policy, Kind::Json, trimmed, &mut self.masked) {
                let mut out = b"data: ".to_vec();
                out.extend_from_slice(&v);
                return out;
            }
            return line.to_vec();
        }
        mask_text(policy, line, &mut self.masked).unwrap_or_else(|| line.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mask::{DetectorSet, Strategy};

    fn policy() -> MaskPolicy {
        MaskPolicy::new(Vec::new(), DetectorSet::ALL, Strategy::Redact)
    }

    #[test]
    fn json_values_are_masked_by_path_even_when_escaped() {
        let body =
            br#"{"customers":[{"name":"A","ssn":"123-45-6789"},{"note":"mail \u0061@b.example"}]}"#;
        let mut m = Masked::default();
        let out = mask_body(&policy(), Kind::Json, body, &mut m).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            !text.contains("123-45-6789") && !text.contains("a@b.example"),
            "{text}"
        );
        let paths: Vec<&str> = m.hits.iter().map(|(_, p)| p.as_str()).collect();
        assert_eq!(paths, ["$.customers[0].ssn", "$.customers[1].note"]);
    }

    #[test]
    fn gzip_round_trips_and_bombs_stop_at_the_limit() {
        let plain = b"{\"ssn\":\"123-45-6789\"}".repeat(10);
        let z = encode(Coding::Gzip, &plain);
        assert_eq!(decode(Coding::Gzip, &z, 1 << 20).unwrap(), plain);
        assert!(decode(Coding::Gzip, &z, 10).is_err());
        assert_eq!(Coding::parse(Some("compress")), None);
        assert_eq!(Coding::parse(Some("gzip, br")), None, "stacked codings");
    }

    #[test]
    fn br_and_zstd_round_trip_and_bombs_stop_at_the_limit() {
        let plain = b"{\"ssn\":\"123-45-6789\"}".repeat(1000);
        for c in [Coding::Brotli, Coding::Zstd, Coding::Deflate] {
            let z = encode(c, &plain);
            assert!(z.len() < plain.len() / 10, "{c:?} compresses");
            assert_eq!(decode(c, &z, 1 << 20).unwrap(), plain, "{c:?}");
            assert!(decode(c, &z, 100).is_err(), "{c:?} stops at the limit");
            assert!(
                decode(c, b"not compressed at all", 1 << 20).is_err(),
                "{c:?}"
            );
        }
        assert_eq!(Coding::parse(Some("br")), Some(Coding::Brotli));
        assert_eq!(Coding::parse(Some(" ZSTD ")), Some(Coding::Zstd));
    }

    #[test]
    fn sse_lines_are_masked_across_chunk_boundaries() {
        let p = policy();
        let mut s = SseMasker::new(1024);
        let mut out = Vec::new();
        let stream = b"data: {\"delta\":\"ssn 123-45-6789\"}\n\ndata: [DONE]\n\n";
        for chunk in stream.chunks(7) {
            out.extend_from_slice(&s.feed(&p, chunk, |_| {}).unwrap());
        }
        out.extend_from_slice(&s.finish(&p));
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("123-45-6789"), "{text}");
        assert!(text.contains("data: [DONE]\n\n"), "{text}");
        assert_eq!(s.masked.hits.len(), 1);
    }
}
