/* pipeline.c: from a delivery to its settlement.
 *
 * receive -> decode and validate (C) -> pending -> batch -> one pipelined
 * PostgreSQL transaction (lock keys in sorted order, rd.apply per message)
 * -> commit -> publish to dead/retry queues and wait for confirms -> ack.
 *
 * Invariants:
 *  - a delivery is acknowledged only after its effects are committed, or
 *    after its dead/retry copy is confirmed by the broker;
 *  - a batch that fails for an infrastructure reason is kept and run again
 *    (nothing is acknowledged); one that fails because of one message is
 *    run again with that message recorded as rejected;
 *  - what is pending is bounded by the broker's prefetch. */
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon.h"
#include "decode.h"
#include "handlers.h"
#include "log.h"

#define RD_CONFIRM_TIMEOUT_MS 10000
#define RD_MAX_BATCH_FAILS 3

struct rd_msg {
	struct rd_msg *next;
	struct rd_delivery *dl;
	struct rd_envelope env;
	bool recordable;         /* org and id valid: goes through rd.apply */
	char *reject;            /* reason found before SQL, or NULL */
	char *payload;           /* JSON text of the normalised data */
	json_t *keys;            /* serialisation keys (without org) */
	int part;                /* pending partition (by organisation) */
	char at[24];
	const char *params[7];
	int fails;
	/* result */
	char outcome[16];
	char *reason;
};

struct rd_batch {
	struct rd_daemon *d;
	int part;
	int n;
	struct rd_msg **msgs;
	char *lock_arr;
	const char *lock_params[1];
	struct rd_pg_stmt *stmts;
};

static void msg_free(struct rd_msg *m)
{
	if (!m)
		return;
	rd_envelope_free(&m->env);
	rd_delivery_free(m->dl);
	free(m->reject);
	free(m->payload);
	free(m->reason);
	json_decref(m->keys);
	free(m);
}

static void set_reject(struct rd_msg *m, const char *why)
{
	free(m->reject);
	m->reject = rd_xstrdup(why);
	free(m->payload);
	m->payload = NULL;
}

static void latency(struct rd_daemon *d, const struct rd_msg *m)
{
	int64_t us = rd_mono_us() - m->dl->recv_us;
	d->lat[d->nlat++ % RD_LAT_SAMPLES] = us > UINT32_MAX ? UINT32_MAX : (uint32_t)us;
}

static void log_outcome(const struct rd_msg *m, const char *outcome, const char *reason)
{
	char org[RD_LOG_QBUF], id[RD_LOG_QBUF], type[RD_LOG_QBUF], why[RD_LOG_QBUF * 2];
	rd_log_q(org, sizeof(org), m->env.has_org ? m->env.org : NULL, strlen(m->env.org));
	rd_log_q(id, sizeof(id), m->env.has_id ? m->env.id : NULL, strlen(m->env.id));
	rd_log_q(type, sizeof(type), m->env.type, strlen(m->env.type));
	int level = strcmp(outcome, "rejected") == 0 ? LOG_WARNING : LOG_INFO;
	if (reason && *reason) {
		/* reasons are ours, but may quote message values: keep one line */
		size_t o = 0;
		for (const char *p = reason; *p && o + 2 < sizeof(why); p++)
			why[o++] = (*p == '"' || *p == '\n' || *p == '\r') ? '\'' : *p;
		why[o] = '\0';
		rd_log(level, "msg.settled",
		       "org=%s id=%s type=%s outcome=%s redelivered=%d retries=%d reason=\"%s\"",
		       org, id, type, outcome, m->dl->redelivered, m->dl->retries, why);
	} else {
		rd_log(level, "msg.settled", "org=%s id=%s type=%s outcome=%s", org, id, type,
		       outcome);
	}
}

/* ---- receiving --------------------------------------------------------- */

/* FNV-1a of the organisation: every message of an organisation goes to the
 * same partition, hence the same PostgreSQL connection. */
static int part_of(const struct rd_daemon *d, const struct rd_msg *m)
{
	if (d->nparts <= 1 || !m->env.has_org)
		return 0;
	uint32_t h = 2166136261u;
	for (const char *p = m->env.org; *p; p++)
		h = (h ^ (unsigned char)*p) * 16777619u;
	return (int)(h % (uint32_t)d->nparts);
}

static void pending_push(struct rd_daemon *d, struct rd_msg *m)
{
	struct rd_part *pt = &d->parts[m->part];
	m->next = NULL;
	if (pt->tail)
		pt->tail->next = m;
	else
		pt->head = m;
	pt->tail = m;
	pt->n++;
	d->npending++;
}

