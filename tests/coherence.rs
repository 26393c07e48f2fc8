//! Cache coherence across nodes (guarantees G1-G8 of docs/design.md), including faults:
//! a killed listener backend, a half-open listener connection, a refused reconnect, and a
//! restarted server. Every node is a manager with its own pool, as in separate processes.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use pgsession::{Config, Error, SessionId, SessionManager, SessionToken};
use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use uuid::Uuid;

/// The cross-node visibility bound these tests assert. On loopback the delay is well under a
/// millisecond (see BENCHMARKS.md); the bound leaves room for a loaded CI machine.
const VISIBLE_WITHIN: Duration = Duration::from_secs(1);
/// How long a test may wait for a listener to notice a fault or to come back.
const RECOVERY: Duration = Duration::from_secs(15);

fn unlimited() -> Config {
    Config {
        max_sessions_per_user: None,
        ..config()
    }
}

async fn version_on(node: &SessionManager, token: &SessionToken) -> Option<i64> {
    node.get_session(token).await.unwrap().map(|s| s.version())
}

/// Wait until `node` serves `expected` for `id`: a version, or `None` once it is gone.
async fn wait_serves(
    node: &SessionManager,
    token: &SessionToken,
    expected: Option<i64>,
    within: Duration,
    what: &str,
) {
    eventually(within, what, || async move {
        version_on(node, token).await == expected
    })
    .await;
}

async fn wait_distrusted(node: &SessionManager) {
    let mut trust = node.subscribe_cache_trust();
    tokio::time::timeout(RECOVERY, trust.wait_for(|trusted| !*trusted))
        .await
        .expect("the node distrusts its cache")
        .unwrap();
}

async fn wait_trusted(node: &SessionManager) {
    tokio::time::timeout(RECOVERY, node.wait_for_cache())
        .await
        .expect("the cache is trusted again");
}

#[tokio::test]
async fn update_and_delete_on_one_node_are_seen_on_another_within_a_second() {
    let db = TestDatabase::create().await;
    let a = node(&db, config()).await;
    let b = node(&db, config()).await;
    let (mut s, s_t) = a.create_session(Uuid::new_v4(), small()).await.unwrap();
    assert_eq!(version_on(&b, &s_t).await, Some(1));
    assert_eq!(version_on(&b, &s_t).await, Some(1));
    assert_eq!(
        b.stats().hits,
        1,
        "the second read is served from B's cache"
    );

    set_and_save(&a, &mut s, "theme", json!("light")).await;
    wait_serves(&b, &s_t, Some(2), VISIBLE_WITHIN, "B serves version 2").await;
    for _ in 0..20 {
        assert_eq!(version_on(&b, &s_t).await, Some(2), "never flips back");
    }
    assert!(b.stats().invalidations >= 1);

    assert!(a.delete_session(s.id()).await.unwrap());
    wait_serves(
        &b,
        &s_t,
        None,
        VISIBLE_WITHIN,
        "B stops serving the deleted session",
    )
    .await;
}

#[tokio::test]
async fn a_node_never_serves_the_state_before_its_own_write() {
    let db = TestDatabase::create().await;
    let a = node(&db, config()).await;
    let (mut s, s_t) = a.create_session(Uuid::new_v4(), small()).await.unwrap();
    for i in 0..50 {
        assert!(a.get_session(&s_t).await.unwrap().is_some(), "cached");
        set_and_save(&a, &mut s, "n", json!(i)).await;
        let read = a.get_session(&s_t).await.unwrap().unwrap();
        assert_eq!(read.version(), s.version());
        assert_eq!(read.get("n"), Some(&json!(i)));
    }
    assert!(a.stats().hits >= 50);
    assert!(a.delete_session(s.id()).await.unwrap());
    assert!(a.get_session(&s_t).await.unwrap().is_none());
}

/// Read-your-writes across nodes: given the version a write on A returned, B never serves
/// an older copy, though it has the session cached and hears of the write only later; and
/// once B is up to date it serves that version from memory.
#[tokio::test]
async fn a_reader_given_the_written_version_is_never_served_an_older_copy_on_another_node() {
    let db = TestDatabase::create().await;
    let a = node(&db, config()).await;
    let b = node(&db, config()).await;
    let (mut s, token) = a.create_session(Uuid::new_v4(), small()).await.unwrap();
    let mut plain_stale = 0;
    for i in 0..200 {
        assert!(
            b.get_session(&token).await.unwrap().is_some(),
            "B caches it"
        );
        set_and_save(&a, &mut s, "n", json!(i)).await;
        if i % 2 == 0 {
            let read = b
                .get_session_with_version(&token, s.version())
                .await
                .unwrap();
            let read = read.expect("the session");
            assert!(
                read.version() >= s.version(),
                "trial {i}: {}",
                read.version()
            );
            assert_eq!(read.get("n"), Some(&json!(i)));
        } else {
            let read = b.get_session(&token).await.unwrap().expect("the session");
            plain_stale += usize::from(read.version() < s.version());
        }
    }
    eprintln!("get_session on B right after A's write: {plain_stale} of 100 stale");
    // Up to date: a hit, however often asked.
    let v = Some(s.version());
    wait_serves(&b, &token, v, VISIBLE_WITHIN, "B hears of the last write").await;
    let hits = b.stats().hits;
    for _ in 0..10 {
        let read = b
            .get_session_with_version(&token, s.version())
            .await
            .unwrap();
        assert_eq!(read.map(|r| r.version()), Some(s.version()));
    }
    assert_eq!(b.stats().hits, hits + 10);
}

