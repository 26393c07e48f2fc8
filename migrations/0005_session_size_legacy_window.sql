-- pgsession migration 5: a limit on a session's total size, enforced where writes merge; and
-- legacy tokens accepted only while sessions converted by migration 3 can still be alive.
--
-- Placeholders as in 0004_activity_groups_client.sql, plus:
--   {{migrations}}       schema-qualified, quoted bookkeeping table of applied migrations

-- Migration 3 converted the sessions that existed before it in place, so their cookies (legacy
-- tokens, hyphenated UUIDs) kept working. Those sessions were created before migration 3 was
-- applied; when the last of them expires, no legacy token can open anything any more, and
-- nodes refuse them from then on (Config::accept_legacy_tokens forces them on regardless).
-- NULL: there were none (a database created at version 3 or later).
ALTER TABLE {{cache_epoch}} ADD COLUMN legacy_tokens_until timestamptz;
UPDATE {{cache_epoch}} SET legacy_tokens_until = (
    SELECT max(s.expires_at) FROM {{sessions}} s
    WHERE s.created_at < (SELECT m.applied_at FROM {{migrations}} m WHERE m.version = 3));

DROP FUNCTION {{rotate_fn}}(uuid, uuid, boolean, text, text[], jsonb, timestamptz, timestamptz,
    timestamptz, timestamptz, timestamptz, integer, boolean, jsonb, timestamptz, text);

-- As in migration 4, and: p_max_size bounds the merged attributes, measured as their jsonb text
-- (octet_length(attributes::text)); a rotation whose merge would grow the session past it
-- raises SQLSTATE PS003 with the size in DETAIL, and nothing is written.
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
    p_tag          text,
    p_max_size     bigint        -- NULL: no limit
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
    v_size    bigint;
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
    -- Only growth is refused: a session already over a lowered limit may still shrink.
    IF p_max_size IS NOT NULL AND p_set <> '{}' THEN
        v_size := octet_length(((v_row.attributes - p_removed) || p_set)::text);
        IF v_size > p_max_size AND v_size > octet_length(v_row.attributes::text) THEN
            RAISE EXCEPTION 'the session would hold % bytes of attributes (limit %)',
                v_size, p_max_size
                USING ERRCODE = 'PS003', DETAIL = v_size::text;
        END IF;
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
