//! FaultProxy against a real server.

use std::net::SocketAddr;
use std::time::Duration;

use pgsession_testkit::{FaultProxy, TestDatabase};
use sqlx::{Connection, PgConnection};
use tokio::time::timeout;

const STALL: Duration = Duration::from_millis(300);
const PATIENCE: Duration = Duration::from_secs(10);

/// A test database and a proxy in front of its server.
async fn setup() -> (TestDatabase, FaultProxy, String) {
    let db = TestDatabase::create().await;
    let target = server_addr(db.url()).await;
    let proxy = FaultProxy::start(target).await;
    let url = proxy.proxied_url(db.url());
    (db, proxy, url)
}

async fn server_addr(url: &str) -> SocketAddr {
    let host_port = url
        .split('@')
        .next_back()
        .unwrap()
        .split('/')
        .next()
        .unwrap();
    tokio::net::lookup_host(host_port)
        .await
        .unwrap()
        .next()
        .unwrap()
}

async fn select_one(conn: &mut PgConnection) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar("SELECT 1").fetch_one(conn).await
}

#[tokio::test]
async fn forwards_and_pauses() {
    let (_db, proxy, url) = setup().await;
    assert!(url.contains(&proxy.addr().to_string()));
    let mut conn = PgConnection::connect(&url).await.unwrap();
    assert_eq!(select_one(&mut conn).await.unwrap(), 1);
    assert_eq!(proxy.connections_accepted(), 1);

    proxy.pause();
    let query = select_one(&mut conn);
    tokio::pin!(query);
    assert!(
        timeout(STALL, &mut query).await.is_err(),
        "answered while paused"
    );
    proxy.resume();
    assert_eq!(timeout(PATIENCE, query).await.unwrap().unwrap(), 1);

    // Connections made while paused stall too, and complete on resume.
    proxy.pause();
    let connect = PgConnection::connect(&url);
    tokio::pin!(connect);
    assert!(
        timeout(STALL, &mut connect).await.is_err(),
        "connected while paused"
    );
    proxy.resume();
    let mut late = timeout(PATIENCE, connect).await.unwrap().unwrap();
    assert_eq!(select_one(&mut late).await.unwrap(), 1);
}

#[tokio::test]
async fn holds_responses_after_the_server_acted() {
    let (db, proxy, url) = setup().await;
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let mut direct = PgConnection::connect(db.url()).await.unwrap();

    proxy.hold_responses();
    // Simple protocol: with sqlx::query the first held answer would be that of the prepare
    // round trip, before the statement has run.
    let create = sqlx::raw_sql("CREATE TABLE held_probe ()").execute(&mut conn);
    tokio::pin!(create);
    tokio::select! {
        _ = &mut create => panic!("answered while responses are held"),
        held = timeout(PATIENCE, proxy.wait_until_response_held()) => held.expect("nothing held"),
    }
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('held_probe') IS NOT NULL")
        .fetch_one(&mut direct)
        .await
        .unwrap();
    assert!(exists, "the query did not reach the server");
    assert!(
        timeout(STALL, &mut create).await.is_err(),
        "answered while held"
    );
    proxy.resume();
    timeout(PATIENCE, create).await.unwrap().unwrap();
}

#[tokio::test]
async fn disconnects_even_when_paused() {
    let (_db, proxy, url) = setup().await;
    let mut conn = PgConnection::connect(&url).await.unwrap();
    assert_eq!(select_one(&mut conn).await.unwrap(), 1);
    proxy.disconnect_all();
    assert!(
        timeout(PATIENCE, select_one(&mut conn))
            .await
            .unwrap()
            .is_err()
    );

    let mut paused = PgConnection::connect(&url).await.unwrap();
    proxy.pause();
    let query = select_one(&mut paused);
    tokio::pin!(query);
    assert!(timeout(STALL, &mut query).await.is_err());
    proxy.disconnect_all();
    assert!(timeout(PATIENCE, query).await.unwrap().is_err());
    proxy.resume();

    // New connections are unaffected.
    let mut fresh = PgConnection::connect(&url).await.unwrap();
    assert_eq!(select_one(&mut fresh).await.unwrap(), 1);
}

#[tokio::test]
async fn refuses_new_connections() {
    let (_db, proxy, url) = setup().await;
    let mut before = PgConnection::connect(&url).await.unwrap();
    proxy.refuse_new(true);
    assert!(
        timeout(PATIENCE, PgConnection::connect(&url))
            .await
            .unwrap()
            .is_err()
    );
    assert_eq!(
        proxy.connections_accepted(),
        2,
        "refused connections are counted"
    );
    // Existing connections keep working.
    assert_eq!(select_one(&mut before).await.unwrap(), 1);
    proxy.refuse_new(false);
    let mut after = PgConnection::connect(&url).await.unwrap();
    assert_eq!(select_one(&mut after).await.unwrap(), 1);
}

#[tokio::test]
async fn drop_closes_connections() {
    let (_db, proxy, url) = setup().await;
    let mut conn = PgConnection::connect(&url).await.unwrap();
    let addr = proxy.addr();
    drop(proxy);
    assert!(
        timeout(PATIENCE, select_one(&mut conn))
            .await
            .unwrap()
            .is_err()
    );
    // The listener is closed once the runtime has dropped the accept task.
    tokio::task::yield_now().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn stalls_new_connections_but_not_existing_ones() {
    let (_db, proxy, url) = setup().await;
    let mut existing = PgConnection::connect(&url).await.unwrap();
    proxy.stall_new(true);
    let connecting = PgConnection::connect(&url);
    tokio::pin!(connecting);
    assert!(
        timeout(STALL, &mut connecting).await.is_err(),
        "a new connection completed while new ones stall"
    );
    assert_eq!(select_one(&mut existing).await.unwrap(), 1);
    proxy.stall_new(false);
    let mut late = timeout(PATIENCE, connecting).await.unwrap().unwrap();
    assert_eq!(select_one(&mut late).await.unwrap(), 1);
}
