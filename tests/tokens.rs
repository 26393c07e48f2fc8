//! Session tokens: only a hash at rest, signed tokens, rotation and login, sessions before
//! login, and the upgrade from the release that stored tokens as ids.

mod common;

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use pgsession::{Config, Error, MaxSessionsPolicy, SessionToken, SigningKey, UserId};
use serde_json::json;
use sqlx::postgres::PgListener;
use uuid::Uuid;

const VISIBLE_WITHIN: Duration = Duration::from_secs(1);

fn signed(keys: Vec<SigningKey>) -> Config {
    Config {
        signing_keys: keys,
        ..config()
    }
}

/// Every text form a token's secret could take in a table or a payload.
fn secret_forms(token: &SessionToken) -> Vec<String> {
    let text = token.to_string();
    let mut forms = vec![text.clone()];
    if let Ok(bytes) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(&text) {
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        forms.push(hex[..64].to_string()); // the 32 random bytes
        forms.push(base64::engine::general_purpose::STANDARD.encode(&bytes[..32]));
    }
    forms
}

#[tokio::test]
async fn no_table_log_of_notifications_or_debug_output_holds_a_token() {
    let db = TestDatabase::create().await;
    let key = SigningKey::generate();
    let a = node(&db, signed(vec![key.clone()])).await;
    let b = node(&db, signed(vec![key])).await;
    let check = pool(&db).await;
    // Every notification of the run, as any node receives them.
    let mut tap = PgListener::connect(db.url()).await.unwrap();
    tap.listen("pgsession.public.sessions").await.unwrap();

    let mut tokens = Vec::new();
    let (mut visitor, t) = a.create_anonymous_session([("cart", 1)]).await.unwrap();
    tokens.push(t);
    tokens.push(a.log_in(&mut visitor, "alice").await.unwrap());
    tokens.push(a.rotate_session(&mut visitor).await.unwrap());
    let (mut other, t) = a.create_session("alice", [("k", "v")]).await.unwrap();
    tokens.push(t.clone());
    b.get_session(&t).await.unwrap().unwrap();
    other.set("k", "w").unwrap();
    a.update_session(&mut other).await.unwrap();
    let (gone, t) = a.create_session("bob", [("k", 1)]).await.unwrap();
    tokens.push(t);
    a.delete_session(gone.id()).await.unwrap();
    a.flush_last_access().await.unwrap();
    let (_, t) = a.create_session("carol", [("k", 1)]).await.unwrap();
    tokens.push(t);
    a.delete_all_user_sessions("carol").await.unwrap();
    a.clear_cache().await.unwrap();
    // A's announcer may still hold writes it gathers into one NOTIFY; shutting A down
    // announces them before it returns.
    a.shutdown().await.unwrap();

    // Everything announced so far has been delivered once this probe of ours comes back.
    sqlx::query("SELECT pg_notify('pgsession.public.sessions', 'p tap')")
        .execute(&check)
        .await
        .unwrap();
    let mut payloads = Vec::new();
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), tap.try_recv())
            .await
            .expect("notifications arrive")
            .unwrap()
            .expect("the tap stays connected");
        if n.payload() == "p tap" {
            break;
        }
        payloads.push(n.payload().to_string());
    }
    // Login and rotation (r), the update (u), the delete (d), logout everywhere (U), clear (C).
    let kinds: std::collections::BTreeSet<&str> = payloads
        .iter()
        .flat_map(|p| p.lines())
        .filter_map(|line| line.split(' ').next())
        .collect();
    for kind in ["r", "u", "d", "U", "C"] {
        assert!(
            kinds.contains(kind),
            "the run announced its writes ({kind} missing): {payloads:?}"
        );
    }

    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) FROM pg_tables \
         WHERE schemaname = 'public'",
    )
    .fetch_all(&check)
    .await
    .unwrap();
    assert!(tables.len() >= 4, "{tables:?}");
    let mut stored = Vec::new();
    for table in &tables {
        let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT t::text FROM {table} AS t"
        )))
        .fetch_all(&check)
        .await
        .unwrap();
        stored.extend(rows);
    }
    assert!(
        stored.iter().any(|row| row.contains("alice")),
        "rows were read"
    );
    let debug = format!("{visitor:?} {other:?} {:?} {:?}", tokens, a.stats());
    for token in &tokens {
        for form in secret_forms(token) {
            for row in &stored {
                assert!(!row.contains(&form), "a table holds a token: {row}");
            }
            for payload in &payloads {
                assert!(!payload.contains(&form), "a notification holds a token");
            }
            assert!(!debug.contains(&form), "Debug output shows a token");
        }
    }
    // What is stored is the public id.
    let id = visitor.id().to_string();
    assert!(stored.iter().any(|row| row.replace('-', "").contains(&id)));
}

