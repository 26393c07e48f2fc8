//! The cookie guard: the `Cookie` header made sound before actix-web parses it.

use std::cell::RefCell;
use std::future::{Future, Ready, ready};
use std::pin::Pin;
use std::rc::Rc;

use actix_session::config::CookieContentSecurity;
use actix_web::cookie::{Cookie, CookieJar, Key};
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform, forward_ready};
use actix_web::http::header::{COOKIE, HeaderValue, USER_AGENT};

use crate::web::cookie;

use super::scope::*;
use super::store::*;

/// Middleware that makes actix-session find its cookie where actix-web alone would lose it,
/// and lets [`PgSessionStore`] save exact deltas. Made by [`PgSessionStore::cookie_guard`];
/// wrap it outside `SessionMiddleware` (after it: `.wrap(session).wrap(guard)`), and outside
/// anything else that reads cookies, since actix-web parses a request's cookies once.
///
/// Before actix-session reads the request, the guard rewrites its `Cookie` header:
/// - **Cookies that are not UTF-8 are dropped.** actix-web's `HttpRequest::cookies()` fails
///   for the whole header when any byte is not UTF-8 (a latin-1 `theme=café` of another
///   application), and actix-session then sees no cookie: the user is logged out. Those
///   cookies are unreadable to actix-web anyway; UTF-8 cookies, ASCII or not, are kept as sent.
/// - **Of several cookies of the session's name, the first that opens a session is put
///   first** (and the others dropped; none is kept when none opens one). actix-session takes
///   the first cookie of its name and nothing else, so a stale cookie left on another path or
///   domain would hide the live one. At most 4 are tried, each verified with the cookie key
///   and looked up (from the cache); the one found is handed to the store, so the request
///   still reads its session once.
///
/// It also records the client's address and `User-Agent` for sessions created in the request
/// (shown by [`SessionManager::list_user_sessions`](crate::SessionManager::list_user_sessions)), and hands the store each request's
/// loaded state, so that a save writes exactly the keys the request changed. A database error
/// while trying cookies leaves them in place for actix-session, which then reports it.
#[derive(Clone)]
pub struct CookieGuard {
    pub(super) store: PgSessionStore,
    pub(super) key: Key,
    pub(super) name: String,
    pub(super) security: CookieContentSecurity,
}

impl std::fmt::Debug for CookieGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CookieGuard")
            .field("name", &self.name)
            .field("security", &self.security)
            .finish_non_exhaustive()
    }
}

impl CookieGuard {
    /// The session cookie's name, as given to `SessionMiddlewareBuilder::cookie_name`
    /// (default `id`).
    pub fn cookie_name(mut self, name: impl Into<String>) -> CookieGuard {
        self.name = name.into();
        self
    }

    /// How the cookie is protected, as given to
    /// `SessionMiddlewareBuilder::cookie_content_security` (default
    /// [`CookieContentSecurity::Private`](actix_session::config::CookieContentSecurity::Private)).
    pub fn cookie_content_security(mut self, security: CookieContentSecurity) -> CookieGuard {
        self.security = security;
        self
    }

    /// The session key in a cookie `pair` of our name, if the cookie key opens it.
    fn open(&self, pair: &str) -> Option<String> {
        let cookie = Cookie::parse_encoded(pair).ok()?;
        if cookie.name() != self.name {
            return None;
        }
        let mut jar = CookieJar::new();
        jar.add_original(cookie.into_owned());
        let opened = match self.security {
            CookieContentSecurity::Signed => jar.signed(&self.key).get(&self.name),
            CookieContentSecurity::Private => jar.private(&self.key).get(&self.name),
        }?;
        Some(opened.value().to_owned())
    }

    fn is_ours(&self, pair: &str) -> bool {
        Cookie::parse_encoded(pair).is_ok_and(|c| c.name() == self.name)
    }

