//! A session as stored: what the store reads and the cache holds. The public
//! [`Session`](crate::Session) wraps one with the caller's pending changes.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::ids::UserId;

/// One row of the sessions table.
#[derive(Clone, Debug)]
pub(crate) struct Record {
    pub id: Uuid,
    /// `None` before login.
    pub user_id: Option<UserId>,
    /// Incremented by every committed change of attributes or expiry.
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub last_accessed_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// Shared between copies until one of them changes.
    pub attributes: Arc<Map<String, Value>>,
}

impl Record {
    /// Whether the session is expired at `now`, given its last access.
    pub(crate) fn is_expired(&self, now: DateTime<Utc>, idle: Option<chrono::Duration>) -> bool {
        self.expires_at <= now || idle.is_some_and(|idle| self.last_accessed_at + idle <= now)
    }

    /// A fresh record for unit tests, valid for an hour.
    #[cfg(test)]
    pub(crate) fn for_test(version: i64) -> Record {
        let now = Utc::now();
        Record {
            id: Uuid::new_v4(),
            user_id: Some(UserId::from(Uuid::new_v4())),
            version,
            created_at: now,
            updated_at: now,
            last_accessed_at: now,
            expires_at: now + chrono::Duration::hours(1),
            attributes: Arc::new(Map::new()),
        }
    }
}
