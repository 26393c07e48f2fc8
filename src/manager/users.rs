//! Many sessions at a time: a user's ("log out everywhere", "your devices"), a group's,
//! everyone's; app-wide listings and counts. Each bulk write is one statement and one
//! notification, whatever the number of sessions.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{Inner, SessionManager, Timer};
use crate::error::Result;
use crate::events::{Origin, SessionEvent, SessionEventKind};
use crate::model::clock::chrono_duration;
use crate::model::ids::{SessionId, UserId};
use crate::model::options::validate_group;
use crate::model::record::Record;
use crate::model::session::Session;

impl SessionManager {
    /// Delete every session of `user_id` ("log out everywhere"), in one round trip with one
    /// notification however many sessions there are. Returns how many were deleted.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidUserId`](crate::Error::InvalidUserId), [`Error::Database`](crate::Error::Database), [`Error::ShutDown`](crate::Error::ShutDown).
    #[tracing::instrument(level = "debug", skip_all, fields(user.id = tracing::field::Empty))]
    pub async fn delete_all_user_sessions(&self, user_id: impl Into<UserId>) -> Result<u64> {
        let inner = self.enter()?;
        let _timer = Timer::start("delete_user");
        let user = user_id.into();
        user.validate()?;
        tracing::Span::current().record("user.id", user.as_str());
        let n = inner.storage.delete_user(&user, &[]).await?;
        inner.emit_bulk(SessionEventKind::UserLoggedOutEverywhere, user, n);
        Ok(n)
    }

    /// Delete every session of `user_id` except `keep` ("log out my other devices"). Returns
    /// how many were deleted.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidUserId`](crate::Error::InvalidUserId), [`Error::Database`](crate::Error::Database), [`Error::ShutDown`](crate::Error::ShutDown).
    #[tracing::instrument(level = "debug", skip_all, fields(user.id = tracing::field::Empty, session.id = %keep))]
    pub async fn delete_other_user_sessions(
        &self,
        user_id: impl Into<UserId>,
        keep: SessionId,
    ) -> Result<u64> {
        let inner = self.enter()?;
        let _timer = Timer::start("delete_other_user");
        let user = user_id.into();
        user.validate()?;
        tracing::Span::current().record("user.id", user.as_str());
        let n = inner.storage.delete_user(&user, &[keep.as_uuid()]).await?;
        inner.emit_bulk(SessionEventKind::UserLoggedOutEverywhere, user, n);
        Ok(n)
    }

    /// Remove attribute `key` from every session of `user_id` (after a permission change: a
    /// cached role, a feature flag), in one statement and one notification however many
    /// sessions there are; every node's cache drops them. Returns how many sessions had it.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidUserId`](crate::Error::InvalidUserId), [`Error::Database`](crate::Error::Database), [`Error::ShutDown`](crate::Error::ShutDown).
    #[tracing::instrument(level = "debug", skip_all, fields(user.id = tracing::field::Empty, key))]
    pub async fn remove_attribute_from_user_sessions(
        &self,
        user_id: impl Into<UserId>,
        key: &str,
    ) -> Result<u64> {
        let inner = self.enter()?;
        let _timer = Timer::start("remove_user_attribute");
        let user = user_id.into();
        user.validate()?;
        crate::model::json::check_key(key)?;
        tracing::Span::current().record("user.id", user.as_str());
        let n = inner
            .storage
            .remove_user_attribute(&user, key, inner.clock.now())
            .await?;
        inner.emit_bulk(SessionEventKind::UserSessionsUpdated, user, n);
        Ok(n)
    }

    /// Delete every session of group `group_id` (a tenant removed, an organisation's forced
    /// logout), in one statement and one notification however many sessions there are.
    /// Returns how many were deleted.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidGroupId`](crate::Error::InvalidGroupId), [`Error::Database`](crate::Error::Database), [`Error::ShutDown`](crate::Error::ShutDown).
    #[tracing::instrument(level = "debug", skip_all, fields(group.id = group_id))]
    pub async fn delete_group_sessions(&self, group_id: &str) -> Result<u64> {
        let inner = self.enter()?;
        let _timer = Timer::start("delete_group");
        validate_group(group_id)?;
        let n = inner.storage.delete_group(group_id).await?;
        if n > 0 {
            inner.events.emit(|| {
                let mut e = SessionEvent::new(SessionEventKind::GroupDeleted, Origin::ThisNode);
                e.group_id = Some(group_id.to_owned());
                e
            });
        }
        Ok(n)
    }

    /// Delete every session of the application ("log everyone out": after a key leak, at a
    /// breaking release), in one statement and one notification; every node's cache is
    /// emptied (a node that misses the message empties it when it reconnects). Returns how
    /// many were deleted.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database), [`Error::ShutDown`](crate::Error::ShutDown).
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn delete_all_sessions(&self) -> Result<u64> {
        let inner = self.enter()?;
        let _timer = Timer::start("delete_all");
        let n = inner.storage.delete_all().await?;
        inner
            .events
            .emit(|| SessionEvent::new(SessionEventKind::AllDeleted, Origin::ThisNode));
        Ok(n)
    }

