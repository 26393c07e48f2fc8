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

/// The options a session created during a web request is created with: the client's address
/// and `User-Agent` (a header that is not visible ASCII is left out; a long one is cut to
/// [`MAX_USER_AGENT_LEN`](crate::MAX_USER_AGENT_LEN) before it is copied).
#[cfg(any(feature = "axum", feature = "actix-session"))]
pub(crate) fn client_options(
    ip: Option<std::net::IpAddr>,
    user_agent: Option<&str>,
) -> crate::SessionOptions {
    let mut options = crate::SessionOptions::new();
    if let Some(ua) = user_agent {
        let end = ua.len().min(crate::MAX_USER_AGENT_LEN);
        options = options.user_agent(&ua[..end]); // ASCII: any index is a boundary
    }
    if let Some(ip) = ip {
        options = options.ip(ip);
    }
    options
}
