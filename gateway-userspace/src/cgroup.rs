//! cgroup v2: finding the hierarchy, resolving user-given paths inside it,
//! cgroup ids, and the subtree the daemon creates `exec` cgroups in.
//!
//! Paths from the command line are confined to the cgroup2 mount: a path that
//! leaves it (`..`, symlinks) is refused rather than followed.

use std::{
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Component, Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no cgroup2 mount in /proc/self/mountinfo (agentgate needs cgroup v2)")]
    NoCgroup2,
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cgroup {path} does not exist")]
    NotFound { path: PathBuf },
    #[error("cgroup path {path} leaves the cgroup2 hierarchy at {mount}")]
    OutsideHierarchy { path: PathBuf, mount: PathBuf },
    #[error("{op} {path}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The cgroup2 hierarchy of this host.
#[derive(Debug, Clone)]
pub struct Hierarchy {
    mount: PathBuf,
}

impl Hierarchy {
    /// Finds the cgroup2 mount in this process's mount table.
    pub fn discover() -> Result<Self, CgroupError> {
        let path = Path::new("/proc/self/mountinfo");
        let text = fs::read_to_string(path).map_err(|source| CgroupError::Read {
            path: path.into(),
            source,
        })?;
        Self::from_mountinfo(&text)
    }

    /// Parses mountinfo text (see proc(5)): the first `cgroup2` filesystem wins.
    pub fn from_mountinfo(text: &str) -> Result<Self, CgroupError> {
        for line in text.lines() {
            // "36 35 0:30 / /sys/fs/cgroup/unified rw,... shared:9 - cgroup2 cgroup2 rw"
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            if right.split_whitespace().next() != Some("cgroup2") {
                continue;
            }
            if let Some(mount) = left.split_whitespace().nth(4) {
                return Ok(Self {
                    mount: PathBuf::from(unescape_mountinfo(mount)),
                });
            }
        }
        Err(CgroupError::NoCgroup2)
    }

    pub fn at(mount: impl Into<PathBuf>) -> Self {
        Self {
            mount: mount.into(),
        }
    }

    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// Resolves a user-given cgroup path: absolute inside the mount, or relative
    /// to it ("system.slice/agent.service"). The cgroup must exist.
    pub fn resolve(&self, user: &Path) -> Result<PathBuf, CgroupError> {
        let joined = if user.is_absolute() && user.starts_with(&self.mount) {
            user.to_path_buf()
        } else {
            let rel = user.strip_prefix("/").unwrap_or(user);
            if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
                return Err(CgroupError::OutsideHierarchy {
                    path: user.into(),
                    mount: self.mount.clone(),
                });
            }
            self.mount.join(rel)
        };
        let canonical = joined
            .canonicalize()
            .map_err(|_| CgroupError::NotFound { path: user.into() })?;
        if !canonical.starts_with(&self.mount) {
            return Err(CgroupError::OutsideHierarchy {
                path: user.into(),
                mount: self.mount.clone(),
            });
        }
        if !canonical.join("cgroup.procs").exists() {
            return Err(CgroupError::NotFound { path: user.into() });
        }
        Ok(canonical)
    }

    /// The path of a cgroup relative to the mount, as /proc/PID/cgroup shows it.
    pub fn relative(&self, path: &Path) -> String {
        let rel = path.strip_prefix(&self.mount).unwrap_or(path);
        format!("/{}", rel.display())
    }

    /// The cgroup2 path a process is in, from /proc/PID/cgroup ("`0::/a/b`").
    pub fn of_process(&self, pid: u32) -> Option<PathBuf> {
        let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
        Some(self.mount.join(rel.trim_start_matches('/')))
    }
}

/// The cgroups at and below `root`, breadth first, at most `max_depth` levels
/// down and `max` in all (a bound on work per scan, not a correctness limit:
/// deeper or later cgroups are simply not seen by this scan).
pub fn walk(root: &Path, max_depth: usize, max: usize) -> Vec<PathBuf> {
    let mut out = vec![root.to_path_buf()];
    let mut frontier = vec![root.to_path_buf()];
    for _ in 0..max_depth {
        let mut next = Vec::new();
        for dir in &frontier {
            let Ok(entries) = fs::read_dir(dir) else {
                continue;
            };
            for e in entries.filter_map(Result::ok) {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    if out.len() >= max {
                        return out;
                    }
                    out.push(e.path());
                    next.push(e.path());
                }
            }
        }
        if next.is_empty() {
            break;
        }
        frontier = next;
    }
    out
}

