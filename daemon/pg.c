/* pg.c: a small pool of PostgreSQL connections on the libevent loop.
 *
 * A job is a list of prepared statements. It is sent in pipeline mode with
 * one sync at the end, so the server runs it as one implicit transaction
 * and commits at the sync: one round trip per job whatever its size. The
 * result of the sync is the commit. Any error rolls the whole job back; the
 * caller decides what to do from the classification in rd_pg_done_cb.
 *
 * Connecting (and preparing) is blocking but bounded by connect_timeout;
 * everything on an established connection is non-blocking.
 *
 * A peer that stops answering without closing (a hung server or proxy: TCP
 * keepalives are still acknowledged) is noticed by a reply deadline per
 * connection: a job must finish within statement_timeout + 5 s (the server
 * cancels at statement_timeout; 60 s when that is 0), and a connection
 * idle for 5 s is pinged with an empty sync that must be answered within
 * 10 s. A missed deadline closes the connection as lost. */
#include "pg.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "migrations.h"

#define RD_PG_BACKOFF_MIN_MS 100
#define RD_PG_BACKOFF_MAX_MS 2000
/* DISCARD PLANS after 2 s on a connection, then after doubling intervals up
 * to a minute (see rd_pg_submit) */
#define RD_PG_REPLAN_MIN_US 2000000
#define RD_PG_REPLAN_MAX_US 60000000
#define RD_PG_PING_IDLE_MS 5000	   /* ping a connection idle this long */
#define RD_PG_PING_REPLY_MS 10000   /* the ping's reply deadline */
#define RD_PG_JOB_GRACE_MS 5000	   /* a job: statement_timeout + this */
#define RD_PG_JOB_NO_TIMEOUT_MS 60000 /* a job when statement_timeout = 0 */
#define RD_PG_SLOW_JOB_MS 2000     /* log a job that took this long */

enum conn_state { C_DOWN, C_IDLE, C_BUSY };

struct rd_pgconn {
	struct rd_pg *pg;
	int idx;
	PGconn *conn;
	struct event *rev;
	struct event *wev;
	struct event *timer;
	struct event *watch; /* reply deadline (busy) or idle ping (idle) */
	bool ping;	     /* the job in flight is a ping */
	enum conn_state state;
	int backoff_ms;
	int64_t replan_at_us;
	int64_t replan_every_us;
	/* the job in flight */
	rd_pg_row_cb on_row;
	rd_pg_done_cb on_done;
	void *arg;
	int nstmts;
	int cur;
	bool cur_seen;
	enum rd_status err_st;
	int err_idx;
	char errmsg[300];
	int64_t started_us; /* when the job was sent, for the slow-job log */
};

struct rd_pg {
	struct event_base *base;
	const struct rd_config *cfg;
	rd_pg_state_cb on_state;
	void *arg;
	int nconns;
	struct rd_pgconn *conns;
	bool connected;
};

static void conn_schedule(struct rd_pgconn *c);
static void conn_read_cb(evutil_socket_t fd, short what, void *arg);
static void conn_write_cb(evutil_socket_t fd, short what, void *arg);
static void conn_flush(struct rd_pgconn *c);
static void conn_lost(struct rd_pgconn *c, const char *why);

static void watch_in(struct rd_pgconn *c, int ms)
{
	struct timeval tv = {ms / 1000, (ms % 1000) * 1000};
	event_add(c->watch, &tv);
}

static int job_deadline_ms(const struct rd_pgconn *c)
{
	int st = c->pg->cfg->statement_timeout_ms;
	return st > 0 ? st + RD_PG_JOB_GRACE_MS : RD_PG_JOB_NO_TIMEOUT_MS;
}

