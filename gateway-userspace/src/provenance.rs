//! Who opened a proxied connection: the kernel's record (pid, uid, comm,
//! cgroup, taken at `connect()` in the agent's own context) enriched from
//! /proc at accept time.
//!
//! Enrichment is best effort by necessity: a process may exit between its
//! connect and our accept. The kernel fields are always there; /proc fields are
//! `None` when the process is gone. Command lines are size-capped and have
//! credentials removed before they go anywhere.

use std::{fs, path::PathBuf};

use agentgate_common::Provenance;
use serde::Serialize;

use crate::cgroup::Hierarchy;

/// Longest command line kept, in bytes.
pub const MAX_CMDLINE: usize = 4096;

#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
    pub exe: Option<String>,
    pub cmdline: Option<String>,
    pub ppid: Option<u32>,
    /// cgroup path relative to the cgroup2 mount, e.g. "/agentgate/exec-12".
    pub cgroup: Option<String>,
    pub cgroup_id: u64,
    pub tagged_cgroup_id: u64,
}

impl Workload {
    pub fn from_kernel(p: &Provenance, hierarchy: &Hierarchy) -> Self {
        let pid = p.tgid;
        let comm_len = p.comm.iter().position(|&b| b == 0).unwrap_or(p.comm.len());
        Self {
            pid,
            tid: p.pid,
            uid: p.uid,
            gid: p.gid,
            comm: String::from_utf8_lossy(&p.comm[..comm_len]).into_owned(),
            exe: fs::read_link(format!("/proc/{pid}/exe"))
                .ok()
                .map(|p: PathBuf| p.display().to_string()),
            cmdline: read_cmdline(pid),
            ppid: read_ppid(pid),
            cgroup: hierarchy
                .of_process(pid)
                .map(|path| hierarchy.relative(&path)),
            cgroup_id: p.cgroup_id,
            tagged_cgroup_id: p.tagged_cgroup_id,
        }
    }
}

impl Workload {
    /// The fields an audit record carries.
    pub fn to_audit(&self) -> crate::audit::Workload {
        crate::audit::Workload {
            pid: self.pid,
            exe: self.exe.clone(),
            cmdline: self.cmdline.clone(),
            uid: self.uid,
            cgroup: self.cgroup.clone(),
        }
    }
}

fn read_cmdline(pid: u32) -> Option<String> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    if raw.is_empty() {
        return None;
    }
    let raw = &raw[..raw.len().min(MAX_CMDLINE)];
    let args: Vec<String> = raw
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Some(redact_cmdline(&args))
}

