//! Steady concurrent writes: pgsession against the raw SQL floor, interleaved round by round
//! on one server, every round printed, so that a bad run cannot hide behind a good median.
//!
//! ```text
//! cargo bench --bench writes                       # 10 rounds of every workload
//! PGSESSION_BENCH_ROUNDS=5 PGSESSION_BENCH_ONLY=create cargo bench --bench writes
//! ```
//!
//! Workloads, at 8 and 32 tasks, 2 s a round: `create` (a new user each time, small
//! attributes), `update` (one attribute of a cached session), `delete`, and `mixed` (95% reads,
//! 4% updates, 1% create + delete). pgsession is one manager with `Config::default()` and
//! `cache_capacity: 100_000`; the floor issues the very statements pgsession sends (taken from
//! the library) on one direct connection per task: one round trip per operation, nothing in
//! between. In each round the two run back to back, alternating which goes first.
//!
//! Uses `DATABASE_URL` if set, otherwise a fresh private PostgreSQL with fsync on.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use pgsession::{Config, Session, SessionId, SessionManager, SessionToken};
use pgsession_testkit::{ServerOptions, TempPostgres};
use serde_json::{Map, json};
use sqlx::postgres::{PgConnection, PgPoolOptions};
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, Connection};
use uuid::Uuid;

const SCHEMA: &str = "pgsession_bench_writes";
const FLOOR_SCHEMA: &str = "pgsession_bench_writes_floor";
const ROUND: Duration = Duration::from_secs(2);

fn config(schema: &str) -> Config {
    Config {
        schema: Some(schema.into()),
        cache_capacity: 100_000,
        // The sessions are inserted by SQL with legacy tokens (see `bulk_sessions`).
        accept_legacy_tokens: true,
        ..Config::default()
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Workload {
    Create,
    Update,
    Delete,
    Mixed,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::Create => "create",
            Workload::Update => "update",
            Workload::Delete => "delete",
            Workload::Mixed => "mixed",
        }
    }
}

/// The floor's statements, exactly as pgsession renders them for the floor's schema.
struct FloorSql {
    select: String,
    create: String,
    update: String,
    delete: String,
}

/// One run of one system: throughput and per-call latencies.
struct Run {
    ops: u64,
    elapsed: Duration,
    /// Sorted, in nanoseconds.
    samples: Vec<u64>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
    fn pct_ms(&self, p: f64) -> f64 {
        let i = ((self.samples.len().max(1) - 1) as f64 * p).round() as usize;
        self.samples.get(i).copied().unwrap_or(0) as f64 / 1e6
    }
}

fn merge(parts: Vec<Vec<u64>>, elapsed: Duration) -> Run {
    let mut samples: Vec<u64> = parts.into_iter().flatten().collect();
    samples.sort_unstable();
    Run {
        ops: samples.len() as u64,
        elapsed,
        samples,
    }
}

fn small() -> Map<String, serde_json::Value> {
    let mut map = Map::new();
    map.insert("role".into(), json!("user"));
    map.insert("theme".into(), json!("dark"));
    map
}

/// `n` sessions inserted in one statement into `schema` (not timed): for each, the token (a
/// legacy one, a UUID whose hash is the stored id) and the stored id.
async fn bulk_sessions(
    conn: &mut PgConnection,
    schema: &str,
    n: usize,
) -> Vec<(SessionToken, SessionId)> {
    let rows: Vec<(Uuid, SessionId)> = sqlx::query_as(AssertSqlSafe(format!(
        "WITH t AS (SELECT gen_random_uuid() AS u FROM generate_series(1, $1)), \
         inserted AS ( \
             INSERT INTO \"{schema}\".sessions \
                 (id, user_id, version, attributes, created_at, updated_at, last_accessed_at, \
                  expires_at) \
             SELECT encode(substring(sha256(uuid_send(u)) FROM 1 FOR 16), 'hex')::uuid, \
                    gen_random_uuid()::text, 1, '{{\"role\": \"user\"}}', now(), now(), now(), \
                    now() + interval '30 days' \
             FROM t RETURNING id) \
         SELECT t.u, encode(substring(sha256(uuid_send(t.u)) FROM 1 FOR 16), 'hex')::uuid \
         FROM t"
    )))
    .bind(n as i64)
    .fetch_all(conn)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(u, id)| (u.to_string().parse().unwrap(), id))
        .collect()
}

