//! Where sessions live, behind one seam: the [`Storage`] trait, with the arguments and outcomes
//! of every operation. Implemented by PostgreSQL ([`postgres`]) and by this process's memory
//! ([`memory`]); the coherence layer (`crate::coherence`) wraps the PostgreSQL one and
//! implements the same trait, so the manager writes each operation once for every backend.
//!
//! Adding an operation: a method here, its two implementations (and the coherence layer's
//! forwarding, if it changes what a cache may hold), and the manager room that owns it.

pub(crate) mod memory;
pub(crate) mod postgres;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

use sqlx::PgPool;
use tokio::sync::watch;

use crate::coherence::Figures;
use crate::coherence::cache::{FillTicket, Lookup, Proof, Tag};
use crate::error::Result;
use crate::manager::Status;
use crate::model::attributes::Attributes;
use crate::model::expiry::ExpiryPolicy;
use crate::model::ids::UserId;
use crate::model::record::{Client, Lean, Record};

/// A storage operation's future.
pub(crate) type Io<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// Attribute key -> when it expires.
pub(crate) type AttributeExpiry = BTreeMap<String, DateTime<Utc>>;

/// The operations on stored sessions. Each is one statement (one transaction) on PostgreSQL
/// and one critical section in memory.
pub(crate) trait Storage: Send + Sync + 'static {
    // Reads of one session. Without a cache every read is a `fetch`; the coherence layer
    // answers `lookup` from memory and fills its cache with what a `fetch` found.

    /// The copy of `id` this node may hand out at `now` without I/O, counting nothing when
    /// there is none: the hit path, tried before the caller looks further. `now` may be behind
    /// the true time, up to `latest` (a coarse clock): expiry is decided at `latest`, and when
    /// they differ a copy whose attributes expire on their own is left to `lookup`. A hit notes the
    /// access (at `now`, one read) in the copy, whose `reads` count it: the caller hands it
    /// out as is, and the last-access flush collects it with [`take_served`](Self::take_served).
    fn serve(
        &self,
        _id: Uuid,
        _now: DateTime<Utc>,
        _latest: DateTime<Utc>,
        _idle: Option<chrono::Duration>,
        _proof: Proof<'_>,
        _min_version: i64,
    ) -> Option<Record> {
        None
    }

    /// The copy of `id` this node may hand out at `now` without I/O, or (a miss, counted) a
    /// ticket for caching what a `fetch` is about to find.
    fn lookup(
        &self,
        _id: Uuid,
        _now: DateTime<Utc>,
        _idle: Option<chrono::Duration>,
        _proof: Proof<'_>,
        _min_version: i64,
    ) -> Lookup {
        Lookup::Miss(None)
    }

    /// Hand the accesses hits noted since the last call to `into`, for the last-access flush
    /// to write. `into` runs while the access is still held (under the cache's lock), so a
    /// reader that asks [`served`](Self::served) first and the access buffer second always
    /// finds it in one of the two.
    fn take_served(&self, _into: &mut dyn FnMut(Access)) {}

    /// The sessions with accesses hits noted and not yet taken.
    fn served_sessions(&self) -> Vec<Uuid> {
        Vec::new()
    }

    /// The accesses hits noted for `id` and not yet taken.
    fn served(&self, _id: Uuid) -> Option<Access> {
        None
    }

    /// A ticket for caching what a read of `id` about to start will find.
    fn ticket(&self, _id: Uuid) -> Option<FillTicket> {
        None
    }

    /// One session as stored.
    fn fetch(&self, id: Uuid) -> Io<'_, Option<Record>>;

    /// What a read under `ticket` found, live: kept for later lookups (`tag`: the token
    /// signature verified for it), unless something changed meanwhile.
    fn keep(&self, _ticket: FillTicket, _record: &Record, _now: DateTime<Utc>, _tag: Option<Tag>) {}

    /// A read found `id` gone (`version` `None`) or expired at `version`.
    fn forget(&self, _id: Uuid, _version: Option<i64>) {}

    // Reads of many.

    /// Sessions of `user` not past their absolute expiry.
    fn fetch_user<'a>(&'a self, user: &'a UserId, now: DateTime<Utc>) -> Io<'a, Vec<Record>>;

    /// How many sessions of `user` are live at `now` by their stored times, counting as idle
    /// only those past `settled` (see `ExpiryPolicy::settled_cutoff`).
    fn count_user<'a>(
        &'a self,
        user: &'a UserId,
        now: DateTime<Utc>,
        settled: Option<DateTime<Utc>>,
    ) -> Io<'a, u64>;

    /// Up to `limit` sessions not past their absolute expiry with ids above `after`, in id
    /// order.
    fn page(&self, after: Option<Uuid>, now: DateTime<Utc>, limit: usize) -> Io<'_, Page>;

    /// Sessions not past their absolute expiry accessed after `since` (as stored).
    fn count_active(&self, since: DateTime<Utc>, now: DateTime<Utc>) -> Io<'_, u64>;

    // Writes of one session.

    /// Insert a session, applying the per-user cap in the same transaction.
    fn create<'a>(&'a self, new: &'a NewSession<'a>) -> Io<'a, Created>;

    /// Apply a delta.
    fn update<'a>(&'a self, delta: &'a Delta<'a>) -> Io<'a, UpdateOutcome>;

    /// Move a session to a new id, writing its delta (and binding a user under the cap).
    /// `None` when it is gone or expired.
    fn rotate<'a>(&'a self, rotation: &'a Rotation<'a>) -> Io<'a, Option<Rotated>>;

    /// Delete one session.
    fn delete(&self, id: Uuid) -> Io<'_, Deleted>;

    // Writes of many: one statement each, whatever the number of sessions.

    /// Delete every session of `user` except those in `keep`; how many.
    fn delete_user<'a>(&'a self, user: &'a UserId, keep: &'a [Uuid]) -> Io<'a, u64>;

    /// Delete every session of a group; how many.
    fn delete_group<'a>(&'a self, group: &'a str) -> Io<'a, u64>;

    /// Delete every session; how many.
    fn delete_all(&self) -> Io<'_, u64>;

    /// Remove attribute `key` from every session of `user`; how many had it.
    fn remove_user_attribute<'a>(
        &'a self,
        user: &'a UserId,
        key: &'a str,
        now: DateTime<Utc>,
    ) -> Io<'a, u64>;

    /// Have every node's cache emptied (nothing is stored).
    fn clear_caches(&self) -> Io<'_, ()>;

    // Background work and administration.

    /// Write recorded accesses: for each session the latest access (never moving one back)
    /// and the reads to add.
    fn touch<'a>(&'a self, accesses: &'a [Access]) -> Io<'a, u64>;

    /// Delete up to `limit` expired sessions; the deleted ones and their users.
    fn cleanup_batch(
        &self,
        now: DateTime<Utc>,
        settled: Option<DateTime<Utc>>,
        limit: usize,
    ) -> Io<'_, Vec<(Uuid, Option<UserId>)>>;

    /// Remove up to `limit` sessions' expired attributes; how many sessions changed.
    fn cleanup_attributes(&self, now: DateTime<Utc>, limit: usize) -> Io<'_, u64>;

    /// Record the end of a cleanup run.
    fn cleanup_done(&self, at: DateTime<Utc>) -> Io<'_, ()>;

    /// What `pgsession status` shows.
    fn status<'a>(&'a self, policy: &'a ExpiryPolicy, now: DateTime<Utc>) -> Io<'a, Status>;

    /// Stored sessions left out of listings because they could not be read back.
    fn unreadable(&self) -> u64 {
        0
    }

    // What the manager reports of the layers above storage, and shutdown. Without a cache
    // (memory; PostgreSQL with `cache_capacity` 0 still has the coherence layer's counters).

    /// Whether this node caches sessions at all.
    fn caching(&self) -> bool {
        false
    }

    /// Whether cached copies are served now.
    fn trusted(&self) -> bool {
        false
    }

    /// Changes of [`trusted`](Self::trusted), where there is a cache to trust.
    fn trust(&self) -> Option<watch::Receiver<bool>> {
        None
    }

    /// What the cache, the listener and the outbox have counted.
    fn figures(&self) -> Figures {
        Figures::default()
    }

    /// The PostgreSQL pool underneath, if any.
    fn pool(&self) -> Option<&PgPool> {
        None
    }

    /// Give back what is held between operations (at shutdown, once calls and tasks are
    /// done).
    fn close(&self) {}
}

