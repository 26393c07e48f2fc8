//! Fan-out of invalidations: what one writer's updates cost when N nodes listen.
//!
//! Every update is announced by one NOTIFY (several when writes come fast are batched into
//! one) on the one channel every node listens on, so each notification is delivered N times.
//! For N = 1, 2, 4, 8, 16, 32 and 64 nodes (managers in this process), this measures:
//!
//! * the writer's throughput: node 0 updates 200 sessions cached by every node, from 8 tasks,
//!   round-robin (one attribute, `update_session`), against the 1-node figure of the same round;
//! * visibility on the last node: a probe task on node 0 updates a session of its own every
//!   ~10 ms; after each `update_session` returns, the time until node N-1's `get_session` serves
//!   that version (polled, `yield_now` between reads; more than 1 s counts as a timeout). With one
//!   node, the last node is node 0 itself (read-your-writes, no notification involved);
//! * the notifications node 0 sent (`announce_messages`) and those delivered (the increase of
//!   `stats().invalidations` summed over the nodes: one per line received);
//! * the server's CPU (utime + stime of the postmaster and its children from `/proc`) in the
//!   round, and per delivered notification.
//!
//! With 64 in the list, "64 (4 processes)" runs the same with the listeners in 4 child processes
//! of this binary (16 nodes each; the parent holds node 0, the writer, alone, so 65 nodes
//! listen), the last child measuring visibility by wall-clock time.
//!
//! ```text
//! cargo bench --bench fanout                                   # N = 1, 2, 4, ..., 64
//! PGSESSION_FANOUT_NODES=1,16,64 cargo bench --bench fanout
//! ```
//!
//! 3 rounds of every configuration, interleaved (round 1 of every N, then round 2, ...), each
//! with a fresh schema and fresh managers; every round loads for 3 s, plus 0.5-4 s outside the
//! load (starting and warming the nodes, draining, shutting down: the most at 64 nodes), so the
//! default list takes about 2 minutes on a 2-core machine (110 s measured), well under 4.
//!
//! Uses `DATABASE_URL` if set (the server's CPU is then not measured), otherwise a private
//! PostgreSQL with fsync on (as production) and `max_connections = 1000`: every node holds a
//! listener connection, an announcer connection and its pool (10 connections for node 0, 2 for
//! the others).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pgsession::{Config, Session, SessionManager, SessionToken};
use pgsession_testkit::{ServerOptions, TempPostgres};
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use uuid::Uuid;

/// The benchmark's own schema, dropped and recreated every round.
const SCHEMA: &str = "pgsession_bench_fanout";
/// Sessions every node caches and node 0 updates.
const SESSIONS: usize = 200;
/// Node 0's updating tasks; each owns `SESSIONS / WRITERS` of them.
const WRITERS: usize = 8;
/// Rounds of every configuration.
const ROUNDS: usize = 3;
/// Load per round.
const ROUND: Duration = Duration::from_secs(3);
/// Pause of the probe task between two measured updates.
const PROBE_EVERY: Duration = Duration::from_millis(10);
/// Longer than this, a probe's version counts as never seen.
const VISIBLE_WITHIN: Duration = Duration::from_secs(1);
/// Node counts measured unless `PGSESSION_FANOUT_NODES` says otherwise.
const DEFAULT_NODES: [usize; 7] = [1, 2, 4, 8, 16, 32, 64];
/// Child processes of the "64 (4 processes)" configuration, and the nodes each hosts.
const PROCESSES: usize = 4;
const NODES_PER_PROCESS: usize = 16;
/// Pool size of every node but node 0 (which `SessionManager::connect` gives 10).
const SMALL_POOL: u32 = 2;

