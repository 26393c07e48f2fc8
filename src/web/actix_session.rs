//! A store for actix-session 0.11 (cargo feature `actix-session`), and so for actix-identity
//! 0.9, served from pgsession's coherent cache.
//!
//! [`PgSessionStore`] keeps each actix-session in a pgsession session:
//!
//! - **Loads from the cache.** A hit does no I/O; a logout or a change on any instance is seen
//!   by every other within the notification delay.
//! - **Read-your-writes across instances.** The session key actix-session keeps in its cookie
//!   is `<token>.<version>`: the token, and the version of the session this client last wrote.
//!   Whichever instance the next request reaches serves at least that version (reading the
//!   database when its cached copy is older; see
//!   [`SessionManager::get_session_with_version`]).
//! - **Delta saves.** A request writes only the keys it set or removed, so two concurrent
//!   requests changing different keys both keep their change (exactly so behind
//!   [`CookieGuard`], see below).
//! - **Real JSON.** actix-session hands stores JSON texts; each is stored as the JSON value it
//!   is, so other pgsession users and the admin CLI see real attributes. The rare text that
//!   would not come back byte for byte from its value (see [`TEXT_MEMBER`]) is stored as a
//!   string inside a one-member object instead: a load gives back exactly what was saved.
//! - **Users.** The user id actix-identity keeps in the session
//!   ([`ACTIX_IDENTITY_USER_KEY`]; [`PgSessionStore::with_user_key`] for another key) binds
//!   the session to that user, so [`SessionManager::list_user_sessions`],
//!   [`SessionManager::delete_all_user_sessions`] ("log out everywhere") and the per-user cap
//!   work for actix-identity users.
//! - **Forged cookies cost nothing.** With [`Config::signing_keys`] set, a cookie whose token
//!   does not verify is refused before any lookup (counted in
//!   [`Stats::forged_tokens`](crate::Stats::forged_tokens)), on top of actix-session's own
//!   signing or encryption of the cookie, which is a separate layer with its own
//!   [`Key`]: keep actix-session's default [`CookieContentSecurity::Private`] (or `Signed`).
//!
//! Every instance must be given **the same cookie [`Key`]** (64 bytes from configuration, not
//! [`Key::generate`]) and the same [`Config::signing_keys`]: a cookie set by one instance must
//! open on all of them.
//!
//! # The cookie guard
//!
//! actix-session reads its cookie through actix-web's `HttpRequest::cookies()`, which gives
//! up on the whole `Cookie` header when any byte of it is not UTF-8 (a latin-1 cookie of
//! another application on the same domain then logs the user out), and takes only the first
//! cookie of its name (a stale one left on another path or domain hides the live one).
//! [`CookieGuard`], wrapped outside `SessionMiddleware`, repairs both before actix-session
//! looks, and also hands each request's loaded state to the store, which makes its saves
//! exact deltas. Without it the store still works, with those two limits and a save that
//! diffs against the stored state (a key another request changed meanwhile may be set back).
//!
//! # Example
//!
//! ```no_run
//! use actix_identity::{Identity, IdentityMiddleware};
//! use actix_session::{Session, SessionMiddleware};
//! use actix_web::cookie::Key;
//! use actix_web::error::ErrorInternalServerError;
//! use actix_web::{App, HttpMessage, HttpRequest, HttpServer, web};
//! use pgsession::actix_session::PgSessionStore;
//! use pgsession::{Config, SessionManager, SigningKey};
//!
//! async fn log_in(request: HttpRequest, name: web::Path<String>) -> actix_web::Result<String> {
//!     // actix-session then saves a new session bound to this user in pgsession.
//!     Identity::login(&request.extensions(), name.into_inner())?;
//!     Ok("welcome".to_owned())
//! }
//!
//! async fn count(session: Session) -> actix_web::Result<String> {
//!     let n = session.get::<u64>("n")?.unwrap_or(0) + 1;
//!     session.insert("n", n)?; // saved as a delta: only "n" is written
//!     Ok(format!("visit {n}"))
//! }
//!
//! async fn log_out_everywhere(
//!     user: Identity,
//!     manager: web::Data<SessionManager>,
//! ) -> actix_web::Result<String> {
//!     let ended = manager
//!         .delete_all_user_sessions(user.id()?)
//!         .await
//!         .map_err(ErrorInternalServerError)?;
//!     Ok(format!("{ended} sessions ended"))
//! }
//!
//! #[actix_web::main]
//! async fn main() -> std::io::Result<()> {
//! #   let (pgsession_secret, cookie_secret) = ([1u8; 32], [2u8; 64]);
//!     // Both secrets come from configuration: the same on every instance.
//!     let signing_key = SigningKey::from_bytes(&pgsession_secret).map_err(std::io::Error::other)?;
//!     let config = Config {
//!         signing_keys: vec![signing_key],
//!         ..Config::default()
//!     };
//!     let manager = SessionManager::connect(config, "postgres://localhost/app")
//!         .await
//!         .map_err(std::io::Error::other)?;
//!     let store = PgSessionStore::new(manager.clone());
//!     let key = Key::from(&cookie_secret);
//!     HttpServer::new(move || {
//!         App::new()
//!             .app_data(web::Data::new(manager.clone()))
//!             .route("/login/{name}", web::post().to(log_in))
//!             .route("/count", web::post().to(count))
//!             .route("/logout-everywhere", web::post().to(log_out_everywhere))
//!             // The last `wrap` runs first: the guard, then the session, then the identity.
//!             .wrap(IdentityMiddleware::default())
//!             .wrap(SessionMiddleware::builder(store.clone(), key.clone()).build())
//!             .wrap(store.cookie_guard(key.clone()))
//!     })
//!     .bind(("127.0.0.1", 8080))?
//!     .run()
//!     .await
//! }
//! ```
//!
//! # Expiry
//!
//! A session ends at the soonest of: actix-session's TTL (default 1 day) after its last
//! change, or with `TtlExtensionPolicy::OnEveryRequest` after its last request (between 15/16
//! of the TTL and the TTL: see [`SessionStore::update_ttl`]); pgsession's
//! [`Config::session_ttl`] (default 30 days) after its creation; and pgsession's
//! [`Config::idle_timeout`] (default 48 hours) after its last request.
//!
//! # Good to know
//!
//! - actix-identity's `Identity::login` renews the session: actix-session deletes the
//!   visitor's session and saves its state, user id included, as a new one (two round trips).
//!   A user id set without a renewal is a [`SessionManager::log_in`] (one round trip).
//! - actix-session 0.11's `Session::update` and `Session::update_or` change an existing key
//!   without marking the session changed, so with any store such a change alone is never
//!   saved: use `get` then `insert`.
//!
//! [`Config::signing_keys`]: crate::Config::signing_keys
//! [`Config::session_ttl`]: crate::Config::session_ttl
//! [`Config::idle_timeout`]: crate::Config::idle_timeout
//! [`Key`]: actix_web::cookie::Key
//! [`Key::generate`]: actix_web::cookie::Key::generate

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::{Future, Ready, ready};
use std::net::IpAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;

