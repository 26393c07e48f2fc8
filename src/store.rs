//! Every SQL statement pgsession runs on its tables. (The schema itself is in `migrations/`;
//! `migrate.rs` holds only the statements that keep track of applied migrations.)
//!
//! Each write is one statement, hence one round trip, and records its cache invalidation in
//! the same statement, so the invalidation exists exactly when the write committed. Frequent
//! writes (update, delete) queue it in the outbox table, announced right after by the outbox
//! task (see [`crate::outbox`]); rare bulk writes (logout everywhere, cap eviction, cleanup,
//! clear) call `pg_notify` directly in a CTE. Payloads follow the protocol in
//! [`crate::notify`]; ids are sent as 32 hex digits.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use sqlx::postgres::{PgArguments, PgConnection, PgExecutor, PgPool, PgRow, Postgres};
use sqlx::query::Query;
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, Row};
use uuid::Uuid;

use crate::connections::Connections;
use crate::error::{Error, Result, is_connection_lost};
use crate::ids::UserId;
use crate::names::Names;
use crate::record::Record;

/// Run `$query.$method(conn)` on a kept or pooled connection (see [`crate::connections`]),
/// keeping the connection for the next statement when the statement completed.
macro_rules! on_conn {
    ($store:expr, $query:expr, $method:ident) => {{
        let mut conn = $store.conns.acquire().await?;
        let result = $query.$method(&mut **conn).await;
        conn.keep_if(&result);
        result
    }};
}

/// Most attempts of a statement that may safely run again when its connection turns out to be
/// dead. A kept connection is not checked before use the way the pool checks one on checkout,
/// and after a database restart or a mass `pg_terminate_backend` every idle connection is
/// dead, the pool's included: each of them fails at once, so a few attempts reach a live one.
const ATTEMPTS_IF_LOST: usize = 12;

/// Run `statement` again (up to [`ATTEMPTS_IF_LOST`] times) while its connection is lost, or
/// while it deadlocks (the transaction was rolled back). Only for statements that give the same
/// outcome when run twice: reads, deletes. For other writes, whether a lost one committed is
/// unknown, so they report the failure instead.
async fn again_if_lost<T, F, Fut>(statement: F) -> Result<T, sqlx::Error>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    let mut attempt = 0;
    loop {
        match statement(attempt).await {
            Err(e)
                if attempt + 1 < ATTEMPTS_IF_LOST
                    && (is_connection_lost(&e) || is_deadlock(&e)) =>
            {
                attempt += 1;
            }
            other => return other,
        }
    }
}

fn is_deadlock(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("40P01" | "40001")))
}

/// SQLSTATE raised by the create function when the cap policy is "reject".
const MAX_SESSIONS_SQLSTATE: &str = "PS001";
/// SQLSTATE raised by the create function outside READ COMMITTED.
const ISOLATION_SQLSTATE: &str = "PS002";

/// Session ids per deletion message: 200 ids of 33 bytes keep a payload near 6.6 kB, under
/// NOTIFY's limit of 8000 bytes.
pub(crate) const IDS_PER_MESSAGE: usize = 200;

/// Single-session invalidations (`u …`, `d …`, at most 54 bytes each) per message when the
/// sweep announces orphaned outbox rows: about 5.5 kB, under NOTIFY's 8000 bytes.
const LINES_PER_MESSAGE: usize = 100;

/// Most orphaned outbox rows one sweep statement announces.
pub(crate) const SWEEP_BATCH: usize = 1000;

/// The listener's liveness probe, run on the listener's own connection: it must receive the
/// notification it sends. `$1` channel, `$2` payload.
pub(crate) const PROBE: &str = "SELECT pg_notify($1, $2)";

/// The isolation level new transactions on a connection get.
const DEFAULT_ISOLATION: &str = "SELECT current_setting('default_transaction_isolation')";

const COLUMNS: &str =
    "id, user_id, version, attributes, created_at, updated_at, last_accessed_at, expires_at";

