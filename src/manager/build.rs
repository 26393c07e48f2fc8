//! Building a manager (over PostgreSQL behind the coherence layer, or over memory) and
//! stopping it.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use sqlx::postgres::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{Inner, SessionManager, ShutdownState};
use crate::background::Task;
use crate::background::cleanup::Cleanup;
use crate::background::touches::Touches;
use crate::coherence::Coherent;
use crate::coherence::protocol::new_tag;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::events::Events;
use crate::model::expiry::ExpiryPolicy;
use crate::storage::Storage;
use crate::storage::memory::MemoryStorage;
use crate::storage::postgres::connect;

impl SessionManager {
    /// Connect to `database_url`, apply migrations (unless `config.run_migrations` is off) and
    /// start the background tasks. The pool it builds has 10 connections, a 5-second acquire
    /// timeout, READ COMMITTED as its default isolation, skips the per-checkout ping for
    /// connections used within the last 30 s, and is closed by [`shutdown`](Self::shutdown).
    ///
    /// Waits up to `config.listener_timeout` for the cache listener; if it is not up by then,
    /// the manager starts with reads going to the database until it is.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) for an invalid configuration or URL, [`Error::Migration`](crate::Error::Migration) when
    /// the schema is not what this version expects, [`Error::Database`](crate::Error::Database) when the database
    /// cannot be reached.
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), pgsession::Error> {
    /// use pgsession::{Config, SessionManager};
    ///
    /// let config = Config {
    ///     max_sessions_per_user: Some(3),
    ///     ..Config::default()
    /// };
    /// let manager = SessionManager::connect(config, "postgres://localhost/app").await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn connect(config: Config, database_url: &str) -> Result<SessionManager> {
        config.validate()?;
        let servers = connect::servers(database_url, &config)?;
        Self::start(config, servers).await
    }

    /// Use an existing pool (which the caller keeps owning: `shutdown` does not close it).
    /// Applies migrations unless `config.run_migrations` is off, and starts the background
    /// tasks. Waits for the listener like [`connect`](Self::connect).
    ///
    /// # Errors
    ///
    /// As [`connect`](Self::connect); also [`Error::InvalidConfig`](crate::Error::InvalidConfig) when the pool's
    /// connections do not default to READ COMMITTED (PostgreSQL's default), which the per-user
    /// cap relies on.
    pub async fn new(config: Config, pool: PgPool) -> Result<SessionManager> {
        config.validate()?;
        let servers = connect::caller_servers(pool, &config)?;
        Self::start(config, servers).await
    }

    /// A manager keeping sessions in this process's memory, with no database: the same API and
    /// semantics (tokens and signatures, absolute and inactivity expiry, the per-user cap,
    /// attribute limits and expiry, groups, events, cleanup, shutdown), for unit tests of
    /// handlers and for single-process tools. Nothing outlives the process and nothing is
    /// shared with other processes; there is no cache (every read is a map lookup), so
    /// [`cache_trusted`](Self::cache_trusted) is false and [`stats`](Self::stats) counts no
    /// hits.
    ///
    /// Must be called inside a Tokio runtime (it starts the background tasks).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) for an invalid configuration.
    ///
    /// # Example
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> pgsession::Result<()> {
    /// use pgsession::{Config, SessionManager};
    ///
    /// let manager = SessionManager::in_memory(Config::default()).await?;
    /// let (session, token) = manager.create_session("alice", [("theme", "dark")]).await?;
    /// let found = manager.get_session(&token).await?.unwrap();
    /// assert_eq!(found.id(), session.id());
    /// manager.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn in_memory(config: Config) -> Result<SessionManager> {
        config.validate()?;
        let storage: Arc<dyn Storage> = Arc::new(MemoryStorage::default());
        let parts = Parts {
            storage,
            tasks: Vec::new(),
            legacy_until: None,
            owns_pool: false,
            in_memory: true,
        };
        Ok(Self::assemble(config, parts, CancellationToken::new()).await)
    }

    /// A manager over `servers`: migrations, checks, and the coherence layer over PostgreSQL.
    async fn start(config: Config, servers: connect::Servers) -> Result<SessionManager> {
        let names = config.validate()?;
        connect::migrate(&servers, &names, &config).await?;
        let cancel = CancellationToken::new();
        let tag = new_tag();
        let listen = connect::listen_hosts(&servers, &names, &tag);
        let (pg, legacy_until) =
            connect::storage(&servers, &names, &config, &tag, cancel.clone()).await?;
        let owns_pool = servers.owned;
        let events = Events::new();
        let (coherent, tasks) = Coherent::start(
            pg,
            &config,
            names.channel.clone(),
            listen,
            &tag,
            events.clone(),
            &cancel,
        );
        let parts = Parts {
            storage: coherent,
            tasks,
            legacy_until,
            owns_pool,
            in_memory: false,
        };
        Ok(Self::assemble_with(config, parts, events, cancel).await)
    }

    async fn assemble(config: Config, parts: Parts, cancel: CancellationToken) -> SessionManager {
        Self::assemble_with(config, parts, Events::new(), cancel).await
    }

    /// Start the tasks every manager has (the access flush, cleanup, metrics) beside the
    /// storage's own, and wait (within `listener_timeout`) for a cache to be trusted.
    async fn assemble_with(
        config: Config,
        parts: Parts,
        events: Events,
        cancel: CancellationToken,
    ) -> SessionManager {
        let policy = ExpiryPolicy::new(&config);
        let clock = config.clock.clone();
        let storage = parts.storage;
        let touches = Arc::new(Touches::new(
            config.max_pending_touches,
            config.last_access_batch_size,
        ));
        let cleanup = Cleanup {
            storage: storage.clone(),
            policy,
            clock: clock.clone(),
            batch: config.cleanup_batch_size,
            events: events.clone(),
        };
        let cleanup_deleted = Arc::new(AtomicU64::new(0));
        let mut tasks = parts.tasks;
        tasks.push(Task::new(
            "last-access flush",
            touches.clone().flush_periodically(
                storage.clone(),
                config.last_access_flush_interval,
                config.last_access_batch_size,
                cancel.clone(),
            ),
        ));
        if config.run_cleanup {
            tasks.push(Task::new(
                "cleanup",
                cleanup.clone().periodically(
                    config.cleanup_interval,
                    cleanup_deleted.clone(),
                    cancel.clone(),
                ),
            ));
        }
        let mut running = JoinSet::new();
        for task in tasks {
            let Task { name, work } = task;
            running.spawn(async move { (name, work.await) });
        }
        let inner = Arc::new(Inner {
            policy,
            clock,
            storage,
            events,
            touches,
            cleanup,
            cleanup_deleted,
            forged: AtomicU64::new(0),
            legacy_until: AtomicI64::new(
                parts
                    .legacy_until
                    .map_or(i64::MIN, |t: DateTime<Utc>| t.timestamp_micros()),
            ),
            cap_evictions: AtomicU64::new(0),
            calls: TaskTracker::new(),
            _cancel_on_drop: cancel.clone().drop_guard(),
            cancel,
            tasks: Mutex::new(Some(running)),
            shutdown: ShutdownState {
                started: AtomicBool::new(false),
                done: tokio::sync::watch::channel(false).0,
                outcome: Mutex::new(None),
            },
            owns_pool: parts.owns_pool,
            in_memory: parts.in_memory,
            placeholder_pool: std::sync::OnceLock::new(),
            config,
        });
        #[cfg(feature = "metrics")]
        {
            let weak = Arc::downgrade(&inner);
            let read = move || weak.upgrade().map(|inner| SessionManager { inner }.stats());
            if let Some(tasks) = inner
                .tasks
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_mut()
            {
                let work = crate::metrics::publish(read, inner.cancel.clone());
                tasks.spawn(async move { ("metrics", work.await) });
            }
        }
        // From here on, dropping this future (or the manager) stops whatever was started.
        let manager = SessionManager { inner };
        if manager.inner.storage.caching() {
            // Normally the listener is up within a round trip or two; if not, start degraded
            // (reads go to the database) and let it keep trying in the background.
            let limit = manager.inner.config.listener_timeout;
            if tokio::time::timeout(limit, manager.wait_for_cache())
                .await
                .is_err()
            {
                tracing::warn!(
                    "pgsession: cache listener not up yet; starting with reads from the database"
                );
            }
        }
        manager
    }

    /// Stop: refuse new calls ([`Error::ShutDown`](crate::Error::ShutDown)), let the calls already under way finish,
    /// write pending accesses, stop every background task and close the pool if
    /// [`connect`](Self::connect) created it, all within `shutdown_timeout` (a call still
    /// running at that deadline fails with [`Error::ShutDown`](crate::Error::ShutDown)).
    ///
    /// Idempotent: later calls wait for the first to finish and return `Ok(())`. The work runs
    /// in its own task, so it completes even if this future is dropped.
    ///
    /// # Errors
    ///
    /// The error of the final flush if it failed, or [`Error::Timeout`](crate::Error::Timeout) if tasks had to be
    /// aborted at the deadline.
    pub async fn shutdown(&self) -> Result<()> {
        let inner = self.inner.clone();
        if !inner.shutdown.started.swap(true, Ordering::AcqRel) {
            inner.calls.close();
            let work = tokio::spawn(async move {
                let result = inner.stop().await;
                *inner
                    .shutdown
                    .outcome
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(result);
                inner.shutdown.done.send_replace(true);
            });
            // Only fails if the task panicked; the outcome is then unknown.
            if work.await.is_err() {
                return Err(Error::Timeout("shutdown did not complete".into()));
            }
        } else {
            let mut done = self.inner.shutdown.done.subscribe();
            // The sender lives in `inner`, which we hold.
            let _ = done.wait_for(|d| *d).await;
        }
        // The first caller to get here takes the outcome; later ones see Ok.
        self.inner
            .shutdown
            .outcome
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or(Ok(()))
    }
}

