/* status.c: rosterctl status [--wait SECONDS] [--json]
 *
 * The latest status document (SPEC 6) of every running instance: an
 * exclusive, auto-deleted server-named queue bound to the status exchange
 * collects what the instances publish for --wait seconds (default the
 * configured status_interval + 2, so that every live instance publishes at
 * least once), keeping the newest document per instance. Prints a table, or
 * with --json an array of the documents as published, sorted by instance.
 * An instance that published nothing in the window is not listed. */
#include <amqp.h>
#include <errno.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl.h"
#include "util.h"

static json_t *jget(json_t *doc, const char *a, const char *b)
{
	json_t *v = json_object_get(doc, a);
	return b ? json_object_get(v, b) : v;
}

static long long num(json_t *doc, const char *a, const char *b)
{
	json_t *v = jget(doc, a, b);
	return json_is_integer(v) ? (long long)json_integer_value(v)
				  : (long long)json_number_value(v);
}

static int strcmp_p(const void *a, const void *b)
{
	return strcmp(*(const char *const *)a, *(const char *const *)b);
}

int ctl_status(struct ctl *c)
{
	long wait = c->cfg->status_interval + 2;
	for (int i = 0; i < c->argc; i++) {
		if (strcmp(c->argv[i], "--wait") == 0 && i + 1 < c->argc) {
			char *end;
			errno = 0;
			wait = strtol(c->argv[++i], &end, 10);
			if (errno || *end || wait < 1 || wait > 3600)
				return ctl_die("status: --wait: seconds, 1..3600");
		} else {
			return ctl_die("status: unexpected argument %s", c->argv[i]);
		}
	}
	amqp_connection_state_t st = ctl_amqp_connect(c);
	if (!st)
		return 1;
	int rc = 1;
	json_t *latest = json_object();
	amqp_queue_declare_ok_t *q =
	    amqp_queue_declare(st, 1, amqp_empty_bytes, 0, 0, 1, 1, amqp_empty_table);
	if (!q) {
		ctl_die("status: cannot declare a temporary queue");
		goto out;
	}
	amqp_bytes_t qname = amqp_bytes_malloc_dup(q->queue);
	amqp_queue_bind(st, 1, qname, amqp_cstring_bytes(c->cfg->status_exchange),
			amqp_cstring_bytes(""), amqp_empty_table);
	if (amqp_get_rpc_reply(st).reply_type != AMQP_RESPONSE_NORMAL) {
		ctl_die("status: exchange %s not found (has no rosterd started yet?)",
			c->cfg->status_exchange);
		amqp_bytes_free(qname);
		goto out;
	}
	amqp_basic_consume(st, 1, qname, amqp_empty_bytes, 0, 1, 1, amqp_empty_table);
	amqp_bytes_free(qname);
	if (amqp_get_rpc_reply(st).reply_type != AMQP_RESPONSE_NORMAL) {
		ctl_die("status: cannot consume from the temporary queue");
		goto out;
	}
	int64_t deadline = rd_mono_us() + (int64_t)wait * 1000000;
	for (;;) {
		int64_t left = deadline - rd_mono_us();
		if (left <= 0)
			break;
		struct timeval tv = {(time_t)(left / 1000000), (suseconds_t)(left % 1000000)};
		amqp_envelope_t env;
		amqp_maybe_release_buffers(st);
		amqp_rpc_reply_t r = amqp_consume_message(st, &env, &tv, 0);
		if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION &&
		    r.library_error == AMQP_STATUS_TIMEOUT)
			break;
		if (r.reply_type != AMQP_RESPONSE_NORMAL) {
			if (r.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION &&
			    r.library_error == AMQP_STATUS_UNEXPECTED_STATE) {
				/* a frame that is no delivery (e.g. channel.close) */
				amqp_frame_t f;
				if (amqp_simple_wait_frame_noblock(st, &f, &tv) != AMQP_STATUS_OK)
					break;
				continue;
			}
			ctl_die("status: connection to the broker lost");
			goto out;
		}
		json_error_t jerr;
		json_t *doc = json_loadb(env.message.body.bytes, env.message.body.len, 0, &jerr);
		const char *inst = json_string_value(json_object_get(doc, "instance"));
		if (inst)
			json_object_set(latest, inst, doc); /* arrival order: the newest wins */
		json_decref(doc);
		amqp_destroy_envelope(&env);
	}

	/* sorted by instance */
	size_t n = json_object_size(latest);
	const char **names = rd_xcalloc(n ? n : 1, sizeof(*names));
	size_t k = 0;
	const char *key;
	json_t *v;
	json_object_foreach(latest, key, v) names[k++] = key;
	qsort(names, n, sizeof(*names), strcmp_p);
	if (c->json) {
		json_t *arr = json_array();
		for (size_t i = 0; i < n; i++)
			json_array_append(arr, json_object_get(latest, names[i]));
		json_dumpf(arr, stdout, JSON_INDENT(2));
		fputc('\n', stdout);
		json_decref(arr);
	} else if (n == 0) {
		printf("no status document in %ld s: no instance running, or none publishing to "
		       "%s\n",
		       wait, c->cfg->status_exchange);
	} else {
		printf("%-20s %-9s %-8s %9s %4s %4s %10s %10s %8s %8s %8s %8s %8s\n", "INSTANCE",
		       "STATE", "VERSION", "UPTIME_S", "AMQP", "PG", "RECEIVED", "APPLIED", "DUPL",
		       "REJECTED", "RETRIED", "MAILQ", "P99_MS");
		for (size_t i = 0; i < n; i++) {
			json_t *d = json_object_get(latest, names[i]);
			printf(
			    "%-20s %-9s %-8s %9lld %4s %4s %10lld %10lld %8lld %8lld %8lld %8lld "
			    "%8.1f\n",
			    names[i], json_string_value(jget(d, "state", NULL)) ?: "?",
			    json_string_value(jget(d, "version", NULL)) ?: "?",
			    num(d, "uptime_s", NULL),
			    json_is_true(jget(d, "amqp", "connected")) ? "up" : "down",
			    json_is_true(jget(d, "postgres", "connected")) ? "up" : "down",
			    num(d, "messages", "received"), num(d, "messages", "applied"),
			    num(d, "messages", "duplicate"), num(d, "messages", "rejected"),
			    num(d, "messages", "retried"), num(d, "outbox", "queued"),
			    json_number_value(jget(d, "latency_ms", "p99")));
		}
	}
	free(names);
	rc = 0;
out:
	json_decref(latest);
	ctl_amqp_close(st);
	return rc;
}
