/* migrations.c: applies the embedded schema migrations, each once, in
 * version order, each in its own transaction, holding a session advisory
 * lock so that instances starting together take turns: the first applies,
 * the others find nothing left to do; then secures what is there (row-level
 * security and grants, docs/security.md). Also looks up named statements. */
#include "migrations.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"

/* pg_advisory_lock key of the migration runner ("rosterd\\0" as a big-endian int64). */
#define RD_MIGRATE_LOCK "8245936386494063616"

char *rd_query_text(const char *name)
{
	char tag[128];
	int n = snprintf(tag, sizeof(tag), "-- name: %s\n", name);
	if (n < 0 || (size_t)n >= sizeof(tag))
		return NULL;
	const char *p = rd_queries_sql;
	while ((p = strstr(p, tag)) != NULL) {
		if (p == rd_queries_sql || p[-1] == '\n')
			break;
		p += strlen(tag);
	}
	if (!p)
		return NULL;
	p += strlen(tag);
	const char *end = strstr(p, "\n-- name: ");
	size_t len = end ? (size_t)(end - p) : strlen(p);
	while (len && (p[len - 1] == '\n' || p[len - 1] == ' ' || p[len - 1] == ';'))
		len--;
	return rd_xstrndup(p, len);
}

static enum rd_status exec_ok(PGconn *conn, const char *sql, struct rd_err *err, const char *what)
{
	PGresult *res = PQexec(conn, sql);
	ExecStatusType st = PQresultStatus(res);
	if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK) {
		rd_errf(err, RD_FAIL, "%s: %s", what, PQresultErrorMessage(res));
		PQclear(res);
		return RD_FAIL;
	}
	PQclear(res);
	return RD_OK;
}

static int applied_version(PGconn *conn, int version, struct rd_err *err)
{
	char v[16];
	snprintf(v, sizeof(v), "%d", version);
	const char *params[1] = {v};
	PGresult *res = PQexecParams(
	    conn, "SELECT 1 FROM public.rd_schema_migrations WHERE version = $1::integer", 1, NULL,
	    params, NULL, NULL, 0);
	if (PQresultStatus(res) != PGRES_TUPLES_OK) {
		rd_errf(err, RD_FAIL, "migrations: %s", PQresultErrorMessage(res));
		PQclear(res);
		return -1;
	}
	int found = PQntuples(res) > 0;
	PQclear(res);
	return found;
}

/* rd.secure_tables(), and one line saying what it found: the tables under
 * row-level security and the group roles missing (their grants wait until
 * an operator creates them, docs/security.md). */
static enum rd_status secure(PGconn *conn, struct rd_err *err)
{
	PGresult *res = PQexec(
	    conn, "SELECT rd.secure_tables(), coalesce(string_agg(r, ',' ORDER BY r), '')"
		  "  FROM unnest(ARRAY['rosterd_app', 'rosterd_reader', 'rosterd_admin']) AS r"
		  " WHERE to_regrole(r) IS NULL");
	if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
		rd_errf(err, RD_FAIL, "rd.secure_tables: %s", PQresultErrorMessage(res));
		PQclear(res);
		return RD_FAIL;
	}
	const char *missing = PQgetvalue(res, 0, 1);
	rd_log(LOG_NOTICE, "schema.secured", "rls_tables=%s%s%s", PQgetvalue(res, 0, 0),
	       *missing ? " roles_missing=" : "", missing);
	PQclear(res);
	return RD_OK;
}

enum rd_status rd_migrate(PGconn *conn, struct rd_err *err)
{
	enum rd_status st;

	if (exec_ok(conn, "SELECT pg_advisory_lock(" RD_MIGRATE_LOCK ")", err, "migration lock"))
		return RD_FAIL;
	st = exec_ok(conn,
		     "CREATE TABLE IF NOT EXISTS public.rd_schema_migrations ("
		     " version integer PRIMARY KEY, name text NOT NULL,"
		     " applied_at timestamptz NOT NULL DEFAULT now())",
		     err, "migrations table");
	for (size_t i = 0; st == RD_OK && i < rd_migrations_count; i++) {
		const struct rd_migration *m = &rd_migrations[i];
		int done = applied_version(conn, m->version, err);
		if (done < 0) {
			st = RD_FAIL;
			break;
		}
		if (done)
			continue;
		if ((st = exec_ok(conn, "BEGIN", err, m->name)) != RD_OK)
			break;
		if ((st = exec_ok(conn, m->sql, err, m->name)) != RD_OK) {
			PQclear(PQexec(conn, "ROLLBACK"));
			break;
		}
		char v[16];
		snprintf(v, sizeof(v), "%d", m->version);
		const char *params[2] = {v, m->name};
		PGresult *res = PQexecParams(conn,
					     "INSERT INTO public.rd_schema_migrations (version, name)"
					     " VALUES ($1::integer, $2)",
					     2, NULL, params, NULL, NULL, 0);
		if (PQresultStatus(res) != PGRES_COMMAND_OK) {
			rd_errf(err, RD_FAIL, "%s: %s", m->name, PQresultErrorMessage(res));
			PQclear(res);
			PQclear(PQexec(conn, "ROLLBACK"));
			st = RD_FAIL;
			break;
		}
		PQclear(res);
		if ((st = exec_ok(conn, "COMMIT", err, m->name)) != RD_OK)
			break;
		rd_log(LOG_NOTICE, "schema.migrated", "version=%d name=%s", m->version, m->name);
	}
	/* Row-level security, policies and grants on every table and view,
	 * including those of the migrations just applied (0007_security.sql).
	 * Idempotent: DDL only where something is missing. */
	if (st == RD_OK)
		st = secure(conn, err);
	struct rd_err uerr;
	if (exec_ok(conn, "SELECT pg_advisory_unlock(" RD_MIGRATE_LOCK ")", &uerr, "unlock") &&
	    st == RD_OK)
		return rd_errf(err, RD_FAIL, "%s", uerr.msg);
	return st;
}
