//! A tower layer that keeps each visitor's session behind a cookie, and the [`WebSession`]
//! extractor handlers use (cargo feature `axum`).
//!
//! The cookie holds only the [`SessionToken`]; the session is read lazily, on a handler's
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

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum_core::extract::FromRequestParts;
use axum_core::response::{IntoResponse, Response as AxumResponse};
use chrono::Utc;
use std::net::IpAddr;

use http::header::{COOKIE, SET_COOKIE, USER_AGENT};
use http::request::Parts;
use http::{Extensions, HeaderMap, HeaderValue, Request, Response, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tokio::sync::Mutex;
use tower_layer::Layer;
use tower_service::Service;

use crate::model::session::decode;
use crate::{
    Error, Result, Session, SessionId, SessionManager, SessionOptions, SessionToken, UserId,
};

/// The cookie's `SameSite` attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SameSite {
    /// Sent only on requests from the site itself.
    Strict,
    /// Also sent on top-level navigations from other sites (links); the default.
    Lax,
    /// Sent on every request, also from other sites (needs `Secure`).
    None,
}

impl SameSite {
    fn as_str(self) -> &'static str {
        match self {
            SameSite::Strict => "Strict",
            SameSite::Lax => "Lax",
            SameSite::None => "None",
        }
    }
}

#[derive(Clone, Debug)]
struct CookieConfig {
    name: String,
    secure: bool,
    http_only: bool,
    same_site: SameSite,
    path: String,
    domain: Option<String>,
    persistent: bool,
    client_ip: Option<ClientIp>,
}

/// How the layer finds a request's client address (see [`SessionLayer::with_client_ip`]).
#[derive(Clone)]
struct ClientIp(Arc<ClientIpFn>);

type ClientIpFn = dyn Fn(&HeaderMap, &Extensions) -> Option<IpAddr> + Send + Sync;

impl fmt::Debug for ClientIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClientIp(..)")
    }
}

/// Longest `User-Agent` header read; longer ones are cut (see
/// [`SessionOptions::user_agent`](crate::SessionOptions::user_agent)).
const USER_AGENT_READ: usize = crate::MAX_USER_AGENT_LEN;

/// The rightmost address of the request's `X-Forwarded-For` header: the one the nearest proxy
/// added. For [`SessionLayer::with_client_ip`] behind exactly one reverse proxy that sets the
/// header; anywhere else a client can write it.
pub fn forwarded_for(headers: &HeaderMap, _: &Extensions) -> Option<IpAddr> {
    headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|ip| ip.trim().parse().ok())
        .next_back()
}

impl CookieConfig {
    /// What a session created during this request records about its client: the
    /// `User-Agent`, and the address if the layer was told how to find it.
    fn client(&self, headers: &HeaderMap, extensions: &Extensions) -> SessionOptions {
        let mut options = SessionOptions::new();
        if let Some(ua) = headers.get(USER_AGENT).and_then(|v| v.to_str().ok()) {
            let end = ua.len().min(USER_AGENT_READ);
            options = options.user_agent(&ua[..end]); // ASCII: any index is a boundary
        }
        if let Some(ip) = self
            .client_ip
            .as_ref()
            .and_then(|f| (f.0)(headers, extensions))
        {
            options = options.ip(ip);
        }
        options
    }

    /// The `Set-Cookie` value carrying `token`, or removing the cookie when `None`.
    fn header(&self, token: Option<(&SessionToken, &Session)>) -> HeaderValue {
        let mut cookie = format!("{}=", self.name);
        match token {
            Some((token, session)) => {
                cookie.push_str(&token.to_string());
                if self.persistent {
                    let expires = session.expires_at();
                    let max_age = (expires - Utc::now()).num_seconds().max(0);
                    cookie.push_str(&format!(
                        "; Max-Age={max_age}; Expires={}",
                        expires.format("%a, %d %b %Y %H:%M:%S GMT")
                    ));
                }
            }
            None => cookie.push_str("; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT"),
        }
        cookie.push_str("; Path=");
        cookie.push_str(&self.path);
        if let Some(domain) = &self.domain {
            cookie.push_str("; Domain=");
            cookie.push_str(domain);
        }
        if self.secure {
            cookie.push_str("; Secure");
        }
        if self.http_only {
            cookie.push_str("; HttpOnly");
        }
        cookie.push_str("; SameSite=");
        cookie.push_str(self.same_site.as_str());
        // Names, paths and domains are checked by the builder and tokens are base64url.
        HeaderValue::from_str(&cookie).expect("cookie attributes are checked when set")
    }

