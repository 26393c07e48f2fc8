//! Keeping the caches of many nodes coherent, as a layer around the PostgreSQL storage:
//! [`Coherent`] implements [`Storage`] over [`PgStorage`], serving reads from this node's
//! cache and doing, once for every write, what keeps every cache honest: fill tickets taken
//! before a read or write is sent, this node's own write installed (or evicted) when it
//! returns, an outcome in doubt (lost connection, cancelled caller) evicted and swept, and the
//! write's announcement handed to the announcer. Its tasks are the announcer, the outbox
//! sweep and the listener. The guarantees and their reasoning are in `docs/design.md`.
//!
//! * `cache`, `shard`: the sharded LRU and its generations, floors and trust lease;
//! * `protocol`: the invalidation lines NOTIFY carries;
//! * `outbox`, `announcer`: committed invalidations, announced after commit;
//! * `listener`: LISTEN, resynchronisation, trust.

pub(crate) mod announcer;
pub(crate) mod cache;
pub(crate) mod lease;
pub(crate) mod listener;
pub(crate) mod outbox;
pub(crate) mod protocol;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use self::announcer::Announcer;
use self::cache::{Cache, FillTicket, Lookup, Proof, Tag};
use self::listener::{Listener, ListenerState, PgConnect, Timing};
use self::outbox::Outbox;
use crate::background::Task;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::events::Events;
use crate::manager::Status;
use crate::model::clock::chrono_duration;
use crate::model::expiry::ExpiryPolicy;
use crate::model::ids::UserId;
use crate::model::record::Record;
use crate::storage::postgres::PgStorage;
use crate::storage::postgres::hosts::Hosts;
use crate::storage::{
    Access, Announcement, Created, Deleted, Delta, Io, NewSession, Page, Rotated, Rotation,
    Storage, UpdateOutcome,
};

/// What the layers above storage have counted, for `SessionManager::stats`.
#[derive(Clone, Debug, Default)]
pub(crate) struct Figures {
    pub hits: u64,
    pub misses: u64,
    pub entries: usize,
    pub fills_rejected: u64,
    pub invalidations: u64,
    pub reconnects: u64,
    pub resync_evictions: u64,
    pub degraded_time: Duration,
    pub announced: u64,
    pub announce_messages: u64,
    pub announce_failures: u64,
    pub outbox_backlog: usize,
}

/// PostgreSQL storage with this node's cache kept coherent with every other node's.
pub(crate) struct Coherent {
    pg: Arc<PgStorage>,
    cache: Arc<Cache>,
    outbox: Arc<Outbox>,
    listener: Arc<ListenerState>,
}

impl Coherent {
    /// The layer over `pg`, and its tasks: the announcer and the outbox sweep always, the
    /// listener when the cache is enabled (it listens at `listen`). `tag` is this node's, as
    /// its lines end (`crate::coherence::protocol`).
    pub(crate) fn start(
        pg: Arc<PgStorage>,
        config: &Config,
        channel: String,
        listen: Hosts,
        tag: &str,
        events: Events,
        cancel: &CancellationToken,
    ) -> (Arc<Coherent>, Vec<Task>) {
        let cache = Arc::new(Cache::new(
            config.cache_capacity,
            config.cache_max_age.map(chrono_duration),
        ));
        let outbox = Arc::new(Outbox::new());
        let state = Arc::new(ListenerState::new());
        let mut tasks = vec![
            Task::new(
                "announcer",
                Announcer {
                    outbox: outbox.clone(),
                    store: pg.clone(),
                    hosts: Arc::new(
                        pg.direct_hosts()
                            .map(|o| o.application_name("pgsession-announcer")),
                    ),
                    timeout: config.listener_timeout,
                }
                .run(cancel.clone()),
            ),
            Task::new(
                "outbox sweep",
                announcer::sweep(outbox.clone(), pg.clone(), cancel.clone()),
            ),
            Task::new(
                "idle connection return",
                return_idle_connections(pg.clone(), cancel.clone()),
            ),
        ];
        if cache.enabled() {
            let listener = Listener {
                connect: PgConnect {
                    hosts: Arc::new(listen),
                    channel,
                    store: pg.clone(),
                    timeout: config.listener_timeout,
                },
                cache: cache.clone(),
                state: state.clone(),
                timing: Timing {
                    probe_interval: config.listener_probe_interval,
                    timeout: config.listener_timeout,
                    max_backoff: config.listener_max_backoff,
                },
                events,
                own_tag: tag[2..].to_owned(),
            };
            tasks.push(Task::new("listener", listener.run(cancel.clone())));
        }
        let layer = Coherent {
            pg,
            cache,
            outbox,
            listener: state,
        };
        (Arc::new(layer), tasks)
    }