/// Sessions created by many tasks at once are all cached by the node that created them:
/// another session's write landing in the same shard meanwhile does not refuse the install.
#[tokio::test]
async fn sessions_created_concurrently_are_all_cached_on_their_node() {
    let db = TestDatabase::create().await;
    let a = node(&db, unlimited()).await;
    let creators = (0..16).map(|_| {
        let a = a.clone();
        tokio::spawn(async move {
            let mut tokens = Vec::new();
            for _ in 0..20 {
                tokens.push(a.create_session(Uuid::new_v4(), small()).await.unwrap().1);
            }
            tokens
        })
    });
    let mut tokens = Vec::new();
    for creator in creators.collect::<Vec<_>>() {
        tokens.extend(creator.await.unwrap());
    }
    let misses = a.stats().misses;
    for token in &tokens {
        assert!(a.get_session(token).await.unwrap().is_some());
    }
    assert_eq!(a.stats().misses - misses, 0, "every new session was a hit");
    assert_eq!(a.stats().entries, 320);
}

#[tokio::test]
async fn logout_everywhere_evicts_hundreds_of_sessions_on_other_nodes() {
    let db = TestDatabase::create().await;
    let a = node(&db, unlimited()).await;
    let b = node(&db, unlimited()).await;
    let user = Uuid::new_v4();
    let mut ids = Vec::new();
    for _ in 0..350 {
        ids.push(a.create_session(user, small()).await.unwrap().1);
    }
    for id in &ids {
        assert!(b.get_session(id).await.unwrap().is_some());
    }
    assert_eq!(b.stats().entries, 350);

    // One notification for all of them: listing 350 ids would exceed NOTIFY's 8000 bytes and
    // roll the delete back.
    assert_eq!(a.delete_all_user_sessions(user).await.unwrap(), 350);
    eventually(VISIBLE_WITHIN, "B evicted all 350", || async {
        b.stats().entries == 0
    })
    .await;
    for id in &ids {
        assert!(b.get_session(id).await.unwrap().is_none());
    }
}

#[tokio::test]
async fn cap_eviction_of_hundreds_of_sessions_reaches_other_nodes() {
    let db = TestDatabase::create().await;
    let a = node(&db, unlimited()).await;
    let b = node(&db, unlimited()).await;
    let capped = node(
        &db,
        Config {
            max_sessions_per_user: Some(5),
            ..config()
        },
    )
    .await;
    let user = Uuid::new_v4();
    let mut ids = Vec::new();
    for _ in 0..300 {
        ids.push(a.create_session(user, small()).await.unwrap().1);
    }
    for id in &ids {
        b.get_session(id).await.unwrap().unwrap();
    }
    // The cap was lowered: one login deletes 296 sessions in its transaction and announces
    // them in chunks that each fit the payload limit.
    let (newest, _) = capped.create_session(user, small()).await.unwrap();
    assert_eq!(capped.list_user_sessions(user).await.unwrap().len(), 5);
    eventually(VISIBLE_WITHIN, "B evicted the 296", || async {
        b.stats().entries == 4
    })
    .await;
    let live: Vec<SessionId> = capped
        .list_user_sessions(user)
        .await
        .unwrap()
        .iter()
        .map(|s| s.id())
        .collect();
    assert!(live.contains(&newest.id()));
    for token in &ids {
        assert_eq!(
            b.get_session(token).await.unwrap().is_some(),
            live.contains(&token.id())
        );
    }
}

#[tokio::test]
async fn cleanup_of_thousands_of_expired_sessions_evicts_them_on_other_nodes() {
    let db = TestDatabase::create().await;
    let legacy = || Config {
        accept_legacy_tokens: true,
        ..unlimited()
    };
    let a = node(&db, legacy()).await;
    let b = node(&db, legacy()).await;
    let check = pool(&db).await;
    let ids = insert_sessions_directly(&check, 2500).await;
    for id in &ids {
        b.get_session(id).await.unwrap().unwrap();
    }
    // Expire them behind pgsession's back: B's copies still look valid to B...
    sqlx::query("UPDATE sessions SET expires_at = now() - interval '1 second'")
        .execute(&check)
        .await
        .unwrap();
    assert!(b.get_session(&ids[0]).await.unwrap().is_some());
    // ...until cleanup deletes them and says so, 200 ids per notification.
    assert_eq!(a.cleanup_expired().await.unwrap(), 2500);
    eventually(VISIBLE_WITHIN, "B evicted all 2500", || async {
        b.stats().entries == 0
    })
    .await;
    assert!(b.get_session(&ids[0]).await.unwrap().is_none());
}

