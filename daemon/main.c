/* main.c: rosterd's entry point. Parses the command line, loads the
 * configuration, wires the loop (signals, timers), starts PostgreSQL
 * (migrations) then RabbitMQ, publishes status, talks to systemd, drains on
 * SIGTERM and reloads on SIGHUP. */
#include <errno.h>
#include <event2/event.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include "daemon.h"
#include "log.h"
#include "mail.h"

static void usage(FILE *out)
{
	fprintf(out, "usage: rosterd [-c FILE] [--check-config [-v]]\n"
		     "  -c, --config FILE   configuration file (default " RD_CONFIG_DEFAULT_PATH ")\n"
		     "      --check-config  validate the configuration and exit (0 when valid)\n"
		     "  -v, --verbose       with --check-config: print the effective values\n"
		     "  -V, --version       print the version and exit\n"
		     "  -h, --help          this text\n"
		     "Environment: ROSTERD_<SECTION>_<KEY> overrides a key of the file.\n"
		     "Signals: SIGTERM drains and exits, SIGHUP reloads, SIGUSR1 publishes status.\n");
}

static void update_state(struct rd_daemon *d)
{
	if (d->draining) {
		d->state = RD_ST_DRAINING;
		return;
	}
	if (d->state == RD_ST_STARTING)
		return;
	bool ok = rd_amqp_connected(d->amqp) && !rd_amqp_blocked(d->amqp) &&
		  rd_pg_connected(d->pg);
	enum rd_state next = ok ? RD_ST_RUNNING : RD_ST_DEGRADED;
	if (next != d->state) {
		rd_log(ok ? LOG_NOTICE : LOG_WARNING, "state",
		       "state=%s amqp=%d amqp_blocked=%d postgres=%d", rd_state_name(next),
		       rd_amqp_connected(d->amqp), rd_amqp_blocked(d->amqp), rd_pg_connected(d->pg));
		d->state = next;
	}
}

static void publish_status(struct rd_daemon *d)
{
	update_state(d);
	char *json = rd_status_json(d);
	if (json) {
		/* not while blocked: the broker does not read that connection */
		if (rd_amqp_connected(d->amqp) && !rd_amqp_blocked(d->amqp))
			(void)rd_amqp_publish_status(d->amqp, json, strlen(json));
		free(json);
	}
	sd_notifyf(0, "STATUS=%s: received %llu, applied %llu, rejected %llu, pending %d",
		   rd_state_name(d->state), (unsigned long long)d->n.received,
		   (unsigned long long)d->n.applied, (unsigned long long)d->n.rejected,
		   d->npending);
}

static void status_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	publish_status(arg);
}

static void arm_status(struct rd_daemon *d)
{
	struct timeval tv = {d->cfg->status_interval, 0};
	event_del(d->ev_status);
	event_add(d->ev_status, &tv);
}

static void watchdog_cb(evutil_socket_t fd, short what, void *arg)
{
	(void)fd;
	(void)what;
	(void)arg;
	/* from the loop itself: a stuck loop stops the keep-alives */
	sd_notify(0, "WATCHDOG=1");
}

/* Ready: PostgreSQL migrated and the consumer consuming (once). */
static void mark_ready(struct rd_daemon *d)
{
	if (d->ready)
		return;
	d->ready = true;
	d->state = RD_ST_DEGRADED;
	update_state(d);
	rd_log(LOG_NOTICE, "ready", "instance=%s version=%s queue=%s prefetch=%d batch_size=%d",
	       d->cfg->instance, ROSTERD_VERSION, d->cfg->queue, d->cfg->prefetch,
	       d->cfg->batch_size);
	sd_notify(0, "READY=1");
	publish_status(d);
}

static void on_amqp_state(void *arg, bool up)
{
	struct rd_daemon *d = arg;
	if (!up)
		rd_pipeline_drop_stale(d);
	else if (d->pg_started)
		mark_ready(d);
	update_state(d);
}

static void on_pg_state(void *arg, bool up)
{
	struct rd_daemon *d = arg;
	update_state(d);
	if (up)
		rd_pipeline_flush(d);
}

static void drain_check_cb(evutil_socket_t fd, short what, void *arg)
{
	struct rd_daemon *d = arg;
	(void)fd;
	if (!(what & EV_TIMEOUT) || !d->draining)
		return;
	if (rd_pipeline_idle(d)) {
		rd_log(LOG_NOTICE, "drained", "applied=%llu", (unsigned long long)d->n.applied);
		event_base_loopexit(d->base, NULL);
		return;
	}
	/* once a second: what the drain still waits for */
	int64_t now = rd_mono_us();
	if (now - d->drain_logged_us >= 1000000) {
		d->drain_logged_us = now;
		rd_log(LOG_NOTICE, "drain.waiting", "pending=%d inflight_batches=%d pg_busy=%d",
		       d->npending, d->inflight_batches, rd_pg_busy(d->pg));
	}
}

