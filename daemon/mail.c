/* mail.c: the mail workers. Each of the [smtp] workers threads loops:
 *
 *   claim up to 128-512 due rows (rd.outbox_claim: SKIP LOCKED, a
 *   claim token and a lease) -> build each message (template.c) -> send
 *   them all in ONE libesmtp session (one connection for the batch) ->
 *   classify every message from its MAIL, RCPT and end-of-DATA replies ->
 *   record the outcomes in one statement (rd.outbox_record, only for rows
 *   the claim still holds) -> report counters to the loop.
 *
 * When nothing is due a worker sleeps in poll(2) on its PostgreSQL socket
 * (LISTEN rd_outbox: rd.outbox_queue notifies at commit), the stop eventfd
 * and a timeout until the next due row.
 *
 * Why the workers have their own blocking PostgreSQL connections (STYLE
 * prefers the loop to own PG): a worker must renew its lease from inside a
 * running SMTP session (libesmtp callbacks) and record results even while
 * the loop drains or has exited; routing that through the loop would tie
 * mail delivery to the message pipeline's connections and its drain. The
 * cost is one connection per worker. Counters still go to the loop the
 * STYLE way: a locked accumulator plus an eventfd written only when the
 * accumulator was empty.
 *
 * Bounded waits (a stuck server never holds a worker or the shutdown
 * beyond its timeout): every libesmtp protocol phase has [smtp] timeout;
 * connect(2), which libesmtp does blocking, is bounded by a per-thread
 * POSIX timer that sends RD_MAIL_SIG to the worker (no SA_RESTART: the
 * connect fails with EINTR), re-fired every 100 ms until the session is
 * connected. Draining fires it at once for workers still connecting. */
#include "mail.h"

#include <auth-client.h>
/* before libesmtp.h: it declares smtp_starttls_set_ctx only when OpenSSL's
 * headers came first */
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <dirent.h>
#include <errno.h>
#include <libesmtp.h>
#include <libpq-fe.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "daemon.h"
#include "log.h"
#include "migrations.h"
#include "pg.h"
#include "template.h"

/* Rows per claim, i.e. per SMTP session: RD_MAIL_BATCH, doubled after
 * each full claim up to RD_MAIL_BATCH_MAX while a backlog lasts (fewer
 * claims, records and sessions per mail: bench/mail_bench.sh, 6,500 ->
 * 7,400 mails/s on average over 9 alternating rounds), back to
 * RD_MAIL_BATCH as soon as a claim is not full, so that one worker does
 * not take a few hundred rows alone that others could share. A claim
 * grows only after a session shorter than RD_MAIL_GROW_US whose messages,
 * as built and held for the session, total under RD_MAIL_GROW_BYTES: a
 * slow server keeps sessions short enough for a drain (drain_timeout,
 * 10 s by default, must see the session in flight end and be recorded),
 * and large mails keep a claim's memory bounded. */
#define RD_MAIL_BATCH 128
#define RD_MAIL_BATCH_MAX 512
#define RD_MAIL_GROW_US 2000000
#define RD_MAIL_GROW_BYTES (8u << 20)
#define RD_MAIL_IDLE_MAX_MS 5000 /* longest sleep without a notification */
#define RD_MAIL_IDLE_MIN_MS 20	 /* due rows locked by others: do not spin */
#define RD_MAIL_ERRLEN 300
#define RD_MAIL_BACKOFF_MAX_MS 2000

/* snprintf whose truncation is intended (error texts are cut to fit) */
static void errfmt(char *out, size_t size, const char *fmt, ...) RD_PRINTF(3, 4);
static void errfmt(char *out, size_t size, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(out, size, fmt, ap);
	va_end(ap);
}

enum phase { PH_IDLE, PH_CONNECTING, PH_SESSION };

/* One claimed row. */
struct job {
	char *org;
	char *id; /* outbox_id, as text */
	char *text;
	char from_addr[256], to_addr[256];
	int64_t window_ms;
	int window_attempts, attempts;
	smtp_message_t msg;
	smtp_recipient_t rcpt;
	/* outcome */
	const char *status; /* "sent", "retrying", "failed" */
	char err[RD_MAIL_ERRLEN];
	bool has_err;
	int64_t delay_ms;
};

struct worker {
	struct rd_mail *m;
	int idx;
	pthread_t tid;
	bool started, joined;
	PGconn *conn;
	timer_t timer;
	bool timer_ok;
	pthread_mutex_t plock; /* phase + timer arming, against rd_mail_drain */
	enum phase phase;
	auth_context_t auth;
	/* the claim in flight */
	char claim[40];
	int lease_ms;
	int64_t renew_at_us;
	int claim_size; /* rows asked for by the next claim */
	/* the session in flight */
	int timeout_s;
	int64_t activity_us;
	char last_reply[RD_MAIL_ERRLEN];
	char session_error[RD_MAIL_ERRLEN];
	int backoff_ms;
};

struct rd_mail {
	struct event_base *base;
	struct rd_outbox_counters *out; /* the loop's; written in on_results only */
	struct rd_config *cfg;		/* a private copy: PG settings, fixed SMTP keys */
	char *password;
	char hostport[300];
	int sig;

	pthread_mutex_t lock; /* guards the fields below */
	int retry_base_ms, lifetime_s, timeout_s;
	struct rd_outbox_counters pending;
	bool pending_any;

