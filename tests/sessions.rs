//! The session manager against a real PostgreSQL, for what only PostgreSQL can show: SQL
//! seen from another connection, several nodes on one table, row locks, pools and connections,
//! migrations and schemas, isolation levels and server faults. Behaviour that does not need
//! PostgreSQL is in the suite of `behaviour.rs`, run against both backends.

mod common;

use std::time::Duration;

use chrono::Utc;
use common::*;
use pgsession::{Config, Error, MaxSessionsPolicy, SessionManager};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use uuid::Uuid;

#[tokio::test]
async fn concurrent_logins_from_several_managers_never_exceed_the_cap() {
    let db = TestDatabase::create().await;
    let check = pool(&db).await;
    // Widen the race deterministically: every insert of a session stalls 300 ms inside its
    // transaction, after the cap was checked. Without per-user serialisation, logins that run
    // meanwhile all see the same sessions and all insert.
    node(&db, config()).await; // creates the schema
    sqlx::raw_sql(
        "CREATE FUNCTION stall() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN PERFORM pg_sleep(0.3); RETURN NEW; END $$; \
         CREATE TRIGGER stall BEFORE INSERT ON sessions FOR EACH ROW EXECUTE FUNCTION stall();",
    )
    .execute(&check)
    .await
    .unwrap();
    for policy in [MaxSessionsPolicy::EvictOldest, MaxSessionsPolicy::Reject] {
        let config = Config {
            max_sessions_per_user: Some(2),
            max_sessions_policy: policy,
            ..config()
        };
        let mut nodes = Vec::new();
        for _ in 0..3 {
            nodes.push(node(&db, config.clone()).await);
        }
        let user = Uuid::new_v4();
        let mut logins = Vec::new();
        for i in 0..6 {
            let m = nodes[i % nodes.len()].clone();
            logins.push(tokio::spawn(async move {
                m.create_session(user, small()).await
            }));
        }
        let mut created = 0;
        for login in logins {
            match login.await.unwrap() {
                Ok(_) => created += 1,
                Err(Error::MaxSessionsReached) => assert_eq!(policy, MaxSessionsPolicy::Reject),
                Err(e) => panic!("unexpected error: {e}"),
            }
        }
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM sessions WHERE user_id = $1")
            .bind(user.to_string())
            .fetch_one(&check)
            .await
            .unwrap();
        assert_eq!(rows, 2, "{policy:?}");
        let expected_created = if policy == MaxSessionsPolicy::Reject {
            2
        } else {
            6
        };
        assert_eq!(created, expected_created, "{policy:?}");
    }
}

#[tokio::test]
async fn the_cap_refuses_to_run_outside_read_committed() {
    let db = TestDatabase::create().await;
    node(&db, config()).await;
    let repeatable = PgPoolOptions::new()
        .max_connections(2)
        .connect_with(
            db.url()
                .parse::<PgConnectOptions>()
                .unwrap()
                .options([("default_transaction_isolation", "repeatable read")]),
        )
        .await
        .unwrap();
    match SessionManager::new(config(), repeatable).await {
        Err(Error::InvalidConfig(msg)) => assert!(msg.contains("read committed"), "{msg}"),
        other => panic!("accepted a REPEATABLE READ pool: {:?}", other.err()),
    }
}

#[tokio::test]
async fn shutdown_writes_pending_accesses_to_the_table_and_closes_the_pool_it_built() {
    let db = TestDatabase::create().await;
    let m = node(&db, config()).await;
    let check = pool(&db).await;
    let (s, s_t) = m.create_session(Uuid::new_v4(), small()).await.unwrap();
    let read = m.get_session(&s_t).await.unwrap().unwrap();
    assert_eq!(m.stats().pending_touches, 1);

    m.shutdown().await.unwrap();
    let stored: chrono::DateTime<Utc> =
        sqlx::query_scalar("SELECT last_accessed_at FROM sessions WHERE id = $1")
            .bind(s.id())
            .fetch_one(&check)
            .await
            .unwrap();
    assert_eq!(stored, read.last_accessed_at());
    // The pool built by `connect` is closed.
    assert!(m.pool().is_closed());
}