/// The statements, rendered once with this manager's table and channel names.
struct Sql {
    select_one: Arc<str>,
    select_user: Arc<str>,
    insert: Arc<str>,
    create_capped: Arc<str>,
    rotate: Arc<str>,
    update: Arc<str>,
    delete: Arc<str>,
    announce: Arc<str>,
    retire: Arc<str>,
    sweep: Arc<str>,
    delete_user: Arc<str>,
    touch: Arc<str>,
    cleanup: Arc<str>,
    versions: Arc<str>,
    clear: Arc<str>,
    epoch: Arc<str>,
}

/// Every statement by name, rendered for `names`: see [`crate::statements`].
pub(crate) fn statements(names: &Names) -> Vec<(&'static str, String)> {
    let sql = Sql::new(names);
    [
        ("select_one", &sql.select_one),
        ("select_user", &sql.select_user),
        ("insert", &sql.insert),
        ("create_capped", &sql.create_capped),
        ("rotate", &sql.rotate),
        ("update", &sql.update),
        ("delete", &sql.delete),
        ("announce", &sql.announce),
        ("retire", &sql.retire),
        ("sweep", &sql.sweep),
        ("delete_user", &sql.delete_user),
        ("touch", &sql.touch),
        ("cleanup", &sql.cleanup),
        ("versions", &sql.versions),
        ("clear", &sql.clear),
        ("epoch", &sql.epoch),
    ]
    .into_iter()
    .map(|(name, text)| (name, text.to_string()))
    .collect()
}

