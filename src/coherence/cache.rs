//! The in-process session cache: a sharded LRU whose entries are only ever installed when the
//! node can vouch for them.
//!
//! # How staleness is ruled out
//!
//! * **Shards.** Sessions are spread over independent `Mutex<LruCache>` shards, so hits on
//!   different sessions rarely meet on a lock and no lock is process-wide.
//! * **Generations (G3).** Each shard counts the invalidations applied to it. A reader that
//!   misses takes a [`FillTicket`] (shard and generation) *before* it reads the database, and the
//!   copy it read is installed only if no invalidation of that session (nor of the whole
//!   shard) was applied in between, which may describe a write the read did not see: the
//!   shard keeps a short log of which sessions its latest invalidations were for, and a ticket
//!   older than the log is refused. Writes made by this node take a ticket too and count as an
//!   invalidation of their session when they land, so a slower concurrent fill holding the
//!   previous state cannot overwrite them (G1).
//! * **Floors.** A fill that lost (the generation moved, or it is older than what the node has
//!   handed out) still returns the copy it read to its caller. So that no slower fill then
//!   installs an even older copy, the shard remembers per session the lowest version a fill
//!   may still install; capacity evictions and deletions found on re-read leave one too. A
//!   shard remembers at most [`FLOORS_PER_SHARD`]; past that it bumps its generation instead.
//! * **Versions.** Every entry carries the database version; an invalidation `u <id> <v>` only
//!   evicts older copies, so a node's own update is not thrown away when its own notification
//!   comes back, and an install never replaces a newer copy with an older one.
//! * **Trust (G4).** While the listener is down or resynchronising the cache is *distrusted*:
//!   lookups miss without a ticket (nothing is served, nothing is filled). Distrusting bumps
//!   every shard's generation, so fills that started earlier are rejected too.
//! * **Token verdicts.** An entry remembers the signature tag verified for it, if any. A signed
//!   token is served from the cache only if its tag equals that one (a constant-time compare
//!   of 16 bytes, no MAC); otherwise the caller computes the MAC, and a token that fails it is
//!   refused whatever the cache holds. So a token opens its session on every node or on none,
//!   however the session got into a cache (an update, a listing, another token's fill).
//! * **Expiry (G5).** A lookup never serves an entry that is expired by its own timestamps
//!   (absolute expiry, or idle by this node's last access) or older than `cache_max_age`; it
//!   reports a miss and the caller re-reads the database, where another node may have recorded
//!   a later access.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use chrono::{DateTime, Utc};
use lru::LruCache;
use uuid::Uuid;

use super::lease::Lease;
use crate::model::ids::UserId;
use crate::model::record::Record;
use crate::model::token::{TAG_LEN, same_tag};
use crate::shard::{Padded, ShardPicker, shard_count};

/// A signature tag verified for an entry's session.
pub(crate) type Tag = [u8; TAG_LEN];

struct Entry {
    /// Its reads count this node's hits on it since it was cached.
    session: Record,
    /// After this instant the entry must be re-read (`cache_max_age`).
    stale_after: DateTime<Utc>,
    /// The tag of the signed token verified for this session, if one was.
    tag: Option<Tag>,
    /// Hits not yet handed to the last-access writer ([`Cache::take_served`]): kept in the
    /// entry a hit already holds, rather than in a table of their own, so that a hit touches
    /// no other memory and takes no other lock.
    served: Option<Served>,
}

/// Accesses served from the cache and not yet handed over: the latest, and how many.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Served {
    pub at: DateTime<Utc>,
    pub reads: i64,
}

impl Served {
    fn merge(&mut self, other: Served) {
        self.at = self.at.max(other.at);
        self.reads += other.reads;
    }
}

/// What a lookup's caller vouches for about the token it looks up with.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Proof<'a> {
    /// The token opens the session whatever the entry holds (no signing keys, an external id,
    /// an accepted legacy token).
    Any,
    /// A signed token not verified yet: served only if the entry holds this very tag.
    Tag(&'a Tag),
    /// A signed token whose tag the caller has verified: the entry remembers it.
    Verified(Tag),
}

struct Shard {
    lru: LruCache<Uuid, Entry>,
    /// Invalidations applied to this shard, and floors it had no room to remember (see the
    /// module docs).
    generation: u64,
    /// Per session, the lowest version a fill may still install, learnt since the last
    /// invalidation of the session or of the whole shard (see [`Shard::floor`]).
    floors: HashMap<Uuid, i64>,
    /// The sessions of the latest invalidations of one session each, oldest first, since the
    /// last invalidation of the whole shard (see [`Shard::unchanged_since`]).
    recent: VecDeque<Uuid>,
    /// The entries that hold served accesses (with ids of entries gone since, skipped).
    served: Vec<Uuid>,
    /// Served accesses of entries that left the cache before handing them over.
    served_elsewhere: HashMap<Uuid, Served>,
    hits: u64,
    misses: u64,
    fills_rejected: u64,
}

/// Invalidations of single sessions a shard remembers, so that a fill or an own write is
/// refused only by an invalidation of its own session (with 16 concurrent creators, a
/// shard-wide check refused more than half of the new sessions' installs). A ticket older than
/// the log is refused.
const RECENT_PER_SHARD: usize = 32;

/// Most floors one shard remembers; past this the shard's generation is bumped instead.
const FLOORS_PER_SHARD: usize = 256;

