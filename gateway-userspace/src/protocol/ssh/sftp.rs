//! The SFTP (version 3, `draft-ietf-secsh-filexfer-02`, OpenSSH's) wire
//! format, as far as the handler judges it: packets framed out of a
//! channel's byte stream, requests decoded to what they touch (paths,
//! handles, byte counts), replies decoded to what answers them. Sans-IO and
//! fuzzed (`ssh_command`).
//!
//! Hand-written and small: no maintained crate exposes SFTP's packets
//! without its own client or server. Every limit on the peer's input is
//! explicit ([`MAX_PACKET`], [`MAX_PATH`], [`MAX_HANDLE`]); a packet that
//! breaks one, or cannot be decoded, is an error and the relay ends the
//! channel (fails closed). A request this module does not know is
//! [`Op::Unsupported`], which the relay refuses.

use std::fmt;

/// Longest packet either side may send (OpenSSH's `sftp-server` takes
/// 256 KiB; the 4-byte length is not counted).
pub const MAX_PACKET: usize = 256 * 1024 + 1024;
/// Longest path (bytes) a request may name.
pub const MAX_PATH: usize = 4096;
/// Longest handle (bytes) the server may hand out (OpenSSH's are 4).
pub const MAX_HANDLE: usize = 256;

/// Packet types.
pub mod kind {
    pub const INIT: u8 = 1;
    pub const VERSION: u8 = 2;
    pub const OPEN: u8 = 3;
    pub const CLOSE: u8 = 4;
    pub const READ: u8 = 5;
    pub const WRITE: u8 = 6;
    pub const LSTAT: u8 = 7;
    pub const FSTAT: u8 = 8;
    pub const SETSTAT: u8 = 9;
    pub const FSETSTAT: u8 = 10;
    pub const OPENDIR: u8 = 11;
    pub const READDIR: u8 = 12;
    pub const REMOVE: u8 = 13;
    pub const MKDIR: u8 = 14;
    pub const RMDIR: u8 = 15;
    pub const REALPATH: u8 = 16;
    pub const STAT: u8 = 17;
    pub const RENAME: u8 = 18;
    pub const READLINK: u8 = 19;
    pub const SYMLINK: u8 = 20;
    pub const STATUS: u8 = 101;
    pub const HANDLE: u8 = 102;
    pub const DATA: u8 = 103;
    pub const EXTENDED: u8 = 200;
}

/// `SSH_FXF_*` open flags.
pub mod pflags {
    pub const READ: u32 = 0x01;
    pub const WRITE: u32 = 0x02;
    pub const APPEND: u32 = 0x04;
    pub const CREAT: u32 = 0x08;
    pub const TRUNC: u32 = 0x10;
}

/// `SSH_FX_*` status codes the relay sends.
pub mod status {
    pub const OK: u32 = 0;
    pub const PERMISSION_DENIED: u32 = 3;
    pub const FAILURE: u32 = 4;
    pub const OP_UNSUPPORTED: u32 = 8;
}

/// Why a packet is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SftpError {
    #[error("sftp packet of {0} bytes is over the limit")]
    TooLong(usize),
    #[error("sftp packet is empty")]
    Empty,
    #[error("sftp packet is truncated")]
    Truncated,
    #[error("sftp {0} is over the limit")]
    Limit(&'static str),
}

/// Cuts a byte stream into whole packets (each with its 4-byte length).
#[derive(Default)]
pub struct Framer {
    buf: Vec<u8>,
}

