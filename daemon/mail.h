/* mail.h: the mail workers ([smtp] workers threads) that deliver the
 * outbox over SMTP with libesmtp. Each worker claims due rows on its own
 * PostgreSQL connection (rd.outbox_claim: SKIP LOCKED plus a lease), sends
 * them in one SMTP session, reads every recipient's and message's status,
 * and records the outcomes (sent; retrying with growing delays; failed).
 * Workers never touch libevent or AMQP: they report counters to the loop
 * through a locked accumulator plus an eventfd (written only when it was
 * empty). See docs/outbox.md. Owns struct rd_mail and its threads. */
#ifndef RD_MAIL_H
#define RD_MAIL_H

#include <event2/event.h>
#include <stdbool.h>
#include <stdint.h>

#include "config.h"
#include "util.h"

struct rd_mail;
struct rd_outbox_counters;

/* Check the SMTP settings (reads [smtp] password_file). The counters are
 * the loop's: they are only written from a loop callback. NULL and err on
 * a bad setting. Starts nothing yet. */
struct rd_mail *rd_mail_new(struct event_base *base, const struct rd_config *cfg,
			    struct rd_outbox_counters *counters, struct rd_err *err) RD_WUR;

/* Start the worker threads (the schema must be migrated). Idempotent. */
void rd_mail_start(struct rd_mail *m);

/* SIGHUP: take the reloadable keys (mail_retry_base_ms, mail_lifetime,
 * timeout). The others need a restart (config.c says which). */
void rd_mail_set_config(struct rd_mail *m, const struct rd_config *cfg);

/* Draining: take no new rows, finish and record the sessions in progress.
 * Workers still connecting are interrupted. deadline_us: rd_mono_us()
 * time by which rd_mail_stop gives up waiting. */
void rd_mail_drain(struct rd_mail *m, int64_t deadline_us);

/* Stop and join the workers, waiting until the drain deadline (or
 * drain_timeout from now when rd_mail_drain was not called). false when a
 * worker is still busy then (a stalled server): the caller must exit
 * without rd_mail_free; that worker's rows come back by their lease. */
bool rd_mail_stop(struct rd_mail *m) RD_WUR;

void rd_mail_free(struct rd_mail *m);

#endif