/* Put msgs (all of one partition) back at the head, in their order. */
static void pending_unshift(struct rd_daemon *d, struct rd_msg **msgs, int n)
{
	for (int i = n - 1; i >= 0; i--) {
		struct rd_part *pt = &d->parts[msgs[i]->part];
		msgs[i]->next = pt->head;
		pt->head = msgs[i];
		if (!pt->tail)
			pt->tail = msgs[i];
		pt->n++;
		d->npending++;
	}
}

static void prepare_msg(struct rd_daemon *d, struct rd_msg *m)
{
	struct rd_err err = {0};
	const struct rd_delivery *dl = m->dl;

	if (dl->oversize) {
		/* not decoded at all: it goes to the dead queue whole */
		char why[160];
		snprintf(why, sizeof(why), "body of %llu bytes exceeds max_message_bytes %d",
			 (unsigned long long)dl->body_size, d->cfg->max_message_bytes);
		m->recordable = false;
		set_reject(m, why);
		return;
	}
	if (rd_decode_envelope(dl->body, dl->body_len, (size_t)d->cfg->max_message_bytes, &m->env,
			       &err) != RD_OK) {
		m->recordable = m->env.has_org && m->env.has_id;
		set_reject(m, err.msg);
		return;
	}
	m->recordable = true;
	snprintf(m->at, sizeof(m->at), "%lld", (long long)m->env.at_ms);
	const struct rd_handler *h = rd_handler_find(m->env.type);
	if (!h) {
		char why[160];
		snprintf(why, sizeof(why), "type: unknown message type");
		set_reject(m, why);
		return;
	}
	json_t *payload = NULL;
	if (rd_payload_build(h, m->env.data, &payload, &err) != RD_OK) {
		set_reject(m, err.msg);
		return;
	}
	m->keys = json_array();
	rd_payload_lock_keys(h, payload, m->keys);
	m->payload = json_dumps(payload, JSON_COMPACT);
	json_decref(payload);
	if (!m->payload)
		set_reject(m, "data: cannot be encoded as JSON");
}

void rd_pipeline_on_delivery(void *arg, struct rd_delivery *dl)
{
	struct rd_daemon *d = arg;
	d->n.received++;
	if (d->draining) {
		rd_amqp_requeue(d->amqp, dl);
		rd_delivery_free(dl);
		return;
	}
	if (dl->unheld) {
		rd_log(LOG_ERR, "msg.dropped",
		       "tag=%llu reason=\"body of %llu bytes is too large to hold; rejected to the "
		       "broker (dead-lettered only if the queue has a dead-letter policy)\"",
		       (unsigned long long)dl->tag, (unsigned long long)dl->body_size);
		d->n.rejected++;
		rd_amqp_drop_to_dead(d->amqp, dl);
		rd_delivery_free(dl);
		return;
	}
	struct rd_msg *m = rd_xcalloc(1, sizeof(*m));
	m->dl = dl;
	prepare_msg(d, m);
	m->part = part_of(d, m);
	pending_push(d, m);
	rd_pipeline_flush(d);
}

/* ---- settling ---------------------------------------------------------- */

enum action { ACT_ACK, ACT_DEAD, ACT_RETRY };

static int64_t retry_delay_ms(const struct rd_config *cfg, int attempt)
{
	int64_t delay = cfg->retry_base_ms;
	for (int i = 1; i < attempt && delay < 86400000LL * 30; i++)
		delay *= 2;
	return delay;
}

/* Settle the messages of a committed batch (or messages that needed no
 * SQL): publish dead/retry copies, wait for confirms, then ack. */
