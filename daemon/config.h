/* config.h: the configuration, read from one INI file plus environment
 * overrides (ROSTERD_<SECTION>_<KEY>, upper case), checked against one table
 * of keys (type, default, bounds, reloadable) in config.c. A loaded config is
 * immutable; SIGHUP loads a new one and swaps it whole. Owns struct
 * rd_config. */
#ifndef RD_CONFIG_H
#define RD_CONFIG_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "util.h"

#define RD_CONFIG_DEFAULT_PATH "/etc/rosterd/rosterd.conf"

enum rd_starttls { RD_STARTTLS_NO, RD_STARTTLS_TRY, RD_STARTTLS_REQUIRE };
enum rd_queue_type { RD_QUEUE_CLASSIC, RD_QUEUE_QUORUM };

struct rd_config {
	/* [daemon] */
	char *instance;            /* name in logs and status */
	int status_interval;       /* s */
	int retry_base_ms;         /* first delay of a waiting message */
	int max_retries;
	int max_message_bytes;
	int batch_size;            /* messages per PostgreSQL transaction */
	int batch_wait_ms;         /* how long a partial batch may wait */
	int drain_timeout;         /* s, SIGTERM deadline */
	int log_level;             /* syslog level: 0..7 (config: err..debug) */

	/* [amqp] */
	char *url;                 /* one or more URLs, separated by spaces or commas */
	char *password_file;       /* overrides the URL's password when set */
	char *ca_file;             /* for amqps:// */
	bool verify_peer;          /* amqps: verify certificate and host name */
	char *queue;               /* rosterd.events (queue) */
	char *exchange;            /* rosterd.events (topic exchange) */
	char *retry_queue;         /* rosterd.retry */
	char *dead_exchange;       /* rosterd.dead (fanout exchange) */
	char *dead_queue;          /* rosterd.dead (queue) */
	char *status_exchange;     /* rosterd.status (fanout exchange) */
	enum rd_queue_type queue_type;
	int prefetch;
	int heartbeat;             /* s, 0 = off */
	int delivery_limit;        /* quorum queues: x-delivery-limit */

	/* [postgres] */
	char *conninfo;
	char *migrate_conninfo;    /* owner's login for migrations, rosterctl; "" = conninfo */
	char *pg_password_file;    /* [postgres] password_file */
	int connections;           /* PostgreSQL connections per instance */
	int statement_timeout_ms;

	/* [smtp] */
	char *smtp_host;
	int smtp_port;
	enum rd_starttls starttls;
	char *smtp_username;
	char *smtp_password_file;
	int workers;
	int mail_retry_base_ms;
	int mail_lifetime;         /* s */
	int smtp_timeout;          /* s, per SMTP command */
	char *smtp_ca_file;        /* CA bundle for STARTTLS; "" = system store */
};

/* Load path (NULL: RD_CONFIG_DEFAULT_PATH), apply environment overrides,
 * check every value. On error returns NULL and err->msg names the file,
 * line or key and what is wrong
 * ("FILE:12: [amqp] prefetch: \"0\" is below the minimum 1"). */
struct rd_config *rd_config_load(const char *path, struct rd_err *err) RD_WUR;
void rd_config_free(struct rd_config *cfg);

/* For SIGHUP: a new config made of `next`'s reloadable keys and `cur`'s
 * others. Each non-reloadable key that differs is named in a warning line
 * written through warn (may be NULL). The result is a fresh copy. */
struct rd_config *rd_config_reload(const struct rd_config *cur, const struct rd_config *next,
				   void (*warn)(const char *key, void *arg), void *arg);

/* Print every key with its effective value, as INI ("--check-config -v");
 * passwords are never printed (URLs have their password masked). */
void rd_config_dump(const struct rd_config *cfg, FILE *out);

/* "err", "info"...: the config name of a syslog level (0..7), "?" otherwise. */
const char *rd_config_level_name(int level);

/* One row of the table of keys, for docs and tests. The strings are static. */
struct rd_config_keyinfo {
	const char *section;	  /* "amqp" */
	const char *key;	  /* "prefetch" */
	const char *type;	  /* "string", "int", "bool" or "enum" */
	const char *def;	  /* default, as written in the file */
	long min, max;		  /* int keys only */
	const char *const *names; /* enum keys only: NULL-terminated */
	bool reloadable;	  /* taken on SIGHUP; otherwise needs a restart */
	bool secret;		  /* never printed by rd_config_dump */
};

/* Row i of the table (0, 1, ...); false once i is past the end. */
bool rd_config_key_info(size_t i, struct rd_config_keyinfo *out);

#endif
