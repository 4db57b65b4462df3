/* log.h: one line per event, "event key=value ...", with a sd-daemon
 * "<N>" priority prefix so journald keeps the level. Logs go to stderr.
 * Values that come from messages are escaped with rd_log_q. */
#ifndef RD_LOG_H
#define RD_LOG_H

#include <stddef.h>
#include <syslog.h>

#include "util.h"

void rd_log_init(const char *instance, int max_level);
void rd_log_set_level(int max_level);
/* rd_log(LOG_INFO, "msg.applied", "org=%s id=%s", ...) */
void rd_log(int level, const char *event, const char *fmt, ...) RD_PRINTF(3, 4);

/* Quote an untrusted value for a log line: printable ASCII is kept, anything
 * else (and '"', '\\', space, '=') becomes \xNN; at most 64 input bytes.
 * Returns buf. */
char *rd_log_q(char *buf, size_t bufsize, const char *s, size_t len);
#define RD_LOG_QBUF 260

#endif
