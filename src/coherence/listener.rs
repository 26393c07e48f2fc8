//! The LISTEN connection that keeps this node's cache coherent with every other node
//! (guarantees G2, G4 and G6 of `docs/design.md`).
//!
//! The task loops over three states: **degraded** (the cache is distrusted, reads go to the
//! database; connect and LISTEN, retrying with backoff for as long as the manager runs),
//! **resynchronising** (LISTEN is active, so every later commit will be announced: evict every
//! cached session whose database version differs, or everything if a clear was missed or the
//! server changed), and **trusted** (apply notifications; after `listener_probe_interval` of
//! quiet, prove the connection with a notification to itself, within `listener_timeout`). Any
//! error distrusts the cache at once. A connection that dies soon after it was established
//! does not reset the backoff, so a flapping network is not hammered.
//!
//! sqlx's `PgListener` can reconnect by itself but silently loses the notifications sent
//! meanwhile; it is never allowed to (a new listener every time), so every reconnection passes
//! through resynchronisation. The loop works on a [`Connect`]ion source, a fake in the tests
//! below.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sqlx::postgres::{PgListener, PgPoolOptions};
use tokio::sync::watch;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::backoff::Backoff;
use crate::coherence::cache::Cache;
use crate::coherence::protocol::{Message, split_tag};
use crate::error::Result;
use crate::events::{Events, Origin, SessionEvent, SessionEventKind as Kind};
use crate::storage::postgres::PgStorage as Store;
use crate::storage::postgres::hosts::Hosts;

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

    pub(crate) fn set_trusted(&self, trusted: bool) {
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
struct DistrustOnExit<'a>(&'a Cache, &'a ListenerState);

impl Drop for DistrustOnExit<'_> {
    fn drop(&mut self) {
        self.0.distrust();
        self.1.set_trusted(false);
    }
}

/// A connection with LISTEN active, as the loop uses it.
pub(crate) trait Feed: Send {
    /// Send `payload` on the channel through this very connection.
    fn notify(&mut self, payload: &str) -> impl Future<Output = Result<(), String>> + Send;
    /// A round trip through this very connection (`SELECT 1`); the payloads of the
    /// notifications that arrived meanwhile, which the server sends before answering.
    fn ping(&mut self) -> impl Future<Output = Result<Vec<String>, String>> + Send;
    /// The next notification's payload; `Ok(None)` when the connection closed.
    fn recv(&mut self) -> impl Future<Output = Result<Option<String>, String>> + Send;
    /// The clear count and the server's start time, read through this connection.
    fn epoch(&mut self) -> impl Future<Output = Result<(i64, i64), String>> + Send;
    /// The database versions of `ids` (absent ones are missing), read through it.
    fn versions(
        &mut self,
        ids: &[Uuid],
    ) -> impl Future<Output = Result<Vec<(Uuid, i64)>, String>> + Send;
}

/// Where LISTEN connections come from.
pub(crate) trait Connect: Send + Sync + 'static {
    type Feed: Feed;
    /// A new connection with LISTEN active on the channel.
    fn connect(&self) -> impl Future<Output = Result<Self::Feed, String>> + Send;
}

/// The listener's timing (from [`Config`](crate::Config)).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Timing {
    pub probe_interval: Duration,
    pub timeout: Duration,
    pub max_backoff: Duration,
}

impl Timing {
    /// How long trust lasts without hearing from the connection: every notification renews it
    /// (probes included), and a probe comes after `probe_interval` of quiet and may take
    /// `timeout`.
    fn lease(&self) -> Duration {
        self.probe_interval + self.timeout
    }
}

/// The listener task and what it works on.
pub(crate) struct Listener<C> {
    pub connect: C,
    pub cache: Arc<Cache>,
    pub state: Arc<ListenerState>,
    pub timing: Timing,
    /// Where other nodes' writes are reported.
    pub events: Events,
    /// This node's tag (8 hex digits): lines carrying it were reported when they happened.
    pub own_tag: String,
}