fn config() -> Config {
    Config {
        schema: Some(SCHEMA.into()),
        max_sessions_per_user: None,
        run_cleanup: false,
        cache_capacity: 10_000,
        ..Config::default()
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--child") {
        child_main(&args);
        return;
    }
    let nodes: Vec<usize> = match std::env::var("PGSESSION_FANOUT_NODES") {
        Ok(list) => list
            .split(',')
            .map(|n| {
                n.trim()
                    .parse()
                    .ok()
                    .filter(|&n| n >= 1)
                    .expect("PGSESSION_FANOUT_NODES: node counts >= 1, comma-separated")
            })
            .collect(),
        Err(_) => DEFAULT_NODES.to_vec(),
    };
    let (url, server) = match std::env::var("DATABASE_URL") {
        Ok(url) => (url, None),
        Err(_) => {
            let server = TempPostgres::start_with(ServerOptions {
                durable: true,
                max_connections: 1000,
                ..ServerOptions::default()
            })
            .expect("private PostgreSQL");
            (server.url("postgres"), Some(server))
        }
    };
    let cpu = server.as_ref().map(|s| ServerCpu::new(s.data_dir()));
    runtime().block_on(run(url, nodes, cpu));
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// One node: its manager and, unless it built its own, the small pool it runs on (which
/// `shutdown` leaves open).
struct Node {
    manager: SessionManager,
    pool: Option<PgPool>,
}

/// `n` nodes on `url`, started concurrently. With `first_connects`, node 0 is built by
/// `SessionManager::connect` (migrating the schema, 10 connections); every other node gets a
/// pool of `SMALL_POOL` connections and only checks the schema.
async fn start_nodes(url: &str, n: usize, first_connects: bool) -> Vec<Node> {
    let mut nodes: Vec<Option<Node>> = (0..n).map(|_| None).collect();
    let mut start = 0;
    if first_connects && n > 0 {
        let manager = SessionManager::connect(config(), url).await.unwrap();
        nodes[0] = Some(Node {
            manager,
            pool: None,
        });
        start = 1;
    }
    let mut starting = JoinSet::new();
    for i in start..n {
        let url = url.to_owned();
        starting.spawn(async move {
            let pool = PgPoolOptions::new()
                .max_connections(SMALL_POOL)
                .test_before_acquire(false)
                .connect_lazy(&url)
                .unwrap();
            let config = Config {
                run_migrations: false,
                ..config()
            };
            let manager = SessionManager::new(config, pool.clone()).await.unwrap();
            (
                i,
                Node {
                    manager,
                    pool: Some(pool),
                },
            )
        });
    }
    while let Some(started) = starting.join_next().await {
        let (i, node) = started.unwrap();
        nodes[i] = Some(node);
    }
    nodes.into_iter().map(Option::unwrap).collect()
}

/// Shut every node down (concurrently) and close the pools it was given.
async fn stop_nodes(nodes: Vec<Node>) {
    let mut stopping = JoinSet::new();
    for node in nodes {
        stopping.spawn(async move {
            node.manager.shutdown().await.unwrap();
            if let Some(pool) = node.pool {
                pool.close().await;
            }
        });
    }
    while let Some(stopped) = stopping.join_next().await {
        stopped.unwrap();
    }
}

/// Wait until the node trusts its cache, read every token once (filling the cache), and check
/// that a second read is all hits. Returns the reads that were not.
async fn warm(node: &SessionManager, tokens: &[SessionToken]) -> u64 {
    tokio::time::timeout(Duration::from_secs(60), node.wait_for_cache())
        .await
        .expect("the node's listener starts within 60 s");
    for token in tokens {
        node.get_session(token)
            .await
            .unwrap()
            .expect("the session exists");
    }
    let hits = node.stats().hits;
    for token in tokens {
        node.get_session(token).await.unwrap();
    }
    tokens.len() as u64 - (node.stats().hits - hits)
}

/// Warm every node concurrently; the last one also caches the probe's session.
async fn warm_all(nodes: &[Node], tokens: &Arc<Vec<SessionToken>>, probe: &SessionToken) {
    let mut warming = JoinSet::new();
    for (i, node) in nodes.iter().enumerate() {
        let manager = node.manager.clone();
        let mut mine = tokens.as_ref().clone();
        if i == nodes.len() - 1 {
            mine.push(probe.clone());
        }
        warming.spawn(async move { warm(&manager, &mine).await });
    }
    let mut cold = 0;
    while let Some(warmed) = warming.join_next().await {
        cold += warmed.unwrap();
    }
    if cold > 0 {
        println!("  (warning: {cold} second reads were not cache hits)");
    }
}

/// Drop the schema (every round starts from nothing) and start node 0 on it; create the
/// sessions and the probe's session. Returns node 0, the sessions with their tokens, and the
/// probe's session and token.
async fn fresh_schema(
    admin: &PgPool,
    url: &str,
) -> (Node, Vec<(Session, SessionToken)>, (Session, SessionToken)) {
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS \"{SCHEMA}\" CASCADE"
    )))
    .execute(admin)
    .await
    .unwrap();
    let node0 = start_nodes(url, 1, true).await.pop().unwrap();
    let m = &node0.manager;
    let mut sessions = Vec::with_capacity(SESSIONS);
    for _ in 0..SESSIONS {
        sessions.push(
            m.create_session(Uuid::new_v4(), [("role", "user"), ("n", "0")])
                .await
                .unwrap(),
        );
    }
    let probe = m
        .create_session(Uuid::new_v4(), [("probe", 0)])
        .await
        .unwrap();
    (node0, sessions, probe)
}