    /// The first cookie of our name that parses as a token; malformed ones count as none.
    fn token(&self, headers: &HeaderMap) -> Option<SessionToken> {
        headers
            .get_all(COOKIE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .filter(|(name, _)| *name == self.name)
            .find_map(|(_, value)| value.trim_matches('"').parse().ok())
    }
}

/// A [`tower_layer::Layer`] giving every request a [`WebSession`] behind a cookie.
///
/// Cookie defaults: name `id`, `Secure`, `HttpOnly`, `SameSite=Lax`, `Path=/`, no `Domain`,
/// persistent (`Max-Age` follows the session's absolute expiry).
#[derive(Clone, Debug)]
pub struct SessionLayer {
    manager: SessionManager,
    cookie: Arc<CookieConfig>,
}

fn check_cookie_text(what: &str, text: &str, allowed: impl Fn(char) -> bool) {
    assert!(
        !text.is_empty() && text.chars().all(allowed),
        "invalid cookie {what}: {text:?}"
    );
}

impl SessionLayer {
    /// A layer keeping sessions of `manager`, with the default cookie.
    pub fn new(manager: SessionManager) -> SessionLayer {
        SessionLayer {
            manager,
            cookie: Arc::new(CookieConfig {
                name: "id".to_owned(),
                secure: true,
                http_only: true,
                same_site: SameSite::Lax,
                path: "/".to_owned(),
                domain: None,
                persistent: true,
                client_ip: None,
            }),
        }
    }

    fn cookie(mut self, change: impl FnOnce(&mut CookieConfig)) -> SessionLayer {
        change(Arc::make_mut(&mut self.cookie));
        self
    }

    /// The cookie's name (default `id`).
    ///
    /// # Panics
    ///
    /// When `name` is empty or not a cookie name token (RFC 6265: ASCII letters, digits and
    /// ``!#$%&'*+-.^_`|~``).
    pub fn with_cookie_name(self, name: impl Into<String>) -> SessionLayer {
        let name = name.into();
        check_cookie_text("name", &name, |c| {
            c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c)
        });
        self.cookie(|c| c.name = name)
    }

    /// Send the cookie only over HTTPS (default true). Browsers accept a `Secure` cookie from
    /// `http://localhost`; turn it off only for plain-HTTP hosts other than that.
    pub fn with_secure(self, secure: bool) -> SessionLayer {
        self.cookie(|c| c.secure = secure)
    }

    /// Hide the cookie from page scripts (default true). Turning it off lets any injected
    /// script read the session token.
    pub fn with_http_only(self, http_only: bool) -> SessionLayer {
        self.cookie(|c| c.http_only = http_only)
    }

    /// The cookie's `SameSite` attribute (default [`SameSite::Lax`]).
    pub fn with_same_site(self, same_site: SameSite) -> SessionLayer {
        self.cookie(|c| c.same_site = same_site)
    }

    /// The cookie's `Path` (default `/`).
    ///
    /// # Panics
    ///
    /// When `path` is empty or holds `;`, control characters or non-ASCII.
    pub fn with_path(self, path: impl Into<String>) -> SessionLayer {
        let path = path.into();
        check_cookie_text("path", &path, |c| c.is_ascii_graphic() && c != ';');
        self.cookie(|c| c.path = path)
    }

    /// The cookie's `Domain` (default none: only the host that set it).
    ///
    /// # Panics
    ///
    /// When `domain` is empty or holds characters other than ASCII letters, digits, `-`
    /// and `.`.
    pub fn with_domain(self, domain: impl Into<String>) -> SessionLayer {
        let domain = domain.into();
        check_cookie_text("domain", &domain, |c| {
            c.is_ascii_alphanumeric() || c == '-' || c == '.'
        });
        self.cookie(|c| c.domain = Some(domain))
    }

    /// Persistent cookie whose `Max-Age` follows the session's absolute expiry (true, the
    /// default), or a browser-session cookie the browser forgets when it closes (false).
    pub fn with_persistent(self, persistent: bool) -> SessionLayer {
        self.cookie(|c| c.persistent = persistent)
    }

