//! Last-access times recorded in memory and written in batches.
//!
//! A cache hit must not touch the database, so `get_session` only records the access here; a
//! background task writes all pending accesses with one `UPDATE ... FROM unnest(...)` per
//! `last_access_batch_size` sessions. Accesses to the same session merge (the latest wins), a
//! failed flush puts its accesses back (merged with newer ones), and the SQL never moves a
//! timestamp backwards. Memory is bounded by `max_pending_touches`. Reads are counted here
//! too, and added to the session's count by the same statement.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use uuid::Uuid;

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::error::Result;
use crate::shard::{Padded, ShardPicker, shard_count};
use crate::storage::{Access, Storage};

/// A session's pending access: the latest time, and the reads counted since the last flush.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Recorded {
    at: DateTime<Utc>,
    reads: i64,
}

type Pending = HashMap<Uuid, Recorded>;

pub(crate) struct Touches {
    shards: Box<[Padded<Mutex<Pending>>]>,
    picker: ShardPicker,
    /// Entries in all shards. Only new entries change it (repeated accesses to a session merge
    /// under the shard lock), so the hot path of a busy session never touches this shared
    /// counter.
    len: AtomicUsize,
    /// Most entries held.
    max: usize,
    /// This many entries ask for an early flush.
    flush_at: usize,
    /// Wakes the flush task early.
    pub(crate) wake: Notify,
    dropped: AtomicU64,
    /// Successful flushes.
    pub(crate) flushes: AtomicU64,
    /// Failed flushes (retried).
    pub(crate) flush_errors: AtomicU64,
    /// Serialises flushes, so that a flush returning means everything recorded before it began
    /// is written (an explicit flush waits for a background one under way).
    flushing: tokio::sync::Mutex<()>,
}

impl Touches {
    pub(crate) fn new(max_pending: usize, batch_size: usize) -> Touches {
        let n = shard_count(max_pending);
        Touches {
            shards: (0..n).map(|_| Padded(Mutex::new(HashMap::new()))).collect(),
            picker: ShardPicker::new(n),
            len: AtomicUsize::new(0),
            max: max_pending,
            flush_at: batch_size.min(max_pending),
            wake: Notify::new(),
            dropped: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            flush_errors: AtomicU64::new(0),
            flushing: tokio::sync::Mutex::new(()),
        }
    }

    fn lock(&self, i: usize) -> MutexGuard<'_, Pending> {
        // Each critical section is one map operation; a poisoned map is still consistent.
        self.shards[i]
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Record a read at `at` (merged with any pending access to the same session); the reads
    /// now pending for it, this one included (0 when the buffer is full).
    pub(crate) fn record(&self, id: Uuid, at: DateTime<Utc>) -> i64 {
        self.add(id, at, 1, true)
    }

    /// Record an access at `at` that is not a read (`touch_session`).
    pub(crate) fn keep_alive(&self, id: Uuid, at: DateTime<Utc>) {
        self.add(id, at, 0, true);
    }

    /// Merge an access into the buffer; the reads now pending for it. A new entry past `max`
    /// is dropped (0) when `bounded`; accesses the cache hands over are not (see `flush_all`).
    fn add(&self, id: Uuid, at: DateTime<Utc>, reads: i64, bounded: bool) -> i64 {
        let mut shard = self.lock(self.picker.pick(&id));
        if let Some(t) = shard.get_mut(&id) {
            if t.at < at {
                t.at = at;
            }
            t.reads += reads;
            return t.reads;
        }
        let before = self.len.fetch_add(1, Ordering::Relaxed);
        if bounded && before >= self.max {
            self.len.fetch_sub(1, Ordering::Relaxed);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return 0;
        }
        shard.insert(id, Recorded { at, reads });
        // A hand-over comes from the flush itself, which needs no waking.
        if bounded && before + 1 == self.flush_at {
            self.wake.notify_one();
        }
        reads
    }

    /// The pending (not yet written) access of a session, if any.
    pub(crate) fn pending(&self, id: Uuid) -> Option<DateTime<Utc>> {
        self.lock(self.picker.pick(&id)).get(&id).map(|a| a.at)
    }

    /// Reads of a session counted here and not yet written.
    pub(crate) fn pending_reads(&self, id: Uuid) -> i64 {
        self.lock(self.picker.pick(&id))
            .get(&id)
            .map_or(0, |a| a.reads)
    }

    /// A sorted copy of every pending access. Entries stay in the buffer until their write has
    /// committed ([`settle`](Self::settle)), so a concurrent read still sees them while a flush
    /// is under way, and a failed or cancelled flush loses nothing. Sorting keeps the lock order
    /// of concurrent flushes from several nodes mostly aligned (deadlocks are still possible
    /// with other statements; a failed flush is simply retried).
    fn snapshot(&self) -> Vec<Access> {
        let mut all = Vec::with_capacity(self.len());
        for i in 0..self.shards.len() {
            all.extend(self.lock(i).iter().map(|(id, r)| Access {
                id: *id,
                at: r.at,
                reads: r.reads,
            }));
        }
        all.sort_unstable_by_key(|a| a.id);
        all
    }

