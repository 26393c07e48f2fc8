//! A database that cannot be reached is reported at once and with its cause, calls recover
//! by themselves when it is back, and a shutdown lets the calls under way finish.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pgsession::{Config, Error, SessionManager};
use uuid::Uuid;

/// A local port nothing listens on.
fn closed_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn connect_to_a_closed_port_fails_at_once_and_says_why() {
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", closed_port());
    let started = Instant::now();
    let error = SessionManager::connect(config(), &url).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
    assert!(matches!(error, Error::Database(_)), "{error:?}");
    assert!(error.is_transient());
    let text = error.to_string().to_lowercase();
    assert!(text.contains("refused"), "{text}");
}

#[tokio::test]
async fn connect_to_a_server_that_never_answers_gives_up_at_connect_timeout() {
    // A proxy that accepts connections and never forwards a byte: a blackholed server.
    let proxy = FaultProxy::start(([127, 0, 0, 1], closed_port()).into()).await;
    proxy.stall_new(true);
    let url = proxy.proxied_url(&format!("postgres://postgres@127.0.0.1:{}/postgres", 1));
    let started = Instant::now();
    let error = SessionManager::connect(
        Config {
            connect_timeout: Duration::from_millis(500),
            ..config()
        },
        &url,
    )
    .await
    .unwrap_err();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(2),
        "{took:?}"
    );
    assert!(error.to_string().contains("timed out"), "{error}");
}

#[tokio::test]
async fn calls_fail_at_once_while_the_server_is_down_and_recover_when_it_returns() {
    let server = TempPostgres::start().expect("private server");
    let url = server.url("postgres");
    let m = listening(SessionManager::connect(config(), &url).await.unwrap()).await;
    let (mut s, token) = m.create_session(Uuid::new_v4(), small()).await.unwrap();

    server.stop().unwrap();
    // The node finds out (its listener drops, a call loses its connection)...
    eventually(
        Duration::from_secs(10),
        "the node knows the server is gone",
        || {
            let m = m.clone();
            let token = token.clone();
            async move {
                matches!(m.get_session(&token).await,
                Err(e) if e.to_string().contains("cannot be reached"))
            }
        },
    )
    .await;
    // ...and from then on every call fails at once, saying why.
    for _ in 0..10 {
        let started = Instant::now();
        let error = m.get_session(&token).await.unwrap_err();
        s.set("theme", "dark").unwrap();
        let write = m.update_session(&mut s).await.unwrap_err();
        let create = m.create_session("alice", small()).await.unwrap_err();
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "three calls took {:?}",
            started.elapsed()
        );
        for e in [&error, &write, &create] {
            assert!(e.is_transient(), "{e:?}");
            let text = e.to_string().to_lowercase();
            assert!(text.contains("refused"), "{text}");
        }
    }

    server.start_again().unwrap();
    eventually(Duration::from_secs(10), "calls work again", || {
        let m = m.clone();
        let token = token.clone();
        async move { matches!(m.get_session(&token).await, Ok(Some(_))) }
    })
    .await;
    s.set("theme", "light").unwrap();
    m.update_session(&mut s).await.unwrap();
    m.create_session("alice", small()).await.unwrap();
    m.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_calls_under_way_finish_and_refuses_later_ones() {
    let db = TestDatabase::create().await;
    // Calls queue for this pool's connections while the test holds the table: give them as
    // long as the test may take on a slow machine.
    let queue = sqlx::postgres::PgPoolOptions::new()
        .max_connections(10)
        .acquire_timeout(Duration::from_secs(60))
        .connect(db.url())
        .await
        .unwrap();
    let m = listening(
        SessionManager::new(
            Config {
                max_sessions_per_user: None,
                shutdown_timeout: Duration::from_secs(60),
                ..config()
            },
            queue,
        )
        .await
        .unwrap(),
    )
    .await;
    let check = pool(&db).await;
    let (s, token) = m.create_session("alice", small()).await.unwrap();

    let mut visitors = Vec::new();
    for _ in 0..20 {
        visitors.push(m.create_anonymous_session(small()).await.unwrap().0);
    }
    // Writes to the table block until the test lets them through.
    let mut gate = check.begin().await.unwrap();
    sqlx::query("LOCK TABLE sessions IN SHARE MODE")
        .execute(&mut *gate)
        .await
        .unwrap();
    let mut calls = Vec::new();
    for i in 0..100 {
        let (m, mut s) = (m.clone(), s.clone());
        calls.push(tokio::spawn(async move {
            s.set(format!("k{i}"), i).unwrap();
            m.update_session(&mut s).await.map(|_| ())
        }));
    }
    for _ in 0..50 {
        let m = m.clone();
        calls.push(tokio::spawn(async move {
            m.create_session("bob", small()).await.map(|_| ())
        }));
    }
    for mut visitor in visitors {
        let m = m.clone();
        calls.push(tokio::spawn(async move {
            m.log_in(&mut visitor, "dave").await.map(|_| ())
        }));
    }
    eventually(Duration::from_secs(5), "170 calls under way", || {
        let n = m.stats().calls_in_flight;
        async move { n == 170 }
    })
    .await;

    let stopping = {
        let m = m.clone();
        tokio::spawn(async move { m.shutdown().await })
    };
    // Shutdown has begun (a call that does no I/O tells without blocking): new calls are
    // refused...
    eventually(Duration::from_secs(5), "shutdown begun", || {
        let refused = matches!(m.touch_session(s.id()), Err(Error::ShutDown));
        async move { refused }
    })
    .await;
    assert!(matches!(
        m.create_session("carol", small()).await,
        Err(Error::ShutDown)
    ));
    assert!(matches!(m.get_session(&token).await, Err(Error::ShutDown)));
    // ...while the ones under way wait for the database, shutdown waiting for them.
    assert_eq!(m.stats().calls_in_flight, 170);
    assert!(!stopping.is_finished());

    gate.rollback().await.unwrap();
    for call in calls {
        call.await
            .unwrap()
            .expect("a call under way at shutdown completes");
    }
    stopping.await.unwrap().unwrap();
    let version: i64 = sqlx::query_scalar("SELECT version FROM sessions WHERE id = $1")
        .bind(s.id())
        .fetch_one(&check)
        .await
        .unwrap();
    assert_eq!(version, 101, "every update landed");
    let created: i64 = sqlx::query_scalar("SELECT count(*) FROM sessions WHERE user_id = 'bob'")
        .fetch_one(&check)
        .await
        .unwrap();
    assert_eq!(created, 50, "every create landed");
    let logged_in: i64 = sqlx::query_scalar("SELECT count(*) FROM sessions WHERE user_id = 'dave'")
        .fetch_one(&check)
        .await
        .unwrap();
    assert_eq!(logged_in, 20, "every login landed");
}
