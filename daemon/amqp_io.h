/* amqp_io.h: RabbitMQ through librabbitmq-c, driven by the event loop.
 *
 * Two connections: the consumer (basic.consume with prefetch, acks) and the
 * publisher (confirm mode: dead-letter, retry and status messages), so that
 * a publisher blocked by the broker never stops consumption. Frames are
 * read without blocking: the library's buffered frames are drained before
 * the loop waits on the socket again, and a timer keeps heartbeats going.
 * Declares the topology of SPEC 1 at start. Reconnects with back-off over
 * the configured URLs. Owns struct rd_amqp and struct rd_delivery. */
#ifndef RD_AMQP_IO_H
#define RD_AMQP_IO_H

#include <amqp.h>
#include <event2/event.h>
#include <stdbool.h>
#include <stdint.h>

#include "config.h"
#include "util.h"

struct rd_amqp;

/* One message as delivered; owned by whoever holds it, freed with
 * rd_delivery_free. */
struct rd_delivery {
	uint32_t gen;          /* consumer connection generation */
	uint64_t tag;
	bool redelivered;
	char *exchange;
	char *routing_key;
	char *content_type;    /* may be NULL */
	amqp_table_t headers;  /* cloned into pool */
	amqp_pool_t pool;
	uint8_t *body;         /* NULL when unheld */
	size_t body_len;
	uint64_t body_size;    /* as announced by the broker */
	bool oversize;         /* body_size > max_message_bytes: rejected, body kept */
	bool unheld;           /* too large to hold at all: body not buffered */
	int retries;           /* x-rosterd-retries header, 0 when absent */
	int64_t recv_us;       /* rd_mono_us() at arrival */
};

void rd_delivery_free(struct rd_delivery *d);

struct rd_amqp_cb {
	/* Takes ownership of d. */
	void (*on_delivery)(void *arg, struct rd_delivery *d);
	/* Consumer connection up (consuming) or down. */
	void (*on_state)(void *arg, bool connected);
};

struct rd_amqp *rd_amqp_new(struct event_base *base, const struct rd_config *cfg,
			    const struct rd_amqp_cb *cb, void *arg);
void rd_amqp_free(struct rd_amqp *a);
void rd_amqp_set_config(struct rd_amqp *a, const struct rd_config *cfg);

/* Connect both connections and declare the topology; on failure the
 * consumer keeps retrying in the background. */
enum rd_status rd_amqp_start(struct rd_amqp *a, struct rd_err *err) RD_WUR;
bool rd_amqp_connected(const struct rd_amqp *a);
/* The broker blocked a connection (connection.blocked: memory or disk
 * alarm): publishes, hence dead-letters, retries and acks after them, wait.
 * The state is `degraded` meanwhile. */
bool rd_amqp_blocked(const struct rd_amqp *a);
/* Deliveries of another generation were requeued by the broker when their
 * connection was lost: they must not be settled any more. */
bool rd_amqp_current(const struct rd_amqp *a, const struct rd_delivery *d);

/* Settle a delivery: acks are sent with `multiple` where consecutive tags
 * allow. A delivery of an older generation (connection since lost) is
 * ignored: the broker has requeued it already. */
void rd_amqp_ack(struct rd_amqp *a, const struct rd_delivery *d);
/* Return it to the queue (basic.nack requeue=true). */
void rd_amqp_requeue(struct rd_amqp *a, const struct rd_delivery *d);
/* basic.reject without requeue: the broker drops it, or dead-letters it
 * when the queue has a dead-letter policy. Only for bodies too large to
 * hold (see RD_BODY_HARD_MAX), which cannot be republished. */
void rd_amqp_drop_to_dead(struct rd_amqp *a, const struct rd_delivery *d);

/* Stop consuming (basic.cancel); deliveries already received stay ours. */
void rd_amqp_cancel(struct rd_amqp *a);

/* Close both connections politely (connection.close, waiting up to
 * timeout_ms for close-ok): the broker answers only after it has handled
 * every frame sent before, so the last acks are not lost to a socket
 * closed under them. For a clean exit; rd_amqp_free closes what is left. */
#define RD_AMQP_CLOSE_TIMEOUT_MS 2000
void rd_amqp_close(struct rd_amqp *a, int timeout_ms);

/* Publications on the publisher connection. The dead and retry ones are
 * persistent and confirmed: call rd_amqp_confirm_wait after a group of
 * them; it returns RD_OK only when the broker confirmed every one. */
enum rd_status rd_amqp_publish_dead(struct rd_amqp *a, const struct rd_delivery *d,
				    const char *reason, struct rd_err *err) RD_WUR;
enum rd_status rd_amqp_publish_retry(struct rd_amqp *a, const struct rd_delivery *d,
				     int attempt, int64_t delay_ms, struct rd_err *err) RD_WUR;
enum rd_status rd_amqp_confirm_wait(struct rd_amqp *a, int timeout_ms, struct rd_err *err) RD_WUR;
/* Fire and forget (not persistent, not confirmed). */
enum rd_status rd_amqp_publish_status(struct rd_amqp *a, const char *json, size_t len);

#endif
