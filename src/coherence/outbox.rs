//! The queue of committed invalidations waiting to be announced (see `docs/design.md`, "How
//! coherence works"), filled by the writing calls and drained by the announce task
//! ([`crate::announcer`]).
//!
//! The queue is only a fast path: the outbox *table* is the durable record, so whatever is lost
//! from the queue (the process stopped, the caller was cancelled mid-write) is announced by the
//! sweep instead.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use crate::storage::Announcement as Queued;

/// Outbox rows older than this are announced by the sweep.
pub(crate) const ORPHAN_GRACE: Duration = Duration::from_secs(2);
/// How often each node sweeps.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// Largest NOTIFY payload we build (PostgreSQL refuses 8000 bytes and more).
const MAX_PAYLOAD: usize = 7900;
/// Most invalidations announced by one statement.
const MAX_BATCH: usize = 2000;
/// Most invalidations queued in memory; beyond this they are left to the sweep.
pub(crate) const MAX_QUEUED: usize = 100_000;
/// How often announced rows are deleted (must stay well below `ORPHAN_GRACE`, or the sweep
/// would announce them again).
pub(crate) const RETIRE_EVERY: Duration = Duration::from_millis(500);

pub(crate) struct Outbox {
    queue: Mutex<Vec<Queued>>,
    pub(crate) wake: Notify,
    /// Set when a write's outcome is unknown (its connection died, or its caller gave up
    /// while it was under way): its outbox row may exist with nobody to announce it, so the
    /// announce task sweeps every outbox row at once instead of leaving it to the periodic
    /// sweep's grace.
    pub(crate) sweep_now: AtomicBool,
    /// Invalidations announced by this node (by the announce task or the sweep).
    pub(crate) announced: AtomicU64,
    /// NOTIFY messages this node sent for them.
    pub(crate) messages: AtomicU64,
    /// Announcements that failed (and were retried).
    pub(crate) failures: AtomicU64,
}

impl Outbox {
    pub(crate) fn new() -> Outbox {
        Outbox {
            queue: Mutex::new(Vec::new()),
            wake: Notify::new(),
            sweep_now: AtomicBool::new(false),
            announced: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        }
    }

    /// Invalidations queued now.
    pub(crate) fn len(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Queued>> {
        // A Vec of owned values cannot be left half-updated by a panic.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue a committed invalidation for announcement.
    pub(crate) fn push(&self, queued: Queued) {
        {
            let mut queue = self.lock();
            if queue.len() < MAX_QUEUED {
                queue.push(queued);
            } else {
                // Its row is in the outbox table: have it swept now rather than after the grace.
                self.sweep_now.store(true, Ordering::Release);
            }
        }
        self.wake.notify_one();
    }

    /// A write whose outcome is unknown: announce whatever the outbox table holds, now.
    pub(crate) fn in_doubt(&self) {
        self.sweep_now.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    pub(crate) fn take_batch(&self) -> Vec<Queued> {
        let mut queue = self.lock();
        let n = queue.len().min(MAX_BATCH);
        queue.drain(..n).collect()
    }

    pub(crate) fn put_back(&self, batch: Vec<Queued>) {
        let mut queue = self.lock();
        let room = MAX_QUEUED.saturating_sub(queue.len());
        queue.splice(0..0, batch.into_iter().take(room));
    }
}

/// Join single-line invalidations into as few payloads as fit NOTIFY's limit.
pub(crate) fn pack<'a>(lines: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut messages = Vec::new();
    let mut current = String::new();
    for line in lines {
        if !current.is_empty() && current.len() + 1 + line.len() > MAX_PAYLOAD {
            messages.push(std::mem::take(&mut current));
        }
        if !current.is_empty() {
            current.push('\n');
        }
        current.push_str(line);
    }
    if !current.is_empty() {
        messages.push(current);
    }
    messages
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_lines_into_payloads_under_the_limit() {
        let line = format!("u {} {}", uuid::Uuid::new_v4().simple(), i64::MAX);
        let lines = vec![line.as_str(); 1000];
        let messages = pack(lines.iter().copied());
        assert!(messages.iter().all(|m| m.len() <= MAX_PAYLOAD));
        let total: usize = messages.iter().map(|m| m.lines().count()).sum();
        assert_eq!(total, 1000);
        assert!(messages.len() <= 1000 * (line.len() + 1) / MAX_PAYLOAD + 1);
        assert!(pack(std::iter::empty()).is_empty());
    }
}