    /// Forget accesses that are now in the database, keeping what arrived meanwhile (a later
    /// time, more reads).
    fn settle(&self, written: &[Access]) {
        for done in written {
            let mut shard = self.lock(self.picker.pick(&done.id));
            if let Some(pending) = shard.get_mut(&done.id) {
                pending.reads -= done.reads;
                if pending.at <= done.at && pending.reads <= 0 {
                    shard.remove(&done.id);
                    self.len.fetch_sub(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// Accesses waiting to be written.
    pub(crate) fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    /// Accesses dropped because the buffer was full.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Write every pending access, `batch` sessions per statement. Accesses leave the buffer
    /// only once written; on failure (or if this future is dropped) the rest stay for the next
    /// attempt, and the error is returned.
    pub(crate) async fn flush(&self, store: &dyn Storage, batch: usize) -> Result<u64> {
        let result = self.flush_all(store, batch).await;
        let counter = if result.is_ok() {
            &self.flushes
        } else {
            &self.flush_errors
        };
        counter.fetch_add(1, Ordering::Relaxed);
        result
    }

    async fn flush_all(&self, store: &dyn Storage, batch: usize) -> Result<u64> {
        let _one_at_a_time = self.flushing.lock().await;
        // Hits note their accesses in the cache; from here on they stay until written. Taken
        // whatever `max` says: they were held in memory already, and dropping them would let
        // a session in use idle-expire.
        store.take_served(&mut |served| {
            self.add(served.id, served.at, served.reads, false);
        });
        let items = self.snapshot();
        let mut written = 0;
        for chunk in items.chunks(batch) {
            written += store.touch(chunk).await?;
            self.settle(chunk);
        }
        Ok(written)
    }

    /// The flush task: write recorded accesses every `interval`, or sooner when a batch's
    /// worth is pending; write the rest once more at `cancel`, returning that final flush's
    /// outcome.
    pub(crate) async fn flush_periodically(
        self: Arc<Self>,
        store: Arc<dyn Storage>,
        interval: Duration,
        batch: usize,
        cancel: CancellationToken,
    ) -> Result<()> {
        // Accesses stay buffered until written, so a failed flush loses nothing; retries back
        // off so that early-flush wake-ups do not spin on a failing database.
        let mut backoff = Backoff::new(0, Duration::from_millis(100), interval);
        'running: loop {
            // Accesses stay counted until their write commits, so a batch's worth recorded
            // while a flush was under way crossed no threshold and woke nobody: flush again at
            // once rather than wait for the interval.
            if cancel.is_cancelled() {
                break;
            }
            if self.len() < self.flush_at {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(interval) => {}
                    _ = self.wake.notified() => {}
                }
            }
            backoff.reset();
            while let Err(e) = self.flush(&*store, batch).await {
                let pause = backoff.next_pause();
                tracing::warn!(error = %e, retry_in = ?pause, "pgsession: last-access flush failed; will retry");
                tokio::select! {
                    _ = cancel.cancelled() => break 'running,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        }
        // The final flush: accesses recorded until now must reach the database.
        self.flush(&*store, batch).await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accesses_merge_to_the_latest_and_never_go_back() {
        let touches = Touches::new(100, 10);
        let id = Uuid::new_v4();
        let t0 = Utc::now();
        let t1 = t0 + chrono::Duration::seconds(1);
        touches.record(id, t1);
        touches.record(id, t0);
        assert_eq!(touches.pending(id), Some(t1));
        assert_eq!(touches.len(), 1);
    }

    #[test]
    fn settle_keeps_accesses_recorded_while_the_flush_was_writing() {
        let touches = Touches::new(100, 10);
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let t0 = Utc::now();
        touches.record(a, t0);
        touches.record(b, t0);
        let written = touches.snapshot();
        // Still visible while the write is under way.
        assert_eq!(touches.pending(a), Some(t0));
        let t1 = t0 + chrono::Duration::seconds(1);
        touches.record(a, t1);
        touches.settle(&written);
        assert_eq!(touches.pending(a), Some(t1), "newer access kept");
        assert_eq!(touches.pending(b), None, "written access forgotten");
        assert_eq!(touches.len(), 1);
    }

    #[test]
    fn memory_is_bounded_and_overflow_is_counted() {
        let touches = Touches::new(64, 64);
        for _ in 0..10_000 {
            touches.record(Uuid::new_v4(), Utc::now());
        }
        assert_eq!(touches.len(), 64);
        assert_eq!(touches.dropped(), 10_000 - 64);
    }

    #[test]
    fn snapshot_is_sorted_by_id() {
        let touches = Touches::new(1000, 100);
        for _ in 0..100 {
            touches.record(Uuid::new_v4(), Utc::now());
        }
        let snapshot = touches.snapshot();
        assert_eq!(snapshot.len(), 100);
        assert!(snapshot.windows(2).all(|w| w[0].id < w[1].id));
    }
}