impl Sql {
    fn new(names: &Names) -> Sql {
        let (ids, lines, sweep) = (
            IDS_PER_MESSAGE.to_string(),
            LINES_PER_MESSAGE.to_string(),
            SWEEP_BATCH.to_string(),
        );
        let extra = [
            ("cols", COLUMNS),
            ("ids_per_message", ids.as_str()),
            ("lines_per_message", lines.as_str()),
            ("sweep_batch", sweep.as_str()),
        ];
        let render = |sql: &str| -> Arc<str> { names.render(sql, &extra).into() };
        Sql {
            select_one: render("SELECT {{cols}} FROM {{sessions}} WHERE id = $1"),
            select_user: render(
                "SELECT {{cols}} FROM {{sessions}} WHERE user_id = $1 AND expires_at > $2 \
                 ORDER BY last_accessed_at DESC",
            ),
            insert: render(
                "INSERT INTO {{sessions}} ({{cols}}) VALUES ($1, $2, 1, $3, $4, $4, $4, $5)",
            ),
            create_capped: render("SELECT {{create_fn}}($1, $2, $3, $4, $5, $6, $7, $8)"),
            rotate: render(
                "SELECT * FROM {{rotate_fn}}($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
            ),
            // Delta: remove the removed keys, merge the set ones, never touch the others. The
            // WHERE clause makes an update of a deleted or expired session a no-op (NotFound),
            // never a re-insert. $7 is an access this node recorded and has not flushed yet.
            // The merged attributes travel back only when someone else wrote since $8, the
            // version the caller's copy was read at; otherwise the caller's copy with its own
            // changes applied is exactly the new state.
            update: render(
                "WITH updated AS ( \
                     UPDATE {{sessions}} SET \
                         attributes = (attributes - $2::text[]) || $3::jsonb, \
                         expires_at = coalesce($4, expires_at), \
                         version = version + 1, \
                         updated_at = $5, \
                         last_accessed_at = greatest(last_accessed_at, $5) \
                     WHERE id = $1 AND expires_at > $5 \
                       AND ($6::timestamptz IS NULL OR greatest(last_accessed_at, $7) > $6) \
                     RETURNING id, user_id, version, created_at, updated_at, last_accessed_at, \
                         expires_at, CASE WHEN version = $8 + 1 THEN NULL ELSE attributes END \
                         AS attributes \
                 ), queued AS ( \
                     INSERT INTO {{outbox}} (payload) \
                     SELECT 'u ' || replace(id::text, '-', '') || ' ' || version FROM updated \
                     RETURNING seq, payload \
                 ) \
                 SELECT updated.*, queued.seq, queued.payload FROM updated, queued",
            ),
            delete: render(
                "WITH deleted AS (DELETE FROM {{sessions}} WHERE id = $1 RETURNING id) \
                 INSERT INTO {{outbox}} (payload) \
                 SELECT 'd ' || replace(id::text, '-', '') FROM deleted \
                 RETURNING seq, payload",
            ),
            // Announce queued invalidations. The commit need not wait for the WAL flush
            // (nothing durable is written), which keeps NOTIFY's cluster-wide commit lock short.
            announce: render(
                "SELECT set_config('synchronous_commit', 'off', true), \
                        pg_notify('{{channel}}', payload)::text \
                 FROM unnest($1::text[]) AS payload",
            ),
            // Retire announced rows, in bulk. Asynchronous commit again: a retirement lost in a
            // crash only means the sweep announces those rows a second time, which is harmless.
            retire: render(
                "WITH retired AS (DELETE FROM {{outbox}} WHERE seq = ANY($1)) \
                 SELECT set_config('synchronous_commit', 'off', true)",
            ),
            // Rows older than $1 seconds were left by a node that stopped before announcing
            // them; any node announces them, SKIP LOCKED keeping sweepers apart.
            sweep: render(
                "WITH orphans AS ( \
                     DELETE FROM {{outbox}} WHERE seq IN ( \
                         SELECT seq FROM {{outbox}} \
                         WHERE created_at < now() - make_interval(secs => $1) \
                         ORDER BY seq LIMIT {{sweep_batch}} FOR UPDATE SKIP LOCKED) \
                     RETURNING seq, payload \
                 ), chunks AS ( \
                     SELECT (row_number() OVER (ORDER BY seq) - 1) / {{lines_per_message}} AS chunk, \
                            payload FROM orphans \
                 ), notified AS ( \
                     SELECT pg_notify('{{channel}}', string_agg(payload, E'\\n'))::text AS m \
                     FROM chunks GROUP BY chunk \
                 ) \
                 SELECT (SELECT count(*) FROM orphans), (SELECT count(m) FROM notified)",
            ),
            // One compact message however many sessions the user had.
            // Rows are locked in id order, the order of the last-access flush, so that the two
            // cannot deadlock.
            delete_user: render(
                "WITH doomed AS ( \
                     SELECT id FROM {{sessions}} WHERE user_id = $1 AND id <> ALL($2) \
                     ORDER BY id FOR UPDATE \
                 ), deleted AS ( \
                     DELETE FROM {{sessions}} s USING doomed d WHERE s.id = d.id RETURNING s.id \
                 ), counted AS (SELECT count(*) AS n FROM deleted) \
                 SELECT n, CASE WHEN n > 0 THEN \
                     pg_notify('{{channel}}', 'U ' || encode(convert_to($1, 'UTF8'), 'hex'))::text END \
                 FROM counted",
            ),
            // Never moves a timestamp backwards; no notification (last access is not cached
            // state that others could serve wrongly: idle checks re-read the database).
            touch: render(
                "UPDATE {{sessions}} AS s SET last_accessed_at = v.at \
                 FROM unnest($1::uuid[], $2::timestamptz[]) AS v(id, at) \
                 WHERE s.id = v.id AND s.last_accessed_at < v.at",
            ),
            // Bounded batches; SKIP LOCKED lets every node run cleanup at once without
            // waiting on each other. Deleted ids are announced IDS_PER_MESSAGE per message.
            cleanup: render(
                "WITH victims AS ( \
                     SELECT id FROM {{sessions}} \
                     WHERE expires_at <= $1 OR last_accessed_at <= $2 \
                     LIMIT $3 FOR UPDATE SKIP LOCKED \
                 ), deleted AS ( \
                     DELETE FROM {{sessions}} s USING victims v WHERE s.id = v.id RETURNING s.id \
                 ), chunks AS ( \
                     SELECT (row_number() OVER () - 1) / {{ids_per_message}} AS chunk, id FROM deleted \
                 ), notified AS ( \
                     SELECT pg_notify('{{channel}}', 'd ' || string_agg(replace(id::text, '-', ''), ','))::text AS m \
                     FROM chunks GROUP BY chunk \
                 ) \
                 SELECT (SELECT count(*) FROM deleted), (SELECT count(m) FROM notified)",
            ),
            versions: render("SELECT id, version FROM {{sessions}} WHERE id = ANY($1)"),
            // The epoch lets a node that missed the message notice the clear when it reconnects.
            clear: render(
                "WITH bumped AS (UPDATE {{cache_epoch}} SET epoch = epoch + 1 RETURNING epoch) \
                 SELECT epoch, pg_notify('{{channel}}', 'C ' || epoch)::text FROM bumped",
            ),
            // With the server's start time: a node that reconnects to another server (a
            // restart, a failover) cannot trust versions it cached, since the new server may
            // lack the latest writes and hand out their version numbers again.
            epoch: render(
                "SELECT epoch, (extract(epoch FROM pg_postmaster_start_time()) * 1000000)::int8 \
                 FROM {{cache_epoch}}",
            ),
        }
    }
}