/// One round of one configuration.
struct Round {
    updates_per_s: f64,
    /// Visibility delays on the last node, in microseconds (timeouts left out).
    visible_us: Vec<u64>,
    timeouts: u64,
    /// NOTIFYs node 0 sent, and the invalidation lines they carried.
    sent: u64,
    lines: u64,
    /// Invalidation lines received, summed over the nodes.
    delivered: u64,
    /// The server's CPU time in the round (load and drain), when measured.
    server_cpu_ms: Option<f64>,
    /// CPU time of the processes hosting the nodes (this one, and any children).
    nodes_cpu_ms: f64,
    /// Listener reconnections during the round, summed over the nodes.
    reconnects: u64,
    /// Probes whose version the first read already served.
    first_read: u64,
    /// Seconds of the round outside the load: starting and warming the nodes, draining,
    /// shutting down.
    overhead_s: f64,
}

/// The `(count, finished)` of every writer task after `ROUND` of updates from node 0.
fn spawn_writers(
    node0: &SessionManager,
    sessions: Vec<(Session, SessionToken)>,
    start: Instant,
) -> JoinSet<(u64, Instant)> {
    let mut writers = JoinSet::new();
    let per_task = SESSIONS / WRITERS;
    let mut sessions = sessions.into_iter();
    for _ in 0..WRITERS {
        let mut mine: Vec<Session> = sessions.by_ref().take(per_task).map(|(s, _)| s).collect();
        let m = node0.clone();
        writers.spawn(async move {
            let mut n = 0u64;
            while start.elapsed() < ROUND {
                let s = &mut mine[n as usize % per_task];
                s.set("n", n).unwrap();
                m.update_session(s).await.unwrap();
                n += 1;
            }
            (n, Instant::now())
        });
    }
    writers
}

/// Updates per second of the writers, once they are all done.
async fn join_writers(mut writers: JoinSet<(u64, Instant)>, start: Instant) -> f64 {
    let (mut total, mut last) = (0, start);
    while let Some(done) = writers.join_next().await {
        let (n, finished) = done.unwrap();
        total += n;
        last = last.max(finished);
    }
    total as f64 / (last - start).as_secs_f64()
}

/// Until `node`'s `get_session` serves `version` or later, polling with `yield_now` in between:
/// the reads it took, `None` after `VISIBLE_WITHIN`.
async fn seen(node: &SessionManager, token: &SessionToken, version: i64) -> Option<u64> {
    let began = Instant::now();
    let mut reads = 0;
    loop {
        let session = node.get_session(token).await.unwrap().expect("the probe");
        reads += 1;
        if session.version() >= version {
            return Some(reads);
        }
        if began.elapsed() > VISIBLE_WITHIN {
            return None;
        }
        tokio::task::yield_now().await;
    }
}

/// After the load: wait until node 0 has announced everything and the nodes' invalidation
/// counts have stopped moving for 200 ms (at most 5 s).
async fn drain(nodes: &[&SessionManager]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while nodes[0].stats().outbox_backlog > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut last = invalidations(nodes);
    let mut still_since = Instant::now();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = invalidations(nodes);
        if now != last {
            last = now;
            still_since = Instant::now();
        } else if still_since.elapsed() >= Duration::from_millis(200) {
            break;
        }
    }
}

fn invalidations(nodes: &[&SessionManager]) -> u64 {
    nodes.iter().map(|m| m.stats().invalidations).sum()
}

fn reconnects(nodes: &[&SessionManager]) -> u64 {
    nodes.iter().map(|m| m.stats().reconnects).sum()
}

