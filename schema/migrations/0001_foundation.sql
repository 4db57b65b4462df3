-- 0001_foundation: the idempotency record, organisations, offers, the
-- per-message entry point rd.apply() and the batch lock rd.lock_keys().
--
-- Conventions for every migration:
--  * internal tables live in schema rd, the stable read model in report;
--  * every table holding organisation data has org as the first column of
--    its primary key and of its foreign keys (SPEC 8: distributable);
--  * money is bigint minor units; times are timestamptz.
-- Needs only ownership of the database (no superuser).

CREATE SCHEMA rd;
CREATE SCHEMA report;

-- One row per settled message (SPEC 4.5, 9). A message that waits has none.
CREATE TABLE rd.messages (
	org          text        NOT NULL,
	message_id   text        NOT NULL,
	type         text        NOT NULL,
	outcome      text        NOT NULL CHECK (outcome IN ('applied', 'stale', 'rejected')),
	reason       text,
	upstream_at  timestamptz,
	at           timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (org, message_id),
	CHECK (outcome <> 'rejected' OR coalesce(reason, '') <> '')
);

CREATE TABLE rd.orgs (
	org            text        NOT NULL PRIMARY KEY,
	name           text        NOT NULL,
	sync_contacts  boolean     NOT NULL DEFAULT false,
	language       text        NOT NULL DEFAULT 'en',
	mail_from      text,
	reply_to       text,
	message_id     text        NOT NULL,
	created_at     timestamptz NOT NULL DEFAULT now(),
	updated_at     timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE rd.offers (
	org           text        NOT NULL,
	offer_id      text        NOT NULL,
	title         text        NOT NULL,
	starts_at     timestamptz,
	currency      text,
	email_change  text        NOT NULL DEFAULT 'reassign'
	              CHECK (email_change IN ('reassign', 'retain')),
	message_id    text        NOT NULL,
	created_at    timestamptz NOT NULL DEFAULT now(),
	updated_at    timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (org, offer_id)
);

-- Raising these from a handler decides the message's fate; anything else
-- that is a data error rejects it, and infrastructure errors abort the batch.
CREATE FUNCTION rd.reject(p_msg text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
	RAISE EXCEPTION USING ERRCODE = 'RDREJ', MESSAGE = p_msg;
END $$;

CREATE FUNCTION rd.wait(p_msg text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
	RAISE EXCEPTION USING ERRCODE = 'RDWAI', MESSAGE = p_msg;
END $$;

CREATE FUNCTION rd.ms_to_ts(p_ms bigint) RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$
	SELECT CASE WHEN p_ms IS NULL THEN NULL ELSE to_timestamp(p_ms / 1000.0) END
$$;

-- Serialise on keys ("<org>/email:<addr>", "<org>/booking:<id>", ...) in one
-- stable order, so that batches of different instances never deadlock on
-- them. Advisory transaction locks: released at commit or rollback.
CREATE FUNCTION rd.lock_keys(p_keys text[]) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
	v_h bigint;
	v_n integer := 0;
BEGIN
	FOR v_h IN SELECT DISTINCT hashtextextended(k, 0) FROM unnest(p_keys) AS k ORDER BY 1
	LOOP
		PERFORM pg_advisory_xact_lock(v_h);
		v_n := v_n + 1;
	END LOOP;
	RETURN v_n;
END $$;

-- org.configured: absent optional values keep what is stored (or the default).
CREATE FUNCTION rd.h_org_configured(p_org text, p_id text, p_at timestamptz, d jsonb)
RETURNS text LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO rd.orgs AS o (org, name, sync_contacts, language, mail_from, reply_to, message_id)
	VALUES (p_org, d->>'name', coalesce((d->>'sync_contacts')::boolean, false),
		coalesce(d->>'language', 'en'), d->>'mail_from', d->>'reply_to', p_id)
	ON CONFLICT (org) DO UPDATE SET
		name = EXCLUDED.name,
		sync_contacts = coalesce((d->>'sync_contacts')::boolean, o.sync_contacts),
		language = coalesce(d->>'language', o.language),
		mail_from = coalesce(d->>'mail_from', o.mail_from),
		reply_to = coalesce(d->>'reply_to', o.reply_to),
		message_id = p_id,
		updated_at = now();
	RETURN 'applied';
END $$;

CREATE FUNCTION rd.h_offer_upserted(p_org text, p_id text, p_at timestamptz, d jsonb)
RETURNS text LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO rd.offers AS f (org, offer_id, title, starts_at, currency, email_change, message_id)
	VALUES (p_org, d->>'offer_id', d->>'title', rd.ms_to_ts((d->>'starts_at')::bigint),
		d->>'currency', coalesce(d->>'email_change', 'reassign'), p_id)
	ON CONFLICT (org, offer_id) DO UPDATE SET
		title = EXCLUDED.title,
		starts_at = coalesce(EXCLUDED.starts_at, f.starts_at),
		currency = coalesce(EXCLUDED.currency, f.currency),
		email_change = coalesce(d->>'email_change', f.email_change),
		message_id = p_id,
		updated_at = now();
	RETURN 'applied';
END $$;

-- The per-type dispatch. Each migration that adds message types registers
-- their functions in rd.handler_fns and calls rd.rebuild_dispatch(), which
-- regenerates rd.dispatch() as one CASE over the registry (plain calls, so
-- plans are cached: no dynamic SQL per message). A type the C table knows
-- but no migration registered is rejected.
CREATE TABLE rd.handler_fns (
	type  text NOT NULL PRIMARY KEY,
	fn    text NOT NULL   -- a function (org text, id text, at timestamptz, data jsonb) -> text
);

CREATE FUNCTION rd.rebuild_dispatch() RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
	v_cases text := '';
	r record;
BEGIN
	FOR r IN SELECT type, fn FROM rd.handler_fns ORDER BY type LOOP
		v_cases := v_cases || format(E'\tWHEN %L THEN RETURN %s(p_org, p_id, p_at, d);\n',
					     r.type, r.fn::regproc);
	END LOOP;
	EXECUTE format($f$
CREATE OR REPLACE FUNCTION rd.dispatch(p_org text, p_id text, p_type text, p_at timestamptz,
				       d jsonb)
RETURNS text LANGUAGE plpgsql AS $body$
BEGIN
	CASE p_type
%s	ELSE
		PERFORM rd.reject(format('type %%s is not handled by this schema version', p_type));
	END CASE;
	RETURN 'applied';
END $body$;
$f$, v_cases);
END $$;

INSERT INTO rd.handler_fns (type, fn) VALUES
	('org.configured', 'rd.h_org_configured'),
	('offer.upserted', 'rd.h_offer_upserted');
SELECT rd.rebuild_dispatch();

-- rd.apply: one message, inside the caller's (batch) transaction.
-- Returns outcome applied | stale | duplicate | rejected | retry, and reason
-- (for duplicate: the outcome recorded first, "rejected: why"). p_reject, when given, records
-- a rejection found before SQL (decoding, validation). p_final: the message
-- has used up its retries, so waiting becomes a rejection.
CREATE FUNCTION rd.apply(p_org text, p_id text, p_type text, p_at_ms bigint, p_data jsonb,
			 p_final boolean, p_reject text,
			 OUT outcome text, OUT reason text)
LANGUAGE plpgsql AS $$
DECLARE
	v_at timestamptz := rd.ms_to_ts(p_at_ms);
	v_state text;
BEGIN
	PERFORM set_config('rd.org', p_org, true);
	-- The idempotency record. A concurrent transaction holding the same
	-- (org, id) makes this wait for it, then see the conflict.
	INSERT INTO rd.messages (org, message_id, type, outcome, reason, upstream_at)
	VALUES (p_org, p_id, p_type, CASE WHEN p_reject IS NULL THEN 'applied' ELSE 'rejected' END,
		p_reject, v_at)
	ON CONFLICT DO NOTHING;
	IF NOT FOUND THEN
		SELECT m.outcome || coalesce(': ' || m.reason, '') INTO reason FROM rd.messages m
		 WHERE m.org = p_org AND m.message_id = p_id;
		outcome := 'duplicate';
		RETURN;
	END IF;
	IF p_reject IS NOT NULL THEN
		outcome := 'rejected';
		reason := p_reject;
		RETURN;
	END IF;

	BEGIN
		outcome := rd.dispatch(p_org, p_id, p_type, v_at, p_data);
	EXCEPTION
	WHEN SQLSTATE 'RDREJ' THEN
		outcome := 'rejected';
		reason := SQLERRM;
	WHEN SQLSTATE 'RDWAI' THEN
		IF p_final THEN
			outcome := 'rejected';
			reason := 'gave up waiting: ' || SQLERRM;
		ELSE
			outcome := 'retry';
			reason := SQLERRM;
		END IF;
	WHEN OTHERS THEN
		GET STACKED DIAGNOSTICS v_state = RETURNED_SQLSTATE;
		-- transaction rollback (40), resources (53, 54), object state (55),
		-- operator intervention (57), system (58), internal (XX), connection
		-- (08): not the message's fault; let the batch fail and be retried.
		IF left(v_state, 2) IN ('40', '53', '54', '55', '57', '58', 'XX', '08') THEN
			RAISE;
		END IF;
		outcome := 'rejected';
		reason := format('invalid data (%s): %s', v_state, SQLERRM);
	END;

	IF outcome = 'retry' THEN
		DELETE FROM rd.messages m WHERE m.org = p_org AND m.message_id = p_id;
	ELSIF outcome <> 'applied' THEN
		UPDATE rd.messages m SET outcome = apply.outcome, reason = apply.reason
		 WHERE m.org = p_org AND m.message_id = p_id;
	END IF;
END $$;

CREATE VIEW report.messages AS
	SELECT org, message_id, type, outcome, reason, at
	  FROM rd.messages;