#[tokio::test]
async fn forged_tokens_are_refused_before_any_database_read() {
    let db = TestDatabase::create().await;
    let key = SigningKey::generate();
    let m = node(&db, signed(vec![key])).await;
    let (_, real) = m.create_session("alice", [("k", 1)]).await.unwrap();
    assert!(real.to_string().len() == 64, "signed tokens carry a tag");
    let stranger = node(&db, signed(vec![SigningKey::generate()])).await;
    let (_, foreign) = stranger
        .create_session("mallory", [("k", 1)])
        .await
        .unwrap();
    let unsigned = node(&db, config()).await;
    let (_, bare) = unsigned.create_session("eve", [("k", 1)]).await.unwrap();

    let before = m.stats();
    for _ in 0..100 {
        assert!(m.get_session(&foreign).await.unwrap().is_none());
        assert!(m.get_session(&bare).await.unwrap().is_none());
    }
    let after = m.stats();
    assert_eq!(after.forged_tokens - before.forged_tokens, 200);
    assert_eq!(
        after.misses, before.misses,
        "no database read for a forged token"
    );
    assert!(m.get_session(&real).await.unwrap().is_some());
    // The sessions exist: only the signature kept them closed.
    assert!(stranger.get_session(&foreign).await.unwrap().is_some());
}

#[tokio::test]
async fn keys_rotate_the_first_signs_and_all_verify() {
    let db = TestDatabase::create().await;
    let (old, new) = (SigningKey::generate(), SigningKey::generate());
    let before = node(&db, signed(vec![old.clone()])).await;
    let (_, old_token) = before.create_session("alice", [("k", 1)]).await.unwrap();
    let after = node(&db, signed(vec![new.clone(), old])).await;
    assert!(after.get_session(&old_token).await.unwrap().is_some());
    let (_, new_token) = after.create_session("alice", [("k", 2)]).await.unwrap();
    let only_new = node(&db, signed(vec![new])).await;
    assert!(only_new.get_session(&new_token).await.unwrap().is_some());
    assert!(only_new.get_session(&old_token).await.unwrap().is_none());
    assert!(matches!(
        SigningKey::from_bytes(b"too short"),
        Err(Error::InvalidConfig(_))
    ));
}

#[tokio::test]
async fn unknown_tokens_do_not_push_cached_sessions_out() {
    let db = TestDatabase::create().await;
    let m = node(
        &db,
        Config {
            // Room for the real sessions in every shard, not for thousands more.
            cache_capacity: 2000,
            max_sessions_per_user: None,
            ..config()
        },
    )
    .await;
    let mut real = Vec::new();
    for i in 0..500 {
        real.push(m.create_session(i as i64, [("k", i)]).await.unwrap().1);
    }
    for t in &real {
        m.get_session(t).await.unwrap().unwrap();
    }
    assert_eq!(m.stats().entries, 500);
    for _ in 0..5000 {
        assert!(m.get_session(&unknown_token()).await.unwrap().is_none());
    }
    assert_eq!(
        m.stats().entries,
        500,
        "no negative entry displaced a session"
    );
    let hits = m.stats().hits;
    for t in &real {
        m.get_session(t).await.unwrap().unwrap();
    }
    assert_eq!(
        m.stats().hits - hits,
        500,
        "every real session is still a hit"
    );
}

