//! Sessions in this process's memory, for
//! [`SessionManager::in_memory`](crate::SessionManager::in_memory): every operation of
//! [`Storage`] with the semantics of its PostgreSQL statement, over a map. One mutex makes each
//! operation atomic, as each statement is one transaction. Nothing here needs PostgreSQL.

use std::collections::HashMap;
use std::future::ready;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{
    Access, Created, Deleted, Delta, Io, NewSession, Page, Rotated, Rotation, Storage, Stored,
    UpdateOutcome,
};
use crate::error::{Error, Result};
use crate::manager::Status;
use crate::model::expiry::ExpiryPolicy;
use crate::model::ids::UserId;
use crate::model::json::stored_size;
use crate::model::record::Record;

#[derive(Default)]
struct Db {
    sessions: HashMap<Uuid, Record>,
    last_cleanup: Option<DateTime<Utc>>,
}

/// Sessions in a map.
#[derive(Default)]
pub(crate) struct MemoryStorage {
    db: Mutex<Db>,
}

impl MemoryStorage {
    fn lock(&self) -> MutexGuard<'_, Db> {
        // Every critical section leaves the map consistent before anything can panic.
        self.db.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Delete the sessions `doomed` picks; how many.
    fn delete_where(&self, doomed: impl Fn(&Record) -> bool) -> u64 {
        let mut db = self.lock();
        let before = db.sessions.len();
        db.sessions.retain(|_, r| !doomed(r));
        (before - db.sessions.len()) as u64
    }
}

/// An operation done in the critical section, as a storage future.
fn done<'a, T: Send + 'a>(outcome: Result<T>) -> Io<'a, T> {
    Box::pin(ready(outcome))
}

