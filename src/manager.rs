//! `SessionManager`: the public entry point. It builds the parts (store, cache, access buffer,
//! outbox queue, listener state), hands each background task the parts it works on, and runs
//! the public operations over them.

use chrono::{DateTime, Utc};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde_json::Map;
use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use tokio::task::JoinSet;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::{TaskTracker, task_tracker::TaskTrackerToken};
use tracing::Instrument;
use uuid::Uuid;

use crate::announcer::{self, Announcer};
use crate::backend::Backend;
use crate::background::{self, Cleanup};
use crate::cache::{Cache, Lookup, Proof, Tag};
use crate::config::{Config, MaxSessionsPolicy};
use crate::error::{Error, Result};
use crate::events::{Events, Origin, SessionEvent, SessionEventKind};
use crate::ids::{SessionId, UserId};
use crate::listener::{Listener, ListenerState, PgConnect, Timing};
use crate::memory::MemoryStore;
use crate::migrate;
use crate::names::Names;
use crate::notify::new_tag;
use crate::options::{SessionOptions, validate_group};
use crate::outbox::Outbox;
use crate::reachability::Reachability;
use crate::record::Record;
use crate::session::{Session, build_attributes, storable_expiry};
use crate::store::{Delta, NewSession, Rotation, Store, UpdateOutcome};
use crate::time::{chrono_duration, now};
use crate::token::{Precheck, SessionToken};
use crate::touch::Touches;

#[cfg(feature = "metrics")]
use crate::metrics::Timer;

/// Without the `metrics` feature, operations are not timed.
#[cfg(not(feature = "metrics"))]
struct Timer;

#[cfg(not(feature = "metrics"))]
impl Timer {
    fn start(_operation: &'static str) -> Timer {
        Timer
    }
}

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
}

/// The state every clone shares. The background tasks hold only the parts they work on, never
/// this: so when the last clone is dropped, this is dropped, which stops them.
struct Inner {
    config: Config,
    names: Names,
    store: Arc<Backend>,
    /// The pool of the PostgreSQL backend (in memory: one that never connects).
    pool: PgPool,
    events: Events,
    cache: Arc<Cache>,
    touches: Arc<Touches>,
    outbox: Arc<Outbox>,
    listener: Arc<ListenerState>,
    cleanup: Cleanup,
    cleanup_deleted: Arc<AtomicU64>,
    /// Tokens refused because their signature did not verify.
    forged: AtomicU64,
    /// Until when (microseconds since 1970) legacy tokens are accepted without
    /// `accept_legacy_tokens`: while sessions converted by migration 3 may be alive.
    legacy_until: AtomicI64,
    /// Sessions deleted for the per-user cap.
    cap_evictions: AtomicU64,
    /// Calls under way that may do I/O; closed when shutdown begins.
    calls: TaskTracker,
    /// Cancelled at shutdown, or when this is dropped (the guard below).
    cancel: CancellationToken,
    _cancel_on_drop: DropGuard,
    /// The background tasks, each with its name; taken by shutdown.
    tasks: Mutex<Option<Tasks>>,
    shutdown: ShutdownState,
    owns_pool: bool,
    ttl: chrono::Duration,
    idle: Option<chrono::Duration>,
}

/// What only the PostgreSQL backend has: the store itself (for the coherence tasks), where the
/// listener connects, and the tag this node's notifications carry.
struct PgParts {
    store: Arc<Store>,
    listen_options: PgConnectOptions,
    tag: String,
    /// When the last session converted by migration 3 expires, if any is left.
    legacy_until: Option<DateTime<Utc>>,
}

/// A public call under way (see [`SessionManager::enter`]).
struct Call<'a> {
    inner: &'a Inner,
    _token: TaskTrackerToken,
}

impl std::ops::Deref for Call<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        self.inner
    }
}

/// The background tasks, each ending with its name and outcome.
type Tasks = JoinSet<(&'static str, Result<()>)>;

/// Shutdown runs once, in a task of its own; later callers wait for it.
struct ShutdownState {
    started: AtomicBool,
    done: tokio::sync::watch::Sender<bool>,
    /// The outcome, for the first caller to collect it.
    outcome: Mutex<Option<Result<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Without an explicit shutdown the tasks still stop (the guard cancels them) and the
        // flush task still makes its final flush: let them finish rather than abort them.
        if let Some(mut tasks) = self
            .tasks
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            tasks.detach_all();
        }
    }
}

