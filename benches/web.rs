//! End to end: requests per second and latency of an axum handler that reads one session
//! attribute, through a real HTTP/1.1 client over loopback (one keep-alive connection per
//! concurrent client), for:
//!
//! * `none`: no session layer at all (the handler returns a constant);
//! * `pgsession`: pgsession's own layer (`pgsession::axum`), served from its cache;
//! * `pgsession store`: tower-sessions over pgsession's store (`pgsession::tower_sessions`);
//! * `tower`: tower-sessions with its `PostgresStore` (tower-sessions-sqlx-store);
//! * `tower+moka`: tower-sessions with `CachingSessionStore<MokaStore, PostgresStore>`;
//! * `tower+redis`: tower-sessions with its `RedisStore` (tower-sessions-redis-store, a fred
//!   client pool) on a private Redis server (`redis-server`, no persistence), the usual
//!   in-memory alternative to a database-backed store.
//!
//! Rounds run every system back to back, `ROUNDS` times, each round starting at another
//! system; the table shows medians over rounds, and ratios are taken within a round. Client
//! and servers share the machine's cores, so every microsecond a server spends shows. Under
//! each table, `pgsession / tower+redis` is pgsession's layer against the Redis-backed peer
//! (the goal: at least 1.5x, at 1 and at 32 connections).
//!
//! ```text
//! cargo bench --features axum,tower-sessions --bench web
//! ```

use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use pgsession::axum::{SessionLayer, WebSession};
use pgsession::tower_sessions::PgSessionStore;
use pgsession::{Config, SessionManager};
use pgsession_testkit::{ServerOptions, TempPostgres, TempRedis};
use tower_sessions::{Session, SessionManagerLayer};
use tower_sessions_core::session::{Id, Record};
use tower_sessions_core::{CachingSessionStore, SessionStore};
use tower_sessions_moka_store::MokaStore;
use tower_sessions_redis_store::RedisStore;
use tower_sessions_redis_store::fred::prelude::{
    ClientLike, Config as RedisConfig, Pool as RedisPool,
};
use tower_sessions_sqlx_store::PostgresStore;

const ROUNDS: usize = 5;
const RUN: Duration = Duration::from_secs(2);
const SESSIONS: usize = 200;
const SCHEMA: &str = "pgsession_bench_web";
const TOWER_SCHEMA: &str = "pgsession_bench_web_tower";
/// Clients in the fred pool behind `RedisStore`, each one connection that pipelines the
/// commands of concurrent requests. On a 2-core machine 1 or 2 did best at 32 connections, 4
/// somewhat worse and 8 far worse (more connections for Redis and the client to serve).
const REDIS_POOL: usize = 2;
/// What the Redis-backed peer is measured against.
const REDIS_GOAL: f64 = 1.5;

#[derive(Clone, Copy, PartialEq, Eq)]
enum System {
    None,
    Pgsession,
    PgStore,
    Tower,
    TowerMoka,
    TowerRedis,
}

const SYSTEMS: [System; 6] = [
    System::None,
    System::Pgsession,
    System::PgStore,
    System::Tower,
    System::TowerMoka,
    System::TowerRedis,
];

impl System {
    fn name(self) -> &'static str {
        match self {
            System::None => "no session layer",
            System::Pgsession => "pgsession layer (cached)",
            System::PgStore => "tower-sessions + pgsession store",
            System::Tower => "tower-sessions + PostgresStore",
            System::TowerMoka => "tower-sessions + Moka/PostgresStore",
            System::TowerRedis => "tower-sessions + RedisStore",
        }
    }
}

async fn read_native(session: WebSession) -> String {
    match session.get("n").await {
        Ok(Some(v)) => v.to_string(),
        Ok(None) => "none".to_owned(),
        Err(_) => "error".to_owned(),
    }
}

async fn read_tower(session: Session) -> String {
    match session.get::<u64>("n").await {
        Ok(Some(v)) => v.to_string(),
        Ok(None) => "none".to_owned(),
        Err(_) => "error".to_owned(),
    }
}