static void settle(struct rd_daemon *d, struct rd_msg **msgs, int n)
{
	enum action *act = rd_xcalloc((size_t)n, sizeof(*act));
	int npub = 0;
	struct rd_err err = {0};
	enum rd_status pst = RD_OK;

	for (int i = 0; i < n && pst == RD_OK; i++) {
		struct rd_msg *m = msgs[i];
		const char *o = m->outcome;
		if (!rd_amqp_current(d->amqp, m->dl))
			continue; /* requeued by the broker already: redelivery settles it */
		const char *why = m->reason ? m->reason : "";
		if (strcmp(o, "applied") == 0) {
			d->n.applied++;
		} else if (strcmp(o, "stale") == 0) {
			d->n.stale++;
		} else if (strcmp(o, "duplicate") == 0) {
			d->n.duplicate++;
			/* A redelivered message first rejected by us may not have
			 * reached the dead queue before we stopped: send it again. */
			if (m->dl->redelivered && strncmp(why, "rejected: ", 10) == 0) {
				act[i] = ACT_DEAD;
				pst = rd_amqp_publish_dead(d->amqp, m->dl, why + 10, &err);
				npub++;
			}
		} else if (strcmp(o, "retry") == 0) {
			d->n.retried++;
			act[i] = ACT_RETRY;
			int attempt = m->dl->retries + 1;
			pst = rd_amqp_publish_retry(d->amqp, m->dl, attempt,
						    retry_delay_ms(d->cfg, attempt), &err);
			npub++;
		} else {
			d->n.rejected++;
			act[i] = ACT_DEAD;
			pst = rd_amqp_publish_dead(d->amqp, m->dl, why[0] ? why : "rejected", &err);
			npub++;
		}
	}
	if (pst == RD_OK && npub > 0) {
		/* draining: do not wait past the drain deadline (what is not
		 * confirmed is requeued; its redelivery finds the outcome) */
		int wait_ms = RD_CONFIRM_TIMEOUT_MS;
		if (d->draining) {
			int64_t left = (d->drain_deadline_us - rd_mono_us()) / 1000 - 250;
			wait_ms = left < 100 ? 100 : left < wait_ms ? (int)left : wait_ms;
		}
		pst = rd_amqp_confirm_wait(d->amqp, wait_ms, &err);
	}
	if (pst != RD_OK)
		rd_log(LOG_WARNING, "msg.publish_failed", "messages=%d error=\"%s\"", n, err.msg);
	for (int i = 0; i < n; i++) {
		struct rd_msg *m = msgs[i];
		if (pst != RD_OK && act[i] != ACT_ACK) {
			/* not confirmed: give it back; redelivery finds the
			 * recorded outcome (or waits again) */
			rd_amqp_requeue(d->amqp, m->dl);
		} else {
			log_outcome(m, m->outcome, m->reason);
			rd_amqp_ack(d->amqp, m->dl);
			latency(d, m);
		}
		msg_free(m);
	}
	free(act);
}

/* ---- batches ----------------------------------------------------------- */

static void append_pg_array_elem(char **buf, size_t *len, size_t *cap, const char *s)
{
	size_t need = *len + 2 * strlen(s) + 4;
	if (need > *cap) {
		*cap = need * 2;
		*buf = rd_xrealloc(*buf, *cap);
	}
	char *o = *buf + *len;
	if (*len > 1)
		*o++ = ',';
	*o++ = '"';
	for (; *s; s++) {
		if (*s == '"' || *s == '\\')
			*o++ = '\\';
		*o++ = *s;
	}
	*o++ = '"';
	*len = (size_t)(o - *buf);
}

/* The text[] literal of every key of the batch, prefixed by org. */
static char *batch_lock_array(struct rd_msg **msgs, int n)
{
	size_t cap = 256, len = 1;
	char *buf = rd_xmalloc(cap);
	buf[0] = '{';
	char key[RD_ORG_MAX + RD_ID_MAX + 600];
	for (int i = 0; i < n; i++) {
		struct rd_msg *m = msgs[i];
		snprintf(key, sizeof(key), "%s/msg:%s", m->env.org, m->env.id);
		append_pg_array_elem(&buf, &len, &cap, key);
		size_t k;
		json_t *v;
		json_array_foreach(m->keys, k, v)
		{
			snprintf(key, sizeof(key), "%s/%s", m->env.org, json_string_value(v));
			append_pg_array_elem(&buf, &len, &cap, key);
		}
	}
	if (len + 2 > cap)
		buf = rd_xrealloc(buf, len + 2);
	buf[len++] = '}';
	buf[len] = '\0';
	return buf;
}

static void batch_free(struct rd_batch *b)
{
	free(b->msgs);
	free(b->stmts);
	free(b->lock_arr);
	free(b);
}

static void batch_row(void *arg, int idx, const PGresult *res)
{
	struct rd_batch *b = arg;
	if (idx < 1 || idx > b->n || PQntuples(res) != 1)
		return;
	struct rd_msg *m = b->msgs[idx - 1];
	rd_strlcpy(m->outcome, PQgetvalue(res, 0, 0), sizeof(m->outcome));
	free(m->reason);
	m->reason = PQgetisnull(res, 0, 1) ? NULL : rd_xstrdup(PQgetvalue(res, 0, 1));
}

