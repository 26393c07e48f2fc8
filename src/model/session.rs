//! The `Session` value handed to callers, and attribute validation.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::model::attributes::Attributes;
use crate::model::clock::Clock;
use crate::model::ids::{SessionId, UserId};
use crate::model::record::Record;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// A session: identity, timestamps, and JSON attributes.
///
/// Values returned by the manager are snapshots; change them with [`set`](Self::set) and
/// [`remove`](Self::remove), then persist the changes with
/// [`SessionManager::update_session`](crate::SessionManager::update_session), which writes only
/// the keys changed on this value (so concurrent requests changing different keys both keep
/// their changes). Identity and timestamps are read-only: only what the manager stores can
/// change them.
///
/// A session holds no token: [`id`](Self::id) is its public handle, safe to show and to log.
/// Cloning is cheap: the attribute map is shared until one of the clones changes it.
#[derive(Clone, Debug)]
pub struct Session {
    pub(crate) record: Record,
    pub(crate) changes: Changes,
    pub(crate) max_attribute_size: usize,
    /// The inactivity timeout it was read under, for [`time_to_live`](Self::time_to_live).
    pub(crate) idle_timeout: Option<chrono::Duration>,
    /// The manager's clock, for what expires while the value is held.
    pub(crate) clock: Clock,
    /// The version the attributes were read at (before local changes).
    pub(crate) base_version: i64,
    /// The attributes as a map, once [`attributes`](Self::attributes) asked for them; emptied
    /// by every change.
    pub(crate) map: std::sync::OnceLock<Map<String, Value>>,
}

/// Keys set or removed, and a new expiry, since the value was loaded or last saved.
#[derive(Clone, Debug, Default)]
pub(crate) struct ChangeSet {
    pub keys: BTreeSet<String>,
    pub expires_at: Option<DateTime<Utc>>,
    /// Of the set keys, those that expire on their own, and when.
    pub expiry: BTreeMap<String, DateTime<Utc>>,
}

impl ChangeSet {
    pub(crate) fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.expires_at.is_none()
    }
}

/// A [`ChangeSet`] allocated on the first change: most sessions handed out are only read,
/// and a smaller `Session` is cheaper to hand out.
#[derive(Clone, Debug, Default)]
pub(crate) struct Changes(Option<Box<ChangeSet>>);

impl Changes {
    /// The changes, to make more.
    pub(crate) fn edit(&mut self) -> &mut ChangeSet {
        self.0.get_or_insert_with(Box::default)
    }
}

impl std::ops::Deref for Changes {
    type Target = ChangeSet;

    fn deref(&self) -> &ChangeSet {
        static NONE: ChangeSet = ChangeSet {
            keys: BTreeSet::new(),
            expires_at: None,
            expiry: BTreeMap::new(),
        };
        self.0.as_deref().unwrap_or(&NONE)
    }
}

impl Session {
    /// The session's public handle (a hash of its token).
    pub fn id(&self) -> SessionId {
        SessionId(self.record.id)
    }

    /// The user it belongs to; `None` before login
    /// ([`create_anonymous_session`](crate::SessionManager::create_anonymous_session)).
    pub fn user_id(&self) -> Option<&UserId> {
        self.record.user_id.as_ref()
    }

    /// Incremented by every committed change (attributes, expiry, rotation, login); last-access
    /// updates do not change it.
    pub fn version(&self) -> i64 {
        self.record.version
    }

    /// When the session was created.
    pub fn created_at(&self) -> DateTime<Utc> {
        self.record.created_at
    }

    /// When attributes, expiry, token or user last changed.
    pub fn updated_at(&self) -> DateTime<Utc> {
        self.record.updated_at
    }

    /// Last recorded access (this read included, when the value comes from `get_session`).
    pub fn last_accessed_at(&self) -> DateTime<Utc> {
        self.record.last_accessed_at
    }

