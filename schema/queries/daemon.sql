-- Statements the daemon prepares on every connection (rd_pg). Each starts
-- with a "-- name: X" line; parameters are $n, org first where there is one.

-- name: lock_keys
SELECT rd.lock_keys($1::text[])

-- name: apply
SELECT outcome, reason FROM rd.apply($1, $2, $3, $4::bigint, $5::jsonb, $6::boolean, $7)

-- name: ctl_messages
SELECT org, message_id, type, outcome, coalesce(reason, ''), to_char(at, 'YYYY-MM-DD"T"HH24:MI:SS.MSOF')
  FROM report.messages
 WHERE org = $1
 ORDER BY at DESC, message_id
 LIMIT $2::integer
