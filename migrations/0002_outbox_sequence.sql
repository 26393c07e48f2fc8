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
CREATE SEQUENCE {{outbox_seq}};
SELECT setval('{{outbox_seq}}', greatest(
    coalesce(pg_sequence_last_value(pg_get_serial_sequence('{{outbox}}', 'seq')::regclass), 0),
    coalesce((SELECT max(seq) FROM {{outbox}}), 0)
) + 1, false);
ALTER TABLE {{outbox}} ALTER COLUMN seq DROP IDENTITY;
ALTER TABLE {{outbox}} ALTER COLUMN seq SET DEFAULT nextval('{{outbox_seq}}');
-- Dropped with the table. A role that writes sessions without owning them needs USAGE on it
-- (see the README).
ALTER SEQUENCE {{outbox_seq}} OWNED BY {{outbox}}.seq;
