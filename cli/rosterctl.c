/* rosterctl.c: the admin command line. Reads the same configuration file as
 * rosterd. Each command is a row of the table below; output is for a
 * terminal by default and JSON with --json. Errors are one line on stderr
 * and a non-zero exit. */
#include <getopt.h>
#include <stdbool.h>
#include <stdarg.h>
#include <jansson.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "ctl.h"
#include "log.h"
#include "migrations.h"
#include "pg.h"

struct ctl_cmd {
	const char *name;
	const char *args;
	const char *help;
	int (*run)(struct ctl *c);
};

int ctl_die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fprintf(stderr, "rosterctl: ");
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	return 1;
}

/* Run one statement with text parameters; false (error printed) unless it
 * returned rows or a command status. */
static bool ctl_exec(PGconn *conn, const char *sql, int n, const char *const *params,
		     const char *what)
{
	PGresult *res = PQexecParams(conn, sql, n, NULL, params, NULL, NULL, 0);
	ExecStatusType st = PQresultStatus(res);
	bool ok = st == PGRES_TUPLES_OK || st == PGRES_COMMAND_OK;
	if (!ok) {
		char msg[512];
		rd_strlcpy(msg, PQresultErrorMessage(res), sizeof(msg));
		msg[strcspn(msg, "\n")] = '\0';
		ctl_die("%s: %s", what, msg);
	}
	PQclear(res);
	return ok;
}

/* Row-level security (docs/security.md): rows are visible while rd.org
 * names their organisation. A command given --org ORG works in ORG for the
 * whole session; without it, only a login that sees every organisation
 * (the owner, rosterd_admin) finds anything. */
static PGconn *ctl_connect_as(struct ctl *c, bool reader)
{
	struct rd_err err = {0};
	PGconn *conn = rd_pg_connect_migrator(c->cfg, &err);
	if (!conn) {
		ctl_die("%s", err.msg);
		return NULL;
	}
	const char *org = ctl_opt(c, "--org");
	bool ok = true;
	if (reader) {
		/* The login (the owner's) acts as rosterd_reader when it may;
		 * in a database whose owner could not be given that role, the
		 * read-only session below is what remains. */
		PGresult *res = PQexec(conn, "SELECT pg_has_role(current_user,"
					     " to_regrole('rosterd_reader'), 'MEMBER')");
		bool member = PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1 &&
			      strcmp(PQgetvalue(res, 0, 0), "t") == 0;
		PQclear(res);
		if (member)
			ok = ctl_exec(conn, "SET ROLE rosterd_reader", 0, NULL, "set role");
		ok = ok && ctl_exec(conn, "SET default_transaction_read_only = on", 0, NULL,
				    "read-only session");
	}
	if (ok && org) {
		const char *params[1] = {org};
		ok = ctl_exec(conn, "SELECT set_config('rd.org', $1, false)", 1, params, "--org");
	}
	if (!ok) {
		PQfinish(conn);
		return NULL;
	}
	return conn;
}

PGconn *ctl_connect(struct ctl *c)
{
	return ctl_connect_as(c, false);
}

PGconn *ctl_connect_reader(struct ctl *c)
{
	return ctl_connect_as(c, true);
}

bool ctl_sees_all_orgs(PGconn *conn, const char *what)
{
	PGresult *res = PQexec(conn, "SELECT rd.sees_all_orgs()");
	if (PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1) {
		char msg[512];
		rd_strlcpy(msg, PQresultErrorMessage(res), sizeof(msg));
		msg[strcspn(msg, "\n")] = '\0';
		PQclear(res);
		ctl_die("%s: %s", what, msg);
		return false;
	}
	bool all = strcmp(PQgetvalue(res, 0, 0), "t") == 0;
	PQclear(res);
	if (!all)
		ctl_die("%s: this login sees no organisation without --org (row-level security): "
			"give --org ORG, or set [postgres] migrate_conninfo to the owner's or a "
			"rosterd_admin login",
			what);
	return all;
}

PGresult *ctl_query(PGconn *conn, const char *name, int n, const char *const *params)
{
	char *sql = rd_query_text(name);
	if (!sql) {
		ctl_die("internal: no statement named %s", name);
		return NULL;
	}
	PGresult *res = PQexecParams(conn, sql, n, NULL, params, NULL, NULL, 0);
	free(sql);
	ExecStatusType st = PQresultStatus(res);
	if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK) {
		char msg[512];
		rd_strlcpy(msg, PQresultErrorMessage(res), sizeof(msg));
		msg[strcspn(msg, "\n")] = '\0';
		ctl_die("%s", msg);
		PQclear(res);
		return NULL;
	}
	return res;
}

const char *ctl_opt(struct ctl *c, const char *name)
{
	for (int i = 0; i + 1 < c->argc; i++)
		if (strcmp(c->argv[i], name) == 0)
			return c->argv[i + 1];
	return NULL;
}

int ctl_migrate(struct ctl *c)
{
	PGconn *conn = ctl_connect(c);
	if (!conn)
		return 1;
	struct rd_err err = {0};
	enum rd_status st = rd_migrate(conn, &err);
	PQfinish(conn);
	if (st != RD_OK)
		return ctl_die("%s", err.msg);
	printf("schema up to date (%zu migrations)\n", rd_migrations_count);
	return 0;
}