#[tokio::test]
async fn shutdown_with_the_database_gone_returns_the_flush_error_within_the_deadline() {
    let server = TempPostgres::start().expect("private server");
    let m = SessionManager::connect(
        Config {
            shutdown_timeout: Duration::from_secs(3),
            ..config()
        },
        &server.url("postgres"),
    )
    .await
    .unwrap();
    let (_s, s_t) = m.create_session(Uuid::new_v4(), small()).await.unwrap();
    m.get_session(&s_t).await.unwrap();
    server.stop().unwrap();
    let started = std::time::Instant::now();
    let result = m.shutdown().await;
    assert!(started.elapsed() < Duration::from_secs(4));
    assert!(
        matches!(result, Err(Error::Database(_)) | Err(Error::Timeout(_))),
        "{result:?}"
    );
}

#[tokio::test]
async fn cleanup_deletes_expired_sessions_in_batches_from_several_nodes_at_once() {
    let db = TestDatabase::create().await;
    let config = Config {
        cleanup_batch_size: 100,
        max_sessions_per_user: None,
        idle_timeout: Some(Duration::from_secs(3600)),
        last_access_flush_interval: Duration::from_secs(60),
        ..config()
    };
    let a = node(&db, config.clone()).await;
    let b = node(&db, config.clone()).await;
    let check = pool(&db).await;
    let user = Uuid::new_v4();
    let mut keep = Vec::new();
    let mut keep_tokens = Vec::new();
    for i in 0..1200 {
        let (s, s_t) = a.create_session(user, small()).await.unwrap();
        if i % 100 == 0 {
            keep.push(s.id());
            keep_tokens.push(s_t);
        }
    }
    // Expire all but `keep`: most absolutely, some by inactivity.
    sqlx::query(
        "UPDATE sessions SET expires_at = now() - interval '1 second' \
         WHERE id <> ALL($1) AND random() < 0.7",
    )
    .bind(&keep)
    .execute(&check)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE sessions SET last_accessed_at = now() - interval '1 day' \
         WHERE id <> ALL($1) AND expires_at > now()",
    )
    .bind(&keep)
    .execute(&check)
    .await
    .unwrap();

    let (da, db_) = tokio::join!(a.cleanup_expired(), b.cleanup_expired());
    assert_eq!(da.unwrap() + db_.unwrap(), 1200 - keep.len() as u64);
    assert_eq!(count_rows(&check).await, keep.len() as i64);
    for token in &keep_tokens {
        assert!(a.get_session(token).await.unwrap().is_some());
    }
}

#[tokio::test]
async fn cleanup_deletes_in_bounded_statements_and_skips_rows_others_hold() {
    let db = TestDatabase::create().await;
    let m = node(
        &db,
        Config {
            cleanup_batch_size: 100,
            max_sessions_per_user: None,
            ..config()
        },
    )
    .await;
    let check = pool(&db).await;
    // Record how many rows each DELETE statement removes.
    sqlx::raw_sql(
        "CREATE TABLE batches (n bigint); \
         CREATE FUNCTION log_batch() RETURNS trigger LANGUAGE plpgsql AS \
           $$ BEGIN INSERT INTO batches SELECT count(*) FROM gone; RETURN NULL; END $$; \
         CREATE TRIGGER log_batch AFTER DELETE ON sessions REFERENCING OLD TABLE AS gone \
           FOR EACH STATEMENT EXECUTE FUNCTION log_batch();",
    )
    .execute(&check)
    .await
    .unwrap();
    let mut ids = Vec::new();
    for _ in 0..350 {
        ids.push(m.create_session(Uuid::new_v4(), small()).await.unwrap().1);
    }
    sqlx::query("UPDATE sessions SET expires_at = now() - interval '1 second'")
        .execute(&check)
        .await
        .unwrap();
    // Another transaction holds one expired row (an update in flight, say).
    let holder = lock_row(&check, ids[0].id()).await;

    let deleted = tokio::time::timeout(Duration::from_secs(10), m.cleanup_expired())
        .await
        .expect("cleanup does not wait for the held row")
        .unwrap();
    assert_eq!(deleted, 349);
    let batches: Vec<i64> = sqlx::query_scalar("SELECT n FROM batches WHERE n > 0 ORDER BY n DESC")
        .fetch_all(&check)
        .await
        .unwrap();
    assert_eq!(batches, vec![100, 100, 100, 49]);
    holder.rollback().await.unwrap();
    assert_eq!(m.cleanup_expired().await.unwrap(), 1);
}

