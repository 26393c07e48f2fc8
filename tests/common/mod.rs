//! Helpers shared by the integration tests: configurations, nodes, and waiting with deadlines.
#![allow(dead_code)] // each test binary uses a different subset

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use pgsession::{
    Config, Origin, Session, SessionEvent, SessionEventKind, SessionId, SessionManager,
    SessionToken,
};
use serde_json::{Value, json};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use uuid::Uuid;

#[allow(unused_imports)] // not every test binary uses every helper
pub use pgsession_testkit::{FaultProxy, TempPgBouncer, TempPostgres, TestDatabase};

/// Defaults suited to tests: quick failure detection, and no background work that would race
/// with what a test checks (tests flush and clean up explicitly unless that is the subject).
pub fn config() -> Config {
    Config {
        listener_probe_interval: Duration::from_millis(200),
        listener_timeout: Duration::from_secs(2),
        listener_max_backoff: Duration::from_millis(100),
        last_access_flush_interval: Duration::from_secs(3600),
        run_cleanup: false,
        shutdown_timeout: Duration::from_secs(5),
        ..Config::default()
    }
}

/// A node: a manager with its own pool, as a separate process would have, once it trusts its
/// cache (a manager whose listener is slow to start serves from the database until then, which
/// would change what a test counts).
pub async fn node(db: &TestDatabase, config: Config) -> SessionManager {
    let node = SessionManager::connect(config, db.url())
        .await
        .expect("manager starts");
    listening(node).await
}

/// `node` once its cache is trusted.
pub async fn listening(node: SessionManager) -> SessionManager {
    tokio::time::timeout(Duration::from_secs(15), node.wait_for_cache())
        .await
        .expect("the new node's listener is up within 15 s");
    node
}

/// A node whose LISTEN connection goes through `proxy` (its pool connects directly), so that
/// a test can cut, stall or refuse the listener alone.
pub async fn node_listening_through(
    db: &TestDatabase,
    proxy: &FaultProxy,
    config: Config,
) -> SessionManager {
    node(
        db,
        Config {
            listen_url: Some(proxy.proxied_url(db.url())),
            ..config
        },
    )
    .await
}

/// A plain pool for checking the database directly.
pub async fn pool(db: &TestDatabase) -> PgPool {
    PgPoolOptions::new()
        .max_connections(4)
        .connect(db.url())
        .await
        .expect("test pool connects")
}

/// A pool of `max` connections that the test (as the application) shares with a manager
/// built on it, and that manager.
pub async fn shared_pool_node(
    db: &TestDatabase,
    max: u32,
    acquire_timeout: Duration,
) -> (PgPool, SessionManager) {
    let shared = PgPoolOptions::new()
        .max_connections(max)
        .acquire_timeout(acquire_timeout)
        .connect(db.url())
        .await
        .expect("shared pool connects");
    let node = SessionManager::new(config(), shared.clone())
        .await
        .expect("manager on the shared pool starts");
    (shared, listening(node).await)
}

/// Lock session `id`'s row in a transaction of `pool`'s, as another writer in the middle of an
/// update would; the lock is held until the returned transaction ends.
pub async fn lock_row(pool: &PgPool, id: SessionId) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut tx = pool.begin().await.expect("transaction begins");
    sqlx::query("SELECT 1 FROM sessions WHERE id = $1 FOR UPDATE")
        .bind(id)
        .execute(&mut *tx)
        .await
        .expect("row locked");
    tx
}

/// `(key, value)` attribute pairs.
pub fn attrs(pairs: &[(&str, Value)]) -> Vec<(String, Value)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_string(), v.clone()))
        .collect()
}

/// A small attribute set.
pub fn small() -> Vec<(String, Value)> {
    attrs(&[("role", json!("admin")), ("theme", json!("dark"))])
}

/// Poll `check` until it returns true, failing the test after `limit`. Used where the event is
/// another process's notification arriving, which a test cannot await directly; the limit is
/// the bound being asserted.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("not within {limit:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The socket address a database URL points at (for putting a proxy in front of it).
pub async fn socket_addr(url: &str) -> SocketAddr {
    let options: PgConnectOptions = url.parse().expect("valid URL");
    let host = options.get_host().to_string();
    let port = options.get_port();
    tokio::net::lookup_host((host.as_str(), port))
        .await
        .expect("host resolves")
        .next()
        .expect("an address")
}

/// `n` sessions inserted by hand-written SQL, as an older release or another tool would, with
/// legacy tokens (their ids hashed as migration 3 does): a day to live, no user attributes.
/// Created after migration 3, so only a node with `accept_legacy_tokens` opens them.
pub async fn insert_sessions_directly(pool: &PgPool, n: i64) -> Vec<SessionToken> {
    let uuids: Vec<Uuid> = sqlx::query_scalar(
        "WITH t AS (SELECT gen_random_uuid() AS u FROM generate_series(1, $1)), \
         inserted AS ( \
             INSERT INTO sessions \
             SELECT encode(substring(sha256(uuid_send(u)) FROM 1 FOR 16), 'hex')::uuid, \
                    gen_random_uuid()::text, 1, '{}', now(), now(), now(), \
                    now() + interval '1 day' \
             FROM t) \
         SELECT u FROM t",
    )
    .bind(n)
    .fetch_all(pool)
    .await
    .expect("sessions inserted");
    uuids
        .into_iter()
        .map(|u| u.to_string().parse().expect("a legacy token"))
        .collect()
}

/// A well-formed (unsigned) token of no session: looked up like any other when no signing
/// keys are configured.
pub fn unknown_token() -> SessionToken {
    let mut bytes = [0u8; 32];
    bytes[..16].copy_from_slice(Uuid::new_v4().as_bytes());
    bytes[16..].copy_from_slice(Uuid::new_v4().as_bytes());
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(bytes)
        .parse()
        .expect("a token")
}

/// The version stored in the database, `None` when the row is gone.
pub async fn db_version(pool: &PgPool, id: SessionId) -> Option<i64> {
    sqlx::query_scalar("SELECT version FROM sessions WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
        .expect("query")
}

/// Number of rows in the sessions table.
pub async fn count_rows(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM sessions")
        .fetch_one(pool)
        .await
        .expect("count")
}

/// Set one attribute and save.
pub async fn set_and_save(
    manager: &SessionManager,
    session: &mut Session,
    key: &str,
    value: Value,
) {
    session.set(key, value).expect("valid attribute");
    manager.update_session(session).await.expect("update");
}

/// Wait (at most 5 s) until the node behind `events` has applied another node's write of
/// `kind`: the listener reports an event after it has invalidated the cache. Other events
/// are skipped.
pub async fn heard_from_other_node(
    events: &mut tokio::sync::broadcast::Receiver<SessionEvent>,
    kind: SessionEventKind,
) {
    loop {
        let e = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .unwrap_or_else(|_| panic!("another node's {kind:?} within 5 s"))
            .expect("no lag");
        if e.kind == kind && e.origin == Origin::OtherNode {
            return;
        }
    }
}

/// How many migrations this build applies: the files in `migrations/`.
pub fn migration_count() -> i64 {
    std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .expect("migrations/ is readable")
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "sql"))
        })
        .count() as i64
}
