//! Reuse of pooled connections between the frequent statements, without sqlx's ping on
//! release.
//!
//! sqlx's pool sends a `Sync` round trip every time a connection goes back to it, to catch
//! connections left mid-protocol by a cancelled query. For a session store issuing one short
//! statement per operation that doubles the messages the database handles (measured here:
//! 25% fewer updates per second through the pool than on connections used directly).
//!
//! So a connection that has just completed a statement is kept in a small stack here instead
//! and handed to the next operation. Only completed statements are kept, so a connection whose
//! query was cancelled or failed at the connection level goes back to the pool the normal way,
//! ping and all. Connections idle here longer than [`IDLE_RETURN`] are given back to the pool at
//! the next outbox sweep (every 2 s), so under light load they are available to whoever else
//! uses it; under load they circulate
//! here and the pool's limits still hold (every connection here is checked out of it).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgPool, Postgres};
use tokio::sync::{Semaphore, SemaphorePermit};

/// Connections unused this long go back to the pool.
pub(crate) const IDLE_RETURN: Duration = Duration::from_secs(1);

pub(crate) struct Connections {
    pool: PgPool,
    /// Most recently used last.
    idle: Mutex<Vec<(PoolConnection<Postgres>, Instant)>>,
    /// One permit per connection the pool may open. A lease holds one, so that when nothing
    /// is idle here the pool has room (connections kept here count against its limit, and a
    /// caller waiting in the pool would not see one kept here come free).
    permits: Semaphore,
}

/// A connection in use; [`Lease::keep`] it after a completed statement, or drop it.
pub(crate) struct Lease<'a> {
    conn: Option<PoolConnection<Postgres>>,
    owner: &'a Connections,
    _permit: SemaphorePermit<'a>,
}

impl Connections {
    pub(crate) fn new(pool: PgPool) -> Connections {
        Connections {
            permits: Semaphore::new(pool.options().get_max_connections() as usize),
            idle: Mutex::new(Vec::new()),
            pool,
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<(PoolConnection<Postgres>, Instant)>> {
        // A Vec of owned connections cannot be left half-updated.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used idle connection, or else one from the pool.
    pub(crate) async fn acquire(&self) -> Result<Lease<'_>, sqlx::Error> {
        let permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        let kept = self.idle().pop().map(|(conn, _)| conn);
        let conn = match kept {
            Some(conn) => conn,
            None => self.pool.acquire().await?,
        };
        Ok(Lease {
            conn: Some(conn),
            owner: self,
            _permit: permit,
        })
    }

    /// Give connections idle longer than [`IDLE_RETURN`] (or all, with `all`) back to the
    /// pool.
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
}

impl Lease<'_> {
    /// Keep the connection for the next operation if `result` shows the statement completed
    /// (successfully or with an error from the database itself); otherwise let it go back to
    /// the pool, which checks it.
    pub(crate) fn keep_if<T>(mut self, result: &Result<T, sqlx::Error>) {
        let completed = match result {
            Ok(_) => true,
            Err(sqlx::Error::Database(_) | sqlx::Error::RowNotFound) => true,
            Err(_) => false,
        };
        if !completed {
            // The connection failed, not the statement: the database may have restarted, and
            // then every kept connection is dead too. Let the pool check them all.
            self.owner.return_idle(true);
            return;
        }
        if let Some(conn) = self.conn.take() {
            self.owner.idle().push((conn, Instant::now()));
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
