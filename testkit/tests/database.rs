//! server_url and TestDatabase.

use pgsession_testkit::TestDatabase;
use sqlx::{Connection, PgConnection};

#[tokio::test]
async fn databases_are_distinct_and_dropped() {
    let first = TestDatabase::create().await;
    let second = TestDatabase::create().await;
    assert_ne!(first.name(), second.name());
    assert!(first.name().starts_with("pgsession_test_"));

    for db in [&first, &second] {
        let mut conn = PgConnection::connect(db.url()).await.unwrap();
        let name: String = sqlx::query_scalar("SELECT current_database()")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(name, db.name());
        // Left open on purpose: dropping the database must not be blocked by it.
        std::mem::forget(conn);
    }

    let admin_url = pgsession_testkit::server_url();
    let name = first.name().to_owned();
    drop(first);
    let mut admin = PgConnection::connect(&admin_url).await.unwrap();
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1")
        .bind(&name)
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(left, 0, "{name} was not dropped");
}

#[test]
fn server_url_works_without_a_runtime() {
    let url = pgsession_testkit::server_url();
    assert_eq!(url, pgsession_testkit::server_url());
    assert!(url.starts_with("postgres"), "{url}");
}
