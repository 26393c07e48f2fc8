//! Quickstart: create, read, update and delete sessions, across two nodes.
//!
//! Runs against `DATABASE_URL` when it is set; otherwise it starts a private, throwaway
//! PostgreSQL server from the installed binaries (removed again when the program exits).
//!
//! ```text
//! cargo run --example quickstart
//! ```

use std::future::Future;
use std::time::{Duration, Instant};

use pgsession::{Config, SessionManager};
use pgsession_testkit::TempPostgres;
use serde_json::json;
use uuid::Uuid;

/// How long another node may take to catch up with a write before the demo calls it a failure
/// (it takes well under a millisecond on loopback).
const VISIBLE_WITHIN: Duration = Duration::from_secs(2);

/// Poll `check` until it holds; how long that took after the write that preceded the call.
async fn once_visible<F, Fut>(
    what: &str,
    mut check: F,
) -> Result<Duration, Box<dyn std::error::Error>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool, pgsession::Error>>,
{
    let started = Instant::now();
    while !check().await? {
        if started.elapsed() > VISIBLE_WITHIN {
            return Err(format!("{what}: not within {VISIBLE_WITHIN:?}").into());
        }
        tokio::task::yield_now().await;
    }
    Ok(started.elapsed())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Keep the private server (if any) alive until the end of main.
    let (url, _server) = match std::env::var("DATABASE_URL") {
        Ok(url) if !url.is_empty() => {
            println!("using DATABASE_URL");
            (url, None)
        }
        _ => {
            let server = TempPostgres::start()?;
            println!("started a private PostgreSQL on port {}", server.port());
            (server.url("postgres"), Some(server))
        }
    };

    // Two managers on separate pools, as two nodes of a service would have.
    let config = Config {
        max_sessions_per_user: Some(3),
        ..Config::default()
    };
    let node_a = SessionManager::connect(config.clone(), &url).await?;
    let node_b = SessionManager::connect(config, &url).await?;
    for node in [&node_a, &node_b] {
        tokio::time::timeout(Duration::from_secs(10), node.wait_for_cache()).await?;
    }
    println!("two nodes up (schema migrated, cache listeners active)");

    // A visitor puts something in the cart on node A: a session before login.
    let (mut session, visitor_token) = node_a
        .create_anonymous_session([("cart", json!(["book"]))])
        .await?;
    println!(
        "visitor session {} (the cookie holds a {}-character token; the database only its hash)",
        session.id(),
        visitor_token.to_string().len()
    );

    // Login on node A: a new token (against session fixation), the user bound, the cart kept.
    let user = Uuid::new_v4();
    let token = node_a.log_in(&mut session, user).await?;
    println!(
        "logged in as {user}: new session id {} (version {}, expires {}), cart {}",
        session.id(),
        session.version(),
        session.expires_at(),
        session.get("cart").unwrap()
    );
    let old_gone = once_visible("node B refuses the visitor token", || async {
        Ok(node_b.get_session(&visitor_token).await?.is_none())
    })
    .await?;
    println!("the visitor token stopped working on node B {old_gone:?} after the login");

    // Requests on node B: the first read fills B's cache, the next ones are served from memory.
    let started = Instant::now();
    let on_b = node_b.get_session(&token).await?.expect("session exists");
    let miss = started.elapsed();
    let started = Instant::now();
    node_b.get_session(&token).await?.expect("session exists");
    let hit = started.elapsed();
    println!(
        "node B read it: user {} (database read {miss:?}, then cache hit {hit:?})",
        on_b.user_id().unwrap()
    );

    // Node A changes attributes; node B stops serving the old version within the notification
    // delay (B hears of the write a moment after A's call returns).
    session.set("theme", "light")?;
    session.remove("cart");
    node_a.update_session(&mut session).await?;
    let version = session.version();
    let delay = once_visible("node B serves the update", || async {
        let seen = node_b.get_session(&token).await?;
        Ok(seen.is_some_and(|s| s.version() == version))
    })
    .await?;
    let seen = node_b.get_session(&token).await?.expect("session exists");
    println!(
        "updated on A to version {} (theme={}); node B served it {delay:?} after A's write returned",
        seen.version(),
        seen.get("theme").unwrap(),
    );

    // The per-user cap: three more logins evict the least recently used session, everywhere.
    let mut others = Vec::new();
    for _ in 0..3 {
        others.push(node_a.create_session(user, [("device", "phone")]).await?.1);
    }
    let live = node_a.list_user_sessions(user).await?;
    let delay = once_visible("node B drops the evicted session", || async {
        Ok(node_b.get_session(&token).await?.is_none())
    })
    .await?;
    println!(
        "after 4 logins with a cap of 3 the user has {} sessions; the first one is gone \
         (node B stopped serving it {delay:?} after the login)",
        live.len()
    );

    // Logout everywhere, from node B: node A stops serving every one of them too.
    let deleted = node_b.delete_all_user_sessions(user).await?;
    let delay = once_visible("node A drops the user's sessions", || async {
        for t in &others {
            if node_a.get_session(t).await?.is_some() {
                return Ok(false);
            }
        }
        Ok(true)
    })
    .await?;
    println!("logged out everywhere on B: {deleted} sessions deleted, gone from A after {delay:?}");

    let stats = node_b.stats();
    println!(
        "node B cache: {} hits, {} misses, {} invalidations received",
        stats.hits, stats.misses, stats.invalidations
    );

    node_a.shutdown().await?;
    node_b.shutdown().await?;
    println!("both nodes shut down cleanly");
    Ok(())
}