impl<C: Connect> Listener<C> {
    /// Run until `cancel`.
    pub(crate) async fn run(self, cancel: CancellationToken) -> Result<()> {
        let _exit = DistrustOnExit(&self.cache, &self.state);
        let mut backoff = Backoff::new(0, FIRST_BACKOFF, self.timing.max_backoff);
        let mut pause = Duration::ZERO;
        let mut connected_before = false;
        let mut probe = Probe::new();
        loop {
            if !pause.is_zero() {
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(pause) => {}
                }
            }
            let attempt = async {
                let mut feed = self.establish(&mut probe).await?;
                let started = Instant::now();
                let evicted = self.resync(&mut feed).await?;
                #[cfg(feature = "metrics")]
                crate::metrics::resync_took(started.elapsed());
                if connected_before {
                    tracing::warn!(
                        evicted,
                        took = ?started.elapsed(),
                        "pgsession: cache listener back; resynchronised, cache trusted again"
                    );
                }
                // Notifications that arrive during the resynchronisation wait in the
                // connection and are applied first thing in `serve`.
                Ok::<_, String>((feed, evicted))
            };
            let (mut feed, evicted) = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                result = attempt => match result {
                    Ok(ok) => ok,
                    Err(e) => {
                        pause = backoff.next_pause();
                        tracing::warn!(error = %e, retry_in = ?pause, "pgsession: cache listener could not connect; serving from the database");
                        continue;
                    }
                }
            };
            if connected_before {
                self.state.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            connected_before = true;
            self.state
                .resync_evictions
                .fetch_add(evicted as u64, Ordering::Relaxed);
            self.cache.trust(self.timing.lease());
            self.state.set_trusted(true);
            tracing::debug!(evicted, "pgsession: cache listener active, cache trusted");

            let connected_at = tokio::time::Instant::now();
            let lost = self.serve(&mut feed, &mut probe, &cancel).await;
            self.cache.distrust();
            self.state.set_trusted(false);
            match lost {
                None => return Ok(()),
                Some(reason) => {
                    tracing::warn!(%reason, "pgsession: cache listener lost; serving from the database until it is back");
                }
            }
            pause = if connected_at.elapsed() >= STABLE_AFTER {
                backoff.reset();
                Duration::ZERO
            } else {
                backoff.next_pause()
            };
        }
    }

    /// A fresh connection, LISTENing, proven to receive notifications.
    async fn establish(&self, probe: &mut Probe) -> Result<C::Feed, String> {
        let mut feed = timeout(self.timing.timeout, self.connect.connect())
            .await
            .map_err(|_| "connecting timed out".to_string())??;
        self.round_trip(&mut feed, probe).await?;
        Ok(feed)
    }

    /// Prove a quiet connection: usually with a round trip (`SELECT 1`), which a half-open
    /// connection does not answer and which the server answers only after sending every
    /// notification committed before it; every [`NOTIFY_PROBE_EVERY`]th time with a notification
    /// to itself, which also proves LISTEN still holds. A notification wakes every listening
    /// backend of the database, so with many nodes probing by notification alone would cost
    /// the server a wake-up per node per probe interval even when nothing happens.
    async fn prove(&self, feed: &mut C::Feed, probe: &mut Probe) -> Result<(), String> {
        probe.quiet += 1;
        if probe.quiet.is_multiple_of(NOTIFY_PROBE_EVERY) {
            return self.round_trip(feed, probe).await;
        }
        match timeout(self.timing.timeout, feed.ping()).await {
            Ok(Ok(arrived)) => {
                for payload in arrived {
                    self.apply(&payload);
                }
                self.cache.renew(self.timing.lease());
                Ok(())
            }
            Ok(Err(e)) => Err(format!("probe failed: {e}")),
            Err(_) => Err("probe timed out (half-open connection?)".into()),
        }
    }

    /// Send a probe through `feed` and wait until it comes back, applying whatever other
    /// notifications arrive meanwhile. An error describes why the connection cannot be trusted.
    async fn round_trip(&self, feed: &mut C::Feed, probe: &mut Probe) -> Result<(), String> {
        let limit = self.timing.timeout;
        let payload = probe.next_payload();
        match timeout(limit, feed.notify(&payload)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(format!("probe failed: {e}")),
            Err(_) => return Err("probe timed out (half-open connection?)".into()),
        }
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, feed.recv()).await {
                Ok(Ok(Some(n))) if n == payload => {
                    self.cache.renew(self.timing.lease());
                    return Ok(());
                }
                Ok(Ok(Some(n))) => self.apply(&n),
                Ok(Ok(None)) => return Err("connection closed".into()),
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(
                        "probe notification did not come back (half-open connection, \
                                or a proxy that does not carry notifications?)"
                            .into(),
                    );
                }
            }
        }
    }

    /// Evict every cached session whose database version differs or that is gone, and
    /// everything if a cache clear was announced while nobody listened or the server is not
    /// the one the cache was filled from. Runs after LISTEN is active, so a change committed
    /// after these reads will be announced.
    async fn resync(&self, feed: &mut C::Feed) -> Result<usize, String> {
        let limit = self.timing.timeout;
        let timed_out = |_| "resynchronisation timed out".to_string();
        let (epoch, server_started) = timeout(limit, feed.epoch()).await.map_err(timed_out)??;
        // Both are recorded: `|` rather than `||`.
        let other_server = self.state.see_server(server_started);
        if self.state.see_epoch(epoch) | other_server {
            if other_server {
                tracing::warn!(
                    "pgsession: the database server restarted or changed; emptying the cache"
                );
            }
            let evicted = self.cache.counters().entries;
            self.cache.clear();
            return Ok(evicted);
        }
        let snapshot = self.cache.snapshot();
        if snapshot.is_empty() {
            return Ok(0);
        }
        let mut current = HashMap::with_capacity(snapshot.len());
        for chunk in snapshot.chunks(RESYNC_CHUNK) {
            let ids: Vec<Uuid> = chunk.iter().map(|(id, _)| *id).collect();
            let versions = timeout(limit, feed.versions(&ids))
                .await
                .map_err(timed_out)??;
            current.extend(versions);
        }
        Ok(self.cache.resync(&current))
    }

    /// Apply notifications until the connection is lost (returns the reason) or `cancel`
    /// (returns `None`).
    async fn serve(
        &self,
        feed: &mut C::Feed,
        probe: &mut Probe,
        cancel: &CancellationToken,
    ) -> Option<String> {
        loop {
            let next = tokio::select! {
                _ = cancel.cancelled() => return None,
                next = timeout(self.timing.probe_interval, feed.recv()) => next,
            };
            match next {
                Ok(Ok(Some(payload))) => self.apply(&payload),
                Ok(Ok(None)) => return Some("connection closed".into()),
                Ok(Err(e)) => return Some(e),
                // Quiet: prove the connection still delivers. `recv` is cancel-safe (only whole
                // messages are consumed), so the probe can use the same connection.
                Err(_idle) => {
                    let checked = tokio::select! {
                        _ = cancel.cancelled() => return None,
                        checked = self.prove(feed, probe) => checked,
                    };
                    if let Err(reason) = checked {
                        return Some(reason);
                    }
                }
            }
        }
    }

    /// Apply a payload: one invalidation per line. Anything unreadable clears the cache: better
    /// a few misses than an entry nobody can vouch for.
    fn apply(&self, payload: &str) {
        for line in payload.split('\n') {
            self.apply_line(line);
        }
        // Everything committed before this notification has been received and applied.
        self.cache.renew(self.timing.lease());
    }

    fn apply_line(&self, payload: &str) {
        let cache = &self.cache;
        let (line, tag) = split_tag(payload);
        let message = Message::parse(line);
        match &message {
            Some(Message::Updated { id, version }) => {
                cache.invalidate_version(*id, *version);
            }
            Some(Message::Deleted(ids) | Message::Expired(ids)) => {
                cache.invalidate_deleted(ids);
            }
            Some(Message::Rotated { old, .. }) => {
                cache.invalidate_deleted(&[*old]);
            }
            // Nothing to evict: nobody can have cached a session before it existed.
            Some(Message::Created { .. }) => {}
            Some(Message::UserDeleted(user_id) | Message::UserChanged(user_id)) => {
                cache.invalidate_user(user_id);
            }
            Some(Message::GroupDeleted(group)) => {
                cache.invalidate_where(|r| r.group_id.as_deref() == Some(group.as_str()));
            }
            Some(Message::Clear(epoch) | Message::AllDeleted(epoch)) => {
                self.state.see_epoch(*epoch);
                cache.clear();
            }
            Some(Message::Probe) => return,
            None => {
                tracing::warn!(%payload, "pgsession: unreadable invalidation; clearing the cache");
                cache.clear();
            }
        }
        self.state.invalidations.fetch_add(1, Ordering::Relaxed);
        if let Some(message) = message
            && tag != Some(self.own_tag.as_str())
        {
            report(&self.events, message);
        }
    }
}