#[tokio::test]
async fn rotation_ends_the_old_token_on_every_node_and_keeps_the_data() {
    let db = TestDatabase::create().await;
    let a = node(&db, config()).await;
    let b = node(&db, config()).await;
    let check = pool(&db).await;
    let (mut s, old) = a
        .create_session("alice", [("cart", json!([1, 2]))])
        .await
        .unwrap();
    set_and_save(&a, &mut s, "theme", json!("dark")).await;
    let stale_handle = s.clone();
    b.get_session(&old).await.unwrap().unwrap();
    let (created, expires) = (s.created_at(), s.expires_at());

    s.set("pending", true).unwrap();
    let new = a.rotate_session(&mut s).await.unwrap();
    assert_ne!(new, old);
    assert_eq!(s.id(), new.id());
    assert_eq!(s.version(), 3, "the version history carries over");
    assert_eq!((s.created_at(), s.expires_at()), (created, expires));
    assert_eq!(
        s.get("pending"),
        Some(&json!(true)),
        "pending changes written"
    );
    assert!(
        a.get_session(&old).await.unwrap().is_none(),
        "at once on the writer"
    );
    eventually(VISIBLE_WITHIN, "B refuses the old token", || async {
        b.get_session(&old).await.unwrap().is_none()
    })
    .await;
    let on_b = b.get_session(&new).await.unwrap().unwrap();
    assert_eq!(on_b.get("cart"), Some(&json!([1, 2])));
    assert_eq!(on_b.user_id(), Some(&UserId::from("alice")));

    // A request still holding the old id cannot write to the dead row or bring it back.
    let mut stale = stale_handle;
    stale.set("theme", "light").unwrap();
    assert!(matches!(
        a.update_session(&mut stale).await,
        Err(Error::NotFound)
    ));
    assert!(matches!(
        a.rotate_session(&mut stale).await,
        Err(Error::NotFound)
    ));
    assert_eq!(count_rows(&check).await, 1);
    assert_eq!(db_version(&check, old.id()).await, None);
}

#[tokio::test]
async fn log_in_binds_the_user_keeps_the_visitors_data_and_applies_the_cap() {
    let db = TestDatabase::create().await;
    let a = node(
        &db,
        Config {
            max_sessions_per_user: Some(2),
            ..config()
        },
    )
    .await;
    let b = node(&db, config()).await;
    let (_, first) = a.create_session(7i64, [("device", "phone")]).await.unwrap();
    let (_, second) = a
        .create_session(7i64, [("device", "laptop")])
        .await
        .unwrap();
    a.get_session(&second).await.unwrap().unwrap();
    a.flush_last_access().await.unwrap();

    let (mut visitor, visitor_token) = a.create_anonymous_session([("cart", 3)]).await.unwrap();
    assert_eq!(visitor.user_id(), None);
    b.get_session(&visitor_token).await.unwrap().unwrap();
    let token = a.log_in(&mut visitor, 7i64).await.unwrap();
    assert_eq!(visitor.user_id(), Some(&UserId::from(7i64)));
    assert_eq!(visitor.get("cart"), Some(&json!(3)));
    assert_ne!(token.id(), visitor_token.id(), "a new id at login");
    eventually(
        VISIBLE_WITHIN,
        "the visitor token stops working everywhere",
        || async { b.get_session(&visitor_token).await.unwrap().is_none() },
    )
    .await;
    // Two sessions at most: the least recently used (the first) made room.
    let mine = a.list_user_sessions(7i64).await.unwrap();
    assert_eq!(mine.len(), 2);
    assert!(a.get_session(&first).await.unwrap().is_none());
    assert!(a.get_session(&second).await.unwrap().is_some());

    // Logging in as someone else from a logged-in session rotates again.
    let again = a.log_in(&mut visitor, "someone-else").await.unwrap();
    assert!(a.get_session(&token).await.unwrap().is_none());
    let moved = a.get_session(&again).await.unwrap().unwrap();
    assert_eq!(moved.user_id(), Some(&UserId::from("someone-else")));
    assert_eq!(a.list_user_sessions(7i64).await.unwrap().len(), 1);
}

