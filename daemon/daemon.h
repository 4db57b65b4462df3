/* daemon.h: the daemon context, the one mutable global of rosterd. Holds
 * the loop, the connections, the immutable current config, the counters
 * and the message pipeline. Passed as the callback argument everywhere. */
#ifndef RD_DAEMON_H
#define RD_DAEMON_H

#include <event2/event.h>
#include <stdbool.h>
#include <stdint.h>

#include "amqp_io.h"
#include "config.h"
#include "pg.h"

enum rd_state { RD_ST_STARTING, RD_ST_RUNNING, RD_ST_DRAINING, RD_ST_DEGRADED };

struct rd_counters {
	uint64_t received, applied, duplicate, stale, rejected, retried;
};

/* Outbox figures, cumulative since start (filled by the mail workers). */
struct rd_outbox_counters {
	uint64_t queued, sent, retrying, failed;
};

#define RD_LAT_SAMPLES 4096
#define RD_MAX_PARTS 64 /* [postgres] connections is at most 64 */

struct rd_msg;
struct rd_mail; /* mail.h: the mail workers (Step 4) */

struct rd_daemon {
	struct event_base *base;
	const struct rd_config *cfg;
	const char *config_path;
	struct rd_amqp *amqp;
	struct rd_pg *pg;
	enum rd_state state;
	bool draining;
	int64_t drain_logged_us;  /* last drain.waiting log */
	int64_t drain_deadline_us; /* drain_timeout after SIGTERM */
	bool pg_started; /* migrations applied, pool started */
	bool ready;      /* READY=1 sent */
	int64_t started_us;
	struct rd_counters n;
	struct rd_outbox_counters outbox;
	struct rd_mail *mail; /* mail workers (mail.c); they write `outbox` via the loop */

	/* apply latency (receipt to settlement), microseconds, a ring */
	uint32_t lat[RD_LAT_SAMPLES];
	uint32_t nlat;

	/* messages received and not yet handed to PostgreSQL, partitioned
	 * by organisation: partition p runs on connection p, so batches of
	 * one instance never wait for each other's locks */
	struct rd_part {
		struct rd_msg *head, *tail;
		int n;
	} parts[RD_MAX_PARTS];
	int nparts;
	int npending;
	int inflight_batches;
	struct event *batch_timer;
	bool batch_timer_armed;
	bool batch_due;

	struct event *ev_status, *ev_watchdog, *ev_drain_deadline, *ev_start, *ev_drain_check;
	struct event *sig_term, *sig_int, *sig_hup, *sig_usr1;
	uint64_t watchdog_usec;
	int exit_code;
};

/* pipeline.c */
void rd_pipeline_init(struct rd_daemon *d);
void rd_pipeline_free(struct rd_daemon *d);
void rd_pipeline_on_delivery(void *arg, struct rd_delivery *dl);
/* Hand pending messages to idle PostgreSQL connections. */
void rd_pipeline_flush(struct rd_daemon *d);
/* The consumer connection was lost: forget what the broker requeued. */
void rd_pipeline_drop_stale(struct rd_daemon *d);
/* Draining: give back what has not been started. */
void rd_pipeline_requeue_pending(struct rd_daemon *d);
bool rd_pipeline_idle(const struct rd_daemon *d);

/* status.c */
char *rd_status_json(const struct rd_daemon *d); /* caller frees */
const char *rd_state_name(enum rd_state st);

#endif