/// The process a kernel task id belongs to (itself when /proc says nothing).
pub fn thread_group(tid: u32) -> u32 {
    fs::read_to_string(format!("/proc/{tid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Tgid:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(tid)
}

fn read_ppid(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(1)?.parse().ok()
}

/// Joins arguments with spaces, removing what must not reach a log: the
/// password of `scheme://user:password@host` URLs, the value of
/// `password=`-like key/value pairs, the argument after `--password`-style
/// flags, any argument holding whitespace or quotes (an inline SQL statement
/// or script, whose literals may be personal data: `psql -c "..."`), and any
/// value a PII detector finds (SSN, card number, e-mail, ...).
pub fn redact_cmdline(args: &[String]) -> String {
    const SECRET_KEYS: [&str; 5] = ["password", "passwd", "pwd", "secret", "token"];
    let mut out = Vec::with_capacity(args.len());
    let mut hide_next = false;
    for arg in args {
        if hide_next {
            out.push("<redacted>".to_owned());
            hide_next = false;
            continue;
        }
        let lower = arg.to_ascii_lowercase();
        let flag = lower.trim_start_matches('-');
        if lower.starts_with('-') && SECRET_KEYS.contains(&flag) {
            out.push(arg.clone());
            hide_next = true;
            continue;
        }
        // `-pSECRET`: the MySQL clients' password with the flag attached
        // (also a port for some tools: over-redacting a port is the cheap
        // side of the trade).
        if arg.len() > 2 && arg.starts_with("-p") {
            out.push("-p<redacted>".to_owned());
            continue;
        }
        if arg.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
            out.push(format!("<redacted: {} bytes>", arg.len()));
            continue;
        }
        out.push(redact_pii(&redact_arg(arg, &SECRET_KEYS)));
    }
    out.join(" ")
}

fn redact_pii(arg: &str) -> String {
    let hits: Vec<_> = crate::mask::scan(arg)
        .map(|d| (d.range, d.detector))
        .collect();
    if hits.is_empty() {
        return arg.to_owned();
    }
    let mut out = String::with_capacity(arg.len());
    let mut at = 0;
    for (range, detector) in hits {
        if range.start < at {
            continue;
        }
        out.push_str(&arg[at..range.start]);
        out.push('<');
        out.push_str(detector);
        out.push('>');
        at = range.end;
    }
    out.push_str(&arg[at..]);
    out
}

fn redact_arg(arg: &str, secret_keys: &[&str]) -> String {
    let mut s = arg.to_owned();
    // URL userinfo: scheme://user:pass@host
    if let Some(scheme_end) = s.find("://") {
        let rest_start = scheme_end + 3;
        if let Some(at) = s[rest_start..].find('@') {
            let userinfo = &s[rest_start..rest_start + at];
            if let Some(colon) = userinfo.find(':') {
                s.replace_range(rest_start + colon + 1..rest_start + at, "<redacted>");
            }
        }
    }
    // key=value pairs, separated by spaces, '&', ';' or ','
    let lower = s.to_ascii_lowercase();
    let mut result = String::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        let mut matched = None;
        for key in secret_keys {
            let pat = format!("{key}=");
            if lower[i..].starts_with(&pat)
                && (i == 0 || !lower.as_bytes()[i - 1].is_ascii_alphanumeric())
            {
                matched = Some(pat.len());
                break;
            }
        }
        if let Some(len) = matched {
            result.push_str(&s[i..i + len]);
            result.push_str("<redacted>");
            i += len;
            while i < s.len() && !matches!(s.as_bytes()[i], b' ' | b'&' | b';' | b',') {
                i += 1;
            }
        } else {
            let ch = s[i..].chars().next().unwrap_or(' ');
            result.push(ch);
            i += ch.len_utf8();
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(args: &[&str]) -> String {
        redact_cmdline(&args.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>())
    }

    #[test]
    fn url_passwords_are_removed() {
        assert_eq!(
            r(&["psql", "postgresql://app:hunter2@db:5432/x"]),
            "psql postgresql://app:<redacted>@db:5432/x"
        );
    }

    #[test]
    fn an_attached_short_password_flag_is_removed() {
        assert_eq!(
            r(&["mariadb", "-uapp", "-phunter2", "-h127.0.0.1"]),
            "mariadb -uapp -p<redacted> -h127.0.0.1"
        );
        assert_eq!(r(&["mariadb", "-p"]), "mariadb -p");
    }

    #[test]
    fn key_value_and_flag_secrets_are_removed() {
        assert_eq!(
            r(&["psql", "host=db password=hunter2 user=a"]),
            "psql <redacted: 31 bytes>"
        );
        assert_eq!(r(&["psql", "password=hunter2"]), "psql password=<redacted>");
        assert_eq!(
            r(&["mysql", "--password", "hunter2", "-h", "db"]),
            "mysql --password <redacted> -h db"
        );
        assert_eq!(r(&["x", "?token=abc&y=1"]), "x ?token=<redacted>&y=1");
    }

    #[test]
    fn inline_statements_and_pii_are_removed() {
        assert_eq!(
            r(&["psql", "-c", "UPDATE customers SET ssn = '123-45-6789'"]),
            "psql -c <redacted: 40 bytes>"
        );
        assert_eq!(r(&["agent", "--email=alice@example.com"]), "agent <email>");
    }

    #[test]
    fn ordinary_arguments_pass() {
        assert_eq!(
            r(&["curl", "-sS", "http://127.0.0.1:7777/"]),
            "curl -sS http://127.0.0.1:7777/"
        );
    }

    #[test]
    fn ppid_of_this_process_is_read() {
        let ppid = read_ppid(std::process::id()).unwrap();
        assert!(ppid > 0);
    }
}
