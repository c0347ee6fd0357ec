//! The policy in force, and reloading it.
//!
//! Fails safe on reload: a new policy that does not load is rejected and the
//! old one stays in force (never a half-applied or empty policy). Both outcomes
//! are returned to the caller, who audits them. Readers take an `Arc` snapshot
//! (`current()`), so a decision in flight finishes under the policy it began with.

use std::{
    future::Future,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;

use super::{PolicyError, PolicyErrors, PolicySet, archive::PolicyArchive, load_dir};
use crate::mask::MaskKey;

/// A policy file as the reload found it: who the host says owns it and
/// when it was last written (the host records no more about who changed it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FileStamp {
    pub name: String,
    pub bytes: u64,
    /// Last modification, RFC 3339 UTC (`None` if the host cannot tell).
    pub modified: Option<String>,
    /// Owner uid, and its name from the passwd database when known.
    pub owner_uid: u32,
    pub owner: Option<String>,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(FileStamp {
        name: path.file_name()?.to_string_lossy().into_owned(),
        bytes: m.len(),
        modified: m.modified().ok().map(crate::time::rfc3339),
        owner_uid: m.uid(),
        owner: user_name(m.uid()),
    })
}

/// The name of `uid` in /etc/passwd, if listed.
fn user_name(uid: u32) -> Option<String> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let id: u32 = f.nth(1)?.parse().ok()?;
        (id == uid).then(|| name.to_owned())
    })
}

/// What a successful reload installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadOutcome {
    pub dir: PathBuf,
    pub files: Vec<PathBuf>,
    pub resources: usize,
    pub rules: usize,
    /// BLAKE3 over the files' names and contents: identifies the policy version in records.
    pub digest: String,
    /// The digest of the policy replaced.
    pub previous_digest: String,
    /// Where the archive keeps this version (`None` without an archive).
    pub archived: Option<PathBuf>,
    /// Each file's owner and modification time, as the host reports them.
    pub stamps: Vec<FileStamp>,
}

/// Holds the current [`PolicySet`].
#[derive(Debug)]
pub struct PolicyStore {
    dir: PathBuf,
    current: ArcSwap<PolicySet>,
    mask_key: Option<Arc<MaskKey>>,
    archive: Option<PolicyArchive>,
}

impl PolicyStore {
    /// Load `dir`; fails if it does not load (a daemon must not start without a valid policy).
    pub fn open(dir: &Path, mask_key: Option<Arc<MaskKey>>) -> Result<Self, PolicyErrors> {
        let set = load_dir(dir)?.with_mask_key(mask_key.as_ref());
        Ok(PolicyStore {
            dir: dir.to_owned(),
            current: ArcSwap::from_pointee(set),
            mask_key,
            archive: None,
        })
    }

    /// [`PolicyStore::open`], archiving the version loaded and every version
    /// a reload puts in force (a version that cannot be archived is not put
    /// in force). Returns the store and where the first version is archived.
    pub fn open_archived(
        dir: &Path,
        mask_key: Option<Arc<MaskKey>>,
        archive: PolicyArchive,
    ) -> Result<(Self, PathBuf), PolicyErrors> {
        let mut store = Self::open(dir, mask_key)?;
        let at = archive
            .store(&store.current())
            .map_err(|e| archive_error(&archive, &e))?;
        store.archive = Some(archive);
        Ok((store, at))
    }

    /// Wrap an already-loaded set (tests, tools).
    pub fn from_set(dir: &Path, set: PolicySet, mask_key: Option<Arc<MaskKey>>) -> Self {
        PolicyStore {
            dir: dir.to_owned(),
            current: ArcSwap::from_pointee(set.with_mask_key(mask_key.as_ref())),
            mask_key,
            archive: None,
        }
    }

    /// The directory this store loads from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A snapshot of the policy in force.
    pub fn current(&self) -> Arc<PolicySet> {
        self.current.load_full()
    }

    /// Load `dir` and, if it is valid, make it the policy in force; otherwise
    /// keep the current one and return every error. DNS answers for names the
    /// new policy still uses are carried over; call [`PolicyStore::refresh_dns`]
    /// after to pick up new names.
    pub fn reload(&self, dir: &Path) -> Result<ReloadOutcome, PolicyErrors> {
        let new = load_dir(dir)?.with_mask_key(self.mask_key.as_ref());
        let archived = match &self.archive {
            Some(a) => Some(a.store(&new).map_err(|e| archive_error(a, &e))?),
            None => None,
        };
        let old = self.current.load_full();
        new.inherit_dns(&old);
        let outcome = ReloadOutcome {
            archived,
            stamps: new.files().iter().filter_map(|p| stamp(p)).collect(),
            dir: dir.to_owned(),
            files: new.files().to_vec(),
            resources: new.resources().len(),
            rules: new.rules().len(),
            digest: new.digest().to_owned(),
            previous_digest: old.digest().to_owned(),
        };
        self.current.store(Arc::new(new));
        Ok(outcome)
    }

    /// Resolve the current policy's DNS names again.
    pub async fn refresh_dns(&self) {
        self.current().refresh_dns().await;
    }
}

fn archive_error(archive: &PolicyArchive, e: &super::archive::ArchiveError) -> PolicyErrors {
    PolicyErrors(vec![PolicyError {
        file: archive.dir().to_owned(),
        line: 0,
        column: 0,
        message: format!("cannot archive the policy, so it is not put in force: {e}"),
    }])
}

/// A watcher's report.
#[derive(Debug)]
pub enum WatchEvent {
    /// Files changed and the new policy is in force.
    Reloaded(ReloadOutcome),
    /// Files changed and the new policy was rejected; the old one stays.
    Rejected(PolicyErrors),
}

/// How often the watcher looks.
#[derive(Debug, Clone, Copy)]
pub struct WatchOptions {
    /// Poll the policy files' names, sizes and mtimes this often.
    pub poll: Duration,
    /// Re-resolve DNS names this often.
    pub dns_refresh: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            poll: Duration::from_secs(2),
            dns_refresh: Duration::from_mins(1),
        }
    }
}

/// Names, sizes and mtimes of the `*.toml` files in `dir`: what "changed" means.
fn dir_stamp(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "toml")
                && let Ok(m) = std::fs::metadata(&p)
            {
                out.push((p, m.len(), m.modified().ok()));
            }
        }
    }
    out.sort();
    out
}

/// Poll the store's directory and reload on change; refresh DNS periodically.
/// Runs until `shutdown` completes. Uses tokio time, so tests can pause it.
pub async fn watch(
    store: Arc<PolicyStore>,
    opts: WatchOptions,
    mut on_event: impl FnMut(WatchEvent) + Send,
    shutdown: impl Future<Output = ()>,
) {
    let mut stamp = dir_stamp(store.dir());
    let mut poll = tokio::time::interval(opts.poll);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut dns = tokio::time::interval(opts.dns_refresh);
    dns.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            _ = poll.tick() => {
                let now = dir_stamp(store.dir());
                if now != stamp {
                    stamp = now;
                    let event = match store.reload(store.dir()) {
                        Ok(outcome) => {
                            tracing::info!(digest = %outcome.digest, "policy reloaded");
                            store.refresh_dns().await;
                            WatchEvent::Reloaded(outcome)
                        }
                        Err(errors) => {
                            tracing::warn!(errors = errors.0.len(), "new policy rejected; the previous policy stays in force");
                            WatchEvent::Rejected(errors)
                        }
                    };
                    on_event(event);
                }
            }
            _ = dns.tick() => store.refresh_dns().await,
        }
    }
}
