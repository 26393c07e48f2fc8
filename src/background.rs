//! The periodic tasks: last-access flushing, expired-session cleanup, and giving idle kept
//! connections back to the pool. Each gets only the parts it works on.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::backend::Backend;
use crate::backoff::Backoff;
use crate::error::Result;
use crate::events::{Events, Origin, SessionEvent, SessionEventKind};
use crate::store::Store;
use crate::time::now;
use crate::touch::Touches;

/// Write recorded accesses every `interval`, or sooner when a batch's worth is pending; write
/// the rest once more at `cancel`, returning that final flush's outcome.
pub(crate) async fn flush_last_access(
    touches: Arc<Touches>,
    store: Arc<Backend>,
    interval: Duration,
    batch: usize,
    cancel: CancellationToken,
) -> Result<()> {
    // Accesses stay buffered until written, so a failed flush loses nothing; retries back off
    // so that early-flush wake-ups do not spin on a failing database.
    let mut backoff = Backoff::new(0, Duration::from_millis(100), interval);
    'running: loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(interval) => {}
            _ = touches.wake.notified() => {}
        }
        backoff.reset();
        while let Err(e) = touches.flush(&store, batch).await {
            let pause = backoff.next_pause();
            tracing::warn!(error = %e, retry_in = ?pause, "pgsession: last-access flush failed; will retry");
            tokio::select! {
                _ = cancel.cancelled() => break 'running,
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }
    // The final flush: accesses recorded until now must reach the database.
    touches.flush(&store, batch).await.map(|_| ())
}

/// Give connections kept between statements back to the pool once they have been idle for a
/// while, so that others sharing it get them (see [`crate::connections`]).
pub(crate) async fn return_idle_connections(
    store: Arc<Store>,
    cancel: CancellationToken,
) -> Result<()> {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(crate::connections::IDLE_RETURN) => {}
        }
        store.connections().return_idle(false);
    }
}

/// What cleanup deletes and how.
#[derive(Clone, Debug)]
pub(crate) struct Cleanup {
    /// Inactivity expiry, if any.
    pub idle: Option<chrono::Duration>,
    /// Extra idle time allowed, so that accesses not yet flushed by some node are not
    /// mistaken for inactivity.
    pub grace: chrono::Duration,
    /// Rows per statement.
    pub batch: usize,
    /// Where expiries are reported.
    pub events: Events,
}

impl Cleanup {
    /// Delete expired sessions in batches until none is left (or `cancel`), reporting each as
    /// expired, then remove expired attributes; how many sessions were deleted.
    pub(crate) async fn run_once(
        &self,
        store: &Backend,
        cancel: &CancellationToken,
    ) -> Result<u64> {
        let now = now();
        let idle_cutoff = self.idle.map(|idle| now - idle - self.grace);
        let mut total = 0;
        loop {
            let gone = store.cleanup_batch(now, idle_cutoff, self.batch).await?;
            let n = gone.len();
            total += n as u64;
            for (id, user) in gone {
                self.events.emit(|| {
                    SessionEvent::new(SessionEventKind::Expired, Origin::ThisNode)
                        .session(id)
                        .user(user)
                });
            }
            if n < self.batch || cancel.is_cancelled() {
                break;
            }
        }
        while store.cleanup_attributes(now, self.batch).await? >= self.batch as u64 {
            if cancel.is_cancelled() {
                break;
            }
        }
        store.cleanup_done(crate::time::now()).await?;
        Ok(total)
    }

    /// Delete expired sessions every `interval`, counting them in `deleted`. The first run
    /// comes at a random point of the first interval so that nodes started together do not
    /// all clean at once (they could: `SKIP LOCKED` keeps them apart; it would be wasted work).
    pub(crate) async fn periodically(
        self,
        store: Arc<Backend>,
        interval: Duration,
        deleted: Arc<AtomicU64>,
        cancel: CancellationToken,
    ) -> Result<()> {
        let fraction = (Uuid::new_v4().as_u64_pair().0 >> 11) as f64 / (1u64 << 53) as f64;
        let mut wait = interval.mul_f64(fraction);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(wait) => {}
            }
            wait = interval;
            match self.run_once(&store, &cancel).await {
                Ok(n) => {
                    deleted.fetch_add(n, Ordering::Relaxed);
                    tracing::debug!(deleted = n, "pgsession: expired sessions cleaned up");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "pgsession: cleanup of expired sessions failed")
                }
            }
        }
    }
}
