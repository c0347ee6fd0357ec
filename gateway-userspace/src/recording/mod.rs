//! Session recordings: one asciicast v2 file per interactive channel (SSH
//! `exec`/`shell` today, Kubernetes `exec` later), with every chunk's digest
//! in the audit chain.
//!
//! A recording is a header line and one JSON event per line: `[t, "o", data]`
//! (output), `"i"` (input), `"r"` (resize, `"COLSxROWS"`) and a final marker
//! `[t, "m", "exit-status N"]` (v2 has no exit event; players ignore markers
//! they do not know). Events are buffered and written in chunks of at most
//! [`CHUNK_BYTES`]; each written chunk is a [`Chunk`] (file, offset, length,
//! blake3) that the caller appends to the audit log as a `recording.chunk`
//! record, so `audit verify` ([`verify_chunks`]) names the recording whose
//! bytes changed, and a recording cut short or extended after its last chunk.
//!
//! Fails closed: a recording that cannot be created or written is an error
//! the caller must treat as "cannot record" (the SSH handler ends the channel).
//! The trade-off: bytes still in the buffer when the daemon dies are lost, at
//! most one chunk per channel; the audit records say how far each recording
//! was durable. Files are created 0600 in `<audit dir>/recordings/`.

use std::{
    fs::{File, OpenOptions},
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::Instant,
};

use serde::Serialize;
use serde_json::{Value, json};

/// Largest chunk written at once (and hashed into one record).
pub const CHUNK_BYTES: usize = 64 * 1024;
/// The recordings directory, inside the audit directory.
pub const DIR: &str = "recordings";

/// Why a recording cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    #[error("recording {file}: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
}

/// What the header says about the session.
#[derive(Debug, Clone, Serialize)]
pub struct Header {
    pub width: u32,
    pub height: u32,
    /// Unix seconds at the start.
    pub timestamp: i64,
    /// The command (`exec`) or the shell's name; never secrets (redacted text).
    pub command: Option<String>,
    pub title: Option<String>,
}

/// A written chunk: what its `recording.chunk` record holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Chunk {
    /// File name inside the recordings directory.
    pub file: String,
    pub index: u32,
    pub offset: u64,
    pub len: u64,
    pub blake3: String,
    /// The last chunk: the file ends here.
    #[serde(rename = "final")]
    pub last: bool,
}

impl Chunk {
    pub fn value(&self) -> Value {
        serde_json::to_value(self).expect("a chunk serialises")
    }
}

/// One channel's recording.
pub struct Recorder {
    file: File,
    name: String,
    started: Instant,
    buf: Vec<u8>,
    written: u64,
    index: u32,
    /// Bytes of output and input so far (for the session's result).
    pub output_bytes: u64,
    pub input_bytes: u64,
}

impl Recorder {
    /// Creates `<dir>/recordings/<name>.cast` (0600, must not exist) and
    /// buffers its header.
    pub fn create(audit_dir: &Path, name: &str, header: &Header) -> Result<Self, RecordingError> {
        let file_name = format!("{name}.cast");
        let err = |source| RecordingError::Io {
            file: file_name.clone(),
            source,
        };
        let dir = audit_dir.join(DIR);
        std::fs::create_dir_all(&dir).map_err(err)?;
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dir.join(&file_name))
            .map_err(err)?;
        let mut r = Self {
            file,
            name: file_name,
            started: Instant::now(),
            buf: Vec::with_capacity(4096),
            written: 0,
            index: 0,
            output_bytes: 0,
            input_bytes: 0,
        };
        let mut h = json!({"version": 2, "width": header.width, "height": header.height, "timestamp": header.timestamp});
        if let Some(c) = &header.command {
            h["command"] = json!(c);
        }
        if let Some(t) = &header.title {
            h["title"] = json!(t);
        }
        r.line(&h);
        Ok(r)
    }

    /// The file name inside the recordings directory.
    pub fn file_name(&self) -> &str {
        &self.name
    }

    fn line(&mut self, v: &Value) {
        serde_json::to_writer(&mut self.buf, v).expect("a JSON value serialises");
        self.buf.push(b'\n');
    }

    fn event(&mut self, code: &str, data: &str) -> Result<Option<Chunk>, RecordingError> {
        let t = self.started.elapsed().as_secs_f64();
        let t = (t * 1e6).round() / 1e6;
        self.line(&json!([t, code, data]));
        if self.buf.len() >= CHUNK_BYTES {
            return self.flush(false).map(Some);
        }
        Ok(None)
    }

    /// Output the client saw (after masking).
    pub fn output(&mut self, data: &[u8]) -> Result<Option<Chunk>, RecordingError> {
        self.output_bytes += data.len() as u64;
        self.event("o", &String::from_utf8_lossy(data))
    }

    /// Input the client sent.
    pub fn input(&mut self, data: &[u8]) -> Result<Option<Chunk>, RecordingError> {
        self.input_bytes += data.len() as u64;
        self.event("i", &String::from_utf8_lossy(data))
    }

    pub fn resize(&mut self, cols: u32, rows: u32) -> Result<Option<Chunk>, RecordingError> {
        self.event("r", &format!("{cols}x{rows}"))
    }

    /// Writes what is buffered as one chunk.
    pub fn flush(&mut self, last: bool) -> Result<Chunk, RecordingError> {
        let err = |source| RecordingError::Io {
            file: self.name.clone(),
            source,
        };
        self.file.write_all(&self.buf).map_err(err)?;
        self.file.sync_data().map_err(err)?;
        let chunk = Chunk {
            file: self.name.clone(),
            index: self.index,
            offset: self.written,
            len: self.buf.len() as u64,
            blake3: blake3::hash(&self.buf).to_hex().to_string(),
            last,
        };
        self.written += self.buf.len() as u64;
        self.index += 1;
        self.buf.clear();
        Ok(chunk)
    }

    /// Ends the recording: the exit status (if any) and the last chunk.
    pub fn finish(mut self, exit_status: Option<u32>) -> Result<Chunk, RecordingError> {
        if let Some(s) = exit_status {
            let t = (self.started.elapsed().as_secs_f64() * 1e6).round() / 1e6;
            self.line(&json!([t, "m", format!("exit-status {s}")]));
        }
        self.flush(true)
    }
}