/// Sessions per task prepared for a workload (deletes need one per operation).
fn prepared_per_task(w: Workload) -> usize {
    match w {
        Workload::Create => 0,
        Workload::Update => 50,
        Workload::Delete => 4000,
        Workload::Mixed => 40,
    }
}

async fn run_pgsession(
    m: &SessionManager,
    w: Workload,
    tasks: usize,
    ids: Vec<(SessionToken, SessionId)>,
) -> Run {
    // Updates and reads start from cached sessions, as in a web service.
    let mut sessions: Vec<(Session, SessionToken)> = Vec::with_capacity(ids.len());
    if w != Workload::Delete {
        for (token, _) in &ids {
            sessions.push((m.get_session(token).await.unwrap().unwrap(), token.clone()));
        }
    }
    let per_task = ids.len() / tasks.max(1);
    let start = Arc::new(tokio::sync::Barrier::new(tasks + 1));
    let mut joins = Vec::new();
    for t in 0..tasks {
        let m = m.clone();
        let start = start.clone();
        let my_ids: Vec<SessionId> = ids
            .iter()
            .skip(t * per_task)
            .take(per_task)
            .map(|(_, id)| *id)
            .collect();
        let mut mine: Vec<(Session, SessionToken)> = sessions
            .iter()
            .skip(t * per_task)
            .take(per_task)
            .cloned()
            .collect();
        joins.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (t as u64 + 1);
            start.wait().await;
            let began = Instant::now();
            let mut i = 0usize;
            while began.elapsed() < ROUND {
                let t0 = Instant::now();
                match w {
                    Workload::Create => {
                        m.create_session(Uuid::new_v4(), small()).await.unwrap();
                    }
                    Workload::Update => {
                        let k = i % mine.len();
                        let s = &mut mine[k].0;
                        s.set("n", i).unwrap();
                        m.update_session(s).await.unwrap();
                    }
                    Workload::Delete => {
                        let Some(id) = my_ids.get(i) else { break };
                        assert!(m.delete_session(*id).await.unwrap());
                    }
                    Workload::Mixed => {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        let k = (rng % mine.len() as u64) as usize;
                        let (s, token) = &mut mine[k];
                        match rng % 100 {
                            0..95 => {
                                m.get_session(token).await.unwrap().unwrap();
                            }
                            95..99 => {
                                *s = m.get_session(token).await.unwrap().unwrap();
                                s.set("n", i).unwrap();
                                m.update_session(s).await.unwrap();
                            }
                            _ => {
                                let (new, _) =
                                    m.create_session(Uuid::new_v4(), small()).await.unwrap();
                                m.delete_session(new.id()).await.unwrap();
                            }
                        }
                    }
                }
                samples.push(t0.elapsed().as_nanos() as u64);
                i += 1;
                if w == Workload::Mixed {
                    tokio::task::yield_now().await;
                }
            }
            samples
        }));
    }
    start.wait().await;
    let began = Instant::now();
    let mut parts = Vec::new();
    for j in joins {
        parts.push(j.await.unwrap());
    }
    merge(parts, began.elapsed())
}

async fn floor_create(conn: &mut PgConnection, sql: &FloorSql) {
    let now = Utc::now();
    sqlx::query_as::<_, (Vec<Uuid>, Option<i64>, Option<String>)>(AssertSqlSafe(
        sql.create.clone(),
    ))
    .bind(Uuid::new_v4())
    .bind(Uuid::new_v4().to_string())
    .bind(Json(small()))
    .bind(now)
    .bind(now + chrono::Duration::days(30))
    .bind(now - chrono::Duration::hours(48))
    .bind(5i32)
    .bind(false)
    .bind(None::<&str>)
    .bind(None::<&str>)
    .bind(None::<&str>)
    .bind(Json(serde_json::Map::new()))
    .bind(None::<chrono::DateTime<Utc>>)
    .bind(false)
    .fetch_one(conn)
    .await
    .unwrap();
}

