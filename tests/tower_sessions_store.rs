//! The tower-sessions store: tower-sessions' own suite, then what pgsession adds to it (cache
//! hits without I/O, logouts seen by every instance, users read from axum-login's data).
#![cfg(feature = "tower-sessions")]

mod common;
#[macro_use]
#[path = "tower_sessions_suite/mod.rs"]
mod suite;

#[allow(dead_code)] // its `main` is the example's own
#[path = "../examples/axum_login.rs"]
mod axum_login_example;

use std::time::Duration as StdDuration;

use common::*;
use pgsession::tower_sessions::PgSessionStore;
use pgsession::{Config, MaxSessionsPolicy};
use serde_json::json;
use tower_sessions_core::session::{Id, Record};
use tower_sessions_core::{ExpiredDeletion, SessionStore};

/// A store over a node of a database of its own, kept for the rest of the test process (the
/// suite's `app` returns only the router).
async fn store(config: Config) -> (PgSessionStore, &'static TestDatabase) {
    let db: &'static TestDatabase = Box::leak(Box::new(TestDatabase::create().await));
    (PgSessionStore::new(node(db, config).await), db)
}

mod tower_sessions_suite {
    use axum::Router;
    use tower_sessions::SessionManagerLayer;

    use crate::suite::build_app;

    async fn app(max_age: Option<Duration>, domain: Option<String>) -> Router {
        let (store, _) = crate::store(crate::config()).await;
        let session_manager = SessionManagerLayer::new(store).with_secure(true);
        build_app(session_manager, max_age, domain)
    }

    route_tests!(app);
}

fn record(data: serde_json::Value) -> Record {
    let data = match data {
        serde_json::Value::Object(map) => map.into_iter().collect(),
        _ => panic!("an object"),
    };
    Record {
        id: Id::default(),
        data,
        expiry_date: time::OffsetDateTime::now_utc() + time::Duration::hours(1),
    }
}

fn logged_in(user: serde_json::Value) -> Record {
    record(json!({ "axum-login.data": { "user_id": user, "auth_hash": [1, 2] }, "n": 1 }))
}

#[tokio::test]
async fn a_load_of_a_cached_record_does_no_io() {
    let (store, _) = store(config()).await;
    let mut rec = record(json!({ "foo": 42 }));
    store.create(&mut rec).await.expect("created");
    let before = store.manager().stats();

    let loaded = store.load(&rec.id).await.expect("load").expect("found");

    let after = store.manager().stats();
    assert_eq!(loaded.data, rec.data);
    assert_eq!(after.hits, before.hits + 1);
    assert_eq!(after.misses, before.misses, "served from the cache");
    let stored_at = loaded.expiry_date.unix_timestamp();
    assert_eq!(
        stored_at,
        rec.expiry_date.unix_timestamp(),
        "the record's expiry is kept"
    );
}

#[tokio::test]
async fn a_delete_on_one_instance_is_seen_by_the_other_at_once() {
    let (a, db) = store(config()).await;
    let b = PgSessionStore::new(node(db, config()).await);
    let mut rec = record(json!({ "foo": 1 }));
    a.create(&mut rec).await.expect("created");
    assert!(
        b.load(&rec.id).await.expect("load").is_some(),
        "b caches it"
    );

    a.delete(&rec.id).await.expect("deleted");

    let id = rec.id;
    eventually(
        StdDuration::from_secs(1),
        "b stops serving the deleted record",
        || {
            let b = b.clone();
            async move { b.load(&id).await.expect("load").is_none() }
        },
    )
    .await;
}

#[tokio::test]
async fn axum_login_users_get_the_cap_listing_and_logout_everywhere() {
    let capped = Config {
        max_sessions_per_user: Some(2),
        max_sessions_policy: MaxSessionsPolicy::EvictOldest,
        ..config()
    };
    let (store, _) = store(capped).await;
    let manager = store.manager().clone();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let mut rec = logged_in(json!(7));
        store.create(&mut rec).await.expect("created");
        ids.push(rec.id);
    }

    let listed = manager.list_user_sessions(7i64).await.expect("listed");
    assert_eq!(listed.len(), 2, "the cap of 2 applies");
    assert!(
        store.load(&ids[0]).await.expect("load").is_none(),
        "the oldest was evicted"
    );
    let mut listed_ids: Vec<_> = listed.iter().map(|s| s.id()).collect();
    listed_ids.sort();
    let mut expected: Vec<_> = ids[1..].iter().map(PgSessionStore::session_id).collect();
    expected.sort();
    assert_eq!(listed_ids, expected);

    assert_eq!(
        manager
            .delete_all_user_sessions("7")
            .await
            .expect("deleted"),
        2
    );
    for id in &ids {
        assert!(store.load(id).await.expect("load").is_none());
    }
}

