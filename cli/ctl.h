/* ctl.h: what rosterctl's commands share: the parsed command line, the
 * configuration, a database connection, one-line errors. Each command is a
 * function `int ctl_<name>(struct ctl *c)` in its own file under cli/,
 * listed in the table of rosterctl.c. */
#ifndef RD_CTL_H
#define RD_CTL_H

#include <libpq-fe.h>
#include <stdbool.h>

#include "config.h"

struct ctl {
	const struct rd_config *cfg;
	bool json;
	int argc;     /* the command's own arguments */
	char **argv;
};

/* "rosterctl: <message>" on stderr; returns 1 (the exit status). */
int ctl_die(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* A blocking connection as the schema's owner ([postgres] migrate_conninfo,
 * or conninfo when that is empty), or NULL (error printed). With --org ORG
 * among the command's arguments, the session works in ORG (rd.org: row-level
 * security, docs/security.md). */
PGconn *ctl_connect(struct ctl *c);
/* The same, read-only: the session acts as rosterd_reader (SET ROLE, when
 * the login is a member) with default_transaction_read_only on. For
 * exports and other commands that only read. */
PGconn *ctl_connect_reader(struct ctl *c);
/* Commands without --org: true when this session sees every organisation,
 * else false with a one-line error naming `what` printed. */
bool ctl_sees_all_orgs(PGconn *conn, const char *what);
/* Run a named statement of schema/queries with text parameters; NULL
 * (error printed) unless it returned rows or a command status. */
PGresult *ctl_query(PGconn *conn, const char *name, int n, const char *const *params);
/* The value after option `name` (e.g. "--org") in the command's arguments,
 * or NULL. */
const char *ctl_opt(struct ctl *c, const char *name);
/* A blocking AMQP connection (channel 1 open) with the daemon's [amqp]
 * settings, trying the configured URLs in order, or NULL (error printed).
 * cli/dead.c. */
struct amqp_connection_state_t_;
struct amqp_connection_state_t_ *ctl_amqp_connect(struct ctl *c);
void ctl_amqp_close(struct amqp_connection_state_t_ *st);

int ctl_messages(struct ctl *c);
int ctl_migrate(struct ctl *c);
int ctl_ledger(struct ctl *c);  /* cli/ledger.c */
int ctl_outbox(struct ctl *c);  /* cli/outbox.c */
/* Step 5, admin: cli/contact.c, duplicates.c, merge.c, erase.c, export.c,
 * import.c, dead.c, status.c */
int ctl_contact(struct ctl *c);
int ctl_duplicates(struct ctl *c);
int ctl_merge(struct ctl *c);
int ctl_unmerge(struct ctl *c);
int ctl_erase(struct ctl *c);
int ctl_export(struct ctl *c);
int ctl_import(struct ctl *c);
int ctl_dead(struct ctl *c);
int ctl_status(struct ctl *c);

#endif