impl Framer {
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole packet, if one is buffered. An oversized length is an
    /// error at once (nothing more is buffered for it).
    pub fn next_packet(&mut self) -> Result<Option<Vec<u8>>, SftpError> {
        let Some(len) = self.buf.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(len.try_into().expect("4 bytes")) as usize;
        if len > MAX_PACKET {
            return Err(SftpError::TooLong(len));
        }
        if len == 0 {
            return Err(SftpError::Empty);
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let rest = self.buf.split_off(4 + len);
        Ok(Some(std::mem::replace(&mut self.buf, rest)))
    }

    /// Bytes of a packet not yet complete.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn u8(&mut self) -> Result<u8, SftpError> {
        let (&b, rest) = self.0.split_first().ok_or(SftpError::Truncated)?;
        self.0 = rest;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32, SftpError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes(b.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, SftpError> {
        let b = self.take(8)?;
        Ok(u64::from_be_bytes(b.try_into().expect("8 bytes")))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], SftpError> {
        if self.0.len() < n {
            return Err(SftpError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    fn string(&mut self, max: usize, what: &'static str) -> Result<&'a [u8], SftpError> {
        let n = self.u32()? as usize;
        if n > max {
            return Err(SftpError::Limit(what));
        }
        self.take(n)
    }

    fn path(&mut self) -> Result<String, SftpError> {
        Ok(String::from_utf8_lossy(self.string(MAX_PATH, "path")?).into_owned())
    }

    fn handle(&mut self) -> Result<Handle, SftpError> {
        Ok(Handle(self.string(MAX_HANDLE, "handle")?.to_vec()))
    }
}

/// A server's file or directory handle (opaque bytes).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Handle(pub Vec<u8>);

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Handle({} bytes)", self.0.len())
    }
}

/// What a request does, as the relay judges it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `SSH_FXP_INIT` (no request id).
    Init,
    /// Opens a file: for writing if any of write, append, create, truncate.
    Open {
        path: String,
        write: bool,
    },
    Opendir {
        path: String,
    },
    Close {
        handle: Handle,
    },
    Read {
        handle: Handle,
        len: u32,
    },
    /// `len`: the data's length (the data is not kept).
    Write {
        handle: Handle,
        len: usize,
    },
    Readdir {
        handle: Handle,
    },
    /// Changes the file system by path: remove, rename, mkdir, rmdir,
    /// setstat, symlink, and the OpenSSH extensions posix-rename, hardlink,
    /// lsetstat. `paths`: every path it touches.
    Change {
        op: &'static str,
        paths: Vec<String>,
    },
    /// Changes a file through its handle (fsetstat).
    HandleChange {
        op: &'static str,
        handle: Handle,
    },
    /// Looks at names and attributes only (stat, lstat, realpath, readlink,
    /// statvfs, limits, expand-path, home-directory...).
    Meta {
        op: &'static str,
    },
    /// Looks at an open handle (fstat, fstatvfs, fsync).
    HandleMeta {
        op: &'static str,
        handle: Handle,
    },
    /// Not decoded: refused.
    Unsupported {
        name: String,
    },
}

/// One client request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `None` only for `INIT`.
    pub id: Option<u32>,
    pub op: Op,
}

/// Decodes a whole request packet (with its length prefix).
pub fn parse_request(packet: &[u8]) -> Result<Request, SftpError> {
    let mut r = Reader(packet.get(4..).ok_or(SftpError::Truncated)?);
    let t = r.u8()?;
    if t == kind::INIT {
        r.u32()?;
        return Ok(Request {
            id: None,
            op: Op::Init,
        });
    }
    let id = r.u32()?;
    let op = match t {
        kind::OPEN => {
            let path = r.path()?;
            let flags = r.u32()?;
            let write =
                flags & (pflags::WRITE | pflags::APPEND | pflags::CREAT | pflags::TRUNC) != 0;
            Op::Open { path, write }
        }
        kind::OPENDIR => Op::Opendir { path: r.path()? },
        kind::CLOSE => Op::Close {
            handle: r.handle()?,
        },
        kind::READ => {
            let handle = r.handle()?;
            r.u64()?;
            Op::Read {
                handle,
                len: r.u32()?,
            }
        }
        kind::WRITE => {
            let handle = r.handle()?;
            r.u64()?;
            let data = r.string(MAX_PACKET, "data")?;
            Op::Write {
                handle,
                len: data.len(),
            }
        }
        kind::READDIR => Op::Readdir {
            handle: r.handle()?,
        },
        kind::REMOVE => change("remove", vec![r.path()?]),
        kind::MKDIR => change("mkdir", vec![r.path()?]),
        kind::RMDIR => change("rmdir", vec![r.path()?]),
        kind::SETSTAT => change("setstat", vec![r.path()?]),
        kind::RENAME => change("rename", vec![r.path()?, r.path()?]),
        kind::SYMLINK => change("symlink", vec![r.path()?, r.path()?]),
        kind::FSETSTAT => Op::HandleChange {
            op: "fsetstat",
            handle: r.handle()?,
        },
        kind::STAT => meta("stat", &mut r)?,
        kind::LSTAT => meta("lstat", &mut r)?,
        kind::REALPATH => meta("realpath", &mut r)?,
        kind::READLINK => meta("readlink", &mut r)?,
        kind::FSTAT => Op::HandleMeta {
            op: "fstat",
            handle: r.handle()?,
        },
        kind::EXTENDED => extended(&mut r)?,
        other => Op::Unsupported {
            name: format!("packet type {other}"),
        },
    };
    Ok(Request { id: Some(id), op })
}

fn change(op: &'static str, paths: Vec<String>) -> Op {
    Op::Change { op, paths }
}

fn meta(op: &'static str, r: &mut Reader<'_>) -> Result<Op, SftpError> {
    r.path()?;
    Ok(Op::Meta { op })
}

fn extended(r: &mut Reader<'_>) -> Result<Op, SftpError> {
    let name = r.string(256, "extension name")?;
    Ok(match name {
        b"posix-rename@openssh.com" => change("posix-rename", vec![r.path()?, r.path()?]),
        b"hardlink@openssh.com" => change("hardlink", vec![r.path()?, r.path()?]),
        b"lsetstat@openssh.com" => change("lsetstat", vec![r.path()?]),
        b"statvfs@openssh.com" => meta("statvfs", r)?,
        b"expand-path@openssh.com" => meta("expand-path", r)?,
        b"limits@openssh.com" => Op::Meta { op: "limits" },
        b"home-directory" => Op::Meta {
            op: "home-directory",
        },
        b"fstatvfs@openssh.com" => Op::HandleMeta {
            op: "fstatvfs",
            handle: r.handle()?,
        },
        b"fsync@openssh.com" => Op::HandleMeta {
            op: "fsync",
            handle: r.handle()?,
        },
        other => Op::Unsupported {
            name: String::from_utf8_lossy(other).into_owned(),
        },
    })
}

/// A server reply, as far as the relay follows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Version,
    Status {
        id: u32,
        code: u32,
    },
    Handle {
        id: u32,
        handle: Handle,
    },
    Data {
        id: u32,
        len: usize,
    },
    /// Names, attributes, extended replies: passed on as they are.
    Other {
        id: u32,
    },
}

/// Decodes a whole reply packet (with its length prefix).
pub fn parse_reply(packet: &[u8]) -> Result<Reply, SftpError> {
    let mut r = Reader(packet.get(4..).ok_or(SftpError::Truncated)?);
    let t = r.u8()?;
    if t == kind::VERSION {
        r.u32()?;
        return Ok(Reply::Version);
    }
    let id = r.u32()?;
    Ok(match t {
        kind::STATUS => Reply::Status { id, code: r.u32()? },
        kind::HANDLE => Reply::Handle {
            id,
            handle: r.handle()?,
        },
        kind::DATA => Reply::Data {
            id,
            len: r.string(MAX_PACKET, "data")?.len(),
        },
        _ => Reply::Other { id },
    })
}

/// An `SSH_FXP_STATUS` packet answering `id` (the message cut to 512 bytes).
pub fn status_packet(id: u32, code: u32, message: &str) -> Vec<u8> {
    let msg = crate::gate::truncate_chars(message, 500);
    let body_len = 1 + 4 + 4 + 4 + msg.len() + 4;
    let mut p = Vec::with_capacity(4 + body_len);
    p.extend_from_slice(&u32::try_from(body_len).expect("short").to_be_bytes());
    p.push(kind::STATUS);
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(&code.to_be_bytes());
    p.extend_from_slice(&u32::try_from(msg.len()).expect("short").to_be_bytes());
    p.extend_from_slice(msg.as_bytes());
    p.extend_from_slice(&0u32.to_be_bytes()); // language tag
    p
}

/// `path` with `.` and `..` resolved lexically (what a rule's glob is
/// matched against, so `/tmp/../etc/passwd` is judged as `/etc/passwd`).
/// A relative path stays relative (relative to the login's home: it
/// matches no absolute glob). Symbolic links on the host are not resolved.
pub fn normalize(path: &str) -> String {
    let absolute = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for p in path.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|l| *l != "..") {
                    parts.pop();
                } else if !absolute {
                    parts.push("..");
                }
            }
            p => parts.push(p),
        }
    }
    let joined = parts.join("/");
    match (absolute, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".to_owned(),
        (false, false) => joined,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(t: u8, body: &[u8]) -> Vec<u8> {
        let mut p = u32::try_from(body.len() + 1)
            .unwrap()
            .to_be_bytes()
            .to_vec();
        p.push(t);
        p.extend_from_slice(body);
        p
    }

    fn s(b: &[u8]) -> Vec<u8> {
        let mut v = u32::try_from(b.len()).unwrap().to_be_bytes().to_vec();
        v.extend_from_slice(b);
        v
    }

    fn open(id: u32, path: &str, flags: u32) -> Vec<u8> {
        let mut b = id.to_be_bytes().to_vec();
        b.extend(s(path.as_bytes()));
        b.extend(flags.to_be_bytes());
        b.extend(0u32.to_be_bytes()); // attrs: no flags
        packet(kind::OPEN, &b)
    }

    #[test]
    fn requests_decode_to_what_they_touch() {
        let r = parse_request(&open(7, "/tmp/x", pflags::WRITE | pflags::CREAT)).unwrap();
        assert_eq!(r.id, Some(7));
        assert_eq!(
            r.op,
            Op::Open {
                path: "/tmp/x".into(),
                write: true
            }
        );
        let r = parse_request(&open(8, "/etc/hostname", pflags::READ)).unwrap();
        assert!(matches!(r.op, Op::Open { write: false, .. }));
        let mut b = 9u32.to_be_bytes().to_vec();
        b.extend(s(b"/a"));
        b.extend(s(b"/b"));
        let r = parse_request(&packet(kind::RENAME, &b)).unwrap();
        assert_eq!(r.op, change("rename", vec!["/a".into(), "/b".into()]));
        let mut b = 10u32.to_be_bytes().to_vec();
        b.extend(s(b"posix-rename@openssh.com"));
        b.extend(s(b"/c"));
        b.extend(s(b"/d"));
        let r = parse_request(&packet(kind::EXTENDED, &b)).unwrap();
        assert_eq!(r.op, change("posix-rename", vec!["/c".into(), "/d".into()]));
        let mut b = 11u32.to_be_bytes().to_vec();
        b.extend(s(b"copy-data"));
        let r = parse_request(&packet(kind::EXTENDED, &b)).unwrap();
        assert!(matches!(r.op, Op::Unsupported { .. }), "{r:?}");
        let mut b = 12u32.to_be_bytes().to_vec();
        b.extend(s(b"h1"));
        b.extend(5u64.to_be_bytes());
        b.extend(s(&[0u8; 1000]));
        let r = parse_request(&packet(kind::WRITE, &b)).unwrap();
        assert_eq!(
            r.op,
            Op::Write {
                handle: Handle(b"h1".to_vec()),
                len: 1000
            }
        );
    }

    #[test]
    fn hostile_packets_are_errors_not_panics() {
        // Oversized length: refused before buffering it.
        let mut f = Framer::default();
        f.push(&u32::MAX.to_be_bytes());
        assert_eq!(f.next_packet(), Err(SftpError::TooLong(u32::MAX as usize)));
        let mut f = Framer::default();
        f.push(&0u32.to_be_bytes());
        assert_eq!(f.next_packet(), Err(SftpError::Empty));
        // A string longer than its packet.
        let mut b = 1u32.to_be_bytes().to_vec();
        b.extend(1000u32.to_be_bytes());
        b.extend(b"/x");
        assert_eq!(
            parse_request(&packet(kind::OPEN, &b)),
            Err(SftpError::Truncated)
        );
        // A path over the limit.
        let long = "a".repeat(MAX_PATH + 1);
        assert_eq!(
            parse_request(&open(1, &long, pflags::READ)),
            Err(SftpError::Limit("path"))
        );
        // Truncated everywhere: every prefix of a valid packet fails cleanly.
        let ok = open(3, "/tmp/file", pflags::WRITE);
        for n in 0..ok.len() - 4 {
            let mut p = ok[..n].to_vec();
            if p.len() >= 4 {
                p[..4].copy_from_slice(&u32::try_from(n - 4).unwrap().to_be_bytes());
            }
            assert!(parse_request(&p).is_err(), "prefix {n}");
        }
        // Replies: a handle over the limit, a truncated status.
        let mut b = 1u32.to_be_bytes().to_vec();
        b.extend(s(&[1u8; MAX_HANDLE + 1]));
        assert_eq!(
            parse_reply(&packet(kind::HANDLE, &b)),
            Err(SftpError::Limit("handle"))
        );
        assert_eq!(
            parse_reply(&packet(kind::STATUS, &1u32.to_be_bytes())),
            Err(SftpError::Truncated)
        );
    }

    #[test]
    fn the_framer_joins_split_packets_and_splits_joined_ones() {
        let a = open(1, "/a", pflags::READ);
        let b = open(2, "/b", pflags::READ);
        let mut all = a.clone();
        all.extend(&b);
        let mut f = Framer::default();
        f.push(&all[..3]);
        assert_eq!(f.next_packet(), Ok(None));
        let n = a.len();
        f.push(&all[3..n + 2]);
        assert_eq!(f.next_packet(), Ok(Some(a)));
        assert_eq!(f.next_packet(), Ok(None));
        f.push(&all[n + 2..]);
        assert_eq!(f.next_packet(), Ok(Some(b)));
        assert_eq!(f.pending(), 0);
    }

    #[test]
    fn status_packets_round_trip() {
        let p = status_packet(42, status::PERMISSION_DENIED, "denied by rule x");
        assert_eq!(
            parse_reply(&p),
            Ok(Reply::Status {
                id: 42,
                code: status::PERMISSION_DENIED
            })
        );
        let mut f = Framer::default();
        f.push(&p);
        assert_eq!(f.next_packet(), Ok(Some(p)));
    }

    #[test]
    fn paths_are_judged_after_dot_dot() {
        assert_eq!(normalize("/tmp/../etc/passwd"), "/etc/passwd");
        assert_eq!(normalize("/../../etc//./shadow"), "/etc/shadow");
        assert_eq!(normalize("a/../../b"), "../b");
        assert_eq!(normalize("./"), ".");
        assert_eq!(normalize("/"), "/");
    }
}