#[tokio::test]
async fn nodes_starting_together_migrate_once_into_a_custom_schema() {
    let db = TestDatabase::create().await;
    let config = Config {
        schema: Some("auth".into()),
        table_prefix: "app_".into(),
        ..config()
    };
    let starts: Vec<_> = (0..5)
        .map(|_| {
            let config = config.clone();
            let url = db.url().to_string();
            tokio::spawn(async move { SessionManager::connect(config, &url).await })
        })
        .collect();
    let mut nodes = Vec::new();
    for start in starts {
        nodes.push(start.await.unwrap().expect("every node starts"));
    }
    let check = pool(&db).await;
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM auth.app_sessions_migrations")
        .fetch_one(&check)
        .await
        .unwrap();
    assert_eq!(applied, migration_count(), "each migration recorded once");
    let (s, s_t) = nodes[0]
        .create_session(Uuid::new_v4(), small())
        .await
        .unwrap();
    let in_table: i64 = sqlx::query_scalar("SELECT count(*) FROM auth.app_sessions WHERE id = $1")
        .bind(s.id())
        .fetch_one(&check)
        .await
        .unwrap();
    assert_eq!(in_table, 1);
    // A different prefix is a different, independent store.
    let other = node(
        &db,
        Config {
            schema: Some("auth".into()),
            table_prefix: "other_".into(),
            ..config
        },
    )
    .await;
    assert!(other.get_session(&s_t).await.unwrap().is_none());
}

#[tokio::test]
async fn schema_problems_are_reported_not_papered_over() {
    let db = TestDatabase::create().await;
    let no_migrations = Config {
        run_migrations: false,
        ..config()
    };
    assert!(matches!(
        SessionManager::connect(no_migrations.clone(), db.url()).await,
        Err(Error::Migration(_))
    ));
    node(&db, config()).await;
    SessionManager::connect(no_migrations, db.url())
        .await
        .expect("current schema accepted");

    let check = pool(&db).await;
    sqlx::query("UPDATE sessions_migrations SET checksum = 'edited'")
        .execute(&check)
        .await
        .unwrap();
    assert!(matches!(
        SessionManager::connect(config(), db.url()).await,
        Err(Error::Migration(_))
    ));
}

#[tokio::test]
async fn urls_that_cannot_be_used_are_rejected_as_invalid_configuration() {
    let db = TestDatabase::create().await;
    let bad_listen_url = Config {
        listen_url: Some("not a url".into()),
        ..config()
    };
    match SessionManager::connect(bad_listen_url, db.url()).await {
        Err(Error::InvalidConfig(msg)) => assert!(msg.contains("listen_url"), "{msg}"),
        other => panic!("listen_url: {:?}", other.err()),
    }
    assert!(matches!(
        SessionManager::connect(config(), "definitely not a url").await,
        Err(Error::InvalidConfig(_))
    ));
}

