//! A session as stored: what the store reads and the cache holds. The public
//! [`Session`](crate::Session) wraps one with the caller's pending changes.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::model::attributes::Attributes;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::model::ids::UserId;

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
    pub attributes: Arc<Attributes>,
    /// When attributes expire on their own (keys absent here never do).
    pub attribute_expiry: Lean<BTreeMap<String, DateTime<Utc>>>,
    /// The tenant it belongs to, if any.
    pub group_id: Option<Arc<str>>,
    /// The client that created it, if known.
    pub client: Lean<Client>,
    /// Reads counted in the database (each node adds its own with its last-access flush).
    pub reads: i64,
    /// Committed updates and rotations.
    pub writes: i64,
}

/// A shared value that holds nothing when it is blank: most sessions have no attribute
/// expiry and many no client details, and then a cached copy allocates nothing for them and a
/// hit has no reference count to move. Reads see the blank value.
#[derive(Clone, Debug)]
pub(crate) struct Lean<T: 'static>(Option<Arc<T>>);

impl<T> Default for Lean<T> {
    fn default() -> Lean<T> {
        Lean(None)
    }
}

/// Values [`Lean`] can leave out.
pub(crate) trait Blank: Clone + Sync + 'static {
    fn blank() -> &'static Self;
    fn is_blank(&self) -> bool;
}

impl Blank for BTreeMap<String, DateTime<Utc>> {
    fn blank() -> &'static Self {
        static BLANK: BTreeMap<String, DateTime<Utc>> = BTreeMap::new();
        &BLANK
    }

    fn is_blank(&self) -> bool {
        self.is_empty()
    }
}

impl Blank for Client {
    fn blank() -> &'static Self {
        static BLANK: Client = Client {
            ip: None,
            user_agent: None,
        };
        &BLANK
    }

    fn is_blank(&self) -> bool {
        self.ip.is_none() && self.user_agent.is_none()
    }
}

impl<T: Blank> Lean<T> {
    pub(crate) fn new(value: T) -> Lean<T> {
        Lean((!value.is_blank()).then(|| Arc::new(value)))
    }

    /// The value to change, made on first need.
    pub(crate) fn make_mut(&mut self) -> &mut T {
        Arc::make_mut(self.0.get_or_insert_with(|| Arc::new(T::blank().clone())))
    }
}

impl<T: Blank> std::ops::Deref for Lean<T> {
    type Target = T;

    fn deref(&self) -> &T {
        match &self.0 {
            Some(value) => value,
            None => T::blank(),
        }
    }
}

/// Who created a session: recorded once, at create.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Client {
    pub ip: Option<std::net::IpAddr>,
    pub user_agent: Option<String>,
}

impl Record {
    /// Whether the session is expired at `now`, given its last access.
    pub(crate) fn is_expired(&self, now: DateTime<Utc>, idle: Option<chrono::Duration>) -> bool {
        self.expires_at <= now || idle.is_some_and(|idle| self.last_accessed_at + idle <= now)
    }

    /// Whether attribute `key` has expired at `now`.
    pub(crate) fn attribute_expired(&self, key: &str, now: DateTime<Utc>) -> bool {
        self.attribute_expiry.get(key).is_some_and(|at| *at <= now)
    }

    /// `key` no longer expires on its own (set again, or removed). Copies the shared expiry
    /// map only when it holds `key`.
    pub(crate) fn forget_expiry(&mut self, key: &str) {
        if self.attribute_expiry.contains_key(key) {
            self.attribute_expiry.make_mut().remove(key);
        }
    }

    /// Drop the attributes expired at `now` from this copy (they are invisible to every read).
    pub(crate) fn strip_expired_attributes(&mut self, now: DateTime<Utc>) {
        if self.attribute_expiry.values().any(|at| *at <= now) {
            let expired: Vec<String> = self
                .attribute_expiry
                .iter()
                .filter(|(_, at)| **at <= now)
                .map(|(k, _)| k.clone())
                .collect();
            let attributes = Arc::make_mut(&mut self.attributes);
            let expiry = self.attribute_expiry.make_mut();
            for key in expired {
                attributes.remove(&key);
                expiry.remove(&key);
            }
        }
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
            attributes: Arc::default(),
            attribute_expiry: Lean::default(),
            group_id: None,
            client: Lean::default(),
            reads: 0,
            writes: 0,
        }
    }
}