    /// Absolute expiry: the session is never returned after this instant. Move it with
    /// [`set_expires_at`](Self::set_expires_at).
    pub fn expires_at(&self) -> DateTime<Utc> {
        self.record.expires_at
    }

    /// How long until the session expires, absolutely or by inactivity, whichever comes first
    /// (counted from its last recorded access); zero once it has. For a "your session ends in"
    /// notice, or a keep-alive ([`touch_session`](crate::SessionManager::touch_session)) timer.
    pub fn time_to_live(&self) -> std::time::Duration {
        let mut until = self.record.expires_at;
        if let Some(idle) = self.idle_timeout {
            until = until.min(self.record.last_accessed_at + idle);
        }
        (until - self.clock.now()).to_std().unwrap_or_default()
    }

    /// The group (tenant) it belongs to, if it was created with one
    /// ([`SessionOptions::group`](crate::SessionOptions::group)).
    pub fn group_id(&self) -> Option<&str> {
        self.record.group_id.as_deref()
    }

    /// The client address recorded when it was created, if any.
    pub fn ip(&self) -> Option<std::net::IpAddr> {
        self.record.client.ip
    }

    /// The client's `User-Agent` recorded when it was created, if any.
    pub fn user_agent(&self) -> Option<&str> {
        self.record.client.user_agent.as_deref()
    }

    /// Reads of the session (`get_session` calls that returned it), on every node. Each node
    /// counts its own and adds them with its last-access flush, so a value read from the
    /// database (`list_user_sessions`, `list_sessions`, `get_session_fresh`) is exact to one
    /// flush interval; a cached copy adds this node's reads to the count it was cached with.
    pub fn reads(&self) -> u64 {
        self.record.reads.max(0) as u64
    }

    /// Committed updates and rotations of the session (its creation not included).
    pub fn writes(&self) -> u64 {
        self.record.writes.max(0) as u64
    }

    /// The attribute `key`, if present (and not expired, see
    /// [`set_with_expiry`](Self::set_with_expiry)).
    pub fn get(&self, key: &str) -> Option<&Value> {
        if self.record.attribute_expired(key, self.clock.now()) {
            return None;
        }
        self.record.attributes.get(key)
    }

    /// When attribute `key` expires on its own, if it was set with
    /// [`set_with_expiry`](Self::set_with_expiry).
    pub fn attribute_expires_at(&self, key: &str) -> Option<DateTime<Utc>> {
        self.record.attribute_expiry.get(key).copied()
    }