static char *read_secret_file(const char *path, struct rd_err *err)
{
	FILE *f = fopen(path, "r");
	if (!f) {
		rd_errf(err, RD_FAIL, "[postgres] password_file %s: %s", path, strerror(errno));
		return NULL;
	}
	char buf[1024];
	size_t n = fread(buf, 1, sizeof(buf) - 1, f);
	fclose(f);
	buf[n] = '\0';
	while (n && (buf[n - 1] == '\n' || buf[n - 1] == '\r'))
		buf[--n] = '\0';
	return rd_xstrdup(buf);
}

/* Server notices (e.g. "already exists, skipping") go to the log at debug
 * level instead of libpq's default, stderr. */
static void notice_cb(void *arg, const char *message)
{
	(void)arg;
	char line[300];
	rd_strlcpy(line, message, sizeof(line));
	line[strcspn(line, "\n")] = '\0';
	rd_log(LOG_DEBUG, "pg.notice", "message=\"%s\"", line);
}

/* password_file: NULL or "" for none. */
static PGconn *connect_with(const struct rd_config *cfg, const char *conninfo,
			    const char *password_file, struct rd_err *err)
{
	char opts[64];
	snprintf(opts, sizeof(opts), "-c statement_timeout=%d", cfg->statement_timeout_ms);
	char *password = NULL;
	if (password_file && password_file[0]) {
		password = read_secret_file(password_file, err);
		if (!password)
			return NULL;
	}
	/* Our defaults come first: the operator's conninfo (expanded from
	 * dbname) overrides them; a password file overrides the conninfo. */
	const char *keys[] = {"connect_timeout", "keepalives", "keepalives_idle",
			      "keepalives_interval", "keepalives_count", "application_name",
			      "options", "dbname", password ? "password" : NULL, NULL};
	const char *vals[] = {"5", "1", "10", "3", "3", cfg->instance, opts, conninfo,
			      password, NULL};
	PGconn *conn = PQconnectdbParams(keys, vals, 1);
	free(password);
	if (!conn) {
		rd_errf(err, RD_FAIL, "postgres: out of memory");
		return NULL;
	}
	if (PQstatus(conn) != CONNECTION_OK) {
		rd_errf(err, RD_FAIL, "postgres: %s", PQerrorMessage(conn));
		PQfinish(conn);
		return NULL;
	}
	PQsetNoticeProcessor(conn, notice_cb, NULL);
	return conn;
}

PGconn *rd_pg_connect_blocking(const struct rd_config *cfg, struct rd_err *err)
{
	return connect_with(cfg, cfg->conninfo, cfg->pg_password_file, err);
}

/* [postgres] migrate_conninfo carries its own credentials (in the string,
 * ~/.pgpass, a client certificate or peer authentication): password_file
 * belongs to conninfo, the daemon's login, and is not applied to it. */
PGconn *rd_pg_connect_migrator(const struct rd_config *cfg, struct rd_err *err)
{
	if (!cfg->migrate_conninfo || !cfg->migrate_conninfo[0])
		return rd_pg_connect_blocking(cfg, err);
	return connect_with(cfg, cfg->migrate_conninfo, NULL, err);
}

/* Prepare every named statement of schema/queries on conn. */
static enum rd_status prepare_all(PGconn *conn, struct rd_err *err)
{
	const char *p = rd_queries_sql;
	while ((p = strstr(p, "\n-- name: ")) != NULL) {
		p += strlen("\n-- name: ");
		size_t n = strcspn(p, " \n");
		char name[128];
		if (n == 0 || n >= sizeof(name))
			return rd_errf(err, RD_FAIL, "schema/queries: bad name line");
		memcpy(name, p, n);
		name[n] = '\0';
		char *sql = rd_query_text(name);
		PGresult *res = PQprepare(conn, name, sql, 0, NULL);
		free(sql);
		if (PQresultStatus(res) != PGRES_COMMAND_OK) {
			rd_errf(err, RD_FAIL, "prepare %s: %s", name, PQresultErrorMessage(res));
			PQclear(res);
			return RD_FAIL;
		}
		PQclear(res);
	}
	return RD_OK;
}

