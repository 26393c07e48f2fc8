//! Reuse of pooled connections between statements, without sqlx's ping on release.
//!
//! sqlx's pool sends a `Sync` round trip every time a connection goes back to it, to catch
//! connections left mid-protocol by a cancelled query. For a session store issuing one short
//! statement per operation that doubles the messages the database handles (measured here:
//! 25% fewer updates per second through the pool than on connections used directly).
//!
//! So the statements pgsession runs on its pool go through here: a connection that has
//! just completed a statement is kept in a small stack and handed to the next one. Only
//! completed statements are kept, so a connection whose query was cancelled, or whose
//! connection failed, goes back to the pool the normal way, ping and all (and a lost
//! connection sends every kept one back, since after a database restart they are all dead).
//!
//! Sharing the pool: statements here run on at most four fifths of the pool's connections at
//! once (rounded down; all but one of a pool of two to five), which leaves the rest to whoever
//! else uses the pool, and a timer gives connections idle here longer than [`IDLE_RETURN`]
//! back to it. A lease that found nothing kept waits for the pool and for a connection kept
//! here, whichever comes first, within the pool's `acquire_timeout`. Kept connections skip the
//! pool's `max_lifetime` and acquire/release hooks while they circulate here.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgPool, Postgres};
use tokio::sync::{Notify, Semaphore, SemaphorePermit};

use crate::error::is_connection_lost;

/// Connections unused this long go back to the pool.
pub(crate) const IDLE_RETURN: Duration = Duration::from_millis(500);

pub(crate) struct Connections {
    pool: PgPool,
    /// Most recently used last.
    idle: Mutex<Vec<(PoolConnection<Postgres>, Instant)>>,
    /// A lease holds one permit. Fewer permits than the pool has connections, so that a
    /// caller waiting in the pool itself is not starved by connections kept here.
    permits: Semaphore,
    /// Signalled when a connection is kept, for a lease waiting in the pool.
    kept: Notify,
    /// Set at shutdown, under the `idle` lock: from then on connections go straight back to
    /// the pool.
    closing: AtomicBool,
}

/// A connection in use; [`Lease::keep_if`] it after a statement, or drop it.
pub(crate) struct Lease<'a> {
    conn: Option<PoolConnection<Postgres>>,
    owner: &'a Connections,
    _permit: SemaphorePermit<'a>,
}

impl Connections {
    pub(crate) fn new(pool: PgPool) -> Connections {
        let max = pool.options().get_max_connections() as usize;
        // Leave a fifth of the pool (at least one connection) to others, if it has two.
        let limit = max.saturating_sub(max.div_ceil(5)).max(1);
        Connections {
            permits: Semaphore::new(limit),
            idle: Mutex::new(Vec::new()),
            kept: Notify::new(),
            closing: AtomicBool::new(false),
            pool,
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<(PoolConnection<Postgres>, Instant)>> {
        // A Vec of owned connections cannot be left half-updated.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used kept connection, or else one from the pool. Fails with
    /// `PoolTimedOut` after the pool's `acquire_timeout`, like the pool itself.
    pub(crate) async fn acquire(&self) -> Result<Lease<'_>, sqlx::Error> {
        let limit = self.pool.options().get_acquire_timeout();
        tokio::time::timeout(limit, self.lease())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)?
    }

    async fn lease(&self) -> Result<Lease<'_>, sqlx::Error> {
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        let conn = loop {
            if let Some((conn, _)) = self.idle().pop() {
                break conn;
            }
            // The pool may be empty because the application holds the rest while it waits for
            // us: then only a connection kept here can free this lease.
            tokio::select! {
                conn = self.pool.acquire() => break conn?,
                () = self.kept.notified() => {}
            }
        };
        Ok(Lease {
            conn: Some(conn),
            owner: self,
            _permit: permit,
        })
    }

    /// Give connections idle longer than [`IDLE_RETURN`] (or all, with `all`) back to the
    /// pool. Never waits.
    pub(crate) fn return_idle(&self, all: bool) {
        let stale: Vec<_> = {
            let mut idle = self.idle();
            let keep_from = if all {
                idle.len()
            } else {
                idle.partition_point(|(_, since)| since.elapsed() >= IDLE_RETURN)
            };
            idle.drain(..keep_from).collect()
        };
        // Dropping returns them to the pool (sqlx pings them on the way).
        drop(stale);
    }

    /// Stop keeping connections and give back the kept ones (shutdown).
    pub(crate) fn close(&self) {
        let kept = {
            let mut idle = self.idle();
            // Under the lock, so that no lease keeps its connection after this.
            self.closing.store(true, Ordering::Relaxed);
            std::mem::take(&mut *idle)
        };
        drop(kept);
    }
}

impl Lease<'_> {
    /// Keep the connection for the next statement if `result` shows the statement completed
    /// (successfully, or with an error about the statement itself); otherwise let it go back
    /// to the pool, which checks it.
    pub(crate) fn keep_if<T>(mut self, result: &Result<T, sqlx::Error>) {
        match result {
            Ok(_) => {}
            // Shutdown or termination notices arrive as database errors too.
            Err(e) if is_connection_lost(e) => {
                // The connection failed, not the statement: the database may have restarted,
                // and then every kept connection is dead too. Let the pool check them all.
                self.owner.return_idle(true);
                return;
            }
            Err(sqlx::Error::Database(_) | sqlx::Error::RowNotFound) => {}
            // Anything else may have left the connection mid-protocol: the pool checks it.
            Err(_) => return,
        }
        let mut idle = self.owner.idle();
        if self.owner.closing.load(Ordering::Relaxed) {
            return;
        }
        if let Some(conn) = self.conn.take() {
            idle.push((conn, Instant::now()));
            drop(idle);
            self.owner.kept.notify_one();
        }
    }
}

impl std::ops::Deref for Lease<'_> {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        self.conn
            .as_ref()
            .expect("lease holds a connection until dropped")
    }
}

impl std::ops::DerefMut for Lease<'_> {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.conn
            .as_mut()
            .expect("lease holds a connection until dropped")
    }
}
