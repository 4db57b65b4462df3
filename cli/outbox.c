/* outbox.c: rosterctl outbox: list the mails of an organisation, a contact
 * or a status; queue failed (or retrying) mails again.
 *
 *   outbox list [--org ORG] [--contact ID] [--status S] [--limit N]
 *   outbox retry --org ORG (--id OUTBOX_ID | --contact ID | --failed)
 *
 * retry: --failed takes every failed mail of the organisation; --id and
 * --contact take the failed and retrying ones they name (now, with a
 * fresh retry window). A sent mail is never sent again. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl.h"

static const char *const statuses[] = {"queued", "sending", "sent", "retrying", "failed", NULL};

static bool valid_status(const char *s)
{
	for (size_t i = 0; statuses[i]; i++)
		if (strcmp(s, statuses[i]) == 0)
			return true;
	return false;
}

static bool all_digits(const char *s)
{
	if (!*s || strlen(s) > 18)
		return false;
	for (; *s; s++)
		if (*s < '0' || *s > '9')
			return false;
	return true;
}

static int outbox_list(struct ctl *c)
{
	const char *org = NULL, *contact = NULL, *status = NULL, *limit = "100";
	for (int i = 1; i < c->argc; i++) {
		const char *a = c->argv[i];
		const char *v = i + 1 < c->argc ? c->argv[i + 1] : NULL;
		if (!v)
			return ctl_die("outbox list: %s needs a value", a);
		if (strcmp(a, "--org") == 0)
			org = v;
		else if (strcmp(a, "--contact") == 0)
			contact = v;
		else if (strcmp(a, "--status") == 0)
			status = v;
		else if (strcmp(a, "--limit") == 0)
			limit = v;
		else
			return ctl_die("outbox list: unexpected argument %s", a);
		i++;
	}
	if (status && !valid_status(status))
		return ctl_die(
		    "outbox list: --status: one of queued, sending, sent, retrying, failed");
	if (!all_digits(limit))
		return ctl_die("outbox list: --limit: a number");
	PGconn *conn = ctl_connect(c);
	if (!conn)
		return 1;
	if (!org && !ctl_sees_all_orgs(conn, "outbox list")) {
		PQfinish(conn);
		return 1;
	}
	const char *params[4] = {org, contact, status, limit};
	PGresult *res = ctl_query(conn, "ctl_outbox_list", 4, params);
	if (!res) {
		PQfinish(conn);
		return 1;
	}
	static const char *const cols[] = {
	    "org",	  "outbox_id", "contact_id",	  "to_address", "template",
	    "language",	  "subject",   "status",	  "attempts",	"last_error",
	    "created_at", "sent_at",   "next_attempt_at", "message_id"};
	if (c->json) {
		json_t *arr = json_array();
		for (int r = 0; r < PQntuples(res); r++) {
			json_t *o = json_object();
			for (int k = 0; k < (int)(sizeof(cols) / sizeof(cols[0])); k++) {
				const char *v = PQgetvalue(res, r, k);
				if (strcmp(cols[k], "attempts") == 0)
					json_object_set_new(o, cols[k], json_integer(atoll(v)));
				else if (!*v && (strcmp(cols[k], "last_error") == 0 ||
						 strcmp(cols[k], "sent_at") == 0 ||
						 strcmp(cols[k], "next_attempt_at") == 0))
					json_object_set_new(o, cols[k], json_null());
				else
					json_object_set_new(o, cols[k], json_string(v));
			}
			json_array_append_new(arr, o);
		}
		json_dumpf(arr, stdout, JSON_INDENT(2));
		fputc('\n', stdout);
		json_decref(arr);
	} else {
		printf("%-29s %-10s %-8s %-9s %-3s %-22s %-30s %s\n", "CREATED", "ORG", "ID",
		       "STATUS", "TRY", "TEMPLATE", "TO", "SUBJECT / LAST ERROR / NEXT ATTEMPT");
		for (int r = 0; r < PQntuples(res); r++) {
			printf("%-29s %-10s %-8s %-9s %-3s %-22s %-30s %s", PQgetvalue(res, r, 10),
			       PQgetvalue(res, r, 0), PQgetvalue(res, r, 1), PQgetvalue(res, r, 7),
			       PQgetvalue(res, r, 8), PQgetvalue(res, r, 4), PQgetvalue(res, r, 3),
			       PQgetvalue(res, r, 6));
			if (*PQgetvalue(res, r, 9))
				printf("  [%s]", PQgetvalue(res, r, 9));
			if (*PQgetvalue(res, r, 12))
				printf("  (next %s)", PQgetvalue(res, r, 12));
			putchar('\n');
		}
	}
	PQclear(res);
	PQfinish(conn);
	return 0;
}

static int outbox_retry(struct ctl *c)
{
	const char *org = NULL, *id = NULL, *contact = NULL;
	bool failed = false;
	for (int i = 1; i < c->argc; i++) {
		const char *a = c->argv[i];
		if (strcmp(a, "--failed") == 0) {
			failed = true;
			continue;
		}
		const char *v = i + 1 < c->argc ? c->argv[i + 1] : NULL;
		if (!v)
			return ctl_die("outbox retry: %s needs a value", a);
		if (strcmp(a, "--org") == 0)
			org = v;
		else if (strcmp(a, "--id") == 0)
			id = v;
		else if (strcmp(a, "--contact") == 0)
			contact = v;
		else
			return ctl_die("outbox retry: unexpected argument %s", a);
		i++;
	}
	if (!org)
		return ctl_die("outbox retry: --org ORG is required");
	if (!id && !contact && !failed)
		return ctl_die(
		    "outbox retry: say which mails: --id OUTBOX_ID, --contact ID or --failed");
	if (id && !all_digits(id))
		return ctl_die("outbox retry: --id: an outbox id (a number)");
	PGconn *conn = ctl_connect(c);
	if (!conn)
		return 1;
	/* --failed alone: failed mails only; --id/--contact: also retrying ones */
	const char *only_failed = failed ? "true" : "false";
	const char *params[4] = {org, id, contact, only_failed};
	PGresult *res = ctl_query(conn, "ctl_outbox_retry", 4, params);
	if (!res) {
		PQfinish(conn);
		return 1;
	}
	int n = PQntuples(res);
	int rc = 0;
	if (n == 0 && id) {
		/* say why nothing happened */
		const char *p2[2] = {org, id};
		PGresult *st = ctl_query(conn, "ctl_outbox_status", 2, p2);
		if (st && PQntuples(st) == 0)
			rc = ctl_die("outbox retry: no outbox %s in organisation %s", id, org);
		else if (st)
			rc = ctl_die("outbox retry: outbox %s is %s: not queued again", id,
				     PQgetvalue(st, 0, 0));
		else
			rc = 1;
		PQclear(st);
	} else if (c->json) {
		json_t *arr = json_array();
		for (int r = 0; r < n; r++)
			json_array_append_new(arr, json_string(PQgetvalue(res, r, 0)));
		json_t *doc = json_pack("{s:s, s:o}", "org", org, "queued", arr);
		json_dumpf(doc, stdout, JSON_INDENT(2));
		fputc('\n', stdout);
		json_decref(doc);
	} else {
		printf("%d mail%s queued again", n, n == 1 ? "" : "s");
		for (int r = 0; r < n; r++)
			printf("%s%s", r ? ", " : ": ", PQgetvalue(res, r, 0));
		putchar('\n');
	}
	PQclear(res);
	PQfinish(conn);
	return rc;
}

int ctl_outbox(struct ctl *c)
{
	if (c->argc < 1)
		return ctl_die("outbox: list or retry (see rosterctl outbox --help)");
	if (strcmp(c->argv[0], "list") == 0)
		return outbox_list(c);
	if (strcmp(c->argv[0], "retry") == 0)
		return outbox_retry(c);
	return ctl_die("outbox: unknown subcommand %s: list or retry", c->argv[0]);
}
