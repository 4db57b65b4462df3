-- 0007_security: tenant isolation in depth (Step 7.4). docs/security.md has
-- the design, the roles and the operator's one-time set-up.
--
--  * Row-level security, enabled and FORCED, on every table of schema rd
--    that has an org column: a row is visible and writable only while the
--    transaction (or session) setting rd.org names its organisation
--    (policy rd_org). rd.apply sets it per message. Without it, nothing.
--  * One more policy, rd_all, lets the tables' owner (the migrating role)
--    and members of rosterd_admin see every organisation: migrations, the
--    SECURITY DEFINER functions below (the mail workers' claim, which is
--    cross-organisation by nature) and rosterctl's commands without --org.
--  * Least-privilege group roles: rosterd_app (the daemon: no UPDATE or
--    DELETE on the ledger), rosterd_reader (read-only), rosterd_admin
--    (rosterctl). Created here when the migrating role may create roles;
--    otherwise the operator creates them once (docs/security.md).
--  * Report views run with the privileges and policies of the querying
--    role (security_invoker), not of their owner, who sees everything.
--
-- rd.secure_tables() applies all of this to every table and view present;
-- the migrator (daemon/migrations.c) calls it after applying the pending
-- migrations, so a table added by a later migration is covered without
-- that migration doing anything.

-- ---- roles ------------------------------------------------------------------

DO $$
DECLARE
	v_can boolean;
	v_role text;
BEGIN
	SELECT r.rolsuper OR r.rolcreaterole INTO v_can FROM pg_roles r
	 WHERE r.rolname = current_user;
	FOREACH v_role IN ARRAY ARRAY['rosterd_app', 'rosterd_reader', 'rosterd_admin'] LOOP
		CONTINUE WHEN to_regrole(v_role) IS NOT NULL;
		IF NOT v_can THEN
			RAISE NOTICE 'role % does not exist and % may not create it: grants to it are '
				     'skipped until an operator creates it (docs/security.md)',
				     v_role, current_user;
			CONTINUE;
		END IF;
		BEGIN
			EXECUTE format('CREATE ROLE %I NOLOGIN', v_role);
		EXCEPTION WHEN duplicate_object OR unique_violation THEN
			NULL;  -- created meanwhile by a migration of another database
		END;
		-- rosterctl connects as the migrating role and acts as these two
		IF v_role <> 'rosterd_app' THEN
			EXECUTE format('GRANT %I TO %I', v_role, current_user);
		END IF;
	END LOOP;
END $$;

-- ---- cross-organisation functions ---------------------------------------------

-- The mail workers claim, renew and record due rows of every organisation
-- (0004): they run as the owner, which rd_all lets see every row. Only the
-- daemon and rosterctl may call them.
ALTER FUNCTION rd.outbox_claim(text, integer, integer)
	SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION rd.outbox_renew(text, integer)
	SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION rd.outbox_record(text, text[], bigint[], text[], text[], bigint[])
	SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- When the next row of any organisation is due: milliseconds from now, 0
-- when overdue, -1 when nothing waits (schema/queries/outbox.sql).
CREATE FUNCTION rd.outbox_next_due_ms() RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
-- the first entry of outbox_due, not a scan of the rows (see outbox_claim)
SET enable_seqscan = off SET enable_bitmapscan = off AS $$
	SELECT coalesce(greatest(0, (extract(epoch FROM min(o.due_at) - now()) * 1000)::bigint), -1)
	  FROM rd.outbox o
	 WHERE o.status IN ('queued', 'retrying', 'sending')
$$;

-- The contact merge moves ledger rows to the keeping contact (0003): the
-- one UPDATE of the ledger, which rosterd_app is not granted. It runs as
-- the owner; the append-only trigger still limits it to contact_id.
ALTER FUNCTION rd.ledger_move_contact(text, uuid, uuid)
	SECURITY DEFINER SET search_path = pg_catalog, pg_temp;

-- Whether the current role sees every organisation (superuser, BYPASSRLS,
-- the owner, rosterd_admin), for rosterctl's commands without --org: they
-- refuse to report "nothing found" when they could not look.
CREATE FUNCTION rd.sees_all_orgs() RETURNS boolean
LANGUAGE sql STABLE AS $$
	SELECT r.rolsuper OR r.rolbypassrls
	       OR pg_has_role(current_user, (SELECT c.relowner FROM pg_class c
					       WHERE c.oid = 'rd.messages'::regclass), 'USAGE')
	       OR coalesce(pg_has_role(current_user, to_regrole('rosterd_admin'), 'USAGE'), false)
	  FROM pg_roles r
	 WHERE r.rolname = current_user
$$;

-- ---- rd.secure_tables ------------------------------------------------------

-- Idempotent; cheap when nothing is missing (DDL only where something is).
-- For every table of schema rd with an org column: RLS enabled and forced,
-- policies rd_org and rd_all. For every table, sequence and view of rd and
-- report: the grants of the group roles that exist. Returns the number of
-- tables under row-level security.
CREATE FUNCTION rd.secure_tables() RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
	r record;
	v_n integer := 0;
	v_all text;
	v_all_oids oid[];
	v_roles text[] := ARRAY(SELECT x FROM unnest(ARRAY['rosterd_app', 'rosterd_reader',
							  'rosterd_admin']) AS x
				 WHERE to_regrole(x) IS NOT NULL);
	v_writers text;
	v_grantee text;
	v_org_check constant text := 'org = current_setting(''rd.org'', true)';
