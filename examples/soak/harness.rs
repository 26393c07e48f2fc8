//! A fault-injecting soak of several nodes on one database, judged against the history of
//! acknowledged writes rather than only the final state.
//!
//! Shared by `examples/soak` (the command line) and `tests/soak.rs` (a short run in the suite).
//!
//! Every node is a [`SessionManager`] with its own pool; its pool and its listener each reach
//! the server through a [`FaultProxy`] of their own, so that network faults can hit one part
//! of one node. Tasks on every node read (78%), update one attribute of their own (18%),
//! delete a session and create its replacement (2%) and log a user out everywhere (2%), over a
//! fixed set of session slots, while a fault task breaks something every `fault_every`.
//!
//! Verdicts (all must be zero):
//!
//! * **stale**: a read that started more than `bound` after an `update_session` returned
//!   version `v` (on any node) and saw an older version;
//! * **resurrected**: a read that started more than `bound` after `delete_session` or
//!   `delete_all_user_sessions` returned and still saw the session;
//! * **missing**: a read that found nothing for a session nobody had tried to delete;
//! * **lost** (after quiescence): an acknowledged session or attribute value not in the
//!   database;
//! * **divergent** (after quiescence): a node serving another version than the database.
//!
//! A write that failed (a connection died under it) may or may not have committed: it is
//! never counted as acknowledged, and its value is allowed in the database.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgsession::{Config, Error, SessionId, SessionManager, SessionToken};
use pgsession_testkit::{FaultProxy, TempPgBouncer, TempPostgres};
use serde_json::json;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

/// What the fault task can break.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fault {
    /// `pg_terminate_backend` on every listener connection.
    KillListener,
    /// `pg_terminate_backend` on every announcer connection.
    KillAnnouncer,
    /// `pg_terminate_backend` on every pool connection of every node.
    KillPool,
    /// `pg_terminate_backend` on every backend of the database.
    KillAll,
    /// `pg_terminate_backend` on a random 40% of the database's backends.
    KillRandom,
    /// Stop the server (fast shutdown) and start it again.
    Restart,
    /// One node's listener connection goes silent (no FIN, no RST) for a while.
    HalfOpenListener,
    /// One node's pool and announcer connections go silent for a second.
    StallPool,
    /// One node's connections are cut and new ones refused for a second.
    Refuse,
    /// `pg_terminate_backend` on every server connection PgBouncer holds (with
    /// `Options::through_pgbouncer` only).
    KillPoolerServers,
}

impl Fault {
    /// Every fault mode.
    pub const ALL: [Fault; 9] = [
        Fault::KillListener,
        Fault::KillAnnouncer,
        Fault::KillPool,
        Fault::KillAll,
        Fault::KillRandom,
        Fault::Restart,
        Fault::HalfOpenListener,
        Fault::StallPool,
        Fault::Refuse,
    ];

    /// Name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Fault::KillListener => "kill-listener",
            Fault::KillAnnouncer => "kill-announcer",
            Fault::KillPool => "kill-pool",
            Fault::KillAll => "kill-all",
            Fault::KillRandom => "kill-random",
            Fault::Restart => "restart",
            Fault::HalfOpenListener => "half-open-listener",
            Fault::StallPool => "stall-pool",
            Fault::Refuse => "refuse",
            Fault::KillPoolerServers => "kill-pooler-servers",
        }
    }

    /// The fault named `name`.
    pub fn parse(name: &str) -> Option<Fault> {
        Fault::ALL
            .into_iter()
            .chain([Fault::KillPoolerServers])
            .find(|f| f.name() == name)
    }
}

/// How to run the soak.
#[derive(Clone, Debug)]
pub struct Options {
    /// Length of the loaded, faulty phase.
    pub duration: Duration,
    /// Managers on the database.
    pub nodes: usize,
    /// Worker tasks per node.
    pub tasks_per_node: usize,
    /// Session slots (three per user).
    pub sessions: usize,
    /// Faults to choose from at random; empty for none.
    pub faults: Vec<Fault>,
    /// Time between faults.
    pub fault_every: Duration,
    /// Staleness allowed after a write returned.
    pub bound: Duration,
    /// Seed of every random choice.
    pub seed: u64,
    /// Nodes' pools reach the server through Debian's PgBouncer in transaction mode
    /// (`Config::transaction_pooling`); their listeners directly. Adds the fault
    /// `kill-pooler-servers`.
    pub through_pgbouncer: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            duration: Duration::from_secs(60),
            nodes: 3,
            tasks_per_node: 4,
            sessions: 60,
            faults: Fault::ALL.to_vec(),
            fault_every: Duration::from_millis(1500),
            bound: Duration::from_secs(1),
            seed: 1,
            through_pgbouncer: false,
        }
    }
}