impl Shard {
    /// An invalidation: every fill under way in this shard is refused from now on, which
    /// also makes every floor redundant.
    fn bump(&mut self) {
        self.generation += 1;
        self.floors.clear();
        self.recent.clear();
    }

    /// An invalidation of `id` alone: fills of other sessions under way stay valid (the log
    /// of recent invalidations tells them apart), fills of `id` are refused from now on.
    fn bump_one(&mut self, id: Uuid) {
        self.generation += 1;
        self.floors.remove(&id);
        if self.recent.len() == RECENT_PER_SHARD {
            self.recent.pop_front();
        }
        self.recent.push_back(id);
    }

    /// Whether a ticket taken at `generation` may still install a copy of `id`: every
    /// invalidation applied since is in the log and concerns another session.
    fn unchanged_since(&self, generation: u64, id: Uuid) -> bool {
        let since = self.generation - generation;
        since == 0
            || (since <= self.recent.len() as u64
                && self
                    .recent
                    .iter()
                    .rev()
                    .take(since as usize)
                    .all(|x| *x != id))
    }

    /// Push out the least recently used session to make room; it leaves its version as a
    /// floor, so that an older copy of it being read right now cannot come back. Returns
    /// whether there was one.
    fn push_out_lru(&mut self) -> bool {
        match self.lru.pop_lru() {
            Some((evicted, old)) => {
                self.floor(evicted, old.session.version);
                self.keep_served(evicted, old);
                true
            }
            None => false,
        }
    }

    /// `entry` of `id` left the cache: what was served from it is still to be handed over.
    fn keep_served(&mut self, id: Uuid, entry: Entry) {
        if let Some(served) = entry.served {
            self.served_elsewhere
                .entry(id)
                .and_modify(|s| s.merge(served))
                .or_insert(served);
        }
    }

    /// Hand every served access not yet handed over to `into`.
    fn take_served(&mut self, into: &mut dyn FnMut(Uuid, Served)) {
        for id in std::mem::take(&mut self.served) {
            if let Some(served) = self.lru.peek_mut(&id).and_then(|e| e.served.take()) {
                into(id, served);
            }
        }
        for (id, served) in self.served_elsewhere.drain() {
            into(id, served);
        }
    }

    /// This node has seen (handed out, or learnt the deletion of, with `i64::MAX`) version
    /// `version` of `id`: a fill under way with an older copy must not install it, or reads
    /// on this node would go back in version. Fills of other sessions are unaffected.
    fn floor(&mut self, id: Uuid, version: i64) {
        if self.floors.len() >= FLOORS_PER_SHARD && !self.floors.contains_key(&id) {
            self.bump();
            return;
        }
        let floor = self.floors.entry(id).or_insert(version);
        *floor = (*floor).max(version);
    }

    /// The cached copy of `id` if it may be served at `now` (not past `cache_max_age`, not
    /// expired), its last access moved up to `now`; counts the hit. The caller checks trust.
    fn serve(
        &mut self,
        id: Uuid,
        now: DateTime<Utc>,
        latest: DateTime<Utc>,
        idle: Option<chrono::Duration>,
        proof: Proof<'_>,
        min_version: i64,
    ) -> Option<Record> {
        let entry = self.lru.get_mut(&id)?;
        // `now` may lag the true time, which is at most `latest` (see `Clock::coarse_now`).
        if latest >= entry.stale_after
            || entry.session.version < min_version
            || entry.session.is_expired(latest, idle)
            || (latest != now && !entry.session.attribute_expiry.is_empty())
        {
            return None;
        }
        match proof {
            Proof::Any => {}
            Proof::Tag(tag) => {
                if !entry.tag.as_ref().is_some_and(|known| same_tag(known, tag)) {
                    return None;
                }
            }
            Proof::Verified(tag) => entry.tag = Some(tag),
        }
        if entry.session.last_accessed_at < now {
            entry.session.last_accessed_at = now;
        }
        entry.session.reads += 1;
        match &mut entry.served {
            Some(served) => served.merge(Served { at: now, reads: 1 }),
            None => {
                entry.served = Some(Served { at: now, reads: 1 });
                self.served.push(id);
            }
        }
        let session = entry.session.clone();
        self.hits += 1;
        Some(session)
    }
}

/// Permission to install what a read or write returns, if nothing changed meanwhile (taken
/// before the read or write is sent).
#[derive(Clone, Copy, Debug)]
pub(crate) struct FillTicket {
    shard: usize,
    generation: u64,
}

/// Outcome of a lookup.
pub(crate) enum Lookup {
    /// Served from memory; no database I/O needed.
    Hit(Record),
    /// Read the database; install the result with the ticket if there is one.
    Miss(Option<FillTicket>),
}

/// Counters summed over the shards.
#[derive(Default)]
pub(crate) struct CacheCounters {
    pub hits: u64,
    pub misses: u64,
    pub fills_rejected: u64,
    pub entries: usize,
}

pub(crate) struct Cache {
    shards: Box<[Padded<Mutex<Shard>>]>,
    /// Room left: the capacity is one budget for all shards, so that a cache of N holds N
    /// sessions however they hash (per-shard limits would strand room in the emptier shards).
    free: AtomicUsize,
    capacity: usize,
    picker: ShardPicker,
    /// Whether the listener vouches for what is cached, and for how long.
    lease: Lease,
    max_age: Option<chrono::Duration>,
}

