//! Every SQL statement pgsession runs on its tables. (The schema itself is in `migrations/`;
//! `migrate.rs` holds only the statements that keep track of applied migrations.)
//!
//! Each write is one statement, hence one round trip, and records its cache invalidation in
//! the same statement, so the invalidation exists exactly when the write committed. Frequent
//! writes (update, delete) queue it in the outbox table, announced right after by the outbox
//! task (see [`crate::outbox`]); rare bulk writes (logout everywhere, cap eviction, cleanup,
//! clear) call `pg_notify` directly in a CTE. Payloads follow the protocol in
//! [`crate::notify`]; ids are sent as 32 hex digits.

use std::collections::BTreeMap;
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
use crate::record::{Client, Record};

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

/// Run `statement` again (up to [`ATTEMPTS_IF_LOST`] times) while it deadlocks: for writes
/// whose failure proves nothing was written only in that case.
async fn again_if_deadlocked<T, F, Fut>(statement: F) -> Result<T, sqlx::Error>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T, sqlx::Error>>,
{
    let mut attempt = 0;
    loop {
        match statement().await {
            Err(e) if attempt + 1 < ATTEMPTS_IF_LOST && is_deadlock(&e) => attempt += 1,
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
/// SQLSTATE raised by the rotate function when the merge would exceed `max_session_size`.
const TOO_LARGE_SQLSTATE: &str = "PS003";

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

const COLUMNS: &str = "id, user_id, version, attributes, created_at, updated_at, last_accessed_at, \
     expires_at, group_id, ip, user_agent, reads, writes, attribute_expiry";

/// Columns and values of a new row (`$1`..`$10`).
const INSERT: &str = "(id, user_id, version, attributes, created_at, updated_at, \
     last_accessed_at, expires_at, group_id, ip, user_agent, attribute_expiry, \
     attributes_expire_at) VALUES ($1, $2, 1, $3, $4, $4, $4, $5, $6, $7, $8, $9, $10)";

/// The statements, rendered once with this manager's table and channel names.
struct Sql {
    select_one: Arc<str>,
    select_user: Arc<str>,
    insert: Arc<str>,
    insert_announced: Arc<str>,
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
    cleanup_attributes: Arc<str>,
    current: Arc<str>,
    count_active: Arc<str>,
    page: Arc<str>,
    delete_all: Arc<str>,
    delete_group: Arc<str>,
    remove_user_attribute: Arc<str>,
    cleanup_done: Arc<str>,
    status: Arc<str>,
    listeners: Arc<str>,
    versions: Arc<str>,
    clear: Arc<str>,
    epoch: Arc<str>,
    legacy_until: Arc<str>,
}

/// Every statement by name, rendered for `names`: see [`crate::statements`].
pub(crate) fn statements(names: &Names) -> Vec<(&'static str, String)> {
    let sql = Sql::new(names, &crate::notify::new_tag());
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
        ("cleanup_attributes", &sql.cleanup_attributes),
        ("current", &sql.current),
        ("count_active", &sql.count_active),
        ("page", &sql.page),
        ("delete_all", &sql.delete_all),
        ("delete_group", &sql.delete_group),
        ("remove_user_attribute", &sql.remove_user_attribute),
        ("insert_announced", &sql.insert_announced),
        ("cleanup_done", &sql.cleanup_done),
        ("status", &sql.status),
        ("listeners", &sql.listeners),
        ("versions", &sql.versions),
        ("clear", &sql.clear),
        ("epoch", &sql.epoch),
        ("legacy_until", &sql.legacy_until),
    ]
    .into_iter()
    .map(|(name, text)| (name, text.to_string()))
    .collect()
}

impl Sql {
    /// `tag` ends every invalidation line this node sends (see [`crate::notify`]).
    fn new(names: &Names, tag: &str) -> Sql {
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
            ("tag", tag),
        ];
        let render = |sql: &str| -> Arc<str> { names.render(sql, &extra).into() };
        Sql {
            select_one: render("SELECT {{cols}} FROM {{sessions}} WHERE id = $1"),
            select_user: render(
                "SELECT {{cols}} FROM {{sessions}} WHERE user_id = $1 AND expires_at > $2 \
                 ORDER BY last_accessed_at DESC",
            ),
            insert: render(&format!("INSERT INTO {{{{sessions}}}} {INSERT}")),
            // Announced through the outbox, as updates are.
            insert_announced: render(&format!(
                "WITH created AS (INSERT INTO {{{{sessions}}}} {INSERT} RETURNING id, user_id) \
                 INSERT INTO {{{{outbox}}}} (payload) \
                 SELECT 'c ' || replace(id::text, '-', '') || ' ' \
                     || coalesce(encode(convert_to(user_id, 'UTF8'), 'hex'), '-') || '{{{{tag}}}}' \
                 FROM created RETURNING seq, payload"
            )),
            create_capped: render(
                "SELECT * FROM {{create_fn}}($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, \
                 $13, '{{tag}}', $14)",
            ),
            rotate: render(
                "SELECT * FROM {{rotate_fn}}($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, \
                 $13, $14, $15, '{{tag}}', $16)",
            ),
            // Delta: remove the removed keys, merge the set ones, never touch the others. The
            // WHERE clause makes an update of a deleted or expired session a no-op (NotFound),
            // never a re-insert. $7 is an access this node recorded and has not flushed yet.
            // The merged attributes travel back only when someone else wrote since $8, the
            // version the caller's copy was read at; otherwise the caller's copy with its own
            // changes applied is exactly the new state. The access itself is left to the
            // last-access flush, as a read's is: no indexed column changes, so the row can be
            // updated in place (a HOT update). A set key loses its expiry unless $9
            // gives it one ($10: the earliest there). With $11, only version $11 is updated
            // (optimistic locking). $12 bounds the merged attributes' jsonb text, evaluated on
            // the row as locked (a concurrent writer's keys count): only growth past it is
            // refused, so a session over a lowered limit may still shrink.
            update: render(
                "WITH updated AS ( \
                     UPDATE {{sessions}} SET \
                         attributes = (attributes - $2::text[]) || $3::jsonb, \
                         attribute_expiry = CASE \
                             WHEN attribute_expiry = '{}' AND $9::jsonb = '{}' THEN attribute_expiry \
                             ELSE (attribute_expiry - $2::text[] \
                                   - ARRAY(SELECT jsonb_object_keys($3::jsonb))) || $9::jsonb END, \
                         attributes_expire_at = least(attributes_expire_at, $10), \
                         expires_at = coalesce($4, expires_at), \
                         version = version + 1, \
                         writes = writes + 1, \
                         updated_at = $5 \
                     WHERE id = $1 AND expires_at > $5 \
                       AND ($6::timestamptz IS NULL OR greatest(last_accessed_at, $7) > $6) \
                       AND ($11::int8 IS NULL OR version = $11) \
                       AND ($3::jsonb = '{}' \
                            OR octet_length(((attributes - $2::text[]) || $3::jsonb)::text) <= $12 \
                            OR octet_length(((attributes - $2::text[]) || $3::jsonb)::text) \
                               <= octet_length(attributes::text)) \
                     RETURNING id, user_id, version, created_at, updated_at, last_accessed_at, \
                         expires_at, group_id, ip, user_agent, reads, writes, \
                         CASE WHEN version = $8 + 1 THEN NULL ELSE attributes END AS attributes, \
                         CASE WHEN version = $8 + 1 THEN NULL ELSE attribute_expiry END \
                         AS attribute_expiry \
                 ), queued AS ( \
                     INSERT INTO {{outbox}} (payload) \
                     SELECT 'u ' || replace(id::text, '-', '') || ' ' || version || '{{tag}}' \
                     FROM updated \
                     RETURNING seq, payload \
                 ) \
                 SELECT updated.*, queued.seq, queued.payload FROM updated, queued",
            ),
            delete: render(
                "WITH deleted AS (DELETE FROM {{sessions}} WHERE id = $1 RETURNING id) \
                 INSERT INTO {{outbox}} (payload) \
                 SELECT 'd ' || replace(id::text, '-', '') || '{{tag}}' FROM deleted \
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
                     pg_notify('{{channel}}', 'U ' || encode(convert_to($1, 'UTF8'), 'hex') \
                         || '{{tag}}')::text END \
                 FROM counted",
            ),
            // The bulk writes below lock rows in id order, as logout everywhere does and as a
            // login's cap eviction does, so none of them can deadlock with another or with a
            // login. Each is announced in one message, whatever the number of sessions.
            delete_group: render(
                "WITH doomed AS ( \
                     SELECT id FROM {{sessions}} WHERE group_id = $1 ORDER BY id FOR UPDATE \
                 ), deleted AS ( \
                     DELETE FROM {{sessions}} s USING doomed d WHERE s.id = d.id RETURNING s.id \
                 ), counted AS (SELECT count(*) AS n FROM deleted) \
                 SELECT n, CASE WHEN n > 0 THEN \
                     pg_notify('{{channel}}', 'G ' || encode(convert_to($1, 'UTF8'), 'hex') \
                         || '{{tag}}')::text END \
                 FROM counted",
            ),
            remove_user_attribute: render(
                "WITH doomed AS ( \
                     SELECT id FROM {{sessions}} WHERE user_id = $1 AND attributes ? $2 \
                     ORDER BY id FOR UPDATE \
                 ), changed AS ( \
                     UPDATE {{sessions}} s SET attributes = s.attributes - $2, \
                         attribute_expiry = s.attribute_expiry - $2, \
                         version = s.version + 1, writes = s.writes + 1, updated_at = $3 \
                     FROM doomed d WHERE s.id = d.id RETURNING s.id \
                 ), counted AS (SELECT count(*) AS n FROM changed) \
                 SELECT n, CASE WHEN n > 0 THEN \
                     pg_notify('{{channel}}', 'K ' || encode(convert_to($1, 'UTF8'), 'hex') \
                         || '{{tag}}')::text END \
                 FROM counted",
            ),
            // A clear too (the epoch moves), so that a node that misses the message empties
            // its cache when it reconnects.
            delete_all: render(
                "WITH doomed AS (SELECT id FROM {{sessions}} ORDER BY id FOR UPDATE), \
                 deleted AS ( \
                     DELETE FROM {{sessions}} s USING doomed d WHERE s.id = d.id RETURNING s.id \
                 ), bumped AS ( \
                     UPDATE {{cache_epoch}} SET epoch = epoch + 1 \
                     RETURNING epoch \
                 ) \
                 SELECT (SELECT count(*) FROM deleted), epoch, \
                     pg_notify('{{channel}}', 'A ' || epoch || '{{tag}}')::text FROM bumped",
            ),
            // Why an update ($2 removed, $3 set) changed nothing: the stored version and
            // liveness, and the size its merge would have had.
            current: render(
                "SELECT version, expires_at, last_accessed_at, \
                     octet_length(((attributes - $2::text[]) || $3::jsonb)::text)::int8, \
                     octet_length(attributes::text)::int8 \
                 FROM {{sessions}} WHERE id = $1",
            ),
            cleanup_done: render("UPDATE {{cache_epoch}} SET last_cleanup_at = $1"),
            // For operators; $1 the inactivity timeout in seconds (NULL: none). Sequential
            // scans: fine for a status command, not for a request path.
            status: render(
                "SELECT (SELECT max(version) FROM {{migrations}}), \
                     (SELECT count(*) FROM {{sessions}}), \
                     (SELECT count(*) FROM {{sessions}} WHERE expires_at > now() \
                         AND ($1::float8 IS NULL \
                              OR last_accessed_at > now() - make_interval(secs => $1))), \
                     (SELECT count(*) FROM {{sessions}} WHERE user_id IS NULL \
                         AND expires_at > now()), \
                     (SELECT count(*) FROM {{sessions}} \
                         WHERE last_accessed_at > now() - interval '5 minutes' \
                         AND expires_at > now()), \
                     (SELECT count(*) FROM {{outbox}}), \
                     (SELECT min(created_at) FROM {{outbox}}), \
                     (SELECT last_cleanup_at FROM {{cache_epoch}})",
            ),
            // Every node's listener names itself (see `listener_application_name`).
            listeners: render(
                "SELECT pid, application_name, client_addr::text, backend_start \
                 FROM pg_stat_activity WHERE application_name LIKE $1 ORDER BY backend_start",
            ),
            // An index range scan on last_accessed_at (migration 4).
            count_active: render(
                "SELECT count(*) FROM {{sessions}} WHERE last_accessed_at > $1 AND expires_at > $2",
            ),
            // Keyset pages in id order: a session that exists throughout is listed exactly
            // once, whatever is written meanwhile.
            page: render(
                "SELECT {{cols}} FROM {{sessions}} \
                 WHERE ($1::uuid IS NULL OR id > $1) AND expires_at > $2 \
                 ORDER BY id LIMIT $3",
            ),
            // Never moves a timestamp backwards; no notification (last access is not cached
            // state that others could serve wrongly: idle checks re-read the database).
            // Also adds the reads this node counted.
            touch: render(
                "UPDATE {{sessions}} AS s SET last_accessed_at = greatest(s.last_accessed_at, v.at), \
                     reads = s.reads + v.n \
                 FROM unnest($1::uuid[], $2::timestamptz[], $3::int8[]) AS v(id, at, n) \
                 WHERE s.id = v.id AND (s.last_accessed_at < v.at OR v.n > 0)",
            ),
            // Bounded batches; SKIP LOCKED lets every node run cleanup at once without
            // waiting on each other. Deleted ids are announced IDS_PER_MESSAGE per message.
            cleanup: render(
                "WITH victims AS ( \
                     SELECT id FROM {{sessions}} \
                     WHERE expires_at <= $1 OR last_accessed_at <= $2 \
                     LIMIT $3 FOR UPDATE SKIP LOCKED \
                 ), deleted AS ( \
                     DELETE FROM {{sessions}} s USING victims v WHERE s.id = v.id \
                     RETURNING s.id, s.user_id \
                 ), chunks AS ( \
                     SELECT (row_number() OVER () - 1) / {{ids_per_message}} AS chunk, id FROM deleted \
                 ), notified AS ( \
                     SELECT pg_notify('{{channel}}', 'x ' || string_agg(replace(id::text, '-', ''), ',') \
                         || '{{tag}}')::text AS m \
                     FROM chunks GROUP BY chunk \
                 ) \
                 SELECT (SELECT count(*) FROM deleted), (SELECT count(m) FROM notified), \
                     coalesce((SELECT array_agg(id) FROM deleted), '{}'), \
                     coalesce((SELECT array_agg(user_id) FROM deleted), '{}')",
            ),
            // Removes attributes whose own expiry passed ($2: now in microseconds). Nothing is
            // announced and the version stays: every read already hides them.
            cleanup_attributes: render(
                "WITH victims AS ( \
                     SELECT id FROM {{sessions}} WHERE attributes_expire_at <= $1 \
                     LIMIT $3 FOR UPDATE SKIP LOCKED \
                 ), gone AS ( \
                     SELECT s.id, ARRAY(SELECT e.key FROM jsonb_each(s.attribute_expiry) e \
                                        WHERE e.value::int8 <= $2) AS keys \
                     FROM {{sessions}} s JOIN victims v ON s.id = v.id \
                 ) \
                 UPDATE {{sessions}} s SET \
                     attributes = s.attributes - g.keys, \
                     attribute_expiry = s.attribute_expiry - g.keys, \
                     attributes_expire_at = (SELECT to_timestamp(min(e.value::float8) / 1e6) \
                                             FROM jsonb_each(s.attribute_expiry - g.keys) e) \
                 FROM gone g WHERE s.id = g.id",
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
            legacy_until: render("SELECT legacy_tokens_until FROM {{cache_epoch}}"),
        }
    }
}

/// The state an update left, without the attributes (and their expiry) when the caller
/// already has them.
pub(crate) struct Updated {
    /// Everything but the attributes; its attributes are empty.
    pub record: Record,
    pub attributes: Option<(Map<String, Value>, AttributeExpiry)>,
}

/// Schema version, sessions, live, anonymous, active in 5 minutes, outbox rows, oldest outbox
/// row, last cleanup.
pub(crate) type StatusRow = (
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
pub(crate) type ListenerRow = (i32, Option<String>, Option<String>, Option<DateTime<Utc>>);

/// Attribute key -> when it expires.
pub(crate) type AttributeExpiry = BTreeMap<String, DateTime<Utc>>;

impl Updated {
    /// The new state, taking the attributes from `mine` when the row did not send them.
    pub(crate) fn into_record(self, mine: &Record) -> Record {
        let mut record = self.record;
        match self.attributes {
            Some((attributes, expiry)) => {
                record.attributes = Arc::new(attributes);
                record.attribute_expiry = Arc::new(expiry);
            }
            None => {
                record.attributes = mine.attributes.clone();
                record.attribute_expiry = mine.attribute_expiry.clone();
            }
        }
        record
    }
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
    pub group_id: Option<&'a str>,
    pub client: &'a Client,
    /// Attribute expiry, as stored (see [`expiry_json`]).
    pub attribute_expiry: &'a BTreeMap<String, DateTime<Utc>>,
    /// Announce the create (`Config::announce_creates`).
    pub announce: bool,
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
    /// The set keys that expire on their own, and when.
    pub set_expiry: BTreeMap<String, DateTime<Utc>>,
    /// Update only if the stored version is this one (optimistic locking).
    pub expect_version: Option<i64>,
    /// `Config::max_session_size`: the merge may not grow the attributes past it.
    pub max_size: usize,
}

/// What an update did.
pub(crate) enum UpdateOutcome {
    /// Written; with the outbox entry announcing it (`None` in memory).
    Updated(Box<Updated>, Option<Queued>),
    /// The session is gone or expired: nothing written.
    Gone,
    /// With `expect_version`: another write came first, leaving this version.
    Conflict { current_version: i64 },
    /// The merge would have grown the attributes to `size` bytes, past `max_size`.
    TooLarge { size: usize },
}

/// Version, absolute expiry, last access, merged size, size (see [`Stored`]).
type StoredRow = (i64, DateTime<Utc>, DateTime<Utc>, i64, i64);

/// What a refused update found stored.
pub(crate) struct Stored {
    pub version: i64,
    pub expires_at: DateTime<Utc>,
    pub last_accessed_at: DateTime<Utc>,
    /// Size of the attributes with the delta merged, and as they are (jsonb text bytes).
    pub merged_size: usize,
    pub size: usize,
}

impl Delta<'_> {
    /// Why this delta may not be applied to `stored` (both backends decide alike), or `None`.
    pub(crate) fn refusal(&self, stored: &Stored) -> Option<UpdateOutcome> {
        let last = self
            .pending_access
            .map_or(stored.last_accessed_at, |p| p.max(stored.last_accessed_at));
        let live = stored.expires_at > self.now && self.idle_cutoff.is_none_or(|c| last > c);
        if !live {
            return Some(UpdateOutcome::Gone);
        }
        if let Some(expected) = self.expect_version
            && expected != stored.version
        {
            return Some(UpdateOutcome::Conflict {
                current_version: stored.version,
            });
        }
        let grows_past = !self.set.is_empty()
            && stored.merged_size > self.max_size
            && stored.merged_size > stored.size;
        grows_past.then_some(UpdateOutcome::TooLarge {
            size: stored.merged_size,
        })
    }
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
    /// The old id's end, to announce (`None` in memory).
    pub queued: Option<Queued>,
}

/// One keyset page: the sessions that could be read, how many rows were scanned, and the last
/// id scanned (the next page starts after it).
pub(crate) struct Page {
    pub records: Vec<Record>,
    pub scanned: usize,
    pub last: Option<Uuid>,
}

/// The PostgreSQL side: a pool and the rendered statements.
pub(crate) struct Store {
    pool: PgPool,
    /// Rows left out of listings because they could not be decoded.
    unreadable: std::sync::atomic::AtomicU64,
    /// Connections kept between statements (every statement but the resynchronisation's).
    conns: Connections,
    sql: Sql,
}

impl Store {
    /// `tag` ends every invalidation this node sends (see [`crate::notify`]).
    pub(crate) fn new(
        pool: PgPool,
        names: &Names,
        tag: &str,
        reach: Arc<crate::reachability::Reachability>,
    ) -> Store {
        Store {
            conns: Connections::new(pool.clone()).with_reachability(reach),
            unreadable: Default::default(),
            pool,
            sql: Sql::new(names, tag),
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
        Ok(self.readable(&rows))
    }

    /// The rows that decode; the others are skipped, logged and counted
    /// ([`Store::unreadable`]): a value written by hand that PostgreSQL stores but cannot be
    /// read back (a number beyond `f64`) must not fail a whole listing.
    fn readable(&self, rows: &[PgRow]) -> Vec<Record> {
        rows.iter()
            .filter_map(|row| match record_from_row(row) {
                Ok(record) => Some(record),
                Err(error) => {
                    self.unreadable
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let id: Option<Uuid> = row.try_get("id").ok();
                    tracing::warn!(
                        session.id = %id.map(|id| id.simple().to_string()).unwrap_or_default(),
                        %error,
                        "pgsession: a stored session cannot be read and was left out of a listing"
                    );
                    None
                }
            })
            .collect()
    }

    /// Stored sessions left out of listings because they could not be read.
    pub(crate) fn unreadable(&self) -> u64 {
        self.unreadable.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Insert a session, enforcing the per-user cap in the same transaction. Returns the ids of
    /// sessions deleted to make room.
    ///
    /// A create whose connection was lost may have committed: the id is ours alone, so the
    /// retry first looks for it, and runs the create again only if it is not there (the
    /// sessions the lost attempt evicted were announced by its own commit).
    /// With `new.announce`, also the outbox entry announcing it.
    pub(crate) async fn create(&self, new: &NewSession<'_>) -> Result<(Vec<Uuid>, Option<Queued>)> {
        let result = again_if_lost(|attempt| async move {
            if attempt > 0 {
                let exists = on_conn!(
                    self,
                    sqlx::query(AssertSqlSafe(self.sql.select_one.clone())).bind(new.id),
                    fetch_optional
                )?;
                if exists.is_some() {
                    // The lost attempt's outbox entry is left to the sweep.
                    return Ok((Vec::new(), None));
                }
            }
            let user = new.user_id.map(UserId::as_str);
            let ip = new.client.ip.map(|ip| ip.to_string());
            let expiry = expiry_json(new.attribute_expiry);
            let expire_at = new.attribute_expiry.values().min().copied();
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
                            .bind(Json(&expiry))
                            .bind(expire_at),
                        fetch_optional
                    )?;
                    Ok((Vec::new(), queued.map(|(seq, payload)| Queued { seq, payload })))
                }
                // Evicting rows can deadlock with another node's last-access flush; the
                // transaction was then rolled back entirely, and is run again.
                Some((cap, reject)) => {
                    let (evicted, seq, payload): (Vec<Uuid>, Option<i64>, Option<String>) = on_conn!(
                    self,
                    sqlx::query_as(AssertSqlSafe(self.sql.create_capped.clone()))
                        .bind(new.id)
                        .bind(user)
                        .bind(Json(new.attributes))
                        .bind(new.now)
                        .bind(new.expires_at)
                        .bind(new.idle_cutoff)
                        // validated to fit i32
                        .bind(cap as i32)
                        .bind(reject)
                        .bind(new.group_id)
                        .bind(&ip)
                        .bind(new.client.user_agent.as_deref())
                        .bind(Json(&expiry))
                        .bind(expire_at)
                        .bind(new.announce),
                    fetch_one
                    )?;
                    let queued = seq.zip(payload).map(|(seq, payload)| Queued { seq, payload });
                    Ok((evicted, queued))
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
    }

    /// Apply a delta, in one round trip; when it changes nothing, a second read tells why.
    pub(crate) async fn update(&self, delta: &Delta<'_>) -> Result<UpdateOutcome> {
        // A refusal diagnosed on a row that changed again meanwhile (the merge fits now, the
        // version matches): try once more.
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
                    .bind(Json(expiry_json(&delta.set_expiry)))
                    .bind(delta.set_expiry.values().min().copied())
                    .bind(delta.expect_version)
                    .bind(delta.max_size as i64),
                fetch_optional
            )?;
            if let Some(row) = row {
                let updated = updated_from_row(&row)?;
                let queued = Queued {
                    seq: row.try_get("seq")?,
                    payload: row.try_get("payload")?,
                };
                return Ok(UpdateOutcome::Updated(Box::new(updated), Some(queued)));
            }
            let current: Option<StoredRow> = again_if_lost(|_| async {
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
        Ok(UpdateOutcome::Gone)
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
        // A login locks the user's rows in id order, as bulk writes do; a bulk write that met
        // a row while this rotation was moving it to its new id can still close a cycle, which
        // PostgreSQL breaks by rolling one transaction back whole. Run again then: nothing of
        // the attempt was written.
        let expiry = Json(expiry_json(&d.set_expiry));
        let row = again_if_deadlocked(|| async {
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
                    .bind(r.cap_cutoff)
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
        let mut updated = updated_from_row(&row)?;
        updated.record.id = r.new_id;
        Ok(Some(Rotated {
            updated,
            evicted: row.try_get("evicted")?,
            queued: Some(Queued {
                seq: row.try_get("seq")?,
                payload: row.try_get("payload")?,
            }),
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
    pub(crate) async fn touch(
        &self,
        ids: &[Uuid],
        times: &[DateTime<Utc>],
        reads: &[i64],
    ) -> Result<u64> {
        let done = on_conn!(
            self,
            sqlx::query(AssertSqlSafe(self.sql.touch.clone()))
                .bind(ids)
                .bind(times)
                .bind(reads),
            execute
        )?;
        Ok(done.rows_affected())
    }

    /// Delete up to `limit` expired sessions; returns the deleted ones and their users.
    pub(crate) async fn cleanup_batch(
        &self,
        now: DateTime<Utc>,
        idle_cutoff: Option<DateTime<Utc>>,
        limit: usize,
    ) -> Result<Vec<(Uuid, Option<UserId>)>> {
        let (_deleted, _messages, ids, users): (i64, i64, Vec<Uuid>, Vec<Option<String>>) = on_conn!(
            self,
            sqlx::query_as(AssertSqlSafe(self.sql.cleanup.clone()))
                .bind(now)
                .bind(idle_cutoff)
                .bind(limit as i64),
            fetch_one
        )?;
        Ok(ids
            .into_iter()
            .zip(users.into_iter().map(|u| u.map(UserId::from)))
            .collect())
    }

    /// Remove up to `limit` sessions' expired attributes; how many sessions changed.
    pub(crate) async fn cleanup_attributes(&self, now: DateTime<Utc>, limit: usize) -> Result<u64> {
        let done = on_conn!(
            self,
            sqlx::query(AssertSqlSafe(self.sql.cleanup_attributes.clone()))
                .bind(now)
                .bind(now.timestamp_micros())
                .bind(limit as i64),
            execute
        )?;
        Ok(done.rows_affected())
    }

    /// Sessions not past their absolute expiry and accessed after `since` (as stored).
    pub(crate) async fn count_active(
        &self,
        since: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<u64> {
        let n: i64 = again_if_lost(|_| async {
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
    }

    /// Up to `limit` sessions not past their absolute expiry with ids above `after`, in id
    /// order.
    pub(crate) async fn page(
        &self,
        after: Option<Uuid>,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<Page> {
        let rows = again_if_lost(|_| async {
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
    }

    /// Delete every session; how many, and the new cache epoch.
    pub(crate) async fn delete_all(&self) -> Result<(u64, i64)> {
        let (n, epoch, _): (i64, i64, Option<String>) = again_if_lost(|_| async {
            on_conn!(
                self,
                sqlx::query_as(AssertSqlSafe(self.sql.delete_all.clone())),
                fetch_one
            )
        })
        .await?;
        Ok((n as u64, epoch))
    }

    /// Delete every session of a group; how many.
    pub(crate) async fn delete_group(&self, group: &str) -> Result<u64> {
        self.bulk(&self.sql.delete_group, group, None).await
    }

    /// Remove attribute `key` from every session of a user; how many sessions had it.
    pub(crate) async fn remove_user_attribute(
        &self,
        user: &UserId,
        key: &str,
        now: DateTime<Utc>,
    ) -> Result<u64> {
        self.bulk(
            &self.sql.remove_user_attribute,
            user.as_str(),
            Some((key, now)),
        )
        .await
    }

    /// Run a bulk statement returning `(count, notification)`, again if its connection is lost
    /// (running it twice leaves the same state).
    async fn bulk(
        &self,
        sql: &Arc<str>,
        subject: &str,
        key: Option<(&str, DateTime<Utc>)>,
    ) -> Result<u64> {
        let (n, _): (i64, Option<String>) = again_if_lost(|_| async {
            let mut query = sqlx::query_as(AssertSqlSafe(sql.clone())).bind(subject);
            if let Some((key, now)) = key {
                query = query.bind(key).bind(now);
            }
            on_conn!(self, query, fetch_one)
        })
        .await?;
        Ok(n as u64)
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

    /// Until when sessions converted by migration 3 (opened by legacy tokens) may be alive.
    pub(crate) async fn legacy_until(&self) -> Result<Option<DateTime<Utc>>> {
        Ok(on_conn!(
            self,
            sqlx::query_scalar(AssertSqlSafe(self.sql.legacy_until.clone())),
            fetch_one
        )?)
    }

    /// Record that a cleanup run finished at `at`.
    pub(crate) async fn cleanup_done(&self, at: DateTime<Utc>) -> Result<()> {
        on_conn!(
            self,
            sqlx::query(AssertSqlSafe(self.sql.cleanup_done.clone())).bind(at),
            execute
        )?;
        Ok(())
    }

    /// The figures of `pgsession status`, and the nodes listening (by application name).
    pub(crate) async fn status(
        &self,
        idle: Option<std::time::Duration>,
        application_prefix: &str,
    ) -> Result<(StatusRow, Vec<ListenerRow>)> {
        let row: StatusRow = on_conn!(
            self,
            sqlx::query_as(AssertSqlSafe(self.sql.status.clone()))
                .bind(idle.map(|d| d.as_secs_f64())),
            fetch_one
        )?;
        let listeners: Vec<ListenerRow> = on_conn!(
            self,
            sqlx::query_as(AssertSqlSafe(self.sql.listeners.clone()))
                .bind(format!("{application_prefix}%")),
            fetch_all
        )?;
        Ok((row, listeners))
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
    let Json(expiry): Json<Map<String, Value>> = row.try_get("attribute_expiry")?;
    let mut record = record_without_attributes(row, row.try_get("id")?)?;
    record.attributes = Arc::new(attributes);
    record.attribute_expiry = Arc::new(expiry_from_json(&expiry));
    Ok(record)
}

/// Every column but the attributes and their expiry (left empty).
fn record_without_attributes(row: &PgRow, id: Uuid) -> Result<Record> {
    let ip: Option<String> = row.try_get("ip")?;
    let group: Option<String> = row.try_get("group_id")?;
    Ok(Record {
        id,
        user_id: user_of(row)?,
        version: row.try_get("version")?,
        created_at: row.try_get("created_at")?,
        updated_at: row.try_get("updated_at")?,
        last_accessed_at: row.try_get("last_accessed_at")?,
        expires_at: row.try_get("expires_at")?,
        attributes: Arc::default(),
        attribute_expiry: Arc::default(),
        group_id: group.map(Arc::from),
        client: Arc::new(Client {
            // Written by pgsession from an IpAddr; anything else (a hand edit) is not one.
            ip: ip.and_then(|ip| ip.parse().ok()),
            user_agent: row.try_get("user_agent")?,
        }),
        reads: row.try_get("reads")?,
        writes: row.try_get("writes")?,
    })
}

/// The row an update or rotation returned. Rotations return no id column: the caller sets it.
fn updated_from_row(row: &PgRow) -> Result<Updated> {
    let id = row.try_get("id").unwrap_or_default();
    let attributes: Option<Json<Map<String, Value>>> = row.try_get("attributes")?;
    let expiry: Option<Json<Map<String, Value>>> = row.try_get("attribute_expiry")?;
    Ok(Updated {
        record: record_without_attributes(row, id)?,
        attributes: attributes.map(|Json(map)| {
            let expiry = expiry
                .map(|Json(e)| expiry_from_json(&e))
                .unwrap_or_default();
            (map, expiry)
        }),
    })
}

/// Attribute expiry as stored: key -> microseconds since 1970.
pub(crate) fn expiry_json(expiry: &BTreeMap<String, DateTime<Utc>>) -> Map<String, Value> {
    expiry
        .iter()
        .map(|(k, at)| (k.clone(), Value::from(at.timestamp_micros())))
        .collect()
}

fn expiry_from_json(json: &Map<String, Value>) -> BTreeMap<String, DateTime<Utc>> {
    json.iter()
        .filter_map(|(k, v)| {
            let at = DateTime::from_timestamp_micros(v.as_i64()?)?;
            Some((k.clone(), at))
        })
        .collect()
}

fn user_of(row: &PgRow) -> Result<Option<UserId>> {
    let user: Option<String> = row.try_get("user_id")?;
    Ok(user.map(UserId::from))
}
