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
//! back to it. A lease that finds nothing kept waits for the pool and, in turn with the other
//! leases waiting (oldest first), for a connection kept here, whichever comes first, within
//! the pool's `acquire_timeout`. Kept connections skip the pool's `max_lifetime` and
//! acquire/release hooks while they circulate here.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgPool, Postgres};
use tokio::sync::{Semaphore, SemaphorePermit, oneshot};

use crate::error::is_connection_lost;

/// Connections unused this long go back to the pool.
pub(crate) const IDLE_RETURN: Duration = Duration::from_millis(500);

pub(crate) struct Connections {
    pool: PgPool,
    kept: Mutex<Kept>,
    /// A lease holds one permit. Fewer permits than the pool has connections, so that a
    /// caller waiting in the pool itself is not starved by connections kept here.
    permits: Semaphore,
}

struct Kept {
    /// Most recently used last. Empty whenever a lease is waiting.
    conns: Vec<(PoolConnection<Postgres>, Instant)>,
    /// Leases that found nothing kept, oldest first; a connection being kept goes to the
    /// first of them still waiting rather than onto the stack.
    waiters: VecDeque<oneshot::Sender<PoolConnection<Postgres>>>,
    /// Set at shutdown: from then on connections go straight back to the pool.
    closing: bool,
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
            kept: Mutex::new(Kept {
                conns: Vec::new(),
                waiters: VecDeque::new(),
                closing: false,
            }),
            pool,
        }
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        // Owned connections and senders cannot be left half-updated.
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
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
        let lease = |conn| Lease {
            conn: Some(conn),
            owner: self,
            _permit: permit,
        };
        let mut handed = {
            let mut kept = self.kept();
            if let Some((conn, _)) = kept.conns.pop() {
                return Ok(lease(conn));
            }
            let (tx, rx) = oneshot::channel();
            kept.waiters.retain(|w| !w.is_closed());
            kept.waiters.push_back(tx);
            rx
        };
        // The pool may be empty because the application holds the rest while it waits for
        // pgsession: then only a connection kept here can serve this lease.
        tokio::select! {
            // An error means shutdown dropped the queue: the pool alone serves from then on.
            Ok(conn) = &mut handed => Ok(lease(conn)),
            pooled = self.pool.acquire() => {
                // One may have been handed over at the same moment: pass it on.
                handed.close();
                if let Ok(extra) = handed.try_recv() {
                    self.keep(extra);
                }
                Ok(lease(pooled?))
            }
        }
    }

    /// Hand `conn` to the oldest waiting lease, or else keep it for the next one.
    fn keep(&self, mut conn: PoolConnection<Postgres>) {
        let mut kept = self.kept();
        if kept.closing {
            // Dropped after the lock is released: back to the pool.
            return;
        }
        while let Some(waiter) = kept.waiters.pop_front() {
            match waiter.send(conn) {
                Ok(()) => return,
                // That lease gave up (its caller was cancelled or timed out).
                Err(back) => conn = back,
            }
        }
        kept.conns.push((conn, Instant::now()));
    }

    /// Give connections idle longer than [`IDLE_RETURN`] (or all, with `all`) back to the
    /// pool. Never waits.
    pub(crate) fn return_idle(&self, all: bool) {
        let stale: Vec<_> = {
            let mut kept = self.kept();
            let keep_from = if all {
                kept.conns.len()
            } else {
                kept.conns
                    .partition_point(|(_, since)| since.elapsed() >= IDLE_RETURN)
            };
            kept.conns.drain(..keep_from).collect()
        };
        // Dropping returns them to the pool (sqlx pings them on the way).
        drop(stale);
    }

    /// Stop keeping connections and give back the kept ones (shutdown). Leases still waiting
    /// are left to the pool.
    pub(crate) fn close(&self) {
        let (conns, waiters) = {
            let mut kept = self.kept();
            kept.closing = true;
            (
                std::mem::take(&mut kept.conns),
                std::mem::take(&mut kept.waiters),
            )
        };
        drop((conns, waiters));
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
        if let Some(conn) = self.conn.take() {
            self.owner.keep(conn);
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
