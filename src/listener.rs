//! The LISTEN connection that keeps this node's cache coherent with every other node.
//!
//! The task is a loop over three states:
//!
//! 1. **Degraded** (the initial state): the cache is distrusted, reads go to the database.
//!    Connect a dedicated connection and `LISTEN`; on failure wait (50 ms, doubling up to
//!    `listener_max_backoff`) and try again, for as long as the manager runs.
//! 2. **Resynchronising**: LISTEN is active, so every later commit will be announced. Read the
//!    database version of every cached session and evict those that changed or are gone while
//!    nobody was listening. Still distrusted; notifications wait in the socket meanwhile.
//!    A cache clear announced while nobody listened is caught by comparing the database's
//!    clear count with the last one seen.
//! 3. **Trusted**: apply notifications as they arrive. When none has arrived for
//!    `listener_probe_interval`, send a notification to ourselves through the connection and
//!    wait up to `listener_timeout` for it to come back: a silently dead (half-open) connection,
//!    or one behind a proxy that does not carry notifications, would otherwise go unnoticed.
//!    The same round trip is made right after LISTEN, before trusting anything. Any error, a
//!    closed connection, or a failed probe distrusts the cache at once and goes back to 1.
//!
//! A connection that dies right after being established does not reset the backoff, so a
//! flapping network is not hammered with reconnections and resynchronisations.
//!
//! sqlx's `PgListener` can reconnect by itself, but silently loses the notifications sent
//! meanwhile; this loop never lets it (`eager_reconnect(false)`, a new listener every time), so
//! every reconnection passes through resynchronisation.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::watch;
use tokio::time::timeout;
use uuid::Uuid;

use crate::manager::Inner;
use crate::notify::Message;
use crate::shutdown::Signal;

const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// A connection that stayed up this long resets the reconnection backoff.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// `cache_epoch` value before the first resynchronisation.
const EPOCH_UNKNOWN: i64 = i64::MIN;
/// Ids per resynchronisation query.
const RESYNC_CHUNK: usize = 10_000;

/// What the listener has seen, for `stats()` and for callers waiting on coherence.
pub(crate) struct ListenerState {
    pub invalidations: AtomicU64,
    pub reconnects: AtomicU64,
    pub resync_evictions: AtomicU64,
    /// Cache clears seen so far (see the module docs).
    cache_epoch: AtomicI64,
    /// Start time of the server last resynchronised with (see [`ListenerState::see_server`]).
    server_started: AtomicI64,
    trusted: watch::Sender<bool>,
    degraded: Mutex<Degraded>,
}

struct Degraded {
    since: Option<Instant>,
    total: Duration,
}

impl ListenerState {
    pub(crate) fn new() -> ListenerState {
        ListenerState {
            invalidations: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            resync_evictions: AtomicU64::new(0),
            cache_epoch: AtomicI64::new(EPOCH_UNKNOWN),
            server_started: AtomicI64::new(EPOCH_UNKNOWN),
            trusted: watch::channel(false).0,
            degraded: Mutex::new(Degraded {
                since: Some(Instant::now()),
                total: Duration::ZERO,
            }),
        }
    }

    fn set_trusted(&self, trusted: bool) {
        let mut d = self.degraded.lock().unwrap_or_else(|e| e.into_inner());
        match (trusted, d.since) {
            (true, Some(since)) => {
                d.total += since.elapsed();
                d.since = None;
            }
            (false, None) => d.since = Some(Instant::now()),
            _ => {}
        }
        self.trusted.send_replace(trusted);
    }

    /// Total time spent distrusted, including the current stretch.
    pub(crate) fn degraded_time(&self) -> Duration {
        let d = self.degraded.lock().unwrap_or_else(|e| e.into_inner());
        d.total + d.since.map_or(Duration::ZERO, |s| s.elapsed())
    }

    /// Resolves when the cache is trusted.
    pub(crate) async fn wait_trusted(&self) {
        let mut rx = self.trusted.subscribe();
        // The sender lives in `self`; the wait cannot fail while we borrow it.
        let _ = rx.wait_for(|t| *t).await;
    }

    /// A receiver that sees every change of trust.
    pub(crate) fn subscribe(&self) -> watch::Receiver<bool> {
        self.trusted.subscribe()
    }

    /// Record the start time of the server just resynchronised with; true if it differs from
    /// the one before (the server restarted, or another one took over).
    pub(crate) fn see_server(&self, started: i64) -> bool {
        let before = self.server_started.swap(started, Ordering::AcqRel);
        before != EPOCH_UNKNOWN && before != started
    }

    /// Record a clear count seen; true if it is newer than the last one.
    pub(crate) fn see_epoch(&self, epoch: i64) -> bool {
        self.cache_epoch.fetch_max(epoch, Ordering::AcqRel) < epoch
    }
}

