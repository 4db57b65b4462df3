/* test_config.c: the configuration module (daemon/config.c): defaults, file
 * values, inline comments, bad values and bounds per type, unknown sections
 * and keys, environment overrides, reload, dump masking, and the shipped
 * config/rosterd.conf (every key, every default).
 *
 * Each case writes its INI text to a mkstemp file in /tmp, loads it and
 * removes it. The environment is cleared of every ROSTERD_<SECTION>_<KEY>
 * before each test. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <ini.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"

/* ---- helpers ---- */

static void env_var_name(const struct rd_config_keyinfo *k, char *buf, size_t size)
{
	snprintf(buf, size, "ROSTERD_%s_%s", k->section, k->key);
	for (char *p = buf; *p; p++)
		if (*p >= 'a' && *p <= 'z')
			*p = (char)(*p - 'a' + 'A');
}

static int clear_env(void **state)
{
	(void)state;
	struct rd_config_keyinfo k;
	for (size_t i = 0; rd_config_key_info(i, &k); i++) {
		char name[80];
		env_var_name(&k, name, sizeof(name));
		unsetenv(name);
	}
	return 0;
}

/* Writes text to a new file in /tmp; path receives its name. */
static void write_tmp(const char *text, char *path, size_t size)
{
	rd_strlcpy(path, "/tmp/rosterd-test-config-XXXXXX", size);
	int fd = mkstemp(path);
	assert_true(fd >= 0);
	FILE *f = fdopen(fd, "w");
	assert_non_null(f);
	assert_int_equal(fputs(text, f) >= 0, 1);
	assert_int_equal(fclose(f), 0);
}

/* Loads text as a config file; on failure err->msg is kept and path (the
 * file name, already removed) lets the caller check the prefix. */
static struct rd_config *load_text(const char *text, struct rd_err *err, char *path, size_t size)
{
	write_tmp(text, path, size);
	struct rd_config *cfg = rd_config_load(path, err);
	unlink(path);
	return cfg;
}

static struct rd_config *load_ok(const char *text)
{
	char path[64];
	struct rd_err err = {0};
	struct rd_config *cfg = load_text(text, &err, path, sizeof(path));
	if (!cfg)
		fail_msg("load failed: %s", err.msg);
	return cfg;
}

static char *dump_string(const struct rd_config *cfg)
{
	char *buf = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&buf, &len);
	assert_non_null(f);
	rd_config_dump(cfg, f);
	assert_int_equal(fclose(f), 0);
	return buf;
}

/* The text of line "key = ..." in [section] of a dump, without "key = ";
 * NULL when absent. Returns a pointer into a static buffer. */
static const char *dump_value(const char *dump, const char *section, const char *key)
{
	static char out[512];
	char head[64];
	snprintf(head, sizeof(head), "[%s]\n", section);
	const char *p = strstr(dump, head);
	if (!p)
		return NULL;
	p += strlen(head);
	size_t klen = strlen(key);
	while (*p && *p != '[') {
		const char *eol = strchr(p, '\n');
		size_t len = eol ? (size_t)(eol - p) : strlen(p);
		if (len >= klen + 2 && strncmp(p, key, klen) == 0 && p[klen] == ' ' &&
		    p[klen + 1] == '=') {
			const char *v = p + klen + 2;
			if (*v == ' ')
				v++;
			snprintf(out, sizeof(out), "%.*s", (int)(len - (size_t)(v - p)), v);
			return out;
		}
		p += len + (eol ? 1 : 0);
	}
	return NULL;
}

/* ---- defaults and good values ---- */

