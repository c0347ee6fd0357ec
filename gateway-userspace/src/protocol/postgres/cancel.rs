//! The cancel keys Postgres servers gave to sessions through the proxy, so
//! that a `CancelRequest` (which arrives on a fresh connection, with no
//! session) is forwarded only for a key this proxy issued, to the server
//! that issued it, for the identity whose session it was. The trade-off:
//! one map shared by every connection, behind a mutex held for a lookup.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use bytes::Bytes;

/// The cancel keys servers gave to sessions through this proxy. A
/// `CancelRequest` is forwarded only with a key issued here, to the server
/// that issued it, for the identity whose session it was: an agent cannot
/// cancel another identity's queries, nor probe for keys. One entry per live
/// session (bounded by the proxy's connection limit).
#[derive(Clone, Default)]
pub struct CancelKeys(Arc<Mutex<HashMap<(i32, Bytes), Issued>>>);

#[derive(Clone)]
pub(super) struct Issued {
    pub(super) destination: SocketAddr,
    pub(super) identity: String,
    /// The proxy connection of the session: its held statement is the one a
    /// cancel withdraws.
    pub(super) conn: u64,
}

/// Removes its key when the session ends.
pub(super) struct CancelKeyGuard {
    keys: CancelKeys,
    key: (i32, Bytes),
}

impl CancelKeys {
    pub(super) fn issue(&self, pid: i32, secret: Bytes, issued: Issued) -> CancelKeyGuard {
        let key = (pid, secret);
        self.lock().insert(key.clone(), issued);
        CancelKeyGuard {
            keys: self.clone(),
            key,
        }
    }

    pub(super) fn issued_to(&self, pid: i32, secret: &Bytes) -> Option<Issued> {
        self.lock().get(&(pid, secret.clone())).cloned()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<(i32, Bytes), Issued>> {
        // A panic while holding the lock cannot leave the map half-updated.
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for CancelKeyGuard {
    fn drop(&mut self) {
        self.keys.lock().remove(&self.key);
    }
}
