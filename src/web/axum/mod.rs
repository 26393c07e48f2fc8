//! A tower layer that keeps each visitor's session behind a cookie, and the [`WebSession`]
//! extractor handlers use (cargo feature `axum`).
//!
//! The cookie holds only the [`SessionToken`](crate::SessionToken); the session is read lazily, on a handler's
//! first use, from the manager's coherent cache. Changes are saved after the handler as a
//! delta (the keys the handler set or removed), so two concurrent requests changing different
//! keys both keep their change, and only when something changed and the response is not a
//! server error. An anonymous session is created only when a handler writes to it.
//!
//! ```no_run
//! use axum::{Router, routing::get};
//! use pgsession::axum::{SessionLayer, WebSession};
//!
//! async fn count(session: WebSession) -> pgsession::Result<String> {
//!     // Safe against concurrent requests of one visitor, on any node.
//!     let n = session.modify("n", |n: Option<u64>| n.unwrap_or(0) + 1).await?;
//!     Ok(format!("visit {n}"))
//! }
//!
//! # async fn run(database_url: &str, key: &[u8]) -> Result<(), Box<dyn std::error::Error>> {
//! use pgsession::{Config, SessionManager, SigningKey};
//!
//! // Signed tokens: a forged cookie costs no cache or database lookup.
//! let config = Config {
//!     signing_keys: vec![SigningKey::from_bytes(key)?], // 32+ secret bytes, every node alike
//!     ..Config::default()
//! };
//! let manager = SessionManager::connect(config, database_url).await?;
//! let app = Router::new()
//!     .route("/", get(count))
//!     // `__Host-`: on HTTPS, no subdomain can set or shadow the cookie.
//!     .layer(SessionLayer::new(manager).with_cookie_name("__Host-id"));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app).await?;
//! # Ok(())
//! # }
//! ```

mod extractor;
mod layer;

pub use self::extractor::WebSession;
pub use self::layer::{SameSite, SessionLayer, SessionService, forwarded_for};