use actix_session::config::CookieContentSecurity;
use actix_session::storage::{LoadError, SaveError, SessionKey, SessionStore, UpdateError};
use actix_web::cookie::time::Duration as Ttl;
use actix_web::cookie::{Cookie, CookieJar, Key};
use actix_web::dev::{Service, ServiceRequest, ServiceResponse, Transform, forward_ready};
use actix_web::http::header::{COOKIE, HeaderValue, USER_AGENT};
use chrono::{DateTime, TimeDelta, Utc};
use serde::{Serialize, Serializer};
use serde_json::Value;

use crate::web::cookie;
use crate::{Error, Session, SessionManager, SessionOptions, SessionToken, UserId};

/// The session key under which actix-identity 0.9 keeps the logged-in user's id by default
/// (its value is the id as a JSON string); the default of [`PgSessionStore::with_user_key`].
pub const ACTIX_IDENTITY_USER_KEY: &str = "actix_identity.user_id";

/// How a session value is stored when its text would not come back byte for byte from the
/// JSON value it denotes (not JSON at all, spaces, object keys out of order, `1.0e3`,
/// `\u0000`, ...): as the object `{"actix-session.text": "<the text>"}`. So is a value that
/// is itself exactly such an object, so every stored value reads back as the text saved.
pub const TEXT_MEMBER: &str = "actix-session.text";

