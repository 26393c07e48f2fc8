//! What only several nodes on one PostgreSQL can show: other nodes' events, compact bulk
//! invalidations at any size, bulk writes racing logins, and reads that bypass the cache.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use chrono::Utc;
use common::*;
use pgsession::{
    Config, Error, Origin, SessionEvent, SessionEventKind, SessionManager, SessionOptions,
};
use serde_json::json;
use sqlx::postgres::PgListener;
use tokio::sync::broadcast::Receiver;

const WITHIN: Duration = Duration::from_secs(5);

async fn next(events: &mut Receiver<SessionEvent>) -> SessionEvent {
    tokio::time::timeout(WITHIN, events.recv())
        .await
        .expect("an event within 5 s")
        .expect("no lag")
}

/// The next event of another node, skipping this node's own.
async fn next_remote(events: &mut Receiver<SessionEvent>) -> SessionEvent {
    loop {
        let e = next(events).await;
        if e.origin == Origin::OtherNode {
            return e;
        }
    }
}

#[tokio::test]
async fn other_nodes_writes_arrive_as_events_once_and_marked_as_theirs() {
    use SessionEventKind::*;
    let db = TestDatabase::create().await;
    let a = node(&db, config()).await;
    let b = node(&db, config()).await;
    let mut on_a = a.subscribe_events();
    let mut on_b = b.subscribe_events();

    // Without announce_creates, B hears of A's session first when it is updated.
    let (mut s, _) = a
        .create_session_with(
            SessionOptions::new().user("alice").group("acme"),
            [("k", 1)],
        )
        .await
        .unwrap();
    s.set("k", 2).unwrap();
    a.update_session(&mut s).await.unwrap();
    let e = next(&mut on_b).await;
    assert_eq!(
        (e.kind, e.session_id, e.version, e.origin),
        (Updated, Some(s.id()), Some(2), Origin::OtherNode)
    );
    let old = s.id();
    a.rotate_session(&mut s).await.unwrap();
    let e = next(&mut on_b).await;
    assert_eq!(
        (e.kind, e.session_id, e.previous_id, e.version),
        (Rotated, Some(s.id()), Some(old), Some(3))
    );
    a.delete_session(s.id()).await.unwrap();
    assert_eq!(next(&mut on_b).await.kind, Deleted);
    a.create_session("alice", [("role", "admin")])
        .await
        .unwrap();
    a.remove_attribute_from_user_sessions("alice", "role")
        .await
        .unwrap();
    let e = next(&mut on_b).await;
    assert_eq!(
        (e.kind, e.user_id.unwrap().as_str()),
        (UserSessionsUpdated, "alice")
    );
    a.delete_all_user_sessions("alice").await.unwrap();
    let e = next(&mut on_b).await;
    assert_eq!(
        (e.kind, e.user_id.unwrap().as_str()),
        (UserLoggedOutEverywhere, "alice")
    );
    a.create_session_with(SessionOptions::new().group("acme"), [("k", 1)])
        .await
        .unwrap();
    a.delete_group_sessions("acme").await.unwrap();
    let e = next(&mut on_b).await;
    assert_eq!(
        (e.kind, e.group_id.as_deref()),
        (GroupDeleted, Some("acme"))
    );
    let (mut old_one, _) = a.create_session("bob", [("k", 1)]).await.unwrap();
    old_one
        .set_expires_at(Utc::now() - chrono::Duration::seconds(1))
        .unwrap();
    a.update_session(&mut old_one).await.unwrap();
    assert_eq!(next(&mut on_b).await.kind, Updated);
    a.cleanup_expired().await.unwrap();
    let e = next(&mut on_b).await;
    assert_eq!((e.kind, e.session_id), (Expired, Some(old_one.id())));
    a.delete_all_sessions().await.unwrap();
    assert_eq!(next(&mut on_b).await.kind, AllDeleted);
    assert!(
        on_b.try_recv().is_err(),
        "B heard nothing else (no creates)"
    );

    // A reported each of its writes once, itself: after a write of B's reaches A (its
    // notifications arrive in commit order), every one of A's own has come back too, and none
    // was reported again.
    let (mut sentinel, _) = b.create_session("carol", [("k", 1)]).await.unwrap();
    sentinel.set("k", 2).unwrap();
    b.update_session(&mut sentinel).await.unwrap();
    let mut mine: Vec<SessionEventKind> = Vec::new();
    loop {
        let e = next(&mut on_a).await;
        if e.origin == Origin::OtherNode {
            assert_eq!((e.kind, e.session_id), (Updated, Some(sentinel.id())));
            break;
        }
        mine.push(e.kind);
    }
    assert_eq!(
        mine,
        vec![
            Created,
            Updated,
            Rotated,
            Deleted,
            Created,
            UserSessionsUpdated,
            UserLoggedOutEverywhere,
            Created,
            GroupDeleted,
            Created,
            Updated,
            Expired,
            AllDeleted
        ]
    );
}

