-- pgsession migration 4: groups (tenants), client info, read and write counts, attribute-level
-- expiry, an index for activity queries, and notifications that name the node they come from.
--
-- Placeholders as in 0003_session_tokens.sql.
--
-- Every column added here has a constant default (or none), so adding it rewrites no rows.
-- The two indexes are built under the migration's lock; on a very large table, build them
-- beforehand with CREATE INDEX CONCURRENTLY under the same names and this file skips them.
ALTER TABLE {{sessions}}
    ADD COLUMN group_id text,
    ADD COLUMN ip text,
    ADD COLUMN user_agent text,
    -- Reads are counted by each node and added by its last-access flush; writes by each
    -- update or rotation.
    ADD COLUMN reads bigint NOT NULL DEFAULT 0,
    ADD COLUMN writes bigint NOT NULL DEFAULT 0,
    -- Attribute key -> the time it expires, in microseconds since 1970 (keys without an entry
    -- never expire on their own). An expired key is invisible to every read; cleanup removes it.
    ADD COLUMN attribute_expiry jsonb NOT NULL DEFAULT '{}'
        CHECK (jsonb_typeof(attribute_expiry) = 'object'),
    -- No later than the earliest time in attribute_expiry (possibly earlier: a removed key's
    -- time may linger, which only makes cleanup look at the row once too often).
    ADD COLUMN attributes_expire_at timestamptz;

-- When a cleanup run last finished, for operators (`pgsession status`).
ALTER TABLE {{cache_epoch}} ADD COLUMN last_cleanup_at timestamptz;

CREATE INDEX IF NOT EXISTS "{{prefix}}sessions_group_id_idx"
    ON {{sessions}} (group_id) WHERE group_id IS NOT NULL;
-- For activity counts and for cleanup by inactivity.
CREATE INDEX IF NOT EXISTS "{{prefix}}sessions_last_accessed_at_idx"
    ON {{sessions}} (last_accessed_at);
CREATE INDEX IF NOT EXISTS "{{prefix}}sessions_attributes_expire_at_idx"
    ON {{sessions}} (attributes_expire_at) WHERE attributes_expire_at IS NOT NULL;

DROP FUNCTION {{create_fn}}(uuid, text, jsonb, timestamptz, timestamptz, timestamptz, integer, boolean);
DROP FUNCTION {{rotate_fn}}(uuid, uuid, boolean, text, text[], jsonb, timestamptz, timestamptz,
    timestamptz, timestamptz, timestamptz, integer, boolean);
DROP FUNCTION "{{schema_raw}}"."{{prefix}}make_room"(text, uuid, timestamptz, timestamptz, integer, boolean);

-- As in migration 3, except: the evictions' messages carry p_tag, the node's tag (' @' and
-- eight hex digits), so that the node can tell its own notifications from others'; and the
-- user's rows are locked in id order first, the order of every bulk write (logout everywhere,
-- group deletion, ...), so that a login and a bulk write cannot deadlock.
CREATE FUNCTION "{{schema_raw}}"."{{prefix}}make_room"(
    p_user_id      text,
    p_keep         uuid,
    p_now          timestamptz,
    p_idle_cutoff  timestamptz,
    p_max_sessions integer,
    p_reject       boolean,
    p_tag          text
) RETURNS uuid[]
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_live    bigint;
    v_evicted uuid[];
