//! One session at a time: create, get, update, rotate and log in, delete, touch.

use std::sync::atomic::Ordering;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Map;
use tracing::Instrument;
use uuid::Uuid;

use super::{Inner, SessionManager, Timer};
use crate::coherence::cache::{FillTicket, Lookup, Proof, Tag};
use crate::error::{Error, Result};
use crate::events::{Origin, SessionEvent, SessionEventKind};
use crate::model::ids::{SessionId, UserId};
use crate::model::options::SessionOptions;
use crate::model::record::Record;
use crate::model::session::{Session, build_attributes, storable_expiry};
use crate::model::token::{Precheck, SessionToken};
use crate::storage::{Delta, NewSession, Rotation, UpdateOutcome};

impl SessionManager {
    /// Create a session for `user_id` (a login) with initial `attributes`, in one round trip,
    /// and the token that opens it: put the token (its `Display` text) in the session cookie;
    /// pgsession keeps only its hash.
    ///
    /// With a per-user cap, the user's least recently used sessions beyond it are deleted in
    /// the same transaction (or, with [`MaxSessionsPolicy::Reject`](crate::MaxSessionsPolicy::Reject), the call fails); concurrent
    /// logins of one user are serialised, so the cap holds across nodes. A create whose
    /// connection is lost is retried on another one (it looks for its own id first, so it is
    /// never made twice).
    ///
    /// # Errors
    ///
    /// [`Error::AttributeTooLarge`](crate::Error::AttributeTooLarge) or [`Error::InvalidAttribute`](crate::Error::InvalidAttribute) for an attribute that cannot
    /// be stored, [`Error::SessionTooLarge`](crate::Error::SessionTooLarge) past [`Config::max_session_size`](crate::Config::max_session_size),
    /// [`Error::InvalidUserId`](crate::Error::InvalidUserId) (all checked before any SQL runs: nothing is written), [`Error::MaxSessionsReached`](crate::Error::MaxSessionsReached) with the reject policy, [`Error::Database`](crate::Error::Database),
    /// [`Error::ShutDown`](crate::Error::ShutDown).
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn run(manager: pgsession::SessionManager) -> pgsession::Result<()> {
    /// let (session, token) = manager
    ///     .create_session("alice", [("role", "admin")])
    ///     .await?;
    /// let cookie = format!("id={token}; HttpOnly; Secure; SameSite=Lax; Path=/");
    /// println!("session {} for {:?}", session.id(), session.user_id());
    /// # Ok(())
    /// # }
    /// ```
    pub async fn create_session<K: Into<String>, V: Serialize>(
        &self,
        user_id: impl Into<UserId>,
        attributes: impl IntoIterator<Item = (K, V)>,
    ) -> Result<(Session, SessionToken)> {
        self.create_session_with(SessionOptions::new().user(user_id), attributes)
            .await
    }

    /// Create a session that belongs to no user yet (a visitor's cart, a CSRF token, a flash
    /// message), and its token. It expires like any other, counts against no cap, and is not
    /// listed or deleted by the per-user calls; [`log_in`](Self::log_in) later binds it to a
    /// user under a new token.
    ///
    /// # Errors
    ///
    /// As [`create_session`](Self::create_session), except the cap.
    pub async fn create_anonymous_session<K: Into<String>, V: Serialize>(
        &self,
        attributes: impl IntoIterator<Item = (K, V)>,
    ) -> Result<(Session, SessionToken)> {
        self.create_session_with(SessionOptions::new(), attributes)
            .await
    }

    /// Create a session with `options` (its user or none, its group, the client's address and
    /// `User-Agent`) and initial `attributes`, like [`create_session`](Self::create_session).
    ///
    /// # Errors
    ///
    /// As [`create_session`](Self::create_session); [`Error::InvalidGroupId`](crate::Error::InvalidGroupId) for a group
    /// that cannot be stored (nothing is written).
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn run(manager: pgsession::SessionManager) -> pgsession::Result<()> {
    /// use pgsession::SessionOptions;
    ///
    /// let options = SessionOptions::new()
    ///     .user("alice")
    ///     .group("acme")
    ///     .ip("203.0.113.7".parse().unwrap());
    /// let (session, token) = manager.create_session_with(options, [("role", "admin")]).await?;
    /// # Ok(())
    /// # }
    /// ```
    #[tracing::instrument(level = "debug", name = "create_session", skip_all, fields(user.id = options.user.as_ref().map(UserId::as_str), group.id = options.group.as_deref()))]
    pub async fn create_session_with<K: Into<String>, V: Serialize>(
        &self,
        options: SessionOptions,
        attributes: impl IntoIterator<Item = (K, V)>,
    ) -> Result<(Session, SessionToken)> {
        // `create_with` enters the call.
        let inner = self.open()?;
        let _timer = Timer::start("create");
        options.validate()?;
        let token = SessionToken::generate(inner.config.signing_keys.first());
        let session = self.create_with(&token, &options, attributes, None).await?;
        Ok((session, token))
    }

    /// Create the session of `token` (chosen by the caller: tower-sessions picks its ids), with
    /// `expires_at` (checked as [`Session::set_expires_at`](crate::Session::set_expires_at) checks it) or the configured
    /// lifetime. [`Error::AlreadyExists`](crate::Error::AlreadyExists) when the id exists. `options` must be validated.
    pub(crate) async fn create_with<K: Into<String>, V: Serialize>(
        &self,
        token: &SessionToken,
        options: &SessionOptions,
        attributes: impl IntoIterator<Item = (K, V)>,
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<Session> {
        let inner = self.enter()?;
        let attributes = build_attributes(attributes, inner.config.max_attribute_size)?;
        let size = crate::model::json::stored_size(&attributes);
        if size > inner.config.max_session_size {
            return Err(Error::SessionTooLarge {
                size,
                limit: inner.config.max_session_size,
            });
        }
        let now = inner.clock.now();
        let expires_at = match expires_at {
            Some(at) => storable_expiry(at)?,
            None => inner.policy.expires_at(now),
        };
        let user = options.user.clone();
        let new = NewSession {
            id: token.id().as_uuid(),
            user_id: user.as_ref(),
            attributes: &attributes,
            now,
            expires_at,
            // Sessions idle by the stored time but possibly used on a node that has not
            // flushed yet still count (and rank as least recently used).
            settled: inner.policy.settled_cutoff(now),
            cap: inner.cap(),
            group_id: options.group.as_deref(),
            client: &options.client,
            announce: inner.config.announce_creates,
            tag: token.tag().copied(),
        };
        let created = inner.storage.create(&new).await?;
        inner
            .cap_evictions
            .fetch_add(created.evicted.len() as u64, Ordering::Relaxed);
        for gone in created.evicted {
            inner.emit(SessionEventKind::Deleted, gone, user.clone(), None);
        }
        let record = new.record();
        inner.emit(SessionEventKind::Created, record.id, user, Some(1));
        Ok(inner.hand_out(record, now))
    }

    /// The session `token` opens, or `None` when it does not exist, has expired (absolutely,
    /// or by inactivity), or the token's signature does not verify (with
    /// [`Config::signing_keys`](crate::Config::signing_keys); counted in [`Stats::forged_tokens`](crate::Stats::forged_tokens): no database read, no
    /// cache entry touched). Records the access; a cache hit does no database I/O.
    ///
    /// The verdict on a token never depends on the cache: a token opens its session on every
    /// node or on none. A cache hit does not recompute the MAC when the token's tag is the one
    /// this node already verified (or signed) for that session, a 16-byte comparison;
    /// otherwise the MAC is computed before anything is served or read.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database) when the session had to be read and the database failed (a read
    /// whose connection was lost is run again on another first), [`Error::ShutDown`](crate::Error::ShutDown).
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn run(manager: pgsession::SessionManager, cookie: &str) -> pgsession::Result<()> {
    /// // A malformed cookie is no session, like an unknown one.
    /// let found = match cookie.parse::<pgsession::SessionToken>() {
    ///     Ok(token) => manager.get_session(&token).await?,
    ///     Err(_) => None,
    /// };
    /// match found {
    ///     Some(session) => println!("user {:?}", session.user_id()),
    ///     None => println!("logged out or expired: send to the login page"),
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub async fn get_session(&self, token: &SessionToken) -> Result<Option<Session>> {
        self.read(token, 0).await
    }

    /// [`get_session`](Self::get_session) for a caller that must see at least version
    /// `min_version` of the session: read-your-writes across nodes. A client that wrote on
    /// one node and sends its next request to another carries the version its write returned
    /// ([`Session::version`]); a node whose cached copy is that recent serves it from memory
    /// as usual (no extra cost), one whose copy is older (the write's notification still on
    /// its way) reads it from the database and caches what it reads. `min_version` 0 is
    /// `get_session`. A version never reached (a client that made one up) costs its session
    /// a database read per request and nothing else.
    ///
    /// The web layers keep the version in the cookie beside the token; see
    /// [`axum::SessionLayer`](crate::axum::SessionLayer).
    ///
    /// # Errors
    ///
    /// As [`get_session`](Self::get_session).
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn run(a: pgsession::SessionManager, b: pgsession::SessionManager, token: pgsession::SessionToken) -> pgsession::Result<()> {
    /// // Node A writes and tells the client the version it wrote...
    /// let mut s = a.get_session(&token).await?.expect("logged in");
    /// s.set("theme", "dark")?;
    /// a.update_session(&mut s).await?;
    /// let seen = s.version();
    /// // ...and node B, given that version, never serves an older copy.
    /// let s = b.get_session_with_version(&token, seen).await?.expect("logged in");
    /// assert_eq!(s.get_as::<String>("theme")?.as_deref(), Some("dark"));
    /// # Ok(())
    /// # }
    /// ```
    pub async fn get_session_with_version(
        &self,
        token: &SessionToken,
        min_version: i64,
    ) -> Result<Option<Session>> {
        self.read(token, min_version).await
    }

    async fn read(&self, token: &SessionToken, min_version: i64) -> Result<Option<Session>> {
        // Built by hand rather than with `#[instrument]`: the hit path never awaits, so it
        // enters the span without wrapping the future; and unless some subscriber wants
        // debug spans, a hit pays one load of the global level for it instead of the
        // span's callsite checks (an unconditional span measured about 0.15 us more a hit;
        // this, no measurable cost: `cargo bench --bench cache`).
        let span = if tracing::level_enabled!(tracing::Level::DEBUG) {
            tracing::debug_span!("get_session", session.id = %token.id())
        } else {
            tracing::Span::none()
        };
        let inner = self.open()?;
        let id = token.id().as_uuid();
        // A hit reads the coarse clock and decides at the latest time it may be; what is not
        // a hit reads the exact time.
        let (coarse, latest) = inner.clock.coarse_now();
        let (ticket, tag, now, _timer) = {
            let _entered = span.enter();
            let check = inner.precheck(token, latest);
            let proof = match &check {
                Precheck::Refused => return Ok(inner.forged()),
                Precheck::Accepted => Proof::Any,
                Precheck::IfSigned(tag) => Proof::Tag(tag),
            };
            let idle = inner.policy.idle;
            if let Some(record) = inner
                .storage
                .serve(id, coarse, latest, idle, proof, min_version)
            {
                return Ok(Some(inner.hand_out_hit(record, coarse)));
            }
            let now = inner.clock.now();
            let timer = Timer::start("get");
            let (proof, tag) = match check {
                Precheck::IfSigned(tag) if !token.signed_by(&inner.config.signing_keys, &tag) => {
                    return Ok(inner.forged());
                }
                Precheck::IfSigned(tag) => (Proof::Verified(tag), Some(tag)),
                _ => (Proof::Any, None),
            };
            match inner.storage.lookup(id, now, idle, proof, min_version) {
                Lookup::Hit(record) => return Ok(Some(inner.hand_out_hit(record, now))),
                Lookup::Miss(ticket) => (ticket, tag, now, timer),
            }
        };
        // A read from the database: shutdown waits for it.
        let call = self.enter()?;
        call.read_through(id, ticket, now, tag)
            .instrument(span)
            .await
    }

    /// [`get_session`](Self::get_session) from the database whatever the cache holds, for
    /// the rare page where even the notification delay is too much (a payment confirmation
    /// after a change made on another node a moment ago); the cache is refreshed with what it
    /// reads. Records the access like `get_session`.
    ///
    /// # Errors
    ///
    /// As [`get_session`](Self::get_session).
    #[tracing::instrument(level = "debug", skip_all, fields(session.id = %token.id()))]
    pub async fn get_session_fresh(&self, token: &SessionToken) -> Result<Option<Session>> {
        let inner = self.enter()?;
        let _timer = Timer::start("get_fresh");
        let now = inner.clock.now();
        if !token.verify(&inner.config.signing_keys, inner.legacy_accepted(now)) {
            return Ok(inner.forged());
        }
        let id = token.id().as_uuid();
        let ticket = inner.storage.ticket(id);
        inner
            .read_through(id, ticket, now, token.tag().copied())
            .await
    }

    /// Persist the attributes set or removed on `session` (and a new expiry, if set) in one
    /// round trip, leaving every other attribute as it is in the database. On success
    /// `session` is replaced by the stored state (other writers' changes included) with its
    /// new `version`. Without changes this does nothing.
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`](crate::Error::NotFound) when the session was deleted or expired meanwhile (it is not
    /// recreated), [`Error::AttributeTooLarge`](crate::Error::AttributeTooLarge) or [`Error::InvalidAttribute`](crate::Error::InvalidAttribute) (nothing is
    /// written), [`Error::SessionTooLarge`](crate::Error::SessionTooLarge) when the merged attributes (other writers' keys
    /// included) would grow past [`Config::max_session_size`](crate::Config::max_session_size) (nothing is written), [`Error::Database`](crate::Error::Database) (a transient one when the connection was lost: the update
    /// may or may not have been applied, and if it was, every node learns of it),
    /// [`Error::ShutDown`](crate::Error::ShutDown).
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn run(manager: pgsession::SessionManager, mut session: pgsession::Session) -> pgsession::Result<()> {
    /// session.set("theme", "dark")?;
    /// session.remove("cart");
    /// manager.update_session(&mut session).await?;
    /// # Ok(())
    /// # }
    /// ```
    #[tracing::instrument(level = "debug", skip_all, fields(session.id = %session.id(), user.id = session.user_id().map(UserId::as_str)))]
    pub async fn update_session(&self, session: &mut Session) -> Result<()> {
        self.update(session, false).await
    }

    /// [`update_session`](Self::update_session) with optimistic locking: writes only if no
    /// other write (an update, a rotation, another node's change) committed since `session`
    /// was read, in the same single round trip. For read-modify-write values a merge of
    /// changed keys cannot make right (a balance, a counter, a multi-step form).
    ///
    /// # Errors
    ///
    /// [`Error::Conflict`](crate::Error::Conflict) with the version now stored when another write came first (nothing
    /// is written, `session` is unchanged: read it again and retry); otherwise as
    /// [`update_session`](Self::update_session).
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn run(manager: pgsession::SessionManager, token: pgsession::SessionToken) -> pgsession::Result<()> {
    /// use pgsession::Error;
    ///
    /// loop {
    ///     let Some(mut s) = manager.get_session(&token).await? else { break };
    ///     let credits: i64 = s.get_as("credits")?.unwrap_or(0);
    ///     s.set("credits", credits - 1)?;
    ///     match manager.update_session_if_unchanged(&mut s).await {
    ///         Err(Error::Conflict { .. }) => continue, // someone else spent meanwhile
    ///         other => break other?,
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    #[tracing::instrument(level = "debug", skip_all, fields(session.id = %session.id(), user.id = session.user_id().map(UserId::as_str)))]
    pub async fn update_session_if_unchanged(&self, session: &mut Session) -> Result<()> {
        self.update(session, true).await
    }

    async fn update(&self, session: &mut Session, if_unchanged: bool) -> Result<()> {
        let inner = self.enter()?;
        let _timer = Timer::start(if if_unchanged {
            "update_if_unchanged"
        } else {
            "update"
        });
        if !session.is_modified() {
            return Ok(());
        }
        let now = inner.clock.now();
        let mut delta = inner.delta(session, now)?;
        if if_unchanged {
            delta.expect_version = Some(session.base_version);
        }
        match inner.storage.update(&delta).await? {
            UpdateOutcome::Updated { record, .. } => {
                // The write is an access; the flush stores it, as it stores reads.
                inner.touches.keep_alive(delta.id, now);
                inner.emit(
                    SessionEventKind::Updated,
                    delta.id,
                    record.user_id.clone(),
                    Some(record.version),
                );
                *session = inner.hand_out(*record, now);
                Ok(())
            }
            UpdateOutcome::TooLarge { size } => Err(Error::SessionTooLarge {
                size,
                limit: delta.max_size,
            }),
            UpdateOutcome::Gone => Err(Error::NotFound),
            UpdateOutcome::Conflict { current_version } => Err(Error::Conflict { current_version }),
        }
    }

    /// Log `session` in as `user_id`: bind it to the user under a new token, in one round trip
    /// and one transaction that also applies the per-user cap under the same lock as
    /// [`create_session`](Self::create_session) (concurrent logins never exceed it) and writes
    /// the session's pending changes. The visitor's data carries over; the old token stops
    /// working on every node within the bound of a delete (a new id on every privilege change
    /// is what defeats session fixation). Logging in as another user from a logged-in session
    /// rotates again. Returns the new token for the cookie; `session` is the new state.
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`](crate::Error::NotFound) when the session is gone or expired (nothing is written),
    /// [`Error::MaxSessionsReached`](crate::Error::MaxSessionsReached) with the reject policy, [`Error::InvalidUserId`](crate::Error::InvalidUserId), the
    /// attribute errors of [`update_session`](Self::update_session), [`Error::Database`](crate::Error::Database),
    /// [`Error::ShutDown`](crate::Error::ShutDown).
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn run(manager: pgsession::SessionManager) -> pgsession::Result<()> {
    /// let (mut session, _visitor) = manager.create_anonymous_session([("cart", vec![7])]).await?;
    /// let token = manager.log_in(&mut session, 42i64).await?;
    /// assert_eq!(session.get_as::<Vec<i32>>("cart")?, Some(vec![7]));
    /// // Send `token` in a new cookie.
    /// # Ok(())
    /// # }
    /// ```
    #[tracing::instrument(level = "debug", skip_all, fields(session.id = %session.id(), user.id = tracing::field::Empty))]
    pub async fn log_in(
        &self,
        session: &mut Session,
        user_id: impl Into<UserId>,
    ) -> Result<SessionToken> {
        let user = user_id.into();
        tracing::Span::current().record("user.id", user.as_str());
        user.validate()?;
        let token = self.new_token()?;
        self.rotate(session, Some(Some(user)), &token).await?;
        Ok(token)
    }

    /// Give `session` a new token, keeping its data, user, expiry and version history (and
    /// writing its pending changes), in one round trip. The old token stops working on every
    /// node within the bound of a delete; an `update_session` through another copy holding
    /// the old id gets [`Error::NotFound`](crate::Error::NotFound).
    ///
    /// # Errors
    ///
    /// As [`log_in`](Self::log_in), without the cap.
    #[tracing::instrument(level = "debug", skip_all, fields(session.id = %session.id(), user.id = session.user_id().map(UserId::as_str)))]
    pub async fn rotate_session(&self, session: &mut Session) -> Result<SessionToken> {
        let token = self.new_token()?;
        self.rotate(session, None, &token).await?;
        Ok(token)
    }

    fn new_token(&self) -> Result<SessionToken> {
        let inner = self.open()?;
        Ok(SessionToken::generate(inner.config.signing_keys.first()))
    }

    /// Bind `session` to `user` (`None`: to no user) keeping its id, with its pending changes,
    /// under the cap like a login. For stores whose ids the caller picks.
    #[cfg_attr(not(feature = "tower-sessions"), allow(dead_code))]
    pub(crate) async fn rebind(
        &self,
        session: &mut Session,
        user: Option<UserId>,
        token: &SessionToken,
    ) -> Result<()> {
        if let Some(user) = &user {
            user.validate()?;
        }
        self.rotate(session, Some(user), token).await
    }

    /// Move `session` to `token`'s id (possibly its own), writing its pending changes, and
    /// with `user` set, bind it to that user (or to none) under the cap.
    async fn rotate(
        &self,
        session: &mut Session,
        user: Option<Option<UserId>>,
        token: &SessionToken,
    ) -> Result<()> {
        let inner = self.enter()?;
        let _timer = Timer::start("rotate");
        let now = inner.clock.now();
        let delta = inner.delta(session, now)?;
        let binds = user.as_ref().is_some_and(Option::is_some);
        let rotation = Rotation {
            delta: &delta,
            new_id: token.id().as_uuid(),
            cap: if binds { inner.cap() } else { None },
            user: user.as_ref().map(Option::as_ref),
            settled: inner.policy.settled_cutoff(now),
            tag: token.tag().copied(),
        };
        let Some(rotated) = inner.storage.rotate(&rotation).await? else {
            return Err(Error::NotFound);
        };
        let record = rotated.record;
        inner
            .cap_evictions
            .fetch_add(rotated.evicted.len() as u64, Ordering::Relaxed);
        for gone in rotated.evicted {
            inner.emit(
                SessionEventKind::Deleted,
                gone,
                record.user_id.clone(),
                None,
            );
        }
        inner.events.emit(|| {
            let mut e = SessionEvent::new(SessionEventKind::Rotated, Origin::ThisNode)
                .session(rotation.new_id)
                .user(record.user_id.clone())
                .version(record.version);
            e.previous_id = Some(SessionId(delta.id));
            e
        });
        *session = inner.hand_out(record, now);
        Ok(())
    }

    /// Delete one session (logout), in one round trip; true when it existed. Every node stops
    /// serving it within the notification delay, this one at once. A delete whose connection
    /// is lost is run again on another one; it then returns false if the lost attempt had
    /// already deleted the session.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database), [`Error::ShutDown`](crate::Error::ShutDown).
    #[tracing::instrument(level = "debug", skip_all, fields(session.id = %id))]
    pub async fn delete_session(&self, id: SessionId) -> Result<bool> {
        let inner = self.enter()?;
        let _timer = Timer::start("delete");
        let deleted = inner.storage.delete(id.as_uuid()).await?;
        if deleted.existed {
            inner.emit(SessionEventKind::Deleted, id.as_uuid(), None, None);
        }
        Ok(deleted.existed)
    }

    /// Record an access to session `id` without reading it (a keep-alive: a page open in a
    /// tab that polls, a long upload), so that it does not expire by inactivity. Written with
    /// the next last-access flush, like a read's; no database I/O now. An unknown or deleted id
    /// is ignored when the flush runs.
    ///
    /// # Errors
    ///
    /// [`Error::ShutDown`](crate::Error::ShutDown).
    pub fn touch_session(&self, id: SessionId) -> Result<()> {
        let _span = tracing::debug_span!("touch_session", session.id = %id).entered();
        let inner = self.open()?;
        inner.touches.keep_alive(id.as_uuid(), inner.clock.now());
        Ok(())
    }
}

impl Inner {
    /// A session served from memory at `now`, its read recorded.
    fn hand_out_hit(&self, record: Record, now: DateTime<Utc>) -> Session {
        // The cache noted the access, and counted it in the copy's reads.
        self.hand_out_read(record, now, 0)
    }

    /// Whether legacy tokens open sessions at `now`: when configured to, or while sessions
    /// converted by migration 3 may still be alive.
    fn legacy_accepted(&self, now: DateTime<Utc>) -> bool {
        self.config.accept_legacy_tokens || {
            // i64::MIN: no converted session was ever seen (the usual case: skip the clock).
            let until = self.legacy_until.load(Ordering::Relaxed);
            until != i64::MIN && now.timestamp_micros() < until
        }
    }

    /// The verdict on `token` as far as it goes without a MAC.
    fn precheck(&self, token: &SessionToken, now: DateTime<Utc>) -> Precheck {
        token.precheck(&self.config.signing_keys, self.legacy_accepted(now))
    }

    /// A refused token: counted, and no session.
    fn forged(&self) -> Option<Session> {
        self.forged.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// Read a session from the database, with this node's pending access; keep it for later
    /// reads under `ticket`. An expired one is reported and not returned.
    async fn read_through(
        &self,
        id: Uuid,
        ticket: Option<FillTicket>,
        now: DateTime<Utc>,
        tag: Option<Tag>,
    ) -> Result<Option<Session>> {
        let Some(mut record) = self.storage.fetch(id).await? else {
            self.storage.forget(id, None);
            return Ok(None);
        };
        if let Some(pending) = self.pending_access(id) {
            record.last_accessed_at = record.last_accessed_at.max(pending);
        }
        if self.policy.is_expired(&record, now) {
            self.storage.forget(id, Some(record.version));
            self.emit(SessionEventKind::Expired, id, record.user_id.clone(), None);
            return Ok(None);
        }
        record.last_accessed_at = now;
        // Cached with this node's unwritten reads (a copy it replaces adds those its hits
        // noted), as hits on it count theirs.
        record.reads += self.touches.record(id, now);
        let served = self.storage.served(id).map_or(0, |s| s.reads);
        if let Some(ticket) = ticket {
            self.storage.keep(ticket, &record, now, tag);
        }
        Ok(Some(self.hand_out_read(record, now, served)))
    }

    /// The changes of `session` as one delta, validated (a value may have been checked
    /// against another manager's limit).
    fn delta<'s>(&self, session: &'s Session, now: DateTime<Utc>) -> Result<Delta<'s>> {
        let limit = self.config.max_attribute_size;
        for at in session.changes.expiry.values() {
            storable_expiry(*at)?;
        }
        let mut set = Map::new();
        let mut removed = Vec::new();
        for key in &session.changes.keys {
            match session.record.attributes.get(key) {
                Some(value) => {
                    crate::model::json::check(key, value, limit)?;
                    set.insert(key.clone(), value.clone());
                }
                None => {
                    crate::model::json::check_key(key)?;
                    removed.push(key.as_str());
                }
            }
        }
        let id = session.record.id;
        Ok(Delta {
            id,
            base: &session.record,
            base_version: session.base_version,
            removed,
            set,
            expires_at: session.changes.expires_at,
            now,
            idle_cutoff: self.policy.idle_cutoff(now),
            // Not the session's own last access: a caller could have set it to anything.
            pending_access: self.pending_access(id),
            set_expiry: session.changes.expiry.clone(),
            expect_version: None,
            max_size: self.config.max_session_size,
        })
    }

    /// Report this node's change of one session.
    fn emit(&self, kind: SessionEventKind, id: Uuid, user: Option<UserId>, version: Option<i64>) {
        self.events.emit(|| {
            let mut e = SessionEvent::new(kind, Origin::ThisNode)
                .session(id)
                .user(user);
            e.version = version;
            e
        });
    }
}
