//! The periodic tasks: last-access flushing and expired-session cleanup.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use uuid::Uuid;

use crate::manager::Inner;
use crate::shutdown::Signal;

/// Write recorded accesses every `last_access_flush_interval`, or sooner when a buffer shard
/// fills up; write the rest once more at shutdown.
pub(crate) async fn flush_last_access(inner: Arc<Inner>, mut shutdown: Signal) {
    let interval = inner.config.last_access_flush_interval;
    'running: loop {
        tokio::select! {
            _ = shutdown.recv() => break,
            _ = tokio::time::sleep(interval) => {}
            _ = inner.touches.wake.notified() => {}
        }
        // Retry a failed flush after a growing pause (nothing is lost meanwhile: accesses stay
        // buffered until written), without letting early-flush wake-ups spin on a failing
        // database.
        let mut backoff = Duration::from_millis(100);
        while let Err(e) = inner.flush_touches().await {
            tracing::warn!(error = %e, retry_in = ?backoff, "pgsession: last-access flush failed; will retry");
            tokio::select! {
                _ = shutdown.recv() => break 'running,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(interval);
        }
    }
    // The final flush: accesses recorded until now must reach the database.
    let result = inner.flush_touches().await;
    *inner.final_flush.lock().unwrap_or_else(|e| e.into_inner()) = Some(result.map(|_| ()));
}

/// Give connections kept between statements back to the pool once they have been idle for
/// a while, so that others sharing it get them (see [`crate::connections`]).
pub(crate) async fn return_idle_connections(inner: Arc<Inner>, mut shutdown: Signal) {
    loop {
        tokio::select! {
            _ = shutdown.recv() => return,
            _ = tokio::time::sleep(crate::connections::IDLE_RETURN) => {}
        }
        inner.store.connections().return_idle(false);
    }
}

/// Delete expired sessions every `cleanup_interval`. The first run comes at a random point of
/// the first interval so that nodes started together do not all clean at once (they could;
/// `SKIP LOCKED` keeps them out of each other's way, it would just be wasted work).
pub(crate) async fn cleanup(inner: Arc<Inner>, mut shutdown: Signal) {
    let interval = inner.config.cleanup_interval;
    let fraction = (Uuid::new_v4().as_u64_pair().0 >> 11) as f64 / (1u64 << 53) as f64;
    let mut wait = interval.mul_f64(fraction);
    loop {
        tokio::select! {
            _ = shutdown.recv() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = interval;
        match inner.cleanup_expired().await {
            Ok(n) => {
                inner.cleanup_deleted.fetch_add(n, Ordering::Relaxed);
                tracing::debug!(deleted = n, "pgsession: expired sessions cleaned up");
            }
            Err(e) => tracing::warn!(error = %e, "pgsession: cleanup of expired sessions failed"),
        }
    }
}
