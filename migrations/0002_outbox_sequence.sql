-- pgsession migration 2: number the invalidation outbox from an ordinary (logged) sequence.
--
-- Placeholders as in 0001_create_sessions.sql, plus:
--   {{outbox_seq}}       schema-qualified, quoted sequence numbering the outbox
--
-- Migration 1 numbered the outbox with an identity column. The identity sequence of an unlogged
-- table is unlogged too and restarts from 1 after a crash; a node retiring numbers it announced
-- before the crash could then delete another node's new, unannounced row. A logged sequence
-- never goes back.
--
-- (A correction to the comments of migration 1, which cannot change once applied: the writing
-- node deletes announced rows in bulk shortly after the NOTIFY, not in its transaction.)
--
-- Numbering continues above every number the identity handed out, so that numbers a node still
-- holds (it may be running the previous version during a rolling upgrade) are never reused.
-- Nodes of the previous version may be inserting meanwhile: no number may be taken between
-- reading the last one and switching over.
LOCK TABLE {{outbox}} IN ACCESS EXCLUSIVE MODE;
CREATE SEQUENCE {{outbox_seq}};
SELECT setval('{{outbox_seq}}', greatest(
    coalesce(pg_sequence_last_value(pg_get_serial_sequence('{{outbox}}', 'seq')::regclass), 0),
    coalesce((SELECT max(seq) FROM {{outbox}}), 0)
) + 1, false);
ALTER TABLE {{outbox}} ALTER COLUMN seq DROP IDENTITY;
ALTER TABLE {{outbox}} ALTER COLUMN seq SET DEFAULT nextval('{{outbox_seq}}');
-- Dropped with the table.
ALTER SEQUENCE {{outbox_seq}} OWNED BY {{outbox}}.seq;
-- Unlike an identity column, a default of nextval() needs USAGE on the sequence: give it to
-- every role that may insert into the outbox, so that writers keep working through the upgrade.
DO $$
DECLARE
    grantee oid;
BEGIN
    FOR grantee IN
        SELECT DISTINCT acl.grantee
        FROM pg_class AS c, aclexplode(c.relacl) AS acl
        WHERE c.oid = '{{outbox}}'::regclass AND acl.privilege_type = 'INSERT'
          AND acl.grantee <> c.relowner
    LOOP
        IF grantee = 0 THEN
            EXECUTE 'GRANT USAGE ON SEQUENCE {{outbox_seq}} TO PUBLIC';
        ELSE
            EXECUTE format('GRANT USAGE ON SEQUENCE {{outbox_seq}} TO %I', pg_get_userbyid(grantee));
        END IF;
    END LOOP;
END
$$;
