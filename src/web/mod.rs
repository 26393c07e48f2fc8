//! pgsession on the web: the axum layer and extractor (`axum`, cargo feature `axum`), the
//! tower-sessions store (`tower_sessions`, cargo feature `tower-sessions`) and the
//! actix-session store (`actix_session`, cargo feature `actix-session`).

#[cfg(feature = "actix-session")]
pub mod actix_session;
#[cfg(feature = "axum")]
pub mod axum;
#[cfg(any(feature = "axum", feature = "actix-session"))]
mod cookie;
#[cfg(feature = "tower-sessions")]
pub mod tower_sessions;