/// The state an update left, without the attributes when the caller already has them.
pub(crate) struct Updated {
    pub user_id: Option<UserId>,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub last_accessed_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub attributes: Option<Map<String, Value>>,
}

/// An invalidation committed to the outbox, to be announced.
#[derive(Clone, Debug)]
pub(crate) struct Queued {
    pub seq: i64,
    pub payload: String,
}

/// Arguments of a new session.
pub(crate) struct NewSession<'a> {
    pub id: Uuid,
    /// `None` before login (never capped).
    pub user_id: Option<&'a UserId>,
    pub attributes: &'a Map<String, Value>,
    pub now: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub idle_cutoff: Option<DateTime<Utc>>,
    /// `Some((cap, reject))` when the per-user cap applies.
    pub cap: Option<(usize, bool)>,
}

/// The delta of one `update_session`.
pub(crate) struct Delta<'a> {
    pub id: Uuid,
    /// The version the caller's attributes were read at.
    pub base_version: i64,
    pub removed: Vec<&'a str>,
    pub set: Map<String, Value>,
    pub expires_at: Option<DateTime<Utc>>,
    pub now: DateTime<Utc>,
    pub idle_cutoff: Option<DateTime<Utc>>,
    /// An access this node recorded and has not flushed yet.
    pub pending_access: Option<DateTime<Utc>>,
}

/// Arguments of a rotation or login.
pub(crate) struct Rotation<'a> {
    /// The pending changes, on the session's current id.
    pub delta: &'a Delta<'a>,
    pub new_id: Uuid,
    /// `Some` for a login: the user to bind (`Some(None)`: to no user).
    pub user: Option<Option<&'a UserId>>,
    /// Idle cutoff for counting the user's other sessions.
    pub cap_cutoff: Option<DateTime<Utc>>,
    /// `Some((cap, reject))` when the per-user cap applies (logins only).
    pub cap: Option<(usize, bool)>,
}

/// What a rotation left.
pub(crate) struct Rotated {
    pub updated: Updated,
    pub evicted: Vec<Uuid>,
    pub queued: Queued,
}

/// The PostgreSQL side: a pool and the rendered statements.
pub(crate) struct Store {
    pool: PgPool,
    /// Connections kept between statements (every statement but the resynchronisation's).
    conns: Connections,
    sql: Sql,
}

impl Store {
    pub(crate) fn new(pool: PgPool, names: &Names) -> Store {
        Store {
            conns: Connections::new(pool.clone()),
            pool,
            sql: Sql::new(names),
        }
    }

    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The kept connections (see [`crate::connections`]).
    pub(crate) fn connections(&self) -> &Connections {
        &self.conns
    }

    /// Read one session.
    pub(crate) async fn fetch(&self, id: Uuid) -> Result<Option<Record>> {
        let row = again_if_lost(|_| async {
            on_conn!(
                self,
                sqlx::query(AssertSqlSafe(self.sql.select_one.clone())).bind(id),
                fetch_optional
            )
        })
        .await?;
        row.map(|row| record_from_row(&row)).transpose()
    }

