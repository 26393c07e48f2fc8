//! Whether the database can be reached: so that while it cannot, calls fail at once with the
//! cause ("Connection refused") instead of each waiting out the pool's acquire timeout to
//! report `PoolTimedOut`, and recover by themselves when it is back.
//!
//! Anything that suggests the server is gone (a connection lost under a statement, the
//! listener unable to connect, a call left waiting for a connection) asks for a probe: one
//! direct connection attempt, never more than one at a time, and while the server answers, at
//! most one a second. A probe refused (nothing listening, no route, a server shutting down or
//! starting up) marks the server down with that error, and probes again (every 100 ms, backing
//! off to 250 ms) until one connects, which marks it up again. A probe that merely times out
//! marks nothing: a slow server is not a gone one, and calls keep their own timeouts. Calls
//! check the mark before they take a connection, and calls already waiting for one give up
//! when the server is marked down.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;

/// The longest pause between probes while the server is down: recovery is noticed within it
/// (a refused attempt costs the server nothing, so probing often is cheap).
const MAX_PROBE_PAUSE: Duration = Duration::from_millis(250);

/// Why the server is considered unreachable; carried as the source of the `io::Error` that
/// calls fail with meanwhile.
#[derive(Debug)]
pub(crate) struct Unreachable {
    since: Instant,
    cause: String,
}

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the database cannot be reached (for {:.1} s): {}",
            self.since.elapsed().as_secs_f64(),
            self.cause
        )
    }
}

impl std::error::Error for Unreachable {}

#[derive(Clone, Debug)]
struct Down {
    since: Instant,
    kind: io::ErrorKind,
    cause: Arc<str>,
}

/// Shortest time between two probes while the server answers: suspicions come with load
/// (calls waiting for a busy pool), and each probe opens a connection.
const PROBE_AT_MOST_EVERY: Duration = Duration::from_secs(1);

/// The reachability of one database (the pool's), shared by its connections and tasks.
pub(crate) struct Reachability {
    options: PgConnectOptions,
    connect_timeout: Duration,
    down: watch::Sender<Option<Down>>,
    /// A probe task is running.
    probing: AtomicBool,
    /// A suspicion arrived since the running probe's last attempt began.
    pending: AtomicBool,
    /// When a probe last found the server answering.
    answered: std::sync::Mutex<Option<Instant>>,
    cancel: CancellationToken,
}

impl Reachability {
    /// Probes connect with `options` within `connect_timeout`; `cancel` stops them.
    pub(crate) fn new(
        options: PgConnectOptions,
        connect_timeout: Duration,
        cancel: CancellationToken,
    ) -> Reachability {
        Reachability {
            options,
            connect_timeout,
            down: watch::channel(None).0,
            probing: AtomicBool::new(false),
            pending: AtomicBool::new(false),
            answered: std::sync::Mutex::new(None),
            cancel,
        }
    }

    /// `Err` at once while the server is marked down: the error says why and since when.
    pub(crate) fn check(&self) -> Result<(), sqlx::Error> {
        match &*self.down.borrow() {
            None => Ok(()),
            Some(down) => Err(down.error()),
        }
    }

    /// Resolves with the error calls fail with once the server is marked down.
    pub(crate) async fn went_down(&self) -> sqlx::Error {
        let mut rx = self.down.subscribe();
        let down = rx
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|down| down.as_ref().map(Down::error));
        match down {
            Some(error) => error,
            // The sender lives in `self`, so the wait cannot end otherwise.
            None => std::future::pending().await,
        }
    }

    /// Something suggests the server may be gone: probe it, unless a probe is under way (it
    /// then tries once more) or one found it answering less than a second ago.
    pub(crate) fn suspect(self: &Arc<Self>) {
        if self.cancel.is_cancelled() {
            return;
        }
        let recently_answered = self
            .answered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|at| at.elapsed() < PROBE_AT_MOST_EVERY);
        if recently_answered && self.down.borrow().is_none() {
            return;
        }
        self.pending.store(true, Ordering::Release);
        if self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                this.probe().await;
                this.probing.store(false, Ordering::Release);
                // A suspicion that arrived during the last attempt gets an attempt of its own,
                // unless another task took over the probing meanwhile.
                if !this.pending.load(Ordering::Acquire)
                    || this.cancel.is_cancelled()
                    || this.probing.swap(true, Ordering::AcqRel)
                {
                    return;
                }
            }
        });
    }

    /// Connect until a connection succeeds or the server proves slow rather than gone (or
    /// `cancel`), marking the server down while it refuses.
    async fn probe(&self) {
        let mut backoff = Backoff::new(0, Duration::from_millis(100), MAX_PROBE_PAUSE);
        loop {
            self.pending.store(false, Ordering::Release);
            let attempt = tokio::time::timeout(
                self.connect_timeout,
                PgConnection::connect_with(&self.options),
            );
            let failure = tokio::select! {
                _ = self.cancel.cancelled() => return,
                outcome = attempt => match outcome {
                    Ok(Ok(conn)) => {
                        let _ = conn.close().await;
                        None
                    }
                    Ok(Err(e)) => unreachable_cause(&e),
                    // Slow, not gone: the calls' own timeouts apply.
                    Err(_) => None,
                }
            };
            let Some((kind, cause)) = failure else {
                *self.answered.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                if self.down.send_replace(None).is_some() {
                    tracing::warn!("pgsession: the database can be reached again");
                }
                return;
            };
            let newly = self.down.borrow().is_none();
            self.down.send_modify(|down| {
                let since = down.as_ref().map_or_else(Instant::now, |d| d.since);
                *down = Some(Down {
                    since,
                    kind,
                    cause: cause.as_str().into(),
                });
            });
            if newly {
                tracing::warn!(%cause, "pgsession: the database cannot be reached; calls fail at once until it can");
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_pause()) => {}
            }
        }
    }
}

impl Down {
    fn error(&self) -> sqlx::Error {
        sqlx::Error::Io(io::Error::new(
            self.kind,
            Unreachable {
                since: self.since,
                cause: self.cause.to_string(),
            },
        ))
    }
}

/// The kind and text of a connection error that means the server cannot be reached (nothing
/// listening, no route, a connection closed at once, a server shutting down or starting up);
/// `None` for one that proves a server answered (a wrong password is not an outage) or only
/// that it is slow.
fn unreachable_cause(e: &sqlx::Error) -> Option<(io::ErrorKind, String)> {
    match e {
        sqlx::Error::Io(io) if io.kind() == io::ErrorKind::TimedOut => None,
        sqlx::Error::Io(io) => Some((io.kind(), io.to_string())),
        sqlx::Error::Tls(_) => None,
        sqlx::Error::Database(db)
            if db
                .code()
                .is_some_and(|c| matches!(c.as_ref(), "57P01" | "57P02" | "57P03")) =>
        {
            Some((io::ErrorKind::ConnectionRefused, db.message().to_owned()))
        }
        _ => None,
    }
}

/// Whether `e` is the error of a call refused because the server is marked down (nothing was
/// sent, so nothing can have been written).
pub(crate) fn is_unreachable(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Io(io) if io.get_ref().is_some_and(|inner| inner.is::<Unreachable>()))
}
