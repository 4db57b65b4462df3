/* dead.c: rosterctl dead list | show N | replay N | replay --all
 *
 * The dead-letter queue (SPEC 1: [amqp] dead_queue, default rosterd.dead).
 * Messages are taken with basic.get without acknowledging them, so a crash
 * of rosterctl loses nothing: what it does not acknowledge goes back to the
 * queue, in its original order, when it nacks (requeue) or its channel
 * closes. N is the position in the queue, 1 = the oldest. On a quorum
 * queue (SPEC 8), where every requeue counts against the delivery limit and
 * a message beyond it is dropped, a message is put back instead by
 * publishing an identical copy to the queue (confirmed) and acknowledging
 * the original, going through the whole queue so that the order stays.
 *
 * replay republishes a dead message to the events exchange with its
 * original body, properties and headers (without the x-rosterd-* ones
 * rosterd added) and its original routing key, waits for the publisher
 * confirm (mandatory: a message no queue takes is an error), and only then
 * acknowledges the dead copy. Before that it forgets the message's recorded
 * rejection in report.messages (when the body names a valid org and id), so
 * that rosterd applies it afresh instead of counting it as a duplicate of
 * its own rejection. replay --all replays as many messages as the queue held
 * when it started: messages that are rejected again join the queue's end
 * and are not taken a second time.
 *
 * Also owns ctl_amqp_connect (cli/ctl.h), used by cli/status.c. */
#include <amqp.h>
#include <amqp_ssl_socket.h>
#include <amqp_tcp_socket.h>
#include <errno.h>
#include <jansson.h>
#include <msgpack.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl.h"
#include "decode.h"
#include "util.h"

#define CH_GET 1
#define CH_PUB 2

static const char *reply_why(amqp_rpc_reply_t r, char *buf, size_t size)
{
	switch (r.reply_type) {
	case AMQP_RESPONSE_NORMAL:
		return "ok";
	case AMQP_RESPONSE_NONE:
		return "no reply";
	case AMQP_RESPONSE_LIBRARY_EXCEPTION:
		return amqp_error_string2(r.library_error);
	case AMQP_RESPONSE_SERVER_EXCEPTION:
		if (r.reply.id == AMQP_CHANNEL_CLOSE_METHOD) {
			amqp_channel_close_t *m = r.reply.decoded;
			snprintf(buf, size, "%.*s", (int)m->reply_text.len,
				 (const char *)m->reply_text.bytes);
			return buf;
		}
		if (r.reply.id == AMQP_CONNECTION_CLOSE_METHOD) {
			amqp_connection_close_t *m = r.reply.decoded;
			snprintf(buf, size, "%.*s", (int)m->reply_text.len,
				 (const char *)m->reply_text.bytes);
			return buf;
		}
		return "server error";
	}
	return "unknown error";
}

static bool ok_reply(amqp_connection_state_t st, const char *what)
{
	amqp_rpc_reply_t r = amqp_get_rpc_reply(st);
	if (r.reply_type == AMQP_RESPONSE_NORMAL)
		return true;
	char buf[256];
	ctl_die("amqp %s: %s", what, reply_why(r, buf, sizeof(buf)));
	return false;
}