/// Distrusts the cache when the listener task ends for any reason (shutdown, a panic, its
/// runtime going away), so that no path leaves a trusted cache without a listener.
struct DistrustOnExit<'a>(&'a Inner);

impl Drop for DistrustOnExit<'_> {
    fn drop(&mut self) {
        self.0.cache.distrust();
        self.0.listener.set_trusted(false);
    }
}

/// Run until shutdown.
pub(crate) async fn run(inner: Arc<Inner>, mut shutdown: Signal) {
    let _exit = DistrustOnExit(&inner);
    let mut backoff = Duration::ZERO;
    let mut connected_before = false;
    let mut probe = Probe::new();
    loop {
        if !backoff.is_zero() {
            tokio::select! {
                _ = shutdown.recv() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
        }
        let attempt = async {
            let mut listener = connect(&inner, &mut probe).await?;
            let evicted = resync(&inner, &mut listener).await?;
            // Notifications that arrive during the resynchronisation wait in the connection
            // and are applied first thing in `serve`.
            Ok::<_, String>((listener, evicted))
        };
        let (mut listener, evicted) = tokio::select! {
            _ = shutdown.recv() => return,
            result = attempt => match result {
                Ok(ok) => ok,
                Err(e) => {
                    backoff = (backoff * 2).clamp(FIRST_BACKOFF, inner.config.listener_max_backoff);
                    tracing::warn!(error = %e, retry_in = ?backoff, "pgsession: cache listener could not connect; serving from the database");
                    continue;
                }
            }
        };
        let state = &inner.listener;
        if connected_before {
            state.reconnects.fetch_add(1, Ordering::Relaxed);
        }
        connected_before = true;
        state
            .resync_evictions
            .fetch_add(evicted as u64, Ordering::Relaxed);
        inner.cache.trust(lease(&inner));
        state.set_trusted(true);
        tracing::debug!(evicted, "pgsession: cache listener active, cache trusted");

        let connected_at = Instant::now();
        let lost = serve(&inner, &mut listener, &mut probe, &mut shutdown).await;
        inner.cache.distrust();
        state.set_trusted(false);
        match lost {
            None => return,
            Some(reason) => {
                tracing::warn!(%reason, "pgsession: cache listener lost; serving from the database until it is back");
            }
        }
        backoff = if connected_at.elapsed() >= STABLE_AFTER {
            Duration::ZERO
        } else {
            (backoff * 2).clamp(FIRST_BACKOFF, inner.config.listener_max_backoff)
        };
    }
}

/// Payloads of this listener's probes: a random token for this manager and a counter, so that a
/// probe is recognised when it comes back and other nodes' probes are not mistaken for it.
struct Probe {
    token: u64,
    sent: u64,
}

impl Probe {
    fn new() -> Probe {
        Probe {
            token: Uuid::new_v4().as_u64_pair().0,
            sent: 0,
        }
    }

    fn next_payload(&mut self) -> String {
        self.sent += 1;
        format!("p {:016x} {}", self.token, self.sent)
    }
}

/// Send a probe through `listener` and wait until it comes back, applying whatever other
/// notifications arrive meanwhile. An error describes why the connection cannot be trusted.
async fn round_trip(
    inner: &Inner,
    listener: &mut PgListener,
    probe: &mut Probe,
) -> Result<(), String> {
    let limit = inner.config.listener_timeout;
    let payload = probe.next_payload();
    let send = sqlx::query(crate::store::PROBE)
        .bind(&inner.names.channel)
        .bind(&payload)
        .execute(&mut *listener);
    match timeout(limit, send).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(format!("probe failed: {e}")),
        Err(_) => return Err("probe timed out (half-open connection?)".into()),
    }
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, listener.try_recv()).await {
            Ok(Ok(Some(n))) if n.payload() == payload => {
                inner.cache.renew(lease(inner));
                return Ok(());
            }
            Ok(Ok(Some(n))) => apply(inner, n.payload()),
            Ok(Ok(None)) => return Err("connection closed".into()),
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => {
                return Err(
                    "probe notification did not come back (half-open connection, or \
                            a proxy that does not carry notifications?)"
                        .into(),
                );
            }
        }
    }
}

