//! The LISTEN connection that keeps this node's cache coherent with every other node.
//!
//! The task is a loop over three states:
//!
//! 1. **Degraded** (the initial state): the cache is distrusted, reads go to the database.
//!    Connect a dedicated connection and `LISTEN`; on failure wait (50 ms, doubling up to
//!    `listener_max_backoff`) and try again, for as long as the manager runs.
//! 2. **Resynchronising**: LISTEN is active, so every later commit will be announced. Read the
//!    database version of every cached session and evict those that changed or are gone while
//!    nobody was listening. Still distrusted; notifications wait in the socket meanwhile.
//! 3. **Trusted**: apply notifications as they arrive. When none has arrived for
//!    `listener_probe_interval`, run `SELECT 1` through the connection under
//!    `listener_timeout`, since a silently dead (half-open) connection would otherwise wait
//!    forever. Any error, a closed connection, or a failed probe distrusts the cache at once
//!    and goes back to 1.
//!
//! sqlx's `PgListener` can reconnect by itself, but silently loses the notifications sent
//! meanwhile; this loop never lets it (`eager_reconnect(false)`, a new listener every time), so
//! every reconnection passes through resynchronisation.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::watch;
use tokio::time::timeout;
use uuid::Uuid;

use crate::manager::Inner;
use crate::notify::Message;
use crate::shutdown::Signal;

const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// Ids per resynchronisation query.
const RESYNC_CHUNK: usize = 10_000;

/// What the listener has seen, for `stats()` and for callers waiting on coherence.
pub(crate) struct ListenerState {
    pub invalidations: AtomicU64,
    pub reconnects: AtomicU64,
    pub resync_evictions: AtomicU64,
    trusted: watch::Sender<bool>,
    degraded: Mutex<Degraded>,
}

struct Degraded {
    since: Option<Instant>,
    total: Duration,
}

impl ListenerState {
    pub(crate) fn new() -> ListenerState {
        ListenerState {
            invalidations: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            resync_evictions: AtomicU64::new(0),
            trusted: watch::channel(false).0,
            degraded: Mutex::new(Degraded {
                since: Some(Instant::now()),
                total: Duration::ZERO,
            }),
        }
    }

    fn set_trusted(&self, trusted: bool) {
        let mut d = self.degraded.lock().unwrap_or_else(|e| e.into_inner());
        match (trusted, d.since) {
            (true, Some(since)) => {
                d.total += since.elapsed();
                d.since = None;
            }
            (false, None) => d.since = Some(Instant::now()),
            _ => {}
        }
        self.trusted.send_replace(trusted);
    }

    /// Total time spent distrusted, including the current stretch.
    pub(crate) fn degraded_time(&self) -> Duration {
        let d = self.degraded.lock().unwrap_or_else(|e| e.into_inner());
        d.total + d.since.map_or(Duration::ZERO, |s| s.elapsed())
    }

    /// Resolves when the cache is trusted.
    pub(crate) async fn wait_trusted(&self) {
        let mut rx = self.trusted.subscribe();
        // The sender lives in `self`; the wait cannot fail while we borrow it.
        let _ = rx.wait_for(|t| *t).await;
    }
}

/// Run until shutdown.
pub(crate) async fn run(inner: Arc<Inner>, mut shutdown: Signal) {
    let mut backoff = Duration::ZERO;
    let mut connected_before = false;
    loop {
        if !backoff.is_zero() {
            tokio::select! {
                _ = shutdown.recv() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
        }
        let attempt = async {
            let listener = connect(&inner).await?;
            let evicted = resync(&inner).await?;
            Ok::<_, String>((listener, evicted))
        };
        let (mut listener, evicted) = tokio::select! {
            _ = shutdown.recv() => return,
            result = attempt => match result {
                Ok(ok) => ok,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff.max(FIRST_BACKOFF), "pgsession: cache listener could not connect; serving from the database");
                    backoff = (backoff * 2).clamp(FIRST_BACKOFF, inner.config.listener_max_backoff);
                    continue;
                }
            }
        };
        backoff = Duration::ZERO;
        let state = &inner.listener;
        if connected_before {
            state.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        connected_before = true;
        state
            .resync_evictions
            .fetch_add(evicted as u64, Ordering::Relaxed);
        inner.cache.trust();
        state.set_trusted(true);
        tracing::debug!(evicted, "pgsession: cache listener active, cache trusted");

        let lost = serve(&inner, &mut listener, &mut shutdown).await;
        inner.cache.distrust();
        state.set_trusted(false);
        match lost {
            None => return,
            Some(reason) => {
                tracing::warn!(%reason, "pgsession: cache listener lost; serving from the database until it is back");
            }
        }
    }
}