/// Report another node's write as events.
fn report(events: &Events, message: Message) {
    if !events.wanted() {
        return;
    }
    let event = |kind| SessionEvent::new(kind, Origin::OtherNode);
    let each = |kind, ids: Vec<Uuid>| {
        for id in ids {
            events.emit(|| event(kind).session(id));
        }
    };
    match message {
        Message::Updated { id, version } => {
            events.emit(|| event(Kind::Updated).session(id).version(version));
        }
        Message::Deleted(ids) => each(Kind::Deleted, ids),
        Message::Expired(ids) => each(Kind::Expired, ids),
        Message::Rotated { old, new, version } => events.emit(|| {
            let mut e = event(Kind::Rotated).session(new).version(version);
            e.previous_id = Some(crate::SessionId(old));
            e
        }),
        Message::Created { id, user } => {
            events.emit(|| event(Kind::Created).session(id).user(user).version(1));
        }
        Message::UserDeleted(user) => {
            events.emit(|| event(Kind::UserLoggedOutEverywhere).user(Some(user)));
        }
        Message::UserChanged(user) => {
            events.emit(|| event(Kind::UserSessionsUpdated).user(Some(user)));
        }
        Message::GroupDeleted(group) => events.emit(|| {
            let mut e = event(Kind::GroupDeleted);
            e.group_id = Some(group);
            e
        }),
        Message::AllDeleted(_) => events.emit(|| event(Kind::AllDeleted)),
        Message::Clear(_) | Message::Probe => {}
    }
}

