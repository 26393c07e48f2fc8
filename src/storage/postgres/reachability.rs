//! Whether the database can be reached: so that while it cannot, calls fail at once with the
//! cause ("Connection refused") instead of each waiting out the pool's acquire timeout to
//! report `PoolTimedOut`, and recover by themselves as soon as it is back.
//!
//! Anything that suggests the server is gone (a connection lost under a statement, the
//! listener unable to connect, a call left waiting for a connection) asks for a probe: one
//! direct connection attempt (to each server of the URL in turn, as libpq tries them, until one
//! fits; a pool pgsession built moves to it), never more than one at a time, and while the server answers, at
//! most one a second. A probe refused (nothing listening, no route, a connection closed at
//! once, a server shutting down or starting up) marks the server down with that error; one
//! that merely times out marks nothing (a slow server is not a gone one, and calls keep their
//! own timeouts). While the server is down the probe tries again every 100 ms, backing off to
//! 250 ms, until one connects, which marks it up. A call meanwhile fails at once with the
//! cause, unless the last attempt is more than [`RECHECK_AFTER`] old: then it has an attempt
//! made now and waits for it (a refused connection takes well under a millisecond), so the
//! first call after the server's return goes through. Calls already waiting for a pool
//! connection give up when the server is marked down.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sqlx::Connection;
use sqlx::postgres::PgPool;

use super::hosts::Hosts;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;

/// The longest pause between probes while the server is down.
const MAX_PROBE_PAUSE: Duration = Duration::from_millis(250);

/// Shortest time between two probes while the server answers: suspicions come with load
/// (calls waiting for a busy pool), and each probe opens a connection.
const PROBE_AT_MOST_EVERY: Duration = Duration::from_secs(1);

/// While the server is down, a call finding the last attempt older than this has another made
/// (and waits for it) rather than fail on the old verdict.
const RECHECK_AFTER: Duration = Duration::from_millis(20);

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
    /// When the last attempt failed.
    checked: Instant,
    kind: io::ErrorKind,
    cause: Arc<str>,
}

/// The reachability of one database (the pool's), shared by its connections and tasks.
pub(crate) struct Reachability {
    /// The servers probed, the first that fits (see [`Hosts::connect`]) being "the" server.
    hosts: Arc<Hosts>,
    /// A pool pgsession built, moved to the server a probe finds when that is another one (a
    /// failover).
    pool: Option<PgPool>,
    connect_timeout: Duration,
    /// `None` while the server answers; every attempt while it does not sends a new value.
    down: watch::Sender<Option<Down>>,
    /// Whether `down` holds a value: the check every call makes, without a lock.
    is_down: AtomicBool,
    /// A probe task is running.
    probing: AtomicBool,
    /// A suspicion arrived since the running probe's last attempt began.
    pending: AtomicBool,
    /// Cuts the probe's pause short: a call wants an attempt now.
    hurry: Notify,
    /// When a probe last found the server answering.
    answered: std::sync::Mutex<Option<Instant>>,
    cancel: CancellationToken,
}

impl Reachability {
    /// Probes connect to `hosts` within `connect_timeout` each and move `pool` to the server
    /// they find; `cancel` stops them.
    pub(crate) fn new(
        hosts: Arc<Hosts>,
        pool: Option<PgPool>,
        connect_timeout: Duration,
        cancel: CancellationToken,
    ) -> Reachability {
        Reachability {
            hosts,
            pool,
            connect_timeout,
            down: watch::channel(None).0,
            is_down: AtomicBool::new(false),
            probing: AtomicBool::new(false),
            pending: AtomicBool::new(false),
            hurry: Notify::new(),
            answered: std::sync::Mutex::new(None),
            cancel,
        }
    }

    /// `Ok` while the server is not known to be down; otherwise an error saying why and since
    /// when, at once if the last attempt is recent, or after an attempt made now.
    pub(crate) async fn check(self: &Arc<Self>) -> Result<(), sqlx::Error> {
        if !self.is_down.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut rx = self.down.subscribe();
        match &*rx.borrow_and_update() {
            None => return Ok(()),
            Some(down) if down.checked.elapsed() < RECHECK_AFTER => return Err(down.error()),
            Some(_) => {}
        }
        self.pending.store(true, Ordering::Release);
        self.hurry.notify_one();
        self.start_probing();
        let limit = self.connect_timeout + Duration::from_millis(100);
        let _ = tokio::time::timeout(limit, rx.changed()).await;
        match &*rx.borrow() {
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
        let recently_answered = self
            .answered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|at| at.elapsed() < PROBE_AT_MOST_EVERY);
        if recently_answered && self.down.borrow().is_none() {
            return;
        }
        self.pending.store(true, Ordering::Release);
        self.start_probing();
    }

    /// Start the probe task unless it runs (or the manager stopped).
    fn start_probing(self: &Arc<Self>) {
        if self.cancel.is_cancelled() || self.probing.swap(true, Ordering::AcqRel) {
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
            let attempt = self.hosts.connect(self.connect_timeout);
            let failure = tokio::select! {
                _ = self.cancel.cancelled() => return,
                outcome = attempt => match outcome {
                    Ok((conn, moved)) => {
                        let _ = conn.close().await;
                        if moved && let Some(pool) = &self.pool {
                            tracing::warn!(server = ?self.hosts.current().get_host(), "pgsession: connections move to another server");
                            pool.set_connect_options(self.hosts.current());
                        }
                        None
                    }
                    Err(e) => unreachable_cause(&e),
                }
            };
            let Some((kind, cause)) = failure else {
                *self.answered.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                self.is_down.store(false, Ordering::Release);
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
                    checked: Instant::now(),
                    kind,
                    cause: cause.as_str().into(),
                });
            });
            self.is_down.store(true, Ordering::Release);
            if newly {
                tracing::warn!(%cause, "pgsession: the database cannot be reached; calls fail at once until it can");
            }
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_pause()) => {}
                _ = self.hurry.notified() => {}
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
