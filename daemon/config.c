/* config.c: the configuration. One table of keys (rd_config_keys) says, for
 * every key, its section, type, struct field, default, bounds and whether
 * SIGHUP may change it; everything else here is driven by that table:
 * defaults, the INI parser's handler (inih), the environment overrides
 * (ROSTERD_<SECTION>_<KEY>), rd_config_reload and rd_config_dump.
 *
 * Invariants of a loaded struct rd_config: every string field is a heap
 * string owned by the struct, never NULL ("" means "not set"); every int is
 * within its row's bounds; every enum is one of its row's names.
 *
 * inih (Debian 12, r55) is built with its defaults: inline comments start
 * with ';' after whitespace ("prefetch = 500 ; note"), lines are at most
 * INI_MAX_LINE (200) bytes, and an indented line continues the previous
 * key. The library would silently cut a longer line and would silently turn
 * an indented "key = value" into a continuation, so the line reader below
 * (read_line) reads whole lines itself, hands inih a stand-in for the value
 * of a long "key = value" line (keeping the value aside), and the handler
 * refuses continuations. */
#include "config.h"

#include <errno.h>
#include <ini.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "log.h"

enum rd_cf_type { RD_CF_STR, RD_CF_INT, RD_CF_BOOL, RD_CF_ENUM };

#define RD_CF_RELOAD 0x1u   /* SIGHUP takes the new value */
#define RD_CF_SECRET 0x2u   /* never printed */
#define RD_CF_MASKURL 0x4u  /* printed with URL / conninfo passwords masked */
#define RD_CF_NONEMPTY 0x8u /* RD_CF_STR: "" is an error */

struct rd_cf_row {
	const char *section;
	const char *key;
	enum rd_cf_type type;
	size_t off;		  /* offsetof(struct rd_config, field) */
	const char *def;	  /* parsed like a file value at start */
	int min, max;		  /* RD_CF_INT */
	const char *const *names; /* RD_CF_ENUM: value i is names[i] */
	unsigned flags;
};

/* Enum fields are written through an int pointer. */
_Static_assert(sizeof(enum rd_starttls) == sizeof(int), "enum rd_starttls is not int-sized");
_Static_assert(sizeof(enum rd_queue_type) == sizeof(int), "enum rd_queue_type is not int-sized");

/* Index = syslog level (LOG_EMERG 0 .. LOG_DEBUG 7). */
static const char *const level_names[] = {"emerg",  "alert", "crit",  "err", "warning",
					  "notice", "info",  "debug", NULL};
/* Index = enum rd_starttls / enum rd_queue_type. */
static const char *const starttls_names[] = {"no", "try", "require", NULL};
static const char *const queue_type_names[] = {"classic", "quorum", NULL};

