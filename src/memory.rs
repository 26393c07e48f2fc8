//! The in-memory backend of [`SessionManager::in_memory`](crate::SessionManager::in_memory):
//! the store's operations, with the same semantics, over a map in this process. One mutex
//! makes every operation atomic, as each store statement is one transaction.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::ids::UserId;
use crate::json::stored_size;
use crate::record::Record;
use crate::store::{Delta, NewSession, Page, Rotated, Rotation, Stored, UpdateOutcome, Updated};

#[derive(Default)]
struct Db {
    sessions: HashMap<Uuid, Record>,
    /// Clears so far (a `clear_cache` or `delete_all_sessions`).
    epoch: i64,
    last_cleanup: Option<DateTime<Utc>>,
}

/// Sessions in a map.
#[derive(Default)]
pub(crate) struct MemoryStore {
    db: Mutex<Db>,
}

impl MemoryStore {
    fn lock(&self) -> MutexGuard<'_, Db> {
        // Every critical section leaves the map consistent before anything can panic.
        self.db.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn fetch(&self, id: Uuid) -> Option<Record> {
        self.lock().sessions.get(&id).cloned()
    }

    pub(crate) fn fetch_user(&self, user: &UserId, now: DateTime<Utc>) -> Vec<Record> {
        self.lock()
            .sessions
            .values()
            .filter(|r| r.user_id.as_ref() == Some(user) && r.expires_at > now)
            .cloned()
            .collect()
    }

    pub(crate) fn create(&self, new: &NewSession<'_>) -> Result<Vec<Uuid>> {
        let mut db = self.lock();
        if db.sessions.contains_key(&new.id) {
            return Err(Error::AlreadyExists);
        }
        let evicted = match (new.user_id, new.cap) {
            (Some(user), Some((cap, reject))) => {
                make_room(&mut db, user, None, new.now, new.idle_cutoff, cap, reject)?
            }
            _ => Vec::new(),
        };
        db.sessions.insert(
            new.id,
            Record {
                id: new.id,
                user_id: new.user_id.cloned(),
                version: 1,
                created_at: new.now,
                updated_at: new.now,
                last_accessed_at: new.now,
                expires_at: new.expires_at,
                attributes: Arc::new(new.attributes.clone()),
                attribute_expiry: Arc::new(new.attribute_expiry.clone()),
                group_id: new.group_id.map(Arc::from),
                client: Arc::new(new.client.clone()),
                reads: 0,
                writes: 0,
            },
        );
        Ok(evicted)
    }

    pub(crate) fn update(&self, d: &Delta<'_>) -> UpdateOutcome {
        let mut db = self.lock();
        let Some(row) = db.sessions.get_mut(&d.id) else {
            return UpdateOutcome::Gone;
        };
        if let Some(refusal) = d.refusal(&stored(row, d)) {
            return refusal;
        }
        apply(row, d);
        UpdateOutcome::Updated(Box::new(updated(row, d.base_version)), None)
    }

    pub(crate) fn rotate(&self, r: &Rotation<'_>) -> Result<Option<Rotated>> {
        let mut db = self.lock();
        let d = r.delta;
        let Some(row) = db.sessions.get(&d.id) else {
            return Ok(None);
        };
        // A rotation has no expected version: the refusals are expiry and size.
        match d.refusal(&stored(row, d)) {
            None => {}
            Some(UpdateOutcome::TooLarge { size }) => {
                return Err(Error::SessionTooLarge {
                    size,
                    limit: d.max_size,
                });
            }
            Some(_) => return Ok(None),
        }
        let mut evicted = Vec::new();
        if let (Some(Some(user)), Some((cap, reject))) = (r.user, r.cap) {
            evicted = make_room(&mut db, user, Some(d.id), d.now, r.cap_cutoff, cap, reject)?;
        }
        let mut row = db.sessions.remove(&d.id).expect("checked above");
        if let Some(user) = r.user {
            row.user_id = user.cloned();
        }
        apply(&mut row, d);
        row.last_accessed_at = row.last_accessed_at.max(d.now);
        row.id = r.new_id;
        let mut done = updated(&row, i64::MIN);
        done.record.id = r.new_id;
        db.sessions.insert(r.new_id, row);
        Ok(Some(Rotated {
            updated: done,
            evicted,
            queued: None,
        }))
    }