    /// Sessions, live and not past their absolute expiry, accessed within the last `within`:
    /// for an "active users" figure. One index range scan on `last_accessed_at` (see
    /// BENCHMARKS.md for its time on a million rows). Accesses other nodes have not flushed
    /// yet are not counted, so the figure is exact to one `last_access_flush_interval`.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database), [`Error::ShutDown`](crate::Error::ShutDown).
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn count_active_sessions(&self, within: Duration) -> Result<u64> {
        let inner = self.enter()?;
        let _timer = Timer::start("count_active");
        let now = inner.clock.now();
        let since = now - chrono_duration(within.min(Duration::from_secs(100 * 365 * 86_400)));
        inner.storage.count_active(since, now).await
    }

    /// How many live sessions `user_id` has, as the per-user cap counts them (by the access
    /// times stored; a session idle there counts until it is idle however late other nodes
    /// flush their accesses). One index scan; not an access.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidUserId`](crate::Error::InvalidUserId), [`Error::Database`](crate::Error::Database),
    /// [`Error::ShutDown`](crate::Error::ShutDown).
    #[tracing::instrument(level = "debug", skip_all, fields(user.id = tracing::field::Empty))]
    pub async fn count_user_sessions(&self, user_id: impl Into<UserId>) -> Result<u64> {
        let inner = self.enter()?;
        let _timer = Timer::start("count_user");
        let user = user_id.into();
        user.validate()?;
        tracing::Span::current().record("user.id", user.as_str());
        let now = inner.clock.now();
        let settled = inner.policy.settled_cutoff(now);
        inner.storage.count_user(&user, now, settled).await
    }

    /// One page of every live session of the application, in id order, starting after `after`
    /// (`None`: the first page); at most `limit` sessions (1 to 10 000). Pass the last id of
    /// a page to get the next; an empty page is the end. Keyset pages: a session that exists
    /// from the first page to the last is listed exactly once, whatever is written meanwhile.
    /// Always read from the database; not an access. A stored session that cannot be read back
    /// (written by hand with a value serde_json cannot parse) is left out, logged and counted
    /// in [`Stats::unreadable_sessions`](crate::Stats::unreadable_sessions), rather than failing the page.
    ///
    /// # Errors
    ///
    /// [`Error::Database`](crate::Error::Database), [`Error::ShutDown`](crate::Error::ShutDown).
    ///
    /// # Example
    ///
    /// ```no_run
    /// # async fn run(manager: pgsession::SessionManager) -> pgsession::Result<()> {
    /// let mut after = None;
    /// loop {
    ///     let page = manager.list_sessions(after, 500).await?;
    ///     let Some(last) = page.last() else { break };
    ///     after = Some(last.id());
    ///     for s in &page {
    ///         println!("{} {:?} {:?}", s.id(), s.user_id(), s.ip());
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    #[tracing::instrument(level = "debug", skip_all)]
    pub async fn list_sessions(
        &self,
        after: Option<SessionId>,
        limit: usize,
    ) -> Result<Vec<Session>> {
        let inner = self.enter()?;
        let _timer = Timer::start("list");
        let limit = limit.clamp(1, 10_000);
        let now = inner.clock.now();
        let mut cursor = after.map(SessionId::as_uuid);
        let mut out = Vec::new();
        // Rows expired by inactivity are skipped here, not in SQL (an unflushed access may
        // keep them alive): keep reading until the page is full or the table ends.
        loop {
            let page = inner.storage.page(cursor, now, limit - out.len()).await?;
            let full = page.scanned == limit - out.len();
            cursor = page.last.or(cursor);
            out.extend(
                inner
                    .live(page.records, now)
                    .map(|r| inner.hand_out(r, now)),
            );
            if !full || out.len() == limit {
                return Ok(out);
            }
        }
    }

    /// The live sessions of `user_id`, most recently used first (for a "where you are logged
    /// in" page). Always read from the database; does not count as an access. Sessions that
    /// cannot be read back are left out as in [`list_sessions`](Self::list_sessions).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidUserId`](crate::Error::InvalidUserId), [`Error::Database`](crate::Error::Database), [`Error::ShutDown`](crate::Error::ShutDown).
    #[tracing::instrument(level = "debug", skip_all, fields(user.id = tracing::field::Empty))]
    pub async fn list_user_sessions(&self, user_id: impl Into<UserId>) -> Result<Vec<Session>> {
        let inner = self.enter()?;
        let _timer = Timer::start("list_user");
        let user = user_id.into();
        user.validate()?;
        tracing::Span::current().record("user.id", user.as_str());
        let now = inner.clock.now();
        let records = inner.storage.fetch_user(&user, now).await?;
        let mut records: Vec<Record> = inner.live(records, now).collect();
        records.sort_by_key(|r| std::cmp::Reverse(r.last_accessed_at));
        Ok(records
            .into_iter()
            .map(|r| inner.hand_out(r, now))
            .collect())
    }
}

impl Inner {
    /// The records not expired at `now`, counting this node's unflushed accesses.
    fn live(&self, records: Vec<Record>, now: DateTime<Utc>) -> impl Iterator<Item = Record> {
        records.into_iter().filter_map(move |mut r| {
            if let Some(pending) = self.pending_access(r.id) {
                r.last_accessed_at = r.last_accessed_at.max(pending);
            }
            (!self.policy.is_expired(&r, now)).then_some(r)
        })
    }

    /// Report this node's bulk change of a user's sessions, if there was one.
    fn emit_bulk(&self, kind: SessionEventKind, user: UserId, n: u64) {
        if n > 0 {
            self.events
                .emit(|| SessionEvent::new(kind, Origin::ThisNode).user(Some(user)));
        }
    }
}