impl Storage for MemoryStorage {
    fn fetch(&self, id: Uuid) -> Io<'_, Option<Record>> {
        done(Ok(self.lock().sessions.get(&id).cloned()))
    }

    fn fetch_user<'a>(&'a self, user: &'a UserId, now: DateTime<Utc>) -> Io<'a, Vec<Record>> {
        done(Ok(self
            .lock()
            .sessions
            .values()
            .filter(|r| r.user_id.as_ref() == Some(user) && r.expires_at > now)
            .cloned()
            .collect()))
    }

    fn count_user<'a>(
        &'a self,
        user: &'a UserId,
        now: DateTime<Utc>,
        settled: Option<DateTime<Utc>>,
    ) -> Io<'a, u64> {
        done(Ok(self
            .lock()
            .sessions
            .values()
            .filter(|r| r.user_id.as_ref() == Some(user) && live(r, now, settled))
            .count() as u64))
    }

    fn page(&self, after: Option<Uuid>, now: DateTime<Utc>, limit: usize) -> Io<'_, Page> {
        let db = self.lock();
        let mut page: Vec<&Record> = db
            .sessions
            .values()
            .filter(|r| after.is_none_or(|a| r.id > a) && r.expires_at > now)
            .collect();
        page.sort_unstable_by_key(|r| r.id);
        let records: Vec<Record> = page.into_iter().take(limit).cloned().collect();
        done(Ok(Page {
            scanned: records.len(),
            last: records.last().map(|r| r.id),
            records,
        }))
    }

    fn count_active(&self, since: DateTime<Utc>, now: DateTime<Utc>) -> Io<'_, u64> {
        done(Ok(self
            .lock()
            .sessions
            .values()
            .filter(|r| r.last_accessed_at > since && r.expires_at > now)
            .count() as u64))
    }

    fn create<'a>(&'a self, new: &'a NewSession<'a>) -> Io<'a, Created> {
        let mut db = self.lock();
        if db.sessions.contains_key(&new.id) {
            return done(Err(Error::AlreadyExists));
        }
        let evicted = match (new.user_id, new.cap) {
            (Some(user), Some((cap, reject))) => {
                make_room(&mut db, user, None, new.now, new.settled, cap, reject)
            }
            _ => Ok(Vec::new()),
        };
        done(evicted.map(|evicted| {
            db.sessions.insert(new.id, new.record());
            Created {
                evicted,
                announcement: None,
            }
        }))
    }

    fn update<'a>(&'a self, d: &'a Delta<'a>) -> Io<'a, UpdateOutcome> {
        let mut db = self.lock();
        let Some(row) = db.sessions.get_mut(&d.id) else {
            return done(Ok(UpdateOutcome::Gone));
        };
        if let Some(refusal) = d.refusal(&stored(row, d)) {
            return done(Ok(refusal));
        }
        apply(row, d);
        done(Ok(UpdateOutcome::Updated {
            record: Box::new(row.clone()),
            announcement: None,
        }))
    }

    fn rotate<'a>(&'a self, r: &'a Rotation<'a>) -> Io<'a, Option<Rotated>> {
        let mut db = self.lock();
        let d = r.delta;
        let Some(row) = db.sessions.get(&d.id) else {
            return done(Ok(None));
        };
        // A rotation has no expected version: the refusals are expiry and size.
        match d.refusal(&stored(row, d)) {
            None => {}
            Some(UpdateOutcome::TooLarge { size }) => {
                return done(Err(Error::SessionTooLarge {
                    size,
                    limit: d.max_size,
                }));
            }
            Some(_) => return done(Ok(None)),
        }
        let mut evicted = Vec::new();
        if let (Some(Some(user)), Some((cap, reject))) = (r.user, r.cap) {
            match make_room(&mut db, user, Some(d.id), d.now, r.settled, cap, reject) {
                Ok(gone) => evicted = gone,
                Err(e) => return done(Err(e)),
            }
        }
        let mut row = db.sessions.remove(&d.id).expect("checked above");
        if let Some(user) = r.user {
            row.user_id = user.cloned();
        }
        apply(&mut row, d);
        row.last_accessed_at = row.last_accessed_at.max(d.now);
        row.id = r.new_id;
        db.sessions.insert(r.new_id, row.clone());
        done(Ok(Some(Rotated {
            record: row,
            evicted,
            announcement: None,
        })))
    }

    fn delete(&self, id: Uuid) -> Io<'_, Deleted> {
        done(Ok(Deleted {
            existed: self.lock().sessions.remove(&id).is_some(),
            announcement: None,
            retried: false,
        }))
    }

    fn delete_user<'a>(&'a self, user: &'a UserId, keep: &'a [Uuid]) -> Io<'a, u64> {
        done(Ok(self.delete_where(|r| {
            r.user_id.as_ref() == Some(user) && !keep.contains(&r.id)
        })))
    }

    fn delete_group<'a>(&'a self, group: &'a str) -> Io<'a, u64> {
        done(Ok(
            self.delete_where(|r| r.group_id.as_deref() == Some(group))
        ))
    }

    fn delete_all(&self) -> Io<'_, u64> {
        done(Ok(self.delete_where(|_| true)))
    }

    fn remove_user_attribute<'a>(
        &'a self,
        user: &'a UserId,
        key: &'a str,
        now: DateTime<Utc>,
    ) -> Io<'a, u64> {
        let mut n = 0;
        for row in self.lock().sessions.values_mut() {
            if row.user_id.as_ref() == Some(user) && row.attributes.contains_key(key) {
                Arc::make_mut(&mut row.attributes).remove(key);
                row.forget_expiry(key);
                row.version += 1;
                row.writes += 1;
                row.updated_at = now;
                n += 1;
            }
        }
        done(Ok(n))
    }

    /// No cache to clear: every read is a map lookup.
    fn clear_caches(&self) -> Io<'_, ()> {
        done(Ok(()))
    }

    fn touch<'a>(&'a self, accesses: &'a [Access]) -> Io<'a, u64> {
        let mut db = self.lock();
        let mut n = 0;
        for access in accesses {
            if let Some(row) = db.sessions.get_mut(&access.id)
                && (row.last_accessed_at < access.at || access.reads > 0)
            {
                row.last_accessed_at = row.last_accessed_at.max(access.at);
                row.reads += access.reads;
                n += 1;
            }
        }
        done(Ok(n))
    }

    fn cleanup_batch(
        &self,
        now: DateTime<Utc>,
        settled: Option<DateTime<Utc>>,
        limit: usize,
    ) -> Io<'_, Vec<(Uuid, Option<UserId>)>> {
        let mut db = self.lock();
        let doomed: Vec<Uuid> = db
            .sessions
            .values()
            .filter(|r| !live(r, now, settled))
            .take(limit)
            .map(|r| r.id)
            .collect();
        done(Ok(doomed
            .into_iter()
            .filter_map(|id| db.sessions.remove(&id))
            .map(|r| (r.id, r.user_id))
            .collect()))
    }

    /// All at once (the limit bounds statements, and there are none).
    fn cleanup_attributes(&self, now: DateTime<Utc>, _limit: usize) -> Io<'_, u64> {
        let mut n = 0;
        for row in self.lock().sessions.values_mut() {
            if row.attribute_expiry.values().any(|at| *at <= now) {
                row.strip_expired_attributes(now);
                n += 1;
            }
        }
        done(Ok(n))
    }

    fn cleanup_done(&self, at: DateTime<Utc>) -> Io<'_, ()> {
        self.lock().last_cleanup = Some(at);
        done(Ok(()))
    }

    fn status<'a>(&'a self, policy: &'a ExpiryPolicy, now: DateTime<Utc>) -> Io<'a, Status> {
        let db = self.lock();
        let recent = now - chrono::Duration::minutes(5);
        let live: Vec<&Record> = db
            .sessions
            .values()
            .filter(|r| !policy.is_expired(r, now))
            .collect();
        done(Ok(Status {
            sessions: db.sessions.len() as u64,
            live: live.len() as u64,
            anonymous: live.iter().filter(|r| r.user_id.is_none()).count() as u64,
            active_last_5_minutes: db
                .sessions
                .values()
                .filter(|r| r.last_accessed_at > recent && r.expires_at > now)
                .count() as u64,
            last_cleanup: db.last_cleanup,
            ..Status::default()
        }))
    }
}

