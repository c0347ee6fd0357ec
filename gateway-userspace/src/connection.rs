//! One attributed connection, as the accept path hands it to a protocol
//! handler: [`LiveConnection`] (who, from where, to what, live counters),
//! [`Attributed`] (that plus the policy subject and resource) and
//! [`Services`] (the daemon's shared services a handler may use).
//!
//! This module is what handlers import instead of the accept path
//! ([`crate::proxy`]): the accept path imports the handlers' seam
//! ([`crate::protocol`]), never the other way round, so there is no cycle.
//! It holds data and no policy: nothing here fails open or closed by itself.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    approval::Broker,
    audit::{IdentityRef, Kind, NewRecord},
    gate::AuditSink,
    policy::{PolicyStore, Resource, Subject},
    provenance::Workload,
    sql::AnalysisCache,
};

/// A connection the accept path attributed and the policy allowed: what a
/// handler's `serve` takes besides the socket.
pub struct Attributed {
    /// Id, identity, workload, original destination, live byte counters; its
    /// `record()` fills in who and from where for every audit record.
    pub conn: Arc<LiveConnection>,
    pub subject: Subject,
    /// The resource the destination belongs to (from the policy in force at accept).
    pub resource: Resource,
}

/// The daemon's services every handler shares (cheap to clone).
#[derive(Clone)]
pub struct Services {
    pub policy: Arc<PolicyStore>,
    pub approvals: Broker,
    /// Every record goes here; commands are written ahead.
    pub audit: Arc<dyn AuditSink>,
    /// Key for the keyed hash of commands (correlation without the text).
    pub correlation_key: [u8; 32],
    /// Statement analyses by shape, shared by every connection.
    pub sql_cache: Arc<AnalysisCache>,
    /// Equality probes on protected columns per identity, for every SQL
    /// handler ([`crate::mask::ProbeBudget`]).
    pub probes: Arc<crate::mask::ProbeBudget>,
    /// `[proxy] upstream_connect_timeout_ms`.
    pub upstream_connect_timeout: Duration,
    /// The local CA TLS-terminating handlers present leaves from.
    pub ca: Arc<crate::tls::LocalCa>,
    /// The audit log's directory: session recordings go in its
    /// `recordings/` (`audit verify` checks them there).
    pub audit_dir: std::path::PathBuf,
}

#[derive(Debug, Serialize)]
pub struct LiveConnection {
    pub id: u64,
    pub identity: String,
    pub workload: Workload,
    pub destination: SocketAddr,
    pub since: String,
    #[serde(serialize_with = "ser_atomic")]
    pub bytes_up: AtomicU64,
    #[serde(serialize_with = "ser_atomic")]
    pub bytes_down: AtomicU64,
    /// Signalled to end the connection (its identity expired or logged out).
    #[serde(skip)]
    pub close: tokio::sync::Notify,
    /// The policy resource the destination belongs to.
    pub resource: Option<String>,
    /// The identity as audit records name it.
    #[serde(skip)]
    pub audit_identity: IdentityRef,
    /// Issuer and `sub` of the identity, when the daemon verified it.
    #[serde(skip)]
    pub verified: Option<Verified>,
    #[serde(skip)]
    pub started: Instant,
}

/// Who a verified identity is at its issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub issuer: String,
    pub subject: String,
}

impl LiveConnection {
    /// Who asks when one of this connection's commands is held: its
    /// identity (issuer and `sub` when verified; a label is its own
    /// subject) and its kernel provenance.
    pub fn requester(&self) -> crate::approval::Requester {
        let w = &self.workload;
        crate::approval::Requester {
            identity: self.identity.clone(),
            identity_kind: self.audit_identity.kind.clone(),
            issuer: self.verified.as_ref().map(|v| v.issuer.clone()),
            subject: self
                .verified
                .as_ref()
                .map_or_else(|| self.identity.clone(), |v| v.subject.clone()),
            groups: self.audit_identity.groups.clone(),
            pid: w.pid,
            exe: w.exe.clone(),
            uid: w.uid,
            cgroup_id: w.cgroup_id,
            tagged_cgroup_id: w.tagged_cgroup_id,
            cgroup: w.cgroup.clone().unwrap_or_default(),
            conn: self.id,
        }
    }