BEGIN
    PERFORM 1 FROM {{sessions}} WHERE user_id = p_user_id AND id IS DISTINCT FROM p_keep
        ORDER BY id FOR UPDATE;
    IF p_reject THEN
        SELECT count(*) INTO v_live
        FROM {{sessions}}
        WHERE user_id = p_user_id
          AND id IS DISTINCT FROM p_keep
          AND expires_at > p_now
          AND (p_idle_cutoff IS NULL OR last_accessed_at > p_idle_cutoff);
        IF v_live >= p_max_sessions THEN
            RAISE EXCEPTION 'the user already has % live sessions (limit %)', v_live, p_max_sessions
                USING ERRCODE = 'PS001';
        END IF;
    END IF;

    WITH ranked AS (
        SELECT id,
               row_number() OVER (
                   ORDER BY (expires_at > p_now
                             AND (p_idle_cutoff IS NULL OR last_accessed_at > p_idle_cutoff)) DESC,
                            last_accessed_at DESC,
                            id
               ) AS rank
        FROM {{sessions}}
        WHERE user_id = p_user_id AND id IS DISTINCT FROM p_keep
    ), deleted AS (
        DELETE FROM {{sessions}} s
        USING ranked r
        WHERE s.id = r.id AND r.rank >= p_max_sessions
        RETURNING s.id
    )
    SELECT array_agg(id) INTO v_evicted FROM deleted;

    IF v_evicted IS NOT NULL THEN
        PERFORM pg_notify('{{channel}}',
            'd ' || string_agg(replace(c.id::text, '-', ''), ',') || p_tag)
        FROM unnest(v_evicted) WITH ORDINALITY AS c(id, n)
        GROUP BY (c.n - 1) / {{ids_per_message}};
    END IF;
    RETURN coalesce(v_evicted, '{}');
END
$fn$;

