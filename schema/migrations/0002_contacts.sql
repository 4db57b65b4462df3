-- 0002_contacts: contacts, matching (SPEC 4.1), synchronisation (4.2),
-- email changes (4.3), versions (4.4), bookings and attendees, custom
-- fields, tags, notes, the activity timeline and the field history.
-- docs/contacts.md states the rules as implemented and every choice made
-- where the SPEC is silent.
--
-- Serialisation: the batch takes advisory locks on "<org>/email:<addr>",
-- "<org>/booking:<id>" and "<org>/contact:<uuid>" in one sorted order
-- before any message runs (rd.lock_keys). The functions here take the same
-- locks again (re-entrant, so free in a batch) so that they are also safe
-- when called alone. They only ever lock keys that the C side derives from
-- the same payload, so a batch never waits for a key it did not take up
-- front: no deadlock between instances. Duplicate emails are allowed, so no
-- unique index can stand in for the email lock. Rows are locked FOR NO KEY
-- UPDATE: the foreign keys of other tables only take KEY SHARE locks, so
-- inserting a row that references a contact or booking never waits for a
-- change of its data.
--
-- Times: activity and field history carry the upstream time of the message
-- that caused them (the envelope's `at`), which is when it happened.

CREATE EXTENSION IF NOT EXISTS pgcrypto;

CREATE TABLE rd.contacts (
	org          text        NOT NULL,
	contact_id   uuid        NOT NULL DEFAULT gen_random_uuid(),
	email        text,
	first_name   text,
	last_name    text,
	company      text,
	language     text,
	phone        text,
	street       text,
	zip          text,
	city         text,
	country      text,
	birthdate    date,
	fields       jsonb       NOT NULL DEFAULT '{}',
	tags         text[]      NOT NULL DEFAULT '{}',
	-- 80 random bits from pgcrypto's CSPRNG: unguessable; unique per org
	barcode      text        NOT NULL DEFAULT upper(encode(gen_random_bytes(10), 'hex')),
	merged_into  uuid,
	erased       boolean     NOT NULL DEFAULT false,
	-- per value ("phone", "fields.size"): [upstream ms, message id] of the
	-- synchronised message it came from (rd.contact_apply); a value filled
	-- with synchronisation off has none
	value_at     jsonb       NOT NULL DEFAULT '{}',
	message_id   text,       -- the last message that changed the contact
	created_by   text,       -- the message that created it
	created_at   timestamptz NOT NULL DEFAULT now(),
	updated_at   timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (org, contact_id),
	UNIQUE (org, barcode),
	FOREIGN KEY (org, merged_into) REFERENCES rd.contacts (org, contact_id)
);
CREATE INDEX contacts_email ON rd.contacts (org, email) WHERE merged_into IS NULL;

CREATE TABLE rd.fields (
	org         text        NOT NULL,
	key         text        NOT NULL,
	kind        text        NOT NULL CHECK (kind IN ('text', 'number', 'date', 'bool', 'file')),
	label       text,
	message_id  text        NOT NULL,
	updated_at  timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (org, key)
);

-- A booking is made of parts that carry their own version, so that the
-- end state does not depend on the order in which versions arrive (4.4,
-- docs/contacts.md "Versions"): the booking-level data (offer, number,
-- status, booker, total: data_version, 0 while no booking message was
-- applied), the attendee list (list_version: the version of the last full
-- list), the cancellation (cancel_version) and each attendee
-- (rd.attendees.version). version is the highest version applied.
CREATE TABLE rd.bookings (
	org             text        NOT NULL,
	booking_id      text        NOT NULL,
	offer_id        text,
	number          text,
	status          text        NOT NULL DEFAULT 'confirmed', -- effective (rd.booking_settle)
	version         integer     NOT NULL,
	contact_id      uuid,
	email           text,
	match           text,
	booker          jsonb       NOT NULL DEFAULT '{}',
	total           bigint,
	currency        text,
	data_status     text,
	data_version    integer     NOT NULL DEFAULT 0,
	list_version    integer     NOT NULL DEFAULT 0,
	cancel_version  integer     NOT NULL DEFAULT 0,
	cancel_reason   text,
	message_id      text        NOT NULL,
	created_at      timestamptz NOT NULL DEFAULT now(),
	updated_at      timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (org, booking_id),
	FOREIGN KEY (org, contact_id) REFERENCES rd.contacts (org, contact_id)
);
CREATE INDEX bookings_contact ON rd.bookings (org, contact_id);

CREATE TABLE rd.attendees (
	org          text        NOT NULL,
	booking_id   text        NOT NULL,
	attendee_id  text        NOT NULL,
	contact_id   uuid,
	email        text,
	first_name   text,
	last_name    text,
	category     text,
	price        bigint,
	status       text        NOT NULL DEFAULT 'confirmed', -- effective (rd.booking_settle)
	match        text        NOT NULL,
	person       jsonb       NOT NULL DEFAULT '{}',
	version      integer     NOT NULL,
	PRIMARY KEY (org, booking_id, attendee_id),
	FOREIGN KEY (org, booking_id) REFERENCES rd.bookings (org, booking_id),
	FOREIGN KEY (org, contact_id) REFERENCES rd.contacts (org, contact_id)
);
CREATE INDEX attendees_contact ON rd.attendees (org, contact_id);

CREATE TABLE rd.activity (
	org         text        NOT NULL,
	activity_id bigint      GENERATED ALWAYS AS IDENTITY,
	contact_id  uuid,
	at          timestamptz NOT NULL DEFAULT now(),
	kind        text        NOT NULL,
	summary     text        NOT NULL,
	message_id  text,
	PRIMARY KEY (org, activity_id),
	FOREIGN KEY (org, contact_id) REFERENCES rd.contacts (org, contact_id)
);
CREATE INDEX activity_contact ON rd.activity (org, contact_id, at);

CREATE TABLE rd.field_history (
	org         text        NOT NULL,
	history_id  bigint      GENERATED ALWAYS AS IDENTITY,
	contact_id  uuid        NOT NULL,
	field       text        NOT NULL,
	old_value   text,
	new_value   text,
	message_id  text,
	at          timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (org, history_id),
	FOREIGN KEY (org, contact_id) REFERENCES rd.contacts (org, contact_id)
);
CREATE INDEX field_history_contact ON rd.field_history (org, contact_id, at);

CREATE TABLE rd.notes (
	org         text        NOT NULL,
	note_id     bigint      GENERATED ALWAYS AS IDENTITY,
	contact_id  uuid        NOT NULL,
	text        text        NOT NULL,
	author      text,
	message_id  text        NOT NULL,
	at          timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (org, note_id),
	FOREIGN KEY (org, contact_id) REFERENCES rd.contacts (org, contact_id)
);

-- Pairs offered to the duplicate search (SPEC 4.1 created_ambiguous, 4.7).
-- contact_b is the contact created by the ambiguous match.
CREATE TABLE rd.duplicate_candidates (
	org         text        NOT NULL,
	contact_a   uuid        NOT NULL,
	contact_b   uuid        NOT NULL,
	reason      text        NOT NULL,
	message_id  text,
	at          timestamptz NOT NULL DEFAULT now(),
	PRIMARY KEY (org, contact_a, contact_b),
	FOREIGN KEY (org, contact_a) REFERENCES rd.contacts (org, contact_id),
	FOREIGN KEY (org, contact_b) REFERENCES rd.contacts (org, contact_id)
);

-- ---- helpers --------------------------------------------------------------

-- The upstream time of a message being applied (its envelope's `at`, kept
-- by rd.apply in rd.messages), or now() for a message not recorded there.
--
-- Performance (docs/performance.md): the helpers on the per-message path are
-- PL/pgSQL, not LANGUAGE sql. A SQL function that the planner cannot inline
-- (an INSERT, an UPDATE, a sub-select) is parsed and planned again at every
-- call site in every subtransaction, and rd.apply runs each message in one:
-- that was half of the server's CPU time. PL/pgSQL keeps its plans for the
-- session.
CREATE FUNCTION rd.msg_at(p_org text, p_msg text) RETURNS timestamptz
LANGUAGE plpgsql STABLE AS $$
DECLARE
	v timestamptz;
BEGIN
	SELECT m.upstream_at INTO v FROM rd.messages m
	 WHERE m.org = p_org AND m.message_id = p_msg;
	RETURN coalesce(v, now());
END $$;

CREATE FUNCTION rd.activity_add(p_org text, p_contact uuid, p_kind text, p_summary text,
				p_msg text)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	-- rd.msg_at, written out: one statement instead of a nested call
	INSERT INTO rd.activity (org, contact_id, at, kind, summary, message_id)
	VALUES (p_org, p_contact,
		coalesce((SELECT m.upstream_at FROM rd.messages m
			   WHERE m.org = p_org AND m.message_id = p_msg), now()),
		p_kind, p_summary, p_msg);
END $$;

-- One row per changed field per message (SPEC 9): a second change of the
-- same field by the same message (a booker who is also an attendee) updates
-- the row, keeping the value from before the message; a change back to that
-- value removes it.
CREATE FUNCTION rd.history_add(p_org text, p_cid uuid, p_field text, p_old text, p_new text,
			       p_msg text)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
	v_id bigint;
	v_first text;
BEGIN
	SELECT h.history_id, h.old_value INTO v_id, v_first FROM rd.field_history h
	 WHERE h.org = p_org AND h.contact_id = p_cid AND h.field = p_field
	   AND h.message_id = p_msg;
	IF NOT FOUND THEN
		INSERT INTO rd.field_history (org, contact_id, field, old_value, new_value, message_id, at)
		VALUES (p_org, p_cid, p_field, p_old, p_new, p_msg, rd.msg_at(p_org, p_msg));
	ELSIF v_first IS NOT DISTINCT FROM p_new THEN
		DELETE FROM rd.field_history WHERE org = p_org AND history_id = v_id;
	ELSE
		UPDATE rd.field_history SET new_value = p_new WHERE org = p_org AND history_id = v_id;
	END IF;
END $$;

-- A text that is a UUID, or NULL.
CREATE FUNCTION rd.as_uuid(p text) RETURNS uuid
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
	-- the canonical form (every id rosterd writes) without the
	-- subtransaction of the EXCEPTION block; other spellings take it
	IF p ~ '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
		RETURN p::uuid;
	END IF;
	BEGIN
		RETURN p::uuid;
	EXCEPTION WHEN invalid_text_representation THEN
		RETURN NULL;
	END;
END $$;

-- The live contact for an id of this organisation: follows merge
-- tombstones to the keeping contact; NULL when unknown (also when the id
-- belongs to another organisation: never a way in).
CREATE FUNCTION rd.contact_resolve(p_org text, p_id text) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
	v_id uuid := rd.as_uuid(p_id);
	v_next uuid;
	v_hops integer := 0;
BEGIN
	IF v_id IS NULL THEN
		RETURN NULL;
	END IF;
	LOOP
		SELECT c.merged_into INTO v_next FROM rd.contacts c
		 WHERE c.org = p_org AND c.contact_id = v_id;
		IF NOT FOUND THEN
			RETURN NULL;
		END IF;
		IF v_next IS NULL OR v_hops > 100 THEN
			RETURN v_id;
		END IF;
		v_id := v_next;
		v_hops := v_hops + 1;
	END LOOP;
END $$;

CREATE FUNCTION rd.lock_key(p_org text, p_key text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
	PERFORM pg_advisory_xact_lock(hashtextextended(p_org || '/' || p_key, 0));
END $$;

-- Effective synchronisation for a message: its own `sync`, else the org's.
CREATE FUNCTION rd.sync_on(p_org text, d jsonb) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
	RETURN coalesce((d->>'sync')::boolean,
			(SELECT o.sync_contacts FROM rd.orgs o WHERE o.org = p_org), false);
END $$;

-- The person keys of SPEC 2, in the order the history records them.
CREATE FUNCTION rd.person_keys() RETURNS text[]
LANGUAGE sql IMMUTABLE AS $$
	SELECT ARRAY['email', 'first_name', 'last_name', 'company', 'language', 'phone',
		     'street', 'zip', 'city', 'country', 'birthdate']
$$;

-- Check one person value before it may reach a contact. NULL when fine,
-- else why it is skipped.
CREATE FUNCTION rd.person_value_problem(p_key text, p_val text) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
	IF p_key = 'country' AND p_val !~ '^[A-Za-z]{2}$' THEN
		RETURN 'country is not an ISO 3166 alpha-2 code';
	END IF;
	IF p_key = 'birthdate' THEN
		IF p_val !~ '^\d{4}-\d{2}-\d{2}$' THEN
			RETURN 'birthdate is not YYYY-MM-DD';
		END IF;
		BEGIN
			PERFORM p_val::date;
		EXCEPTION WHEN OTHERS THEN
			RETURN 'birthdate is not a calendar date';
		END;
	END IF;
	RETURN NULL;
END $$;

CREATE FUNCTION rd.person_value_norm(p_key text, p_val text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
	SELECT CASE WHEN p_key = 'country' THEN upper(p_val) ELSE p_val END
$$;

-- Check a custom field value against its definition (if any). NULL when
-- fine, else why it is skipped.
CREATE FUNCTION rd.field_value_problem(p_org text, p_key text, p_val jsonb) RETURNS text
LANGUAGE plpgsql STABLE AS $$
DECLARE
	v_kind text;
BEGIN
	SELECT f.kind INTO v_kind FROM rd.fields f WHERE f.org = p_org AND f.key = p_key;
	IF v_kind IS NULL THEN
		RETURN NULL; -- undefined keys are stored as given (SPEC 9)
	END IF;
	CASE v_kind
	WHEN 'number' THEN
		IF jsonb_typeof(p_val) <> 'number' THEN
			RETURN format('field %s wants a number', p_key);
		END IF;
	WHEN 'bool' THEN
		IF jsonb_typeof(p_val) <> 'boolean' THEN
			RETURN format('field %s wants true or false', p_key);
		END IF;
	WHEN 'date' THEN
		IF jsonb_typeof(p_val) <> 'string'
		   OR rd.person_value_problem('birthdate', p_val #>> '{}') IS NOT NULL THEN
			RETURN format('field %s wants a date YYYY-MM-DD', p_key);
		END IF;
	ELSE -- text, file
		IF jsonb_typeof(p_val) <> 'string' THEN
			RETURN format('field %s wants a string', p_key);
		END IF;
	END CASE;
	RETURN NULL;
END $$;

-- Set one contact column (person key) and record the change. (Kept for
-- callers that edit a single value; rd.contact_apply writes its values in
-- one statement.)
CREATE FUNCTION rd.contact_set(p_org text, p_cid uuid, p_key text, p_old text, p_new text,
			       p_msg text)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	IF NOT p_key = ANY (rd.person_keys()) THEN
		RAISE EXCEPTION 'rd.contact_set: % is not a person key', p_key;
	END IF;
	EXECUTE format('UPDATE rd.contacts SET %I = $3%s, updated_at = now(), message_id = $4'
		       ' WHERE org = $1 AND contact_id = $2',
		       p_key, CASE WHEN p_key = 'birthdate' THEN '::date' ELSE '' END)
	USING p_org, p_cid, p_new, p_msg;
	PERFORM rd.history_add(p_org, p_cid, p_key, p_old, p_new, p_msg);
END $$;

-- The stamp of a message for rd.contacts.value_at: [upstream ms, id]. Two
-- stamps order by time, then by message id, so that any two messages have
-- one fixed order whatever the order they arrive in.
CREATE FUNCTION rd.stamp(p_org text, p_msg text) RETURNS jsonb
LANGUAGE plpgsql STABLE AS $$
BEGIN
	RETURN jsonb_build_array(floor(extract(epoch FROM rd.msg_at(p_org, p_msg)) * 1000)::bigint,
				 p_msg);
END $$;

-- a is not older than b (b NULL: nothing to be older than). Equal stamps
-- are one message: its later persons (an attendee after the booker) win.
CREATE FUNCTION rd.stamp_not_older(a jsonb, b jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
	SELECT b IS NULL OR jsonb_typeof(b) <> 'array'
	    OR ((a->>0)::bigint, a->>1) >= ((b->>0)::bigint, b->>1)
$$;

-- SPEC 4.2: apply a person's data (the normalised person object) to a
-- contact. p_mode:
--   'on'    synchronisation on: a given value overwrites the contact's,
--           unless the contact's value came from a message that happened
--           later (value_at): a message that arrives late (retry, another
--           instance) never reverts newer data;
--   'off'   synchronisation off: the contact's values stay;
--   'admin' contact.upserted by contact_id: given values overwrite.
-- In every mode an empty field is filled. A value filled with 'off' gets no
-- stamp, so that a synchronised value replaces it whether it is older or
-- newer: the result is the one of applying the messages in upstream order.
-- p_email: whether the contact's email may be overwritten (matching decides
-- that; filling an empty email is always allowed). Given values are checked
-- first (country, birthdate, custom fields against their definition): a bad
-- one is skipped, never a reason to reject the message. Every change gets a
-- field_history row; values skipped and values kept are explained in the
-- activity (nothing is lost silently: the booking keeps what it was given).
-- Returns the number of values changed.
--
-- rd.contact_apply_in is the body; p_fresh: the contact was inserted by
-- this message just now (rd.contact_create). The field history of a
-- message that has not yet changed the contact (its message_id is another
-- message's; every writer of rd.field_history here sets it) or of a fresh
-- contact needs no look-up of earlier rows of the message: its rows are
-- inserted in one statement. Otherwise rd.history_add merges them.
CREATE FUNCTION rd.contact_apply_in(p_org text, p_cid uuid, p jsonb, p_mode text,
				    p_email boolean, p_msg text, p_fresh boolean)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
	v_row jsonb;
	v_new_row jsonb;
	v_fields jsonb;
	v_stamps jsonb;
	v_at timestamptz := rd.msg_at(p_org, p_msg);
	-- as rd.stamp(p_org, p_msg)
	v_stamp jsonb := jsonb_build_array(floor(extract(epoch FROM v_at) * 1000)::bigint, p_msg);
	v_bulk boolean;
	v_hf text[] := '{}';
	v_ho text[] := '{}';
	v_hn text[] := '{}';
	v_hkey text;
	v_key text;
	v_new jsonb;
	v_old jsonb;
	v_why text;
	v_changed text[] := '{}';
	v_kept text[] := '{}';
	v_older text[] := '{}';
BEGIN
	SELECT to_jsonb(c) INTO v_row FROM rd.contacts c
	 WHERE c.org = p_org AND c.contact_id = p_cid FOR NO KEY UPDATE;
	IF NOT FOUND THEN
		RETURN 0;
	END IF;
	v_bulk := p_fresh OR v_row->>'message_id' IS DISTINCT FROM p_msg;
	v_new_row := v_row;
	v_fields := coalesce(v_row->'fields', '{}');
	v_stamps := coalesce(v_row->'value_at', '{}');
	IF p ? 'email_invalid' THEN
		PERFORM rd.activity_add(p_org, p_cid, 'value.skipped',
			format('email skipped: %s', p->>'email_invalid'), p_msg);
	END IF;

	-- person keys in their order, then custom fields by key; not given
	-- (absent, nil, "") never erases anything
	FOR v_hkey, v_new IN
		SELECT x.k, x.v FROM (
			SELECT u.k, p->u.k AS v, u.i FROM unnest(rd.person_keys()) WITH ORDINALITY u(k, i)
			UNION ALL
			SELECT 'fields.' || f.key, f.value, 100 FROM jsonb_each(
				CASE WHEN jsonb_typeof(p->'fields') = 'object' THEN p->'fields'
				     ELSE '{}' END) f
		) x
		 WHERE x.v IS NOT NULL AND jsonb_typeof(x.v) <> 'null' AND x.v <> '""'::jsonb
		 ORDER BY x.i, x.k
	LOOP
		IF v_hkey LIKE 'fields.%' THEN
			v_key := substr(v_hkey, 8);
			v_why := rd.field_value_problem(p_org, v_key, v_new);
			v_old := v_fields->v_key;
		ELSE
			v_key := v_hkey;
			-- only country and birthdate have rules (rd.person_value_problem)
			v_why := CASE WHEN v_key IN ('country', 'birthdate')
				      THEN rd.person_value_problem(v_key, v_new #>> '{}') END;
			IF v_why IS NULL THEN
				v_new := to_jsonb(rd.person_value_norm(v_key, v_new #>> '{}'));
			END IF;
			v_old := v_row->v_key;
		END IF;
		IF v_why IS NOT NULL THEN
			PERFORM rd.activity_add(p_org, p_cid, 'value.skipped',
						format('%s: value skipped', v_why), p_msg);
			CONTINUE;
		END IF;
		IF v_old IS NOT NULL AND (jsonb_typeof(v_old) = 'null' OR v_old = '""'::jsonb) THEN
			v_old := NULL;
		END IF;
		IF v_old = v_new THEN
			-- same value: a synchronised message still dates it
			IF p_mode <> 'off' AND rd.stamp_not_older(v_stamp, v_stamps->v_hkey) THEN
				v_stamps := jsonb_set(v_stamps, ARRAY[v_hkey], v_stamp);
			END IF;
			CONTINUE;
		END IF;
		IF v_old IS NOT NULL THEN
			IF v_hkey = 'email' AND NOT p_email THEN
				CONTINUE; -- matching kept the assignment; the booking has the email
			ELSIF p_mode = 'off' THEN
				v_kept := v_kept || v_hkey;
				CONTINUE;
			ELSIF p_mode = 'on' AND NOT rd.stamp_not_older(v_stamp, v_stamps->v_hkey) THEN
				v_older := v_older || v_hkey;
				CONTINUE;
			END IF;
		END IF;

		IF v_hkey = 'email' THEN
			-- whoever matches this address must see the change first
			PERFORM rd.lock_key(p_org, 'email:' || (v_new #>> '{}'));
		END IF;
		IF v_bulk THEN
			v_hf := array_append(v_hf, v_hkey);
			v_ho := array_append(v_ho, v_old #>> '{}');
			v_hn := array_append(v_hn, v_new #>> '{}');
		ELSE
			PERFORM rd.history_add(p_org, p_cid, v_hkey, v_old #>> '{}', v_new #>> '{}',
					       p_msg);
		END IF;
		IF v_hkey LIKE 'fields.%' THEN
			v_fields := jsonb_set(v_fields, ARRAY[v_key], v_new);
		ELSE
			v_new_row := jsonb_set(v_new_row, ARRAY[v_key], v_new);
		END IF;
		IF p_mode = 'off' THEN
			v_stamps := v_stamps - v_hkey;
		ELSIF rd.stamp_not_older(v_stamp, v_stamps->v_hkey) THEN
			v_stamps := jsonb_set(v_stamps, ARRAY[v_hkey], v_stamp);
		END IF;
		v_changed := v_changed || v_hkey;
	END LOOP;

	IF cardinality(v_hf) > 0 THEN
		INSERT INTO rd.field_history (org, contact_id, field, old_value, new_value, message_id, at)
		SELECT p_org, p_cid, u.f, u.o, u.n, p_msg, v_at
		  FROM unnest(v_hf, v_ho, v_hn) WITH ORDINALITY AS u(f, o, n, i)
		 ORDER BY u.i;
	END IF;
	IF cardinality(v_changed) > 0 THEN
		UPDATE rd.contacts c SET
			(email, first_name, last_name, company, language, phone, street, zip, city,
			 country, birthdate) =
			(SELECT r.email, r.first_name, r.last_name, r.company, r.language, r.phone,
				r.street, r.zip, r.city, r.country, r.birthdate
			   FROM jsonb_populate_record(NULL::rd.contacts, v_new_row) r),
			fields = v_fields, value_at = v_stamps, message_id = p_msg, updated_at = now()
		 WHERE c.org = p_org AND c.contact_id = p_cid;
		-- the creating message's values are told by contact.created
		IF v_row->>'created_by' IS DISTINCT FROM p_msg THEN
			PERFORM rd.activity_add(p_org, p_cid, 'contact.changed',
				format('changed: %s', array_to_string(v_changed, ', ')), p_msg);
		END IF;
	ELSIF v_stamps IS DISTINCT FROM coalesce(v_row->'value_at', '{}') THEN
		UPDATE rd.contacts c SET value_at = v_stamps
		 WHERE c.org = p_org AND c.contact_id = p_cid;
	END IF;
	IF cardinality(v_kept) > 0 THEN
		PERFORM rd.activity_add(p_org, p_cid, 'sync.kept',
			format('kept the contact''s %s (synchronisation off); the message''s '
			       'values stay on its booking', array_to_string(v_kept, ', ')), p_msg);
	END IF;
	IF cardinality(v_older) > 0 THEN
		PERFORM rd.activity_add(p_org, p_cid, 'sync.kept',
			format('kept the contact''s %s: they come from a later message',
			       array_to_string(v_older, ', ')), p_msg);
	END IF;
	RETURN cardinality(v_changed);
END $$;

CREATE FUNCTION rd.contact_apply(p_org text, p_cid uuid, p jsonb, p_mode text, p_email boolean,
				 p_msg text)
RETURNS integer LANGUAGE plpgsql AS $$
BEGIN
	RETURN rd.contact_apply_in(p_org, p_cid, p, p_mode, p_email, p_msg, false);
END $$;

-- The interface of the first draft: synchronisation on or off.
CREATE FUNCTION rd.contact_sync(p_org text, p_cid uuid, p jsonb, p_sync boolean,
				p_email boolean, p_msg text)
RETURNS integer LANGUAGE plpgsql AS $$
BEGIN
	RETURN rd.contact_apply(p_org, p_cid, p, CASE WHEN p_sync THEN 'on' ELSE 'off' END,
				p_email, p_msg);
END $$;

-- A new contact from a person's data; every given value is recorded in the
-- field history. p_mode as for rd.contact_apply ('off': the values are
-- fills, which a synchronised message may replace).
CREATE FUNCTION rd.contact_create(p_org text, p jsonb, p_msg text, p_why text, p_mode text)
RETURNS uuid LANGUAGE plpgsql AS $$
DECLARE
	v_cid uuid;
BEGIN
	INSERT INTO rd.contacts (org, message_id, created_by) VALUES (p_org, p_msg, p_msg)
	RETURNING contact_id INTO v_cid;
	PERFORM rd.activity_add(p_org, v_cid, 'contact.created', p_why, p_msg);
	PERFORM rd.contact_apply_in(p_org, v_cid, p, p_mode, true, p_msg, true);
	RETURN v_cid;
END $$;

CREATE FUNCTION rd.contact_create(p_org text, p jsonb, p_msg text, p_why text)
RETURNS uuid LANGUAGE plpgsql AS $$
BEGIN
	RETURN rd.contact_create(p_org, p, p_msg, p_why, 'on');
END $$;

-- SPEC 4.1 step 3: the organisation's live contacts with this email
-- (merge tombstones and erased contacts do not count): exactly one:
-- assign; none or several: create. Serialised per (org, email), so that
-- however many transactions meet a new email at once, one creates the
-- contact and the others find it.
-- Several: the new contact is recorded as a duplicate candidate of each of
-- the others. A person whose email this same message already gave a new
-- contact for (a booker who also attends) gets that contact rather than
-- yet another one.
CREATE FUNCTION rd.match_by_email(p_org text, p jsonb, p_sync boolean, p_msg text,
				  OUT contact_id uuid, OUT match text)
LANGUAGE plpgsql AS $$
DECLARE
	v_email text := p->>'email';
	v_mode text := CASE WHEN p_sync THEN 'on' ELSE 'off' END;
	v_ids uuid[];
	v_other uuid;
BEGIN
	PERFORM rd.lock_key(p_org, 'email:' || v_email);
	SELECT array_agg(c.contact_id ORDER BY c.created_at, c.contact_id) INTO v_ids
	  FROM rd.contacts c
	 WHERE c.org = p_org AND c.email = v_email AND c.merged_into IS NULL AND NOT c.erased;
	IF coalesce(array_length(v_ids, 1), 0) = 1 THEN
		contact_id := v_ids[1];
		match := 'assigned_unique';
		PERFORM rd.contact_apply_in(p_org, contact_id, p, v_mode, false, p_msg, false);
		RETURN;
	END IF;
	IF v_ids IS NULL THEN
		match := 'created_no_match';
		contact_id := rd.contact_create(p_org, p, p_msg,
			'contact created: no contact had the email', v_mode);
		RETURN;
	END IF;
	match := 'created_ambiguous';
	SELECT c.contact_id INTO contact_id FROM rd.contacts c
	 WHERE c.org = p_org AND c.contact_id = ANY (v_ids) AND c.created_by = p_msg
	 LIMIT 1;
	IF FOUND THEN
		PERFORM rd.contact_apply_in(p_org, contact_id, p, v_mode, false, p_msg, false);
		RETURN;
	END IF;
	contact_id := rd.contact_create(p_org, p, p_msg,
		format('contact created: %s contacts had the email (duplicate candidate)',
		       array_length(v_ids, 1)), v_mode);
	FOREACH v_other IN ARRAY v_ids LOOP
		INSERT INTO rd.duplicate_candidates (org, contact_a, contact_b, reason, message_id, at)
		VALUES (p_org, v_other, contact_id, 'same email (ambiguous match)', p_msg,
			rd.msg_at(p_org, p_msg))
		ON CONFLICT DO NOTHING;
	END LOOP;
END $$;

-- SPEC 4.3: the person assigned to p_cid comes with another email. The
-- offer's rule decides: retain keeps the contact (whose email is
-- overwritten when synchronisation is on), reassign matches again by the
-- new email (4.1 step 3).
CREATE FUNCTION rd.email_change(p_org text, p jsonb, p_cid uuid, p_sync boolean, p_msg text,
				p_rule text, p_what text, OUT contact_id uuid, OUT match text)
LANGUAGE plpgsql AS $$
DECLARE
	r record;
BEGIN
	IF coalesce(p_rule, 'reassign') = 'retain' THEN
		contact_id := p_cid;
		match := 'retained';
		PERFORM rd.lock_key(p_org, 'email:' || (p->>'email'));
		PERFORM rd.contact_apply(p_org, p_cid, p,
					 CASE WHEN p_sync THEN 'on' ELSE 'off' END, p_sync, p_msg);
		PERFORM rd.activity_add(p_org, p_cid, 'person.retained',
			format('%s: assignment retained (offer rule retain; synchronisation %s)',
			       p_what, CASE WHEN p_sync THEN 'on: contact email updated'
					    ELSE 'off: contact email kept' END), p_msg);
		RETURN;
	END IF;
	SELECT * INTO r FROM rd.match_by_email(p_org, p, p_sync, p_msg);
	contact_id := r.contact_id;
	match := 'reassigned';
	PERFORM rd.activity_add(p_org, contact_id, 'person.reassigned',
		format('%s: reassigned by the new email (%s)', p_what, r.match), p_msg);
	IF r.contact_id <> p_cid THEN
		PERFORM rd.activity_add(p_org, p_cid, 'person.reassigned',
			format('%s: moved to another contact by the new email', p_what), p_msg);
	END IF;
END $$;

-- SPEC 4.1 and 4.3: decide the contact of one person (booker or attendee)
-- and write the activity entries that explain the decision.
-- p_prev_cid / p_prev_email / p_prev_match: the assignment stored for this
-- person before (a later version of the booking or attendee), p_prev_email
-- being the valid email it was matched with; NULLs for a new person.
-- p_email_change: the offer's rule. p_what names the person for the log.
CREATE FUNCTION rd.match_person(p_org text, p jsonb, p_sync boolean, p_msg text,
				p_prev_cid uuid, p_prev_email text, p_prev_match text,
				p_email_change text, p_what text,
				OUT contact_id uuid, OUT match text)
LANGUAGE plpgsql AS $$
DECLARE
	v_email text := p->>'email';
	v_mode text := CASE WHEN p_sync THEN 'on' ELSE 'off' END;
	v_prev uuid;
	v_cid uuid;
	v_cemail text;
	v_note text;
	r record;
BEGIN
	IF p_prev_cid IS NOT NULL THEN
		v_prev := rd.contact_resolve(p_org, p_prev_cid::text);
	END IF;

	-- A person assigned before stays with its contact unless its email
	-- changed (4.3). An email not given, or invalid, changes nothing: not
	-- given never erases (SPEC 2), and contact_apply says why an invalid
	-- one was skipped.
	IF v_prev IS NOT NULL THEN
		IF v_email IS NULL OR p_prev_email IS NULL OR v_email = p_prev_email THEN
			contact_id := v_prev;
			match := p_prev_match;
			PERFORM rd.contact_apply_in(p_org, v_prev, p, v_mode, false, p_msg, false);
			RETURN;
		END IF;
		SELECT * INTO r FROM rd.email_change(p_org, p, v_prev, p_sync, p_msg,
						     p_email_change,
						     format('%s changed email', p_what));
		contact_id := r.contact_id;
		match := r.match;
		RETURN;
	END IF;

	-- 4.1 step 2: prefilled from a contact of this organisation
	IF p ? 'contact_id' THEN
		v_cid := rd.contact_resolve(p_org, p->>'contact_id');
		IF v_cid IS NOT NULL THEN
			SELECT c.email INTO v_cemail FROM rd.contacts c
			 WHERE c.org = p_org AND c.contact_id = v_cid;
			IF v_email IS NULL OR v_cemail IS NULL OR v_cemail = v_email THEN
				contact_id := v_cid;
				match := 'prefilled';
				PERFORM rd.contact_apply_in(p_org, v_cid, p, v_mode, false, p_msg, false);
				RETURN;
			END IF;
			-- the contact has another email: 4.3 decides
			SELECT * INTO r FROM rd.email_change(p_org, p, v_cid, p_sync, p_msg,
				p_email_change,
				format('%s was prefilled from a contact with another email', p_what));
			contact_id := r.contact_id;
			match := r.match;
			RETURN;
		END IF;
		v_note := format('%s named contact %s, unknown in this organisation; matched by email',
				 p_what, p->>'contact_id');
	ELSIF p ? 'contact_id_invalid' THEN
		v_note := format('%s named a contact id that is not a UUID; matched by email', p_what);
	END IF;

	IF v_email IS NULL THEN
		-- 4.1 step 4: stored, assigned to no contact
		IF p ? 'email_invalid' THEN
			match := 'unassigned_invalid_email';
			PERFORM rd.activity_add(p_org, NULL, 'person.unassigned',
				format('%s left unassigned: invalid email (%s)', p_what,
				       p->>'email_invalid'), p_msg);
		ELSE
			match := 'unassigned_no_email';
			PERFORM rd.activity_add(p_org, NULL, 'person.unassigned',
				format('%s left unassigned: no email', p_what), p_msg);
		END IF;
	ELSE
		SELECT * INTO r FROM rd.match_by_email(p_org, p, p_sync, p_msg);
		contact_id := r.contact_id;
		match := r.match;
	END IF;
	IF v_note IS NOT NULL THEN
		PERFORM rd.activity_add(p_org, contact_id, 'person.prefill_unknown', v_note, p_msg);
	END IF;
END $$;

-- The person stored on a booking or attendee row: the new data over the
-- old (not given never erases), where a valid email replaces an invalid one
-- and an invalid one leaves the valid email that the assignment rests on.
CREATE FUNCTION rd.person_merge(p_old jsonb, p_new jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
	SELECT CASE WHEN p_new ? 'email'
		    THEN coalesce(p_old, '{}') - 'email_invalid' - 'email_given'
		    ELSE coalesce(p_old, '{}') END
	       || (p_new - 'contact_id' - 'contact_id_invalid')
$$;

-- ---- handlers -------------------------------------------------------------

CREATE FUNCTION rd.h_field_defined(p_org text, p_id text, p_at timestamptz, d jsonb)
RETURNS text LANGUAGE plpgsql AS $$
BEGIN
	INSERT INTO rd.fields AS f (org, key, kind, label, message_id)
	VALUES (p_org, d->>'key', d->>'kind', d->>'label', p_id)
	ON CONFLICT (org, key) DO UPDATE SET
		kind = EXCLUDED.kind,
		label = coalesce(EXCLUDED.label, f.label),
		message_id = p_id,
		updated_at = now();
	RETURN 'applied';
END $$;

-- A contact a message names: this organisation's (a tombstone resolves to
-- the keeping contact), else the message waits for it (4.9).
CREATE FUNCTION rd.contact_required(p_org text, p_id text) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
	v_cid uuid := rd.contact_resolve(p_org, p_id);
BEGIN
	IF v_cid IS NULL THEN
		PERFORM rd.wait(format('contact %s not yet seen', p_id));
	END IF;
	RETURN v_cid;
END $$;

-- contact.upserted: contact_id: an admin edit of that contact (given values
-- overwrite; `match` is then ignored); match "email": 4.1 step 3 and the
-- sync rules (without an email there is nothing to match: a new contact,
-- as for manual entry); neither: manual entry, a new contact.
CREATE FUNCTION rd.h_contact_upserted(p_org text, p_id text, p_at timestamptz, d jsonb)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	v_cid uuid;
	r record;
BEGIN
	IF d ? 'contact_id' THEN
		v_cid := rd.contact_required(p_org, d->>'contact_id');
		PERFORM rd.activity_add(p_org, v_cid, 'contact.edited', 'contact edited', p_id);
		PERFORM rd.contact_apply(p_org, v_cid, d, 'admin', true, p_id);
	ELSIF d->>'match' = 'email' AND d ? 'email' THEN
		SELECT * INTO r FROM rd.match_by_email(p_org, d, rd.sync_on(p_org, d), p_id);
		PERFORM rd.activity_add(p_org, r.contact_id, 'contact.imported',
					format('contact data received (%s)', r.match), p_id);
	ELSE
		IF d ? 'email' THEN
			PERFORM rd.lock_key(p_org, 'email:' || (d->>'email'));
		END IF;
		v_cid := rd.contact_create(p_org, d, p_id,
			CASE WHEN d->>'match' = 'email'
			     THEN 'contact created: imported without a valid email to match'
			     ELSE 'contact created by manual entry' END, 'admin');
	END IF;
	RETURN 'applied';
END $$;

CREATE FUNCTION rd.h_contact_tagged(p_org text, p_id text, p_at timestamptz, d jsonb)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	v_cid uuid := rd.contact_required(p_org, d->>'contact_id');
	v_old text[];
	v_new text[];
BEGIN
	SELECT c.tags INTO v_old FROM rd.contacts c
	 WHERE c.org = p_org AND c.contact_id = v_cid FOR NO KEY UPDATE;
	SELECT coalesce(array_agg(DISTINCT t ORDER BY t), '{}') INTO v_new
	  FROM (SELECT unnest(v_old) AS t
		UNION SELECT jsonb_array_elements_text(coalesce(d->'add', '[]'))) s
	 WHERE t NOT IN (SELECT jsonb_array_elements_text(coalesce(d->'remove', '[]')));
	IF v_new IS DISTINCT FROM v_old THEN
		UPDATE rd.contacts SET tags = v_new, updated_at = now(), message_id = p_id
		 WHERE org = p_org AND contact_id = v_cid;
		PERFORM rd.history_add(p_org, v_cid, 'tags', array_to_string(v_old, ','),
				       array_to_string(v_new, ','), p_id);
	END IF;
	PERFORM rd.activity_add(p_org, v_cid, 'contact.tagged',
		format('tags added: %s; removed: %s',
		       coalesce((SELECT string_agg(x, ', ') FROM jsonb_array_elements_text(d->'add') x), '-'),
		       coalesce((SELECT string_agg(x, ', ') FROM jsonb_array_elements_text(d->'remove') x), '-')),
		p_id);
	RETURN 'applied';
END $$;

CREATE FUNCTION rd.h_contact_noted(p_org text, p_id text, p_at timestamptz, d jsonb)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	v_cid uuid := rd.contact_required(p_org, d->>'contact_id');
BEGIN
	INSERT INTO rd.notes (org, contact_id, text, author, message_id, at)
	VALUES (p_org, v_cid, d->>'text', d->>'author', p_id, rd.msg_at(p_org, p_id));
	PERFORM rd.activity_add(p_org, v_cid, 'contact.noted',
		format('note by %s', coalesce(d->>'author', 'unknown author')), p_id);
	RETURN 'applied';
END $$;

-- The effective status of a booking from its parts: cancelled when its
-- latest cancellation is newer than its booking-level data, else the status
-- of that data. Returns it.
CREATE FUNCTION rd.booking_status(p_org text, p_bid text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
	v_old text;
	v text;
BEGIN
	-- the row is written only when the status changes (a new row version
	-- costs more than a look-up; most calls find it unchanged)
	SELECT b.status, CASE WHEN b.cancel_version > b.data_version THEN 'cancelled'
			      ELSE coalesce(b.data_status, 'confirmed') END
	  INTO v_old, v
	  FROM rd.bookings b
	 WHERE b.org = p_org AND b.booking_id = p_bid;
	IF v IS DISTINCT FROM v_old THEN
		UPDATE rd.bookings b SET status = v WHERE b.org = p_org AND b.booking_id = p_bid;
	END IF;
	RETURN v;
END $$;

-- The effective status of the booking and of its attendees: an attendee
-- older than the booking's last full list is no longer listed (cancelled),
-- the others share the booking's status. Each change of an attendee's
-- status goes to its contact's activity. Returns the booking's status.
CREATE FUNCTION rd.booking_settle(p_org text, p_bid text, p_msg text) RETURNS text
LANGUAGE plpgsql AS $$
DECLARE
	v_status text := rd.booking_status(p_org, p_bid);
	v_list integer;
	r record;
BEGIN
	SELECT b.list_version INTO v_list FROM rd.bookings b
	 WHERE b.org = p_org AND b.booking_id = p_bid;
	FOR r IN
		UPDATE rd.attendees x SET status = o.new_status
		  FROM (SELECT y.attendee_id, y.status AS old_status, y.version < v_list AS gone,
			       CASE WHEN y.version < v_list THEN 'cancelled' ELSE v_status END
				AS new_status
			  FROM rd.attendees y
			 WHERE y.org = p_org AND y.booking_id = p_bid) o
		 WHERE x.org = p_org AND x.booking_id = p_bid AND x.attendee_id = o.attendee_id
		   AND x.status <> o.new_status
		RETURNING x.contact_id, x.attendee_id, o.old_status, o.new_status, o.gone
	LOOP
		IF r.contact_id IS NOT NULL THEN
			PERFORM rd.activity_add(p_org, r.contact_id, 'attendance.status',
				format('attendee %s of booking %s: %s -> %s%s', r.attendee_id, p_bid,
				       r.old_status, r.new_status,
				       CASE WHEN r.gone THEN ' (no longer listed in the booking)'
					    ELSE '' END), p_msg);
		END IF;
	END LOOP;
	RETURN v_status;
END $$;

-- One attendee of a booking at version p_version: applied when the stored
-- attendee is older (or new); returns whether it was. Match, store,
-- explain. The booking row exists and is locked.
CREATE FUNCTION rd.attendee_apply(p_org text, p_booking text, a jsonb, p_version integer,
				  p_sync boolean, p_email_change text, p_msg text)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
	v_prev rd.attendees%ROWTYPE;
	v_b rd.bookings%ROWTYPE;
	v_person jsonb;
	v_status text;
	r record;
	v_what text := format('attendee %s of booking %s', a->>'attendee_id', p_booking);
BEGIN
	SELECT * INTO v_prev FROM rd.attendees x
	 WHERE x.org = p_org AND x.booking_id = p_booking AND x.attendee_id = a->>'attendee_id'
	   FOR NO KEY UPDATE;
	IF FOUND AND v_prev.version >= p_version THEN
		RETURN false;
	END IF;
	SELECT * INTO v_b FROM rd.bookings b WHERE b.org = p_org AND b.booking_id = p_booking;
	SELECT * INTO r FROM rd.match_person(p_org, a, p_sync, p_msg, v_prev.contact_id,
					     v_prev.person->>'email', v_prev.match, p_email_change,
					     v_what);
	v_person := rd.person_merge(v_prev.person, a);
	v_status := CASE WHEN p_version < v_b.list_version THEN 'cancelled' ELSE v_b.status END;
	INSERT INTO rd.attendees AS x (org, booking_id, attendee_id, contact_id, email, first_name,
				       last_name, category, price, status, match, person, version)
	VALUES (p_org, p_booking, a->>'attendee_id', r.contact_id,
		coalesce(v_person->>'email', v_person->>'email_given'), v_person->>'first_name',
		v_person->>'last_name', v_person->>'category', (v_person->>'price')::bigint,
		v_status, r.match, v_person, p_version)
	ON CONFLICT (org, booking_id, attendee_id) DO UPDATE SET
		contact_id = EXCLUDED.contact_id,
		email = EXCLUDED.email,
		first_name = EXCLUDED.first_name,
		last_name = EXCLUDED.last_name,
		category = EXCLUDED.category,
		price = EXCLUDED.price,
		match = EXCLUDED.match,
		person = EXCLUDED.person,
		version = EXCLUDED.version;
	IF r.contact_id IS NOT NULL THEN
		IF v_prev.contact_id IS DISTINCT FROM r.contact_id THEN
			PERFORM rd.activity_add(p_org, r.contact_id, 'attendance',
				format('attends booking %s as attendee %s (%s, %s)', p_booking,
				       a->>'attendee_id', r.match, v_status), p_msg);
		ELSE
			PERFORM rd.activity_add(p_org, r.contact_id, 'attendance.changed',
				format('attendee %s of booking %s updated (version %s)',
				       a->>'attendee_id', p_booking, p_version), p_msg);
		END IF;
	END IF;
	RETURN true;
END $$;

-- booking.created and booking.updated: the message is the booking's state
-- at its version. Each part is applied when the stored part is older
-- (rd.bookings): the booking-level data, the attendee list, each attendee.
-- A message none of whose parts is newer is stale (4.4). A booking not yet
-- seen is created from the message, whichever type it is.
CREATE FUNCTION rd.h_booking_upsert(p_org text, p_id text, p_at timestamptz, d jsonb,
				    p_type text)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	v_bid text := d->>'booking_id';
	v_version integer := (d->>'version')::integer;
	v_prev rd.bookings%ROWTYPE;
	v_found boolean;
	v_data boolean;
	v_list boolean;
	v_offer rd.offers%ROWTYPE;
	v_rule text;
	v_sync boolean := rd.sync_on(p_org, d);
	v_booker jsonb := d->'booker';
	v_att jsonb;
	v_status text;
	r record;
BEGIN
	PERFORM rd.lock_key(p_org, 'booking:' || v_bid);
	SELECT * INTO v_prev FROM rd.bookings b WHERE b.org = p_org AND b.booking_id = v_bid
	   FOR NO KEY UPDATE;
	v_found := FOUND;
	v_data := NOT v_found OR v_version > v_prev.data_version;
	v_list := d ? 'attendees' AND (NOT v_found OR v_version > v_prev.list_version);
	IF NOT v_data AND NOT v_list AND NOT EXISTS (
		SELECT 1 FROM jsonb_array_elements(coalesce(d->'attendees', '[]')) a
		 WHERE NOT EXISTS (SELECT 1 FROM rd.attendees x
				    WHERE x.org = p_org AND x.booking_id = v_bid
				      AND x.attendee_id = a->>'attendee_id'
				      AND x.version >= v_version)) THEN
		RETURN 'stale';
	END IF;
	SELECT * INTO v_offer FROM rd.offers f WHERE f.org = p_org AND f.offer_id = d->>'offer_id';
	IF NOT FOUND THEN
		PERFORM rd.wait(format('offer %s not yet seen', d->>'offer_id'));
	END IF;

	-- a booking not seen before is inserted with its data below (v_data)
	IF v_data THEN
		-- the booker as stored, if booking-level data was applied before
		IF v_prev.data_version IS NULL OR v_prev.data_version = 0 THEN
			v_prev.contact_id := NULL;
			v_prev.booker := NULL;
			v_prev.match := NULL;
		END IF;
		SELECT * INTO r FROM rd.match_person(p_org, v_booker, v_sync, p_id,
			v_prev.contact_id, v_prev.booker->>'email', v_prev.match,
			v_offer.email_change, format('booker of booking %s', v_bid));
		v_booker := rd.person_merge(v_prev.booker, v_booker);
		IF NOT v_found THEN
			-- as the UPDATE below would set a new row: one row version
			INSERT INTO rd.bookings (org, booking_id, offer_id, number, data_status,
						 data_version, contact_id, email, match, booker, total,
						 currency, list_version, version, message_id)
			VALUES (p_org, v_bid, d->>'offer_id', d->>'number',
				coalesce(d->>'status', 'confirmed'), v_version, r.contact_id,
				coalesce(v_booker->>'email', v_booker->>'email_given'), r.match, v_booker,
				(d->>'total')::bigint, coalesce(d->>'currency', v_offer.currency),
				CASE WHEN v_list THEN v_version ELSE 0 END, v_version, p_id);
		ELSE
			UPDATE rd.bookings b SET
				offer_id = d->>'offer_id',
				number = coalesce(d->>'number', b.number),
				data_status = coalesce(d->>'status', 'confirmed'),
				data_version = v_version,
				contact_id = r.contact_id,
				email = coalesce(v_booker->>'email', v_booker->>'email_given'),
				match = r.match,
				booker = v_booker,
				total = coalesce((d->>'total')::bigint, b.total),
				currency = coalesce(d->>'currency', b.currency, v_offer.currency),
				list_version = CASE WHEN v_list THEN v_version ELSE b.list_version END,
				-- what the end of this function sets for every message (one
				-- row version less; nothing in between reads them)
				version = greatest(b.version, v_version), message_id = p_id, updated_at = now()
			 WHERE b.org = p_org AND b.booking_id = v_bid;
		END IF;
		-- new attendees take it; rd.booking_settle logs the changes of the others
		v_status := rd.booking_status(p_org, v_bid);
		IF r.contact_id IS NOT NULL THEN
			IF v_prev.contact_id IS DISTINCT FROM r.contact_id THEN
				PERFORM rd.activity_add(p_org, r.contact_id, 'booking',
					format('booking %s (number %s, offer %s, %s, version %s): booker (%s)',
					       v_bid, coalesce(d->>'number', '-'), d->>'offer_id',
					       v_status, v_version, r.match), p_id);
			ELSE
				PERFORM rd.activity_add(p_org, r.contact_id, 'booking.changed',
					format('booking %s changed (%s, version %s)', v_bid, v_status,
					       v_version), p_id);
			END IF;
		END IF;
		IF v_prev.contact_id IS NOT NULL AND v_prev.contact_id IS DISTINCT FROM r.contact_id THEN
			PERFORM rd.activity_add(p_org, v_prev.contact_id, 'booking.reassigned',
				format('no longer the booker of booking %s', v_bid), p_id);
		END IF;
		v_rule := v_offer.email_change;
	ELSE
		-- an older message fills parts only: the stored offer's rule
		SELECT f.email_change INTO v_rule FROM rd.offers f
		 WHERE f.org = p_org AND f.offer_id = coalesce(v_prev.offer_id, d->>'offer_id');
	END IF;
	IF v_list AND NOT v_data THEN
		UPDATE rd.bookings SET list_version = v_version WHERE org = p_org AND booking_id = v_bid;
	END IF;

	FOR v_att IN SELECT * FROM jsonb_array_elements(coalesce(d->'attendees', '[]')) LOOP
		PERFORM rd.attendee_apply(p_org, v_bid, v_att, v_version, v_sync, v_rule, p_id);
	END LOOP;
	IF NOT v_data THEN
		UPDATE rd.bookings SET version = greatest(version, v_version), message_id = p_id,
				       updated_at = now()
		 WHERE org = p_org AND booking_id = v_bid;
	END IF;
	PERFORM rd.booking_settle(p_org, v_bid, p_id);
	RETURN 'applied';
END $$;

-- attendee.updated: the attendee's state at the version. A booking not yet
-- seen is created from the message (4.4): a booking with this attendee and
-- no booking-level data yet, which any booking message may fill later.
CREATE FUNCTION rd.h_attendee_updated(p_org text, p_id text, p_at timestamptz, d jsonb)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	v_bid text := d->>'booking_id';
	v_version integer := (d->>'version')::integer;
	v_prev rd.bookings%ROWTYPE;
	v_rule text;
BEGIN
	PERFORM rd.lock_key(p_org, 'booking:' || v_bid);
	SELECT * INTO v_prev FROM rd.bookings b WHERE b.org = p_org AND b.booking_id = v_bid
	   FOR NO KEY UPDATE;
	IF NOT FOUND THEN
		INSERT INTO rd.bookings (org, booking_id, version, message_id)
		VALUES (p_org, v_bid, v_version, p_id);
	ELSE
		SELECT f.email_change INTO v_rule FROM rd.offers f
		 WHERE f.org = p_org AND f.offer_id = v_prev.offer_id;
	END IF;
	IF NOT rd.attendee_apply(p_org, v_bid, d->'attendee', v_version, rd.sync_on(p_org, d),
				 v_rule, p_id) THEN
		RETURN 'stale';
	END IF;
	UPDATE rd.bookings SET version = greatest(version, v_version), message_id = p_id,
			       updated_at = now()
	 WHERE org = p_org AND booking_id = v_bid;
	PERFORM rd.booking_settle(p_org, v_bid, p_id);
	RETURN 'applied';
END $$;

-- booking.cancelled: a part of its own (cancel_version), so that a
-- cancellation that overtakes booking.created does not make that message
-- stale; stale when booking-level data or a cancellation at least as new is
-- stored. Waits for a booking not yet seen (4.9).
CREATE FUNCTION rd.h_booking_cancelled(p_org text, p_id text, p_at timestamptz, d jsonb)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	v_bid text := d->>'booking_id';
	v_version integer := (d->>'version')::integer;
	v_prev rd.bookings%ROWTYPE;
	v_status text;
BEGIN
	PERFORM rd.lock_key(p_org, 'booking:' || v_bid);
	SELECT * INTO v_prev FROM rd.bookings b WHERE b.org = p_org AND b.booking_id = v_bid
	   FOR NO KEY UPDATE;
	IF NOT FOUND THEN
		PERFORM rd.wait(format('booking %s not yet seen', v_bid));
	END IF;
	IF v_version <= v_prev.cancel_version OR v_version <= v_prev.data_version THEN
		RETURN 'stale';
	END IF;
	UPDATE rd.bookings SET cancel_version = v_version, cancel_reason = d->>'reason',
			       version = greatest(version, v_version), updated_at = now(),
			       message_id = p_id
	 WHERE org = p_org AND booking_id = v_bid;
	v_status := rd.booking_settle(p_org, v_bid, p_id);
	IF v_prev.contact_id IS NOT NULL AND v_prev.data_version > 0 THEN
		PERFORM rd.activity_add(p_org, v_prev.contact_id, 'booking.cancelled',
			format('booking %s cancelled%s', v_bid,
			       coalesce(': ' || (d->>'reason'), '')), p_id);
	END IF;
	RETURN 'applied';
END $$;

CREATE FUNCTION rd.h_booking_created(p_org text, p_id text, p_at timestamptz, d jsonb)
RETURNS text LANGUAGE plpgsql AS $$
BEGIN
	RETURN rd.h_booking_upsert(p_org, p_id, p_at, d, 'booking.created');
END $$;
CREATE FUNCTION rd.h_booking_updated(p_org text, p_id text, p_at timestamptz, d jsonb)
RETURNS text LANGUAGE plpgsql AS $$
BEGIN
	RETURN rd.h_booking_upsert(p_org, p_id, p_at, d, 'booking.updated');
END $$;

INSERT INTO rd.handler_fns (type, fn) VALUES
	('booking.created', 'rd.h_booking_created'),
	('booking.updated', 'rd.h_booking_updated'),
	('attendee.updated', 'rd.h_attendee_updated'),
	('booking.cancelled', 'rd.h_booking_cancelled'),
	('contact.upserted', 'rd.h_contact_upserted'),
	('contact.tagged', 'rd.h_contact_tagged'),
	('contact.noted', 'rd.h_contact_noted'),
	('field.defined', 'rd.h_field_defined');
SELECT rd.rebuild_dispatch();

-- ---- reporting views --------------------------------------------------------

CREATE VIEW report.contacts AS
	SELECT org, contact_id::text AS contact_id, email, first_name, last_name, company,
	       language, phone, street, zip, city, country, birthdate, fields, tags, barcode,
	       merged_into::text AS merged_into, erased, created_at, updated_at
	  FROM rd.contacts;

CREATE VIEW report.bookings AS
	SELECT org, booking_id, offer_id, number, status, version, contact_id::text AS contact_id,
	       email, match, total, currency, created_at, updated_at
	  FROM rd.bookings;

CREATE VIEW report.attendees AS
	SELECT org, booking_id, attendee_id, contact_id::text AS contact_id, email, first_name,
	       last_name, category, price, status, match
	  FROM rd.attendees;

CREATE VIEW report.activity AS
	SELECT org, contact_id::text AS contact_id, at, kind, summary, message_id
	  FROM rd.activity;

CREATE VIEW report.field_history AS
	SELECT org, contact_id::text AS contact_id, field, old_value, new_value, message_id, at
	  FROM rd.field_history;