#[tokio::test]
async fn creates_reach_other_nodes_only_when_announced() {
    let db = TestDatabase::create().await;
    let announcing = Config {
        announce_creates: true,
        ..config()
    };
    let a = node(&db, announcing.clone()).await;
    let b = node(&db, config()).await;
    let mut on_b = b.subscribe_events();
    let (s, _) = a.create_session("alice", [("k", 1)]).await.unwrap();
    let e = next_remote(&mut on_b).await;
    assert_eq!(
        (e.kind, e.session_id, e.version),
        (SessionEventKind::Created, Some(s.id()), Some(1))
    );
    assert_eq!(e.user_id.unwrap().as_str(), "alice");
    // The capped path (a function) and the anonymous path (a plain insert) both announce.
    let (v, _) = a.create_anonymous_session([("k", 1)]).await.unwrap();
    let e = next_remote(&mut on_b).await;
    assert_eq!(
        (e.kind, e.session_id, e.user_id),
        (SessionEventKind::Created, Some(v.id()), None)
    );
}

/// Every payload sent on the channel while `during` runs, once a write of `marker` (an update
/// sent after `during`) shows they have all arrived.
async fn payloads_of(
    db: &TestDatabase,
    node: &SessionManager,
    during: impl std::future::Future<Output = ()>,
) -> Vec<String> {
    let mut tap = PgListener::connect(db.url()).await.unwrap();
    tap.listen("pgsession.public.sessions").await.unwrap();
    during.await;
    let (mut marker, _) = node.create_anonymous_session([("m", 1)]).await.unwrap();
    marker.set("m", 2).unwrap();
    node.update_session(&mut marker).await.unwrap();
    let end = marker.id().to_string();
    let mut seen = Vec::new();
    loop {
        let n = tokio::time::timeout(WITHIN, tap.recv())
            .await
            .unwrap()
            .unwrap();
        let payload = n.payload().to_string();
        if payload.contains(&end) {
            return seen;
        }
        if !payload.starts_with("p ") {
            seen.push(payload);
        }
    }
}

