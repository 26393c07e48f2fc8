//! Failover to a promoted streaming replica: the nodes reach the database through a proxy (the
//! stand-in for a virtual IP or a DNS name) that is switched to the standby once it is
//! promoted. Replication is asynchronous and is cut before the last writes, so the new primary
//! lacks them: the caches must follow the new primary, not their own memory (guarantee G6 in
//! docs/design.md).
//!
//! Always runs on private servers (it stops one), started from the installed binaries.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use pgsession::{Config, SessionId, SessionManager, SessionToken};
use serde_json::json;
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgPool};
use uuid::Uuid;

const VISIBLE_WITHIN: Duration = Duration::from_secs(1);
const RECOVERY: Duration = Duration::from_secs(30);

async fn direct(url: &str) -> PgPool {
    PgPoolOptions::new()
        .max_connections(2)
        .connect(url)
        .await
        .expect("direct pool connects")
}

/// Wait until the standby has replayed everything the primary has written so far.
async fn caught_up(primary: &PgPool, standby: &PgPool) {
    let target: String = sqlx::query_scalar("SELECT pg_current_wal_insert_lsn()::text")
        .fetch_one(primary)
        .await
        .unwrap();
    eventually(
        RECOVERY,
        "the standby replays the primary's WAL",
        || async {
            sqlx::query_scalar::<_, bool>("SELECT pg_last_wal_replay_lsn() >= $1::pg_lsn")
                .bind(&target)
                .fetch_one(standby)
                .await
                .unwrap()
        },
    )
    .await;
}

