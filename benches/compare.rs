//! pgsession against the raw SQL floor and against tower-sessions, side by side in one run on
//! one PostgreSQL.
//!
//! ```text
//! cargo bench --bench compare
//! ```
//!
//! Systems:
//! * `pgsession`: `SessionManager` with the default configuration (per-user cap 5);
//! * `raw`: the very statements pgsession sends, issued directly through sqlx on a pool with
//!   the same options: one round trip per operation, what no library can beat;
//! * `tower`: tower-sessions' `PostgresStore` (tower-sessions-sqlx-store);
//! * `tower+moka`: the same behind `CachingSessionStore` with a `MokaStore`.
//!
//! Uses `DATABASE_URL` if set, otherwise a private PostgreSQL with fsync on and
//! pg_stat_statements loaded (for counting statements per operation).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chrono::Utc;
use pgsession::{Config, Session, SessionManager, SessionToken};
use pgsession_testkit::{ServerOptions, TempPostgres};
use serde_json::{Map, Value, json};
use sqlx::Connection;
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::types::Json;
use tower_sessions_core::session::{Id, Record};
use tower_sessions_core::{CachingSessionStore, SessionStore};
use tower_sessions_moka_store::MokaStore;
use tower_sessions_sqlx_store::PostgresStore;
use uuid::Uuid;

/// Pool size for every system.
const POOL: u32 = 10;
/// The benchmark's own schemas, so that a `DATABASE_URL` database's tables are never touched.
const SCHEMA: &str = "pgsession_bench";
const TOWER_SCHEMA: &str = "pgsession_bench_tower";

fn config() -> Config {
    Config {
        schema: Some(SCHEMA.into()),
        // Some sessions are inserted by SQL with legacy tokens, as migration 3 made them.
        accept_legacy_tokens: true,
        ..Config::default()
    }
}

/// The floor's own schema (created from `pgsession::schema_sql`), which no manager sweeps.
const RAW_SCHEMA: &str = "pgsession_bench_raw";

fn raw_config() -> Config {
    Config {
        schema: Some(RAW_SCHEMA.into()),
        ..Config::default()
    }
}

/// The statements pgsession sends, taken from the library itself so that the floor runs
/// exactly what pgsession runs, on the floor's own schema.
struct RawSql {
    select: &'static str,
    create: &'static str,
    insert: &'static str,
    update: &'static str,
    delete: &'static str,
}

fn raw_sql() -> &'static RawSql {
    static SQL: std::sync::OnceLock<RawSql> = std::sync::OnceLock::new();
    SQL.get_or_init(|| {
        let all: HashMap<_, _> = pgsession::statements(&raw_config())
            .unwrap()
            .into_iter()
            .collect();
        let get = |name: &str| -> &'static str {
            let text = all
                .get(name)
                .unwrap_or_else(|| panic!("no statement {name}"));
            Box::leak(text.clone().into_boxed_str())
        };
        RawSql {
            select: get("select_one"),
            create: get("create_capped"),
            insert: get("insert"),
            update: get("update"),
            delete: get("delete"),
        }
    })
}

/// The design pgsession did not keep: NOTIFY inside the update (to a channel two managers
/// listen on, with a payload they ignore, so that delivery costs what it would).
const RAW_UPDATE_NOTIFY: &str = "WITH updated AS ( \
     UPDATE \"pgsession_bench_raw\".\"sessions\" SET \
         attributes = (attributes - $2::text[]) || $3::jsonb, \
         expires_at = coalesce($4, expires_at), \
         version = version + 1, \
         updated_at = $5, \
         last_accessed_at = greatest(last_accessed_at, $5) \
     WHERE id = $1 AND expires_at > $5 \
       AND ($6::timestamptz IS NULL OR greatest(last_accessed_at, $7) > $6) \
     RETURNING id, user_id, version, created_at, updated_at, last_accessed_at, expires_at, \
         CASE WHEN version = $8 + 1 THEN NULL ELSE attributes END AS attributes \
 ) \
 SELECT updated.*, \
        pg_notify('pgsession.pgsession_bench.sessions', 'p raw')::text \
 FROM updated";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Pg,
    PgNoCap,
    Raw,
    RawPool,
    RawInsert,
    RawNotify,
    Tower,
    TowerMoka,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Pg => "pgsession",
            Kind::PgNoCap => "pgsession (no cap)",
            Kind::Raw => "raw SQL floor",
            Kind::RawPool => "raw via sqlx pool",
            Kind::RawInsert => "raw INSERT",
            Kind::RawNotify => "raw, NOTIFY in the write",
            Kind::Tower => "tower",
            Kind::TowerMoka => "tower+moka",
        }
    }
}

