//! Where sessions live: PostgreSQL (the [`Store`]) or this process's memory (the
//! [`MemoryStore`] of `SessionManager::in_memory`). The operations and the background work run
//! over this one interface, so both backends share every rule above the storage itself.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::error::Result;
use crate::ids::UserId;
use crate::memory::MemoryStore;
use crate::record::Record;
use crate::store::{Delta, NewSession, Page, Queued, Rotated, Rotation, Store, UpdateOutcome};

pub(crate) enum Backend {
    Pg(Arc<Store>),
    Memory(MemoryStore),
}

impl Backend {
    /// The PostgreSQL store, if that is the backend.
    pub(crate) fn pg(&self) -> Option<&Arc<Store>> {
        match self {
            Backend::Pg(store) => Some(store),
            Backend::Memory(_) => None,
        }
    }

    pub(crate) async fn fetch(&self, id: Uuid) -> Result<Option<Record>> {
        match self {
            Backend::Pg(s) => s.fetch(id).await,
            Backend::Memory(m) => Ok(m.fetch(id)),
        }
    }

    pub(crate) async fn fetch_user(
        &self,
        user: &UserId,
        now: DateTime<Utc>,
    ) -> Result<Vec<Record>> {
        match self {
            Backend::Pg(s) => s.fetch_user(user, now).await,
            Backend::Memory(m) => Ok(m.fetch_user(user, now)),
        }
    }

    /// Returns the sessions evicted for the cap, and the create's announcement, if any.
    pub(crate) async fn create(&self, new: &NewSession<'_>) -> Result<(Vec<Uuid>, Option<Queued>)> {
        match self {
            Backend::Pg(s) => s.create(new).await,
            Backend::Memory(m) => Ok((m.create(new)?, None)),
        }
    }

    pub(crate) async fn update(&self, d: &Delta<'_>) -> Result<UpdateOutcome> {
        match self {
            Backend::Pg(s) => s.update(d).await,
            Backend::Memory(m) => Ok(m.update(d)),
        }
    }

    pub(crate) async fn rotate(&self, r: &Rotation<'_>) -> Result<Option<Rotated>> {
        match self {
            Backend::Pg(s) => s.rotate(r).await,
            Backend::Memory(m) => m.rotate(r),
        }
    }

    /// Whether the session existed, its outbox entry, and whether the delete ran again after a
    /// lost connection.
    pub(crate) async fn delete(&self, id: Uuid) -> Result<(bool, Option<Queued>, bool)> {
        match self {
            Backend::Pg(s) => {
                let (queued, retried) = s.delete(id).await?;
                Ok((queued.is_some(), queued, retried))
            }
            Backend::Memory(m) => Ok((m.delete(id), None, false)),
        }
    }

    pub(crate) async fn delete_user(&self, user: &UserId, keep: &[Uuid]) -> Result<u64> {
        match self {
            Backend::Pg(s) => s.delete_user(user, keep).await,
            Backend::Memory(m) => {
                Ok(m.delete_where(|r| r.user_id.as_ref() == Some(user) && !keep.contains(&r.id)))
            }
        }
    }

    pub(crate) async fn delete_group(&self, group: &str) -> Result<u64> {
        match self {
            Backend::Pg(s) => s.delete_group(group).await,
            Backend::Memory(m) => Ok(m.delete_where(|r| r.group_id.as_deref() == Some(group))),
        }
    }

    /// How many, and the new cache epoch.
    pub(crate) async fn delete_all(&self) -> Result<(u64, i64)> {
        match self {
            Backend::Pg(s) => s.delete_all().await,
            Backend::Memory(m) => Ok(m.delete_all()),
        }
    }

    pub(crate) async fn remove_user_attribute(
        &self,
        user: &UserId,
        key: &str,
        now: DateTime<Utc>,
    ) -> Result<u64> {
        match self {
            Backend::Pg(s) => s.remove_user_attribute(user, key, now).await,
            Backend::Memory(m) => Ok(m.remove_user_attribute(user, key, now)),
        }
    }

    pub(crate) async fn touch(
        &self,
        ids: &[Uuid],
        times: &[DateTime<Utc>],
        reads: &[i64],
    ) -> Result<u64> {
        match self {
            Backend::Pg(s) => s.touch(ids, times, reads).await,
            Backend::Memory(m) => Ok(m.touch(ids, times, reads)),
        }
    }

    pub(crate) async fn cleanup_batch(
        &self,
        now: DateTime<Utc>,
        idle_cutoff: Option<DateTime<Utc>>,
        limit: usize,
    ) -> Result<Vec<(Uuid, Option<UserId>)>> {
        match self {
            Backend::Pg(s) => s.cleanup_batch(now, idle_cutoff, limit).await,
            Backend::Memory(m) => Ok(m.cleanup(now, idle_cutoff, limit)),
        }
    }

    /// How many sessions lost expired attributes (in memory: all at once).
    pub(crate) async fn cleanup_attributes(&self, now: DateTime<Utc>, limit: usize) -> Result<u64> {
        match self {
            Backend::Pg(s) => s.cleanup_attributes(now, limit).await,
            Backend::Memory(m) => Ok(m.cleanup_attributes(now)),
        }
    }

    pub(crate) async fn count_active(
        &self,
        since: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<u64> {
        match self {
            Backend::Pg(s) => s.count_active(since, now).await,
            Backend::Memory(m) => Ok(m.count_active(since, now)),
        }
    }

    pub(crate) async fn page(
        &self,
        after: Option<Uuid>,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Page> {
        match self {
            Backend::Pg(s) => s.page(after, now, limit).await,
            Backend::Memory(m) => Ok(m.page(after, now, limit)),
        }
    }

    /// Record the end of a cleanup run.
    pub(crate) async fn cleanup_done(&self, at: DateTime<Utc>) -> Result<()> {
        match self {
            Backend::Pg(s) => s.cleanup_done(at).await,
            Backend::Memory(m) => {
                m.cleanup_done(at);
                Ok(())
            }
        }
    }

    /// The new cache epoch.
    pub(crate) async fn broadcast_clear(&self) -> Result<i64> {
        match self {
            Backend::Pg(s) => s.broadcast_clear().await,
            Backend::Memory(m) => Ok(m.clear()),
        }
    }
}
