-- 0004_outbox: mail templates and the outbox (SPEC 3 template.upserted,
-- mail.requested, the notify flags; 4.8; report.outbox). See docs/outbox.md.
--
-- Mails are rendered here, at queue time, inside the transaction of the
-- message that caused them (the outbox shows exactly what is sent). The
-- triggers wrap the handlers of 0002 (bookings) and 0003 (ledger) in the
-- registry rd.handler_fns instead of editing them. Delivery is done by the
-- mail worker threads (daemon/mail.c) through rd.outbox_claim,
-- rd.outbox_renew and rd.outbox_record.

-- ---- templates -------------------------------------------------------------

-- One template per organisation, key and language (stored lower-case:
-- BCP 47 tags compare case-insensitively).
CREATE TABLE rd.templates (
	org         text        NOT NULL,
	key         text        NOT NULL,
	language    text        NOT NULL,
	subject     text        NOT NULL,
	body        text        NOT NULL,
	message_id  text        NOT NULL,
	created_at  timestamptz NOT NULL DEFAULT now(),
	updated_at  timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (org, key, language)
);

-- The placeholder grammar, the same as daemon/template.c (rd_tpl_known):
-- contact.<person key>, contact.fields.<key>, vars.<key> (keys non-empty,
-- without braces) and a fixed list.
CREATE FUNCTION rd.tpl_known(p_name text) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
	SELECT p_name ~ '^contact\.fields\.[^{}]+$'
	    OR p_name ~ '^vars\.[^{}]+$'
	    OR (left(p_name, 8) = 'contact.' AND substr(p_name, 9) = ANY (rd.person_keys()))
	    OR p_name = ANY (ARRAY['booking.number', 'booking.total', 'offer.title',
				   'offer.starts_at', 'invoice.number', 'invoice.amount',
				   'invoice.due', 'payment.amount'])
$$;

-- NULL when every "{{ name }}" of p is known, else why not (naming it).
CREATE FUNCTION rd.tpl_check(p text) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
	v_rest text := p;
	v_i integer;
	v_j integer;
	v_in text;
BEGIN
	LOOP
		v_i := strpos(v_rest, '{{');
		EXIT WHEN v_i = 0;
		v_rest := substr(v_rest, v_i + 2);
		v_j := strpos(v_rest, '}}');
		IF v_j = 0 THEN
			RETURN format('unterminated placeholder "{{%s"', left(v_rest, 38));
		END IF;
		v_in := left(v_rest, v_j - 1);
		IF NOT rd.tpl_known(btrim(v_in, E' \t')) THEN
			RETURN format('unknown placeholder {{%s}}', left(v_in, 100));
		END IF;
		v_rest := substr(v_rest, v_j + 2);
	END LOOP;
	RETURN NULL;
END $$;