/// Cookies of the session's name the guard tries per request; more are ignored (a browser
/// sends one per matching path and domain, so a handful at most).
const MAX_TRIED: usize = 4;

/// An actix-session [`SessionStore`] in pgsession's tables, served from its coherent cache.
///
/// Cloning is cheap (a [`SessionManager`] is a shared handle). See the [module
/// documentation](self) for an example.
#[derive(Clone, Debug)]
pub struct PgSessionStore {
    manager: SessionManager,
    /// The session key naming the user; `None` binds no user.
    user_key: Option<Arc<str>>,
}

impl PgSessionStore {
    /// A store over `manager`, binding sessions to the user actix-identity logs in (the key
    /// [`ACTIX_IDENTITY_USER_KEY`]).
    pub fn new(manager: SessionManager) -> PgSessionStore {
        PgSessionStore {
            manager,
            user_key: Some(ACTIX_IDENTITY_USER_KEY.into()),
        }
    }

    /// Bind sessions to the user whose id the session holds under `key` (default
    /// [`ACTIX_IDENTITY_USER_KEY`]; set it to what `IdentityMiddleware::builder().id_key(..)`
    /// was given). The value may be a JSON string, number or boolean; its text is the
    /// [`UserId`]. An empty `key` binds no user.
    ///
    /// - A new session holding the key is created for that user (per-user cap included).
    /// - A request that sets the key to another user logs the session in
    ///   ([`SessionManager::log_in`]: a new token, so a new cookie).
    /// - A request that removes the key (actix-identity's `LogoutBehavior::DeleteIdentityKeys`)
    ///   unbinds the session under a new token; actix-identity's default logout purges the
    ///   session instead, which deletes it.
    pub fn with_user_key(mut self, key: impl Into<String>) -> PgSessionStore {
        let key = key.into();
        self.user_key = (!key.is_empty()).then(|| key.into());
        self
    }

    /// The manager this store reads and writes through.
    pub fn manager(&self) -> &SessionManager {
        &self.manager
    }

    /// The [`CookieGuard`] for this store, to wrap outside the `SessionMiddleware` built with
    /// the same cookie `key`. It assumes actix-session's default cookie name (`id`) and
    /// content security (`Private`); change them on the guard as on the middleware.
    pub fn cookie_guard(&self, key: Key) -> CookieGuard {
        CookieGuard {
            store: self.clone(),
            key,
            name: "id".to_owned(),
            security: CookieContentSecurity::Private,
        }
    }

    /// The user `state` names, if any.
    fn user_in(&self, state: &HashMap<String, String>) -> Option<UserId> {
        let text = state.get(&**self.user_key.as_ref()?)?;
        match serde_json::from_str(text).ok()? {
            Value::String(id) => Some(UserId::from(id)),
            Value::Number(n) => Some(UserId::from(n.to_string())),
            Value::Bool(b) => Some(UserId::from(b.to_string())),
            _ => None,
        }
    }

    fn is_user_key(&self, key: &str) -> bool {
        self.user_key.as_deref() == Some(key)
    }

    fn now(&self) -> DateTime<Utc> {
        self.manager.config().clock.now()
    }

    /// When a session created at `created` and written `now` with actix's `ttl` expires: the
    /// sooner of `now + ttl` and pgsession's absolute lifetime.
    fn expiry(&self, now: DateTime<Utc>, created: DateTime<Utc>, ttl: &Ttl) -> DateTime<Utc> {
        let lifetime =
            TimeDelta::from_std(self.manager.config().session_ttl).unwrap_or(TimeDelta::MAX);
        let absolute = created
            .checked_add_signed(lifetime)
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        now.checked_add_signed(delta(ttl))
            .unwrap_or(DateTime::<Utc>::MAX_UTC)
            .min(absolute)
    }

