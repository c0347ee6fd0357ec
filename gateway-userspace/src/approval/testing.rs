//! Test doubles for the broker's recorder, and approver fixtures.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use super::{Approver, ApproverKind, Recorder, Via};
use crate::audit::NewRecord;

/// Accepts every record and keeps nothing.
pub struct Accepting;

impl Recorder for Accepting {
    fn record(
        &self,
        _: NewRecord,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async { Ok(()) })
    }
}

/// Keeps what it is given; fails every append while `failing` is set.
#[derive(Default, Clone)]
pub struct Kept {
    pub records: Arc<Mutex<Vec<NewRecord>>>,
    pub failing: Arc<AtomicBool>,
}

impl Kept {
    pub fn kinds(&self) -> Vec<&'static str> {
        self.records
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.kind.as_str())
            .collect()
    }

    pub fn fail(&self, on: bool) {
        self.failing.store(on, Ordering::SeqCst);
    }
}

impl Recorder for Kept {
    fn record(
        &self,
        r: NewRecord,
    ) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            if self.failing.load(Ordering::SeqCst) {
                return Err("disk full".into());
            }
            self.records.lock().unwrap().push(r);
            Ok(())
        })
    }
}

/// A verified human at `https://idp.test`, subject `sub-NAME`.
pub fn approver(name: &str, groups: &[&str]) -> Approver {
    Approver {
        name: name.into(),
        subject: format!("sub-{name}"),
        issuer: Some("https://idp.test".into()),
        kind: ApproverKind::Human,
        groups: groups.iter().map(|g| (*g).to_owned()).collect(),
        via: Via::Cli,
        bound_cgroups: Vec::new(),
        bound_cgroup_paths: Vec::new(),
    }
}
