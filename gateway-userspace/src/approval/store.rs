//! The approval store: pending requests and grants, one JSON value per id in
//! two redb tables at `<state_dir>/approvals.redb`.
//!
//! The broker keeps the live state in memory and writes each change through
//! here after its audit record (the log is the evidence; this file only lets
//! a restart know what was pending and which grants still run). Each write is
//! its own durable transaction. A store that cannot be opened refuses the
//! start (fails closed); a write that fails later is logged and the broker
//! carries on in memory, since the audit record already says what happened.

use std::path::{Path, PathBuf};

use redb::{ReadableDatabase as _, ReadableTable as _, TableDefinition};
use serde::{Serialize, de::DeserializeOwned};

const PENDING: TableDefinition<&str, &[u8]> = TableDefinition::new("pending");
const GRANTS: TableDefinition<&str, &[u8]> = TableDefinition::new("grants");

/// Largest value read back; anything larger was not written by this code.
const MAX_VALUE: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
#[error("approval store {path}: {reason}")]
pub struct StoreError {
    pub path: PathBuf,
    pub reason: String,
}

/// A redb database of pending requests and grants.
pub struct Store {
    db: redb::Database,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Which table a value lives in.
#[derive(Debug, Clone, Copy)]
pub enum Table {
    Pending,
    Grants,
}

impl Table {
    fn def(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        match self {
            Self::Pending => PENDING,
            Self::Grants => GRANTS,
        }
    }
}

impl Store {
    /// Opens (or creates) the store, with both tables present.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let err = |e: &dyn std::fmt::Display| StoreError {
            path: path.into(),
            reason: e.to_string(),
        };
        let db = redb::Database::create(path).map_err(|e| err(&e))?;
        let tx = db.begin_write().map_err(|e| err(&e))?;
        tx.open_table(PENDING).map_err(|e| err(&e))?;
        tx.open_table(GRANTS).map_err(|e| err(&e))?;
        tx.commit().map_err(|e| err(&e))?;
        Ok(Self {
            db,
            path: path.into(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(&self, e: &dyn std::fmt::Display) -> StoreError {
        StoreError {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    /// Writes `value` under `id`, durably.
    pub fn put<T: Serialize>(&self, table: Table, id: &str, value: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(|e| self.err(&e))?;
        let tx = self.db.begin_write().map_err(|e| self.err(&e))?;
        {
            let mut t = tx.open_table(table.def()).map_err(|e| self.err(&e))?;
            t.insert(id, bytes.as_slice()).map_err(|e| self.err(&e))?;
        }
        tx.commit().map_err(|e| self.err(&e))
    }

    /// Removes `id` (absent is fine), durably.
    pub fn remove(&self, table: Table, id: &str) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(|e| self.err(&e))?;
        {
            let mut t = tx.open_table(table.def()).map_err(|e| self.err(&e))?;
            t.remove(id).map_err(|e| self.err(&e))?;
        }
        tx.commit().map_err(|e| self.err(&e))
    }

    /// Every value in `table`. A value that does not parse is an error: the
    /// store was written by something else, and guessing would not be safe.
    pub fn all<T: DeserializeOwned>(&self, table: Table) -> Result<Vec<(String, T)>, StoreError> {
        let tx = self.db.begin_read().map_err(|e| self.err(&e))?;
        let t = tx.open_table(table.def()).map_err(|e| self.err(&e))?;
        let mut out = Vec::new();
        for entry in t.iter().map_err(|e| self.err(&e))? {
            let (k, v) = entry.map_err(|e| self.err(&e))?;
            let (id, bytes) = (k.value().to_owned(), v.value());
            if bytes.len() > MAX_VALUE {
                return Err(self.err(&format!("entry {id} is larger than {MAX_VALUE} bytes")));
            }
            let value = serde_json::from_slice(bytes)
                .map_err(|e| self.err(&format!("entry {id} is unreadable: {e}")))?;
            out.push((id, value));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_survive_a_reopen_and_removal_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("approvals.redb");
        {
            let s = Store::open(&path).unwrap();
            s.put(Table::Pending, "apr-1", &serde_json::json!({"a": 1}))
                .unwrap();
            s.put(Table::Grants, "grt-1", &serde_json::json!({"g": 2}))
                .unwrap();
            s.put(Table::Grants, "grt-2", &serde_json::json!({"g": 3}))
                .unwrap();
            s.remove(Table::Grants, "grt-2").unwrap();
        }
        let s = Store::open(&path).unwrap();
        let p: Vec<(String, serde_json::Value)> = s.all(Table::Pending).unwrap();
        assert_eq!(p, vec![("apr-1".into(), serde_json::json!({"a": 1}))]);
        let g: Vec<(String, serde_json::Value)> = s.all(Table::Grants).unwrap();
        assert_eq!(g, vec![("grt-1".into(), serde_json::json!({"g": 2}))]);
    }

    #[test]
    fn a_file_that_is_not_a_store_refuses_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("approvals.redb");
        std::fs::write(&path, b"not a database").unwrap();
        let e = Store::open(&path).unwrap_err();
        assert!(e.to_string().contains("approvals.redb"), "{e}");
    }
}
