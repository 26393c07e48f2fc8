//! What PostgreSQL stores comes back as it was handed out, a session's size is measured as
//! PostgreSQL measures it, and a row nobody can read does not break a listing.
//! (The same behaviours on both backends are in `tests/behaviour.rs`.)

mod common;

use common::*;
use pgsession::{Config, Error};
use serde_json::{Value, json};

/// Attributes of every shape the size measure must get right: nesting, escapes, non-ASCII,
/// numbers PostgreSQL prints differently from serde_json.
fn awkward() -> Vec<(String, Value)> {
    attrs(&[
        (
            "nested",
            json!({"a": [1, 2, {"b": null, "c": [true, false]}], "d": {}}),
        ),
        (
            "escapes",
            json!("quote \" backslash \\ newline \n tab \t bell \u{7} del \u{7f}"),
        ),
        ("unicode", json!("café 日本 🎉")),
        (
            "floats",
            json!([0.1, 1e-7, 1.5e300, 5e-324, -2.5, 1e16, 123.456]),
        ),
        ("ints", json!([0, -1, u64::MAX, i64::MIN])),
        ("empty", json!([])),
    ])
}

#[tokio::test]
async fn max_session_size_measures_attributes_as_postgres_prints_them() {
    let db = TestDatabase::create().await;
    let check = pool(&db).await;
    let probe = node(&db, config()).await;
    let (s, _) = probe.create_session("alice", awkward()).await.unwrap();
    let stored: i32 =
        sqlx::query_scalar("SELECT octet_length(attributes::text) FROM sessions WHERE id = $1")
            .bind(s.id())
            .fetch_one(&check)
            .await
            .unwrap();
    let stored = stored as usize;

    // Checked in Rust at create: exactly at the limit fits, one byte under it does not.
    let exact = node(
        &db,
        Config {
            max_session_size: stored,
            ..config()
        },
    )
    .await;
    exact.create_session("bob", awkward()).await.unwrap();
    let tight = node(
        &db,
        Config {
            max_session_size: stored - 1,
            ..config()
        },
    )
    .await;
    match tight.create_session("carol", awkward()).await {
        Err(Error::SessionTooLarge { size, limit }) => {
            assert_eq!((size, limit), (stored, stored - 1))
        }
        other => panic!("{other:?}"),
    }

    // Checked in SQL at update, on the merge: the same measure.
    let (mut grow, _) = exact.create_session("dave", [("x", 1)]).await.unwrap();
    grow.remove("x");
    for (k, v) in awkward() {
        grow.set(k, v).unwrap();
    }
    let mut too_much = grow.clone();
    match tight.update_session(&mut too_much).await {
        Err(Error::SessionTooLarge { size, limit }) => {
            assert_eq!((size, limit), (stored, stored - 1))
        }
        other => panic!("{other:?}"),
    }
    exact.update_session(&mut grow).await.unwrap();
}

#[tokio::test]
async fn a_session_over_a_lowered_limit_may_shrink_but_not_grow() {
    let db = TestDatabase::create().await;
    let roomy = node(&db, config()).await;
    let (_, token) = roomy
        .create_session("alice", [("a", "x".repeat(1500)), ("b", "y".repeat(500))])
        .await
        .unwrap();
    let strict = node(
        &db,
        Config {
            max_session_size: 1000,
            ..config()
        },
    )
    .await;
    let mut grows = strict.get_session(&token).await.unwrap().unwrap();
    grows.set("c", 1).unwrap();
    assert!(matches!(
        strict.update_session(&mut grows).await,
        Err(Error::SessionTooLarge { limit: 1000, .. })
    ));
    // Still over the limit afterwards, but smaller: allowed.
    let mut shrinks = strict.get_session(&token).await.unwrap().unwrap();
    shrinks.remove("b");
    strict.update_session(&mut shrinks).await.unwrap();
    shrinks.set("a", "x".repeat(1200)).unwrap();
    strict.update_session(&mut shrinks).await.unwrap();
    let s = roomy.get_session_fresh(&token).await.unwrap().unwrap();
    assert_eq!(s.get("b"), None);
    assert_eq!(s.get("c"), None);
}

#[tokio::test]
async fn a_row_that_cannot_be_read_is_left_out_of_listings_and_counted() {
    let db = TestDatabase::create().await;
    let check = pool(&db).await;
    let m = node(&db, config()).await;
    let mut tokens = Vec::new();
    for i in 0..5 {
        tokens.push(m.create_session("alice", [("i", i)]).await.unwrap());
    }
    // A number PostgreSQL stores (numeric) but no f64 can hold, written by hand.
    let poisoned = tokens[2].0.id();
    sqlx::query("UPDATE sessions SET attributes = '{\"x\": 1e400}' WHERE id = $1")
        .bind(poisoned)
        .execute(&check)
        .await
        .unwrap();

    let listed = m.list_user_sessions("alice").await.unwrap();
    assert_eq!(listed.len(), 4);
    assert!(listed.iter().all(|s| s.id() != poisoned));
    assert_eq!(m.list_sessions(None, 100).await.unwrap().len(), 4);
    // Page by page too: the cursor moves past the row it skipped.
    let mut after = None;
    let mut seen = Vec::new();
    loop {
        let page = m.list_sessions(after, 1).await.unwrap();
        let Some(last) = page.last() else { break };
        after = Some(last.id());
        seen.push(last.id());
    }
    assert_eq!(seen.len(), 4);
    assert!(!seen.contains(&poisoned));
    assert!(m.stats().unreadable_sessions >= 3, "each skip counted");
    // Reading that one session itself is an error, not a silent logout.
    assert!(matches!(
        m.get_session_fresh(&tokens[2].1).await,
        Err(Error::Database(_))
    ));
    // The others are unaffected.
    assert!(m.get_session(&tokens[3].1).await.unwrap().is_some());
}

#[tokio::test]
async fn numbers_set_on_one_node_read_the_same_on_another() {
    let db = TestDatabase::create().await;
    let roomy = || Config {
        max_attribute_size: 1 << 20,
        ..config()
    };
    let a = node(&db, roomy()).await;
    let b = node(&db, roomy()).await;
    let (mut s, token) = a.create_session("alice", [("k", 1)]).await.unwrap();
    // Finite f64s of every magnitude, from their bits.
    let mut floats = Vec::new();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while floats.len() < 2000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let f = f64::from_bits(x);
        if f.is_finite() {
            floats.push(f);
        }
    }
    s.set("floats", &floats).unwrap();
    a.update_session(&mut s).await.unwrap();
    let on_b = b.get_session(&token).await.unwrap().unwrap();
    assert_eq!(on_b.attributes(), s.attributes());
    let back: Vec<f64> = on_b.get_as("floats").unwrap().unwrap();
    assert_eq!(back.len(), floats.len());
    for (got, want) in back.iter().zip(&floats) {
        // Bit for bit, except that PostgreSQL keeps no negative zero.
        assert!(
            got.to_bits() == want.to_bits() || (*got == 0.0 && *want == 0.0),
            "{want:e} came back as {got:e}"
        );
    }
}
