//! Identity events. The daemon turns each into an audit record; this module
//! does not depend on the audit log. Events carry names, subjects, groups and
//! times — never a token or a secret.

use std::time::SystemTime;

use serde::Serialize;

use super::{ErrorOrigin, IdentityError, IdentityKind, VerifiedIdentity, verify::unix_seconds};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoginMethod {
    /// `agentgate login` (device flow), verified again by the daemon on handoff.
    DeviceFlow,
    /// Service account, client credentials.
    ClientCredentials,
}

/// The step that failed, for [`IdentityEvent::Failure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureStage {
    Login,
    Handoff,
    Refresh,
    Logout,
    Bind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum IdentityEvent {
    Login {
        name: String,
        subject: String,
        kind: IdentityKind,
        issuer: String,
        groups: Vec<String>,
        method: LoginMethod,
        #[serde(with = "unix_seconds")]
        expires_at: SystemTime,
    },
    Refresh {
        name: String,
        #[serde(with = "unix_seconds")]
        expires_at: SystemTime,
    },
    Failure {
        /// The identity concerned, when known.
        name: Option<String>,
        stage: FailureStage,
        origin: ErrorOrigin,
        /// The error's message (it never contains a token or secret).
        error: String,
    },
    /// A cgroup was bound to the identity (`exec`, `tag`, a policy glob).
    Bind {
        name: String,
        cgroup: String,
    },
    Unbind {
        name: String,
        cgroup: String,
    },
    Expiry {
        name: String,
        #[serde(with = "unix_seconds")]
        expired_at: SystemTime,
    },
    /// The provider rejected the session's grant (refresh token revoked), or the
    /// session failed verification on refresh.
    Revoked {
        name: String,
        reason: String,
    },
    Logout {
        name: String,
    },
}

impl IdentityEvent {
    pub fn login(identity: &VerifiedIdentity, method: LoginMethod) -> Self {
        IdentityEvent::Login {
            name: identity.name.clone(),
            subject: identity.subject.clone(),
            kind: identity.kind,
            issuer: identity.issuer.clone(),
            groups: identity.groups.clone(),
            method,
            expires_at: identity.expires_at,
        }
    }

    pub fn failure(name: Option<&str>, stage: FailureStage, error: &IdentityError) -> Self {
        IdentityEvent::Failure {
            name: name.map(str::to_owned),
            stage,
            origin: error.origin(),
            error: error.to_string(),
        }
    }

    /// The identity name the event is about, if any.
    pub fn name(&self) -> Option<&str> {
        match self {
            IdentityEvent::Login { name, .. }
            | IdentityEvent::Refresh { name, .. }
            | IdentityEvent::Bind { name, .. }
            | IdentityEvent::Unbind { name, .. }
            | IdentityEvent::Expiry { name, .. }
            | IdentityEvent::Revoked { name, .. }
            | IdentityEvent::Logout { name } => Some(name),
            IdentityEvent::Failure { name, .. } => name.as_deref(),
        }
    }

    /// Whether new connections of this identity must now be refused.
    pub fn ends_identity(&self) -> bool {
        matches!(
            self,
            IdentityEvent::Expiry { .. }
                | IdentityEvent::Revoked { .. }
                | IdentityEvent::Logout { .. }
        )
    }
}
