-- 0005_merge: admin tools of Step 5, part A (SPEC 4.1 duplicate candidates,
-- 4.7 duplicates and merge, 4.7a): the merge of two contacts (the
-- contact.merged handler and rosterctl merge run the same function), the
-- merge journal and unmerge, the duplicate search and the typo-tolerant
-- contact search (pg_trgm). docs/admin.md states the rules as implemented.
--
-- Serialisation: a merge locks both contacts' keys ("<org>/contact:<uuid>",
-- which a batch holding the message has already taken in its sorted order)
-- and their emails' keys (the count of live contacts with an email changes
-- when one becomes a tombstone), then both contact rows FOR UPDATE in id
-- order, the same order as rd.ledger_move_contact. A message that inserts a
-- row referencing either contact (FOR KEY SHARE) waits for the merge, so no
-- row of drop can appear between the journal and the move.

CREATE EXTENSION IF NOT EXISTS pg_trgm;

-- "first last", lower-case, for the name search and similar-name pairs.
CREATE FUNCTION rd.contact_name(p_first text, p_last text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
	SELECT nullif(lower(btrim(coalesce(p_first, '') || ' ' || coalesce(p_last, ''))), '')
$$;

-- Digits of a phone number (and a leading +), for comparing phones written
-- differently ("+41 44 123 45 67" = "+41441234567").
CREATE FUNCTION rd.phone_key(p text) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
	SELECT nullif(regexp_replace(coalesce(p, ''), '[^0-9+]', '', 'g'), '')
$$;

CREATE INDEX contacts_name_trgm ON rd.contacts
	USING gin (rd.contact_name(first_name, last_name) gin_trgm_ops)
	WHERE merged_into IS NULL;
CREATE INDEX contacts_last_name ON rd.contacts (org, lower(last_name)) WHERE merged_into IS NULL;
CREATE INDEX contacts_first_name ON rd.contacts (org, lower(first_name)) WHERE merged_into IS NULL;
CREATE INDEX contacts_email_trgm ON rd.contacts USING gin (email gin_trgm_ops)
	WHERE merged_into IS NULL;
CREATE INDEX contacts_company_trgm ON rd.contacts USING gin (lower(company) gin_trgm_ops)
	WHERE merged_into IS NULL;
CREATE INDEX contacts_name_eq ON rd.contacts (org, rd.contact_name(first_name, last_name))
	WHERE merged_into IS NULL;
CREATE INDEX contacts_merged_into ON rd.contacts (org, merged_into)
	WHERE merged_into IS NOT NULL;

-- ---- the merge journal ------------------------------------------------------

-- One row per merge. keep_before/drop_before: the contact rows before the
-- merge, keep_after/drop_after: as the merge left them (to_jsonb of
-- rd.contacts), so that unmerge can restore them exactly when nothing
-- changed them since. message_id: the contact.merged message, NULL for
-- rosterctl merge. unmerged_at: set by rosterctl unmerge (a merge is undone
-- once).
CREATE TABLE rd.merges (
	org          text        NOT NULL,
	merge_id     bigint      GENERATED ALWAYS AS IDENTITY,
	keep_id      uuid        NOT NULL,
	drop_id      uuid        NOT NULL,
	message_id   text,
	by           text        NOT NULL,   -- 'message' or 'rosterctl'
	at           timestamptz NOT NULL DEFAULT now(),
	keep_before  jsonb       NOT NULL,
	drop_before  jsonb       NOT NULL,
	keep_after   jsonb,
	drop_after   jsonb,
	summary      jsonb,                  -- rows moved per table, fields filled
	unmerged_at  timestamptz,
	PRIMARY KEY (org, merge_id),
	FOREIGN KEY (org, keep_id) REFERENCES rd.contacts (org, contact_id),
	FOREIGN KEY (org, drop_id) REFERENCES rd.contacts (org, contact_id)
);
CREATE INDEX merges_keep ON rd.merges (org, keep_id);
CREATE INDEX merges_drop ON rd.merges (org, drop_id);

-- Every row the merge moved from drop to keep: the table and the row's
-- primary key after org.
CREATE TABLE rd.merge_moves (
	org       text    NOT NULL,
	merge_id  bigint  NOT NULL,
	tbl       text    NOT NULL CHECK (tbl IN ('bookings', 'attendees', 'invoices',
					      'transactions', 'outbox', 'notes', 'activity',
					      'field_history')),
	row_key   text[]  NOT NULL,
	PRIMARY KEY (org, merge_id, tbl, row_key),
	FOREIGN KEY (org, merge_id) REFERENCES rd.merges (org, merge_id)
);

-- Every value of keep the merge filled from drop: field is a person key,
-- "fields.KEY" or "tags"; old and new as jsonb (old NULL: it was empty).
CREATE TABLE rd.merge_fills (
	org        text    NOT NULL,
	merge_id   bigint  NOT NULL,
	field      text    NOT NULL,
	old_value  jsonb,
	new_value  jsonb   NOT NULL,
	PRIMARY KEY (org, merge_id, field),
	FOREIGN KEY (org, merge_id) REFERENCES rd.merges (org, merge_id)
);

-- The columns a merge writes on a contact (and unmerge restores).
CREATE FUNCTION rd.merge_cols(p jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
	SELECT jsonb_build_object(
		'email', p->'email', 'first_name', p->'first_name', 'last_name', p->'last_name',
		'company', p->'company', 'language', p->'language', 'phone', p->'phone',
		'street', p->'street', 'zip', p->'zip', 'city', p->'city', 'country', p->'country',
		'birthdate', p->'birthdate', 'fields', p->'fields', 'tags', p->'tags',
		'value_at', p->'value_at', 'merged_into', p->'merged_into',
		'erased', p->'erased', 'message_id', p->'message_id',
		'updated_at', p->'updated_at')
$$;

-- Write the merge columns of a contact from a to_jsonb(rd.contacts) image.
CREATE FUNCTION rd.merge_write_contact(p_org text, p_cid uuid, p jsonb) RETURNS void
LANGUAGE sql AS $$
	UPDATE rd.contacts c SET
		(email, first_name, last_name, company, language, phone, street, zip, city,
		 country, birthdate, fields, tags, value_at, merged_into, message_id, updated_at) =
		(SELECT r.email, r.first_name, r.last_name, r.company, r.language, r.phone,
			r.street, r.zip, r.city, r.country, r.birthdate, r.fields, r.tags,
			r.value_at, r.merged_into, r.message_id, r.updated_at
		   FROM jsonb_populate_record(NULL::rd.contacts, p) r)
	 WHERE c.org = p_org AND c.contact_id = p_cid
$$;

CREATE FUNCTION rd.contact_image(p_org text, p_cid uuid) RETURNS jsonb
LANGUAGE sql STABLE AS $$
	SELECT to_jsonb(c) FROM rd.contacts c WHERE c.org = p_org AND c.contact_id = p_cid
$$;

-- Take the merge's locks: the contacts' and their emails' keys in one
-- sorted order, then both rows FOR UPDATE in id order.
CREATE FUNCTION rd.merge_lock(p_org text, p_a uuid, p_b uuid) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
	PERFORM rd.lock_keys(ARRAY[p_org || '/contact:' || p_a, p_org || '/contact:' || p_b]
		|| ARRAY(SELECT p_org || '/email:' || c.email FROM rd.contacts c
			  WHERE c.org = p_org AND c.contact_id IN (p_a, p_b) AND c.email IS NOT NULL));
	PERFORM 1 FROM rd.contacts c
	 WHERE c.org = p_org AND c.contact_id IN (p_a, p_b)
	 ORDER BY c.contact_id FOR UPDATE;
END $$;

-- ---- merge --------------------------------------------------------------------

-- SPEC 4.7: merge contact p_drop into p_keep (both ids of this
-- organisation, as given: a tombstone keep resolves to its keeping
-- contact). Everything of drop moves to keep: bookings (as booker),
-- attendances, invoices and transactions (rd.ledger_move_contact: balances
-- per currency add up, no sum changes), outbox rows (rd.outbox_move_contact),
-- notes, activity and field history; keep's non-empty values win, its empty
-- ones are filled from drop (with drop's value_at stamps), tags are the
-- union. drop stays as a tombstone (merged_into = keep). Every row moved and
-- every value filled is journaled (rd.merge_moves, rd.merge_fills), so that
-- rd.contact_unmerge can undo it. Rejects (rd.reject) unknown, erased or
-- identical contacts and a drop already merged. p_msg: the contact.merged
-- message, NULL from rosterctl (p_by). Returns a summary (jsonb) with the
-- merge_id.
CREATE FUNCTION rd.contact_merge(p_org text, p_keep text, p_drop text, p_msg text, p_by text)
RETURNS jsonb LANGUAGE plpgsql AS $$
DECLARE
	v_keep uuid := rd.contact_resolve(p_org, p_keep);
	v_drop uuid := rd.as_uuid(p_drop);
	v_k jsonb;
	v_d jsonb;
	v_new jsonb;
	v_fields jsonb;
	v_stamps jsonb;
	v_tags text[];
	v_mid bigint;
	v_key text;
	v_val jsonb;
	v_filled text[] := '{}';
	v_moved jsonb := '{}';
	v_n integer;
	v_summary jsonb;
BEGIN
	IF v_keep IS NULL THEN
		PERFORM rd.wait(format('contact %s not yet seen', p_keep));
	END IF;
	v_d := rd.contact_image(p_org, v_drop);
	IF v_d IS NULL THEN
		PERFORM rd.wait(format('contact %s not yet seen', p_drop));
	END IF;
	PERFORM rd.merge_lock(p_org, v_keep, v_drop);
	v_k := rd.contact_image(p_org, v_keep);
	v_d := rd.contact_image(p_org, v_drop);
	IF v_keep = v_drop THEN
		PERFORM rd.reject(format('keep and drop are the same contact%s',
			CASE WHEN lower(p_keep) <> v_drop::text
			     THEN format(' (%s is merged into %s)', p_keep, v_drop) ELSE '' END));
	END IF;
	IF v_d->>'merged_into' IS NOT NULL THEN
		PERFORM rd.reject(format('contact %s is already merged into %s', v_drop,
					 rd.contact_resolve(p_org, v_drop::text)));
	END IF;
	IF (v_k->>'erased')::boolean OR (v_d->>'erased')::boolean THEN
		PERFORM rd.reject(format('contact %s is erased: an erased contact is not merged',
					 CASE WHEN (v_k->>'erased')::boolean THEN v_keep ELSE v_drop END));
	END IF;
	PERFORM set_config('rd.org', p_org, true);

	INSERT INTO rd.merges (org, keep_id, drop_id, message_id, by, at, keep_before, drop_before)
	VALUES (p_org, v_keep, v_drop, p_msg, p_by, rd.msg_at(p_org, p_msg), v_k, v_d)
	RETURNING merge_id INTO v_mid;

	-- the rows of drop, journaled as they move
	WITH m AS (UPDATE rd.bookings SET contact_id = v_keep
		    WHERE org = p_org AND contact_id = v_drop RETURNING booking_id)
	INSERT INTO rd.merge_moves (org, merge_id, tbl, row_key)
	SELECT p_org, v_mid, 'bookings', ARRAY[booking_id] FROM m;
	GET DIAGNOSTICS v_n = ROW_COUNT;
	v_moved := v_moved || jsonb_build_object('bookings', v_n);

	WITH m AS (UPDATE rd.attendees SET contact_id = v_keep
		    WHERE org = p_org AND contact_id = v_drop RETURNING booking_id, attendee_id)
	INSERT INTO rd.merge_moves (org, merge_id, tbl, row_key)
	SELECT p_org, v_mid, 'attendees', ARRAY[booking_id, attendee_id] FROM m;
	GET DIAGNOSTICS v_n = ROW_COUNT;
	v_moved := v_moved || jsonb_build_object('attendances', v_n);

	-- the ledger moves through its own helper (the only way its
	-- append-only guard lets contact_id change): journal first
	INSERT INTO rd.merge_moves (org, merge_id, tbl, row_key)
	SELECT p_org, v_mid, 'invoices', ARRAY[i.invoice_id] FROM rd.invoices i
	 WHERE i.org = p_org AND i.contact_id = v_drop;
	GET DIAGNOSTICS v_n = ROW_COUNT;
	v_moved := v_moved || jsonb_build_object('invoices', v_n);
	INSERT INTO rd.merge_moves (org, merge_id, tbl, row_key)
	SELECT p_org, v_mid, 'transactions', ARRAY[t.transaction_id] FROM rd.transactions t
	 WHERE t.org = p_org AND t.contact_id = v_drop;
	GET DIAGNOSTICS v_n = ROW_COUNT;
	v_moved := v_moved || jsonb_build_object('transactions', v_n);
	PERFORM rd.ledger_move_contact(p_org, v_drop, v_keep);

	INSERT INTO rd.merge_moves (org, merge_id, tbl, row_key)
	SELECT p_org, v_mid, 'outbox', ARRAY[o.outbox_id::text] FROM rd.outbox o
	 WHERE o.org = p_org AND o.contact_id = v_drop;
	GET DIAGNOSTICS v_n = ROW_COUNT;
	v_moved := v_moved || jsonb_build_object('mails', v_n);
	PERFORM rd.outbox_move_contact(p_org, v_drop, v_keep);

	WITH m AS (UPDATE rd.notes SET contact_id = v_keep
		    WHERE org = p_org AND contact_id = v_drop RETURNING note_id)
	INSERT INTO rd.merge_moves (org, merge_id, tbl, row_key)
	SELECT p_org, v_mid, 'notes', ARRAY[note_id::text] FROM m;
	GET DIAGNOSTICS v_n = ROW_COUNT;
	v_moved := v_moved || jsonb_build_object('notes', v_n);

	WITH m AS (UPDATE rd.activity SET contact_id = v_keep
		    WHERE org = p_org AND contact_id = v_drop RETURNING activity_id)
	INSERT INTO rd.merge_moves (org, merge_id, tbl, row_key)
	SELECT p_org, v_mid, 'activity', ARRAY[activity_id::text] FROM m;
	GET DIAGNOSTICS v_n = ROW_COUNT;
	v_moved := v_moved || jsonb_build_object('activity', v_n);

	WITH m AS (UPDATE rd.field_history SET contact_id = v_keep
		    WHERE org = p_org AND contact_id = v_drop RETURNING history_id)
	INSERT INTO rd.merge_moves (org, merge_id, tbl, row_key)
	SELECT p_org, v_mid, 'field_history', ARRAY[history_id::text] FROM m;
	GET DIAGNOSTICS v_n = ROW_COUNT;
	v_moved := v_moved || jsonb_build_object('field_history', v_n);

	-- values: keep's non-empty ones win, its empty ones are filled
	v_new := v_k;
	v_fields := coalesce(v_k->'fields', '{}');
	v_stamps := coalesce(v_k->'value_at', '{}');
	FOREACH v_key IN ARRAY rd.person_keys() LOOP
		v_val := v_d->v_key;
		IF coalesce(v_k->>v_key, '') = '' AND coalesce(v_val #>> '{}', '') <> '' THEN
			v_new := jsonb_set(v_new, ARRAY[v_key], v_val);
			IF v_d->'value_at' ? v_key THEN
				v_stamps := jsonb_set(v_stamps, ARRAY[v_key], v_d->'value_at'->v_key);
			END IF;
			INSERT INTO rd.merge_fills (org, merge_id, field, old_value, new_value)
			VALUES (p_org, v_mid, v_key, NULL, v_val);
			PERFORM rd.history_add(p_org, v_keep, v_key, v_k->>v_key, v_val #>> '{}', p_msg);
			v_filled := v_filled || v_key;
		END IF;
	END LOOP;
	FOR v_key, v_val IN SELECT f.key, f.value FROM jsonb_each(coalesce(v_d->'fields', '{}')) f
			     ORDER BY f.key LOOP
		IF jsonb_typeof(v_val) <> 'null' AND v_val <> '""'::jsonb
		   AND (NOT v_fields ? v_key OR jsonb_typeof(v_fields->v_key) = 'null'
			OR v_fields->v_key = '""'::jsonb) THEN
			INSERT INTO rd.merge_fills (org, merge_id, field, old_value, new_value)
			VALUES (p_org, v_mid, 'fields.' || v_key, v_fields->v_key, v_val);
			PERFORM rd.history_add(p_org, v_keep, 'fields.' || v_key,
					       v_fields->>v_key, v_val #>> '{}', p_msg);
			v_fields := jsonb_set(v_fields, ARRAY[v_key], v_val);
			IF v_d->'value_at' ? ('fields.' || v_key) THEN
				v_stamps := jsonb_set(v_stamps, ARRAY['fields.' || v_key],
						      v_d->'value_at'->('fields.' || v_key));
			END IF;
			v_filled := v_filled || ('fields.' || v_key);
		END IF;
	END LOOP;
	SELECT coalesce(array_agg(DISTINCT t ORDER BY t), '{}') INTO v_tags
	  FROM (SELECT jsonb_array_elements_text(v_k->'tags') AS t
		UNION SELECT jsonb_array_elements_text(v_d->'tags')) s;
	IF to_jsonb(v_tags) <> v_k->'tags' THEN
		INSERT INTO rd.merge_fills (org, merge_id, field, old_value, new_value)
		VALUES (p_org, v_mid, 'tags', v_k->'tags', to_jsonb(v_tags));
		PERFORM rd.history_add(p_org, v_keep, 'tags',
			(SELECT string_agg(t, ',') FROM jsonb_array_elements_text(v_k->'tags') t),
			array_to_string(v_tags, ','), p_msg);
		v_filled := v_filled || 'tags'::text;
	END IF;
	v_new := v_new || jsonb_build_object('fields', v_fields, 'tags', to_jsonb(v_tags),
					     'value_at', v_stamps,
					     'message_id', coalesce(p_msg, v_k->>'message_id'),
					     'updated_at', now());
	PERFORM rd.merge_write_contact(p_org, v_keep, v_new);
	PERFORM rd.merge_write_contact(p_org, v_drop, v_d || jsonb_build_object(
		'merged_into', v_keep, 'message_id', coalesce(p_msg, v_d->>'message_id'),
		'updated_at', now()));

	v_summary := jsonb_build_object('merge_id', v_mid, 'org', p_org, 'keep', v_keep,
					'drop', v_drop, 'moved', v_moved,
					'filled', to_jsonb(v_filled));
	PERFORM rd.activity_add(p_org, v_keep, 'contact.merged',
		format('contact %s merged into this one (merge %s%s): moved %s; filled: %s', v_drop,
		       v_mid, CASE WHEN p_msg IS NULL THEN ', by rosterctl' ELSE '' END,
		       coalesce((SELECT string_agg(format('%s %s', value, key), ', ' ORDER BY key)
				   FROM jsonb_each(v_moved) WHERE value <> '0'), 'nothing'),
		       coalesce(nullif(array_to_string(v_filled, ', '), ''), '-')),
		p_msg);
	PERFORM rd.activity_add(p_org, v_drop, 'contact.merged',
		format('merged into contact %s (merge %s%s)', v_keep, v_mid,
		       CASE WHEN p_msg IS NULL THEN ', by rosterctl' ELSE '' END), p_msg);
	UPDATE rd.merges SET keep_after = rd.contact_image(p_org, v_keep),
			     drop_after = rd.contact_image(p_org, v_drop), summary = v_summary
	 WHERE org = p_org AND merge_id = v_mid;
	RETURN v_summary;
END $$;

-- contact.merged: keep and drop (validated UUIDs, not equal: handlers.c).
CREATE FUNCTION rd.h_contact_merged(p_org text, p_id text, p_at timestamptz, d jsonb)
RETURNS text LANGUAGE plpgsql AS $$
BEGIN
	PERFORM rd.contact_merge(p_org, d->>'keep', d->>'drop', p_id, 'message');
	RETURN 'applied';
END $$;

INSERT INTO rd.handler_fns (type, fn) VALUES ('contact.merged', 'rd.h_contact_merged')
ON CONFLICT (type) DO UPDATE SET fn = EXCLUDED.fn;
SELECT rd.rebuild_dispatch();

-- rosterctl merge: the same merge in the statement's own transaction;
-- rejections become errors with their reason (no message to wait).
CREATE FUNCTION rd.admin_merge(p_org text, p_keep text, p_drop text) RETURNS jsonb
LANGUAGE plpgsql AS $$
BEGIN
	IF rd.as_uuid(p_keep) IS NULL OR rd.as_uuid(p_drop) IS NULL THEN
		RAISE EXCEPTION USING ERRCODE = 'RDREJ', MESSAGE = 'contact ids are UUIDs';
	END IF;
	IF rd.contact_resolve(p_org, p_keep) IS NULL THEN
		RAISE EXCEPTION USING ERRCODE = 'RDREJ',
			MESSAGE = format('contact %s is unknown in organisation %s', p_keep, p_org);
	END IF;
	IF rd.contact_resolve(p_org, p_drop) IS NULL THEN
		RAISE EXCEPTION USING ERRCODE = 'RDREJ',
			MESSAGE = format('contact %s is unknown in organisation %s', p_drop, p_org);
	END IF;
	RETURN rd.contact_merge(p_org, lower(p_keep), lower(p_drop), NULL, 'rosterctl');
END $$;

-- ---- unmerge --------------------------------------------------------------------

-- Undo merge p_mid: the journaled rows that still belong to keep go back to
-- drop, drop is live again, and keep gets back its values. When neither
-- contact changed since the merge, both rows are restored exactly as they
-- were (report rows byte-identical); when keep changed since (a later
-- message naming drop or keep), only the filled values it still holds are
-- emptied again and rows that arrived after the merge stay with keep.
-- Refused: unknown or already undone merges, and a later merge (not undone)
-- of either contact: undo that first. Returns a summary.
CREATE FUNCTION rd.admin_unmerge(p_org text, p_mid bigint) RETURNS jsonb
LANGUAGE plpgsql AS $$
DECLARE
	m rd.merges%ROWTYPE;
	v_k jsonb;
	v_d jsonb;
	v_new jsonb;
	v_later bigint;
	v_back jsonb := '{}';
	v_n integer;
	v_exact boolean;
	f record;
	v_cur jsonb;
	v_reverted text[] := '{}';
	v_kept text[] := '{}';
	v_summary jsonb;
BEGIN
	SELECT * INTO m FROM rd.merges WHERE org = p_org AND merge_id = p_mid;
	IF NOT FOUND THEN
		RAISE EXCEPTION USING ERRCODE = 'RDREJ',
			MESSAGE = format('merge %s is unknown in organisation %s', p_mid, p_org);
	END IF;
	PERFORM rd.merge_lock(p_org, m.keep_id, m.drop_id);
	SELECT * INTO m FROM rd.merges WHERE org = p_org AND merge_id = p_mid FOR UPDATE;
	IF m.unmerged_at IS NOT NULL THEN
		RAISE EXCEPTION USING ERRCODE = 'RDREJ',
			MESSAGE = format('merge %s was already undone at %s', p_mid, m.unmerged_at);
	END IF;
	SELECT x.merge_id INTO v_later FROM rd.merges x
	 WHERE x.org = p_org AND x.merge_id > p_mid AND x.unmerged_at IS NULL
	   AND (x.keep_id IN (m.keep_id, m.drop_id) OR x.drop_id IN (m.keep_id, m.drop_id))
	 ORDER BY x.merge_id DESC LIMIT 1;
	IF FOUND THEN
		RAISE EXCEPTION USING ERRCODE = 'RDREJ',
			MESSAGE = format('merge %s involves the same contacts and came later: '
					 'undo it first (rosterctl unmerge %s)', v_later, v_later);
	END IF;
	v_k := rd.contact_image(p_org, m.keep_id);
	v_d := rd.contact_image(p_org, m.drop_id);
	IF (v_k->>'erased')::boolean OR (v_d->>'erased')::boolean THEN
		RAISE EXCEPTION USING ERRCODE = 'RDREJ',
			MESSAGE = format('merge %s cannot be undone: a contact was erased since', p_mid);
	END IF;
	PERFORM set_config('rd.org', p_org, true);

	-- rows back to drop, those that are still keep's
	UPDATE rd.bookings b SET contact_id = m.drop_id FROM rd.merge_moves j
	 WHERE j.org = p_org AND j.merge_id = p_mid AND j.tbl = 'bookings'
	   AND b.org = p_org AND b.booking_id = j.row_key[1] AND b.contact_id = m.keep_id;
	GET DIAGNOSTICS v_n = ROW_COUNT;
	v_back := v_back || jsonb_build_object('bookings', v_n);
	UPDATE rd.attendees a SET contact_id = m.drop_id FROM rd.merge_moves j
	 WHERE j.org = p_org AND j.merge_id = p_mid AND j.tbl = 'attendees'
	   AND a.org = p_org AND a.booking_id = j.row_key[1] AND a.attendee_id = j.row_key[2]
	   AND a.contact_id = m.keep_id;
	GET DIAGNOSTICS v_n = ROW_COUNT;
	v_back := v_back || jsonb_build_object('attendances', v_n);
	-- the ledger's guard lets contact_id (and nothing else) change while
	-- rd.ledger_move is on, as in rd.ledger_move_contact
	PERFORM set_config('rd.ledger_move', 'on', true);
	UPDATE rd.invoices i SET contact_id = m.drop_id, updated_at = now() FROM rd.merge_moves j
	 WHERE j.org = p_org AND j.merge_id = p_mid AND j.tbl = 'invoices'
	   AND i.org = p_org AND i.invoice_id = j.row_key[1] AND i.contact_id = m.keep_id;
	GET DIAGNOSTICS v_n = ROW_COUNT;
	v_back := v_back || jsonb_build_object('invoices', v_n);
	UPDATE rd.transactions t SET contact_id = m.drop_id FROM rd.merge_moves j
	 WHERE j.org = p_org AND j.merge_id = p_mid AND j.tbl = 'transactions'
	   AND t.org = p_org AND t.transaction_id = j.row_key[1] AND t.contact_id = m.keep_id;
	GET DIAGNOSTICS v_n = ROW_COUNT;
	v_back := v_back || jsonb_build_object('transactions', v_n);
	PERFORM set_config('rd.ledger_move', 'off', true);
	UPDATE rd.outbox o SET contact_id = m.drop_id, updated_at = now() FROM rd.merge_moves j
	 WHERE j.org = p_org AND j.merge_id = p_mid AND j.tbl = 'outbox'
	   AND o.org = p_org AND o.outbox_id = j.row_key[1]::bigint AND o.contact_id = m.keep_id;
	GET DIAGNOSTICS v_n = ROW_COUNT;
	v_back := v_back || jsonb_build_object('mails', v_n);
	UPDATE rd.notes x SET contact_id = m.drop_id FROM rd.merge_moves j
	 WHERE j.org = p_org AND j.merge_id = p_mid AND j.tbl = 'notes'
	   AND x.org = p_org AND x.note_id = j.row_key[1]::bigint AND x.contact_id = m.keep_id;
	GET DIAGNOSTICS v_n = ROW_COUNT;
	v_back := v_back || jsonb_build_object('notes', v_n);
	UPDATE rd.activity x SET contact_id = m.drop_id FROM rd.merge_moves j
	 WHERE j.org = p_org AND j.merge_id = p_mid AND j.tbl = 'activity'
	   AND x.org = p_org AND x.activity_id = j.row_key[1]::bigint AND x.contact_id = m.keep_id;
	GET DIAGNOSTICS v_n = ROW_COUNT;
	v_back := v_back || jsonb_build_object('activity', v_n);
	UPDATE rd.field_history x SET contact_id = m.drop_id FROM rd.merge_moves j
	 WHERE j.org = p_org AND j.merge_id = p_mid AND j.tbl = 'field_history'
	   AND x.org = p_org AND x.history_id = j.row_key[1]::bigint AND x.contact_id = m.keep_id;
	GET DIAGNOSTICS v_n = ROW_COUNT;
	v_back := v_back || jsonb_build_object('field_history', v_n);

	-- keep's values
	v_exact := rd.merge_cols(v_k) = rd.merge_cols(m.keep_after);
	IF v_exact THEN
		PERFORM rd.merge_write_contact(p_org, m.keep_id, m.keep_before);
	ELSE
		v_new := v_k;
		FOR f IN SELECT * FROM rd.merge_fills
			  WHERE org = p_org AND merge_id = p_mid ORDER BY field LOOP
			IF f.field = 'tags' THEN
				-- the tags drop brought, unless keep had them anyway
				SELECT to_jsonb(coalesce(array_agg(t ORDER BY t), '{}')) INTO v_cur
				  FROM jsonb_array_elements_text(v_new->'tags') t
				 WHERE f.old_value ? t OR NOT f.new_value ? t;
				IF v_cur <> v_new->'tags' THEN
					v_new := jsonb_set(v_new, '{tags}', v_cur);
					v_reverted := v_reverted || f.field;
				END IF;
			ELSIF f.field LIKE 'fields.%' THEN
				IF v_new->'fields'->substr(f.field, 8) = f.new_value THEN
					v_new := jsonb_set(v_new, '{fields}',
						(v_new->'fields') - substr(f.field, 8));
					v_new := jsonb_set(v_new, '{value_at}',
						coalesce(v_new->'value_at', '{}') - f.field);
					v_reverted := v_reverted || f.field;
				ELSE
					v_kept := v_kept || f.field;
				END IF;
			ELSIF v_new->f.field = f.new_value THEN
				v_new := jsonb_set(v_new, ARRAY[f.field], 'null');
				v_new := jsonb_set(v_new, '{value_at}',
					coalesce(v_new->'value_at', '{}') - f.field);
				v_reverted := v_reverted || f.field;
			ELSE
				v_kept := v_kept || f.field;
			END IF;
		END LOOP;
		v_new := v_new || jsonb_build_object('updated_at', now());
		PERFORM rd.merge_write_contact(p_org, m.keep_id, v_new);
	END IF;
	-- field history of the values given back
	FOR f IN SELECT * FROM rd.merge_fills
		  WHERE org = p_org AND merge_id = p_mid ORDER BY field LOOP
		IF v_exact OR f.field = ANY (v_reverted) THEN
			IF f.field = 'tags' THEN
				PERFORM rd.history_add(p_org, m.keep_id, 'tags',
					(SELECT string_agg(t, ',') FROM jsonb_array_elements_text(v_k->'tags') t),
					(SELECT string_agg(t, ',') FROM jsonb_array_elements_text(
						rd.contact_image(p_org, m.keep_id)->'tags') t), NULL);
			ELSE
				PERFORM rd.history_add(p_org, m.keep_id, f.field, f.new_value #>> '{}',
						       f.old_value #>> '{}', NULL);
			END IF;
		END IF;
	END LOOP;
	-- drop: live again, exactly as it was unless it changed since
	IF rd.merge_cols(v_d) = rd.merge_cols(m.drop_after) THEN
		PERFORM rd.merge_write_contact(p_org, m.drop_id, m.drop_before);
	ELSE
		PERFORM rd.merge_write_contact(p_org, m.drop_id, v_d || jsonb_build_object(
			'merged_into', NULL, 'updated_at', now()));
	END IF;

	UPDATE rd.merges SET unmerged_at = now() WHERE org = p_org AND merge_id = p_mid;
	v_summary := jsonb_build_object('merge_id', p_mid, 'org', p_org, 'keep', m.keep_id,
		'drop', m.drop_id, 'moved_back', v_back, 'exact', v_exact,
		'emptied', to_jsonb(CASE WHEN v_exact THEN ARRAY(SELECT field FROM rd.merge_fills
			WHERE org = p_org AND merge_id = p_mid ORDER BY field) ELSE v_reverted END),
		'kept', to_jsonb(v_kept));
	PERFORM rd.activity_add(p_org, m.keep_id, 'contact.unmerged',
		format('merge %s undone by rosterctl: contact %s is separate again%s', p_mid,
		       m.drop_id, CASE WHEN cardinality(v_kept) > 0
				       THEN format('; kept changed values: %s',
						   array_to_string(v_kept, ', '))
				       ELSE '' END), NULL);
	PERFORM rd.activity_add(p_org, m.drop_id, 'contact.unmerged',
		format('merge %s undone by rosterctl: no longer merged into contact %s', p_mid,
		       m.keep_id), NULL);
	RETURN v_summary;
END $$;

-- ---- duplicates and search ---------------------------------------------------------

-- SPEC 4.7: candidate pairs of live contacts (not merged, not erased) of an
-- organisation, with a score (0..100) and the reasons, best first:
--   same email                                      50
--   same name and same phone / birthdate / postcode  40 / 40 / 25 each
--   similar names (trigram similarity >= 0.5)        similarity x 30
--   recorded by matching (4.1 created_ambiguous)     10
-- summed and capped at 100. contact_a is the older contact of the pair.
CREATE FUNCTION rd.duplicates(p_org text, p_limit integer)
RETURNS TABLE (contact_a uuid, contact_b uuid, score integer, reasons text[])
LANGUAGE sql STABLE AS $$
	WITH live AS (
		SELECT c.contact_id, c.email, rd.contact_name(c.first_name, c.last_name) AS name,
		       rd.phone_key(c.phone) AS phone, c.birthdate, nullif(lower(btrim(c.zip)), '') AS zip,
		       c.created_at, lower(c.first_name) AS first_l, lower(c.last_name) AS last_l
		  FROM rd.contacts c
		 WHERE c.org = p_org AND c.merged_into IS NULL AND NOT c.erased),
	-- Each contact is paired with at most 10 others per kind of pair (for
	-- the same email or name the next ones by id, for similar names the most
	-- similar), each probe going through an index: the work grows with the
	-- number of contacts, not with the number of all pairs, also when
	-- thousands share a name. Similar names are looked for within blocks:
	-- the same last name, or the same first name and the same first letter
	-- of the last name ("Johana/Johanna Schneiderhan", "Anna Müller/Muller").
	pairs AS (
		SELECT a.contact_id AS x, n.contact_id AS y FROM live a
		 CROSS JOIN LATERAL (
			SELECT b.contact_id FROM rd.contacts b
			 WHERE b.org = p_org AND b.email = a.email AND b.merged_into IS NULL
			   AND NOT b.erased AND b.contact_id > a.contact_id
			 ORDER BY b.contact_id LIMIT 10) n
		UNION
		SELECT a.contact_id, n.contact_id FROM live a
		 CROSS JOIN LATERAL (
			SELECT b.contact_id FROM rd.contacts b
			 WHERE b.org = p_org AND rd.contact_name(b.first_name, b.last_name) = a.name
			   AND b.merged_into IS NULL AND NOT b.erased AND b.contact_id > a.contact_id
			 ORDER BY b.contact_id LIMIT 10) n
		UNION
		SELECT least(a.contact_id, n.contact_id), greatest(a.contact_id, n.contact_id)
		  FROM live a
		 CROSS JOIN LATERAL (
			SELECT b.contact_id FROM rd.contacts b
			 WHERE b.org = p_org AND b.merged_into IS NULL AND NOT b.erased
			   AND b.contact_id <> a.contact_id
			   AND (lower(b.last_name) = a.last_l
				OR (lower(b.first_name) = a.first_l
				    AND left(lower(b.last_name), 1) = left(a.last_l, 1)))
			   AND rd.contact_name(b.first_name, b.last_name) <> a.name -- same name: above
			   AND similarity(rd.contact_name(b.first_name, b.last_name), a.name) >= 0.5
			 ORDER BY similarity(rd.contact_name(b.first_name, b.last_name), a.name) DESC,
				  b.contact_id
			 LIMIT 10) n
		 WHERE a.last_l IS NOT NULL
		UNION
		SELECT least(d.contact_a, d.contact_b), greatest(d.contact_a, d.contact_b)
		  FROM rd.duplicate_candidates d
		 WHERE d.org = p_org
		   AND NOT EXISTS (SELECT 1 FROM rd.contacts c
				    WHERE c.org = p_org AND c.contact_id IN (d.contact_a, d.contact_b)
				      AND (c.merged_into IS NOT NULL OR c.erased))),
	scored AS (
		SELECT CASE WHEN (a.created_at, a.contact_id) <= (b.created_at, b.contact_id)
			    THEN a.contact_id ELSE b.contact_id END AS ca,
		       CASE WHEN (a.created_at, a.contact_id) <= (b.created_at, b.contact_id)
			    THEN b.contact_id ELSE a.contact_id END AS cb,
		       r.reasons, r.points
		  FROM pairs p
		  -- by primary key per pair (a plain join lets the planner, misled
		  -- by the estimates of the union, pair every live contact with
		  -- every other first)
		 CROSS JOIN LATERAL (
			SELECT c.contact_id, c.email, rd.contact_name(c.first_name, c.last_name) AS name,
			       rd.phone_key(c.phone) AS phone, c.birthdate,
			       nullif(lower(btrim(c.zip)), '') AS zip, c.created_at
			  FROM rd.contacts c WHERE c.org = p_org AND c.contact_id = p.x) a
		 CROSS JOIN LATERAL (
			SELECT c.contact_id, c.email, rd.contact_name(c.first_name, c.last_name) AS name,
			       rd.phone_key(c.phone) AS phone, c.birthdate,
			       nullif(lower(btrim(c.zip)), '') AS zip, c.created_at
			  FROM rd.contacts c WHERE c.org = p_org AND c.contact_id = p.y) b
		  CROSS JOIN LATERAL (
			SELECT array_agg(w.reason ORDER BY w.points DESC, w.reason) AS reasons,
			       sum(w.points) AS points
			  FROM (SELECT 'same email' AS reason, 50 AS points WHERE a.email = b.email
				UNION ALL
				SELECT 'same name and phone', 40
				 WHERE a.name = b.name AND a.phone = b.phone
				UNION ALL
				SELECT 'same name and birthdate', 40
				 WHERE a.name = b.name AND a.birthdate = b.birthdate
				UNION ALL
				SELECT 'same name and postcode', 25
				 WHERE a.name = b.name AND a.zip = b.zip
				UNION ALL
				SELECT CASE WHEN a.name = b.name THEN 'same name'
					    ELSE format('similar names (%s)',
							round(similarity(a.name, b.name)::numeric, 2))
					    END,
				       round(similarity(a.name, b.name) * 30)::integer
				 WHERE similarity(a.name, b.name) >= 0.5
				UNION ALL
				SELECT DISTINCT d.reason || ' at matching', 10
				  FROM rd.duplicate_candidates d
				 WHERE d.org = p_org
				   AND ((d.contact_a = a.contact_id AND d.contact_b = b.contact_id)
					OR (d.contact_a = b.contact_id AND d.contact_b = a.contact_id))
			       ) w) r
		 WHERE r.points IS NOT NULL)
	SELECT ca, cb, least(100, points)::integer, reasons
	  FROM scored
	 ORDER BY least(100, points) DESC, ca, cb
	 LIMIT p_limit
$$;

-- Typo-tolerant search by email, name or company among the live contacts
-- of an organisation: substring matches first, then trigram similarity
-- (word similarity: "mueler" finds "Anna Müller-Lüdenscheidt"'s
-- "müller"), best first.
CREATE FUNCTION rd.contact_find(p_org text, p_text text, p_limit integer)
RETURNS TABLE (contact_id uuid, score real, matched text)
LANGUAGE sql STABLE AS $$
	WITH q AS (SELECT lower(btrim(p_text)) AS t),
	c AS (
		SELECT c.contact_id, c.created_at,
		       coalesce(c.email, '') AS email,
		       coalesce(rd.contact_name(c.first_name, c.last_name), '') AS name,
		       coalesce(lower(c.company), '') AS company
		  FROM rd.contacts c
		 WHERE c.org = p_org AND c.merged_into IS NULL AND NOT c.erased),
	s AS (
		SELECT c.contact_id, c.created_at, x.what, x.sc
		  FROM c, q,
		  LATERAL (VALUES
			('email', CASE WHEN c.email = q.t THEN 3.0
				       WHEN strpos(c.email, q.t) > 0 THEN 2.0
				       ELSE greatest(similarity(c.email, q.t),
						     word_similarity(q.t, c.email)) END),
			('name', CASE WHEN c.name = q.t THEN 3.0
				      WHEN strpos(c.name, q.t) > 0 THEN 2.0
				      ELSE greatest(similarity(c.name, q.t),
						    word_similarity(q.t, c.name)) END),
			('company', CASE WHEN c.company = q.t THEN 3.0
					 WHEN strpos(c.company, q.t) > 0 THEN 2.0
					 ELSE greatest(similarity(c.company, q.t),
						       word_similarity(q.t, c.company)) END)
		  ) x(what, sc)
		 WHERE q.t <> ''),
	best AS (
		SELECT DISTINCT ON (s.contact_id) s.contact_id, s.created_at, s.what, s.sc
		  FROM s WHERE s.sc >= 0.45
		 ORDER BY s.contact_id, s.sc DESC, s.what)
	SELECT b.contact_id, b.sc::real, b.what FROM best b
	 ORDER BY b.sc DESC, b.created_at, b.contact_id
	 LIMIT p_limit
$$;

-- The merges of a contact (as keep or drop), for the dashboard.
CREATE VIEW report.merges AS
	SELECT org, merge_id, keep_id::text AS keep_id, drop_id::text AS drop_id, message_id, by,
	       at, summary, unmerged_at
	  FROM rd.merges;

-- Erasure (SPEC 4.7, called by rd.contact_erase of 0006 for every contact
-- of an erased group): the journal's images of the contact and the values
-- the merges filled lose their personal data. What stays: ids, times, the
-- rows moved (keys only) and which fields were filled. Such a merge can no
-- longer be undone (rd.admin_unmerge refuses erased contacts).
CREATE FUNCTION rd.merge_scrub(p jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE AS $$
	SELECT CASE WHEN p IS NULL THEN NULL ELSE p || jsonb_build_object(
		'email', NULL, 'first_name', NULL, 'last_name', NULL, 'company', NULL,
		'phone', NULL, 'street', NULL, 'zip', NULL, 'city', NULL, 'country', NULL,
		'birthdate', NULL, 'fields', '{}'::jsonb, 'tags', '[]'::jsonb) END
$$;

CREATE FUNCTION rd.merge_erase_contact(p_org text, p_cid uuid) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
	UPDATE rd.merges m
	   SET keep_before = CASE WHEN m.keep_id = p_cid THEN rd.merge_scrub(m.keep_before)
				  ELSE m.keep_before END,
	       keep_after  = CASE WHEN m.keep_id = p_cid THEN rd.merge_scrub(m.keep_after)
				  ELSE m.keep_after END,
	       drop_before = CASE WHEN m.drop_id = p_cid THEN rd.merge_scrub(m.drop_before)
				  ELSE m.drop_before END,
	       drop_after  = CASE WHEN m.drop_id = p_cid THEN rd.merge_scrub(m.drop_after)
				  ELSE m.drop_after END
	 WHERE m.org = p_org AND (m.keep_id = p_cid OR m.drop_id = p_cid);
	-- a filled value came from drop and now sits on keep: personal either way
	UPDATE rd.merge_fills f
	   SET old_value = CASE WHEN f.old_value IS NULL THEN NULL ELSE 'null'::jsonb END,
	       new_value = 'null'::jsonb
	  FROM rd.merges m
	 WHERE f.org = p_org AND m.org = f.org AND m.merge_id = f.merge_id
	   AND (m.keep_id = p_cid OR m.drop_id = p_cid);
END;
$$;
