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
//!   [`SessionManager::get_session_with_version`](crate::SessionManager::get_session_with_version)(crate::SessionManager::get_session_with_version)).
//! - **Delta saves.** A request writes only the keys it set or removed, so two concurrent
//!   requests changing different keys both keep their change (exactly so behind
//!   [`CookieGuard`], see below).
//! - **Real JSON.** actix-session hands stores JSON texts; each is stored as the JSON value it
//!   is, so other pgsession users and the admin CLI see real attributes. The rare text that
//!   would not come back byte for byte from its value (see [`TEXT_MEMBER`]) is stored as a
//!   string inside a one-member object instead: a load gives back exactly what was saved.
//! - **Users.** The user id actix-identity keeps in the session
//!   ([`ACTIX_IDENTITY_USER_KEY`]; [`PgSessionStore::with_user_key`] for another key) binds
//!   the session to that user, so [`SessionManager::list_user_sessions`](crate::SessionManager::list_user_sessions)(crate::SessionManager::list_user_sessions),
//!   [`SessionManager::delete_all_user_sessions`](crate::SessionManager::delete_all_user_sessions)(crate::SessionManager::delete_all_user_sessions) ("log out everywhere") and the per-user cap
//!   work for actix-identity users.
//! - **Forged cookies cost nothing.** With [`Config::signing_keys`] set, a cookie whose token
//!   does not verify is refused before any lookup (counted in
//!   [`Stats::forged_tokens`](crate::Stats::forged_tokens)), on top of actix-session's own
//!   signing or encryption of the cookie, which is a separate layer with its own
//!   [`Key`]: keep actix-session's default [`CookieContentSecurity::Private`](actix_session::config::CookieContentSecurity::Private) (or `Signed`).
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
//! of the TTL and the TTL: see [`SessionStore::update_ttl`](actix_session::storage::SessionStore::update_ttl)); pgsession's
//! [`Config::session_ttl`] (default 30 days) after its creation; and pgsession's
//! [`Config::idle_timeout`] (default 48 hours) after its last request.
//!
//! # Good to know
//!
//! - actix-identity's `Identity::login` renews the session: actix-session deletes the
//!   visitor's session and saves its state, user id included, as a new one (two round trips).
//!   A user id set without a renewal is a [`SessionManager::log_in`](crate::SessionManager::log_in)(crate::SessionManager::log_in) (one round trip).
//! - actix-session 0.11's `Session::update` and `Session::update_or` change an existing key
//!   without marking the session changed, so with any store such a change alone is never
//!   saved: use `get` then `insert`.
//!
//! [`Config::signing_keys`]: crate::Config::signing_keys
//! [`Config::session_ttl`]: crate::Config::session_ttl
//! [`Config::idle_timeout`]: crate::Config::idle_timeout
//! [`Key`]: actix_web::cookie::Key
//! [`Key::generate`]: actix_web::cookie::Key::generate

mod guard;
mod scope;
mod store;
mod values;

pub use self::guard::{CookieGuard, CookieGuardService};
pub use self::store::PgSessionStore;

/// The session key under which actix-identity 0.9 keeps the logged-in user's id by default
/// (its value is the id as a JSON string); the default of [`PgSessionStore::with_user_key`].
pub const ACTIX_IDENTITY_USER_KEY: &str = "actix_identity.user_id";

/// How a session value is stored when its text would not come back byte for byte from the
/// JSON value it denotes (not JSON at all, spaces, object keys out of order, `1.0e3`,
/// `\u0000`, ...): as the object `{"actix-session.text": "<the text>"}`. So is a value that
/// is itself exactly such an object, so every stored value reads back as the text saved.
pub const TEXT_MEMBER: &str = "actix-session.text";
