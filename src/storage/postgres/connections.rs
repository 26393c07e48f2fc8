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
//! else uses the pool, and connections idle here longer than [`IDLE_RETURN`] go back to it.
//!
//! A lease that finds nothing kept queues up (oldest first) and asks the pool for one more
//! connection *in a task of its own*; it takes whichever comes first, a connection another
//! lease gives back or the pool's. The pool's request is never abandoned: sqlx opens new
//! connections inside `acquire`, so dropping an `acquire` that lost such a race would close
//! a half-open connection every time, and a pool below its size would never grow (each
//! abandoned attempt costs the server a backend start and exit; at a few hundred a second
//! that starved the whole machine). A connection that arrives after its lease was served is
//! kept for the next one.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgPool, Postgres};
use tokio::sync::{Semaphore, SemaphorePermit, oneshot};
use tokio::time::Instant;

use super::reachability::Reachability;
use crate::error::is_connection_lost;

/// Connections unused this long go back to the pool.
pub(crate) const IDLE_RETURN: Duration = Duration::from_millis(500);

/// A lease waiting this long for a connection has the server probed (see
/// [`super::reachability`]): a server that is gone then fails the wait at once.
const SUSPECT_AFTER: Duration = Duration::from_millis(100);

/// Where connections come from: the pool, or a fake in tests.
pub(crate) trait Source: Clone + Send + Sync + 'static {
    type Conn: Send + 'static;
    /// A connection, waiting at most [`Source::acquire_timeout`].
    fn acquire(&self) -> impl Future<Output = Result<Self::Conn, sqlx::Error>> + Send;
    fn max_connections(&self) -> usize;
    fn acquire_timeout(&self) -> Duration;
}

impl Source for PgPool {
    type Conn = PoolConnection<Postgres>;

    fn acquire(&self) -> impl Future<Output = Result<Self::Conn, sqlx::Error>> + Send {
        PgPool::acquire(self)
    }

    fn max_connections(&self) -> usize {
        self.options().get_max_connections() as usize
    }

    fn acquire_timeout(&self) -> Duration {
        self.options().get_acquire_timeout()
    }
}

/// How many connections leases may hold at once out of a pool of `max`: a fifth (at least one
/// connection) is left to others, if the pool has two.
pub(crate) fn lease_limit(max: usize) -> usize {
    max.saturating_sub(max.div_ceil(5)).max(1)
}

pub(crate) struct Connections<S: Source = PgPool> {
    shared: Arc<Shared<S>>,
    /// Whether the server can be reached, if known (not for the fake pool of the tests).
    reach: Option<Arc<Reachability>>,
}

struct Shared<S: Source> {
    source: S,
    kept: Mutex<Kept<S::Conn>>,
    /// A lease holds one permit. Fewer permits than the pool has connections, so that a
    /// caller waiting in the pool itself is not starved by connections kept here.
    permits: Semaphore,
}

type Handoff<C> = oneshot::Sender<Result<C, sqlx::Error>>;

struct Kept<C> {
    /// Most recently used last. Empty whenever a lease is waiting.
    conns: Vec<(C, Instant)>,
    /// Leases that found nothing kept, oldest first; a connection being kept goes to the
    /// first of them still waiting rather than onto the stack.
    waiters: VecDeque<Handoff<C>>,
    /// Requests to the pool under way on behalf of waiting leases.
    growing: usize,
    /// Set at shutdown: from then on connections go straight back to the pool.
    closing: bool,
}

/// A connection in use; [`Lease::keep_if`] it after a statement, or drop it.
pub(crate) struct Lease<'a, S: Source = PgPool> {
    conn: Option<S::Conn>,
    owner: &'a Connections<S>,
    _permit: SemaphorePermit<'a>,
}

impl<S: Source> Shared<S> {
    fn kept(&self) -> std::sync::MutexGuard<'_, Kept<S::Conn>> {
        // Owned connections and senders cannot be left half-updated.
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hand `conn` to the oldest waiting lease, or else keep it for the next one.
    fn keep(&self, conn: S::Conn) {
        let mut kept = self.kept();
        if kept.closing {
            drop(kept);
            // Dropped outside the lock: back to the pool.
            drop(conn);
            return;
        }
        let mut conn = conn;
        while let Some(waiter) = kept.waiters.pop_front() {
            match waiter.send(Ok(conn)) {
                Ok(()) => return,
                // That lease gave up (its caller was cancelled or timed out).
                Err(back) => conn = back.unwrap_or_else(|_| unreachable!("we sent Ok")),
            }
        }
        kept.conns.push((conn, Instant::now()));
    }

