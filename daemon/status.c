/* status.c: the status document of SPEC 6, as JSON. */
#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "daemon.h"

const char *rd_state_name(enum rd_state st)
{
	switch (st) {
	case RD_ST_STARTING:
		return "starting";
	case RD_ST_RUNNING:
		return "running";
	case RD_ST_DRAINING:
		return "draining";
	case RD_ST_DEGRADED:
		return "degraded";
	}
	return "?";
}

static int cmp_u32(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
	return x < y ? -1 : x > y;
}

/* p-th percentile (0..100) of the recent latencies, in ms. */
static double percentile(const uint32_t *sorted, size_t n, double p)
{
	if (n == 0)
		return 0;
	size_t i = (size_t)(p / 100.0 * (double)(n - 1) + 0.5);
	if (i >= n)
		i = n - 1;
	return sorted[i] / 1000.0;
}

char *rd_status_json(const struct rd_daemon *d)
{
	size_t n = d->nlat < RD_LAT_SAMPLES ? d->nlat : RD_LAT_SAMPLES;
	uint32_t *s = rd_xmalloc((n ? n : 1) * sizeof(*s));
	memcpy(s, d->lat, n * sizeof(*s));
	qsort(s, n, sizeof(*s), cmp_u32);
	double p50 = percentile(s, n, 50), p99 = percentile(s, n, 99);
	free(s);

	json_t *doc = json_pack(
	    "{s:s, s:s, s:s, s:I, s:{s:b}, s:{s:b},"
	    " s:{s:I, s:I, s:I, s:I, s:I, s:I},"
	    " s:{s:I, s:I, s:I, s:I}, s:{s:f, s:f}}",
	    "instance", d->cfg->instance, "version", ROSTERD_VERSION, "state",
	    rd_state_name(d->state), "uptime_s", (json_int_t)((rd_mono_us() - d->started_us) / 1000000),
	    "amqp", "connected", rd_amqp_connected(d->amqp), "postgres", "connected",
	    rd_pg_connected(d->pg), "messages", "received", (json_int_t)d->n.received, "applied",
	    (json_int_t)d->n.applied, "duplicate", (json_int_t)d->n.duplicate, "stale",
	    (json_int_t)d->n.stale, "rejected", (json_int_t)d->n.rejected, "retried",
	    (json_int_t)d->n.retried, "outbox", "queued", (json_int_t)d->outbox.queued, "sent",
	    (json_int_t)d->outbox.sent, "retrying", (json_int_t)d->outbox.retrying, "failed",
	    (json_int_t)d->outbox.failed, "latency_ms", "p50", p50, "p99", p99);
	char *out = json_dumps(doc, JSON_COMPACT);
	json_decref(doc);
	return out;
}