#[tokio::test]
async fn a_caller_supplied_pool_is_used_and_left_open() {
    let db = TestDatabase::create().await;
    let pool = pool(&db).await;
    let m = SessionManager::new(config(), pool.clone()).await.unwrap();
    let (s, _s_t) = m.create_session(Uuid::new_v4(), small()).await.unwrap();
    m.shutdown().await.unwrap();
    assert!(!pool.is_closed());
    assert_eq!(db_version(&pool, s.id()).await, Some(1));
}

#[tokio::test]
async fn a_cancelled_start_leaves_no_listener_behind() {
    let db = TestDatabase::create().await;
    node(&db, config()).await.shutdown().await.unwrap();
    let check = pool(&db).await;
    let listeners = || {
        let check = check.clone();
        let name = db.name().to_string();
        async move {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = $1 AND application_name LIKE 'pgsession-listener %'",
            )
            .bind(name)
            .fetch_one(&check)
            .await
            .unwrap();
            n
        }
    };
    eventually(
        Duration::from_secs(5),
        "first manager's listener gone",
        || async { listeners().await == 0 },
    )
    .await;
    // Give up on starting while the manager waits for its listener, which cannot finish
    // connecting: the server has answered, and the answer is held.
    let proxy = FaultProxy::start(socket_addr(db.url()).await).await;
    proxy.hold_responses();
    let url = db.url().to_string();
    let config = Config {
        listen_url: Some(proxy.proxied_url(&url)),
        listener_timeout: Duration::from_secs(30),
        ..config()
    };
    let start = tokio::spawn(async move { SessionManager::connect(config, &url).await });
    eventually(Duration::from_secs(5), "the listener connected", || async {
        listeners().await == 1
    })
    .await;
    proxy.wait_until_response_held().await;
    assert!(!start.is_finished(), "still starting");
    start.abort();
    let _ = start.await;
    eventually(
        Duration::from_secs(5),
        "the abandoned listener closed",
        || async { listeners().await == 0 },
    )
    .await;
}

#[tokio::test]
async fn an_access_being_flushed_still_counts_for_reads() {
    let db = TestDatabase::create().await;
    let m = node(
        &db,
        Config {
            cache_capacity: 0,
            idle_timeout: Some(Duration::from_secs(60)),
            last_access_flush_interval: Duration::from_secs(30),
            ..config()
        },
    )
    .await;
    let check = pool(&db).await;
    let (s, s_t) = m.create_session(Uuid::new_v4(), small()).await.unwrap();
    m.get_session(&s_t).await.unwrap().unwrap();
    // The database says idle for an hour; only this node's pending access says otherwise.
    sqlx::query("UPDATE sessions SET last_accessed_at = now() - interval '1 hour'")
        .execute(&check)
        .await
        .unwrap();
    // Stall the flush on the row lock.
    let holder = lock_row(&check, s.id()).await;
    let flush = {
        let m = m.clone();
        tokio::spawn(async move { m.flush_last_access().await })
    };
    let waiting = check.clone();
    eventually(
        Duration::from_secs(5),
        "the flush waits for the row",
        move || {
            let waiting = waiting.clone();
            async move {
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                 AND query LIKE '%unnest%'",
                )
                .fetch_one(&waiting)
                .await
                .unwrap();
                n == 1
            }
        },
    )
    .await;
    assert!(
        m.get_session(&s_t).await.unwrap().is_some(),
        "the access under way must still keep the session alive"
    );
    holder.rollback().await.unwrap();
    assert_eq!(flush.await.unwrap().unwrap(), 1);
}

#[tokio::test]
async fn the_schema_script_prepares_a_database_the_manager_accepts_without_migrating() {
    let db = TestDatabase::create().await;
    let config = Config {
        schema: Some("by_hand".into()),
        table_prefix: "app_".into(),
        run_migrations: false,
        ..config()
    };
    let script = pgsession::schema_sql(&config).unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(script))
        .execute(&pool(&db).await)
        .await
        .unwrap();
    let m = node(&db, config).await;
    let (_s, s_t) = m.create_session(Uuid::new_v4(), small()).await.unwrap();
    assert!(m.get_session(&s_t).await.unwrap().is_some());
}