    /// Ask the source for one more connection on behalf of the waiting leases.
    async fn grow(self: Arc<Self>) {
        loop {
            let result = self.source.acquire().await;
            let mut kept = self.kept();
            match result {
                Ok(conn) => {
                    kept.growing -= 1;
                    drop(kept);
                    self.keep(conn);
                    return;
                }
                // The pool is busy: each waiting lease has its own deadline and may still be
                // served by a connection freed here, so none fails for this; ask again while
                // leases are waiting that no other request serves.
                Err(sqlx::Error::PoolTimedOut) => {
                    kept.waiters.retain(|w| !w.is_closed());
                    if kept.closing || kept.growing > kept.waiters.len() {
                        kept.growing -= 1;
                        return;
                    }
                }
                // A real failure (authentication, say): the oldest waiter fails with it as it
                // would have in the pool; the others have requests of their own.
                Err(e) => {
                    kept.growing -= 1;
                    let mut e = e;
                    while let Some(waiter) = kept.waiters.pop_front() {
                        match waiter.send(Err(e)) {
                            Ok(()) => return,
                            Err(back) => match back {
                                Err(back) => e = back,
                                Ok(_) => unreachable!("we sent Err"),
                            },
                        }
                    }
                    return;
                }
            }
        }
    }
}

impl<S: Source> Connections<S> {
    pub(crate) fn new(source: S) -> Connections<S> {
        let limit = lease_limit(source.max_connections());
        Connections {
            shared: Arc::new(Shared {
                permits: Semaphore::new(limit),
                kept: Mutex::new(Kept {
                    conns: Vec::new(),
                    waiters: VecDeque::new(),
                    growing: 0,
                    closing: false,
                }),
                source,
            }),
            reach: None,
        }
    }

    /// Fail at once while `reach` knows the server cannot be reached, and have it probed when
    /// a connection is lost or a lease waits.
    pub(crate) fn with_reachability(mut self, reach: Arc<Reachability>) -> Connections<S> {
        self.reach = Some(reach);
        self
    }

    /// Have the server probed: something suggests it is gone.
    pub(crate) fn suspect(&self) {
        if let Some(reach) = &self.reach {
            reach.suspect();
        }
    }

    /// The most recently used kept connection, or else the first available one. Fails with
    /// `PoolTimedOut` after the pool's `acquire_timeout`, like the pool itself.
    pub(crate) async fn acquire(&self) -> Result<Lease<'_, S>, sqlx::Error> {
        if let Some(reach) = &self.reach {
            reach.check().await?;
        }
        let limit = self.shared.source.acquire_timeout();
        tokio::time::timeout(limit, self.lease())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)?
    }

    /// Wait for `handed`, giving up when the server is marked down (having it probed if the
    /// wait lasts).
    async fn wait_for(
        &self,
        handed: oneshot::Receiver<Result<S::Conn, sqlx::Error>>,
    ) -> Result<Result<S::Conn, sqlx::Error>, oneshot::error::RecvError> {
        let Some(reach) = &self.reach else {
            return handed.await;
        };
        tokio::pin!(handed);
        let mut suspected = false;
        loop {
            tokio::select! {
                conn = &mut handed => return conn,
                down = reach.went_down() => return Ok(Err(down)),
                _ = tokio::time::sleep(SUSPECT_AFTER), if !suspected => {
                    suspected = true;
                    reach.suspect();
                }
            }
        }
    }

    async fn lease(&self) -> Result<Lease<'_, S>, sqlx::Error> {
        let permit = self
            .shared
            .permits
            .acquire()
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        let lease = |conn| Lease {
            conn: Some(conn),
            owner: self,
            _permit: permit,
        };
        let handed = {
            let mut kept = self.shared.kept();
            if let Some((conn, _)) = kept.conns.pop() {
                return Ok(lease(conn));
            }
            if kept.closing {
                None
            } else {
                let (tx, rx) = oneshot::channel();
                kept.waiters.retain(|w| !w.is_closed());
                kept.waiters.push_back(tx);
                if kept.growing < kept.waiters.len() {
                    kept.growing += 1;
                    tokio::spawn(self.shared.clone().grow());
                }
                Some(rx)
            }
        };
        match handed {
            Some(rx) => match self.wait_for(rx).await {
                Ok(Ok(conn)) => Ok(lease(conn)),
                Ok(Err(e)) => Err(e),
                // Shutdown dropped the queue: the pool alone serves from then on.
                Err(_) => Ok(lease(self.shared.source.acquire().await?)),
            },
            None => Ok(lease(self.shared.source.acquire().await?)),
        }
    }

    /// Give connections idle longer than [`IDLE_RETURN`] (or all, with `all`) back to the
    /// pool. Never waits.
    pub(crate) fn return_idle(&self, all: bool) {
        let stale: Vec<_> = {
            let mut kept = self.shared.kept();
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
            let mut kept = self.shared.kept();
            kept.closing = true;
            (
                std::mem::take(&mut kept.conns),
                std::mem::take(&mut kept.waiters),
            )
        };
        drop((conns, waiters));
    }

    /// Connections kept now (for tests).
    #[cfg(test)]
    fn kept_len(&self) -> usize {
        self.shared.kept().conns.len()
    }
}

