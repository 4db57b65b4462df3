/* contact.c: rosterctl contact: the participant dashboard and the contact
 * search (docs/admin.md).
 *
 *   contact show ID|EMAIL [--org ORG]
 *   contact find TEXT [--org ORG] [--limit N]
 *
 * show: one contact by id (a merge tombstone is shown as such, naming the
 * contact it was merged into) or by email (the live contact with it; when
 * several have it, their ids are listed and the command fails). The whole
 * dashboard is one SQL statement (schema/queries/contact.sql
 * "contact_show") returning one JSON document: --json prints it, the
 * terminal layout below reads it. find: typo-tolerant search by email,
 * name or company (pg_trgm), best first. Without --org every organisation
 * is searched; an id or email found in several is an error asking for one.
 * Values from upstream are printed with control bytes escaped. */
#include <errno.h>
#include <jansson.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl.h"

/* Upstream text on a terminal: control bytes escaped. */
static void put_esc(const char *s)
{
	for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
		if (*p < 0x20 || *p == 0x7f)
			printf("\\x%02x", *p);
		else
			putchar(*p);
	}
}

/* Bytes of s as put_esc prints them, counting UTF-8 characters once. */
static int esc_width(const char *s)
{
	int w = 0;
	for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
		if (*p < 0x20 || *p == 0x7f)
			w += 4;
		else if ((*p & 0xc0) != 0x80)
			w++;
	}
	return w;
}

static void put_pad(const char *s, int width)
{
	put_esc(s);
	for (int w = esc_width(s); w < width; w++)
		putchar(' ');
}

/* The value of key k of o as text: strings as they are, numbers and
 * booleans printed, null/absent as "" (into buf). */
static const char *val(const json_t *o, const char *k, char *buf, size_t n)
{
	const json_t *v = json_object_get(o, k);
	buf[0] = '\0';
	if (json_is_string(v))
		return json_string_value(v);
	if (json_is_integer(v))
		snprintf(buf, n, "%lld", (long long)json_integer_value(v));
	else if (json_is_real(v))
		snprintf(buf, n, "%g", json_real_value(v));
	else if (json_is_boolean(v))
		snprintf(buf, n, "%s", json_is_true(v) ? "yes" : "no");
	else if (json_is_array(v) || json_is_object(v)) {
		char *d = json_dumps(v, JSON_COMPACT | JSON_ENSURE_ASCII);
		snprintf(buf, n, "%s", d ? d : "");
		free(d);
	}
	return buf;
}

/* A timestamp "2026-11-23T10:41:02.123456+00:00" shortened to
 * "2026-11-23 10:41:02" (UTC as stored). */
static const char *when(const json_t *o, const char *k, char *buf, size_t n)
{
	const char *s = val(o, k, buf, n);
	if (s != buf)
		snprintf(buf, n, "%s", s);
	if (strlen(buf) >= 19 && buf[10] == 'T') {
		buf[10] = ' ';
		buf[19] = '\0';
	}
	return buf;
}

struct col {
	const char *key;
	const char *head;
	int width; /* 0: the last column, not padded */
	bool time;
};

/* A titled table of the rows of arr; "(none)" when empty. */
static void table(const char *title, const json_t *arr, const struct col *cols, size_t ncols)
{
	printf("\n%s (%zu)\n", title, json_array_size(arr));
	if (json_array_size(arr) == 0) {
		printf("  (none)\n");
		return;
	}
	printf("  ");
	for (size_t i = 0; i < ncols; i++)
		printf("%-*s%s", cols[i].width, cols[i].head, i + 1 < ncols ? " " : "\n");
	size_t r;
	const json_t *row;
	json_array_foreach(arr, r, row)
	{
		printf("  ");
		for (size_t i = 0; i < ncols; i++) {
			char buf[512];
			const char *v = cols[i].time ? when(row, cols[i].key, buf, sizeof(buf))
						     : val(row, cols[i].key, buf, sizeof(buf));
			if (i + 1 < ncols) {
				put_pad(v, cols[i].width);
				putchar(' ');
			} else {
				put_esc(v);
				putchar('\n');
			}
		}
	}
}

static void field(const char *label, const char *v)
{
	if (!v || !*v)
		return;
	printf("  %-12s ", label);
	put_esc(v);
	putchar('\n');
}