/// A fresh listener on its own single-connection pool, LISTENing on the channel, proven to
/// receive notifications.
async fn connect(inner: &Inner, probe: &mut Probe) -> Result<PgListener, String> {
    let limit = inner.config.listener_timeout;
    let options: PgConnectOptions = match &inner.config.listen_url {
        // Validated when the manager was built.
        Some(url) => url.parse().map_err(|e| format!("listen_url: {e}"))?,
        None => (*inner.store.pool().connect_options()).clone(),
    };
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .min_connections(0)
        .acquire_timeout(limit)
        .test_before_acquire(false)
        .max_lifetime(None)
        .idle_timeout(None)
        .connect_lazy_with(options.application_name("pgsession-listener"));
    let mut listener = timeout(limit, PgListener::connect_with(&pool))
        .await
        .map_err(|_| "connecting timed out".to_string())?
        .map_err(|e| e.to_string())?;
    listener.eager_reconnect(false);
    listener.ignore_pool_close_event(true);
    timeout(limit, listener.listen(&inner.names.channel))
        .await
        .map_err(|_| "LISTEN timed out".to_string())?
        .map_err(|e| e.to_string())?;
    round_trip(inner, &mut listener, probe).await?;
    Ok(listener)
}

/// Evict every cached session whose database version differs or that is gone, and everything
/// if a cache clear was announced while nobody listened. Runs after LISTEN is active, so a
/// change committed after these queries' snapshots will be announced.
async fn resync(inner: &Inner, listener: &mut PgListener) -> Result<usize, String> {
    let limit = inner.config.listener_timeout;
    let failed = |e: crate::Error| format!("resynchronisation failed: {e}");
    let (epoch, server_started) = timeout(limit, inner.store.cache_epoch(&mut *listener))
        .await
        .map_err(|_| "resynchronisation timed out".to_string())?
        .map_err(failed)?;
    // Both are recorded: `|` rather than `||`.
    let other_server = inner.listener.see_server(server_started);
    if inner.listener.see_epoch(epoch) | other_server {
        if other_server {
            tracing::warn!(
                "pgsession: the database server restarted or changed; emptying the cache"
            );
        }
        let evicted = inner.cache.counters().entries;
        inner.cache.clear();
        return Ok(evicted);
    }
    let snapshot = inner.cache.snapshot();
    if snapshot.is_empty() {
        return Ok(0);
    }
    let mut current = HashMap::with_capacity(snapshot.len());
    for chunk in snapshot.chunks(RESYNC_CHUNK) {
        let ids: Vec<Uuid> = chunk.iter().map(|(id, _)| *id).collect();
        let versions = timeout(limit, inner.store.versions(&mut *listener, &ids))
            .await
            .map_err(|_| "resynchronisation timed out".to_string())?
            .map_err(failed)?;
        current.extend(versions);
    }
    Ok(inner.cache.resync(&current))
}

/// Apply notifications until the connection is lost (returns the reason) or shutdown (None).
async fn serve(
    inner: &Inner,
    listener: &mut PgListener,
    probe: &mut Probe,
    shutdown: &mut Signal,
) -> Option<String> {
    loop {
        let next = tokio::select! {
            _ = shutdown.recv() => return None,
            next = timeout(inner.config.listener_probe_interval, listener.try_recv()) => next,
        };
        match next {
            Ok(Ok(Some(notification))) => apply(inner, notification.payload()),
            Ok(Ok(None)) => return Some("connection closed".into()),
            Ok(Err(e)) => return Some(e.to_string()),
            // Idle: prove the connection still delivers. try_recv is cancel-safe (sqlx only
            // consumes whole messages), so the probe can use the same connection.
            Err(_idle) => {
                let checked = tokio::select! {
                    _ = shutdown.recv() => return None,
                    checked = round_trip(inner, listener, probe) => checked,
                };
                if let Err(reason) = checked {
                    return Some(reason);
                }
            }
        }
    }
}

/// How long trust lasts without hearing from the listener connection: it is renewed by every
/// notification (probes included), and the probe comes after `listener_probe_interval` of
/// quiet and may take `listener_timeout`.
fn lease(inner: &Inner) -> Duration {
    inner.config.listener_probe_interval + inner.config.listener_timeout
}

/// Apply a payload: one invalidation per line. Anything unreadable clears the cache: better a
/// few misses than an entry nobody can vouch for.
pub(crate) fn apply(inner: &Inner, payload: &str) {
    for line in payload.split('\n') {
        apply_line(inner, line);
    }
    // Everything committed before this notification has been received and applied.
    inner.cache.renew(lease(inner));
}

fn apply_line(inner: &Inner, payload: &str) {
    let cache = &inner.cache;
    match Message::parse(payload) {
        Some(Message::Updated { id, version }) => {
            cache.invalidate_version(id, version);
        }
        Some(Message::Deleted(ids)) => {
            cache.invalidate_deleted(&ids);
        }
        Some(Message::UserDeleted(user_id)) => {
            cache.invalidate_user(user_id);
        }
        Some(Message::Clear(epoch)) => {
            inner.listener.see_epoch(epoch);
            cache.clear();
        }
        Some(Message::Probe) => return,
        None => {
            tracing::warn!(%payload, "pgsession: unreadable invalidation; clearing the cache");
            cache.clear();
        }
    }
    inner.listener.invalidations.fetch_add(1, Ordering::Relaxed);
}
