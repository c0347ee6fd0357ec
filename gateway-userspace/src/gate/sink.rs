//! Where the gate's records go: the daemon's [`AuditLog`], or a test's sink.
//!
//! The trade-off is the one of write-ahead with pipelining: `append` queues a
//! record at the call (records keep the order of the calls, detached ones
//! included) and returns a future that resolves once the record is durable,
//! so a handler may forward a read at once and hold back only its result.
//! Fails closed: an error here means the record may not exist, and the
//! caller must act as if it does not.

use std::{future::Future, pin::Pin};

use crate::audit::{AuditLog, NewRecord};

/// The audit log could not take a record.
#[derive(Debug, Clone, thiserror::Error)]
#[error("audit log unavailable: {reason}")]
pub struct AuditUnavailable {
    pub reason: String,
}

/// A record queued but not yet durable: resolves once it is (or cannot be).
pub type Recording<'a> = Pin<Box<dyn Future<Output = Result<(), AuditUnavailable>> + Send + 'a>>;

/// Where records go. `append` queues the record when it is called (records
/// keep the order of the calls, detached ones included); its future resolves
/// once the record is durable. The daemon passes its [`AuditLog`]; tests pass
/// sinks that collect or fail.
pub trait AuditSink: Send + Sync {
    fn append(&self, record: NewRecord) -> Recording<'_>;

    /// A record nobody waits for (a command's result, after its write-ahead
    /// record): written in order, durable with the next awaited record.
    fn append_detached(&self, record: NewRecord);
}

impl AuditSink for AuditLog {
    fn append(&self, record: NewRecord) -> Recording<'_> {
        let appended = AuditLog::append(self, record);
        Box::pin(async move {
            appended.await.map(|_| ()).map_err(|e| AuditUnavailable {
                reason: e.to_string(),
            })
        })
    }

    fn append_detached(&self, record: NewRecord) {
        if let Err(e) = AuditLog::append_detached(self, record) {
            tracing::error!(error = %e, "audit append failed for a statement result");
        }
    }
}