impl Cache {
    /// A cache of `capacity` sessions; capacity 0 gives a cache that never holds anything.
    pub(crate) fn new(capacity: usize, max_age: Option<chrono::Duration>) -> Cache {
        let n = if capacity == 0 {
            0
        } else {
            shard_count(capacity)
        };
        let shards = (0..n)
            .map(|_| {
                Padded(Mutex::new(Shard {
                    lru: LruCache::unbounded(),
                    generation: 0,
                    floors: HashMap::new(),
                    recent: VecDeque::with_capacity(RECENT_PER_SHARD),
                    served: Vec::new(),
                    served_elsewhere: HashMap::new(),
                    hits: 0,
                    misses: 0,
                    fills_rejected: 0,
                }))
            })
            .collect();
        Cache {
            shards,
            free: AtomicUsize::new(capacity),
            capacity,
            picker: ShardPicker::new(n.max(1)),
            lease: Lease::new(),
            max_age,
        }
    }

    /// False when configured with capacity 0.
    pub(crate) fn enabled(&self) -> bool {
        !self.shards.is_empty()
    }

    fn lock(&self, i: usize) -> MutexGuard<'_, Shard> {
        // A panic while holding a shard lock leaves at worst an entry missing or a floor or
        // generation bumped too far, which only costs misses, so poisoning is ignored.
        self.shards[i]
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn is_trusted(&self) -> bool {
        self.lease.holds()
    }

    /// Extend the lease on trust to `lease` from now.
    pub(crate) fn renew(&self, lease: std::time::Duration) {
        self.lease.renew(lease);
    }

    /// Look a session up. A hit records `now` as its last access in the cached copy.
    pub(crate) fn lookup(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
        idle: Option<chrono::Duration>,
        proof: Proof<'_>,
        min_version: i64,
    ) -> Lookup {
        if !self.enabled() {
            return Lookup::Miss(None);
        }
        let i = self.picker.pick(&id);
        let mut guard = self.lock(i);
        let shard = &mut *guard;
        if !self.is_trusted() {
            shard.misses += 1;
            return Lookup::Miss(None);
        }
        if let Some(session) = shard.serve(id, now, now, idle, proof, min_version) {
            return Lookup::Hit(session);
        }
        shard.misses += 1;
        Lookup::Miss(Some(FillTicket {
            shard: i,
            generation: shard.generation,
        }))
    }

    /// The cached copy of `id` if it can be served now with `proof` (as
    /// [`lookup`](Self::lookup) would serve it); on anything else `None`, counting nothing,
    /// for the caller to look further.
    pub(crate) fn serve(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
        latest: DateTime<Utc>,
        idle: Option<chrono::Duration>,
        proof: Proof<'_>,
        min_version: i64,
    ) -> Option<Record> {
        if !self.enabled() {
            return None;
        }
        let mut shard = self.lock(self.picker.pick(&id));
        if !self.is_trusted() {
            return None;
        }
        shard.serve(id, now, latest, idle, proof, min_version)
    }

    /// A ticket for a read or write this node is about to send.
    pub(crate) fn ticket(&self, id: Uuid) -> Option<FillTicket> {
        if !self.enabled() {
            return None;
        }
        let i = self.picker.pick(&id);
        let shard = self.lock(i);
        self.is_trusted().then_some(FillTicket {
            shard: i,
            generation: shard.generation,
        })
    }

    /// Install a copy read from the database, unless an invalidation was applied to its shard
    /// since the ticket was taken, or a newer copy is already cached. Returns whether it was
    /// installed.
    ///
    /// A rejected copy still tells us what the database held, and its caller is handed it:
    /// older copies of it are evicted and its version becomes a floor for that session, so
    /// that a slower fill holding an older read cannot install it afterwards (reads on one
    /// node do not go back in version while the announcement of a write is on its way).
    pub(crate) fn fill(
        &self,
        ticket: FillTicket,
        session: &Record,
        now: DateTime<Utc>,
        tag: Option<Tag>,
    ) -> bool {
        let mut guard = self.lock(ticket.shard);
        let shard = &mut *guard;
        let below_floor = shard
            .floors
            .get(&session.id)
            .is_some_and(|floor| session.version < *floor);
        let unchanged = shard.unchanged_since(ticket.generation, session.id);
        if !self.is_trusted() || !unchanged || below_floor {
            shard.fills_rejected += 1;
            if shard
                .lru
                .peek(&session.id)
                .is_some_and(|e| e.session.version < session.version)
            {
                self.remove(shard, &session.id);
            }
            shard.floor(session.id, session.version);
            return false;
        }
        if shard
            .lru
            .peek(&session.id)
            .is_some_and(|e| e.session.version > session.version)
        {
            return false;
        }
        let entry = self.entry(session, now, tag);
        self.install(shard, session.id, entry)
    }

    /// Note a write this node committed: install the new state if nothing was invalidated
    /// since `ticket`, otherwise (or for a deletion, `session == None`) evict. Always bumps the
    /// generation so that fills that read the previous state are rejected. `tag` is that of the
    /// token this node signed for the session (a create, a rotation); without one, the tag
    /// verified for the previous copy stays.
    pub(crate) fn apply_own_write(
        &self,
        id: Uuid,
        ticket: Option<FillTicket>,
        session: Option<&Record>,
        now: DateTime<Utc>,
        tag: Option<Tag>,
    ) {
        if !self.enabled() {
            return;
        }
        let i = self.picker.pick(&id);
        let mut shard = self.lock(i);
        let unchanged =
            self.is_trusted() && ticket.is_some_and(|t| shard.unchanged_since(t.generation, id));
        shard.bump_one(id);
        match session {
            Some(s) if unchanged => {
                let newer_cached = shard
                    .lru
                    .peek(&id)
                    .is_some_and(|e| e.session.version > s.version);
                if !newer_cached {
                    let entry = self.entry(s, now, tag);
                    self.install(&mut shard, id, entry);
                }
            }
            _ => {
                self.remove(&mut shard, &id);
            }
        }
    }