static void test_defaults(void **state)
{
	(void)state;
	struct rd_config *c = load_ok("");
	assert_string_equal(c->instance, "rosterd-1");
	assert_int_equal(c->status_interval, 10);
	assert_int_equal(c->retry_base_ms, 1000);
	assert_int_equal(c->max_retries, 10);
	assert_int_equal(c->max_message_bytes, 1048576);
	assert_int_equal(c->batch_size, 200);
	assert_int_equal(c->batch_wait_ms, 0);
	assert_int_equal(c->drain_timeout, 10);
	assert_int_equal(c->log_level, 6); /* LOG_INFO */

	assert_string_equal(c->url, "amqp://guest:guest@127.0.0.1:5672/%2f");
	assert_string_equal(c->password_file, "");
	assert_string_equal(c->ca_file, "");
	assert_true(c->verify_peer);
	assert_string_equal(c->queue, "rosterd.events");
	assert_string_equal(c->exchange, "rosterd.events");
	assert_string_equal(c->retry_queue, "rosterd.retry");
	assert_string_equal(c->dead_exchange, "rosterd.dead");
	assert_string_equal(c->dead_queue, "rosterd.dead");
	assert_string_equal(c->status_exchange, "rosterd.status");
	assert_int_equal(c->queue_type, RD_QUEUE_CLASSIC);
	assert_int_equal(c->prefetch, 500);
	assert_int_equal(c->heartbeat, 5);
	assert_int_equal(c->delivery_limit, 20);

	assert_string_equal(c->conninfo, "host=127.0.0.1 port=5432 dbname=rosterd");
	assert_string_equal(c->migrate_conninfo, "");
	assert_string_equal(c->pg_password_file, "");
	assert_int_equal(c->connections, 2);
	assert_int_equal(c->statement_timeout_ms, 30000);

	assert_string_equal(c->smtp_host, "127.0.0.1");
	assert_int_equal(c->smtp_port, 25);
	assert_int_equal(c->starttls, RD_STARTTLS_NO);
	assert_string_equal(c->smtp_username, "");
	assert_string_equal(c->smtp_password_file, "");
	assert_int_equal(c->workers, 4);
	assert_int_equal(c->mail_retry_base_ms, 60000);
	assert_int_equal(c->mail_lifetime, 432000);
	assert_int_equal(c->smtp_timeout, 30);
	rd_config_free(c);
}

enum kind { K_INT, K_BOOL, K_STR };

struct good_case {
	const char *ini;
	size_t off; /* field in struct rd_config */
	enum kind kind;
	long ival;
	const char *sval;
};

#define F(field) offsetof(struct rd_config, field)

static const struct good_case good_cases[] = {
    {"[amqp]\nprefetch = 100\n", F(prefetch), K_INT, 100, NULL},
    {"[amqp]\nprefetch=1\n", F(prefetch), K_INT, 1, NULL},	     /* min */
    {"[amqp]\nprefetch = 65535\n", F(prefetch), K_INT, 65535, NULL}, /* max */
    {"[daemon]\nmax_retries = 0\n", F(max_retries), K_INT, 0, NULL}, /* min 0 */
    {"[amqp]\nheartbeat = 0 ; off\n", F(heartbeat), K_INT, 0, NULL},
    {"[daemon]\nmax_message_bytes = 67108864\n", F(max_message_bytes), K_INT, 67108864, NULL},
    {"[daemon]\nretry_base_ms = 007\n", F(retry_base_ms), K_INT, 7, NULL}, /* decimal, not octal */
    {"[smtp]\ntimeout = 3600\n", F(smtp_timeout), K_INT, 3600, NULL},
    {"[smtp]\nport = 587\n", F(smtp_port), K_INT, 587, NULL},
    /* enums: case-insensitive */
    {"[smtp]\nstarttls = require\n", F(starttls), K_INT, RD_STARTTLS_REQUIRE, NULL},
    {"[smtp]\nstarttls = Try\n", F(starttls), K_INT, RD_STARTTLS_TRY, NULL},
    {"[amqp]\nqueue_type = QUORUM\n", F(queue_type), K_INT, RD_QUEUE_QUORUM, NULL},
    {"[daemon]\nlog_level = debug\n", F(log_level), K_INT, 7, NULL},
    {"[daemon]\nlog_level = emerg\n", F(log_level), K_INT, 0, NULL},
    {"[daemon]\nlog_level = warning\n", F(log_level), K_INT, 4, NULL},
    /* bools */
    {"[amqp]\nverify_peer = no\n", F(verify_peer), K_BOOL, 0, NULL},
    {"[amqp]\nverify_peer = Off\n", F(verify_peer), K_BOOL, 0, NULL},
    {"[amqp]\nverify_peer = FALSE\n", F(verify_peer), K_BOOL, 0, NULL},
    {"[amqp]\nverify_peer = 0\n", F(verify_peer), K_BOOL, 0, NULL},
    {"[amqp]\nverify_peer = 0\nverify_peer = true\n", F(verify_peer), K_BOOL, 1, NULL},
    {"[amqp]\nverify_peer = no\nverify_peer = on\n", F(verify_peer), K_BOOL, 1, NULL},
    {"[amqp]\nverify_peer = no\nverify_peer = 1\n", F(verify_peer), K_BOOL, 1, NULL},
    {"[amqp]\nverify_peer = no\nverify_peer = YES\n", F(verify_peer), K_BOOL, 1, NULL},
    /* strings, inline comments, quotes */
    {"[daemon]\ninstance = rosterd-1          ; name in logs and status\n", F(instance), K_STR, 0,
     "rosterd-1"},
    {"[daemon]\ninstance = r2\t; tab before the comment\n", F(instance), K_STR, 0, "r2"},
    {"[amqp]\nca_file = /etc/ssl/ca.pem ; the CA\n", F(ca_file), K_STR, 0, "/etc/ssl/ca.pem"},
    {"[amqp]\nqueue = a;b\n", F(queue), K_STR, 0, "a;b"}, /* no blank: not a comment */
    {"[postgres]\nconninfo = host=db port=6432 dbname=r   ; note\n", F(conninfo), K_STR, 0,
     "host=db port=6432 dbname=r"},
    {"[postgres]\nmigrate_conninfo = host=db dbname=r user=owner\n", F(migrate_conninfo), K_STR,
     0, "host=db dbname=r user=owner"},
    {"[postgres]\npassword_file = /run/secrets/pg\n", F(pg_password_file), K_STR, 0,
     "/run/secrets/pg"},
    {"[smtp]\npassword_file = /run/secrets/smtp\n", F(smtp_password_file), K_STR, 0,
     "/run/secrets/smtp"},
    {"[smtp]\nusername = \" a b \"\n", F(smtp_username), K_STR, 0, " a b "},
    {"[amqp]\npassword_file = \"\"\n", F(password_file), K_STR, 0, ""},
    {"[amqp]\npassword_file = ; not set\n", F(password_file), K_STR, 0, ""},
    {"[amqp]\npassword_file =\n", F(password_file), K_STR, 0, ""},
    {"[amqp]\nqueue = one\nqueue = two\n", F(queue), K_STR, 0, "two"}, /* last wins */
    /* comments, blank lines, CRLF, case of names, sections met twice */
    {"; comment\n# comment\n\n[amqp]\n  ; indented comment\nqueue = q\n", F(queue), K_STR, 0, "q"},
    {"[amqp]\r\nqueue = crlf\r\n", F(queue), K_STR, 0, "crlf"},
    {"[AMQP]\nQueue = upper\n", F(queue), K_STR, 0, "upper"},
    {"[amqp]\nqueue = a\n[smtp]\nport = 2525\n[amqp]\nqueue = b\n", F(queue), K_STR, 0, "b"},
    /* an indented key right after a section line is a key, not a continuation */
    {"[amqp]\nqueue = a\n[amqp]\n  queue = b\n", F(queue), K_STR, 0, "b"},
    {"[amqp]\n\tprefetch = 7\n", F(prefetch), K_INT, 7, NULL},
};

