//! [`Storage`] on PostgreSQL: each operation one statement (see `sql.rs`), run again when
//! that is harmless and its connection was lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, Row};
use uuid::Uuid;

use super::PgStorage;
use super::retry::{again_if_lost_or_rolled_back, again_if_rolled_back, on_conn};
use super::rows;
use super::sql::{ISOLATION_SQLSTATE, MAX_SESSIONS_SQLSTATE, TOO_LARGE_SQLSTATE};
use crate::error::{Error, Result};
use crate::manager::{ListeningNode, Status};
use crate::model::expiry::ExpiryPolicy;
use crate::model::ids::UserId;
use crate::model::record::Record;
use crate::storage::{
    Access, Announcement, Created, Deleted, Delta, Io, NewSession, Page, Rotated, Rotation,
    Storage, Stored, UpdateOutcome,
};

/// Schema version, sessions, live, anonymous, active in 5 minutes, outbox rows, oldest outbox
/// row, last cleanup.
type StatusRow = (
    Option<i32>,
    i64,
    i64,
    i64,
    i64,
    i64,
    Option<DateTime<Utc>>,
    Option<DateTime<Utc>>,
);

/// A listening node: backend pid, application name, client address, connected since.
type ListenerRow = (i32, Option<String>, Option<String>, Option<DateTime<Utc>>);

/// Version, absolute expiry, last access, merged size, size (see [`Stored`]).
type StoredRow = (i64, DateTime<Utc>, DateTime<Utc>, i64, i64);

/// The announcement columns (`seq`, `payload`) of a row, when present.
fn announcement(row: &sqlx::postgres::PgRow) -> Result<Option<Announcement>, sqlx::Error> {
    let seq: Option<i64> = row.try_get("seq")?;
    let payload: Option<String> = row.try_get("payload")?;
    Ok(seq
        .zip(payload)
        .map(|(seq, payload)| Announcement { seq, payload }))
}