    /// The attribute `key` deserialized into `T`; `Ok(None)` when absent,
    /// [`Error::AttributeType`] when present but of another shape.
    pub fn get_as<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        decode(key, self.get(key))
    }

    /// Set attribute `key` to `value` (anything `Serialize`). Checked at once: a value over
    /// [`Config::max_attribute_size`](crate::Config) bytes of JSON gives
    /// [`Error::AttributeTooLarge`], one PostgreSQL cannot store gives
    /// [`Error::InvalidAttribute`]; on error the session is unchanged.
    pub fn set(&mut self, key: impl Into<String>, value: impl Serialize) -> Result<()> {
        let key = key.into();
        let value = crate::model::json::encode(&key, value, self.max_attribute_size)?;
        Arc::make_mut(&mut self.record.attributes).insert(key.clone(), value);
        self.map.take();
        self.record.forget_expiry(&key);
        self.changes.edit().expiry.remove(&key);
        self.changes.edit().keys.insert(key);
        Ok(())
    }

    /// Set attribute `key` to `value` until `expires_at`: from then on it is invisible to every
    /// read on every node (as if removed), and cleanup removes it from the database. For a
    /// one-time code, a flash message, a "recently re-authenticated" mark. Setting the key
    /// again (with [`set`](Self::set) or this) replaces the expiry; checks as `set` does, and
    /// [`Error::InvalidExpiry`] outside the years 1970 to 9999.
    pub fn set_with_expiry(
        &mut self,
        key: impl Into<String>,
        value: impl Serialize,
        expires_at: DateTime<Utc>,
    ) -> Result<()> {
        let key = key.into();
        let expires_at = storable_expiry(expires_at)?;
        self.set(key.clone(), value)?;
        self.record
            .attribute_expiry
            .make_mut()
            .insert(key.clone(), expires_at);
        self.changes.edit().expiry.insert(key, expires_at);
        Ok(())
    }

    /// Remove attribute `key`, returning its value if it was present. The removal is persisted
    /// by the next `update_session`, even if this value did not have the key (another node
    /// may have set it). A key PostgreSQL cannot store (containing `\u0000`) makes that
    /// `update_session` fail with [`Error::InvalidAttribute`].
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        self.changes.edit().keys.insert(key.to_owned());
        self.changes.edit().expiry.remove(key);
        self.record.forget_expiry(key);
        if self.record.attributes.contains_key(key) {
            self.map.take();
            Arc::make_mut(&mut self.record.attributes).remove(key)
        } else {
            None
        }
    }

    /// All attributes (without those that had expired when the value was read).
    ///
    /// Built on first call from the form a cached session keeps (see `docs/design.md`);
    /// [`get`](Self::get) and [`attribute_entries`](Self::attribute_entries) need no map.
    pub fn attributes(&self) -> &Map<String, Value> {
        self.map.get_or_init(|| self.record.attributes.to_map())
    }

    /// Every attribute, in key order (without those that had expired when the value was
    /// read), without building a map.
    pub fn attribute_entries(&self) -> impl ExactSizeIterator<Item = (&str, &Value)> {
        self.record.attributes.iter()
    }

    /// Move the absolute expiry (earlier or later); persisted by the next `update_session`.
    /// For example `s.set_expires_at(Utc::now() + chrono::Duration::days(30))?` on "remember
    /// me". Instants outside the years 1970 to 9999 give [`Error::InvalidExpiry`] and leave the
    /// session unchanged.
    ///
    pub fn set_expires_at(&mut self, expires_at: DateTime<Utc>) -> Result<()> {
        let expires_at = storable_expiry(expires_at)?;
        self.record.expires_at = expires_at;
        self.changes.edit().expires_at = Some(expires_at);
        Ok(())
    }

    /// True when the value has changes that `update_session` would write.
    pub fn is_modified(&self) -> bool {
        !self.changes.is_empty()
    }

    /// `fresh` (a newer read of the same session) with this value's changes made again on
    /// it: what an optimistic writer retries with after a conflict.
    #[cfg_attr(not(feature = "axum"), allow(dead_code))]
    pub(crate) fn rebase(&self, mut fresh: Session) -> Session {
        for key in &self.changes.keys {
            match self.record.attributes.get(key) {
                Some(value) => {
                    Arc::make_mut(&mut fresh.record.attributes).insert(key.clone(), value.clone());
                    match self.changes.expiry.get(key) {
                        Some(at) => {
                            fresh
                                .record
                                .attribute_expiry
                                .make_mut()
                                .insert(key.clone(), *at);
                        }
                        None => fresh.record.forget_expiry(key),
                    }
                }
                None => {
                    Arc::make_mut(&mut fresh.record.attributes).remove(key);
                    fresh.record.forget_expiry(key);
                }
            }
        }
        if let Some(at) = self.changes.expires_at {
            fresh.record.expires_at = at;
        }
        fresh.changes = self.changes.clone();
        fresh.map.take();
        fresh
    }

    /// A stored session handed to a caller, with no changes yet and without the attributes
    /// expired at `now`.
    pub(crate) fn from_record(
        mut record: Record,
        max_attribute_size: usize,
        idle_timeout: Option<chrono::Duration>,
        clock: Clock,
        now: DateTime<Utc>,
    ) -> Session {
        record.strip_expired_attributes(now);
        Session {
            base_version: record.version,
            record,
            changes: Changes::default(),
            max_attribute_size,
            idle_timeout,
            clock,
            map: std::sync::OnceLock::new(),
        }
    }
}

