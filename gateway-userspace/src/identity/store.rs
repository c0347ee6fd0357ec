//! The daemon's in-memory session store: identity name → session.
//!
//! Fails closed: an identity is usable only while its session is active and
//! before its deadline; unknown, expired, revoked and logged-out names are all
//! refused, each with its own error. Sessions live only in the daemon's memory,
//! never on disk. Expiry is tracked in tokio time (the deadline is computed from
//! the token's `exp` when the session is inserted or refreshed), so tests can
//! pause and advance the clock.
//!
//! Network work (refresh, revocation) never happens under the store's lock: take
//! [`RefreshTicket`]s, refresh outside, then [`IdentityStore::finish_refresh`].
//! [`maintain`] does exactly that for a store behind a `tokio::sync::Mutex`.

use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

use tokio::time::Instant;

use super::{
    FailureStage, IdentityError, IdentityEvent, LoginMethod, OidcClient, Session, VerifiedIdentity,
    service::service_account_login,
};

/// How often a configured service account that failed to log in is retried.
const SERVICE_RETRY: Duration = Duration::from_mins(1);

#[derive(Default)]
pub struct IdentityStore {
    entries: HashMap<String, Entry>,
    /// Configured service-account names: no human session may take one.
    reserved: std::collections::HashSet<String>,
    next_generation: u64,
    service_retry_at: HashMap<String, Instant>,
}

struct Entry {
    generation: u64,
    state: State,
}

enum State {
    Active {
        session: Box<Session>,
        deadline: Instant,
    },
    Expired {
        at: SystemTime,
    },
    Revoked {
        reason: String,
    },
}

/// One identity's state, for `agentgate status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityStatus {
    Active(VerifiedIdentity),
    Expired { at: SystemTime },
    Revoked { reason: String },
}

/// A session checked out for refresh; hand it back with [`IdentityStore::finish_refresh`].
#[derive(Debug)]
pub struct RefreshTicket {
    pub name: String,
    generation: u64,
    pub session: Session,
}

