/* template.h: pure mail logic, no I/O (unit-tested in tests/unit/
 * test_template.c): the placeholder grammar of templates (SPEC 3, 4.8, 9),
 * header encoding (RFC 2047, RFC 5322 phrases, no CR/LF/NUL can reach a
 * header), building the full message text of an outbox row (headers plus a
 * UTF-8 body with a correct MIME header), and the retry schedule of
 * temporary delivery failures. Rendering itself happens in SQL at queue
 * time (schema/migrations/0004_outbox.sql) with the same grammar.
 * Owns struct rd_tpl_mail (borrowed strings) and nothing global. */
#ifndef RD_TEMPLATE_H
#define RD_TEMPLATE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "util.h"

/* ---- placeholders ---- */

enum rd_tpl_check {
	RD_TPL_OK = 0,
	RD_TPL_UNKNOWN,	     /* a {{name}} that is not a known placeholder */
	RD_TPL_UNTERMINATED, /* a "{{" without a closing "}}" */
};

/* Is `name` (already trimmed, len bytes) a known placeholder? Known:
 * contact.<person key>, contact.fields.<key>, booking.number, booking.total,
 * offer.title, offer.starts_at, invoice.number, invoice.amount, invoice.due,
 * payment.amount, vars.<key> (keys non-empty, without braces). */
bool rd_tpl_known(const char *name, size_t len);

/* Check every "{{ name }}" of a template text (blanks around the name are
 * allowed). On RD_TPL_UNKNOWN `bad` receives the placeholder as written in
 * the template ("{{contact.nick}}", cut to badsize-1 bytes and made one
 * printable line); on RD_TPL_UNTERMINATED the first bytes after "{{". */
enum rd_tpl_check rd_tpl_check(const char *s, size_t len, char *bad, size_t badsize);

/* ---- headers ---- */

/* Replace CR, LF, NUL and every other control character (and DEL) by a
 * space, in place; returns s. Applied to every value before it reaches a
 * header: nothing from a message can start a header line. */
char *rd_tpl_header_clean(char *s);

/* Is `addr` usable in SMTP envelopes and headers: one '@', non-empty local
 * part and domain, printable ASCII without spaces, quotes, angle brackets,
 * parentheses, commas, semicolons, colons or backslashes, at most 254 bytes? */
bool rd_tpl_addr_ok(const char *addr);

/* Split a mailbox as written in configuration ("Acme Kurse <info@acme.ch>",
 * "info@acme.ch", "\"Acme, Inc\" <x@y>") into a display name (may be "")
 * and the address. false when no usable address (rd_tpl_addr_ok) is found. */
bool rd_tpl_parse_mailbox(const char *in, char *name, size_t namesize, char *addr, size_t addrsize);

/* Encode a header value for a header named `field` (e.g. "Subject") into
 * out: printable ASCII is written as it is; anything else (non-ASCII,
 * "=?" sequences, very long values) as RFC 2047 encoded words
 * "=?UTF-8?B?...?=" of at most 75 characters, split on UTF-8 character
 * boundaries and folded with CRLF SP so that no line exceeds 78
 * characters. The value is cleaned first (rd_tpl_header_clean). Returns
 * the length written (always terminated), or 0 when out is too small. */
size_t rd_tpl_encode_text(const char *field, const char *value, char *out, size_t outsize);

/* A mailbox for From, To or Reply-To: `addr` alone when name is empty,
 * else the display name (an RFC 5322 phrase: atoms as they are, quoted
 * string when needed, encoded words when non-ASCII) then " <addr>".
 * Returns the length written, 0 when out is too small. */
size_t rd_tpl_encode_mailbox(const char *name, const char *addr, char *out, size_t outsize);

/* ---- message ---- */

/* One outbox row as the worker sends it; all strings borrowed, UTF-8. */
struct rd_tpl_mail {
	const char *from_name, *from_addr;   /* the organisation's mail_from */
	const char *reply_name, *reply_addr; /* reply_to; NULL or "" = none */
	const char *to_name, *to_addr;
	const char *subject;
	const char *body;
	const char *message_id; /* "<...@...>", fixed per outbox row */
	int64_t date_ms;	/* the Date header: when the mail was queued */
};

/* Is `id` a usable Message-ID: "<" id-left "@" id-right ">", printable
 * ASCII without spaces or further angle brackets, at most 250 bytes? */
bool rd_tpl_msgid_ok(const char *id);

/* The full RFC 5322 message (CRLF line ends): Date, From, To, Reply-To,
 * Subject, Message-ID, MIME-Version, Content-Type text/plain;
 * charset=utf-8, Content-Transfer-Encoding (7bit when the body is short
 * printable ASCII lines, else quoted-printable), Auto-Submitted, a blank
 * line and the body. RD_OK and *out (caller frees), or RD_REJECT with the
 * reason (unusable address or Message-ID): a permanent failure. */
enum rd_status rd_tpl_build(const struct rd_tpl_mail *m, char **out, size_t *outlen,
			    struct rd_err *err) RD_WUR;

/* Quoted-printable (RFC 2045) of a body whose line ends are CRLF already;
 * the result is appended to *buf (rd_xrealloc'd, *len updated). */
void rd_tpl_qp(const char *s, size_t n, char **buf, size_t *len, size_t *cap);

/* ---- retries ---- */

/* Delay before the n-th retry (n >= 1): base_ms * 2^(n-1), saturated at
 * INT64_MAX / 4 (SPEC 9). */
int64_t rd_tpl_backoff_ms(int64_t base_ms, int n);

/* After a temporary failure of attempt number `attempts` (>= 1) of a mail
 * whose retry window opened at window_ms (queued, or retried by hand):
 * true and *next_ms = when to try again (never later than the end of the
 * window, window_ms + lifetime_s); false when the window is over (give up). */
bool rd_tpl_next_attempt(int64_t now_ms, int64_t window_ms, int attempts, int64_t base_ms,
			 int64_t lifetime_s, int64_t *next_ms);

#endif