static void test_good_values(void **state)
{
	(void)state;
	for (size_t i = 0; i < sizeof(good_cases) / sizeof(good_cases[0]); i++) {
		const struct good_case *t = &good_cases[i];
		struct rd_config *c = load_ok(t->ini);
		const char *base = (const char *)c + t->off;
		switch (t->kind) {
		case K_INT:
			if (*(const int *)base != t->ival)
				fail_msg("case %zu (%s): got %d, want %ld", i, t->ini,
					 *(const int *)base, t->ival);
			break;
		case K_BOOL:
			if (*(const bool *)base != (t->ival != 0))
				fail_msg("case %zu (%s): got %d", i, t->ini, *(const bool *)base);
			break;
		case K_STR:
			if (strcmp(*(char *const *)base, t->sval) != 0)
				fail_msg("case %zu (%s): got \"%s\", want \"%s\"", i, t->ini,
					 *(char *const *)base, t->sval);
			break;
		}
		rd_config_free(c);
	}
}

/* ---- bad files ---- */

struct bad_case {
	const char *ini;
	const char *msg; /* err.msg after "<path>" */
};

static const struct bad_case bad_cases[] = {
    /* ints: not an integer, bounds */
    {"[daemon]\nmax_retries = ten\n", ":2: [daemon] max_retries: \"ten\" is not an integer"},
    {"[amqp]\nprefetch = 5x\n", ":2: [amqp] prefetch: \"5x\" is not an integer"},
    {"[amqp]\nprefetch = 0x10\n", ":2: [amqp] prefetch: \"0x10\" is not an integer"},
    {"[amqp]\nprefetch = +5\n", ":2: [amqp] prefetch: \"+5\" is not an integer"},
    {"[amqp]\nprefetch = 1e3\n", ":2: [amqp] prefetch: \"1e3\" is not an integer"},
    {"[amqp]\nprefetch = 5 5\n", ":2: [amqp] prefetch: \"5 5\" is not an integer"},
    {"[amqp]\nprefetch = -\n", ":2: [amqp] prefetch: \"-\" is not an integer"},
    {"[amqp]\nprefetch =\n", ":2: [amqp] prefetch: \"\" is not an integer"},
    {"[amqp]\nprefetch = 0\n", ":2: [amqp] prefetch: \"0\" is below the minimum 1"},
    {"[amqp]\nprefetch = 65536\n", ":2: [amqp] prefetch: \"65536\" is above the maximum 65535"},
    {"[amqp]\nheartbeat = -1\n", ":2: [amqp] heartbeat: \"-1\" is below the minimum 0"},
    {"[amqp]\nheartbeat = 99999999999999999999\n",
     ":2: [amqp] heartbeat: \"99999999999999999999\" is above the maximum 3600"},
    {"[amqp]\nheartbeat = -99999999999999999999\n",
     ":2: [amqp] heartbeat: \"-99999999999999999999\" is below the minimum 0"},
    {"[daemon]\nstatus_interval = 0\n",
     ":2: [daemon] status_interval: \"0\" is below the minimum 1"},
    {"[daemon]\nmax_message_bytes = 1023\n",
     ":2: [daemon] max_message_bytes: \"1023\" is below the minimum 1024"},
    {"[smtp]\nmail_lifetime = 59\n", ":2: [smtp] mail_lifetime: \"59\" is below the minimum 60"},
    {"[smtp]\nworkers = 257\n", ":2: [smtp] workers: \"257\" is above the maximum 256"},
    {"[postgres]\nconnections = 65\n",
     ":2: [postgres] connections: \"65\" is above the maximum 64"},
    {"[amqp]\nprefetch = 123456789012345678901234567890123456789012345678901234567890\n",
     ":2: [amqp] prefetch: \"1234567890123456789012345678901234567890...\" is above the "
     "maximum 65535"},
    /* bools and enums */
    {"[amqp]\nverify_peer = maybe\n",
     ":2: [amqp] verify_peer: \"maybe\" is not a boolean (yes, no, true, false, on, off, 1, 0)"},
    {"[amqp]\nverify_peer = 2\n",
     ":2: [amqp] verify_peer: \"2\" is not a boolean (yes, no, true, false, on, off, 1, 0)"},
    {"[smtp]\nstarttls = maybe\n", ":2: [smtp] starttls: \"maybe\" is not one of no, try, require"},
    {"[amqp]\nqueue_type = stream\n",
     ":2: [amqp] queue_type: \"stream\" is not one of classic, quorum"},
    {"[daemon]\nlog_level = verbose\n",
     ":2: [daemon] log_level: \"verbose\" is not one of emerg, alert, crit, err, warning, "
     "notice, info, debug"},
    /* strings that must be set */
    {"[amqp]\nqueue =\n", ":2: [amqp] queue: must not be empty"},
    {"[daemon]\ninstance = \"\"\n", ":2: [daemon] instance: must not be empty"},
    {"[amqp]\nurl = ; none\n", ":2: [amqp] url: must not be empty"},
    /* names */
    {"[amqp]\nprefech = 5\n", ":2: unknown key [amqp] prefech"},
    {"[amqp]\nhost = x\n", ":2: unknown key [amqp] host"},
    {"[daemon]\n\n[amqpp]\nprefetch = 5\n", ":4: unknown section [amqpp]"},
    {"prefetch = 5\n", ":1: key prefetch is outside any [section]"},
    /* syntax and line handling */
    {"[amqp]\nprefetch 5\n", ":2: syntax error (want \"[section]\" or \"key = value\")"},
    {"[amqp\nprefetch = 5\n", ":1: syntax error (want \"[section]\" or \"key = value\")"},
    {"[amqp]\nqueue = q\n  prefetch = 5\n",
     ":3: indented line continues key queue; remove the indentation"},
    {"[amqp]\nqueue = q\n\n\tprefetch = 5\n",
     ":4: indented line continues key queue; remove the indentation"},
    /* the first error is reported */
    {"[amqp]\nprefetch = 0\nbogus = 1\n", ":2: [amqp] prefetch: \"0\" is below the minimum 1"},
    {"[amqp]\nbogus = 1\nprefetch = 0\n", ":2: unknown key [amqp] bogus"},
    {"[amqp]\nbogus = 1\nprefetch 5\n", ":2: unknown key [amqp] bogus"},
    {"[amqp]\nprefetch 5\nbogus = 1\n", ":2: syntax error (want \"[section]\" or \"key = value\")"},
};