impl std::fmt::Debug for SessionManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let inner = &self.inner;
        f.debug_struct("SessionManager")
            .field("schema", &inner.names.schema_raw)
            .field("prefix", &inner.names.prefix)
            .field("cache_capacity", &inner.config.cache_capacity)
            .field("cache_trusted", &self.cache_trusted())
            .field("shut_down", &inner.calls.is_closed())
            .finish_non_exhaustive()
    }
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
    /// Tokens refused by `get_session` because their signature did not verify (with
    /// [`Config::signing_keys`]), before any lookup.
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
    /// [`Error::InvalidConfig`] for an invalid configuration or URL, [`Error::Migration`] when
    /// the schema is not what this version expects, [`Error::Database`] when the database
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
    /// tasks. Waits for the listener like [`connect`](Self::connect).
    ///
    /// # Errors
    ///
    /// As [`connect`](Self::connect); also [`Error::InvalidConfig`] when the pool's
    /// connections do not default to READ COMMITTED (PostgreSQL's default), which the per-user
    /// cap relies on.
    pub async fn new(config: Config, pool: PgPool) -> Result<SessionManager> {
        Self::start(config, pool, false).await
    }

    /// A manager keeping sessions in this process's memory, with no database: the same API and
    /// semantics (tokens and signatures, absolute and inactivity expiry, the per-user cap,
    /// attribute limits and expiry, groups, events, cleanup, shutdown), for unit tests of
    /// handlers and for single-process tools. Nothing outlives the process and nothing is
    /// shared with other processes; there is no cache (every read is a map lookup), so
    /// [`cache_trusted`](Self::cache_trusted) is false and [`stats`](Self::stats) counts no
    /// hits. [`pool`](Self::pool) returns a pool that never connects.
    ///
    /// Must be called inside a Tokio runtime (it starts the background tasks).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidConfig`] for an invalid configuration.
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
        let names = config.validate()?;
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_lazy_with(PgConnectOptions::new().socket("/nonexistent/pgsession-in-memory"));
        let backend = Arc::new(Backend::Memory(MemoryStore::default()));
        let cancel = CancellationToken::new();
        Ok(Self::assemble(config, names, backend, pool, false, None, cancel).await)
    }

    async fn start(config: Config, pool: PgPool, owns_pool: bool) -> Result<SessionManager> {
        let names = config.validate()?;
        let listen_options = match &config.listen_url {
            Some(url) => url
                .parse::<PgConnectOptions>()
                .map_err(|e| Error::InvalidConfig(format!("listen_url: {e}")))?,
            None => (*pool.connect_options()).clone(),
        };
        if owns_pool {
            // One direct connection first: a server that cannot be reached is reported at
            // once, with its cause ("Connection refused"), not as the pool's timeout.
            let mut first =
                connect_directly(&pool.connect_options(), config.connect_timeout).await?;
            migrate::run(&mut first, &names, config.run_migrations).await?;
            let _ = first.close().await;
        } else {
            // The caller's pool, with its hooks and its limit; if it cannot connect, a direct
            // attempt finds out why.
            let mut conn = match pool.acquire().await {
                Ok(conn) => conn,
                Err(sqlx::Error::PoolTimedOut) => {
                    connect_directly(&pool.connect_options(), config.connect_timeout).await?;
                    return Err(Error::Database(sqlx::Error::PoolTimedOut));
                }
                Err(e) => return Err(Error::Database(e)),
            };
            migrate::run(&mut conn, &names, config.run_migrations).await?;
        }
        let cancel = CancellationToken::new();
        let reach = Arc::new(Reachability::new(
            (*pool.connect_options()).clone(),
            config.connect_timeout,
            cancel.clone(),
        ));

        let tag = new_tag();
        // So that `status` can list the nodes listening on this table.
        let listen_options = listen_options.application_name(&format!(
            "{}{}",
            names.listener_application_prefix(),
            &tag[2..]
        ));
        let store = Arc::new(Store::new(pool.clone(), &names, &tag, reach));
        let isolation = store.default_isolation().await?;
        if isolation != "read committed" {
            return Err(Error::InvalidConfig(format!(
                "the pool's connections default to {isolation:?} isolation; pgsession needs \
                 \"read committed\" (set default_transaction_isolation on the connections)"
            )));
        }
        let legacy_until = store.legacy_until().await?;
        let backend = Arc::new(Backend::Pg(store.clone()));
        let pg = PgParts {
            store,
            listen_options,
            tag,
            legacy_until,
        };
        Ok(Self::assemble(config, names, backend, pool, owns_pool, Some(pg), cancel).await)
    }

    /// Build the parts and start the tasks: with `pg`, those of coherence too.
    async fn assemble(
        config: Config,
        names: Names,
        backend: Arc<Backend>,
        pool: PgPool,
        owns_pool: bool,
        pg: Option<PgParts>,
        cancel: CancellationToken,
    ) -> SessionManager {
        let capacity = if pg.is_some() {
            config.cache_capacity
        } else {
            0
        };
        let cache = Arc::new(Cache::new(
            capacity,
            config.cache_max_age.map(chrono_duration),
        ));
        let touches = Arc::new(Touches::new(
            config.max_pending_touches,
            config.last_access_batch_size,
        ));
        let outbox = Arc::new(Outbox::new());
        let listener = Arc::new(ListenerState::new());
        let events = Events::new();
        let idle = config.idle_timeout.map(chrono_duration);
        let cleanup = Cleanup {
            idle,
            grace: chrono_duration(config.last_access_flush_interval * 2),
            batch: config.cleanup_batch_size,
            events: events.clone(),
        };
        let cleanup_deleted = Arc::new(AtomicU64::new(0));
        let legacy_until = pg.as_ref().and_then(|pg| pg.legacy_until);

        let mut tasks = JoinSet::new();
        tasks.spawn(named(
            "last-access flush",
            background::flush_last_access(
                touches.clone(),
                backend.clone(),
                config.last_access_flush_interval,
                config.last_access_batch_size,
                cancel.clone(),
            ),
        ));
        if let Some(pg) = &pg {
            let store = &pg.store;
            tasks.spawn(named(
                "announcer",
                Announcer {
                    outbox: outbox.clone(),
                    store: store.clone(),
                    timeout: config.listener_timeout,
                }
                .run(cancel.clone()),
            ));
            tasks.spawn(named(
                "outbox sweep",
                announcer::sweep(outbox.clone(), store.clone(), cancel.clone()),
            ));
            tasks.spawn(named(
                "idle connection return",
                background::return_idle_connections(store.clone(), cancel.clone()),
            ));
        }
        if config.run_cleanup {
            tasks.spawn(named(
                "cleanup",
                cleanup.clone().periodically(
                    backend.clone(),
                    config.cleanup_interval,
                    cleanup_deleted.clone(),
                    cancel.clone(),
                ),
            ));
        }
        if let Some(pg) = pg.filter(|_| cache.enabled()) {
            let listener = Listener {
                connect: PgConnect {
                    options: pg.listen_options,
                    channel: names.channel.clone(),
                    store: pg.store,
                    timeout: config.listener_timeout,
                },
                cache: cache.clone(),
                state: listener.clone(),
                timing: Timing {
                    probe_interval: config.listener_probe_interval,
                    timeout: config.listener_timeout,
                    max_backoff: config.listener_max_backoff,
                },
                events: events.clone(),
                own_tag: pg.tag[2..].to_owned(),
            };
            tasks.spawn(named("listener", listener.run(cancel.clone())));
        }
        let inner = Arc::new(Inner {
            ttl: chrono_duration(config.session_ttl),
            idle,
            store: backend,
            pool,
            events,
            cache,
            touches,
            outbox,
            listener,
            cleanup,
            cleanup_deleted,
            forged: AtomicU64::new(0),
            legacy_until: AtomicI64::new(legacy_until.map_or(i64::MIN, |t| t.timestamp_micros())),
            cap_evictions: AtomicU64::new(0),
            _cancel_on_drop: cancel.clone().drop_guard(),
            cancel,
            calls: TaskTracker::new(),
            tasks: Mutex::new(Some(tasks)),
            shutdown: ShutdownState {
                started: AtomicBool::new(false),
                done: tokio::sync::watch::channel(false).0,
                outcome: Mutex::new(None),
            },
            owns_pool,
            names,
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
                tasks.spawn(named(
                    "metrics",
                    crate::metrics::report(read, inner.cancel.clone()),
                ));
            }
        }
        // From here on, dropping this future (or the manager) stops whatever was started.
        if inner.cache.enabled() {
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
        SessionManager { inner }
    }

    /// The shared state, unless shutdown has begun: for calls that do no I/O.
    fn open(&self) -> Result<&Inner> {
        if self.inner.calls.is_closed() {
            Err(Error::ShutDown)
        } else {
            Ok(&self.inner)
        }
    }

    /// Start a call that may do I/O: shutdown waits for it to finish (within
    /// `shutdown_timeout`) before it closes anything; once shutdown has begun, none starts.
    fn enter(&self) -> Result<Call<'_>> {
        // Counted first, then checked: shutdown closes first, then waits for the count, so
        // either this call sees the close or shutdown waits for it (one atomic holds both).
        let token = self.inner.calls.token();
        if self.inner.calls.is_closed() {
            return Err(Error::ShutDown);
        }
        Ok(Call {
            inner: &self.inner,
            _token: token,
        })
    }

    /// Create a session for `user_id` (a login) with initial `attributes`, in one round trip,
    /// and the token that opens it: put the token (its `Display` text) in the session cookie;
    /// pgsession keeps only its hash.
    ///
    /// With a per-user cap, the user's least recently used sessions beyond it are deleted in
    /// the same transaction (or, with [`MaxSessionsPolicy::Reject`], the call fails); concurrent
    /// logins of one user are serialised, so the cap holds across nodes. A create whose
    /// connection is lost is retried on another one (it looks for its own id first, so it is
    /// never made twice).
    ///
    /// # Errors
    ///
    /// [`Error::AttributeTooLarge`] or [`Error::InvalidAttribute`] for an attribute that cannot
    /// be stored, [`Error::SessionTooLarge`] past [`Config::max_session_size`],
    /// [`Error::InvalidUserId`] (all checked before any SQL runs: nothing is written), [`Error::MaxSessionsReached`] with the reject policy, [`Error::Database`],
    /// [`Error::ShutDown`].
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn run(manager: pgsession::SessionManager) -> pgsession::Result<()> {
    /// let (session, token) = manager
    ///     .create_session("alice", [("role", "admin")])
    ///     .await?;
    /// let cookie = format!("id={token}; HttpOnly; Secure; SameSite=Lax; Path=/");
    /// println!("session {} for {:?}", session.id(), session.user_id());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn create_session<K: Into<String>, V: Serialize>(
        &self,
        user_id: impl Into<UserId>,
        attributes: impl IntoIterator<Item = (K, V)>,
    ) -> Result<(Session, SessionToken)> {
        self.create_session_with(SessionOptions::new().user(user_id), attributes)
            .await
    }

    /// Create a session that belongs to no user yet (a visitor's cart, a CSRF token, a flash
    /// message), and its token. It expires like any other, counts against no cap, and is not
    /// listed or deleted by the per-user calls; [`log_in`](Self::log_in) later binds it to a
    /// user under a new token.
    ///
    /// # Errors
    ///
    /// As [`create_session`](Self::create_session), except the cap.
    pub async fn create_anonymous_session<K: Into<String>, V: Serialize>(
        &self,
        attributes: impl IntoIterator<Item = (K, V)>,
    ) -> Result<(Session, SessionToken)> {
        self.create_session_with(SessionOptions::new(), attributes)
            .await
    }

    /// Create a session with `options` (its user or none, its group, the client's address and
    /// `User-Agent`) and initial `attributes`, like [`create_session`](Self::create_session).
    ///
    /// # Errors
    ///
    /// As [`create_session`](Self::create_session); [`Error::InvalidGroupId`] for a group
    /// that cannot be stored (nothing is written).
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn run(manager: pgsession::SessionManager) -> pgsession::Result<()> {
    /// use pgsession::SessionOptions;
    ///
    /// let options = SessionOptions::new()
    ///     .user("alice")
    ///     .group("acme")
    ///     .ip("203.0.113.7".parse().unwrap());
    /// let (session, token) = manager.create_session_with(options, [("role", "admin")]).await?;
    /// # Ok(())
    /// # }
    /// ```
    #[tracing::instrument(level = "debug", name = "create_session", skip_all, fields(user.id = options.user.as_ref().map(UserId::as_str), group.id = options.group.as_deref()))]
    pub async fn create_session_with<K: Into<String>, V: Serialize>(
        &self,
        options: SessionOptions,
        attributes: impl IntoIterator<Item = (K, V)>,
    ) -> Result<(Session, SessionToken)> {
        // `create_with` enters the call.
        let inner = self.open()?;
        let _timer = Timer::start("create");
        options.validate()?;
        let token = SessionToken::generate(inner.config.signing_keys.first());
        let session = self.create_with(&token, &options, attributes, None).await?;
        Ok((session, token))
    }

    /// Create the session of `token` (chosen by the caller: tower-sessions picks its ids), with
    /// `expires_at` (checked as [`Session::set_expires_at`] checks it) or the configured
    /// lifetime. [`Error::AlreadyExists`] when the id exists. `options` must be validated.
    pub(crate) async fn create_with<K: Into<String>, V: Serialize>(
        &self,
        token: &SessionToken,
        options: &SessionOptions,
        attributes: impl IntoIterator<Item = (K, V)>,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<Session> {
        let inner = self.enter()?;
        let limit = inner.config.max_attribute_size;
        let attributes = build_attributes(attributes, limit)?;
        let size = crate::json::stored_size(&attributes);
        if size > inner.config.max_session_size {
            return Err(Error::SessionTooLarge {
                size,
                limit: inner.config.max_session_size,
            });
        }
        let now = now();
        let expires_at = match expires_at {
            Some(at) => storable_expiry(at)?,
            None => now + inner.ttl,
        };
        let id = token.id().as_uuid();
        let user = options.user.clone();
        let new = NewSession {
            id,
            user_id: user.as_ref(),
            attributes: &attributes,
            now,
            expires_at,
            // Sessions idle by the stored time but possibly used on a node that has not flushed
            // yet still count (and rank as least recently used).
            idle_cutoff: inner.idle.map(|idle| now - idle - inner.cleanup.grace),
            cap: inner.cap(),
            group_id: options.group.as_deref(),
            client: &options.client,
            attribute_expiry: &Default::default(),
            announce: inner.config.announce_creates,
        };
        let fill = inner.cache.token_for(id);
        let (evicted, queued) = inner.store.create(&new).await?;
        if let Some(queued) = queued {
            inner.outbox.push(queued);
        }
        let record = Record {
            id,
            user_id: user.clone(),
            version: 1,
            created_at: now,
            updated_at: now,
            last_accessed_at: now,
            expires_at: new.expires_at,
            attributes: Arc::new(attributes),
            attribute_expiry: Arc::default(),
            group_id: options.group.as_deref().map(Arc::from),
            client: Arc::new(options.client.clone()),
            reads: 0,
            writes: 0,
        };
        // Installed before the evictions below, which move shard generations: one of them
        // sharing this session's shard would otherwise turn this install into an eviction.
        inner
            .cache
            .apply_own_write(id, fill, Some(&record), now, token.tag().copied());
        // Other nodes learn of the evictions by notification; this node must not serve them
        // even for the moment until its own notification arrives.
        inner
            .cap_evictions
            .fetch_add(evicted.len() as u64, Ordering::Relaxed);
        for gone in evicted {
            inner.cache.apply_own_write(gone, None, None, now, None);
            inner.report(SessionEventKind::Deleted, gone, user.clone(), None);
        }
        inner.report(
            SessionEventKind::Created,
            id,
            record.user_id.clone(),
            Some(1),
        );
        Ok(inner.session(record, now))
    }

    /// The session `token` opens, or `None` when it does not exist, has expired (absolutely,
    /// or by inactivity), or the token's signature does not verify (with
    /// [`Config::signing_keys`]; counted in [`Stats::forged_tokens`]: no database read, no
    /// cache entry touched). Records the access; a cache hit does no database I/O.
    ///
    /// The verdict on a token never depends on the cache: a token opens its session on every
    /// node or on none. A cache hit does not recompute the MAC when the token's tag is the one
    /// this node already verified (or signed) for that session, a 16-byte comparison;
    /// otherwise the MAC is computed before anything is served or read.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] when the session had to be read and the database failed (a read
    /// whose connection was lost is run again on another first), [`Error::ShutDown`].
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn run(manager: pgsession::SessionManager, cookie: &str) -> pgsession::Result<()> {
    /// // A malformed cookie is no session, like an unknown one.
    /// let found = match cookie.parse::<pgsession::SessionToken>() {
    ///     Ok(token) => manager.get_session(&token).await?,
    ///     Err(_) => None,
    /// };
    /// match found {
    ///     Some(session) => println!("user {:?}", session.user_id()),
    ///     None => println!("logged out or expired: send to the login page"),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn get_session(&self, token: &SessionToken) -> Result<Option<Session>> {
        // Built by hand rather than with `#[instrument]`: the hit path never awaits, so it
        // enters the span without wrapping the future; and unless some subscriber wants
        // debug spans, a hit pays one load of the global level for it instead of the
        // span's callsite checks (an unconditional span measured about 0.15 us more a hit;
        // this, no measurable cost: `cargo bench --bench cache`).
        let span = if tracing::level_enabled!(tracing::Level::DEBUG) {
            tracing::debug_span!("get_session", session.id = %token.id())
        } else {
            tracing::Span::none()
        };
        let inner = self.open()?;
        let id = token.id().as_uuid();
        let now = now();
        let (fill, tag, _timer) = {
            let _entered = span.enter();
            let check = inner.precheck(token, now);
            let proof = match &check {
                Precheck::Refused => return Ok(inner.forged()),
                Precheck::Accepted => Proof::Any,
                Precheck::IfSigned(tag) => Proof::Tag(tag),
            };
            if let Some(record) = inner.cache.hit(id, now, inner.idle, proof) {
                return Ok(Some(inner.cached(record, now)));
            }
            let timer = Timer::start("get");
            let (proof, tag) = match check {
                Precheck::IfSigned(tag) if !token.signed_by(&inner.config.signing_keys, &tag) => {
                    return Ok(inner.forged());
                }
                Precheck::IfSigned(tag) => (Proof::Verified(tag), Some(tag)),
                _ => (Proof::Any, None),
            };
            match inner.cache.lookup(id, now, inner.idle, proof) {
                Lookup::Hit(record) => return Ok(Some(inner.cached(record, now))),
                Lookup::Miss(fill) => (fill, tag, timer),
            }
        };
        // A read from the database: shutdown waits for it.
        let call = self.enter()?;
        call.read_through(id, fill, now, tag).instrument(span).await
    }

    /// [`get_session`](Self::get_session) from the database whatever the cache holds, for
    /// the rare page where even the notification delay is too much (a payment confirmation
    /// after a change made on another node a moment ago); the cache is refreshed with what it
    /// reads. Records the access like `get_session`.
    ///
    /// # Errors
    ///
    /// As [`get_session`](Self::get_session).
    #[tracing::instrument(level = "debug", skip_all, fields(session.id = %token.id()))]
    pub async fn get_session_fresh(&self, token: &SessionToken) -> Result<Option<Session>> {
        let inner = self.enter()?;
        let _timer = Timer::start("get_fresh");
        let now = now();
        if !inner.verify(token, now) {
            return Ok(inner.forged());
        }
        let id = token.id().as_uuid();
        let fill = inner.cache.token_for(id);
        inner
            .read_through(id, fill, now, token.tag().copied())
            .await
    }

    /// Persist the attributes set or removed on `session` (and a new expiry, if set) in one
    /// round trip, leaving every other attribute as it is in the database. On success
    /// `session` is replaced by the stored state (other writers' changes included) with its
    /// new `version`. Without changes this does nothing.
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`] when the session was deleted or expired meanwhile (it is not
    /// recreated), [`Error::AttributeTooLarge`] or [`Error::InvalidAttribute`] (nothing is
    /// written), [`Error::SessionTooLarge`] when the merged attributes (other writers' keys
    /// included) would grow past [`Config::max_session_size`] (nothing is written), [`Error::Database`] (a transient one when the connection was lost: the update
    /// may or may not have been applied, and if it was, every node learns of it),
    /// [`Error::ShutDown`].
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn run(manager: pgsession::SessionManager, mut session: pgsession::Session) -> pgsession::Result<()> {
    /// session.set("theme", "dark")?;
    /// session.remove("cart");
    /// manager.update_session(&mut session).await?;
    /// # Ok(())
    /// # }
    /// ```
    #[tracing::instrument(level = "debug", skip_all, fields(session.id = %session.id(), user.id = session.user_id().map(UserId::as_str)))]
    pub async fn update_session(&self, session: &mut Session) -> Result<()> {
        self.update(session, false).await
    }

    /// [`update_session`](Self::update_session) with optimistic locking: writes only if no
    /// other write (an update, a rotation, another node's change) committed since `session`
    /// was read, in the same single round trip. For read-modify-write values a merge of
    /// changed keys cannot make right (a balance, a counter, a multi-step form).
    ///
    /// # Errors
    ///
    /// [`Error::Conflict`] with the version now stored when another write came first (nothing
    /// is written, `session` is unchanged: read it again and retry); otherwise as
    /// [`update_session`](Self::update_session).
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn run(manager: pgsession::SessionManager, token: pgsession::SessionToken) -> pgsession::Result<()> {
    /// use pgsession::Error;
    ///
    /// loop {
    ///     let Some(mut s) = manager.get_session(&token).await? else { break };
    ///     let credits: i64 = s.get_as("credits")?.unwrap_or(0);
    ///     s.set("credits", credits - 1)?;
    ///     match manager.update_session_if_unchanged(&mut s).await {
    ///         Err(Error::Conflict { .. }) => continue, // someone else spent meanwhile
    ///         other => break other?,
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    #[tracing::instrument(level = "debug", skip_all, fields(session.id = %session.id(), user.id = session.user_id().map(UserId::as_str)))]
    pub async fn update_session_if_unchanged(&self, session: &mut Session) -> Result<()> {
        self.update(session, true).await
    }

    async fn update(&self, session: &mut Session, if_unchanged: bool) -> Result<()> {
        let inner = self.enter()?;
        let _timer = Timer::start(if if_unchanged {
            "update_if_unchanged"
        } else {
            "update"
        });
        if !session.is_modified() {
            return Ok(());
        }
        let now = now();
        let mut delta = inner.delta(session, now)?;
        if if_unchanged {
            delta.expect_version = Some(session.base_version);
        }
        let id = delta.id;
        let token = inner.cache.token_for(id);
        let outcome = InDoubt::arm(&inner, id);
        let updated = inner.store.update(&delta).await;
        match outcome.settle(updated)? {
            UpdateOutcome::Updated(updated, queued) => {
                if let Some(queued) = queued {
                    inner.outbox.push(queued);
                }
                // Without attributes back, the caller's copy (its own changes applied) is the
                // new state.
                let mut record = updated.into_record(&session.record);
                // The write is an access; the flush stores it, as it stores reads.
                record.last_accessed_at = record.last_accessed_at.max(now);
                inner.touches.keep_alive(id, now);
                inner
                    .cache
                    .apply_own_write(id, token, Some(&record), now, None);
                inner.report(
                    SessionEventKind::Updated,
                    id,
                    record.user_id.clone(),
                    Some(record.version),
                );
                *session = inner.session(record, now);
                Ok(())
            }
            // Nothing was written, and this node's copy is as good as it was.
            UpdateOutcome::TooLarge { size } => Err(Error::SessionTooLarge {
                size,
                limit: delta.max_size,
            }),
            // Gone, or (with the lock) changed: either way this node's copy may be behind,
            // and a retry must read the database.
            UpdateOutcome::Gone => {
                inner.cache.apply_own_write(id, token, None, now, None);
                Err(Error::NotFound)
            }
            UpdateOutcome::Conflict { current_version } => {
                inner.cache.apply_own_write(id, token, None, now, None);
                Err(Error::Conflict { current_version })
            }
        }
    }

    /// Log `session` in as `user_id`: bind it to the user under a new token, in one round trip
    /// and one transaction that also applies the per-user cap under the same lock as
    /// [`create_session`](Self::create_session) (concurrent logins never exceed it) and writes
    /// the session's pending changes. The visitor's data carries over; the old token stops
    /// working on every node within the bound of a delete (a new id on every privilege change
    /// is what defeats session fixation). Logging in as another user from a logged-in session
    /// rotates again. Returns the new token for the cookie; `session` is the new state.
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`] when the session is gone or expired (nothing is written),
    /// [`Error::MaxSessionsReached`] with the reject policy, [`Error::InvalidUserId`], the
    /// attribute errors of [`update_session`](Self::update_session), [`Error::Database`],
    /// [`Error::ShutDown`].
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn run(manager: pgsession::SessionManager) -> pgsession::Result<()> {
    /// let (mut session, _visitor) = manager.create_anonymous_session([("cart", vec![7])]).await?;
    /// let token = manager.log_in(&mut session, 42i64).await?;
    /// assert_eq!(session.get_as::<Vec<i32>>("cart")?, Some(vec![7]));
    /// // Send `token` in a new cookie.
    /// # Ok(())
    /// # }
    /// ```
    #[tracing::instrument(level = "debug", skip_all, fields(session.id = %session.id(), user.id = tracing::field::Empty))]
    pub async fn log_in(
        &self,
        session: &mut Session,
        user_id: impl Into<UserId>,
    ) -> Result<SessionToken> {
        let user = user_id.into();
        tracing::Span::current().record("user.id", user.as_str());
        user.validate()?;
        let token = self.new_token()?;
        self.rotate(session, Some(Some(user)), &token).await?;
        Ok(token)
    }

    /// Give `session` a new token, keeping its data, user, expiry and version history (and
    /// writing its pending changes), in one round trip. The old token stops working on every
    /// node within the bound of a delete; an `update_session` through another copy holding
    /// the old id gets [`Error::NotFound`].
    ///
    /// # Errors
    ///
    /// As [`log_in`](Self::log_in), without the cap.
    #[tracing::instrument(level = "debug", skip_all, fields(session.id = %session.id(), user.id = session.user_id().map(UserId::as_str)))]
    pub async fn rotate_session(&self, session: &mut Session) -> Result<SessionToken> {
        let token = self.new_token()?;
        self.rotate(session, None, &token).await?;
        Ok(token)
    }

    fn new_token(&self) -> Result<SessionToken> {
        let inner = self.open()?;
        Ok(SessionToken::generate(inner.config.signing_keys.first()))
    }

    /// Bind `session` to `user` (`None`: to no user) keeping its id, with its pending changes,
    /// under the cap like a login. For stores whose ids the caller picks.
    #[cfg_attr(not(feature = "tower-sessions"), allow(dead_code))]
    pub(crate) async fn rebind(
        &self,
        session: &mut Session,
        user: Option<UserId>,
        token: &SessionToken,
    ) -> Result<()> {
        if let Some(user) = &user {
            user.validate()?;
        }
        self.rotate(session, Some(user), token).await
    }

    /// Move `session` to `token`'s id (possibly its own), writing its pending changes, and
    /// with `user` set, bind it to that user (or to none) under the cap.
    async fn rotate(
        &self,
        session: &mut Session,
        user: Option<Option<UserId>>,
        token: &SessionToken,
    ) -> Result<()> {
        let inner = self.enter()?;
        let _timer = Timer::start("rotate");
        let now = now();
        let delta = inner.delta(session, now)?;
        let old = delta.id;
        let new_id = token.id().as_uuid();
        let binds = user.as_ref().is_some_and(Option::is_some);
        let rotation = Rotation {
            delta: &delta,
            new_id,
            cap: if binds { inner.cap() } else { None },
            user: user.as_ref().map(Option::as_ref),
            cap_cutoff: inner.idle.map(|idle| now - idle - inner.cleanup.grace),
        };
        let fill = inner.cache.token_for(new_id);
        let outcome = InDoubt::arm(&inner, old);
        let rotated = inner.store.rotate(&rotation).await;
        let rotated = outcome.settle(rotated)?;
        let Some(rotated) = rotated else {
            if new_id != old {
                inner.cache.apply_own_write(old, None, None, now, None);
            }
            return Err(Error::NotFound);
        };
        if let Some(queued) = rotated.queued {
            inner.outbox.push(queued);
        }
        let record = rotated.updated.into_record(&session.record);
        // The new state first: the evictions below move shard generations (see create).
        inner
            .cache
            .apply_own_write(new_id, fill, Some(&record), now, token.tag().copied());
        if new_id != old {
            inner.cache.apply_own_write(old, None, None, now, None);
        }
        inner
            .cap_evictions
            .fetch_add(rotated.evicted.len() as u64, Ordering::Relaxed);
        for gone in rotated.evicted {
            inner.cache.apply_own_write(gone, None, None, now, None);
            inner.report(
                SessionEventKind::Deleted,
                gone,
                record.user_id.clone(),
                None,
            );
        }
        inner.events.emit(|| {
            let mut e = SessionEvent::new(SessionEventKind::Rotated, Origin::ThisNode)
                .session(new_id)
                .user(record.user_id.clone())
                .version(record.version);
            e.previous_id = Some(SessionId(old));
            e
        });
        *session = inner.session(record, now);
        Ok(())
    }

    /// Delete one session (logout), in one round trip; true when it existed. Every node stops
    /// serving it within the notification delay, this one at once. A delete whose connection
    /// is lost is run again on another one; it then returns false if the lost attempt had
    /// already deleted the session.
    ///
    /// # Errors
    ///
    /// [`Error::Database`], [`Error::ShutDown`].
    #[tracing::instrument(level = "debug", skip_all, fields(session.id = %id))]
    pub async fn delete_session(&self, id: SessionId) -> Result<bool> {
        let inner = self.enter()?;
        let _timer = Timer::start("delete");
        let id = id.as_uuid();
        let outcome = InDoubt::arm(&inner, id);
        let deleted = inner.store.delete(id).await;
        let (deleted, queued, retried) = outcome.settle(deleted)?;
        if retried {
            inner.outbox.in_doubt();
        }
        inner.cache.apply_own_write(id, None, None, now(), None);
        if let Some(queued) = queued {
            inner.outbox.push(queued);
        }
        if deleted {
            inner.report(SessionEventKind::Deleted, id, None, None);
        }
        Ok(deleted)
    }

    /// Record an access to session `id` without reading it (a keep-alive: a page open in a
    /// tab that polls, a long upload), so that it does not expire by inactivity. Written with
    /// the next last-access flush, like a read's; no database I/O now. An unknown or deleted id
    /// is ignored when the flush runs.
    ///
    /// # Errors
    ///
    /// [`Error::ShutDown`].
    pub fn touch_session(&self, id: SessionId) -> Result<()> {
        let _span = tracing::debug_span!("touch_session", session.id = %id).entered();
        let inner = self.open()?;
        inner.touches.keep_alive(id.as_uuid(), now());
        Ok(())
    }

    /// Delete every session of `user_id` ("log out everywhere"), in one round trip with one
    /// notification however many sessions there are. Returns how many were deleted.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidUserId`], [`Error::Database`], [`Error::ShutDown`].
    #[tracing::instrument(level = "debug", skip_all, fields(user.id = tracing::field::Empty))]
    pub async fn delete_all_user_sessions(&self, user_id: impl Into<UserId>) -> Result<u64> {
        let inner = self.enter()?;
        let _timer = Timer::start("delete_user");
        let user = user_id.into();
        user.validate()?;
        tracing::Span::current().record("user.id", user.as_str());
        let n = inner.store.delete_user(&user, &[]).await?;
        inner.cache.invalidate_user(&user);
        inner.report_user(SessionEventKind::UserLoggedOutEverywhere, user, n);
        Ok(n)
    }

    /// Delete every session of `user_id` except `keep` ("log out my other devices"). Returns
    /// how many were deleted.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidUserId`], [`Error::Database`], [`Error::ShutDown`].
    #[tracing::instrument(level = "debug", skip_all, fields(user.id = tracing::field::Empty, session.id = %keep))]
    pub async fn delete_other_user_sessions(
        &self,
        user_id: impl Into<UserId>,
        keep: SessionId,
    ) -> Result<u64> {
        let inner = self.enter()?;
        let _timer = Timer::start("delete_other_user");
        let user = user_id.into();
        user.validate()?;
        tracing::Span::current().record("user.id", user.as_str());
        let n = inner.store.delete_user(&user, &[keep.as_uuid()]).await?;
        inner.cache.invalidate_user(&user);
        inner.report_user(SessionEventKind::UserLoggedOutEverywhere, user, n);
        Ok(n)
    }

    /// Remove attribute `key` from every session of `user_id` (after a permission change: a
    /// cached role, a feature flag), in one statement and one notification however many
    /// sessions there are; every node's cache drops them. Returns how many sessions had it.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidUserId`], [`Error::Database`], [`Error::ShutDown`].
    #[tracing::instrument(level = "debug", skip_all, fields(user.id = tracing::field::Empty, key))]
    pub async fn remove_attribute_from_user_sessions(
        &self,
        user_id: impl Into<UserId>,
        key: &str,
    ) -> Result<u64> {
        let inner = self.enter()?;
        let _timer = Timer::start("remove_user_attribute");
        let user = user_id.into();
        user.validate()?;
        crate::json::check_key(key)?;
        tracing::Span::current().record("user.id", user.as_str());
        let n = inner.store.remove_user_attribute(&user, key, now()).await?;
        inner.cache.invalidate_user(&user);
        inner.report_user(SessionEventKind::UserSessionsUpdated, user, n);
        Ok(n)
    }

    /// Delete every session of group `group_id` (a tenant removed, an organisation's forced
    /// logout), in one statement and one notification however many sessions there are.
    /// Returns how many were deleted.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidGroupId`], [`Error::Database`], [`Error::ShutDown`].
    #[tracing::instrument(level = "debug", skip_all, fields(group.id = group_id))]
    pub async fn delete_group_sessions(&self, group_id: &str) -> Result<u64> {
        let inner = self.enter()?;
        let _timer = Timer::start("delete_group");
        validate_group(group_id)?;
        let n = inner.store.delete_group(group_id).await?;
        inner
            .cache
            .invalidate_where(|r| r.group_id.as_deref() == Some(group_id));
        if n > 0 {
            inner.events.emit(|| {
                let mut e = SessionEvent::new(SessionEventKind::GroupDeleted, Origin::ThisNode);
                e.group_id = Some(group_id.to_owned());
                e
            });
        }
        Ok(n)
    }

    /// Delete every session of the application ("log everyone out": after a key leak, at a
    /// breaking release), in one statement and one notification; every node's cache is
    /// emptied (a node that misses the message empties it when it reconnects). Returns how
    /// many were deleted.
    ///
    /// # Errors
    ///
    /// [`Error::Database`], [`Error::ShutDown`].
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn delete_all_sessions(&self) -> Result<u64> {
        let inner = self.enter()?;
        let _timer = Timer::start("delete_all");
        let (n, epoch) = inner.store.delete_all().await?;
        inner.listener.see_epoch(epoch);
        inner.cache.clear();
        inner
            .events
            .emit(|| SessionEvent::new(SessionEventKind::AllDeleted, Origin::ThisNode));
        Ok(n)
    }

    /// Sessions, live and not past their absolute expiry, accessed within the last `within`:
    /// for an "active users" figure. One index range scan on `last_accessed_at` (see
    /// BENCHMARKS.md for its time on a million rows). Accesses other nodes have not flushed
    /// yet are not counted, so the figure is exact to one `last_access_flush_interval`.
    ///
    /// # Errors
    ///
    /// [`Error::Database`], [`Error::ShutDown`].
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn count_active_sessions(&self, within: Duration) -> Result<u64> {
        let inner = self.enter()?;
        let _timer = Timer::start("count_active");
        let now = now();
        let since = now - chrono_duration(within.min(Duration::from_secs(100 * 365 * 86_400)));
        inner.store.count_active(since, now).await
    }

    /// One page of every live session of the application, in id order, starting after `after`
    /// (`None`: the first page); at most `limit` sessions (1 to 10 000). Pass the last id of
    /// a page to get the next; an empty page is the end. Keyset pages: a session that exists
    /// from the first page to the last is listed exactly once, whatever is written meanwhile.
    /// Always read from the database; not an access. A stored session that cannot be read back
    /// (written by hand with a value serde_json cannot parse) is left out, logged and counted
    /// in [`Stats::unreadable_sessions`], rather than failing the page.
    ///
    /// # Errors
    ///
    /// [`Error::Database`], [`Error::ShutDown`].
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn run(manager: pgsession::SessionManager) -> pgsession::Result<()> {
    /// let mut after = None;
    /// loop {
    ///     let page = manager.list_sessions(after, 500).await?;
    ///     let Some(last) = page.last() else { break };
    ///     after = Some(last.id());
    ///     for s in &page {
    ///         println!("{} {:?} {:?}", s.id(), s.user_id(), s.ip());
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn list_sessions(
        &self,
        after: Option<SessionId>,
        limit: usize,
    ) -> Result<Vec<Session>> {
        let inner = self.enter()?;
        let _timer = Timer::start("list");
        let limit = limit.clamp(1, 10_000);
        let now = now();
        let mut cursor = after.map(SessionId::as_uuid);
        let mut out = Vec::new();
        // Rows expired by inactivity are skipped here, not in SQL (an unflushed access may
        // keep them alive): keep reading until the page is full or the table ends.
        loop {
            let page = inner.store.page(cursor, now, limit - out.len()).await?;
            let full = page.scanned == limit - out.len();
            cursor = page.last.or(cursor);
            out.extend(inner.live(page.records, now).map(|r| inner.session(r, now)));
            if !full || out.len() == limit {
                return Ok(out);
            }
        }
    }

    /// The live sessions of `user_id`, most recently used first (for a "where you are logged
    /// in" page). Always read from the database; does not count as an access. Sessions that
    /// cannot be read back are left out as in [`list_sessions`](Self::list_sessions).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidUserId`], [`Error::Database`], [`Error::ShutDown`].
    #[tracing::instrument(level = "debug", skip_all, fields(user.id = tracing::field::Empty))]
    pub async fn list_user_sessions(&self, user_id: impl Into<UserId>) -> Result<Vec<Session>> {
        let inner = self.enter()?;
        let _timer = Timer::start("list_user");
        let user = user_id.into();
        user.validate()?;
        tracing::Span::current().record("user.id", user.as_str());
        let now = now();
        let records = inner.store.fetch_user(&user, now).await?;
        let mut records: Vec<Record> = inner.live(records, now).collect();
        records.sort_by_key(|r| std::cmp::Reverse(r.last_accessed_at));
        Ok(records.into_iter().map(|r| inner.session(r, now)).collect())
    }

    /// Empty the cache of every node (one notification). This node's is emptied before the call
    /// returns.
    ///
    /// # Errors
    ///
    /// [`Error::Database`], [`Error::ShutDown`].
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn clear_cache(&self) -> Result<()> {
        let inner = self.enter()?;
        let _timer = Timer::start("clear_cache");
        let epoch = inner.store.broadcast_clear().await?;
        inner.listener.see_epoch(epoch);
        inner.cache.clear();
        Ok(())
    }

    /// Write all recorded accesses (and read counts) now instead of waiting for the next
    /// interval. Returns the number of sessions written.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] (the accesses stay recorded for the next attempt),
    /// [`Error::ShutDown`].
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn flush_last_access(&self) -> Result<u64> {
        let inner = self.enter()?;
        let _timer = Timer::start("flush");
        inner
            .touches
            .flush(&inner.store, inner.config.last_access_batch_size)
            .await
    }

    /// Delete expired sessions now (the background task does this every
    /// `cleanup_interval`). Returns how many were deleted.
    ///
    /// # Errors
    ///
    /// [`Error::Database`], [`Error::ShutDown`].
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn cleanup_expired(&self) -> Result<u64> {
        let inner = self.enter()?;
        let _timer = Timer::start("cleanup");
        inner.cleanup.run_once(&inner.store, &inner.cancel).await
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
        tokio::select! {
            _ = self.inner.listener.wait_trusted() => {}
            _ = self.inner.cancel.cancelled() => {}
        }
    }

    /// A receiver of the cache's trust: `true` while cached sessions are served, `false` while
    /// the listener is down or resynchronising. Await `changed()` on it to react to outages
    /// (alerting, tests). Always `false` with `cache_capacity == 0`.
    pub fn subscribe_cache_trust(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.listener.subscribe()
    }

    /// A receiver of [`SessionEvent`]s: this node's creates, updates, rotations, deletes,
    /// expiries and bulk deletions as they happen, and other nodes' as their invalidations
    /// arrive (their creates only with [`Config::announce_creates`]). Each receiver gets every
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
    /// [`Error::Database`], [`Error::ShutDown`].
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn status(&self) -> Result<Status> {
        let inner = self.enter()?;
        match &*inner.store {
            Backend::Pg(store) => {
                let prefix = inner.names.listener_application_prefix();
                let (row, listeners) = store.status(inner.config.idle_timeout, &prefix).await?;
                let (version, sessions, live, anonymous, active, backlog, oldest, cleanup) = row;
                Ok(Status {
                    schema_version: version,
                    sessions: sessions as u64,
                    live: live as u64,
                    anonymous: anonymous as u64,
                    active_last_5_minutes: active as u64,
                    outbox_backlog: backlog as u64,
                    outbox_oldest: oldest,
                    listening_nodes: listeners
                        .into_iter()
                        .map(|(pid, name, addr, since)| ListeningNode {
                            pid,
                            application_name: name.unwrap_or_default(),
                            client_addr: addr,
                            connected_since: since,
                        })
                        .collect(),
                    last_cleanup: cleanup,
                })
            }
            Backend::Memory(m) => {
                let now = now();
                let recent = now - chrono::Duration::minutes(5);
                let (sessions, live, anonymous, active, cleanup) =
                    m.status(now, inner.idle, recent);
                Ok(Status {
                    sessions,
                    live,
                    anonymous,
                    active_last_5_minutes: active,
                    last_cleanup: cleanup,
                    ..Status::default()
                })
            }
        }
    }

    /// Whether this manager keeps its sessions in memory ([`in_memory`](Self::in_memory)).
    pub fn is_in_memory(&self) -> bool {
        self.inner.store.pg().is_none()
    }

    /// Counters since start-up.
    pub fn stats(&self) -> Stats {
        let inner = &self.inner;
        let c = inner.cache.counters();
        let state = &inner.listener;
        Stats {
            hits: c.hits,
            misses: c.misses,
            entries: c.entries,
            capacity: inner.config.cache_capacity,
            invalidations: state.invalidations.load(Ordering::Relaxed),
            fills_rejected: c.fills_rejected,
            reconnects: state.reconnects.load(Ordering::Relaxed),
            resync_evictions: state.resync_evictions.load(Ordering::Relaxed),
            cache_trusted: inner.cache.trusted(),
            degraded_time: if inner.cache.enabled() {
                state.degraded_time()
            } else {
                Duration::ZERO
            },
            pending_touches: inner.touches.len(),
            touches_dropped: inner.touches.dropped(),
            flushes: inner.touches.flushes.load(Ordering::Relaxed),
            flush_errors: inner.touches.flush_errors.load(Ordering::Relaxed),
            cleanup_deleted: inner.cleanup_deleted.load(Ordering::Relaxed),
            invalidations_announced: inner.outbox.announced.load(Ordering::Relaxed),
            announce_messages: inner.outbox.messages.load(Ordering::Relaxed),
            forged_tokens: inner.forged.load(Ordering::Relaxed),
            announce_failures: inner.outbox.failures.load(Ordering::Relaxed),
            cap_evictions: inner.cap_evictions.load(Ordering::Relaxed),
            outbox_backlog: inner.outbox.len(),
            calls_in_flight: inner.calls.len(),
            unreadable_sessions: inner.store.pg().map_or(0, |s| s.unreadable()),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// The pool sessions are stored through (for an [`in_memory`](Self::in_memory) manager, a
    /// pool that never connects: every query on it fails).
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Stop: refuse new calls ([`Error::ShutDown`]), let the calls already under way finish,
    /// write pending accesses, stop every background task and close the pool if
    /// [`connect`](Self::connect) created it, all within `shutdown_timeout` (a call still
    /// running at that deadline fails with [`Error::ShutDown`]).
    ///
    /// Idempotent: later calls wait for the first to finish and return `Ok(())`. The work runs
    /// in its own task, so it completes even if this future is dropped.
    ///
    /// # Errors
    ///
    /// The error of the final flush if it failed, or [`Error::Timeout`] if tasks had to be
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

/// A connection straight to the server (not through the pool), within `limit`: its error is
/// the cause, where the pool would only report that it timed out.
async fn connect_directly(options: &PgConnectOptions, limit: Duration) -> Result<PgConnection> {
    match tokio::time::timeout(limit, PgConnection::connect_with(options)).await {
        Ok(conn) => Ok(conn?),
        Err(_) => Err(Error::Database(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("connecting to the database timed out after {limit:?}"),
        )))),
    }
}

/// Name a task's future, so that shutdown can tell which one failed or had to be aborted.
async fn named(
    name: &'static str,
    task: impl Future<Output = Result<()>>,
) -> (&'static str, Result<()>) {
    (name, task.await)
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
            // A refusal (too large, over the cap, a closed pool): rolled back or never sent.
            Err(_) => false,
        };
        result
    }
}

impl Drop for InDoubt<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.inner
                .cache
                .apply_own_write(self.id, None, None, now(), None);
            self.inner.outbox.in_doubt();
        }
    }
}

