//! Which cgroups are tagged, and for which identity.
//!
//! The table is persisted (JSON, written atomically) in the state directory so a
//! restarted daemon re-tags the same cgroups: with fail-closed, tagged processes
//! that outlive the daemon must stay tagged when it comes back.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum BindingError {
    #[error("reading bindings {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("bindings file {path} is corrupt")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("writing bindings {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum BindingKind {
    /// Created by `agentgate exec`; removed when its processes are gone.
    Exec,
    /// An existing cgroup tagged by `agentgate tag`.
    Tag,
    /// A cgroup matched by a `[[binding]]` of the policy; it follows the policy.
    Policy,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Binding {
    pub id: u32,
    pub identity: String,
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    pub kind: BindingKind,
    /// RFC 3339 UTC.
    pub since: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Bindings {
    next_id: u32,
    entries: BTreeMap<u32, Binding>,
}

impl Bindings {
    pub fn load(path: &Path) -> Result<Self, BindingError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| BindingError::Corrupt {
                path: path.into(),
                source,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(BindingError::Read {
                path: path.into(),
                source,
            }),
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), BindingError> {
        let err = |source| BindingError::Write {
            path: path.into(),
            source,
        };
        let tmp = path.with_extension("tmp");
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| err(io::Error::other(e)))?;
        std::fs::write(&tmp, bytes).map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }

    /// Adds a binding and returns its id (the number the kernel record carries).
    pub fn add(
        &mut self,
        identity: String,
        cgroup: PathBuf,
        cgroup_id: u64,
        kind: BindingKind,
    ) -> Binding {
        self.next_id = self.next_id.wrapping_add(1).max(1);
        while self.entries.contains_key(&self.next_id) {
            self.next_id = self.next_id.wrapping_add(1).max(1);
        }
        let b = Binding {
            id: self.next_id,
            identity,
            cgroup,
            cgroup_id,
            kind,
            since: crate::time::now_rfc3339(),
        };
        self.entries.insert(b.id, b.clone());
        b
    }

    pub fn remove(&mut self, id: u32) -> Option<Binding> {
        self.entries.remove(&id)
    }

    pub fn get(&self, id: u32) -> Option<&Binding> {
        self.entries.get(&id)
    }

    pub fn by_cgroup_id(&self, cgroup_id: u64) -> Option<&Binding> {
        self.entries.values().find(|b| b.cgroup_id == cgroup_id)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Binding> {
        self.entries.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bindings_survive_a_save_and_load() {
        let dir = std::env::temp_dir().join(format!("ag-bind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bindings.json");
        let mut b = Bindings::default();
        let one = b.add(
            "alice".into(),
            "/sys/fs/cgroup/x".into(),
            42,
            BindingKind::Tag,
        );
        b.save(&path).unwrap();
        let loaded = Bindings::load(&path).unwrap();
        assert_eq!(loaded.by_cgroup_id(42).unwrap().identity, "alice");
        let mut loaded = loaded;
        let two = loaded.add("bob".into(), "/y".into(), 43, BindingKind::Exec);
        assert_ne!(one.id, two.id, "ids are not reused after a restart");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn missing_file_is_empty_but_corrupt_file_is_an_error() {
        let dir = std::env::temp_dir().join(format!("ag-bind2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert_eq!(
            Bindings::load(&dir.join("none.json"))
                .unwrap()
                .iter()
                .count(),
            0
        );
        std::fs::write(dir.join("bad.json"), "{not json").unwrap();
        assert!(matches!(
            Bindings::load(&dir.join("bad.json")),
            Err(BindingError::Corrupt { .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
