/* handlers.h: the message types rosterd knows (SPEC 3), as one table keyed
 * by type. Each entry describes the `data` map field by field; the generic
 * validator walks that description, rejects what breaks it with a reason
 * naming the field, and builds the normalised payload (a JSON object) that
 * the type's SQL function in schema/ applies inside the batch transaction.
 *
 * Normalisation done here, so that SQL sees clean values:
 *  - an absent key, nil or "" means "not given": the key is left out;
 *  - a person's email is trimmed and lower-cased (SPEC 4.1); an implausible
 *    one is left out and "email_invalid" carries the reason, while
 *    "email_given" keeps the trimmed text for the record;
 *  - a person's contact_id that is no UUID cannot name a contact: it is left
 *    out and "contact_id_invalid" keeps the given text (a bad optional value
 *    never rejects a booking); a top-level contact id that is no UUID rejects;
 *  - UUIDs are emitted lower-case, instants as integer ms, dates as strings;
 *  - integers outside int64 are rejected; money stays integer minor units.
 *
 * Also lists the keys a message must serialise on (emails, bookings,
 * contacts, invoices), which the batch takes in one sorted order.
 * Owns struct rd_handler and the table. */
#ifndef RD_HANDLERS_H
#define RD_HANDLERS_H

#include <jansson.h>
#include <msgpack.h>
#include <stdbool.h>
#include <stddef.h>

#include "../daemon/util.h"

#define RD_PERSON_STR_MAX 1000

enum rd_fkind {
	RD_F_STR, /* UTF-8 string, max_len bytes (0: no limit but the body's) */
	RD_F_INT, /* signed 64-bit integer */
	RD_F_BOOL,
	RD_F_ENUM,	 /* string, one of enum_values */
	RD_F_DATE,	 /* "YYYY-MM-DD", a real calendar date */
	RD_F_INSTANT,	 /* int ms since the epoch or msgpack timestamp: JSON int ms */
	RD_F_CURRENCY,	 /* ISO 4217: three upper-case letters */
	RD_F_STRLIST,	 /* array of strings (max_len each) */
	RD_F_STRMAP,	 /* map of string to string (max_len each) */
	RD_F_FIELDS,	 /* custom fields: map of string to str, number, bool or nil */
	RD_F_PERSON,	 /* a person map (SPEC 2 "Person") + optional contact_id */
	RD_F_ATTENDEE,	 /* a person + attendee_id (required), category, price */
	RD_F_ATTENDEES,	 /* array of RD_F_ATTENDEE */
	RD_F_PERSONKEYS, /* the person keys directly inside `data` (contact.upserted) */
};

enum {
	RD_FF_REQUIRED = 1u << 0, /* must be present, not nil, not "" */
	RD_FF_POSITIVE = 1u << 1, /* RD_F_INT: > 0 */
	RD_FF_NONNEG = 1u << 2,	  /* RD_F_INT: >= 0 */
	RD_FF_LOCK = 1u << 3,	  /* the value is a serialisation key (see lock_prefix) */
	RD_FF_UUID = 1u << 4,	  /* RD_F_STR: a UUID (SPEC 3: contact ids), emitted lower-case */
	RD_FF_LINE = 1u << 5,	  /* RD_F_STR: one line, no control characters (mail headers) */
};

#define RD_FIELD_KEY_MAX 128 /* custom field keys and vars keys */

struct rd_field {
	const char *key;
	enum rd_fkind kind;
	unsigned flags;
	size_t max_len;
	const char *const *enum_values; /* NULL-terminated, for RD_F_ENUM */
	const char *lock_prefix;	/* with RD_FF_LOCK: "booking", "contact"... */
};

enum {
	RD_H_MAIL = 1u << 0, /* may queue a mail */
};

struct rd_handler {
	const char *type;
	const struct rd_field *fields;
	size_t nfields;
	unsigned flags;
	/* Cross-field rules after the fields passed (e.g. "booking_id or
	 * contact_id"); may be NULL. */
	enum rd_status (*check)(const json_t *payload, struct rd_err *err);
};

/* bsearch in the sorted table; NULL for an unknown type. */
const struct rd_handler *rd_handler_find(const char *type);
/* For tests and docs: the whole table. */
const struct rd_handler *rd_handler_table(size_t *n);

/* Validate data (a msgpack map) against h and build the payload. RD_OK and
 * *out set (caller owns, json_decref), or RD_REJECT with err->msg such as
 * "data.booker.email: want str, got int" and *out NULL. */
enum rd_status rd_payload_build(const struct rd_handler *h, const msgpack_object *data,
				json_t **out, struct rd_err *err) RD_WUR;

/* Append to keys (a JSON array of strings) the serialisation keys of this
 * message: "email:<normalised email>" for every person with a valid email,
 * "contact:<id>" for every person that carries a contact_id, and
 * "<lock_prefix>:<value>" for every RD_FF_LOCK field. The org is added by
 * the caller's SQL. Duplicates are allowed (SQL sorts and dedups). */
void rd_payload_lock_keys(const struct rd_handler *h, const json_t *payload, json_t *keys);

/* SPEC 4.1 step 1: trim white space and lower-case into out (size >= len+1).
 * Returns NULL when plausible, else a short reason ("no @", "too long",
 * "contains space or control character", "empty local part", ...). */
const char *rd_email_normalise(const char *in, size_t len, char *out, size_t outsize);

#endif
