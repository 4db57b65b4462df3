/* log.c: one line per event on stderr, "<N>" prefixed for journald.
 * Thread-safe: each line is formatted into a buffer and written with one
 * write(2). */
#include "log.h"

#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

/* read by every thread on each line, set by the loop on SIGHUP */
static _Atomic int log_max = LOG_INFO;
static char log_instance[64] = "rosterd";

void rd_log_init(const char *instance, int max_level)
{
	if (instance)
		rd_strlcpy(log_instance, instance, sizeof(log_instance));
	atomic_store_explicit(&log_max, max_level, memory_order_relaxed);
}

void rd_log_set_level(int max_level)
{
	atomic_store_explicit(&log_max, max_level, memory_order_relaxed);
}

void rd_log(int level, const char *event, const char *fmt, ...)
{
	char line[2048];
	int n;

	if (level > atomic_load_explicit(&log_max, memory_order_relaxed))
		return;
	n = snprintf(line, sizeof(line), "<%d>%s %s ", level, log_instance, event);
	if (n < 0 || (size_t)n >= sizeof(line))
		return;
	if (fmt && *fmt) {
		va_list ap;
		va_start(ap, fmt);
		int m = vsnprintf(line + n, sizeof(line) - (size_t)n, fmt, ap);
		va_end(ap);
		if (m > 0)
			n += m;
		if ((size_t)n >= sizeof(line) - 1)
			n = (int)sizeof(line) - 2;
	}
	line[n++] = '\n';
	/* best effort; nothing sensible to do when stderr is gone */
	ssize_t w = write(STDERR_FILENO, line, (size_t)n);
	(void)w;
}

char *rd_log_q(char *buf, size_t bufsize, const char *s, size_t len)
{
	static const char hex[] = "0123456789abcdef";
	size_t o = 0;

	if (!bufsize)
		return buf;
	if (!s) {
		rd_strlcpy(buf, "-", bufsize);
		return buf;
	}
	if (len > 64)
		len = 64;
	for (size_t i = 0; i < len && o + 5 < bufsize; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c > 0x20 && c < 0x7f && c != '"' && c != '\\' && c != '=') {
			buf[o++] = (char)c;
		} else {
			buf[o++] = '\\';
			buf[o++] = 'x';
			buf[o++] = hex[c >> 4];
			buf[o++] = hex[c & 15];
		}
	}
	buf[o] = '\0';
	return buf;
}