static void test_bad_values(void **state)
{
	(void)state;
	for (size_t i = 0; i < sizeof(bad_cases) / sizeof(bad_cases[0]); i++) {
		const struct bad_case *t = &bad_cases[i];
		char path[64], want[400];
		struct rd_err err = {0};
		struct rd_config *c = load_text(t->ini, &err, path, sizeof(path));
		if (c)
			fail_msg("case %zu (%s): loaded", i, t->ini);
		snprintf(want, sizeof(want), "%s%s", path, t->msg);
		if (strcmp(err.msg, want) != 0)
			fail_msg("case %zu:\n got  %s\n want %s", i, err.msg, want);
		assert_int_equal(err.st, RD_FAIL);
	}
}

static void test_long_line(void **state)
{
	(void)state;
	char ini[4096], path[64], want[200];
	struct rd_err err = {0};

	/* around inih's INI_MAX_LINE (200) and far beyond: values are whole */
	static const int lens[] = {198, 199, 200, 1000, 3000};
	for (size_t i = 0; i < sizeof(lens) / sizeof(lens[0]); i++) {
		int n = snprintf(ini, sizeof(ini), "[postgres]\nconninfo = host=%0*d ; note\n",
				 lens[i] - 16, 0);
		assert_true(n > 0);
		struct rd_config *c = load_ok(ini);
		assert_int_equal(strlen(c->conninfo), (size_t)lens[i] - 11);
		assert_int_equal(c->conninfo[0], 'h');
		rd_config_free(c);
	}
	/* a long comment line is a comment */
	snprintf(ini, sizeof(ini), "[postgres]\n; %0*d\nconnections = 3\n", 500, 0);
	struct rd_config *c = load_ok(ini);
	assert_int_equal(c->connections, 3);
	rd_config_free(c);
	/* a long line must still be "key = value" of a known key */
	snprintf(ini, sizeof(ini), "[postgres]\nconninfoo = %0*d\n", 300, 0);
	assert_null(load_text(ini, &err, path, sizeof(path)));
	assert_non_null(strstr(err.msg, "unknown key [postgres] conninfoo"));
	snprintf(ini, sizeof(ini), "[postgres]\n%0*d\n", 300, 0);
	assert_null(load_text(ini, &err, path, sizeof(path)));
	snprintf(want, sizeof(want), "%s:2: line longer than 198 bytes", path);
	assert_string_equal(err.msg, want);
}