    pub(crate) fn delete(&self, id: Uuid) -> bool {
        self.lock().sessions.remove(&id).is_some()
    }

    pub(crate) fn delete_where(&self, doomed: impl Fn(&Record) -> bool) -> u64 {
        let mut db = self.lock();
        let before = db.sessions.len();
        db.sessions.retain(|_, r| !doomed(r));
        (before - db.sessions.len()) as u64
    }

    pub(crate) fn delete_all(&self) -> (u64, i64) {
        let mut db = self.lock();
        let n = db.sessions.len() as u64;
        db.sessions.clear();
        db.epoch += 1;
        (n, db.epoch)
    }

    pub(crate) fn clear(&self) -> i64 {
        let mut db = self.lock();
        db.epoch += 1;
        db.epoch
    }

    pub(crate) fn remove_user_attribute(
        &self,
        user: &UserId,
        key: &str,
        now: DateTime<Utc>,
    ) -> u64 {
        let mut n = 0;
        for row in self.lock().sessions.values_mut() {
            if row.user_id.as_ref() == Some(user) && row.attributes.contains_key(key) {
                Arc::make_mut(&mut row.attributes).remove(key);
                Arc::make_mut(&mut row.attribute_expiry).remove(key);
                row.version += 1;
                row.writes += 1;
                row.updated_at = now;
                n += 1;
            }
        }
        n
    }

    pub(crate) fn touch(&self, ids: &[Uuid], times: &[DateTime<Utc>], reads: &[i64]) -> u64 {
        let mut db = self.lock();
        let mut n = 0;
        for ((id, at), count) in ids.iter().zip(times).zip(reads) {
            if let Some(row) = db.sessions.get_mut(id)
                && (row.last_accessed_at < *at || *count > 0)
            {
                row.last_accessed_at = row.last_accessed_at.max(*at);
                row.reads += count;
                n += 1;
            }
        }
        n
    }

    pub(crate) fn cleanup(
        &self,
        now: DateTime<Utc>,
        idle_cutoff: Option<DateTime<Utc>>,
        limit: usize,
    ) -> Vec<(Uuid, Option<UserId>)> {
        let mut db = self.lock();
        let doomed: Vec<Uuid> = db
            .sessions
            .values()
            .filter(|r| r.expires_at <= now || idle_cutoff.is_some_and(|c| r.last_accessed_at <= c))
            .take(limit)
            .map(|r| r.id)
            .collect();
        doomed
            .into_iter()
            .filter_map(|id| db.sessions.remove(&id))
            .map(|r| (r.id, r.user_id))
            .collect()
    }

    pub(crate) fn cleanup_attributes(&self, now: DateTime<Utc>) -> u64 {
        let mut n = 0;
        for row in self.lock().sessions.values_mut() {
            if row.attribute_expiry.values().any(|at| *at <= now) {
                row.strip_expired_attributes(now);
                n += 1;
            }
        }
        n
    }

    pub(crate) fn cleanup_done(&self, at: DateTime<Utc>) {
        self.lock().last_cleanup = Some(at);
    }