/// Payloads of this listener's probes: a random token for this manager and a counter, so that a
/// probe is recognised when it comes back and other nodes' probes are not mistaken for it.
struct Probe {
    token: u64,
    sent: u64,
    /// Quiet intervals proved so far.
    quiet: u64,
}

/// One quiet-interval probe in this many is a notification to itself (see `Listener::prove`).
const NOTIFY_PROBE_EVERY: u64 = 8;

impl Probe {
    fn new() -> Probe {
        Probe {
            token: Uuid::new_v4().as_u64_pair().0,
            sent: 0,
            quiet: 0,
        }
    }

    fn next_payload(&mut self) -> String {
        self.sent += 1;
        format!("p {:016x} {}", self.token, self.sent)
    }
}

/// LISTEN connections to PostgreSQL: a dedicated connection each (its own single-connection
/// pool, so the pool's acquire timeout does not apply), never reconnected silently.
pub(crate) struct PgConnect {
    /// The servers to listen to: the first that fits (see `Hosts::connect`).
    pub hosts: Arc<Hosts>,
    pub channel: String,
    pub store: Arc<Store>,
    pub timeout: Duration,
}

/// A PostgreSQL LISTEN connection; resynchronisation reads go through it too, so they never
/// wait for the pool (which may have nothing to spare while every read goes to the database).
pub(crate) struct PgFeed {
    listener: PgListener,
    channel: String,
    store: Arc<Store>,
}

impl Connect for PgConnect {
    type Feed = PgFeed;

    async fn connect(&self) -> Result<PgFeed, String> {
        // Find the server that fits (after a failover, the new primary) with a direct
        // connection first: the listener's own pool would retry one server until its timeout.
        if self.hosts.choosing() {
            match self.hosts.connect(self.timeout).await {
                Ok((conn, _)) => {
                    let _ = sqlx::Connection::close(conn).await;
                }
                Err(e) => {
                    self.store.connections().suspect();
                    return Err(e.to_string());
                }
            }
        }
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .acquire_timeout(self.timeout)
            .test_before_acquire(false)
            .max_lifetime(None)
            .idle_timeout(None)
            // The application name is the manager's (see `Names::listener_application_prefix`).
            .connect_lazy_with(self.hosts.current());
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(listener) => listener,
            Err(e) => {
                // The server may be gone: find out, so that calls fail fast meanwhile.
                self.store.connections().suspect();
                return Err(e.to_string());
            }
        };
        listener.eager_reconnect(false);
        listener.ignore_pool_close_event(true);
        listener
            .listen(&self.channel)
            .await
            .map_err(|e| e.to_string())?;
        Ok(PgFeed {
            listener,
            channel: self.channel.clone(),
            store: self.store.clone(),
        })
    }
}