    /// Queue a write's announcement.
    fn announce(&self, announcement: Option<Announcement>) {
        if let Some(a) = announcement {
            self.outbox.push(a);
        }
    }

    /// No copy of `id` may be served any more: this node deleted it, or cannot vouch for it.
    fn evict(&self, id: Uuid) {
        self.cache.invalidate_deleted(&[id]);
    }
}

impl Storage for Coherent {
    fn serve(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
        latest: DateTime<Utc>,
        idle: Option<chrono::Duration>,
        proof: Proof<'_>,
        min_version: i64,
    ) -> Option<Record> {
        self.cache.serve(id, now, latest, idle, proof, min_version)
    }

    fn lookup(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
        idle: Option<chrono::Duration>,
        proof: Proof<'_>,
        min_version: i64,
    ) -> Lookup {
        self.cache.lookup(id, now, idle, proof, min_version)
    }

    fn ticket(&self, id: Uuid) -> Option<FillTicket> {
        self.cache.ticket(id)
    }

    fn take_served(&self, into: &mut dyn FnMut(Access)) {
        self.cache.take_served(&mut |id, s| {
            into(Access {
                id,
                at: s.at,
                reads: s.reads,
            })
        });
    }

    fn served_sessions(&self) -> Vec<Uuid> {
        self.cache.served_sessions()
    }

    fn served(&self, id: Uuid) -> Option<Access> {
        self.cache.served(id).map(|s| Access {
            id,
            at: s.at,
            reads: s.reads,
        })
    }