impl<S: Source> Lease<'_, S> {
    /// Keep the connection for the next statement if `result` shows the statement completed
    /// (successfully, or with an error about the statement itself); otherwise let it go back
    /// to the pool, which checks it.
    pub(crate) fn keep_if<T>(mut self, result: &Result<T, sqlx::Error>) {
        match result {
            Ok(_) => {}
            // Shutdown or termination notices arrive as database errors too.
            Err(e) if is_connection_lost(e) || crate::error::is_wrong_server(e) => {
                // The connection failed (or is on a server that no longer takes writes), not the
                // statement: the database may have restarted or failed over, and then every
                // kept connection is dead or misplaced too. Let the pool check them all, and
                // find out where the server is.
                self.owner.return_idle(true);
                self.owner.suspect();
                return;
            }
            Err(sqlx::Error::Database(_) | sqlx::Error::RowNotFound) => {}
            // Anything else may have left the connection mid-protocol: the pool checks it.
            Err(_) => return,
        }
        if let Some(conn) = self.conn.take() {
            self.owner.shared.keep(conn);
        }
    }
}

impl<S: Source> std::ops::Deref for Lease<'_, S> {
    type Target = S::Conn;
    fn deref(&self) -> &S::Conn {
        self.conn
            .as_ref()
            .expect("lease holds a connection until dropped")
    }
}

impl<S: Source> std::ops::DerefMut for Lease<'_, S> {
    fn deref_mut(&mut self) -> &mut S::Conn {
        self.conn
            .as_mut()
            .expect("lease holds a connection until dropped")
    }
}

#[cfg(test)]
mod tests {
    //! The kept-connection logic against a fake pool whose connections are numbers and whose
    //! `acquire` waits until the test supplies a connection.

    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// A connection of the fake pool; counts how many were given back (dropped).
    struct FakeConn {
        n: usize,
        returned: Arc<AtomicUsize>,
    }

