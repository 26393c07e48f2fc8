//! Every SQL statement pgsession runs on its tables, in one place. (The schema itself is in
//! `migrations/`; `migrate.rs` holds only the statements that keep track of applied
//! migrations.)
//!
//! Each write is one statement, hence one round trip, and records its cache invalidation in
//! the same statement, so the invalidation exists exactly when the write committed. Frequent
//! writes (update, delete) queue it in the outbox table, announced right after by the
//! coherence layer's announcer; rare bulk writes (logout everywhere, cap eviction, cleanup,
//! clear) call `pg_notify` directly in a CTE. Payloads follow the protocol in
//! `crate::coherence::protocol`; ids are sent as 32 hex digits.

use std::sync::Arc;

use super::names::Names;

/// SQLSTATE raised by the create function when the cap policy is "reject".
pub(crate) const MAX_SESSIONS_SQLSTATE: &str = "PS001";
/// SQLSTATE raised by the create function outside READ COMMITTED.
pub(crate) const ISOLATION_SQLSTATE: &str = "PS002";
/// SQLSTATE raised by the rotate function when the merge would exceed `max_session_size`.
pub(crate) const TOO_LARGE_SQLSTATE: &str = "PS003";

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

/// How every statement's own transaction begins behind a transaction-mode pooler: the per-user
/// cap needs READ COMMITTED, and no session setting survives the transaction there.
pub(crate) const BEGIN: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";

/// The isolation level new transactions on a connection get.
pub(crate) const DEFAULT_ISOLATION: &str =
    "SELECT current_setting('default_transaction_isolation')";

const COLUMNS: &str = "id, user_id, version, attributes, created_at, updated_at, last_accessed_at, \
     expires_at, group_id, ip, user_agent, reads, writes, attribute_expiry";

/// Columns and values of a new row (`$1`..`$10`).
const INSERT: &str = "(id, user_id, version, attributes, created_at, updated_at, \
     last_accessed_at, expires_at, group_id, ip, user_agent, attribute_expiry, \
     attributes_expire_at) VALUES ($1, $2, 1, $3, $4, $4, $4, $5, $6, $7, $8, $9, $10)";

/// The statements, rendered once with this manager's table and channel names.
pub(crate) struct Sql {
    pub(crate) select_one: Arc<str>,
    pub(crate) select_user: Arc<str>,
    pub(crate) insert: Arc<str>,
    pub(crate) insert_announced: Arc<str>,
    pub(crate) create_capped: Arc<str>,
    pub(crate) rotate: Arc<str>,
    pub(crate) update: Arc<str>,
    pub(crate) delete: Arc<str>,
    pub(crate) announce: Arc<str>,
    pub(crate) retire: Arc<str>,
    pub(crate) sweep: Arc<str>,
    pub(crate) delete_user: Arc<str>,
    pub(crate) touch: Arc<str>,
    pub(crate) cleanup: Arc<str>,
    pub(crate) cleanup_attributes: Arc<str>,
    pub(crate) current: Arc<str>,
    pub(crate) count_active: Arc<str>,
    pub(crate) count_user: Arc<str>,
    pub(crate) page: Arc<str>,
    pub(crate) delete_all: Arc<str>,
    pub(crate) delete_group: Arc<str>,
    pub(crate) remove_user_attribute: Arc<str>,
    pub(crate) cleanup_done: Arc<str>,
    pub(crate) status: Arc<str>,
    pub(crate) listeners: Arc<str>,
    pub(crate) versions: Arc<str>,
    pub(crate) clear: Arc<str>,
    pub(crate) epoch: Arc<str>,
    pub(crate) legacy_until: Arc<str>,
}

/// Every statement by name, rendered for `names`: see [`crate::statements`].
pub(crate) fn statements(names: &Names) -> Vec<(&'static str, String)> {
    let sql = Sql::new(names, &crate::coherence::protocol::new_tag());
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
        ("count_user", &sql.count_user),
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
    /// `tag` ends every invalidation line this node sends (see `crate::coherence::protocol`).
    pub(crate) fn new(names: &Names, tag: &str) -> Sql {
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
            // For operators; $1 the inactivity timeout in seconds (NULL: none), $2 now.
            // Sequential scans: fine for a status command, not for a request path.
            status: render(
                "SELECT (SELECT max(version) FROM {{migrations}}), \
                     (SELECT count(*) FROM {{sessions}}), \
                     (SELECT count(*) FROM {{sessions}} WHERE expires_at > $2 \
                         AND ($1::float8 IS NULL \
                              OR last_accessed_at > $2 - make_interval(secs => $1))), \
                     (SELECT count(*) FROM {{sessions}} WHERE user_id IS NULL \
                         AND expires_at > $2), \
                     (SELECT count(*) FROM {{sessions}} \
                         WHERE last_accessed_at > $2 - interval '5 minutes' \
                         AND expires_at > $2), \
                     (SELECT count(*) FROM {{outbox}}), \
                     (SELECT min(created_at) FROM {{outbox}}), \
                     (SELECT last_cleanup_at FROM {{cache_epoch}})",
            ),
            // Every node's listener names itself (see `listener_application_name`).
            listeners: render(
                "SELECT pid, application_name, client_addr::text, backend_start \
                 FROM pg_stat_activity WHERE application_name LIKE $1 \
                   AND datname = current_database() ORDER BY backend_start",
            ),
            // The user's sessions as the per-user cap counts them ($3: the settled idle
            // cutoff); the user_id index.
            count_user: render(
                "SELECT count(*) FROM {{sessions}} WHERE user_id = $1 AND expires_at > $2 \
                 AND ($3::timestamptz IS NULL OR last_accessed_at > $3)",
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