static void report_state(struct rd_pg *pg)
{
	bool up = false;
	for (int i = 0; i < pg->nconns; i++)
		if (pg->conns[i].state != C_DOWN)
			up = true;
	if (up != pg->connected) {
		pg->connected = up;
		if (pg->on_state)
			pg->on_state(pg->arg, up);
	}
}

static void conn_close(struct rd_pgconn *c)
{
	if (c->rev) {
		event_free(c->rev);
		c->rev = NULL;
	}
	if (c->wev) {
		event_free(c->wev);
		c->wev = NULL;
	}
	if (c->conn) {
		PQfinish(c->conn);
		c->conn = NULL;
	}
	event_del(c->watch);
	c->ping = false;
	c->state = C_DOWN;
}

/* End the job in flight with st and hand the outcome to its owner. */
static void job_finish(struct rd_pgconn *c, enum rd_status st, int idx, const char *msg)
{
	rd_pg_done_cb done = c->on_done;
	void *arg = c->arg;
	bool ping = c->ping;
	int64_t took_ms = (rd_mono_us() - c->started_us) / 1000;
	if (!ping && took_ms >= RD_PG_SLOW_JOB_MS)
		rd_log(LOG_WARNING, "pg.slow_job", "conn=%d statements=%d ms=%lld status=%s", c->idx,
		       c->nstmts, (long long)took_ms, rd_status_name(st));
	c->on_done = NULL;
	c->on_row = NULL;
	c->arg = NULL;
	c->ping = false;
	if (st == RD_FAIL) {
		conn_close(c);
		conn_schedule(c);
		report_state(c->pg);
	} else {
		c->state = C_IDLE;
		watch_in(c, RD_PG_PING_IDLE_MS);
	}
	if (done)
		done(arg, st, idx, msg);
	else if (ping && c->state == C_IDLE && c->pg->connected && c->pg->on_state)
		c->pg->on_state(c->pg->arg, true); /* idle again: work may be waiting */
}

/* The reply deadline of a job passed, or a connection was idle long
 * enough to be pinged. */
static void conn_watch_cb(evutil_socket_t fd, short what, void *arg)
{
	struct rd_pgconn *c = arg;
	char why[96];
	(void)fd;
	(void)what;
	if (c->state == C_BUSY) {
		snprintf(why, sizeof(why), "no reply from the server within %d ms",
			 c->ping ? RD_PG_PING_REPLY_MS : job_deadline_ms(c));
		conn_lost(c, why);
	} else if (c->state == C_IDLE) {
		c->state = C_BUSY;
		c->ping = true;
		c->on_row = NULL;
		c->on_done = NULL;
		c->arg = NULL;
		c->nstmts = 0;
		c->cur = 0;
		c->cur_seen = false;
		c->err_st = RD_OK;
		c->err_idx = -1;
		c->errmsg[0] = '\0';
		if (!PQpipelineSync(c->conn)) {
			conn_lost(c, PQerrorMessage(c->conn));
			return;
		}
		watch_in(c, RD_PG_PING_REPLY_MS);
		conn_flush(c);
	}
}

static void conn_lost(struct rd_pgconn *c, const char *why)
{
	char msg[300];
	rd_strlcpy(msg, why, sizeof(msg));
	for (char *p = msg; *p; p++)
		if (*p == '\n')
			*p = ' ';
	rd_log(LOG_WARNING, "pg.lost", "conn=%d error=\"%s\"", c->idx, msg);
	if (c->state == C_BUSY) {
		job_finish(c, RD_FAIL, -1, msg);
	} else {
		conn_close(c);
		conn_schedule(c);
		report_state(c->pg);
	}
}

