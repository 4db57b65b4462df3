/* decode.h: turns an AMQP body into a checked envelope (SPEC 2).
 *
 * Two stages. rd_decode_prescan walks the raw MessagePack bytes without
 * allocating and refuses what could make msgpack-c allocate without bound:
 * bodies over the size limit, nesting deeper than RD_MAX_DEPTH, containers
 * with more than RD_MAX_ELEMENTS entries, and any header whose count claims
 * more elements than bytes remain (msgpack-c allocates from the header's
 * count before reading the elements). Only then does rd_decode_envelope let
 * msgpack-c unpack, and it checks the envelope: v, id, type, org, at, data,
 * string types, lengths; and everywhere in the body: string map keys, no
 * repeated key in a map, UTF-8 without NUL. Unknown keys are ignored.
 *
 * Owns struct rd_envelope: the unpacked object lives in env->unp's zone and
 * points into the caller's buffer, which must outlive the envelope. */
#ifndef RD_DECODE_H
#define RD_DECODE_H

#include <msgpack.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "util.h"

#define RD_MAX_DEPTH 16	      /* nesting deeper than this is rejected */
#define RD_MAX_ELEMENTS 10000 /* entries of one array or map */
#define RD_ORG_MAX 64
#define RD_ID_MAX 128
#define RD_TYPE_MAX 64

struct rd_envelope {
	/* Set as soon as they are known to be valid, even when a later check
	 * fails: a rejection is recorded against (org, id) when both are set. */
	bool has_org;
	bool has_id;
	char org[RD_ORG_MAX + 1];
	char id[RD_ID_MAX + 1];
	char type[RD_TYPE_MAX + 1]; /* may be empty */
	int64_t at_ms;		    /* ms since the epoch */
	const msgpack_object *data; /* a map; points into unp */
	msgpack_unpacked unp;
	bool unp_init;
};

/* Bounded walk of the raw bytes. RD_OK, or RD_REJECT with a reason. */
enum rd_status rd_decode_prescan(const void *buf, size_t len, size_t max_bytes,
				 struct rd_err *err) RD_WUR;

/* Prescan, unpack and check. env is initialised by this call (also on
 * failure, so that rd_envelope_free can always be called). RD_OK or
 * RD_REJECT; err->msg names the key ("data: want map, got str"). */
enum rd_status rd_decode_envelope(const void *buf, size_t len, size_t max_bytes,
				  struct rd_envelope *env, struct rd_err *err) RD_WUR;
void rd_envelope_free(struct rd_envelope *env);

/* Instants (SPEC 2 "at", and payload instants) are kept to the years
 * 0001..9999 so that PostgreSQL's timestamptz can always hold them. */
#define RD_INSTANT_MIN_MS (-62135596800000LL) /* 0001-01-01T00:00:00Z */
#define RD_INSTANT_MAX_MS 253402300799999LL   /* 9999-12-31T23:59:59.999Z */

/* A dotted path for reasons ("data.attendees[2].price"). Keys are copied
 * with control characters replaced and long ones shortened, so a path is
 * always short, printable and valid UTF-8. Push by appending, pop by
 * restoring len. */
struct rd_path {
	char s[96];
	size_t len;
};
void rd_path_key(struct rd_path *p, const char *key, size_t keylen);
void rd_path_index(struct rd_path *p, size_t i);
void rd_path_pop(struct rd_path *p, size_t len); /* back to an earlier len */

/* Shared checks, also used by the payload validators. */
bool rd_utf8_valid(const char *s, size_t len); /* u8_check; NUL is valid UTF-8 */
/* NULL when s is valid UTF-8 without NUL (PostgreSQL text cannot hold
 * U+0000), else the reason: "invalid UTF-8" or "contains a NUL character". */
const char *rd_str_check(const char *s, size_t len);
/* An int of ms since the epoch or a msgpack timestamp (ext -1, 4, 8 or 12
 * bytes) within RD_INSTANT_MIN_MS..RD_INSTANT_MAX_MS. RD_OK with *ms set,
 * or RD_REJECT naming path ("at: want int or timestamp, got str"). */
enum rd_status rd_msgpack_instant(const msgpack_object *o, const char *path, int64_t *ms,
				  struct rd_err *err) RD_WUR;
bool rd_org_valid(const char *s, size_t len);	      /* 1..64 of [A-Za-z0-9._-] */
const char *rd_msgpack_kind(const msgpack_object *o); /* "str", "int", "map"... */

#endif