/// A session's recorded access, as the last-access flush writes it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Access {
    pub id: Uuid,
    pub at: DateTime<Utc>,
    pub reads: i64,
}

/// An invalidation committed with the write that made it (a row of the outbox table), to be
/// announced to the other nodes.
#[derive(Clone, Debug)]
pub(crate) struct Announcement {
    pub seq: i64,
    pub payload: String,
}

/// Arguments of a new session.
pub(crate) struct NewSession<'a> {
    pub id: Uuid,
    /// `None` before login (never capped).
    pub user_id: Option<&'a UserId>,
    pub attributes: &'a Attributes,
    pub now: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// The user's sessions idle before this do not count against the cap.
    pub settled: Option<DateTime<Utc>>,
    /// `Some((cap, reject))` when the per-user cap applies.
    pub cap: Option<(usize, bool)>,
    pub group_id: Option<&'a str>,
    pub client: &'a Client,
    /// Announce the create (`Config::announce_creates`).
    pub announce: bool,
    /// The tag of the signed token that opens it, for the coherence layer's cache.
    pub tag: Option<Tag>,
}

impl NewSession<'_> {
    /// The stored record a create makes.
    pub(crate) fn record(&self) -> Record {
        Record {
            id: self.id,
            user_id: self.user_id.cloned(),
            version: 1,
            created_at: self.now,
            updated_at: self.now,
            last_accessed_at: self.now,
            expires_at: self.expires_at,
            attributes: Arc::new(self.attributes.clone()),
            attribute_expiry: Lean::default(),
            group_id: self.group_id.map(Arc::from),
            client: Lean::new(self.client.clone()),
            reads: 0,
            writes: 0,
        }
    }
}

