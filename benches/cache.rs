//! Cache and coherence figures, measured side by side in one run on one database:
//!
//! * cache-hit `get_session` latency with 1 and 2 threads (and throughput ratio);
//! * cache-miss `get_session` latency next to a raw sqlx `SELECT` of the same row;
//! * cross-node visibility: node A's `update_session` returns -> node B serves the new version;
//! * tokens: cache hits with signature verification, forged tokens (cost, database reads, and
//!   what a flood of them does to real hits and to the cache), `log_in` and `rotate_session`
//!   against `create_session`.
//!
//! ```text
//! cargo bench --bench cache
//! ```
//!
//! `PGSESSION_BENCH_HITS_ONLY=1` stops after the cache hits (to alternate builds or profile);
//! `PGSESSION_BENCH_HIT_ROUNDS=N` sets the number of interleaved hit rounds (3).
//!
//! Uses `DATABASE_URL` if set, otherwise a private PostgreSQL with fsync on (as production).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use pgsession::{Config, SessionManager, SessionToken, SigningKey};
use pgsession_testkit::{ServerOptions, TempPostgres};
use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

/// Latency samples in nanoseconds.
struct Samples(Vec<u64>);

impl Samples {
    fn new() -> Samples {
        Samples(Vec::new())
    }
    fn push(&mut self, d: Duration) {
        self.0.push(d.as_nanos() as u64);
    }
    fn percentile(&mut self, p: f64) -> f64 {
        self.0.sort_unstable();
        let i = ((self.0.len() - 1) as f64 * p).round() as usize;
        self.0[i] as f64
    }
    fn median(&mut self) -> f64 {
        self.percentile(0.5)
    }
}

fn us(ns: f64) -> String {
    format!("{:.2} us", ns / 1000.0)
}

/// Sub-microsecond figures (cache hits), to the nanosecond.
fn ns(ns: f64) -> String {
    format!("{ns:.0} ns")
}

fn main() {
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
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(url));
}

/// The benchmark's own schema, so that a `DATABASE_URL` database's tables are never touched.
const SCHEMA: &str = "pgsession_bench";

fn config() -> Config {
    Config {
        schema: Some(SCHEMA.into()),
        max_sessions_per_user: None,
        run_cleanup: false,
        cache_capacity: 100_000,
        ..Config::default()
    }
}