static void test_nul_byte(void **state)
{
	(void)state;
	char path[64], want[200];
	struct rd_err err = {0};
	rd_strlcpy(path, "/tmp/rosterd-test-config-XXXXXX", sizeof(path));
	int fd = mkstemp(path);
	assert_true(fd >= 0);
	static const char text[] = "[amqp]\nqueue = a\0b\n";
	assert_int_equal(write(fd, text, sizeof(text) - 1), (ssize_t)(sizeof(text) - 1));
	close(fd);
	assert_null(rd_config_load(path, &err));
	unlink(path);
	snprintf(want, sizeof(want), "%s:2: line contains a NUL byte", path);
	assert_string_equal(err.msg, want);
}

static void test_missing_file(void **state)
{
	(void)state;
	struct rd_err err = {0};
	assert_null(rd_config_load("/nonexistent/rosterd.conf", &err));
	assert_string_equal(err.msg,
			    "/nonexistent/rosterd.conf: cannot open: No such file or directory");

	/* a directory opens but cannot be read */
	assert_null(rd_config_load("/tmp", &err));
	assert_string_equal(err.msg, "/tmp: cannot read: Is a directory");

	/* NULL is the default path */
	struct rd_config *c = rd_config_load(NULL, &err);
	if (access(RD_CONFIG_DEFAULT_PATH, R_OK) != 0) {
		assert_null(c);
		assert_int_equal(strncmp(err.msg, RD_CONFIG_DEFAULT_PATH ": cannot open",
					 strlen(RD_CONFIG_DEFAULT_PATH ": cannot open")),
				 0);
	}
	rd_config_free(c);
	rd_config_free(NULL);
}

/* ---- environment ---- */

static void test_env_override(void **state)
{
	(void)state;
	setenv("ROSTERD_AMQP_PREFETCH", "200", 1);
	setenv("ROSTERD_POSTGRES_CONNINFO", "host=db dbname=x", 1);
	setenv("ROSTERD_POSTGRES_PASSWORD_FILE", "/run/pg", 1);
	setenv("ROSTERD_SMTP_STARTTLS", "try", 1);
	setenv("ROSTERD_AMQP_CA_FILE", "", 1); /* empty: unsets the file's value */
	setenv("ROSTERD_AMQP_VERIFY_PEER", "off", 1);
	setenv("ROSTERD_SMTP_TIMEOUT", "7", 1);
	setenv("ROSTERD_UNRELATED_THING", "x", 1); /* not a key: ignored */
	struct rd_config *c = load_ok("[amqp]\nprefetch = 100 ; file\nca_file = /etc/ca.pem\n"
				      "queue = fromfile\n[smtp]\nstarttls = require\n");
	assert_int_equal(c->prefetch, 200);
	assert_string_equal(c->conninfo, "host=db dbname=x");
	assert_string_equal(c->pg_password_file, "/run/pg");
	assert_int_equal(c->starttls, RD_STARTTLS_TRY);
	assert_string_equal(c->ca_file, "");
	assert_false(c->verify_peer);
	assert_int_equal(c->smtp_timeout, 7);
	assert_string_equal(c->queue, "fromfile"); /* no override: the file's value */
	rd_config_free(c);
	unsetenv("ROSTERD_UNRELATED_THING");
}