static enum rd_status classify(const PGresult *r)
{
	const char *s = PQresultErrorField(r, PG_DIAG_SQLSTATE);
	if (!s)
		return RD_FAIL;
	if (strncmp(s, "08", 2) == 0 || strcmp(s, "57P01") == 0 || strcmp(s, "57P02") == 0 ||
	    strcmp(s, "57P03") == 0)
		return RD_FAIL;
	if (strncmp(s, "40", 2) == 0 || strcmp(s, "55P03") == 0 || strcmp(s, "57014") == 0 ||
	    strncmp(s, "53", 2) == 0)
		return RD_RETRY;
	return RD_REJECT;
}

static void conn_results(struct rd_pgconn *c)
{
	int nulls = 0;
	while (c->state == C_BUSY) {
		if (PQisBusy(c->conn))
			return;
		PGresult *r = PQgetResult(c->conn);
		if (!r) {
			if (c->cur_seen) {
				c->cur++;
				c->cur_seen = false;
				nulls = 0;
			} else if (++nulls > 1) {
				return;
			}
			continue;
		}
		nulls = 0;
		switch (PQresultStatus(r)) {
		case PGRES_PIPELINE_SYNC:
			PQclear(r);
			job_finish(c, c->err_st, c->err_idx, c->errmsg);
			return;
		case PGRES_TUPLES_OK:
		case PGRES_COMMAND_OK:
			if (c->err_st == RD_OK && c->on_row)
				c->on_row(c->arg, c->cur, r);
			break;
		case PGRES_PIPELINE_ABORTED:
			break;
		default:
			if (c->err_st == RD_OK) {
				c->err_st = classify(r);
				c->err_idx = c->cur;
				rd_strlcpy(c->errmsg, PQresultErrorMessage(r), sizeof(c->errmsg));
				for (char *p = c->errmsg; *p; p++)
					if (*p == '\n')
						*p = ' ';
			}
			break;
		}
		c->cur_seen = true;
		PQclear(r);
	}
}

static void conn_read_cb(evutil_socket_t fd, short what, void *arg)
{
	struct rd_pgconn *c = arg;
	(void)fd;
	(void)what;
	if (!PQconsumeInput(c->conn) || PQstatus(c->conn) != CONNECTION_OK) {
		conn_lost(c, PQerrorMessage(c->conn));
		return;
	}
	if (c->state == C_BUSY) {
		conn_results(c);
	} else {
		/* notices only; results outside a job are not expected */
		PGresult *r;
		while (!PQisBusy(c->conn) && (r = PQgetResult(c->conn)) != NULL)
			PQclear(r);
	}
}

static void conn_flush(struct rd_pgconn *c)
{
	int r = PQflush(c->conn);
	if (r < 0) {
		conn_lost(c, PQerrorMessage(c->conn));
	} else if (r > 0) {
		event_add(c->wev, NULL);
	}
}

static void conn_write_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	conn_flush(arg);
}

static enum rd_status conn_open(struct rd_pgconn *c, struct rd_err *err)
{
	PGconn *conn = rd_pg_connect_blocking(c->pg->cfg, err);
	if (!conn)
		return RD_FAIL;
	/* Every statement rd.apply runs looks rows up by key. Its PL/pgSQL
	 * plans are made once per connection, and a table that is small at
	 * that moment (a new database, or just after autovacuum analysed it
	 * while small) gets a sequential scan that stays cached while the
	 * table grows: the same lookups then cost a scan each. The planner
	 * still scans sequentially where no index applies; results never
	 * depend on this. See docs/performance.md. */
	PGresult *set = PQexec(conn, "SET enable_seqscan = off");
	if (PQresultStatus(set) != PGRES_COMMAND_OK) {
		rd_errf(err, RD_FAIL, "postgres: SET enable_seqscan: %s", PQresultErrorMessage(set));
		PQclear(set);
		PQfinish(conn);
		return RD_FAIL;
	}
	PQclear(set);
	if (prepare_all(conn, err) != RD_OK) {
		PQfinish(conn);
		return RD_FAIL;
	}
	if (PQsetnonblocking(conn, 1) != 0 || !PQenterPipelineMode(conn)) {
		rd_errf(err, RD_FAIL, "postgres: cannot enter pipeline mode: %s",
			PQerrorMessage(conn));
		PQfinish(conn);
		return RD_FAIL;
	}
	c->conn = conn;
	c->rev = event_new(c->pg->base, PQsocket(conn), EV_READ | EV_PERSIST, conn_read_cb, c);
	c->wev = event_new(c->pg->base, PQsocket(conn), EV_WRITE, conn_write_cb, c);
	event_add(c->rev, NULL);
	c->state = C_IDLE;
	c->backoff_ms = 0;
	c->replan_every_us = RD_PG_REPLAN_MIN_US;
	c->replan_at_us = rd_mono_us() + c->replan_every_us;
	watch_in(c, RD_PG_PING_IDLE_MS);
	return RD_OK;
}