    /// Sessions of a user not past their absolute expiry, most recently used first.
    pub(crate) async fn fetch_user(
        &self,
        user_id: &UserId,
        now: DateTime<Utc>,
    ) -> Result<Vec<Record>> {
        let rows = again_if_lost(|_| async {
            on_conn!(
                self,
                sqlx::query(AssertSqlSafe(self.sql.select_user.clone()))
                    .bind(user_id.as_str())
                    .bind(now),
                fetch_all
            )
        })
        .await?;
        rows.iter().map(record_from_row).collect()
    }

    /// Insert a session, enforcing the per-user cap in the same transaction. Returns the ids of
    /// sessions deleted to make room.
    ///
    /// A create whose connection was lost may have committed: the id is ours alone, so the
    /// retry first looks for it, and runs the create again only if it is not there (the
    /// sessions the lost attempt evicted were announced by its own commit).
    pub(crate) async fn create(&self, new: &NewSession<'_>) -> Result<Vec<Uuid>> {
        let result = again_if_lost(|attempt| async move {
            if attempt > 0 {
                let exists = on_conn!(
                    self,
                    sqlx::query(AssertSqlSafe(self.sql.select_one.clone())).bind(new.id),
                    fetch_optional
                )?;
                if exists.is_some() {
                    return Ok(Vec::new());
                }
            }
            let user = new.user_id.map(UserId::as_str);
            match new.cap.filter(|_| user.is_some()) {
                None => {
                    on_conn!(
                        self,
                        sqlx::query(AssertSqlSafe(self.sql.insert.clone()))
                            .bind(new.id)
                            .bind(user)
                            .bind(Json(new.attributes))
                            .bind(new.now)
                            .bind(new.expires_at),
                        execute
                    )?;
                    Ok(Vec::new())
                }
                // Evicting rows can deadlock with another node's last-access flush; the
                // transaction was then rolled back entirely, and is run again.
                Some((cap, reject)) => on_conn!(
                    self,
                    sqlx::query_scalar(AssertSqlSafe(self.sql.create_capped.clone()))
                        .bind(new.id)
                        .bind(user)
                        .bind(Json(new.attributes))
                        .bind(new.now)
                        .bind(new.expires_at)
                        .bind(new.idle_cutoff)
                        // validated to fit i32
                        .bind(cap as i32)
                        .bind(reject),
                    fetch_one
                ),
            }
        })
        .await;
        match result {
            Ok(evicted) => Ok(evicted),
            Err(sqlx::Error::Database(e)) => match e.code().as_deref() {
                Some(MAX_SESSIONS_SQLSTATE) => Err(Error::MaxSessionsReached),
                Some(ISOLATION_SQLSTATE) => Err(Error::InvalidConfig(e.message().to_owned())),
                _ => Err(sqlx::Error::Database(e).into()),
            },
            Err(e) => Err(e.into()),
        }
    }