impl Inner {
    /// A stored session for a caller: with the reads this node has not flushed, without the
    /// attributes expired at `now`.
    fn session(&self, record: Record, now: DateTime<Utc>) -> Session {
        let pending = self.touches.pending_reads(record.id);
        self.served(record, now, pending)
    }

    /// A session served from the cache at `now`, its read recorded.
    fn cached(&self, record: Record, now: DateTime<Utc>) -> Session {
        let pending = self.touches.record(record.id, now);
        self.served(record, now, pending)
    }

    /// A session a read returns, with the `pending` reads this read's record reported (saving
    /// the hit path a second lock of the access buffer).
    fn served(&self, mut record: Record, now: DateTime<Utc>, pending: i64) -> Session {
        record.reads += pending;
        Session::from_record(record, self.config.max_attribute_size, self.idle, now)
    }

    /// Whether legacy tokens open sessions at `now`: when configured to, or while sessions
    /// converted by migration 3 may still be alive.
    fn legacy_accepted(&self, now: DateTime<Utc>) -> bool {
        self.config.accept_legacy_tokens
            || now.timestamp_micros() < self.legacy_until.load(Ordering::Relaxed)
    }

    /// The verdict on `token` as far as it goes without a MAC.
    fn precheck(&self, token: &SessionToken, now: DateTime<Utc>) -> Precheck {
        token.precheck(&self.config.signing_keys, self.legacy_accepted(now))
    }