    /// Drop an entry the database no longer vouches for, found gone (`version == None`) or
    /// expired at `version` on re-read; fills of older copies are refused from now on.
    pub(crate) fn forget(&self, id: Uuid, version: Option<i64>) {
        if self.enabled() {
            let mut shard = self.lock(self.picker.pick(&id));
            self.remove(&mut shard, &id);
            shard.floor(id, version.unwrap_or(i64::MAX));
        }
    }

    /// Another node (or this one) committed version `version` of `id`. Returns whether a copy
    /// was evicted.
    pub(crate) fn invalidate_version(&self, id: Uuid, version: i64) -> bool {
        if !self.enabled() {
            return false;
        }
        let mut shard = self.lock(self.picker.pick(&id));
        shard.bump_one(id);
        let stale = shard
            .lru
            .peek(&id)
            .is_some_and(|e| e.session.version < version);
        if stale {
            self.remove(&mut shard, &id);
        }
        stale
    }

    /// These sessions were deleted.
    pub(crate) fn invalidate_deleted(&self, ids: &[Uuid]) -> usize {
        let mut evicted = 0;
        for id in ids {
            if !self.enabled() {
                break;
            }
            let mut shard = self.lock(self.picker.pick(id));
            shard.bump_one(*id);
            evicted += usize::from(self.remove(&mut shard, id));
        }
        evicted
    }

    /// Every session of `user_id` may have been deleted. Visits every shard (the cache is not
    /// indexed by user: logouts everywhere are rare, lookups are not).
    pub(crate) fn invalidate_user(&self, user_id: &UserId) -> usize {
        self.invalidate_where(|r| r.user_id.as_ref() == Some(user_id))
    }

    /// Evict every session `doomed` picks (bulk writes: by user, by group). Visits every shard.
    pub(crate) fn invalidate_where(&self, doomed: impl Fn(&Record) -> bool) -> usize {
        let mut evicted = 0;
        for i in 0..self.shards.len() {
            let mut shard = self.lock(i);
            shard.bump();
            evicted += self.remove_where(&mut shard, |_, e| !doomed(&e.session));
        }
        evicted
    }

    /// Empty every shard.
    pub(crate) fn clear(&self) {
        for i in 0..self.shards.len() {
            let mut shard = self.lock(i);
            shard.bump();
            self.remove_where(&mut shard, |_, _| false);
        }
    }

    /// Stop serving and filling until [`trust`](Self::trust) is called; fills already under way
    /// will be rejected.
    pub(crate) fn distrust(&self) {
        self.lease.distrust();
        for i in 0..self.shards.len() {
            self.lock(i).bump();
        }
    }

    /// Serve and fill again (after a resynchronisation), for `lease` unless renewed.
    pub(crate) fn trust(&self, lease: std::time::Duration) {
        self.lease.trust(lease);
    }

    /// Whether the cache is currently trusted.
    pub(crate) fn trusted(&self) -> bool {
        self.enabled() && self.is_trusted()
    }

    /// Ids and versions of every cached entry.
    pub(crate) fn snapshot(&self) -> Vec<(Uuid, i64)> {
        let mut out = Vec::new();
        for i in 0..self.shards.len() {
            let shard = self.lock(i);
            out.extend(shard.lru.iter().map(|(id, e)| (*id, e.session.version)));
        }
        out
    }

    /// Keep only entries whose version equals the database's; `current` holds the database
    /// versions of the snapshot's ids (missing: deleted). Called while distrusted, so nothing
    /// was installed since the snapshot. Returns how many entries were evicted.
    pub(crate) fn resync(&self, current: &HashMap<Uuid, i64>) -> usize {
        let mut evicted = 0;
        for i in 0..self.shards.len() {
            let mut shard = self.lock(i);
            shard.bump();
            evicted += self.remove_where(&mut shard, |id, e| {
                current.get(id) == Some(&e.session.version)
            });
        }
        evicted
    }

    pub(crate) fn counters(&self) -> CacheCounters {
        let mut c = CacheCounters::default();
        for i in 0..self.shards.len() {
            let shard = self.lock(i);
            c.hits += shard.hits;
            c.misses += shard.misses;
            c.fills_rejected += shard.fills_rejected;
            c.entries += shard.lru.len();
        }
        c
    }