/// Not past its absolute expiry at `now`, and (with `settled`) accessed after it: live by
/// stored times, as the cap and cleanup count.
fn live(r: &Record, now: DateTime<Utc>, settled: Option<DateTime<Utc>>) -> bool {
    r.expires_at > now && settled.is_none_or(|c| r.last_accessed_at > c)
}

/// What an update's refusal is decided on: the row, and the sizes of its attributes before
/// and after the delta (only computed when the delta sets something).
fn stored(row: &Record, d: &Delta<'_>) -> Stored {
    let (merged_size, size) = if d.set.is_empty() {
        (0, 0)
    } else {
        let mut merged = (*row.attributes).clone();
        for key in &d.removed {
            merged.remove(key);
        }
        for (k, v) in &d.set {
            merged.insert(k.clone(), v.clone());
        }
        (stored_size(&merged), stored_size(&row.attributes))
    };
    Stored {
        version: row.version,
        expires_at: row.expires_at,
        last_accessed_at: row.last_accessed_at,
        merged_size,
        size,
    }
}

/// The update statement's SET clause.
fn apply(row: &mut Record, d: &Delta<'_>) {
    let attributes = Arc::make_mut(&mut row.attributes);
    for key in &d.removed {
        attributes.remove(key);
    }
    for (key, value) in &d.set {
        attributes.insert(key.clone(), value.clone());
    }
    for key in d
        .removed
        .iter()
        .copied()
        .chain(d.set.keys().map(String::as_str))
    {
        row.forget_expiry(key);
    }
    if !d.set_expiry.is_empty() {
        let expiry = row.attribute_expiry.make_mut();
        expiry.extend(d.set_expiry.iter().map(|(k, at)| (k.clone(), *at)));
    }
    if let Some(at) = d.expires_at {
        row.expires_at = at;
    }
    row.version += 1;
    row.writes += 1;
    row.updated_at = d.now;
}

/// The create function's cap: keep the user's `cap - 1` best sessions (live before dead, then
/// most recently used), except `keep`; with `reject`, refuse instead when the user has `cap`
/// live ones.
fn make_room(
    db: &mut Db,
    user: &UserId,
    keep: Option<Uuid>,
    now: DateTime<Utc>,
    settled: Option<DateTime<Utc>>,
    cap: usize,
    reject: bool,
) -> Result<Vec<Uuid>> {
    let mut mine: Vec<&Record> = db
        .sessions
        .values()
        .filter(|r| r.user_id.as_ref() == Some(user) && Some(r.id) != keep)
        .collect();
    if reject && mine.iter().filter(|r| live(r, now, settled)).count() >= cap {
        return Err(Error::MaxSessionsReached);
    }
    mine.sort_by(|a, b| {
        (live(b, now, settled), b.last_accessed_at)
            .cmp(&(live(a, now, settled), a.last_accessed_at))
            .then(a.id.cmp(&b.id))
    });
    let evicted: Vec<Uuid> = mine
        .iter()
        .skip(cap.saturating_sub(1))
        .map(|r| r.id)
        .collect();
    for id in &evicted {
        db.sessions.remove(id);
    }
    Ok(evicted)
}