-- As in migration 3, with the session's group and client, and with p_announce an outbox entry
-- announcing the new session ('c <id> <user in hex, or ->' and the node's tag), sent after the
-- commit like an update's (a NOTIFY in the transaction would serialise every create on
-- PostgreSQL's commit-time notification lock). Returns the evicted ids and that entry.
CREATE FUNCTION {{create_fn}}(
    p_id           uuid,
    p_user_id      text,
    p_attributes   jsonb,
    p_now          timestamptz,
    p_expires_at   timestamptz,
    p_idle_cutoff  timestamptz,  -- sessions last accessed at or before this are idle; NULL: no idle expiry
    p_max_sessions integer,      -- NULL: no cap
    p_reject       boolean,
    p_group_id     text,
    p_ip           text,
    p_user_agent   text,
    p_attribute_expiry jsonb,
    p_attributes_expire_at timestamptz,
    p_tag          text,
    p_announce     boolean
) RETURNS TABLE (evicted uuid[], seq bigint, payload text)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_evicted uuid[] := '{}';
    v_seq     bigint;
    v_payload text;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'pgsession needs READ COMMITTED to enforce the per-user cap, not %',
            current_setting('transaction_isolation')
            USING ERRCODE = 'PS002';
    END IF;
    IF p_user_id IS NOT NULL AND p_max_sessions IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock({{lock_class}}, hashtext(p_user_id));
        v_evicted := "{{schema_raw}}"."{{prefix}}make_room"(
            p_user_id, NULL, p_now, p_idle_cutoff, p_max_sessions, p_reject, p_tag);
    END IF;
    INSERT INTO {{sessions}}
        (id, user_id, version, attributes, created_at, updated_at, last_accessed_at, expires_at,
         group_id, ip, user_agent, attribute_expiry, attributes_expire_at)
    VALUES
        (p_id, p_user_id, 1, p_attributes, p_now, p_now, p_now, p_expires_at,
         p_group_id, p_ip, p_user_agent, p_attribute_expiry, p_attributes_expire_at);
    IF p_announce THEN
        INSERT INTO {{outbox}} AS o (payload)
        VALUES ('c ' || replace(p_id::text, '-', '') || ' '
                || coalesce(encode(convert_to(p_user_id, 'UTF8'), 'hex'), '-') || p_tag)
        RETURNING o.seq, o.payload INTO v_seq, v_payload;
    END IF;
    RETURN QUERY SELECT v_evicted, v_seq, v_payload;
END
$fn$;

-- As in migration 3, and: attribute expiry travels with the delta (p_set_expiry: the set keys
-- that expire, and when), the write is counted, and the old id's end is announced as a
-- rotation ('r <old> <new> <version>' and the node's tag), which every node applies as the
-- old id's deletion.
CREATE FUNCTION {{rotate_fn}}(
    p_old          uuid,
    p_new          uuid,
    p_set_user     boolean,
    p_user_id      text,
    p_removed      text[],
    p_set          jsonb,
    p_expires_at   timestamptz,  -- NULL: unchanged
    p_now          timestamptz,
    p_idle_cutoff  timestamptz,  -- for the session itself: idle at or before this is expired
    p_pending      timestamptz,  -- an access the caller's node has not flushed yet
    p_cap_cutoff   timestamptz,  -- idle cutoff for counting the user's other sessions
    p_max_sessions integer,      -- NULL: no cap
    p_reject       boolean,
    p_set_expiry   jsonb,
    p_expire_at    timestamptz,  -- the earliest time in p_set_expiry
    p_tag          text
) RETURNS TABLE (
    user_id          text,
    version          bigint,
    created_at       timestamptz,
    updated_at       timestamptz,
    last_accessed_at timestamptz,
    expires_at       timestamptz,
    attributes       jsonb,
    evicted          uuid[],
    seq              bigint,
    payload          text,
    group_id         text,
    ip               text,
    user_agent       text,
    reads            bigint,
    writes           bigint,
    attribute_expiry jsonb
)
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_evicted uuid[] := '{}';
    v_row     {{sessions}}%ROWTYPE;
    v_seq     bigint;
    v_payload text;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'pgsession needs READ COMMITTED to enforce the per-user cap, not %',
            current_setting('transaction_isolation')
            USING ERRCODE = 'PS002';
    END IF;
    -- The user's lock first, as a create takes it, then the session's row. A login locks
    -- that row together with the user's rows, in id order, the order of every bulk write:
    -- locking its own row first could deadlock with one.
    IF p_set_user AND p_user_id IS NOT NULL AND p_max_sessions IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock({{lock_class}}, hashtext(p_user_id));
        PERFORM 1 FROM {{sessions}} s WHERE s.user_id = p_user_id OR s.id = p_old
            ORDER BY s.id FOR UPDATE;
    END IF;
    SELECT * INTO v_row FROM {{sessions}} s
    WHERE s.id = p_old AND s.expires_at > p_now
      AND (p_idle_cutoff IS NULL OR greatest(s.last_accessed_at, p_pending) > p_idle_cutoff)
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF p_set_user AND p_user_id IS NOT NULL AND p_max_sessions IS NOT NULL THEN
        v_evicted := "{{schema_raw}}"."{{prefix}}make_room"(
            p_user_id, p_old, p_now, p_cap_cutoff, p_max_sessions, p_reject, p_tag);
    END IF;
    UPDATE {{sessions}} s SET
        id = p_new,
        user_id = CASE WHEN p_set_user THEN p_user_id ELSE s.user_id END,
        attributes = (s.attributes - p_removed) || p_set,
        attribute_expiry = (s.attribute_expiry - p_removed
            - ARRAY(SELECT jsonb_object_keys(p_set))) || p_set_expiry,
        attributes_expire_at = least(s.attributes_expire_at, p_expire_at),
        expires_at = coalesce(p_expires_at, s.expires_at),
        version = s.version + 1,
        writes = s.writes + 1,
        updated_at = p_now,
        last_accessed_at = greatest(s.last_accessed_at, p_now)
    WHERE s.id = p_old
    RETURNING s.* INTO v_row;
    INSERT INTO {{outbox}} AS o (payload)
    VALUES ('r ' || replace(p_old::text, '-', '') || ' ' || replace(p_new::text, '-', '')
            || ' ' || v_row.version || p_tag)
    RETURNING o.seq, o.payload INTO v_seq, v_payload;
    RETURN QUERY SELECT v_row.user_id, v_row.version, v_row.created_at, v_row.updated_at,
        v_row.last_accessed_at, v_row.expires_at, v_row.attributes, v_evicted, v_seq, v_payload,
        v_row.group_id, v_row.ip, v_row.user_agent, v_row.reads, v_row.writes,
        v_row.attribute_expiry;
END
$fn$;
