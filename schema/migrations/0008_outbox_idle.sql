-- 0008_outbox_idle: the mail workers' idle wait.
--
-- rd.outbox_next_due_ms (0007) answered 0 instead of -1 on an outbox with
-- nothing to send: greatest(0, NULL) is 0 (greatest ignores NULLs), so the
-- coalesce(..., -1) never applied. Idle workers then slept the shortest
-- wait (20 ms) instead of the longest (5 s, or until NOTIFY rd_outbox):
-- with 4 workers about 200 claims and 200 of these queries a second with
-- no mail at all (2 % of a core for rosterd, more for PostgreSQL).
-- Same attributes and grants as before (CREATE OR REPLACE keeps them).
CREATE OR REPLACE FUNCTION rd.outbox_next_due_ms() RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
-- the first entry of outbox_due, not a scan of the rows (see outbox_claim)
SET enable_seqscan = off SET enable_bitmapscan = off AS $$
	SELECT CASE WHEN s.due IS NULL THEN -1
		    ELSE greatest(0, (extract(epoch FROM s.due - now()) * 1000)::bigint) END
	  FROM (SELECT min(o.due_at) AS due
		  FROM rd.outbox o
		 WHERE o.status IN ('queued', 'retrying', 'sending')) s
$$;