#[tokio::test]
async fn a_read_whose_kept_connection_died_is_served_from_a_fresh_one() {
    let db = TestDatabase::create().await;
    let (shared, m) = shared_pool_node(&db, 4, Duration::from_secs(10)).await;
    let other = node(&db, config()).await;
    // Not in m's cache: m reads it from the database.
    let (s, s_t) = other.create_session(Uuid::new_v4(), small()).await.unwrap();
    assert!(m.get_session(&unknown_token()).await.unwrap().is_none());
    assert!(
        shared.num_idle() < shared.size() as usize,
        "the read's connection is kept for the next statement"
    );

    // Every backend of the database dies but the listeners' and announcers' (as in a restart,
    // without the outage that would distrust the cache).
    let check = pool(&db).await;
    let kill_pooled_backends = || async {
        let killed: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid() \
             AND application_name NOT LIKE 'pgsession-listener %' AND application_name <> 'pgsession-announcer'",
        )
        .fetch_all(&check)
        .await
        .unwrap();
        assert!(!killed.is_empty() && killed.iter().all(|k| *k));
    };
    kill_pooled_backends().await;
    let found = m
        .get_session(&s_t)
        .await
        .expect("read again on a checked connection");
    assert_eq!(found.map(|f| f.version()), Some(1));

    kill_pooled_backends().await;
    let listed = m
        .list_user_sessions(s.user_id().unwrap())
        .await
        .expect("listed again");
    assert_eq!(listed.len(), 1);
}

#[tokio::test]
async fn connections_kept_between_operations_go_back_to_a_shared_pool_when_idle() {
    let db = TestDatabase::create().await;
    let (shared, m) = shared_pool_node(&db, 3, Duration::from_secs(30)).await;
    // More concurrent operations than the pool has connections.
    let creates: Vec<_> = (0..12)
        .map(|_| {
            let m = m.clone();
            tokio::spawn(async move { m.create_session(Uuid::new_v4(), small()).await })
        })
        .collect();
    for c in creates {
        c.await.unwrap().unwrap();
    }
    // Kept for the next operation for a moment, then handed back.
    eventually(
        Duration::from_secs(10),
        "connections back in the pool",
        || async { shared.num_idle() as u32 == shared.size() },
    )
    .await;
    assert!(shared.size() <= 3);
}

#[tokio::test]
async fn a_shared_pool_keeps_a_connection_for_the_application_under_session_load() {
    let db = TestDatabase::create().await;
    let (shared, m) = shared_pool_node(&db, 5, Duration::from_secs(30)).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    // Far more session traffic than the pool has connections, until told to stop.
    let load: Vec<_> = (0..16)
        .map(|_| {
            let (m, stop, done) = (m.clone(), stop.clone(), done.clone());
            tokio::spawn(async move {
                let (mut s, _s_t) = m.create_session(Uuid::new_v4(), small()).await.unwrap();
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    s.set("n", n).unwrap();
                    m.update_session(&mut s).await.unwrap();
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    n += 1;
                }
                n
            })
        })
        .collect();
    eventually(
        Duration::from_secs(10),
        "the session load running",
        || async { done.load(std::sync::atomic::Ordering::Relaxed) >= 200 },
    )
    .await;
    // The application's own queries still get a connection promptly, time after time.
    for _ in 0..5 {
        let mut conn = tokio::time::timeout(Duration::from_secs(3), shared.acquire())
            .await
            .expect("the application waited over 3 s for its own pool")
            .unwrap();
        let one: i32 = sqlx::query_scalar("SELECT 1")
            .fetch_one(&mut *conn)
            .await
            .unwrap();
        assert_eq!(one, 1);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut updates = 0;
    for l in load {
        updates += l.await.unwrap();
    }
    assert!(updates > 0, "the session load never ran");
    m.shutdown().await.unwrap();
}

