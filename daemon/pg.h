/* pg.h: PostgreSQL connections driven by the event loop. Each connection
 * runs one job at a time: a list of prepared statements sent in libpq
 * pipeline mode and executed as ONE implicit transaction (committed at the
 * pipeline's sync, rolled back whole on any error). Lost connections are
 * re-established with growing back-off. Statements come from
 * schema/queries (prepared on every connection). Owns struct rd_pg. */
#ifndef RD_PG_H
#define RD_PG_H

#include <event2/event.h>
#include <libpq-fe.h>
#include <stdbool.h>

#include "config.h"
#include "util.h"

struct rd_pg;

struct rd_pg_stmt {
	const char *name;            /* a "-- name:" of schema/queries */
	int nparams;
	const char *const *values;   /* borrowed until the job's done callback */
};

/* Called for each statement's result, in order (only when it succeeded). */
typedef void (*rd_pg_row_cb)(void *arg, int idx, const PGresult *res);
/* Called once per job: RD_OK committed; RD_RETRY transient (deadlock,
 * serialization, timeout: run again); RD_REJECT a statement failed for a
 * reason that will repeat (msg says which, idx_failed names it); RD_FAIL
 * the connection was lost (commit state unknown). */
typedef void (*rd_pg_done_cb)(void *arg, enum rd_status st, int idx_failed, const char *msg);
/* Called when connectivity changes (at least one connection up or none). */
typedef void (*rd_pg_state_cb)(void *arg, bool connected);

struct rd_pg *rd_pg_new(struct event_base *base, const struct rd_config *cfg,
			rd_pg_state_cb on_state, void *arg);
void rd_pg_free(struct rd_pg *pg);
/* Connect the first connection synchronously and apply migrations; the
 * others connect in the background. RD_OK or RD_FAIL. */
enum rd_status rd_pg_start(struct rd_pg *pg, struct rd_err *err) RD_WUR;
void rd_pg_set_config(struct rd_pg *pg, const struct rd_config *cfg);

/* Hand a job to connection `conn` (or to any idle one when conn < 0).
 * RD_OK when taken (callbacks follow from the loop; on a send failure
 * on_done(RD_FAIL) may run before this returns), RD_RETRY when that
 * connection is not idle. Now and then the job carries one more statement
 * after the n given (DISCARD PLANS): on_row may see index n. */
enum rd_status rd_pg_submit(struct rd_pg *pg, int conn, const struct rd_pg_stmt *stmts, int n,
			    rd_pg_row_cb on_row, rd_pg_done_cb on_done, void *arg) RD_WUR;
/* Is connection i up and idle (ready for a job) / up at all? */
bool rd_pg_conn_idle(const struct rd_pg *pg, int i);
bool rd_pg_conn_up(const struct rd_pg *pg, int i);
int rd_pg_nconns(const struct rd_pg *pg);
int rd_pg_idle(const struct rd_pg *pg);  /* connections ready for a job */
int rd_pg_busy(const struct rd_pg *pg);  /* jobs in flight */
bool rd_pg_connected(const struct rd_pg *pg);

/* A blocking connection with the same settings, for rosterctl. */
PGconn *rd_pg_connect_blocking(const struct rd_config *cfg, struct rd_err *err);
/* A blocking connection as the schema's owner: [postgres] migrate_conninfo,
 * or conninfo when that is empty. For migrations and rosterctl. */
PGconn *rd_pg_connect_migrator(const struct rd_config *cfg, struct rd_err *err);

#endif
