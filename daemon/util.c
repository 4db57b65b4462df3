/* util.c: errors, allocation that never returns NULL, clocks. */
#include "util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "log.h"

enum rd_status rd_errf(struct rd_err *err, enum rd_status st, const char *fmt, ...)
{
	if (err) {
		va_list ap;
		va_start(ap, fmt);
		int n = vsnprintf(err->msg, sizeof(err->msg), fmt, ap);
		va_end(ap);
		/* cut at a character boundary, never inside a UTF-8 sequence */
		if (n >= (int)sizeof(err->msg)) {
			size_t len = sizeof(err->msg) - 1, i = len;
			while (i > 0 && ((unsigned char)err->msg[i - 1] & 0xc0) == 0x80)
				i--;
			if (i > 0) {
				unsigned char lead = (unsigned char)err->msg[i - 1];
				size_t want = lead >= 0xf0 ? 4 : lead >= 0xe0 ? 3 : lead >= 0xc0 ? 2 : 1;
				if (i - 1 + want > len)
					err->msg[i - 1] = '\0';
			}
		}
		err->st = st;
		/* one line, always */
		for (char *p = err->msg; *p; p++)
			if (*p == '\n' || *p == '\r')
				*p = ' ';
	}
	return st;
}

const char *rd_status_name(enum rd_status st)
{
	switch (st) {
	case RD_OK:
		return "ok";
	case RD_REJECT:
		return "reject";
	case RD_RETRY:
		return "retry";
	case RD_FAIL:
		return "fail";
	}
	return "?";
}

static void oom(size_t n)
{
	rd_log(LOG_CRIT, "oom", "bytes=%zu", n);
	abort();
}

void *rd_xmalloc(size_t n)
{
	void *p = malloc(n ? n : 1);
	if (!p)
		oom(n);
	return p;
}

void *rd_xcalloc(size_t n, size_t size)
{
	void *p = calloc(n ? n : 1, size ? size : 1);
	if (!p)
		oom(n * size);
	return p;
}

void *rd_xrealloc(void *p, size_t n)
{
	void *q = realloc(p, n ? n : 1);
	if (!q)
		oom(n);
	return q;
}

char *rd_xstrdup(const char *s)
{
	return rd_xstrndup(s, strlen(s));
}

char *rd_xstrndup(const char *s, size_t n)
{
	size_t len = strnlen(s, n);
	char *p = rd_xmalloc(len + 1);
	memcpy(p, s, len);
	p[len] = '\0';
	return p;
}

size_t rd_strlcpy(char *dst, const char *src, size_t dstsize)
{
	size_t len = strlen(src);
	if (dstsize) {
		size_t n = len < dstsize - 1 ? len : dstsize - 1;
		memcpy(dst, src, n);
		dst[n] = '\0';
	}
	return len;
}

int64_t rd_now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t rd_mono_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}
