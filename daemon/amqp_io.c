/* amqp_io.c: the consumer and publisher connections to RabbitMQ.
 *
 * librabbitmq-c is a blocking library underneath; we keep it off the loop's
 * critical path by reading frames with amqp_simple_wait_frame_noblock and a
 * zero timeout, which first returns what the library has already buffered
 * (so nothing waits for the socket while a frame sits in memory) and also
 * sends and checks heartbeats. Deliveries are assembled from their method,
 * header and body frames here, so that an oversize body is never buffered.
 * Connecting and RPCs (declare, consume) block, bounded by timeouts. */
#include "amqp_io.h"

#include <amqp_ssl_socket.h>
#include <amqp_tcp_socket.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"

#define RD_AMQP_CONNECT_TIMEOUT_S 5
#define RD_AMQP_RPC_TIMEOUT_S 10
#define RD_AMQP_BACKOFF_MIN_MS 100
#define RD_AMQP_BACKOFF_MAX_MS 2000
#define RD_CONFIRM_SLOW_MS 1000 /* log publisher confirms that took this long */
/* The timeout of a non-blocking read: 1 us, not 0. librabbitmq treats a
 * zero timeout as "immediate", which always wins over its receive-heartbeat
 * deadline, so a peer that went silent was never noticed by the 1 s tick
 * (only much later, by chance, on a send). With 1 us the earlier of the two
 * deadlines is the heartbeat one once it has passed: AMQP_STATUS_HEARTBEAT_
 * TIMEOUT after 2 x heartbeat of silence. The poll itself is still 0 ms. */
#define RD_AMQP_POLL_TV {0, 1}
#define RD_CH 1        /* consumer channel; publisher confirm channel */
#define RD_CH_STATUS 2 /* publisher channel for status documents, no confirms */
#define RD_BODY_HARD_MAX (512ULL << 20) /* RabbitMQ's own limit is 128 MiB by default */

struct conn {
	const char *name;
	amqp_connection_state_t st;
	struct event *rev;
	bool up;
	bool blocked;
};

struct rd_amqp {
	struct event_base *base;
	const struct rd_config *cfg;
	struct rd_amqp_cb cb;
	void *arg;

	struct conn cons;
	struct conn pub;
	uint32_t gen;
	size_t url_idx;
	int backoff_ms;
	struct event *reconnect;
	struct event *tick;     /* heartbeats and idle reads */
	int64_t pub_lost_us;    /* when the publisher was lost (0: never) */
	int64_t cons_rx_us;     /* when the consumer socket last had bytes */
	bool consuming;
	bool cancelled;         /* draining: do not consume again */
	char consumer_tag[128];

	/* the delivery being assembled */
	struct rd_delivery *cur;

	/* ack tracking on the consumer channel: every tag below base is
	 * settled; settled tags above base wait in `held` (sorted) */
	uint64_t base_tag;
	struct held {
		uint64_t tag;
		bool ack;
	} *held;
	size_t nheld, capheld;

	/* publisher confirms */
	uint64_t pub_seq;       /* last sequence number used */
	uint64_t *unconfirmed;  /* sorted */
	size_t nunconf, capunconf;
	bool nacked;
	int64_t pub_last_try_us;
	int64_t *retry_declared;
	size_t nretry_declared;
};

static void consumer_lost(struct rd_amqp *a, const char *why);
static void schedule_reconnect(struct rd_amqp *a);

void rd_delivery_free(struct rd_delivery *d)
{
	if (!d)
		return;
	free(d->exchange);
	free(d->routing_key);
	free(d->content_type);
	free(d->body);
	empty_amqp_pool(&d->pool);
	free(d);
}

static char *bytes_dup(amqp_bytes_t b)
{
	return rd_xstrndup(b.bytes ? (const char *)b.bytes : "", b.len);
}

static const char *reply_text(amqp_rpc_reply_t r, char *buf, size_t size)
{
	switch (r.reply_type) {
	case AMQP_RESPONSE_NORMAL:
		return "ok";
	case AMQP_RESPONSE_NONE:
		return "missing reply";
	case AMQP_RESPONSE_LIBRARY_EXCEPTION:
		return amqp_error_string2(r.library_error);
	case AMQP_RESPONSE_SERVER_EXCEPTION:
		if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
			amqp_connection_close_t *m = r.reply.decoded;
			snprintf(buf, size, "connection closed: %d %.*s", m->reply_code,
				 (int)m->reply_text.len, (const char *)m->reply_text.bytes);
		} else if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
			amqp_channel_close_t *m = r.reply.decoded;
			snprintf(buf, size, "channel closed: %d %.*s", m->reply_code,
				 (int)m->reply_text.len, (const char *)m->reply_text.bytes);
		} else {
			snprintf(buf, size, "server exception 0x%08x", r.reply.id);
		}
		return buf;
	}
	return "?";
}

static enum rd_status check_reply(amqp_connection_state_t st, const char *what, struct rd_err *err)
{
	char buf[256];
	amqp_rpc_reply_t r = amqp_get_rpc_reply(st);
	if (r.reply_type == AMQP_RESPONSE_NORMAL)
		return RD_OK;
	return rd_errf(err, RD_FAIL, "%s: %s", what, reply_text(r, buf, sizeof(buf)));
}

static void conn_close(struct conn *c)
{
	if (c->rev) {
		event_free(c->rev);
		c->rev = NULL;
	}
	if (c->st) {
		/* no polite close: the peer may be gone; the socket is closed */
		amqp_destroy_connection(c->st);
		c->st = NULL;
	}
	c->up = false;
	c->blocked = false;
}