static void drain_deadline_cb(evutil_socket_t fd, short what, void *arg)
{
	struct rd_daemon *d = arg;
	(void)fd;
	(void)what;
	rd_log(LOG_WARNING, "drain.timeout", "inflight_batches=%d", d->inflight_batches);
	event_base_loopbreak(d->base);
}

static void start_drain(struct rd_daemon *d)
{
	rd_log(LOG_NOTICE, "draining", "pending=%d inflight_batches=%d", d->npending,
	       d->inflight_batches);
	sd_notify(0, "STOPPING=1");
	d->draining = true;
	d->drain_logged_us = rd_mono_us();
	d->drain_deadline_us = d->drain_logged_us + (int64_t)d->cfg->drain_timeout * 1000000;
	d->state = RD_ST_DRAINING;
	rd_amqp_cancel(d->amqp);
	rd_pipeline_requeue_pending(d);
	/* mail workers: take no new rows, finish the sessions in progress */
	rd_mail_drain(d->mail, rd_mono_us() + (int64_t)d->cfg->drain_timeout * 1000000);
	struct timeval tv = {d->cfg->drain_timeout, 0};
	d->ev_drain_deadline = evtimer_new(d->base, drain_deadline_cb, d);
	event_add(d->ev_drain_deadline, &tv);
	struct event *check = event_new(d->base, -1, EV_PERSIST, drain_check_cb, d);
	struct timeval every = {0, 10 * 1000};
	event_add(check, &every);
	/* freed with the base at exit */
	d->ev_drain_check = check;
}

static void sigterm_cb(evutil_socket_t sig, short what, void *arg)
{
	struct rd_daemon *d = arg;
	(void)what;
	if (d->draining) {
		rd_log(LOG_NOTICE, "exit", "signal=%d reason=second", (int)sig);
		event_base_loopbreak(d->base);
		return;
	}
	start_drain(d);
}

static void reload_warn(const char *key, void *arg)
{
	(void)arg;
	rd_log(LOG_WARNING, "reload.needs_restart", "key=%s", key);
}

static void sighup_cb(evutil_socket_t sig, short what, void *arg)
{
	struct rd_daemon *d = arg;
	struct rd_err err = {0};
	(void)sig;
	(void)what;
	sd_notify(0, "RELOADING=1");
	struct rd_config *next = rd_config_load(d->config_path, &err);
	if (!next) {
		rd_log(LOG_ERR, "reload.failed", "error=\"%s\" kept=old", err.msg);
		sd_notify(0, "READY=1");
		return;
	}
	struct rd_config *merged = rd_config_reload(d->cfg, next, reload_warn, d);
	rd_config_free(next);
	struct rd_config *old = (struct rd_config *)d->cfg;
	d->cfg = merged;
	rd_amqp_set_config(d->amqp, merged);
	rd_pg_set_config(d->pg, merged);
	rd_mail_set_config(d->mail, merged); /* mail workers: reloadable [smtp] keys */
	rd_log_set_level(merged->log_level);
	rd_config_free(old);
	arm_status(d);
	rd_log(LOG_NOTICE, "reloaded", "batch_size=%d max_retries=%d", merged->batch_size,
	       merged->max_retries);
	sd_notify(0, "READY=1");
}

static void sigusr1_cb(evutil_socket_t sig, short what, void *arg)
{
	(void)sig;
	(void)what;
	publish_status(arg);
}

static void start_cb(evutil_socket_t fd, short what, void *arg)
{
	struct rd_daemon *d = arg;
	struct rd_err err = {0};
	(void)fd;
	(void)what;
	if (rd_pg_start(d->pg, &err) != RD_OK) {
		rd_log(LOG_WARNING, "start.waiting", "for=postgres error=\"%s\"", err.msg);
		struct timeval tv = {1, 0};
		event_add(d->ev_start, &tv);
		return;
	}
	rd_mail_start(d->mail); /* mail workers, once the schema is migrated */
	d->pg_started = true;
	if (rd_amqp_start(d->amqp, &err) != RD_OK) {
		/* the consumer keeps trying in the background; ready when it is in */
		rd_log(LOG_WARNING, "start.waiting", "for=amqp error=\"%s\"", err.msg);
		return;
	}
	mark_ready(d);
}

static void warn_config_mode(const char *path)
{
	struct stat st;
	if (path && stat(path, &st) == 0 && (st.st_mode & S_IROTH))
		rd_log(LOG_WARNING, "config.readable",
		       "path=%s mode=%o hint=\"others can read it; chmod o-r\"", path,
		       (unsigned)(st.st_mode & 0777));
}