    /// The whole verdict on `token` (computing its MAC if it is signed).
    fn verify(&self, token: &SessionToken, now: DateTime<Utc>) -> bool {
        token.verify(&self.config.signing_keys, self.legacy_accepted(now))
    }

    /// A refused token: counted, and no session.
    fn forged(&self) -> Option<Session> {
        self.forged.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// Read a session from the database, with this node's pending access; fill the cache
    /// under `fill`. An expired one is reported and not returned.
    async fn read_through(
        &self,
        id: Uuid,
        fill: Option<crate::cache::FillToken>,
        now: DateTime<Utc>,
        tag: Option<Tag>,
    ) -> Result<Option<Session>> {
        let Some(mut record) = self.store.fetch(id).await? else {
            self.cache.remove(id, None);
            return Ok(None);
        };
        if let Some(pending) = self.touches.pending(id) {
            record.last_accessed_at = record.last_accessed_at.max(pending);
        }
        if record.is_expired(now, self.idle) {
            self.cache.remove(id, Some(record.version));
            self.report(SessionEventKind::Expired, id, record.user_id.clone(), None);
            return Ok(None);
        }
        record.last_accessed_at = now;
        let pending = self.touches.record(id, now);
        if let Some(fill) = fill {
            self.cache.fill(fill, &record, now, tag);
        }
        Ok(Some(self.served(record, now, pending)))
    }

    /// The records not expired at `now`, counting this node's unflushed accesses.
    fn live(&self, records: Vec<Record>, now: DateTime<Utc>) -> impl Iterator<Item = Record> {
        records.into_iter().filter_map(move |mut r| {
            if let Some(pending) = self.touches.pending(r.id) {
                r.last_accessed_at = r.last_accessed_at.max(pending);
            }
            (!r.is_expired(now, self.idle)).then_some(r)
        })
    }

    /// Report this node's change of one session.
    fn report(&self, kind: SessionEventKind, id: Uuid, user: Option<UserId>, version: Option<i64>) {
        self.events.emit(|| {
            let mut e = SessionEvent::new(kind, Origin::ThisNode)
                .session(id)
                .user(user);
            e.version = version;
            e
        });
    }

    /// Report this node's bulk change of a user's sessions, if there was one.
    fn report_user(&self, kind: SessionEventKind, user: UserId, n: u64) {
        if n > 0 {
            self.events
                .emit(|| SessionEvent::new(kind, Origin::ThisNode).user(Some(user)));
        }
    }

    /// The per-user cap and whether it rejects, if there is one.
    fn cap(&self) -> Option<(usize, bool)> {
        self.config.max_sessions_per_user.map(|cap| {
            (
                cap,
                self.config.max_sessions_policy == MaxSessionsPolicy::Reject,
            )
        })
    }

    /// The changes of `session` as one delta, validated (a value may have been checked
    /// against another manager's limit).
    fn delta<'s>(
        &self,
        session: &'s Session,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Delta<'s>> {
        let limit = self.config.max_attribute_size;
        for at in session.changes.expiry.values() {
            storable_expiry(*at)?;
        }
        let mut set = Map::new();
        let mut removed = Vec::new();
        for key in &session.changes.keys {
            match session.record.attributes.get(key) {
                Some(value) => {
                    crate::json::check(key, value, limit)?;
                    set.insert(key.clone(), value.clone());
                }
                None => {
                    crate::json::check_key(key)?;
                    removed.push(key.as_str());
                }
            }
        }
        let id = session.record.id;
        Ok(Delta {
            id,
            base_version: session.base_version,
            removed,
            set,
            expires_at: session.changes.expires_at,
            now,
            idle_cutoff: self.idle.map(|idle| now - idle),
            // Not the session's own last access: a caller could have set it to anything.
            pending_access: self.touches.pending(id),
            set_expiry: session.changes.expiry.clone(),
            expect_version: None,
            max_size: self.config.max_session_size,
        })
    }

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
        if let Some(store) = self.store.pg() {
            store.connections().close();
        }
        if self.owns_pool {
            let _ = tokio::time::timeout_at(deadline, self.pool.close()).await;
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