struct env_case {
	const char *var, *value, *msg;
};

static const struct env_case env_cases[] = {
    {"ROSTERD_AMQP_PREFETCH", "x", "ROSTERD_AMQP_PREFETCH: \"x\" is not an integer"},
    {"ROSTERD_AMQP_PREFETCH", " 5", "ROSTERD_AMQP_PREFETCH: \" 5\" is not an integer"},
    {"ROSTERD_AMQP_PREFETCH", "5 ; c", "ROSTERD_AMQP_PREFETCH: \"5 ; c\" is not an integer"},
    {"ROSTERD_AMQP_PREFETCH", "0", "ROSTERD_AMQP_PREFETCH: \"0\" is below the minimum 1"},
    {"ROSTERD_DAEMON_BATCH_SIZE", "10001",
     "ROSTERD_DAEMON_BATCH_SIZE: \"10001\" is above the maximum 10000"},
    {"ROSTERD_SMTP_STARTTLS", "maybe",
     "ROSTERD_SMTP_STARTTLS: \"maybe\" is not one of no, try, require"},
    {"ROSTERD_AMQP_VERIFY_PEER", "2",
     "ROSTERD_AMQP_VERIFY_PEER: \"2\" is not a boolean (yes, no, true, false, on, off, 1, 0)"},
    {"ROSTERD_DAEMON_INSTANCE", "", "ROSTERD_DAEMON_INSTANCE: must not be empty"},
};

static void test_env_bad(void **state)
{
	(void)state;
	for (size_t i = 0; i < sizeof(env_cases) / sizeof(env_cases[0]); i++) {
		const struct env_case *t = &env_cases[i];
		char path[64];
		struct rd_err err = {0};
		setenv(t->var, t->value, 1);
		struct rd_config *c =
		    load_text("[amqp]\nprefetch = 100\n", &err, path, sizeof(path));
		unsetenv(t->var);
		if (c)
			fail_msg("case %zu (%s=%s): loaded", i, t->var, t->value);
		assert_string_equal(err.msg, t->msg);
	}
}

/* ---- reload ---- */

struct warnings {
	char text[512];
	int n;
};

static void collect_warning(const char *key, void *arg)
{
	struct warnings *w = arg;
	size_t len = strlen(w->text);
	snprintf(w->text + len, sizeof(w->text) - len, "%s%s", w->n ? " " : "", key);
	w->n++;
}

static void test_reload(void **state)
{
	(void)state;
	struct rd_config *cur = load_ok("[daemon]\ninstance = a\nbatch_size = 10\n"
					"[amqp]\nprefetch = 10\nurl = amqp://one/\n");
	struct rd_config *next = load_ok("[daemon]\ninstance = b\nbatch_size = 20\n"
					 "log_level = debug\n"
					 "[amqp]\nprefetch = 20\nurl = amqp://two/\n"
					 "[postgres]\nstatement_timeout_ms = 5\n"
					 "[smtp]\ntimeout = 9\n");
	struct warnings w = {{0}, 0};
	struct rd_config *m = rd_config_reload(cur, next, collect_warning, &w);
	assert_non_null(m);
	assert_ptr_not_equal(m, next);
	assert_ptr_not_equal(m, cur);
	rd_config_free(next); /* the result owns its own copies */

	/* non-reloadable: kept, named in table order */
	assert_string_equal(m->instance, "a");
	assert_int_equal(m->prefetch, 10);
	assert_string_equal(m->url, "amqp://one/");
	assert_int_equal(w.n, 3);
	assert_string_equal(w.text, "daemon.instance amqp.url amqp.prefetch");
	/* reloadable: taken */
	assert_int_equal(m->batch_size, 20);
	assert_int_equal(m->log_level, 7);
	assert_int_equal(m->statement_timeout_ms, 5);
	assert_int_equal(m->smtp_timeout, 9);
	/* unchanged keys stay as they were */
	assert_string_equal(m->queue, "rosterd.events");

	/* same config: no warning; warn may be NULL */
	struct warnings w2 = {{0}, 0};
	struct rd_config *m2 = rd_config_reload(cur, m, collect_warning, &w2);
	assert_int_equal(w2.n, 0);
	struct rd_config *other = load_ok("[amqp]\nprefetch = 3\n");
	struct rd_config *m3 = rd_config_reload(m2, other, NULL, NULL);
	assert_int_equal(m3->prefetch, 10);
	rd_config_free(other);
	rd_config_free(m3);
	rd_config_free(m2);
	rd_config_free(m);
	rd_config_free(cur);
}