/// A round with all `n` nodes in this process.
async fn in_process_round(admin: &PgPool, url: &str, n: usize, cpu: Option<&ServerCpu>) -> Round {
    let began = Instant::now();
    let (node0, sessions, (mut probe, probe_token)) = fresh_schema(admin, url).await;
    let mut nodes = vec![node0];
    nodes.extend(start_nodes(url, n - 1, false).await);
    let tokens: Arc<Vec<SessionToken>> =
        Arc::new(sessions.iter().map(|(_, t)| t.clone()).collect());
    warm_all(&nodes, &tokens, &probe_token).await;
    let managers: Vec<&SessionManager> = nodes.iter().map(|n| &n.manager).collect();
    let node0 = managers[0].clone();
    let last = managers[n - 1].clone();

    let before = node0.stats();
    let invalidations_before = invalidations(&managers);
    let reconnects_before = reconnects(&managers);
    let cpu_before = cpu.map(ServerCpu::ticks);
    let own_before = process_ticks("self");
    let start = Instant::now();
    let writers = spawn_writers(&node0, sessions, start);
    let prober = tokio::spawn(async move {
        let (mut samples, mut timeouts, mut first_read) = (Vec::new(), 0, 0);
        let mut i = 0u64;
        while start.elapsed() < ROUND {
            i += 1;
            probe.set("probe", i).unwrap();
            node0.update_session(&mut probe).await.unwrap();
            let returned = Instant::now();
            match seen(&last, &probe_token, probe.version()).await {
                Some(reads) => {
                    samples.push(returned.elapsed().as_micros() as u64);
                    first_read += u64::from(reads == 1);
                }
                None => timeouts += 1,
            }
            tokio::time::sleep(PROBE_EVERY).await;
        }
        (samples, timeouts, first_read)
    });
    let updates_per_s = join_writers(writers, start).await;
    let (visible_us, timeouts, first_read) = prober.await.unwrap();
    drain(&managers).await;
    let server_cpu_ms = cpu.zip(cpu_before).map(|(c, b)| c.ms_since(&b));
    let nodes_cpu_ms = ticks_to_ms(process_ticks("self").saturating_sub(own_before));
    let after = managers[0].stats();
    let mut round = Round {
        updates_per_s,
        visible_us,
        timeouts,
        sent: after.announce_messages - before.announce_messages,
        lines: after.invalidations_announced - before.invalidations_announced,
        delivered: invalidations(&managers) - invalidations_before,
        server_cpu_ms,
        nodes_cpu_ms,
        reconnects: reconnects(&managers) - reconnects_before,
        first_read,
        overhead_s: 0.0,
    };
    drop(managers);
    stop_nodes(nodes).await;
    round.overhead_s = (began.elapsed() - ROUND).as_secs_f64();
    round
}

/// A child process hosting listening nodes, seen from the parent.
struct ChildNodes {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<String>,
}

impl ChildNodes {
    fn spawn(url: &str, tokens: &Path, visibility: bool) -> ChildNodes {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--child", "--url", url, "--nodes"])
            .arg(NODES_PER_PROCESS.to_string())
            .arg("--tokens")
            .arg(tokens)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if visibility {
            cmd.arg("--visibility");
        }
        let mut child = cmd.spawn().expect("the benchmark's own binary runs");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        ChildNodes {
            stdin: child.stdin.take(),
            child,
            lines,
        }
    }

    /// The child's next line of output.
    async fn line(&mut self, within: Duration) -> String {
        tokio::time::timeout(within, self.lines.recv())
            .await
            .expect("the child answers in time")
            .expect("the child is still running (see its errors above)")
    }
}