/// A session as each system hands it out.
#[derive(Clone)]
#[allow(clippy::large_enum_variant)] // a benchmark's handle; size does not matter here
enum Handle {
    Pg(Session, SessionToken),
    /// Id and current version.
    Raw(Uuid, i64),
    Tower(Record),
}

impl Handle {
    fn key(&self) -> Key {
        match self {
            Handle::Pg(_, t) => Key::Token(t.clone()),
            Handle::Raw(id, _) => Key::Uuid(*id),
            Handle::Tower(r) => Key::Tower(r.id),
        }
    }
}

#[derive(Clone)]
enum Key {
    Uuid(Uuid),
    Token(SessionToken),
    Tower(Id),
}

#[derive(Clone)]
struct Systems {
    pg: SessionManager,
    pg_nocap: SessionManager,
    /// The floor's connections, used directly (no pool in between).
    direct: Arc<DirectConns>,
    /// A plain sqlx pool, as most applications use it.
    raw: PgPool,
    tower: PostgresStore,
    tower_moka: CachingSessionStore<MokaStore, PostgresStore>,
}

#[derive(Clone, Copy)]
enum Size {
    Small,
    Large,
}

fn attributes(size: Size) -> Map<String, Value> {
    let mut map = Map::new();
    map.insert("role".into(), json!("admin"));
    map.insert("theme".into(), json!("dark"));
    if let Size::Large = size {
        map.insert("profile".into(), json!("p".repeat(4096 - 12)));
    }
    map
}

/// Connections used directly, one per concurrent task, opened on demand.
struct DirectConns {
    url: String,
    idle: std::sync::Mutex<Vec<PgConnection>>,
}

impl DirectConns {
    async fn take(&self) -> PgConnection {
        let idle = self.idle.lock().unwrap().pop();
        match idle {
            Some(conn) => conn,
            None => PgConnection::connect(&self.url).await.unwrap(),
        }
    }
    fn put(&self, conn: PgConnection) {
        self.idle.lock().unwrap().push(conn);
    }
}

/// Run a raw query on the floor's direct connections, or through the sqlx pool for
/// `Kind::RawPool`.
macro_rules! on_raw {
    ($sys:expr, $kind:expr, $query:expr, $method:ident) => {{
        if $kind == Kind::RawPool {
            $query.$method(&$sys.raw).await
        } else {
            let mut conn = $sys.direct.take().await;
            let result = $query.$method(&mut conn).await;
            $sys.direct.put(conn);
            result
        }
    }};
}

impl Systems {
    async fn create(&self, kind: Kind, size: Size) -> Handle {
        let attrs = attributes(size);
        match kind {
            Kind::Pg | Kind::PgNoCap => {
                let m = if kind == Kind::Pg {
                    &self.pg
                } else {
                    &self.pg_nocap
                };
                let (s, t) = m.create_session(Uuid::new_v4(), attrs).await.unwrap();
                Handle::Pg(s, t)
            }
            Kind::Raw | Kind::RawPool | Kind::RawInsert | Kind::RawNotify => {
                let id = Uuid::new_v4();
                let now = Utc::now();
                let expires = now + chrono::Duration::days(30);
                if kind != Kind::RawInsert {
                    let query = sqlx::query_as::<_, (Vec<Uuid>, Option<i64>, Option<String>)>(
                        raw_sql().create,
                    )
                    .bind(id)
                    .bind(Uuid::new_v4().to_string())
                    .bind(Json(&attrs))
                    .bind(now)
                    .bind(expires)
                    .bind(now - chrono::Duration::hours(48))
                    .bind(5i32)
                    .bind(false)
                    .bind(None::<&str>)
                    .bind(None::<&str>)
                    .bind(None::<&str>)
                    .bind(Json(serde_json::Map::new()))
                    .bind(None::<chrono::DateTime<Utc>>)
                    .bind(false);
                    on_raw!(self, kind, query, fetch_one).unwrap();
                } else {
                    let query = sqlx::query(raw_sql().insert)
                        .bind(id)
                        .bind(Uuid::new_v4().to_string())
                        .bind(Json(&attrs))
                        .bind(now)
                        .bind(expires)
                        .bind(None::<&str>)
                        .bind(None::<&str>)
                        .bind(None::<&str>)
                        .bind(Json(serde_json::Map::new()))
                        .bind(None::<chrono::DateTime<Utc>>);
                    on_raw!(self, kind, query, execute).unwrap();
                }
                Handle::Raw(id, 1)
            }
            Kind::Tower | Kind::TowerMoka => {
                let mut record = Record {
                    id: Id::default(),
                    data: attrs.into_iter().collect(),
                    expiry_date: time::OffsetDateTime::now_utc() + time::Duration::days(30),
                };
                if kind == Kind::Tower {
                    self.tower.create(&mut record).await.unwrap();
                } else {
                    self.tower_moka.create(&mut record).await.unwrap();
                }
                Handle::Tower(record)
            }
        }
    }

