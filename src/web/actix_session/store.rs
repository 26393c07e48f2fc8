//! The store: actix-session's calls as pgsession operations.

use std::collections::HashMap;
use std::sync::Arc;

use actix_session::config::CookieContentSecurity;
use actix_session::storage::{LoadError, SaveError, SessionKey, SessionStore, UpdateError};
use actix_web::cookie::Key;
use actix_web::cookie::time::Duration as Ttl;
use chrono::{DateTime, TimeDelta, Utc};
use serde_json::Value;

use crate::web::cookie;
use crate::{Error, SessionManager, SessionToken, UserId};

use super::ACTIX_IDENTITY_USER_KEY;
use super::guard::*;
use super::scope::*;
use super::values::*;

/// An actix-session [`SessionStore`] in pgsession's tables, served from its coherent cache.
///
/// Cloning is cheap (a [`SessionManager`] is a shared handle). See the [module
/// documentation](crate::actix_session) for an example.
#[derive(Clone, Debug)]
pub struct PgSessionStore {
    pub(super) manager: SessionManager,
    /// The session key naming the user; `None` binds no user.
    pub(super) user_key: Option<Arc<str>>,
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
    ///   ([`SessionManager::log_in`](crate::SessionManager::log_in): a new token, so a new cookie).
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
    /// a hit: the access is recorded with [`SessionManager::touch_session`](crate::SessionManager::touch_session) and written in the
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

/// actix-session's key for `token` at `version`: the cookie value of the axum layer.
pub(super) fn session_key(token: &SessionToken, version: i64) -> SessionKey {
    SessionKey::try_from(cookie::value(token, version))
        .expect("a token and a version are far below actix-session's 4064-byte limit")
}

/// actix's TTL as chrono's, saturating.
pub(super) fn delta(ttl: &Ttl) -> TimeDelta {
    let micros = i64::try_from(ttl.whole_microseconds()).unwrap_or(if ttl.is_negative() {
        i64::MIN
    } else {
        i64::MAX
    });
    TimeDelta::microseconds(micros)
}

/// Whether `error` is about what was given (a value, a key, a user id, an expiry) rather than
/// the database.
pub(super) fn is_input(error: &Error) -> bool {
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

pub(super) fn cause(error: Error, doing: &'static str) -> anyhow::Error {
    anyhow::Error::new(error).context(doing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ttl_saturates_instead_of_overflowing() {
        assert_eq!(delta(&Ttl::MAX), TimeDelta::microseconds(i64::MAX));
        assert_eq!(delta(&Ttl::MIN), TimeDelta::microseconds(i64::MIN));
        assert_eq!(delta(&Ttl::minutes(2)), TimeDelta::minutes(2));
    }
}
