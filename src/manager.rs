//! `SessionManager`: the public entry point tying store, cache, listener and tasks together.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::cache::{Cache, Lookup};
use crate::config::{Config, MaxSessionsPolicy, Names};
use crate::error::{Error, Result};
use crate::listener::{self, ListenerState};
use crate::outbox::{self, Outbox};
use crate::session::{Changes, Session, build_attributes, validate_attribute};
use crate::shutdown::Shutdown;
use crate::store::{Delta, NewSession, Store};
use crate::touch::Touches;
use crate::{background, migrate};

/// Connections of the pool built by [`SessionManager::connect`].
const CONNECT_POOL_SIZE: u32 = 10;
/// A pooled connection idle this long is pinged before use (one extra round trip); fresher ones
/// are used directly, saving a round trip on every query.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(30);

/// Manages sessions for one process: create one at start-up and clone it freely (clones share
/// everything). See the [crate docs](crate) for an example.
///
/// Every method that reads or writes sessions returns [`Error::ShutDown`] once
/// [`shutdown`](Self::shutdown) has begun. Dropping the last clone without calling `shutdown`
/// also stops the background tasks (after a best-effort final flush nobody waits for).
#[derive(Clone)]
pub struct SessionManager {
    inner: Arc<Inner>,
    /// Dropped with the last clone: stops the background tasks even without `shutdown()`.
    _owner: Arc<Owner>,
}

struct Owner(Arc<Inner>);

impl Drop for Owner {
    fn drop(&mut self) {
        // Without an explicit shutdown the tasks still stop, and the flush task still makes
        // its final flush; nobody waits for it.
        self.0.shutdown.close();
    }
}

/// State shared by the manager's clones and its background tasks.
pub(crate) struct Inner {
    pub(crate) config: Config,
    pub(crate) names: Names,
    pub(crate) store: Store,
    pub(crate) cache: Cache,
    pub(crate) touches: Touches,
    pub(crate) outbox: Outbox,
    pub(crate) listener: ListenerState,
    pub(crate) shutdown: Shutdown,
    pub(crate) final_flush: Mutex<Option<Result<()>>>,
    /// The outcome of shutdown, for the caller that started it.
    shutdown_result: Mutex<Option<Result<()>>>,
    pub(crate) cleanup_deleted: AtomicU64,
    flushes: AtomicU64,
    flush_errors: AtomicU64,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    owns_pool: bool,
    ttl: chrono::Duration,
    idle: Option<chrono::Duration>,
    /// Extra idle time cleanup allows, so that accesses not yet flushed by some node are not
    /// mistaken for inactivity.
    cleanup_grace: chrono::Duration,
}

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
    /// Accesses recorded but not yet written.
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
}

/// Now, at the microsecond precision PostgreSQL stores, so that values handed out equal what a
/// later read returns.
fn now() -> DateTime<Utc> {
    to_micros(Utc::now())
}

/// `t` truncated to microseconds.
pub(crate) fn to_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t.timestamp_micros()).unwrap_or(t)
}