/* The batch timer: batch_wait_ms is over (or a failed batch may run
 * again): submit what is pending even if the batch is not full. */
static void batch_timer_cb(evutil_socket_t fd, short what, void *arg)
{
	struct rd_daemon *d = arg;
	(void)fd;
	(void)what;
	d->batch_timer_armed = false;
	d->batch_due = true;
	rd_pipeline_flush(d);
}

static void batch_done(void *arg, enum rd_status st, int idx, const char *msg)
{
	struct rd_batch *b = arg;
	struct rd_daemon *d = b->d;
	d->inflight_batches--;

	if (st == RD_OK) {
		settle(d, b->msgs, b->n);
		batch_free(b);
		rd_pipeline_flush(d);
		return;
	}
	if (st == RD_REJECT && idx >= 1 && idx <= b->n) {
		/* One message's statement failed in a way it will again: record
		 * it as rejected; the others run again untouched. */
		struct rd_msg *m = b->msgs[idx - 1];
		char why[200];
		snprintf(why, sizeof(why), "database refused the message: %.150s", msg);
		set_reject(m, why);
		rd_log(LOG_WARNING, "batch.isolated", "size=%d error=\"%s\"", b->n, msg);
	} else {
		rd_log(LOG_WARNING, "batch.failed", "size=%d status=%s error=\"%s\"", b->n,
		       rd_status_name(st), msg ? msg : "");
		if (st != RD_FAIL) {
			for (int i = 0; i < b->n; i++)
				b->msgs[i]->fails++;
		}
	}
	pending_unshift(d, b->msgs, b->n);
	batch_free(b);
	if (st == RD_FAIL) {
		/* the connection is being re-established; flush when it is */
		rd_pipeline_flush(d);
	} else if (!d->batch_timer_armed) {
		struct timeval tv = {0, 50 * 1000};
		d->batch_timer_armed = true;
		event_add(d->batch_timer, &tv);
	}
}

/* How many pending messages to take for one batch: a message that keeps
 * failing goes alone, so that it cannot hold others back. */
static int batch_take(struct rd_daemon *d, int part, struct rd_msg **out, int max)
{
	struct rd_part *pt = &d->parts[part];
	int n = 0;
	while (n < max && pt->head) {
		struct rd_msg *m = pt->head;
		if (m->fails >= RD_MAX_BATCH_FAILS && n > 0)
			break;
		pt->head = m->next;
		if (!pt->head)
			pt->tail = NULL;
		pt->n--;
		d->npending--;
		m->next = NULL;
		out[n++] = m;
		if (m->fails >= RD_MAX_BATCH_FAILS) {
			if (m->fails >= 2 * RD_MAX_BATCH_FAILS && !m->reject && m->recordable)
				set_reject(m, "database keeps failing on this message");
			break;
		}
	}
	return n;
}

static void submit_batch(struct rd_daemon *d, int part, int conn)
{
	int max = d->cfg->batch_size;
	struct rd_msg **taken = rd_xcalloc((size_t)max, sizeof(*taken));
	int n = batch_take(d, part, taken, max);

	/* Messages with nothing to record (no valid org and id) settle now. */
	struct rd_msg **local = rd_xcalloc((size_t)n + 1, sizeof(*local));
	int nlocal = 0, nsql = 0;
	for (int i = 0; i < n; i++) {
		struct rd_msg *m = taken[i];
		if (!m->recordable) {
			rd_strlcpy(m->outcome, "rejected", sizeof(m->outcome));
			m->reason = rd_xstrdup(m->reject ? m->reject : "invalid message");
			local[nlocal++] = m;
		} else {
			taken[nsql++] = m;
		}
	}
	if (nlocal)
		settle(d, local, nlocal);
	free(local);
	if (nsql == 0) {
		free(taken);
		return;
	}

	struct rd_batch *b = rd_xcalloc(1, sizeof(*b));
	b->d = d;
	b->part = part;
	b->n = nsql;
	b->msgs = taken;
	b->stmts = rd_xcalloc((size_t)nsql + 1, sizeof(*b->stmts));
	b->lock_arr = batch_lock_array(taken, nsql);
	b->lock_params[0] = b->lock_arr;
	b->stmts[0] = (struct rd_pg_stmt){"lock_keys", 1, b->lock_params};
	for (int i = 0; i < nsql; i++) {
		struct rd_msg *m = taken[i];
		m->outcome[0] = '\0';
		m->params[0] = m->env.org;
		m->params[1] = m->env.id;
		m->params[2] = m->env.type;
		m->params[3] = m->at[0] ? m->at : NULL;
		m->params[4] = m->reject ? NULL : m->payload;
		m->params[5] = m->dl->retries >= d->cfg->max_retries ? "true" : "false";
		m->params[6] = m->reject;
		b->stmts[i + 1] = (struct rd_pg_stmt){"apply", 7, m->params};
	}
	d->inflight_batches++;
	if (rd_pg_submit(d->pg, conn, b->stmts, nsql + 1, batch_row, batch_done, b) != RD_OK) {
		/* no idle connection after all */
		d->inflight_batches--;
		pending_unshift(d, taken, nsql);
		batch_free(b);
	}
}