    /// How to find a request's client address, recorded with the sessions it creates (the
    /// `User-Agent` is recorded always). Axum keeps the peer address in an extension when
    /// served with `into_make_service_with_connect_info::<SocketAddr>()`; behind one reverse
    /// proxy, [`forwarded_for`] reads the address it forwarded. Default: none recorded.
    ///
    /// ```no_run
    /// use std::net::SocketAddr;
    /// use axum::extract::ConnectInfo;
    /// use pgsession::axum::SessionLayer;
    ///
    /// # fn run(manager: pgsession::SessionManager) {
    /// let layer = SessionLayer::new(manager).with_client_ip(|_, extensions| {
    ///     extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip())
    /// });
    /// # }
    /// ```
    pub fn with_client_ip(
        self,
        client_ip: impl Fn(&HeaderMap, &Extensions) -> Option<IpAddr> + Send + Sync + 'static,
    ) -> SessionLayer {
        self.cookie(|c| c.client_ip = Some(ClientIp(Arc::new(client_ip))))
    }
}

impl<S> Layer<S> for SessionLayer {
    type Service = SessionService<S>;

    fn layer(&self, inner: S) -> SessionService<S> {
        SessionService {
            inner,
            manager: self.manager.clone(),
            cookie: self.cookie.clone(),
        }
    }
}

/// The service [`SessionLayer`] wraps around an inner service.
#[derive(Clone, Debug)]
pub struct SessionService<S> {
    inner: S,
    manager: SessionManager,
    cookie: Arc<CookieConfig>,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for SessionService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = std::result::Result<Response<ResBody>, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqBody>) -> Self::Future {
        let session = WebSession(Arc::new(Shared {
            manager: self.manager.clone(),
            incoming: self.cookie.token(request.headers()),
            client: self.cookie.client(request.headers(), request.extensions()),
            state: Mutex::new(State::default()),
        }));
        request.extensions_mut().insert(session.clone());
        let cookie = self.cookie.clone();
        // The clone that was made ready is the one to call (tower's documented pattern).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let mut response = inner.call(request).await?;
            session.finish(&cookie, &mut response).await;
            Ok(response)
        })
    }
}

/// The request's session, for handlers (an axum extractor; needs [`SessionLayer`]).
///
/// Nothing is read until a method needs the session, and a missing, malformed, forged or
/// expired cookie is simply no session. Reads see the handler's own writes. Clones share one
/// state.
///
/// Saved after the handler: attribute changes as a delta, only when there are some and the
/// response is not a 5xx (then they are dropped, and nothing is half written). What the
/// methods that go to the database at once (`log_in`, `rotate`, `log_out`,
/// `log_out_everywhere`) have done is committed whatever the response, so their cookie is
/// sent whatever the status.
#[derive(Clone)]
pub struct WebSession(Arc<Shared>);

struct Shared {
    manager: SessionManager,
    incoming: Option<SessionToken>,
    /// Recorded with a session created during the request.
    client: SessionOptions,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    loaded: bool,
    session: Option<Session>,
    /// Attributes written while there is no session; they become an anonymous session after
    /// the handler, or the logged-in one on `log_in`.
    pending: Map<String, Value>,
    cookie: CookieChange,
}

#[derive(Default)]
enum CookieChange {
    #[default]
    None,
    Set(SessionToken),
    Remove,
}

impl fmt::Debug for WebSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebSession")
            .field("cookie_id", &self.0.incoming.as_ref().map(SessionToken::id))
            .finish_non_exhaustive()
    }
}

