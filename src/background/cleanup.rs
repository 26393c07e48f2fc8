//! Deleting expired sessions (and expired attributes), in bounded batches that several nodes
//! can run at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::Result;
use crate::events::{Events, Origin, SessionEvent, SessionEventKind};
use crate::model::clock::Clock;
use crate::model::expiry::ExpiryPolicy;
use crate::storage::Storage;

/// What cleanup deletes and how.
#[derive(Clone)]
pub(crate) struct Cleanup {
    pub storage: Arc<dyn Storage>,
    /// When sessions expire (cleanup deletes only those idle on every node: the settled
    /// cutoff).
    pub policy: ExpiryPolicy,
    pub clock: Clock,
    /// Rows per statement.
    pub batch: usize,
    /// Where expiries are reported.
    pub events: Events,
}

impl Cleanup {
    /// Delete expired sessions in batches until none is left (or `cancel`), reporting each as
    /// expired, then remove expired attributes; how many sessions were deleted.
    pub(crate) async fn run_once(&self, cancel: &CancellationToken) -> Result<u64> {
        let store = &self.storage;
        let now = self.clock.now();
        let settled = self.policy.settled_cutoff(now);
        let mut total = 0;
        loop {
            let gone = store.cleanup_batch(now, settled, self.batch).await?;
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
        store.cleanup_done(self.clock.now()).await?;
        Ok(total)
    }

    /// Delete expired sessions every `interval`, counting them in `deleted`. The first run
    /// comes at a random point of the first interval so that nodes started together do not
    /// all clean at once (they could: `SKIP LOCKED` keeps them apart; it would be wasted work).
    pub(crate) async fn periodically(
        self,
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
            match self.run_once(&cancel).await {
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
