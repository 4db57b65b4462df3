-- 0002_contacts: contacts, matching (SPEC 4.1), synchronisation (4.2),
-- email changes (4.3), versions (4.4), bookings and attendees, custom
-- fields, tags, notes, the activity timeline and the field history.
--
-- Serialisation: the batch takes advisory locks on "<org>/email:<addr>",
-- "<org>/booking:<id>" and "<org>/contact:<uuid>" in one sorted order
-- before any message runs (rd.lock_keys). The functions here take the same
-- locks again (re-entrant) so that they are also safe when called alone.

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
	barcode      text        NOT NULL DEFAULT upper(encode(gen_random_bytes(10), 'hex')),
	merged_into  uuid,
	erased       boolean     NOT NULL DEFAULT false,
	message_id   text,
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

CREATE TABLE rd.bookings (
	org          text        NOT NULL,
	booking_id   text        NOT NULL,
	offer_id     text,
	number       text,
	status       text        NOT NULL DEFAULT 'confirmed',
	version      integer     NOT NULL,
	contact_id   uuid,
	email        text,
	match        text,
	booker       jsonb       NOT NULL DEFAULT '{}',
	total        bigint,
	currency     text,
	message_id   text        NOT NULL,
	created_at   timestamptz NOT NULL DEFAULT now(),
	updated_at   timestamptz NOT NULL DEFAULT now(),
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
	status       text        NOT NULL DEFAULT 'confirmed',
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

CREATE FUNCTION rd.activity_add(p_org text, p_contact uuid, p_kind text, p_summary text,
				p_msg text)
RETURNS void LANGUAGE sql AS $$
	INSERT INTO rd.activity (org, contact_id, kind, summary, message_id)
	VALUES (p_org, p_contact, p_kind, p_summary, p_msg)
$$;

-- A text that is a UUID, or NULL.
CREATE FUNCTION rd.as_uuid(p text) RETURNS uuid
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
	RETURN p::uuid;
EXCEPTION WHEN invalid_text_representation THEN
	RETURN NULL;
END $$;

-- The live contact for an id of this organisation: follows merge
-- tombstones to the keeping contact; NULL when unknown.
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
LANGUAGE sql AS $$
	SELECT pg_advisory_xact_lock(hashtextextended(p_org || '/' || p_key, 0))
$$;

-- Effective synchronisation for a message: its own `sync`, else the org's.
CREATE FUNCTION rd.sync_on(p_org text, d jsonb) RETURNS boolean
LANGUAGE sql STABLE AS $$
	SELECT coalesce((d->>'sync')::boolean,
			(SELECT o.sync_contacts FROM rd.orgs o WHERE o.org = p_org), false)
$$;

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
		RETURN NULL; -- undefined keys are stored as given
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

-- Set one contact column (person key) and record the change.
CREATE FUNCTION rd.contact_set(p_org text, p_cid uuid, p_key text, p_old text, p_new text,
			       p_msg text)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
	EXECUTE format('UPDATE rd.contacts SET %I = $3%s, updated_at = now()'
		       ' WHERE org = $1 AND contact_id = $2',
		       p_key, CASE WHEN p_key = 'birthdate' THEN '::date' ELSE '' END)
	USING p_org, p_cid, p_new;
	INSERT INTO rd.field_history (org, contact_id, field, old_value, new_value, message_id)
	VALUES (p_org, p_cid, p_key, p_old, p_new, p_msg);
END $$;

-- SPEC 4.2: apply a person's data to a contact. Empty contact fields are
-- filled in both modes; with p_sync, given values overwrite. p_email:
-- whether the email may be written at all (matching decides it).
-- Returns the number of values changed.
CREATE FUNCTION rd.contact_sync(p_org text, p_cid uuid, p jsonb, p_sync boolean,
				p_email boolean, p_msg text)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
	v_row jsonb;
	v_key text;
	v_new text;
	v_old text;
	v_why text;
	v_n integer := 0;
	v_fields jsonb;
	v_fkey text;
	v_fval jsonb;
	v_fold jsonb;
BEGIN
	SELECT to_jsonb(c) INTO v_row FROM rd.contacts c
	 WHERE c.org = p_org AND c.contact_id = p_cid FOR UPDATE;
	FOREACH v_key IN ARRAY rd.person_keys() LOOP
		v_new := p->>v_key;
		CONTINUE WHEN v_new IS NULL OR v_new = '';
		CONTINUE WHEN v_key = 'email' AND NOT p_email;
		v_why := rd.person_value_problem(v_key, v_new);
		IF v_why IS NOT NULL THEN
			PERFORM rd.activity_add(p_org, p_cid, 'value.skipped',
						format('%s: value skipped', v_why), p_msg);
			CONTINUE;
		END IF;
		v_new := rd.person_value_norm(v_key, v_new);
		v_old := v_row->>v_key;
		CONTINUE WHEN v_old IS NOT DISTINCT FROM v_new;
		IF v_old IS NULL OR v_old = '' OR p_sync THEN
			PERFORM rd.contact_set(p_org, p_cid, v_key, v_old, v_new, p_msg);
			v_n := v_n + 1;
		END IF;
	END LOOP;

	v_fields := coalesce(v_row->'fields', '{}');
	FOR v_fkey, v_fval IN SELECT * FROM jsonb_each(coalesce(p->'fields', '{}')) LOOP
		CONTINUE WHEN v_fval IS NULL OR jsonb_typeof(v_fval) = 'null'
			OR v_fval = '""'::jsonb;
		v_why := rd.field_value_problem(p_org, v_fkey, v_fval);
		IF v_why IS NOT NULL THEN
			PERFORM rd.activity_add(p_org, p_cid, 'value.skipped',
						format('%s: value skipped', v_why), p_msg);
			CONTINUE;
		END IF;
		v_fold := v_fields->v_fkey;
		CONTINUE WHEN v_fold IS NOT DISTINCT FROM v_fval;
		IF v_fold IS NULL OR jsonb_typeof(v_fold) = 'null' OR v_fold = '""'::jsonb
		   OR p_sync THEN
			v_fields := jsonb_set(v_fields, ARRAY[v_fkey], v_fval);
			INSERT INTO rd.field_history (org, contact_id, field, old_value, new_value,
						      message_id)
			VALUES (p_org, p_cid, 'fields.' || v_fkey, v_fold #>> '{}', v_fval #>> '{}',
				p_msg);
			v_n := v_n + 1;
		END IF;
	END LOOP;
	IF v_fields IS DISTINCT FROM coalesce(v_row->'fields', '{}') THEN
		UPDATE rd.contacts SET fields = v_fields, updated_at = now()
		 WHERE org = p_org AND contact_id = p_cid;
	END IF;
	IF v_n > 0 THEN
		UPDATE rd.contacts SET message_id = p_msg WHERE org = p_org AND contact_id = p_cid;
		PERFORM rd.activity_add(p_org, p_cid, 'contact.changed',
					format('%s value(s) changed', v_n), p_msg);
	END IF;
	RETURN v_n;
END $$;

-- A new contact from a person's data (every given value is recorded).
CREATE FUNCTION rd.contact_create(p_org text, p jsonb, p_msg text, p_why text)
RETURNS uuid LANGUAGE plpgsql AS $$
DECLARE
	v_cid uuid;
BEGIN
	INSERT INTO rd.contacts (org, message_id) VALUES (p_org, p_msg)
	RETURNING contact_id INTO v_cid;
	PERFORM rd.activity_add(p_org, v_cid, 'contact.created', p_why, p_msg);
	PERFORM rd.contact_sync(p_org, v_cid, p, true, true, p_msg);
	RETURN v_cid;
END $$;

-- SPEC 4.1 step 3: the organisation's contacts with this email: exactly
-- one: assign; none or several: create. Serialised per (org, email).
CREATE FUNCTION rd.match_by_email(p_org text, p jsonb, p_sync boolean, p_msg text,
				  OUT contact_id uuid, OUT match text)
LANGUAGE plpgsql AS $$
DECLARE
	v_email text := p->>'email';
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
		PERFORM rd.contact_sync(p_org, contact_id, p, p_sync, false, p_msg);
		RETURN;
	END IF;
	IF v_ids IS NULL THEN
		match := 'created_no_match';
		contact_id := rd.contact_create(p_org, p, p_msg, 'contact created: no contact had the email');
	ELSE
		match := 'created_ambiguous';
		contact_id := rd.contact_create(p_org, p,
			p_msg, format('contact created: %s contacts had the email', array_length(v_ids, 1)));
		FOREACH v_other IN ARRAY v_ids LOOP
			INSERT INTO rd.duplicate_candidates (org, contact_a, contact_b, reason, message_id)
			VALUES (p_org, v_other, contact_id, 'same email (ambiguous match)', p_msg)
			ON CONFLICT DO NOTHING;
		END LOOP;
	END IF;
END $$;

-- SPEC 4.1 (and 4.3 for a changed email): decide the contact of one person.
-- p_prev_cid / p_prev_email: the assignment stored for this person before
-- (booking.updated, attendee.updated), or NULL. p_email_change: the offer's
-- rule. Writes the activity entries that explain the decision.
CREATE FUNCTION rd.match_person(p_org text, p jsonb, p_sync boolean, p_msg text,
				p_prev_cid uuid, p_prev_email text, p_prev_match text,
				p_email_change text, p_what text,
				OUT contact_id uuid, OUT match text)
LANGUAGE plpgsql AS $$
DECLARE
	v_email text := p->>'email';
	v_cid uuid;
	v_cemail text;
	r record;
BEGIN
	IF v_email IS NULL THEN
		-- a person stays assigned to the contact it had
		IF p_prev_cid IS NOT NULL AND p_prev_email IS NULL THEN
			contact_id := p_prev_cid;
			match := p_prev_match;
			PERFORM rd.contact_sync(p_org, contact_id, p, p_sync, false, p_msg);
			RETURN;
		END IF;
		IF p ? 'email_invalid' THEN
			match := 'unassigned_invalid_email';
			PERFORM rd.activity_add(p_org, NULL, 'person.unassigned',
				format('%s left unassigned: invalid email (%s)', p_what, p->>'email_invalid'),
				p_msg);
		ELSE
			match := 'unassigned_no_email';
			PERFORM rd.activity_add(p_org, NULL, 'person.unassigned',
				format('%s left unassigned: no email', p_what), p_msg);
		END IF;
		RETURN;
	END IF;

	-- 4.3: the person was assigned before and its email changed
	IF p_prev_cid IS NOT NULL AND p_prev_email IS NOT NULL AND p_prev_email <> v_email THEN
		v_cid := rd.contact_resolve(p_org, p_prev_cid::text);
		IF coalesce(p_email_change, 'reassign') = 'retain' AND v_cid IS NOT NULL THEN
			contact_id := v_cid;
			match := 'retained';
			PERFORM rd.lock_key(p_org, 'email:' || v_email);
			PERFORM rd.contact_sync(p_org, contact_id, p, p_sync, p_sync, p_msg);
			PERFORM rd.activity_add(p_org, contact_id, 'person.retained',
				format('%s changed email; assignment retained', p_what), p_msg);
			RETURN;
		END IF;
		SELECT * INTO r FROM rd.match_by_email(p_org, p, p_sync, p_msg);
		contact_id := r.contact_id;
		match := 'reassigned';
		PERFORM rd.activity_add(p_org, contact_id, 'person.reassigned',
			format('%s changed email; reassigned (%s)', p_what, r.match), p_msg);
		RETURN;
	END IF;

	-- the same person as before: keep the assignment
	IF p_prev_cid IS NOT NULL THEN
		v_cid := rd.contact_resolve(p_org, p_prev_cid::text);
		IF v_cid IS NOT NULL THEN
			contact_id := v_cid;
			match := p_prev_match;
			PERFORM rd.contact_sync(p_org, contact_id, p, p_sync, false, p_msg);
			RETURN;
		END IF;
	END IF;

	-- 4.1 step 2: prefilled from a contact of this organisation
	IF p ? 'contact_id' THEN
		v_cid := rd.contact_resolve(p_org, p->>'contact_id');
		IF v_cid IS NOT NULL THEN
			SELECT c.email INTO v_cemail FROM rd.contacts c
			 WHERE c.org = p_org AND c.contact_id = v_cid;
			IF v_cemail IS NULL OR v_cemail = v_email THEN
				contact_id := v_cid;
				match := 'prefilled';
				PERFORM rd.contact_sync(p_org, contact_id, p, p_sync, true, p_msg);
				RETURN;
			END IF;
			-- its email differs: 4.3 applies
			IF coalesce(p_email_change, 'reassign') = 'retain' THEN
				contact_id := v_cid;
				match := 'retained';
				PERFORM rd.contact_sync(p_org, contact_id, p, p_sync, p_sync, p_msg);
				PERFORM rd.activity_add(p_org, contact_id, 'person.retained',
					format('%s prefilled with another email; assignment retained',
					       p_what), p_msg);
				RETURN;
			END IF;
			SELECT * INTO r FROM rd.match_by_email(p_org, p, p_sync, p_msg);
			contact_id := r.contact_id;
			match := 'reassigned';
			PERFORM rd.activity_add(p_org, contact_id, 'person.reassigned',
				format('%s prefilled with another email; reassigned (%s)', p_what,
				       r.match), p_msg);
			RETURN;
		END IF;
		PERFORM rd.activity_add(p_org, NULL, 'person.prefill_unknown',
			format('%s named an unknown contact; matched by email', p_what), p_msg);
	END IF;

	SELECT * INTO r FROM rd.match_by_email(p_org, p, p_sync, p_msg);
	contact_id := r.contact_id;
	match := r.match;
END $$;

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

CREATE FUNCTION rd.h_contact_upserted(p_org text, p_id text, p_at timestamptz, d jsonb)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	v_cid uuid;
	r record;
BEGIN
	IF d ? 'contact_id' THEN
		-- an admin edit: given values overwrite
		v_cid := rd.contact_required(p_org, d->>'contact_id');
		IF d ? 'email' THEN
			PERFORM rd.lock_key(p_org, 'email:' || (d->>'email'));
		END IF;
		PERFORM rd.contact_sync(p_org, v_cid, d, true, true, p_id);
		PERFORM rd.activity_add(p_org, v_cid, 'contact.edited', 'contact edited', p_id);
	ELSIF d->>'match' = 'email' AND d ? 'email' THEN
		SELECT * INTO r FROM rd.match_by_email(p_org, d, rd.sync_on(p_org, d), p_id);
		PERFORM rd.activity_add(p_org, r.contact_id, 'contact.imported',
					format('contact data received (%s)', r.match), p_id);
	ELSE
		IF d ? 'email' THEN
			PERFORM rd.lock_key(p_org, 'email:' || (d->>'email'));
		ELSIF d ? 'email_invalid' THEN
			PERFORM rd.activity_add(p_org, NULL, 'value.skipped',
				format('email skipped: %s', d->>'email_invalid'), p_id);
		END IF;
		v_cid := rd.contact_create(p_org, d, p_id, 'contact created by manual entry');
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
	 WHERE c.org = p_org AND c.contact_id = v_cid FOR UPDATE;
	SELECT coalesce(array_agg(DISTINCT t ORDER BY t), '{}') INTO v_new
	  FROM (SELECT unnest(v_old) AS t
		UNION SELECT jsonb_array_elements_text(coalesce(d->'add', '[]'))) s
	 WHERE t NOT IN (SELECT jsonb_array_elements_text(coalesce(d->'remove', '[]')));
	IF v_new IS DISTINCT FROM v_old THEN
		UPDATE rd.contacts SET tags = v_new, updated_at = now(), message_id = p_id
		 WHERE org = p_org AND contact_id = v_cid;
		INSERT INTO rd.field_history (org, contact_id, field, old_value, new_value, message_id)
		VALUES (p_org, v_cid, 'tags', array_to_string(v_old, ','), array_to_string(v_new, ','),
			p_id);
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
	INSERT INTO rd.notes (org, contact_id, text, author, message_id)
	VALUES (p_org, v_cid, d->>'text', d->>'author', p_id);
	PERFORM rd.activity_add(p_org, v_cid, 'contact.noted',
		format('note by %s', coalesce(d->>'author', 'unknown author')), p_id);
	RETURN 'applied';
END $$;

-- One attendee of a booking: match, store, explain.
CREATE FUNCTION rd.attendee_apply(p_org text, p_booking text, a jsonb, p_status text,
				  p_version integer, p_sync boolean, p_email_change text,
				  p_msg text)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
	v_prev rd.attendees%ROWTYPE;
	r record;
	v_what text := format('attendee %s of booking %s', a->>'attendee_id', p_booking);
BEGIN
	SELECT * INTO v_prev FROM rd.attendees x
	 WHERE x.org = p_org AND x.booking_id = p_booking AND x.attendee_id = a->>'attendee_id';
	SELECT * INTO r FROM rd.match_person(p_org, a, p_sync, p_msg, v_prev.contact_id,
					     v_prev.email, v_prev.match, p_email_change, v_what);
	INSERT INTO rd.attendees AS x (org, booking_id, attendee_id, contact_id, email, first_name,
				       last_name, category, price, status, match, person, version)
	VALUES (p_org, p_booking, a->>'attendee_id', r.contact_id,
		coalesce(a->>'email', a->>'email_given'), a->>'first_name', a->>'last_name',
		a->>'category', (a->>'price')::bigint, p_status, r.match, a, p_version)
	ON CONFLICT (org, booking_id, attendee_id) DO UPDATE SET
		contact_id = EXCLUDED.contact_id,
		email = EXCLUDED.email,
		first_name = coalesce(EXCLUDED.first_name, x.first_name),
		last_name = coalesce(EXCLUDED.last_name, x.last_name),
		category = coalesce(EXCLUDED.category, x.category),
		price = coalesce(EXCLUDED.price, x.price),
		status = EXCLUDED.status,
		match = EXCLUDED.match,
		person = EXCLUDED.person,
		version = EXCLUDED.version;
	IF r.contact_id IS NOT NULL
	   AND (v_prev.contact_id IS NULL OR v_prev.contact_id <> r.contact_id) THEN
		PERFORM rd.activity_add(p_org, r.contact_id, 'attendance',
			format('attends booking %s (%s, %s)', p_booking, r.match, p_status), p_msg);
	END IF;
END $$;

-- booking.created and booking.updated: the message is the booking's state
-- at its version.
CREATE FUNCTION rd.h_booking_upsert(p_org text, p_id text, p_at timestamptz, d jsonb,
				    p_type text)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	v_bid text := d->>'booking_id';
	v_version integer := (d->>'version')::integer;
	v_prev rd.bookings%ROWTYPE;
	v_offer rd.offers%ROWTYPE;
	v_sync boolean := rd.sync_on(p_org, d);
	v_status text := coalesce(d->>'status', 'confirmed');
	v_booker jsonb := d->'booker';
	v_att jsonb;
	r record;
	v_ids text[];
BEGIN
	PERFORM rd.lock_key(p_org, 'booking:' || v_bid);
	SELECT * INTO v_prev FROM rd.bookings b WHERE b.org = p_org AND b.booking_id = v_bid
	   FOR UPDATE;
	IF FOUND AND v_version <= v_prev.version THEN
		RETURN 'stale';
	END IF;
	SELECT * INTO v_offer FROM rd.offers f WHERE f.org = p_org AND f.offer_id = d->>'offer_id';
	IF NOT FOUND THEN
		PERFORM rd.wait(format('offer %s not yet seen', d->>'offer_id'));
	END IF;

	SELECT * INTO r FROM rd.match_person(p_org, v_booker, v_sync, p_id, v_prev.contact_id,
					     v_prev.email, v_prev.match, v_offer.email_change,
					     format('booker of booking %s', v_bid));
	INSERT INTO rd.bookings AS b (org, booking_id, offer_id, number, status, version, contact_id,
				      email, match, booker, total, currency, message_id)
	VALUES (p_org, v_bid, d->>'offer_id', d->>'number', v_status, v_version, r.contact_id,
		coalesce(v_booker->>'email', v_booker->>'email_given'), r.match, v_booker,
		(d->>'total')::bigint, coalesce(d->>'currency', v_offer.currency), p_id)
	ON CONFLICT (org, booking_id) DO UPDATE SET
		offer_id = EXCLUDED.offer_id,
		number = coalesce(EXCLUDED.number, b.number),
		status = EXCLUDED.status,
		version = EXCLUDED.version,
		contact_id = EXCLUDED.contact_id,
		email = EXCLUDED.email,
		match = EXCLUDED.match,
		booker = EXCLUDED.booker,
		total = coalesce(EXCLUDED.total, b.total),
		currency = coalesce(EXCLUDED.currency, b.currency),
		message_id = p_id,
		updated_at = now();
	IF r.contact_id IS NOT NULL THEN
		PERFORM rd.activity_add(p_org, r.contact_id,
			CASE WHEN v_prev.booking_id IS NULL THEN 'booking' ELSE 'booking.changed' END,
			format('booking %s %s (%s, offer %s, version %s)', coalesce(d->>'number', v_bid),
			       CASE WHEN v_prev.booking_id IS NULL THEN 'made' ELSE 'changed' END,
			       v_status, d->>'offer_id', v_version),
			p_id);
	END IF;

	v_ids := '{}';
	FOR v_att IN SELECT * FROM jsonb_array_elements(coalesce(d->'attendees', '[]')) LOOP
		PERFORM rd.attendee_apply(p_org, v_bid, v_att, v_status, v_version, v_sync,
					  v_offer.email_change, p_id);
		v_ids := v_ids || (v_att->>'attendee_id');
	END LOOP;
	-- a full booking message lists all attendees: the others left it
	IF d ? 'attendees' THEN
		UPDATE rd.attendees x SET status = 'cancelled', version = v_version
		 WHERE x.org = p_org AND x.booking_id = v_bid AND NOT (x.attendee_id = ANY (v_ids))
		   AND x.status <> 'cancelled';
	END IF;
	RETURN 'applied';
END $$;

CREATE FUNCTION rd.h_attendee_updated(p_org text, p_id text, p_at timestamptz, d jsonb)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	v_bid text := d->>'booking_id';
	v_version integer := (d->>'version')::integer;
	v_prev rd.bookings%ROWTYPE;
	v_change text;
BEGIN
	PERFORM rd.lock_key(p_org, 'booking:' || v_bid);
	SELECT * INTO v_prev FROM rd.bookings b WHERE b.org = p_org AND b.booking_id = v_bid
	   FOR UPDATE;
	IF FOUND AND v_version <= v_prev.version THEN
		RETURN 'stale';
	END IF;
	IF NOT FOUND THEN
		-- created from the message: the booking holds this attendee only
		INSERT INTO rd.bookings (org, booking_id, status, version, message_id)
		VALUES (p_org, v_bid, 'confirmed', v_version, p_id);
		v_prev.status := 'confirmed';
	ELSE
		UPDATE rd.bookings SET version = v_version, updated_at = now(), message_id = p_id
		 WHERE org = p_org AND booking_id = v_bid;
		SELECT f.email_change INTO v_change FROM rd.offers f
		 WHERE f.org = p_org AND f.offer_id = v_prev.offer_id;
	END IF;
	PERFORM rd.attendee_apply(p_org, v_bid, d->'attendee', v_prev.status, v_version,
				  rd.sync_on(p_org, d), v_change, p_id);
	RETURN 'applied';
END $$;

CREATE FUNCTION rd.h_booking_cancelled(p_org text, p_id text, p_at timestamptz, d jsonb)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	v_bid text := d->>'booking_id';
	v_version integer := (d->>'version')::integer;
	v_prev rd.bookings%ROWTYPE;
	v_cid uuid;
BEGIN
	PERFORM rd.lock_key(p_org, 'booking:' || v_bid);
	SELECT * INTO v_prev FROM rd.bookings b WHERE b.org = p_org AND b.booking_id = v_bid
	   FOR UPDATE;
	IF NOT FOUND THEN
		PERFORM rd.wait(format('booking %s not yet seen', v_bid));
	END IF;
	IF v_version <= v_prev.version THEN
		RETURN 'stale';
	END IF;
	UPDATE rd.bookings SET status = 'cancelled', version = v_version, updated_at = now(),
			       message_id = p_id
	 WHERE org = p_org AND booking_id = v_bid;
	UPDATE rd.attendees SET status = 'cancelled', version = v_version
	 WHERE org = p_org AND booking_id = v_bid;
	FOR v_cid IN
		SELECT v_prev.contact_id WHERE v_prev.contact_id IS NOT NULL
		UNION
		SELECT x.contact_id FROM rd.attendees x
		 WHERE x.org = p_org AND x.booking_id = v_bid AND x.contact_id IS NOT NULL
	LOOP
		PERFORM rd.activity_add(p_org, v_cid, 'booking.cancelled',
			format('booking %s cancelled%s', coalesce(v_prev.number, v_bid),
			       coalesce(': ' || (d->>'reason'), '')),
			p_id);
	END LOOP;
	RETURN 'applied';
END $$;

CREATE FUNCTION rd.h_booking_created(p_org text, p_id text, p_at timestamptz, d jsonb)
RETURNS text LANGUAGE sql AS $$ SELECT rd.h_booking_upsert(p_org, p_id, p_at, d, 'booking.created') $$;
CREATE FUNCTION rd.h_booking_updated(p_org text, p_id text, p_at timestamptz, d jsonb)
RETURNS text LANGUAGE sql AS $$ SELECT rd.h_booking_upsert(p_org, p_id, p_at, d, 'booking.updated') $$;

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