/// The new version.
async fn floor_update(
    conn: &mut PgConnection,
    sql: &FloorSql,
    id: SessionId,
    version: i64,
    n: usize,
) -> i64 {
    let now = Utc::now();
    let mut set = Map::new();
    set.insert("n".into(), json!(n));
    let row = sqlx::query(AssertSqlSafe(sql.update.clone()))
        .bind(id)
        .bind(Vec::<&str>::new())
        .bind(Json(set))
        .bind(None::<chrono::DateTime<Utc>>)
        .bind(now)
        .bind(now - chrono::Duration::hours(48))
        .bind(now)
        .bind(version)
        .bind(Json(serde_json::Map::new()))
        .bind(None::<chrono::DateTime<Utc>>)
        .bind(None::<i64>)
        .bind(Config::default().max_session_size as i64)
        .fetch_one(conn)
        .await
        .unwrap();
    sqlx::Row::get(&row, "version")
}

async fn floor_select(conn: &mut PgConnection, sql: &FloorSql, id: SessionId) {
    sqlx::query(AssertSqlSafe(sql.select.clone()))
        .bind(id)
        .fetch_optional(conn)
        .await
        .unwrap()
        .unwrap();
}

async fn run_floor(
    url: &str,
    sql: &Arc<FloorSql>,
    w: Workload,
    tasks: usize,
    ids: Vec<(SessionToken, SessionId)>,
) -> Run {
    let ids: Vec<SessionId> = ids.into_iter().map(|(_, id)| id).collect();
    let per_task = ids.len() / tasks.max(1);
    let start = Arc::new(tokio::sync::Barrier::new(tasks + 1));
    let mut joins = Vec::new();
    for t in 0..tasks {
        let sql = sql.clone();
        let start = start.clone();
        let mut conn = PgConnection::connect(url).await.unwrap();
        let mine: Vec<(SessionId, i64)> = ids
            .iter()
            .skip(t * per_task)
            .take(per_task)
            .map(|id| (*id, 1))
            .collect();
        joins.push(tokio::spawn(async move {
            let mut mine = mine;
            let mut samples = Vec::new();
            let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ (t as u64 + 1);
            start.wait().await;
            let began = Instant::now();
            let mut i = 0usize;
            while began.elapsed() < ROUND {
                let t0 = Instant::now();
                match w {
                    Workload::Create => {
                        floor_create(&mut conn, &sql).await;
                    }
                    Workload::Update => {
                        let k = i % mine.len();
                        let (id, version) = mine[k];
                        mine[k].1 = floor_update(&mut conn, &sql, id, version, i).await;
                    }
                    Workload::Delete => {
                        let Some((id, _)) = mine.get(i) else { break };
                        let q = sqlx::query(AssertSqlSafe(sql.delete.clone())).bind(*id);
                        assert!(q.fetch_optional(&mut conn).await.unwrap().is_some());
                    }
                    Workload::Mixed => {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        let k = (rng % mine.len() as u64) as usize;
                        let (id, version) = mine[k];
                        match rng % 100 {
                            0..95 => {
                                floor_select(&mut conn, &sql, id).await;
                            }
                            95..99 => {
                                floor_select(&mut conn, &sql, id).await;
                                mine[k].1 = floor_update(&mut conn, &sql, id, version, i).await;
                            }
                            _ => {
                                // Create, then delete a session of the same shape.
                                floor_create(&mut conn, &sql).await;
                                let q = sqlx::query(AssertSqlSafe(sql.delete.clone()))
                                    .bind(Uuid::new_v4());
                                q.fetch_optional(&mut conn).await.unwrap();
                            }
                        }
                    }
                }
                samples.push(t0.elapsed().as_nanos() as u64);
                i += 1;
            }
            samples
        }));
    }
    start.wait().await;
    let began = Instant::now();
    let mut parts = Vec::new();
    for j in joins {
        parts.push(j.await.unwrap());
    }
    merge(parts, began.elapsed())
}

fn main() {
    let (url, _server) = match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => (url, None),
        _ => {
            let server = TempPostgres::start_with(ServerOptions {
                durable: true,
                ..ServerOptions::default()
            })
            .expect("private PostgreSQL");
            (server.url("postgres"), Some(server))
        }
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(url));
}

