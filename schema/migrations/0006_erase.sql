-- 0006_erase: contact.erased (GDPR erasure) and contact.deleted (SPEC 3,
-- 4.7), and the server side of rosterctl import (one round trip per CSV
-- row through rd.apply). docs/admin-io.md states the rules as implemented.
--
-- Erasure replaces personal data with nothing wherever 0001-0004 keep it:
--  * rd.contacts: every person column, custom fields, tags (erased = true;
--    id, barcode, merge pointer and times stay, so every view still names it);
--  * rd.bookings of which it is the booker: email and the booker's data;
--  * rd.attendees assigned to it: email, names and the person's data;
--  * rd.field_history: old and new values (the field names stay);
--  * rd.activity: summaries (kind and message id stay);
--  * rd.notes: deleted (free text about the person);
--  * rd.outbox: addresses, subjects and bodies (rd.outbox_erase_contact);
--  * whatever a later migration keeps: a function rd.merge_erase_contact
--    (org, uuid), when it exists, is called for each erased contact id.
-- rd.messages keeps no payloads (only ids, types, outcomes and reasons built
-- from field names). Invoices, payments and transactions keep their amounts
-- and are not touched (the ledger is append-only).
-- The erased contact is the one the id resolves to (merge tombstones are
-- followed) together with every tombstone merged into it: one person.

-- The lookups below by merge pointer and of a contact's notes would scan
-- whole tables otherwise. IF NOT EXISTS: 0005 (merge) may create the same.
CREATE INDEX IF NOT EXISTS contacts_merged_into ON rd.contacts (org, merged_into)
	WHERE merged_into IS NOT NULL;
CREATE INDEX IF NOT EXISTS notes_contact ON rd.notes (org, contact_id);

-- Every contact of the group that resolves to p_cid: p_cid and the
-- tombstones (transitively) merged into it.
CREATE FUNCTION rd.contact_group(p_org text, p_cid uuid) RETURNS SETOF uuid
LANGUAGE sql STABLE AS $$
	WITH RECURSIVE g(id) AS (
		SELECT p_cid
		UNION
		SELECT c.contact_id FROM rd.contacts c JOIN g ON c.merged_into = g.id
		 WHERE c.org = p_org)
	SELECT id FROM g
$$;

-- Erase one contact's personal data in the caller's transaction. Returns
-- the number of contacts erased (the group).
CREATE FUNCTION rd.contact_erase(p_org text, p_cid uuid, p_msg text) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
	v_ids uuid[];
	v_id uuid;
BEGIN
	SELECT array_agg(id ORDER BY id) INTO v_ids FROM rd.contact_group(p_org, p_cid) id;
	-- lock the group's rows in one order before changing anything
	PERFORM 1 FROM rd.contacts c
	 WHERE c.org = p_org AND c.contact_id = ANY (v_ids)
	 ORDER BY c.contact_id FOR NO KEY UPDATE;

	UPDATE rd.contacts SET email = NULL, first_name = NULL, last_name = NULL, company = NULL,
			       language = NULL, phone = NULL, street = NULL, zip = NULL,
			       city = NULL, country = NULL, birthdate = NULL, fields = '{}',
			       tags = '{}', value_at = '{}', erased = true, message_id = p_msg,
			       updated_at = now()
	 WHERE org = p_org AND contact_id = ANY (v_ids);
	UPDATE rd.bookings SET email = NULL, booker = '{}', updated_at = now()
	 WHERE org = p_org AND contact_id = ANY (v_ids);
	UPDATE rd.attendees SET email = NULL, first_name = NULL, last_name = NULL, person = '{}'
	 WHERE org = p_org AND contact_id = ANY (v_ids);
	UPDATE rd.field_history SET old_value = NULL, new_value = NULL
	 WHERE org = p_org AND contact_id = ANY (v_ids)
	   AND (old_value IS NOT NULL OR new_value IS NOT NULL);
	UPDATE rd.activity SET summary = 'erased'
	 WHERE org = p_org AND contact_id = ANY (v_ids) AND summary <> 'erased';
	DELETE FROM rd.notes WHERE org = p_org AND contact_id = ANY (v_ids);
	FOREACH v_id IN ARRAY v_ids LOOP
		PERFORM rd.outbox_erase_contact(p_org, v_id);
		IF to_regproc('rd.merge_erase_contact') IS NOT NULL THEN
			EXECUTE 'SELECT rd.merge_erase_contact($1, $2)' USING p_org, v_id;
		END IF;
	END LOOP;
	PERFORM rd.activity_add(p_org, p_cid, 'contact.erased',
		CASE WHEN cardinality(v_ids) > 1
		     THEN format('personal data erased (with %s merged contacts)',
				 cardinality(v_ids) - 1)
		     ELSE 'personal data erased' END, p_msg);
	RETURN cardinality(v_ids);
