//! Observability and operations: counters, the state of the table and of the nodes, the
//! cache's trust, events, cleanup and flushing on demand.

use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use super::{SessionManager, Timer};
use crate::config::Config;
use crate::error::Result;
use crate::events::SessionEvent;

/// Counters describing what the manager has done, for dashboards and for checking that the
/// cache works. Counts are since start-up.
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct Stats {
    /// `get_session` calls answered from the cache.
    pub hits: u64,
    /// `get_session` calls that read the database (not cached, expired-looking, too old, or
    /// the cache was distrusted). Not counted when the cache is disabled.
    pub misses: u64,
    /// Sessions in the cache now.
    pub entries: usize,
    /// Configured cache capacity.
    pub capacity: usize,
    /// Invalidations received from the database, from every node, this one included: one per
    /// line of a NOTIFY payload (a session, a batch of deleted ids, a user, or a clear).
    pub invalidations: u64,
    /// Cache fills refused because an invalidation arrived while the database was being read,
    /// or because the node had already handed out a newer version.
    pub fills_rejected: u64,
    /// Times the listener connection was lost and re-established.
    pub reconnects: u64,
    /// Entries evicted by resynchronisation after a reconnect.
    pub resync_evictions: u64,
    /// Whether the cache is trusted now (listener up and resynchronised).
    pub cache_trusted: bool,
    /// Total time the cache was distrusted (reads went to the database), including start-up.
    pub degraded_time: Duration,
    /// Sessions with accesses not yet written (hits note theirs in the cache entry they
    /// read; the flush collects them).
    pub pending_touches: usize,
    /// Accesses dropped because `max_pending_touches` was reached.
    pub touches_dropped: u64,
    /// Successful last-access flushes.
    pub flushes: u64,
    /// Failed last-access flushes (retried).
    pub flush_errors: u64,
    /// Sessions deleted by the background cleanup.
    pub cleanup_deleted: u64,
    /// Invalidations of this node's updates and deletes announced to the other nodes (plus
    /// any left behind by stopped nodes that this node's sweep announced).
    pub invalidations_announced: u64,
    /// NOTIFY messages used for them (several invalidations travel in one message when writes
    /// come faster than they can be announced one by one).
    pub announce_messages: u64,
    /// Tokens refused by `get_session` because their signature did not verify (with
    /// [`Config::signing_keys`](crate::Config::signing_keys)), before any lookup.
    pub forged_tokens: u64,
    /// Announcements of invalidations that failed (and were retried).
    pub announce_failures: u64,
    /// Sessions this node deleted to keep a user under the per-user cap.
    pub cap_evictions: u64,
    /// Invalidations queued for announcement now.
    pub outbox_backlog: usize,
    /// Calls under way that may do I/O (what shutdown waits for).
    pub calls_in_flight: usize,
    /// Stored sessions left out of listings (`list_sessions`, `list_user_sessions`) because
    /// they could not be read back: values written by hand-written SQL that serde_json cannot
    /// parse, such as a number beyond the range of `f64`. Each is also logged as a warning
    /// with its id.
    pub unreadable_sessions: u64,
}

/// What `pgsession status` shows: the state of the table and of the nodes using it, read from
/// the database (see [`SessionManager::status`]).
#[derive(Clone, Debug, Default, Serialize)]
#[non_exhaustive]
pub struct Status {
    /// The last migration applied (`None` in memory).
    pub schema_version: Option<i32>,
    /// Rows in the sessions table, expired ones included.
    pub sessions: u64,
    /// Sessions neither absolutely nor idly expired (by stored access times).
    pub live: u64,
    /// Live sessions that belong to no user yet.
    pub anonymous: u64,
    /// Sessions accessed in the last 5 minutes (by stored access times).
    pub active_last_5_minutes: u64,
    /// Invalidations committed but not yet announced and retired.
    pub outbox_backlog: u64,
    /// When the oldest of them was committed.
    pub outbox_oldest: Option<DateTime<Utc>>,
    /// The nodes whose cache listener is connected now.
    pub listening_nodes: Vec<ListeningNode>,
    /// When a cleanup run (of any node, or `cleanup_expired`) last finished.
    pub last_cleanup: Option<DateTime<Utc>>,
}

/// A node with its cache listener connected, from `pg_stat_activity`.
#[derive(Clone, Debug, Serialize)]
#[non_exhaustive]
pub struct ListeningNode {
    /// The listener connection's backend process id.
    pub pid: i32,
    /// `pgsession-listener <table> <node tag>`.
    pub application_name: String,
    /// The node's address as the server sees it (`None` over a Unix socket).
    pub client_addr: Option<String>,
    /// When the connection was made.
    pub connected_since: Option<DateTime<Utc>>,
}

impl SessionManager {
    /// Empty the cache of every node (one notification). This node's is emptied before the call
    /// returns.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database), [`Error::ShutDown`](crate::Error::ShutDown).
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn clear_cache(&self) -> Result<()> {
        let inner = self.enter()?;
        let _timer = Timer::start("clear_cache");
        inner.storage.clear_caches().await
    }

    /// Write all recorded accesses (and read counts) now instead of waiting for the next
    /// interval. Returns the number of sessions written.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database) (the accesses stay recorded for the next attempt),
    /// [`Error::ShutDown`](crate::Error::ShutDown).
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn flush_last_access(&self) -> Result<u64> {
        let inner = self.enter()?;
        let _timer = Timer::start("flush");
        inner
            .touches
            .flush(&*inner.storage, inner.config.last_access_batch_size)
            .await
    }