    /// A new session holding `state`, bound to the user it names.
    async fn create(
        &self,
        state: &HashMap<String, String>,
        ttl: &Ttl,
    ) -> Result<SessionKey, Error> {
        let mut options = in_scope(|s| s.client_options()).unwrap_or_default();
        options.user = self.user_in(state);
        options.validate()?;
        let attributes = state
            .iter()
            .map(|(key, text)| Ok((key.as_str(), attribute(key, text)?)))
            .collect::<Result<Vec<_>, Error>>()?;
        let now = self.now();
        let expires_at = self.expiry(now, now, ttl);
        loop {
            let token = SessionToken::generate(self.manager.config().signing_keys.first());
            let attributes = attributes.iter().map(|(key, value)| (*key, value));
            match self
                .manager
                .create_with(&token, &options, attributes, Some(expires_at))
                .await
            {
                Ok(session) => return Ok(session_key(&token, session.version())),
                // 256 random bits met an existing id: draw again.
                Err(Error::AlreadyExists) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Write what this request changed in the session of `key`; `None` when it is gone.
    async fn write(
        &self,
        key: &SessionKey,
        state: &HashMap<String, String>,
        ttl: &Ttl,
    ) -> Result<Option<SessionKey>, Error> {
        let Some(candidate) = cookie::parse(key.as_ref().as_bytes()) else {
            return Ok(None);
        };
        // What this request loaded (behind the guard), or else what is stored now.
        let loaded = in_scope(|s| s.loaded.take_if(|l| l.key == key.as_ref())).flatten();
        let (mut session, base) = match loaded {
            Some(loaded) => (loaded.session, loaded.texts),
            None => match self
                .manager
                .get_session_with_version(&candidate.token, candidate.version)
                .await?
            {
                Some(session) => {
                    let texts = texts(&session);
                    (session, texts)
                }
                None => return Ok(None),
            },
        };
        let mut user_touched = false;
        for (name, text) in state {
            if base.get(name) != Some(text) {
                session.set(name.clone(), attribute(name, text)?)?;
                user_touched |= self.is_user_key(name);
            }
        }
        for name in base.keys().filter(|name| !state.contains_key(*name)) {
            session.remove(name);
            user_touched |= self.is_user_key(name);
        }
        let now = self.now();
        session.set_expires_at(self.expiry(now, session.created_at(), ttl))?;
        let user = if user_touched {
            self.user_in(state)
        } else {
            session.user_id().cloned()
        };
        let written = if user.as_ref() == session.user_id() {
            self.manager
                .update_session(&mut session)
                .await
                .map(|()| candidate.token)
        } else if let Some(user) = user {
            self.manager.log_in(&mut session, user).await
        } else {
            let token = SessionToken::generate(self.manager.config().signing_keys.first());
            self.manager
                .rebind(&mut session, None, &token)
                .await
                .map(|()| token)
        };
        match written {
            Ok(token) => Ok(Some(session_key(&token, session.version()))),
            Err(Error::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

impl SessionStore for PgSessionStore {
    /// The session of `session_key` (`<token>.<version>`) as actix-session's state, served
    /// from the cache when it holds that version or a later one; `None` when the key is not
    /// ours, or the session is gone, expired, or its token forged.
    async fn load(
        &self,
        session_key: &SessionKey,
    ) -> Result<Option<HashMap<String, String>>, LoadError> {
        let key = session_key.as_ref();
        let Some(candidate) = cookie::parse(key.as_bytes()) else {
            return Ok(None);
        };
        // The guard already read the session it chose.
        let preloaded = in_scope(|s| s.preloaded.take_if(|(k, _)| k.as_str() == key)).flatten();
        let session = match preloaded {
            Some((_, session)) => session,
            None => match self
                .manager
                .get_session_with_version(&candidate.token, candidate.version)
                .await
            {
                Ok(Some(session)) => session,
                Ok(None) => return Ok(None),
                Err(e) => return Err(LoadError::Other(cause(e, "loading the session"))),
            },
        };
        let texts = texts(&session);
        in_scope(|s| {
            s.loaded = Some(Loaded {
                key: key.to_owned(),
                session,
                texts: texts.clone(),
            });
        });
        Ok(Some(texts))
    }

    /// Create a session holding `session_state`, bound to the user it names, expiring after
    /// `ttl` (or at pgsession's absolute lifetime, if sooner). The key is the new token at
    /// version 1.
    async fn save(
        &self,
        session_state: HashMap<String, String>,
        ttl: &Ttl,
    ) -> Result<SessionKey, SaveError> {
        self.create(&session_state, ttl).await.map_err(|e| {
            if is_input(&e) {
                SaveError::Serialization(cause(e, "saving a new session"))
            } else {
                SaveError::Other(cause(e, "saving a new session"))
            }
        })
    }

    /// Write the keys this request set or removed (a delta: other keys, and other requests'
    /// changes to them, stay as stored) and move the expiry to `ttl` from now; log in, or
    /// unbind, when the user key changed. Returns the key at the new version, with a new
    /// token after a login: actix-session sets the cookie again on every update, with the key
    /// this returns (`SessionMiddleware`, its `SessionStatus::Changed` arm), so the client's
    /// next request, on any instance, reads at least what it wrote.
    ///
    /// A session deleted or expired meanwhile is not written back when the state names a user
    /// (a login ended elsewhere, by "log out everywhere" or the per-user cap, stays ended): the
    /// dead key is returned and the next request finds no session. Otherwise, like
    /// actix-session's Redis store, the state is saved as a new session under a new key.
    async fn update(
        &self,
        session_key: SessionKey,
        session_state: HashMap<String, String>,
        ttl: &Ttl,
    ) -> Result<SessionKey, UpdateError> {
        match self.write(&session_key, &session_state, ttl).await {
            Ok(Some(key)) => Ok(key),
            Ok(None) if session_state.is_empty() || self.user_in(&session_state).is_some() => {
                Ok(session_key)
            }
            Ok(None) => self.save(session_state, ttl).await.map_err(|e| match e {
                SaveError::Serialization(e) => UpdateError::Serialization(e),
                SaveError::Other(e) => UpdateError::Other(e),
            }),
            Err(e) if is_input(&e) => {
                Err(UpdateError::Serialization(cause(e, "updating the session")))
            }
            Err(e) => Err(UpdateError::Other(cause(e, "updating the session"))),
        }
    }

    /// Keep the session alive `ttl` from now (actix-session calls this on requests that
    /// change nothing, with `TtlExtensionPolicy::OnEveryRequest`). No database round trip on
    /// a hit: the access is recorded with [`SessionManager::touch_session`] and written in the
    /// batched last-access flush. The absolute expiry is moved (one write) only once it lags
    /// `now + ttl` by more than a sixteenth of `ttl`, so an active session costs at most one
    /// write per sixteenth of its TTL; it never moves past pgsession's absolute lifetime, and
    /// is never brought forward here.
    async fn update_ttl(&self, session_key: &SessionKey, ttl: &Ttl) -> anyhow::Result<()> {
        let key = session_key.as_ref();
        let Some(candidate) = cookie::parse(key.as_bytes()) else {
            return Ok(());
        };
        let loaded = in_scope(|s| {
            s.loaded
                .as_ref()
                .filter(|l| l.key == key)
                .map(|l| l.session.clone())
        })
        .flatten();
        let mut session = match loaded {
            Some(session) => session,
            None => match self
                .manager
                .get_session_with_version(&candidate.token, candidate.version)
                .await
                .map_err(|e| cause(e, "reading the session"))?
            {
                Some(session) => session,
                None => return Ok(()),
            },
        };
        let target = self.expiry(self.now(), session.created_at(), ttl);
        let step = (delta(ttl) / 16).max(TimeDelta::seconds(1));
        if target - session.expires_at() <= step {
            self.manager
                .touch_session(session.id())
                .map_err(|e| cause(e, "recording the access"))?;
            return Ok(());
        }
        session
            .set_expires_at(target)
            .map_err(|e| cause(e, "extending the session"))?;
        match self.manager.update_session(&mut session).await {
            Ok(()) | Err(Error::NotFound) => Ok(()),
            Err(e) => Err(cause(e, "extending the session")),
        }
    }

    /// Delete the session (a logout, or the old session of a renewal) on every instance.
    async fn delete(&self, session_key: &SessionKey) -> anyhow::Result<()> {
        let key = session_key.as_ref();
        in_scope(|s| {
            if s.loaded.as_ref().is_some_and(|l| l.key == key) {
                s.loaded = None;
            }
        });
        let Some(candidate) = cookie::parse(key.as_bytes()) else {
            return Ok(());
        };
        self.manager
            .delete_session(candidate.token.id())
            .await
            .map_err(|e| cause(e, "deleting the session"))?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Values: actix-session's JSON texts as pgsession attributes, and back

/// The attribute that stores `text` for key `name`: the JSON value it denotes when that value
/// reads back as exactly `text`, otherwise `{TEXT_MEMBER: text}`.
fn attribute(name: &str, text: &str) -> Result<Value, Error> {
    if let Ok(parsed) = serde_json::from_str::<Value>(text)
        && wrapped_text(&parsed).is_none()
        // As pgsession will store it (numbers in the form PostgreSQL prints back), or a value
        // it refuses (`\u0000`, too deep), which then goes in as text.
        && let Ok(stored) = crate::model::json::encode(name, &parsed, usize::MAX)
        && text_of(&stored) == text
    {
        return Ok(stored);
    }
    let mut wrapped = serde_json::Map::new();
    wrapped.insert(TEXT_MEMBER.to_owned(), Value::String(text.to_owned()));
    Ok(Value::Object(wrapped))
}

/// The text an attribute stands for.
fn text_of(value: &Value) -> String {
    match wrapped_text(value) {
        Some(text) => text.to_owned(),
        None => serde_json::to_string(&Canonical(value)).expect("a JSON value always serializes"),
    }
}

/// The text of a value stored as `{TEXT_MEMBER: text}`.
fn wrapped_text(value: &Value) -> Option<&str> {
    match value {
        Value::Object(map) if map.len() == 1 => map.get(TEXT_MEMBER)?.as_str(),
        _ => None,
    }
}

/// Every attribute of `session` as its text.
fn texts(session: &Session) -> HashMap<String, String> {
    session
        .attributes()
        .iter()
        .map(|(name, value)| (name.clone(), text_of(value)))
        .collect()
}

/// A value serialized compactly with object keys in byte order, whatever order serde_json's
/// map keeps (insertion order, with its `preserve_order` feature, would make a value read from
/// `jsonb` print differently from the same value cached by the writer).
struct Canonical<'a>(&'a Value);

impl Serialize for Canonical<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Array(items) => serializer.collect_seq(items.iter().map(Canonical)),
            Value::Object(map) => {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                if !entries.is_sorted_by(|a, b| a.0 <= b.0) {
                    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
                }
                serializer.collect_map(entries.into_iter().map(|(k, v)| (k, Canonical(v))))
            }
            other => other.serialize(serializer),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Keys, time and errors

/// actix-session's key for `token` at `version`: the cookie value of the axum layer.
fn session_key(token: &SessionToken, version: i64) -> SessionKey {
    SessionKey::try_from(cookie::value(token, version))
        .expect("a token and a version are far below actix-session's 4064-byte limit")
}

/// actix's TTL as chrono's, saturating.
fn delta(ttl: &Ttl) -> TimeDelta {
    let micros = i64::try_from(ttl.whole_microseconds()).unwrap_or(if ttl.is_negative() {
        i64::MIN
    } else {
        i64::MAX
    });
    TimeDelta::microseconds(micros)
}

/// Whether `error` is about what was given (a value, a key, a user id, an expiry) rather than
/// the database.
fn is_input(error: &Error) -> bool {
    matches!(
        error,
        Error::AttributeTooLarge { .. }
            | Error::SessionTooLarge { .. }
            | Error::InvalidAttribute { .. }
            | Error::InvalidExpiry { .. }
            | Error::InvalidUserId(_)
            | Error::InvalidGroupId(_)
    )
}

fn cause(error: Error, doing: &'static str) -> anyhow::Error {
    anyhow::Error::new(error).context(doing)
}

// ---------------------------------------------------------------------------------------------
// One request's context, shared by the guard and the store

tokio::task_local! {
    /// Set by the guard for the request it wraps; absent without it.
    static REQUEST: RefCell<RequestScope>;
}

#[derive(Default)]
struct RequestScope {
    /// The client's address and `User-Agent`, for a session created in this request.
    peer: Option<IpAddr>,
    agent: Option<HeaderValue>,
    /// The session the guard found, with the cookie value (session key) that opened it.
    preloaded: Option<(String, Session)>,
    /// What `load` handed to actix-session: the baseline of this request's delta.
    loaded: Option<Loaded>,
}

struct Loaded {
    key: String,
    session: Session,
    texts: HashMap<String, String>,
}

impl RequestScope {
    fn client_options(&self) -> SessionOptions {
        let mut options = SessionOptions::new();
        if let Some(ip) = self.peer {
            options = options.ip(ip);
        }
        if let Some(agent) = self.agent.as_ref().and_then(|v| v.to_str().ok()) {
            options = options.user_agent(agent);
        }
        options
    }
}

/// `f` on this request's scope; `None` outside a guard.
fn in_scope<R>(f: impl FnOnce(&mut RequestScope) -> R) -> Option<R> {
    REQUEST.try_with(|scope| f(&mut scope.borrow_mut())).ok()
}

// ---------------------------------------------------------------------------------------------
// The guard

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
/// (shown by [`SessionManager::list_user_sessions`]), and hands the store each request's
/// loaded state, so that a save writes exactly the keys the request changed. A database error
/// while trying cookies leaves them in place for actix-session, which then reports it.
#[derive(Clone)]
pub struct CookieGuard {
    store: PgSessionStore,
    key: Key,
    name: String,
    security: CookieContentSecurity,
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
    /// [`CookieContentSecurity::Private`]).
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
        for &i in ours.iter().take(MAX_TRIED) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(text: &str) -> (Value, String) {
        let stored = attribute("k", text).unwrap();
        let back = text_of(&stored);
        (stored, back)
    }

    #[test]
    fn canonical_texts_are_stored_as_the_json_they_denote() {
        for (text, value) in [
            (r#""alice""#, serde_json::json!("alice")),
            ("42", serde_json::json!(42)),
            ("-1.5", serde_json::json!(-1.5)),
            ("true", serde_json::json!(true)),
            ("null", Value::Null),
            (
                r#"{"a":1,"b":[1,"x"]}"#,
                serde_json::json!({"a": 1, "b": [1, "x"]}),
            ),
            (r#""caf\u00e9 \"q\"""#, serde_json::json!("café \"q\"")),
        ] {
            let (stored, back) = round_trip(text);
            // serde_json writes é as itself, so the escaped form is not canonical.
            if text.contains("\\u00e9") {
                assert_eq!(wrapped_text(&stored), Some(text));
            } else {
                assert_eq!(stored, value, "{text}");
            }
            assert_eq!(back, text);
        }
    }

    #[test]
    fn every_other_text_is_stored_as_text_and_comes_back_byte_for_byte() {
        for text in [
            "not json",
            "",
            "{ \"a\": 1 }",
            r#"{"b":1,"a":2}"#,
            "1.0e3",
            "1e16",
            "-0.0",
            r#""a\u0000b""#,
            r#"{"actix-session.text":"x"}"#,
            r#"{"actix-session.text":"x","other":1}"#,
        ] {
            let (stored, back) = round_trip(text);
            assert_eq!(back, text, "{text:?} stored as {stored}");
        }
        // An object that merely contains the member, among others, is real JSON.
        let (stored, _) = round_trip(r#"{"actix-session.text":"x","other":1}"#);
        assert_eq!(stored["other"], 1);
    }

    #[test]
    fn a_ttl_saturates_instead_of_overflowing() {
        assert_eq!(delta(&Ttl::MAX), TimeDelta::microseconds(i64::MAX));
        assert_eq!(delta(&Ttl::MIN), TimeDelta::microseconds(i64::MIN));
        assert_eq!(delta(&Ttl::minutes(2)), TimeDelta::minutes(2));
    }
}
