//! The tower layer: the cookie's settings, and the service that gives each request its
//! [`WebSession`] and saves it after the handler.

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use chrono::Utc;
use http::header::{COOKIE, USER_AGENT};
use http::{Extensions, HeaderMap, HeaderValue, Request, Response};
use tower_layer::Layer;
use tower_service::Service;

use super::WebSession;
use crate::web::cookie::{self, Candidate};
use crate::{Session, SessionManager, SessionOptions, SessionToken};

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
pub(super) struct CookieConfig {
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

/// Who sent a request, for a session it creates.
#[derive(Debug, Default)]
pub(super) struct ClientInfo {
    user_agent: Option<HeaderValue>,
    ip: Option<IpAddr>,
}

impl ClientInfo {
    /// The options a session created for this client is created with.
    pub(super) fn options(&self) -> SessionOptions {
        let user_agent = self.user_agent.as_ref().and_then(|v| v.to_str().ok());
        crate::web::client_options(self.ip, user_agent)
    }
}

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
    /// `User-Agent`, and the address if the layer was told how to find it. Kept as the
    /// header's bytes (a reference count), turned into options only if a session is created.
    fn client(&self, headers: &HeaderMap, extensions: &Extensions) -> ClientInfo {
        ClientInfo {
            user_agent: headers.get(USER_AGENT).cloned(),
            ip: self
                .client_ip
                .as_ref()
                .and_then(|f| (f.0)(headers, extensions)),
        }
    }

    /// The `Set-Cookie` value carrying `token` and the session's version, or removing the
    /// cookie when `None`.
    pub(super) fn header(&self, token: Option<(&SessionToken, &Session)>) -> HeaderValue {
        let mut cookie = format!("{}=", self.name);
        match token {
            Some((token, session)) => {
                cookie.push_str(&cookie::value(token, session.version()));
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

    /// The cookies of our name that hold a token, in order; malformed ones count as none.
    fn candidates(&self, headers: &HeaderMap) -> Vec<Candidate> {
        let values = headers
            .get_all(COOKIE)
            .into_iter()
            .map(HeaderValue::as_bytes);
        cookie::candidates(values, &self.name)
    }
}

/// A [`tower_layer::Layer`] giving every request a [`WebSession`] behind a cookie.
///
/// Cookie defaults: name `id`, `Secure`, `HttpOnly`, `SameSite=Lax`, `Path=/`, no `Domain`,
/// persistent (`Max-Age` follows the session's absolute expiry).
///
/// On an HTTPS site name it `__Host-id` ([`with_cookie_name`](Self::with_cookie_name)): the
/// browser then keeps it only if it is `Secure`, for `Path=/` and without `Domain`, so that
/// no sibling subdomain or plain-HTTP page can set or shadow it (a cookie tossed by
/// `evil.example.com` for `.example.com` would otherwise travel beside ours). Plain-HTTP
/// development hosts other than `localhost` cannot use the prefix.
///
/// The cookie's value is the token and, after a `.`, the version of the session this
/// client last saw written; any node serving the client's next request serves at least
/// that version ([`SessionManager::get_session_with_version`]), reading through when its
/// cache has not yet heard of the write. Every response whose handler wrote the session
/// sends the cookie again with the new version.
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

    /// The cookie's name (default `id`; `__Host-id` on HTTPS sites, see [`SessionLayer`]).
    ///
    /// # Panics
    ///
    /// When `name` is empty or not a cookie name token (RFC 6265: ASCII letters, digits and
    /// ``!#$%&'*+-.^_`|~``). When the layer is applied, if a `__Host-` name goes with
    /// `Secure` off, a `Path` other than `/` or a `Domain`, or a `__Secure-` name with `Secure`
    /// off: browsers drop such cookies silently.
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
        let c = &self.cookie;
        cookie::check_prefix(&c.name, c.secure, &c.path, c.domain.as_deref());
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
        let session = WebSession::new(
            self.manager.clone(),
            self.cookie.candidates(request.headers()),
            self.cookie.client(request.headers(), request.extensions()),
        );
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
