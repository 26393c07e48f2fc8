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
//!     let n: u64 = session.get_as("n").await?.unwrap_or(0) + 1;
//!     session.set("n", n).await?;
//!     Ok(format!("visit {n}"))
//! }
//!
//! # async fn run(manager: pgsession::SessionManager) -> std::io::Result<()> {
//! let app = Router::new()
//!     .route("/", get(count))
//!     .layer(SessionLayer::new(manager));
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
//! axum::serve(listener, app).await
//! # }
//! ```

mod extractor;
mod layer;

pub use self::extractor::WebSession;
pub use self::layer::{SameSite, SessionLayer, SessionService, forwarded_for};