/// Serves `router` on a free loopback port.
async fn serve(router: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

/// tower-sessions records holding `n`, and their cookies.
async fn tower_cookies<S: SessionStore>(store: &S) -> Vec<String> {
    let mut cookies = Vec::new();
    for _ in 0..SESSIONS {
        let mut record = Record {
            id: Id::default(),
            data: [("n".to_owned(), serde_json::json!(1))]
                .into_iter()
                .collect(),
            expiry_date: time::OffsetDateTime::now_utc() + time::Duration::days(1),
        };
        store.create(&mut record).await.unwrap();
        cookies.push(format!("id={}", record.id));
    }
    cookies
}

/// One system's server, in the order of `SYSTEMS`.
struct Target {
    addr: String,
    cookies: Vec<String>,
}

#[derive(Clone, Copy)]
struct Figures {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
}

/// `clients` keep-alive connections, each sending requests one after another for `RUN`.
async fn load(target: &Target, clients: usize) -> Figures {
    let deadline = Instant::now() + RUN;
    let mut workers = tokio::task::JoinSet::new();
    for c in 0..clients {
        let addr = target.addr.clone();
        let cookies = target.cookies.clone();
        workers.spawn(async move {
            let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            let mut latencies = Vec::new();
            let mut i = c;
            while Instant::now() < deadline {
                let request = hyper::Request::get("/read")
                    .header("host", "bench")
                    .header("cookie", &cookies[i % cookies.len()])
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                i += clients;
                let started = Instant::now();
                sender.ready().await.unwrap();
                let response = sender.send_request(request).await.unwrap();
                assert!(response.status().is_success(), "{}", response.status());
                let body = response.into_body().collect().await.unwrap().to_bytes();
                latencies.push(started.elapsed());
                assert!(!body.is_empty());
            }
            latencies
        });
    }
    let mut all: Vec<Duration> = Vec::new();
    while let Some(done) = workers.join_next().await {
        all.extend(done.unwrap());
    }
    all.sort();
    let at = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    Figures {
        rps: all.len() as f64 / RUN.as_secs_f64(),
        p50_us: at(0.50).as_secs_f64() * 1e6,
        p99_us: at(0.99).as_secs_f64() * 1e6,
    }
}

fn selected(i: usize) -> bool {
    match std::env::var("PGSESSION_WEB_ONLY") {
        Ok(list) => list.split(',').any(|n| n.trim().parse() == Ok(i)),
        Err(_) => true,
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

async fn run(url: String, redis_url: String) {
    let manager = SessionManager::connect(
        Config {
            schema: Some(SCHEMA.into()),
            max_sessions_per_user: None,
            ..Config::default()
        },
        &url,
    )
    .await
    .unwrap();
    manager.wait_for_cache().await;
    // Empty the benchmark's own tables (a DATABASE_URL database's other tables stay as they are).
    sqlx::query(sqlx::AssertSqlSafe(format!("TRUNCATE {SCHEMA}.sessions")))
        .execute(manager.pool())
        .await
        .unwrap();
    let store_manager = manager.clone();

    let mut targets = Vec::new();
    let none = Router::new().route("/read", get(|| async { "1" }));
    targets.push(Target {
        addr: serve(none).await,
        cookies: vec!["id=none".to_owned()],
    });

    let mut cookies = Vec::new();
    for _ in 0..SESSIONS {
        let (_, token) = manager.create_anonymous_session([("n", 1)]).await.unwrap();
        cookies.push(format!("id={token}"));
    }
    let native = Router::new()
        .route("/read", get(read_native))
        .layer(SessionLayer::new(manager.clone()));
    targets.push(Target {
        addr: serve(native).await,
        cookies,
    });

    let pg_store = PgSessionStore::new(store_manager);
    let cookies = tower_cookies(&pg_store).await;
    let router = Router::new()
        .route("/read", get(read_tower))
        .layer(SessionManagerLayer::new(pg_store));
    targets.push(Target {
        addr: serve(router).await,
        cookies,
    });

    let tower_pool = sqlx08::postgres::PgPoolOptions::new()
        .max_connections(10)
        .connect(&url)
        .await
        .unwrap();
    let tower = PostgresStore::new(tower_pool.clone())
        .with_schema_name(TOWER_SCHEMA)
        .unwrap();
    tower.migrate().await.unwrap();
    sqlx08::query(&format!("TRUNCATE {TOWER_SCHEMA}.session"))
        .execute(&tower_pool)
        .await
        .unwrap();
    let cookies = tower_cookies(&tower).await;
    let router = Router::new()
        .route("/read", get(read_tower))
        .layer(SessionManagerLayer::new(tower.clone()));
    targets.push(Target {
        addr: serve(router).await,
        cookies: cookies.clone(),
    });
    let moka = CachingSessionStore::new(MokaStore::new(Some(100_000)), tower);
    let router = Router::new()
        .route("/read", get(read_tower))
        .layer(SessionManagerLayer::new(moka));
    targets.push(Target {
        addr: serve(router).await,
        cookies,
    });

    // The Redis server is private to this run, so its keys are only these sessions.
    let redis_pool = RedisPool::new(
        RedisConfig::from_url(&redis_url).unwrap(),
        None,
        None,
        None,
        REDIS_POOL,
    )
    .unwrap();
    let redis_connection = redis_pool.init().await.unwrap();
    let redis = RedisStore::new(redis_pool.clone());
    let cookies = tower_cookies(&redis).await;
    let router = Router::new()
        .route("/read", get(read_tower))
        .layer(SessionManagerLayer::new(redis));
    targets.push(Target {
        addr: serve(router).await,
        cookies,
    });

    println!(
        "# web: an axum handler reading one session attribute ({ROUNDS} rounds of {RUN:?} each)\n"
    );
    for clients in [1usize, 32] {
        let mut rounds: Vec<Vec<Figures>> = Vec::new();
        for round in 0..ROUNDS {
            // Each round starts at a different system, so that no system always runs first
            // or right after the slow database-bound one.
            let mut figures = vec![
                Figures {
                    rps: f64::NAN,
                    p50_us: f64::NAN,
                    p99_us: f64::NAN,
                };
                targets.len()
            ];
            for k in 0..targets.len() {
                let i = (k + round) % targets.len();
                // PGSESSION_WEB_ONLY=1,2 runs only those systems (0-based, table order), for
                // profiling one at a time.
                if !selected(i) {
                    continue;
                }
                let target = &targets[i];
                // Warm the caches (and connections) outside the measurement.
                if round == 0 {
                    let _ = load_brief(target).await;
                }
                figures[i] = load(target, clients).await;
            }
            rounds.push(figures);
        }
        println!("## {clients} concurrent connection(s)\n");
        println!(
            "| system | requests/s (median of rounds) | p50 µs | p99 µs | vs no layer | pgsession vs this |"
        );
        println!("|---|---|---|---|---|---|");
        let at = |s: usize| -> Vec<Figures> { rounds.iter().map(|r| r[s]).collect() };
        let position = |system| SYSTEMS.iter().position(|s| *s == system).unwrap();
        let native = position(System::Pgsession);
        let redis = position(System::TowerRedis);
        for (i, system) in SYSTEMS.iter().enumerate() {
            let mine = at(i);
            let rps = median(mine.iter().map(|f| f.rps).collect());
            let p50 = median(mine.iter().map(|f| f.p50_us).collect());
            let p99 = median(mine.iter().map(|f| f.p99_us).collect());
            let vs_none = median(rounds.iter().map(|r| r[i].rps / r[0].rps).collect());
            let pg_vs = median(rounds.iter().map(|r| r[native].rps / r[i].rps).collect());
            println!(
                "| {} | {rps:.0} | {p50:.0} | {p99:.0} | {vs_none:.2}x | {pg_vs:.2}x |",
                system.name()
            );
        }
        println!();
        let vs_redis: Vec<f64> = rounds
            .iter()
            .map(|r| r[native].rps / r[redis].rps)
            .collect();
        let ratio = median(vs_redis.clone());
        let per_round: Vec<String> = vs_redis.iter().map(|x| format!("{x:.2}")).collect();
        println!(
            "pgsession / tower+redis at {clients} connection(s): {ratio:.2}x (median; rounds {}) \
             - goal >= {REDIS_GOAL}x: {}",
            per_round.join(" / "),
            if ratio >= REDIS_GOAL {
                "met"
            } else {
                "NOT met"
            }
        );
        println!();
        for (r, figures) in rounds.iter().enumerate() {
            let line: Vec<String> = figures.iter().map(|f| format!("{:.0}", f.rps)).collect();
            println!("round {}: {}", r + 1, line.join(" / "));
        }
        println!();
    }
    manager.shutdown().await.unwrap();
    redis_pool.quit().await.unwrap();
    let _ = redis_connection.await;
}

/// A short run that fills caches and opens pooled connections.
async fn load_brief(target: &Target) -> usize {
    let stream = tokio::net::TcpStream::connect(&target.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    for cookie in &target.cookies {
        let request = hyper::Request::get("/read")
            .header("host", "bench")
            .header("cookie", cookie)
            .body(Empty::<Bytes>::new())
            .unwrap();
        sender.ready().await.unwrap();
        let response = sender.send_request(request).await.unwrap();
        response.into_body().collect().await.unwrap();
    }
    target.cookies.len()
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (url, _server) = match std::env::var("DATABASE_URL") {
        Ok(url) => (url, None),
        Err(_) => {
            let server = TempPostgres::start_with(ServerOptions {
                durable: true,
                ..ServerOptions::default()
            })
            .expect("private PostgreSQL");
            (server.url("postgres"), Some(server))
        }
    };
    let redis = TempRedis::start().expect("private Redis");
    runtime.block_on(run(url, redis.url()));
}