    /// Sessions, live ones (by `now` and `idle`), anonymous live ones, ones active since
    /// `recent`, and the last cleanup.
    pub(crate) fn status(
        &self,
        now: DateTime<Utc>,
        idle: Option<chrono::Duration>,
        recent: DateTime<Utc>,
    ) -> (u64, u64, u64, u64, Option<DateTime<Utc>>) {
        let db = self.lock();
        let live: Vec<&Record> = db
            .sessions
            .values()
            .filter(|r| !r.is_expired(now, idle))
            .collect();
        (
            db.sessions.len() as u64,
            live.len() as u64,
            live.iter().filter(|r| r.user_id.is_none()).count() as u64,
            db.sessions
                .values()
                .filter(|r| r.last_accessed_at > recent && r.expires_at > now)
                .count() as u64,
            db.last_cleanup,
        )
    }

    pub(crate) fn count_active(&self, since: DateTime<Utc>, now: DateTime<Utc>) -> u64 {
        self.lock()
            .sessions
            .values()
            .filter(|r| r.last_accessed_at > since && r.expires_at > now)
            .count() as u64
    }

    pub(crate) fn page(&self, after: Option<Uuid>, now: DateTime<Utc>, limit: usize) -> Page {
        let db = self.lock();
        let mut page: Vec<&Record> = db
            .sessions
            .values()
            .filter(|r| after.is_none_or(|a| r.id > a) && r.expires_at > now)
            .collect();
        page.sort_unstable_by_key(|r| r.id);
        let records: Vec<Record> = page.into_iter().take(limit).cloned().collect();
        Page {
            scanned: records.len(),
            last: records.last().map(|r| r.id),
            records,
        }
    }
}

/// What an update's refusal is decided on: the row, and the sizes of its attributes before
/// and after the delta (only computed when the delta sets something).
fn stored(row: &Record, d: &Delta<'_>) -> Stored {
    let (merged_size, size) = if d.set.is_empty() {
        (0, 0)
    } else {
        let mut merged = (*row.attributes).clone();
        for key in &d.removed {
            merged.remove(*key);
        }
        merged.extend(d.set.iter().map(|(k, v)| (k.clone(), v.clone())));
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
    let expiry = Arc::make_mut(&mut row.attribute_expiry);
    for key in &d.removed {
        attributes.remove(*key);
        expiry.remove(*key);
    }
    for (key, value) in &d.set {
        attributes.insert(key.clone(), value.clone());
        expiry.remove(key);
    }
    expiry.extend(d.set_expiry.iter().map(|(k, at)| (k.clone(), *at)));
    if let Some(at) = d.expires_at {
        row.expires_at = at;
    }
    row.version += 1;
    row.writes += 1;
    row.updated_at = d.now;
}

/// What the update statement returns: the attributes only when someone else wrote since
/// `base_version`.
fn updated(row: &Record, base_version: i64) -> Updated {
    let mut record = row.clone();
    let attributes = (row.version != base_version.saturating_add(1))
        .then(|| ((*row.attributes).clone(), (*row.attribute_expiry).clone()));
    record.attributes = Arc::default();
    record.attribute_expiry = Arc::default();
    Updated { record, attributes }
}

/// The create function's cap: keep the user's `cap - 1` best sessions (live before dead, then
/// most recently used), except `keep`; with `reject`, refuse instead when the user has `cap`
/// live ones.
fn make_room(
    db: &mut Db,
    user: &UserId,
    keep: Option<Uuid>,
    now: DateTime<Utc>,
    idle_cutoff: Option<DateTime<Utc>>,
    cap: usize,
    reject: bool,
) -> Result<Vec<Uuid>> {
    let live =
        |r: &Record| r.expires_at > now && idle_cutoff.is_none_or(|c| r.last_accessed_at > c);
    let mut mine: Vec<&Record> = db
        .sessions
        .values()
        .filter(|r| r.user_id.as_ref() == Some(user) && Some(r.id) != keep)
        .collect();
    if reject && mine.iter().filter(|r| live(r)).count() >= cap {
        return Err(Error::MaxSessionsReached);
    }
    mine.sort_by(|a, b| {
        (live(b), b.last_accessed_at)
            .cmp(&(live(a), a.last_accessed_at))
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
