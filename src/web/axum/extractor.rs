//! [`WebSession`], the request's session as handlers see it, and the responses pgsession's
//! errors make.

use std::fmt;
use std::sync::Arc;

use axum_core::extract::FromRequestParts;
use axum_core::response::{IntoResponse, Response as AxumResponse};
use http::header::SET_COOKIE;
use http::request::Parts;
use http::{Response, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tokio::sync::Mutex;

use super::layer::{ClientInfo, CookieConfig};
use crate::model::session::decode;
use crate::web::cookie::Candidate;
use crate::{Error, Result, Session, SessionId, SessionManager, SessionToken, UserId};

/// The request's session, for handlers (an axum extractor; needs [`SessionLayer`](super::SessionLayer)).
///
/// Nothing is read until a method needs the session, and a missing, malformed, forged or
/// expired cookie is simply no session; of several cookies of the layer's name, the first
/// that opens a session is used. Reads see the handler's own writes, and at least the
/// version of the session the client's cookie says it last saw written (read-your-writes
/// whichever node serves the request). Clones share one state.
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
    /// The request's cookies of the layer's name that hold a token, in order.
    incoming: Vec<Candidate>,
    /// Recorded with a session created during the request.
    client: ClientInfo,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    loaded: bool,
    session: Option<Session>,
    /// The token that opened `session`, and the version it was read at: a write of this
    /// request moves past it and sends the cookie again with the new version (a request that
    /// only reads sends none, whatever version its cookie carried).
    token: Option<SessionToken>,
    cookie_version: i64,
    /// Attributes written while there is no session; they become an anonymous session after
    /// the handler, or the logged-in one on `log_in`.
    pending: Map<String, Value>,
    cookie: CookieChange,
}

#[derive(Default)]
enum CookieChange {
    #[default]
    None,
    /// The session moved to a new token (`State::token`).
    NewToken,
    Remove,
}