/* The connection for partition p: its own when up, else any idle one
 * (only a question of lock waits: correctness never depends on it). */
static int part_conn(struct rd_daemon *d, int p)
{
	int own = p % rd_pg_nconns(d->pg);
	if (rd_pg_conn_up(d->pg, own))
		return rd_pg_conn_idle(d->pg, own) ? own : -2;
	for (int i = 0; i < rd_pg_nconns(d->pg); i++)
		if (rd_pg_conn_idle(d->pg, i))
			return i;
	return -2;
}

void rd_pipeline_flush(struct rd_daemon *d)
{
	bool progress = true;
	while (progress && d->npending > 0) {
		progress = false;
		for (int p = 0; p < d->nparts; p++) {
			struct rd_part *pt = &d->parts[p];
			if (pt->n == 0)
				continue;
			int conn = part_conn(d, p);
			if (conn < 0)
				continue;
			/* A full batch goes at once, and so does anything when
			 * nothing is in flight (light load: no waiting);
			 * otherwise give the batch batch_wait_ms to fill (0, the
			 * default: the next turn of the event loop, after the
			 * deliveries the socket has ready are read). */
			if (pt->n < d->cfg->batch_size && d->inflight_batches > 0 && !d->batch_due) {
				if (!d->batch_timer_armed) {
					struct timeval tv = {d->cfg->batch_wait_ms / 1000,
							     (d->cfg->batch_wait_ms % 1000) * 1000};
					d->batch_timer_armed = true;
					event_add(d->batch_timer, &tv);
				}
				continue;
			}
			int before = pt->n;
			submit_batch(d, p, conn);
			if (pt->n < before)
				progress = true;
		}
		d->batch_due = false;
	}
}

void rd_pipeline_init(struct rd_daemon *d)
{
	d->batch_timer = evtimer_new(d->base, batch_timer_cb, d);
	d->nparts = d->cfg->connections < RD_MAX_PARTS ? d->cfg->connections : RD_MAX_PARTS;
	if (d->nparts < 1)
		d->nparts = 1;
}

void rd_pipeline_drop_stale(struct rd_daemon *d)
{
	for (int p = 0; p < d->nparts; p++) {
		struct rd_part *pt = &d->parts[p];
		struct rd_msg *keep_head = NULL, *keep_tail = NULL;
		int n = 0;
		while (pt->head) {
			struct rd_msg *m = pt->head;
			pt->head = m->next;
			m->next = NULL;
			if (rd_amqp_current(d->amqp, m->dl)) {
				if (keep_tail)
					keep_tail->next = m;
				else
					keep_head = m;
				keep_tail = m;
				n++;
			} else {
				msg_free(m);
				d->npending--;
			}
		}
		pt->head = keep_head;
		pt->tail = keep_tail;
		pt->n = n;
	}
}

void rd_pipeline_requeue_pending(struct rd_daemon *d)
{
	for (int p = 0; p < d->nparts; p++) {
		struct rd_part *pt = &d->parts[p];
		while (pt->head) {
			struct rd_msg *m = pt->head;
			pt->head = m->next;
			rd_amqp_requeue(d->amqp, m->dl);
			msg_free(m);
		}
		pt->tail = NULL;
		pt->n = 0;
	}
	d->npending = 0;
}

bool rd_pipeline_idle(const struct rd_daemon *d)
{
	return d->inflight_batches == 0 && d->npending == 0;
}

void rd_pipeline_free(struct rd_daemon *d)
{
	for (int p = 0; p < d->nparts; p++) {
		struct rd_part *pt = &d->parts[p];
		while (pt->head) {
			struct rd_msg *m = pt->head;
			pt->head = m->next;
			msg_free(m);
		}
		pt->tail = NULL;
		pt->n = 0;
	}
	d->npending = 0;
	if (d->batch_timer)
		event_free(d->batch_timer);
}