impl Feed for PgFeed {
    async fn notify(&mut self, payload: &str) -> Result<(), String> {
        sqlx::query(crate::storage::postgres::sql::PROBE)
            .bind(&self.channel)
            .bind(payload)
            .execute(&mut self.listener)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    async fn ping(&mut self) -> Result<Vec<String>, String> {
        sqlx::query("SELECT 1")
            .execute(&mut self.listener)
            .await
            .map_err(|e| e.to_string())?;
        let mut arrived = Vec::new();
        while let Some(n) = self.listener.next_buffered() {
            arrived.push(n.payload().to_owned());
        }
        Ok(arrived)
    }

    async fn recv(&mut self) -> Result<Option<String>, String> {
        match self.listener.try_recv().await {
            Ok(Some(n)) => Ok(Some(n.payload().to_owned())),
            Ok(None) => Ok(None),
            Err(e) => Err(e.to_string()),
        }
    }

    async fn epoch(&mut self) -> Result<(i64, i64), String> {
        self.store
            .cache_epoch(&mut self.listener)
            .await
            .map_err(|e| format!("resynchronisation failed: {e}"))
    }

    async fn versions(&mut self, ids: &[Uuid]) -> Result<Vec<(Uuid, i64)>, String> {
        self.store
            .versions(&mut self.listener, ids)
            .await
            .map_err(|e| format!("resynchronisation failed: {e}"))
    }
}

#[cfg(test)]
mod tests {
    //! The loop's timing against a fake connection, on tokio's paused clock: times are exact.

    use std::sync::atomic::{AtomicBool, AtomicU64};

    use tokio::sync::mpsc;
    use tokio::time::Instant as Clock;

    use super::*;

    const TIMING: Timing = Timing {
        probe_interval: Duration::from_millis(200),
        timeout: Duration::from_millis(500),
        max_backoff: Duration::from_millis(400),
    };

    /// Connections that fail while `fail` is set; each one echoes its probes while `echo` is
    /// set, and closes when the test sends it `CLOSE`.
    #[derive(Clone, Default)]
    struct Fake {
        fail: Arc<AtomicBool>,
        echo: Arc<AtomicBool>,
        attempts: Arc<Mutex<Vec<Clock>>>,
        feeds: Arc<Mutex<Vec<mpsc::UnboundedSender<String>>>>,
        /// Probes by notification and by round trip, over every connection.
        notified: Arc<AtomicU64>,
        pinged: Arc<AtomicU64>,
    }

    const CLOSE: &str = "close";

    struct FakeFeed {
        rx: mpsc::UnboundedReceiver<String>,
        tx: mpsc::UnboundedSender<String>,
        echo: Arc<AtomicBool>,
        notified: Arc<AtomicU64>,
        pinged: Arc<AtomicU64>,
    }

    impl Connect for Fake {
        type Feed = FakeFeed;
        async fn connect(&self) -> Result<FakeFeed, String> {
            self.attempts.lock().unwrap().push(Clock::now());
            if self.fail.load(Ordering::SeqCst) {
                return Err("refused".into());
            }
            let (tx, rx) = mpsc::unbounded_channel();
            self.feeds.lock().unwrap().push(tx.clone());
            Ok(FakeFeed {
                rx,
                tx,
                echo: self.echo.clone(),
                notified: self.notified.clone(),
                pinged: self.pinged.clone(),
            })
        }
    }

    impl Feed for FakeFeed {
        /// A silent connection (no echo) never answers.
        async fn ping(&mut self) -> Result<Vec<String>, String> {
            self.pinged.fetch_add(1, Ordering::SeqCst);
            if self.echo.load(Ordering::SeqCst) {
                Ok(Vec::new())
            } else {
                std::future::pending().await
            }
        }
        async fn notify(&mut self, payload: &str) -> Result<(), String> {
            self.notified.fetch_add(1, Ordering::SeqCst);
            if self.echo.load(Ordering::SeqCst) {
                let _ = self.tx.send(payload.to_owned());
            }
            Ok(())
        }
        async fn recv(&mut self) -> Result<Option<String>, String> {
            match self.rx.recv().await {
                Some(p) if p == CLOSE => Ok(None),
                other => Ok(other),
            }
        }
        async fn epoch(&mut self) -> Result<(i64, i64), String> {
            Ok((0, 1))
        }
        async fn versions(&mut self, _: &[Uuid]) -> Result<Vec<(Uuid, i64)>, String> {
            Ok(Vec::new())
        }
    }

    fn start(fake: &Fake) -> (Arc<ListenerState>, CancellationToken) {
        let state = Arc::new(ListenerState::new());
        let cancel = CancellationToken::new();
        let listener = Listener {
            connect: fake.clone(),
            cache: Arc::new(Cache::new(100, None)),
            state: state.clone(),
            timing: TIMING,
            events: Events::new(),
            own_tag: "00000000".into(),
        };
        tokio::spawn(listener.run(cancel.clone()));
        (state, cancel)
    }

    async fn wait_for(state: &ListenerState, trusted: bool) -> Clock {
        state.subscribe().wait_for(|t| *t == trusted).await.unwrap();
        Clock::now()
    }