    async fn get(&self, kind: Kind, key: Key) -> Option<Handle> {
        match (kind, key) {
            (Kind::Pg, Key::Token(t)) => self
                .pg
                .get_session(&t)
                .await
                .unwrap()
                .map(|s| Handle::Pg(s, t)),
            (Kind::PgNoCap, Key::Token(t)) => self
                .pg_nocap
                .get_session(&t)
                .await
                .unwrap()
                .map(|s| Handle::Pg(s, t)),
            (Kind::Raw | Kind::RawPool | Kind::RawInsert | Kind::RawNotify, Key::Uuid(id)) => {
                let query = sqlx::query(raw_sql().select).bind(id);
                on_raw!(self, kind, query, fetch_optional)
                    .unwrap()
                    .map(|row| Handle::Raw(id, sqlx::Row::get(&row, "version")))
            }
            (Kind::Tower, Key::Tower(id)) => self.tower.load(&id).await.unwrap().map(Handle::Tower),
            (Kind::TowerMoka, Key::Tower(id)) => {
                self.tower_moka.load(&id).await.unwrap().map(Handle::Tower)
            }
            _ => unreachable!("key of another system"),
        }
    }

    /// Change one attribute and persist it (the handle is what a preceding get returned).
    async fn update(&self, kind: Kind, handle: &mut Handle, n: u64) {
        match (kind, handle) {
            (Kind::Pg, Handle::Pg(s, _)) | (Kind::PgNoCap, Handle::Pg(s, _)) => {
                let m = if kind == Kind::Pg {
                    &self.pg
                } else {
                    &self.pg_nocap
                };
                s.set("theme", n).unwrap();
                m.update_session(s).await.unwrap();
            }
            (
                Kind::Raw | Kind::RawPool | Kind::RawInsert | Kind::RawNotify,
                Handle::Raw(id, version),
            ) => {
                let now = Utc::now();
                let mut set = Map::new();
                set.insert("theme".into(), json!(n));
                let sql = if kind == Kind::RawNotify {
                    RAW_UPDATE_NOTIFY
                } else {
                    raw_sql().update
                };
                let mut row = sqlx::query(sql)
                    .bind(*id)
                    .bind(Vec::<&str>::new())
                    .bind(Json(&set))
                    .bind(None::<chrono::DateTime<Utc>>)
                    .bind(now)
                    .bind(now - chrono::Duration::hours(48))
                    .bind(now)
                    .bind(*version);
                if kind != Kind::RawNotify {
                    row = row
                        .bind(Json(serde_json::Map::new()))
                        .bind(None::<chrono::DateTime<Utc>>)
                        .bind(None::<i64>)
                        .bind(Config::default().max_session_size as i64);
                }
                let row = on_raw!(self, kind, row, fetch_optional)
                    .unwrap()
                    .expect("row updated");
                *version = sqlx::Row::get(&row, "version");
            }
            (Kind::Tower, Handle::Tower(r)) => {
                r.data.insert("theme".into(), json!(n));
                self.tower.save(r).await.unwrap();
            }
            (Kind::TowerMoka, Handle::Tower(r)) => {
                r.data.insert("theme".into(), json!(n));
                self.tower_moka.save(r).await.unwrap();
            }
            _ => unreachable!("handle of another system"),
        }
    }

    async fn delete(&self, kind: Kind, key: Key) {
        match (kind, key) {
            (Kind::Pg, Key::Token(t)) => {
                assert!(self.pg.delete_session(t.id()).await.unwrap());
            }
            (Kind::PgNoCap, Key::Token(t)) => {
                assert!(self.pg_nocap.delete_session(t.id()).await.unwrap());
            }
            (Kind::Raw | Kind::RawPool | Kind::RawInsert | Kind::RawNotify, Key::Uuid(id)) => {
                let query = sqlx::query(raw_sql().delete).bind(id);
                let row = on_raw!(self, kind, query, fetch_optional).unwrap();
                assert!(row.is_some());
            }
            (Kind::Tower, Key::Tower(id)) => self.tower.delete(&id).await.unwrap(),
            (Kind::TowerMoka, Key::Tower(id)) => self.tower_moka.delete(&id).await.unwrap(),
            _ => unreachable!("key of another system"),
        }
    }
}

