//! A tower-sessions 0.14 store (cargo feature `tower-sessions`), and so one for axum-login 0.18.
//!
//! [`PgSessionStore`] serves loads from pgsession's coherent cache: a hit does no I/O, and a
//! logout on any instance is seen by every other at once (tower-sessions'
//! `CachingSessionStore` never invalidates across instances). The user of a record is read
//! from its data, by default where axum-login keeps it (`"axum-login.data"` → `user_id`),
//! so axum-login apps get the per-user cap, [`SessionManager::list_user_sessions`] and
//! [`SessionManager::delete_all_user_sessions`] without code changes.
//!
//! What this path cannot give, compared with [`crate::axum`]:
//! - **Whole-record saves.** tower-sessions hands the store the whole record, not what the
//!   request changed, so of two concurrent requests changing different keys the later save
//!   wins; the native layer saves deltas.
//! - **The token model.** The cookie holds tower-sessions' own 128-bit id, unsigned; the
//!   database holds only a hash of it, as for native tokens, but [`Config::signing_keys`]
//!   does not apply and a login rotates the id only because axum-login cycles it.
//! - **No resurrection.** A save of a session deleted meanwhile (a logout elsewhere) is
//!   dropped instead of writing the session back, as a plain store would.
//!
//! ```no_run
//! use pgsession::tower_sessions::PgSessionStore;
//! use tower_sessions::SessionManagerLayer;
//!
//! # fn run(manager: pgsession::SessionManager) {
//! let layer = SessionManagerLayer::new(PgSessionStore::new(manager));
//! # let _ = layer;
//! # }
//! ```
//!
//! [`Config::signing_keys`]: crate::Config::signing_keys

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::Value;
use time::OffsetDateTime;
use tower_sessions_core::session::{Id, Record};
use tower_sessions_core::session_store::{self, ExpiredDeletion, SessionStore};

use crate::{Error, Session, SessionId, SessionManager, SessionOptions, SessionToken, UserId};

/// A tower-sessions [`SessionStore`] in pgsession's tables, served from its coherent cache.
#[derive(Clone, Debug)]
pub struct PgSessionStore {
    manager: SessionManager,
    user_path: Vec<String>,
}

impl PgSessionStore {
    /// A store over `manager`, reading the user where axum-login keeps it.
    pub fn new(manager: SessionManager) -> PgSessionStore {
        PgSessionStore {
            manager,
            user_path: vec!["axum-login.data".to_owned(), "user_id".to_owned()],
        }
    }

    /// Where in a record's data the user id is (any JSON scalar: a string, a number or a
    /// boolean, stored as its text), as a path of object keys: the first is a record key.
    /// Default `["axum-login.data", "user_id"]`. An empty path binds no user.
    pub fn with_user_path<I, S>(mut self, path: I) -> PgSessionStore
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.user_path = path.into_iter().map(Into::into).collect();
        self
    }

    /// The manager this store writes through.
    pub fn manager(&self) -> &SessionManager {
        &self.manager
    }

    /// The public id under which pgsession keeps the record of tower-sessions' `id`.
    pub fn session_id(id: &Id) -> SessionId {
        token(id).id()
    }

    fn user_of(&self, data: &HashMap<String, Value>) -> Option<UserId> {
        let (first, rest) = self.user_path.split_first()?;
        let mut value = data.get(first)?;
        for key in rest {
            value = value.get(key)?;
        }
        match value {
            Value::String(text) => Some(UserId::from(text.as_str())),
            Value::Number(n) => Some(UserId::from(n.to_string())),
            Value::Bool(b) => Some(UserId::from(b.to_string())),
            _ => None,
        }
    }
}

fn token(id: &Id) -> SessionToken {
    SessionToken::external(id.0.to_le_bytes())
}

/// tower-sessions' expiry as chrono's; the range pgsession stores is checked where the session
/// is created or changed.
fn expiry(at: OffsetDateTime) -> session_store::Result<DateTime<Utc>> {
    i64::try_from(at.unix_timestamp_nanos())
        .ok()
        .map(DateTime::from_timestamp_nanos)
        .ok_or_else(|| session_store::Error::Encode(format!("expiry out of range: {at}")))
}