#[tokio::test]
async fn bulk_writes_are_announced_in_one_message_whatever_their_size() {
    let db = TestDatabase::create().await;
    let unlimited = Config {
        max_sessions_per_user: None,
        ..config()
    };
    let a = node(&db, unlimited.clone()).await;
    let b = node(&db, unlimited).await;
    // More sessions than one message could name (200 ids per message).
    let n = 450;
    let check = pool(&db).await;
    let mut tokens = Vec::new();
    for i in 0..n {
        let options = SessionOptions::new().user("bulk").group("big");
        let (_, t) = a
            .create_session_with(options, [("role", i), ("keep", i)])
            .await
            .unwrap();
        tokens.push(t);
    }
    for t in &tokens {
        b.get_session(t).await.unwrap().unwrap();
    }
    assert!(b.stats().entries >= n);
    let mut on_b = b.subscribe_events();

    // An attribute removed from every session of the user: one message; B drops every copy.
    let sent = payloads_of(&db, &a, async {
        assert_eq!(
            a.remove_attribute_from_user_sessions("bulk", "role")
                .await
                .unwrap(),
            n as u64
        );
    })
    .await;
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(sent[0].len() < 8000);
    heard_from_other_node(&mut on_b, SessionEventKind::UserSessionsUpdated).await;
    for t in &tokens {
        let s = b.get_session(t).await.unwrap().unwrap();
        assert_eq!(s.get("role"), None, "B serves the change, not its old copy");
    }

    // The group's deletion: one message, and B serves none of them.
    let sent = payloads_of(&db, &a, async {
        assert_eq!(a.delete_group_sessions("big").await.unwrap(), n as u64);
    })
    .await;
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(sent[0].len() < 8000);
    heard_from_other_node(&mut on_b, SessionEventKind::GroupDeleted).await;
    for t in &tokens {
        assert!(b.get_session(t).await.unwrap().is_none());
    }

    // Everything: one message.
    for _ in 0..n {
        let (_, t) = a.create_anonymous_session([("k", 1)]).await.unwrap();
        b.get_session(&t).await.unwrap().unwrap();
    }
    let sent = payloads_of(&db, &a, async {
        assert!(a.delete_all_sessions().await.unwrap() >= n as u64);
    })
    .await;
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(sent[0].len() < 8000);
    heard_from_other_node(&mut on_b, SessionEventKind::AllDeleted).await;
    assert_eq!(b.stats().entries, 0, "B emptied its cache");
    assert_eq!(count_rows(&check).await, 1, "only the marker is left");
}

#[tokio::test]
async fn bulk_writes_racing_logins_never_deadlock() {
    let db = TestDatabase::create().await;
    let capped = Config {
        max_sessions_per_user: Some(2),
        ..config()
    };
    let a = node(&db, capped.clone()).await;
    let b = node(&db, capped).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut tasks = tokio::task::JoinSet::new();
    for (i, m) in [a.clone(), b.clone(), a.clone(), b.clone()]
        .into_iter()
        .enumerate()
    {
        tasks.spawn(async move {
            let mut n = 0u64;
            while tokio::time::Instant::now() < deadline {
                let user = format!("user{}", n % 3);
                let options = SessionOptions::new().user(user.clone()).group("g");
                let (mut s, _) = m.create_anonymous_session([("role", i)]).await?;
                // A bulk deletion may take the visitor's session first: that is no failure.
                match m.log_in(&mut s, user.clone()).await {
                    Ok(_) | Err(Error::NotFound) => {}
                    Err(e) => return Err(e),
                }
                m.create_session_with(options, [("role", i)]).await?;
                n += 1;
            }
            Ok::<_, Error>(n)
        });
    }
    for (i, m) in [a.clone(), b.clone()].into_iter().enumerate() {
        tasks.spawn(async move {
            let mut n = 0u64;
            while tokio::time::Instant::now() < deadline {
                match (n + i as u64) % 4 {
                    0 => m.delete_group_sessions("g").await?,
                    1 => m.delete_all_user_sessions(format!("user{}", n % 3)).await?,
                    2 => {
                        m.remove_attribute_from_user_sessions(format!("user{}", n % 3), "role")
                            .await?
                    }
                    _ => m.delete_all_sessions().await?,
                };
                n += 1;
            }
            Ok::<_, Error>(n)
        });
    }
    let mut done = Vec::new();
    while let Some(result) = tasks.join_next().await {
        done.push(result.unwrap().expect("no operation failed (no deadlock)"));
    }
    assert!(
        done.iter().all(|n| *n > 0),
        "every task made progress: {done:?}"
    );
    // The cap held throughout.
    let check = pool(&db).await;
    let per_user: Vec<i64> = sqlx::query_scalar(
        "SELECT count(*) FROM sessions WHERE user_id IS NOT NULL GROUP BY user_id",
    )
    .fetch_all(&check)
    .await
    .unwrap();
    assert!(per_user.iter().all(|n| *n <= 2), "{per_user:?}");
}

