//! Server-side sessions stored in PostgreSQL, served from an in-process LRU cache that stays
//! coherent across every node of a service through `LISTEN`/`NOTIFY`.
//!
//! One [`SessionManager`] per process (clone it freely) owns:
//!
//! * the **store**: a table of sessions with JSON attributes, absolute and inactivity expiry,
//!   a per-user cap enforced in the create transaction, and size limits on attributes;
//! * a sharded **LRU cache**: reads of hot sessions do no database I/O;
//! * **coherence**: every write announces itself in its own transaction; every node evicts
//!   what changed, distrusts its cache whenever its listener is down, and resynchronises by
//!   database versions when it is back;
//! * **background work**: last-access times written in batches, expired sessions deleted in
//!   bounded batches;
//! * a **graceful shutdown** that writes what is pending and stops every task.
//!
//! # Example
//!
//! ```no_run
//! use pgsession::{Config, Error, SessionManager};
//! use serde_json::json;
//! use uuid::Uuid;
//!
//! # async fn run() -> Result<(), Error> {
//! let manager = SessionManager::connect(Config::default(), "postgres://localhost/app").await?;
//!
//! // At login.
//! let user_id = Uuid::new_v4();
//! let mut session = manager
//!     .create_session(user_id, [("role".to_string(), json!("admin"))])
//!     .await?;
//!
//! // On every request (the id comes from the session cookie).
//! let Some(mut session) = manager.get_session(session.id).await? else {
//!     return Ok(()); // expired or logged out: send to the login page
//! };
//! assert_eq!(session.get_as::<String>("role")?.as_deref(), Some("admin"));
//!
//! // When attributes change: only the keys touched here are written.
//! session.set("theme", "dark")?;
//! session.remove("cart");
//! manager.update_session(&mut session).await?;
//!
//! // Logout, and "log out everywhere".
//! manager.delete_session(session.id).await?;
//! manager.delete_all_user_sessions(user_id).await?;
//!
//! // At process exit: writes pending last-access times, stops the tasks.
//! manager.shutdown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Guarantees
//!
//! * After `update_session` or `delete_session` returns on a node, that node never serves the
//!   previous state; other nodes with a healthy listener stop serving it within the
//!   notification delay (well under a millisecond on a LAN), or within about 4 s if the
//!   writing node stops (or the call is cancelled) between its commit and the announcement.
//! * A cache fill that read the database before an invalidation arrived is never installed
//!   after it.
//! * While the listener connection is down or resynchronising, nothing is served from the
//!   cache. A silently dead (half-open) connection is noticed within
//!   `listener_probe_interval + listener_timeout` (4 s by default), by a notification the
//!   listener sends itself.
//! * An expired session is never returned.
//! * Writes outside pgsession (hand-written SQL) are seen within
//!   [`Config::cache_max_age`].

mod background;
mod cache;
mod config;
mod connections;
mod error;
mod listener;
mod manager;
mod migrate;
mod notify;
mod outbox;
mod session;
mod shutdown;
mod store;
mod touch;

pub use config::{Config, MaxSessionsPolicy};
pub use error::{Error, Result};
pub use manager::{SessionManager, Stats};
pub use session::Session;

/// The complete schema for `config` (its schema name and table prefix) as one SQL script, for
/// deployments that manage schemas with their own migration tool and run the manager with
/// `run_migrations: false`. Running it on an empty database leaves exactly what
/// [`SessionManager`] would have created, bookkeeping included, so the manager's start-up check
/// passes. Returns [`Error::InvalidConfig`] for an invalid configuration.
pub fn schema_sql(config: &Config) -> Result<String> {
    Ok(migrate::script(&config.validate()?))
}

/// The SQL statements a manager with `config` sends, by name (`select_one`, `insert`,
/// `create_capped`, `update`, `delete`, …), exactly as sent. It lets the comparison benchmark
/// issue the very same statements directly as its raw-SQL floor; names and texts are not a
/// stable API. Returns [`Error::InvalidConfig`] for an invalid configuration.
#[doc(hidden)]
pub fn statements(config: &Config) -> Result<Vec<(&'static str, String)>> {
    Ok(store::statements(&config.validate()?))
}
