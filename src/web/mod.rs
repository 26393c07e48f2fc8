//! pgsession on the web: the axum layer and extractor (`axum`, cargo feature `axum`) and the
//! tower-sessions store (`tower_sessions`, cargo feature `tower-sessions`).

#[cfg(feature = "axum")]
pub mod axum;
#[cfg(feature = "tower-sessions")]
pub mod tower_sessions;