    fn fetch(&self, id: Uuid) -> Io<'_, Option<Record>> {
        self.pg.fetch(id)
    }

    fn keep(&self, ticket: FillTicket, record: &Record, now: DateTime<Utc>, tag: Option<Tag>) {
        self.cache.fill(ticket, record, now, tag);
    }

    fn forget(&self, id: Uuid, version: Option<i64>) {
        self.cache.forget(id, version);
    }

    fn fetch_user<'a>(&'a self, user: &'a UserId, now: DateTime<Utc>) -> Io<'a, Vec<Record>> {
        self.pg.fetch_user(user, now)
    }

    fn count_user<'a>(
        &'a self,
        user: &'a UserId,
        now: DateTime<Utc>,
        settled: Option<DateTime<Utc>>,
    ) -> Io<'a, u64> {
        self.pg.count_user(user, now, settled)
    }

    fn page(&self, after: Option<Uuid>, now: DateTime<Utc>, limit: usize) -> Io<'_, Page> {
        self.pg.page(after, now, limit)
    }

    fn count_active(&self, since: DateTime<Utc>, now: DateTime<Utc>) -> Io<'_, u64> {
        self.pg.count_active(since, now)
    }

    fn create<'a>(&'a self, new: &'a NewSession<'a>) -> Io<'a, Created> {
        Box::pin(async move {
            let ticket = self.cache.ticket(new.id);
            let created = self.pg.create(new).await?;
            self.announce(created.announcement);
            // Installed before the evictions, which move shard generations: one sharing this
            // session's shard would otherwise turn this install into an eviction.
            let record = new.record();
            self.cache
                .apply_own_write(new.id, ticket, Some(&record), new.now, new.tag);
            // Other nodes learn of the evictions by notification; this node must not serve
            // them even for the moment until its own notification arrives.
            for gone in &created.evicted {
                self.evict(*gone);
            }
            Ok(Created {
                evicted: created.evicted,
                announcement: None,
            })
        })
    }

    fn update<'a>(&'a self, delta: &'a Delta<'a>) -> Io<'a, UpdateOutcome> {
        Box::pin(async move {
            let ticket = self.cache.ticket(delta.id);
            let doubt = InDoubt::arm(self, delta.id);
            let outcome = doubt.settle(self.pg.update(delta).await)?;
            Ok(match outcome {
                UpdateOutcome::Updated {
                    record,
                    announcement,
                } => {
                    self.announce(announcement);
                    self.cache
                        .apply_own_write(delta.id, ticket, Some(&record), delta.now, None);
                    UpdateOutcome::Updated {
                        record,
                        announcement: None,
                    }
                }
                // Nothing was written, and this node's copy is as good as it was.
                too_large @ UpdateOutcome::TooLarge { .. } => too_large,
                // Gone, or (with the lock) changed: either way this node's copy may be
                // behind, and a retry must read the database.
                refused => {
                    self.evict(delta.id);
                    refused
                }
            })
        })
    }

    fn rotate<'a>(&'a self, r: &'a Rotation<'a>) -> Io<'a, Option<Rotated>> {
        Box::pin(async move {
            let (old, now) = (r.delta.id, r.delta.now);
            let ticket = self.cache.ticket(r.new_id);
            let doubt = InDoubt::arm(self, old);
            let Some(rotated) = doubt.settle(self.pg.rotate(r).await)? else {
                self.evict(old);
                return Ok(None);
            };
            self.announce(rotated.announcement);
            // The new state first: the evictions below move shard generations (see create).
            self.cache
                .apply_own_write(r.new_id, ticket, Some(&rotated.record), now, r.tag);
            if r.new_id != old {
                self.evict(old);
            }
            for gone in &rotated.evicted {
                self.evict(*gone);
            }
            Ok(Some(Rotated {
                announcement: None,
                ..rotated
            }))
        })
    }

    fn delete(&self, id: Uuid) -> Io<'_, Deleted> {
        Box::pin(async move {
            let doubt = InDoubt::arm(self, id);
            let deleted = doubt.settle(self.pg.delete(id).await)?;
            if deleted.retried {
                // The attempt that lost its connection may have deleted it, unannounced.
                self.outbox.in_doubt();
            }
            self.evict(id);
            self.announce(deleted.announcement);
            Ok(Deleted {
                announcement: None,
                ..deleted
            })
        })
    }

    fn delete_user<'a>(&'a self, user: &'a UserId, keep: &'a [Uuid]) -> Io<'a, u64> {
        Box::pin(async move {
            let n = self.pg.delete_user(user, keep).await?;
            self.cache.invalidate_user(user);
            Ok(n)
        })
    }

    fn delete_group<'a>(&'a self, group: &'a str) -> Io<'a, u64> {
        Box::pin(async move {
            let n = self.pg.delete_group(group).await?;
            self.cache
                .invalidate_where(|r| r.group_id.as_deref() == Some(group));
            Ok(n)
        })
    }

    fn delete_all(&self) -> Io<'_, u64> {
        Box::pin(async move {
            let (n, epoch) = self.pg.delete_all_sessions().await?;
            self.listener.see_epoch(epoch);
            self.cache.clear();
            Ok(n)
        })
    }

    fn remove_user_attribute<'a>(
        &'a self,
        user: &'a UserId,
        key: &'a str,
        now: DateTime<Utc>,
    ) -> Io<'a, u64> {
        Box::pin(async move {
            let n = self.pg.remove_user_attribute(user, key, now).await?;
            self.cache.invalidate_user(user);
            Ok(n)
        })
    }

    fn clear_caches(&self) -> Io<'_, ()> {
        Box::pin(async move {
            let epoch = self.pg.broadcast_clear().await?;
            self.listener.see_epoch(epoch);
            self.cache.clear();
            Ok(())
        })
    }

    fn touch<'a>(&'a self, accesses: &'a [Access]) -> Io<'a, u64> {
        self.pg.touch(accesses)
    }

    fn cleanup_batch(
        &self,
        now: DateTime<Utc>,
        settled: Option<DateTime<Utc>>,
        limit: usize,
    ) -> Io<'_, Vec<(Uuid, Option<UserId>)>> {
        self.pg.cleanup_batch(now, settled, limit)
    }

    fn cleanup_attributes(&self, now: DateTime<Utc>, limit: usize) -> Io<'_, u64> {
        self.pg.cleanup_attributes(now, limit)
    }

    fn cleanup_done(&self, at: DateTime<Utc>) -> Io<'_, ()> {
        self.pg.cleanup_done(at)
    }

    fn status<'a>(&'a self, policy: &'a ExpiryPolicy, now: DateTime<Utc>) -> Io<'a, Status> {
        self.pg.status(policy, now)
    }

    fn unreadable(&self) -> u64 {
        self.pg.unreadable()
    }

    fn caching(&self) -> bool {
        self.cache.enabled()
    }

    fn trusted(&self) -> bool {
        self.cache.trusted()
    }

    fn trust(&self) -> Option<watch::Receiver<bool>> {
        Some(self.listener.subscribe())
    }

    fn figures(&self) -> Figures {
        let c = self.cache.counters();
        let l = &self.listener;
        Figures {
            hits: c.hits,
            misses: c.misses,
            entries: c.entries,
            fills_rejected: c.fills_rejected,
            invalidations: l.invalidations.load(Ordering::Relaxed),
            reconnects: l.reconnects.load(Ordering::Relaxed),
            resync_evictions: l.resync_evictions.load(Ordering::Relaxed),
            degraded_time: if self.cache.enabled() {
                l.degraded_time()
            } else {
                Duration::ZERO
            },
            announced: self.outbox.announced.load(Ordering::Relaxed),
            announce_messages: self.outbox.messages.load(Ordering::Relaxed),
            announce_failures: self.outbox.failures.load(Ordering::Relaxed),
            outbox_backlog: self.outbox.len(),
        }
    }

    fn pool(&self) -> Option<&sqlx::PgPool> {
        Some(self.pg.pool())
    }

    fn close(&self) {
        self.pg.connections().close();
    }
}