END $$;

-- contact.erased: an unknown contact waits (it may not be seen yet), as for
-- the other contact messages; erasing an erased contact again is harmless.
CREATE FUNCTION rd.h_contact_erased(p_org text, p_id text, p_at timestamptz, d jsonb)
RETURNS text LANGUAGE plpgsql AS $$
BEGIN
	PERFORM rd.contact_erase(p_org, rd.contact_required(p_org, d->>'contact_id'), p_id);
	RETURN 'applied';
END $$;

-- contact.deleted: only a contact with no history that matters (SPEC 4.7):
-- no bookings (as booker or attendee), invoices or transactions, and no
-- contacts merged into it. Everything else it has (activity, field history,
-- notes, tags, outbox rows, duplicate candidates) goes with it, and one
-- activity row without a contact records the deletion. The id is taken as
-- given: a merge tombstone is not followed (deleting it would delete the
-- keeping contact).
CREATE FUNCTION rd.h_contact_deleted(p_org text, p_id text, p_at timestamptz, d jsonb)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
	v_cid uuid := rd.as_uuid(d->>'contact_id');
	v_merged uuid;
	v_why text[] := '{}';
	v_n bigint;
BEGIN
	SELECT c.merged_into INTO v_merged FROM rd.contacts c
	 WHERE c.org = p_org AND c.contact_id = v_cid FOR NO KEY UPDATE;
	IF NOT FOUND THEN
		PERFORM rd.wait(format('contact %s not yet seen', d->>'contact_id'));
	END IF;
	IF v_merged IS NOT NULL THEN
		PERFORM rd.reject(format('contact %s was merged into %s: delete cannot apply to a '
					 'merged contact; use contact.erased to remove personal data',
					 v_cid, v_merged));
	END IF;
	SELECT count(*) INTO v_n FROM rd.bookings WHERE org = p_org AND contact_id = v_cid;
	IF v_n > 0 THEN
		v_why := v_why || format('%s bookings', v_n);
	END IF;
	SELECT count(*) INTO v_n FROM rd.attendees WHERE org = p_org AND contact_id = v_cid;
	IF v_n > 0 THEN
		v_why := v_why || format('%s attendances', v_n);
	END IF;
	SELECT count(*) INTO v_n FROM rd.invoices WHERE org = p_org AND contact_id = v_cid;
	IF v_n > 0 THEN
		v_why := v_why || format('%s invoices', v_n);
	END IF;
	SELECT count(*) INTO v_n FROM rd.transactions WHERE org = p_org AND contact_id = v_cid;
	IF v_n > 0 THEN
		v_why := v_why || format('%s transactions', v_n);
	END IF;
	SELECT count(*) INTO v_n FROM rd.contacts WHERE org = p_org AND merged_into = v_cid;
	IF v_n > 0 THEN
		v_why := v_why || format('%s merged contacts', v_n);
	END IF;
	IF cardinality(v_why) > 0 THEN
		PERFORM rd.reject(format('contact %s has %s and cannot be deleted; use contact.erased '
					 'to erase its personal data and keep the records',
					 v_cid, array_to_string(v_why, ', ')));
	END IF;

	DELETE FROM rd.activity WHERE org = p_org AND contact_id = v_cid;
	DELETE FROM rd.field_history WHERE org = p_org AND contact_id = v_cid;
	DELETE FROM rd.notes WHERE org = p_org AND contact_id = v_cid;
	DELETE FROM rd.duplicate_candidates
	 WHERE org = p_org AND (contact_a = v_cid OR contact_b = v_cid);
	DELETE FROM rd.outbox WHERE org = p_org AND contact_id = v_cid;
	BEGIN
		DELETE FROM rd.contacts WHERE org = p_org AND contact_id = v_cid;
	EXCEPTION WHEN foreign_key_violation THEN
		PERFORM rd.reject(format('contact %s is still referenced (%s) and cannot be deleted; '
					 'use contact.erased to erase its personal data', v_cid,
					 (SELECT regexp_replace(SQLERRM, '\s+', ' ', 'g'))));
	END;
	PERFORM rd.activity_add(p_org, NULL, 'contact.deleted',
				format('contact %s deleted', v_cid), p_id);
	RETURN 'applied';
