use std::sync::OnceLock;
use std::time::Duration;

use sqlx::{AssertSqlSafe, Connection, PgConnection};

use crate::{TempPostgres, redact, with_database};

/// Where tests get PostgreSQL from; returns an admin URL, i.e. one to connect to for
/// `CREATE DATABASE`.
///
/// `DATABASE_URL` is returned as is when set and non-empty; its user must be allowed to
/// `CREATE DATABASE`. Otherwise one private [`TempPostgres`] is started on first use and shared
/// by all tests of this process; it is never dropped, its watchdog stops it when the process
/// exits.
///
/// Blocks while the private server starts (about a second, once).
///
/// # Panics
///
/// When no server can be had, with a message that says how to get one.
pub fn server_url() -> String {
    if let Some(url) = std::env::var("DATABASE_URL").ok().filter(|u| !u.is_empty()) {
        return url;
    }
    // The outcome is kept, failure included, so that every test fails fast with the same reason
    // instead of each retrying a start that cannot work.
    static SERVER: OnceLock<Result<TempPostgres, String>> = OnceLock::new();
    match SERVER.get_or_init(TempPostgres::start) {
        Ok(server) => server.url("postgres"),
        Err(e) => panic!(
            "pgsession-testkit: cannot start a private PostgreSQL server for the tests, and \
             DATABASE_URL is not set: {e}"
        ),
    }
}

/// A fresh, uniquely named database (`pgsession_test_<uuid>`) for one test, on the server of
/// [`server_url`]. Dropped (with `FORCE`, closing its connections) when this value is dropped.
pub struct TestDatabase {
    admin_url: String,
    url: String,
    name: String,
}

impl TestDatabase {
    /// Create the database.
    ///
    /// # Panics
    ///
    /// When no server can be had or the database cannot be created.
    pub async fn create() -> TestDatabase {
        // server_url may block for a second while it starts the private server.
        let admin_url = match tokio::task::spawn_blocking(server_url).await {
            Ok(url) => url,
            Err(e) => match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(e) => panic!("pgsession-testkit: server_url task failed: {e}"),
            },
        };
        let name = format!("pgsession_test_{}", uuid::Uuid::new_v4().simple());
        let created = async {
            let mut conn = PgConnection::connect(&admin_url).await?;
            sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {name}")))
                .execute(&mut conn)
                .await?;
            conn.close().await
        };
        if let Err(e) = created.await {
            panic!(
                "pgsession-testkit: cannot CREATE DATABASE {name} on {}: {e} (if DATABASE_URL is \
                 set, its user needs the CREATEDB privilege)",
                redact(&admin_url)
            );
        }
        TestDatabase {
            url: with_database(&admin_url, &name),
            admin_url,
            name,
        }
    }

    /// URL of this database, same server, user and parameters as the admin URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        // Drop may run inside a runtime, where blocking on another one panics; a thread of its
        // own with its own runtime works everywhere. Joined, so that the database is gone before
        // the test process may exit.
        let dropper = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            runtime.block_on(async {
                let _ = tokio::time::timeout(Duration::from_secs(10), async {
                    let mut conn = PgConnection::connect(&admin_url).await?;
                    sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut conn).await?;
                    conn.close().await
                })
                .await;
            });
        });
        let _ = dropper.join();
    }
}
