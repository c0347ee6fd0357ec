//! The policy archive: every policy version the daemon put in force, kept by
//! digest under `<state_dir>/policies/<digest>/` as the exact files loaded,
//! so a `policy_digest` in any record can be turned back into rules (by
//! `agentgate evidence` and `agentgate policy diff`).
//!
//! Fails closed: a version is archived before it is put in force, and a
//! version that cannot be archived is not put in force (the daemon refuses
//! to start, a reload is rejected). A version is written to a temporary
//! directory, each file fsynced, then renamed into place, so a digest's
//! directory is either complete or absent. Reading back checks the digest
//! again, so an archive altered after the fact is reported, not used.
//! Nothing here deletes: archived versions are small and are kept as long as
//! the state directory (see README "Policy versions").

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use super::{PolicyErrors, PolicySet, load_dir};

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{0}` is not a policy digest (64 hex digits)")]
    BadDigest(String),
    #[error("no archived policy {digest} in {}", dir.display())]
    Missing { digest: String, dir: PathBuf },
    #[error("archived policy {} does not load:\n{errors}", path.display())]
    Invalid { path: PathBuf, errors: PolicyErrors },
    #[error("archived policy {} has digest {found}, not {digest}: it was changed after it was archived", path.display())]
    Altered {
        path: PathBuf,
        digest: String,
        found: String,
    },
    #[error("policy file name `{0}` cannot be archived")]
    BadName(String),
}

/// `<state_dir>/policies`.
#[derive(Debug, Clone)]
pub struct PolicyArchive {
    dir: PathBuf,
}

fn is_digest(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl PolicyArchive {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The archive of a daemon whose state directory is `state_dir`.
    pub fn in_state_dir(state_dir: &Path) -> Self {
        Self::new(state_dir.join("policies"))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where version `digest` is (or would be) kept.
    pub fn path(&self, digest: &str) -> Result<PathBuf, ArchiveError> {
        if !is_digest(digest) {
            return Err(ArchiveError::BadDigest(digest.to_owned()));
        }
        Ok(self.dir.join(digest))
    }

    /// Keeps `set`'s files under its digest (idempotent: a version already
    /// there is checked, not rewritten). Returns its directory.
    pub fn store(&self, set: &PolicySet) -> Result<PathBuf, ArchiveError> {
        let dest = self.path(set.digest())?;
        if dest.is_dir() {
            self.load(set.digest())?;
            return Ok(dest);
        }
        let io = |what, path: &Path| {
            let path = path.to_owned();
            move |source| ArchiveError::Io { what, path, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(io("creating", &self.dir))?;
        let tmp = self
            .dir
            .join(format!(".tmp-{}-{}", set.digest(), std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).map_err(io("creating", &tmp))?;
        for (name, text) in set.texts() {
            if name.is_empty() || name.starts_with('.') || name.contains('/') {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(ArchiveError::BadName(name.clone()));
            }
            let p = tmp.join(name);
            let mut f = std::fs::File::create(&p).map_err(io("creating", &p))?;
            f.write_all(text.as_bytes()).map_err(io("writing", &p))?;
            f.sync_all().map_err(io("syncing", &p))?;
        }
        std::fs::File::open(&tmp)
            .and_then(|d| d.sync_all())
            .map_err(io("syncing", &tmp))?;
        match std::fs::rename(&tmp, &dest) {
            Ok(()) => {}
            // Archived meanwhile by another writer: theirs is checked below.
            Err(_) if dest.is_dir() => {
                let _ = std::fs::remove_dir_all(&tmp);
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(ArchiveError::Io {
                    what: "renaming into",
                    path: dest,
                    source: e,
                });
            }
        }
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io("syncing", &self.dir))?;
        self.load(set.digest())?;
        Ok(dest)
    }

    /// Loads version `digest`, checking that its files still hash to it.
    pub fn load(&self, digest: &str) -> Result<PolicySet, ArchiveError> {
        let path = self.path(digest)?;
        if !path.is_dir() {
            return Err(ArchiveError::Missing {
                digest: digest.to_owned(),
                dir: self.dir.clone(),
            });
        }
        let set = load_dir(&path).map_err(|errors| ArchiveError::Invalid {
            path: path.clone(),
            errors,
        })?;
        if set.digest() != digest {
            return Err(ArchiveError::Altered {
                path,
                digest: digest.to_owned(),
                found: set.digest().to_owned(),
            });
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "[[resource]]\nname = \"db\"\nprotocol = \"postgres\"\naddresses = [\"127.0.0.1:5432\"]\n# ünïcode and no trailing newline";

    #[test]
    fn archived_files_are_byte_identical_and_checked_on_load() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir(&src).unwrap();
        std::fs::write(src.join("a.toml"), POLICY).unwrap();
        let set = load_dir(&src).unwrap();
        let archive = PolicyArchive::in_state_dir(tmp.path());
        let dir = archive.store(&set).unwrap();
        assert_eq!(
            std::fs::read(dir.join("a.toml")).unwrap(),
            POLICY.as_bytes()
        );
        // Storing again is a no-op; loading gives the same digest.
        assert_eq!(archive.store(&set).unwrap(), dir);
        assert_eq!(archive.load(set.digest()).unwrap().digest(), set.digest());
        // An altered archive is refused.
        std::fs::write(dir.join("a.toml"), format!("{POLICY}\n")).unwrap();
        assert!(matches!(
            archive.load(set.digest()),
            Err(ArchiveError::Altered { .. })
        ));
        assert!(matches!(
            archive.load("../etc"),
            Err(ArchiveError::BadDigest(_))
        ));
        assert!(matches!(
            archive.load(&"0".repeat(64)),
            Err(ArchiveError::Missing { .. })
        ));
    }
}