static void print_dashboard(const json_t *doc)
{
	const json_t *c = json_object_get(doc, "contact");
	char b1[512], b2[512];
	printf("CONTACT ");
	put_esc(val(c, "contact_id", b1, sizeof(b1)));
	printf("  (org ");
	put_esc(val(c, "org", b1, sizeof(b1)));
	printf(")\n");
	const char *into = val(c, "merged_into", b1, sizeof(b1));
	if (*into) {
		printf("  MERGED into %s", into);
		const char *live = val(doc, "live_contact", b2, sizeof(b2));
		if (*live && strcmp(live, into) != 0)
			printf(" (now %s)", live);
		printf(": this is a tombstone; its records are on that contact\n");
	}
	if (json_is_true(json_object_get(c, "erased")))
		printf("  ERASED: personal data removed\n");
	char name[2100];
	const char *first = val(c, "first_name", b1, sizeof(b1));
	const char *last = val(c, "last_name", b2, sizeof(b2));
	snprintf(name, sizeof(name), "%s%s%s", first, *first && *last ? " " : "", last);
	field("name", name);
	static const char *const keys[] = {"email", "company", "phone",	   "street",	"zip",
					   "city",  "country", "language", "birthdate", "barcode"};
	for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++)
		field(keys[i], val(c, keys[i], b1, sizeof(b1)));
	field("created", when(c, "created_at", b1, sizeof(b1)));
	field("updated", when(c, "updated_at", b1, sizeof(b1)));
	const json_t *tags = json_object_get(c, "tags");
	if (json_array_size(tags)) {
		printf("  %-12s ", "tags");
		size_t i;
		const json_t *t;
		json_array_foreach(tags, i, t)
		{
			if (i)
				printf(", ");
			put_esc(json_string_value(t) ? json_string_value(t) : "");
		}
		putchar('\n');
	}
	const json_t *fields = json_object_get(c, "fields");
	if (json_object_size(fields)) {
		printf("\nCustom fields\n");
		const char *k;
		const json_t *v;
		json_object_foreach((json_t *)fields, k, v)
		{
			printf("  ");
			put_pad(k, 20);
			printf(" ");
			put_esc(val(fields, k, b1, sizeof(b1)));
			putchar('\n');
		}
	}

	static const struct col merges[] = {
	    {"merge_id", "MERGE", 6, false}, {"at", "AT", 19, true},
	    {"keep_id", "KEEP", 36, false},  {"drop_id", "DROP", 36, false},
	    {"by", "BY", 9, false},	     {"unmerged_at", "UNDONE", 0, true}};
	if (json_array_size(json_object_get(doc, "merges")))
		table("Merges", json_object_get(doc, "merges"), merges, 6);
	static const struct col key_figures[] = {{"currency", "CURRENCY", 8, false},
						 {"revenue_text", "REVENUE", 16, false},
						 {"invoices", "INVOICES", 8, false},
						 {"outstanding_text", "OUTSTANDING", 0, false}};
	table("Key figures", json_object_get(doc, "key_figures"), key_figures, 4);
	static const struct col balances[] = {{"currency", "CURRENCY", 8, false},
					      {"balance_text", "BALANCE", 0, false}};
	table("Balances", json_object_get(doc, "balances"), balances, 2);
	static const struct col bookings[] = {
	    {"booking_id", "BOOKING", 14, false}, {"number", "NUMBER", 10, false},
	    {"offer_title", "OFFER", 24, false},  {"status", "STATUS", 9, false},
	    {"version", "V", 3, false},		  {"total_text", "TOTAL", 14, false},
	    {"match", "MATCH", 0, false}};
	table("Bookings (as booker)", json_object_get(doc, "bookings"), bookings, 7);
	static const struct col attendances[] = {
	    {"booking_id", "BOOKING", 14, false}, {"attendee_id", "ATTENDEE", 12, false},
	    {"offer_title", "OFFER", 24, false},  {"status", "STATUS", 9, false},
	    {"category", "CATEGORY", 10, false},  {"price_text", "PRICE", 14, false},
	    {"match", "MATCH", 0, false}};
	table("Attendances", json_object_get(doc, "attendances"), attendances, 7);
	static const struct col invoices[] = {{"invoice_id", "INVOICE", 14, false},
					      {"number", "NUMBER", 10, false},
					      {"status", "STATUS", 9, false},
					      {"amount_text", "AMOUNT", 14, false},
					      {"paid_text", "PAID", 14, false},
					      {"open_text", "OPEN", 14, false},
					      {"due", "DUE", 0, false}};
	table("Invoices", json_object_get(doc, "invoices"), invoices, 7);
	static const struct col tx[] = {{"at", "AT", 19, true},
					{"kind", "KIND", 12, false},
					{"amount_text", "AMOUNT", 14, false},
					{"invoice_id", "INVOICE", 14, false},
					{"text", "TEXT", 0, false}};
	table("Transactions", json_object_get(doc, "transactions"), tx, 5);
	static const struct col notes[] = {
	    {"at", "AT", 19, true}, {"author", "AUTHOR", 16, false}, {"text", "TEXT", 0, false}};
	table("Notes", json_object_get(doc, "notes"), notes, 3);
	static const struct col outbox[] = {{"created_at", "CREATED", 19, true},
					    {"outbox_id", "ID", 6, false},
					    {"template", "TEMPLATE", 22, false},
					    {"status", "STATUS", 9, false},
					    {"attempts", "TRY", 3, false},
					    {"to_address", "TO", 28, false},
					    {"last_error", "SMTP REPLY / ERROR", 0, false}};
	table("Outbox", json_object_get(doc, "outbox"), outbox, 7);
	static const struct col activity[] = {
	    {"at", "AT", 19, true}, {"kind", "KIND", 20, false}, {"summary", "SUMMARY", 0, false}};
	table("Activity", json_object_get(doc, "activity"), activity, 3);
	static const struct col history[] = {{"at", "AT", 19, true},
					     {"field", "FIELD", 16, false},
					     {"old_value", "OLD", 24, false},
					     {"new_value", "NEW", 0, false}};
	table("Field history", json_object_get(doc, "field_history"), history, 4);
}