	int efd;    /* workers -> loop: counters pending */
	int wakefd; /* loop -> workers: stop (never read: stays readable) */
	struct event *ev;
	atomic_bool stopping;
	atomic_llong deadline_us;
	bool draining, started, auth_init;
	int nworkers;
	struct worker *w;
	/* STARTTLS: our own context, handed to every session. libesmtp 1.1
	 * frees the context of a session when the session is destroyed, and
	 * its built-in default context is a process-wide one: the second
	 * session after a first one that negotiated TLS used freed memory
	 * (ASan: heap-use-after-free in SSL_new). smtp_starttls_set_ctx takes
	 * a reference of its own, so this one lives until rd_mail_free. */
	SSL_CTX *tls;
};

static const char *const worker_stmts[] = {"outbox_claim", "outbox_renew", "outbox_record",
					   "outbox_next_due"};

/* ---- small helpers ---- */

static void one_line(char *s)
{
	rd_tpl_header_clean(s);
	size_t n = strlen(s);
	while (n && s[n - 1] == ' ')
		s[--n] = '\0';
}

static char *read_secret(const char *path, struct rd_err *err)
{
	FILE *f = fopen(path, "r");
	if (!f) {
		rd_errf(err, RD_FAIL, "[smtp] password_file %s: %s", path, strerror(errno));
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

static void on_interrupt(int sig)
{
	(void)sig; /* only there to make a blocking connect(2) fail with EINTR */
}

/* Sleep up to ms, or until stopping. */
static void nap(struct rd_mail *m, int ms)
{
	struct pollfd p = {m->wakefd, POLLIN, 0};
	if (!atomic_load(&m->stopping))
		(void)poll(&p, 1, ms);
}

/* Counters to the loop (STYLE: locked queue + eventfd written when empty). */
static void report(struct rd_mail *m, uint64_t queued, uint64_t sent, uint64_t retrying,
		   uint64_t failed)
{
	if (!(queued | sent | retrying | failed))
		return;
	pthread_mutex_lock(&m->lock);
	bool was_empty = !m->pending_any;
	m->pending.queued += queued;
	m->pending.sent += sent;
	m->pending.retrying += retrying;
	m->pending.failed += failed;
	m->pending_any = true;
	pthread_mutex_unlock(&m->lock);
	if (was_empty) {
		uint64_t one = 1;
		ssize_t w = write(m->efd, &one, sizeof(one));
		(void)w; /* the counter only grows; a lost wake-up is impossible */
	}
}

static void on_results(evutil_socket_t fd, short what, void *arg)
{
	struct rd_mail *m = arg;
	uint64_t v;
	(void)what;
	ssize_t r = read(fd, &v, sizeof(v));
	(void)r;
	pthread_mutex_lock(&m->lock);
	struct rd_outbox_counters p = m->pending;
	memset(&m->pending, 0, sizeof(m->pending));
	m->pending_any = false;
	pthread_mutex_unlock(&m->lock);
	m->out->queued += p.queued;
	m->out->sent += p.sent;
	m->out->retrying += p.retrying;
	m->out->failed += p.failed;
}

/* ---- PostgreSQL (the worker's own connection) ---- */

static void pg_drop(struct worker *w)
{
	if (w->conn) {
		PQfinish(w->conn);
		w->conn = NULL;
	}
}

static bool pg_open(struct worker *w)
{
	struct rd_err err = {0};
	PGconn *c = rd_pg_connect_blocking(w->m->cfg, &err);
	if (!c) {
		rd_log(LOG_WARNING, "mail.pg_connect_failed", "worker=%d error=\"%s\"", w->idx,
		       err.msg);
		return false;
	}
	for (size_t i = 0; i < sizeof(worker_stmts) / sizeof(worker_stmts[0]); i++) {
		char *sql = rd_query_text(worker_stmts[i]);
		PGresult *res = PQprepare(c, worker_stmts[i], sql, 0, NULL);
		free(sql);
		if (PQresultStatus(res) != PGRES_COMMAND_OK) {
			char msg[300];
			rd_strlcpy(msg, PQresultErrorMessage(res), sizeof(msg));
			one_line(msg);
			rd_log(LOG_WARNING, "mail.pg_prepare_failed",
			       "worker=%d stmt=%s error=\"%s\"", w->idx, worker_stmts[i], msg);
			PQclear(res);
			PQfinish(c);
			return false;
		}
		PQclear(res);
	}
	char *listen = rd_query_text("outbox_listen");
	PGresult *res = PQexec(c, listen);
	free(listen);
	bool ok = PQresultStatus(res) == PGRES_COMMAND_OK;
	PQclear(res);
	if (!ok) {
		PQfinish(c);
		return false;
	}
	w->conn = c;
	return true;
}

static void drain_notifies(struct worker *w)
{
	PGnotify *n;
	while (w->conn && (n = PQnotifies(w->conn)) != NULL)
		PQfreemem(n);
}

/* Run a prepared statement; NULL (and the connection dropped when it is
 * gone) on failure. */
static PGresult *pg_run(struct worker *w, const char *name, int n, const char *const *params)
{
	if (!w->conn)
		return NULL;
	PGresult *res = PQexecPrepared(w->conn, name, n, params, NULL, NULL, 0);
	if (PQresultStatus(res) == PGRES_TUPLES_OK)
		return res;
	char msg[300];
	rd_strlcpy(msg, PQresultErrorMessage(res), sizeof(msg));
	one_line(msg);
	rd_log(LOG_WARNING, "mail.pg_failed", "worker=%d stmt=%s error=\"%s\"", w->idx, name, msg);
	PQclear(res);
	if (PQstatus(w->conn) != CONNECTION_OK)
		pg_drop(w);
	return NULL;
}

/* Extend the lease of the claim in flight when half of it is gone. Called
 * from libesmtp's callbacks: every protocol step, every message line. */
static void maybe_renew(struct worker *w)
{
	int64_t now = rd_mono_us();
	if (!w->claim[0] || now < w->renew_at_us)
		return;
	char lease[16];
	snprintf(lease, sizeof(lease), "%d", w->lease_ms);
	const char *p[2] = {w->claim, lease};
	PGresult *res = pg_run(w, "outbox_renew", 2, p);
	if (res) {
		PQclear(res);
		w->renew_at_us = now + (int64_t)w->lease_ms * 500;
	} else {
		w->renew_at_us = now + 1000000; /* try again soon */
	}
}

/* ---- libesmtp callbacks ---- */

static void arm_timer(struct worker *w, long first_ns)
{
	if (!w->timer_ok)
		return;
	struct itimerspec its = {{0, 100 * 1000 * 1000},
				 {first_ns / 1000000000, first_ns % 1000000000}};
	timer_settime(w->timer, 0, &its, NULL);
}

static void disarm_timer(struct worker *w)
{
	if (!w->timer_ok)
		return;
	struct itimerspec z = {{0, 0}, {0, 0}};
	timer_settime(w->timer, 0, &z, NULL);
}

static void set_phase(struct worker *w, enum phase ph)
{
	pthread_mutex_lock(&w->plock);
	if (ph != PH_CONNECTING)
		disarm_timer(w);
	else
		arm_timer(w, (long)w->timeout_s * 1000000000L);
	w->phase = ph;
	pthread_mutex_unlock(&w->plock);
}

/* TCP_NODELAY on our SMTP connections. libesmtp buffers 2048 bytes, so a
 * message body goes out as several writes before the server answers; with
 * Nagle's algorithm and the server's delayed ACK each mail would wait
 * ~40 ms. libesmtp does not expose its socket: set the option on every TCP
 * socket of this process connected to the relay's port (all of them are
 * mail worker connections; setting it twice is harmless). */
static void nodelay_relay_sockets(int port)
{
	DIR *dir = opendir("/proc/self/fd");
	if (!dir)
		return;
	struct dirent *e;
	while ((e = readdir(dir)) != NULL) {
		if (e->d_name[0] < '0' || e->d_name[0] > '9')
			continue;
		int fd = atoi(e->d_name);
		struct sockaddr_storage ss;
		socklen_t sl = sizeof(ss);
		if (fd == dirfd(dir) || getpeername(fd, (struct sockaddr *)&ss, &sl) != 0)
			continue;
		int p = ss.ss_family == AF_INET	   ? ntohs(((struct sockaddr_in *)&ss)->sin_port)
			: ss.ss_family == AF_INET6 ? ntohs(((struct sockaddr_in6 *)&ss)->sin6_port)
						   : -1;
		if (p != port)
			continue;
		int one = 1;
		(void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	}
	closedir(dir);
}

static void event_cb(smtp_session_t s, int ev, void *arg, ...)
{
	struct worker *w = arg;
	bool try = w->m->cfg->starttls == RD_STARTTLS_TRY;
	va_list ap;
	(void)s;
	va_start(ap, arg);
	switch (ev) {
	case SMTP_EV_CONNECT:
		set_phase(w, PH_SESSION);
		w->activity_us = rd_mono_us();
		nodelay_relay_sockets(w->m->cfg->smtp_port);
		break;
	case SMTP_EV_EXTNA_STARTTLS:
		snprintf(
		    w->session_error, sizeof(w->session_error),
		    "STARTTLS required ([smtp] starttls = require) but not offered by the server");
		break;
	case SMTP_EV_INVALID_PEER_CERTIFICATE: {
		long vfy = va_arg(ap, long);
		int *ok = va_arg(ap, int *);
		/* try: opportunistic TLS, any certificate; require: verified */
		*ok = try;
		if (!try)
			snprintf(w->session_error, sizeof(w->session_error),
				 "TLS: server certificate not trusted (verify error %ld)", vfy);
		break;
	}
	case SMTP_EV_NO_PEER_CERTIFICATE:
	case SMTP_EV_WRONG_PEER_CERTIFICATE: {
		int *ok = va_arg(ap, int *);
		*ok = try;
		if (!try)
			snprintf(w->session_error, sizeof(w->session_error),
				 "TLS: server certificate %s",
				 ev == SMTP_EV_NO_PEER_CERTIFICATE ? "missing"
								   : "does not name the host");
		break;
	}
	case SMTP_EV_WEAK_CIPHER: {
		int bits = va_arg(ap, int);
		int *ok = va_arg(ap, int *);
		*ok = try;
		if (!try)
			snprintf(w->session_error, sizeof(w->session_error),
				 "TLS: weak cipher (%d bits)", bits);
		break;
	}
	default:
		break;
	}
	va_end(ap);
	maybe_renew(w);
}

/* Keep the last reply line of the server: it explains session failures
 * (a 421 or 554 greeting, a refused EHLO or AUTH). */
static void monitor_cb(const char *buf, int len, int writing, void *arg)
{
	struct worker *w = arg;
	if (writing == SMTP_CB_READING && len > 0) {
		w->activity_us = rd_mono_us(); /* the server said something */
		/* the last non-empty line of what was read */
		int end = len;
		while (end > 0 && (buf[end - 1] == '\n' || buf[end - 1] == '\r'))
			end--;
		int start = end;
		while (start > 0 && buf[start - 1] != '\n')
			start--;
		int n = end - start;
		if (n > 0) {
			if ((size_t)n >= sizeof(w->last_reply))
				n = (int)sizeof(w->last_reply) - 1;
			memcpy(w->last_reply, buf + start, (size_t)n);
			w->last_reply[n] = '\0';
			one_line(w->last_reply);
		}
	}
	maybe_renew(w);
}

static int auth_interact(auth_client_request_t req, char **result, int fields, void *arg)
{
	struct worker *w = arg;
	for (int i = 0; i < fields; i++) {
		if (req[i].flags & AUTH_PASS)
			result[i] = w->m->password;
		else if (req[i].flags & AUTH_USER)
			result[i] = w->m->cfg->smtp_username;
		else
			result[i] = NULL;
	}
	return 1;
}

/* ---- one batch ---- */

static void job_free(struct job *j)
{
	free(j->org);
	free(j->id);
	free(j->text);
}

static void set_outcome(struct job *j, const char *status, const char *fmt, ...) RD_PRINTF(3, 4);
static void set_outcome(struct job *j, const char *status, const char *fmt, ...)
{
	j->status = status;
	if (fmt) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(j->err, sizeof(j->err), fmt, ap);
		va_end(ap);
		one_line(j->err);
		j->has_err = true;
	}
}

/* "550 5.1.1 Mailbox unavailable" from a libesmtp status */
static void status_text(const smtp_status_t *st, char *out, size_t outsize)
{
	char text[RD_MAIL_ERRLEN];
	rd_strlcpy(text, st->text ? st->text : "", sizeof(text));
	one_line(text);
	if (st->enh_class)
		snprintf(out, outsize, "%d %d.%d.%d %s", st->code, st->enh_class, st->enh_subject,
			 st->enh_detail, text);
	else
		snprintf(out, outsize, "%d %s", st->code, text);
	one_line(out);
}

/* A temporary failure: retry with the next delay, or give up when the
 * mail's lifetime is over. */
static void temp_fail(struct worker *w, struct job *j, const char *why)
{
	pthread_mutex_lock(&w->m->lock);
	int64_t base = w->m->retry_base_ms, life = w->m->lifetime_s;
	pthread_mutex_unlock(&w->m->lock);
	int64_t now = rd_now_ms(), next;
	if (rd_tpl_next_attempt(now, j->window_ms, j->window_attempts, base, life, &next)) {
		j->delay_ms = next - now;
		set_outcome(j, "retrying", "%s", why);
	} else {
		set_outcome(j, "failed", "%s (gave up after %d attempts: mail_lifetime is over)",
			    why, j->window_attempts);
	}
}

/* Replies that are about the session, not the mail: a relay that wants
 * authentication (530) or refused ours (535) is a configuration matter. */
static bool session_reply(int code)
{
	return code == 530 || code == 535 || code == 538;
}

static void classify(struct worker *w, struct job *j, const char *fault)
{
	const smtp_status_t *st[3] = {smtp_reverse_path_status(j->msg),
				      smtp_recipient_status(j->rcpt),
				      smtp_message_transfer_status(j->msg)};
	if (st[0]->code / 100 == 2 && st[1]->code / 100 == 2 && st[2]->code / 100 == 2) {
		set_outcome(j, "sent", NULL);
		return;
	}
	char text[RD_MAIL_ERRLEN];
	for (int i = 0; i < 3; i++) {
		int c = st[i]->code;
		if (c / 100 == 2)
			continue;
		if (c == 0)
			break; /* no reply from here on: the session broke */
		status_text(st[i], text, sizeof(text));
		if (c / 100 == 5 && !session_reply(c))
			set_outcome(j, "failed", "%s", text);
		else
			temp_fail(w, j, text);
		return;
	}
	temp_fail(w, j, fault);
}

/* Why a session went wrong where no per-mail reply says it. */
static void session_fault(struct worker *w, bool never_connected, int serr, int64_t elapsed_us,
			  char *out, size_t outsize)
{
	char e[128];
	smtp_strerror(serr, e, sizeof(e));
	if (w->session_error[0]) {
		errfmt(out, outsize, "%s", w->session_error);
	} else if (never_connected) {
		if (atomic_load(&w->m->stopping))
			errfmt(out, outsize, "connect to %s: interrupted by shutdown",
			       w->m->hostport);
		else if (elapsed_us >= (int64_t)w->timeout_s * 1000000 - 50000)
			errfmt(out, outsize, "connect to %s: timed out after %d s", w->m->hostport,
			       w->timeout_s);
		else
			errfmt(out, outsize, "connect to %s: %s", w->m->hostport, e);
	} else if (rd_mono_us() - w->activity_us >= (int64_t)w->timeout_s * 1000000 - 50000) {
		errfmt(out, outsize, "network: no reply from the server within %d s%s%s",
		       w->timeout_s, w->last_reply[0] ? "; last reply: " : "", w->last_reply);
	} else if (w->last_reply[0] >= '4' && w->last_reply[0] <= '5') {
		errfmt(out, outsize, "%s", w->last_reply);
	} else {
		errfmt(out, outsize, "network: %s%s%s", e, w->last_reply[0] ? "; last reply: " : "",
		       w->last_reply);
	}
	one_line(out);
}

static void deliver(struct worker *w, struct job *jobs, int n)
{
	struct rd_mail *m = w->m;
	smtp_session_t s = smtp_create_session();
	if (!s) {
		for (int i = 0; i < n; i++)
			if (!jobs[i].status)
				temp_fail(w, &jobs[i], "out of memory (libesmtp)");
		return;
	}
	smtp_set_server(s, m->hostport);
	long t = (long)w->timeout_s * 1000L;
	const int which[] = {Timeout_GREETING, Timeout_ENVELOPE, Timeout_DATA, Timeout_TRANSFER,
			     Timeout_DATA2};
	for (size_t i = 0; i < sizeof(which) / sizeof(which[0]); i++)
		smtp_set_timeout(s, which[i] | Timeout_OVERRIDE_RFC2822_MINIMUM, t);
	smtp_set_eventcb(s, event_cb, w);
	smtp_set_monitorcb(s, monitor_cb, w, 0);
	if (m->tls) /* takes a reference (SSL_CTX_up_ref), freed with the session */
		smtp_starttls_set_ctx(s, m->tls);
	smtp_starttls_enable(s, m->cfg->starttls == RD_STARTTLS_REQUIRE ? Starttls_REQUIRED
				: m->cfg->starttls == RD_STARTTLS_TRY	? Starttls_ENABLED
									: Starttls_DISABLED);
	if (w->auth)
		smtp_auth_set_context(s, w->auth);
	int nb = 0;
	for (int i = 0; i < n; i++) {
		struct job *j = &jobs[i];
		if (j->status)
			continue; /* failed while building */
		j->msg = smtp_add_message(s);
		if (!j->msg || !smtp_set_reverse_path(j->msg, j->from_addr) ||
		    !smtp_set_message_str(j->msg, j->text) ||
		    !(j->rcpt = smtp_add_recipient(j->msg, j->to_addr))) {
			smtp_destroy_session(s);
			for (int k = 0; k < n; k++)
				if (!jobs[k].status)
					temp_fail(w, &jobs[k], "out of memory (libesmtp)");
			return;
		}
		nb++;
	}
	if (nb == 0) {
		smtp_destroy_session(s);
		return;
	}
	w->session_error[0] = w->last_reply[0] = '\0';
	int64_t t0 = rd_mono_us();
	w->activity_us = t0;
	set_phase(w, PH_CONNECTING);
	(void)smtp_start_session(s);
	int serr = smtp_errno();
	pthread_mutex_lock(&w->plock);
	bool never_connected = w->phase == PH_CONNECTING;
	pthread_mutex_unlock(&w->plock);
	set_phase(w, PH_IDLE);
	char fault[RD_MAIL_ERRLEN];
	session_fault(w, never_connected, serr, rd_mono_us() - t0, fault, sizeof(fault));
	for (int i = 0; i < n; i++)
		if (!jobs[i].status)
			classify(w, &jobs[i], fault);
	smtp_destroy_session(s);
}

/* Build the message of row r of a claim into j; a row that cannot be sent
 * at all (no usable address) fails at once. Returns the bytes of the
 * message built (0 if none). */
static size_t job_build(struct worker *w, struct job *j, const PGresult *res, int r)
{
	(void)w;
	memset(j, 0, sizeof(*j));
	j->org = rd_xstrdup(PQgetvalue(res, r, 0));
	j->id = rd_xstrdup(PQgetvalue(res, r, 1));
	j->window_ms = strtoll(PQgetvalue(res, r, 10), NULL, 10);
	j->window_attempts = atoi(PQgetvalue(res, r, 11));
	j->attempts = atoi(PQgetvalue(res, r, 12));
	char from_name[512], reply_name[512], reply_addr[256];
	if (!rd_tpl_parse_mailbox(PQgetvalue(res, r, 2), from_name, sizeof(from_name), j->from_addr,
				  sizeof(j->from_addr))) {
		set_outcome(j, "failed", "no usable From address (org.configured mail_from)");
		return 0;
	}
	if (!rd_tpl_parse_mailbox(PQgetvalue(res, r, 3), reply_name, sizeof(reply_name), reply_addr,
				  sizeof(reply_addr)))
		reply_addr[0] = '\0';
	rd_strlcpy(j->to_addr, PQgetvalue(res, r, 5), sizeof(j->to_addr));
	struct rd_tpl_mail tm = {
	    .from_name = from_name,
	    .from_addr = j->from_addr,
	    .reply_name = reply_name,
	    .reply_addr = reply_addr,
	    .to_name = PQgetvalue(res, r, 4),
	    .to_addr = j->to_addr,
	    .subject = PQgetvalue(res, r, 6),
	    .body = PQgetvalue(res, r, 7),
	    .message_id = PQgetvalue(res, r, 8),
	    .date_ms = strtoll(PQgetvalue(res, r, 9), NULL, 10),
	};
	struct rd_err err = {0};
	size_t len = 0;
	if (rd_tpl_build(&tm, &j->text, &len, &err) != RD_OK) {
		set_outcome(j, "failed", "%s", err.msg);
		return 0;
	}
	return len;
}

/* Append one element to a PostgreSQL array literal. */
static void arr_add(char **buf, size_t *len, size_t *cap, const char *v, bool first)
{
	size_t need = *len + (v ? strlen(v) * 2 : 4) + 8;
	if (need > *cap) {
		*cap = need * 2;
		*buf = rd_xrealloc(*buf, *cap);
	}
	char *p = *buf + *len;
	if (!first)
		*p++ = ',';
	if (!v) {
		memcpy(p, "NULL", 4);
		p += 4;
	} else {
		*p++ = '"';
		for (const char *s = v; *s; s++) {
			if (*s == '"' || *s == '\\')
				*p++ = '\\';
			*p++ = *s;
		}
		*p++ = '"';
	}
	*p = '\0';
	*len = (size_t)(p - *buf);
}

/* Record the outcomes; keeps trying (reconnecting) until it worked or the
 * drain deadline passed. The rows stay leased meanwhile. */
static void record(struct worker *w, struct job *jobs, int n)
{
	struct rd_mail *m = w->m;
	char *a[5] = {NULL};
	size_t len[5] = {0}, cap[5] = {0};
	for (int k = 0; k < 5; k++) {
		cap[k] = 64;
		a[k] = rd_xmalloc(cap[k]);
		a[k][0] = '{';
		a[k][1] = '\0';
		len[k] = 1;
	}
	for (int i = 0; i < n; i++) {
		struct job *j = &jobs[i];
		char delay[24];
		snprintf(delay, sizeof(delay), "%lld", (long long)j->delay_ms);
		arr_add(&a[0], &len[0], &cap[0], j->org, i == 0);
		arr_add(&a[1], &len[1], &cap[1], j->id, i == 0);
		arr_add(&a[2], &len[2], &cap[2], j->status, i == 0);
		arr_add(&a[3], &len[3], &cap[3], j->has_err ? j->err : NULL, i == 0);
		arr_add(&a[4], &len[4], &cap[4], delay, i == 0);
	}
	for (int k = 0; k < 5; k++) {
		if (len[k] + 2 > cap[k])
			a[k] = rd_xrealloc(a[k], cap[k] = len[k] + 2);
		a[k][len[k]++] = '}';
		a[k][len[k]] = '\0';
	}
	const char *p[6] = {w->claim, a[0], a[1], a[2], a[3], a[4]};
	int backoff = 100;
	for (;;) {
		if (!w->conn && !pg_open(w)) {
			/* fall through to the wait below */
		} else {
			PGresult *res = pg_run(w, "outbox_record", 6, p);
			if (res) {
				int got = atoi(PQgetvalue(res, 0, 0));
				PQclear(res);
				if (got < n)
					rd_log(
					    LOG_WARNING, "mail.lease_lost",
					    "worker=%d recorded=%d of=%d "
					    "hint=\"lease ended before the result was recorded\"",
					    w->idx, got, n);
				break;
			}
		}
		if (atomic_load(&m->stopping) && rd_mono_us() >= atomic_load(&m->deadline_us)) {
			rd_log(LOG_ERR, "mail.record_failed",
			       "worker=%d rows=%d hint=\"their lease will expire and they are sent "
			       "again\"",
			       w->idx, n);
			break;
		}
		if (atomic_load(&m->stopping))
			usleep((useconds_t)backoff * 1000); /* until the deadline */
		else
			nap(m, backoff);
		if ((backoff *= 2) > RD_MAIL_BACKOFF_MAX_MS)
			backoff = RD_MAIL_BACKOFF_MAX_MS;
	}
	for (int k = 0; k < 5; k++)
		free(a[k]);
}

static void log_outcomes(struct worker *w, struct job *jobs, int n)
{
	uint64_t queued = 0, sent = 0, retrying = 0, failed = 0;
	for (int i = 0; i < n; i++) {
		struct job *j = &jobs[i];
		char q[RD_LOG_QBUF];
		if (j->attempts == 1)
			queued++;
		if (strcmp(j->status, "sent") == 0) {
			sent++;
			rd_log(LOG_INFO, "mail.sent", "org=%s outbox_id=%s attempts=%d worker=%d",
			       j->org, j->id, j->attempts, w->idx);
		} else if (strcmp(j->status, "retrying") == 0) {
			retrying++;
			rd_log(LOG_WARNING, "mail.retry",
			       "org=%s outbox_id=%s attempts=%d delay_ms=%lld error=\"%s\"", j->org,
			       j->id, j->attempts, (long long)j->delay_ms,
			       rd_log_q(q, sizeof(q), j->err, strlen(j->err)));
		} else {
			failed++;
			rd_log(LOG_WARNING, "mail.failed",
			       "org=%s outbox_id=%s attempts=%d error=\"%s\"", j->org, j->id,
			       j->attempts, rd_log_q(q, sizeof(q), j->err, strlen(j->err)));
		}
	}
	report(w->m, queued, sent, retrying, failed);
}

/* One claim: returns the number of rows handled, 0 when none were due,
 * -1 when PostgreSQL failed. */
static int batch(struct worker *w)
{
	struct rd_mail *m = w->m;
	unsigned char rnd[16];
	if (getrandom(rnd, sizeof(rnd), 0) != (ssize_t)sizeof(rnd)) {
		for (size_t i = 0; i < sizeof(rnd); i++)
			rnd[i] = (unsigned char)(rd_mono_us() >> (i % 8));
	}
	for (size_t i = 0; i < sizeof(rnd); i++)
		snprintf(w->claim + 2 * i, 3, "%02x", rnd[i]);
	pthread_mutex_lock(&m->lock);
	w->timeout_s = m->timeout_s;
	pthread_mutex_unlock(&m->lock);
	w->lease_ms = 4 * w->timeout_s * 1000;
	char lease[16], lim[16];
	snprintf(lease, sizeof(lease), "%d", w->lease_ms);
	int want = w->claim_size;
	w->claim_size = RD_MAIL_BATCH; /* unless this claim earns a larger one */
	snprintf(lim, sizeof(lim), "%d", want);
	const char *p[3] = {w->claim, lim, lease};
	PGresult *res = pg_run(w, "outbox_claim", 3, p);
	drain_notifies(w);
	if (!res) {
		w->claim[0] = '\0';
		return -1;
	}
	int n = PQntuples(res);
	if (n == 0) {
		PQclear(res);
		w->claim[0] = '\0';
		return 0;
	}
	w->renew_at_us = rd_mono_us() + (int64_t)w->lease_ms * 500;
	struct job *jobs = rd_xcalloc((size_t)n, sizeof(*jobs));
	size_t bytes = 0;
	for (int i = 0; i < n; i++)
		bytes += job_build(w, &jobs[i], res, i);
	PQclear(res);
	int64_t t0 = rd_mono_us();
	deliver(w, jobs, n);
	if (n >= want && rd_mono_us() - t0 < RD_MAIL_GROW_US && bytes < RD_MAIL_GROW_BYTES)
		w->claim_size = want * 2 > RD_MAIL_BATCH_MAX ? RD_MAIL_BATCH_MAX : want * 2;
	record(w, jobs, n);
	w->claim[0] = '\0';
	log_outcomes(w, jobs, n);
	for (int i = 0; i < n; i++)
		job_free(&jobs[i]);
	free(jobs);
	return n;
}

/* Nothing due: sleep until a notification, the next due row, or stop. */
static void idle(struct worker *w)
{
	struct rd_mail *m = w->m;
	PGresult *res = pg_run(w, "outbox_next_due", 0, NULL);
	long long next = -1;
	if (res) {
		next = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
		PQclear(res);
	}
	if (!w->conn)
		return;
	int timeout = next < 0 || next > RD_MAIL_IDLE_MAX_MS ? RD_MAIL_IDLE_MAX_MS : (int)next;
	if (timeout < RD_MAIL_IDLE_MIN_MS)
		timeout = RD_MAIL_IDLE_MIN_MS;
	drain_notifies(w);
	struct pollfd pf[2] = {{PQsocket(w->conn), POLLIN, 0}, {m->wakefd, POLLIN, 0}};
	if (poll(pf, 2, timeout) > 0 && pf[0].revents) {
		if (!PQconsumeInput(w->conn))
			pg_drop(w);
		drain_notifies(w);
	}
}

/* PostgreSQL failed: wait 100 ms, doubling up to RD_MAIL_BACKOFF_MAX_MS
 * while it keeps failing (reset after a claim that worked). */
static void back_off(struct worker *w)
{
	w->backoff_ms = w->backoff_ms ? w->backoff_ms * 2 : 100;
	if (w->backoff_ms > RD_MAIL_BACKOFF_MAX_MS)
		w->backoff_ms = RD_MAIL_BACKOFF_MAX_MS;
	nap(w->m, w->backoff_ms);
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	struct rd_mail *m = w->m;
	sigset_t set;
	sigemptyset(&set);
	sigaddset(&set, m->sig);
	pthread_sigmask(SIG_UNBLOCK, &set, NULL);
	struct sigevent sev;
	memset(&sev, 0, sizeof(sev));
	sev.sigev_notify = SIGEV_THREAD_ID;
	sev.sigev_signo = m->sig;
	sev._sigev_un._tid = gettid();
	w->timer_ok = timer_create(CLOCK_MONOTONIC, &sev, &w->timer) == 0;
	if (!w->timer_ok)
		rd_log(LOG_WARNING, "mail.timer_failed", "worker=%d error=\"%s\"", w->idx,
		       strerror(errno));
	if (m->cfg->smtp_username && m->cfg->smtp_username[0]) {
		w->auth = auth_create_context();
		if (w->auth) {
			auth_set_mechanism_flags(w->auth, AUTH_PLUGIN_PLAIN, 0);
			auth_set_interact_cb(w->auth, auth_interact, w);
		}
	}
	while (!atomic_load(&m->stopping)) {
		if (!w->conn && !pg_open(w)) {
			back_off(w);
			continue;
		}
		int n = batch(w);
		if (n < 0) {
			/* a statement failed on a live connection (or the
			 * connection went): not again at once */
			back_off(w);
			continue;
		}
		w->backoff_ms = 0;
		if (n == 0 && !atomic_load(&m->stopping))
			idle(w);
	}
	pg_drop(w);
	if (w->auth)
		auth_destroy_context(w->auth);
	w->auth = NULL;
	pthread_mutex_lock(&w->plock);
	if (w->timer_ok)
		timer_delete(w->timer);
	w->timer_ok = false;
	pthread_mutex_unlock(&w->plock);
	return NULL;
}

/* ---- the module ---- */

/* The STARTTLS context: TLS 1.2 or later, the server's certificate checked
 * against [smtp] ca_file or the system store (libesmtp then checks the
 * verification result and the host name, see event_cb). */
static bool tls_context(struct rd_mail *m, const struct rd_config *cfg, struct rd_err *err)
{
	m->tls = SSL_CTX_new(TLS_client_method());
	if (!m->tls) {
		rd_errf(err, RD_FAIL, "[smtp] starttls: cannot create a TLS context");
		return false;
	}
	SSL_CTX_set_min_proto_version(m->tls, TLS1_2_VERSION);
	int ok = cfg->smtp_ca_file && cfg->smtp_ca_file[0]
		     ? SSL_CTX_load_verify_locations(m->tls, cfg->smtp_ca_file, NULL)
		     : SSL_CTX_set_default_verify_paths(m->tls);
	if (ok != 1) {
		unsigned long e = ERR_get_error();
		rd_errf(err, RD_FAIL, "[smtp] ca_file %s: %s",
			cfg->smtp_ca_file && cfg->smtp_ca_file[0] ? cfg->smtp_ca_file : "(system store)",
			e ? ERR_reason_error_string(e) : "cannot load");
		return false;
	}
	return true;
}

struct rd_mail *rd_mail_new(struct event_base *base, const struct rd_config *cfg,
			    struct rd_outbox_counters *counters, struct rd_err *err)
{
	char *password = NULL;
	if (cfg->smtp_password_file && cfg->smtp_password_file[0]) {
		password = read_secret(cfg->smtp_password_file, err);
		if (!password)
			return NULL;
	}
	if (strchr(cfg->smtp_host, ':')) {
		free(password);
		rd_errf(err, RD_FAIL, "[smtp] host %s: a host name or IPv4 address, without port",
			cfg->smtp_host);
		return NULL;
	}
	struct rd_mail *m = rd_xcalloc(1, sizeof(*m));
	m->efd = m->wakefd = -1;
	m->base = base;
	m->out = counters;
	m->cfg = rd_config_reload(cfg, cfg, NULL, NULL); /* a private copy */
	m->password = password;
	snprintf(m->hostport, sizeof(m->hostport), "%s:%d", cfg->smtp_host, cfg->smtp_port);
	m->sig = SIGRTMIN + 3;
	pthread_mutex_init(&m->lock, NULL);
	m->retry_base_ms = cfg->mail_retry_base_ms;
	m->lifetime_s = cfg->mail_lifetime;
	m->timeout_s = cfg->smtp_timeout;
	if (cfg->starttls != RD_STARTTLS_NO && !tls_context(m, cfg, err)) {
		rd_mail_free(m);
		return NULL;
	}
	m->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	m->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	if (m->efd < 0 || m->wakefd < 0) {
		rd_errf(err, RD_FAIL, "mail: eventfd: %s", strerror(errno));
		rd_mail_free(m);
		return NULL;
	}
	m->ev = event_new(base, m->efd, EV_READ | EV_PERSIST, on_results, m);
	event_add(m->ev, NULL);
	atomic_init(&m->stopping, false);
	atomic_init(&m->deadline_us, 0);
	m->nworkers = cfg->workers;
	m->w = rd_xcalloc((size_t)m->nworkers, sizeof(*m->w));
	for (int i = 0; i < m->nworkers; i++) {
		m->w[i].m = m;
		m->w[i].idx = i;
		m->w[i].claim_size = RD_MAIL_BATCH;
		pthread_mutex_init(&m->w[i].plock, NULL);
	}
	return m;
}

void rd_mail_start(struct rd_mail *m)
{
	if (!m || m->started)
		return;
	m->started = true;
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_interrupt; /* no SA_RESTART: connect(2) returns EINTR */
	sigemptyset(&sa.sa_mask);
	sigaction(m->sig, &sa, NULL);
	auth_client_init();
	m->auth_init = true;
	/* the workers inherit a full mask: process signals go to the loop */
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);
	int ok = 0;
	for (int i = 0; i < m->nworkers; i++) {
		if (pthread_create(&m->w[i].tid, NULL, worker_main, &m->w[i]) == 0) {
			m->w[i].started = true;
			ok++;
		} else {
			rd_log(LOG_ERR, "mail.thread_failed", "worker=%d", i);
		}
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	rd_log(LOG_NOTICE, "mail.started", "workers=%d relay=%s starttls=%s auth=%s", ok,
	       m->hostport,
	       m->cfg->starttls == RD_STARTTLS_REQUIRE ? "require"
	       : m->cfg->starttls == RD_STARTTLS_TRY   ? "try"
						       : "no",
	       m->cfg->smtp_username && m->cfg->smtp_username[0] ? "yes" : "no");
}

void rd_mail_set_config(struct rd_mail *m, const struct rd_config *cfg)
{
	if (!m)
		return;
	pthread_mutex_lock(&m->lock);
	m->retry_base_ms = cfg->mail_retry_base_ms;
	m->lifetime_s = cfg->mail_lifetime;
	m->timeout_s = cfg->smtp_timeout;
	pthread_mutex_unlock(&m->lock);
}

/* Workers still connecting give up now (the timer fires at once). */
static void interrupt_connecting(struct rd_mail *m)
{
	for (int i = 0; i < m->nworkers; i++) {
		struct worker *w = &m->w[i];
		if (!w->started || w->joined)
			continue;
		pthread_mutex_lock(&w->plock);
		if (w->phase == PH_CONNECTING)
			arm_timer(w, 1);
		pthread_mutex_unlock(&w->plock);
	}
}

static void stop_workers(struct rd_mail *m)
{
	if (!atomic_exchange(&m->stopping, true)) {
		uint64_t one = 1;
		ssize_t r = write(m->wakefd, &one, sizeof(one));
		(void)r;
	}
	interrupt_connecting(m);
}

void rd_mail_drain(struct rd_mail *m, int64_t deadline_us)
{
	if (!m)
		return;
	m->draining = true;
	atomic_store(&m->deadline_us, deadline_us);
	stop_workers(m);
}

bool rd_mail_stop(struct rd_mail *m)
{
	if (!m)
		return true;
	if (!m->draining)
		atomic_store(&m->deadline_us,
			     rd_mono_us() + (int64_t)m->cfg->drain_timeout * 1000000);
	stop_workers(m);
	int64_t left_us = atomic_load(&m->deadline_us) - rd_mono_us();
	if (left_us < 0)
		left_us = 0;
	struct timespec abs;
	clock_gettime(CLOCK_REALTIME, &abs);
	abs.tv_sec += (time_t)(left_us / 1000000);
	abs.tv_nsec += (long)(left_us % 1000000) * 1000;
	if (abs.tv_nsec >= 1000000000L) {
		abs.tv_sec++;
		abs.tv_nsec -= 1000000000L;
	}
	int busy = 0;
	for (int i = 0; i < m->nworkers; i++) {
		struct worker *w = &m->w[i];
		if (!w->started || w->joined)
			continue;
		if (pthread_timedjoin_np(w->tid, NULL, &abs) == 0)
			w->joined = true;
		else
			busy++;
	}
	if (busy)
		rd_log(LOG_WARNING, "mail.drain_timeout",
		       "busy_workers=%d hint=\"their mails are sent again after the lease\"", busy);
	return busy == 0;
}

void rd_mail_free(struct rd_mail *m)
{
	if (!m)
		return;
	for (int i = 0; m->w && i < m->nworkers; i++)
		pthread_mutex_destroy(&m->w[i].plock);
	free(m->w);
	if (m->ev)
		event_free(m->ev);
	if (m->efd >= 0)
		close(m->efd);
	if (m->wakefd >= 0)
		close(m->wakefd);
	if (m->auth_init)
		auth_client_exit();
	pthread_mutex_destroy(&m->lock);
	if (m->password) {
		memset(m->password, 0, strlen(m->password));
		free(m->password);
	}
	if (m->tls)
		SSL_CTX_free(m->tls);
	rd_config_free(m->cfg);
	free(m);
}
