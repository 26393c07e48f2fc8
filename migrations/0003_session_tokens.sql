-- pgsession migration 3: sessions are keyed by a hash of their token; user ids are text;
-- sessions may have no user yet (before login); rotation and login in one round trip.
--
-- Placeholders as in 0001_create_sessions.sql, plus:
--   {{rotate_fn}}        schema-qualified, quoted rotate/login function
--
-- Until now a session's id was also its token, the cookie value: anyone reading this table
-- could take over every session. From now on the table holds the first 16 bytes of SHA-256 of
-- the token (src/token.rs); an existing id is converted the same way, so the cookies handed
-- out before the upgrade keep working as tokens. Nodes of the previous version cannot work on
-- the converted table: upgrade every node together.
LOCK TABLE {{sessions}}, {{outbox}} IN ACCESS EXCLUSIVE MODE;

UPDATE {{sessions}}
SET id = encode(substring(sha256(uuid_send(id)) FROM 1 FOR 16), 'hex')::uuid;
-- Unannounced invalidations name the ids of before; every node restarts with an empty cache.
DELETE FROM {{outbox}};

-- Text, so that integer and string user ids work as well as UUIDs (printed as PostgreSQL
-- prints a uuid, which is how pgsession formats one). NULL: a session before login.
ALTER TABLE {{sessions}}
    ALTER COLUMN user_id DROP NOT NULL,
    ALTER COLUMN user_id TYPE text USING user_id::text;

DROP FUNCTION {{create_fn}}(uuid, uuid, jsonb, timestamptz, timestamptz, timestamptz, integer, boolean);

-- Removes the sessions of p_user_id that a new one would take beyond the cap, counting live
-- sessions before dead ones and keeping the (p_max_sessions - 1) most recently used, except
-- p_keep. Announces them in chunks that fit NOTIFY's payload limit. With p_reject, a user at
-- the cap gets SQLSTATE PS001 instead and nothing is deleted. The caller holds the user's lock.
CREATE FUNCTION "{{schema_raw}}"."{{prefix}}make_room"(
    p_user_id      text,
    p_keep         uuid,
    p_now          timestamptz,
    p_idle_cutoff  timestamptz,
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
        PERFORM pg_notify('{{channel}}', 'd ' || string_agg(replace(c.id::text, '-', ''), ','))
        FROM unnest(v_evicted) WITH ORDINALITY AS c(id, n)
        GROUP BY (c.n - 1) / {{ids_per_message}};
    END IF;
    RETURN coalesce(v_evicted, '{}');
END
$fn$;

-- Creates a session (p_user_id NULL: before login, never capped) holding the user's cap, in
-- one round trip. Logins of one user are serialised by a transaction-scoped advisory lock; in
-- READ COMMITTED every statement of a function takes a fresh snapshot, so the statements after
-- the lock see every session a concurrent login of the same user committed. Returns the ids of
-- the sessions deleted to make room.
CREATE FUNCTION {{create_fn}}(
    p_id           uuid,
    p_user_id      text,
    p_attributes   jsonb,
    p_now          timestamptz,
    p_expires_at   timestamptz,
    p_idle_cutoff  timestamptz,  -- sessions last accessed at or before this are idle; NULL: no idle expiry
    p_max_sessions integer,      -- NULL: no cap
    p_reject       boolean
) RETURNS uuid[]
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $fn$
DECLARE
    v_evicted uuid[] := '{}';
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'pgsession needs READ COMMITTED to enforce the per-user cap, not %',
            current_setting('transaction_isolation')
            USING ERRCODE = 'PS002';
    END IF;
    IF p_user_id IS NOT NULL AND p_max_sessions IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock({{lock_class}}, hashtext(p_user_id));
        v_evicted := "{{schema_raw}}"."{{prefix}}make_room"(
            p_user_id, NULL, p_now, p_idle_cutoff, p_max_sessions, p_reject);
    END IF;
    INSERT INTO {{sessions}}
        (id, user_id, version, attributes, created_at, updated_at, last_accessed_at, expires_at)
    VALUES
        (p_id, p_user_id, 1, p_attributes, p_now, p_now, p_now, p_expires_at);
    RETURN v_evicted;
END
$fn$;

-- Moves a session to a new id (a new token), writing the caller's pending changes, and with
-- p_set_user binds it to p_user_id (login) under that user's lock and cap, like a create. One
-- round trip. The old id stops existing in the same transaction; its invalidation goes to the
-- outbox like a delete's. Returns no row when the session is gone or expired (nothing is
-- written then), otherwise the new state, the evicted ids, and the outbox entry.
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
    p_reject       boolean
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
    payload          text
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
    -- The user's lock first, as a create takes it, then the session's row.
    IF p_set_user AND p_user_id IS NOT NULL AND p_max_sessions IS NOT NULL THEN
        PERFORM pg_advisory_xact_lock({{lock_class}}, hashtext(p_user_id));
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
            p_user_id, p_old, p_now, p_cap_cutoff, p_max_sessions, p_reject);
    END IF;
    UPDATE {{sessions}} s SET
        id = p_new,
        user_id = CASE WHEN p_set_user THEN p_user_id ELSE s.user_id END,
        attributes = (s.attributes - p_removed) || p_set,
        expires_at = coalesce(p_expires_at, s.expires_at),
        version = s.version + 1,
        updated_at = p_now,
        last_accessed_at = greatest(s.last_accessed_at, p_now)
    WHERE s.id = p_old
    RETURNING s.* INTO v_row;
    INSERT INTO {{outbox}} AS o (payload) VALUES ('d ' || replace(p_old::text, '-', ''))
    RETURNING o.seq, o.payload INTO v_seq, v_payload;
    RETURN QUERY SELECT v_row.user_id, v_row.version, v_row.created_at, v_row.updated_at,
        v_row.last_accessed_at, v_row.expires_at, v_row.attributes, v_evicted, v_seq, v_payload;
END
$fn$;