#[tokio::test]
async fn a_fill_that_read_before_an_invalidation_is_not_installed_after_it() {
    let db = TestDatabase::create().await;
    let a = node(&db, config()).await;
    // B reads through a proxy that can hold the database's answers; its listener is direct.
    let proxy = FaultProxy::start(socket_addr(db.url()).await).await;
    let b_pool = PgPoolOptions::new()
        .max_connections(1)
        .test_before_acquire(false)
        .connect(&proxy.proxied_url(db.url()))
        .await
        .unwrap();
    let b = SessionManager::new(
        Config {
            listen_url: Some(db.url().to_string()),
            ..config()
        },
        b_pool,
    )
    .await
    .unwrap();
    let b = listening(b).await;
    let (mut s, s_t) = a.create_session(Uuid::new_v4(), small()).await.unwrap();
    // Warm B's connection so that its next read is a single round trip (statement prepared);
    // pgsession keeps it for the next operation rather than returning it to the pool.
    assert!(b.get_session(&unknown_token()).await.unwrap().is_none());

    proxy.hold_responses();
    let reader = {
        let b = b.clone();
        let token = s_t.clone();
        tokio::spawn(async move { b.get_session(&token).await })
    };
    // B's SELECT has run on the server; its answer, version 1, is held in the proxy.
    proxy.wait_until_response_held().await;
    let before = b.stats().invalidations;
    set_and_save(&a, &mut s, "theme", json!("light")).await;
    eventually(VISIBLE_WITHIN, "B applied the invalidation", || async {
        b.stats().invalidations > before
    })
    .await;
    proxy.resume();

    let old = reader.await.unwrap().unwrap().unwrap();
    assert_eq!(
        old.version(),
        1,
        "the read began before the write: fine to return"
    );
    assert_eq!(b.stats().fills_rejected, 1);
    assert_eq!(version_on(&b, &s_t).await, Some(2), "but it was not cached");
}

#[tokio::test]
async fn a_lost_announcer_connection_is_replaced_and_the_write_still_reaches_other_nodes() {
    let db = TestDatabase::create().await;
    let a = node(&db, config()).await;
    let b = node(&db, config()).await;
    let check = pool(&db).await;
    let (mut s, s_t) = a.create_session(Uuid::new_v4(), small()).await.unwrap();
    b.get_session(&s_t).await.unwrap().unwrap();
    set_and_save(&a, &mut s, "n", json!(1)).await;
    wait_serves(&b, &s_t, Some(2), VISIBLE_WITHIN, "B serves version 2").await;

    // Each node connected its announcer at start, not at its first write.
    let announcer = "SELECT pid FROM pg_stat_activity \
                     WHERE datname = current_database() AND application_name = 'pgsession-announcer'";
    let announcers = || async {
        let pids: Vec<i32> = sqlx::query_scalar(announcer)
            .fetch_all(&check)
            .await
            .unwrap();
        pids
    };
    eventually(
        VISIBLE_WITHIN,
        "one announcer per node, B's before it wrote anything",
        || async { announcers().await.len() == 2 },
    )
    .await;
    let pids = announcers().await;

    // The announcers' connections die while idle, as in a database restart.
    let killed: Vec<bool> =
        sqlx::query_scalar("SELECT pg_terminate_backend(pid, 5000) FROM unnest($1::int[]) AS pid")
            .bind(&pids)
            .fetch_all(&check)
            .await
            .unwrap();
    assert_eq!(killed, vec![true, true]);

    set_and_save(&a, &mut s, "n", json!(2)).await;
    // Well before the sweep (ORPHAN_GRACE, 2 s) would announce the row instead.
    wait_serves(&b, &s_t, Some(3), VISIBLE_WITHIN, "B serves version 3").await;
    // The announcement went through the pool while A opened a new announcer connection.
    eventually(
        VISIBLE_WITHIN,
        "A's announcer reconnected (B has written nothing)",
        || async { announcers().await.len() == 1 },
    )
    .await;
    let replaced = announcers().await;
    assert!(!pids.contains(&replaced[0]), "a new announcer connection");
}