-- Fill every "{{ name }}" from p_ctx, a flat object keyed by placeholder
-- name ("contact.first_name": "Anna"); absent values render as "".
CREATE FUNCTION rd.tpl_render(p text, p_ctx jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
	v_out text := '';
	v_rest text := p;
	v_i integer;
	v_j integer;
BEGIN
	LOOP
		v_i := strpos(v_rest, '{{');
		EXIT WHEN v_i = 0;
		v_out := v_out || left(v_rest, v_i - 1);
		v_rest := substr(v_rest, v_i + 2);
		v_j := strpos(v_rest, '}}');
		IF v_j = 0 THEN -- cannot happen after rd.tpl_check: keep it literal
			RETURN v_out || '{{' || v_rest;
		END IF;
		v_out := v_out || coalesce(p_ctx->>btrim(left(v_rest, v_j - 1), E' \t'), '');
		v_rest := substr(v_rest, v_j + 2);
	END LOOP;
	RETURN v_out || v_rest;
END $$;

-- One line, no control characters (the subject; the mail workers clean
-- every header value again before it is written).
CREATE FUNCTION rd.header_clean(p text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
	SELECT regexp_replace(p, '[[:cntrl:]]', ' ', 'g')
$$;

-- ISO 4217 minor units (those that are not 2).
CREATE FUNCTION rd.currency_exponent(p_cur text) RETURNS integer
LANGUAGE sql IMMUTABLE AS $$
	SELECT CASE
		WHEN p_cur IN ('BIF', 'CLP', 'DJF', 'GNF', 'ISK', 'JPY', 'KMF', 'KRW', 'PYG', 'RWF',
			       'UGX', 'UYI', 'VND', 'VUV', 'XAF', 'XOF', 'XPF') THEN 0
		WHEN p_cur IN ('BHD', 'IQD', 'JOD', 'KWD', 'LYD', 'OMR', 'TND') THEN 3
		WHEN p_cur IN ('CLF', 'UYW') THEN 4
		ELSE 2 END
$$;

-- 12050, 'CHF' -> 'CHF 120.50'; 500, 'JPY' -> 'JPY 500'; -5, 'KWD' -> 'KWD -0.005'.
CREATE FUNCTION rd.money_fmt(p_amount bigint, p_cur text) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
	v_e integer := rd.currency_exponent(p_cur);
	v_div numeric := (10::numeric ^ v_e)::numeric(30, 0);
	v_a numeric := abs(p_amount::numeric);
BEGIN
	IF p_amount IS NULL THEN
		RETURN NULL;
	END IF;
	RETURN coalesce(p_cur || ' ', '') || CASE WHEN p_amount < 0 THEN '-' ELSE '' END
	       || div(v_a, v_div)::text
	       || CASE WHEN v_e > 0 THEN '.' || lpad(mod(v_a, v_div)::numeric(30, 0)::text, v_e, '0')
		       ELSE '' END;
END $$;

-- template.upserted: a template with an unknown placeholder is rejected,
-- naming it (the C validator says the same before SQL; this is the rule).
CREATE FUNCTION rd.h_template_upserted(p_org text, p_id text, p_at timestamptz, d jsonb)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	v_bad text;
BEGIN
	v_bad := rd.tpl_check(d->>'subject');
	IF v_bad IS NOT NULL THEN
		PERFORM rd.reject('data.subject: ' || v_bad);
	END IF;
	v_bad := rd.tpl_check(d->>'body');
	IF v_bad IS NOT NULL THEN
		PERFORM rd.reject('data.body: ' || v_bad);
	END IF;
	INSERT INTO rd.templates AS t (org, key, language, subject, body, message_id)
	VALUES (p_org, d->>'key', lower(btrim(d->>'language')), d->>'subject', d->>'body', p_id)
	ON CONFLICT (org, key, language) DO UPDATE SET
		subject = EXCLUDED.subject,
		body = EXCLUDED.body,
		message_id = p_id,
		updated_at = now();
	RETURN 'applied';
END $$;

-- ---- the outbox ------------------------------------------------------------

-- status: queued -> sending -> sent | retrying -> sending ... | failed.
-- due_at: queued/retrying: the earliest next attempt; sending: the end of
-- the worker's lease (a row whose lease ended is taken again: its worker
-- or process died); sent/failed: NULL. One partial index serves the claim.
CREATE TABLE rd.outbox (
	org              text        NOT NULL,
	outbox_id        bigint      GENERATED BY DEFAULT AS IDENTITY,
	contact_id       uuid        NOT NULL,
	template         text        NOT NULL,
	language         text        NOT NULL,
	from_address     text,       -- the org's mail_from when queued ("Name <addr>")
	reply_to         text,
	to_name          text,
	to_address       text        NOT NULL,
	subject          text        NOT NULL,
	body             text        NOT NULL,
	message_id       text        NOT NULL, -- RFC 5322 Message-ID, fixed per row
	cause_message_id text,       -- the message that queued it
	status           text        NOT NULL DEFAULT 'queued'
	                 CHECK (status IN ('queued', 'sending', 'sent', 'retrying', 'failed')),
	attempts         integer     NOT NULL DEFAULT 0,
	window_at        timestamptz NOT NULL DEFAULT now(), -- retries until window_at + mail_lifetime
	window_attempts  integer     NOT NULL DEFAULT 0,     -- attempts since window_at (back-off)
	last_error       text,
	due_at           timestamptz DEFAULT now(),
	claim            text,       -- the worker's claim token while sending
	created_at       timestamptz NOT NULL DEFAULT now(),
	sent_at          timestamptz,
	updated_at       timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (org, outbox_id),
	FOREIGN KEY (org, contact_id) REFERENCES rd.contacts (org, contact_id) ON DELETE CASCADE
);
CREATE INDEX outbox_due ON rd.outbox (due_at, outbox_id) WHERE status IN ('queued', 'retrying', 'sending');
CREATE INDEX outbox_claim ON rd.outbox (claim) WHERE status = 'sending';
CREATE INDEX outbox_contact ON rd.outbox (org, contact_id, created_at);
CREATE INDEX outbox_status ON rd.outbox (org, status, created_at);

-- The values of a contact for placeholders. (These helpers are PL/pgSQL,
-- not LANGUAGE sql: planned once per session; see 0002, rd.msg_at.)
CREATE FUNCTION rd.mail_ctx_contact(p_org text, p_cid uuid) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
DECLARE
	v jsonb;
BEGIN
	SELECT jsonb_strip_nulls(jsonb_build_object(
		'contact.email', c.email, 'contact.first_name', c.first_name,
		'contact.last_name', c.last_name, 'contact.company', c.company,
		'contact.language', c.language, 'contact.phone', c.phone,
		'contact.street', c.street, 'contact.zip', c.zip, 'contact.city', c.city,
		'contact.country', c.country,
		'contact.birthdate', to_char(c.birthdate, 'YYYY-MM-DD')))
	    || coalesce((SELECT jsonb_object_agg('contact.fields.' || f.key, f.value #>> '{}')
			   FROM jsonb_each(c.fields) AS f), '{}')
	  INTO v
	  FROM rd.contacts c
	 WHERE c.org = p_org AND c.contact_id = p_cid;
	RETURN v;
END $$;

-- The values of a booking and its offer. Times are shown in UTC.
CREATE FUNCTION rd.mail_ctx_booking(p_org text, p_bid text) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
	RETURN coalesce((
		SELECT jsonb_strip_nulls(jsonb_build_object(
			'booking.number', coalesce(b.number, b.booking_id),
			'booking.total', rd.money_fmt(b.total, b.currency),
			'offer.title', f.title,
			'offer.starts_at',
			to_char(f.starts_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') || ' UTC'))
		  FROM rd.bookings b
		  LEFT JOIN rd.offers f ON f.org = b.org AND f.offer_id = b.offer_id
		 WHERE b.org = p_org AND b.booking_id = p_bid), '{}');
END $$;

-- The values of an invoice, from its row of the ledger (0003) as JSON, so
-- that this does not depend on the ledger's column types.
CREATE FUNCTION rd.mail_ctx_invoice(p_org text, j jsonb) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
	RETURN jsonb_strip_nulls(jsonb_build_object(
		'invoice.number', coalesce(j->>'number', j->>'invoice_id'),
		'invoice.amount', rd.money_fmt((j->>'amount')::bigint, j->>'currency'),
		'invoice.due', left(j->>'due', 10)))
	    || CASE WHEN j->>'booking_id' IS NOT NULL
		    THEN rd.mail_ctx_booking(p_org, j->>'booking_id') ELSE '{}' END;
END $$;

-- Queue the template p_key for a contact, rendered in full, in the
-- caller's transaction. The template is the one of the contact's
-- language, else of its primary subtag (fr-CH -> fr), else of the
-- organisation's language (then its primary subtag), else any (the first
-- by language, so that the choice is stable). Nothing is queued (and the
-- activity says why) when the organisation has no such template or the
-- contact has no email. Returns the outbox id or NULL.
CREATE FUNCTION rd.outbox_queue(p_org text, p_cid uuid, p_key text, p_ctx jsonb, p_msg text)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
	v_c rd.contacts%ROWTYPE;
	v_o rd.orgs%ROWTYPE;
	v_t rd.templates%ROWTYPE;
	v_ctx jsonb;
	v_id bigint;
	v_dom text;
	v_cl text;
	v_ol text;
BEGIN
	SELECT * INTO v_c FROM rd.contacts c WHERE c.org = p_org AND c.contact_id = p_cid;
	IF NOT FOUND THEN
		PERFORM rd.activity_add(p_org, NULL, 'mail.not_queued',
			format('mail %s not queued: contact %s unknown', p_key, p_cid), p_msg);
		RETURN NULL;
	END IF;
	SELECT * INTO v_o FROM rd.orgs o WHERE o.org = p_org;
	v_cl := lower(v_c.language);
	v_ol := lower(v_o.language);
	SELECT * INTO v_t FROM rd.templates t
	 WHERE t.org = p_org AND t.key = p_key
	 ORDER BY CASE WHEN t.language = v_cl THEN 0
		       WHEN t.language = split_part(v_cl, '-', 1) THEN 1
		       WHEN t.language = v_ol THEN 2
		       WHEN t.language = split_part(v_ol, '-', 1) THEN 3
		       ELSE 4 END, t.language
	 LIMIT 1;
	IF NOT FOUND THEN
		PERFORM rd.activity_add(p_org, p_cid, 'mail.not_queued',
			format('mail %s not queued: the organisation has no template %s', p_key, p_key),
			p_msg);
		RETURN NULL;
	END IF;
	IF coalesce(v_c.email, '') = '' THEN
		PERFORM rd.activity_add(p_org, p_cid, 'mail.not_queued',
			format('mail %s not queued: the contact has no email', p_key), p_msg);
		RETURN NULL;
	END IF;
	v_ctx := coalesce(rd.mail_ctx_contact(p_org, p_cid), '{}') || coalesce(p_ctx, '{}');
	v_id := nextval(pg_get_serial_sequence('rd.outbox', 'outbox_id'));
	-- <id.random@domain of the sender>: unique, fixed for the row, so that
	-- a rare second delivery of the row is recognisable
	v_dom := coalesce(substring(v_o.mail_from FROM '@([A-Za-z0-9.-]+)>?\s*$'), 'rosterd.invalid');
	INSERT INTO rd.outbox (org, outbox_id, contact_id, template, language, from_address,
			       reply_to, to_name, to_address, subject, body, message_id,
			       cause_message_id)
	VALUES (p_org, v_id, p_cid, p_key, v_t.language, v_o.mail_from, v_o.reply_to,
		nullif(concat_ws(' ', v_c.first_name, v_c.last_name), ''), v_c.email,
		rd.header_clean(rd.tpl_render(v_t.subject, v_ctx)), rd.tpl_render(v_t.body, v_ctx),
		format('<%s.%s@%s>', v_id, encode(gen_random_bytes(6), 'hex'), v_dom), p_msg);
	PERFORM rd.activity_add(p_org, p_cid, 'mail.queued',
		format('mail %s queued (outbox %s, language %s)', p_key, v_id, v_t.language), p_msg);
	-- wakes idle mail workers at commit (one notification per transaction)
	PERFORM pg_notify('rd_outbox', '');
	RETURN v_id;
END $$;

CREATE FUNCTION rd.notify_on(d jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
	SELECT coalesce((d->>'notify')::boolean, true)
$$;

-- A mail to the booker of a booking.
CREATE FUNCTION rd.mail_for_booking(p_org text, p_bid text, p_key text, p_msg text)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
	v_cid uuid;
BEGIN
	SELECT b.contact_id INTO v_cid FROM rd.bookings b WHERE b.org = p_org AND b.booking_id = p_bid;
	v_cid := rd.contact_resolve(p_org, v_cid::text);
	IF v_cid IS NULL THEN
		PERFORM rd.activity_add(p_org, NULL, 'mail.not_queued',
			format('mail %s for booking %s not queued: the booker has no contact', p_key,
			       p_bid), p_msg);
		RETURN NULL;
	END IF;
	RETURN rd.outbox_queue(p_org, v_cid, p_key, rd.mail_ctx_booking(p_org, p_bid), p_msg);
END $$;

-- ---- triggers: wrappers registered in rd.handler_fns ------------------------

-- booking.created (confirmed) -> booking_confirmation to the booker.
CREATE FUNCTION rd.h_booking_created_mail(p_org text, p_id text, p_at timestamptz, d jsonb)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	v text := rd.h_booking_upsert(p_org, p_id, p_at, d, 'booking.created');
BEGIN
	IF v = 'applied' AND coalesce(d->>'status', 'confirmed') = 'confirmed' AND rd.notify_on(d) THEN
		PERFORM rd.mail_for_booking(p_org, d->>'booking_id', 'booking_confirmation', p_id);
	END IF;
	RETURN v;
END $$;

-- booking.cancelled -> booking_cancellation to the booker.
CREATE FUNCTION rd.h_booking_cancelled_mail(p_org text, p_id text, p_at timestamptz, d jsonb)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	v text := rd.h_booking_cancelled(p_org, p_id, p_at, d);
BEGIN
	IF v = 'applied' AND rd.notify_on(d) THEN
		PERFORM rd.mail_for_booking(p_org, d->>'booking_id', 'booking_cancellation', p_id);
	END IF;
	RETURN v;
END $$;

-- A mail about an invoice of the ledger (0003: rd.invoices) to its contact.
CREATE FUNCTION rd.mail_for_invoice(p_org text, p_iid text, p_key text, p_extra jsonb,
				    p_msg text)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
	v_j jsonb;
	v_cid uuid;
BEGIN
	EXECUTE 'SELECT to_jsonb(i) FROM rd.invoices i WHERE i.org = $1 AND i.invoice_id = $2'
	   INTO v_j USING p_org, p_iid;
	v_cid := rd.contact_resolve(p_org, v_j->>'contact_id');
	IF v_cid IS NULL AND v_j->>'booking_id' IS NOT NULL THEN
		SELECT rd.contact_resolve(p_org, b.contact_id::text) INTO v_cid FROM rd.bookings b
		 WHERE b.org = p_org AND b.booking_id = v_j->>'booking_id';
	END IF;
	IF v_cid IS NULL THEN
		PERFORM rd.activity_add(p_org, NULL, 'mail.not_queued',
			format('mail %s for invoice %s not queued: the invoice has no contact', p_key,
			       p_iid), p_msg);
		RETURN NULL;
	END IF;
	RETURN rd.outbox_queue(p_org, v_cid, p_key,
			       rd.mail_ctx_invoice(p_org, v_j) || coalesce(p_extra, '{}'), p_msg);
END $$;

-- invoice.issued -> invoice; payment.recorded -> payment_receipt. The
-- ledger's handlers run first; these are registered only when 0003 made
-- them (see the end of this file).
CREATE FUNCTION rd.h_invoice_issued_mail(p_org text, p_id text, p_at timestamptz, d jsonb)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	v text;
BEGIN
	EXECUTE 'SELECT rd.h_invoice_issued($1, $2, $3, $4)' INTO v USING p_org, p_id, p_at, d;
	IF v = 'applied' AND rd.notify_on(d) THEN
		PERFORM rd.mail_for_invoice(p_org, d->>'invoice_id', 'invoice', NULL, p_id);
	END IF;
	RETURN v;
END $$;

CREATE FUNCTION rd.h_payment_recorded_mail(p_org text, p_id text, p_at timestamptz, d jsonb)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	v text;
BEGIN
	EXECUTE 'SELECT rd.h_payment_recorded($1, $2, $3, $4)' INTO v USING p_org, p_id, p_at, d;
	IF v = 'applied' AND rd.notify_on(d) THEN
		PERFORM rd.mail_for_invoice(p_org, d->>'invoice_id', 'payment_receipt',
			jsonb_build_object('payment.amount',
					   rd.money_fmt((d->>'amount')::bigint, d->>'currency')), p_id);
	END IF;
	RETURN v;
END $$;

-- mail.requested -> the named template, with vars.<key>. The contact must
-- exist (else the message waits).
CREATE FUNCTION rd.h_mail_requested(p_org text, p_id text, p_at timestamptz, d jsonb)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	v_cid uuid := rd.contact_required(p_org, d->>'contact_id');
BEGIN
	PERFORM rd.outbox_queue(p_org, v_cid, d->>'template',
		coalesce((SELECT jsonb_object_agg('vars.' || v.key, v.value)
			    FROM jsonb_each_text(coalesce(d->'vars', '{}')) AS v), '{}'),
		p_id);
	RETURN 'applied';
END $$;

-- ---- delivery (daemon/mail.c) ------------------------------------------------

-- Take up to p_limit due rows for one worker: queued or retrying rows whose
-- time has come, and sending rows whose lease ended (their worker or
-- process died: sent again, with the same Message-ID). SKIP LOCKED: two
-- workers or two instances never take the same row; the lease keeps it
-- theirs while they send (renewed by rd.outbox_renew).
CREATE FUNCTION rd.outbox_claim(p_claim text, p_limit integer, p_lease_ms integer)
RETURNS TABLE (org text, outbox_id bigint, from_address text, reply_to text, to_name text,
	       to_address text, subject text, body text, message_id text, created_ms bigint,
	       window_ms bigint, window_attempts integer, attempts integer)
LANGUAGE plpgsql
-- Walk outbox_due in order and stop after p_limit rows, whatever the
-- statistics say. Without these, a backlog that arrived since the last
-- ANALYZE (rows estimated: a hundred; due: 50,000) was read whole by a
-- bitmap scan and sorted at every claim: 58 ms instead of 4.7 ms for 128 of
-- 50,000 rows, the claim of every worker getting slower as the backlog grew.
SET enable_bitmapscan = off SET enable_sort = off SET enable_seqscan = off
AS $$
#variable_conflict use_column
BEGIN
	-- PL/pgSQL: each call is a transaction of its own, in which a
	-- LANGUAGE sql body would be planned again (idle workers poll it)
	RETURN QUERY
	-- The rows are joined back by ctid (we hold their locks, so it is
	-- theirs until we commit; a row updated meanwhile fails the join and is
	-- simply not claimed). By key, a plan made while the table was empty
	-- looked each row up by org alone: 0.1 ms per row on 50,000 rows.
	WITH c AS (
		SELECT o.ctid AS t, o.org, o.outbox_id FROM rd.outbox o
		 WHERE o.status IN ('queued', 'retrying', 'sending') AND o.due_at <= now()
		 ORDER BY o.due_at, o.outbox_id
		 LIMIT p_limit
		   FOR UPDATE SKIP LOCKED)
	UPDATE rd.outbox o SET status = 'sending', claim = p_claim,
			       due_at = now() + p_lease_ms * interval '1 millisecond',
			       attempts = o.attempts + 1, window_attempts = o.window_attempts + 1,
			       updated_at = now()
	  FROM c
	 WHERE o.ctid = c.t AND o.org = c.org AND o.outbox_id = c.outbox_id
	RETURNING o.org, o.outbox_id, o.from_address, o.reply_to, o.to_name, o.to_address,
		  o.subject, o.body, o.message_id,
		  (extract(epoch FROM o.created_at) * 1000)::bigint,
		  (extract(epoch FROM o.window_at) * 1000)::bigint, o.window_attempts, o.attempts;
END $$;

CREATE FUNCTION rd.outbox_renew(p_claim text, p_lease_ms integer) RETURNS integer
LANGUAGE sql AS $$
	WITH u AS (
		UPDATE rd.outbox o SET due_at = now() + p_lease_ms * interval '1 millisecond'
		 WHERE o.claim = p_claim AND o.status = 'sending'
		RETURNING 1)
	SELECT count(*)::integer FROM u
$$;

-- Record the outcomes of one claim: p_status[i] is sent, retrying (due in
-- p_delay_ms[i]) or failed; p_errors[i] the SMTP reply or fault (kept in
-- last_error; NULL keeps the previous one). Only rows still held by the
-- claim are changed; returns how many. A failed mail is noted in the
-- contact's activity.
CREATE FUNCTION rd.outbox_record(p_claim text, p_orgs text[], p_ids bigint[], p_status text[],
				 p_errors text[], p_delay_ms bigint[])
RETURNS integer LANGUAGE sql
-- A hash join of the claim's rows and the outcomes: planned on a table not
-- yet analysed, the nested loop read the outcome arrays once per row
-- (128 x 128 for one claim, 17 ms).
SET enable_nestloop = off SET enable_seqscan = off
AS $$
	WITH u AS (
		UPDATE rd.outbox o SET
			status = r.status,
			last_error = coalesce(r.error, o.last_error),
			sent_at = CASE WHEN r.status = 'sent' THEN now() ELSE o.sent_at END,
			due_at = CASE WHEN r.status = 'retrying'
				      THEN now() + r.delay_ms * interval '1 millisecond' END,
			claim = NULL,
			updated_at = now()
		  FROM unnest(p_orgs, p_ids, p_status, p_errors, p_delay_ms)
		       AS r(org, outbox_id, status, error, delay_ms)
		 WHERE o.org = r.org AND o.outbox_id = r.outbox_id AND o.claim = p_claim
		   AND o.status = 'sending'
		RETURNING o.org, o.outbox_id, o.contact_id, o.template, o.status, o.last_error),
	a AS (
		INSERT INTO rd.activity (org, contact_id, kind, summary)
		SELECT u.org, u.contact_id, 'mail.failed',
		       format('mail %s (outbox %s) failed: %s', u.template, u.outbox_id,
			      left(u.last_error, 300))
		  FROM u WHERE u.status = 'failed')
	SELECT count(*)::integer FROM u
$$;

-- rosterctl outbox retry: failed (and, for given rows, retrying) mails are
-- queued again now with a fresh retry window. Returns the ids.
CREATE FUNCTION rd.outbox_retry(p_org text, p_id bigint, p_contact text, p_failed_only boolean)
RETURNS SETOF bigint LANGUAGE plpgsql AS $$
BEGIN
	RETURN QUERY
	UPDATE rd.outbox o SET status = 'queued', due_at = now(), window_at = now(),
			       window_attempts = 0, claim = NULL,
			       from_address = coalesce(o.from_address, g.mail_from),
			       reply_to = coalesce(o.reply_to, g.reply_to), updated_at = now()
	  FROM (SELECT p_org AS org) k
	  LEFT JOIN rd.orgs g ON g.org = k.org
	 WHERE o.org = p_org
	   AND (p_id IS NULL OR o.outbox_id = p_id)
	   AND (p_contact IS NULL OR o.contact_id = rd.contact_resolve(p_org, p_contact))
	   AND (o.status = 'failed' OR (NOT p_failed_only AND o.status = 'retrying'))
	RETURNING o.outbox_id;
	PERFORM pg_notify('rd_outbox', '');
END $$;

-- For contact.erased (SPEC 4.7): personal data leaves the contact's outbox
-- rows; what was not sent yet never will be.
CREATE FUNCTION rd.outbox_erase_contact(p_org text, p_cid uuid) RETURNS void
LANGUAGE sql AS $$
	UPDATE rd.outbox SET to_address = '', to_name = NULL, subject = '', body = '',
			     status = CASE WHEN status IN ('queued', 'retrying') THEN 'failed'
					   ELSE status END,
			     last_error = CASE WHEN status IN ('queued', 'retrying')
					       THEN 'contact erased' ELSE last_error END,
			     due_at = CASE WHEN status = 'sending' THEN due_at END,
			     updated_at = now()
	 WHERE org = p_org AND contact_id = p_cid
$$;

-- For contact.merged (SPEC 4.7): the outbox of drop moves to keep.
CREATE FUNCTION rd.outbox_move_contact(p_org text, p_drop uuid, p_keep uuid) RETURNS void
LANGUAGE sql AS $$
	UPDATE rd.outbox SET contact_id = p_keep, updated_at = now()
	 WHERE org = p_org AND contact_id = p_drop
$$;

-- ---- registration and views --------------------------------------------------

INSERT INTO rd.handler_fns (type, fn) VALUES
	('template.upserted', 'rd.h_template_upserted'),
	('mail.requested', 'rd.h_mail_requested'),
	('booking.created', 'rd.h_booking_created_mail'),
	('booking.cancelled', 'rd.h_booking_cancelled_mail')
ON CONFLICT (type) DO UPDATE SET fn = EXCLUDED.fn;

-- the ledger's triggers, when the ledger (0003) is there
DO $$
BEGIN
	IF to_regproc('rd.h_invoice_issued') IS NOT NULL THEN
		INSERT INTO rd.handler_fns (type, fn) VALUES ('invoice.issued', 'rd.h_invoice_issued_mail')
		ON CONFLICT (type) DO UPDATE SET fn = EXCLUDED.fn;
	END IF;
	IF to_regproc('rd.h_payment_recorded') IS NOT NULL THEN
		INSERT INTO rd.handler_fns (type, fn) VALUES ('payment.recorded', 'rd.h_payment_recorded_mail')
		ON CONFLICT (type) DO UPDATE SET fn = EXCLUDED.fn;
	END IF;
END $$;
SELECT rd.rebuild_dispatch();

CREATE VIEW report.outbox AS
	SELECT org, outbox_id::text AS outbox_id, contact_id::text AS contact_id, to_address,
	       template, language, subject, body, status, attempts, last_error, created_at,
	       sent_at
	  FROM rd.outbox;