    impl Drop for FakeConn {
        fn drop(&mut self) {
            self.returned.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[derive(Clone)]
    struct FakePool {
        max: usize,
        /// Permits for `acquire` to hand out a connection; the test adds them.
        supply: Arc<Semaphore>,
        next: Arc<AtomicUsize>,
        acquires: Arc<AtomicUsize>,
        returned: Arc<AtomicUsize>,
        /// The next this many acquires time out at once, as a busy pool's would.
        time_out: Arc<AtomicUsize>,
    }

    impl FakePool {
        fn new(max: usize) -> FakePool {
            FakePool {
                max,
                supply: Arc::new(Semaphore::new(0)),
                next: Arc::new(AtomicUsize::new(1)),
                acquires: Arc::new(AtomicUsize::new(0)),
                returned: Arc::new(AtomicUsize::new(0)),
                time_out: Arc::new(AtomicUsize::new(0)),
            }
        }
    }

    impl Source for FakePool {
        type Conn = FakeConn;

        fn acquire(&self) -> impl Future<Output = Result<FakeConn, sqlx::Error>> + Send {
            let this = self.clone();
            async move {
                this.acquires.fetch_add(1, Ordering::SeqCst);
                let timing_out =
                    this.time_out
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
                if timing_out.is_ok() {
                    return Err(sqlx::Error::PoolTimedOut);
                }
                this.supply
                    .acquire()
                    .await
                    .map_err(|_| sqlx::Error::PoolClosed)?
                    .forget();
                Ok(FakeConn {
                    n: this.next.fetch_add(1, Ordering::SeqCst),
                    returned: this.returned.clone(),
                })
            }
        }

        fn max_connections(&self) -> usize {
            self.max
        }

        fn acquire_timeout(&self) -> Duration {
            Duration::from_secs(5)
        }
    }

    /// Let spawned tasks run until they wait again.
    async fn settle() {
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
    }

    fn waiters(c: &Connections<FakePool>) -> usize {
        c.shared.kept().waiters.len()
    }

    #[test]
    fn leaves_a_fifth_of_the_pool_to_others() {
        assert_eq!(lease_limit(1), 1);
        assert_eq!(lease_limit(2), 1);
        assert_eq!(lease_limit(5), 4);
        assert_eq!(lease_limit(10), 8);
        assert_eq!(lease_limit(11), 8);
    }

    #[tokio::test(start_paused = true)]
    async fn a_returned_connection_goes_to_the_oldest_waiting_lease() {
        let pool = FakePool::new(10);
        let conns = Arc::new(Connections::new(pool.clone()));
        pool.supply.add_permits(1);
        let first = conns.acquire().await.unwrap();
        assert_eq!(first.n, 1);

        let served = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for lease_no in 0..3 {
            let (conns, served) = (conns.clone(), served.clone());
            tasks.push(tokio::spawn(async move {
                let lease = conns.acquire().await.unwrap();
                served.lock().unwrap().push((lease_no, lease.n));
                lease.keep_if(&Ok::<(), sqlx::Error>(()));
            }));
            // Queue them in a known order.
            settle().await;
        }
        assert_eq!(waiters(&conns), 3);
        first.keep_if(&Ok::<(), sqlx::Error>(()));
        for t in tasks {
            t.await.unwrap();
        }
        // One connection went from lease to lease, oldest waiter first.
        assert_eq!(*served.lock().unwrap(), vec![(0, 1), (1, 1), (2, 1)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pool_connection_that_arrives_after_its_lease_was_served_is_kept_not_closed() {
        let pool = FakePool::new(10);
        let conns = Arc::new(Connections::new(pool.clone()));
        pool.supply.add_permits(1);
        let first = conns.acquire().await.unwrap();
        let waiting = {
            let conns = conns.clone();
            tokio::spawn(async move {
                let lease = conns.acquire().await.unwrap();
                let n = lease.n;
                lease.keep_if(&Ok::<(), sqlx::Error>(()));
                n
            })
        };
        settle().await;
        // The waiter asked the pool for a connection of its own...
        assert_eq!(pool.acquires.load(Ordering::SeqCst), 2);
        // ...but is served by the first lease's connection.
        first.keep_if(&Ok::<(), sqlx::Error>(()));
        assert_eq!(waiting.await.unwrap(), 1);
        // The pool's connection arrives late: kept for the next lease, not thrown away.
        pool.supply.add_permits(1);
        settle().await;
        assert_eq!(pool.returned.load(Ordering::SeqCst), 0);
        assert_eq!(conns.kept_len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn leases_never_hold_more_than_four_fifths_of_the_pool() {
        let pool = FakePool::new(5);
        let conns = Arc::new(Connections::new(pool.clone()));
        pool.supply.add_permits(5);
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(conns.acquire().await.unwrap());
        }
        let fifth = {
            let conns = conns.clone();
            tokio::spawn(async move { conns.acquire().await.map(|l| l.n) })
        };
        settle().await;
        assert!(!fifth.is_finished(), "a fifth lease waits for a permit");
        // The pool still has a connection for the application.
        assert_eq!(pool.supply.available_permits(), 1);
        held.pop().unwrap().keep_if(&Ok::<(), sqlx::Error>(()));
        assert!(fifth.await.unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_waiter_is_skipped() {
        let pool = FakePool::new(10);
        let conns = Arc::new(Connections::new(pool.clone()));
        pool.supply.add_permits(1);
        let first = conns.acquire().await.unwrap();
        let cancelled = {
            let conns = conns.clone();
            tokio::spawn(async move { conns.acquire().await.map(|l| l.n) })
        };
        settle().await;
        let patient = {
            let conns = conns.clone();
            tokio::spawn(async move { conns.acquire().await.map(|l| l.n) })
        };
        settle().await;
        cancelled.abort();
        settle().await;
        first.keep_if(&Ok::<(), sqlx::Error>(()));
        assert_eq!(patient.await.unwrap().unwrap(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_statement_sends_every_kept_connection_back_to_the_pool() {
        let pool = FakePool::new(10);
        let conns = Connections::new(pool.clone());
        pool.supply.add_permits(3);
        let (a, b, c) = (
            conns.acquire().await.unwrap(),
            conns.acquire().await.unwrap(),
            conns.acquire().await.unwrap(),
        );
        a.keep_if(&Ok::<(), sqlx::Error>(()));
        b.keep_if(&Ok::<(), sqlx::Error>(()));
        assert_eq!(conns.kept_len(), 2);
        let lost = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        c.keep_if(&Err::<(), _>(lost));
        assert_eq!(conns.kept_len(), 0);
        assert_eq!(pool.returned.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn connections_idle_longer_than_the_limit_go_back_to_the_pool() {
        let pool = FakePool::new(10);
        let conns = Connections::new(pool.clone());
        pool.supply.add_permits(2);
        let a = conns.acquire().await.unwrap();
        let b = conns.acquire().await.unwrap();
        a.keep_if(&Ok::<(), sqlx::Error>(()));
        tokio::time::advance(IDLE_RETURN).await;
        b.keep_if(&Ok::<(), sqlx::Error>(()));
        conns.return_idle(false);
        assert_eq!(
            conns.kept_len(),
            1,
            "only the connection idle for IDLE_RETURN left"
        );
        assert_eq!(pool.returned.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn after_close_leases_go_to_the_pool_and_nothing_is_kept() {
        let pool = FakePool::new(10);
        let conns = Arc::new(Connections::new(pool.clone()));
        pool.supply.add_permits(1);
        let first = conns.acquire().await.unwrap();
        let waiting = {
            let conns = conns.clone();
            tokio::spawn(async move { conns.acquire().await.map(|l| l.n) })
        };
        settle().await;
        conns.close();
        first.keep_if(&Ok::<(), sqlx::Error>(()));
        assert_eq!(conns.kept_len(), 0);
        // The waiter is served by the pool (its own request, or one after the close).
        pool.supply.add_permits(2);
        assert!(waiting.await.unwrap().is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_busy_pool_does_not_fail_a_lease_that_another_lease_can_serve() {
        let pool = FakePool::new(10);
        let conns = Arc::new(Connections::new(pool.clone()));
        pool.supply.add_permits(1);
        let first = conns.acquire().await.unwrap();
        pool.time_out.store(3, Ordering::SeqCst);
        let waiting = {
            let conns = conns.clone();
            tokio::spawn(async move { conns.acquire().await.map(|l| l.n) })
        };
        settle().await;
        // The pool timed out three times, and is being asked again.
        assert_eq!(pool.acquires.load(Ordering::SeqCst), 5);
        assert!(!waiting.is_finished());
        first.keep_if(&Ok::<(), sqlx::Error>(()));
        assert_eq!(waiting.await.unwrap().unwrap(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_pool_failure_fails_the_oldest_waiter() {
        let pool = FakePool::new(10);
        let conns = Connections::new(pool.clone());
        pool.supply.close();
        assert!(matches!(
            conns.acquire().await,
            Err(sqlx::Error::PoolClosed)
        ));
    }
}