#[tokio::test]
async fn killed_listener_backend_degrades_to_database_reads_then_resynchronises() {
    let db = TestDatabase::create().await;
    let a = node(&db, config()).await;
    let b = node(&db, config()).await;
    // ALTER DATABASE cannot lock out the database it is issued from.
    let check = sqlx::PgPool::connect(&pgsession_testkit::server_url())
        .await
        .unwrap();
    let (mut s, s_t) = a.create_session(Uuid::new_v4(), small()).await.unwrap();
    let (_same, same_t) = a.create_session(Uuid::new_v4(), small()).await.unwrap();
    for t in [&s_t, &same_t] {
        b.get_session(t).await.unwrap().unwrap();
    }

    // Keep the listeners out while the outage lasts; pooled connections stay usable.
    let name = db.name();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {name} ALLOW_CONNECTIONS false"
    )))
    .execute(&check)
    .await
    .unwrap();
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND application_name LIKE 'pgsession-listener %'",
    )
    .bind(name)
    .fetch_all(&check)
    .await
    .unwrap();
    assert_eq!(killed, vec![true, true]);
    wait_distrusted(&b).await;

    // A write nobody is listening for.
    set_and_save(&a, &mut s, "theme", json!("light")).await;
    let hits = b.stats().hits;
    assert_eq!(
        version_on(&b, &s_t).await,
        Some(2),
        "read through to the database"
    );
    assert_eq!(version_on(&b, &same_t).await, Some(1));
    assert_eq!(b.stats().hits, hits, "nothing served from the cache");

    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {name} ALLOW_CONNECTIONS true"
    )))
    .execute(&check)
    .await
    .unwrap();
    wait_trusted(&b).await;
    assert!(b.stats().reconnects >= 1);
    assert_eq!(version_on(&b, &s_t).await, Some(2));
    let hits = b.stats().hits;
    assert_eq!(version_on(&b, &same_t).await, Some(1));
    assert_eq!(
        b.stats().hits,
        hits + 1,
        "unchanged entry kept and trusted again"
    );
}

#[tokio::test]
async fn resynchronisation_evicts_what_changed_while_nobody_listened() {
    let db = TestDatabase::create().await;
    let a = node(&db, config()).await;
    let proxy = FaultProxy::start(socket_addr(db.url()).await).await;
    let b = node_listening_through(&db, &proxy, config()).await;
    let (mut changed, changed_t) = a.create_session(Uuid::new_v4(), small()).await.unwrap();
    let (deleted, deleted_t) = a.create_session(Uuid::new_v4(), small()).await.unwrap();
    let (_same, same_t) = a.create_session(Uuid::new_v4(), small()).await.unwrap();
    for t in [&changed_t, &deleted_t, &same_t] {
        b.get_session(t).await.unwrap().unwrap();
    }

    proxy.refuse_new(true);
    proxy.disconnect_all();
    wait_distrusted(&b).await;
    set_and_save(&a, &mut changed, "theme", json!("light")).await;
    a.delete_session(deleted.id()).await.unwrap();
    // During the outage B answers from the database; its stale copy of `changed` is still in
    // memory but not served.
    assert_eq!(version_on(&b, &changed_t).await, Some(2));
    assert_eq!(version_on(&b, &deleted_t).await, None);

    proxy.refuse_new(false);
    wait_trusted(&b).await;
    assert!(b.stats().resync_evictions >= 1);
    assert_eq!(
        version_on(&b, &changed_t).await,
        Some(2),
        "stale copy evicted"
    );
    assert_eq!(version_on(&b, &deleted_t).await, None);
    let hits = b.stats().hits;
    assert_eq!(version_on(&b, &same_t).await, Some(1));
    assert_eq!(b.stats().hits, hits + 1, "unchanged copy kept");
}

#[tokio::test]
async fn half_open_listener_connection_is_detected_by_the_probe() {
    let db = TestDatabase::create().await;
    let a = node(&db, config()).await;
    let proxy = FaultProxy::start(socket_addr(db.url()).await).await;
    let b = node_listening_through(
        &db,
        &proxy,
        Config {
            listener_probe_interval: Duration::from_millis(200),
            // Short enough to keep the test quick, long enough that a probe answered slowly
            // on a loaded machine is not taken for a fault (the reconnect count is asserted).
            listener_timeout: Duration::from_secs(1),
            ..config()
        },
    )
    .await;
    let (mut s, s_t) = a.create_session(Uuid::new_v4(), small()).await.unwrap();
    b.get_session(&s_t).await.unwrap().unwrap();

    // Packets vanish; no FIN, no RST: only the probe can tell.
    let degraded_before = b.stats().degraded_time;
    let reconnects_before = b.stats().reconnects;
    proxy.pause();
    wait_distrusted(&b).await;
    set_and_save(&a, &mut s, "theme", json!("light")).await;
    assert_eq!(version_on(&b, &s_t).await, Some(2));

    proxy.resume();
    wait_trusted(&b).await;
    assert_eq!(version_on(&b, &s_t).await, Some(2));
    assert!(b.stats().degraded_time > degraded_before);
    assert_eq!(b.stats().reconnects, reconnects_before + 1);
}