END $$;

INSERT INTO rd.handler_fns (type, fn) VALUES
	('contact.erased', 'rd.h_contact_erased'),
	('contact.deleted', 'rd.h_contact_deleted')
ON CONFLICT (type) DO UPDATE SET fn = EXCLUDED.fn;
SELECT rd.rebuild_dispatch();

-- ---- rosterctl import ---------------------------------------------------------

-- One CSV row as a contact.upserted message (match "email"), in the
-- caller's transaction: the row's serialisation keys (p_keys, as the C
-- validator lists them, without the org) are locked as a batch would, then
-- rd.apply runs as for a message from the queue. p_reject: the C
-- validator's reason, recorded as a rejection. Returns the outcome and,
-- for the dry-run report, what the row did: action created | updated |
-- unchanged | skipped, the contact and the activity it left.
CREATE FUNCTION rd.import_row(p_org text, p_id text, p_at_ms bigint, p_data jsonb,
			      p_reject text, p_keys jsonb,
			      OUT outcome text, OUT reason text, OUT action text,
			      OUT contact_id text, OUT detail text)
LANGUAGE plpgsql AS $$
DECLARE
	v_created boolean;
	v_changed boolean;
BEGIN
	PERFORM rd.lock_keys(ARRAY[p_org || '/msg:' || p_id] ||
			     coalesce((SELECT array_agg(p_org || '/' || k)
					 FROM jsonb_array_elements_text(coalesce(p_keys, '[]')) k),
				      '{}'));
	SELECT a.outcome, a.reason INTO outcome, reason
	  FROM rd.apply(p_org, p_id, 'contact.upserted', p_at_ms, p_data, true, p_reject) a;
	IF outcome <> 'applied' THEN
		action := 'skipped';
		detail := CASE outcome WHEN 'duplicate' THEN 'already imported (' || reason || ')'
				       ELSE reason END;
		RETURN;
	END IF;
	SELECT a.contact_id::text, string_agg(a.summary, '; ' ORDER BY a.activity_id)
	  INTO contact_id, detail
	  FROM rd.activity a
	 WHERE a.org = p_org AND a.message_id = p_id AND a.contact_id IS NOT NULL
	 GROUP BY a.contact_id
	 LIMIT 1;
	v_created := EXISTS (SELECT 1 FROM rd.activity a WHERE a.org = p_org AND a.message_id = p_id
					   AND a.kind = 'contact.created');
	v_changed := EXISTS (SELECT 1 FROM rd.field_history h WHERE h.org = p_org
					   AND h.message_id = p_id);
	action := CASE WHEN v_created THEN 'created' WHEN v_changed THEN 'updated'
		       ELSE 'unchanged' END;
END $$;
