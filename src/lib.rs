#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]
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
//! * a **graceful shutdown** that writes what is pending and stops every task;
//! * **events** ([`SessionManager::subscribe_events`]) of this node's writes and, through the
//!   invalidation stream, of every other node's;
//! * app-wide operations: keyset listing, activity counts, deletion by group (tenant) or of
//!   everything, removal of an attribute from all of a user's sessions, each one statement and
//!   one notification.
//!
//! [`SessionManager::in_memory`] gives the same API without a database, for unit tests of
//! handlers and for single-process tools.
//!
//! # Cargo features
//!
//! * `axum`: `axum::SessionLayer`, a tower layer keeping the
//!   token in a cookie, and the `axum::WebSession` extractor
//!   (lazy loads, delta saves after the handler, login rotation).
//! * `tower-sessions`: `tower_sessions::PgSessionStore`,
//!   a tower-sessions 0.14 store (and so one for axum-login 0.18) served from the coherent
//!   cache.
//! * `actix-session`: `actix_session::PgSessionStore`, an actix-session 0.11 store served from
//!   the coherent cache, with actix-identity users bound to their sessions.
//! * `metrics`: counters, gauges and histograms through the [`metrics`](https://docs.rs/metrics)
//!   facade, every name starting `pgsession_` (listed in the README, "Operate it").
//! * `cli`: the `pgsession` admin command (`cargo install pgsession --features cli`).
//!
//! None is on by default.
//!
//! # Example
//!
//! ```no_run
//! use pgsession::{Config, Error, SessionManager, SessionToken, SigningKey};
//!
//! # async fn run(key_bytes: &[u8], cookie: &str) -> Result<(), Error> {
//! let config = Config {
//!     // The same key on every node: forged tokens are refused before any lookup.
//!     signing_keys: vec![SigningKey::from_bytes(key_bytes)?],
//!     ..Config::default()
//! };
//! let manager = SessionManager::connect(config, "postgres://localhost/app").await?;
//!
//! // A visitor's first write: a session before login.
//! let (mut session, token) = manager.create_anonymous_session([("cart", vec![42])]).await?;
//! // The cookie holds `token.to_string()`; the database holds only its hash, `session.id()`.
//!
//! // At login: a new token, the user bound, the per-user cap applied, the cart kept.
//! let token: SessionToken = manager.log_in(&mut session, "alice").await?;
//!
//! // On every request: the cookie's text; anything malformed or forged is no session.
//! let Ok(token) = cookie.parse::<SessionToken>() else { return Ok(()) };
//! let Some(mut session) = manager.get_session(&token).await? else {
//!     return Ok(()); // expired or logged out: send to the login page
//! };
//!
//! // When attributes change: only the keys touched here are written.
//! session.set("theme", "dark")?;
//! session.remove("cart");
//! manager.update_session(&mut session).await?;
//!
//! // "Your devices", logout, and "log out everywhere".
//! for device in manager.list_user_sessions("alice").await? {
//!     println!("{} last seen {}", device.id(), device.last_accessed_at());
//! }
//! manager.delete_session(session.id()).await?;
//! manager.delete_all_user_sessions("alice").await?;
//!
//! // At process exit: writes pending last-access times, stops the tasks.
//! manager.shutdown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Tokens
//!
//! A [`SessionToken`] is the secret (256 random bits, signed when [`Config::signing_keys`] is
//! set); only its hash, the [`SessionId`], is stored, logged, listed or announced, so reading
//! the sessions table, a replica or a backup gives no way into anyone's session. A
//! [`UserId`] is any text (UUIDs, integers and strings convert into one).
//!
//! # Guarantees and design
//!
//! Read-your-writes on a node; bounded staleness across nodes (the notification delay, a few
//! seconds under the worst faults); no stale re-insert; no trust without a listener; expiry on
//! every read; invalidations that always fit; writes that merge and deletions that stick; no
//! acknowledged write lost. The guarantees (G1-G10), the staleness bound by fault, how they
//! are held and which tests show them are in `docs/design.md`, shipped with the crate, with
//! the layers of the code (`model`, `storage`, `coherence`, `manager`, `background`, `web`).

mod background;
mod backoff;
mod coherence;
mod config;
mod error;
mod events;
mod manager;
#[cfg(feature = "metrics")]
mod metrics;
mod model;
mod shard;
mod storage;
mod web;

#[cfg(feature = "actix-session")]
pub use web::actix_session;
#[cfg(feature = "axum")]
pub use web::axum;
#[cfg(feature = "tower-sessions")]
pub use web::tower_sessions;

pub use config::{Config, MaxSessionsPolicy};
pub use error::{Error, Result};
pub use events::{EVENT_BUFFER, Origin, SessionEvent, SessionEventKind};
pub use manager::{ListeningNode, SessionManager, Stats, Status};
pub use model::clock::Clock;
pub use model::ids::{MAX_USER_ID_LEN, SessionId, UserId};
pub use model::options::{MAX_GROUP_ID_LEN, MAX_USER_AGENT_LEN, SessionOptions};
pub use model::session::Session;
pub use model::token::{MIN_KEY_LEN, SessionToken, SigningKey};
/// The sqlx version pgsession is built on: [`SessionManager::new`] takes its [`PgPool`](sqlx::PgPool).
pub use sqlx;

/// The complete schema for `config` (its schema name and table prefix) as one SQL script, for
/// deployments that manage schemas with their own migration tool and run the manager with
/// `run_migrations: false`. Running it on an empty database leaves exactly what
/// [`SessionManager`] would have created, bookkeeping included, so the manager's start-up check
/// passes. Returns [`Error::InvalidConfig`] for an invalid configuration.
pub fn schema_sql(config: &Config) -> Result<String> {
    Ok(storage::postgres::migrate::script(&config.validate()?))
}

/// Apply the migrations `config`'s schema lacks, on `pool`: what [`SessionManager::connect`]
/// does at start-up unless `run_migrations` is off (for a deployment step run once per
/// release, like `pgsession migrate`). Safe to run from several processes at once.
///
/// # Errors
///
/// [`Error::InvalidConfig`], [`Error::Migration`] when an applied migration differs from this
/// build's, [`Error::Database`].
pub async fn migrate(config: &Config, pool: &sqlx::PgPool) -> Result<()> {
    let names = config.validate()?;
    let mut conn = pool.acquire().await.map_err(Error::Database)?;
    storage::postgres::migrate::run(&mut conn, &names, true).await
}

/// Check that `config`'s schema on `pool` is exactly what this build expects, changing
/// nothing (`pgsession migrate --check`).
///
/// # Errors
///
/// [`Error::Migration`] naming the migrations missing or changed, [`Error::InvalidConfig`],
/// [`Error::Database`].
pub async fn check_schema(config: &Config, pool: &sqlx::PgPool) -> Result<()> {
    let names = config.validate()?;
    let mut conn = pool.acquire().await.map_err(Error::Database)?;
    storage::postgres::migrate::run(&mut conn, &names, false).await
}

/// The SQL statements a manager with `config` sends, by name (`select_one`, `insert`,
/// `create_capped`, `update`, `delete`, …), exactly as sent. It lets the comparison benchmark
/// issue the very same statements directly as its raw-SQL floor; names and texts are not a
/// stable API. Returns [`Error::InvalidConfig`] for an invalid configuration.
#[doc(hidden)]
pub fn statements(config: &Config) -> Result<Vec<(&'static str, String)>> {
    Ok(storage::postgres::sql::statements(&config.validate()?))
}