#[tokio::test]
async fn log_in_with_the_reject_policy_at_the_cap_writes_nothing() {
    let db = TestDatabase::create().await;
    let m = node(
        &db,
        Config {
            max_sessions_per_user: Some(1),
            max_sessions_policy: MaxSessionsPolicy::Reject,
            ..config()
        },
    )
    .await;
    m.create_session("alice", [("k", 1)]).await.unwrap();
    let (mut visitor, token) = m.create_anonymous_session([("cart", 1)]).await.unwrap();
    assert!(matches!(
        m.log_in(&mut visitor, "alice").await,
        Err(Error::MaxSessionsReached)
    ));
    let still = m.get_session(&token).await.unwrap().unwrap();
    assert_eq!(still.user_id(), None, "the visitor session is untouched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_log_ins_from_several_nodes_never_exceed_the_cap() {
    let db = TestDatabase::create().await;
    let capped = Config {
        max_sessions_per_user: Some(3),
        ..config()
    };
    let nodes = [node(&db, capped.clone()).await, node(&db, capped).await];
    let check = pool(&db).await;
    let mut visitors = Vec::new();
    for i in 0..12 {
        visitors.push(
            nodes[i % 2]
                .create_anonymous_session([("n", i)])
                .await
                .unwrap()
                .0,
        );
    }
    let logins: Vec<_> = visitors
        .into_iter()
        .enumerate()
        .map(|(i, mut v)| {
            let m = nodes[i % 2].clone();
            tokio::spawn(async move { m.log_in(&mut v, "crowd").await.map(|_| ()) })
        })
        .collect();
    for l in logins {
        l.await.unwrap().unwrap();
    }
    let live: i64 = sqlx::query_scalar("SELECT count(*) FROM sessions WHERE user_id = 'crowd'")
        .fetch_one(&check)
        .await
        .unwrap();
    assert_eq!(live, 3);
}

#[tokio::test]
async fn anonymous_sessions_expire_count_against_no_cap_and_are_not_user_sessions() {
    let db = TestDatabase::create().await;
    let m = node(
        &db,
        Config {
            max_sessions_per_user: Some(1),
            session_ttl: Duration::from_secs(2),
            ..config()
        },
    )
    .await;
    let mut visitors = Vec::new();
    for i in 0..5 {
        visitors.push(m.create_anonymous_session([("n", i)]).await.unwrap().1);
    }
    for t in &visitors {
        assert!(
            m.get_session(t).await.unwrap().is_some(),
            "none evicted by a cap"
        );
    }
    let check = pool(&db).await;
    let anonymous: i64 = sqlx::query_scalar("SELECT count(*) FROM sessions WHERE user_id IS NULL")
        .fetch_one(&check)
        .await
        .unwrap();
    assert_eq!(anonymous, 5);
    // Absolute expiry applies to them too (checked on the read).
    eventually(
        Duration::from_secs(5),
        "visitor sessions expire",
        || async { m.get_session(&visitors[0]).await.unwrap().is_none() },
    )
    .await;
}

#[tokio::test]
async fn user_ids_of_any_kind_work_and_bad_ones_are_typed_errors() {
    let db = TestDatabase::create().await;
    let m = node(&db, config()).await;
    let uuid = Uuid::new_v4();
    for user in [
        UserId::from(uuid),
        UserId::from(42i64),
        UserId::from("ünï code"),
    ] {
        let (s, t) = m.create_session(user.clone(), [("k", 1)]).await.unwrap();
        assert_eq!(s.user_id(), Some(&user));
        assert_eq!(m.list_user_sessions(user.clone()).await.unwrap().len(), 1);
        assert_eq!(m.delete_all_user_sessions(user).await.unwrap(), 1);
        assert!(m.get_session(&t).await.unwrap().is_none());
    }
    let check = pool(&db).await;
    for bad in [String::new(), "a\0b".to_string(), "x".repeat(300)] {
        assert!(matches!(
            m.create_session(bad, [("k", 1)]).await,
            Err(Error::InvalidUserId(_))
        ));
    }
    assert_eq!(count_rows(&check).await, 0, "nothing written");
}

#[tokio::test]
async fn malformed_token_text_is_a_typed_error() {
    for bad in [
        "",
        "abc",
        &"A".repeat(43 + 1),
        "not base64 ********************************",
    ] {
        assert!(matches!(
            bad.parse::<SessionToken>(),
            Err(Error::InvalidToken(_))
        ));
    }
}

#[tokio::test]
async fn upgrading_a_database_of_the_previous_release_keeps_users_logged_in() {
    let db = TestDatabase::create().await;
    let check = pool(&db).await;
    // The schema as the previous release made it, and two of its sessions: then the id was
    // the token, and user ids were UUIDs.
    sqlx::raw_sql(include_str!("fixtures/schema_v2.sql"))
        .execute(&check)
        .await
        .unwrap();
    let (old_a, old_b, user) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    for id in [old_a, old_b] {
        sqlx::query(
            "INSERT INTO sessions VALUES ($1, $2, 3, '{\"role\": \"admin\"}', now(), now(), \
             now(), now() + interval '1 day')",
        )
        .bind(id)
        .bind(user)
        .execute(&check)
        .await
        .unwrap();
    }

    let m = node(&db, signed(vec![SigningKey::generate()])).await;
    let legacy: SessionToken = old_a.to_string().parse().unwrap();
    let s = m
        .get_session(&legacy)
        .await
        .unwrap()
        .expect("still logged in");
    assert_eq!(s.user_id(), Some(&UserId::from(user)));
    assert_eq!((s.version(), s.get("role")), (3, Some(&json!("admin"))));
    // The old id is no longer in the table: only its hash.
    let raw: i64 = sqlx::query_scalar("SELECT count(*) FROM sessions WHERE id = $1")
        .bind(old_a)
        .fetch_one(&check)
        .await
        .unwrap();
    assert_eq!(raw, 0);
    assert_eq!(m.list_user_sessions(user).await.unwrap().len(), 2);
    // At the next login the session moves to a new, signed token.
    let mut s = s;
    let fresh = m.log_in(&mut s, user).await.unwrap();
    assert!(m.get_session(&legacy).await.unwrap().is_none());
    assert!(m.get_session(&fresh).await.unwrap().is_some());
    let other: SessionToken = old_b.to_string().parse().unwrap();
    assert!(m.get_session(&other).await.unwrap().is_some());

    // Without accept_legacy_tokens they still open the converted sessions, until the last of
    // those expires (as recorded by migration 5); then they open nothing and count as forged.
    let auto = node(&db, config()).await;
    assert!(auto.get_session(&other).await.unwrap().is_some());
    sqlx::query("UPDATE sessions_cache_epoch SET legacy_tokens_until = now()")
        .execute(&check)
        .await
        .unwrap();
    let later = node(&db, config()).await;
    assert!(later.get_session(&other).await.unwrap().is_none());
    assert_eq!(later.stats().forged_tokens, 1);
    assert_eq!(later.stats().misses, 0, "refused without a read");
    // Unless forced on.
    let forced = node(
        &db,
        Config {
            accept_legacy_tokens: true,
            ..config()
        },
    )
    .await;
    assert!(forced.get_session(&other).await.unwrap().is_some());
}

#[tokio::test]
async fn legacy_tokens_open_nothing_on_a_database_that_never_converted_any() {
    let db = TestDatabase::create().await;
    let check = pool(&db).await;
    let m = node(&db, config()).await;
    // A session with a legacy token's id, written by another tool after the upgrade.
    let tokens = insert_sessions_directly(&check, 1).await;
    let shouted: Result<SessionToken, _> = tokens[0].to_string().to_uppercase().parse();
    assert!(
        matches!(shouted, Err(Error::InvalidToken(_))),
        "one text per token: upper case is not what was printed"
    );
    for _ in 0..50 {
        assert!(m.get_session(&tokens[0]).await.unwrap().is_none());
        assert!(m.get_session_fresh(&tokens[0]).await.unwrap().is_none());
    }
    let stats = m.stats();
    assert_eq!(stats.forged_tokens, 100, "every refusal counted");
    assert_eq!(stats.misses, 0, "and none cost a read");
    let forced = node(
        &db,
        Config {
            accept_legacy_tokens: true,
            ..config()
        },
    )
    .await;
    assert!(forced.get_session(&tokens[0]).await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_opens_its_session_on_every_node_or_on_none_whatever_they_cache() {
    let db = TestDatabase::create().await;
    let key = SigningKey::generate();
    let a = node(&db, signed(vec![key.clone()])).await;
    let b = node(&db, signed(vec![key])).await;
    let (_, token) = a.create_session("alice", [("k", 1)]).await.unwrap();
    assert!(
        a.get_session(&token).await.unwrap().is_some(),
        "A caches it"
    );
    // 20 000 tokens with the same secret and a tampered tag (every bit pattern but the real
    // one is a forgery): A, which caches the session, refuses them as B, which does not.
    let bytes = URL_SAFE_NO_PAD.decode(token.to_string()).unwrap();
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let mut forged = bytes.clone();
        let bit = (x % 128) as usize;
        forged[32 + bit / 8] ^= 1 << (bit % 8);
        forged[32 + (x as usize >> 8) % 16] ^= (x >> 16) as u8;
        let forged: SessionToken = URL_SAFE_NO_PAD.encode(&forged).parse().unwrap();
        if forged == token {
            continue;
        }
        assert!(a.get_session(&forged).await.unwrap().is_none());
        assert!(b.get_session(&forged).await.unwrap().is_none());
    }
    assert!(a.stats().forged_tokens >= 19_900);
    assert_eq!(a.stats().forged_tokens, b.stats().forged_tokens);
    assert_eq!(b.stats().misses, 0, "no forgery cost B a read");
    // The real token still opens it on both.
    assert!(a.get_session(&token).await.unwrap().is_some());
    assert!(b.get_session(&token).await.unwrap().is_some());
}