/// The configuration of every node: the half-open listener is noticed within
/// `listener_probe_interval + listener_timeout`, which must stay under the bound.
pub fn node_config() -> Config {
    Config {
        max_sessions_per_user: None,
        listener_probe_interval: Duration::from_millis(250),
        listener_timeout: Duration::from_millis(500),
        listener_max_backoff: Duration::from_millis(200),
        last_access_flush_interval: Duration::from_secs(1),
        run_cleanup: false,
        shutdown_timeout: Duration::from_secs(5),
        ..Config::default()
    }
}

/// What happened, and the verdicts.
#[derive(Debug, Default)]
pub struct Report {
    /// Successful calls by kind.
    pub reads: u64,
    /// Acknowledged updates.
    pub updates: u64,
    /// Acknowledged deletes.
    pub deletes: u64,
    /// Acknowledged creates.
    pub creates: u64,
    /// Acknowledged logouts everywhere.
    pub logouts: u64,
    /// Calls that failed with a transient (connection) error.
    pub failed: u64,
    /// Transient failures by call and message.
    pub failures: HashMap<String, u64>,
    /// Calls that failed with any other error (each is a bug).
    pub unexpected: Vec<String>,
    /// Faults injected, by kind.
    pub faults: Vec<(Fault, u64)>,
    /// Reads that saw a version older than one acknowledged more than `bound` before.
    pub stale: u64,
    /// Reads that saw a session deleted more than `bound` before.
    pub resurrected: u64,
    /// Reads that found nothing for a session never deleted.
    pub missing: u64,
    /// Worst staleness of a stale or resurrected read, from the acknowledgement.
    pub worst: Option<Duration>,
    /// Acknowledged sessions or values absent from the database after quiescence.
    pub lost: u64,
    /// (node, session) pairs serving another version than the database after quiescence.
    pub divergent: u64,
    /// The first few violations, described.
    pub examples: Vec<String>,
}

impl Report {
    /// True when every verdict is zero and no call failed unexpectedly.
    pub fn passed(&self) -> bool {
        self.stale == 0
            && self.resurrected == 0
            && self.missing == 0
            && self.lost == 0
            && self.divergent == 0
            && self.unexpected.is_empty()
    }

    fn example(&mut self, what: String) {
        if self.examples.len() < 20 {
            self.examples.push(what);
        }
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "calls: {} reads, {} updates, {} deletes, {} creates, {} logouts everywhere; {} failed \
             with connection errors, {} unexpected errors",
            self.reads,
            self.updates,
            self.deletes,
            self.creates,
            self.logouts,
            self.failed,
            self.unexpected.len()
        )?;
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|(fault, n)| format!("{} x{n}", fault.name()))
            .collect();
        writeln!(
            f,
            "faults: {}",
            if faults.is_empty() {
                "none".to_string()
            } else {
                faults.join(", ")
            }
        )?;
        writeln!(
            f,
            "verdicts: stale {}, resurrected {}, missing {}, lost {}, divergent {}; worst staleness {}",
            self.stale,
            self.resurrected,
            self.missing,
            self.lost,
            self.divergent,
            self.worst
                .map_or("-".to_string(), |w| format!("{:.3} s", w.as_secs_f64()))
        )?;
        let mut failures: Vec<_> = self.failures.iter().collect();
        failures.sort_by(|a, b| b.1.cmp(a.1));
        for (what, n) in failures.iter().take(8) {
            writeln!(f, "  failed x{n}: {what}")?;
        }
        for e in &self.unexpected {
            writeln!(f, "  unexpected error: {e}")?;
        }
        for e in &self.examples {
            writeln!(f, "  {e}")?;
        }
        Ok(())
    }
}