/// Covers an update, rotation or delete while its statement is under way. If it ends without
/// a known outcome (the connection died with the statement sent, or the caller's future was
/// dropped), the write may have committed with nobody to announce it: this node stops serving
/// its cached copy, and every outbox row is announced at once instead of after the sweep's
/// grace.
struct InDoubt<'a> {
    layer: &'a Coherent,
    id: Uuid,
    armed: bool,
}

impl<'a> InDoubt<'a> {
    fn arm(layer: &'a Coherent, id: Uuid) -> InDoubt<'a> {
        InDoubt {
            layer,
            id,
            armed: true,
        }
    }

    /// The statement's result: errors that prove nothing was committed disarm the guard.
    fn settle<T>(mut self, result: Result<T>) -> Result<T> {
        self.armed = match &result {
            Ok(_) => false,
            Err(Error::Database(e)) => !crate::error::proves_nothing_written(e),
            // A refusal (too large, over the cap, a closed pool): rolled back or never sent.
            Err(_) => false,
        };
        result
    }
}

impl Drop for InDoubt<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.layer.evict(self.id);
            self.layer.outbox.in_doubt();
        }
    }
}

/// Give connections kept between statements back to the pool once they have been idle for a
/// while, so that others sharing it get them (see `storage::postgres::connections`).
async fn return_idle_connections(pg: Arc<PgStorage>, cancel: CancellationToken) -> Result<()> {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(crate::storage::postgres::connections::IDLE_RETURN) => {}
        }
        pg.connections().return_idle(false);
    }
}
