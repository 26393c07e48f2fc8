//! The tasks that announce committed invalidations: the announcer, which sends what this node's
//! writes queued, and the sweep, which announces outbox rows nobody announced (their writer
//! stopped). Why an outbox and what bounds the delay: `docs/design.md`.
//!
//! The announcer sends on a connection of its own (no pool checkout, no ping on release), with
//! as few NOTIFYs as fit: while a statement is under way new invalidations queue up, so the
//! busier the node, the larger the batches. When that connection is lost it never waits for a
//! new one: the retry goes through the pool at once while a replacement is opened in the
//! background.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use sqlx::Connection;
use sqlx::postgres::PgConnection;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::coherence::outbox::{MAX_QUEUED, ORPHAN_GRACE, Outbox, RETIRE_EVERY, SWEEP_EVERY, pack};
use crate::error::{Error, Result};
use crate::storage::postgres::PgStorage as Store;
use crate::storage::postgres::hosts::Hosts;
use crate::storage::postgres::sql::SWEEP_BATCH;

/// Attempts made at once after a failure before backing off: a connection that died (a
/// terminated backend, a restarted server) fails at once, and so may the pool's idle
/// connections after it, so retrying at once costs nothing and delays nobody.
const IMMEDIATE_RETRIES: u32 = 16;

/// Shortest time between the starts of two announcements (see [`Announcer::run`]).
const COALESCE: Duration = Duration::from_millis(1);

/// What the announce task works on.
pub(crate) struct Announcer {
    pub outbox: Arc<Outbox>,
    pub store: Arc<Store>,
    /// Where its own connection goes: the server itself (a fitting one of several).
    pub hosts: Arc<Hosts>,
    /// Limit for one statement or connection attempt (`Config::listener_timeout`).
    pub timeout: Duration,
}

/// The announcer's connection and the announced rows awaiting deletion.
struct State {
    conn: Option<PgConnection>,
    /// A replacement for `conn` being opened in the background.
    connecting: Option<oneshot::Receiver<Option<PgConnection>>>,
    to_retire: Vec<i64>,
    last_retire: Instant,
    /// Invalidations carried by the last announcement.
    last_batch: usize,
}