    fn gaps(times: &[Clock]) -> Vec<Duration> {
        times.windows(2).map(|w| w[1] - w[0]).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn reconnection_backs_off_doubling_up_to_the_maximum() {
        let fake = Fake::default();
        fake.fail.store(true, Ordering::SeqCst);
        let (_state, cancel) = start(&fake);
        tokio::time::sleep(Duration::from_millis(2000)).await;
        cancel.cancel();
        let ms = Duration::from_millis;
        let attempts = fake.attempts.lock().unwrap().clone();
        assert_eq!(
            gaps(&attempts)[..6],
            [ms(50), ms(100), ms(200), ms(400), ms(400), ms(400)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_distrusted_after_probe_interval_plus_timeout() {
        let fake = Fake::default();
        fake.echo.store(true, Ordering::SeqCst);
        let (state, _cancel) = start(&fake);
        let trusted_at = wait_for(&state, true).await;
        // While probes come back (every probe interval of quiet), the cache stays trusted.
        tokio::time::sleep(Duration::from_millis(5050)).await;
        assert!(*state.subscribe().borrow());
        // The connection goes silent 50 ms after the probe at 5 s came back.
        fake.echo.store(false, Ordering::SeqCst);
        let distrusted_at = wait_for(&state, false).await;
        assert_eq!(
            distrusted_at - trusted_at,
            Duration::from_millis(5000) + TIMING.probe_interval + TIMING.timeout,
            "noticed one probe interval after the last sign of life, plus the probe's timeout"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_connection_is_proved_mostly_by_round_trips_not_notifications() {
        let fake = Fake::default();
        fake.echo.store(true, Ordering::SeqCst);
        let (state, _cancel) = start(&fake);
        wait_for(&state, true).await;
        let at_start = fake.notified.load(Ordering::SeqCst);
        // 32 quiet intervals: every one proved, one in NOTIFY_PROBE_EVERY by a notification,
        // which wakes every listening node of the database.
        tokio::time::sleep(TIMING.probe_interval * 32 + TIMING.probe_interval / 2).await;
        assert!(*state.subscribe().borrow());
        let notified = fake.notified.load(Ordering::SeqCst) - at_start;
        let pinged = fake.pinged.load(Ordering::SeqCst);
        assert_eq!(notified, 32 / NOTIFY_PROBE_EVERY);
        assert_eq!(pinged + notified, 32);
    }

    #[tokio::test(start_paused = true)]
    async fn notifications_keep_a_busy_connection_trusted_without_probes() {
        let fake = Fake::default();
        fake.echo.store(true, Ordering::SeqCst);
        let (state, _cancel) = start(&fake);
        wait_for(&state, true).await;
        // Probes would not come back any more, but other nodes' notifications keep arriving.
        fake.echo.store(false, Ordering::SeqCst);
        let feed = fake.feeds.lock().unwrap()[0].clone();
        for _ in 0..50 {
            tokio::time::sleep(TIMING.probe_interval / 2).await;
            feed.send("p other 1".into()).unwrap();
        }
        assert!(*state.subscribe().borrow());
        assert_eq!(fake.attempts.lock().unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_stayed_up_reconnects_at_once_one_that_flapped_waits() {
        let fake = Fake::default();
        fake.echo.store(true, Ordering::SeqCst);
        let (state, _cancel) = start(&fake);
        wait_for(&state, true).await;
        tokio::time::sleep(STABLE_AFTER).await;
        let close = |i: usize| {
            fake.feeds.lock().unwrap()[i].send(CLOSE.into()).unwrap();
        };
        // Reconnection may complete before this task looks again: wait for the attempt.
        let attempted = |n: usize| {
            let fake = fake.clone();
            async move {
                while fake.attempts.lock().unwrap().len() < n {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        };
        close(0);
        let closed_at = Clock::now();
        attempted(2).await;
        let attempts = fake.attempts.lock().unwrap().clone();
        assert_eq!(
            attempts[1], closed_at,
            "stable connection: reconnected at once"
        );
        wait_for(&state, true).await;
        // Lost again straight away: this time the backoff applies.
        close(1);
        let closed_at = Clock::now();
        attempted(3).await;
        let attempts = fake.attempts.lock().unwrap().clone();
        assert_eq!(attempts[2] - closed_at, FIRST_BACKOFF);
        wait_for(&state, true).await;
        assert_eq!(state.reconnects.load(Ordering::Relaxed), 2);
    }
}