/// A round with node 0 here and `PROCESSES` children of `NODES_PER_PROCESS` nodes each.
async fn processes_round(admin: &PgPool, url: &str, cpu: Option<&ServerCpu>) -> Round {
    let began = Instant::now();
    let (node, sessions, (mut probe, probe_token)) = fresh_schema(admin, url).await;
    let file = std::env::temp_dir().join(format!("pgsession-fanout-{}.tokens", std::process::id()));
    let mut text = format!("{probe_token}\n");
    for (_, token) in &sessions {
        text.push_str(&format!("{token}\n"));
    }
    std::fs::write(&file, text).unwrap();
    let mut children: Vec<ChildNodes> = (0..PROCESSES)
        .map(|i| ChildNodes::spawn(url, &file, i == PROCESSES - 1))
        .collect();
    let tokens: Vec<SessionToken> = sessions.iter().map(|(_, t)| t.clone()).collect();
    let node0 = node.manager.clone();
    assert_eq!(warm(&node0, &tokens).await, 0);
    for child in &mut children {
        assert_eq!(child.line(Duration::from_secs(120)).await, "ready");
    }
    std::fs::remove_file(&file).unwrap();

    let before = node0.stats();
    let cpu_before = cpu.map(ServerCpu::ticks);
    let own_before = process_ticks("self");
    let start = Instant::now();
    let writers = spawn_writers(&node0, sessions, start);
    let mut last = children.pop().unwrap();
    let prober = {
        let node0 = node0.clone();
        tokio::spawn(async move {
            let mut stdin = last.stdin.take().unwrap();
            let mut i = 0u64;
            while start.elapsed() < ROUND {
                i += 1;
                probe.set("probe", i).unwrap();
                node0.update_session(&mut probe).await.unwrap();
                let returned = wall_us();
                writeln!(stdin, "{} {returned}", probe.version()).unwrap();
                stdin.flush().unwrap();
                // The child acknowledges once it has seen the version or given up, so that
                // measurements do not queue up behind a slow one.
                assert_eq!(last.line(Duration::from_secs(5)).await, "ack");
                tokio::time::sleep(PROBE_EVERY).await;
            }
            last.stdin = Some(stdin);
            last
        })
    };
    let updates_per_s = join_writers(writers, start).await;
    children.push(prober.await.unwrap());
    drain(&[&node0]).await;
    let server_cpu_ms = cpu.zip(cpu_before).map(|(c, b)| c.ms_since(&b));
    let own_cpu = ticks_to_ms(process_ticks("self").saturating_sub(own_before));
    let after = node0.stats();
    let mut round = Round {
        updates_per_s,
        visible_us: Vec::new(),
        timeouts: 0,
        sent: after.announce_messages - before.announce_messages,
        lines: after.invalidations_announced - before.invalidations_announced,
        delivered: after.invalidations - before.invalidations,
        server_cpu_ms,
        nodes_cpu_ms: own_cpu,
        reconnects: after.reconnects - before.reconnects,
        first_read: 0,
        overhead_s: 0.0,
    };
    // Closing stdin ends a child: it drains, reports and exits.
    for child in &mut children {
        child.stdin = None;
    }
    for mut child in children {
        let report: serde_json::Value =
            serde_json::from_str(&child.line(Duration::from_secs(60)).await).unwrap();
        let count = |key: &str| report[key].as_u64().unwrap();
        round.delivered += count("invalidations");
        round.reconnects += count("reconnects");
        round.timeouts += count("timeouts");
        round.first_read += count("first_read");
        round.nodes_cpu_ms += ticks_to_ms(count("cpu_ticks"));
        round.visible_us.extend(
            report["samples_us"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap()),
        );
        assert!(child.child.wait().unwrap().success());
    }
    stop_nodes(vec![node]).await;
    round.overhead_s = (began.elapsed() - ROUND).as_secs_f64();
    round
}

/// A child process: `--child --url <url> --nodes <n> --tokens <file> [--visibility]`. Starts
/// `n` listening nodes caching the sessions of `<file>` (the probe's token first, then the
/// others), prints `ready`, then, with `--visibility`, reads `<version> <returned µs>` lines
/// and answers `ack` once its last node serves that version (or after `VISIBLE_WITHIN`). When
/// stdin closes, it prints one line of JSON (invalidations received, visibility samples in µs
/// of wall-clock time, timeouts, probes seen at the first read, reconnects, its CPU ticks) and
/// exits.
fn child_main(args: &[String]) {
    let value = |name: &str| {
        let i = args.iter().position(|a| a == name).expect(name);
        args[i + 1].clone()
    };
    let url = value("--url");
    let n: usize = value("--nodes").parse().unwrap();
    let tokens_file = PathBuf::from(value("--tokens"));
    let visibility = args.iter().any(|a| a == "--visibility");
    runtime().block_on(async move {
        let text = std::fs::read_to_string(tokens_file).unwrap();
        let mut tokens = text.lines().map(|l| l.parse::<SessionToken>().unwrap());
        let probe = tokens.next().unwrap();
        let tokens: Arc<Vec<SessionToken>> = Arc::new(tokens.collect());
        let nodes = start_nodes(&url, n, false).await;
        warm_all(&nodes, &tokens, &probe).await;
        let managers: Vec<&SessionManager> = nodes.iter().map(|n| &n.manager).collect();
        let last = managers[n - 1];
        let invalidations_before = invalidations(&managers);
        let reconnects_before = reconnects(&managers);
        let cpu_before = process_ticks("self");
        let (tx, mut notices) = mpsc::unbounded_channel::<(i64, u64)>();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                let (version, returned) = line.split_once(' ').unwrap();
                if tx
                    .send((version.parse().unwrap(), returned.parse().unwrap()))
                    .is_err()
                {
                    break;
                }
            }
        });
        println!("ready");
        let (mut samples, mut timeouts, mut first_read) = (Vec::new(), 0u64, 0u64);
        while let Some((version, returned)) = notices.recv().await {
            assert!(visibility, "only the visibility child gets versions");
            match seen(last, &probe, version).await {
                Some(reads) => {
                    samples.push(wall_us().saturating_sub(returned));
                    first_read += u64::from(reads == 1);
                }
                None => timeouts += 1,
            }
            println!("ack");
        }
        drain(&managers).await;
        let report = json!({
            "invalidations": invalidations(&managers) - invalidations_before,
            "reconnects": reconnects(&managers) - reconnects_before,
            "cpu_ticks": process_ticks("self").saturating_sub(cpu_before),
            "samples_us": samples,
            "timeouts": timeouts,
            "first_read": first_read,
        });
        drop(managers);
        stop_nodes(nodes).await;
        println!("{report}");
    });
}

