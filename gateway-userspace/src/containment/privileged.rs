//! Root processes inside tagged cgroups, for `agentgate status`.
//!
//! A process with effective uid 0 can write itself into another cgroup's
//! `cgroup.procs` and leave containment, so an operator should see every one.
//! The scan reads /proc at the moment `status` asks and is bounded (cgroups
//! walked, processes reported); it is a report, not an enforcement point, so
//! it fails open: a process it cannot read, or one past the bounds, is simply
//! not listed. Leaving a cgroup is caught by the escape watcher instead.

use std::{collections::HashSet, fs, path::Path};

use serde::Serialize;

use crate::{binding::Binding, cgroup::Hierarchy};

/// Most root processes one scan reports.
pub const MAX_REPORTED: usize = 64;
/// How deep below each tagged cgroup, and how many cgroups in all, one scan walks.
const MAX_DEPTH: usize = 8;
const MAX_CGROUPS: usize = 4096;
/// Most processes one scan reads the status of.
const MAX_EXAMINED: usize = 16_384;

/// A process running as root inside a tagged cgroup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RootProcess {
    pub pid: u32,
    /// The process's cgroup, relative to the cgroup2 mount.
    pub cgroup: String,
    /// The identity of the binding that governs that cgroup.
    pub identity: String,
    pub exe: Option<String>,
}

/// The effective uid in the text of /proc/PID/status (the second number of
/// its `Uid:` line: real, effective, saved, filesystem).
pub fn effective_uid(status: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Root processes in the cgroups of `tagged` and below, at most `max`.
/// Processes in `exempt` are left out: the `agentgate exec` processes that
/// own an exec cgroup wait there as root for their command, and run only
/// agentgate's own code.
pub fn scan(
    hierarchy: &Hierarchy,
    tagged: &[Binding],
    exempt: &[u32],
    max: usize,
) -> Vec<RootProcess> {
    let mut out = Vec::new();
    let mut seen_cgroups = HashSet::new();
    let mut budget = MAX_CGROUPS;
    let mut examined = 0usize;
    for binding in tagged {
        if budget == 0 {
            break;
        }
        let cgroups = crate::cgroup::walk(&binding.cgroup, MAX_DEPTH, budget);
        budget = budget.saturating_sub(cgroups.len());
        for cgroup in cgroups {
            // A tagged cgroup below another one is walked twice; list it once.
            if !seen_cgroups.insert(cgroup.clone()) {
                continue;
            }
            let Ok(procs) = fs::read_to_string(cgroup.join("cgroup.procs")) else {
                continue;
            };
            for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
                if exempt.contains(&pid) {
                    continue;
                }
                if out.len() >= max || examined >= MAX_EXAMINED {
                    return out;
                }
                examined += 1;
                if !is_root(pid) {
                    continue;
                }
                out.push(RootProcess {
                    pid,
                    cgroup: hierarchy.relative(&cgroup),
                    identity: nearest(tagged, &cgroup)
                        .map_or_else(|| binding.identity.clone(), |b| b.identity.clone()),
                    exe: fs::read_link(format!("/proc/{pid}/exe"))
                        .ok()
                        .map(|p| p.display().to_string()),
                });
            }
        }
    }
    out
}

fn is_root(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| effective_uid(&s))
        == Some(0)
}

/// The binding whose cgroup is the nearest ancestor of (or is) `cgroup`.
fn nearest<'a>(tagged: &'a [Binding], cgroup: &Path) -> Option<&'a Binding> {
    tagged
        .iter()
        .filter(|b| cgroup.starts_with(&b.cgroup))
        .max_by_key(|b| b.cgroup.components().count())
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Name:\tpython3\nUmask:\t0022\nState:\tS (sleeping)\n\
        Tgid:\t4242\nPid:\t4242\nPPid:\t4200\nTracerPid:\t0\n\
        Uid:\t65534\t0\t0\t0\nGid:\t65534\t65534\t65534\t65534\nFDSize:\t64\n";

    #[test]
    fn effective_uid_is_the_second_uid_field() {
        assert_eq!(effective_uid(STATUS), Some(0));
        assert_eq!(
            effective_uid("Name:\tx\nUid:\t0\t1000\t1000\t1000\n"),
            Some(1000)
        );
    }

    #[test]
    fn status_without_a_uid_line_has_no_effective_uid() {
        assert_eq!(effective_uid("Name:\tx\nGid:\t0\t0\t0\t0\n"), None);
        assert_eq!(effective_uid("Uid:\t0\n"), None);
        assert_eq!(effective_uid("Uid:\t0\tx\t0\t0\n"), None);
    }

    #[test]
    fn the_nearest_tagged_ancestor_names_the_identity() {
        let b = |id: u32, identity: &str, path: &str| Binding {
            id,
            identity: identity.into(),
            cgroup: path.into(),
            cgroup_id: u64::from(id),
            kind: crate::binding::BindingKind::Tag,
            since: String::new(),
        };
        let tagged = [b(1, "outer", "/cg/a"), b(2, "inner", "/cg/a/b")];
        let name = |p: &str| nearest(&tagged, Path::new(p)).map(|b| b.identity.as_str());
        assert_eq!(name("/cg/a/b/c"), Some("inner"));
        assert_eq!(name("/cg/a/x"), Some("outer"));
        assert_eq!(name("/cg/ab"), None, "a sibling with a common prefix");
    }
}