async fn run(url: String) {
    let a = SessionManager::connect(config(), &url).await.unwrap();
    let b = SessionManager::connect(config(), &url).await.unwrap();
    // Start from an empty table so that repeated runs measure the same thing.
    sqlx::query("TRUNCATE pgsession_bench.sessions")
        .execute(a.pool())
        .await
        .unwrap();
    let attributes = || {
        [
            ("role".to_string(), json!("admin")),
            ("theme".to_string(), json!("dark")),
        ]
    };

    println!("pgsession cache benchmark (PostgreSQL at {})", redact(&url));
    println!(
        "machine: {} cores; release build; one run, figures side by side\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // ---- cache hits ----------------------------------------------------------------------
    let mut ids = Vec::new();
    for _ in 0..2000 {
        ids.push(
            a.create_session(Uuid::new_v4(), attributes())
                .await
                .unwrap()
                .1,
        );
    }
    for id in &ids {
        b.get_session(id).await.unwrap().unwrap();
    }
    // The same with signed tokens, on managers that verify them.
    let key = SigningKey::generate();
    let signed_config = || Config {
        signing_keys: vec![key.clone()],
        ..config()
    };
    let sa = SessionManager::connect(signed_config(), &url)
        .await
        .unwrap();
    let sb = SessionManager::connect(signed_config(), &url)
        .await
        .unwrap();
    for m in [&a, &b, &sa, &sb] {
        m.wait_for_cache().await;
    }
    let mut signed = Vec::new();
    for _ in 0..2000 {
        signed.push(
            sa.create_session(Uuid::new_v4(), attributes())
                .await
                .unwrap()
                .1,
        );
    }
    for t in &signed {
        sb.get_session(t).await.unwrap().unwrap();
    }
    // Interleave 1- and 2-thread rounds so that machine noise hits both alike; report the
    // round with the median throughput of each.
    let per_thread = 200_000;
    let round_count: usize = std::env::var("PGSESSION_BENCH_HIT_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let mut rounds: [Vec<(f64, Samples)>; 4] = Default::default();
    for _ in 0..round_count {
        for (i, (manager, tokens, threads)) in [(&b, &ids, 1), (&b, &ids, 2), (&sb, &signed, 1)]
            .into_iter()
            .enumerate()
        {
            let (samples, elapsed) = hit_run(manager, tokens, threads, per_thread);
            let tput = (threads * per_thread) as f64 / elapsed.as_secs_f64();
            rounds[i].push((tput, samples));
        }
        let (samples, elapsed) = moka_run(2000, per_thread);
        rounds[3].push((per_thread as f64 / elapsed.as_secs_f64(), samples));
    }
    // Each round's median latency, to show the spread across rounds.
    let spread = |r: &mut Vec<(f64, Samples)>| {
        let mut medians: Vec<f64> = r.iter_mut().map(|(_, s)| s.median()).collect();
        medians.sort_by(f64::total_cmp);
        format!(
            "rounds {:.0}-{:.0} ns",
            medians[0],
            medians[medians.len() - 1]
        )
    };
    let [
        mut one_rounds,
        mut two_rounds,
        mut signed_rounds,
        mut moka_rounds,
    ] = rounds;
    let spreads: Vec<String> = [
        &mut one_rounds,
        &mut two_rounds,
        &mut signed_rounds,
        &mut moka_rounds,
    ]
    .into_iter()
    .map(|r| {
        r.sort_by(|x, y| x.0.total_cmp(&y.0));
        spread(r)
    })
    .collect();
    let mid = round_count / 2;
    let (one_tput, mut one) = one_rounds.swap_remove(mid);
    let (two_tput, mut two) = two_rounds.swap_remove(mid);
    let (signed_tput, mut signed_hits) = signed_rounds.swap_remove(mid);
    let (_, mut moka) = moka_rounds.swap_remove(mid);
    println!(
        "cache hit, get_session (small attributes; the round with the median throughput of \
         {round_count} interleaved rounds, each timed per call)"
    );
    println!(
        "  1 thread : median {}  p99 {}  {:>10.0} ops/s",
        ns(one.median()),
        ns(one.percentile(0.99)),
        one_tput
    );
    println!(
        "  2 threads: median {}  p99 {}  {:>10.0} ops/s  ({:.2}x the 1-thread throughput)",
        ns(two.median()),
        ns(two.percentile(0.99)),
        two_tput,
        two_tput / one_tput
    );
    println!(
        "  1 thread, signed tokens (tag checked): median {}  p99 {}  {:>10.0} ops/s",
        ns(signed_hits.median()),
        ns(signed_hits.percentile(0.99)),
        signed_tput
    );
    let moka_med = moka.median();
    println!(
        "  peer: a raw moka::sync::Cache get of an Arc'd map under a precomputed key, 1 thread: \
         median {}  p99 {}",
        ns(moka_med),
        ns(moka.percentile(0.99))
    );
    println!(
        "  ratio to the raw moka get: plain {:.2}x, signed {:.2}x",
        one.median() / moka_med,
        signed_hits.median() / moka_med
    );
    println!(
        "  spread of round medians: 1 thread {}; 2 threads {}; signed {}; moka {}",
        spreads[0], spreads[1], spreads[2], spreads[3]
    );
    if std::env::var_os("PGSESSION_BENCH_HITS_ONLY").is_some() {
        return;
    }

    // ---- cache misses vs raw select ------------------------------------------------------
    let raw_pool = PgPoolOptions::new()
        .max_connections(10)
        .test_before_acquire(false)
        .connect(&url)
        .await
        .unwrap();
    let mut miss_ids = Vec::new();
    for _ in 0..3000 {
        miss_ids.push(
            a.create_session(Uuid::new_v4(), attributes())
                .await
                .unwrap()
                .1,
        );
    }
    let select = "SELECT id, user_id, version, attributes, created_at, updated_at, \
                  last_accessed_at, expires_at FROM pgsession_bench.sessions WHERE id = $1";
    // Warm both paths (prepared statements on every connection).
    for id in miss_ids.iter().take(50) {
        sqlx::query(select)
            .bind(id.id())
            .fetch_optional(&raw_pool)
            .await
            .unwrap();
    }
    let c = SessionManager::connect(config(), &url).await.unwrap();
    for id in ids.iter().take(50) {
        c.get_session(id).await.unwrap();
    }
    let mut raw = Samples::new();
    let mut miss = Samples::new();
    for (i, id) in miss_ids.iter().enumerate().skip(50) {
        // Alternate which goes first so that neither always finds the other's cached pages.
        let do_raw = || async {
            let t = Instant::now();
            let row = sqlx::query(select)
                .bind(id.id())
                .fetch_optional(&raw_pool)
                .await
                .unwrap();
            assert!(row.is_some());
            t.elapsed()
        };
        let do_miss = || async {
            let t = Instant::now();
            let s = c.get_session(id).await.unwrap();
            assert!(s.is_some());
            t.elapsed()
        };
        if i % 2 == 0 {
            raw.push(do_raw().await);
            miss.push(do_miss().await);
        } else {
            miss.push(do_miss().await);
            raw.push(do_raw().await);
        }
    }
    assert!(c.stats().misses as usize >= miss_ids.len() - 50);
    let (raw_med, miss_med) = (raw.median(), miss.median());
    println!("\ncache miss, get_session vs raw sqlx SELECT of the same row (1 task)");
    println!(
        "  raw SELECT : median {}  p99 {}",
        us(raw_med),
        us(raw.percentile(0.99))
    );
    println!(
        "  get_session: median {}  p99 {}  ({:.2}x raw)",
        us(miss_med),
        us(miss.percentile(0.99)),
        miss_med / raw_med
    );

    // ---- cross-node visibility -----------------------------------------------------------
    let (mut s, token) = a
        .create_session(Uuid::new_v4(), attributes())
        .await
        .unwrap();
    b.get_session(&token).await.unwrap().unwrap();
    let mut visible = Samples::new();
    let mut update = Samples::new();
    for i in 0..1000 {
        s.set("n", i).unwrap();
        let t = Instant::now();
        a.update_session(&mut s).await.unwrap();
        let returned = Instant::now();
        update.push(returned - t);
        let mut polls = 0;
        loop {
            let seen = b.get_session(&token).await.unwrap().unwrap();
            if seen.version() == s.version() {
                break;
            }
            assert!(returned.elapsed() < Duration::from_secs(5), "never visible");
            // Spinning would take a core from the listener and the database on a small
            // machine: poll tightly only briefly, then in short sleeps (this thread is not
            // a runtime worker, so sleeping it blocks nothing).
            polls += 1;
            if polls < 50 {
                tokio::task::yield_now().await;
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
        visible.push(returned.elapsed());
    }
    println!("\ncross-node visibility: A's update_session returns -> B serves the new version");
    println!(
        "  update_session on A: median {}  p99 {}",
        us(update.median()),
        us(update.percentile(0.99))
    );
    println!(
        "  visible on B after : median {}  p99 {}  max {}",
        us(visible.median()),
        us(visible.percentile(0.99)),
        us(visible.percentile(1.0))
    );
    // ---- cross-node events: the same delay, measured without polling -----------------------
    // B's receiver task stamps each event as it arrives; nothing competes with the listener.
    let mut events = b.subscribe_events();
    let (stamps_tx, mut stamps) = tokio::sync::mpsc::unbounded_channel();
    let watched = s.id();
    let receiver = tokio::spawn(async move {
        while let Ok(e) = events.recv().await {
            if e.session_id == Some(watched) && e.kind == pgsession::SessionEventKind::Updated {
                let _ = stamps_tx.send((e.version, Instant::now()));
            }
        }
    });
    let mut delay = Samples::new();
    for i in 0..1000 {
        s.set("n", 10_000 + i).unwrap();
        a.update_session(&mut s).await.unwrap();
        let returned = Instant::now();
        loop {
            let (version, at) = tokio::time::timeout(Duration::from_secs(5), stamps.recv())
                .await
                .expect("the event arrives")
                .unwrap();
            if version == Some(s.version()) {
                delay.push(at.saturating_duration_since(returned));
                break;
            }
        }
    }
    receiver.abort();
    println!(
        "\ncross-node event: A's update_session returns -> B's subscribe_events receiver has it"
    );
    println!(
        "  event on B after   : median {}  p99 {}  max {}",
        us(delay.median()),
        us(delay.percentile(0.99)),
        us(delay.percentile(1.0))
    );

    let stats = b.stats();
    println!(
        "\nnode B: {} hits, {} misses, {} invalidations, {} fills rejected",
        stats.hits, stats.misses, stats.invalidations, stats.fills_rejected
    );
    tokens(&a, &sb, &signed, &b, &ids).await;
    for m in [a, b, c, sa, sb] {
        m.shutdown().await.unwrap();
    }
}

/// Forged tokens, floods, and the cost of rotation.
async fn tokens(
    a: &SessionManager,
    signed_node: &SessionManager,
    signed: &[SessionToken],
    unsigned_node: &SessionManager,
    unsigned: &[SessionToken],
) {
    let mut forged = Samples::new();
    let misses = signed_node.stats().misses;
    for _ in 0..20_000 {
        let token = forge();
        let t = Instant::now();
        let found = signed_node.get_session(&token).await.unwrap();
        forged.push(t.elapsed());
        assert!(found.is_none());
    }
    println!(
        "
forged tokens (signed with an unknown key), signing on"
    );
    println!(
        "  get_session: median {}  p99 {}; database reads: {}",
        us(forged.median()),
        us(forged.percentile(0.99)),
        signed_node.stats().misses - misses
    );

    // Real hits while 4 tasks flood the node with forged (or, without signing, unknown)
    // tokens, against the same without a flood.
    for (name, node, real, flood_token) in [
        ("signing on, forged tokens", signed_node, signed, true),
        (
            "signing off, random unknown tokens",
            unsigned_node,
            unsigned,
            false,
        ),
    ] {
        let quiet = real_hits(node, real, Duration::from_secs(1)).await;
        let before = node.stats().entries;
        let stop = Arc::new(AtomicBool::new(false));
        let flooders: Vec<_> = (0..4)
            .map(|_| {
                let node = node.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let token = if flood_token { forge() } else { unknown() };
                        node.get_session(&token).await.unwrap();
                        n += 1;
                        tokio::task::yield_now().await;
                    }
                    n
                })
            })
            .collect();
        let mut loud = real_hits(node, real, Duration::from_secs(2)).await;
        stop.store(true, Ordering::Relaxed);
        let mut flood = 0;
        for f in flooders {
            flood += f.await.unwrap();
        }
        let mut quiet = quiet;
        let after = node.stats().entries;
        let still_cached = {
            let hits = node.stats().hits;
            for t in real {
                node.get_session(t).await.unwrap().unwrap();
            }
            node.stats().hits - hits
        };
        println!(
            "  flood ({name}, {flood} requests): real hits p99 {} during, {} without; \
             cache entries {before} -> {after}, real sessions still cached {still_cached} of {}",
            us(loud.percentile(0.99)),
            us(quiet.percentile(0.99)),
            real.len()
        );
    }

    // Rotation and login against create, one task, interleaved.
    let (mut create, mut rotate, mut login) = (Samples::new(), Samples::new(), Samples::new());
    for _ in 0..1000 {
        let t = Instant::now();
        let (mut s, _) = a.create_anonymous_session([("cart", 1)]).await.unwrap();
        create.push(t.elapsed());
        let t = Instant::now();
        a.rotate_session(&mut s).await.unwrap();
        rotate.push(t.elapsed());
        let t = Instant::now();
        a.log_in(&mut s, Uuid::new_v4()).await.unwrap();
        login.push(t.elapsed());
    }
    println!(
        "
rotation (one round trip each), 1 task"
    );
    println!(
        "  create_anonymous_session: median {}  p99 {}",
        us(create.median()),
        us(create.percentile(0.99))
    );
    println!(
        "  rotate_session          : median {}  p99 {}  ({:.2}x create)",
        us(rotate.median()),
        us(rotate.percentile(0.99)),
        rotate.median() / create.median()
    );
    println!(
        "  log_in (cap applied)    : median {}  p99 {}  ({:.2}x create)",
        us(login.median()),
        us(login.percentile(0.99)),
        login.median() / create.median()
    );
}

/// A forged token: 64 characters of the signed form (32 random bytes and a 16-byte tag), with
/// a tag no key of the node produced.
fn forge() -> SessionToken {
    let mut bytes = Vec::with_capacity(48);
    for _ in 0..3 {
        bytes.extend_from_slice(Uuid::new_v4().as_bytes());
    }
    base64_url(&bytes).parse().expect("well-formed")
}

/// A well-formed unsigned token of no session (43 characters: 32 random bytes).
fn unknown() -> SessionToken {
    let mut bytes = Vec::with_capacity(32);
    for _ in 0..2 {
        bytes.extend_from_slice(Uuid::new_v4().as_bytes());
    }
    base64_url(&bytes).parse().expect("well-formed")
}

fn base64_url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n =
            chunk.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// Cache-hit latencies of `real` sessions for `duration`, on one task.
async fn real_hits(node: &SessionManager, real: &[SessionToken], duration: Duration) -> Samples {
    let mut samples = Samples::new();
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < duration {
        let t = Instant::now();
        node.get_session(&real[i % real.len()])
            .await
            .unwrap()
            .unwrap();
        samples.push(t.elapsed());
        i += 1;
        tokio::task::yield_now().await;
    }
    samples
}

/// `threads` OS threads, each with its own current-thread runtime, each doing `per_thread`
/// cache hits on its own slice of `ids`. Returns per-call latencies and the wall time.
fn hit_run(
    manager: &SessionManager,
    ids: &[SessionToken],
    threads: usize,
    per_thread: usize,
) -> (Samples, Duration) {
    let ready = Arc::new(Barrier::new(threads + 1));
    let go = Arc::new(AtomicBool::new(false));
    let chunk = ids.len() / threads;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let manager = manager.clone();
            let mine: Vec<SessionToken> = ids[t * chunk..(t + 1) * chunk].to_vec();
            let go = go.clone();
            let ready = ready.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let hits_before = manager.stats().hits;
                    // Warm up.
                    for id in mine.iter().cycle().take(20_000) {
                        manager.get_session(id).await.unwrap().unwrap();
                    }
                    ready.wait();
                    while !go.load(Ordering::Acquire) {
                        std::hint::spin_loop();
                    }
                    let mut samples = Samples(Vec::with_capacity(per_thread));
                    for id in mine.iter().cycle().take(per_thread) {
                        let t = Instant::now();
                        let s = manager.get_session(id).await.unwrap();
                        samples.push(t.elapsed());
                        assert!(s.is_some());
                    }
                    assert!(manager.stats().hits >= hits_before + per_thread as u64);
                    samples
                })
            })
        })
        .collect();
    ready.wait();
    let started = Instant::now();
    go.store(true, Ordering::Release);
    let mut all = Samples::new();
    for h in handles {
        all.0.extend(h.join().unwrap().0);
    }
    (all, started.elapsed())
}