BEGIN
	SELECT string_agg(quote_ident(x), ', ') INTO v_writers FROM unnest(v_roles) AS x
	 WHERE x IN ('rosterd_app', 'rosterd_admin');

	FOR r IN
		SELECT c.oid, c.oid::regclass AS tbl, c.relrowsecurity, c.relforcerowsecurity,
		       c.relowner,
		       EXISTS (SELECT 1 FROM pg_attribute a
				WHERE a.attrelid = c.oid AND a.attname = 'org' AND a.attnum > 0
				  AND NOT a.attisdropped) AS has_org,
		       EXISTS (SELECT 1 FROM pg_trigger t
				WHERE t.tgrelid = c.oid
				  AND t.tgfoid = 'rd.ledger_append_only()'::regprocedure) AS append_only,
		       EXISTS (SELECT 1 FROM pg_trigger t
				WHERE t.tgrelid = c.oid
				  AND t.tgfoid = 'rd.invoices_guard()'::regprocedure) AS guarded
		  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
		 WHERE n.nspname = 'rd' AND c.relkind IN ('r', 'p')
		 ORDER BY c.relname
	LOOP
		IF r.has_org THEN
			v_n := v_n + 1;
			IF NOT r.relrowsecurity THEN
				EXECUTE format('ALTER TABLE %s ENABLE ROW LEVEL SECURITY', r.tbl);
			END IF;
			IF NOT r.relforcerowsecurity THEN
				EXECUTE format('ALTER TABLE %s FORCE ROW LEVEL SECURITY', r.tbl);
			END IF;
			IF NOT EXISTS (SELECT 1 FROM pg_policy p
					WHERE p.polrelid = r.oid AND p.polname = 'rd_org') THEN
				EXECUTE format('CREATE POLICY rd_org ON %s USING (%s) WITH CHECK (%s)',
					       r.tbl, v_org_check, v_org_check);
			END IF;
			v_all_oids := ARRAY[r.relowner]
				      || coalesce(to_regrole('rosterd_admin')::oid, r.relowner);
			v_all := quote_ident(pg_get_userbyid(r.relowner))
				 || CASE WHEN to_regrole('rosterd_admin') IS NOT NULL
					 THEN ', rosterd_admin' ELSE '' END;
			IF NOT EXISTS (SELECT 1 FROM pg_policy p
					WHERE p.polrelid = r.oid AND p.polname = 'rd_all') THEN
				EXECUTE format('CREATE POLICY rd_all ON %s TO %s USING (true) WITH CHECK (true)',
					       r.tbl, v_all);
			ELSIF NOT EXISTS (SELECT 1 FROM pg_policy p
					   WHERE p.polrelid = r.oid AND p.polname = 'rd_all'
					     AND p.polroles @> v_all_oids AND p.polroles <@ v_all_oids) THEN
				EXECUTE format('ALTER POLICY rd_all ON %s TO %s', r.tbl, v_all);
			END IF;
		END IF;

		-- grants: exactly these, whatever was granted before
		FOREACH v_grantee IN ARRAY v_roles LOOP
			EXECUTE format('REVOKE ALL ON %s FROM %I', r.tbl, v_grantee);
			EXECUTE format('GRANT SELECT ON %s TO %I', r.tbl, v_grantee);
		END LOOP;
		CONTINUE WHEN v_writers IS NULL OR NOT r.has_org;
		IF r.append_only THEN
			-- the ledger: appended to, never changed (the trigger stays too)
			EXECUTE format('GRANT INSERT ON %s TO %s', r.tbl, v_writers);
		ELSIF r.guarded THEN
			-- invoices: what was issued never changes; paid and status move
			EXECUTE format('GRANT INSERT, UPDATE (paid, status, cancel_message_id, '
				       'cancelled_at, updated_at) ON %s TO %s', r.tbl, v_writers);
		ELSE
			EXECUTE format('GRANT INSERT, UPDATE, DELETE ON %s TO %s', r.tbl, v_writers);
		END IF;
	END LOOP;

	-- views: the querying role's privileges and policies, never the owner's
	FOR r IN
		SELECT c.oid::regclass AS v, coalesce(c.reloptions, '{}') AS opts
		  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
		 WHERE n.nspname IN ('rd', 'report') AND c.relkind = 'v'
	LOOP
		IF NOT 'security_invoker=true' = ANY (r.opts) THEN
			EXECUTE format('ALTER VIEW %s SET (security_invoker = true)', r.v);
		END IF;
		FOREACH v_grantee IN ARRAY v_roles LOOP
			EXECUTE format('REVOKE ALL ON %s FROM %I', r.v, v_grantee);
			EXECUTE format('GRANT SELECT ON %s TO %I', r.v, v_grantee);
		END LOOP;
	END LOOP;

	IF v_writers IS NOT NULL THEN
		FOR r IN
			SELECT c.oid::regclass AS s
			  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
			 WHERE n.nspname = 'rd' AND c.relkind = 'S'
		LOOP
			EXECUTE format('GRANT USAGE, SELECT ON SEQUENCE %s TO %s', r.s, v_writers);
		END LOOP;
	END IF;

	FOREACH v_grantee IN ARRAY v_roles LOOP
		EXECUTE format('GRANT USAGE ON SCHEMA rd, report TO %I', v_grantee);
	END LOOP;
	-- the SECURITY DEFINER functions: the daemon and rosterctl only
	FOR r IN
		SELECT p.oid::regprocedure AS f
		  FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
		 WHERE n.nspname = 'rd' AND p.prosecdef
	LOOP
		EXECUTE format('REVOKE ALL ON FUNCTION %s FROM PUBLIC', r.f);
		IF v_writers IS NOT NULL THEN
			EXECUTE format('GRANT EXECUTE ON FUNCTION %s TO %s', r.f, v_writers);
		END IF;
	END LOOP;
	RETURN v_n;
END $$;

REVOKE ALL ON FUNCTION rd.secure_tables() FROM PUBLIC;