#[tokio::test]
async fn fresh_reads_see_what_the_cache_cannot_and_refresh_it() {
    let db = TestDatabase::create().await;
    let a = node(&db, config()).await;
    let check = pool(&db).await;
    let (s, token) = a.create_session("alice", [("k", 1)]).await.unwrap();
    a.get_session(&token).await.unwrap().unwrap();
    // A write outside pgsession: no notification, the cache keeps its copy.
    sqlx::query(
        "UPDATE sessions SET attributes = '{\"k\": 2}', version = version + 1 WHERE id = $1",
    )
    .bind(s.id())
    .execute(&check)
    .await
    .unwrap();
    assert_eq!(
        a.get_session(&token).await.unwrap().unwrap().get("k"),
        Some(&json!(1))
    );
    let fresh = a.get_session_fresh(&token).await.unwrap().unwrap();
    assert_eq!((fresh.get("k"), fresh.version()), (Some(&json!(2)), 2));
    let hits = a.stats().hits;
    let cached = a.get_session(&token).await.unwrap().unwrap();
    assert_eq!(cached.get("k"), Some(&json!(2)), "the cache was refreshed");
    assert_eq!(a.stats().hits, hits + 1, "and serves it");
}

#[tokio::test]
async fn an_optimistic_update_conflicts_with_another_nodes_write() {
    let db = TestDatabase::create().await;
    let a = node(&db, config()).await;
    let b = node(&db, config()).await;
    let (_, token) = a.create_session("alice", [("n", 0)]).await.unwrap();
    let mut on_a = a.get_session(&token).await.unwrap().unwrap();
    let mut on_b = b.get_session(&token).await.unwrap().unwrap();
    on_b.set("n", 1).unwrap();
    b.update_session_if_unchanged(&mut on_b).await.unwrap();
    on_a.set("n", 2).unwrap();
    assert!(matches!(
        a.update_session_if_unchanged(&mut on_a).await,
        Err(Error::Conflict { current_version: 2 })
    ));
    // A's retry reads the database (its copy was dropped), sees B's write, and goes through.
    let mut again = a.get_session(&token).await.unwrap().unwrap();
    assert_eq!(again.get("n"), Some(&json!(1)));
    again.set("n", 2).unwrap();
    a.update_session_if_unchanged(&mut again).await.unwrap();
}

#[tokio::test]
async fn cleanup_removes_expired_attributes_from_the_table() {
    let db = TestDatabase::create().await;
    let a = node(&db, config()).await;
    let check = pool(&db).await;
    let (mut s, _) = a.create_session("alice", [("keep", 1)]).await.unwrap();
    s.set_with_expiry("otp", "1234", Utc::now() - chrono::Duration::seconds(1))
        .unwrap();
    s.set_with_expiry("later", 1, Utc::now() + chrono::Duration::hours(1))
        .unwrap();
    a.update_session(&mut s).await.unwrap();
    let stored = |check: sqlx::PgPool, id| async move {
        sqlx::query_as::<_, (serde_json::Value, serde_json::Value)>(
            "SELECT attributes, attribute_expiry FROM sessions WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&check)
        .await
        .unwrap()
    };
    let (attributes, _) = stored(check.clone(), s.id()).await;
    assert!(attributes.get("otp").is_some(), "stored until cleanup");
    a.cleanup_expired().await.unwrap();
    let (attributes, expiry) = stored(check.clone(), s.id()).await;
    let keys: HashMap<String, serde_json::Value> = serde_json::from_value(attributes).unwrap();
    assert!(!keys.contains_key("otp") && keys.contains_key("later") && keys.contains_key("keep"));
    assert!(expiry.get("otp").is_none() && expiry.get("later").is_some());
    let next: Option<chrono::DateTime<Utc>> =
        sqlx::query_scalar("SELECT attributes_expire_at FROM sessions WHERE id = $1")
            .bind(s.id())
            .fetch_one(&check)
            .await
            .unwrap();
    let later = s.attribute_expires_at("later").unwrap();
    assert_eq!(
        next,
        Some(later),
        "the next cleanup looks at it when `later` expires"
    );
}