#[tokio::test]
async fn a_save_binds_the_user_its_data_names_and_unbinds_on_removal() {
    let (store, _) = store(config()).await;
    let manager = store.manager().clone();
    let mut rec = record(json!({ "cart": ["tea"] }));
    store.create(&mut rec).await.expect("created");
    assert!(
        manager
            .list_user_sessions("erin")
            .await
            .expect("list")
            .is_empty()
    );

    rec.data.insert(
        "axum-login.data".into(),
        json!({ "user_id": "erin", "auth_hash": [] }),
    );
    store.save(&rec).await.expect("saved");
    let listed = manager.list_user_sessions("erin").await.expect("list");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].get("cart"), Some(&json!(["tea"])));
    let loaded = store.load(&rec.id).await.expect("load").expect("same id");
    assert_eq!(loaded.data, rec.data);

    rec.data.remove("axum-login.data");
    store.save(&rec).await.expect("saved");
    assert!(
        manager
            .list_user_sessions("erin")
            .await
            .expect("list")
            .is_empty()
    );
    assert!(store.load(&rec.id).await.expect("load").is_some());
}

#[tokio::test]
async fn a_save_after_a_logout_elsewhere_does_not_bring_the_session_back() {
    let (store, _) = store(config()).await;
    let mut rec = logged_in(json!("frank"));
    store.create(&mut rec).await.expect("created");
    store
        .manager()
        .delete_all_user_sessions("frank")
        .await
        .expect("logout everywhere");

    rec.data.insert("n".into(), json!(2));
    store.save(&rec).await.expect("a late save is not an error");

    assert!(store.load(&rec.id).await.expect("load").is_none());
}

#[tokio::test]
async fn only_a_hash_of_the_tower_sessions_id_is_stored() {
    let (store, db) = store(config()).await;
    let mut rec = record(json!({ "k": "v" }));
    store.create(&mut rec).await.expect("created");
    let rows: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("SELECT id, replace(id::text, '-', '') FROM sessions")
            .fetch_all(&pool(db).await)
            .await
            .expect("rows");
    assert_eq!(rows.len(), 1);
    let raw: String = rec
        .id
        .0
        .to_le_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_ne!(rows[0].1, raw, "the id itself is not the key");
    assert_eq!(
        rows[0].0.simple().to_string(),
        PgSessionStore::session_id(&rec.id).to_string()
    );
}

#[tokio::test]
async fn expired_records_are_not_loaded_and_are_deleted() {
    let (store, db) = store(config()).await;
    let mut rec = record(json!({ "k": "v" }));
    rec.expiry_date = time::OffsetDateTime::now_utc() + time::Duration::milliseconds(1500);
    store.create(&mut rec).await.expect("created");
    assert!(store.load(&rec.id).await.expect("load").is_some());
    // Expiry is a point in time: waiting for it is the subject.
    let left = rec.expiry_date - time::OffsetDateTime::now_utc();
    tokio::time::sleep(
        StdDuration::try_from(left).unwrap_or_default() + StdDuration::from_millis(50),
    )
    .await;

    assert!(store.load(&rec.id).await.expect("load").is_none());
    store.delete_expired().await.expect("cleanup");
    let pool = pool(db).await;
    eventually(StdDuration::from_secs(5), "cleanup removes the row", || {
        let pool = pool.clone();
        async move { count_rows(&pool).await == 0 }
    })
    .await;
}

#[tokio::test]
async fn bad_records_are_typed_store_errors_and_write_nothing() {
    let (store, db) = store(Config {
        max_attribute_size: 64,
        ..config()
    })
    .await;
    let mut big = record(json!({ "blob": "x".repeat(100) }));
    let err = store.create(&mut big).await.expect_err("too large");
    assert!(
        matches!(err, tower_sessions_core::session_store::Error::Encode(_)),
        "{err:?}"
    );
    let mut ancient = record(json!({ "k": "v" }));
    ancient.expiry_date = time::OffsetDateTime::UNIX_EPOCH - time::Duration::days(365);
    let err = store
        .create(&mut ancient)
        .await
        .expect_err("expiry before 1970");
    assert!(
        matches!(err, tower_sessions_core::session_store::Error::Encode(_)),
        "{err:?}"
    );
    assert_eq!(count_rows(&pool(db).await).await, 0);
}

#[tokio::test]
async fn the_axum_login_example_lists_and_ends_a_users_sessions() {
    let (store, _) = store(config()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a free port");
    let url = format!("http://{}", listener.local_addr().expect("bound"));
    let router = axum_login_example::app(store.manager().clone());
    tokio::spawn(async move { axum::serve(listener, router).await });

    axum_login_example::run(&url)
        .await
        .unwrap_or_else(|e| panic!("the example's flow: {e}"));
    assert!(
        store
            .manager()
            .list_user_sessions(1i64)
            .await
            .expect("list")
            .is_empty()
    );
}