    /// A record about this connection, with who, from where and to what filled in.
    pub fn record(&self, kind: Kind) -> NewRecord {
        let mut rec = NewRecord::new(kind)
            .connection(self.id)
            .session(format!("conn-{}", self.id))
            .identity(self.audit_identity.clone())
            .workload(self.workload.to_audit());
        if let Some(r) = &self.resource {
            rec = rec.resource(r.clone());
        }
        rec
    }
}

impl crate::gate::Origin for LiveConnection {
    fn record(&self, kind: Kind) -> NewRecord {
        LiveConnection::record(self, kind)
    }

    fn connection_id(&self) -> u64 {
        self.id
    }

    fn requester(&self) -> crate::approval::Requester {
        LiveConnection::requester(self)
    }
}

fn ser_atomic<S: serde::Serializer>(v: &AtomicU64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(v.load(Ordering::Relaxed))
}

#[cfg(test)]
impl LiveConnection {
    /// A connection of identity `agent` to `dest` on `resource`, for handler unit tests.
    pub fn for_test(dest: SocketAddr, resource: &str) -> Self {
        Self {
            id: 1,
            identity: "agent".into(),
            workload: Workload {
                pid: 1,
                tid: 1,
                uid: 0,
                gid: 0,
                comm: "test".into(),
                exe: None,
                cmdline: None,
                ppid: None,
                cgroup: None,
                cgroup_id: 0,
                tagged_cgroup_id: 0,
            },
            destination: dest,
            since: String::new(),
            bytes_up: AtomicU64::new(0),
            bytes_down: AtomicU64::new(0),
            close: tokio::sync::Notify::new(),
            resource: Some(resource.into()),
            audit_identity: crate::audit::IdentityRef::default(),
            verified: None,
            started: std::time::Instant::now(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_requester_comes_from_the_connection_and_its_verified_identity() {
        let conn = |subject: &str, kind: &str, verified: Option<Verified>| LiveConnection {
            id: 9,
            identity: "bob".into(),
            workload: crate::provenance::Workload {
                pid: 77,
                tid: 77,
                uid: 1000,
                gid: 1000,
                comm: "psql".into(),
                exe: Some("/usr/bin/psql".into()),
                cmdline: None,
                ppid: None,
                cgroup: Some("/agentgate/exec-1".into()),
                cgroup_id: 5,
                tagged_cgroup_id: 5,
            },
            destination: "127.0.0.1:5432".parse().unwrap(),
            since: String::new(),
            bytes_up: std::sync::atomic::AtomicU64::new(0),
            bytes_down: std::sync::atomic::AtomicU64::new(0),
            close: tokio::sync::Notify::new(),
            resource: Some("db".into()),
            audit_identity: crate::audit::IdentityRef {
                subject: subject.into(),
                kind: kind.into(),
                groups: vec!["approvers".into()],
            },
            verified,
            started: std::time::Instant::now(),
        };
        let verified = Verified {
            issuer: "https://idp.test".into(),
            subject: "u-42".into(),
        };
        let r = conn("bob (https://idp.test#u-42)", "human", Some(verified)).requester();
        assert_eq!(
            (r.issuer.as_deref(), r.subject.as_str()),
            (Some("https://idp.test"), "u-42")
        );
        assert_eq!((r.pid, r.uid, r.conn, r.cgroup_id), (77, 1000, 9, 5));
        assert_eq!(r.cgroup, "/agentgate/exec-1");
        // A label has no issuer; its subject is its name.
        let r = conn("bob", "label", None).requester();
        assert_eq!((r.issuer, r.subject.as_str()), (None, "bob"));
    }
}