async fn versions(pool: &PgPool) -> HashMap<SessionId, i64> {
    sqlx::query_as::<_, (SessionId, i64)>("SELECT id, version FROM sessions")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

async fn served(node: &SessionManager, token: &SessionToken) -> Option<i64> {
    node.get_session(token).await.unwrap().map(|s| s.version())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_failover_to_a_replica_that_lacks_the_last_writes_nodes_serve_what_it_has() {
    // Server control blocks; the proxies keep running on the other worker meanwhile.
    use tokio::task::block_in_place as blocking;
    let primary = blocking(TempPostgres::start).expect("primary starts");
    // The standby replicates through a proxy, so that replication can be cut.
    let replication = FaultProxy::start(primary.addr()).await;
    let standby = blocking(|| primary.start_standby(replication.addr())).expect("standby starts");
    // The nodes' address: the primary now, the standby after the failover.
    let vip = FaultProxy::start(primary.addr()).await;
    let url = vip.proxied_url(&primary.url("postgres"));
    let config = Config {
        max_sessions_per_user: None,
        ..config()
    };
    // A's listener has an address of its own, so that it can be kept from reconnecting.
    let a_listener = FaultProxy::start(primary.addr()).await;
    let a_config = Config {
        listen_url: Some(a_listener.proxied_url(&primary.url("postgres"))),
        ..config.clone()
    };
    let a = listening(SessionManager::connect(a_config, &url).await.unwrap()).await;
    let b = listening(SessionManager::connect(config, &url).await.unwrap()).await;
    let on_primary = direct(&primary.url("postgres")).await;
    let on_standby = direct(&standby.url("postgres")).await;

    // Replicated writes: three sessions, one updated twice; B caches them all.
    let user = Uuid::new_v4();
    let (mut kept, kept_t) = a.create_session(user, small()).await.unwrap();
    let (mut updated, updated_t) = a.create_session(user, small()).await.unwrap();
    let (deleted, deleted_t) = a.create_session(user, small()).await.unwrap();
    set_and_save(&a, &mut updated, "n", json!(1)).await;
    set_and_save(&a, &mut updated, "n", json!(2)).await;
    for (s, t) in [
        (&kept, &kept_t),
        (&updated, &updated_t),
        (&deleted, &deleted_t),
    ] {
        assert_eq!(served(&b, t).await, Some(s.version()));
    }
    caught_up(&on_primary, &on_standby).await;

    // Replication stalls; these writes are acknowledged by the primary and seen by B, and
    // will be lost with it.
    replication.pause();
    set_and_save(&a, &mut updated, "n", json!(3)).await;
    assert!(a.delete_session(deleted.id()).await.unwrap());
    let (lost, lost_t) = a.create_session(user, small()).await.unwrap();
    eventually(VISIBLE_WITHIN, "B sees the last writes", || async {
        served(&b, &updated_t).await == Some(4)
            && served(&b, &deleted_t).await.is_none()
            && served(&b, &lost_t).await == Some(1)
    })
    .await;
    assert_eq!(served(&a, &updated_t).await, Some(4));

    // Failover: the primary stops, the standby is promoted, the address moves to it.
    let mut trust_a = a.subscribe_cache_trust();
    let mut trust_b = b.subscribe_cache_trust();
    replication.refuse_new(true);
    replication.disconnect_all();
    blocking(|| primary.stop()).expect("primary stops");
    blocking(|| standby.promote()).expect("standby promoted");
    vip.retarget(standby.addr());
    vip.disconnect_all();
    a_listener.retarget(standby.addr());
    a_listener.refuse_new(true);
    a_listener.disconnect_all();
    for trust in [&mut trust_a, &mut trust_b] {
        tokio::time::timeout(RECOVERY, trust.wait_for(|t| !*t))
            .await
            .expect("the node distrusts its cache")
            .unwrap();
    }
    tokio::time::timeout(RECOVERY, b.wait_for_cache())
        .await
        .expect("B trusts its cache again, on the new primary");

    // Before A is back, B writes on the new primary, reusing the number of the lost version
    // (4) with other contents. A's cache still holds its own lost version 4.
    let mut again = b.get_session(&updated_t).await.unwrap().unwrap();
    assert_eq!(again.version(), 3);
    set_and_save(&b, &mut again, "n", json!("after")).await;
    assert_eq!(again.version(), 4);
    a_listener.refuse_new(false);
    tokio::time::timeout(RECOVERY, a.wait_for_cache())
        .await
        .expect("A trusts its cache again, on the new primary");
    for node in [&a, &b] {
        let s = node.get_session(&updated_t).await.unwrap().unwrap();
        assert_eq!(
            (s.version(), s.get("n")),
            (4, Some(&json!("after"))),
            "the new primary's version 4, not the lost one"
        );
    }

    // The new primary has the replicated state only, and so does every node.
    let truth = versions(&on_standby).await;
    assert_eq!(
        truth.get(&updated.id()),
        Some(&4),
        "the last update was lost, B's replaced it"
    );
    assert_eq!(truth.get(&deleted.id()), Some(&1), "the delete was lost");
    assert_eq!(truth.get(&lost.id()), None, "the last create was lost");
    for node in [&a, &b] {
        for (s, t) in [
            (&kept, &kept_t),
            (&updated, &updated_t),
            (&deleted, &deleted_t),
            (&lost, &lost_t),
        ] {
            assert_eq!(
                served(node, t).await,
                truth.get(&s.id()).copied(),
                "a node serves {s:?} as the new primary has it"
            );
        }
    }

    // Writes after the switch reach the other node.
    set_and_save(&a, &mut kept, "n", json!(1)).await;
    eventually(
        VISIBLE_WITHIN,
        "B serves A's write on the new primary",
        || async { served(&b, &kept_t).await == Some(2) },
    )
    .await;
    assert!(b.delete_session(deleted.id()).await.unwrap());
    eventually(
        VISIBLE_WITHIN,
        "A stops serving a session deleted on the new primary",
        || async { served(&a, &deleted_t).await.is_none() },
    )
    .await;

    // The new primary is a real primary: a direct connection writes to it.
    let mut conn = PgConnection::connect(&standby.url("postgres"))
        .await
        .unwrap();
    let read_only: String = sqlx::query_scalar("SHOW transaction_read_only")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(read_only, "off");
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_host_url_follows_a_promoted_replica_without_any_proxy() {
    use tokio::task::block_in_place as blocking;
    let primary = blocking(TempPostgres::start).expect("primary starts");
    let standby = blocking(|| primary.start_standby(primary.addr())).expect("standby starts");
    // Both servers in the URL, as an application facing a Patroni or repmgr pair is given
    // them: the pool, the listener and the announcer find the one that takes writes.
    let url = format!(
        "postgres://postgres@{},{}/postgres?target_session_attrs=read-write",
        primary.addr(),
        standby.addr()
    );
    let config = Config {
        max_sessions_per_user: None,
        ..config()
    };
    let a = listening(SessionManager::connect(config.clone(), &url).await.unwrap()).await;
    let b = listening(SessionManager::connect(config, &url).await.unwrap()).await;
    let (mut s, token) = a.create_session(Uuid::new_v4(), small()).await.unwrap();
    set_and_save(&a, &mut s, "n", json!(1)).await;
    caught_up(
        &direct(&primary.url("postgres")).await,
        &direct(&standby.url("postgres")).await,
    )
    .await;
    assert_eq!(served(&b, &token).await, Some(2), "B caches it");

    blocking(|| primary.stop()).unwrap();
    // While the standby is still in recovery nothing takes writes: calls fail, typed.
    match a.create_session(Uuid::new_v4(), small()).await {
        Err(e) => assert!(e.is_transient(), "{e:?}"),
        Ok(_) => panic!("a write without a primary"),
    }
    blocking(|| standby.promote()).unwrap();
    let promoted = std::time::Instant::now();
    let mut again = s.clone();
    loop {
        again.set("n", json!(2)).unwrap();
        match a.update_session(&mut again).await {
            Ok(()) => break,
            Err(e) => assert!(e.is_transient(), "{e:?}"),
        }
        assert!(
            promoted.elapsed() < RECOVERY,
            "no write within {RECOVERY:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first_write = promoted.elapsed();
    eprintln!("promotion -> first successful write on A: {first_write:?}");
    assert_eq!(again.version(), 3);

    // Every node serves what the new primary holds, and hears its invalidations.
    tokio::time::timeout(RECOVERY, b.wait_for_cache())
        .await
        .expect("B trusts its cache again, on the new primary");
    eventually(RECOVERY, "B serves the new primary's version", || async {
        matches!(b.get_session(&token).await, Ok(Some(s)) if s.version() == 3)
    })
    .await;
    let mut events = b.subscribe_events();
    set_and_save(&a, &mut again, "n", json!(3)).await;
    heard_from_other_node(&mut events, pgsession::SessionEventKind::Updated).await;
    assert_eq!(served(&b, &token).await, Some(4));
    let new_primary = direct(&standby.url("postgres")).await;
    assert_eq!(versions(&new_primary).await[&s.id()], 4);
}