fn chrono_duration(d: Duration) -> chrono::Duration {
    // Config::validate bounds every duration to 100 years.
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

impl SessionManager {
    /// Connect to `database_url`, apply migrations (unless `config.run_migrations` is off) and
    /// start the background tasks. The pool it builds has 10 connections, a 5-second acquire
    /// timeout, READ COMMITTED as its default isolation, skips the per-checkout ping for
    /// connections used within the last 30 s, and is closed by [`shutdown`](Self::shutdown).
    ///
    /// Waits up to `config.listener_timeout` for the cache listener; if it is not up by then,
    /// the manager starts with reads going to the database until it is.
    pub async fn connect(config: Config, database_url: &str) -> Result<SessionManager> {
        config.validate()?;
        let options: PgConnectOptions = database_url
            .parse::<PgConnectOptions>()
            .map_err(|e| Error::InvalidConfig(format!("database URL: {e}")))?
            // The per-user cap needs it (see the create function in migrations/).
            .options([("default_transaction_isolation", "read committed")]);
        let pool = PgPoolOptions::new()
            .max_connections(CONNECT_POOL_SIZE)
            .acquire_timeout(Duration::from_secs(5))
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_IF_IDLE_FOR {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .connect_lazy_with(options);
        Self::start(config, pool, true).await
    }

    /// Use an existing pool (which the caller keeps owning: `shutdown` does not close it).
    /// Applies migrations unless `config.run_migrations` is off, and starts the background
    /// tasks. The pool's connections must default to READ COMMITTED (PostgreSQL's default);
    /// otherwise this returns [`Error::InvalidConfig`]. Waits for the listener like
    /// [`connect`](Self::connect).
    pub async fn new(config: Config, pool: PgPool) -> Result<SessionManager> {
        Self::start(config, pool, false).await
    }

    async fn start(config: Config, pool: PgPool, owns_pool: bool) -> Result<SessionManager> {
        let names = config.validate()?;
        if let Some(url) = &config.listen_url {
            url.parse::<PgConnectOptions>()
                .map_err(|e| Error::InvalidConfig(format!("listen_url: {e}")))?;
        }
        migrate::run(&pool, &names, config.run_migrations).await?;

        let idle = config.idle_timeout.map(chrono_duration);
        let max_attribute_size = config.max_attribute_size;
        let inner = Arc::new(Inner {
            store: Store::new(pool, &names, max_attribute_size),
            cache: Cache::new(
                config.cache_capacity,
                config.cache_max_age.map(chrono_duration),
            ),
            touches: Touches::new(config.max_pending_touches, config.last_access_batch_size),
            outbox: Outbox::new(),
            listener: ListenerState::new(),
            shutdown: Shutdown::new(),
            final_flush: Mutex::new(None),
            shutdown_result: Mutex::new(None),
            cleanup_deleted: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            flush_errors: AtomicU64::new(0),
            tasks: Mutex::new(Vec::new()),
            owns_pool,
            ttl: chrono_duration(config.session_ttl),
            idle,
            cleanup_grace: chrono_duration(config.last_access_flush_interval * 2),
            names,
            config,
        });

        let isolation = inner.store.default_isolation().await?;
        if isolation != "read committed" {
            return Err(Error::InvalidConfig(format!(
                "the pool's connections default to {isolation:?} isolation; pgsession needs \
                 \"read committed\" (set default_transaction_isolation on the connections)"
            )));
        }
        // From here on, dropping this future (or the manager) stops whatever was started.
        let owner = Arc::new(Owner(inner.clone()));

        let mut tasks = vec![
            tokio::spawn(background::flush_last_access(
                inner.clone(),
                inner.shutdown.subscribe(),
            )),
            tokio::spawn(outbox::announce(inner.clone(), inner.shutdown.subscribe())),
            tokio::spawn(outbox::sweep(inner.clone(), inner.shutdown.subscribe())),
            tokio::spawn(background::return_idle_connections(
                inner.clone(),
                inner.shutdown.subscribe(),
            )),
        ];
        if inner.config.run_cleanup {
            tasks.push(tokio::spawn(background::cleanup(
                inner.clone(),
                inner.shutdown.subscribe(),
            )));
        }
        if inner.cache.enabled() {
            tasks.push(tokio::spawn(listener::run(
                inner.clone(),
                inner.shutdown.subscribe(),
            )));
            // Normally the listener is up within a round trip or two; if not, start degraded
            // (reads go to the database) and let it keep trying in the background.
            let ready = inner.listener.wait_trusted();
            if tokio::time::timeout(inner.config.listener_timeout, ready)
                .await
                .is_err()
            {
                tracing::warn!(
                    "pgsession: cache listener not up yet; starting with reads from the database"
                );
            }
        }
        *inner.tasks.lock().unwrap_or_else(|e| e.into_inner()) = tasks;

        Ok(SessionManager {
            _owner: owner,
            inner,
        })
    }

    fn open(&self) -> Result<&Inner> {
        if self.inner.shutdown.is_closed() {
            Err(Error::ShutDown)
        } else {
            Ok(&self.inner)
        }
    }

    /// Create a session for `user_id` with initial `attributes`, in one round trip.
    ///
    /// With a per-user cap, the user's least recently used sessions beyond it are deleted in
    /// the same transaction (or, with [`MaxSessionsPolicy::Reject`], the call fails with
    /// [`Error::MaxSessionsReached`]); concurrent logins of one user are serialised, so the cap
    /// holds across nodes. Attributes are validated first: on error nothing is written.
    pub async fn create_session(
        &self,
        user_id: Uuid,
        attributes: impl IntoIterator<Item = (String, Value)>,
    ) -> Result<Session> {
        let inner = self.open()?;
        let attributes = build_attributes(attributes, inner.config.max_attribute_size)?;
        let now = now();
        let id = Uuid::new_v4();
        let new = NewSession {
            id,
            user_id,
            attributes: &attributes,
            now,
            expires_at: now + inner.ttl,
            // Sessions idle by the stored time but possibly used on a node that has not flushed
            // yet still count (and rank as least recently used).
            idle_cutoff: inner.idle.map(|idle| now - idle - inner.cleanup_grace),
            cap: inner.config.max_sessions_per_user.map(|cap| {
                (
                    cap,
                    inner.config.max_sessions_policy == MaxSessionsPolicy::Reject,
                )
            }),
        };
        let token = inner.cache.token_for(id);
        let evicted = inner.store.create(&new).await?;
        // Other nodes learn of the evictions by notification; this node must not serve them
        // even for the moment until its own notification arrives.
        for gone in evicted {
            inner.cache.apply_own_write(gone, None, None, now);
        }
        let session = Session {
            id,
            user_id,
            version: 1,
            created_at: now,
            updated_at: now,
            last_accessed_at: now,
            expires_at: new.expires_at,
            attributes: Arc::new(attributes),
            changes: Changes::default(),
            max_attribute_size: inner.config.max_attribute_size,
            base_version: 1,
        };
        inner.cache.apply_own_write(id, token, Some(&session), now);
        Ok(session)
    }

    /// The session `id`, or `None` when it does not exist or has expired (absolutely, or by
    /// inactivity). Records the access; a cache hit does no database I/O.
    pub async fn get_session(&self, id: Uuid) -> Result<Option<Session>> {
        let inner = self.open()?;
        let now = now();
        let token = match inner.cache.lookup(id, now, inner.idle) {
            Lookup::Hit(session) => {
                inner.touches.record(id, now);
                return Ok(Some(session));
            }
            Lookup::Miss(token) => token,
        };
        let Some(mut session) = inner.store.fetch(id).await? else {
            inner.cache.remove(id, None);
            return Ok(None);
        };
        if let Some(pending) = inner.touches.pending(id) {
            session.last_accessed_at = session.last_accessed_at.max(pending);
        }
        if session.is_expired(now, inner.idle) {
            inner.cache.remove(id, Some(session.version));
            return Ok(None);
        }
        session.last_accessed_at = now;
        inner.touches.record(id, now);
        if let Some(token) = token {
            inner.cache.fill(token, &session, now);
        }
        Ok(Some(session))
    }

    /// Persist the attributes set or removed on `session` (and a new expiry, if set) in one
    /// round trip, leaving every other attribute as it is in the database. On success
    /// `session` is replaced by the stored state (other writers' changes included) with its
    /// new `version`. A session deleted or expired meanwhile gives [`Error::NotFound`] and is
    /// not recreated. Without changes this does nothing.
    pub async fn update_session(&self, session: &mut Session) -> Result<()> {
        let inner = self.open()?;
        if !session.is_modified() {
            return Ok(());
        }
        let limit = inner.config.max_attribute_size;
        let mut set = Map::new();
        let mut removed = Vec::new();
        for key in &session.changes.keys {
            match session.attributes.get(key) {
                Some(value) => {
                    // The value may have been checked against another manager's limit.
                    validate_attribute(key, value, limit)?;
                    set.insert(key.clone(), value.clone());
                }
                None if key.contains('\0') => {
                    return Err(Error::InvalidAttribute {
                        key: key.clone(),
                        reason: "keys cannot contain the NUL character (\\u0000)".into(),
                    });
                }
                None => removed.push(key.as_str()),
            }
        }
        let now = now();
        let id = session.id;
        let delta = Delta {
            id,
            base_version: session.base_version,
            removed,
            set,
            expires_at: session.changes.expires_at,
            now,
            idle_cutoff: inner.idle.map(|idle| now - idle),
            // Not `session.last_accessed_at`: a caller could set it to anything.
            pending_access: inner.touches.pending(id),
        };
        let token = inner.cache.token_for(id);
        let outcome = InDoubt::arm(inner, id);
        let updated = inner.store.update(&delta).await;
        match outcome.settle(updated)? {
            Some((updated, queued)) => {
                inner.outbox.push(queued);
                // Without attributes back, the caller's copy (its own changes applied) is the
                // new state.
                let attributes = match updated.attributes {
                    Some(map) => Arc::new(map),
                    None => session.attributes.clone(),
                };
                let new = Session {
                    id,
                    user_id: updated.user_id,
                    version: updated.version,
                    created_at: updated.created_at,
                    updated_at: updated.updated_at,
                    last_accessed_at: updated.last_accessed_at,
                    expires_at: updated.expires_at,
                    attributes,
                    changes: Changes::default(),
                    max_attribute_size: limit,
                    base_version: updated.version,
                };
                inner.cache.apply_own_write(id, token, Some(&new), now);
                *session = new;
                Ok(())
            }
            None => {
                inner.cache.apply_own_write(id, token, None, now);
                Err(Error::NotFound)
            }
        }
    }

    /// Delete one session (logout), in one round trip; true when it existed. Every node stops
    /// serving it within the notification delay, this one at once.
    pub async fn delete_session(&self, id: Uuid) -> Result<bool> {
        let inner = self.open()?;
        let outcome = InDoubt::arm(inner, id);
        let deleted = inner.store.delete(id).await;
        let (queued, retried) = outcome.settle(deleted)?;
        if retried {
            inner.outbox.in_doubt();
        }
        inner.cache.apply_own_write(id, None, None, now());
        let deleted = queued.is_some();
        if let Some(queued) = queued {
            inner.outbox.push(queued);
        }
        Ok(deleted)
    }

    /// Delete every session of `user_id` ("log out everywhere"), in one round trip with one
    /// notification however many sessions there are. Returns how many were deleted.
    pub async fn delete_all_user_sessions(&self, user_id: Uuid) -> Result<u64> {
        let inner = self.open()?;
        let n = inner.store.delete_user(user_id, &[]).await?;
        inner.cache.invalidate_user(user_id);
        Ok(n)
    }

    /// Delete every session of `user_id` except `keep` ("log out my other devices"). Returns
    /// how many were deleted.
    pub async fn delete_other_user_sessions(&self, user_id: Uuid, keep: Uuid) -> Result<u64> {
        let inner = self.open()?;
        let n = inner.store.delete_user(user_id, &[keep]).await?;
        inner.cache.invalidate_user(user_id);
        Ok(n)
    }

    /// The live sessions of `user_id`, most recently used first (for a "where you are logged
    /// in" page). Always read from the database; does not count as an access.
    pub async fn list_user_sessions(&self, user_id: Uuid) -> Result<Vec<Session>> {
        let inner = self.open()?;
        let now = now();
        let mut sessions = inner.store.fetch_user(user_id, now).await?;
        for s in &mut sessions {
            if let Some(pending) = inner.touches.pending(s.id) {
                s.last_accessed_at = s.last_accessed_at.max(pending);
            }
        }
        sessions.retain(|s| !s.is_expired(now, inner.idle));
        sessions.sort_by_key(|s| std::cmp::Reverse(s.last_accessed_at));
        Ok(sessions)
    }

    /// Empty the cache of every node (one notification). This node's is emptied before the call
    /// returns.
    pub async fn clear_cache(&self) -> Result<()> {
        let inner = self.open()?;
        let epoch = inner.store.broadcast_clear().await?;
        inner.listener.see_epoch(epoch);
        inner.cache.clear();
        Ok(())
    }

    /// Write all recorded accesses now instead of waiting for the next interval. Returns the
    /// number of sessions whose `last_accessed_at` moved.
    pub async fn flush_last_access(&self) -> Result<u64> {
        self.open()?.flush_touches().await
    }

    /// Delete expired sessions now (the background task does this every
    /// `cleanup_interval`). Returns how many were deleted.
    pub async fn cleanup_expired(&self) -> Result<u64> {
        self.open()?.cleanup_expired().await
    }

    /// Whether cached sessions are served now: false while the listener is down or
    /// resynchronising (reads then go to the database), and always false with
    /// `cache_capacity == 0`.
    pub fn cache_trusted(&self) -> bool {
        self.inner.cache.trusted()
    }

    /// Resolves once the cache is trusted (immediately when it already is, when the cache is
    /// disabled, or once shutdown has begun). Useful after start-up and in tests.
    pub async fn wait_for_cache(&self) {
        if !self.inner.cache.enabled() {
            return;
        }
        let mut shutdown = self.inner.shutdown.subscribe();
        tokio::select! {
            _ = self.inner.listener.wait_trusted() => {}
            _ = shutdown.recv() => {}
        }
    }

    /// A receiver of the cache's trust: `true` while cached sessions are served, `false` while
    /// the listener is down or resynchronising. Await `changed()` on it to react to outages
    /// (alerting, tests). Always `false` with `cache_capacity == 0`.
    pub fn subscribe_cache_trust(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.listener.subscribe()
    }

    /// Counters since start-up.
    pub fn stats(&self) -> Stats {
        let inner = &self.inner;
        let c = inner.cache.counters();
        Stats {
            hits: c.hits,
            misses: c.misses,
            entries: c.entries,
            capacity: inner.config.cache_capacity,
            invalidations: inner.listener.invalidations.load(Ordering::Relaxed),
            fills_rejected: c.fills_rejected,
            reconnects: inner.listener.reconnects.load(Ordering::Relaxed),
            resync_evictions: inner.listener.resync_evictions.load(Ordering::Relaxed),
            cache_trusted: inner.cache.trusted(),
            degraded_time: if inner.cache.enabled() {
                inner.listener.degraded_time()
            } else {
                Duration::ZERO
            },
            pending_touches: inner.touches.len(),
            touches_dropped: inner.touches.dropped(),
            flushes: inner.flushes.load(Ordering::Relaxed),
            flush_errors: inner.flush_errors.load(Ordering::Relaxed),
            cleanup_deleted: inner.cleanup_deleted.load(Ordering::Relaxed),
            invalidations_announced: inner.outbox.announced.load(Ordering::Relaxed),
            announce_messages: inner.outbox.messages.load(Ordering::Relaxed),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The pool sessions are stored through.
    pub fn pool(&self) -> &PgPool {
        self.inner.store.pool()
    }

    /// Stop: refuse new calls, write pending accesses, stop every background task and close
    /// the pool if [`connect`](Self::connect) created it, all within `shutdown_timeout`.
    ///
    /// Idempotent: later calls wait for the first to finish and return `Ok(())`. Returns the
    /// error of the final flush if it failed, or [`Error::Timeout`] if tasks had to be
    /// aborted at the deadline. The work runs in its own task, so it completes even if this
    /// future is dropped.
    pub async fn shutdown(&self) -> Result<()> {
        let inner = self.inner.clone();
        if inner.shutdown.close() {
            let work = tokio::spawn(async move {
                let result = inner.stop().await;
                *inner
                    .shutdown_result
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(result);
                inner.shutdown.mark_done();
            });
            // Only fails if the task panicked; the outcome is then unknown.
            if work.await.is_err() {
                return Err(Error::Timeout("shutdown did not complete".into()));
            }
        } else {
            self.inner.shutdown.wait_done().await;
        }
        // The first caller to get here takes the outcome; later ones see Ok.
        self.inner
            .shutdown_result
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or(Ok(()))
    }
}

/// Covers an update or delete while its statement is under way. If it ends without a known
/// outcome (the connection died with the statement sent, or the caller's future was dropped),
/// the write may have committed with nobody to announce it: this node stops serving its
/// cached copy, and every outbox row is announced at once instead of after the sweep's grace.
struct InDoubt<'a> {
    inner: &'a Inner,
    id: Uuid,
    armed: bool,
}

impl<'a> InDoubt<'a> {
    fn arm(inner: &'a Inner, id: Uuid) -> InDoubt<'a> {
        InDoubt {
            inner,
            id,
            armed: true,
        }
    }

    /// The statement's result: errors that prove nothing was committed disarm the guard.
    fn settle<T>(mut self, result: Result<T>) -> Result<T> {
        self.armed = match &result {
            Ok(_) => false,
            Err(Error::Database(e)) => !crate::error::proves_nothing_written(e),
            Err(_) => true,
        };
        result
    }
}

impl Drop for InDoubt<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.inner.cache.apply_own_write(self.id, None, None, now());
            self.inner.outbox.in_doubt();
        }
    }
}

impl Inner {
    /// The body of shutdown: join the tasks (the flush task makes the final flush when it sees
    /// the signal), abort what misses the deadline, close an owned pool.
    async fn stop(&self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.config.shutdown_timeout;
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        let mut aborted = 0;
        for mut task in tasks {
            if tokio::time::timeout_at(deadline, &mut task).await.is_err() {
                task.abort();
                aborted += 1;
            }
        }
        // Operations still under way hand their connections straight back from now on.
        self.store.connections().close();
        if self.owns_pool {
            let _ = tokio::time::timeout_at(deadline, self.store.pool().close()).await;
        }
        let final_flush = self
            .final_flush
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        match final_flush {
            Some(Err(e)) => Err(e),
            _ if aborted > 0 => Err(Error::Timeout(format!(
                "{aborted} background task(s) did not stop within shutdown_timeout and were \
                 aborted; pending last-access times may be lost"
            ))),
            _ => Ok(()),
        }
    }

    pub(crate) async fn flush_touches(&self) -> Result<u64> {
        match self
            .touches
            .flush(&self.store, self.config.last_access_batch_size)
            .await
        {
            Ok(n) => {
                self.flushes.fetch_add(1, Ordering::Relaxed);
                Ok(n)
            }
            Err(e) => {
                self.flush_errors.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    pub(crate) async fn cleanup_expired(&self) -> Result<u64> {
        let now = now();
        let idle_cutoff = self.idle.map(|idle| now - idle - self.cleanup_grace);
        let batch = self.config.cleanup_batch_size;
        let mut total = 0;
        loop {
            let n = self.store.cleanup_batch(now, idle_cutoff, batch).await?;
            total += n;
            if n < batch as u64 || self.shutdown.is_closed() {
                return Ok(total);
            }
        }
    }
}