/* The one contact arg names (an id or an email) in org (NULL: any): its
 * org and id into org_out/id_out; else an error is printed, returns 1. */
static int lookup(PGconn *conn, const char *org, const char *arg, char *org_out, char *id_out)
{
	const char *params[2] = {org, arg};
	PGresult *res = ctl_query(conn, "contact_lookup", 2, params);
	if (!res)
		return 1;
	int n = PQntuples(res), rc = 0;
	if (n == 0) {
		if (org)
			rc = ctl_die("contact show: no contact %s in organisation %s", arg, org);
		else
			rc = ctl_die("contact show: no contact %s", arg);
	} else if (n > 1) {
		bool orgs = false;
		for (int r = 1; r < n; r++)
			orgs |= strcmp(PQgetvalue(res, r, 0), PQgetvalue(res, 0, 0)) != 0;
		char ids[1024] = "";
		size_t len = 0;
		for (int r = 0; r < n && len + 80 < sizeof(ids); r++)
			len += (size_t)snprintf(ids + len, sizeof(ids) - len, "%s%s%s%s",
						r ? ", " : "", orgs ? PQgetvalue(res, r, 0) : "",
						orgs ? "/" : "", PQgetvalue(res, r, 1));
		if (orgs)
			rc =
			    ctl_die("contact show: %s is in several organisations (%s): give --org",
				    arg, ids);
		else
			rc = ctl_die("contact show: %d contacts have the email %s (%s): give an id",
				     n, arg, ids);
	} else {
		snprintf(org_out, 128, "%s", PQgetvalue(res, 0, 0));
		snprintf(id_out, 64, "%s", PQgetvalue(res, 0, 1));
	}
	PQclear(res);
	return rc;
}

static int contact_show(struct ctl *c)
{
	const char *org = NULL, *arg = NULL;
	for (int i = 1; i < c->argc; i++) {
		if (strcmp(c->argv[i], "--org") == 0) {
			if (i + 1 >= c->argc)
				return ctl_die("contact show: --org needs a value");
			org = c->argv[++i];
		} else if (!arg && c->argv[i][0] != '-') {
			arg = c->argv[i];
		} else {
			return ctl_die("contact show: unexpected argument %s", c->argv[i]);
		}
	}
	if (!arg)
		return ctl_die("contact show: usage: rosterctl contact show ID|EMAIL [--org ORG]");
	PGconn *conn = ctl_connect(c);
	if (!conn)
		return 1;
	char corg[128], cid[64];
	int rc = lookup(conn, org, arg, corg, cid);
	if (rc) {
		PQfinish(conn);
		return rc;
	}
	const char *params[2] = {corg, cid};
	PGresult *res = ctl_query(conn, "contact_show", 2, params);
	if (!res) {
		PQfinish(conn);
		return 1;
	}
	json_error_t jerr;
	json_t *doc = json_loads(PQgetvalue(res, 0, 0), 0, &jerr);
	PQclear(res);
	PQfinish(conn);
	if (!doc)
		return ctl_die("contact show: cannot read the dashboard: %s", jerr.text);
	if (c->json) {
		json_dumpf(doc, stdout, JSON_INDENT(2));
		fputc('\n', stdout);
	} else {
		print_dashboard(doc);
	}
	json_decref(doc);
	return 0;
}