impl Storage for PgStorage {
    fn fetch(&self, id: Uuid) -> Io<'_, Option<Record>> {
        Box::pin(async move {
            let row = again_if_lost_or_rolled_back(|_| async {
                on_conn!(
                    self,
                    sqlx::query(AssertSqlSafe(self.sql.select_one.clone())).bind(id),
                    fetch_optional
                )
            })
            .await?;
            row.map(|row| rows::record(&row)).transpose()
        })
    }

    fn fetch_user<'a>(&'a self, user: &'a UserId, now: DateTime<Utc>) -> Io<'a, Vec<Record>> {
        Box::pin(async move {
            let rows = again_if_lost_or_rolled_back(|_| async {
                on_conn!(
                    self,
                    sqlx::query(AssertSqlSafe(self.sql.select_user.clone()))
                        .bind(user.as_str())
                        .bind(now),
                    fetch_all
                )
            })
            .await?;
            Ok(self.readable(&rows))
        })
    }

    fn count_user<'a>(
        &'a self,
        user: &'a UserId,
        now: DateTime<Utc>,
        settled: Option<DateTime<Utc>>,
    ) -> Io<'a, u64> {
        Box::pin(async move {
            let n: i64 = again_if_lost_or_rolled_back(|_| async {
                on_conn!(
                    self,
                    sqlx::query_scalar(AssertSqlSafe(self.sql.count_user.clone()))
                        .bind(user.as_str())
                        .bind(now)
                        .bind(settled),
                    fetch_one
                )
            })
            .await?;
            Ok(n as u64)
        })
    }

    fn page(&self, after: Option<Uuid>, now: DateTime<Utc>, limit: usize) -> Io<'_, Page> {
        Box::pin(async move {
            let rows = again_if_lost_or_rolled_back(|_| async {
                on_conn!(
                    self,
                    sqlx::query(AssertSqlSafe(self.sql.page.clone()))
                        .bind(after)
                        .bind(now)
                        .bind(limit as i64),
                    fetch_all
                )
            })
            .await?;
            Ok(Page {
                scanned: rows.len(),
                last: rows.last().map(|row| row.try_get("id")).transpose()?,
                records: self.readable(&rows),
            })
        })
    }

    fn count_active(&self, since: DateTime<Utc>, now: DateTime<Utc>) -> Io<'_, u64> {
        Box::pin(async move {
            let n: i64 = again_if_lost_or_rolled_back(|_| async {
                on_conn!(
                    self,
                    sqlx::query_scalar(AssertSqlSafe(self.sql.count_active.clone()))
                        .bind(since)
                        .bind(now),
                    fetch_one
                )
            })
            .await?;
            Ok(n as u64)
        })
    }

    /// A create whose connection was lost may have committed: the id is ours alone, so the
    /// retry first looks for it, and runs the create again only if it is not there (the
    /// sessions the lost attempt evicted were announced by its own commit). Evicting rows can
    /// deadlock with another node's last-access flush; the transaction was then rolled back
    /// entirely, and runs again too.
    fn create<'a>(&'a self, new: &'a NewSession<'a>) -> Io<'a, Created> {
        Box::pin(async move {
            let result = again_if_lost_or_rolled_back(|attempt| async move {
                if attempt > 0 {
                    let exists = on_conn!(
                        self,
                        sqlx::query(AssertSqlSafe(self.sql.select_one.clone())).bind(new.id),
                        fetch_optional
                    )?;
                    if exists.is_some() {
                        // The lost attempt's outbox entry is left to the sweep.
                        return Ok(Created {
                            evicted: Vec::new(),
                            announcement: None,
                        });
                    }
                }
                let user = new.user_id.map(UserId::as_str);
                let ip = new.client.ip.map(|ip| ip.to_string());
                let no_expiry = Json(serde_json::Map::new());
                match new.cap.filter(|_| user.is_some()) {
                    None => {
                        let sql = if new.announce {
                            &self.sql.insert_announced
                        } else {
                            &self.sql.insert
                        };
                        let queued: Option<(i64, String)> = on_conn!(
                            self,
                            sqlx::query_as(AssertSqlSafe(sql.clone()))
                                .bind(new.id)
                                .bind(user)
                                .bind(Json(new.attributes))
                                .bind(new.now)
                                .bind(new.expires_at)
                                .bind(new.group_id)
                                .bind(&ip)
                                .bind(new.client.user_agent.as_deref())
                                .bind(&no_expiry)
                                .bind(None::<DateTime<Utc>>),
                            fetch_optional
                        )?;
                        Ok(Created {
                            evicted: Vec::new(),
                            announcement: queued
                                .map(|(seq, payload)| Announcement { seq, payload }),
                        })
                    }
                    Some((cap, reject)) => {
                        let row = on_conn!(
                            self,
                            sqlx::query(AssertSqlSafe(self.sql.create_capped.clone()))
                                .bind(new.id)
                                .bind(user)
                                .bind(Json(new.attributes))
                                .bind(new.now)
                                .bind(new.expires_at)
                                .bind(new.settled)
                                // validated to fit i32
                                .bind(cap as i32)
                                .bind(reject)
                                .bind(new.group_id)
                                .bind(&ip)
                                .bind(new.client.user_agent.as_deref())
                                .bind(&no_expiry)
                                .bind(None::<DateTime<Utc>>)
                                .bind(new.announce),
                            fetch_one
                        )?;
                        Ok(Created {
                            evicted: row.try_get("evicted")?,
                            announcement: announcement(&row)?,
                        })
                    }
                }
            })
            .await;
            match result {
                Ok(created) => Ok(created),
                Err(sqlx::Error::Database(e)) => match e.code().as_deref() {
                    Some(MAX_SESSIONS_SQLSTATE) => Err(Error::MaxSessionsReached),
                    Some(ISOLATION_SQLSTATE) => Err(Error::InvalidConfig(e.message().to_owned())),
                    // Only the id is unique.
                    Some("23505") => Err(Error::AlreadyExists),
                    _ => Err(sqlx::Error::Database(e).into()),
                },
                Err(e) => Err(e.into()),
            }
        })
    }

    /// One round trip; when it changes nothing, a second read tells why.
    fn update<'a>(&'a self, delta: &'a Delta<'a>) -> Io<'a, UpdateOutcome> {
        Box::pin(async move {
            let expiry = Json(rows::expiry_json(&delta.set_expiry));
            // A refusal diagnosed on a row that changed again meanwhile (the merge fits now,
            // the version matches): try once more.
            for _ in 0..3 {
                let row = on_conn!(
                    self,
                    sqlx::query(AssertSqlSafe(self.sql.update.clone()))
                        .bind(delta.id)
                        .bind(&delta.removed)
                        .bind(Json(&delta.set))
                        .bind(delta.expires_at)
                        .bind(delta.now)
                        .bind(delta.idle_cutoff)
                        .bind(delta.pending_access)
                        .bind(delta.base_version)
                        .bind(&expiry)
                        .bind(delta.set_expiry.values().min().copied())
                        .bind(delta.expect_version)
                        .bind(delta.max_size as i64),
                    fetch_optional
                )?;
                if let Some(row) = row {
                    return Ok(UpdateOutcome::Updated {
                        record: Box::new(rows::written(&row, delta.id, delta.base)?),
                        announcement: announcement(&row)?,
                    });
                }
                let current: Option<StoredRow> = again_if_lost_or_rolled_back(|_| async {
                    on_conn!(
                        self,
                        sqlx::query_as(AssertSqlSafe(self.sql.current.clone()))
                            .bind(delta.id)
                            .bind(&delta.removed)
                            .bind(Json(&delta.set)),
                        fetch_optional
                    )
                })
                .await?;
                let Some((version, expires_at, last, size, before)) = current else {
                    return Ok(UpdateOutcome::Gone);
                };
                let stored = Stored {
                    version,
                    expires_at,
                    last_accessed_at: last,
                    merged_size: size as usize,
                    size: before as usize,
                };
                if let Some(refusal) = delta.refusal(&stored) {
                    return Ok(refusal);
                }
            }
            tracing::warn!(
                session.id = %delta.id.simple(),
                "pgsession: an update kept being refused with no reason found; reported as gone"
            );
            Ok(UpdateOutcome::Gone)
        })
    }

    /// A login locks the user's rows in id order, as bulk writes do; a bulk write that met a
    /// row while this rotation was moving it to its new id can still close a cycle, which
    /// PostgreSQL breaks by rolling one transaction back whole. It runs again then: nothing of
    /// the attempt was written.
    fn rotate<'a>(&'a self, r: &'a Rotation<'a>) -> Io<'a, Option<Rotated>> {
        Box::pin(async move {
            let d = r.delta;
            let (set_user, user) = match r.user {
                Some(user) => (true, user.map(UserId::as_str)),
                None => (false, None),
            };
            let (cap, reject) = match r.cap {
                Some((cap, reject)) => (Some(cap as i32), reject),
                None => (None, false),
            };
            let expiry = Json(rows::expiry_json(&d.set_expiry));
            let row = again_if_rolled_back(|| async {
                on_conn!(
                    self,
                    sqlx::query(AssertSqlSafe(self.sql.rotate.clone()))
                        .bind(d.id)
                        .bind(r.new_id)
                        .bind(set_user)
                        .bind(user)
                        .bind(&d.removed)
                        .bind(Json(&d.set))
                        .bind(d.expires_at)
                        .bind(d.now)
                        .bind(d.idle_cutoff)
                        .bind(d.pending_access)
                        .bind(r.settled)
                        .bind(cap)
                        .bind(reject)
                        .bind(&expiry)
                        .bind(d.set_expiry.values().min().copied())
                        .bind(d.max_size as i64),
                    fetch_optional
                )
            })
            .await;
            let row = match row {
                Ok(row) => row,
                Err(sqlx::Error::Database(e)) => {
                    return Err(match e.code().as_deref() {
                        Some(MAX_SESSIONS_SQLSTATE) => Error::MaxSessionsReached,
                        Some(TOO_LARGE_SQLSTATE) => Error::SessionTooLarge {
                            size: e
                                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                                .and_then(|pg| pg.detail()?.parse().ok())
                                .unwrap_or(0),
                            limit: d.max_size,
                        },
                        _ => sqlx::Error::Database(e).into(),
                    });
                }
                Err(e) => return Err(e.into()),
            };
            let Some(row) = row else { return Ok(None) };
            Ok(Some(Rotated {
                // The function returns no id column: the row now has the new one.
                record: rows::written(&row, r.new_id, d.base)?,
                evicted: row.try_get("evicted")?,
                announcement: announcement(&row)?,
            }))
        })
    }

    fn delete(&self, id: Uuid) -> Io<'_, Deleted> {
        Box::pin(async move {
            let retried = AtomicBool::new(false);
            let queued: Option<(i64, String)> = again_if_lost_or_rolled_back(|attempt| {
                retried.store(attempt > 0, Ordering::Relaxed);
                async move {
                    on_conn!(
                        self,
                        sqlx::query_as(AssertSqlSafe(self.sql.delete.clone())).bind(id),
                        fetch_optional
                    )
                }
            })
            .await?;
            Ok(Deleted {
                existed: queued.is_some(),
                announcement: queued.map(|(seq, payload)| Announcement { seq, payload }),
                retried: retried.load(Ordering::Relaxed),
            })
        })
    }

    fn delete_user<'a>(&'a self, user: &'a UserId, keep: &'a [Uuid]) -> Io<'a, u64> {
        Box::pin(async move {
            let n: i64 = again_if_lost_or_rolled_back(|_| async {
                on_conn!(
                    self,
                    sqlx::query_scalar(AssertSqlSafe(self.sql.delete_user.clone()))
                        .bind(user.as_str())
                        .bind(keep),
                    fetch_one
                )
            })
            .await?;
            Ok(n as u64)
        })
    }

    fn delete_group<'a>(&'a self, group: &'a str) -> Io<'a, u64> {
        Box::pin(self.bulk(&self.sql.delete_group, group, None))
    }

    fn delete_all(&self) -> Io<'_, u64> {
        Box::pin(async move { Ok(self.delete_all_sessions().await?.0) })
    }

    fn remove_user_attribute<'a>(
        &'a self,
        user: &'a UserId,
        key: &'a str,
        now: DateTime<Utc>,
    ) -> Io<'a, u64> {
        Box::pin(self.bulk(
            &self.sql.remove_user_attribute,
            user.as_str(),
            Some((key, now)),
        ))
    }

    fn clear_caches(&self) -> Io<'_, ()> {
        Box::pin(async move { self.broadcast_clear().await.map(|_| ()) })
    }

    /// Sorted by id (see `Touches`), which keeps concurrent flushes from several nodes mostly
    /// in the same lock order; a deadlock with another statement is still possible and is
    /// handled by retrying the flush later.
    fn touch<'a>(&'a self, accesses: &'a [Access]) -> Io<'a, u64> {
        Box::pin(async move {
            let ids: Vec<Uuid> = accesses.iter().map(|a| a.id).collect();
            let times: Vec<DateTime<Utc>> = accesses.iter().map(|a| a.at).collect();
            let reads: Vec<i64> = accesses.iter().map(|a| a.reads).collect();
            let done = on_conn!(
                self,
                sqlx::query(AssertSqlSafe(self.sql.touch.clone()))
                    .bind(&ids)
                    .bind(&times)
                    .bind(&reads),
                execute
            )?;
            Ok(done.rows_affected())
        })
    }

    fn cleanup_batch(
        &self,
        now: DateTime<Utc>,
        settled: Option<DateTime<Utc>>,
        limit: usize,
    ) -> Io<'_, Vec<(Uuid, Option<UserId>)>> {
        Box::pin(async move {
            let (_deleted, _messages, ids, users): (i64, i64, Vec<Uuid>, Vec<Option<String>>) = on_conn!(
                self,
                sqlx::query_as(AssertSqlSafe(self.sql.cleanup.clone()))
                    .bind(now)
                    .bind(settled)
                    .bind(limit as i64),
                fetch_one
            )?;
            Ok(ids
                .into_iter()
                .zip(users.into_iter().map(|u| u.map(UserId::from)))
                .collect())
        })
    }

    fn cleanup_attributes(&self, now: DateTime<Utc>, limit: usize) -> Io<'_, u64> {
        Box::pin(async move {
            let done = on_conn!(
                self,
                sqlx::query(AssertSqlSafe(self.sql.cleanup_attributes.clone()))
                    .bind(now)
                    .bind(now.timestamp_micros())
                    .bind(limit as i64),
                execute
            )?;
            Ok(done.rows_affected())
        })
    }

    fn cleanup_done(&self, at: DateTime<Utc>) -> Io<'_, ()> {
        Box::pin(async move {
            on_conn!(
                self,
                sqlx::query(AssertSqlSafe(self.sql.cleanup_done.clone())).bind(at),
                execute
            )?;
            Ok(())
        })
    }

    fn status<'a>(&'a self, policy: &'a ExpiryPolicy, now: DateTime<Utc>) -> Io<'a, Status> {
        Box::pin(async move {
            let idle = policy.idle.and_then(|d| d.to_std().ok());
            let (version, sessions, live, anonymous, active, backlog, oldest, cleanup): StatusRow =
                on_conn!(
                    self,
                    sqlx::query_as(AssertSqlSafe(self.sql.status.clone()))
                        .bind(idle.map(|d| d.as_secs_f64()))
                        .bind(now),
                    fetch_one
                )?;
            let listeners: Vec<ListenerRow> = on_conn!(
                self,
                sqlx::query_as(AssertSqlSafe(self.sql.listeners.clone()))
                    .bind(format!("{}%", self.listener_prefix)),
                fetch_all
            )?;
            Ok(Status {
                schema_version: version,
                sessions: sessions as u64,
                live: live as u64,
                anonymous: anonymous as u64,
                active_last_5_minutes: active as u64,
                outbox_backlog: backlog as u64,
                outbox_oldest: oldest,
                listening_nodes: listeners
                    .into_iter()
                    .map(|(pid, name, addr, since)| ListeningNode {
                        pid,
                        application_name: name.unwrap_or_default(),
                        client_addr: addr,
                        connected_since: since,
                    })
                    .collect(),
                last_cleanup: cleanup,
            })
        })
    }

    fn unreadable(&self) -> u64 {
        self.unreadable.load(Ordering::Relaxed)
    }
}

impl PgStorage {
    /// Run a bulk statement returning `(count, notification)`, again if its connection is lost
    /// (running it twice leaves the same state).
    async fn bulk(
        &self,
        sql: &Arc<str>,
        subject: &str,
        key: Option<(&str, DateTime<Utc>)>,
    ) -> Result<u64> {
        let (n, _): (i64, Option<String>) = again_if_lost_or_rolled_back(|_| async {
            let mut query = sqlx::query_as(AssertSqlSafe(sql.clone())).bind(subject);
            if let Some((key, now)) = key {
                query = query.bind(key).bind(now);
            }
            on_conn!(self, query, fetch_one)
        })
        .await?;
        Ok(n as u64)
    }
}
