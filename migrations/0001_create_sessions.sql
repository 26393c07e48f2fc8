-- pgsession schema, version 1.
--
-- pgsession applies this file itself (src/migrate.rs), inside one transaction under an advisory
-- lock, after replacing each placeholder in double braces with a validated name:
--   {{sessions}}         schema-qualified, quoted sessions table, e.g. "public"."sessions"
--   {{cache_epoch}}      schema-qualified, quoted cache-epoch table
--   {{outbox}}           schema-qualified, quoted invalidation outbox
--   {{prefix}}           the configured table prefix (lower-case letters, digits, '_'), may be empty
--   {{create_fn}}        schema-qualified, quoted create function
--   {{channel}}          the NOTIFY channel for cache invalidations
--   {{lock_class}}       32-bit advisory-lock class of this table
--   {{ids_per_message}}  session ids per invalidation message (keeps payloads under 8000 bytes)
-- To apply it by hand, substitute the placeholders the same way, and record it in the
-- bookkeeping table (see README, "Using your own PostgreSQL").

CREATE TABLE {{sessions}} (
    id               uuid        PRIMARY KEY,
    user_id          uuid        NOT NULL,
    -- Incremented by every committed change of attributes or expiry; caches compare it.
    version          bigint      NOT NULL CHECK (version > 0),
    attributes       jsonb       NOT NULL CHECK (jsonb_typeof(attributes) = 'object'),
    created_at       timestamptz NOT NULL,
    updated_at       timestamptz NOT NULL,
    last_accessed_at timestamptz NOT NULL,
    expires_at       timestamptz NOT NULL
) WITH (fillfactor = 90);
-- last_accessed_at is rewritten by every batched access flush. It is deliberately in no index,
-- and fillfactor leaves room on each page, so those updates stay HOT (no index writes, little
-- bloat). Cleanup of idle sessions scans the table instead, once per cleanup_interval.

-- Per-user cap, logout everywhere, "your sessions" lists.
CREATE INDEX "{{prefix}}sessions_user_id_idx" ON {{sessions}} (user_id);
-- Cleanup of sessions past their absolute expiry.
CREATE INDEX "{{prefix}}sessions_expires_at_idx" ON {{sessions}} (expires_at);

-- Counts cache clears (clear_cache). A node that was not listening when a clear was announced
-- sees the count moved when it reconnects, and empties its cache then.
CREATE TABLE {{cache_epoch}} (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    epoch     bigint  NOT NULL
);
INSERT INTO {{cache_epoch}} (epoch) VALUES (0);

-- Invalidations of the frequent writes (update, delete) waiting to be announced. The write
-- inserts its row in the same statement, so the row exists exactly when the write committed;
-- the writing node then announces it with NOTIFY in a separate, batched transaction that also
-- deletes the row. Rows left behind by a node that stopped in between are announced by any node
-- after a grace period. Why not NOTIFY inside the write: PostgreSQL serialises the commits of
-- all notifying transactions in the cluster, WAL flush included, which caps concurrent writes
-- at one fsync each.
--
-- UNLOGGED: its rows cost no WAL. A database crash empties it, which is safe: a crash (or a
-- failover, since unlogged tables are not replicated) drops every listener's connection, and
-- every node resynchronises its cache by database versions when it reconnects.
CREATE UNLOGGED TABLE {{outbox}} (
    seq        bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    payload    text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Creates a session while holding the user's cap, in one round trip.
--
-- Logins of one user are serialised by a transaction-scoped advisory lock. In READ COMMITTED
-- every statement of a PL/pgSQL function takes a fresh snapshot, so the statements after the
-- lock see every session a concurrent login of the same user committed; a single SQL statement
-- could not, its snapshot being taken before the lock is granted.
--
-- Returns the ids of the sessions it deleted to make room: all but the user's (cap - 1) most
-- recently used sessions, counting live ones before dead ones. Other nodes learn of them through
-- notifications sent in chunks small enough for NOTIFY's 8000-byte payload limit.
-- With p_reject, a user already at the cap gets SQLSTATE PS001 and nothing is written.
-- Outside READ COMMITTED the snapshot would predate the lock, so it refuses (SQLSTATE PS002).
CREATE FUNCTION {{create_fn}}(
    p_id           uuid,
    p_user_id      uuid,
    p_attributes   jsonb,
    p_now          timestamptz,
    p_expires_at   timestamptz,
    p_idle_cutoff  timestamptz,  -- sessions last accessed at or before this are idle; NULL: no idle expiry
    p_max_sessions integer,
    p_reject       boolean
) RETURNS uuid[]
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_live    bigint;
    v_evicted uuid[];
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'pgsession needs READ COMMITTED to enforce the per-user cap, not %',
            current_setting('transaction_isolation')
            USING ERRCODE = 'PS002';
    END IF;

    PERFORM pg_advisory_xact_lock({{lock_class}}, hashtext(p_user_id::text));

    IF p_reject THEN
        SELECT count(*) INTO v_live
        FROM {{sessions}}
        WHERE user_id = p_user_id
          AND expires_at > p_now
          AND (p_idle_cutoff IS NULL OR last_accessed_at > p_idle_cutoff);
        IF v_live >= p_max_sessions THEN
            RAISE EXCEPTION 'user % already has % live sessions (limit %)',
                p_user_id, v_live, p_max_sessions
                USING ERRCODE = 'PS001';
        END IF;
    END IF;

    -- Keep the (cap - 1) most recently used live sessions, delete the rest: live ones rank
    -- before dead ones, most recent first.
    WITH ranked AS (
        SELECT id,
               row_number() OVER (
                   ORDER BY (expires_at > p_now
                             AND (p_idle_cutoff IS NULL OR last_accessed_at > p_idle_cutoff)) DESC,
                            last_accessed_at DESC,
                            id
               ) AS rank
        FROM {{sessions}}
        WHERE user_id = p_user_id
    ), deleted AS (
        DELETE FROM {{sessions}} s
        USING ranked r
        WHERE s.id = r.id AND r.rank >= p_max_sessions
        RETURNING s.id
    )
    SELECT array_agg(id) INTO v_evicted FROM deleted;

    IF v_evicted IS NOT NULL THEN
        PERFORM pg_notify('{{channel}}', 'd ' || string_agg(replace(c.id::text, '-', ''), ','))
        FROM unnest(v_evicted) WITH ORDINALITY AS c(id, n)
        GROUP BY (c.n - 1) / {{ids_per_message}};
    END IF;

    INSERT INTO {{sessions}}
        (id, user_id, version, attributes, created_at, updated_at, last_accessed_at, expires_at)
    VALUES
        (p_id, p_user_id, 1, p_attributes, p_now, p_now, p_now, p_expires_at);

    RETURN coalesce(v_evicted, '{}');
END
$fn$;
