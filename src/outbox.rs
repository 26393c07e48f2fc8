//! Announcing invalidations of frequent writes, batched, after they commit.
//!
//! `update_session` and `delete_session` insert their invalidation into the outbox table in
//! the same statement as the write (see the migration for why not NOTIFY there). The node then
//! queues it here; the announce task sends everything queued with as few NOTIFYs as fit
//! (several invalidations per payload, one per line), in one short transaction on a connection
//! of its own (no pool checkout, no ping on release: announcing is most of what a write adds).
//! While a statement is under way new invalidations queue up, so the busier the node, the
//! larger the batches and the fewer NOTIFYs every node has to receive. Announced rows are
//! deleted in bulk every [`RETIRE_EVERY`], well within [`ORPHAN_GRACE`].
//!
//! Nothing here is needed for correctness on the writing node (it updates its own cache at
//! once) nor for durability (the rows are the durable record): if the queue is lost, because the
//! caller's future was dropped mid-write, the process stopped, or the database failed, the
//! rows stay behind and the sweep, run by every node, announces rows older than
//! [`ORPHAN_GRACE`]. So other nodes see a committed write within the notification delay
//! normally, and within about `ORPHAN_GRACE + SWEEP_EVERY` in those failure cases.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::Connection;
use sqlx::postgres::PgConnection;
use tokio::sync::{Notify, oneshot};

use crate::error::{Error, Result};
use crate::manager::Inner;
use crate::shutdown::Signal;
use crate::store::Queued;

/// Outbox rows older than this are announced by the sweep.
pub(crate) const ORPHAN_GRACE: Duration = Duration::from_secs(2);
/// How often each node sweeps.
const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// Largest NOTIFY payload we build (PostgreSQL refuses 8000 bytes and more).
const MAX_PAYLOAD: usize = 7900;
/// Most invalidations announced by one statement.
const MAX_BATCH: usize = 2000;
/// Most invalidations queued in memory; beyond this they are left to the sweep.
const MAX_QUEUED: usize = 100_000;
/// How often announced rows are deleted (must stay well below `ORPHAN_GRACE`, or the sweep
/// would announce them again).
const RETIRE_EVERY: Duration = Duration::from_millis(500);

pub(crate) struct Outbox {
    queue: Mutex<Vec<Queued>>,
    wake: Notify,
    /// Set when a write's outcome is unknown (its connection died, or its caller gave up
    /// while it was under way): its outbox row may exist with nobody to announce it, so the
    /// announce task sweeps every outbox row at once instead of leaving it to the periodic
    /// sweep's grace.
    sweep_now: AtomicBool,
    /// Invalidations announced by this node (by the announce task or the sweep).
    pub(crate) announced: AtomicU64,
    /// NOTIFY messages this node sent for them.
    pub(crate) messages: AtomicU64,
}

impl Outbox {
    pub(crate) fn new() -> Outbox {
        Outbox {
            queue: Mutex::new(Vec::new()),
            wake: Notify::new(),
            sweep_now: AtomicBool::new(false),
            announced: AtomicU64::new(0),
            messages: AtomicU64::new(0),
        }
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

    fn take_batch(&self) -> Vec<Queued> {
        let mut queue = self.lock();
        let n = queue.len().min(MAX_BATCH);
        queue.drain(..n).collect()
    }

    fn put_back(&self, batch: Vec<Queued>) {
        let mut queue = self.lock();
        let room = MAX_QUEUED.saturating_sub(queue.len());
        queue.splice(0..0, batch.into_iter().take(room));
    }
}

/// Attempts made at once after a failure before backing off: a connection that died (a
/// terminated backend, a restarted server) fails at once, and so may the pool's idle
/// connections after it, so retrying at once costs nothing and delays nobody.
const IMMEDIATE_RETRIES: u32 = 16;

/// The pause before retry number `failures` (counted from 1).
fn retry_pause(failures: u32) -> Duration {
    if failures <= IMMEDIATE_RETRIES {
        return Duration::ZERO;
    }
    let doublings = (failures - IMMEDIATE_RETRIES - 1).min(16);
    (Duration::from_millis(50) * 2u32.pow(doublings)).min(ORPHAN_GRACE)
}

/// The announce task's connection and the announced rows awaiting deletion.
struct Announcer {
    conn: Option<PgConnection>,
    /// A replacement for `conn` being opened in the background: announcements go through
    /// the pool meanwhile rather than wait for it.
    connecting: Option<oneshot::Receiver<Option<PgConnection>>>,
    to_retire: Vec<i64>,
    last_retire: Instant,
}

impl Announcer {
    /// The own connection if it is up; otherwise `None` (the caller then uses a pooled
    /// connection) after making sure a replacement is being opened.
    fn conn(&mut self, inner: &Inner) -> Option<&mut PgConnection> {
        if self.conn.is_none() {
            match self.connecting.as_mut().map(|rx| rx.try_recv()) {
                Some(Ok(conn)) => {
                    self.connecting = None;
                    self.conn = conn;
                }
                Some(Err(oneshot::error::TryRecvError::Empty)) => {}
                Some(Err(oneshot::error::TryRecvError::Closed)) | None => {
                    self.connecting = Some(self.reconnect(inner));
                }
            }
        }
        self.conn.as_mut()
    }

