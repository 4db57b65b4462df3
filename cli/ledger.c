/* ledger.c: rosterctl ledger check [--org ORG]. Verifies the ledger against
 * an independent computation (schema/queries/ledger.sql "ledger_check",
 * docs/ledger.md): per organisation and currency the sum of the balances,
 * the sum of the transactions and what the invoices and payments say it
 * must be; per invoice its paid amount, status and transactions; per
 * payment its transaction. Prints every mismatch and exits 1 when there is
 * one, else prints a one-line summary and exits 0; 2 when it cannot check.
 * Both statements run in one REPEATABLE READ, READ ONLY transaction, so a
 * daemon writing meanwhile is seen at one instant, never half a batch. */
#include <errno.h>
#include <jansson.h>
#include <libpq-fe.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl.h"

#define LEDGER_CANNOT 2 /* exit status: the check could not run */

/* Column order of "ledger_check" and "ledger_totals". */
enum { M_CHECK, M_ORG, M_CURRENCY, M_SUBJECT, M_EXPECTED, M_FOUND };
enum { T_ORG, T_CURRENCY, T_TX, T_INVOICES, T_PAYMENTS, T_BALANCE };

/* Values come from upstream ids: escape control bytes for the terminal. */
static void put_escaped(const char *s)
{
	for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
		if (*p < 0x20 || *p == 0x7f)
			printf("\\x%02x", *p);
		else
			putchar(*p);
	}
}

/* A decimal from SQL as a JSON integer, or as a string when it does not
 * fit (sums are numeric). */
static json_t *json_num(const char *s)
{
	char *end;
	errno = 0;
	long long v = strtoll(s, &end, 10);
	if (errno == 0 && end != s && *end == '\0')
		return json_integer((json_int_t)v);
	return json_string(s);
}

static long long num(const char *s)
{
	return strtoll(s, NULL, 10);
}

/* How many distinct values column col has among the rows. */
static int distinct(const PGresult *res, int col)
{
	int n = 0;
	for (int r = 0; r < PQntuples(res); r++) {
		bool seen = false;
		for (int q = 0; q < r && !seen; q++)
			seen = strcmp(PQgetvalue(res, q, col), PQgetvalue(res, r, col)) == 0;
		n += !seen;
	}
	return n;
}

static void print_json(const char *org, const PGresult *mm, const PGresult *tot)
{
	json_t *mismatches = json_array();
	for (int r = 0; r < PQntuples(mm); r++)
		json_array_append_new(
		    mismatches,
		    json_pack("{s:s, s:s, s:s, s:s, s:s, s:s}", "check", PQgetvalue(mm, r, M_CHECK),
			      "org", PQgetvalue(mm, r, M_ORG), "currency",
			      PQgetvalue(mm, r, M_CURRENCY), "subject",
			      PQgetvalue(mm, r, M_SUBJECT), "expected",
			      PQgetvalue(mm, r, M_EXPECTED), "found", PQgetvalue(mm, r, M_FOUND)));
	json_t *totals = json_array();
	long long ntx = 0, ninv = 0, npay = 0;
	for (int r = 0; r < PQntuples(tot); r++) {
		ntx += num(PQgetvalue(tot, r, T_TX));
		ninv += num(PQgetvalue(tot, r, T_INVOICES));
		npay += num(PQgetvalue(tot, r, T_PAYMENTS));
		json_array_append_new(
		    totals,
		    json_pack("{s:s, s:s, s:o, s:o, s:o, s:o}", "org", PQgetvalue(tot, r, T_ORG),
			      "currency", PQgetvalue(tot, r, T_CURRENCY), "transactions",
			      json_num(PQgetvalue(tot, r, T_TX)), "invoices",
			      json_num(PQgetvalue(tot, r, T_INVOICES)), "payments",
			      json_num(PQgetvalue(tot, r, T_PAYMENTS)), "balance",
			      json_num(PQgetvalue(tot, r, T_BALANCE))));
	}
	json_t *doc =
	    json_pack("{s:b, s:o, s:i, s:i, s:I, s:I, s:I, s:o, s:o}", "ok", PQntuples(mm) == 0,
		      "org", org ? json_string(org) : json_null(), "organisations",
		      distinct(tot, T_ORG), "currencies", distinct(tot, T_CURRENCY), "transactions",
		      (json_int_t)ntx, "invoices", (json_int_t)ninv, "payments", (json_int_t)npay,
		      "totals", totals, "mismatches", mismatches);
	if (!doc) { /* invalid UTF-8 in --org: nothing else comes from outside SQL */
		ctl_die("ledger check: cannot encode the result as JSON");
		return;
	}
	json_dumpf(doc, stdout, JSON_INDENT(2));
	fputc('\n', stdout);
	json_decref(doc);
}