// Several worker threads, so that a lease woken for a connection races newcomers for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_waiting_for_a_busy_shared_pool_take_connections_pgsession_frees() {
    let db = TestDatabase::create().await;
    let (shared, m) = shared_pool_node(&db, 5, Duration::from_secs(3)).await;
    let sessions = {
        let mut v = Vec::new();
        for _ in 0..8 {
            v.push(m.create_session(Uuid::new_v4(), small()).await.unwrap());
        }
        v
    };
    // The application holds most of the pool while it waits for session operations, so that
    // some of those must wait for connections pgsession itself is using.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(shared.acquire().await.unwrap());
    }
    let load: Vec<_> = sessions
        .into_iter()
        .map(|(mut s, _)| {
            let m = m.clone();
            tokio::spawn(async move {
                let started = std::time::Instant::now();
                let mut n = 0u64;
                // Longer than the pool's acquire timeout: a waiter left behind would fail.
                while started.elapsed() < Duration::from_secs(5) {
                    s.set("n", n).map_err(|e| e.to_string())?;
                    m.update_session(&mut s).await.map_err(|e| e.to_string())?;
                    n += 1;
                }
                Ok::<u64, String>(n)
            })
        })
        .collect();
    for l in load {
        let updates = l.await.unwrap().expect("an operation waited out the pool");
        assert!(updates > 0);
    }
    drop(held);
    m.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_operation_queued_behind_stuck_statements_times_out_like_the_pool() {
    let db = TestDatabase::create().await;
    let (_shared, m) = shared_pool_node(&db, 2, Duration::from_secs(1)).await;
    let (mut s, _s_t) = m.create_session(Uuid::new_v4(), small()).await.unwrap();
    // Another client holds the row, so the update's statement waits for it, holding the one
    // connection pgsession takes from a pool of two.
    let blocker = pool(&db).await;
    let tx = lock_row(&blocker, s.id()).await;
    s.set("k", 1).unwrap();
    let stuck = {
        let m = m.clone();
        tokio::spawn(async move { m.update_session(&mut s).await })
    };
    eventually(Duration::from_secs(10), "the update waiting", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM pg_stat_activity \
             WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(&blocker)
        .await
        .unwrap()
            > 0
    })
    .await;
    let read = tokio::time::timeout(Duration::from_secs(10), m.get_session(&unknown_token()))
        .await
        .expect("the read waited with no limit");
    assert!(
        matches!(read, Err(Error::Database(sqlx::Error::PoolTimedOut))),
        "{read:?}"
    );
    tx.rollback().await.unwrap();
    stuck.await.unwrap().unwrap();
    m.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_concurrent_operations_than_connections_open_no_connection_twice() {
    let db = TestDatabase::create().await;
    let proxy = FaultProxy::start(socket_addr(db.url()).await).await;
    // Pool of 10 (at most 8 held by operations), listener and announcer: 12 connections.
    let manager = listening(
        SessionManager::connect(config(), &proxy.proxied_url(db.url()))
            .await
            .unwrap(),
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    let mut tasks = Vec::new();
    for _ in 0..24 {
        let manager = manager.clone();
        tasks.push(tokio::spawn(async move {
            let mut ops = 0;
            while tokio::time::Instant::now() < deadline {
                let (mut s, _s_t) = manager
                    .create_session(Uuid::new_v4(), small())
                    .await
                    .unwrap();
                s.set("n", ops).unwrap();
                manager.update_session(&mut s).await.unwrap();
                manager.delete_session(s.id()).await.unwrap();
                ops += 1;
            }
            ops
        }));
    }
    let mut ops = 0;
    for t in tasks {
        ops += t.await.unwrap();
    }
    assert!(ops > 24, "the workload ran ({ops} rounds)");
    // Opening a connection for a waiting operation and dropping it half-open when another
    // operation's connection came free first would show here as hundreds.
    let opened = proxy.connections_accepted();
    assert!(opened <= 12, "{opened} connections opened for 12 slots");
}