int ctl_messages(struct ctl *c)
{
	const char *org = NULL, *limit = "50";
	for (int i = 0; i < c->argc; i++) {
		if (strcmp(c->argv[i], "--org") == 0 && i + 1 < c->argc)
			org = c->argv[++i];
		else if (strcmp(c->argv[i], "--limit") == 0 && i + 1 < c->argc)
			limit = c->argv[++i];
		else
			return ctl_die("messages: unexpected argument %s", c->argv[i]);
	}
	if (!org)
		return ctl_die("messages: --org ORG is required");
	PGconn *conn = ctl_connect_reader(c);
	if (!conn)
		return 1;
	const char *params[2] = {org, limit};
	PGresult *res = ctl_query(conn, "ctl_messages", 2, params);
	int rc = 0;
	if (!res) {
		rc = 1;
	} else if (c->json) {
		json_t *arr = json_array();
		for (int r = 0; r < PQntuples(res); r++)
			json_array_append_new(
			    arr, json_pack("{s:s, s:s, s:s, s:s, s:s, s:s}", "org",
					   PQgetvalue(res, r, 0), "message_id", PQgetvalue(res, r, 1),
					   "type", PQgetvalue(res, r, 2), "outcome",
					   PQgetvalue(res, r, 3), "reason", PQgetvalue(res, r, 4), "at",
					   PQgetvalue(res, r, 5)));
		json_dumpf(arr, stdout, JSON_INDENT(2));
		fputc('\n', stdout);
		json_decref(arr);
	} else {
		printf("%-29s %-10s %-20s %s\n", "AT", "OUTCOME", "TYPE", "MESSAGE ID / REASON");
		for (int r = 0; r < PQntuples(res); r++) {
			printf("%-29s %-10s %-20s %s", PQgetvalue(res, r, 5), PQgetvalue(res, r, 3),
			       PQgetvalue(res, r, 2), PQgetvalue(res, r, 1));
			if (*PQgetvalue(res, r, 4))
				printf("  (%s)", PQgetvalue(res, r, 4));
			putchar('\n');
		}
	}
	PQclear(res);
	PQfinish(conn);
	return rc;
}

static const struct ctl_cmd cmds[] = {
    {"contact", "show ID|EMAIL [--org ORG] | find TEXT [--org ORG] [--limit N]",
     "participant dashboard; search by email, name or company", ctl_contact},
    {"dead", "list|show N|replay N|replay --all", "the dead-letter queue", ctl_dead},
    {"duplicates", "[--org ORG] [--limit N]", "candidate duplicate contacts, best first",
     ctl_duplicates},
    {"erase", "ID [--org ORG]", "erase a contact's personal data (GDPR)", ctl_erase},
    {"export", "VIEW [--org ORG] [--format csv|json] [-o FILE]", "export a report view",
     ctl_export},
    {"import", "FILE.csv --org ORG [--dry-run] [--sync on|off]",
     "import contacts through the matching rules", ctl_import},
    {"ledger", "check [--org ORG]", "check that balances, transactions and invoices add up",
     ctl_ledger},
    {"merge", "KEEP DROP [--org ORG]", "merge DROP into KEEP (reversible)", ctl_merge},
    {"messages", "--org ORG [--limit N]", "recent message outcomes of an organisation",
     ctl_messages},
    {"migrate", "", "apply pending schema migrations", ctl_migrate},
    {"outbox", "list|retry ...", "list queued, sent and failed mails; retry failed ones",
     ctl_outbox},
    {"status", "[--wait SECONDS]", "the latest status document of every running instance",
     ctl_status},
    {"unmerge", "MERGE_ID [--org ORG]", "undo a merge", ctl_unmerge},
};

static void usage(FILE *out)
{
	fprintf(out, "usage: rosterctl [-c FILE] [--json] COMMAND [ARGS]\n\ncommands:\n");
	for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++)
		fprintf(out, "  %-10s %-26s %s\n", cmds[i].name, cmds[i].args, cmds[i].help);
	fprintf(out, "\noptions:\n  -c, --config FILE  configuration (default " RD_CONFIG_DEFAULT_PATH
		     ")\n  --json             machine-readable output\n  -h, --help\n");
}

int main(int argc, char **argv)
{
	const char *path = RD_CONFIG_DEFAULT_PATH;
	struct ctl c = {0};
	static const struct option opts[] = {{"config", required_argument, NULL, 'c'},
					     {"json", no_argument, NULL, 'j'},
					     {"help", no_argument, NULL, 'h'},
					     {NULL, 0, NULL, 0}};
	int o;
	while ((o = getopt_long(argc, argv, "+c:h", opts, NULL)) != -1) {
		switch (o) {
		case 'c':
			path = optarg;
			break;
		case 'j':
			c.json = true;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (optind >= argc) {
		usage(stderr);
		return 2;
	}
	const char *name = argv[optind];
	const struct ctl_cmd *cmd = NULL;
	for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++)
		if (strcmp(cmds[i].name, name) == 0)
			cmd = &cmds[i];
	if (!cmd) {
		fprintf(stderr, "rosterctl: unknown command %s (see --help)\n", name);
		return 2;
	}
	c.argc = argc - optind - 1;
	c.argv = argv + optind + 1;
	for (int i = 0; i < c.argc; i++) {
		if (strcmp(c.argv[i], "--help") == 0 || strcmp(c.argv[i], "-h") == 0) {
			printf("usage: rosterctl [-c FILE] [--json] %s %s\n  %s\n", cmd->name,
			       cmd->args, cmd->help);
			return 0;
		}
		if (strcmp(c.argv[i], "--json") == 0) {
			c.json = true;
			memmove(&c.argv[i], &c.argv[i + 1], (size_t)(c.argc - i - 1) * sizeof(char *));
			c.argc--;
			i--;
		}
	}
	struct rd_err err = {0};
	struct rd_config *cfg = rd_config_load(path, &err);
	if (!cfg) {
		fprintf(stderr, "rosterctl: %s\n", err.msg);
		return 1;
	}
	rd_log_init("rosterctl", LOG_WARNING);
	c.cfg = cfg;
	int rc = cmd->run(&c);
	rd_config_free(cfg);
	return rc;
}
