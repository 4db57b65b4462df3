-- Statements of the mail outbox: the mail workers (daemon/mail.c) prepare
-- the outbox_* ones on their own connections; rosterctl runs the ctl_* ones.

-- name: outbox_listen
LISTEN rd_outbox

-- name: outbox_claim
SELECT org, outbox_id, coalesce(from_address, ''), coalesce(reply_to, ''), coalesce(to_name, ''),
       to_address, subject, body, message_id, created_ms, window_ms, window_attempts, attempts
  FROM rd.outbox_claim($1, $2::integer, $3::integer)

-- name: outbox_renew
SELECT rd.outbox_renew($1, $2::integer)

-- name: outbox_record
SELECT rd.outbox_record($1, $2::text[], $3::bigint[], $4::text[], $5::text[], $6::bigint[])

-- name: outbox_next_due
-- (rd.outbox_next_due_ms: every organisation's rows, under row-level security)
SELECT rd.outbox_next_due_ms()

-- name: ctl_outbox_list
SELECT o.org, o.outbox_id::text, o.contact_id::text, o.to_address, o.template, o.language,
       o.subject, o.status, o.attempts::text, coalesce(o.last_error, ''),
       to_char(o.created_at, 'YYYY-MM-DD"T"HH24:MI:SS.MSOF'),
       coalesce(to_char(o.sent_at, 'YYYY-MM-DD"T"HH24:MI:SS.MSOF'), ''),
       CASE WHEN o.status IN ('queued', 'retrying')
	    THEN coalesce(to_char(o.due_at, 'YYYY-MM-DD"T"HH24:MI:SS.MSOF'), '') ELSE '' END,
       o.message_id
  FROM rd.outbox o
 WHERE ($1::text IS NULL OR o.org = $1)
   AND ($2::text IS NULL
	OR o.contact_id = coalesce(rd.contact_resolve(o.org, $2), rd.as_uuid($2)))
   AND ($3::text IS NULL OR o.status = $3)
 ORDER BY o.created_at DESC, o.outbox_id DESC
 LIMIT $4::integer

-- name: ctl_outbox_retry
SELECT id::text FROM rd.outbox_retry($1, $2::bigint, $3, $4::boolean) AS id ORDER BY id

-- name: ctl_outbox_status
SELECT status FROM rd.outbox WHERE org = $1 AND outbox_id = $2::bigint
