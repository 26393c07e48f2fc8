//! Quickstart: create, read, update and delete sessions, across two nodes.
//!
//! Runs against `DATABASE_URL` when it is set; otherwise it starts a private, throwaway
//! PostgreSQL server from the installed binaries (removed again when the program exits).
//!
//! ```text
//! cargo run --example quickstart
//! ```

use std::time::{Duration, Instant};

use pgsession::{Config, SessionManager};
use pgsession_testkit::TempPostgres;
use serde_json::json;
use uuid::Uuid;

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
    println!("two nodes up (schema migrated, cache listeners active)");

    // Login on node A.
    let user = Uuid::new_v4();
    let mut session = node_a
        .create_session(
            user,
            [
                ("role".to_string(), json!("admin")),
                ("theme".to_string(), json!("dark")),
            ],
        )
        .await?;
    println!(
        "created session {} for user {} (version {}, expires {})",
        session.id, user, session.version, session.expires_at
    );

    // Requests on node B: the first read fills B's cache, the next ones are served from memory.
    let started = Instant::now();
    let on_b = node_b
        .get_session(session.id)
        .await?
        .expect("session exists");
    let miss = started.elapsed();
    let started = Instant::now();
    node_b
        .get_session(session.id)
        .await?
        .expect("session exists");
    let hit = started.elapsed();
    println!(
        "node B read it: role={} (database read {miss:?}, then cache hit {hit:?})",
        on_b.get("role").unwrap()
    );

    // Node A changes an attribute; node B stops serving the old version within the
    // notification delay.
    session.set("theme", "light")?;
    session.remove("role");
    node_a.update_session(&mut session).await?;
    let written = Instant::now();
    loop {
        let seen = node_b
            .get_session(session.id)
            .await?
            .expect("session exists");
        if seen.version == session.version {
            println!(
                "updated on A to version {} (theme={}); node B served it {:?} after A's write returned",
                seen.version,
                seen.get("theme").unwrap(),
                written.elapsed()
            );
            break;
        }
        if written.elapsed() > Duration::from_secs(2) {
            return Err("node B did not see the update".into());
        }
        tokio::task::yield_now().await;
    }

    // The per-user cap: a fourth login evicts the least recently used session.
    for _ in 0..3 {
        node_a.create_session(user, []).await?;
    }
    let live = node_a.list_user_sessions(user).await?;
    println!(
        "after 4 logins with a cap of 3 the user has {} sessions; the first one is {}",
        live.len(),
        if node_b.get_session(session.id).await?.is_some() {
            "still there"
        } else {
            "gone (evicted on every node)"
        }
    );

    // Logout everywhere.
    let deleted = node_b.delete_all_user_sessions(user).await?;
    println!("logged out everywhere: {deleted} sessions deleted");
    for s in live {
        assert!(node_a.get_session(s.id).await?.is_none());
    }

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