/// A recording that does not match its chunk records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub file: String,
    /// The seq of the chunk record it fails.
    pub seq: u64,
    pub what: String,
}

/// Checks each chunk (with the seq of its record) against the files in
/// `<audit_dir>/recordings/`: the bytes at its offset hash to its digest, and
/// a final chunk ends its file. Returns the first mismatch.
pub fn verify_chunks(audit_dir: &Path, chunks: &[(u64, Chunk)]) -> Result<(), Mismatch> {
    let dir: PathBuf = audit_dir.join(DIR);
    for (seq, c) in chunks {
        let fail = |what: String| Mismatch {
            file: c.file.clone(),
            seq: *seq,
            what,
        };
        if c.file.contains('/') || c.file.starts_with('.') {
            return Err(fail(
                "the record names a file outside the recordings directory".into(),
            ));
        }
        let mut f = File::open(dir.join(&c.file)).map_err(|e| fail(format!("cannot open: {e}")))?;
        let size = f.metadata().map_err(|e| fail(e.to_string()))?.len();
        if c.offset.saturating_add(c.len) > size {
            return Err(fail(format!(
                "chunk {} ends at byte {} but the file has {size}: cut short",
                c.index,
                c.offset + c.len
            )));
        }
        if c.last && c.offset + c.len != size {
            return Err(fail(format!(
                "the file has {size} bytes, its last chunk ends at {}: bytes were added",
                c.offset + c.len
            )));
        }
        f.seek(SeekFrom::Start(c.offset))
            .map_err(|e| fail(e.to_string()))?;
        let mut buf = vec![
            0u8;
            usize::try_from(c.len)
                .unwrap_or(usize::MAX)
                .min(CHUNK_BYTES * 2)
        ];
        f.read_exact(&mut buf).map_err(|e| fail(e.to_string()))?;
        if blake3::hash(&buf).to_hex().as_str() != c.blake3 {
            return Err(fail(format!(
                "chunk {} (bytes {}..{}) does not match its digest: the recording was changed",
                c.index,
                c.offset,
                c.offset + c.len
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recording_verifies_and_a_changed_byte_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let header = Header {
            width: 80,
            height: 24,
            timestamp: 0,
            command: Some("ls".into()),
            title: None,
        };
        let mut r = Recorder::create(dir.path(), "s1-c0", &header).unwrap();
        let mut chunks = Vec::new();
        r.input(b"ls\r").unwrap();
        for _ in 0..2000 {
            if let Some(c) = r
                .output(b"some output line that is long enough\r\n")
                .unwrap()
            {
                chunks.push((chunks.len() as u64, c));
            }
        }
        r.resize(100, 30).unwrap();
        chunks.push((99, r.finish(Some(0)).unwrap()));
        assert!(chunks.len() > 1, "more than one chunk");
        verify_chunks(dir.path(), &chunks).unwrap();
        let path = dir.path().join(DIR).join("s1-c0.cast");
        let text = std::fs::read_to_string(&path).unwrap();
        let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(first["version"], 2);
        assert!(text.contains(r#""i","ls\r""#), "{}", &text[..200]);
        assert!(text.trim_end().ends_with(r#""m","exit-status 0"]"#));
        // One changed byte.
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.len() - 40;
        bytes[at] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let e = verify_chunks(dir.path(), &chunks).unwrap_err();
        assert_eq!(e.file, "s1-c0.cast");
        assert_eq!(e.seq, 99);
        // Appended bytes.
        bytes[at] ^= 1;
        bytes.extend_from_slice(b"[1.0, \"o\", \"x\"]\n");
        std::fs::write(&path, &bytes).unwrap();
        let e = verify_chunks(dir.path(), &chunks).unwrap_err();
        assert!(e.what.contains("added"), "{e:?}");
    }
}