int main(int argc, char **argv)
{
	const char *path = NULL;
	bool check = false, verbose = false;
	static const struct option opts[] = {{"config", required_argument, NULL, 'c'},
					     {"check-config", no_argument, NULL, 'C'},
					     {"verbose", no_argument, NULL, 'v'},
					     {"version", no_argument, NULL, 'V'},
					     {"help", no_argument, NULL, 'h'},
					     {NULL, 0, NULL, 0}};
	int c;
	while ((c = getopt_long(argc, argv, "c:vVh", opts, NULL)) != -1) {
		switch (c) {
		case 'c':
			path = optarg;
			break;
		case 'C':
			check = true;
			break;
		case 'v':
			verbose = true;
			break;
		case 'V':
			printf("rosterd %s\n", ROSTERD_VERSION);
			return 0;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (optind < argc) {
		fprintf(stderr, "rosterd: unexpected argument: %s\n", argv[optind]);
		usage(stderr);
		return 2;
	}
	if (!path)
		path = RD_CONFIG_DEFAULT_PATH;

	struct rd_err err = {0};
	struct rd_config *cfg = rd_config_load(path, &err);
	if (!cfg) {
		fprintf(stderr, "rosterd: %s\n", err.msg);
		return 1;
	}
	if (check) {
		if (verbose)
			rd_config_dump(cfg, stdout);
		printf("rosterd: %s: configuration OK\n", path);
		rd_config_free(cfg);
		return 0;
	}

	rd_log_init(cfg->instance, cfg->log_level);
	warn_config_mode(path);
	signal(SIGPIPE, SIG_IGN);

	static struct rd_daemon dmn;
	struct rd_daemon *d = &dmn;
	d->base = event_base_new();
	/* mail workers (started in start_cb); a bad [smtp] setting stops here */
	d->mail = rd_mail_new(d->base, cfg, &d->outbox, &err);
	if (!d->mail) {
		rd_log(LOG_ERR, "start.failed", "error=\"%s\"", err.msg);
		event_base_free(d->base);
		rd_config_free(cfg);
		return 1;
	}
	d->cfg = cfg;
	d->config_path = path;
	d->state = RD_ST_STARTING;
	d->started_us = rd_mono_us();
	rd_pipeline_init(d);
	struct rd_amqp_cb cb = {.on_delivery = rd_pipeline_on_delivery, .on_state = on_amqp_state};
	d->amqp = rd_amqp_new(d->base, cfg, &cb, d);
	d->pg = rd_pg_new(d->base, cfg, on_pg_state, d);

	d->sig_term = evsignal_new(d->base, SIGTERM, sigterm_cb, d);
	d->sig_int = evsignal_new(d->base, SIGINT, sigterm_cb, d);
	d->sig_hup = evsignal_new(d->base, SIGHUP, sighup_cb, d);
	d->sig_usr1 = evsignal_new(d->base, SIGUSR1, sigusr1_cb, d);
	event_add(d->sig_term, NULL);
	event_add(d->sig_int, NULL);
	event_add(d->sig_hup, NULL);
	event_add(d->sig_usr1, NULL);

	d->ev_status = event_new(d->base, -1, EV_PERSIST, status_cb, d);
	arm_status(d);
	if (sd_watchdog_enabled(0, &d->watchdog_usec) > 0) {
		d->ev_watchdog = event_new(d->base, -1, EV_PERSIST, watchdog_cb, d);
		struct timeval tv = {(time_t)(d->watchdog_usec / 2 / 1000000),
				     (suseconds_t)(d->watchdog_usec / 2 % 1000000)};
		event_add(d->ev_watchdog, &tv);
	}
	d->ev_start = evtimer_new(d->base, start_cb, d);
	struct timeval now = {0, 0};
	event_add(d->ev_start, &now);

	rd_log(LOG_NOTICE, "start", "version=%s config=%s", ROSTERD_VERSION, path);
	event_base_dispatch(d->base);
	rd_log(LOG_NOTICE, "stop", "received=%llu applied=%llu duplicate=%llu rejected=%llu",
	       (unsigned long long)d->n.received, (unsigned long long)d->n.applied,
	       (unsigned long long)d->n.duplicate, (unsigned long long)d->n.rejected);
	/* the acks of the last batches must reach the broker before the
	 * sockets close: a polite close waits until it has read them */
	rd_amqp_close(d->amqp, RD_AMQP_CLOSE_TIMEOUT_MS);

	/* mail workers: join them (until the drain deadline); one stuck on a
	 * stalled server is left behind: exit without freeing what it uses */
	if (!rd_mail_stop(d->mail)) {
		rd_log(LOG_WARNING, "exit", "reason=mail_workers_busy code=%d", d->exit_code);
		_exit(d->exit_code);
	}
	rd_mail_free(d->mail);

	/* free everything: sanitizer builds check for leaks */
	rd_pipeline_free(d);
	rd_amqp_free(d->amqp);
	rd_pg_free(d->pg);
	struct event *evs[] = {d->sig_term, d->sig_int,	     d->sig_hup,	   d->sig_usr1,
			       d->ev_status, d->ev_watchdog, d->ev_drain_deadline, d->ev_start,
			       d->ev_drain_check};
	for (size_t i = 0; i < sizeof(evs) / sizeof(evs[0]); i++)
		if (evs[i])
			event_free(evs[i]);
	event_base_free(d->base);
	rd_config_free((struct rd_config *)d->cfg);
	return d->exit_code;
}
