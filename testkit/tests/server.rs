//! TempPostgres: start, connect, restart, stop.

use pgsession_testkit::{ServerOptions, TempPostgres};
use sqlx::{Connection, PgConnection};

async fn select_one(url: &str) -> Result<i32, sqlx::Error> {
    let mut conn = PgConnection::connect(url).await?;
    let one = sqlx::query_scalar("SELECT 1").fetch_one(&mut conn).await?;
    conn.close().await?;
    Ok(one)
}

#[tokio::test]
async fn starts_restarts_and_stops() {
    let server = TempPostgres::start().unwrap();
    let url = server.url("postgres");
    assert_eq!(
        url,
        format!("postgres://postgres@127.0.0.1:{}/postgres", server.port())
    );
    assert_eq!(select_one(&url).await.unwrap(), 1);

    // A connection open across a restart is cut by the fast shutdown.
    let mut survivor = PgConnection::connect(&url).await.unwrap();
    for _ in 0..2 {
        server.restart().unwrap();
        assert_eq!(select_one(&url).await.unwrap(), 1);
    }
    assert!(
        sqlx::query("SELECT 1")
            .execute(&mut survivor)
            .await
            .is_err()
    );

    server.stop().unwrap();
    server.stop().unwrap();
    assert!(select_one(&url).await.is_err());
    server.start_again().unwrap();
    server.start_again().unwrap();
    assert_eq!(select_one(&url).await.unwrap(), 1);

    let dir = server.data_dir().parent().unwrap().to_owned();
    assert!(dir.exists());
    drop(server);
    assert!(!dir.exists(), "{} not removed", dir.display());
}

#[test]
fn applies_options_without_a_runtime() {
    let server = TempPostgres::start_with(ServerOptions {
        durable: true,
        max_connections: 20,
        settings: vec![("application_name".into(), "testkit options".into())],
    })
    .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut conn = PgConnection::connect(&server.url("postgres"))
            .await
            .unwrap();
        for (name, expected) in [
            ("fsync", "on"),
            ("max_connections", "20"),
            ("application_name", "testkit options"),
            ("unix_socket_directories", ""),
        ] {
            let value: String = sqlx::query_scalar("SELECT current_setting($1)")
                .bind(name)
                .fetch_one(&mut conn)
                .await
                .unwrap();
            assert_eq!(value, expected, "{name}");
        }
    });
}

#[test]
fn reports_a_taken_port_quickly() {
    let server = TempPostgres::start().unwrap();
    server.stop().unwrap();
    let squatter = std::net::TcpListener::bind(("127.0.0.1", server.port())).unwrap();
    let started = std::time::Instant::now();
    let err = server.start_again().unwrap_err();
    assert!(err.contains("could not bind"), "{err}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "{err}"
    );
    drop(squatter);
    server.start_again().unwrap();
}
