/* merge.c: rosterctl merge KEEP DROP [--org ORG] and rosterctl unmerge
 * MERGE_ID [--org ORG] (SPEC 4.7; docs/admin.md "Merge and unmerge").
 *
 * merge runs rd.admin_merge, the same SQL function as the contact.merged
 * handler (rd.contact_merge), as one statement: one transaction, taking
 * the same locks as a batch would. unmerge runs rd.admin_unmerge on the
 * merge's journal. Without --org the organisation is the one of KEEP (of
 * the merge); a DROP of another organisation is then unknown, as is any id
 * of another organisation than --org. Prints a summary, or with --json the
 * summary document of the SQL function. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl.h"
#include "migrations.h"

/* A named statement; a database error is printed as "cmd: message" (the
 * primary message only: the rejections of rd.admin_merge are made to be
 * read). NULL on error. */
static PGresult *run(PGconn *conn, const char *cmd, const char *name, int n,
		     const char *const *params)
{
	char *sql = rd_query_text(name);
	if (!sql) {
		ctl_die("internal: no statement named %s", name);
		return NULL;
	}
	PGresult *res = PQexecParams(conn, sql, n, NULL, params, NULL, NULL, 0);
	free(sql);
	if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
		const char *m = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
		if (!m || !*m)
			m = PQerrorMessage(conn);
		ctl_die("%s: %.*s", cmd, (int)strcspn(m, "\n"), m);
		PQclear(res);
		return NULL;
	}
	return res;
}

/* The organisation of the one row of query `name` for arg, or an error. */
static int find_org(PGconn *conn, const char *cmd, const char *name, const char *arg,
		    const char *what, char *out, size_t n)
{
	const char *params[1] = {arg};
	PGresult *res = ctl_query(conn, name, 1, params);
	if (!res)
		return 1;
	int rc = 0;
	if (PQntuples(res) == 0)
		rc = ctl_die("%s: %s %s is unknown", cmd, what, arg);
	else if (PQntuples(res) > 1)
		rc = ctl_die("%s: %s %s is in several organisations: give --org", cmd, what, arg);
	else
		snprintf(out, n, "%s", PQgetvalue(res, 0, 0));
	PQclear(res);
	return rc;
}

static void print_counts(const char *label, const json_t *counts)
{
	printf("  %s:", label);
	const char *k;
	const json_t *v;
	int any = 0;
	json_object_foreach((json_t *)counts, k, v)
	{
		if (json_integer_value(v) == 0)
			continue;
		printf("%s %lld %s", any ? "," : "", (long long)json_integer_value(v), k);
		any = 1;
	}
	printf("%s\n", any ? "" : " nothing");
}

static void print_list(const char *label, const json_t *arr)
{
	printf("  %s: ", label);
	if (json_array_size(arr) == 0)
		printf("-");
	size_t i;
	const json_t *x;
	json_array_foreach(arr, i, x)
	    printf("%s%s", i ? ", " : "", json_string_value(x) ? json_string_value(x) : "");
	putchar('\n');
}

static int print_result(struct ctl *c, const char *cmd, const char *text, int unmerge)
{
	json_error_t jerr;
	json_t *doc = json_loads(text, 0, &jerr);
	if (!doc)
		return ctl_die("%s: cannot read the result: %s", cmd, jerr.text);
	if (c->json) {
		json_dumpf(doc, stdout, JSON_INDENT(2));
		fputc('\n', stdout);
	} else if (!unmerge) {
		long long id = (long long)json_integer_value(json_object_get(doc, "merge_id"));
		printf("merge %lld: contact %s merged into %s\n", id,
		       json_string_value(json_object_get(doc, "drop")),
		       json_string_value(json_object_get(doc, "keep")));
		print_counts("moved", json_object_get(doc, "moved"));
		print_list("filled", json_object_get(doc, "filled"));
		printf("  undo with: rosterctl unmerge %lld --org %s\n", id,
		       json_string_value(json_object_get(doc, "org")));
	} else {
		printf("merge %lld undone: contact %s is separate from %s again%s\n",
		       (long long)json_integer_value(json_object_get(doc, "merge_id")),
		       json_string_value(json_object_get(doc, "drop")),
		       json_string_value(json_object_get(doc, "keep")),
		       json_is_true(json_object_get(doc, "exact")) ? ", both exactly as before"
								   : "");
		print_counts("moved back", json_object_get(doc, "moved_back"));
		print_list("emptied again", json_object_get(doc, "emptied"));
		if (json_array_size(json_object_get(doc, "kept")))
			print_list("kept (changed since the merge)", json_object_get(doc, "kept"));
	}
	json_decref(doc);
	return 0;
}

/* The positional arguments and --org of a command taking npos of them. */
static int parse(struct ctl *c, const char *cmd, int npos, const char **pos, const char **org)
{
	int got = 0;
	for (int i = 0; i < c->argc; i++) {
		if (strcmp(c->argv[i], "--org") == 0) {
			if (i + 1 >= c->argc)
				return ctl_die("%s: --org needs a value", cmd);
			*org = c->argv[++i];
		} else if (got < npos && c->argv[i][0] != '-') {
			pos[got++] = c->argv[i];
		} else {
			return ctl_die("%s: unexpected argument %s", cmd, c->argv[i]);
		}
	}
	if (got < npos)
		return ctl_die("%s: usage: rosterctl [--json] %s [--org ORG]", cmd,
			       npos == 2 ? "merge KEEP DROP" : "unmerge MERGE_ID");
	return 0;
}

int ctl_merge(struct ctl *c)
{
	const char *pos[2] = {NULL, NULL}, *org = NULL;
	if (parse(c, "merge", 2, pos, &org))
		return 1;
	PGconn *conn = ctl_connect(c);
	if (!conn)
		return 1;
	char found[128];
	if (!org) {
		if (find_org(conn, "merge", "merge_org", pos[0], "contact", found, sizeof(found))) {
			PQfinish(conn);
			return 1;
		}
		org = found;
	}
	const char *params[3] = {org, pos[0], pos[1]};
	PGresult *res = run(conn, "merge", "merge_run", 3, params);
	PQfinish(conn);
	if (!res)
		return 1;
	int rc = print_result(c, "merge", PQgetvalue(res, 0, 0), 0);
	PQclear(res);
	return rc;
}

int ctl_unmerge(struct ctl *c)
{
	const char *pos[1] = {NULL}, *org = NULL;
	if (parse(c, "unmerge", 1, pos, &org))
		return 1;
	size_t n = strlen(pos[0]);
	if (n == 0 || n > 18 || strspn(pos[0], "0123456789") != n)
		return ctl_die("unmerge: MERGE_ID is a number (see rosterctl contact show)");
	PGconn *conn = ctl_connect(c);
	if (!conn)
		return 1;
	char found[128];
	if (!org) {
		if (find_org(conn, "unmerge", "unmerge_org", pos[0], "merge", found,
			     sizeof(found))) {
			PQfinish(conn);
			return 1;
		}
		org = found;
	}
	const char *params[2] = {org, pos[0]};
	PGresult *res = run(conn, "unmerge", "unmerge_run", 2, params);
	PQfinish(conn);
	if (!res)
		return 1;
	int rc = print_result(c, "unmerge", PQgetvalue(res, 0, 0), 1);
	PQclear(res);
	return rc;
}