/* ---- dump ---- */

struct mask_case {
	const char *var; /* ROSTERD_AMQP_URL or ROSTERD_POSTGRES_CONNINFO */
	const char *value;
	const char *shown;  /* dump's value */
	const char *hidden; /* must not appear anywhere in the dump */
};

static const struct mask_case mask_cases[] = {
    {"ROSTERD_AMQP_URL", "amqp://alice:s3cret@mq1:5672/%2f", "amqp://alice:***@mq1:5672/%2f",
     "s3cret"},
    {"ROSTERD_AMQP_URL", "amqp://u:pw1@a,amqps://v:pw2@b/vh", "amqp://u:***@a,amqps://v:***@b/vh",
     "pw"},
    {"ROSTERD_AMQP_URL", "amqp://u:pw1@a amqps://v:pw2@b", "amqp://u:***@a amqps://v:***@b", "pw"},
    {"ROSTERD_AMQP_URL", "amqp://u:p@ss@h/", "amqp://u:***@h/", "ss@"},
    {"ROSTERD_AMQP_URL", "amqp://user@host/", "amqp://user@host/", NULL},
    {"ROSTERD_AMQP_URL", "amqp://host:5672", "amqp://host:5672", NULL},
    {"ROSTERD_POSTGRES_CONNINFO", "host=db password=s3cret dbname=r",
     "host=db password=*** dbname=r", "s3cret"},
    {"ROSTERD_POSTGRES_CONNINFO", "host=db password = 'a b\\' c' dbname=r",
     "host=db password = *** dbname=r", "a b"},
    {"ROSTERD_POSTGRES_CONNINFO", "PASSWORD=x\\ y host=db", "PASSWORD=*** host=db", "x\\ y"},
    {"ROSTERD_POSTGRES_CONNINFO", "postgresql://u:pw1@h:5432/db?sslmode=require&password=pw2",
     "postgresql://u:***@h:5432/db?sslmode=require&password=***", "pw"},
    {"ROSTERD_POSTGRES_CONNINFO", "host=db sslmode=require", "host=db sslmode=require", NULL},
};

static void test_dump_masks(void **state)
{
	(void)state;
	for (size_t i = 0; i < sizeof(mask_cases) / sizeof(mask_cases[0]); i++) {
		const struct mask_case *t = &mask_cases[i];
		setenv(t->var, t->value, 1);
		struct rd_config *c = load_ok("");
		unsetenv(t->var);
		char *d = dump_string(c);
		bool url = strcmp(t->var, "ROSTERD_AMQP_URL") == 0;
		const char *v = dump_value(d, url ? "amqp" : "postgres", url ? "url" : "conninfo");
		if (!v || strcmp(v, t->shown) != 0)
			fail_msg("case %zu: got \"%s\", want \"%s\"", i, v ? v : "(none)",
				 t->shown);
		if (t->hidden && strstr(d, t->hidden))
			fail_msg("case %zu: \"%s\" printed:\n%s", i, t->hidden, d);
		free(d);
		rd_config_free(c);
	}
}

static void test_dump_shape(void **state)
{
	(void)state;
	struct rd_config *c = load_ok("[smtp]\nstarttls = require\n[amqp]\nverify_peer = off\n");
	char *d = dump_string(c);

	/* every non-secret key once, with its section; secret keys never */
	struct rd_config_keyinfo k;
	size_t nkeys = 0;
	for (size_t i = 0; rd_config_key_info(i, &k); i++) {
		const char *v = dump_value(d, k.section, k.key);
		if (k.secret) {
			if (v)
				fail_msg("secret key %s.%s printed", k.section, k.key);
		} else {
			if (!v)
				fail_msg("key %s.%s missing", k.section, k.key);
			nkeys++;
		}
	}
	size_t lines = 0;
	for (const char *p = d; (p = strstr(p, " =")); p++)
		lines++;
	assert_int_equal(lines, nkeys);
	assert_non_null(strstr(d, "[daemon]\ninstance = rosterd-1\n"));
	assert_non_null(strstr(d, "\n\n[amqp]\n"));
	assert_string_equal(dump_value(d, "daemon", "log_level"), "info");
	assert_string_equal(dump_value(d, "smtp", "starttls"), "require");
	assert_string_equal(dump_value(d, "amqp", "verify_peer"), "no");
	assert_string_equal(dump_value(d, "amqp", "ca_file"), "");
	assert_string_equal(dump_value(d, "amqp", "url"), "amqp://guest:***@127.0.0.1:5672/%2f");
	free(d);
	rd_config_free(c);
}