/// Validate every attribute of a new session and build them; rejects before any SQL runs.
pub(crate) fn build_attributes<K: Into<String>, V: Serialize>(
    attributes: impl IntoIterator<Item = (K, V)>,
    max_size: usize,
) -> Result<Attributes> {
    let mut pairs = Vec::new();
    for (key, value) in attributes {
        let key = key.into();
        let value = crate::model::json::encode(&key, value, max_size)?;
        pairs.push((key, value));
    }
    Ok(pairs.into_iter().collect())
}

/// `expires_at` as stored (to the microsecond), or [`Error::InvalidExpiry`] outside the years
/// 1970 to 9999.
pub(crate) fn storable_expiry(expires_at: DateTime<Utc>) -> Result<DateTime<Utc>> {
    let year = chrono::Datelike::year(&expires_at);
    if !(1970..=9999).contains(&year) {
        return Err(Error::InvalidExpiry { expires_at });
    }
    Ok(crate::model::clock::to_micros(expires_at))
}

/// An attribute's value as a `T` (`None` when absent): the one place its type error is made.
pub(crate) fn decode<T: DeserializeOwned>(key: &str, value: Option<&Value>) -> Result<Option<T>> {
    value
        .map(|value| {
            T::deserialize(value).map_err(|source| Error::AttributeType {
                key: key.to_owned(),
                source,
            })
        })
        .transpose()
}

/// A fresh session for unit tests, valid for an hour.
#[cfg(test)]
pub(crate) fn test_session(version: i64, max_attribute_size: usize) -> Session {
    Session::from_record(
        Record::for_test(version),
        max_attribute_size,
        None,
        Clock::system(),
        Utc::now(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn session() -> Session {
        test_session(1, 32)
    }

    #[test]
    fn set_rejects_oversized_value_and_leaves_session_unchanged() {
        let mut s = session();
        let err = s.set("big", "x".repeat(40)).unwrap_err();
        // "big":"xxx…" is 6 + 42 bytes.
        assert!(matches!(
            err,
            Error::AttributeTooLarge {
                size: 48,
                limit: 32,
                ..
            }
        ));
        let err = s.set("k".repeat(40), 1).unwrap_err();
        assert!(
            matches!(err, Error::AttributeTooLarge { .. }),
            "long keys count"
        );
        assert!(s.get("big").is_none());
        assert!(!s.is_modified());
    }

    #[test]
    fn set_rejects_nul_in_nested_strings_and_keys() {
        let mut s = session();
        assert!(matches!(
            s.set("a", json!({"x": ["ok", "bad\u{0}"]})),
            Err(Error::InvalidAttribute { .. })
        ));
        assert!(matches!(
            s.set("a", json!({"k\u{0}": 1})),
            Err(Error::InvalidAttribute { .. })
        ));
        assert!(matches!(
            s.set("k\u{0}", 1),
            Err(Error::InvalidAttribute { .. })
        ));
        assert!(!s.is_modified());
    }

    #[test]
    fn get_as_reports_type_mismatch() {
        let mut s = session();
        s.set("n", 5).unwrap();
        assert_eq!(s.get_as::<u32>("n").unwrap(), Some(5));
        assert_eq!(s.get_as::<u32>("missing").unwrap(), None);
        assert!(matches!(
            s.get_as::<String>("n"),
            Err(Error::AttributeType { .. })
        ));
    }

    #[test]
    fn clones_share_attributes_until_one_changes() {
        let mut a = session();
        a.set("k", 1).unwrap();
        let mut b = a.clone();
        assert!(Arc::ptr_eq(&a.record.attributes, &b.record.attributes));
        b.set("k", 2).unwrap();
        assert_eq!(a.get("k"), Some(&json!(1)));
        assert_eq!(b.get("k"), Some(&json!(2)));
    }
}