/// What a create did.
pub(crate) struct Created {
    /// Sessions deleted to keep the user under the cap.
    pub evicted: Vec<Uuid>,
    /// The create's announcement (with `announce_creates`, on PostgreSQL).
    pub announcement: Option<Announcement>,
}

/// The delta of one `update_session`: the keys the caller set or removed, on top of the copy
/// it holds.
pub(crate) struct Delta<'a> {
    pub id: Uuid,
    /// The caller's copy, its changes applied.
    pub base: &'a Record,
    /// The version that copy was read at.
    pub base_version: i64,
    pub removed: Vec<&'a str>,
    pub set: Map<String, Value>,
    pub expires_at: Option<DateTime<Utc>>,
    pub now: DateTime<Utc>,
    pub idle_cutoff: Option<DateTime<Utc>>,
    /// An access this node recorded and has not flushed yet.
    pub pending_access: Option<DateTime<Utc>>,
    /// The set keys that expire on their own, and when.
    pub set_expiry: AttributeExpiry,
    /// Update only if the stored version is this one (optimistic locking).
    pub expect_version: Option<i64>,
    /// `Config::max_session_size`: the merge may not grow the attributes past it.
    pub max_size: usize,
}

/// What an update did.
pub(crate) enum UpdateOutcome {
    /// Written: the new state, and its announcement.
    Updated {
        record: Box<Record>,
        announcement: Option<Announcement>,
    },
    /// The session is gone or expired: nothing written.
    Gone,
    /// With `expect_version`: another write came first, leaving this version.
    Conflict { current_version: i64 },
    /// The merge would have grown the attributes to `size` bytes, past `max_size`.
    TooLarge { size: usize },
}

/// What a refused update found stored.
pub(crate) struct Stored {
    pub version: i64,
    pub expires_at: DateTime<Utc>,
    pub last_accessed_at: DateTime<Utc>,
    /// Size of the attributes with the delta merged, and as they are (jsonb text bytes).
    pub merged_size: usize,
    pub size: usize,
}

impl Delta<'_> {
    /// Why this delta may not be applied to `stored` (both backends decide alike), or `None`.
    pub(crate) fn refusal(&self, stored: &Stored) -> Option<UpdateOutcome> {
        let last = self
            .pending_access
            .map_or(stored.last_accessed_at, |p| p.max(stored.last_accessed_at));
        let live = stored.expires_at > self.now && self.idle_cutoff.is_none_or(|c| last > c);
        if !live {
            return Some(UpdateOutcome::Gone);
        }
        if let Some(expected) = self.expect_version
            && expected != stored.version
        {
            return Some(UpdateOutcome::Conflict {
                current_version: stored.version,
            });
        }
        let grows_past = !self.set.is_empty()
            && stored.merged_size > self.max_size
            && stored.merged_size > stored.size;
        grows_past.then_some(UpdateOutcome::TooLarge {
            size: stored.merged_size,
        })
    }
}

/// Arguments of a rotation or login.
pub(crate) struct Rotation<'a> {
    /// The pending changes, on the session's current id.
    pub delta: &'a Delta<'a>,
    pub new_id: Uuid,
    /// `Some` for a login: the user to bind (`Some(None)`: to no user).
    pub user: Option<Option<&'a UserId>>,
    /// The user's sessions idle before this do not count against the cap.
    pub settled: Option<DateTime<Utc>>,
    /// `Some((cap, reject))` when the per-user cap applies (logins only).
    pub cap: Option<(usize, bool)>,
    /// The tag of the new token, for the coherence layer's cache.
    pub tag: Option<Tag>,
}

/// What a rotation left.
pub(crate) struct Rotated {
    /// The new state, under the new id.
    pub record: Record,
    /// Sessions deleted to keep the user under the cap.
    pub evicted: Vec<Uuid>,
    /// The old id's end.
    pub announcement: Option<Announcement>,
}

/// What a delete did.
pub(crate) struct Deleted {
    /// The session existed (and is gone now).
    pub existed: bool,
    pub announcement: Option<Announcement>,
    /// An earlier attempt lost its connection: it may have deleted the session, leaving its
    /// announcement unsent.
    pub retried: bool,
}

/// One keyset page: the sessions that could be read, how many rows were scanned, and the last
/// id scanned (the next page starts after it).
pub(crate) struct Page {
    pub records: Vec<Record>,
    pub scanned: usize,
    pub last: Option<Uuid>,
}