/// Microseconds since the epoch: comparable across the processes of this machine.
fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

/// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks() -> u64 {
    static TICKS: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100)
    })
}

fn ticks_to_ms(ticks: u64) -> f64 {
    ticks as f64 * 1000.0 / clock_ticks() as f64
}

/// The parent pid and utime + stime (fields 4, 14 and 15) of `/proc/<pid>/stat`.
fn proc_stat(pid: &str) -> Option<(u32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name, which is in parentheses and may contain anything.
    let (_, rest) = stat.rsplit_once(") ")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// utime + stime of one process, in clock ticks (0 if gone).
fn process_ticks(pid: &str) -> u64 {
    proc_stat(pid).map_or(0, |(_, t)| t)
}

/// The CPU time of the private server: its postmaster and every process it started.
struct ServerCpu {
    postmaster: u32,
}

impl ServerCpu {
    /// The postmaster's pid is the first line of `postmaster.pid` in the data directory.
    fn new(data_dir: &Path) -> ServerCpu {
        let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).unwrap();
        let postmaster = text.lines().next().unwrap().trim().parse().unwrap();
        ServerCpu { postmaster }
    }

    /// Clock ticks by pid, for the postmaster and its children now.
    fn ticks(&self) -> HashMap<u32, u64> {
        let mut ticks = HashMap::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            if let Some((ppid, t)) = proc_stat(&pid.to_string())
                && (ppid == self.postmaster || pid == self.postmaster)
            {
                ticks.insert(pid, t);
            }
        }
        ticks
    }

    /// Milliseconds of CPU since `before`; a process started since counts in full (one that
    /// exited since is lost, but the server's processes outlive a round).
    fn ms_since(&self, before: &HashMap<u32, u64>) -> f64 {
        let now = self.ticks();
        let ticks: u64 = now
            .iter()
            .map(|(pid, t)| t.saturating_sub(before.get(pid).copied().unwrap_or(0)))
            .sum();
        ticks_to_ms(ticks)
    }
}