    /// Apply a delta. `None` when the session is gone or expired; otherwise the new row, whose
    /// `attributes` are `None` when they equal the caller's copy with the delta applied, and
    /// the outbox entry of its invalidation.
    pub(crate) async fn update(&self, delta: &Delta<'_>) -> Result<Option<(Updated, Queued)>> {
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
                .bind(delta.base_version),
            fetch_optional
        )?;
        let Some(row) = row else { return Ok(None) };
        let attributes: Option<Json<Map<String, Value>>> = row.try_get("attributes")?;
        let updated = Updated {
            user_id: user_of(&row)?,
            version: row.try_get("version")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
            last_accessed_at: row.try_get("last_accessed_at")?,
            expires_at: row.try_get("expires_at")?,
            attributes: attributes.map(|Json(map)| map),
        };
        let queued = Queued {
            seq: row.try_get("seq")?,
            payload: row.try_get("payload")?,
        };
        Ok(Some((updated, queued)))
    }

    /// Move a session to a new id, writing `delta` (and binding `user`, under the cap, for a
    /// login). `None` when the session is gone or expired; otherwise its new state, the ids
    /// evicted for the cap, and the outbox entry announcing the old id's end.
    pub(crate) async fn rotate(&self, r: &Rotation<'_>) -> Result<Option<Rotated>> {
        let d = r.delta;
        let (set_user, user) = match r.user {
            Some(user) => (true, user.map(UserId::as_str)),
            None => (false, None),
        };
        let (cap, reject) = match r.cap {
            Some((cap, reject)) => (Some(cap as i32), reject),
            None => (None, false),
        };
        let row = on_conn!(
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
                .bind(r.cap_cutoff)
                .bind(cap)
                .bind(reject),
            fetch_optional
        );
        let row = match row {
            Ok(row) => row,
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some(MAX_SESSIONS_SQLSTATE) => {
                return Err(Error::MaxSessionsReached);
            }
            Err(e) => return Err(e.into()),
        };
        let Some(row) = row else { return Ok(None) };
        let Json(attributes): Json<Map<String, Value>> = row.try_get("attributes")?;
        Ok(Some(Rotated {
            updated: Updated {
                user_id: user_of(&row)?,
                version: row.try_get("version")?,
                created_at: row.try_get("created_at")?,
                updated_at: row.try_get("updated_at")?,
                last_accessed_at: row.try_get("last_accessed_at")?,
                expires_at: row.try_get("expires_at")?,
                attributes: Some(attributes),
            },
            evicted: row.try_get("evicted")?,
            queued: Queued {
                seq: row.try_get("seq")?,
                payload: row.try_get("payload")?,
            },
        }))
    }

    /// Delete one session; its outbox entry when it existed, and whether an earlier attempt
    /// lost its connection (it may then have deleted the session, leaving its outbox entry
    /// unannounced).
    pub(crate) async fn delete(&self, id: Uuid) -> Result<(Option<Queued>, bool)> {
        let retried = std::sync::atomic::AtomicBool::new(false);
        let queued: Option<(i64, String)> = again_if_lost(|attempt| {
            retried.store(attempt > 0, std::sync::atomic::Ordering::Relaxed);
            async move {
                on_conn!(
                    self,
                    sqlx::query_as(AssertSqlSafe(self.sql.delete.clone())).bind(id),
                    fetch_optional
                )
            }
        })
        .await?;
        Ok((
            queued.map(|(seq, payload)| Queued { seq, payload }),
            retried.load(std::sync::atomic::Ordering::Relaxed),
        ))
    }

    /// Send queued invalidations (`messages`, each under 8000 bytes), on `conn` (the
    /// announcer's own connection) or, without one, on a pooled connection.
    pub(crate) async fn announce(
        &self,
        conn: Option<&mut PgConnection>,
        messages: &[String],
    ) -> Result<()> {
        let query = sqlx::query(AssertSqlSafe(self.sql.announce.clone())).bind(messages);
        self.execute_on(conn, query).await
    }

    /// Delete outbox rows that have been announced, like [`announce`](Self::announce).
    pub(crate) async fn retire(&self, conn: Option<&mut PgConnection>, seqs: &[i64]) -> Result<()> {
        let query = sqlx::query(AssertSqlSafe(self.sql.retire.clone())).bind(seqs);
        self.execute_on(conn, query).await
    }

    /// Run `query` on `conn`, or on a pooled connection without one.
    async fn execute_on(
        &self,
        conn: Option<&mut PgConnection>,
        query: Query<'_, Postgres, PgArguments>,
    ) -> Result<()> {
        match conn {
            Some(conn) => query.execute(conn).await?,
            None => on_conn!(self, query, execute)?,
        };
        Ok(())
    }

    /// Announce outbox rows older than `grace`; returns how many.
    pub(crate) async fn sweep_outbox(&self, grace: std::time::Duration) -> Result<u64> {
        let (swept, _messages): (i64, i64) = on_conn!(
            self,
            sqlx::query_as(AssertSqlSafe(self.sql.sweep.clone())).bind(grace.as_secs_f64()),
            fetch_one
        )?;
        Ok(swept as u64)
    }

    /// Delete every session of a user except those in `keep`; returns how many (after a lost
    /// connection, how many the attempt that completed deleted).
    pub(crate) async fn delete_user(&self, user_id: &UserId, keep: &[Uuid]) -> Result<u64> {
        let n: i64 = again_if_lost(|_| async {
            on_conn!(
                self,
                sqlx::query_scalar(AssertSqlSafe(self.sql.delete_user.clone()))
                    .bind(user_id.as_str())
                    .bind(keep),
                fetch_one
            )
        })
        .await?;
        Ok(n as u64)
    }

    /// Write recorded accesses (sorted by id, which keeps concurrent flushes from several nodes
    /// mostly in the same lock order; a deadlock with another statement is still possible and
    /// is handled by retrying the flush later).
    pub(crate) async fn touch(&self, ids: &[Uuid], times: &[DateTime<Utc>]) -> Result<u64> {
        let done = on_conn!(
            self,
            sqlx::query(AssertSqlSafe(self.sql.touch.clone()))
                .bind(ids)
                .bind(times),
            execute
        )?;
        Ok(done.rows_affected())
    }

    /// Delete up to `limit` expired sessions; returns how many were deleted.
    pub(crate) async fn cleanup_batch(
        &self,
        now: DateTime<Utc>,
        idle_cutoff: Option<DateTime<Utc>>,
        limit: usize,
    ) -> Result<u64> {
        let (deleted, _messages): (i64, i64) = on_conn!(
            self,
            sqlx::query_as(AssertSqlSafe(self.sql.cleanup.clone()))
                .bind(now)
                .bind(idle_cutoff)
                .bind(limit as i64),
            fetch_one
        )?;
        Ok(deleted as u64)
    }

    /// Current versions of the given sessions (absent ones are missing from the result).
    ///
    /// Resynchronisation runs this and [`Store::cache_epoch`] on the listener's own
    /// connection: while the cache is distrusted every read goes to the database, and the
    /// pool may have no connection to spare.
    pub(crate) async fn versions<'e>(
        &self,
        conn: impl PgExecutor<'e>,
        ids: &[Uuid],
    ) -> Result<Vec<(Uuid, i64)>> {
        Ok(sqlx::query_as(AssertSqlSafe(self.sql.versions.clone()))
            .bind(ids)
            .fetch_all(conn)
            .await?)
    }

    /// Tell every node to empty its cache; returns the new cache epoch.
    pub(crate) async fn broadcast_clear(&self) -> Result<i64> {
        let (epoch, _): (i64, Option<String>) = on_conn!(
            self,
            sqlx::query_as(AssertSqlSafe(self.sql.clear.clone())),
            fetch_one
        )?;
        Ok(epoch)
    }

    /// The number of cache clears so far, and when the server started (microseconds since
    /// 1970), which tells one server incarnation from another.
    pub(crate) async fn cache_epoch<'e>(&self, conn: impl PgExecutor<'e>) -> Result<(i64, i64)> {
        Ok(sqlx::query_as(AssertSqlSafe(self.sql.epoch.clone()))
            .fetch_one(conn)
            .await?)
    }

    /// The isolation level the pool's connections start transactions with.
    pub(crate) async fn default_isolation(&self) -> Result<String> {
        Ok(on_conn!(
            self,
            sqlx::query_scalar(DEFAULT_ISOLATION),
            fetch_one
        )?)
    }
}

fn record_from_row(row: &PgRow) -> Result<Record> {
    let Json(attributes): Json<Map<String, Value>> = row.try_get("attributes")?;
    Ok(Record {
        id: row.try_get("id")?,
        user_id: user_of(row)?,
        version: row.try_get("version")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        last_accessed_at: row.try_get("last_accessed_at")?,
        expires_at: row.try_get("expires_at")?,
        attributes: Arc::new(attributes),
    })
}

fn user_of(row: &PgRow) -> Result<Option<UserId>> {
    let user: Option<String> = row.try_get("user_id")?;
    Ok(user.map(UserId::from))
}