async fn run(url: String) {
    let rounds: usize = std::env::var("PGSESSION_BENCH_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let admin = PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .unwrap();
    for schema in [SCHEMA, FLOOR_SCHEMA] {
        sqlx::raw_sql(AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
        )))
        .execute(&admin)
        .await
        .unwrap();
    }
    sqlx::raw_sql(AssertSqlSafe(
        pgsession::schema_sql(&config(FLOOR_SCHEMA)).unwrap(),
    ))
    .execute(&admin)
    .await
    .unwrap();
    let statements: HashMap<_, _> = pgsession::statements(&config(FLOOR_SCHEMA))
        .unwrap()
        .into_iter()
        .collect();
    let sql = Arc::new(FloorSql {
        select: statements["select_one"].clone(),
        create: statements["create_capped"].clone(),
        update: statements["update"].clone(),
        delete: statements["delete"].clone(),
    });
    let manager = SessionManager::connect(config(SCHEMA), &url).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), manager.wait_for_cache())
        .await
        .unwrap();
    let mut setup = PgConnection::connect(&url).await.unwrap();

    println!(
        "# Concurrent writes: pgsession against the raw SQL floor, {rounds} interleaved rounds\n"
    );
    println!(
        "{} cores; PostgreSQL {}; fsync on; {} s a round; the floor: the same statements on one \
         direct connection per task\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        sqlx::query_scalar::<_, String>("SHOW server_version")
            .fetch_one(&admin)
            .await
            .unwrap(),
        ROUND.as_secs()
    );
    let mut plan = Vec::new();
    for w in [
        Workload::Create,
        Workload::Update,
        Workload::Delete,
        Workload::Mixed,
    ] {
        for tasks in [8, 32] {
            plan.push((w, tasks));
        }
    }
    if let Ok(only) = std::env::var("PGSESSION_BENCH_ONLY") {
        let wanted: Vec<&str> = only.split(',').collect();
        plan.retain(|(w, _)| wanted.contains(&w.name()));
    }
    let mut summary = Vec::new();
    for (w, tasks) in plan {
        println!("## {} x {tasks} tasks\n", w.name());
        println!(
            "| round | pgsession ops/s | median / p99 / max ms | floor ops/s | median / p99 / max ms | ratio |"
        );
        println!("|---|---|---|---|---|---|");
        let mut ratios = Vec::new();
        let mut p99s = Vec::new();
        for round in 1..=rounds {
            let n = prepared_per_task(w) * tasks;
            let pg_ids = bulk_sessions(&mut setup, SCHEMA, n).await;
            let floor_ids = bulk_sessions(&mut setup, FLOOR_SCHEMA, n).await;
            let (pg, floor) = if round % 2 == 1 {
                let pg = run_pgsession(&manager, w, tasks, pg_ids).await;
                (pg, run_floor(&url, &sql, w, tasks, floor_ids).await)
            } else {
                let floor = run_floor(&url, &sql, w, tasks, floor_ids).await;
                (run_pgsession(&manager, w, tasks, pg_ids).await, floor)
            };
            let ratio = pg.rate() / floor.rate();
            ratios.push(ratio);
            p99s.push(pg.pct_ms(0.99));
            println!(
                "| {round} | {:.0} | {:.2} / {:.2} / {:.1} | {:.0} | {:.2} / {:.2} / {:.1} | {ratio:.2}x |",
                pg.rate(),
                pg.pct_ms(0.5),
                pg.pct_ms(0.99),
                pg.pct_ms(1.0),
                floor.rate(),
                floor.pct_ms(0.5),
                floor.pct_ms(0.99),
                floor.pct_ms(1.0),
            );
            // Keep the tables small between rounds.
            sqlx::raw_sql(AssertSqlSafe(format!(
                "TRUNCATE \"{SCHEMA}\".sessions, \"{FLOOR_SCHEMA}\".sessions"
            )))
            .execute(&mut setup)
            .await
            .unwrap();
        }
        let mut sorted = ratios.clone();
        sorted.sort_by(f64::total_cmp);
        p99s.sort_by(f64::total_cmp);
        let line = format!(
            "{} x {tasks}: median ratio {:.2}x, worst {:.2}x, pgsession p99 worst {:.2} ms",
            w.name(),
            sorted[sorted.len() / 2],
            sorted[0],
            p99s[p99s.len() - 1]
        );
        println!("\n{line}\n");
        summary.push(line);
        manager.clear_cache().await.unwrap();
    }
    println!("## Summary\n");
    for line in summary {
        println!("- {line}");
    }
    manager.shutdown().await.unwrap();
}
