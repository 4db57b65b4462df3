-- Statements of rosterctl contact, duplicates, merge and unmerge
-- (cli/contact.c, cli/duplicates.c, cli/merge.c; docs/admin.md). $1 is the
-- organisation, or NULL for every organisation where the command allows it;
-- a contact id of another organisation than $1 is simply not found.

-- name: contact_lookup
-- The contacts an argument names: a contact id (tombstones included), or
-- an email (live contacts with it). Columns: org, contact_id, email,
-- merged_into.
SELECT c.org, c.contact_id::text, coalesce(c.email, ''), coalesce(c.merged_into::text, '')
  FROM rd.contacts c
 WHERE ($1::text IS NULL OR c.org = $1)
   AND CASE WHEN rd.as_uuid($2) IS NOT NULL THEN c.contact_id = rd.as_uuid($2)
	    ELSE c.email = lower(btrim($2)) AND c.merged_into IS NULL AND NOT c.erased END
 ORDER BY c.org, c.created_at, c.contact_id
 LIMIT 20

-- name: contact_show
-- The dashboard of one contact as one JSON document (sections: contact,
-- live_contact, merges, bookings, attendances, invoices, key_figures,
-- balances, transactions, notes, outbox, activity, field_history). Rows are
-- those of the report views plus *_text: amounts formatted with their
-- currency (rd.money_fmt).
WITH k AS (SELECT $1::text AS org, $2::uuid AS cid)
SELECT jsonb_build_object(
	'contact', (SELECT to_jsonb(c) FROM report.contacts c, k
		     WHERE c.org = k.org AND c.contact_id = k.cid::text),
	'live_contact', (SELECT rd.contact_resolve(k.org, k.cid::text)::text FROM k),
	'merges', coalesce((SELECT jsonb_agg(to_jsonb(m) ORDER BY m.merge_id)
			      FROM report.merges m, k
			     WHERE m.org = k.org AND k.cid::text IN (m.keep_id, m.drop_id)), '[]'),
	'bookings', coalesce((SELECT jsonb_agg(to_jsonb(b) || jsonb_build_object('offer_title', o.title,
						'total_text', rd.money_fmt(b.total, b.currency))
					       ORDER BY b.created_at, b.booking_id)
				FROM report.bookings b CROSS JOIN k
				LEFT JOIN rd.offers o ON o.org = b.org AND o.offer_id = b.offer_id
			       WHERE b.org = k.org AND b.contact_id = k.cid::text), '[]'),
	'attendances', coalesce((SELECT jsonb_agg(to_jsonb(a) || jsonb_build_object(
							'offer_id', b.offer_id, 'offer_title', o.title,
							'price_text', rd.money_fmt(a.price, b.currency))
						  ORDER BY a.booking_id, a.attendee_id)
				   FROM report.attendees a CROSS JOIN k
				   JOIN rd.bookings b ON b.org = a.org AND b.booking_id = a.booking_id
				   LEFT JOIN rd.offers o ON o.org = b.org AND o.offer_id = b.offer_id
				  WHERE a.org = k.org AND a.contact_id = k.cid::text), '[]'),
	'invoices', coalesce((SELECT jsonb_agg(to_jsonb(i) || jsonb_build_object(
					'amount_text', rd.money_fmt(i.amount, i.currency),
					'paid_text', rd.money_fmt(i.paid, i.currency),
					'open_text', rd.money_fmt(i.open, i.currency)) ORDER BY i.invoice_id)
				FROM report.invoices i, k
			       WHERE i.org = k.org AND i.contact_id = k.cid::text), '[]'),
	'key_figures', coalesce((SELECT jsonb_agg(to_jsonb(f) || jsonb_build_object(
					'revenue_text', rd.money_fmt(f.revenue, f.currency),
					'outstanding_text', rd.money_fmt(f.outstanding, f.currency))
					ORDER BY f.currency)
				   FROM report.key_figures f, k
				  WHERE f.org = k.org AND f.contact_id = k.cid::text), '[]'),
	'balances', coalesce((SELECT jsonb_agg(to_jsonb(x) || jsonb_build_object(
					'balance_text', rd.money_fmt(x.balance, x.currency)) ORDER BY x.currency)
				FROM report.balances x, k
			       WHERE x.org = k.org AND x.contact_id = k.cid::text), '[]'),
	'transactions', coalesce((SELECT jsonb_agg(to_jsonb(t) || jsonb_build_object(
					'amount_text', rd.money_fmt(t.amount, t.currency)) ORDER BY t.at, t.transaction_id)
				    FROM report.transactions t, k
				   WHERE t.org = k.org AND t.contact_id = k.cid::text), '[]'),
	'notes', coalesce((SELECT jsonb_agg(jsonb_build_object('at', n.at, 'author', n.author,
							       'text', n.text, 'message_id', n.message_id)
					    ORDER BY n.at, n.note_id)
			     FROM rd.notes n, k
			    WHERE n.org = k.org AND n.contact_id = k.cid), '[]'),
	'outbox', coalesce((SELECT jsonb_agg(to_jsonb(o) ORDER BY o.created_at, o.outbox_id::bigint)
			      FROM report.outbox o, k
			     WHERE o.org = k.org AND o.contact_id = k.cid::text), '[]'),
	'activity', coalesce((SELECT jsonb_agg(jsonb_build_object('at', a.at, 'kind', a.kind,
								  'summary', a.summary,
								  'message_id', a.message_id)
					       ORDER BY a.at, a.activity_id)
				FROM rd.activity a, k
			       WHERE a.org = k.org AND a.contact_id = k.cid), '[]'),
	'field_history', coalesce((SELECT jsonb_agg(jsonb_build_object('at', h.at, 'field', h.field,
								       'old_value', h.old_value,
								       'new_value', h.new_value,
								       'message_id', h.message_id)
						    ORDER BY h.at, h.history_id)
				     FROM rd.field_history h, k
				    WHERE h.org = k.org AND h.contact_id = k.cid), '[]'))::text