static void print_text(const char *org, const PGresult *mm, const PGresult *tot)
{
	long long ntx = 0, ninv = 0, npay = 0;
	for (int r = 0; r < PQntuples(tot); r++) {
		ntx += num(PQgetvalue(tot, r, T_TX));
		ninv += num(PQgetvalue(tot, r, T_INVOICES));
		npay += num(PQgetvalue(tot, r, T_PAYMENTS));
	}
	for (int r = 0; r < PQntuples(mm); r++) {
		printf("MISMATCH %s org=", PQgetvalue(mm, r, M_CHECK));
		put_escaped(PQgetvalue(mm, r, M_ORG));
		printf(" currency=");
		put_escaped(PQgetvalue(mm, r, M_CURRENCY));
		printf(" ");
		put_escaped(PQgetvalue(mm, r, M_SUBJECT));
		printf(": expected ");
		put_escaped(PQgetvalue(mm, r, M_EXPECTED));
		printf(", found ");
		put_escaped(PQgetvalue(mm, r, M_FOUND));
		putchar('\n');
	}
	printf("ledger check");
	if (org) {
		printf(" (org ");
		put_escaped(org);
		printf(")");
	}
	if (PQntuples(mm) > 0)
		printf(": FAILED, %d mismatch%s", PQntuples(mm), PQntuples(mm) == 1 ? "" : "es");
	else
		printf(": ok");
	int norgs = distinct(tot, T_ORG), ncur = distinct(tot, T_CURRENCY);
	printf(" (%d organisation%s, %d currenc%s, %lld transaction%s, %lld invoice%s, "
	       "%lld payment%s)%s\n",
	       norgs, norgs == 1 ? "" : "s", ncur, ncur == 1 ? "y" : "ies", ntx,
	       ntx == 1 ? "" : "s", ninv, ninv == 1 ? "" : "s", npay, npay == 1 ? "" : "s",
	       PQntuples(mm) > 0 ? "" : "; balances = transactions = invoices and payments");
}

static int ledger_check(struct ctl *c, const char *org)
{
	PGconn *conn = ctl_connect(c);
	if (!conn)
		return LEDGER_CANNOT;
	if (!org && !ctl_sees_all_orgs(conn, "ledger check")) {
		PQfinish(conn);
		return LEDGER_CANNOT;
	}
	const char *params[1] = {org};
	PGresult *mm = NULL, *tot = NULL;
	int rc = LEDGER_CANNOT;
	PGresult *tx = ctl_query(conn, "ledger_begin", 0, NULL);
	if (!tx)
		goto out;
	PQclear(tx);
	if (!(mm = ctl_query(conn, "ledger_check", 1, params)))
		goto out;
	if (!(tot = ctl_query(conn, "ledger_totals", 1, params)))
		goto out;
	if (!(tx = ctl_query(conn, "ledger_end", 0, NULL)))
		goto out;
	PQclear(tx);
	if (c->json)
		print_json(org, mm, tot);
	else
		print_text(org, mm, tot);
	rc = PQntuples(mm) > 0 ? 1 : 0;
out:
	PQclear(mm);
	PQclear(tot);
	PQfinish(conn);
	return rc;
}

int ctl_ledger(struct ctl *c)
{
	const char *org = NULL;
	if (c->argc < 1 || strcmp(c->argv[0], "check") != 0) {
		ctl_die("ledger: usage: rosterctl [--json] ledger check [--org ORG]");
		return LEDGER_CANNOT;
	}
	for (int i = 1; i < c->argc; i++) {
		if (strcmp(c->argv[i], "--org") == 0 && i + 1 < c->argc) {
			org = c->argv[++i];
		} else {
			ctl_die("ledger check: unexpected argument %s", c->argv[i]);
			return LEDGER_CANNOT;
		}
	}
	return ledger_check(c, org);
}