impl Announcer {
    /// Announce queued invalidations as they come, until `cancel`; then announce what is left.
    pub(crate) async fn run(self, cancel: CancellationToken) -> Result<()> {
        let mut state = State {
            conn: None,
            connecting: None,
            to_retire: Vec::new(),
            last_retire: Instant::now(),
            last_batch: 0,
        };
        // Open the connection now rather than at the first write, whose announcement would
        // otherwise go through the pool.
        self.conn(&mut state);
        let mut backoff = Backoff::new(IMMEDIATE_RETRIES, Duration::from_millis(50), ORPHAN_GRACE);
        let mut last_sent = None;
        'running: loop {
            let retire_due = state.last_retire + RETIRE_EVERY;
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = self.outbox.wake.notified() => {}
                _ = tokio::time::sleep_until(retire_due.into()), if !state.to_retire.is_empty() => {}
            }
            // While writes come faster than they are announced (the last announcement carried
            // several), gather what arrives within COALESCE of it into one NOTIFY: each costs
            // every node a wake-up, and PostgreSQL serialises notifying commits (measured: 8
            // concurrent updaters went from 0.76x to 0.89x of the raw statement's throughput).
            // Otherwise a write is announced at once.
            if let Some(due) = last_sent.map(|t: tokio::time::Instant| t + COALESCE)
                && state.last_batch > 1
                && due > tokio::time::Instant::now()
            {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep_until(due) => {}
                }
            }
            last_sent = Some(tokio::time::Instant::now());
            // Other nodes serve the old state until this succeeds.
            backoff.reset();
            while let Err(e) = self.announce_queued(&mut state).await {
                self.outbox.failures.fetch_add(1, Ordering::Relaxed);
                let pause = backoff.next_pause();
                tracing::warn!(error = %e, retry_in = ?pause, "pgsession: announcing invalidations failed; will retry");
                tokio::select! {
                    _ = cancel.cancelled() => break 'running,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
            self.retire(&mut state, false).await;
        }
        // Best effort: what is not announced now is announced by another node's sweep.
        if let Err(e) = self.announce_queued(&mut state).await {
            tracing::warn!(error = %e, "pgsession: invalidations left to the other nodes' sweep");
        }
        self.retire(&mut state, true).await;
        if let Some(conn) = state.conn.take() {
            let _ = conn.close().await;
        }
        Ok(())
    }

    /// The own connection if it is up; otherwise `None` (the caller then uses a pooled
    /// connection) after making sure a replacement is being opened.
    fn conn<'a>(&self, state: &'a mut State) -> Option<&'a mut PgConnection> {
        if state.conn.is_none() {
            match state.connecting.as_mut().map(|rx| rx.try_recv()) {
                Some(Ok(conn)) => {
                    state.connecting = None;
                    state.conn = conn;
                }
                Some(Err(oneshot::error::TryRecvError::Empty)) => {}
                Some(Err(oneshot::error::TryRecvError::Closed)) | None => {
                    state.connecting = Some(reconnect(self.hosts.clone(), self.timeout));
                }
            }
        }
        state.conn.as_mut()
    }

    /// Sweep the outbox now if a write's outcome was unknown, then send everything queued,
    /// retiring announced rows whenever that is due (also while writes keep arriving). On
    /// failure the batch goes back to the queue (its rows remain for the sweep in any case)
    /// and the connection is dropped.
    async fn announce_queued(&self, state: &mut State) -> Result<()> {
        let outbox = &self.outbox;
        if outbox.sweep_now.swap(false, Ordering::AcqRel) {
            match self.limited(self.store.sweep_outbox(Duration::ZERO)).await {
                Ok(n) => {
                    outbox.announced.fetch_add(n, Ordering::Relaxed);
                }
                Err(e) => {
                    outbox.sweep_now.store(true, Ordering::Release);
                    return Err(e);
                }
            }
        }
        loop {
            self.retire(state, false).await;
            let batch = outbox.take_batch();
            if batch.is_empty() {
                return Ok(());
            }
            let messages = pack(batch.iter().map(|q| q.payload.as_str()));
            let conn = self.conn(state);
            if let Err(e) = self.limited(self.store.announce(conn, &messages)).await {
                state.conn = None;
                outbox.put_back(batch);
                return Err(e);
            }
            outbox
                .announced
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            outbox
                .messages
                .fetch_add(messages.len() as u64, Ordering::Relaxed);
            state.last_batch = batch.len();
            state.to_retire.extend(batch.iter().map(|q| q.seq));
        }
    }

    /// Delete announced rows if it is time (or `now_anyway`). A failure keeps them for the
    /// next attempt; if none succeeds within the sweep's grace, the sweep announces them once
    /// more, which is harmless.
    async fn retire(&self, state: &mut State, now_anyway: bool) {
        if state.to_retire.is_empty() || (!now_anyway && state.last_retire.elapsed() < RETIRE_EVERY)
        {
            return;
        }
        state.last_retire = Instant::now();
        let seqs = std::mem::take(&mut state.to_retire);
        let conn = self.conn(state);
        if self.limited(self.store.retire(conn, &seqs)).await.is_err() {
            state.conn = None;
            if seqs.len() < MAX_QUEUED {
                state.to_retire = seqs;
            }
            tracing::debug!("pgsession: retiring announced outbox rows failed; will retry");
        }
    }

    /// `statement` within the announcer's time limit.
    async fn limited<T>(&self, statement: impl Future<Output = Result<T>>) -> Result<T> {
        match tokio::time::timeout(self.timeout, statement).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout("announcing invalidations".into())),
        }
    }
}

/// Open a connection in the background; `None` arrives if that fails.
fn reconnect(hosts: Arc<Hosts>, limit: Duration) -> oneshot::Receiver<Option<PgConnection>> {
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let conn = match hosts.connect(limit).await {
            Ok((conn, _)) => Some(conn),
            Err(e) => {
                tracing::debug!(error = %e, "pgsession: announcer connection failed");
                None
            }
        };
        // Dropped (closed) if the announcer has stopped meanwhile.
        let _ = tx.send(conn);
    });
    rx
}

/// Announce outbox rows whose writer did not, every [`SWEEP_EVERY`], until `cancel`.
pub(crate) async fn sweep(
    outbox: Arc<Outbox>,
    store: Arc<Store>,
    cancel: CancellationToken,
) -> Result<()> {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(SWEEP_EVERY) => {}
        }
        // Batches of SWEEP_BATCH until the backlog is gone.
        loop {
            match store.sweep_outbox(ORPHAN_GRACE).await {
                Ok(0) => break,
                Ok(n) => {
                    outbox.announced.fetch_add(n, Ordering::Relaxed);
                    tracing::info!(
                        announced = n,
                        "pgsession: announced invalidations another node left behind"
                    );
                    if n < SWEEP_BATCH as u64 {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "pgsession: outbox sweep failed");
                    break;
                }
            }
        }
    }
}