-- name: contact_find
-- Columns: org, contact_id, email, name, company, score, matched (email,
-- name or company).
SELECT o.org, f.contact_id::text, coalesce(c.email, ''),
       coalesce(btrim(coalesce(c.first_name, '') || ' ' || coalesce(c.last_name, '')), ''),
       coalesce(c.company, ''), round(f.score::numeric, 2)::text, f.matched
  FROM (SELECT DISTINCT org FROM rd.contacts WHERE $1::text IS NULL OR org = $1) o
 CROSS JOIN LATERAL rd.contact_find(o.org, $2, $3::integer) f
  JOIN rd.contacts c ON c.org = o.org AND c.contact_id = f.contact_id
 ORDER BY f.score DESC, o.org, c.created_at, f.contact_id
 LIMIT $3::integer

-- name: duplicates
-- Columns: org, score, contact_a, email_a, name_a, contact_b, email_b,
-- name_b, reasons (JSON array).
SELECT o.org, d.score::text, d.contact_a::text, coalesce(a.email, ''),
       btrim(coalesce(a.first_name, '') || ' ' || coalesce(a.last_name, '')),
       d.contact_b::text, coalesce(b.email, ''),
       btrim(coalesce(b.first_name, '') || ' ' || coalesce(b.last_name, '')),
       to_jsonb(d.reasons)::text
  FROM (SELECT DISTINCT org FROM rd.contacts WHERE $1::text IS NULL OR org = $1) o
 CROSS JOIN LATERAL rd.duplicates(o.org, $2::integer) d
  JOIN rd.contacts a ON a.org = o.org AND a.contact_id = d.contact_a
  JOIN rd.contacts b ON b.org = o.org AND b.contact_id = d.contact_b
 ORDER BY d.score DESC, o.org, d.contact_a, d.contact_b
 LIMIT $2::integer

-- name: merge_org
-- The organisation of a contact id (for merge without --org).
SELECT org FROM rd.contacts WHERE contact_id = rd.as_uuid($1) ORDER BY org

-- name: merge_run
-- One statement, one transaction: the merge and its journal.
SELECT rd.admin_merge($1, $2, $3)::text

-- name: unmerge_org
-- The organisation of a merge id (for unmerge without --org).
SELECT org FROM rd.merges WHERE merge_id = $1::bigint ORDER BY org

-- name: unmerge_run
SELECT rd.admin_unmerge($1, $2::bigint)::text