static void conn_timer_cb(evutil_socket_t fd, short what, void *arg)
{
	struct rd_pgconn *c = arg;
	struct rd_err err;
	(void)fd;
	(void)what;
	if (c->state != C_DOWN)
		return;
	if (conn_open(c, &err) != RD_OK) {
		rd_log(LOG_WARNING, "pg.connect_failed", "conn=%d retry_ms=%d error=\"%s\"", c->idx,
		       c->backoff_ms, err.msg);
		conn_schedule(c);
		return;
	}
	rd_log(LOG_NOTICE, "pg.connected", "conn=%d", c->idx);
	/* tell the owner even when others were up: there is a new idle
	 * connection to hand work to */
	if (c->pg->connected && c->pg->on_state)
		c->pg->on_state(c->pg->arg, true);
	else
		report_state(c->pg);
}

static void conn_schedule(struct rd_pgconn *c)
{
	if (c->backoff_ms == 0)
		c->backoff_ms = RD_PG_BACKOFF_MIN_MS;
	else if ((c->backoff_ms *= 2) > RD_PG_BACKOFF_MAX_MS)
		c->backoff_ms = RD_PG_BACKOFF_MAX_MS;
	struct timeval tv = {c->backoff_ms / 1000, (c->backoff_ms % 1000) * 1000};
	event_add(c->timer, &tv);
}

struct rd_pg *rd_pg_new(struct event_base *base, const struct rd_config *cfg,
			rd_pg_state_cb on_state, void *arg)
{
	struct rd_pg *pg = rd_xcalloc(1, sizeof(*pg));
	pg->base = base;
	pg->cfg = cfg;
	pg->on_state = on_state;
	pg->arg = arg;
	pg->nconns = cfg->connections;
	pg->conns = rd_xcalloc((size_t)pg->nconns, sizeof(*pg->conns));
	for (int i = 0; i < pg->nconns; i++) {
		struct rd_pgconn *c = &pg->conns[i];
		c->pg = pg;
		c->idx = i;
		c->state = C_DOWN;
		c->timer = evtimer_new(base, conn_timer_cb, c);
		c->watch = evtimer_new(base, conn_watch_cb, c);
	}
	return pg;
}

void rd_pg_free(struct rd_pg *pg)
{
	if (!pg)
		return;
	for (int i = 0; i < pg->nconns; i++) {
		conn_close(&pg->conns[i]);
		event_free(pg->conns[i].timer);
		event_free(pg->conns[i].watch);
	}
	free(pg->conns);
	free(pg);
}

void rd_pg_set_config(struct rd_pg *pg, const struct rd_config *cfg)
{
	pg->cfg = cfg;
}

enum rd_status rd_pg_start(struct rd_pg *pg, struct rd_err *err)
{
	PGconn *conn = rd_pg_connect_migrator(pg->cfg, err);
	if (!conn)
		return RD_FAIL;
	enum rd_status st = rd_migrate(conn, err);
	PQfinish(conn);
	if (st != RD_OK)
		return st;
	for (int i = 0; i < pg->nconns; i++) {
		struct rd_pgconn *c = &pg->conns[i];
		if (conn_open(c, err) != RD_OK) {
			rd_log(LOG_WARNING, "pg.connect_failed", "conn=%d error=\"%s\"", i, err->msg);
			conn_schedule(c);
		}
	}
	report_state(pg);
	return pg->connected ? RD_OK : rd_errf(err, RD_FAIL, "postgres: no connection");
}