/* dump -> load -> dump gives the same text (when no password is masked) */
static void test_dump_roundtrip(void **state)
{
	(void)state;
	struct rd_config *a =
	    load_ok("[daemon]\ninstance = x\nlog_level = err\n"
		    "[amqp]\nurl = amqp://mq1/ amqp://mq2/\nqueue_type = quorum\nverify_peer = no\n"
		    "[postgres]\nconninfo = host=db dbname=r\n"
		    "[smtp]\nusername = \" spaced \"\nstarttls = try\nworkers = 9\n");
	char *d1 = dump_string(a);
	struct rd_config *b = load_ok(d1);
	char *d2 = dump_string(b);
	assert_string_equal(d1, d2);
	assert_string_equal(b->smtp_username, " spaced ");
	free(d1);
	free(d2);
	rd_config_free(a);
	rd_config_free(b);
}

/* ---- the shipped example ---- */

/* config/rosterd.conf, found from this file's path (tests/unit/). */
static void shipped_path(char *buf, size_t size)
{
	const char *me = __FILE__;
	const char *tail = strstr(me, "tests/unit/test_config.c");
	assert_non_null(tail);
	snprintf(buf, size, "%.*sconfig/rosterd.conf", (int)(tail - me), me);
}

struct seen {
	char names[64][48];
	int n;
};

static int collect_key(void *user, const char *section, const char *name, const char *value)
{
	struct seen *s = user;
	(void)value;
	if (s->n < 64)
		snprintf(s->names[s->n++], sizeof(s->names[0]), "%s.%s", section, name);
	return 1;
}

static void test_shipped_conf(void **state)
{
	(void)state;
	char path[4096];
	shipped_path(path, sizeof(path));
	struct rd_err err = {0};
	struct rd_config *c = rd_config_load(path, &err);
	if (!c)
		fail_msg("%s", err.msg);

	/* every value written in it is the default */
	struct rd_config *def = load_ok("");
	char *d1 = dump_string(c), *d2 = dump_string(def);
	assert_string_equal(d1, d2);
	free(d1);
	free(d2);
	rd_config_free(def);
	rd_config_free(c);

	/* every key of the table is written in it */
	struct seen s = {.n = 0};
	assert_int_equal(ini_parse(path, collect_key, &s), 0);
	struct rd_config_keyinfo k;
	for (size_t i = 0; rd_config_key_info(i, &k); i++) {
		char want[48];
		snprintf(want, sizeof(want), "%s.%s", k.section, k.key);
		bool found = false;
		for (int j = 0; j < s.n; j++)
			found = found || strcmp(s.names[j], want) == 0;
		if (!found)
			fail_msg("%s: key %s is missing", path, want);
	}
}

/* ---- small things ---- */

static void test_key_info(void **state)
{
	(void)state;
	struct rd_config_keyinfo k;
	size_t n = 0, reloadable = 0;
	while (rd_config_key_info(n, &k)) {
		assert_non_null(k.section);
		assert_non_null(k.key);
		assert_non_null(k.def);
		if (strcmp(k.type, "int") == 0) {
			assert_true(k.min <= k.max);
			long v = strtol(k.def, NULL, 10);
			assert_true(k.min <= v && v <= k.max);
		}
		if (strcmp(k.type, "enum") == 0)
			assert_non_null(k.names);
		reloadable += k.reloadable;
		n++;
	}
	assert_int_equal(n, 38);
	assert_int_equal(reloadable, 11);
	assert_false(rd_config_key_info(n, &k));

	assert_string_equal(rd_config_level_name(0), "emerg");
	assert_string_equal(rd_config_level_name(3), "err");
	assert_string_equal(rd_config_level_name(7), "debug");
	assert_string_equal(rd_config_level_name(8), "?");
	assert_string_equal(rd_config_level_name(-1), "?");
}

#define T(f) cmocka_unit_test_setup(f, clear_env)

int main(void)
{
	const struct CMUnitTest tests[] = {
	    T(test_defaults),	  T(test_good_values), T(test_bad_values),
	    T(test_long_line),	  T(test_nul_byte),    T(test_missing_file),
	    T(test_env_override), T(test_env_bad),     T(test_reload),
	    T(test_dump_masks),	  T(test_dump_shape),  T(test_dump_roundtrip),
	    T(test_shipped_conf), T(test_key_info),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
