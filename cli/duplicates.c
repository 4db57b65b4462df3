/* duplicates.c: rosterctl duplicates [--org ORG] [--limit N]: candidate
 * duplicate pairs of live contacts, best first, with a score (0..100) and
 * the reasons (SPEC 4.7; rd.duplicates in schema/migrations/0005_merge.sql,
 * docs/admin.md "Duplicates"). Without --org every organisation is listed;
 * pairs never cross organisations. */
#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl.h"

enum { D_ORG, D_SCORE, D_A, D_EMAIL_A, D_NAME_A, D_B, D_EMAIL_B, D_NAME_B, D_REASONS };

static void put_esc(const char *s)
{
	for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
		if (*p < 0x20 || *p == 0x7f)
			printf("\\x%02x", *p);
		else
			putchar(*p);
	}
}

static json_t *str_or_null(const char *s)
{
	return *s ? json_string(s) : json_null();
}

int ctl_duplicates(struct ctl *c)
{
	const char *org = NULL, *limit = "50";
	for (int i = 0; i < c->argc; i++) {
		const char *a = c->argv[i];
		if (strcmp(a, "--org") != 0 && strcmp(a, "--limit") != 0)
			return ctl_die("duplicates: unexpected argument %s", a);
		if (i + 1 >= c->argc)
			return ctl_die("duplicates: %s needs a value", a);
		if (strcmp(a, "--org") == 0)
			org = c->argv[++i];
		else
			limit = c->argv[++i];
	}
	size_t n = strlen(limit);
	if (n == 0 || n > 6 || strspn(limit, "0123456789") != n || atoi(limit) < 1)
		return ctl_die("duplicates: --limit: a number from 1 to 999999");
	PGconn *conn = ctl_connect(c);
	if (!conn)
		return 1;
	const char *params[2] = {org, limit};
	PGresult *res = ctl_query(conn, "duplicates", 2, params);
	PQfinish(conn);
	if (!res)
		return 1;
	if (c->json) {
		json_t *arr = json_array();
		for (int r = 0; r < PQntuples(res); r++) {
			json_t *reasons = json_loads(PQgetvalue(res, r, D_REASONS), 0, NULL);
			json_t *o = json_pack(
			    "{s:s, s:i, s:{s:s, s:o, s:o}, s:{s:s, s:o, s:o}, s:o}", "org",
			    PQgetvalue(res, r, D_ORG), "score", atoi(PQgetvalue(res, r, D_SCORE)),
			    "a", "contact_id", PQgetvalue(res, r, D_A), "email",
			    str_or_null(PQgetvalue(res, r, D_EMAIL_A)), "name",
			    str_or_null(PQgetvalue(res, r, D_NAME_A)), "b", "contact_id",
			    PQgetvalue(res, r, D_B), "email",
			    str_or_null(PQgetvalue(res, r, D_EMAIL_B)), "name",
			    str_or_null(PQgetvalue(res, r, D_NAME_B)), "reasons",
			    reasons ? reasons : json_array());
			if (o)
				json_array_append_new(arr, o);
		}
		json_dumpf(arr, stdout, JSON_INDENT(2));
		fputc('\n', stdout);
		json_decref(arr);
	} else if (PQntuples(res) == 0) {
		printf("no duplicate candidates\n");
	} else {
		for (int r = 0; r < PQntuples(res); r++) {
			printf("%3s  ", PQgetvalue(res, r, D_SCORE));
			put_esc(PQgetvalue(res, r, D_ORG));
			printf("  %s ", PQgetvalue(res, r, D_A));
			put_esc(PQgetvalue(res, r, D_NAME_A));
			printf(" <");
			put_esc(PQgetvalue(res, r, D_EMAIL_A));
			printf(">\n     ");
			for (size_t k = 0; k < strlen(PQgetvalue(res, r, D_ORG)); k++)
				putchar(' ');
			printf("  %s ", PQgetvalue(res, r, D_B));
			put_esc(PQgetvalue(res, r, D_NAME_B));
			printf(" <");
			put_esc(PQgetvalue(res, r, D_EMAIL_B));
			printf(">\n     reasons: ");
			json_t *reasons = json_loads(PQgetvalue(res, r, D_REASONS), 0, NULL);
			size_t i;
			json_t *x;
			json_array_foreach(reasons, i, x)
			{
				printf("%s", i ? "; " : "");
				put_esc(json_string_value(x) ? json_string_value(x) : "");
			}
			json_decref(reasons);
			printf("\n     merge:   rosterctl merge %s %s --org ",
			       PQgetvalue(res, r, D_A), PQgetvalue(res, r, D_B));
			put_esc(PQgetvalue(res, r, D_ORG));
			printf("\n\n");
		}
	}
	PQclear(res);
	return 0;
}
