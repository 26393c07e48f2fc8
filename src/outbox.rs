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

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::Connection;
use sqlx::postgres::PgConnection;
use tokio::sync::Notify;

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
            }
        }
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

/// The announce task's connection and the announced rows awaiting deletion.
struct Announcer {
    conn: Option<PgConnection>,
    to_retire: Vec<i64>,
    last_retire: Instant,
}

impl Announcer {
    /// The own connection, (re)connecting if needed; `None` if that fails (a pooled one is
    /// used then).
    async fn conn(&mut self, inner: &Inner) -> Option<&mut PgConnection> {
        if self.conn.is_none() {
            let options = (*inner.store.pool().connect_options())
                .clone()
                .application_name("pgsession-announcer");
            let connect = PgConnection::connect_with(&options);
            match tokio::time::timeout(inner.config.listener_timeout, connect).await {
                Ok(Ok(conn)) => self.conn = Some(conn),
                Ok(Err(e)) => tracing::debug!(error = %e, "pgsession: announcer connection failed"),
                Err(_) => tracing::debug!("pgsession: announcer connection timed out"),
            }
        }
        self.conn.as_mut()
    }

    /// Send everything queued, retiring announced rows whenever that is due (also while
    /// writes keep arriving). On failure the batch goes back to the queue (its rows remain for
    /// the sweep in any case) and the connection is dropped.
    async fn announce_queued(&mut self, inner: &Inner) -> Result<()> {
        let outbox = &inner.outbox;
        loop {
            self.retire(inner, false).await;
            let batch = outbox.take_batch();
            if batch.is_empty() {
                return Ok(());
            }
            let messages = pack(batch.iter().map(|q| q.payload.as_str()));
            let limit = inner.config.listener_timeout;
            let conn = self.conn(inner).await;
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

    /// Delete announced rows if it is time (or `now_anyway`). Failures are only logged: the
    /// rows are then announced once more by the sweep.
    async fn retire(&mut self, inner: &Inner, now_anyway: bool) {
        if self.to_retire.is_empty() || (!now_anyway && self.last_retire.elapsed() < RETIRE_EVERY) {
            return;
        }
        let seqs = std::mem::take(&mut self.to_retire);
        self.last_retire = Instant::now();
        let limit = inner.config.listener_timeout;
        let conn = self.conn(inner).await;
        let retired = tokio::time::timeout(limit, inner.store.retire(conn, &seqs)).await;
        if !matches!(retired, Ok(Ok(()))) {
            self.conn = None;
            tracing::debug!(
                "pgsession: retiring announced outbox rows failed; the sweep will announce them again"
            );
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
        to_retire: Vec::new(),
        last_retire: Instant::now(),
    };
    // Connect now rather than at the first write, whose announcement would otherwise wait for
    // the connection (several milliseconds more before other nodes hear of it). A failure
    // here is retried at the first announcement.
    tokio::select! {
        _ = shutdown.recv() => return,
        _ = announcer.conn(&inner) => {}
    }
    'running: loop {
        let retire_due = announcer.last_retire + RETIRE_EVERY;
        tokio::select! {
            _ = shutdown.recv() => break,
            _ = outbox.wake.notified() => {}
            _ = tokio::time::sleep_until(retire_due.into()), if !announcer.to_retire.is_empty() => {}
        }
        // The first retry comes at once: a connection that died while idle (a restarted
        // database, a terminated backend) is only found out when used, and a fresh one
        // usually works straight away. Other nodes serve the old state until this succeeds.
        let mut backoff = Duration::ZERO;
        while let Err(e) = announcer.announce_queued(&inner).await {
            tracing::warn!(error = %e, retry_in = ?backoff, "pgsession: announcing invalidations failed; will retry");
            tokio::select! {
                _ = shutdown.recv() => break 'running,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).clamp(Duration::from_millis(50), ORPHAN_GRACE);
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