/// What a configuration's rounds add up to.
struct Summary {
    label: String,
    /// Visibility on node 0 itself (one node): no notification involved.
    self_visible: bool,
    rounds: Vec<Round>,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The `p` percentile of sorted microseconds, in milliseconds.
fn pct_ms(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn print_round(label: &str, r: &Round) {
    let mut visible = r.visible_us.clone();
    visible.sort_unstable();
    let cpu = r
        .server_cpu_ms
        .map_or("n/a".to_owned(), |ms| format!("{ms:.0}"));
    println!(
        "  {label:>18}: {:>6.0} updates/s; visible p50 {:.2} ms p99 {:.2} ms ({} probes, {} \
         at the first read, {} timeouts); {} NOTIFYs for {} lines, {} delivered; server CPU \
         {cpu} ms, nodes' processes {:.0} ms; {:.1} s outside the load{}",
        r.updates_per_s,
        pct_ms(&visible, 0.5),
        pct_ms(&visible, 0.99),
        r.visible_us.len() as u64 + r.timeouts,
        r.first_read,
        r.timeouts,
        r.sent,
        r.lines,
        r.delivered,
        r.nodes_cpu_ms,
        r.overhead_s,
        if r.reconnects > 0 {
            format!("; {} listener reconnects", r.reconnects)
        } else {
            String::new()
        }
    );
}

async fn run(url: String, nodes: Vec<usize>, cpu: Option<ServerCpu>) {
    let admin = PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&admin)
        .await
        .unwrap();
    println!("# Invalidation fan-out: one writer, N listening nodes\n");
    println!(
        "{} cores; PostgreSQL {version}; fsync on; {ROUNDS} interleaved rounds of {} s; node 0 \
         updates {SESSIONS} sessions cached by every node from {WRITERS} tasks; nodes are \
         managers in this process (pools of {SMALL_POOL} connections, node 0's of 10)\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        ROUND.as_secs()
    );
    let began = Instant::now();
    let processes = nodes.contains(&64);
    let mut summaries: Vec<Summary> = nodes
        .iter()
        .map(|&n| Summary {
            label: n.to_string(),
            self_visible: n == 1,
            rounds: Vec::new(),
        })
        .collect();
    if processes {
        summaries.push(Summary {
            label: format!("64 ({PROCESSES} processes)"),
            self_visible: false,
            rounds: Vec::new(),
        });
    }
    for round in 1..=ROUNDS {
        println!("## Round {round}\n");
        for (i, summary) in summaries.iter_mut().enumerate() {
            let r = match nodes.get(i) {
                Some(&n) => in_process_round(&admin, &url, n, cpu.as_ref()).await,
                None => processes_round(&admin, &url, cpu.as_ref()).await,
            };
            print_round(&summary.label, &r);
            summary.rounds.push(r);
        }
        println!();
    }

    println!("## Summary\n");
    println!(
        "| nodes | updates/s (median, min-max) | ratio to 1 node | visible on last node \
         p50 / p99 / max (ms) | timeouts | notifications sent | delivered | server CPU ms | \
         µs per delivered |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    // The 1-node rate of every round, for the ratios.
    let one_node: Option<Vec<f64>> = summaries
        .iter()
        .find(|s| s.self_visible)
        .map(|s| s.rounds.iter().map(|r| r.updates_per_s).collect());
    for s in &summaries {
        let rates: Vec<f64> = s.rounds.iter().map(|r| r.updates_per_s).collect();
        let (lo, hi) = (
            rates.iter().copied().fold(f64::INFINITY, f64::min),
            rates.iter().copied().fold(0.0, f64::max),
        );
        let mut visible: Vec<u64> = s.rounds.iter().flat_map(|r| r.visible_us.clone()).collect();
        visible.sort_unstable();
        let ratio = match &one_node {
            Some(one) => format!(
                "{:.2}x",
                median(rates.iter().zip(one).map(|(r, one)| r / one).collect())
            ),
            None => "n/a".to_owned(),
        };
        let count = |f: fn(&Round) -> u64| median(s.rounds.iter().map(|r| f(r) as f64).collect());
        let (cpu, per) = if s.rounds.iter().all(|r| r.server_cpu_ms.is_some()) {
            let cpu = median(s.rounds.iter().filter_map(|r| r.server_cpu_ms).collect());
            let per = median(
                s.rounds
                    .iter()
                    .map(|r| r.server_cpu_ms.unwrap() * 1000.0 / r.delivered.max(1) as f64)
                    .collect(),
            );
            (format!("{cpu:.0}"), format!("{per:.1}"))
        } else {
            ("n/a".to_owned(), "n/a".to_owned())
        };
        println!(
            "| {} | {:.0} ({lo:.0}-{hi:.0}) | {ratio} | {:.2} / {:.2} / {:.2}{} | {} | {:.0} | \
             {:.0} | {cpu} | {per} |",
            s.label,
            median(rates.clone()),
            pct_ms(&visible, 0.5),
            pct_ms(&visible, 0.99),
            pct_ms(&visible, 1.0),
            if s.self_visible {
                " (node 0 itself)"
            } else {
                ""
            },
            s.rounds.iter().map(|r| r.timeouts).sum::<u64>(),
            count(|r| r.sent),
            count(|r| r.delivered),
        );
    }
    println!(
        "\nMedians of the rounds (ratio: of each round's rate to the same round's 1-node rate; \
         visibility: all rounds' probes together; timeouts: their sum). Delivered: invalidation lines received, summed over the nodes; µs per \
         delivered: the server's CPU in the round (load and drain) divided by them. Total \
         time {:.0} s.",
        began.elapsed().as_secs_f64()
    );
}