/// The floor a cache hit is held to: a raw Moka get (no expiry, no coherence, no token) of a
/// shared map, timed per call as `hit_run` times `get_session`.
fn moka_run(sessions: usize, per_thread: usize) -> (Samples, Duration) {
    let cache: moka::sync::Cache<Uuid, Arc<serde_json::Map<String, serde_json::Value>>> =
        moka::sync::Cache::new(100_000);
    let keys: Vec<Uuid> = (0..sessions).map(|_| Uuid::new_v4()).collect();
    let mut map = serde_json::Map::new();
    map.insert("role".into(), json!("admin"));
    map.insert("theme".into(), json!("dark"));
    let map = Arc::new(map);
    for k in &keys {
        cache.insert(*k, map.clone());
    }
    for k in keys.iter().cycle().take(20_000) {
        assert!(cache.get(k).is_some());
    }
    let mut samples = Samples(Vec::with_capacity(per_thread));
    let started = Instant::now();
    for k in keys.iter().cycle().take(per_thread) {
        let t = Instant::now();
        let v = cache.get(k);
        samples.push(t.elapsed());
        assert!(v.is_some());
    }
    (samples, started.elapsed())
}

fn redact(url: &str) -> String {
    match url.split_once('@') {
        Some((_, host)) => format!("…@{host}"),
        None => url.to_string(),
    }
}
