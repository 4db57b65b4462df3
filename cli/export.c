/* export.c: rosterctl export VIEW [--org ORG] [--format csv|json] [-o FILE]
 *
 * Streams a report view (SPEC 5) with COPY ... TO STDOUT: csv with a header
 * row, or json as one array of row_to_json objects. The view name is
 * checked against pg_views of schema report and quoted by the server
 * (quote_ident); the organisation travels as a setting, never as SQL text.
 * Without --org every organisation is exported. With -o the rows go to
 * FILE.tmp, renamed to FILE only once the COPY ended well. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ctl.h"
#include "util.h"

struct out {
	FILE *f;
	bool json;
	long rows;
	bool io_error;
};

static void emit(struct out *o, const char *buf, int len)
{
	if (o->json) {
		/* one document per line: strip the newline, add the separators */
		while (len > 0 && (buf[len - 1] == '\n' || buf[len - 1] == '\r'))
			len--;
		if (fputs(o->rows ? ",\n" : "[\n", o->f) == EOF)
			o->io_error = true;
	}
	if (fwrite(buf, 1, (size_t)len, o->f) != (size_t)len)
		o->io_error = true;
	o->rows++;
}

int ctl_export(struct ctl *c)
{
	const char *view = NULL, *org = NULL, *format = "csv", *file = NULL;
	for (int i = 0; i < c->argc; i++) {
		const char *a = c->argv[i];
		if (strcmp(a, "--org") == 0 || strcmp(a, "--format") == 0 || strcmp(a, "-o") == 0) {
			if (i + 1 >= c->argc)
				return ctl_die("export: %s needs a value", a);
			const char *v = c->argv[++i];
			if (a[2] == 'o')
				org = v;
			else if (a[2] == 'f')
				format = v;
			else
				file = v;
		} else if (a[0] == '-' || view) {
			return ctl_die("export: unexpected argument %s", a);
		} else {
			view = a;
		}
	}
	if (!view)
		return ctl_die("export: which view? (rosterctl export VIEW [--org ORG] "
			       "[--format csv|json] [-o FILE])");
	if (strcmp(format, "csv") != 0 && strcmp(format, "json") != 0)
		return ctl_die("export: --format: csv or json, not %s", format);
	if (strncmp(view, "report.", 7) == 0)
		view += 7;
	/* --json asks for machine output: the rows in JSON */
	if (c->json)
		format = "json";

	/* read-only: as rosterd_reader where the login may (docs/security.md) */
	PGconn *conn = ctl_connect_reader(c);
	if (!conn)
		return 1;
	int rc = 1;
	char *tmp = NULL;
	struct out o = {.f = stdout, .json = strcmp(format, "json") == 0};
	if (!org && !ctl_sees_all_orgs(conn, "export"))
		goto out;
	PGresult *res = ctl_query(conn, "export_views", 0, NULL);
	if (!res)
		goto out;
	bool known = false;
	size_t cap = 64;
	for (int r = 0; r < PQntuples(res); r++) {
		cap += strlen(PQgetvalue(res, r, 0)) + 2;
		if (strcmp(PQgetvalue(res, r, 0), view) == 0)
			known = true;
	}
	if (!known) {
		char *list = rd_xmalloc(cap);
		list[0] = '\0';
		for (int r = 0; r < PQntuples(res); r++) {
			if (r)
				strcat(list, ", ");
			strcat(list, PQgetvalue(res, r, 0));
		}
		ctl_die("export: unknown view %s (views: %s)", view, list);
		free(list);
		PQclear(res);
		goto out;
	}
	PQclear(res);
	if (org) {
		const char *p[1] = {org};
		res = ctl_query(conn, "admin_org_exists", 1, p);
		if (!res)
			goto out;
		int n = PQntuples(res);
		PQclear(res);
		if (n == 0) {
			ctl_die("export: unknown organisation %s", org);
			goto out;
		}
	}
	const char *sp[1] = {org ? org : ""};
	res = ctl_query(conn, "export_set_org", 1, sp);
	if (!res)
		goto out;
	PQclear(res);
	const char *cp[2] = {view, format};
	res = ctl_query(conn, "export_copy_sql", 2, cp);
	if (!res)
		goto out;
	if (PQntuples(res) != 1) {
		PQclear(res);
		ctl_die("export: view %s disappeared", view);
		goto out;
	}
	char *copy = rd_xstrdup(PQgetvalue(res, 0, 0));
	PQclear(res);

	if (file) {
		size_t n = strlen(file) + 5;
		tmp = rd_xmalloc(n);
		snprintf(tmp, n, "%s.tmp", file);
		o.f = fopen(tmp, "w");
		if (!o.f) {
			ctl_die("export: %s: %s", tmp, strerror(errno));
			free(copy);
			goto out;
		}
	}
	res = PQexec(conn, copy);
	free(copy);
	if (PQresultStatus(res) != PGRES_COPY_OUT) {
		char msg[300];
		rd_strlcpy(msg, PQresultErrorMessage(res), sizeof(msg));
		msg[strcspn(msg, "\n")] = '\0';
		ctl_die("export: %s", msg);
		PQclear(res);
		goto out;
	}
	PQclear(res);
	char *buf;
	int len;
	while ((len = PQgetCopyData(conn, &buf, 0)) > 0) {
		emit(&o, buf, len);
		PQfreemem(buf);
	}
	res = PQgetResult(conn);
	if (len != -1 || PQresultStatus(res) != PGRES_COMMAND_OK) {
		char msg[300];
		rd_strlcpy(msg, PQerrorMessage(conn), sizeof(msg));
		msg[strcspn(msg, "\n")] = '\0';
		ctl_die("export: the copy failed: %s", msg);
		PQclear(res);
		goto out;
	}
	PQclear(res);
	if (o.json && fputs(o.rows ? "\n]\n" : "[]\n", o.f) == EOF)
		o.io_error = true;
	if (fflush(o.f) != 0 || o.io_error) {
		ctl_die("export: %s: %s", file ? tmp : "stdout", strerror(errno));
		goto out;
	}
	if (file) {
		int cr = fclose(o.f);
		o.f = NULL;
		if (cr != 0 || rename(tmp, file) != 0) {
			ctl_die("export: %s: %s", file, strerror(errno));
			goto out;
		}
		if (!c->json)
			fprintf(stderr, "exported %ld rows of report.%s to %s\n",
				o.rows - (o.json ? 0 : 1), view, file);
	}
	rc = 0;
out:
	if (file && o.f && o.f != stdout)
		fclose(o.f);
	if (tmp) {
		if (rc != 0)
			unlink(tmp);
		free(tmp);
	}
	PQfinish(conn);
	return rc;
}