#[tokio::test]
async fn database_restart_fails_calls_with_typed_errors_and_recovers_without_stale_reads() {
    let server = TempPostgres::start().expect("private server");
    let url = server.url("postgres");
    // B's listener goes through a proxy so that the test decides when it may come back.
    let proxy = FaultProxy::start(socket_addr(&url).await).await;
    let a = listening(SessionManager::connect(config(), &url).await.unwrap()).await;
    let b_config = Config {
        listen_url: Some(proxy.proxied_url(&url)),
        ..config()
    };
    let b = listening(SessionManager::connect(b_config, &url).await.unwrap()).await;
    let (mut s, s_t) = a.create_session(Uuid::new_v4(), small()).await.unwrap();
    b.get_session(&s_t).await.unwrap().unwrap();
    assert!(
        b.stats().entries >= 1,
        "B caches the session it must not serve later"
    );

    proxy.refuse_new(true);
    server.stop().unwrap();
    wait_distrusted(&b).await;
    match b.get_session(&s_t).await {
        Err(e @ Error::Database(_)) => assert!(e.is_transient(), "{e:?}"),
        other => panic!("served without a database: {other:?}"),
    }

    server.start_again().unwrap();
    // A's pooled connections died with the server: a write may fail (typed) before one works.
    // B's listener is still kept out, so nobody hears this write's announcement.
    let mut attempts = 0;
    loop {
        s.set("theme", "light").unwrap();
        match a.update_session(&mut s).await {
            Ok(()) => break,
            Err(e @ Error::Database(_)) if attempts < 20 => {
                assert!(e.is_transient(), "{e:?}");
                attempts += 1;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(s.version(), 2);
    // The pre-restart copy is still in B's memory, and never served.
    for _ in 0..5 {
        match b.get_session(&s_t).await {
            Ok(found) => assert_eq!(found.map(|s| s.version()), Some(2)),
            Err(e) => assert!(e.is_transient(), "{e:?}"),
        }
    }
    assert!(!*b.subscribe_cache_trust().borrow(), "still not listening");

    proxy.refuse_new(false);
    wait_trusted(&b).await;
    assert_eq!(version_on(&b, &s_t).await, Some(2), "resync evicted it");
    let hits = b.stats().hits;
    assert_eq!(version_on(&b, &s_t).await, Some(2));
    assert_eq!(b.stats().hits, hits + 1, "cache in use again");
    assert!(b.stats().reconnects >= 1);

    // And with everything healthy again, A's writes reach B as usual.
    set_and_save(&a, &mut s, "theme", json!("dark")).await;
    wait_serves(&b, &s_t, Some(3), VISIBLE_WITHIN, "B serves A's next write").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_misses_and_writes_converge_to_the_database_version() {
    let db = TestDatabase::create().await;
    let a = node(&db, config()).await;
    let b = node(&db, config()).await;
    let check = pool(&db).await;
    let mut sessions = Vec::new();
    for _ in 0..3 {
        sessions.push(a.create_session(Uuid::new_v4(), small()).await.unwrap());
    }
    let ids: Vec<SessionToken> = sessions.iter().map(|(_, t)| t.clone()).collect();
    let mut sessions: Vec<_> = sessions.into_iter().map(|(s, _)| s).collect();
    let writes = 300;

    let readers: Vec<_> = (0..4)
        .map(|r| {
            let b = b.clone();
            let ids = ids.clone();
            tokio::spawn(async move {
                let mut reads = 0u64;
                let mut last = HashMap::new();
                for i in r.. {
                    let token = &ids[i % ids.len()];
                    let v = b.get_session(token).await.unwrap().unwrap().version();
                    let prev = last.insert(token.id(), v).unwrap_or(0);
                    assert!(
                        v >= prev,
                        "versions went backwards on one node: {prev} -> {v}"
                    );
                    reads += 1;
                    // Until every session has reached its final version.
                    if last.len() == ids.len() && last.values().all(|v| *v > writes / 3) {
                        break;
                    }
                    // A cache hit completes without suspending; let the writer's tasks run.
                    tokio::task::yield_now().await;
                }
                reads
            })
        })
        .collect();
    for i in 0..writes as usize {
        let s = &mut sessions[i % 3];
        set_and_save(&a, s, "n", json!(i)).await;
    }
    for r in readers {
        assert!(r.await.unwrap() > 0);
    }
    // Quiet: B has received every invalidation.
    eventually(VISIBLE_WITHIN, "B received all invalidations", || async {
        b.stats().invalidations >= writes as u64
    })
    .await;
    for token in &ids {
        let expected = db_version(&check, token.id()).await;
        assert_eq!(version_on(&b, token).await, expected);
        assert_eq!(version_on(&b, token).await, expected, "cached copy too");
    }
    assert!(b.stats().misses > 10, "the readers did miss");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_hitting_the_cache_while_invalidations_arrive_see_monotonic_versions() {
    let db = TestDatabase::create().await;
    let a = node(&db, config()).await;
    let b = node(&db, config()).await;
    let check = pool(&db).await;
    let mut sessions = Vec::new();
    for _ in 0..40 {
        sessions.push(a.create_session(Uuid::new_v4(), small()).await.unwrap());
    }
    let ids: Vec<SessionToken> = sessions.iter().map(|(_, t)| t.clone()).collect();
    let mut sessions: Vec<_> = sessions.into_iter().map(|(s, _)| s).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..8)
        .map(|r| {
            let b = b.clone();
            let ids = ids.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut last = HashMap::new();
                let mut i = r;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let token = &ids[i % ids.len()];
                    i += 7;
                    let v = b.get_session(token).await.unwrap().unwrap().version();
                    let prev = last.insert(token.id(), v).unwrap_or(0);
                    assert!(v >= prev, "{prev} -> {v}");
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    for round in 0..5 {
        for s in sessions.iter_mut().step_by(3) {
            set_and_save(&a, s, "round", json!(round)).await;
        }
    }
    let expected_messages = 5 * sessions.iter().step_by(3).count() as u64;
    eventually(VISIBLE_WITHIN, "all invalidations received", || async {
        b.stats().invalidations >= expected_messages
    })
    .await;
    // The readers keep going until the cache has served most of their reads: however the
    // writer and readers were scheduled, once the writes stop every read is a hit.
    eventually(RECOVERY, "most reads served from the cache", || async {
        let stats = b.stats();
        stats.hits > stats.misses
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    for token in &ids {
        assert_eq!(
            version_on(&b, token).await,
            db_version(&check, token.id()).await
        );
    }
}

#[tokio::test]
async fn clear_cache_empties_every_node() {
    let db = TestDatabase::create().await;
    let a = node(&db, config()).await;
    let b = node(&db, config()).await;
    let c = node(&db, config()).await;
    let (_s, s_t) = a.create_session(Uuid::new_v4(), small()).await.unwrap();
    for n in [&a, &b, &c] {
        n.get_session(&s_t).await.unwrap().unwrap();
        assert_eq!(n.stats().entries, 1);
    }
    a.clear_cache().await.unwrap();
    assert_eq!(a.stats().entries, 0);
    for n in [b, c] {
        eventually(VISIBLE_WITHIN, "cleared", move || {
            let n = n.clone();
            async move { n.stats().entries == 0 }
        })
        .await;
    }
}

#[tokio::test]
async fn cache_max_age_bounds_how_long_writes_outside_pgsession_go_unseen() {
    let db = TestDatabase::create().await;
    let max_age = Duration::from_millis(300);
    let b = node(
        &db,
        Config {
            cache_max_age: Some(max_age),
            ..config()
        },
    )
    .await;
    let check = pool(&db).await;
    // The cache dates its entries by the wall clock; no entry for `s` can be older.
    let cached_at = chrono::Utc::now();
    let (s, s_t) = b.create_session(Uuid::new_v4(), small()).await.unwrap();
    assert_eq!(version_on(&b, &s_t).await, Some(1));
    // An administrator's SQL: no notification.
    sqlx::query(
        "UPDATE sessions SET attributes = attributes || '{\"role\": \"user\"}', \
         version = version + 1 WHERE id = $1",
    )
    .bind(s.id())
    .execute(&check)
    .await
    .unwrap();
    wait_serves(
        &b,
        &s_t,
        Some(2),
        max_age * 5,
        "re-read after cache_max_age",
    )
    .await;
    let served_for = (chrono::Utc::now() - cached_at).to_std().unwrap();
    assert!(served_for >= max_age, "re-read after {served_for:?}");
}

#[tokio::test]
async fn an_entry_that_looks_idle_is_rechecked_against_accesses_on_other_nodes() {
    let db = TestDatabase::create().await;
    // Each step below takes 250 ms; a step may stall for 1.75 s before the session really
    // goes idle on A.
    let idle = Duration::from_secs(2);
    let config = Config {
        idle_timeout: Some(idle),
        last_access_flush_interval: Duration::from_millis(500),
        ..config()
    };
    let a = node(&db, config.clone()).await;
    let b = node(&db, config).await;
    let (_busy, busy_t) = a.create_session(Uuid::new_v4(), small()).await.unwrap();
    let (_quiet, quiet_t) = a.create_session(Uuid::new_v4(), small()).await.unwrap();
    for t in [&busy_t, &quiet_t] {
        b.get_session(t).await.unwrap().unwrap();
    }
    // The user keeps using the session, on node A only, for longer than the idle timeout.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        a.get_session(&busy_t).await.unwrap().unwrap();
        a.flush_last_access().await.unwrap();
    }
    // B's copy says idle for 2.5 s or more; the database knows better.
    assert!(b.get_session(&busy_t).await.unwrap().is_some());
    assert!(b.get_session(&quiet_t).await.unwrap().is_none());
    assert!(a.get_session(&quiet_t).await.unwrap().is_none());
}

#[tokio::test]
async fn a_cache_clear_announced_while_a_node_was_not_listening_is_applied_on_reconnect() {
    let db = TestDatabase::create().await;
    let a = node(&db, config()).await;
    let proxy = FaultProxy::start(socket_addr(db.url()).await).await;
    let b = node_listening_through(&db, &proxy, config()).await;
    let check = pool(&db).await;
    let (_s, s_t) = a.create_session(Uuid::new_v4(), small()).await.unwrap();
    b.get_session(&s_t).await.unwrap().unwrap();

    proxy.refuse_new(true);
    proxy.disconnect_all();
    wait_distrusted(&b).await;
    // A change pgsession cannot see (no version bump), then a clear to publish it.
    sqlx::query("UPDATE sessions SET attributes = attributes || '{\"role\": \"user\"}'")
        .execute(&check)
        .await
        .unwrap();
    a.clear_cache().await.unwrap();

    proxy.refuse_new(false);
    wait_trusted(&b).await;
    let seen = b.get_session(&s_t).await.unwrap().unwrap();
    assert_eq!(seen.get("role"), Some(&json!("user")));
}

#[tokio::test]
async fn invalidations_left_in_the_outbox_by_a_stopped_node_are_announced_by_the_others() {
    let db = TestDatabase::create().await;
    let a = node(&db, config()).await;
    let b = node(&db, config()).await;
    let check = pool(&db).await;
    let (s, s_t) = a.create_session(Uuid::new_v4(), small()).await.unwrap();
    assert_eq!(version_on(&b, &s_t).await, Some(1));
    // What a node that stopped between its write and the announcement leaves behind: the
    // committed write and its outbox row, and no notification. The row is dated in the
    // future, so no sweep takes it (grace 2 s) while B is checked below; then it is dated
    // past the grace, and the next sweep (every 2 s) must take it.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "UPDATE sessions SET version = 2, attributes = attributes || '{{\"role\": \"user\"}}' \
         WHERE id = '{id}'; \
         INSERT INTO sessions_outbox (payload, created_at) \
         VALUES ('u {hex} 2', now() + interval '1 hour');",
        id = s.id(),
        hex = s.id()
    )))
    .execute(&check)
    .await
    .unwrap();
    assert_eq!(
        version_on(&b, &s_t).await,
        Some(1),
        "nobody announced it yet"
    );
    sqlx::query("UPDATE sessions_outbox SET created_at = now() - interval '3 seconds'")
        .execute(&check)
        .await
        .unwrap();
    wait_serves(
        &b,
        &s_t,
        Some(2),
        Duration::from_secs(5),
        "the sweep announced it",
    )
    .await;
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM sessions_outbox")
        .fetch_one(&check)
        .await
        .unwrap();
    assert_eq!(left, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_are_announced_to_other_nodes_and_retired_in_bulk() {
    let db = TestDatabase::create().await;
    let a = node(&db, unlimited()).await;
    let b = node(&db, unlimited()).await;
    let check = pool(&db).await;
    // Record how many outbox rows each DELETE retires.
    sqlx::raw_sql(
        "CREATE TABLE retired (n bigint); \
         CREATE FUNCTION log_retire() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN INSERT INTO retired SELECT count(*) FROM gone; RETURN NULL; END $$; \
         CREATE TRIGGER log_retire AFTER DELETE ON sessions_outbox \
           REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION log_retire();",
    )
    .execute(&check)
    .await
    .unwrap();
    let mut sessions = Vec::new();
    for _ in 0..40 {
        sessions.push(a.create_session(Uuid::new_v4(), small()).await.unwrap());
    }
    for (_, t) in &sessions {
        b.get_session(t).await.unwrap().unwrap();
    }
    let started = std::time::Instant::now();
    let writers: Vec<_> = sessions
        .into_iter()
        .map(|(mut s, t)| {
            let a = a.clone();
            tokio::spawn(async move {
                set_and_save(&a, &mut s, "theme", json!("light")).await;
                t
            })
        })
        .collect();
    let mut ids = Vec::new();
    for w in writers {
        ids.push(w.await.unwrap());
    }
    for token in &ids {
        wait_serves(&b, token, Some(2), VISIBLE_WITHIN, "B sees every update").await;
    }
    // Retired well before the sweep would announce them a second time.
    eventually(Duration::from_secs(1), "outbox emptied", || async {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM sessions_outbox")
            .fetch_one(&check)
            .await
            .unwrap();
        left == 0
    })
    .await;
    // A row is retired only after the announcer has counted it (B may hear a NOTIFY before
    // A's announcer has read the reply to it, so the counters are checked only now).
    let stats = a.stats();
    assert_eq!(stats.invalidations_announced, 40);
    assert!(stats.announce_messages <= 40, "{stats:?}");
    let batches: Vec<i64> = sqlx::query_scalar("SELECT n FROM retired WHERE n > 0")
        .fetch_all(&check)
        .await
        .unwrap();
    assert_eq!(batches.iter().sum::<i64>(), 40);
    // Rows are retired at most once per 500 ms while writes keep coming (and once at the
    // end), not one by one: a slow machine stretches the run, not the number per interval.
    let intervals = started.elapsed().as_millis() / 500;
    assert!(
        (batches.len() as u128) <= intervals + 2 && batches.len() < 40,
        "{batches:?} over {intervals} intervals"
    );
}

#[tokio::test]
async fn resynchronisation_needs_no_pool_connection() {
    let db = TestDatabase::create().await;
    let (shared, b) = shared_pool_node(&db, 2, Duration::from_secs(10)).await;
    let (_s, s_t) = b.create_session(Uuid::new_v4(), small()).await.unwrap();
    assert_eq!(version_on(&b, &s_t).await, Some(1));
    // The application takes the whole pool (pgsession hands back what it kept once idle).
    let held = vec![
        shared.acquire().await.unwrap(),
        shared.acquire().await.unwrap(),
    ];
    let check = pool(&db).await;
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name LIKE 'pgsession-listener %'",
    )
    .fetch_all(&check)
    .await
    .unwrap();
    assert_eq!(killed, vec![true]);
    // Reconnected and resynchronised, with no pool connection to be had.
    eventually(
        RECOVERY,
        "the cache trusted again after a reconnect",
        || {
            let stats = b.stats();
            async move { stats.reconnects >= 1 && stats.cache_trusted }
        },
    )
    .await;
    drop(held);
    assert_eq!(version_on(&b, &s_t).await, Some(1));
    b.shutdown().await.unwrap();
}

/// A node whose pool (and so its announcer) reaches the server through `proxy`, while its
/// listener connects directly.
async fn node_writing_through(db: &TestDatabase, proxy: &FaultProxy) -> SessionManager {
    let config = Config {
        listen_url: Some(db.url().to_string()),
        ..config()
    };
    listening(
        SessionManager::connect(config, &proxy.proxied_url(db.url()))
            .await
            .expect("manager starts"),
    )
    .await
}

async fn terminate_announcers(check: &sqlx::PgPool) -> usize {
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity \
         WHERE datname = current_database() AND application_name = 'pgsession-announcer'",
    )
    .fetch_all(check)
    .await
    .unwrap();
    killed.into_iter().filter(|k| *k).count()
}

#[tokio::test]
async fn a_killed_announcer_that_cannot_reconnect_at_once_does_not_delay_invalidations() {
    let db = TestDatabase::create().await;
    let proxy = FaultProxy::start(socket_addr(db.url()).await).await;
    let a = node_writing_through(&db, &proxy).await;
    let b = node(&db, config()).await;
    let check = pool(&db).await;
    let (mut s, s_t) = a.create_session(Uuid::new_v4(), small()).await.unwrap();
    // A's pool has a connection kept, B has the session cached.
    set_and_save(&a, &mut s, "n", json!(1)).await;
    wait_serves(&b, &s_t, Some(2), VISIBLE_WITHIN, "B serves version 2").await;
    eventually(VISIBLE_WITHIN, "both announcers connected", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'pgsession-announcer'",
        )
        .fetch_one(&check)
        .await
        .unwrap();
        n == 2
    })
    .await;

    // A's announcer dies, and opening a new connection to the server hangs (an overloaded
    // server, a lossy network), while A's pooled connections keep working.
    proxy.stall_new(true);
    assert!(terminate_announcers(&check).await >= 1);
    for version in 3..6 {
        set_and_save(&a, &mut s, "n", json!(version)).await;
        assert_eq!(s.version(), version);
        // Well before listener_timeout (2 s), the limit for opening a connection.
        wait_serves(
            &b,
            &s_t,
            Some(version),
            VISIBLE_WITHIN,
            "B serves the new version",
        )
        .await;
    }
    proxy.stall_new(false);
    a.delete_session(s.id()).await.unwrap();
    wait_serves(
        &b,
        &s_t,
        None,
        VISIBLE_WITHIN,
        "B stops serving the deleted session",
    )
    .await;
}

#[tokio::test]
async fn a_write_whose_connection_died_after_commit_still_reaches_other_nodes_at_once() {
    let db = TestDatabase::create().await;
    let proxy = FaultProxy::start(socket_addr(db.url()).await).await;
    let a = node_writing_through(&db, &proxy).await;
    let b = node(&db, config()).await;
    let check = pool(&db).await;
    let (mut s, s_t) = a.create_session(Uuid::new_v4(), small()).await.unwrap();
    // A's connection has the update statement prepared, so that the held answer below is
    // the execution's, not the preparation's.
    set_and_save(&a, &mut s, "n", json!(1)).await;
    wait_serves(&b, &s_t, Some(2), VISIBLE_WITHIN, "B serves version 2").await;

    // The update commits on the server, but its answer never reaches A.
    proxy.hold_responses();
    s.set("n", json!(2)).unwrap();
    let write = {
        let a = a.clone();
        let mut s = s.clone();
        tokio::spawn(async move { a.update_session(&mut s).await })
    };
    tokio::time::timeout(RECOVERY, proxy.wait_until_response_held())
        .await
        .expect("the update reached the server");
    // (The held answer may be another statement's, the announcer's say: the update reaches the
    // server all the same.)
    eventually(RECOVERY, "the update committed", || async {
        db_version(&check, s.id()).await == Some(3)
    })
    .await;
    proxy.disconnect_all();
    proxy.resume();
    let outcome = write.await.unwrap();
    assert!(
        matches!(&outcome, Err(e) if e.is_transient()),
        "the writer cannot know the outcome: {outcome:?}"
    );
    // Neither node serves version 2 any more, well before the outbox sweep's grace (2 s).
    wait_serves(
        &a,
        &s_t,
        Some(3),
        VISIBLE_WITHIN,
        "A re-reads its in-doubt write",
    )
    .await;
    wait_serves(
        &b,
        &s_t,
        Some(3),
        VISIBLE_WITHIN,
        "B learns of the committed write",
    )
    .await;
}