/// What a manager is built over.
struct Parts {
    storage: Arc<dyn Storage>,
    /// The storage's own tasks.
    tasks: Vec<Task>,
    /// When the last session converted by migration 3 expires, if any is left.
    legacy_until: Option<DateTime<Utc>>,
    owns_pool: bool,
    in_memory: bool,
}

impl Inner {
    /// The body of shutdown: let the calls under way finish, then stop the tasks (the flush
    /// task makes the final flush when it is cancelled, the announcer announces what those
    /// calls queued), abort what misses the deadline, close an owned pool.
    async fn stop(&self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + self.config.shutdown_timeout;
        let unfinished = match tokio::time::timeout_at(deadline, self.calls.wait()).await {
            Ok(()) => 0,
            Err(_) => self.calls.len(),
        };
        if unfinished > 0 {
            tracing::warn!(
                unfinished,
                "pgsession: calls still under way at shutdown_timeout; they will fail with ShutDown"
            );
        }
        self.cancel.cancel();
        let tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner()).take();
        let mut failure = None;
        let mut aborted = Vec::new();
        if let Some(mut tasks) = tasks {
            loop {
                match tokio::time::timeout_at(deadline, tasks.join_next()).await {
                    Ok(None) => break,
                    Ok(Some(Ok((name, Err(e))))) => {
                        tracing::warn!(task = name, error = %e, "pgsession: task ended with an error");
                        failure.get_or_insert(e);
                    }
                    Ok(Some(Ok((_, Ok(()))))) => {}
                    Ok(Some(Err(e))) => {
                        failure.get_or_insert(Error::Timeout(format!("a task failed: {e}")));
                    }
                    Err(_) => {
                        aborted.push(tasks.len());
                        tasks.abort_all();
                        break;
                    }
                }
            }
        }
        // Operations still under way hand their connections straight back from now on.
        self.storage.close();
        if self.owns_pool
            && let Some(pool) = self.storage.pool()
        {
            let _ = tokio::time::timeout_at(deadline, pool.close()).await;
        }
        match (failure, aborted.first()) {
            (Some(e), _) => Err(e),
            (None, Some(n)) => Err(Error::Timeout(format!(
                "{n} background task(s) did not stop within shutdown_timeout and were aborted; \
                 pending last-access times may be lost"
            ))),
            (None, None) => Ok(()),
        }
    }
}