enum rd_status rd_pg_submit(struct rd_pg *pg, int conn, const struct rd_pg_stmt *stmts, int n,
			    rd_pg_row_cb on_row, rd_pg_done_cb on_done, void *arg)
{
	struct rd_pgconn *c = NULL;
	if (conn >= 0 && conn < pg->nconns) {
		if (pg->conns[conn].state == C_IDLE)
			c = &pg->conns[conn];
	} else {
		for (int i = 0; i < pg->nconns; i++) {
			if (pg->conns[i].state == C_IDLE) {
				c = &pg->conns[i];
				break;
			}
		}
	}
	if (!c)
		return RD_RETRY;
	c->state = C_BUSY;
	c->on_row = on_row;
	c->on_done = on_done;
	c->arg = arg;
	c->nstmts = n;
	c->cur = 0;
	c->cur_seen = false;
	c->err_st = RD_OK;
	c->err_idx = -1;
	c->errmsg[0] = '\0';
	c->started_us = rd_mono_us();
	watch_in(c, job_deadline_ms(c));
	for (int i = 0; i < n; i++) {
		if (!PQsendQueryPrepared(c->conn, stmts[i].name, stmts[i].nparams, stmts[i].values,
					 NULL, NULL, 0)) {
			conn_lost(c, PQerrorMessage(c->conn));
			return RD_OK; /* on_done already called with RD_FAIL */
		}
	}
	/* The plans PL/pgSQL caches for the session were made for the tables
	 * as they were then. A table that was nearly empty (a new database)
	 * gets plans that pick any index with org first and filter the rest:
	 * a scan of the organisation's rows that grows with the table, until
	 * autovacuum's next ANALYZE of it (a minute or more). Planning again
	 * now and then, with the tables' current sizes, keeps the look-ups on
	 * their keys; it costs a few milliseconds of planning per connection
	 * and interval. The result comes after the job's statements (index
	 * n: on_row callers ignore it). docs/performance.md */
	int64_t now = rd_mono_us();
	if (now >= c->replan_at_us) {
		if (!PQsendQueryParams(c->conn, "DISCARD PLANS", 0, NULL, NULL, NULL, NULL, 0)) {
			conn_lost(c, PQerrorMessage(c->conn));
			return RD_OK;
		}
		if ((c->replan_every_us *= 2) > RD_PG_REPLAN_MAX_US)
			c->replan_every_us = RD_PG_REPLAN_MAX_US;
		c->replan_at_us = now + c->replan_every_us;
	}
	if (!PQpipelineSync(c->conn)) {
		conn_lost(c, PQerrorMessage(c->conn));
		return RD_OK;
	}
	conn_flush(c);
	return RD_OK;
}

int rd_pg_idle(const struct rd_pg *pg)
{
	int n = 0;
	for (int i = 0; i < pg->nconns; i++)
		n += pg->conns[i].state == C_IDLE;
	return n;
}

int rd_pg_busy(const struct rd_pg *pg)
{
	int n = 0;
	for (int i = 0; i < pg->nconns; i++)
		n += pg->conns[i].state == C_BUSY;
	return n;
}

bool rd_pg_conn_idle(const struct rd_pg *pg, int i)
{
	return i >= 0 && i < pg->nconns && pg->conns[i].state == C_IDLE;
}

bool rd_pg_conn_up(const struct rd_pg *pg, int i)
{
	return i >= 0 && i < pg->nconns && pg->conns[i].state != C_DOWN;
}

int rd_pg_nconns(const struct rd_pg *pg)
{
	return pg->nconns;
}

bool rd_pg_connected(const struct rd_pg *pg)
{
	return pg->connected;
}