/// SplitMix64: small, seedable, good enough to pick operations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// One session as the history knows it.
struct Tracked {
    id: SessionId,
    token: SessionToken,
    user: usize,
    created: Instant,
    /// Set before any attempt to delete it (its own delete, or its user's logout).
    delete_attempted: AtomicBool,
    state: Mutex<History>,
}

#[derive(Default)]
struct History {
    /// Acknowledged versions, each higher than the previous, with the instant the call
    /// returned (a staircase: a lower version acknowledged later adds nothing to check).
    acks: Vec<(Instant, i64, usize)>,
    /// When a delete of it was acknowledged.
    deleted: Option<Instant>,
    /// Per attribute key: the last acknowledged value.
    values: HashMap<String, i64>,
}

impl Tracked {
    fn new(id: SessionId, token: SessionToken, user: usize, version: i64) -> Arc<Tracked> {
        let now = Instant::now();
        Arc::new(Tracked {
            id,
            token,
            user,
            created: now,
            delete_attempted: AtomicBool::new(false),
            state: Mutex::new(History {
                acks: vec![(now, version, usize::MAX)],
                ..History::default()
            }),
        })
    }

    fn history(&self) -> std::sync::MutexGuard<'_, History> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ack_version(&self, version: i64, key: &str, value: i64, node: usize) {
        let mut h = self.history();
        let now = Instant::now();
        if h.acks.last().is_none_or(|&(_, v, _)| version > v) {
            h.acks.push((now, version, node));
        }
        let slot = h.values.entry(key.to_string()).or_insert(value);
        *slot = (*slot).max(value);
    }

    fn ack_deleted(&self) {
        let mut h = self.history();
        if h.deleted.is_none() {
            h.deleted = Some(Instant::now());
        }
    }
}

struct Shared {
    options: Options,
    nodes: Vec<SessionManager>,
    slots: Vec<Mutex<Arc<Tracked>>>,
    /// Held while a slot's session is being replaced, or its user logged out.
    slot_writes: Vec<tokio::sync::Mutex<()>>,
    /// Every session ever created, by user.
    by_user: Vec<Mutex<Vec<Arc<Tracked>>>>,
    running: AtomicBool,
    /// When each fault was injected, and on which node (for the node-specific ones).
    fault_log: Mutex<Vec<(Instant, Fault, usize)>>,
    report: Mutex<Report>,
    reads: AtomicU64,
    failed: AtomicU64,
}

const SLOTS_PER_USER: usize = 3;