impl fmt::Debug for WebSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebSession")
            .field(
                "cookie_ids",
                &self
                    .0
                    .incoming
                    .iter()
                    .map(|c| c.token.id())
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl WebSession {
    /// The session of a request that came with the cookies `incoming` (those of the layer's
    /// name holding a token), from a client `client` describes.
    pub(super) fn new(
        manager: SessionManager,
        incoming: Vec<Candidate>,
        client: ClientInfo,
    ) -> WebSession {
        WebSession(Arc::new(Shared {
            manager,
            incoming,
            client,
            state: Mutex::new(State::default()),
        }))
    }

    async fn state(&self) -> Result<tokio::sync::MutexGuard<'_, State>> {
        let mut state = self.0.state.lock().await;
        if !state.loaded {
            for candidate in &self.0.incoming {
                let (token, version) = (&candidate.token, candidate.version);
                // At least the version the client last wrote, on whichever node.
                let found = self
                    .0
                    .manager
                    .get_session_with_version(token, version)
                    .await?;
                if let Some(session) = found {
                    state.cookie_version = session.version();
                    state.session = Some(session);
                    state.token = Some(token.clone());
                    break;
                }
            }
            state.loaded = true;
        }
        Ok(state)
    }

    /// Attribute `key`, or `None`.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database) when the session had to be read and the database failed.
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
    /// [`Error::AttributeType`](crate::Error::AttributeType) when the value is not a `T`; those of [`get`](Self::get).
    pub async fn get_as<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        decode(key, self.get(key).await?.as_ref())
    }

    /// Set attribute `key`; saved after the handler. Creates an anonymous session then if
    /// there is none.
    ///
    /// # Errors
    ///
    /// [`Error::AttributeTooLarge`](crate::Error::AttributeTooLarge) or [`Error::InvalidAttribute`](crate::Error::InvalidAttribute) at once (nothing changes);
    /// those of [`get`](Self::get).
    pub async fn set(&self, key: impl Into<String>, value: impl Serialize) -> Result<()> {
        let key = key.into();
        let mut state = self.state().await?;
        match &mut state.session {
            Some(session) => session.set(key, value),
            None => self.set_pending(&mut state, &key, value),
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

    /// Read-modify-write attribute `key` safely against concurrent requests of the same
    /// session on any node: `f` gets the stored value (or `None`) and returns the new one,
    /// which is written at once only if nothing else wrote the session since it was read;
    /// otherwise the session is read again and `f` called again, up to
    /// [`MODIFY_ATTEMPTS`](Self::MODIFY_ATTEMPTS) times. Returns the value written. The
    /// handler's other changes so far are written with it. Requests of one session on one
    /// node take turns here, so conflicts come only from other nodes. Without a session one
    /// is created at once holding the value.
    ///
    /// `n` concurrent `session.modify("n", |n: Option<u64>| n.unwrap_or(0) + 1)` end at
    /// exactly `n`, where `get` then `set` would lose counts.
    ///
    /// # Errors
    ///
    /// [`Error::Conflict`](crate::Error::Conflict) when every attempt lost to another writer;
    /// [`Error::AttributeType`](crate::Error::AttributeType) when the stored value is not a
    /// `T`; those of [`SessionManager::update_session_if_unchanged`] and of
    /// [`set`](Self::set).
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn count(session: pgsession::axum::WebSession) -> pgsession::Result<String> {
    /// let n = session.modify("count", |n: Option<u64>| n.unwrap_or(0) + 1).await?;
    /// Ok(format!("count {n}"))
    /// # }
    /// ```
    pub async fn modify<T, F>(&self, key: &str, mut f: F) -> Result<T>
    where
        T: Serialize + DeserializeOwned,
        F: FnMut(Option<T>) -> T,
    {
        let mut state = self.state().await?;
        let manager = &self.0.manager;
        let Some(session) = &state.session else {
            let value = f(decode(key, state.pending.get(key))?);
            self.set_pending(&mut state, key, &value)?;
            self.save(&mut state).await?;
            return Ok(value);
        };
        let _turn = modify_turn(session.id()).lock().await;
        let mut current = session.clone();
        let mut last_conflict = current.version();
        for _ in 0..Self::MODIFY_ATTEMPTS {
            let mut attempt = current.clone();
            let value = f(attempt.get_as(key)?);
            attempt.set(key, &value)?;
            match manager.update_session_if_unchanged(&mut attempt).await {
                Ok(()) => {
                    state.session = Some(attempt);
                    return Ok(value);
                }
                Err(Error::Conflict { current_version }) => {
                    last_conflict = current_version;
                    let token = state
                        .token
                        .as_ref()
                        .expect("a loaded session has its token");
                    // At least the version that won: this node's copy may not have heard of it.
                    match manager
                        .get_session_with_version(token, current_version)
                        .await?
                    {
                        Some(fresh) => current = current.rebase(fresh),
                        None => return Err(Error::NotFound),
                    }
                }
                Err(other) => return Err(other),
            }
        }
        state.session = Some(current);
        Err(Error::Conflict {
            current_version: last_conflict,
        })
    }

    /// Attempts [`modify`](Self::modify) makes before giving up with a conflict: 16.
    pub const MODIFY_ATTEMPTS: usize = 16;

    fn set_pending(&self, state: &mut State, key: &str, value: impl Serialize) -> Result<()> {
        let limit = self.0.manager.config().max_attribute_size;
        let value = crate::model::json::encode(key, value, limit)?;
        state.pending.insert(key.to_owned(), value);
        Ok(())
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
                let options = self.0.client.options().user(user);
                let (session, token) = self
                    .0
                    .manager
                    .create_session_with(options, attributes)
                    .await?;
                state.session = Some(session);
                token
            }
        };
        state.token = Some(token);
        state.cookie = CookieChange::NewToken;
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
            state.token = Some(token);
            state.cookie = CookieChange::NewToken;
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
        let had_cookie =
            !self.0.incoming.is_empty() || matches!(state.cookie, CookieChange::NewToken);
        state.cookie = if had_cookie {
            CookieChange::Remove
        } else {
            CookieChange::None
        };
    }

    /// After the handler: save the changes unless the response is a server error, then set
    /// or remove the cookie. A failed save turns the response into a 500.
    pub(super) async fn finish<B: Default>(
        &self,
        cookie: &CookieConfig,
        response: &mut Response<B>,
    ) {
        let mut state = self.0.state.lock().await;
        if !response.status().is_server_error()
            && let Err(error) = self.save(&mut state).await
        {
            tracing::error!(%error, "pgsession: saving the session failed");
            *response = Response::new(B::default());
            *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        }
        let header = match (&state.cookie, &state.session, &state.token) {
            (CookieChange::Remove, _, _) => cookie.header(None),
            // A new token, or a write that moved the session past the version the cookie
            // carries: the client's next request, on whichever node, must see at least this.
            (change, Some(session), Some(token))
                if matches!(change, CookieChange::NewToken)
                    || session.version() > state.cookie_version =>
            {
                cookie.header(Some((token, session)))
            }
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
                    .create_session_with(self.0.client.options(), attributes)
                    .await?;
                state.session = Some(session);
                state.token = Some(token);
                state.cookie = CookieChange::NewToken;
                Ok(())
            }
            None => Ok(()),
        }
    }
}

/// Requests of one session on this node take turns in [`WebSession::modify`]: a lock per
/// slot of a small table (sessions sharing a slot take turns needlessly, and rarely).
fn modify_turn(id: SessionId) -> &'static Mutex<()> {
    static TURNS: [Mutex<()>; 64] = [const { Mutex::const_new(()) }; 64];
    let slot = id.as_uuid().as_u128() as usize % TURNS.len();
    &TURNS[slot]
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
