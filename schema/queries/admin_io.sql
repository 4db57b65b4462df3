-- Statements of rosterctl erase, export, import and dead (cli/erase.c,
-- export.c, import.c, dead.c). docs/admin-io.md describes the commands.

-- name: admin_begin
BEGIN

-- name: admin_commit
COMMIT

-- name: admin_rollback
ROLLBACK

-- name: admin_org_exists
SELECT 1 FROM rd.orgs WHERE org = $1

-- name: admin_lock_keys
SELECT rd.lock_keys($1::text[])

-- name: admin_apply
-- One message built by rosterctl, applied as rd.apply applies a queued one
-- (final: a message that would wait is rejected instead).
SELECT outcome, coalesce(reason, '') FROM rd.apply($1, $2, $3, $4::bigint, $5::jsonb, true, NULL)

-- name: erase_find
-- The contact an id names: in the given organisation, or in any when $2 is
-- NULL (contact ids are UUIDs); several rows only in that second case.
SELECT org, contact_id::text, erased, coalesce(merged_into::text, '')
  FROM rd.contacts
 WHERE contact_id = rd.as_uuid($1) AND ($2::text IS NULL OR org = $2)
 ORDER BY org

-- name: erase_result
SELECT count(*) FILTER (WHERE erased) FROM rd.contacts
 WHERE org = $1 AND contact_id IN (SELECT rd.contact_group($1, rd.contact_resolve($1, $2)))

-- name: export_views
-- The views rosterctl export may read: those of schema report that have an
-- org column (every one of SPEC 5).
SELECT v.viewname::text FROM pg_views v
 WHERE v.schemaname = 'report'
   AND EXISTS (SELECT 1 FROM information_schema.columns c
		WHERE c.table_schema = 'report' AND c.table_name = v.viewname
		  AND c.column_name = 'org')
 ORDER BY 1

-- name: export_set_org
-- The organisation filter of the COPY below ('' = every organisation): COPY
-- takes no parameters, so the value travels as a setting, never as text.
SELECT set_config('rd.export_org', $1, false)

-- name: export_copy_sql
-- The COPY statement for a view checked against pg_views; the name is
-- quoted by quote_ident (%I). json: one row_to_json document per line, in
-- CSV mode with quote and delimiter bytes that JSON text never contains, so
-- that the documents pass unchanged (text mode would double backslashes).
SELECT CASE $2
	WHEN 'csv' THEN format('COPY (SELECT * FROM report.%I WHERE current_setting(''rd.export_org'') '
			       'IN ('''', org)) TO STDOUT WITH (FORMAT csv, HEADER)', v.viewname)
	ELSE format('COPY (SELECT row_to_json(t) FROM report.%I t WHERE '
		    'current_setting(''rd.export_org'') IN ('''', t.org)) TO STDOUT WITH '
		    '(FORMAT csv, QUOTE E''\x01'', DELIMITER E''\x02'')', v.viewname)
	END
  FROM pg_views v
 WHERE v.schemaname = 'report' AND v.viewname = $1

-- name: import_hash
SELECT encode(sha256($1::bytea), 'hex')

-- name: import_lock_chunk
-- The keys of a chunk of rows ($2: a JSON array, without the org), in one go.
SELECT rd.lock_keys(ARRAY(SELECT $1 || '/' || k FROM jsonb_array_elements_text($2::jsonb) k))

-- name: import_row
SELECT outcome, coalesce(reason, ''), action, coalesce(contact_id, ''), coalesce(detail, '')
  FROM rd.import_row($1, $2, $3::bigint, $4::jsonb, $5, $6::jsonb)

-- name: dead_forget
-- Before a replay: forget the rejection of (org, id), so that the message
-- is applied afresh instead of counting as a duplicate of its rejection.
-- Only a rejection: an applied or stale message stays a duplicate.
DELETE FROM rd.messages WHERE org = $1 AND message_id = $2 AND outcome = 'rejected'
