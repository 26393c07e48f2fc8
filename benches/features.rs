//! The costs of issue 13's features, each measured side by side with what it is compared to:
//!
//! * `count_active_sessions` on a table of 10^6 sessions: the index range scan it uses
//!   (migration 4's `last_accessed_at` index) against the same count with index scans off (a
//!   sequential scan, what the count would cost without the index);
//! * `list_sessions` pages of 500 over the same table;
//! * creates with `Config::announce_creates` off and on, 8 tasks, interleaved rounds: what
//!   announcing creates costs in write throughput.
//!
//! ```text
//! cargo bench --bench features
//! PGSESSION_BENCH_ROWS=100000 cargo bench --bench features   # a smaller table
//! ```
//!
//! Uses `DATABASE_URL` if set, otherwise a fresh private PostgreSQL with fsync on.

use std::time::{Duration, Instant};

use pgsession::{Config, SessionManager};
use pgsession_testkit::{ServerOptions, TempPostgres};
use sqlx::AssertSqlSafe;
use sqlx::postgres::PgPoolOptions;

const SCHEMA: &str = "pgsession_bench_features";

fn config(schema: &str) -> Config {
    Config {
        schema: Some(schema.into()),
        max_sessions_per_user: None,
        run_cleanup: false,
        ..Config::default()
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
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
    let rows: i64 = std::env::var("PGSESSION_BENCH_ROWS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let admin = PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .unwrap();
    for schema in [
        SCHEMA,
        "pgsession_bench_announce_off",
        "pgsession_bench_announce_on",
    ] {
        sqlx::query(AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {schema} CASCADE"
        )))
        .execute(&admin)
        .await
        .unwrap();
    }
    let m = SessionManager::connect(config(SCHEMA), &url).await.unwrap();
    println!("# issue 13 features ({rows} sessions)\n");

    // Accesses spread evenly over the last 48 hours: a 5-minute window holds 1/576 of them.
    let t = Instant::now();
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {SCHEMA}.sessions \
             (id, user_id, version, attributes, created_at, updated_at, last_accessed_at, expires_at) \
         SELECT gen_random_uuid(), 'u' || (i % 100000), 1, '{{\"role\": \"user\"}}', now(), now(), \
                now() - (i::float8 / $1) * interval '48 hours', now() + interval '30 days' \
         FROM generate_series(1, $1) AS i"
    )))
    .bind(rows)
    .execute(&admin)
    .await
    .unwrap();
    sqlx::query(AssertSqlSafe(format!("VACUUM ANALYZE {SCHEMA}.sessions")))
        .execute(&admin)
        .await
        .unwrap();
    println!(
        "table filled and analysed in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // ---- count_active_sessions ---------------------------------------------------------
    let plan: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "EXPLAIN SELECT count(*) FROM {SCHEMA}.sessions \
         WHERE last_accessed_at > now() - interval '5 minutes' AND expires_at > now()"
    )))
    .fetch_all(&admin)
    .await
    .unwrap();
    println!("\nplan of the count (5-minute window):");
    for line in &plan {
        println!("  {line}");
    }
    let seq_count = format!(
        "SELECT count(*) FROM {SCHEMA}.sessions \
         WHERE last_accessed_at > now() - make_interval(secs => $1) AND expires_at > now()"
    );
    let mut seq_conn = admin.acquire().await.unwrap();
    sqlx::query("SET enable_indexscan = off")
        .execute(&mut *seq_conn)
        .await
        .unwrap();
    sqlx::query("SET enable_bitmapscan = off")
        .execute(&mut *seq_conn)
        .await
        .unwrap();
    println!(
        "\ncount_active_sessions vs the same count by sequential scan (median of 21, interleaved)"
    );
    for window in [Duration::from_secs(300), Duration::from_secs(3600)] {
        let (mut fast, mut slow) = (Vec::new(), Vec::new());
        let mut n = 0;
        for _ in 0..21 {
            let t = Instant::now();
            n = m.count_active_sessions(window).await.unwrap();
            fast.push(t.elapsed());
            let t = Instant::now();
            let seq: i64 = sqlx::query_scalar(AssertSqlSafe(seq_count.clone()))
                .bind(window.as_secs_f64())
                .fetch_one(&mut *seq_conn)
                .await
                .unwrap();
            slow.push(t.elapsed());
            assert!((seq - n as i64).abs() < 1000, "the two counts agree");
        }
        let (fast, slow) = (median(fast), median(slow));
        println!(
            "  within {:>5} s ({n:>6} active): count_active_sessions {}  sequential scan {}  ({:.1}x faster)",
            window.as_secs(),
            ms(fast),
            ms(slow),
            slow.as_secs_f64() / fast.as_secs_f64()
        );
    }
    drop(seq_conn);

    // ---- list_sessions -----------------------------------------------------------------
    let mut pages = Vec::new();
    let mut after = None;
    let mut listed = 0;
    let t = Instant::now();
    while pages.len() < 200 {
        let p = Instant::now();
        let page = m.list_sessions(after, 500).await.unwrap();
        pages.push(p.elapsed());
        let Some(last) = page.last() else { break };
        after = Some(last.id());
        listed += page.len();
    }
    println!(
        "\nlist_sessions, pages of 500: {listed} sessions in {:.2} s, median page {}",
        t.elapsed().as_secs_f64(),
        ms(median(pages))
    );
    m.shutdown().await.unwrap();

    // ---- announce_creates ----------------------------------------------------------------
    let off = SessionManager::connect(config("pgsession_bench_announce_off"), &url)
        .await
        .unwrap();
    let on = SessionManager::connect(
        Config {
            announce_creates: true,
            ..config("pgsession_bench_announce_on")
        },
        &url,
    )
    .await
    .unwrap();
    println!("\ncreates, 8 tasks, 2 s rounds (creates/s), announce_creates off vs on:");
    let (mut r_off, mut r_on) = (Vec::new(), Vec::new());
    for round in 0..6 {
        let order = if round % 2 == 0 {
            [(&off, false), (&on, true)]
        } else {
            [(&on, true), (&off, false)]
        };
        for (m, announcing) in order {
            let rate = creates(m, 8, Duration::from_secs(2)).await;
            if announcing {
                r_on.push(rate)
            } else {
                r_off.push(rate)
            }
        }
        println!(
            "  round {round}: off {:.0}  on {:.0}  ({:.2}x)",
            r_off[round],
            r_on[round],
            r_on[round] / r_off[round]
        );
    }
    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (a, b) = (med(r_off), med(r_on));
    println!("  median: off {a:.0}/s  on {b:.0}/s  ({:.2}x)", b / a);
    off.shutdown().await.unwrap();
    on.shutdown().await.unwrap();
}

/// Creates per second by `tasks` tasks for `duration`.
async fn creates(m: &SessionManager, tasks: usize, duration: Duration) -> f64 {
    let start = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..tasks {
        let m = m.clone();
        set.spawn(async move {
            let mut n = 0u64;
            while start.elapsed() < duration {
                m.create_session(uuid::Uuid::new_v4(), [("role", "user")])
                    .await
                    .unwrap();
                n += 1;
            }
            n
        });
    }
    let mut total = 0;
    while let Some(n) = set.join_next().await {
        total += n.unwrap();
    }
    total as f64 / start.elapsed().as_secs_f64()
}