static char *read_secret(const char *path)
{
	FILE *f = fopen(path, "r");
	if (!f) {
		ctl_die("[amqp] password_file %s: %s", path, strerror(errno));
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

/* One URL of the list: connect, log in, open channel 1. */
static amqp_connection_state_t connect_url(struct ctl *c, char *url, char *why, size_t whysize)
{
	struct amqp_connection_info ci;
	amqp_connection_state_t st = NULL;
	char *password = NULL;
	amqp_default_connection_info(&ci);
	if (amqp_parse_url(url, &ci) != AMQP_STATUS_OK) {
		snprintf(why, whysize, "[amqp] url: cannot parse a URL");
		return NULL;
	}
	st = amqp_new_connection();
	amqp_socket_t *sock;
	if (ci.ssl) {
		sock = amqp_ssl_socket_new(st);
		if (sock && c->cfg->ca_file[0] &&
		    amqp_ssl_socket_set_cacert(sock, c->cfg->ca_file) != AMQP_STATUS_OK) {
			snprintf(why, whysize, "[amqp] ca_file %s: cannot load", c->cfg->ca_file);
			goto fail;
		}
		if (sock) {
			amqp_ssl_socket_set_verify_peer(sock, c->cfg->verify_peer);
			amqp_ssl_socket_set_verify_hostname(sock, c->cfg->verify_peer);
		}
	} else {
		sock = amqp_tcp_socket_new(st);
	}
	if (!sock) {
		snprintf(why, whysize, "amqp: cannot create a socket");
		goto fail;
	}
	struct timeval tv = {10, 0};
	int r = amqp_socket_open_noblock(sock, ci.host, ci.port, &tv);
	if (r != AMQP_STATUS_OK) {
		snprintf(why, whysize, "amqp %s:%d: %s", ci.host, ci.port, amqp_error_string2(r));
		goto fail;
	}
	amqp_set_rpc_timeout(st, &tv);
	amqp_set_handshake_timeout(st, &tv);
	const char *pass = ci.password;
	if (c->cfg->password_file[0]) {
		password = read_secret(c->cfg->password_file);
		if (!password) {
			snprintf(why, whysize, "[amqp] password_file: unreadable");
			goto fail;
		}
		pass = password;
	}
	amqp_rpc_reply_t lr =
	    amqp_login(st, ci.vhost, 0, 131072, 0, AMQP_SASL_METHOD_PLAIN, ci.user, pass);
	if (lr.reply_type != AMQP_RESPONSE_NORMAL) {
		char buf[200];
		snprintf(why, whysize, "amqp login %s:%d: %s", ci.host, ci.port,
			 reply_why(lr, buf, sizeof(buf)));
		goto fail;
	}
	amqp_channel_open(st, CH_GET);
	if (amqp_get_rpc_reply(st).reply_type != AMQP_RESPONSE_NORMAL) {
		snprintf(why, whysize, "amqp: channel.open refused");
		goto fail;
	}
	if (password) {
		memset(password, 0, strlen(password));
		free(password);
	}
	return st;
fail:
	if (password) {
		memset(password, 0, strlen(password));
		free(password);
	}
	amqp_destroy_connection(st);
	return NULL;
}

amqp_connection_state_t ctl_amqp_connect(struct ctl *c)
{
	char why[300] = "[amqp] url: no URL";
	const char *s = c->cfg->url;
	/* the URLs in order, as the daemon's fail-over list */
	for (const char *p = s; *p;) {
		p += strspn(p, " ,\t");
		if (!*p)
			break;
		size_t len = strcspn(p, " ,\t");
		char *url = rd_xstrndup(p, len);
		amqp_connection_state_t st = connect_url(c, url, why, sizeof(why));
		free(url);
		if (st)
			return st;
		p += len;
	}
	ctl_die("%s", why);
	return NULL;
}

void ctl_amqp_close(amqp_connection_state_t st)
{
	if (!st)
		return;
	amqp_connection_close(st, AMQP_REPLY_SUCCESS);
	amqp_destroy_connection(st);
}

/* ---- one dead message ------------------------------------------------------ */

struct dead {
	uint64_t tag;
	amqp_message_t msg;
	char org[RD_ORG_MAX + 1], id[RD_ID_MAX + 1], type[256];
};

static void str_of(const amqp_bytes_t *b, char *out, size_t size)
{
	size_t n = b->len < size - 1 ? b->len : size - 1;
	if (n)
		memcpy(out, b->bytes, n);
	out[n] = '\0';
}

static const amqp_field_value_t *header(const amqp_message_t *m, const char *key)
{
	if (!(m->properties._flags & AMQP_BASIC_HEADERS_FLAG))
		return NULL;
	for (int i = 0; i < m->properties.headers.num_entries; i++) {
		const amqp_table_entry_t *e = &m->properties.headers.entries[i];
		if (e->key.len == strlen(key) && memcmp(e->key.bytes, key, e->key.len) == 0)
			return &e->value;
	}
	return NULL;
}

/* A header value as text ("" when absent). */
static void value_text(const amqp_field_value_t *v, char *out, size_t size)
{
	out[0] = '\0';
	if (!v)
		return;
	switch (v->kind) {
	case AMQP_FIELD_KIND_UTF8:
	case AMQP_FIELD_KIND_BYTES:
		str_of(&v->value.bytes, out, size);
		break;
	case AMQP_FIELD_KIND_I8:
		snprintf(out, size, "%d", v->value.i8);
		break;
	case AMQP_FIELD_KIND_U8:
		snprintf(out, size, "%u", v->value.u8);
		break;
	case AMQP_FIELD_KIND_I16:
		snprintf(out, size, "%d", v->value.i16);
		break;
	case AMQP_FIELD_KIND_U16:
		snprintf(out, size, "%u", v->value.u16);
		break;
	case AMQP_FIELD_KIND_I32:
		snprintf(out, size, "%d", v->value.i32);
		break;
	case AMQP_FIELD_KIND_U32:
		snprintf(out, size, "%u", v->value.u32);
		break;
	case AMQP_FIELD_KIND_I64:
	case AMQP_FIELD_KIND_TIMESTAMP:
		snprintf(out, size, "%lld", (long long)v->value.i64);
		break;
	case AMQP_FIELD_KIND_U64:
		snprintf(out, size, "%llu", (unsigned long long)v->value.u64);
		break;
	case AMQP_FIELD_KIND_BOOLEAN:
		snprintf(out, size, "%s", v->value.boolean ? "true" : "false");
		break;
	default:
		snprintf(out, size, "(kind %c)", v->kind);
	}
	/* one line, valid UTF-8 for JSON */
	for (char *p = out; *p; p++)
		if ((unsigned char)*p < 0x20)
			*p = ' ';
	if (!rd_utf8_valid(out, strlen(out)))
		rd_strlcpy(out, "(not UTF-8)", size);
}

static void hdr(const struct dead *d, const char *key, char *out, size_t size)
{
	value_text(header(&d->msg, key), out, size);
}

/* A msgpack value as JSON (the prescan bounds depth and counts). */
static json_t *mp_json(const msgpack_object *o)
{
	switch (o->type) {
	case MSGPACK_OBJECT_NIL:
		return json_null();
	case MSGPACK_OBJECT_BOOLEAN:
		return json_boolean(o->via.boolean);
	case MSGPACK_OBJECT_POSITIVE_INTEGER:
		if (o->via.u64 > INT64_MAX)
			return json_real((double)o->via.u64);
		return json_integer((json_int_t)o->via.u64);
	case MSGPACK_OBJECT_NEGATIVE_INTEGER:
		return json_integer((json_int_t)o->via.i64);
	case MSGPACK_OBJECT_FLOAT32:
	case MSGPACK_OBJECT_FLOAT64:
		return json_real(o->via.f64);
	case MSGPACK_OBJECT_STR: {
		json_t *s = json_stringn(o->via.str.ptr, o->via.str.size);
		return s ? s : json_string("(not UTF-8)");
	}
	case MSGPACK_OBJECT_ARRAY: {
		json_t *a = json_array();
		for (uint32_t i = 0; i < o->via.array.size; i++)
			json_array_append_new(a, mp_json(&o->via.array.ptr[i]));
		return a;
	}
	case MSGPACK_OBJECT_MAP: {
		json_t *m = json_object();
		for (uint32_t i = 0; i < o->via.map.size; i++) {
			const msgpack_object_kv *kv = &o->via.map.ptr[i];
			char key[256];
			if (kv->key.type == MSGPACK_OBJECT_STR)
				snprintf(key, sizeof(key), "%.*s", (int)kv->key.via.str.size,
					 kv->key.via.str.ptr);
			else
				snprintf(key, sizeof(key), "(key %u)", i);
			json_t *v = mp_json(&kv->val);
			if (json_object_set_new(m, key, v) != 0)
				json_object_set_new(m, "(key not UTF-8)", json_null());
		}
		return m;
	}
	case MSGPACK_OBJECT_BIN:
		return json_sprintf("(%u bytes binary)", o->via.bin.size);
	case MSGPACK_OBJECT_EXT:
		return json_sprintf("(ext %d, %u bytes)", o->via.ext.type, o->via.ext.size);
	}
	return json_null();
}

/* The body as JSON, or NULL when it is no MessagePack. */
static json_t *body_json(const struct dead *d)
{
	struct rd_err err = {.st = RD_OK, .msg = ""};
	const char *b = d->msg.body.bytes;
	size_t len = d->msg.body.len, off = 0;
	if (!len || rd_decode_prescan(b, len, len + 1, &err) != RD_OK)
		return NULL;
	msgpack_unpacked u;
	msgpack_unpacked_init(&u);
	json_t *j = NULL;
	if (msgpack_unpack_next(&u, b, len, &off) == MSGPACK_UNPACK_SUCCESS)
		j = mp_json(&u.data);
	msgpack_unpacked_destroy(&u);
	return j;
}

static void envelope(struct dead *d)
{
	json_t *j = body_json(d);
	const char *s;
	if ((s = json_string_value(json_object_get(j, "org"))))
		rd_strlcpy(d->org, s, sizeof(d->org));
	if ((s = json_string_value(json_object_get(j, "id"))))
		rd_strlcpy(d->id, s, sizeof(d->id));
	if ((s = json_string_value(json_object_get(j, "type"))))
		rd_strlcpy(d->type, s, sizeof(d->type));
	json_decref(j);
}

/* basic.get one message (not acknowledged). 1 got, 0 empty, -1 error. */
static int get_one(amqp_connection_state_t st, const char *queue, struct dead *d)
{
	amqp_maybe_release_buffers(st);
	amqp_rpc_reply_t r = amqp_basic_get(st, CH_GET, amqp_cstring_bytes(queue), 0);
	if (r.reply_type != AMQP_RESPONSE_NORMAL) {
		char buf[256];
		ctl_die("amqp basic.get %s: %s", queue, reply_why(r, buf, sizeof(buf)));
		return -1;
	}
	if (r.reply.id == AMQP_BASIC_GET_EMPTY_METHOD)
		return 0;
	amqp_basic_get_ok_t *ok = r.reply.decoded;
	memset(d, 0, sizeof(*d));
	d->tag = ok->delivery_tag;
	r = amqp_read_message(st, CH_GET, &d->msg, 0);
	if (r.reply_type != AMQP_RESPONSE_NORMAL) {
		char buf[256];
		ctl_die("amqp read %s: %s", queue, reply_why(r, buf, sizeof(buf)));
		return -1;
	}
	envelope(d);
	return 1;
}

/* The queue's message count (passive declare: never creates it). */
static long queue_count(amqp_connection_state_t st, const char *queue)
{
	amqp_queue_declare_ok_t *ok =
	    amqp_queue_declare(st, CH_GET, amqp_cstring_bytes(queue), 1, 0, 0, 0, amqp_empty_table);
	if (!ok) {
		char buf[256];
		ctl_die("dead: queue %s: %s", queue,
			reply_why(amqp_get_rpc_reply(st), buf, sizeof(buf)));
		return -1;
	}
	return (long)ok->message_count;
}

static json_t *dead_json(const struct dead *d, long n, bool full)
{
	char err[1024], at[64], rk[256], inst[256], retries[32];
	hdr(d, "x-rosterd-error", err, sizeof(err));
	hdr(d, "x-rosterd-error-at", at, sizeof(at));
	hdr(d, "x-rosterd-routing-key", rk, sizeof(rk));
	hdr(d, "x-rosterd-instance", inst, sizeof(inst));
	hdr(d, "x-rosterd-retries", retries, sizeof(retries));
	json_t *o =
	    json_pack("{s:I, s:s, s:s, s:s, s:s, s:s, s:s, s:s, s:I}", "n", (json_int_t)n, "org",
		      d->org, "id", d->id, "type", d->type, "routing_key", rk, "error", err,
		      "error_at", at, "instance", inst, "bytes", (json_int_t)d->msg.body.len);
	json_object_set_new(o, "retries", json_integer(strtol(retries, NULL, 10)));
	if (full) {
		json_t *h = json_object();
		const amqp_basic_properties_t *p = &d->msg.properties;
		if (p->_flags & AMQP_BASIC_HEADERS_FLAG)
			for (int i = 0; i < p->headers.num_entries; i++) {
				char k[256], v[1024];
				str_of(&p->headers.entries[i].key, k, sizeof(k));
				value_text(&p->headers.entries[i].value, v, sizeof(v));
				if (rd_utf8_valid(k, strlen(k)))
					json_object_set_new(h, k, json_string(v));
			}
		json_object_set_new(o, "headers", h);
		char ct[128] = "";
		if (p->_flags & AMQP_BASIC_CONTENT_TYPE_FLAG)
			str_of(&p->content_type, ct, sizeof(ct));
		json_object_set_new(
		    o, "content_type",
		    json_string(rd_utf8_valid(ct, strlen(ct)) ? ct : "(not UTF-8)"));
		json_t *b = body_json(d);
		json_object_set_new(o, "body", b ? b : json_null());
	}
	return o;
}

static void print_json(json_t *j)
{
	json_dumpf(j, stdout, JSON_INDENT(2));
	fputc('\n', stdout);
}

/* Put every message taken and not acknowledged back, in order. */
static void requeue_all(amqp_connection_state_t st)
{
	amqp_basic_nack(st, CH_GET, 0, 1, 1);
}

/* ---- publishing with confirms ------------------------------------------------ */

/* Publish (mandatory) on the confirm channel and wait for the broker's ack.
 * strip: leave out the x-rosterd-* headers (a replay) and x-delivery-count
 * (set by quorum queues). */
static bool publish_confirmed(amqp_connection_state_t st, const char *exchange, const char *rk,
			      const struct dead *d, bool strip)
{
	amqp_basic_properties_t p = d->msg.properties;
	int n = 0;
	amqp_table_entry_t *e = NULL;
	if (p._flags & AMQP_BASIC_HEADERS_FLAG) {
		e = rd_xcalloc((size_t)p.headers.num_entries + 1, sizeof(*e));
		for (int i = 0; i < p.headers.num_entries; i++) {
			const amqp_table_entry_t *h = &p.headers.entries[i];
			if (strip && h->key.len >= 10 &&
			    memcmp(h->key.bytes, "x-rosterd-", 10) == 0)
				continue;
			if (h->key.len == 16 && memcmp(h->key.bytes, "x-delivery-count", 16) == 0)
				continue;
			e[n++] = *h;
		}
		p.headers.entries = e;
		p.headers.num_entries = n;
	}
	p._flags |= AMQP_BASIC_DELIVERY_MODE_FLAG;
	p.delivery_mode = 2;
	int r = amqp_basic_publish(st, CH_PUB, amqp_cstring_bytes(exchange), amqp_cstring_bytes(rk),
				   1, 0, &p, d->msg.body);
	free(e);
	const char *where = exchange[0] ? exchange : "the dead queue";
	if (r != AMQP_STATUS_OK) {
		ctl_die("dead: publish to %s: %s", where, amqp_error_string2(r));
		return false;
	}
	/* the confirm: basic.ack (basic.return first when no queue took it) */
	bool returned = false;
	for (;;) {
		amqp_frame_t f;
		struct timeval tv = {30, 0};
		r = amqp_simple_wait_frame_noblock(st, &f, &tv);
		if (r != AMQP_STATUS_OK) {
			ctl_die("dead: no publisher confirm from the broker: %s; the dead copy "
				"is kept",
				amqp_error_string2(r));
			return false;
		}
		if (f.frame_type != AMQP_FRAME_METHOD)
			continue; /* the returned message's header and body */
		if (f.payload.method.id == AMQP_BASIC_RETURN_METHOD) {
			returned = true;
		} else if (f.payload.method.id == AMQP_BASIC_ACK_METHOD) {
			break;
		} else if (f.payload.method.id == AMQP_BASIC_NACK_METHOD) {
			ctl_die("dead: the broker refused the message (nack); the dead copy is "
				"kept");
			return false;
		} else if (f.payload.method.id == AMQP_CHANNEL_CLOSE_METHOD ||
			   f.payload.method.id == AMQP_CONNECTION_CLOSE_METHOD) {
			ctl_die("dead: the broker closed the channel while publishing to %s",
				where);
			return false;
		}
	}
	if (returned) {
		ctl_die("dead: %s routed %s to no queue; the dead copy is kept", where, rk);
		return false;
	}
	return true;
}

/* A message taken only to look at it. On a classic queue it stays
 * unacknowledged and goes back in place with requeue_all(). A quorum queue
 * counts every requeue against its delivery limit and drops a message
 * beyond it, so there the message is put back by publishing an identical
 * copy to the queue's end (confirmed) and acknowledging the original; the
 * callers then cycle through the whole queue, so that the order stays. */
static bool keep(struct ctl *c, amqp_connection_state_t st, const struct dead *d)
{
	if (c->cfg->queue_type != RD_QUEUE_QUORUM)
		return true;
	if (!publish_confirmed(st, "", c->cfg->dead_queue, d, false))
		return false;
	if (amqp_basic_ack(st, CH_GET, d->tag, 0) != AMQP_STATUS_OK) {
		ctl_die("dead: cannot acknowledge a message put back; it may appear twice");
		return false;
	}
	return true;
}

/* How many messages to take: a quorum queue is cycled whole (see keep). */
static long takes(struct ctl *c, long count, long upto)
{
	if (c->cfg->queue_type == RD_QUEUE_QUORUM || upto == 0)
		return count > upto ? count : upto;
	return upto;
}

/* ---- replay ------------------------------------------------------------------ */

static bool republish(struct ctl *c, amqp_connection_state_t st, const struct dead *d)
{
	char rk[256];
	hdr(d, "x-rosterd-routing-key", rk, sizeof(rk));
	if (!rk[0])
		rd_strlcpy(rk, d->type, sizeof(rk));
	if (!rk[0]) {
		ctl_die("dead: message has no routing key header and no type; not replayed");
		return false;
	}
	return publish_confirmed(st, c->cfg->exchange, rk, d, true);
}

/* Forget the rejection recorded for the message (see the file's comment). */
static bool forget(PGconn *conn, const struct dead *d)
{
	if (!d->org[0] || !d->id[0])
		return true;
	const char *p[2] = {d->org, d->id};
	PGresult *res = ctl_query(conn, "dead_forget", 2, p);
	PQclear(res);
	return res != NULL;
}

static int replay(struct ctl *c, amqp_connection_state_t st, long n, long count)
{
	PGconn *conn = ctl_connect(c);
	if (!conn)
		return 1;
	json_t *done = json_array();
	long replayed = 0, total = takes(c, count, n);
	int rc = 1;
	for (long i = 1; i <= total; i++) {
		struct dead d;
		int g = get_one(st, c->cfg->dead_queue, &d);
		if (g < 0)
			goto out;
		if (g == 0) {
			if (n && i <= n) {
				ctl_die("dead: no message %ld (the queue holds %ld)", n, i - 1);
				goto out;
			}
			break;
		}
		bool ok;
		if (n && i != n) { /* not the one asked for: back in its place */
			ok = keep(c, st, &d);
		} else {
			ok = forget(conn, &d) && republish(c, st, &d);
			if (ok && amqp_basic_ack(st, CH_GET, d.tag, 0) != AMQP_STATUS_OK) {
				ctl_die(
				    "dead: cannot acknowledge the dead copy; it may be replayed "
				    "twice (a duplicate then)");
				ok = false;
			}
			if (ok) {
				replayed++;
				json_array_append_new(done, dead_json(&d, i, false));
			}
		}
		amqp_destroy_message(&d.msg);
		if (!ok)
			goto out;
	}
	if (c->json) {
		print_json(done);
	} else {
		size_t k;
		json_t *v;
		json_array_foreach(done, k, v)
		{
			printf("replayed %s %s/%s\n", json_string_value(json_object_get(v, "type")),
			       json_string_value(json_object_get(v, "org")),
			       json_string_value(json_object_get(v, "id")));
		}
		printf("%ld replayed to %s\n", replayed, c->cfg->exchange);
	}
	rc = 0;
out:
	requeue_all(st);
	json_decref(done);
	PQfinish(conn);
	return rc;
}

/* ---- list and show -------------------------------------------------------- */

static void print_show(json_t *o)
{
	const char *k;
	json_t *v;
	json_object_foreach(o, k, v)
	{
		if (strcmp(k, "headers") == 0 || strcmp(k, "body") == 0)
			continue;
		char *t = json_is_string(v) ? strdup(json_string_value(v))
					    : json_dumps(v, JSON_ENCODE_ANY);
		printf("%-12s %s\n", k, t ? t : "");
		free(t);
	}
	printf("headers:\n");
	json_object_foreach(json_object_get(o, "headers"), k, v)
	{
		printf("  %s: %s\n", k, json_string_value(v));
	}
	printf("body:\n");
	json_dumpf(json_object_get(o, "body"), stdout, JSON_INDENT(2) | JSON_ENCODE_ANY);
	fputc('\n', stdout);
}

static int browse(struct ctl *c, amqp_connection_state_t st, long count, long show)
{
	json_t *all = json_array(), *shown = NULL;
	int rc = 1;
	long total = takes(c, count, show);
	for (long i = 1; i <= total; i++) {
		struct dead d;
		int g = get_one(st, c->cfg->dead_queue, &d);
		if (g < 0)
			goto out;
		if (g == 0) {
			if (show && i <= show) {
				ctl_die("dead: no message %ld (the queue holds %ld)", show, i - 1);
				goto out;
			}
			break;
		}
		if (!show)
			json_array_append_new(all, dead_json(&d, i, false));
		else if (i == show)
			shown = dead_json(&d, i, true);
		bool ok = keep(c, st, &d);
		amqp_destroy_message(&d.msg);
		if (!ok)
			goto out;
	}
	if (shown && c->json) {
		print_json(shown);
	} else if (shown) {
		print_show(shown);
	} else if (c->json) {
		print_json(all);
	} else {
		printf("%-4s %-20s %-20s %-12s %-24s %s\n", "N", "ERROR AT", "TYPE", "ORG", "ID",
		       "ERROR");
		size_t k;
		json_t *o;
		json_array_foreach(all, k, o)
		{
			printf("%-4lld %-20s %-20s %-12s %-24s %s\n",
			       (long long)json_integer_value(json_object_get(o, "n")),
			       json_string_value(json_object_get(o, "error_at")),
			       json_string_value(json_object_get(o, "type")),
			       json_string_value(json_object_get(o, "org")),
			       json_string_value(json_object_get(o, "id")),
			       json_string_value(json_object_get(o, "error")));
		}
	}
	rc = 0;
out:
	requeue_all(st);
	json_decref(shown);
	json_decref(all);
	return rc;
}

static long position(const char *s)
{
	char *end;
	errno = 0;
	long n = strtol(s, &end, 10);
	if (errno || *end || n < 1)
		return -1;
	return n;
}

int ctl_dead(struct ctl *c)
{
	const char *sub = c->argc > 0 ? c->argv[0] : NULL;
	long n = 0;
	bool all = false;
	if (!sub)
		return ctl_die("dead: list, show N, replay N or replay --all");
	if (strcmp(sub, "list") == 0) {
		if (c->argc != 1)
			return ctl_die("dead list: unexpected argument %s", c->argv[1]);
	} else if (strcmp(sub, "show") == 0 || strcmp(sub, "replay") == 0) {
		if (c->argc != 2)
			return ctl_die("dead %s: want %s", sub, sub[0] == 's' ? "N" : "N or --all");
		if (sub[0] == 'r' && strcmp(c->argv[1], "--all") == 0)
			all = true;
		else if ((n = position(c->argv[1])) < 0)
			return ctl_die("dead %s: N is a position in the queue (1 = oldest), "
				       "not %s",
				       sub, c->argv[1]);
	} else {
		return ctl_die("dead: unknown subcommand %s (list, show N, replay N|--all)", sub);
	}

	amqp_connection_state_t st = ctl_amqp_connect(c);
	if (!st)
		return 1;
	int rc = 1;
	long count = queue_count(st, c->cfg->dead_queue);
	if (count < 0)
		goto out;
	if (n > count) {
		ctl_die("dead: no message %ld (the queue holds %ld)", n, count);
		goto out;
	}
	/* the confirm channel: replays, and put-backs on a quorum queue */
	amqp_channel_open(st, CH_PUB);
	if (!ok_reply(st, "channel.open"))
		goto out;
	amqp_confirm_select(st, CH_PUB);
	if (!ok_reply(st, "confirm.select"))
		goto out;
	if (sub[0] == 'l')
		rc = browse(c, st, count, 0);
	else if (sub[0] == 's')
		rc = browse(c, st, count, n);
	else
		rc = replay(c, st, all ? 0 : n, count);
out:
	ctl_amqp_close(st);
	return rc;
}