    /// Install `entry` in `shard`, keeping the tag verified for the copy it replaces when it
    /// brings none. A new session takes room from the common budget; when none is left it
    /// pushes out `shard`'s least recently used session, which leaves its version as a floor
    /// (an older copy of it being read right now cannot come back). With no room and nothing
    /// in `shard` to push out, the entry is not cached. Returns whether it was installed.
    fn install(&self, shard: &mut Shard, id: Uuid, mut entry: Entry) -> bool {
        if let Some(old) = shard.lru.get_mut(&id) {
            if entry.tag.is_none() {
                entry.tag = old.tag;
            }
            // Served accesses stay to be handed over, and counted in the new copy's reads.
            if let Some(served) = old.served {
                entry.session.reads += served.reads;
                entry.served = Some(served);
            }
            *old = entry;
            return true;
        }
        let room = self
            .free
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |f| f.checked_sub(1))
            .is_ok();
        if !room {
            // Push out this shard's least recently used session, unless this shard holds
            // less than half its share: then one of a fuller shard's (its lock is tried, not
            // waited for, as this shard's is held).
            let home = self.picker.pick(&id);
            let share = self.capacity / self.shards.len();
            let pushed_out = (shard.lru.len() * 2 < share && self.push_out_elsewhere(home))
                || shard.push_out_lru()
                || self.push_out_elsewhere(home);
            if !pushed_out {
                return false;
            }
        }
        shard.lru.push(id, entry);
        true
    }

    /// Push out the least recently used session of the first shard after `home` whose lock
    /// is free and that holds at least its share. Returns whether one was.
    fn push_out_elsewhere(&self, home: usize) -> bool {
        let n = self.shards.len();
        let share = (self.capacity / n).max(1);
        (1..n).any(|k| {
            let Ok(mut other) = self.shards[(home + k) % n].0.try_lock() else {
                return false;
            };
            other.lru.len() >= share && other.push_out_lru()
        })
    }

    /// Evict `id` from `shard`, giving its room back. Returns whether it was cached.
    fn remove(&self, shard: &mut Shard, id: &Uuid) -> bool {
        match shard.lru.pop(id) {
            Some(entry) => {
                shard.keep_served(*id, entry);
                self.released(1);
                true
            }
            None => false,
        }
    }

    /// Evict every entry of `shard` that `keep` refuses. Returns how many were.
    fn remove_where(&self, shard: &mut Shard, keep: impl Fn(&Uuid, &Entry) -> bool) -> usize {
        let doomed: Vec<Uuid> = shard
            .lru
            .iter()
            .filter(|(id, e)| !keep(id, e))
            .map(|(id, _)| *id)
            .collect();
        for id in &doomed {
            self.remove(shard, id);
        }
        doomed.len()
    }

    /// Hand over every access served from the cache since the last call: to be written by
    /// the last-access flush.
    ///
    /// `into` runs under each shard's lock, so that an access is always in one place or the
    /// other for a reader that looks here first and there second.
    pub(crate) fn take_served(&self, into: &mut dyn FnMut(Uuid, Served)) {
        for i in 0..self.shards.len() {
            self.lock(i).take_served(into);
        }
    }

    #[cfg(test)]
    fn peek_reads(&self, id: Uuid) -> Option<i64> {
        self.lock(self.picker.pick(&id))
            .lru
            .peek(&id)
            .map(|e| e.session.reads)
    }

    /// The sessions with accesses served from the cache and not yet handed over.
    pub(crate) fn served_sessions(&self) -> Vec<Uuid> {
        let mut out = Vec::new();
        for i in 0..self.shards.len() {
            let shard = self.lock(i);
            out.extend(shard.served_elsewhere.keys().copied());
            out.extend(shard.served.iter().filter(|id| {
                !shard.served_elsewhere.contains_key(id)
                    && shard.lru.peek(id).is_some_and(|e| e.served.is_some())
            }));
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The accesses served from the cache for `id` and not yet handed over.
    pub(crate) fn served(&self, id: Uuid) -> Option<Served> {
        if !self.enabled() {
            return None;
        }
        let shard = self.lock(self.picker.pick(&id));
        let cached = shard.lru.peek(&id).and_then(|e| e.served);
        let elsewhere = shard.served_elsewhere.get(&id).copied();
        match (cached, elsewhere) {
            (Some(mut a), Some(b)) => {
                a.merge(b);
                Some(a)
            }
            (a, b) => a.or(b),
        }
    }

    /// `n` entries left the cache: their room goes back to the budget. Returns `n`.
    fn released(&self, n: usize) -> usize {
        if n > 0 {
            self.free.fetch_add(n, Ordering::Relaxed);
        }
        n
    }

    fn entry(&self, session: &Record, now: DateTime<Utc>, tag: Option<Tag>) -> Entry {
        Entry {
            session: session.clone(),
            tag,
            served: None,
            stale_after: self
                .max_age
                .and_then(|age| now.checked_add_signed(age))
                .unwrap_or(DateTime::<Utc>::MAX_UTC),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(version: i64) -> Record {
        Record::for_test(version)
    }

    fn trusted_cache() -> Cache {
        let cache = Cache::new(100, None);
        cache.trust(std::time::Duration::from_secs(3600));
        cache
    }

    fn ticket(cache: &Cache, id: Uuid) -> FillTicket {
        match cache.lookup(id, Utc::now(), None, Proof::Any, 0) {
            Lookup::Miss(Some(t)) => t,
            _ => panic!("expected a miss with a token"),
        }
    }

    fn fill_new(cache: &Cache, version: i64) -> Uuid {
        let s = session(version);
        let t = ticket(cache, s.id);
        assert!(cache.fill(t, &s, Utc::now(), None));
        s.id
    }

    fn is_hit(cache: &Cache, id: Uuid) -> bool {
        matches!(
            cache.lookup(id, Utc::now(), None, Proof::Any, 0),
            Lookup::Hit(_)
        )
    }

    fn served_of(cache: &Cache) -> HashMap<Uuid, Served> {
        let mut taken = Vec::new();
        cache.take_served(&mut |id, s| taken.push((id, s)));
        let n = taken.len();
        let map: HashMap<Uuid, Served> = taken.into_iter().collect();
        assert_eq!(map.len(), n, "each session handed over once");
        map
    }

    #[test]
    fn hits_note_their_accesses_until_taken_even_when_the_entry_leaves() {
        let cache = Cache::new(2, None);
        cache.trust(std::time::Duration::from_secs(3600));
        let t0 = Utc::now();
        let (a, b) = (fill_new(&cache, 1), fill_new(&cache, 1));
        for k in 0..3 {
            let at = t0 + chrono::Duration::seconds(k);
            let Lookup::Hit(r) = cache.lookup(a, at, None, Proof::Any, 0) else {
                panic!("a hit");
            };
            assert_eq!(r.reads, k + 1, "the copy counts this node's hits on it");
        }
        assert!(cache.serve(b, t0, t0, None, Proof::Any, 0).is_some());
        assert_eq!(
            cache.served(a),
            Some(Served {
                at: t0 + chrono::Duration::seconds(2),
                reads: 3
            })
        );
        // A newer copy installed over `a` keeps what was served and counts it.
        let mut newer = session(2);
        newer.id = a;
        let t = cache.ticket(a).unwrap();
        assert!(cache.fill(t, &newer, t0, None));
        assert_eq!(cache.peek_reads(a), Some(3));
        // `b` is invalidated, then the cache emptied: nothing served is lost.
        cache.invalidate_version(b, 2);
        cache.clear();
        assert!(!is_hit(&cache, a) && !is_hit(&cache, b));
        let served = served_of(&cache);
        assert_eq!(served[&a].reads, 3);
        assert_eq!(served[&a].at, t0 + chrono::Duration::seconds(2));
        assert_eq!(served[&b].reads, 1);
        assert!(served_of(&cache).is_empty(), "taken once");
        assert_eq!(cache.served(a), None);
    }

    #[test]
    fn a_hit_on_a_lagging_clock_decides_at_the_latest_time_it_may_be() {
        let cache = trusted_cache();
        let lag = chrono::Duration::milliseconds(4);
        let now = Utc::now();
        let mut s = session(1);
        s.expires_at = now + chrono::Duration::milliseconds(3);
        let t = ticket(&cache, s.id);
        assert!(cache.fill(t, &s, now, None));
        assert!(
            cache
                .serve(s.id, now, now + lag, None, Proof::Any, 0)
                .is_none(),
            "it may have expired by now"
        );
        assert!(
            cache.serve(s.id, now, now, None, Proof::Any, 0).is_some(),
            "the exact time says it has not"
        );
        // Idle expiry likewise.
        let idle = Some(chrono::Duration::milliseconds(2));
        let mut t2 = session(1);
        t2.last_accessed_at = now;
        let ticket2 = ticket(&cache, t2.id);
        assert!(cache.fill(ticket2, &t2, now, None));
        assert!(
            cache
                .serve(t2.id, now, now + lag, idle, Proof::Any, 0)
                .is_none()
        );
        // Attributes that expire on their own are left to the exact path.
        let mut e = session(1);
        e.attribute_expiry
            .make_mut()
            .insert("otp".into(), now + chrono::Duration::hours(1));
        let t3 = ticket(&cache, e.id);
        assert!(cache.fill(t3, &e, now, None));
        assert!(
            cache
                .serve(e.id, now, now + lag, None, Proof::Any, 0)
                .is_none()
        );
        assert!(cache.serve(e.id, now, now, None, Proof::Any, 0).is_some());
        // Far from any expiry, a lagging clock serves.
        let far = fill_new(&cache, 1);
        assert!(
            cache
                .serve(far, now, now + lag, None, Proof::Any, 0)
                .is_some()
        );
    }

    #[test]
    fn a_session_pushed_out_for_room_keeps_its_served_accesses() {
        let cache = Cache::new(1, None);
        cache.trust(std::time::Duration::from_secs(3600));
        let a = fill_new(&cache, 1);
        assert!(is_hit(&cache, a));
        let b = fill_new(&cache, 1);
        assert!(!is_hit(&cache, a), "a cache of one holds only the newer");
        assert!(is_hit(&cache, b));
        let served = served_of(&cache);
        assert_eq!((served[&a].reads, served[&b].reads), (1, 1));
    }

    #[test]
    fn a_cache_of_n_holds_exactly_n_however_the_sessions_hash() {
        for capacity in [1, 7, 100, 1000] {
            let cache = Cache::new(capacity, None);
            cache.trust(std::time::Duration::from_secs(3600));
            let ids: Vec<Uuid> = (0..capacity).map(|_| fill_new(&cache, 1)).collect();
            assert_eq!(cache.counters().entries, capacity);
            // A second pass over exactly as many sessions as it holds: every read a hit.
            assert!(
                ids.iter().all(|id| is_hit(&cache, *id)),
                "capacity {capacity}"
            );
            // One more pushes out exactly one, the least recently used of its shard.
            fill_new(&cache, 1);
            assert_eq!(cache.counters().entries, capacity);
            assert_eq!(ids.iter().filter(|id| !is_hit(&cache, **id)).count(), 1);
        }
    }

    /// Hit ratio on a Zipf(0.9) trace over 10^5 sessions with room for 10^4, against one
    /// exact LRU of that capacity and against moka (TinyLFU admission), all fed the same
    /// trace; `cargo test --lib zipf -- --nocapture` prints the figures.
    #[test]
    fn hit_ratio_on_a_zipf_trace_is_within_3_percent_of_one_exact_lru() {
        const SESSIONS: usize = 100_000;
        const CAPACITY: usize = 10_000;
        const ACCESSES: usize = 400_000;
        const WARM_UP: usize = 100_000;
        // Inverse CDF of Zipf(0.9) over ranks, and a seeded xorshift: the same trace each run.
        let mut cdf = Vec::with_capacity(SESSIONS);
        let mut total = 0.0;
        for rank in 1..=SESSIONS {
            total += 1.0 / (rank as f64).powf(0.9);
            cdf.push(total);
        }
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let u = (state >> 11) as f64 / (1u64 << 53) as f64 * total;
            cdf.partition_point(|c| *c < u).min(SESSIONS - 1)
        };
        let trace: Vec<usize> = (0..ACCESSES).map(|_| next()).collect();
        let records: Vec<Record> = (0..SESSIONS).map(|_| session(1)).collect();

        let cache = Cache::new(CAPACITY, None);
        cache.trust(std::time::Duration::from_secs(3600));
        let mut exact = LruCache::<usize, ()>::new(std::num::NonZeroUsize::new(CAPACITY).unwrap());
        let moka = moka::sync::Cache::<usize, ()>::new(CAPACITY as u64);
        let (mut ours, mut lru_hits, mut moka_hits) = (0, 0, 0);
        for (i, &rank) in trace.iter().enumerate() {
            let counted = usize::from(i >= WARM_UP);
            let record = &records[rank];
            match cache.lookup(record.id, Utc::now(), None, Proof::Any, 0) {
                Lookup::Hit(_) => ours += counted,
                Lookup::Miss(ticket) => {
                    cache.fill(ticket.expect("trusted"), record, Utc::now(), None);
                }
            }
            match exact.get(&rank) {
                Some(_) => lru_hits += counted,
                None => {
                    exact.push(rank, ());
                }
            }
            match moka.get(&rank) {
                Some(()) => moka_hits += counted,
                None => moka.insert(rank, ()),
            }
        }
        let counted = (ACCESSES - WARM_UP) as f64;
        let (ours, exact, moka) = (
            ours as f64 / counted,
            lru_hits as f64 / counted,
            moka_hits as f64 / counted,
        );
        eprintln!(
            "Zipf(0.9), 10^5 sessions, capacity 10^4: hit ratio pgsession {ours:.4}, \
             one exact LRU {exact:.4} ({:.3}x), moka {moka:.4}",
            ours / exact
        );
        assert_eq!(cache.counters().entries, CAPACITY);
        assert!(ours >= 0.97 * exact, "{ours:.4} against {exact:.4}");
    }

    #[test]
    fn room_freed_by_an_eviction_is_taken_by_any_shard() {
        let cache = Cache::new(64, None);
        cache.trust(std::time::Duration::from_secs(3600));
        let ids: Vec<Uuid> = (0..64).map(|_| fill_new(&cache, 1)).collect();
        cache.invalidate_deleted(&ids[..32]);
        cache.invalidate_where(|r| r.id == ids[40]);
        assert_eq!(cache.counters().entries, 31);
        let fresh: Vec<Uuid> = (0..33).map(|_| fill_new(&cache, 1)).collect();
        assert_eq!(cache.counters().entries, 64);
        assert!(fresh.iter().all(|id| is_hit(&cache, *id)));
        assert!(
            ids[32..]
                .iter()
                .filter(|id| **id != ids[40])
                .all(|id| is_hit(&cache, *id))
        );
        cache.clear();
        assert_eq!(cache.counters().entries, 0);
        let again: Vec<Uuid> = (0..64).map(|_| fill_new(&cache, 1)).collect();
        assert!(again.iter().all(|id| is_hit(&cache, *id)));
    }

    #[test]
    fn an_invalidation_of_one_session_does_not_refuse_fills_and_own_writes_of_others() {
        let cache = Cache::new(1, None); // one shard: every session meets every other
        cache.trust(std::time::Duration::from_secs(3600));
        let (a, b) = (session(1), session(1));
        let read_a = ticket(&cache, a.id);
        let write_b = cache.ticket(b.id).expect("trusted");
        // Other sessions' writes and invalidations land meanwhile.
        for _ in 0..RECENT_PER_SHARD - 1 {
            cache.invalidate_version(Uuid::new_v4(), 3);
        }
        cache.apply_own_write(b.id, Some(write_b), Some(&b), Utc::now(), None);
        assert!(is_hit(&cache, b.id), "the own write is installed");
        assert!(
            cache.fill(read_a, &a, Utc::now(), None),
            "the fill of a is installed"
        );
        // An invalidation of a itself still refuses a fill that read before it.
        let read_a = cache.ticket(a.id).expect("trusted");
        cache.invalidate_version(a.id, 2);
        assert!(!cache.fill(read_a, &a, Utc::now(), None));
        // So does one older than the log.
        let read_b = cache.ticket(b.id).expect("trusted");
        for _ in 0..=RECENT_PER_SHARD {
            cache.invalidate_version(Uuid::new_v4(), 3);
        }
        assert!(!cache.fill(read_b, &b, Utc::now(), None));
        // And an invalidation of the whole shard.
        let read_b = cache.ticket(b.id).expect("trusted");
        cache.invalidate_where(|_| false);
        assert!(!cache.fill(read_b, &b, Utc::now(), None));
    }

    #[test]
    fn fill_after_invalidation_is_rejected() {
        let cache = trusted_cache();
        let s = session(1);
        let t = ticket(&cache, s.id);
        cache.invalidate_version(s.id, 2);
        assert!(!cache.fill(t, &s, Utc::now(), None));
        assert!(matches!(
            cache.lookup(s.id, Utc::now(), None, Proof::Any, 0),
            Lookup::Miss(_)
        ));
    }

    #[test]
    fn a_rejected_newer_fill_stops_an_older_concurrent_fill() {
        let cache = trusted_cache();
        let v1 = session(1);
        let mut v2 = v1.clone();
        v2.version = 2;
        // X starts reading; a late invalidation (of version 1's write) arrives; Y starts
        // reading and gets version 1; X gets version 2, which version 2's announcement has
        // not reached yet.
        let x = ticket(&cache, v1.id);
        cache.invalidate_version(v1.id, 1);
        let y = ticket(&cache, v1.id);
        assert!(
            !cache.fill(x, &v2, Utc::now(), None),
            "X read before an invalidation"
        );
        // X's caller has seen version 2: Y must not install version 1 now.
        assert!(!cache.fill(y, &v1, Utc::now(), None));
        assert!(matches!(
            cache.lookup(v1.id, Utc::now(), None, Proof::Any, 0),
            Lookup::Miss(_)
        ));
    }

    #[test]
    fn fill_while_distrusted_or_after_distrust_is_rejected() {
        let cache = trusted_cache();
        let s = session(1);
        let t = ticket(&cache, s.id);
        cache.distrust();
        cache.trust(std::time::Duration::from_secs(3600));
        assert!(!cache.fill(t, &s, Utc::now(), None));
        cache.distrust();
        assert!(matches!(
            cache.lookup(s.id, Utc::now(), None, Proof::Any, 0),
            Lookup::Miss(None)
        ));
    }

    #[test]
    fn own_update_notification_does_not_evict_newer_copy() {
        let cache = trusted_cache();
        let mut s = session(3);
        let t = cache.ticket(s.id);
        cache.apply_own_write(s.id, t, Some(&s), Utc::now(), None);
        assert!(!cache.invalidate_version(s.id, 3));
        assert!(matches!(
            cache.lookup(s.id, Utc::now(), None, Proof::Any, 0),
            Lookup::Hit(_)
        ));
        s.version = 2;
        let t = cache.ticket(s.id).unwrap();
        assert!(
            !cache.fill(t, &s, Utc::now(), None),
            "older copy replaced newer"
        );
    }

    #[test]
    fn own_write_after_concurrent_invalidation_evicts_instead_of_installing() {
        let cache = trusted_cache();
        let s = session(2);
        let t = cache.ticket(s.id);
        cache.invalidate_version(s.id, 3);
        cache.apply_own_write(s.id, t, Some(&s), Utc::now(), None);
        assert!(matches!(
            cache.lookup(s.id, Utc::now(), None, Proof::Any, 0),
            Lookup::Miss(_)
        ));
    }

    #[test]
    fn expired_and_over_age_entries_are_not_served() {
        let cache = Cache::new(100, Some(chrono::Duration::seconds(10)));
        cache.trust(std::time::Duration::from_secs(3600));
        let s = session(1);
        let t = ticket(&cache, s.id);
        let now = Utc::now();
        assert!(cache.fill(t, &s, now, None));
        assert!(matches!(
            cache.lookup(s.id, now, None, Proof::Any, 0),
            Lookup::Hit(_)
        ));
        let later = now + chrono::Duration::seconds(11);
        assert!(matches!(
            cache.lookup(s.id, later, None, Proof::Any, 0),
            Lookup::Miss(Some(_))
        ));
        let idle = Some(chrono::Duration::seconds(5));
        let idle_later = now + chrono::Duration::seconds(6);
        assert!(matches!(
            cache.lookup(s.id, idle_later, idle, Proof::Any, 0),
            Lookup::Miss(Some(_))
        ));
    }

    #[test]
    fn user_invalidation_evicts_only_that_users_sessions() {
        let cache = trusted_cache();
        let a = session(1);
        let mut b = session(1);
        b.user_id = a.user_id.clone();
        let other = session(1);
        for s in [&a, &b, &other] {
            let t = ticket(&cache, s.id);
            assert!(cache.fill(t, s, Utc::now(), None));
        }
        assert_eq!(cache.invalidate_user(a.user_id.as_ref().unwrap()), 2);
        assert_eq!(cache.counters().entries, 1);
    }

    #[test]
    fn resync_keeps_only_entries_matching_database_versions() {
        let cache = trusted_cache();
        let same = session(4);
        let changed = session(1);
        let gone = session(1);
        for s in [&same, &changed, &gone] {
            let t = ticket(&cache, s.id);
            assert!(cache.fill(t, s, Utc::now(), None));
        }
        let current = HashMap::from([(same.id, 4), (changed.id, 2)]);
        assert_eq!(cache.resync(&current), 2);
        assert_eq!(cache.snapshot(), vec![(same.id, 4)]);
    }

    #[test]
    fn trust_lapses_unless_the_listener_renews_it() {
        let cache = Cache::new(100, None);
        let s = session(1);
        cache.trust(std::time::Duration::ZERO);
        assert!(!cache.trusted());
        assert!(matches!(
            cache.lookup(s.id, Utc::now(), None, Proof::Any, 0),
            Lookup::Miss(None)
        ));
        cache.renew(std::time::Duration::from_secs(3600));
        let t = ticket(&cache, s.id);
        assert!(cache.fill(t, &s, Utc::now(), None));
        assert!(matches!(
            cache.lookup(s.id, Utc::now(), None, Proof::Any, 0),
            Lookup::Hit(_)
        ));
    }
}
