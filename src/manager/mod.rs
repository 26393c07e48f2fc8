//! [`SessionManager`], the public entry point, in rooms of one concern:
//!
//! * `build.rs`: construction (`connect`, `new`, `in_memory`) and shutdown;
//! * `sessions.rs`: one session at a time: create, get, update, rotate and log in, delete,
//!   touch;
//! * `users.rs`: many at a time: a user's, a group's, everyone's; listings and counts;
//! * `admin.rs`: observability and operations: stats, status, trust, events, cleanup.
//!
//! Every operation goes through the [`Storage`] it was built with: PostgreSQL behind the
//! coherence layer, or memory. The manager itself holds what is the same on both: validation,
//! tokens, expiry, the access buffer, events, and the calls under way.

mod admin;
mod build;
mod sessions;
mod users;

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use tokio::task::JoinSet;
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::{TaskTracker, task_tracker::TaskTrackerToken};

pub use self::admin::{ListeningNode, Stats, Status};
use crate::background::cleanup::Cleanup;
use crate::background::touches::Touches;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::events::Events;
use crate::model::clock::Clock;
use crate::model::expiry::ExpiryPolicy;
use crate::model::record::Record;
use crate::model::session::Session;
use crate::storage::Storage;

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
    policy: ExpiryPolicy,
    clock: Clock,
    storage: Arc<dyn Storage>,
    events: Events,
    touches: Arc<Touches>,
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
    /// Whether shutdown closes the pool (`connect` built it).
    owns_pool: bool,
    in_memory: bool,
    /// What `pool()` returns for an in-memory manager, made only if asked for.
    placeholder_pool: std::sync::OnceLock<sqlx::PgPool>,
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
        let config = &self.inner.config;
        f.debug_struct("SessionManager")
            .field("schema", &config.schema.as_deref().unwrap_or("public"))
            .field("prefix", &config.table_prefix)
            .field("in_memory", &self.inner.in_memory)
            .field("cache_capacity", &config.cache_capacity)
            .field("cache_trusted", &self.cache_trusted())
            .field("shut_down", &self.inner.calls.is_closed())
            .finish_non_exhaustive()
    }
}

impl SessionManager {
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
}

impl Inner {
    /// A stored session handed to a caller: with the reads this node has not flushed, without
    /// the attributes expired at `now`.
    fn hand_out(&self, record: Record, now: DateTime<Utc>) -> Session {
        // The cache first: the flush moves accesses from there to the buffer, never back.
        let served = self.storage.served(record.id).map_or(0, |s| s.reads);
        let pending = served + self.touches.pending_reads(record.id);
        self.hand_out_read(record, now, pending)
    }

    /// The latest access of `id` this node has not written yet: recorded for the flush, or
    /// noted by cache hits.
    fn pending_access(&self, id: uuid::Uuid) -> Option<DateTime<Utc>> {
        // The cache first: the flush moves accesses from there to the buffer, never back.
        let served = self.storage.served(id).map(|s| s.at);
        let recorded = self.touches.pending(id);
        recorded.max(served)
    }

    /// A session a read returns at `now`, with the `pending` reads its recording reported
    /// (saving the hit path a second lock of the access buffer).
    fn hand_out_read(&self, mut record: Record, now: DateTime<Utc>, pending: i64) -> Session {
        record.reads += pending;
        Session::from_record(
            record,
            self.config.max_attribute_size,
            self.policy.idle,
            self.clock.clone(),
            now,
        )
    }

    /// The per-user cap and whether it rejects, if there is one.
    fn cap(&self) -> Option<(usize, bool)> {
        self.config.max_sessions_per_user.map(|cap| {
            (
                cap,
                self.config.max_sessions_policy == crate::config::MaxSessionsPolicy::Reject,
            )
        })
    }
}