fn to_offset(at: DateTime<Utc>) -> session_store::Result<OffsetDateTime> {
    let nanos = at
        .timestamp_nanos_opt()
        .ok_or_else(|| session_store::Error::Decode(format!("expiry out of range: {at}")))?;
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(nanos))
        .map_err(|e| session_store::Error::Decode(e.to_string()))
}

fn store_error(error: Error) -> session_store::Error {
    match error {
        Error::AttributeTooLarge { .. }
        | Error::SessionTooLarge { .. }
        | Error::InvalidAttribute { .. }
        | Error::InvalidExpiry { .. }
        | Error::InvalidUserId(_) => session_store::Error::Encode(error.to_string()),
        Error::AttributeType { .. } => session_store::Error::Decode(error.to_string()),
        other => session_store::Error::Backend(other.to_string()),
    }
}

/// Make `session`'s attributes and expiry those of `record` (changed keys only).
fn apply(session: &mut Session, record: &Record, expires_at: DateTime<Utc>) -> Result<(), Error> {
    let gone: Vec<String> = session
        .attribute_entries()
        .map(|(key, _)| key)
        .filter(|key| !record.data.contains_key(*key))
        .map(str::to_owned)
        .collect();
    for key in gone {
        session.remove(&key);
    }
    for (key, value) in &record.data {
        if session.get(key) != Some(value) {
            session.set(key.clone(), value)?;
        }
    }
    if crate::model::clock::to_micros(expires_at) != session.expires_at() {
        session.set_expires_at(expires_at)?;
    }
    Ok(())
}

#[async_trait]
impl SessionStore for PgSessionStore {
    /// Insert the record; on an id collision, pick a new id and try again.
    async fn create(&self, record: &mut Record) -> session_store::Result<()> {
        let expires_at = expiry(record.expiry_date)?;
        loop {
            let mut options = SessionOptions::new();
            options.user = self.user_of(&record.data);
            options.validate().map_err(store_error)?;
            let attributes = record.data.iter().map(|(k, v)| (k.clone(), v));
            match self
                .manager
                .create_with(&token(&record.id), &options, attributes, Some(expires_at))
                .await
            {
                Ok(_) => return Ok(()),
                Err(Error::AlreadyExists) => record.id = Id::default(),
                Err(e) => return Err(store_error(e)),
            }
        }
    }

    /// Write the record over the stored one (as a delta of what differs), binding the user its
    /// data names; a record whose session is gone is dropped, not written back.
    async fn save(&self, record: &Record) -> session_store::Result<()> {
        let token = token(&record.id);
        let expires_at = expiry(record.expiry_date)?;
        let Some(mut session) = self
            .manager
            .get_session(&token)
            .await
            .map_err(store_error)?
        else {
            return Ok(());
        };
        apply(&mut session, record, expires_at).map_err(store_error)?;
        let user = self.user_of(&record.data);
        let result = if user.as_ref() != session.user_id() {
            self.manager.rebind(&mut session, user, &token).await
        } else {
            self.manager.update_session(&mut session).await
        };
        match result {
            Ok(()) | Err(Error::NotFound) => Ok(()),
            Err(e) => Err(store_error(e)),
        }
    }

    /// The record, from the cache on a hit; `None` when it is gone or expired.
    async fn load(&self, id: &Id) -> session_store::Result<Option<Record>> {
        let Some(session) = self
            .manager
            .get_session(&token(id))
            .await
            .map_err(store_error)?
        else {
            return Ok(None);
        };
        Ok(Some(Record {
            id: *id,
            data: session
                .attribute_entries()
                .map(|(k, v)| (k.to_owned(), v.clone()))
                .collect(),
            expiry_date: to_offset(session.expires_at())?,
        }))
    }

    /// Delete the record on every node.
    async fn delete(&self, id: &Id) -> session_store::Result<()> {
        self.manager
            .delete_session(token(id).id())
            .await
            .map(|_| ())
            .map_err(store_error)
    }
}

#[async_trait]
impl ExpiredDeletion for PgSessionStore {
    /// Delete expired sessions now (pgsession also does this on its own schedule).
    async fn delete_expired(&self) -> session_store::Result<()> {
        self.manager
            .cleanup_expired()
            .await
            .map(|_| ())
            .map_err(store_error)
    }
}