    fn reconnect(&self, inner: &Inner) -> oneshot::Receiver<Option<PgConnection>> {
        let options = (*inner.store.pool().connect_options())
            .clone()
            .application_name("pgsession-announcer");
        let limit = inner.config.listener_timeout;
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let conn = match tokio::time::timeout(limit, PgConnection::connect_with(&options)).await
            {
                Ok(Ok(conn)) => Some(conn),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "pgsession: announcer connection failed");
                    None
                }
                Err(_) => {
                    tracing::debug!("pgsession: announcer connection timed out");
                    None
                }
            };
            // Dropped (closed) if the announcer has stopped meanwhile.
            let _ = tx.send(conn);
        });
        rx
    }

    /// Sweep the outbox now if a write's outcome was unknown, then send everything queued,
    /// retiring announced rows whenever that is due (also while writes keep arriving). On
    /// failure the batch goes back to the queue (its rows remain for the sweep in any case)
    /// and the connection is dropped.
    async fn announce_queued(&mut self, inner: &Inner) -> Result<()> {
        let outbox = &inner.outbox;
        let limit = inner.config.listener_timeout;
        if outbox.sweep_now.swap(false, Ordering::AcqRel) {
            let swept =
                match tokio::time::timeout(limit, inner.store.sweep_outbox(Duration::ZERO)).await {
                    Ok(swept) => swept,
                    Err(_) => Err(Error::Timeout("sweeping the outbox".into())),
                };
            match swept {
                Ok(n) => {
                    outbox.announced.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => {
                    outbox.sweep_now.store(true, Ordering::Release);
                    return Err(e);
                }
            }
        }
        loop {
            self.retire(inner, false).await;
            let batch = outbox.take_batch();
            if batch.is_empty() {
                return Ok(());
            }
            let messages = pack(batch.iter().map(|q| q.payload.as_str()));
            let conn = self.conn(inner);
            let sent =
                match tokio::time::timeout(limit, inner.store.announce(conn, &messages)).await {
                    Ok(sent) => sent,
                    Err(_) => Err(Error::Timeout("announcing invalidations".into())),
                };
            if let Err(e) = sent {
                self.conn = None;
                outbox.put_back(batch);
                return Err(e);
            }
            outbox
                .announced
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            outbox
                .messages
                .fetch_add(messages.len() as u64, Ordering::Relaxed);
            self.to_retire.extend(batch.iter().map(|q| q.seq));
        }
    }

    /// Delete announced rows if it is time (or `now_anyway`). A failure keeps them for the
    /// next attempt; if none succeeds within the sweep's grace, the sweep announces them once
    /// more, which is harmless.
    async fn retire(&mut self, inner: &Inner, now_anyway: bool) {
        if self.to_retire.is_empty() || (!now_anyway && self.last_retire.elapsed() < RETIRE_EVERY) {
            return;
        }
        self.last_retire = Instant::now();
        let limit = inner.config.listener_timeout;
        let seqs = std::mem::take(&mut self.to_retire);
        let conn = self.conn(inner);
        let retired = tokio::time::timeout(limit, inner.store.retire(conn, &seqs)).await;
        if !matches!(retired, Ok(Ok(()))) {
            if seqs.len() < MAX_QUEUED {
                self.to_retire = seqs;
            }
            self.conn = None;
            tracing::debug!("pgsession: retiring announced outbox rows failed; will retry");
        }
    }
}

/// Join single-line invalidations into as few payloads as fit NOTIFY's limit.
fn pack<'a>(lines: impl Iterator<Item = &'a str>) -> Vec<String> {
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

/// Announce queued invalidations as they come; announce the rest at shutdown.
pub(crate) async fn announce(inner: Arc<Inner>, mut shutdown: Signal) {
    let outbox = &inner.outbox;
    let mut announcer = Announcer {
        conn: None,
        connecting: None,
        to_retire: Vec::new(),
        last_retire: Instant::now(),
    };
    // Open the connection now rather than at the first write, whose announcement would
    // otherwise go through the pool.
    announcer.conn(&inner);
    'running: loop {
        let retire_due = announcer.last_retire + RETIRE_EVERY;
        tokio::select! {
            _ = shutdown.recv() => break,
            _ = outbox.wake.notified() => {}
            _ = tokio::time::sleep_until(retire_due.into()), if !announcer.to_retire.is_empty() => {}
        }
        // Other nodes serve the old state until this succeeds.
        let mut failures = 0;
        while let Err(e) = announcer.announce_queued(&inner).await {
            failures += 1;
            let pause = retry_pause(failures);
            tracing::warn!(error = %e, retry_in = ?pause, "pgsession: announcing invalidations failed; will retry");
            tokio::select! {
                _ = shutdown.recv() => break 'running,
                _ = tokio::time::sleep(pause) => {}
            }
        }
        announcer.retire(&inner, false).await;
    }
    // Best effort: what is not announced now is announced by another node's sweep.
    if let Err(e) = announcer.announce_queued(&inner).await {
        tracing::warn!(error = %e, "pgsession: invalidations left to the other nodes' sweep");
    }
    announcer.retire(&inner, true).await;
    if let Some(conn) = announcer.conn.take() {
        let _ = conn.close().await;
    }
}

/// Announce outbox rows whose writer did not, every [`SWEEP_EVERY`].
pub(crate) async fn sweep(inner: Arc<Inner>, mut shutdown: Signal) {
    loop {
        tokio::select! {
            _ = shutdown.recv() => return,
            _ = tokio::time::sleep(SWEEP_EVERY) => {}
        }
        // Batches of SWEEP_BATCH until the backlog is gone.
        loop {
            match inner.store.sweep_outbox(ORPHAN_GRACE).await {
                Ok(0) => break,
                Ok(n) => {
                    inner.outbox.announced.fetch_add(n, Ordering::Relaxed);
                    tracing::info!(
                        announced = n,
                        "pgsession: announced invalidations another node left behind"
                    );
                    if n < crate::store::SWEEP_BATCH as u64 {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "pgsession: outbox sweep failed");
                    break;
                }
            }
        }
    }
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
