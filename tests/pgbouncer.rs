//! pgsession behind Debian's PgBouncer (1.18) in transaction mode, only `extra_float_digits`
//! ignored, the way managed offerings put a pooler in front of PostgreSQL:
//! `Config::transaction_pooling`, the pool through the pooler, `listen_url` to the server.
//! The behaviour suite runs this way too (`tests/behaviour.rs`, module `pgbouncer`), and so
//! does a short soak (`tests/soak.rs`).

mod common;

use std::time::Duration;

use common::*;
use pgsession::{Config, Error, SessionEventKind, SessionManager};
use serde_json::json;

/// A database, a private pgbouncer in front of its server, and the configuration of a node
/// behind it.
async fn behind_pgbouncer() -> (TestDatabase, TempPgBouncer, Config) {
    let db = TestDatabase::create().await;
    let upstream = socket_addr(db.url()).await;
    let bouncer = tokio::task::spawn_blocking(move || TempPgBouncer::start(upstream))
        .await
        .unwrap()
        .expect("pgbouncer starts (Debian package pgbouncer)");
    let config = Config {
        transaction_pooling: true,
        listen_url: Some(db.url().to_owned()),
        max_sessions_per_user: None,
        ..config()
    };
    (db, bouncer, config)
}

async fn node_behind(bouncer: &TempPgBouncer, db: &TestDatabase, config: Config) -> SessionManager {
    listening(
        SessionManager::connect(config, &bouncer.url(db.name()))
            .await
            .expect("a node starts behind pgbouncer"),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_behind_pgbouncer_hear_each_others_writes() {
    let (db, bouncer, config) = behind_pgbouncer().await;
    let a = node_behind(&bouncer, &db, config.clone()).await;
    let b = node_behind(&bouncer, &db, config).await;
    let (mut s, token) = a.create_session("alice", small()).await.unwrap();
    assert_eq!(b.get_session(&token).await.unwrap().unwrap().version(), 1);

    let mut events = b.subscribe_events();
    set_and_save(&a, &mut s, "theme", json!("light")).await;
    heard_from_other_node(&mut events, SessionEventKind::Updated).await;
    let on_b = b.get_session(&token).await.unwrap().unwrap();
    assert_eq!(
        (on_b.version(), on_b.get("theme")),
        (2, Some(&json!("light")))
    );

    let mut events = a.subscribe_events();
    assert_eq!(b.delete_all_user_sessions("alice").await.unwrap(), 1);
    heard_from_other_node(&mut events, SessionEventKind::UserLoggedOutEverywhere).await;
    assert!(a.get_session(&token).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_through_pgbouncer_survive_its_server_connections_being_killed() {
    let (db, bouncer, config) = behind_pgbouncer().await;
    let m = node_behind(&bouncer, &db, config).await;
    // Many clients on few server connections: each statement lands wherever the pooler puts
    // it, which named prepared statements or session settings would not survive.
    let mut sessions = Vec::new();
    for i in 0..32 {
        sessions.push(m.create_session(format!("u{i}"), small()).await.unwrap().0);
    }
    let round = |sessions: Vec<pgsession::Session>, n: i64| {
        let m = m.clone();
        async move {
            let mut tasks = Vec::new();
            for mut s in sessions {
                let m = m.clone();
                tasks.push(tokio::spawn(async move {
                    // A statement whose server connection was killed fails, typed; the next
                    // goes through.
                    for _ in 0..50 {
                        s.set("n", n).unwrap();
                        match m.update_session(&mut s).await {
                            Ok(()) => return s,
                            Err(e @ Error::Database(_)) => assert!(e.is_transient(), "{e:?}"),
                            Err(e) => panic!("{e:?}"),
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    panic!("no update went through");
                }));
            }
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.unwrap());
            }
            out
        }
    };
    let sessions = round(sessions, 1).await;
    let killed = {
        let url = db.url().to_owned();
        let b = &bouncer;
        tokio::task::block_in_place(|| b.kill_server_connections(&url)).unwrap()
    };
    assert!(killed >= 1, "pgbouncer held server connections");
    let sessions = round(sessions, 2).await;
    let check = pool(&db).await;
    for s in &sessions {
        assert_eq!(db_version(&check, s.id()).await, Some(s.version()));
        assert_eq!(s.get("n"), Some(&json!(2)));
    }
    // Reads through the pooler too.
    let fresh = m
        .list_user_sessions("u0")
        .await
        .unwrap()
        .into_iter()
        .next()
        .unwrap();
    assert_eq!(fresh.version(), sessions[0].version());
}

#[tokio::test]
async fn transaction_pooling_without_a_direct_listen_url_is_refused() {
    let config = Config {
        transaction_pooling: true,
        ..config()
    };
    let error = SessionManager::connect(config, "postgres://u@127.0.0.1:1/db")
        .await
        .unwrap_err();
    assert!(
        matches!(&error, Error::InvalidConfig(m) if m.contains("listen_url")),
        "{error:?}"
    );
}