// ---- measurement ---------------------------------------------------------------------------

#[derive(Clone, Default)]
struct Figures {
    /// Per-operation latencies, ns.
    samples: Vec<u64>,
    ops: u64,
    elapsed: Duration,
}

impl Figures {
    fn pct(&self, p: f64) -> f64 {
        let mut s = self.samples.clone();
        s.sort_unstable();
        s[((s.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
    }
    fn median_us(&self) -> f64 {
        self.pct(0.5)
    }
    fn p99_us(&self) -> f64 {
        self.pct(0.99)
    }
    fn throughput(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
    fn merge(parts: Vec<Figures>, elapsed: Duration) -> Figures {
        let mut all = Figures {
            elapsed,
            ..Figures::default()
        };
        for p in parts {
            all.ops += p.ops;
            all.samples.extend(p.samples);
        }
        all
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Op {
    Create,
    GetHit,
    GetMiss,
    Update,
    Delete,
    Mixed,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::GetHit => "get (cache hit)",
            Op::GetMiss => "get (cache miss)",
            Op::Update => "update 1 attribute",
            Op::Delete => "delete",
            Op::Mixed => "mixed 95/4/1",
        }
    }
}

/// Tiny deterministic generator (xorshift) for the mixed workload.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Run `op` on `kind` with `tasks` concurrent tasks. Single-operation workloads do `count`
/// operations in total; the mixed workload runs for `duration`.
async fn measure(
    sys: &Systems,
    kind: Kind,
    op: Op,
    size: Size,
    tasks: usize,
    count: usize,
    duration: Duration,
) -> Figures {
    // Prepare inputs outside the timed region.
    let per_task = count.div_ceil(tasks);
    let mut inputs: Vec<Vec<Handle>> = Vec::new();
    let pool: Arc<Vec<Handle>>;
    match op {
        Op::GetHit | Op::GetMiss | Op::Update | Op::Delete => {
            // GetHit reuses a small warm set many times; the others need fresh sessions.
            let fresh = if op == Op::GetHit {
                500
            } else {
                per_task * tasks
            };
            let mut handles = Vec::with_capacity(fresh);
            for _ in 0..fresh {
                handles.push(sys.create(creator(kind, op), size).await);
            }
            if matches!(op, Op::GetHit) {
                for h in &handles {
                    sys.get(kind, h.key()).await.unwrap();
                }
            }
            if op == Op::Update {
                // Updates follow the get of the same request, as in a web handler.
                let mut loaded = Vec::with_capacity(handles.len());
                for h in &handles {
                    loaded.push(sys.get(kind, h.key()).await.unwrap());
                }
                handles = loaded;
            }
            for t in 0..tasks {
                inputs.push(
                    handles
                        .iter()
                        .skip(t * per_task)
                        .take(per_task)
                        .cloned()
                        .collect(),
                );
            }
            pool = Arc::new(handles);
        }
        Op::Create => {
            inputs = vec![Vec::new(); tasks];
            pool = Arc::new(Vec::new());
        }
        Op::Mixed => {
            let mut handles = Vec::with_capacity(1000);
            for _ in 0..1000 {
                handles.push(sys.create(kind, size).await);
            }
            for h in &handles {
                sys.get(kind, h.key()).await.unwrap();
            }
            inputs = vec![Vec::new(); tasks];
            pool = Arc::new(handles);
        }
    }

    let start = Arc::new(tokio::sync::Barrier::new(tasks + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let mut joins = Vec::new();
    for (t, mine) in inputs.into_iter().enumerate() {
        let sys = sys.clone();
        let start = start.clone();
        let stop = stop.clone();
        let pool = pool.clone();
        joins.push(tokio::spawn(async move {
            let mut f = Figures::default();
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((t as u64 + 1) * 0x1234_5678_9ABC_DEF1));
            start.wait().await;
            match op {
                Op::Create => {
                    for _ in 0..per_task {
                        let t0 = Instant::now();
                        sys.create(kind, size).await;
                        f.samples.push(t0.elapsed().as_nanos() as u64);
                    }
                }
                Op::GetHit => {
                    for i in 0..per_task {
                        let key = pool[(i * 7 + t) % pool.len()].key();
                        let t0 = Instant::now();
                        let found = sys.get(kind, key).await;
                        f.samples.push(t0.elapsed().as_nanos() as u64);
                        assert!(found.is_some());
                        // A hit completes without suspending: let the other tasks run.
                        if tasks > 1 {
                            tokio::task::yield_now().await;
                        }
                    }
                }
                Op::GetMiss => {
                    let misses_before = match kind {
                        Kind::Pg => sys.pg.stats().misses,
                        _ => 0,
                    };
                    for h in &mine {
                        let t0 = Instant::now();
                        let found = sys.get(kind, h.key()).await;
                        f.samples.push(t0.elapsed().as_nanos() as u64);
                        assert!(found.is_some());
                    }
                    if kind == Kind::Pg {
                        // Every read above really went to the database.
                        assert!(sys.pg.stats().misses - misses_before >= mine.len() as u64);
                    }
                }
                Op::Update => {
                    for (i, mut h) in mine.into_iter().enumerate() {
                        let t0 = Instant::now();
                        sys.update(kind, &mut h, i as u64).await;
                        f.samples.push(t0.elapsed().as_nanos() as u64);
                    }
                }
                Op::Delete => {
                    for h in &mine {
                        let t0 = Instant::now();
                        sys.delete(kind, h.key()).await;
                        f.samples.push(t0.elapsed().as_nanos() as u64);
                    }
                }
                Op::Mixed => {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let roll = rng.next() % 100;
                        let key = pool[(rng.next() % pool.len() as u64) as usize].key();
                        let t0 = Instant::now();
                        if roll < 95 {
                            assert!(sys.get(kind, key).await.is_some());
                        } else if roll < 99 {
                            let mut h = sys.get(kind, key).await.unwrap();
                            n += 1;
                            sys.update(kind, &mut h, n).await;
                        } else {
                            let h = sys.create(kind, size).await;
                            sys.delete(kind, h.key()).await;
                        }
                        f.samples.push(t0.elapsed().as_nanos() as u64);
                        if roll < 95 {
                            tokio::task::yield_now().await;
                        }
                    }
                }
            }
            f.ops = f.samples.len() as u64;
            f
        }));
    }
    start.wait().await;
    let t0 = Instant::now();
    if op == Op::Mixed {
        tokio::time::sleep(duration).await;
        stop.store(true, Ordering::Relaxed);
    }
    let mut parts = Vec::new();
    for j in joins {
        parts.push(j.await.unwrap());
    }
    Figures::merge(parts, t0.elapsed())
}

/// Who creates the sessions a workload reads. For cache misses, a system that shares the
/// table but not the cache, so that the reading system has never seen them.
fn creator(kind: Kind, op: Op) -> Kind {
    match (op, kind) {
        (Op::GetMiss, Kind::Pg) => Kind::PgNoCap,
        (Op::GetMiss, Kind::PgNoCap) => Kind::Pg,
        (Op::GetMiss, Kind::TowerMoka) => Kind::Tower,
        _ => kind,
    }
}

async fn clear_caches(sys: &Systems) {
    sys.pg.clear_cache().await.unwrap();
    sys.pg_nocap.clear_cache().await.unwrap();
    // A clear message is also sent to the other node: wait until it has emptied.
    for m in [&sys.pg, &sys.pg_nocap] {
        while m.stats().entries > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

// ---- statements per operation ---------------------------------------------------------------

async fn statements_per_op(sys: &Systems, admin: &PgPool, kind: Kind, op: Op) -> Option<f64> {
    let n = 50;
    let mut handles = Vec::new();
    for _ in 0..n {
        handles.push(sys.create(creator(kind, op), Size::Small).await);
    }
    if op == Op::Update || op == Op::GetHit {
        let mut loaded = Vec::new();
        for h in &handles {
            loaded.push(sys.get(kind, h.key()).await.unwrap());
        }
        handles = loaded;
    }
    // Let sqlx's ping-on-release settle before counting.
    tokio::time::sleep(Duration::from_millis(50)).await;
    sqlx::query("SELECT pg_stat_statements_reset()")
        .execute(admin)
        .await
        .ok()?;
    for (i, h) in handles.iter_mut().enumerate() {
        match op {
            Op::Create => {
                sys.create(kind, Size::Small).await;
            }
            Op::GetHit | Op::GetMiss => {
                sys.get(kind, h.key()).await.unwrap();
            }
            Op::Update => sys.update(kind, h, i as u64).await,
            Op::Delete => sys.delete(kind, h.key()).await,
            Op::Mixed => unreachable!(),
        }
    }
    let calls: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements \
         WHERE query NOT ILIKE '%pg_stat_statements%' AND query <> 'SELECT $1'",
    )
    .fetch_one(admin)
    .await
    .ok()?;
    Some(calls as f64 / n as f64)
}

// ---- memory -----------------------------------------------------------------------------------

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Child-process mode: cache 100k sessions in one system and print the RSS growth.
async fn memory_child(url: &str, which: &str) {
    let n = 100_000u64;
    let config = Config {
        // Shards fill unevenly; room for all of them.
        cache_capacity: 2 * n as usize,
        max_sessions_per_user: None,
        run_cleanup: false,
        ..config()
    };
    match which {
        "pgsession" => {
            let m = SessionManager::connect(config, url).await.unwrap();
            // Legacy tokens (UUIDs) whose hashes are the stored ids, as migration 3 made them.
            let uuids: Vec<Uuid> = sqlx::query_scalar(
                "WITH t AS (SELECT gen_random_uuid() AS u FROM generate_series(1, $1)), \
                 inserted AS (INSERT INTO pgsession_bench.sessions \
                     SELECT encode(substring(sha256(uuid_send(u)) FROM 1 FOR 16), 'hex')::uuid, \
                     gen_random_uuid()::text, 1, '{\"role\":\"admin\",\"theme\":\"dark\"}', \
                     now(), now(), now(), now() + interval '1 day' FROM t) \
                 SELECT u FROM t",
            )
            .bind(n as i64)
            .fetch_all(m.pool())
            .await
            .unwrap();
            // Flush the accesses the fills record so that only the cache remains.
            let tokens: Vec<SessionToken> = uuids
                .iter()
                .map(|u| u.to_string().parse().unwrap())
                .collect();
            let ids: Vec<pgsession::SessionId> = tokens.iter().map(|t| t.id()).collect();
            let before = rss_bytes();
            for t in &tokens {
                m.get_session(t).await.unwrap().unwrap();
            }
            m.flush_last_access().await.unwrap();
            let after = rss_bytes();
            assert_eq!(m.stats().entries as u64, n, "every session cached");
            println!("{}", (after.saturating_sub(before)) / n);
            sqlx::query("DELETE FROM pgsession_bench.sessions WHERE id = ANY($1)")
                .bind(&ids)
                .execute(m.pool())
                .await
                .unwrap();
        }
        _ => {
            let moka = MokaStore::new(Some(n));
            let before = rss_bytes();
            for _ in 0..n {
                let mut record = Record {
                    id: Id::default(),
                    data: attributes(Size::Small).into_iter().collect(),
                    expiry_date: time::OffsetDateTime::now_utc() + time::Duration::days(1),
                };
                moka.create(&mut record).await.unwrap();
            }
            let after = rss_bytes();
            println!("{}", (after.saturating_sub(before)) / n);
        }
    }
}

fn memory_per_session(url: &str, which: &str) -> Option<u64> {
    let exe = std::env::current_exe().ok()?;
    let out = std::process::Command::new(exe)
        .env("PGSESSION_BENCH_MEMORY", which)
        .env("PGSESSION_BENCH_URL", url)
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()?
        .trim()
        .parse()
        .ok()
}

// ---- main -----------------------------------------------------------------------------------

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if let Ok(which) = std::env::var("PGSESSION_BENCH_MEMORY") {
        let url = std::env::var("PGSESSION_BENCH_URL").unwrap();
        runtime.block_on(memory_child(&url, &which));
        return;
    }
    let (url, _server) = match std::env::var("DATABASE_URL") {
        Ok(url) => (url, None),
        Err(_) => {
            let server = TempPostgres::start_with(ServerOptions {
                durable: true,
                settings: vec![(
                    "shared_preload_libraries".into(),
                    "pg_stat_statements".into(),
                )],
                ..ServerOptions::default()
            })
            .expect("private PostgreSQL");
            (server.url("postgres"), Some(server))
        }
    };
    runtime.block_on(run(url));
}

struct Row {
    op: Op,
    size: &'static str,
    tasks: usize,
    figures: Vec<(Kind, Figures)>,
}

async fn run(url: String) {
    let admin = PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .unwrap();
    let stats_available = sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(&admin)
        .await
        .is_ok()
        && sqlx::query("SELECT pg_stat_statements_reset()")
            .execute(&admin)
            .await
            .is_ok();

    let pg = SessionManager::connect(config(), &url).await.unwrap();
    let pg_nocap = SessionManager::connect(
        Config {
            max_sessions_per_user: None,
            ..config()
        },
        &url,
    )
    .await
    .unwrap();
    // The floor's own schema, exactly as pgsession would create it.
    sqlx::raw_sql("DROP SCHEMA IF EXISTS \"pgsession_bench_raw\" CASCADE")
        .execute(&admin)
        .await
        .unwrap();
    let raw_schema = pgsession::schema_sql(&raw_config()).unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(raw_schema))
        .execute(&admin)
        .await
        .unwrap();
    sqlx::query("TRUNCATE pgsession_bench.sessions")
        .execute(&admin)
        .await
        .unwrap();
    // Same pool options as SessionManager::connect uses (no ping before each checkout).
    let raw = PgPoolOptions::new()
        .max_connections(POOL)
        .test_before_acquire(false)
        .connect(&url)
        .await
        .unwrap();
    let tower_pool = sqlx08::postgres::PgPoolOptions::new()
        .max_connections(POOL)
        .test_before_acquire(false)
        .connect(&url)
        .await
        .unwrap();
    let tower = PostgresStore::new(tower_pool)
        .with_schema_name(TOWER_SCHEMA)
        .unwrap();
    tower.migrate().await.unwrap();
    sqlx::query("TRUNCATE pgsession_bench_tower.session")
        .execute(&admin)
        .await
        .unwrap();
    let tower_moka = CachingSessionStore::new(MokaStore::new(Some(100_000)), tower.clone());
    let sys = Systems {
        pg,
        pg_nocap,
        direct: Arc::new(DirectConns {
            url: url.clone(),
            idle: std::sync::Mutex::new(Vec::new()),
        }),
        raw,
        tower,
        tower_moka,
    };

    println!("# pgsession vs raw SQL vs tower-sessions (one run)\n");
    println!(
        "machine: {} cores; PostgreSQL {}; fsync on; pool of {POOL} connections per system\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        sqlx::query_scalar::<_, String>("SHOW server_version")
            .fetch_one(&admin)
            .await
            .unwrap()
    );

    let all = [
        Kind::Pg,
        Kind::Raw,
        Kind::RawPool,
        Kind::Tower,
        Kind::TowerMoka,
    ];
    let mut plan: Vec<(Op, Size, usize, Vec<Kind>, usize)> = Vec::new();
    let create = [
        Kind::Pg,
        Kind::Raw,
        Kind::PgNoCap,
        Kind::RawInsert,
        Kind::Tower,
        Kind::TowerMoka,
    ];
    for size in [Size::Small, Size::Large] {
        plan.push((Op::Create, size, 1, create.to_vec(), 1000));
        plan.push((Op::Create, size, 8, create.to_vec(), 4000));
        plan.push((Op::GetHit, size, 1, all.to_vec(), 200_000));
        plan.push((Op::GetMiss, size, 1, all.to_vec(), 1000));
        let update = [
            Kind::Pg,
            Kind::Raw,
            Kind::RawPool,
            Kind::RawNotify,
            Kind::Tower,
            Kind::TowerMoka,
        ];
        plan.push((Op::Update, size, 1, update.to_vec(), 1000));
        plan.push((Op::Update, size, 8, update.to_vec(), 4000));
        plan.push((Op::Delete, size, 1, all.to_vec(), 1000));
        for tasks in [1, 8, 32] {
            plan.push((Op::Mixed, size, tasks, all.to_vec(), 0));
        }
    }
    // PGSESSION_BENCH_ONLY=update,mixed runs only those workloads (while working on them).
    if let Ok(only) = std::env::var("PGSESSION_BENCH_ONLY") {
        let wanted: Vec<&str> = only.split(',').collect();
        plan.retain(|(op, ..)| wanted.iter().any(|w| op.name().starts_with(w)));
    }
    // PGSESSION_BENCH_SYSTEMS=tower+moka,pgsession keeps only those systems (for profiling).
    if let Ok(only) = std::env::var("PGSESSION_BENCH_SYSTEMS") {
        let wanted: Vec<&str> = only.split(',').collect();
        for (_, _, _, kinds, _) in &mut plan {
            kinds.retain(|k| wanted.contains(&k.name()));
        }
        plan.retain(|(_, _, _, kinds, _)| kinds.contains(&Kind::Pg));
    }
    let mixed_for = Duration::from_secs(
        std::env::var("PGSESSION_BENCH_MIXED_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(2),
    );
    let rounds = 3;
    let mut rows = Vec::new();
    for (op, size, tasks, kinds, count) in plan {
        // Rounds interleave the systems; each system's round with the median throughput is
        // reported.
        let mut per_kind: HashMap<&'static str, Vec<Figures>> = HashMap::new();
        for round in 0..rounds {
            for i in 0..kinds.len() {
                let kind = kinds[(i + round) % kinds.len()];
                let count = if op == Op::GetHit
                    && matches!(kind, Kind::Raw | Kind::RawPool | Kind::Tower)
                {
                    count / 100 // a database read each: fewer suffice
                } else {
                    count
                };
                let f = measure(&sys, kind, op, size, tasks, count, mixed_for).await;
                per_kind.entry(kind.name()).or_default().push(f);
            }
        }
        let mut figures = Vec::new();
        for kind in &kinds {
            let mut fs = per_kind.remove(kind.name()).unwrap();
            fs.sort_by(|a, b| a.throughput().total_cmp(&b.throughput()));
            figures.push((*kind, fs.swap_remove(fs.len() / 2)));
        }
        let row = Row {
            op,
            size: match size {
                Size::Small => "small",
                Size::Large => "4 KiB",
            },
            tasks,
            figures,
        };
        print_row(&row);
        rows.push(row);
        // Keep the tables small between workloads.
        sqlx::query(
            "TRUNCATE pgsession_bench.sessions, pgsession_bench.sessions_outbox, \
             pgsession_bench_raw.sessions, pgsession_bench_raw.sessions_outbox, \
             pgsession_bench_tower.session",
        )
        .execute(&admin)
        .await
        .unwrap();
        clear_caches(&sys).await;
    }

    if std::env::var("PGSESSION_BENCH_ONLY").is_ok() {
        for m in [&sys.pg, &sys.pg_nocap] {
            m.shutdown().await.unwrap();
        }
        return;
    }
    println!("\n## SQL statements per operation (pg_stat_statements)\n");
    if stats_available {
        let names: Vec<&str> = all.iter().map(|k| k.name()).collect();
        println!("| operation | {} |", names.join(" | "));
        println!("|---|{}", "---|".repeat(names.len()));
        for op in [Op::Create, Op::GetHit, Op::GetMiss, Op::Update, Op::Delete] {
            let mut cells = Vec::new();
            for kind in all {
                let v = statements_per_op(&sys, &admin, kind, op).await;
                cells.push(v.map_or("n/a".to_string(), |v| format!("{v:.2}")));
            }
            println!("| {} | {} |", op.name(), cells.join(" | "));
        }
    } else {
        println!("pg_stat_statements is not available on this server: not counted");
    }

    println!("\n## Memory per cached session (100 000 small sessions, RSS growth)\n");
    let pg_mem = memory_per_session(&url, "pgsession");
    let moka_mem = memory_per_session(&url, "moka");
    let show = |m: Option<u64>| m.map_or("n/a".into(), |b| format!("{b} bytes"));
    println!("| system | bytes per cached session |");
    println!("|---|---|");
    println!("| pgsession | {} |", show(pg_mem));
    println!("| tower+moka (MokaStore) | {} |", show(moka_mem));

    for m in [&sys.pg, &sys.pg_nocap] {
        m.shutdown().await.unwrap();
    }
    let _ = rows;
}

fn print_row(row: &Row) {
    println!(
        "\n### {} ({} attributes, {} task{})\n",
        row.op.name(),
        row.size,
        row.tasks,
        if row.tasks == 1 { "" } else { "s" }
    );
    println!("| system | median | p99 | ops/s | pgsession ratio |");
    println!("|---|---|---|---|---|");
    let find = |kind: Kind| {
        row.figures
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, f)| f.clone())
    };
    for (kind, f) in &row.figures {
        // Ratio of pgsession's median latency to this system's (below 1: pgsession faster),
        // and of throughputs. The uncapped variant is compared with its own floor.
        let pg = match kind {
            Kind::RawInsert | Kind::PgNoCap => find(Kind::PgNoCap).unwrap(),
            _ => find(Kind::Pg).unwrap(),
        };
        let ratio = if matches!(kind, Kind::Pg | Kind::PgNoCap) {
            "-".to_string()
        } else {
            format!(
                "latency {:.2}x, throughput {:.2}x",
                pg.median_us() / f.median_us(),
                pg.throughput() / f.throughput()
            )
        };
        println!(
            "| {} | {:.2} µs | {:.2} µs | {:.0} | {} |",
            kind.name(),
            f.median_us(),
            f.p99_us(),
            f.throughput(),
            ratio
        );
    }
}