/* The formatter would break rows and macros apart; one row per line reads better. */
/* clang-format off */
#define OFF(field) offsetof(struct rd_config, field)
#define CF_STR(sec, key, field, def, fl) {sec, key, RD_CF_STR, OFF(field), def, 0, 0, NULL, fl}
#define CF_INT(sec, key, field, def, lo, hi, fl)                                                   \
	{sec, key, RD_CF_INT, OFF(field), #def, lo, hi, NULL, fl}
#define CF_BOOL(sec, key, field, def, fl) {sec, key, RD_CF_BOOL, OFF(field), def, 0, 0, NULL, fl}
#define CF_ENUM(sec, key, field, def, names, fl)                                                   \
	{sec, key, RD_CF_ENUM, OFF(field), def, 0, 0, names, fl}

/* Sections appear in this order in dumps; keys within a section likewise.
 * config/rosterd.conf lists the same keys with the same defaults (checked by
 * tests/unit/test_config.c). */
static const struct rd_cf_row rd_config_keys[] = {
	CF_STR("daemon", "instance", instance, "rosterd-1", RD_CF_NONEMPTY),
	CF_INT("daemon", "status_interval", status_interval, 10, 1, 86400, RD_CF_RELOAD),
	CF_INT("daemon", "retry_base_ms", retry_base_ms, 1000, 1, 86400000, RD_CF_RELOAD),
	CF_INT("daemon", "max_retries", max_retries, 10, 0, 1000, RD_CF_RELOAD),
	CF_INT("daemon", "max_message_bytes", max_message_bytes, 1048576, 1024, 67108864, 0),
	CF_INT("daemon", "batch_size", batch_size, 200, 1, 10000, RD_CF_RELOAD),
	CF_INT("daemon", "batch_wait_ms", batch_wait_ms, 0, 0, 10000, RD_CF_RELOAD),
	CF_INT("daemon", "drain_timeout", drain_timeout, 10, 1, 600, RD_CF_RELOAD),
	CF_ENUM("daemon", "log_level", log_level, "info", level_names, RD_CF_RELOAD),

	CF_STR("amqp", "url", url, "amqp://guest:guest@127.0.0.1:5672/%2f",
	       RD_CF_MASKURL | RD_CF_NONEMPTY),
	CF_STR("amqp", "password_file", password_file, "", 0),
	CF_STR("amqp", "ca_file", ca_file, "", 0),
	CF_BOOL("amqp", "verify_peer", verify_peer, "yes", 0),
	CF_STR("amqp", "queue", queue, "rosterd.events", RD_CF_NONEMPTY),
	CF_STR("amqp", "exchange", exchange, "rosterd.events", RD_CF_NONEMPTY),
	CF_STR("amqp", "retry_queue", retry_queue, "rosterd.retry", RD_CF_NONEMPTY),
	CF_STR("amqp", "dead_exchange", dead_exchange, "rosterd.dead", RD_CF_NONEMPTY),
	CF_STR("amqp", "dead_queue", dead_queue, "rosterd.dead", RD_CF_NONEMPTY),
	CF_STR("amqp", "status_exchange", status_exchange, "rosterd.status", RD_CF_NONEMPTY),
	CF_ENUM("amqp", "queue_type", queue_type, "classic", queue_type_names, 0),
	CF_INT("amqp", "prefetch", prefetch, 500, 1, 65535, 0),
	CF_INT("amqp", "heartbeat", heartbeat, 5, 0, 3600, 0),
	CF_INT("amqp", "delivery_limit", delivery_limit, 20, 1, 1000, 0),

	CF_STR("postgres", "conninfo", conninfo, "host=127.0.0.1 port=5432 dbname=rosterd",
	       RD_CF_MASKURL),
	CF_STR("postgres", "migrate_conninfo", migrate_conninfo, "", RD_CF_MASKURL),
	CF_STR("postgres", "password_file", pg_password_file, "", 0),
	CF_INT("postgres", "connections", connections, 2, 1, 64, 0),
	CF_INT("postgres", "statement_timeout_ms", statement_timeout_ms, 30000, 0, 3600000,
	       RD_CF_RELOAD),

	CF_STR("smtp", "host", smtp_host, "127.0.0.1", RD_CF_NONEMPTY),
	CF_INT("smtp", "port", smtp_port, 25, 1, 65535, 0),
	CF_ENUM("smtp", "starttls", starttls, "no", starttls_names, 0),
	CF_STR("smtp", "username", smtp_username, "", 0),
	CF_STR("smtp", "password_file", smtp_password_file, "", 0),
	CF_INT("smtp", "workers", workers, 4, 1, 256, 0),
	CF_INT("smtp", "mail_retry_base_ms", mail_retry_base_ms, 60000, 1, 86400000, RD_CF_RELOAD),
	CF_INT("smtp", "mail_lifetime", mail_lifetime, 432000, 60, 31536000, RD_CF_RELOAD),
	CF_INT("smtp", "timeout", smtp_timeout, 30, 1, 3600, RD_CF_RELOAD),
	CF_STR("smtp", "ca_file", smtp_ca_file, "", 0),
};
/* clang-format on */

#define RD_CF_NKEYS (sizeof(rd_config_keys) / sizeof(rd_config_keys[0]))

/* Values quoted in error messages are cut so that the file name and the key
 * still fit in struct rd_err. */
#define RD_CF_QUOTE_MAX 40

/* ---- field access ---- */

static char **str_field(struct rd_config *cfg, const struct rd_cf_row *r)
{
	return (char **)((char *)cfg + r->off);
}

static char *const *cstr_field(const struct rd_config *cfg, const struct rd_cf_row *r)
{
	return (char *const *)((const char *)cfg + r->off);
}

static int *int_field(struct rd_config *cfg, const struct rd_cf_row *r)
{
	return (int *)((char *)cfg + r->off);
}

static int cint_field(const struct rd_config *cfg, const struct rd_cf_row *r)
{
	return *(const int *)((const char *)cfg + r->off);
}

static bool *bool_field(struct rd_config *cfg, const struct rd_cf_row *r)
{
	return (bool *)((char *)cfg + r->off);
}

static bool cbool_field(const struct rd_config *cfg, const struct rd_cf_row *r)
{
	return *(const bool *)((const char *)cfg + r->off);
}

static bool same_value(const struct rd_config *a, const struct rd_config *b,
		       const struct rd_cf_row *r)
{
	switch (r->type) {
	case RD_CF_STR:
		return strcmp(*cstr_field(a, r), *cstr_field(b, r)) == 0;
	case RD_CF_INT:
	case RD_CF_ENUM:
		return cint_field(a, r) == cint_field(b, r);
	case RD_CF_BOOL:
		return cbool_field(a, r) == cbool_field(b, r);
	}
	return false;
}

/* Copy r's value from src to dst (dst's old string is freed). */
static void copy_value(struct rd_config *dst, const struct rd_config *src,
		       const struct rd_cf_row *r)
{
	switch (r->type) {
	case RD_CF_STR: {
		char **p = str_field(dst, r);
		free(*p);
		*p = rd_xstrdup(*cstr_field(src, r));
		break;
	}
	case RD_CF_INT:
	case RD_CF_ENUM:
		*int_field(dst, r) = cint_field(src, r);
		break;
	case RD_CF_BOOL:
		*bool_field(dst, r) = cbool_field(src, r);
		break;
	}
}

/* ---- parsing one value ---- */

static bool parse_int(const char *s, long long *out)
{
	const char *p = s;
	if (*p == '-')
		p++;
	if (*p < '0' || *p > '9')
		return false; /* no sign-only, whitespace, '+', hex... */
	for (const char *q = p; *q; q++)
		if (*q < '0' || *q > '9')
			return false;
	errno = 0;
	long long v = strtoll(s, NULL, 10);
	if (errno == ERANGE)
		v = *s == '-' ? LLONG_MIN : LLONG_MAX; /* reported against the bounds */
	*out = v;
	return true;
}

static bool parse_bool(const char *s, bool *out)
{
	static const char *const yes[] = {"yes", "true", "on", "1"};
	static const char *const no[] = {"no", "false", "off", "0"};
	for (size_t i = 0; i < sizeof(yes) / sizeof(yes[0]); i++) {
		if (strcasecmp(s, yes[i]) == 0) {
			*out = true;
			return true;
		}
		if (strcasecmp(s, no[i]) == 0) {
			*out = false;
			return true;
		}
	}
	return false;
}

/* "no, try, require" */
static void join_names(const char *const *names, char *buf, size_t size)
{
	size_t n = 0;
	buf[0] = '\0';
	for (size_t i = 0; names[i] && n < size; i++)
		n += (size_t)snprintf(buf + n, size - n, "%s%s", i ? ", " : "", names[i]);
}

/* Set r's field from text s. On error fills err with "<where>: <problem>",
 * where `where` is "[amqp] prefetch", "file:12: [amqp] prefetch" or
 * "ROSTERD_AMQP_PREFETCH", and leaves the field as it was. */
static bool set_value(struct rd_config *cfg, const struct rd_cf_row *r, const char *s,
		      const char *where, struct rd_err *err)
{
	const char *ell = strlen(s) > RD_CF_QUOTE_MAX ? "..." : "";
	int q = RD_CF_QUOTE_MAX;

	switch (r->type) {
	case RD_CF_STR: {
		if (!s[0] && r->flags & RD_CF_NONEMPTY) {
			rd_errf(err, RD_FAIL, "%s: must not be empty", where);
			return false;
		}
		char **p = str_field(cfg, r);
		free(*p);
		*p = rd_xstrdup(s);
		return true;
	}
	case RD_CF_INT: {
		long long v;
		if (!parse_int(s, &v)) {
			rd_errf(err, RD_FAIL, "%s: \"%.*s%s\" is not an integer", where, q, s, ell);
			return false;
		}
		if (v < r->min) {
			rd_errf(err, RD_FAIL, "%s: \"%.*s%s\" is below the minimum %d", where, q, s,
				ell, r->min);
			return false;
		}
		if (v > r->max) {
			rd_errf(err, RD_FAIL, "%s: \"%.*s%s\" is above the maximum %d", where, q, s,
				ell, r->max);
			return false;
		}
		*int_field(cfg, r) = (int)v;
		return true;
	}
	case RD_CF_BOOL:
		if (!parse_bool(s, bool_field(cfg, r))) {
			rd_errf(
			    err, RD_FAIL,
			    "%s: \"%.*s%s\" is not a boolean (yes, no, true, false, on, off, 1, 0)",
			    where, q, s, ell);
			return false;
		}
		return true;
	case RD_CF_ENUM:
		for (int i = 0; r->names[i]; i++) {
			if (strcasecmp(s, r->names[i]) == 0) {
				*int_field(cfg, r) = i;
				return true;
			}
		}
		char list[120];
		join_names(r->names, list, sizeof(list));
		rd_errf(err, RD_FAIL, "%s: \"%.*s%s\" is not one of %s", where, q, s, ell, list);
		return false;
	}
	return false;
}

static const struct rd_cf_row *find_row(const char *section, const char *key)
{
	for (size_t i = 0; i < RD_CF_NKEYS; i++)
		if (strcasecmp(rd_config_keys[i].section, section) == 0 &&
		    strcasecmp(rd_config_keys[i].key, key) == 0)
			return &rd_config_keys[i];
	return NULL;
}

static bool known_section(const char *section)
{
	for (size_t i = 0; i < RD_CF_NKEYS; i++)
		if (strcasecmp(rd_config_keys[i].section, section) == 0)
			return true;
	return false;
}

/* ---- new, free, copy ---- */

/* A config holding every default. The defaults go through set_value like
 * file values, so a bad default is caught by the first test run. */
static struct rd_config *config_defaults(void)
{
	struct rd_config *cfg = rd_xcalloc(1, sizeof(*cfg));
	for (size_t i = 0; i < RD_CF_NKEYS; i++) {
		const struct rd_cf_row *r = &rd_config_keys[i];
		struct rd_err err = {0};
		if (!set_value(cfg, r, r->def, "default", &err)) {
			rd_log(LOG_CRIT, "config.bad_default", "key=%s.%s error=\"%s\"", r->section,
			       r->key, err.msg);
			abort();
		}
	}
	return cfg;
}

void rd_config_free(struct rd_config *cfg)
{
	if (!cfg)
		return;
	for (size_t i = 0; i < RD_CF_NKEYS; i++)
		if (rd_config_keys[i].type == RD_CF_STR)
			free(*str_field(cfg, &rd_config_keys[i]));
	free(cfg);
}

static struct rd_config *config_dup(const struct rd_config *src)
{
	struct rd_config *cfg = rd_xcalloc(1, sizeof(*cfg));
	for (size_t i = 0; i < RD_CF_NKEYS; i++)
		copy_value(cfg, src, &rd_config_keys[i]);
	return cfg;
}

/* ---- the file ---- */

struct parse_state {
	const char *path;
	struct rd_config *cfg;
	struct rd_err *err;
	bool failed;   /* err is filled: stop reading */
	int fail_line; /* the line err is about */
	FILE *fp;
	char *buf; /* getline buffer */
	size_t bufsize;
	int lineno;	   /* line last handed to inih */
	bool indented;	   /* that line starts with a blank */
	char prev_key[64]; /* previous key in this section, as inih has it */
	char *long_value;  /* the value of a line too long for inih (see read_line) */
};

/* What inih gets instead of the value of a line longer than its buffer. */
#define RD_CF_LONG_MARK "\x01rosterd-long-value\x01"

static int fail_at(struct parse_state *ps)
{
	ps->failed = true;
	ps->fail_line = ps->lineno;
	return 0;
}

/* inih's line reader, fgets-like. Reads whole lines so that one longer than
 * inih's buffer (size) is an error instead of being cut, and stops at the
 * first error the handler reported. */
static char *read_line(char *str, int size, void *stream)
{
	struct parse_state *ps = stream;
	if (ps->failed)
		return NULL;
	ssize_t n = getline(&ps->buf, &ps->bufsize, ps->fp);
	if (n < 0)
		return NULL;
	ps->lineno++;
	size_t len = (size_t)n;
	while (len > 0 && (ps->buf[len - 1] == '\n' || ps->buf[len - 1] == '\r'))
		len--;
	ps->buf[len] = '\0';
	if (strlen(ps->buf) != len) {
		rd_errf(ps->err, RD_FAIL, "%s:%d: line contains a NUL byte", ps->path, ps->lineno);
		fail_at(ps);
		return NULL;
	}
	if (len + 1 >= (size_t)size) {
		/* Longer than inih's buffer (a conninfo with certificate paths,
		 * several broker URLs): inih parses "key = <mark>" and the
		 * handler takes the value from here. Comment lines are passed
		 * as an empty comment; anything else is refused. */
		const char *t = ps->buf + strspn(ps->buf, " \t");
		const char *eq = strchr(ps->buf, '=');
		if (*t == ';' || *t == '#') {
			rd_strlcpy(str, ";", (size_t)size);
			return str;
		}
		if (!eq || *t == '[' || (size_t)(eq - ps->buf) + sizeof(RD_CF_LONG_MARK) + 4 >=
						(size_t)size) {
			rd_errf(ps->err, RD_FAIL, "%s:%d: line longer than %d bytes", ps->path,
				ps->lineno, size - 2);
			fail_at(ps);
			return NULL;
		}
		free(ps->long_value);
		ps->long_value = rd_xstrdup(eq + 1);
		snprintf(str, (size_t)size, "%.*s= %s", (int)(eq - ps->buf), ps->buf,
			 RD_CF_LONG_MARK);
		ps->indented = ps->buf[0] == ' ' || ps->buf[0] == '\t';
		return str;
	}
	ps->indented = ps->buf[0] == ' ' || ps->buf[0] == '\t';
	/* inih forgets the previous key at a section line; so do we */
	const char *f = ps->buf + strspn(ps->buf, " \t");
	if (*f == '[')
		ps->prev_key[0] = '\0';
	memcpy(str, ps->buf, len + 1);
	return str;
}

/* inih handler: one call per "key = value" line. Returns 0 on error. */
static int on_key(void *user, const char *section, const char *key, const char *value)
{
	struct parse_state *ps = user;
	if (ps->failed)
		return 0;
	/* Handler calls for a bare section line (a library built with
	 * INI_CALL_HANDLER_ON_NEW_SECTION) only check the section. */
	if (!key) {
		if (!known_section(section)) {
			rd_errf(ps->err, RD_FAIL, "%s:%d: unknown section [%s]", ps->path,
				ps->lineno, section);
			return fail_at(ps);
		}
		return 1;
	}
	if (!value) {
		rd_errf(ps->err, RD_FAIL, "%s:%d: [%s] %s: missing \"= value\"", ps->path,
			ps->lineno, section, key);
		return fail_at(ps);
	}
	/* inih joins an indented line to the key before it (multi-line
	 * values): "  prefetch = 5" after "queue = q" would arrive as queue's
	 * value. Refuse it rather than guess. */
	if (ps->indented && ps->prev_key[0] && strcmp(ps->prev_key, key) == 0) {
		rd_errf(ps->err, RD_FAIL,
			"%s:%d: indented line continues key %s; remove the indentation", ps->path,
			ps->lineno, key);
		return fail_at(ps);
	}
	rd_strlcpy(ps->prev_key, key, sizeof(ps->prev_key));

	if (!section[0]) {
		rd_errf(ps->err, RD_FAIL, "%s:%d: key %s is outside any [section]", ps->path,
			ps->lineno, key);
		return fail_at(ps);
	}
	if (!known_section(section)) {
		rd_errf(ps->err, RD_FAIL, "%s:%d: unknown section [%s]", ps->path, ps->lineno,
			section);
		return fail_at(ps);
	}
	const struct rd_cf_row *r = find_row(section, key);
	if (!r) {
		rd_errf(ps->err, RD_FAIL, "%s:%d: unknown key [%s] %s", ps->path, ps->lineno,
			section, key);
		return fail_at(ps);
	}

	/* Inline comments: inih r55 as built by Debian already cuts " ;..."
	 * (INI_ALLOW_INLINE_COMMENTS); cut it here too in case the library
	 * was built without (then "key = ; note" arrives as "; note"). A
	 * literal " ;" in a value is therefore impossible. */
	char *v;
	if (strcmp(value, RD_CF_LONG_MARK) == 0 && ps->long_value) {
		/* as inih would have: leading blanks stripped */
		v = rd_xstrdup(ps->long_value + strspn(ps->long_value, " \t"));
		free(ps->long_value);
		ps->long_value = NULL;
	} else {
		v = rd_xstrdup(value);
	}
	for (char *p = v; *p; p++) {
		if (*p == ';' && (p == v || p[-1] == ' ' || p[-1] == '\t')) {
			*p = '\0';
			break;
		}
	}
	size_t len = strlen(v);
	while (len > 0 && (v[len - 1] == ' ' || v[len - 1] == '\t'))
		v[--len] = '\0';
	/* key = "..." keeps the inside as is (lets a value be written "" or
	 * keep outer blanks). */
	char *s = v;
	if (len >= 2 && v[0] == '"' && v[len - 1] == '"') {
		v[len - 1] = '\0';
		s = v + 1;
	}

	char where[160];
	snprintf(where, sizeof(where), "%s:%d: [%s] %s", ps->path, ps->lineno, r->section, r->key);
	bool ok = set_value(ps->cfg, r, s, where, ps->err);
	free(v);
	return ok ? 1 : fail_at(ps);
}

static bool parse_file(struct rd_config *cfg, const char *path, struct rd_err *err)
{
	FILE *fp = fopen(path, "re");
	if (!fp) {
		rd_errf(err, RD_FAIL, "%s: cannot open: %s", path, strerror(errno));
		return false;
	}
	struct parse_state ps = {.path = path, .cfg = cfg, .err = err, .fp = fp};
	int rc = ini_parse_stream(read_line, &ps, on_key, &ps);
	bool read_error = ferror(fp);
	int saved = errno;
	free(ps.buf);
	free(ps.long_value);
	fclose(fp);
	/* inih keeps going after a syntax error and returns the first error's
	 * line; an earlier syntax error wins over ours. */
	if (ps.failed && !(rc > 0 && rc < ps.fail_line))
		return false;
	if (read_error) {
		rd_errf(err, RD_FAIL, "%s: cannot read: %s", path, strerror(saved));
		return false;
	}
	if (rc > 0) {
		rd_errf(err, RD_FAIL, "%s:%d: syntax error (want \"[section]\" or \"key = value\")",
			path, rc);
		return false;
	}
	if (rc != 0) {
		rd_errf(err, RD_FAIL, "%s: cannot parse (inih error %d)", path, rc);
		return false;
	}
	return true;
}

/* ---- environment ---- */

static void env_name(const struct rd_cf_row *r, char *buf, size_t size)
{
	snprintf(buf, size, "ROSTERD_%s_%s", r->section, r->key);
	for (char *p = buf; *p; p++)
		if (*p >= 'a' && *p <= 'z')
			*p = (char)(*p - 'a' + 'A');
}

/* Values are taken exactly as set: no trimming, no comments, no quotes. */
static bool apply_env(struct rd_config *cfg, struct rd_err *err)
{
	for (size_t i = 0; i < RD_CF_NKEYS; i++) {
		const struct rd_cf_row *r = &rd_config_keys[i];
		char name[80];
		env_name(r, name, sizeof(name));
		const char *v = getenv(name);
		if (v && !set_value(cfg, r, v, name, err))
			return false;
	}
	return true;
}

/* ---- public ---- */

struct rd_config *rd_config_load(const char *path, struct rd_err *err)
{
	if (!path)
		path = RD_CONFIG_DEFAULT_PATH;
	struct rd_config *cfg = config_defaults();
	if (!parse_file(cfg, path, err) || !apply_env(cfg, err)) {
		rd_config_free(cfg);
		return NULL;
	}
	return cfg;
}

struct rd_config *rd_config_reload(const struct rd_config *cur, const struct rd_config *next,
				   void (*warn)(const char *key, void *arg), void *arg)
{
	struct rd_config *cfg = config_dup(next);
	for (size_t i = 0; i < RD_CF_NKEYS; i++) {
		const struct rd_cf_row *r = &rd_config_keys[i];
		if (r->flags & RD_CF_RELOAD || same_value(cur, next, r))
			continue;
		copy_value(cfg, cur, r);
		if (warn) {
			char key[80];
			snprintf(key, sizeof(key), "%s.%s", r->section, r->key);
			warn(key, arg);
		}
	}
	return cfg;
}

const char *rd_config_level_name(int level)
{
	if (level < 0 || level > 7)
		return "?";
	return level_names[level];
}

bool rd_config_key_info(size_t i, struct rd_config_keyinfo *out)
{
	static const char *const type_names[] = {"string", "int", "bool", "enum"};
	if (i >= RD_CF_NKEYS)
		return false;
	const struct rd_cf_row *r = &rd_config_keys[i];
	*out = (struct rd_config_keyinfo){
	    .section = r->section,
	    .key = r->key,
	    .type = type_names[r->type],
	    .def = r->def,
	    .min = r->min,
	    .max = r->max,
	    .names = r->names,
	    .reloadable = (r->flags & RD_CF_RELOAD) != 0,
	    .secret = (r->flags & RD_CF_SECRET) != 0,
	};
	return true;
}

/* ---- dump ---- */

static bool is_sep(char c)
{
	return c == ' ' || c == '\t' || c == ',' || c == '\n';
}

/* One URL (s, n bytes) with "user:PASS@" and a "password=" query parameter
 * masked. */
static void put_url_masked(FILE *out, const char *s, size_t n)
{
	const char *end = s + n;
	const char *auth = NULL;
	for (const char *p = s; p + 3 <= end; p++) {
		if (memcmp(p, "://", 3) == 0) {
			auth = p + 3;
			break;
		}
	}
	if (!auth) {
		fwrite(s, 1, n, out);
		return;
	}
	const char *hostend = auth;
	while (hostend < end && *hostend != '/' && *hostend != '?' && *hostend != '#')
		hostend++;
	const char *at = NULL;
	for (const char *p = auth; p < hostend; p++)
		if (*p == '@')
			at = p;
	const char *colon = at ? memchr(auth, ':', (size_t)(at - auth)) : NULL;
	if (colon) {
		fwrite(s, 1, (size_t)(colon + 1 - s), out);
		fputs("***", out);
		fwrite(at, 1, (size_t)(hostend - at), out);
	} else {
		fwrite(s, 1, (size_t)(hostend - s), out);
	}
	/* path and query: mask password=... (libpq URIs accept it) */
	const char *p = hostend;
	while (p < end) {
		const char *seg = p;
		bool param = p > hostend && (p[-1] == '?' || p[-1] == '&');
		while (p < end && *p != '?' && *p != '&' && *p != '#')
			p++;
		size_t len = (size_t)(p - seg);
		if (param && len >= 9 && strncasecmp(seg, "password=", 9) == 0) {
			fputs("password=***", out);
		} else {
			fwrite(seg, 1, len, out);
		}
		if (p < end)
			fputc(*p++, out);
	}
}

/* libpq "key=value ..." with password's value masked. */
static void put_conninfo_masked(FILE *out, const char *s)
{
	const char *p = s;
	while (*p) {
		while (*p == ' ' || *p == '\t' || *p == '\n')
			fputc(*p++, out);
		if (!*p)
			break;
		const char *k = p;
		while (*p && *p != '=' && *p != ' ' && *p != '\t' && *p != '\n')
			p++;
		size_t klen = (size_t)(p - k);
		fwrite(k, 1, klen, out);
		while (*p == ' ' || *p == '\t')
			fputc(*p++, out);
		if (*p != '=')
			continue;
		fputc(*p++, out);
		while (*p == ' ' || *p == '\t')
			fputc(*p++, out);
		const char *v = p;
		if (*p == '\'') {
			p++;
			while (*p && *p != '\'') {
				if (*p == '\\' && p[1])
					p++;
				p++;
			}
			if (*p)
				p++;
		} else {
			while (*p && *p != ' ' && *p != '\t' && *p != '\n') {
				if (*p == '\\' && p[1])
					p++;
				p++;
			}
		}
		if (klen == 8 && strncasecmp(k, "password", 8) == 0)
			fputs("***", out);
		else
			fwrite(v, 1, (size_t)(p - v), out);
	}
}

/* A URL list (amqp url) or a conninfo in either form: URLs when the value
 * starts with "scheme://" (libpq's rule for URIs), key=value otherwise. */
static void put_masked(FILE *out, const char *s)
{
	const char *q = s + strspn(s, " \t");
	size_t scheme =
	    strspn(q, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+.-");
	if (scheme == 0 || strncmp(q + scheme, "://", 3) != 0) {
		put_conninfo_masked(out, s);
		return;
	}
	const char *p = s;
	while (*p) {
		while (*p && is_sep(*p))
			fputc(*p++, out);
		const char *u = p;
		while (*p && !is_sep(*p))
			p++;
		put_url_masked(out, u, (size_t)(p - u));
	}
}

void rd_config_dump(const struct rd_config *cfg, FILE *out)
{
	const char *section = NULL;
	for (size_t i = 0; i < RD_CF_NKEYS; i++) {
		const struct rd_cf_row *r = &rd_config_keys[i];
		if (!section || strcmp(section, r->section) != 0) {
			fprintf(out, "%s[%s]\n", section ? "\n" : "", r->section);
			section = r->section;
		}
		if (r->flags & RD_CF_SECRET)
			continue;
		fprintf(out, "%s =", r->key);
		switch (r->type) {
		case RD_CF_STR: {
			const char *s = *cstr_field(cfg, r);
			if (!s[0])
				break;
			size_t len = strlen(s);
			/* quotes keep outer blanks or outer quotes when read back */
			bool quote = s[0] == ' ' || s[0] == '\t' || s[0] == '"' ||
				     s[len - 1] == ' ' || s[len - 1] == '\t' || s[len - 1] == '"';
			fputs(quote ? " \"" : " ", out);
			if (r->flags & RD_CF_MASKURL)
				put_masked(out, s);
			else
				fputs(s, out);
			if (quote)
				fputc('"', out);
			break;
		}
		case RD_CF_INT:
			fprintf(out, " %d", cint_field(cfg, r));
			break;
		case RD_CF_BOOL:
			fputs(cbool_field(cfg, r) ? " yes" : " no", out);
			break;
		case RD_CF_ENUM:
			fprintf(out, " %s", r->names[cint_field(cfg, r)]);
			break;
		}
		fputc('\n', out);
	}
}