impl WebSession {
    async fn state(&self) -> Result<tokio::sync::MutexGuard<'_, State>> {
        let mut state = self.0.state.lock().await;
        if !state.loaded {
            if let Some(token) = &self.0.incoming {
                state.session = self.0.manager.get_session(token).await?;
            }
            state.loaded = true;
        }
        Ok(state)
    }

    /// Attribute `key`, or `None`.
    ///
    /// # Errors
    ///
    /// [`Error::Database`] when the session had to be read and the database failed.
    pub async fn get(&self, key: &str) -> Result<Option<Value>> {
        let state = self.state().await?;
        Ok(match &state.session {
            Some(session) => session.get(key).cloned(),
            None => state.pending.get(key).cloned(),
        })
    }

    /// Attribute `key` deserialised as `T`, or `None`.
    ///
    /// # Errors
    ///
    /// [`Error::AttributeType`] when the value is not a `T`; those of [`get`](Self::get).
    pub async fn get_as<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        decode(key, self.get(key).await?.as_ref())
    }

    /// Set attribute `key`; saved after the handler. Creates an anonymous session then if
    /// there is none.
    ///
    /// # Errors
    ///
    /// [`Error::AttributeTooLarge`] or [`Error::InvalidAttribute`] at once (nothing changes);
    /// those of [`get`](Self::get).
    pub async fn set(&self, key: impl Into<String>, value: impl Serialize) -> Result<()> {
        let key = key.into();
        let mut state = self.state().await?;
        match &mut state.session {
            Some(session) => session.set(key, value),
            None => {
                let limit = self.0.manager.config().max_attribute_size;
                let value = crate::model::json::encode(&key, value, limit)?;
                state.pending.insert(key, value);
                Ok(())
            }
        }
    }

    /// Remove attribute `key`, returning its value if present; saved after the handler.
    ///
    /// # Errors
    ///
    /// Those of [`get`](Self::get).
    pub async fn remove(&self, key: &str) -> Result<Option<Value>> {
        let mut state = self.state().await?;
        Ok(match &mut state.session {
            Some(session) => session.remove(key),
            None => state.pending.remove(key),
        })
    }

    /// The session's public id, or `None` when there is no session (yet).
    ///
    /// # Errors
    ///
    /// Those of [`get`](Self::get).
    pub async fn id(&self) -> Result<Option<SessionId>> {
        Ok(self.state().await?.session.as_ref().map(Session::id))
    }

    /// The logged-in user, or `None` before login.
    ///
    /// # Errors
    ///
    /// Those of [`get`](Self::get).
    pub async fn user_id(&self) -> Result<Option<UserId>> {
        let state = self.state().await?;
        Ok(state.session.as_ref().and_then(|s| s.user_id().cloned()))
    }

    /// A snapshot of the session with the handler's changes so far (timestamps, expiry,
    /// every attribute), or `None`.
    ///
    /// # Errors
    ///
    /// Those of [`get`](Self::get).
    pub async fn session(&self) -> Result<Option<Session>> {
        Ok(self.state().await?.session.clone())
    }

    /// Log the visitor in as `user_id`, at once: the session moves to a new token (sent in a
    /// new cookie; the old one stops working, against session fixation), is bound to the user
    /// under the per-user cap, and keeps the visitor's data. Without a session one is created
    /// for the user, with what the handler set.
    ///
    /// # Errors
    ///
    /// Those of [`SessionManager::log_in`] and [`SessionManager::create_session`].
    pub async fn log_in(&self, user_id: impl Into<UserId>) -> Result<()> {
        let user = user_id.into();
        let mut state = self.state().await?;
        let token = match &mut state.session {
            Some(session) => self.0.manager.log_in(session, user).await?,
            None => {
                let attributes = std::mem::take(&mut state.pending);
                let options = self.0.client.clone().user(user);
                let (session, token) = self
                    .0
                    .manager
                    .create_session_with(options, attributes)
                    .await?;
                state.session = Some(session);
                token
            }
        };
        state.cookie = CookieChange::Set(token);
        Ok(())
    }

    /// Move the session to a new token at once (sent in a new cookie), keeping everything
    /// else. Without a session this does nothing.
    ///
    /// # Errors
    ///
    /// Those of [`SessionManager::rotate_session`].
    pub async fn rotate(&self) -> Result<()> {
        let mut state = self.state().await?;
        if let Some(session) = &mut state.session {
            let token = self.0.manager.rotate_session(session).await?;
            state.cookie = CookieChange::Set(token);
        }
        Ok(())
    }

    /// Delete the session at once (every node stops serving it) and remove the cookie. True
    /// when there was a session.
    ///
    /// # Errors
    ///
    /// Those of [`SessionManager::delete_session`].
    pub async fn log_out(&self) -> Result<bool> {
        let mut state = self.state().await?;
        let deleted = match state.session.take() {
            Some(session) => self.0.manager.delete_session(session.id()).await?,
            None => false,
        };
        self.forget(&mut state);
        Ok(deleted)
    }

    /// Delete every session of the logged-in user, on every node, and remove this cookie;
    /// before login, the same as [`log_out`](Self::log_out). Returns how many sessions were
    /// deleted.
    ///
    /// # Errors
    ///
    /// Those of [`SessionManager::delete_all_user_sessions`].
    pub async fn log_out_everywhere(&self) -> Result<u64> {
        let mut state = self.state().await?;
        let deleted = match state.session.as_ref() {
            Some(session) => match session.user_id() {
                Some(user) => {
                    let user = user.clone();
                    self.0.manager.delete_all_user_sessions(user).await?
                }
                None => u64::from(self.0.manager.delete_session(session.id()).await?),
            },
            None => 0,
        };
        state.session = None;
        self.forget(&mut state);
        Ok(deleted)
    }

    fn forget(&self, state: &mut State) {
        state.pending.clear();
        // Remove only a cookie the browser has; never send a removal on a request that came
        // without one.
        let had_cookie = self.0.incoming.is_some() || matches!(state.cookie, CookieChange::Set(_));
        state.cookie = if had_cookie {
            CookieChange::Remove
        } else {
            CookieChange::None
        };
    }

    /// After the handler: save the changes unless the response is a server error, then set
    /// or remove the cookie. A failed save turns the response into a 500.
    async fn finish<B: Default>(&self, cookie: &CookieConfig, response: &mut Response<B>) {
        let mut state = self.0.state.lock().await;
        if !response.status().is_server_error()
            && let Err(error) = self.save(&mut state).await
        {
            tracing::error!(%error, "pgsession: saving the session failed");
            *response = Response::new(B::default());
            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        }
        let header = match (&state.cookie, &state.session) {
            (CookieChange::Set(token), Some(session)) => cookie.header(Some((token, session))),
            (CookieChange::Remove, _) => cookie.header(None),
            _ => return,
        };
        response.headers_mut().append(SET_COOKIE, header);
    }

    async fn save(&self, state: &mut State) -> Result<()> {
        let manager = &self.0.manager;
        match &mut state.session {
            Some(session) if session.is_modified() => match manager.update_session(session).await {
                // Deleted (logout elsewhere) or rotated by a concurrent request: the change
                // goes with the session, and the cookie stays (a removal could overwrite the
                // new cookie of the rotating request).
                Err(Error::NotFound) => Ok(()),
                other => other,
            },
            Some(_) => Ok(()),
            None if !state.pending.is_empty() => {
                let attributes = std::mem::take(&mut state.pending);
                let (session, token) = manager
                    .create_session_with(self.0.client.clone(), attributes)
                    .await?;
                state.session = Some(session);
                state.cookie = CookieChange::Set(token);
                Ok(())
            }
            None => Ok(()),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for WebSession {
    type Rejection = (StatusCode, &'static str);

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> std::result::Result<WebSession, Self::Rejection> {
        parts.extensions.get::<WebSession>().cloned().ok_or((
            StatusCode::INTERNAL_SERVER_ERROR,
            "WebSession needs pgsession::axum::SessionLayer around the route",
        ))
    }
}

/// Handlers may return pgsession's errors: bad input becomes a 4xx, the rest a 500 (503 while
/// shutting down), logged with its cause; the body never holds more than the status text.
impl IntoResponse for Error {
    fn into_response(self) -> AxumResponse {
        let status = match &self {
            Error::AttributeTooLarge { .. } | Error::SessionTooLarge { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Error::InvalidAttribute { .. }
            | Error::InvalidExpiry { .. }
            | Error::InvalidToken(_)
            | Error::InvalidSessionId(_)
            | Error::InvalidUserId(_)
            | Error::InvalidGroupId(_) => StatusCode::BAD_REQUEST,
            Error::NotFound => StatusCode::NOT_FOUND,
            Error::MaxSessionsReached | Error::Conflict { .. } | Error::AlreadyExists => {
                StatusCode::CONFLICT
            }
            Error::ShutDown => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::error!(error = %self, "pgsession: request failed");
        } else {
            tracing::debug!(error = %self, "pgsession: request refused");
        }
        let body = status.canonical_reason().unwrap_or("error");
        (status, body).into_response()
    }
}