impl Shared {
    fn report(&self) -> std::sync::MutexGuard<'_, Report> {
        self.report.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn slot(&self, i: usize) -> Arc<Tracked> {
        self.slots[i]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn user_id(&self, user: usize) -> Uuid {
        // Stable per run: users are the slot groups.
        Uuid::from_u64_pair(self.options.seed, user as u64)
    }

    /// Faults injected from 3 s before `at` to 1 s after it, with their offsets.
    fn faults_around(&self, at: Instant) -> String {
        let log = self.fault_log.lock().unwrap_or_else(|e| e.into_inner());
        let near: Vec<String> = log
            .iter()
            .filter(|(t, _, _)| {
                *t + Duration::from_secs(3) > at && *t < at + Duration::from_secs(1)
            })
            .map(|(t, fault, node)| {
                let offset = if *t > at {
                    (*t - at).as_secs_f64()
                } else {
                    -(at - *t).as_secs_f64()
                };
                format!("{} (node {node}) at {offset:+.3} s", fault.name())
            })
            .collect();
        if near.is_empty() {
            "none".into()
        } else {
            near.join(", ")
        }
    }

    fn error(&self, what: &str, e: Error) {
        if e.is_transient() {
            self.failed.fetch_add(1, Ordering::Relaxed);
            let mut r = self.report();
            let kind = format!("{what}: {e}");
            *r.failures.entry(kind).or_default() += 1;
        } else {
            self.report().unexpected.push(format!("{what}: {e}"));
        }
    }

    /// Judge a read of `tracked` that started at `started` and saw `seen`.
    fn judge(&self, tracked: &Tracked, started: Instant, seen: Option<i64>, node: usize) {
        let bound = self.options.bound;
        let h = tracked.history();
        match seen {
            Some(v) => {
                if let Some(deleted) = h.deleted
                    && started > deleted + bound
                {
                    let late = started - deleted;
                    drop(h);
                    let faults = self.faults_around(deleted);
                    let mut r = self.report();
                    r.resurrected += 1;
                    r.worst = r.worst.max(Some(late));
                    r.example(format!(
                        "resurrected: node {node} served {} v{v} {:.3} s after its delete \
                         returned; faults around then: {faults}",
                        tracked.id,
                        late.as_secs_f64()
                    ));
                    return;
                }
                // The first acknowledged version newer than what was seen.
                let i = h.acks.partition_point(|&(_, w, _)| w <= v);
                if let Some(&(acked, w, writer)) = h.acks.get(i)
                    && started > acked + bound
                {
                    let late = started - acked;
                    drop(h);
                    let mut r = self.report();
                    r.stale += 1;
                    r.worst = r.worst.max(Some(late));
                    let faults = self.faults_around(acked);
                    r.example(format!(
                        "stale: node {node} served {} v{v} {:.3} s after node {writer}'s v{w} \
                         was acknowledged; faults around then: {faults}",
                        tracked.id,
                        late.as_secs_f64()
                    ));
                }
            }
            None => {
                if !tracked.delete_attempted.load(Ordering::SeqCst) && started > tracked.created {
                    drop(h);
                    let mut r = self.report();
                    r.missing += 1;
                    r.example(format!(
                        "missing: node {node} found nothing for {}, never deleted",
                        tracked.id
                    ));
                }
            }
        }
    }

    async fn read(&self, node: usize, tracked: &Tracked) -> Option<pgsession::Session> {
        let started = Instant::now();
        match self.nodes[node].get_session(&tracked.token).await {
            Ok(found) => {
                self.reads.fetch_add(1, Ordering::Relaxed);
                self.judge(tracked, started, found.as_ref().map(|s| s.version()), node);
                found
            }
            Err(e) => {
                self.error("get_session", e);
                None
            }
        }
    }

    async fn create(&self, node: usize, user: usize) -> Arc<Tracked> {
        loop {
            match self.nodes[node]
                .create_session(self.user_id(user), [("user".to_string(), json!(user))])
                .await
            {
                Ok((s, token)) => {
                    let tracked = Tracked::new(s.id(), token, user, s.version());
                    self.by_user[user]
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(tracked.clone());
                    self.report().creates += 1;
                    return tracked;
                }
                Err(e) => {
                    self.error("create_session", e);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// Replace the session of slot `i`: delete it (retrying until the outcome is known), then
    /// create a new one.
    async fn replace(&self, node: usize, i: usize) {
        let _writing = self.slot_writes[i].lock().await;
        let old = self.slot(i);
        old.delete_attempted.store(true, Ordering::SeqCst);
        loop {
            match self.nodes[node].delete_session(old.id).await {
                Ok(_) => {
                    old.ack_deleted();
                    self.report().deletes += 1;
                    break;
                }
                Err(e) => {
                    self.error("delete_session", e);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        let new = self.create(node, old.user).await;
        *self.slots[i].lock().unwrap_or_else(|e| e.into_inner()) = new;
    }

    /// Log user `user` out everywhere, then give its slots new sessions.
    async fn log_out_everywhere(&self, node: usize, user: usize) {
        let slots: Vec<usize> = (user * SLOTS_PER_USER..(user + 1) * SLOTS_PER_USER).collect();
        let mut guards = Vec::new();
        for &i in &slots {
            guards.push(self.slot_writes[i].lock().await);
        }
        let started = Instant::now();
        let sessions: Vec<Arc<Tracked>> = self.by_user[user]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for s in &sessions {
            s.delete_attempted.store(true, Ordering::SeqCst);
        }
        loop {
            match self.nodes[node]
                .delete_all_user_sessions(self.user_id(user))
                .await
            {
                Ok(_) => break,
                Err(e) => {
                    self.error("delete_all_user_sessions", e);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        for s in sessions.iter().filter(|s| s.created < started) {
            s.ack_deleted();
        }
        self.report().logouts += 1;
        for &i in &slots {
            let new = self.create(node, user).await;
            *self.slots[i].lock().unwrap_or_else(|e| e.into_inner()) = new;
        }
        drop(guards);
    }

    async fn update(&self, node: usize, tracked: &Tracked, key: &str, value: i64) {
        let Some(mut session) = self.read(node, tracked).await else {
            return;
        };
        if session.set(key, value).is_err() {
            self.report()
                .unexpected
                .push("set refused a small value".into());
            return;
        }
        match self.nodes[node].update_session(&mut session).await {
            Ok(()) => {
                tracked.ack_version(session.version(), key, value, node);
                self.report().updates += 1;
            }
            Err(Error::NotFound) => {}
            Err(e) => self.error("update_session", e),
        }
    }
}

async fn worker(shared: Arc<Shared>, node: usize, task: usize) {
    let mut rng = Rng(shared.options.seed ^ ((node as u64) << 32 | task as u64));
    let key = format!("n{node}t{task}");
    let mut counter = 0;
    let users = shared.slots.len() / SLOTS_PER_USER;
    while shared.running.load(Ordering::Relaxed) {
        let i = rng.below(shared.slots.len());
        let roll = rng.below(1000);
        if roll < 780 {
            let tracked = shared.slot(i);
            shared.read(node, &tracked).await;
        } else if roll < 960 {
            counter += 1;
            let tracked = shared.slot(i);
            shared.update(node, &tracked, &key, counter).await;
        } else if roll < 980 {
            shared.replace(node, i).await;
        } else {
            shared.log_out_everywhere(node, rng.below(users)).await;
        }
        // Reads are cache hits: let other tasks and the listener run.
        tokio::task::yield_now().await;
    }
}

/// The connections a node makes, each through a proxy of its own.
struct NodeNet {
    pool: FaultProxy,
    listen: FaultProxy,
}

/// A direct connection for injecting faults, reconnecting as needed.
struct Saboteur {
    url: String,
    conn: Option<PgConnection>,
}

impl Saboteur {
    async fn terminate(&mut self, filter: &str) -> u64 {
        for _ in 0..50 {
            if self.conn.is_none() {
                self.conn = PgConnection::connect(&self.url).await.ok();
            }
            let Some(conn) = self.conn.as_mut() else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let sql = format!(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid() AND ({filter})"
            );
            match sqlx::query_scalar::<_, i64>(sqlx::AssertSqlSafe(sql))
                .fetch_one(&mut *conn)
                .await
            {
                Ok(n) => return n as u64,
                Err(_) => self.conn = None,
            }
        }
        0
    }
}

async fn inject(
    shared: Arc<Shared>,
    server: Arc<TempPostgres>,
    bouncer: Option<Arc<TempPgBouncer>>,
    nets: Arc<Vec<NodeNet>>,
    url: String,
) -> Vec<(Fault, u64)> {
    let options = &shared.options;
    let mut counts: HashMap<Fault, u64> = HashMap::new();
    let mut rng = Rng(options.seed.wrapping_mul(31).wrapping_add(7));
    let mut saboteur = Saboteur {
        url: url.clone(),
        conn: None,
    };
    let config = node_config();
    let silent_for = (config.listener_probe_interval + config.listener_timeout) * 2;
    loop {
        tokio::time::sleep(options.fault_every).await;
        if !shared.running.load(Ordering::Relaxed) || options.faults.is_empty() {
            break;
        }
        let fault = options.faults[rng.below(options.faults.len())];
        let node = rng.below(nets.len());
        *counts.entry(fault).or_default() += 1;
        shared
            .fault_log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((Instant::now(), fault, node));
        match fault {
            Fault::KillListener => {
                saboteur
                    .terminate("application_name LIKE 'pgsession-listener %'")
                    .await;
            }
            Fault::KillAnnouncer => {
                saboteur
                    .terminate("application_name = 'pgsession-announcer'")
                    .await;
            }
            Fault::KillPool => {
                saboteur
                    .terminate("application_name LIKE 'soak-node-%'")
                    .await;
            }
            Fault::KillAll => {
                saboteur.terminate("true").await;
            }
            Fault::KillRandom => {
                saboteur.terminate("random() < 0.4").await;
            }
            Fault::Restart => {
                saboteur.conn = None;
                let server = server.clone();
                tokio::task::spawn_blocking(move || server.restart())
                    .await
                    .expect("restart task")
                    .expect("server restarts");
            }
            Fault::HalfOpenListener => {
                nets[node].listen.pause();
                tokio::time::sleep(silent_for).await;
                nets[node].listen.disconnect_all();
                nets[node].listen.resume();
            }
            Fault::StallPool => {
                nets[node].pool.pause();
                tokio::time::sleep(Duration::from_secs(1)).await;
                nets[node].pool.resume();
            }
            Fault::KillPoolerServers => {
                if let Some(bouncer) = &bouncer {
                    let (bouncer, url) = (bouncer.clone(), url.clone());
                    let _ =
                        tokio::task::spawn_blocking(move || bouncer.kill_server_connections(&url))
                            .await;
                }
            }
            Fault::Refuse => {
                for proxy in [&nets[node].pool, &nets[node].listen] {
                    proxy.refuse_new(true);
                    proxy.disconnect_all();
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                for proxy in [&nets[node].pool, &nets[node].listen] {
                    proxy.refuse_new(false);
                }
            }
        }
    }
    let mut counts: Vec<(Fault, u64)> = counts.into_iter().collect();
    counts.sort_by_key(|(f, _)| {
        Fault::ALL
            .iter()
            .position(|g| g == f)
            .unwrap_or(Fault::ALL.len())
    });
    counts
}

/// Run the soak on a private server of its own.
pub async fn run(options: Options) -> Result<Report, String> {
    let server = Arc::new(
        tokio::task::spawn_blocking(TempPostgres::start)
            .await
            .map_err(|e| e.to_string())??,
    );
    let url = server.url("postgres");
    let target = {
        let addr = format!("127.0.0.1:{}", server.port());
        addr.parse().map_err(|e| format!("{addr}: {e}"))?
    };
    let mut options = options;
    let bouncer = if options.through_pgbouncer {
        if !options.faults.is_empty() && !options.faults.contains(&Fault::KillPoolerServers) {
            options.faults.push(Fault::KillPoolerServers);
        }
        let bouncer = tokio::task::spawn_blocking(move || TempPgBouncer::start(target))
            .await
            .map_err(|e| e.to_string())??;
        Some(Arc::new(bouncer))
    } else {
        None
    };
    // Pools reach the server through the pooler, if any; listeners always directly.
    let pool_target = bouncer.as_ref().map_or(target, |b| b.addr());
    let mut nets = Vec::new();
    let mut nodes = Vec::new();
    for i in 0..options.nodes {
        let net = NodeNet {
            pool: FaultProxy::start(pool_target).await,
            listen: FaultProxy::start(target).await,
        };
        let config = Config {
            listen_url: Some(net.listen.proxied_url(&url)),
            transaction_pooling: bouncer.is_some(),
            ..node_config()
        };
        let pool_url = format!(
            "{}?application_name=soak-node-{i}",
            net.pool.proxied_url(&url)
        );
        let node = SessionManager::connect(config, &pool_url)
            .await
            .map_err(|e| format!("node {i} starts: {e}"))?;
        tokio::time::timeout(Duration::from_secs(15), node.wait_for_cache())
            .await
            .map_err(|_| format!("node {i}'s listener is not up within 15 s"))?;
        nets.push(net);
        nodes.push(node);
    }

    let users = (options.sessions / SLOTS_PER_USER).max(1);
    let shared = Arc::new(Shared {
        nodes,
        slots: Vec::new(),
        slot_writes: (0..users * SLOTS_PER_USER)
            .map(|_| tokio::sync::Mutex::new(()))
            .collect(),
        by_user: (0..users).map(|_| Mutex::new(Vec::new())).collect(),
        running: AtomicBool::new(true),
        fault_log: Mutex::new(Vec::new()),
        report: Mutex::new(Report::default()),
        reads: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        options: options.clone(),
    });
    let mut slots = Vec::new();
    for i in 0..users * SLOTS_PER_USER {
        slots.push(Mutex::new(
            shared.create(i % options.nodes, i / SLOTS_PER_USER).await,
        ));
    }
    let shared = {
        let mut s = Arc::into_inner(shared).expect("no other owner yet");
        s.slots = slots;
        Arc::new(s)
    };

    let nets = Arc::new(nets);
    let faults = tokio::spawn(inject(
        shared.clone(),
        server.clone(),
        bouncer.clone(),
        nets.clone(),
        url.clone(),
    ));
    let mut workers = Vec::new();
    for node in 0..options.nodes {
        for task in 0..options.tasks_per_node {
            workers.push(tokio::spawn(worker(shared.clone(), node, task)));
        }
    }
    tokio::time::sleep(options.duration).await;
    shared.running.store(false, Ordering::SeqCst);
    for w in workers {
        w.await.map_err(|e| format!("worker: {e}"))?;
    }
    let fault_counts = faults.await.map_err(|e| format!("fault task: {e}"))?;
    for net in nets.iter() {
        net.pool.resume();
        net.listen.resume();
        net.pool.refuse_new(false);
        net.listen.refuse_new(false);
    }

    quiesce(&shared, &url).await?;
    let mut report = std::mem::take(&mut *shared.report());
    report.reads = shared.reads.load(Ordering::Relaxed);
    report.failed = shared.failed.load(Ordering::Relaxed);
    report.faults = fault_counts;
    check_final(&shared, &url, &mut report).await?;
    for node in &shared.nodes {
        // Shutdown after faults may report a flush that failed earlier; not a verdict.
        let _ = node.shutdown().await;
    }
    Ok(report)
}

/// Wait until every node trusts its cache and no invalidation is left to announce.
async fn quiesce(shared: &Shared, url: &str) -> Result<(), String> {
    for (i, node) in shared.nodes.iter().enumerate() {
        tokio::time::timeout(Duration::from_secs(30), node.wait_for_cache())
            .await
            .map_err(|_| format!("node {i} does not trust its cache 30 s after the faults"))?;
    }
    let mut conn = PgConnection::connect(url)
        .await
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM sessions_outbox")
            .fetch_one(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        if left == 0 {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("{left} invalidations still unannounced after 30 s"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Announced means committed to the notification queue; delivery takes a moment more.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(())
}

async fn check_final(shared: &Shared, url: &str, report: &mut Report) -> Result<(), String> {
    let mut conn = PgConnection::connect(url)
        .await
        .map_err(|e| e.to_string())?;
    type Attributes = serde_json::Map<String, serde_json::Value>;
    let rows: Vec<(SessionId, i64, sqlx::types::Json<Attributes>)> =
        sqlx::query_as("SELECT id, version, attributes FROM sessions")
            .fetch_all(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
    let db: HashMap<SessionId, (i64, Attributes)> = rows
        .into_iter()
        .map(|(id, v, attrs)| (id, (v, attrs.0)))
        .collect();
    let all: Vec<Arc<Tracked>> = shared
        .by_user
        .iter()
        .flat_map(|u| u.lock().unwrap_or_else(|e| e.into_inner()).clone())
        .collect();
    for tracked in &all {
        let in_db = db.get(&tracked.id);
        let acked_values = tracked.history().values.clone();
        match in_db {
            None if !tracked.delete_attempted.load(Ordering::SeqCst) => {
                report.lost += 1;
                report.example(format!("lost: session {} is gone", tracked.id));
            }
            None => {}
            Some((_, attrs)) => {
                for (key, acked) in &acked_values {
                    let stored = attrs.get(key).and_then(|v| v.as_i64());
                    if stored.is_none_or(|s| s < *acked) {
                        report.lost += 1;
                        report.example(format!(
                            "lost: {} {key} = {stored:?} in the database, {acked} acknowledged",
                            tracked.id
                        ));
                    }
                }
            }
        }
        let expected = in_db.map(|(v, _)| *v);
        for (i, node) in shared.nodes.iter().enumerate() {
            let served = node
                .get_session(&tracked.token)
                .await
                .map_err(|e| format!("final read on node {i}: {e}"))?
                .map(|s| s.version());
            if served != expected {
                report.divergent += 1;
                report.example(format!(
                    "divergent: node {i} serves {} at {served:?}, the database has {expected:?}",
                    tracked.id
                ));
            }
        }
    }
    Ok(())
}
