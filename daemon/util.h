/* util.h: error reporting (rd_err), allocation that never returns NULL,
 * monotonic/real clocks. Owns nothing global. */
#ifndef RD_UTIL_H
#define RD_UTIL_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#define RD_WUR __attribute__((warn_unused_result))
#define RD_PRINTF(a, b) __attribute__((format(printf, a, b)))

/* What happens to a message or an operation that did not succeed. */
enum rd_status {
	RD_OK = 0,
	RD_REJECT, /* bad input or against a rule: dead-letter queue, never retried */
	RD_RETRY,  /* waits for something not yet seen: retry queue */
	RD_FAIL,   /* infrastructure fault: nothing acknowledged, reconnect */
};

/* Caller-owned explanation of a failure: one line, no newline. */
struct rd_err {
	enum rd_status st;
	char msg[200];
};

/* Fills err (when not NULL) and returns st, so that a caller can write
 * `return rd_errf(err, RD_REJECT, "...")`. */
enum rd_status rd_errf(struct rd_err *err, enum rd_status st, const char *fmt, ...) RD_PRINTF(3, 4);
const char *rd_status_name(enum rd_status st);

/* Out of memory is fatal (logged, abort). */
void *rd_xmalloc(size_t n);
void *rd_xcalloc(size_t n, size_t size);
void *rd_xrealloc(void *p, size_t n);
char *rd_xstrdup(const char *s);
char *rd_xstrndup(const char *s, size_t n);

/* Copy at most dstsize-1 bytes and terminate; returns strlen(src). */
size_t rd_strlcpy(char *dst, const char *src, size_t dstsize);

int64_t rd_now_ms(void);      /* CLOCK_REALTIME, ms since the epoch */
int64_t rd_mono_us(void);     /* CLOCK_MONOTONIC, microseconds */

#endif