    /// Delete expired sessions now (the background task does this every
    /// `cleanup_interval`). Returns how many were deleted.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database), [`Error::ShutDown`](crate::Error::ShutDown).
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn cleanup_expired(&self) -> Result<u64> {
        let inner = self.enter()?;
        let _timer = Timer::start("cleanup");
        inner.cleanup.run_once(&inner.cancel).await
    }

    /// Whether cached sessions are served now: false while the listener is down or
    /// resynchronising (reads then go to the database), and always false with
    /// `cache_capacity == 0`.
    pub fn cache_trusted(&self) -> bool {
        self.inner.storage.trusted()
    }

    /// Resolves once the cache is trusted (immediately when it already is, when the cache is
    /// disabled, or once shutdown has begun). Useful after start-up and in tests.
    pub async fn wait_for_cache(&self) {
        let Some(mut trust) = self
            .inner
            .storage
            .trust()
            .filter(|_| self.inner.storage.caching())
        else {
            return;
        };
        tokio::select! {
            _ = trust.wait_for(|t| *t) => {}
            _ = self.inner.cancel.cancelled() => {}
        }
    }

    /// A receiver of the cache's trust: `true` while cached sessions are served, `false` while
    /// the listener is down or resynchronising. Await `changed()` on it to react to outages
    /// (alerting, tests). Always `false` with `cache_capacity == 0`.
    pub fn subscribe_cache_trust(&self) -> tokio::sync::watch::Receiver<bool> {
        // Without a cache: a receiver that stays false.
        self.inner
            .storage
            .trust()
            .unwrap_or_else(|| tokio::sync::watch::channel(false).1)
    }

    /// A receiver of [`SessionEvent`](crate::SessionEvent)s: this node's creates, updates, rotations, deletes,
    /// expiries and bulk deletions as they happen, and other nodes' as their invalidations
    /// arrive (their creates only with [`Config::announce_creates`](crate::Config::announce_creates)). Each receiver gets every
    /// event sent after it subscribed; one that falls more than
    /// [`EVENT_BUFFER`](crate::EVENT_BUFFER) events behind loses the oldest and is told how many
    /// by [`RecvError::Lagged`](tokio::sync::broadcast::error::RecvError::Lagged): a slow
    /// receiver never slows the node. With no receiver, events cost nothing.
    ///
    /// Events of other nodes are lost while this node's listener is down (the cache is
    /// resynchronised then, but no events are made up for the gap). They arrive in the order
    /// of their notifications: in order for each session, but a bulk write (which notifies
    /// at its commit) may overtake a single-session write that committed just before it
    /// (announced right after its commit).
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn run(manager: pgsession::SessionManager) {
    /// use pgsession::SessionEventKind;
    ///
    /// let mut events = manager.subscribe_events();
    /// tokio::spawn(async move {
    ///     while let Ok(event) = events.recv().await {
    ///         if event.kind == SessionEventKind::UserLoggedOutEverywhere {
    ///             println!("{:?} logged out everywhere ({:?})", event.user_id, event.origin);
    ///         }
    ///     }
    /// });
    /// # }
    /// ```
    pub fn subscribe_events(&self) -> tokio::sync::broadcast::Receiver<SessionEvent> {
        self.inner.events.subscribe()
    }

    /// The state of the sessions table and of the nodes using it, for operators (what
    /// `pgsession status` prints). Counts are exact and read by sequential scans: for an admin
    /// command or a dashboard refreshed every few seconds, not for a request path.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database), [`Error::ShutDown`](crate::Error::ShutDown).
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn status(&self) -> Result<Status> {
        let inner = self.enter()?;
        inner.storage.status(&inner.policy, inner.clock.now()).await
    }

    /// Whether this manager keeps its sessions in memory ([`in_memory`](Self::in_memory)).
    pub fn is_in_memory(&self) -> bool {
        self.inner.in_memory
    }

    /// Counters since start-up.
    pub fn stats(&self) -> Stats {
        let inner = &self.inner;
        let f = inner.storage.figures();
        Stats {
            hits: f.hits,
            misses: f.misses,
            entries: f.entries,
            capacity: inner.config.cache_capacity,
            invalidations: f.invalidations,
            fills_rejected: f.fills_rejected,
            reconnects: f.reconnects,
            resync_evictions: f.resync_evictions,
            cache_trusted: inner.storage.trusted(),
            degraded_time: f.degraded_time,
            pending_touches: inner.touches.len()
                + inner
                    .storage
                    .served_sessions()
                    .into_iter()
                    .filter(|id| inner.touches.pending(*id).is_none())
                    .count(),
            touches_dropped: inner.touches.dropped(),
            flushes: inner.touches.flushes.load(Ordering::Relaxed),
            flush_errors: inner.touches.flush_errors.load(Ordering::Relaxed),
            cleanup_deleted: inner.cleanup_deleted.load(Ordering::Relaxed),
            invalidations_announced: f.announced,
            announce_messages: f.announce_messages,
            forged_tokens: inner.forged.load(Ordering::Relaxed),
            announce_failures: f.announce_failures,
            cap_evictions: inner.cap_evictions.load(Ordering::Relaxed),
            outbox_backlog: f.outbox_backlog,
            calls_in_flight: inner.calls.len(),
            unreadable_sessions: inner.storage.unreadable(),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The pool sessions are stored through. An [`in_memory`](Self::in_memory) manager has
    /// none; for it this returns a placeholder, made on the first call, that never connects
    /// (every query on it fails): check [`is_in_memory`](Self::is_in_memory) first.
    pub fn pool(&self) -> &PgPool {
        self.inner.storage.pool().unwrap_or_else(|| {
            self.inner.placeholder_pool.get_or_init(|| {
                PgPoolOptions::new().max_connections(1).connect_lazy_with(
                    PgConnectOptions::new().socket("/nonexistent/pgsession-in-memory"),
                )
            })
        })
    }
}