/* The URL to use now: one of the space or comma separated list. */
static char *current_url(struct rd_amqp *a)
{
	const char *s = a->cfg->url;
	size_t n = 0, idx = 0;
	const char *start = NULL;
	size_t count = 0;
	for (const char *p = s; *p;) {
		p += strspn(p, " ,\t");
		if (!*p)
			break;
		size_t len = strcspn(p, " ,\t");
		if (count == a->url_idx) {
			start = p;
			n = len;
		}
		count++;
		p += len;
	}
	if (count == 0)
		return rd_xstrdup("");
	if (!start) {
		/* wrapped around */
		a->url_idx = 0;
		return current_url(a);
	}
	(void)idx;
	return rd_xstrndup(start, n);
}

static size_t url_count(const struct rd_amqp *a)
{
	size_t count = 0;
	for (const char *p = a->cfg->url; *p;) {
		p += strspn(p, " ,\t");
		if (!*p)
			break;
		count++;
		p += strcspn(p, " ,\t");
	}
	return count ? count : 1;
}

static char *read_password_file(const char *path, struct rd_err *err)
{
	FILE *f = fopen(path, "r");
	if (!f) {
		rd_errf(err, RD_FAIL, "[amqp] password_file %s: %s", path, strerror(errno));
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

static enum rd_status conn_open(struct rd_amqp *a, struct conn *c, struct rd_err *err)
{
	char *url = current_url(a);
	char *password = NULL;
	struct amqp_connection_info ci;
	enum rd_status st = RD_FAIL;

	amqp_default_connection_info(&ci);
	if (amqp_parse_url(url, &ci) != AMQP_STATUS_OK) {
		rd_errf(err, RD_FAIL, "[amqp] url: cannot parse URL number %zu", a->url_idx + 1);
		goto out;
	}
	c->st = amqp_new_connection();
	amqp_socket_t *sock;
	if (ci.ssl) {
		sock = amqp_ssl_socket_new(c->st);
		if (sock) {
			if (a->cfg->ca_file[0] &&
			    amqp_ssl_socket_set_cacert(sock, a->cfg->ca_file) != AMQP_STATUS_OK) {
				rd_errf(err, RD_FAIL, "[amqp] ca_file %s: cannot load",
					a->cfg->ca_file);
				goto out;
			}
			amqp_ssl_socket_set_verify_peer(sock, a->cfg->verify_peer);
			amqp_ssl_socket_set_verify_hostname(sock, a->cfg->verify_peer);
		}
	} else {
		sock = amqp_tcp_socket_new(c->st);
	}
	if (!sock) {
		rd_errf(err, RD_FAIL, "amqp: cannot create socket");
		goto out;
	}
	struct timeval tv = {RD_AMQP_CONNECT_TIMEOUT_S, 0};
	int r = amqp_socket_open_noblock(sock, ci.host, ci.port, &tv);
	if (r != AMQP_STATUS_OK) {
		rd_errf(err, RD_FAIL, "amqp %s:%d: %s", ci.host, ci.port, amqp_error_string2(r));
		goto out;
	}
	struct timeval rpc = {RD_AMQP_RPC_TIMEOUT_S, 0};
	amqp_set_rpc_timeout(c->st, &rpc);
	amqp_set_handshake_timeout(c->st, &rpc);
	const char *pass = ci.password;
	if (a->cfg->password_file[0]) {
		password = read_password_file(a->cfg->password_file, err);
		if (!password)
			goto out;
		pass = password;
	}
	amqp_table_entry_t caps[] = {
	    {.key = amqp_cstring_bytes("connection.blocked"),
	     .value = {.kind = AMQP_FIELD_KIND_BOOLEAN, .value.boolean = 1}},
	    {.key = amqp_cstring_bytes("consumer_cancel_notify"),
	     .value = {.kind = AMQP_FIELD_KIND_BOOLEAN, .value.boolean = 1}},
	    {.key = amqp_cstring_bytes("publisher_confirms"),
	     .value = {.kind = AMQP_FIELD_KIND_BOOLEAN, .value.boolean = 1}},
	    {.key = amqp_cstring_bytes("basic.nack"),
	     .value = {.kind = AMQP_FIELD_KIND_BOOLEAN, .value.boolean = 1}},
	};
	char cname[160];
	snprintf(cname, sizeof(cname), "%s %s", a->cfg->instance, c->name);
	amqp_table_entry_t props[] = {
	    {.key = amqp_cstring_bytes("connection_name"),
	     .value = {.kind = AMQP_FIELD_KIND_UTF8, .value.bytes = amqp_cstring_bytes(cname)}},
	    {.key = amqp_cstring_bytes("product"),
	     .value = {.kind = AMQP_FIELD_KIND_UTF8,
		       .value.bytes = amqp_cstring_bytes("rosterd " ROSTERD_VERSION)}},
	    {.key = amqp_cstring_bytes("capabilities"),
	     .value = {.kind = AMQP_FIELD_KIND_TABLE,
		       .value.table = {.num_entries = 4, .entries = caps}}},
	};
	amqp_table_t ptable = {.num_entries = 3, .entries = props};
	amqp_rpc_reply_t lr =
	    amqp_login_with_properties(c->st, ci.vhost, 0, 131072, a->cfg->heartbeat, &ptable,
				       AMQP_SASL_METHOD_PLAIN, ci.user, pass);
	if (lr.reply_type != AMQP_RESPONSE_NORMAL) {
		char buf[256];
		rd_errf(err, RD_FAIL, "amqp login %s:%d: %s", ci.host, ci.port,
			reply_text(lr, buf, sizeof(buf)));
		goto out;
	}
	amqp_channel_open(c->st, RD_CH);
	if (check_reply(c->st, "channel.open", err) != RD_OK)
		goto out;
	st = RD_OK;
out:
	if (password) {
		memset(password, 0, strlen(password));
		free(password);
	}
	free(url);
	if (st != RD_OK && c->st) {
		amqp_destroy_connection(c->st);
		c->st = NULL;
	}
	return st;
}

/* ---- topology ---------------------------------------------------------- */

static amqp_table_entry_t entry_str(const char *k, const char *v)
{
	amqp_table_entry_t e = {.key = amqp_cstring_bytes(k)};
	e.value.kind = AMQP_FIELD_KIND_UTF8;
	e.value.value.bytes = amqp_cstring_bytes(v);
	return e;
}

static amqp_table_entry_t entry_i64(const char *k, int64_t v)
{
	amqp_table_entry_t e = {.key = amqp_cstring_bytes(k)};
	e.value.kind = AMQP_FIELD_KIND_I64;
	e.value.value.i64 = v;
	return e;
}

static enum rd_status declare_queue(amqp_connection_state_t st, const struct rd_config *cfg,
				    const char *name, amqp_table_entry_t *extra, int nextra,
				    struct rd_err *err)
{
	amqp_table_entry_t e[8];
	int n = 0;
	if (cfg->queue_type == RD_QUEUE_QUORUM) {
		e[n++] = entry_str("x-queue-type", "quorum");
		e[n++] = entry_i64("x-delivery-limit", cfg->delivery_limit);
	}
	for (int i = 0; i < nextra && n < 8; i++)
		e[n++] = extra[i];
	amqp_table_t args = {.num_entries = n, .entries = e};
	amqp_queue_declare(st, RD_CH, amqp_cstring_bytes(name), 0, 1, 0, 0, args);
	char what[400];
	snprintf(what, sizeof(what), "queue.declare %s", name);
	return check_reply(st, what, err);
}

static enum rd_status declare_exchange(amqp_connection_state_t st, const char *name,
				       const char *type, struct rd_err *err)
{
	amqp_exchange_declare(st, RD_CH, amqp_cstring_bytes(name), amqp_cstring_bytes(type), 0, 1,
			      0, 0, amqp_empty_table);
	char what[400];
	snprintf(what, sizeof(what), "exchange.declare %s", name);
	return check_reply(st, what, err);
}

static enum rd_status declare_topology(struct rd_amqp *a, struct rd_err *err)
{
	const struct rd_config *cfg = a->cfg;
	amqp_connection_state_t st = a->cons.st;
	if (declare_exchange(st, cfg->exchange, "topic", err) ||
	    declare_exchange(st, cfg->dead_exchange, "fanout", err) ||
	    declare_exchange(st, cfg->status_exchange, "fanout", err))
		return RD_FAIL;
	/* No extra arguments on the events queue: other tools (upstream
	 * publishers, the benchmark scripts) declare it plainly, and a
	 * different argument set would make their declarations fail. */
	if (declare_queue(st, cfg, cfg->queue, NULL, 0, err) ||
	    declare_queue(st, cfg, cfg->dead_queue, NULL, 0, err))
		return RD_FAIL;
	amqp_queue_bind(st, RD_CH, amqp_cstring_bytes(cfg->queue), amqp_cstring_bytes(cfg->exchange),
			amqp_cstring_bytes("#"), amqp_empty_table);
	if (check_reply(st, "queue.bind events", err))
		return RD_FAIL;
	amqp_queue_bind(st, RD_CH, amqp_cstring_bytes(cfg->dead_queue),
			amqp_cstring_bytes(cfg->dead_exchange), amqp_cstring_bytes(""),
			amqp_empty_table);
	return check_reply(st, "queue.bind dead", err);
}

/* ---- acknowledgements -------------------------------------------------- */

static void settle(struct rd_amqp *a, const struct rd_delivery *d, bool ack)
{
	if (!a->cons.up || d->gen != a->gen || d->tag < a->base_tag)
		return;
	if (d->tag != a->base_tag) {
		if (a->nheld == a->capheld) {
			a->capheld = a->capheld ? a->capheld * 2 : 64;
			a->held = rd_xrealloc(a->held, a->capheld * sizeof(*a->held));
		}
		size_t i = a->nheld;
		while (i > 0 && a->held[i - 1].tag > d->tag) {
			a->held[i] = a->held[i - 1];
			i--;
		}
		a->held[i].tag = d->tag;
		a->held[i].ack = ack;
		a->nheld++;
		return;
	}
	uint64_t last_ack = ack ? d->tag : 0;
	a->base_tag++;
	size_t k = 0;
	while (k < a->nheld && a->held[k].tag == a->base_tag) {
		if (a->held[k].ack)
			last_ack = a->held[k].tag;
		a->base_tag++;
		k++;
	}
	if (k) {
		memmove(a->held, a->held + k, (a->nheld - k) * sizeof(*a->held));
		a->nheld -= k;
	}
	if (last_ack && amqp_basic_ack(a->cons.st, RD_CH, last_ack, 1) != AMQP_STATUS_OK)
		consumer_lost(a, "basic.ack failed");
}

void rd_amqp_ack(struct rd_amqp *a, const struct rd_delivery *d)
{
	settle(a, d, true);
}

void rd_amqp_requeue(struct rd_amqp *a, const struct rd_delivery *d)
{
	if (!a->cons.up || d->gen != a->gen)
		return;
	if (amqp_basic_nack(a->cons.st, RD_CH, d->tag, 0, 1) != AMQP_STATUS_OK) {
		consumer_lost(a, "basic.nack failed");
		return;
	}
	settle(a, d, false);
}

void rd_amqp_drop_to_dead(struct rd_amqp *a, const struct rd_delivery *d)
{
	if (!a->cons.up || d->gen != a->gen)
		return;
	if (amqp_basic_reject(a->cons.st, RD_CH, d->tag, 0) != AMQP_STATUS_OK) {
		consumer_lost(a, "basic.reject failed");
		return;
	}
	settle(a, d, false);
}

/* ---- consuming --------------------------------------------------------- */

static int header_int(const amqp_table_t *t, const char *key)
{
	for (int i = 0; i < t->num_entries; i++) {
		const amqp_table_entry_t *e = &t->entries[i];
		if (e->key.len != strlen(key) || memcmp(e->key.bytes, key, e->key.len) != 0)
			continue;
		switch (e->value.kind) {
		case AMQP_FIELD_KIND_I8:
			return e->value.value.i8;
		case AMQP_FIELD_KIND_U8:
			return e->value.value.u8;
		case AMQP_FIELD_KIND_I16:
			return e->value.value.i16;
		case AMQP_FIELD_KIND_U16:
			return e->value.value.u16;
		case AMQP_FIELD_KIND_I32:
			return e->value.value.i32;
		case AMQP_FIELD_KIND_U32:
			return e->value.value.u32 > 1000000 ? 1000000 : (int)e->value.value.u32;
		case AMQP_FIELD_KIND_I64:
			return e->value.value.i64 < 0 ? 0
			       : e->value.value.i64 > 1000000 ? 1000000
							      : (int)e->value.value.i64;
		default:
			return 0;
		}
	}
	return 0;
}

static void delivery_complete(struct rd_amqp *a)
{
	struct rd_delivery *d = a->cur;
	a->cur = NULL;
	d->recv_us = rd_mono_us();
	a->cb.on_delivery(a->arg, d);
}

static void handle_frame(struct rd_amqp *a, amqp_frame_t *f)
{
	if (f->frame_type == AMQP_FRAME_METHOD) {
		switch (f->payload.method.id) {
		case AMQP_BASIC_DELIVER_METHOD: {
			amqp_basic_deliver_t *m = f->payload.method.decoded;
			rd_delivery_free(a->cur);
			struct rd_delivery *d = rd_xcalloc(1, sizeof(*d));
			init_amqp_pool(&d->pool, 1024);
			d->gen = a->gen;
			d->tag = m->delivery_tag;
			d->redelivered = m->redelivered;
			d->exchange = bytes_dup(m->exchange);
			d->routing_key = bytes_dup(m->routing_key);
			a->cur = d;
			return;
		}
		case AMQP_BASIC_CANCEL_METHOD:
			consumer_lost(a, "consumer cancelled by the broker");
			return;
		case AMQP_CHANNEL_CLOSE_METHOD: {
			amqp_channel_close_t *m = f->payload.method.decoded;
			char why[256];
			snprintf(why, sizeof(why), "channel closed: %d %.*s", m->reply_code,
				 (int)m->reply_text.len, (const char *)m->reply_text.bytes);
			consumer_lost(a, why);
			return;
		}
		case AMQP_CONNECTION_CLOSE_METHOD: {
			amqp_connection_close_t *m = f->payload.method.decoded;
			char why[256];
			snprintf(why, sizeof(why), "connection closed: %d %.*s", m->reply_code,
				 (int)m->reply_text.len, (const char *)m->reply_text.bytes);
			consumer_lost(a, why);
			return;
		}
		case AMQP_CONNECTION_BLOCKED_METHOD:
			a->cons.blocked = true;
			rd_log(LOG_WARNING, "amqp.blocked", "conn=consumer");
			if (a->cb.on_state)
				a->cb.on_state(a->arg, a->cons.up);
			return;
		case AMQP_CONNECTION_UNBLOCKED_METHOD:
			a->cons.blocked = false;
			rd_log(LOG_NOTICE, "amqp.unblocked", "conn=consumer");
			if (a->cb.on_state)
				a->cb.on_state(a->arg, a->cons.up);
			return;
		default:
			return;
		}
	}
	struct rd_delivery *d = a->cur;
	if (!d)
		return;
	if (f->frame_type == AMQP_FRAME_HEADER) {
		amqp_basic_properties_t *p = f->payload.properties.decoded;
		d->body_size = f->payload.properties.body_size;
		if (p->_flags & AMQP_BASIC_CONTENT_TYPE_FLAG)
			d->content_type = bytes_dup(p->content_type);
		if (p->_flags & AMQP_BASIC_HEADERS_FLAG) {
			if (amqp_table_clone(&p->headers, &d->headers, &d->pool) != AMQP_STATUS_OK)
				d->headers = amqp_empty_table;
			d->retries = header_int(&d->headers, "x-rosterd-retries");
		} else {
			d->headers = amqp_empty_table;
		}
		/* An oversize body is still read (one delivery is assembled at a
		 * time, and the broker caps a message at its max_message_size),
		 * so that it can be dead-lettered whole; only a body beyond
		 * RD_BODY_HARD_MAX is refused unread. */
		if (d->body_size > (uint64_t)a->cfg->max_message_bytes)
			d->oversize = true;
		if (d->body_size > RD_BODY_HARD_MAX)
			d->unheld = true;
		else if (d->body_size)
			d->body = rd_xmalloc((size_t)d->body_size);
		if (d->body_size == 0)
			delivery_complete(a);
		return;
	}
	if (f->frame_type == AMQP_FRAME_BODY) {
		amqp_bytes_t frag = f->payload.body_fragment;
		if (!d->unheld) {
			if (d->body_len + frag.len > d->body_size) {
				consumer_lost(a, "body longer than announced");
				return;
			}
			memcpy(d->body + d->body_len, frag.bytes, frag.len);
		}
		d->body_len += frag.len;
		if (d->body_len >= d->body_size)
			delivery_complete(a);
	}
}

static void consumer_drain(struct rd_amqp *a)
{
	while (a->cons.up) {
		amqp_frame_t f;
		struct timeval tv = RD_AMQP_POLL_TV;
		int r = amqp_simple_wait_frame_noblock(a->cons.st, &f, &tv);
		if (r == AMQP_STATUS_TIMEOUT)
			break;
		if (r != AMQP_STATUS_OK) {
			consumer_lost(a, amqp_error_string2(r));
			return;
		}
		handle_frame(a, &f);
	}
	if (a->cons.up && !a->cur)
		amqp_maybe_release_buffers(a->cons.st);
}

static void consumer_read_cb(evutil_socket_t fd, short what, void *arg)
{
	struct rd_amqp *a = arg;
	(void)fd;
	(void)what;
	a->cons_rx_us = rd_mono_us(); /* any bytes, heartbeats included */
	consumer_drain(a);
}

static void pub_drain(struct rd_amqp *a);

static void pub_read_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	pub_drain(arg);
}

static void tick_cb(evutil_socket_t fd, short what, void *arg)
{
	struct rd_amqp *a = arg;
	(void)fd;
	(void)what;
	/* a zero-timeout read sends a heartbeat when one is due and notices
	 * a peer that stopped sending them */
	if (a->cons.up)
		consumer_drain(a);
	if (a->pub.up)
		pub_drain(a);
}

static enum rd_status consumer_start(struct rd_amqp *a, struct rd_err *err)
{
	if (conn_open(a, &a->cons, err) != RD_OK)
		return RD_FAIL;
	if (declare_topology(a, err) != RD_OK)
		goto fail;
	amqp_basic_qos(a->cons.st, RD_CH, 0, (uint16_t)a->cfg->prefetch, 0);
	if (check_reply(a->cons.st, "basic.qos", err) != RD_OK)
		goto fail;
	a->gen++;
	a->base_tag = 1;
	a->nheld = 0;
	a->cons.up = true;
	if (!a->cancelled) {
		amqp_basic_consume_ok_t *ok =
		    amqp_basic_consume(a->cons.st, RD_CH, amqp_cstring_bytes(a->cfg->queue),
				       amqp_empty_bytes, 0, 0, 0, amqp_empty_table);
		if (check_reply(a->cons.st, "basic.consume", err) != RD_OK || !ok) {
			a->cons.up = false;
			goto fail;
		}
		size_t n = ok->consumer_tag.len < sizeof(a->consumer_tag) - 1
			       ? ok->consumer_tag.len
			       : sizeof(a->consumer_tag) - 1;
		memcpy(a->consumer_tag, ok->consumer_tag.bytes, n);
		a->consumer_tag[n] = '\0';
		a->consuming = true;
	}
	a->cons.rev = event_new(a->base, amqp_get_sockfd(a->cons.st), EV_READ | EV_PERSIST,
				consumer_read_cb, a);
	event_add(a->cons.rev, NULL);
	a->backoff_ms = 0;
	return RD_OK;
fail:
	conn_close(&a->cons);
	return RD_FAIL;
}

static void consumer_lost(struct rd_amqp *a, const char *why)
{
	if (!a->cons.up && !a->cons.st)
		return;
	rd_log(LOG_WARNING, "amqp.lost", "conn=consumer error=\"%s\"", why);
	rd_delivery_free(a->cur);
	a->cur = NULL;
	conn_close(&a->cons);
	a->consuming = false;
	a->gen++; /* what we hold is requeued by the broker */
	a->nheld = 0;
	if (a->cb.on_state)
		a->cb.on_state(a->arg, false);
	schedule_reconnect(a);
}

static void reconnect_cb(evutil_socket_t fd, short what, void *arg)
{
	struct rd_amqp *a = arg;
	struct rd_err err;
	(void)fd;
	(void)what;
	if (a->cons.up)
		return;
	if (consumer_start(a, &err) != RD_OK) {
		rd_log(LOG_WARNING, "amqp.connect_failed", "conn=consumer retry_ms=%d error=\"%s\"",
		       a->backoff_ms, err.msg);
		a->url_idx = (a->url_idx + 1) % url_count(a);
		schedule_reconnect(a);
		return;
	}
	rd_log(LOG_NOTICE, "amqp.connected", "conn=consumer queue=%s", a->cfg->queue);
	if (a->cb.on_state)
		a->cb.on_state(a->arg, true);
	consumer_drain(a);
}

static void schedule_reconnect(struct rd_amqp *a)
{
	if (a->backoff_ms == 0)
		a->backoff_ms = RD_AMQP_BACKOFF_MIN_MS;
	else if ((a->backoff_ms *= 2) > RD_AMQP_BACKOFF_MAX_MS)
		a->backoff_ms = RD_AMQP_BACKOFF_MAX_MS;
	struct timeval tv = {a->backoff_ms / 1000, (a->backoff_ms % 1000) * 1000};
	event_add(a->reconnect, &tv);
}

void rd_amqp_cancel(struct rd_amqp *a)
{
	a->cancelled = true;
	if (!a->cons.up || !a->consuming)
		return;
	/* basic.cancel without waiting for cancel-ok: the frames that follow
	 * (deliveries already in flight, then cancel-ok) are read as usual */
	amqp_basic_cancel_t m = {.consumer_tag = amqp_cstring_bytes(a->consumer_tag),
				 .nowait = 0};
	if (amqp_send_method(a->cons.st, RD_CH, AMQP_BASIC_CANCEL_METHOD, &m) != AMQP_STATUS_OK)
		consumer_lost(a, "basic.cancel failed");
	a->consuming = false;
}

static void conn_close_politely(struct conn *c, int timeout_ms)
{
	if (!c->up || !c->st)
		return;
	/* a blocked connection is not read by the broker: it would not answer */
	if (!c->blocked) {
		struct timeval tv = {timeout_ms / 1000, (timeout_ms % 1000) * 1000};
		amqp_set_rpc_timeout(c->st, &tv);
		amqp_rpc_reply_t r = amqp_connection_close(c->st, AMQP_REPLY_SUCCESS);
		if (r.reply_type != AMQP_RESPONSE_NORMAL) {
			char buf[256];
			rd_log(LOG_WARNING, "amqp.close_failed", "conn=%s error=\"%s\"", c->name,
			       reply_text(r, buf, sizeof(buf)));
		}
	}
	conn_close(c);
}

void rd_amqp_close(struct rd_amqp *a, int timeout_ms)
{
	conn_close_politely(&a->cons, timeout_ms);
	conn_close_politely(&a->pub, timeout_ms);
}

/* ---- publishing -------------------------------------------------------- */

static void pub_lost(struct rd_amqp *a, const char *why)
{
	rd_log(LOG_WARNING, "amqp.lost", "conn=publisher error=\"%s\"", why);
	conn_close(&a->pub);
	a->nunconf = 0;
	a->nretry_declared = 0;
	/* No reconnect until the broker is known to be alive: connecting
	 * blocks the loop (up to the connect and login timeouts), and when the
	 * broker went silent the tick must first get to notice it on the
	 * consumer (heartbeats) instead of the next batch's publish blocking
	 * in a new login. Alive = the consumer received bytes since this loss;
	 * after 2 x heartbeat + 1 s a silent consumer has been noticed anyway. */
	a->pub_lost_us = rd_mono_us();
}

static enum rd_status pub_ensure(struct rd_amqp *a, struct rd_err *err)
{
	if (a->pub.up)
		return RD_OK;
	int64_t now = rd_mono_us();
	if (a->pub_lost_us && a->cons_rx_us <= a->pub_lost_us &&
	    now - a->pub_lost_us < ((int64_t)a->cfg->heartbeat * 2 + 1) * 1000000)
		return rd_errf(err, RD_FAIL, "amqp publisher: lost, waiting for a sign of the broker");
	if (a->pub_last_try_us && now - a->pub_last_try_us < RD_AMQP_BACKOFF_MAX_MS * 1000LL)
		return rd_errf(err, RD_FAIL, "amqp publisher: not connected");
	a->pub_last_try_us = now;
	if (conn_open(a, &a->pub, err) != RD_OK)
		return RD_FAIL;
	amqp_confirm_select(a->pub.st, RD_CH);
	if (check_reply(a->pub.st, "confirm.select", err) != RD_OK)
		goto fail;
	amqp_channel_open(a->pub.st, RD_CH_STATUS);
	if (check_reply(a->pub.st, "channel.open status", err) != RD_OK)
		goto fail;
	a->pub.up = true;
	a->pub_seq = 0;
	a->nunconf = 0;
	a->nacked = false;
	a->pub_last_try_us = 0;
	a->pub.rev = event_new(a->base, amqp_get_sockfd(a->pub.st), EV_READ | EV_PERSIST,
			       pub_read_cb, a);
	event_add(a->pub.rev, NULL);
	rd_log(LOG_NOTICE, "amqp.connected", "conn=publisher");
	return RD_OK;
fail:
	conn_close(&a->pub);
	return RD_FAIL;
}

static void confirm(struct rd_amqp *a, uint64_t tag, bool multiple, bool ok)
{
	if (!ok)
		a->nacked = true;
	size_t k = 0;
	for (size_t i = 0; i < a->nunconf; i++) {
		uint64_t s = a->unconfirmed[i];
		if (s == tag || (multiple && s < tag))
			continue;
		a->unconfirmed[k++] = s;
	}
	a->nunconf = k;
}

/* Handle one frame of the publisher connection; false when it was lost. */
static bool pub_frame(struct rd_amqp *a, amqp_frame_t *f)
{
	if (f->frame_type != AMQP_FRAME_METHOD)
		return true;
	switch (f->payload.method.id) {
	case AMQP_BASIC_ACK_METHOD: {
		amqp_basic_ack_t *m = f->payload.method.decoded;
		confirm(a, m->delivery_tag, m->multiple, true);
		return true;
	}
	case AMQP_BASIC_NACK_METHOD: {
		amqp_basic_nack_t *m = f->payload.method.decoded;
		confirm(a, m->delivery_tag, m->multiple, false);
		return true;
	}
	case AMQP_CONNECTION_BLOCKED_METHOD:
		a->pub.blocked = true;
		rd_log(LOG_WARNING, "amqp.blocked", "conn=publisher");
		if (a->cb.on_state)
			a->cb.on_state(a->arg, a->cons.up);
		return true;
	case AMQP_CONNECTION_UNBLOCKED_METHOD:
		a->pub.blocked = false;
		rd_log(LOG_NOTICE, "amqp.unblocked", "conn=publisher");
		if (a->cb.on_state)
			a->cb.on_state(a->arg, a->cons.up);
		return true;
	case AMQP_CHANNEL_CLOSE_METHOD:
	case AMQP_CONNECTION_CLOSE_METHOD: {
		amqp_channel_close_t *m = f->payload.method.decoded;
		char why[256];
		snprintf(why, sizeof(why), "closed by broker: %d %.*s", m->reply_code,
			 (int)m->reply_text.len, (const char *)m->reply_text.bytes);
		pub_lost(a, why);
		return false;
	}
	default:
		return true;
	}
}

static void pub_drain(struct rd_amqp *a)
{
	while (a->pub.up) {
		amqp_frame_t f;
		struct timeval tv = RD_AMQP_POLL_TV;
		int r = amqp_simple_wait_frame_noblock(a->pub.st, &f, &tv);
		if (r == AMQP_STATUS_TIMEOUT)
			break;
		if (r != AMQP_STATUS_OK) {
			pub_lost(a, amqp_error_string2(r));
			return;
		}
		if (!pub_frame(a, &f))
			return;
	}
	if (a->pub.up)
		amqp_maybe_release_buffers(a->pub.st);
}

enum rd_status rd_amqp_confirm_wait(struct rd_amqp *a, int timeout_ms, struct rd_err *err)
{
	int64_t t0 = rd_mono_us();
	int64_t deadline = t0 + (int64_t)timeout_ms * 1000;
	size_t waited_for = a->nunconf;
	while (a->pub.up && a->nunconf > 0) {
		int64_t left = deadline - rd_mono_us();
		if (left <= 0) {
			pub_lost(a, "publisher confirms timed out");
			break;
		}
		amqp_frame_t f;
		struct timeval tv = {(time_t)(left / 1000000), (suseconds_t)(left % 1000000)};
		int r = amqp_simple_wait_frame_noblock(a->pub.st, &f, &tv);
		if (r == AMQP_STATUS_TIMEOUT)
			continue;
		if (r != AMQP_STATUS_OK) {
			pub_lost(a, amqp_error_string2(r));
			break;
		}
		if (!pub_frame(a, &f))
			break;
	}
	int64_t took_ms = (rd_mono_us() - t0) / 1000;
	if (took_ms >= RD_CONFIRM_SLOW_MS)
		rd_log(LOG_WARNING, "amqp.confirm_slow", "published=%zu ms=%lld", waited_for,
		       (long long)took_ms);
	if (!a->pub.up)
		return rd_errf(err, RD_FAIL, "amqp publisher lost before confirms");
	amqp_maybe_release_buffers(a->pub.st);
	if (a->nacked) {
		a->nacked = false;
		return rd_errf(err, RD_FAIL, "amqp publish refused by the broker (nack)");
	}
	return RD_OK;
}

static enum rd_status publish(struct rd_amqp *a, const char *exchange, const char *rk,
			      const amqp_basic_properties_t *props, const void *body,
			      size_t len, struct rd_err *err)
{
	if (pub_ensure(a, err) != RD_OK)
		return RD_FAIL;
	amqp_bytes_t b = {.len = len, .bytes = (void *)body};
	int r = amqp_basic_publish(a->pub.st, RD_CH, amqp_cstring_bytes(exchange),
				   amqp_cstring_bytes(rk), 0, 0, props, b);
	if (r != AMQP_STATUS_OK) {
		pub_lost(a, amqp_error_string2(r));
		return rd_errf(err, RD_FAIL, "amqp publish: %s", amqp_error_string2(r));
	}
	if (a->nunconf == a->capunconf) {
		a->capunconf = a->capunconf ? a->capunconf * 2 : 256;
		a->unconfirmed = rd_xrealloc(a->unconfirmed, a->capunconf * sizeof(uint64_t));
	}
	a->unconfirmed[a->nunconf++] = ++a->pub_seq;
	return RD_OK;
}

static bool key_is(const amqp_table_entry_t *e, const char *k)
{
	return e->key.len == strlen(k) && memcmp(e->key.bytes, k, e->key.len) == 0;
}

/* The original headers without our own x-rosterd-* ones, plus room for
 * `extra` more. Entries point into d's pool or are static. */
static amqp_table_entry_t *headers_copy(const struct rd_delivery *d, int extra, int *n)
{
	amqp_table_entry_t *e =
	    rd_xcalloc((size_t)d->headers.num_entries + (size_t)extra, sizeof(*e));
	int k = 0;
	for (int i = 0; i < d->headers.num_entries; i++) {
		const amqp_table_entry_t *h = &d->headers.entries[i];
		if (key_is(h, "x-rosterd-error") || key_is(h, "x-rosterd-error-at") ||
		    key_is(h, "x-rosterd-retries") || key_is(h, "x-rosterd-routing-key") ||
		    key_is(h, "x-rosterd-instance"))
			continue;
		e[k++] = *h;
	}
	*n = k;
	return e;
}

static const char *original_routing_key(const struct rd_delivery *d)
{
	for (int i = 0; i < d->headers.num_entries; i++) {
		const amqp_table_entry_t *h = &d->headers.entries[i];
		if (key_is(h, "x-rosterd-routing-key") && h->value.kind == AMQP_FIELD_KIND_UTF8) {
			static char rk[256];
			size_t n = h->value.value.bytes.len < 255 ? h->value.value.bytes.len : 255;
			memcpy(rk, h->value.value.bytes.bytes, n);
			rk[n] = '\0';
			return rk;
		}
	}
	return d->routing_key;
}

static void base_props(amqp_basic_properties_t *p, const struct rd_delivery *d)
{
	memset(p, 0, sizeof(*p));
	p->_flags = AMQP_BASIC_DELIVERY_MODE_FLAG | AMQP_BASIC_HEADERS_FLAG;
	p->delivery_mode = 2;
	if (d->content_type) {
		p->_flags |= AMQP_BASIC_CONTENT_TYPE_FLAG;
		p->content_type = amqp_cstring_bytes(d->content_type);
	}
}

enum rd_status rd_amqp_publish_dead(struct rd_amqp *a, const struct rd_delivery *d,
				    const char *reason, struct rd_err *err)
{
	char at[32];
	time_t now = time(NULL);
	struct tm tm;
	gmtime_r(&now, &tm);
	strftime(at, sizeof(at), "%Y-%m-%dT%H:%M:%SZ", &tm);
	char rk[256];
	rd_strlcpy(rk, original_routing_key(d), sizeof(rk));
	int n;
	amqp_table_entry_t *e = headers_copy(d, 5, &n);
	if (d->retries > 0) /* how long it waited, for whoever reads the dead queue */
		e[n++] = entry_i64("x-rosterd-retries", d->retries);
	e[n++] = entry_str("x-rosterd-error", reason);
	e[n++] = entry_str("x-rosterd-error-at", at);
	e[n++] = entry_str("x-rosterd-routing-key", rk);
	e[n++] = entry_str("x-rosterd-instance", a->cfg->instance);
	amqp_basic_properties_t p;
	base_props(&p, d);
	p.headers.num_entries = n;
	p.headers.entries = e;
	enum rd_status st =
	    publish(a, a->cfg->dead_exchange, rk, &p, d->body ? d->body : (const void *)"",
		    d->body ? d->body_len : 0, err);
	free(e);
	return st;
}

static enum rd_status retry_queue(struct rd_amqp *a, int64_t delay_ms, char *name, size_t size,
				  struct rd_err *err)
{
	snprintf(name, size, "%s.%lldms", a->cfg->retry_queue, (long long)delay_ms);
	for (size_t i = 0; i < a->nretry_declared; i++)
		if (a->retry_declared[i] == delay_ms)
			return RD_OK;
	if (pub_ensure(a, err) != RD_OK)
		return RD_FAIL;
	/* One queue per delay: a per-message TTL only expires at the head of
	 * a queue, so mixed delays in one queue would hold short ones back. */
	amqp_table_entry_t x[2] = {entry_i64("x-message-ttl", delay_ms),
				   entry_str("x-dead-letter-exchange", a->cfg->exchange)};
	/* declared on the status channel: a failure closes only that channel */
	amqp_table_entry_t e[4];
	int n = 0;
	if (a->cfg->queue_type == RD_QUEUE_QUORUM)
		e[n++] = entry_str("x-queue-type", "quorum");
	e[n++] = x[0];
	e[n++] = x[1];
	amqp_table_t args = {.num_entries = n, .entries = e};
	amqp_queue_declare(a->pub.st, RD_CH_STATUS, amqp_cstring_bytes(name), 0, 1, 0, 0, args);
	char what[400];
	snprintf(what, sizeof(what), "queue.declare %s", name);
	if (check_reply(a->pub.st, what, err) != RD_OK) {
		pub_lost(a, err->msg);
		return RD_FAIL;
	}
	a->retry_declared = rd_xrealloc(a->retry_declared,
					(a->nretry_declared + 1) * sizeof(*a->retry_declared));
	a->retry_declared[a->nretry_declared++] = delay_ms;
	return RD_OK;
}

enum rd_status rd_amqp_publish_retry(struct rd_amqp *a, const struct rd_delivery *d,
				     int attempt, int64_t delay_ms, struct rd_err *err)
{
	char qname[300];
	if (retry_queue(a, delay_ms, qname, sizeof(qname), err) != RD_OK)
		return RD_FAIL;
	char rk[256];
	rd_strlcpy(rk, original_routing_key(d), sizeof(rk));
	int n;
	amqp_table_entry_t *e = headers_copy(d, 2, &n);
	e[n++] = entry_i64("x-rosterd-retries", attempt);
	e[n++] = entry_str("x-rosterd-routing-key", rk);
	amqp_basic_properties_t p;
	base_props(&p, d);
	p.headers.num_entries = n;
	p.headers.entries = e;
	enum rd_status st = publish(a, "", qname, &p, d->body ? d->body : (const void *)"",
				    d->body ? d->body_len : 0, err);
	free(e);
	return st;
}

enum rd_status rd_amqp_publish_status(struct rd_amqp *a, const char *json, size_t len)
{
	struct rd_err err;
	if (pub_ensure(a, &err) != RD_OK)
		return RD_FAIL;
	amqp_basic_properties_t p = {0};
	p._flags = AMQP_BASIC_CONTENT_TYPE_FLAG | AMQP_BASIC_DELIVERY_MODE_FLAG;
	p.content_type = amqp_cstring_bytes("application/json");
	p.delivery_mode = 1;
	amqp_bytes_t b = {.len = len, .bytes = (void *)json};
	int r = amqp_basic_publish(a->pub.st, RD_CH_STATUS, amqp_cstring_bytes(a->cfg->status_exchange),
				   amqp_cstring_bytes(""), 0, 0, &p, b);
	if (r != AMQP_STATUS_OK) {
		pub_lost(a, amqp_error_string2(r));
		return RD_FAIL;
	}
	return RD_OK;
}

/* ---- life cycle -------------------------------------------------------- */

struct rd_amqp *rd_amqp_new(struct event_base *base, const struct rd_config *cfg,
			    const struct rd_amqp_cb *cb, void *arg)
{
	struct rd_amqp *a = rd_xcalloc(1, sizeof(*a));
	a->base = base;
	a->cfg = cfg;
	a->cb = *cb;
	a->arg = arg;
	a->cons.name = "consumer";
	a->pub.name = "publisher";
	a->reconnect = evtimer_new(base, reconnect_cb, a);
	a->tick = event_new(base, -1, EV_PERSIST, tick_cb, a);
	struct timeval tv = {1, 0};
	event_add(a->tick, &tv);
	return a;
}

void rd_amqp_set_config(struct rd_amqp *a, const struct rd_config *cfg)
{
	a->cfg = cfg;
}

void rd_amqp_free(struct rd_amqp *a)
{
	if (!a)
		return;
	rd_delivery_free(a->cur);
	conn_close(&a->cons);
	conn_close(&a->pub);
	event_free(a->reconnect);
	event_free(a->tick);
	free(a->held);
	free(a->unconfirmed);
	free(a->retry_declared);
	free(a);
}

enum rd_status rd_amqp_start(struct rd_amqp *a, struct rd_err *err)
{
	if (consumer_start(a, err) != RD_OK) {
		schedule_reconnect(a);
		return RD_FAIL;
	}
	rd_log(LOG_NOTICE, "amqp.connected", "conn=consumer queue=%s", a->cfg->queue);
	struct rd_err perr;
	if (pub_ensure(a, &perr) != RD_OK)
		rd_log(LOG_WARNING, "amqp.connect_failed", "conn=publisher error=\"%s\"", perr.msg);
	if (a->cb.on_state)
		a->cb.on_state(a->arg, true);
	consumer_drain(a);
	return RD_OK;
}

bool rd_amqp_connected(const struct rd_amqp *a)
{
	return a->cons.up;
}

bool rd_amqp_blocked(const struct rd_amqp *a)
{
	return (a->cons.up && a->cons.blocked) || (a->pub.up && a->pub.blocked);
}

bool rd_amqp_current(const struct rd_amqp *a, const struct rd_delivery *d)
{
	return a->cons.up && d->gen == a->gen;
}