impl IdentityStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store that reserves the configured service-account names, so a human whose
    /// `preferred_username` happens to equal one cannot act under that name.
    pub fn for_config(cfg: &super::IdentityConfig) -> Self {
        IdentityStore {
            reserved: cfg
                .service_account
                .iter()
                .map(|sa| sa.name.clone())
                .collect(),
            ..Self::default()
        }
    }

    /// Adds a verified session under its identity's name (the configured account
    /// name for services). A session of the same principal replaces the old one (a
    /// new login); a different principal claiming an active name is refused.
    pub fn insert(
        &mut self,
        session: Session,
        method: LoginMethod,
    ) -> Result<IdentityEvent, IdentityError> {
        let name = session.identity.name.clone();
        if session.identity.kind == super::IdentityKind::Human && self.reserved.contains(&name) {
            return Err(IdentityError::NameConflict { name });
        }
        if let Some(Entry {
            state: State::Active { session: old, .. },
            ..
        }) = self.entries.get(&name)
            && !old.same_principal(&session)
        {
            return Err(IdentityError::NameConflict { name });
        }
        let event = IdentityEvent::login(&session.identity, method);
        let deadline = deadline_for(session.identity.expires_at);
        self.next_generation += 1;
        self.service_retry_at.remove(&name);
        self.entries.insert(
            name,
            Entry {
                generation: self.next_generation,
                state: State::Active {
                    session: Box::new(session),
                    deadline,
                },
            },
        );
        Ok(event)
    }

    /// The identity behind `name`, if it may act now (tokio clock).
    pub fn get_verified(&self, name: &str) -> Result<VerifiedIdentity, IdentityError> {
        self.get_verified_at(name, Instant::now())
    }

    pub fn get_verified_at(
        &self,
        name: &str,
        now: Instant,
    ) -> Result<VerifiedIdentity, IdentityError> {
        match self.entries.get(name).map(|e| &e.state) {
            None => Err(IdentityError::UnknownIdentity {
                name: name.to_owned(),
            }),
            Some(State::Active { session, deadline }) if now < *deadline => {
                Ok(session.identity.clone())
            }
            Some(State::Active { .. } | State::Expired { .. }) => {
                Err(IdentityError::IdentityExpired {
                    name: name.to_owned(),
                })
            }
            Some(State::Revoked { reason }) => Err(IdentityError::Revoked {
                name: name.to_owned(),
                reason: reason.clone(),
            }),
        }
    }

    /// Forgets `name`. Returns the session (if it was active) so the caller can
    /// revoke its refresh token at the provider outside the lock
    /// ([`Session::revoke_at_provider`]).
    pub fn logout(
        &mut self,
        name: &str,
    ) -> Result<(Option<Session>, IdentityEvent), IdentityError> {
        let entry = self
            .entries
            .remove(name)
            .ok_or_else(|| IdentityError::UnknownIdentity {
                name: name.to_owned(),
            })?;
        let session = match entry.state {
            State::Active { session, .. } => Some(*session),
            State::Expired { .. } | State::Revoked { .. } => None,
        };
        Ok((
            session,
            IdentityEvent::Logout {
                name: name.to_owned(),
            },
        ))
    }

    /// Marks `name` revoked (e.g. the provider told us so). None if it was not active.
    pub fn revoke(&mut self, name: &str, reason: &str) -> Option<IdentityEvent> {
        let entry = self.entries.get_mut(name)?;
        if !matches!(entry.state, State::Active { .. }) {
            return None;
        }
        entry.state = State::Revoked {
            reason: reason.to_owned(),
        };
        entry.generation = 0;
        Some(IdentityEvent::Revoked {
            name: name.to_owned(),
            reason: reason.to_owned(),
        })
    }

    /// Moves every session whose deadline has passed to expired and returns one
    /// [`IdentityEvent::Expiry`] per name (`event.name()`); the daemon audits them and
    /// stops new connections of those identities.
    pub fn expire_due(&mut self, now: Instant) -> Vec<IdentityEvent> {
        let mut events = Vec::new();
        for (name, entry) in &mut self.entries {
            if let State::Active { session, deadline } = &entry.state
                && now >= *deadline
            {
                let at = session.identity.expires_at;
                entry.state = State::Expired { at };
                entry.generation = 0;
                events.push(IdentityEvent::Expiry {
                    name: name.clone(),
                    expired_at: at,
                });
            }
        }
        events.sort_by(|a, b| a.name().cmp(&b.name()));
        events
    }

    /// The earliest deadline among active sessions (for the daemon's timer).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.entries
            .values()
            .filter_map(|e| match &e.state {
                State::Active { deadline, .. } => Some(*deadline),
                _ => None,
            })
            .min()
    }

    /// Active, refreshable sessions whose deadline is within `margin` of `now`.
    pub fn due_for_refresh(&self, now: Instant, margin: Duration) -> Vec<RefreshTicket> {
        let mut due: Vec<_> = self
            .entries
            .iter()
            .filter_map(|(name, e)| match &e.state {
                State::Active { session, deadline }
                    if session.is_refreshable() && now + margin >= *deadline =>
                {
                    Some(RefreshTicket {
                        name: name.clone(),
                        generation: e.generation,
                        session: (**session).clone(),
                    })
                }
                _ => None,
            })
            .collect();
        due.sort_by(|a, b| a.name.cmp(&b.name));
        due
    }

    /// Applies a refresh result. A result for a session that was logged out,
    /// replaced or expired meanwhile is dropped (None). A failure that may pass
    /// (network) leaves the session until its deadline; any other failure (the
    /// provider rejected the grant, the new token did not verify) revokes it.
    pub fn finish_refresh(
        &mut self,
        ticket: RefreshTicket,
        result: Result<Session, IdentityError>,
    ) -> Option<IdentityEvent> {
        let entry = self.entries.get_mut(&ticket.name)?;
        if entry.generation != ticket.generation || !matches!(entry.state, State::Active { .. }) {
            return None;
        }
        match result {
            Ok(session) => {
                let expires_at = session.identity.expires_at;
                entry.state = State::Active {
                    deadline: deadline_for(expires_at),
                    session: Box::new(session),
                };
                Some(IdentityEvent::Refresh {
                    name: ticket.name,
                    expires_at,
                })
            }
            Err(e) if e.is_transient() => Some(IdentityEvent::failure(
                Some(&ticket.name),
                FailureStage::Refresh,
                &e,
            )),
            Err(e) => {
                let reason = if e.is_grant_revoked() {
                    format!("the identity provider rejected the refresh: {e}")
                } else {
                    format!("refresh failed verification: {e}")
                };
                entry.state = State::Revoked {
                    reason: reason.clone(),
                };
                entry.generation = 0;
                Some(IdentityEvent::Revoked {
                    name: ticket.name,
                    reason,
                })
            }
        }
    }

    pub fn list(&self) -> Vec<(String, IdentityStatus)> {
        let mut out: Vec<_> = self
            .entries
            .iter()
            .map(|(name, e)| {
                let status = match &e.state {
                    State::Active { session, .. } => {
                        IdentityStatus::Active(session.identity.clone())
                    }
                    State::Expired { at } => IdentityStatus::Expired { at: *at },
                    State::Revoked { reason } => IdentityStatus::Revoked {
                        reason: reason.clone(),
                    },
                };
                (name.clone(), status)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn service_accounts_to_login(&mut self, client: &OidcClient, now: Instant) -> Vec<String> {
        let mut names = Vec::new();
        for account in &client.config().service_account {
            let active = matches!(
                self.entries.get(&account.name),
                Some(Entry {
                    state: State::Active { .. },
                    ..
                })
            );
            let waiting = self
                .service_retry_at
                .get(&account.name)
                .is_some_and(|at| now < *at);
            if !active && !waiting {
                self.service_retry_at
                    .insert(account.name.clone(), now + SERVICE_RETRY);
                names.push(account.name.clone());
            }
        }
        names
    }
}

/// One maintenance pass, for the daemon's timer: expire what is due, refresh
/// sessions within `refresh_before_expiry_secs` of their deadline, and log in
/// configured service accounts that are not active (each retried at most once a
/// minute). Holds the lock only between network calls. Returns the events to audit.
pub async fn maintain(
    store: &tokio::sync::Mutex<IdentityStore>,
    client: &OidcClient,
) -> Vec<IdentityEvent> {
    let margin = client.config().refresh_before_expiry();
    let (mut events, tickets, accounts) = {
        let mut s = store.lock().await;
        let now = Instant::now();
        let events = s.expire_due(now);
        let tickets = s.due_for_refresh(now, margin);
        let accounts = s.service_accounts_to_login(client, now);
        (events, tickets, accounts)
    };
    for mut ticket in tickets {
        let result = ticket
            .session
            .refresh(client)
            .await
            .map(|()| ticket.session.clone());
        if let Some(event) = store.lock().await.finish_refresh(ticket, result) {
            events.push(event);
        }
    }
    for name in accounts {
        let event = match service_account_login(client, &name).await {
            Ok(session) => store
                .lock()
                .await
                .insert(session, LoginMethod::ClientCredentials),
            Err(e) => Err(e),
        };
        events.push(
            event.unwrap_or_else(|e| IdentityEvent::failure(Some(&name), FailureStage::Login, &e)),
        );
    }
    events
}

fn deadline_for(expires_at: SystemTime) -> Instant {
    let left = expires_at
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    Instant::now() + left
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{IdentityKind, session::Credential};

    fn session(name: &str, subject: &str, ttl: Duration, refreshable: bool) -> Session {
        Session {
            identity: VerifiedIdentity {
                subject: subject.into(),
                name: name.into(),
                kind: IdentityKind::Human,
                groups: vec!["analysts".into()],
                issuer: "https://idp".into(),
                expires_at: SystemTime::now() + ttl,
            },
            credential: Credential::Human {
                client_id: "cli".into(),
                refresh_token: refreshable.then(|| "rt-secret".into()),
                nonce: None,
            },
            id_token: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_follows_tokio_time() {
        let mut store = IdentityStore::new();
        store
            .insert(
                session("alice", "s1", Duration::from_mins(1), false),
                LoginMethod::DeviceFlow,
            )
            .unwrap();
        assert_eq!(store.get_verified("alice").unwrap().groups, ["analysts"]);
        assert!(store.expire_due(Instant::now()).is_empty());
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(matches!(
            store.get_verified("alice"),
            Err(IdentityError::IdentityExpired { .. })
        ));
        let events = store.expire_due(Instant::now());
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].name(), Some("alice"));
        assert!(events[0].ends_identity());
        assert!(
            store.expire_due(Instant::now()).is_empty(),
            "an expiry is reported once"
        );
        assert!(matches!(
            store.get_verified("alice"),
            Err(IdentityError::IdentityExpired { .. })
        ));
    }

    #[test]
    fn human_cannot_take_a_service_account_name() {
        let mut cfg = crate::identity::IdentityConfig::new("https://idp", None);
        cfg.service_account
            .push(crate::identity::ServiceAccountConfig {
                name: "svc-reporting".into(),
                client_id: "svc-reporting".into(),
                secret_file: None,
                secret_env: Some("X".into()),
                scopes: vec![],
                audience: None,
            });
        let mut store = IdentityStore::for_config(&cfg);
        let squatter = session("svc-reporting", "mallory", Duration::from_mins(1), false);
        assert!(matches!(
            store.insert(squatter, LoginMethod::DeviceFlow),
            Err(IdentityError::NameConflict { .. })
        ));
        assert!(store.get_verified("svc-reporting").is_err());
    }

    #[test]
    fn unknown_conflict_logout_revoke() {
        let mut store = IdentityStore::new();
        assert!(matches!(
            store.get_verified("nobody"),
            Err(IdentityError::UnknownIdentity { .. })
        ));
        store
            .insert(
                session("alice", "s1", Duration::from_mins(1), true),
                LoginMethod::DeviceFlow,
            )
            .unwrap();
        assert!(matches!(
            store.insert(
                session("alice", "other-subject", Duration::from_mins(1), true),
                LoginMethod::DeviceFlow
            ),
            Err(IdentityError::NameConflict { .. })
        ));
        // Same principal logging in again replaces the session.
        store
            .insert(
                session("alice", "s1", Duration::from_mins(2), true),
                LoginMethod::DeviceFlow,
            )
            .unwrap();
        let ev = store.revoke("alice", "test").unwrap();
        assert!(matches!(ev, IdentityEvent::Revoked { .. }));
        assert!(matches!(
            store.get_verified("alice"),
            Err(IdentityError::Revoked { .. })
        ));
        let (session, ev) = store.logout("alice").unwrap();
        assert!(session.is_none());
        assert_eq!(
            ev,
            IdentityEvent::Logout {
                name: "alice".into()
            }
        );
        assert!(matches!(
            store.get_verified("alice"),
            Err(IdentityError::UnknownIdentity { .. })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn refresh_tickets_and_stale_results() {
        let mut store = IdentityStore::new();
        store
            .insert(
                session("alice", "s1", Duration::from_secs(100), true),
                LoginMethod::DeviceFlow,
            )
            .unwrap();
        store
            .insert(
                session("bob", "s2", Duration::from_secs(100), false),
                LoginMethod::DeviceFlow,
            )
            .unwrap();
        assert!(
            store
                .due_for_refresh(Instant::now(), Duration::from_secs(30))
                .is_empty()
        );
        tokio::time::advance(Duration::from_secs(75)).await;
        let mut due = store.due_for_refresh(Instant::now(), Duration::from_secs(30));
        assert_eq!(due.len(), 1, "bob has no refresh token");
        let ticket = due.pop().unwrap();
        let mut renewed = ticket.session.clone();
        renewed.identity.expires_at = SystemTime::now() + Duration::from_secs(500);
        let ev = store.finish_refresh(ticket, Ok(renewed)).unwrap();
        assert!(matches!(ev, IdentityEvent::Refresh { .. }));
        tokio::time::advance(Duration::from_secs(100)).await;
        assert!(
            store.get_verified("alice").is_ok(),
            "refresh moved the deadline"
        );
        assert!(store.get_verified("bob").is_err());

        // A refresh result that arrives after a logout is dropped.
        let ticket = store
            .due_for_refresh(Instant::now(), Duration::from_secs(1000))
            .pop()
            .unwrap();
        store.logout("alice").unwrap();
        assert!(
            store
                .finish_refresh(ticket, Err(IdentityError::NoRefreshToken))
                .is_none()
        );
    }

    #[test]
    fn rejected_refresh_revokes() {
        let mut store = IdentityStore::new();
        store
            .insert(
                session("alice", "s1", Duration::from_secs(10), true),
                LoginMethod::DeviceFlow,
            )
            .unwrap();
        let ticket = store
            .due_for_refresh(Instant::now(), Duration::from_mins(1))
            .pop()
            .unwrap();
        let err = IdentityError::OAuth {
            url: "u".into(),
            error: "invalid_grant".into(),
            description: None,
        };
        let ev = store.finish_refresh(ticket, Err(err)).unwrap();
        assert!(
            matches!(&ev, IdentityEvent::Revoked { reason, .. } if reason.contains("invalid_grant")),
            "{ev:?}"
        );
        assert!(matches!(
            store.get_verified("alice"),
            Err(IdentityError::Revoked { .. })
        ));
        let listed = store.list();
        assert!(matches!(listed[0].1, IdentityStatus::Revoked { .. }));
    }
}