/// The kernel's id of a cgroup: its inode number in cgroup2fs, the value
/// `bpf_get_current_cgroup_id` returns.
pub fn id(path: &Path) -> Result<u64, CgroupError> {
    fs::metadata(path)
        .map(|m| m.ino())
        .map_err(|source| CgroupError::Io {
            op: "stat",
            path: path.into(),
            source,
        })
}

pub fn create(path: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(CgroupError::Io {
            op: "mkdir",
            path: path.into(),
            source,
        }),
    }
}

/// Removes an empty cgroup. `Ok(false)` when it still has processes.
pub fn remove(path: &Path) -> Result<bool, CgroupError> {
    match fs::remove_dir(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Ok(false),
        Err(source) => Err(CgroupError::Io {
            op: "rmdir",
            path: path.into(),
            source,
        }),
    }
}

/// Moves a process into a cgroup.
pub fn enter(path: &Path, pid: u32) -> Result<(), CgroupError> {
    let procs = path.join("cgroup.procs");
    fs::write(&procs, pid.to_string()).map_err(|source| CgroupError::Io {
        op: "write",
        path: procs,
        source,
    })
}

/// The kernel task ids (threads included) in a cgroup and below it, at most `max`.
pub fn tasks_below(path: &Path, max: usize) -> Vec<u32> {
    let mut out = Vec::new();
    for cg in walk(path, 8, 1024) {
        let Ok(procs) = fs::read_to_string(cg.join("cgroup.procs")) else {
            continue;
        };
        for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            let tids: Vec<u32> = fs::read_dir(format!("/proc/{pid}/task")).map_or_else(
                |_| vec![pid],
                |d| {
                    d.filter_map(Result::ok)
                        .filter_map(|e| e.file_name().to_str()?.parse().ok())
                        .collect()
                },
            );
            for tid in tids {
                if out.len() >= max {
                    return out;
                }
                out.push(tid);
            }
        }
    }
    out
}

/// Whether any process lives in the cgroup or below it.
pub fn populated(path: &Path) -> bool {
    fs::read_to_string(path.join("cgroup.events"))
        .is_ok_and(|t| t.lines().any(|l| l == "populated 1"))
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mountinfo(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        if let Some(b) = code {
            out.push(char::from(b));
            rest = &rest[i + 4..];
        } else {
            out.push('\\');
            rest = &rest[i + 1..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_mode_cgroup2_mount() {
        let text = "25 30 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                    26 25 0:24 / /sys/fs/cgroup/unified rw,nosuid shared:5 - cgroup2 cgroup2 rw,nsdelegate\n\
                    27 25 0:25 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n";
        let h = Hierarchy::from_mountinfo(text).unwrap();
        assert_eq!(h.mount(), Path::new("/sys/fs/cgroup/unified"));
    }

    #[test]
    fn finds_unified_mode_mount_with_optional_fields() {
        let text =
            "30 23 0:26 / /sys/fs/cgroup rw,nosuid,nodev shared:4 master:1 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            Hierarchy::from_mountinfo(text).unwrap().mount(),
            Path::new("/sys/fs/cgroup")
        );
    }

    #[test]
    fn no_cgroup2_is_an_error() {
        let text = "27 25 0:25 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n";
        assert!(matches!(
            Hierarchy::from_mountinfo(text),
            Err(CgroupError::NoCgroup2)
        ));
    }

    #[test]
    fn unescapes_spaces_in_mount_points() {
        assert_eq!(unescape_mountinfo(r"/mnt/my\040cgroup"), "/mnt/my cgroup");
    }

    #[test]
    fn relative_paths_cannot_climb_out() {
        let h = Hierarchy::at("/sys/fs/cgroup/unified");
        assert!(matches!(
            h.resolve(Path::new("../../etc")),
            Err(CgroupError::OutsideHierarchy { .. })
        ));
    }
}