static bool all_digits(const char *s)
{
	if (!*s || strlen(s) > 6)
		return false;
	for (; *s; s++)
		if (*s < '0' || *s > '9')
			return false;
	return true;
}

static int contact_find(struct ctl *c)
{
	const char *org = NULL, *text = NULL, *limit = "20";
	for (int i = 1; i < c->argc; i++) {
		const char *a = c->argv[i];
		if (strcmp(a, "--org") == 0 || strcmp(a, "--limit") == 0) {
			if (i + 1 >= c->argc)
				return ctl_die("contact find: %s needs a value", a);
			if (strcmp(a, "--org") == 0)
				org = c->argv[++i];
			else
				limit = c->argv[++i];
		} else if (!text && a[0] != '-') {
			text = a;
		} else {
			return ctl_die("contact find: unexpected argument %s", a);
		}
	}
	if (!text)
		return ctl_die("contact find: usage: rosterctl contact find TEXT [--org ORG] "
			       "[--limit N]");
	if (!all_digits(limit) || atoi(limit) < 1)
		return ctl_die("contact find: --limit: a number from 1 to 999999");
	PGconn *conn = ctl_connect(c);
	if (!conn)
		return 1;
	const char *params[3] = {org, text, limit};
	PGresult *res = ctl_query(conn, "contact_find", 3, params);
	PQfinish(conn);
	if (!res)
		return 1;
	enum { F_ORG, F_ID, F_EMAIL, F_NAME, F_COMPANY, F_SCORE, F_MATCHED };
	if (c->json) {
		json_t *arr = json_array();
		for (int r = 0; r < PQntuples(res); r++) {
			json_t *o = json_object();
			static const char *const cols[] = {
			    "org", "contact_id", "email", "name", "company", "score", "matched"};
			for (int k = 0; k < 7; k++) {
				const char *v = PQgetvalue(res, r, k);
				if (k == F_SCORE)
					json_object_set_new(o, cols[k], json_real(strtod(v, NULL)));
				else if (!*v && (k == F_EMAIL || k == F_NAME || k == F_COMPANY))
					json_object_set_new(o, cols[k], json_null());
				else
					json_object_set_new(o, cols[k], json_string(v));
			}
			json_array_append_new(arr, o);
		}
		json_dumpf(arr, stdout, JSON_INDENT(2));
		fputc('\n', stdout);
		json_decref(arr);
	} else if (PQntuples(res) == 0) {
		printf("no contact matches\n");
	} else {
		printf("%-5s %-12s %-36s %-30s %-26s %s\n", "SCORE", "ORG", "CONTACT", "EMAIL",
		       "NAME", "COMPANY");
		for (int r = 0; r < PQntuples(res); r++) {
			printf("%-5s ", PQgetvalue(res, r, F_SCORE));
			put_pad(PQgetvalue(res, r, F_ORG), 12);
			printf(" %-36s ", PQgetvalue(res, r, F_ID));
			put_pad(PQgetvalue(res, r, F_EMAIL), 30);
			putchar(' ');
			put_pad(PQgetvalue(res, r, F_NAME), 26);
			putchar(' ');
			put_esc(PQgetvalue(res, r, F_COMPANY));
			putchar('\n');
		}
	}
	PQclear(res);
	return 0;
}

int ctl_contact(struct ctl *c)
{
	if (c->argc >= 1 && strcmp(c->argv[0], "show") == 0)
		return contact_show(c);
	if (c->argc >= 1 && strcmp(c->argv[0], "find") == 0)
		return contact_find(c);
	return ctl_die("contact: usage: rosterctl [--json] contact show ID|EMAIL [--org ORG] | "
		       "contact find TEXT [--org ORG] [--limit N]");
}