    /// Record the client, repair the `Cookie` header, and stash the session found.
    async fn prepare(&self, request: &mut ServiceRequest) {
        let peer = request.peer_addr().map(|a| a.ip());
        let agent = request.headers().get(USER_AGENT).cloned();
        in_scope(|s| (s.peer, s.agent) = (peer, agent));

        // The pairs as actix-web would split them, less those that are not UTF-8.
        let mut pairs = Vec::new();
        let mut dropped = false;
        for header in request.headers().get_all(COOKIE) {
            for raw in header.as_bytes().split(|&b| b == b';') {
                match std::str::from_utf8(raw) {
                    Ok(text) if text.trim().is_empty() => {}
                    Ok(text) => pairs.push(text.trim().to_owned()),
                    Err(_) => dropped = true,
                }
            }
        }
        let ours: Vec<usize> = (0..pairs.len())
            .filter(|&i| self.is_ours(&pairs[i]))
            .collect();
        if ours.is_empty() && !dropped {
            return;
        }

        let mut found = None;
        let mut failed = false;
        for &i in ours.iter().take(cookie::MAX_CANDIDATES) {
            let Some(key) = self.open(&pairs[i]) else {
                continue;
            };
            let Some(candidate) = cookie::parse(key.as_bytes()) else {
                continue;
            };
            match self
                .store
                .manager
                .get_session_with_version(&candidate.token, candidate.version)
                .await
            {
                Ok(Some(session)) => {
                    found = Some((i, key, session));
                    break;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "pgsession: reading a session cookie's session failed");
                    failed = true;
                    break;
                }
            }
        }

        let others = (0..pairs.len()).filter(|i| !ours.contains(i));
        let kept: Vec<usize> = match &found {
            Some((winner, ..)) => std::iter::once(*winner).chain(others).collect(),
            None if failed => (0..pairs.len()).collect(),
            None => others.collect(),
        };
        if dropped || !kept.iter().copied().eq(0..pairs.len()) {
            let text = kept
                .iter()
                .map(|&i| pairs[i].as_str())
                .collect::<Vec<_>>()
                .join("; ");
            let headers = request.headers_mut();
            headers.remove(COOKIE);
            if !text.is_empty() {
                // Bytes of a header that arrived, minus some: a valid header value.
                if let Ok(value) = HeaderValue::from_bytes(text.as_bytes()) {
                    headers.insert(COOKIE, value);
                }
            }
        }
        if let Some((_, key, session)) = found {
            in_scope(|s| s.preloaded = Some((key, session)));
        }
    }
}

impl<S, B> Transform<S, ServiceRequest> for CookieGuard
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    S::Future: 'static,
    B: 'static,
{
    type Response = ServiceResponse<B>;
    type Error = actix_web::Error;
    type Transform = CookieGuardService<S>;
    type InitError = ();
    type Future = Ready<Result<CookieGuardService<S>, ()>>;

    fn new_transform(&self, service: S) -> Self::Future {
        ready(Ok(CookieGuardService {
            service: Rc::new(service),
            guard: Rc::new(self.clone()),
        }))
    }
}

/// The service [`CookieGuard`] wraps around the rest of the application.
pub struct CookieGuardService<S> {
    service: Rc<S>,
    guard: Rc<CookieGuard>,
}

impl<S, B> Service<ServiceRequest> for CookieGuardService<S>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error> + 'static,
    S::Future: 'static,
    B: 'static,
{
    type Response = ServiceResponse<B>;
    type Error = actix_web::Error;
    #[allow(clippy::type_complexity)]
    type Future = Pin<Box<dyn Future<Output = Result<ServiceResponse<B>, actix_web::Error>>>>;

    forward_ready!(service);

    fn call(&self, mut request: ServiceRequest) -> Self::Future {
        let service = Rc::clone(&self.service);
        let guard = Rc::clone(&self.guard);
        Box::pin(
            REQUEST.scope(RefCell::new(RequestScope::default()), async move {
                guard.prepare(&mut request).await;
                service.call(request).await
            }),
        )
    }
}