/// A fresh listener on its own single-connection pool, LISTENing on the channel.
async fn connect(inner: &Inner) -> Result<PgListener, String> {
    let limit = inner.config.listener_timeout;
    let options: PgConnectOptions = match &inner.config.listen_url {
        // Validated when the manager was built.
        Some(url) => url.parse().map_err(|e| format!("listen_url: {e}"))?,
        None => (*inner.store.pool().connect_options()).clone(),
    };
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .acquire_timeout(limit)
        .test_before_acquire(false)
        .max_lifetime(None)
        .idle_timeout(None)
        .connect_lazy_with(options.application_name("pgsession-listener"));
    let mut listener = timeout(limit, PgListener::connect_with(&pool))
        .await
        .map_err(|_| "connecting timed out".to_string())?
        .map_err(|e| e.to_string())?;
    listener.eager_reconnect(false);
    listener.ignore_pool_close_event(true);
    timeout(limit, listener.listen(&inner.names.channel))
        .await
        .map_err(|_| "LISTEN timed out".to_string())?
        .map_err(|e| e.to_string())?;
    Ok(listener)
}

/// Evict every cached session whose database version differs or that is gone. Runs after
/// LISTEN is active, so a change committed after this query's snapshot will be announced.
async fn resync(inner: &Inner) -> Result<usize, String> {
    let snapshot = inner.cache.snapshot();
    if snapshot.is_empty() {
        return Ok(0);
    }
    let mut current = HashMap::with_capacity(snapshot.len());
    for chunk in snapshot.chunks(RESYNC_CHUNK) {
        let ids: Vec<Uuid> = chunk.iter().map(|(id, _)| *id).collect();
        let versions = timeout(inner.config.listener_timeout, inner.store.versions(&ids))
            .await
            .map_err(|_| "resynchronisation timed out".to_string())?
            .map_err(|e| format!("resynchronisation failed: {e}"))?;
        current.extend(versions);
    }
    Ok(inner.cache.resync(&current))
}

/// Apply notifications until the connection is lost (returns the reason) or shutdown (None).
async fn serve(inner: &Inner, listener: &mut PgListener, shutdown: &mut Signal) -> Option<String> {
    let config = &inner.config;
    loop {
        let next = tokio::select! {
            _ = shutdown.recv() => return None,
            next = timeout(config.listener_probe_interval, listener.try_recv()) => next,
        };
        match next {
            Ok(Ok(Some(notification))) => apply(inner, notification.payload()),
            Ok(Ok(None)) => return Some("connection closed".into()),
            Ok(Err(e)) => return Some(e.to_string()),
            Err(_idle) => {
                // try_recv is cancel-safe (sqlx only consumes whole messages), so the probe can
                // use the same connection; notifications arriving meanwhile are buffered.
                let probe = sqlx::query("SELECT 1").execute(&mut *listener);
                match timeout(config.listener_timeout, probe).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Some(format!("probe failed: {e}")),
                    Err(_) => return Some("probe timed out (half-open connection?)".into()),
                }
            }
        }
    }
}

/// Apply one invalidation. Anything unreadable clears the cache: better a few misses than an
/// entry nobody can vouch for.
pub(crate) fn apply(inner: &Inner, payload: &str) {
    let cache = &inner.cache;
    match Message::parse(payload) {
        Some(Message::Updated { id, version }) => {
            cache.invalidate_version(id, version);
        }
        Some(Message::Deleted(ids)) => {
            cache.invalidate_deleted(&ids);
        }
        Some(Message::UserDeleted(user_id)) => {
            cache.invalidate_user(user_id);
        }
        Some(Message::Clear) => cache.clear(),
        None => {
            tracing::warn!(%payload, "pgsession: unreadable invalidation; clearing the cache");
            cache.clear();
        }
    }
    inner.listener.invalidations.fetch_add(1, Ordering::Relaxed);
}
