/* payload.c: the generic payload validator. Walks a handler's field table
 * (handlers.c) over a message's `data` map, rejects what breaks it with a
 * reason naming the field ("data.attendees[2].price: want int, got str"),
 * and builds the normalised JSON payload the type's SQL function applies.
 * Also the email normalisation of SPEC 4.1 and the serialisation keys.
 *
 * It does not rely on rd_decode_envelope having run: strings are checked
 * for UTF-8 again and repeated keys resolve to their first occurrence, so
 * that the fuzzer can drive it with any unpacked map. */
#include "handlers.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "decode.h"
#include "log.h"

#define ID_MAX 128

struct pctx {
	struct rd_path path;
	struct rd_err *err;
};

/* ---- small helpers ---- */

/* Out of memory is fatal (STYLE: memory ownership). */
static _Noreturn void oom(void)
{
	rd_log(LOG_CRIT, "oom", "what=jansson");
	abort();
}

/* jansson returns NULL from constructors only when out of memory */
static json_t *jnew(json_t *j)
{
	if (!j)
		oom();
	return j;
}

static void jset(json_t *obj, const char *key, json_t *val)
{
	/* key is one of ours (ASCII): only OOM can fail */
	if (json_object_set_new(obj, key, val) != 0)
		oom();
}

static void jappend(json_t *arr, json_t *val)
{
	if (json_array_append_new(arr, val) != 0)
		oom();
}

static enum rd_status rej(struct pctx *c, const char *fmt, ...) RD_PRINTF(2, 3);
static enum rd_status rej(struct pctx *c, const char *fmt, ...)
{
	char what[160];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(what, sizeof(what), fmt, ap);
	va_end(ap);
	return rd_errf(c->err, RD_REJECT, "%s: %s", c->path.len ? c->path.s : "data", what);
}

static void push(struct pctx *c, const char *key)
{
	rd_path_key(&c->path, key, strlen(key));
}

static const msgpack_object *get(const msgpack_object *map, const char *key)
{
	size_t n = strlen(key);
	for (uint32_t i = 0; i < map->via.map.size; i++) {
		const msgpack_object *k = &map->via.map.ptr[i].key;
		if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == n &&
		    memcmp(k->via.str.ptr, key, n) == 0)
			return &map->via.map.ptr[i].val;
	}
	return NULL;
}

/* SPEC 2: an absent key, nil or "" means "not given". */
static bool not_given(const msgpack_object *v)
{
	return !v || v->type == MSGPACK_OBJECT_NIL ||
	       (v->type == MSGPACK_OBJECT_STR && v->via.str.size == 0);
}

static bool is_ws(unsigned char c)
{
	return c == ' ' || c == '\t' || c == '\n' || c == '\v' || c == '\f' || c == '\r';
}

static void trim(const char **s, size_t *len)
{
	while (*len > 0 && is_ws((unsigned char)**s)) {
		(*s)++;
		(*len)--;
	}
	while (*len > 0 && is_ws((unsigned char)(*s)[*len - 1]))
		(*len)--;
}

static bool has_ctl(const char *s, size_t len)
{
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c < 0x20 || c == 0x7f)
			return true;
	}
	return false;
}

static int hexval(unsigned char c)
{
	if (c >= '0' && c <= '9')
		return c - '0';
	if (c >= 'a' && c <= 'f')
		return c - 'a' + 10;
	if (c >= 'A' && c <= 'F')
		return c - 'A' + 10;
	return -1;
}

/* 8-4-4-4-12 hex digits; out (37 bytes) gets the lower-case form. */
static bool uuid_norm(const char *s, size_t len, char out[37])
{
	if (len != 36)
		return false;
	for (size_t i = 0; i < 36; i++) {
		unsigned char c = (unsigned char)s[i];
		if (i == 8 || i == 13 || i == 18 || i == 23) {
			if (c != '-')
				return false;
			out[i] = '-';
		} else {
			int v = hexval(c);
			if (v < 0)
				return false;
			out[i] = "0123456789abcdef"[v];
		}
	}
	out[36] = '\0';
	return true;
}

static bool date_valid(const char *s, size_t len)
{
	static const int mdays[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
	int y = 0, m = 0, d = 0;

	if (len != 10 || s[4] != '-' || s[7] != '-')
		return false;
	for (size_t i = 0; i < 10; i++) {
		if (i == 4 || i == 7)
			continue;
		if (s[i] < '0' || s[i] > '9')
			return false;
		int v = s[i] - '0';
		if (i < 4)
			y = y * 10 + v;
		else if (i < 7)
			m = m * 10 + v;
		else
			d = d * 10 + v;
	}
	if (y < 1 || m < 1 || m > 12 || d < 1)
		return false;
	bool leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
	return d <= mdays[m - 1] + (m == 2 && leap);
}

/* ---- email (SPEC 4.1 step 1) ---- */

const char *rd_email_normalise(const char *in, size_t len, char *out, size_t outsize)
{
	size_t at = 0, ats = 0;

	trim(&in, &len);
	if (outsize == 0)
		return "too long";
	size_t n = len < outsize - 1 ? len : outsize - 1;
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)in[i];
		out[i] = (char)(c >= 'A' && c <= 'Z' ? c + ('a' - 'A') : c);
	}
	out[n] = '\0';

	if (len == 0)
		return "empty";
	if (len > 254 || n < len)
		return "too long";
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)in[i];
		if (c <= 0x20 || c == 0x7f)
			return "contains space or control character";
		if (c == '@') {
			ats++;
			at = i;
		}
	}
	if (ats == 0)
		return "no @";
	if (ats > 1)
		return "more than one @";
	if (at == 0)
		return "empty local part";
	if (at == len - 1)
		return "empty domain part";
	return NULL;
}

/* ---- scalars ---- */

static enum rd_status get_int(struct pctx *c, const msgpack_object *v, int64_t *out)
{
	switch (v->type) {
	case MSGPACK_OBJECT_POSITIVE_INTEGER:
		if (v->via.u64 > (uint64_t)INT64_MAX)
			return rej(c, "integer out of range");
		*out = (int64_t)v->via.u64;
		return RD_OK;
	case MSGPACK_OBJECT_NEGATIVE_INTEGER:
		*out = v->via.i64;
		return RD_OK;
	default:
		return rej(c, "want int, got %s", rd_msgpack_kind(v));
	}
}

/* A checked string: type, UTF-8 without NUL, at most max bytes (0: any). */
static enum rd_status get_str(struct pctx *c, const msgpack_object *v, size_t max)
{
	const char *why;
	if (v->type != MSGPACK_OBJECT_STR)
		return rej(c, "want str, got %s", rd_msgpack_kind(v));
	if ((why = rd_str_check(v->via.str.ptr, v->via.str.size)))
		return rej(c, "%s", why);
	if (max && v->via.str.size > max)
		return rej(c, "longer than %zu bytes", max);
	return RD_OK;
}

static enum rd_status str_json(struct pctx *c, const char *s, size_t len, json_t **out)
{
	/* checked already; jansson checks again and may only refuse on OOM */
	if (!(*out = json_stringn(s, len)))
		return rej(c, "invalid UTF-8");
	return RD_OK;
}

static enum rd_status conv_str(struct pctx *c, const struct rd_field *f, const msgpack_object *v,
			       json_t **out)
{
	enum rd_status st = get_str(c, v, f->max_len);
	if (st != RD_OK)
		return st;
	if ((f->flags & RD_FF_UUID)) {
		char u[37];
		if (!uuid_norm(v->via.str.ptr, v->via.str.size, u))
			return rej(c, "want a UUID");
		*out = jnew(json_string(u));
		return RD_OK;
	}
	if ((f->flags & RD_FF_LINE) && has_ctl(v->via.str.ptr, v->via.str.size))
		return rej(c, "contains a control character");
	return str_json(c, v->via.str.ptr, v->via.str.size, out);
}

static enum rd_status conv_int(struct pctx *c, const struct rd_field *f, const msgpack_object *v,
			       json_t **out)
{
	int64_t n = 0;
	enum rd_status st = get_int(c, v, &n);
	if (st != RD_OK)
		return st;
	if ((f->flags & RD_FF_POSITIVE) && n <= 0)
		return rej(c, "must be > 0");
	if ((f->flags & RD_FF_NONNEG) && n < 0)
		return rej(c, "must be >= 0");
	*out = jnew(json_integer((json_int_t)n));
	return RD_OK;
}

static enum rd_status conv_enum(struct pctx *c, const struct rd_field *f, const msgpack_object *v,
				json_t **out)
{
	char list[120];
	size_t n = 0;
	enum rd_status st = get_str(c, v, 0);
	if (st != RD_OK)
		return st;
	for (const char *const *e = f->enum_values; e && *e; e++) {
		size_t l = strlen(*e);
		if (v->via.str.size == l && memcmp(v->via.str.ptr, *e, l) == 0) {
			*out = jnew(json_string(*e));
			return RD_OK;
		}
	}
	list[0] = '\0';
	for (const char *const *e = f->enum_values; e && *e; e++) {
		int w = snprintf(list + n, sizeof(list) - n, "%s%s", n ? ", " : "", *e);
		if (w < 0 || (size_t)w >= sizeof(list) - n)
			break;
		n += (size_t)w;
	}
	return rej(c, "want one of %s", list);
}

static enum rd_status conv_scalar_str(struct pctx *c, const msgpack_object *v, bool ok,
				      const char *want, json_t **out)
{
	if (!ok)
		return rej(c, "%s", want);
	return str_json(c, v->via.str.ptr, v->via.str.size, out);
}

/* ---- collections ---- */

/* A key of a custom-field or vars map: non-empty UTF-8 of limited size. */
static enum rd_status map_key(struct pctx *c, const msgpack_object *k, uint32_t i)
{
	const char *why;
	if (k->type != MSGPACK_OBJECT_STR)
		return rej(c, "key #%u is %s, want str", (unsigned)i, rd_msgpack_kind(k));
	if ((why = rd_str_check(k->via.str.ptr, k->via.str.size)))
		return rej(c, "key #%u: %s", (unsigned)i, why);
	if (k->via.str.size == 0)
		return rej(c, "key #%u is empty", (unsigned)i);
	if (k->via.str.size > RD_FIELD_KEY_MAX)
		return rej(c, "key #%u longer than %d bytes", (unsigned)i, RD_FIELD_KEY_MAX);
	return RD_OK;
}

static enum rd_status set_user_key(struct pctx *c, json_t *obj, const msgpack_object *k,
				   json_t *val)
{
	if (json_object_setn_new(obj, k->via.str.ptr, k->via.str.size, val) != 0)
		return rej(c, "invalid key");
	return RD_OK;
}

/* Custom fields: str -> str | int | float | bool | nil. nil and "" are
 * "not given" and left out; an empty result is NULL. */
static enum rd_status conv_fields(struct pctx *c, const msgpack_object *v, json_t **out)
{
	enum rd_status st = RD_OK;
	json_t *o;

	if (v->type != MSGPACK_OBJECT_MAP)
		return rej(c, "want map, got %s", rd_msgpack_kind(v));
	o = jnew(json_object());
	for (uint32_t i = 0; i < v->via.map.size && st == RD_OK; i++) {
		const msgpack_object *k = &v->via.map.ptr[i].key;
		const msgpack_object *x = &v->via.map.ptr[i].val;
		const size_t save = c->path.len;
		json_t *j = NULL;
		int64_t n = 0;

		if ((st = map_key(c, k, i)) != RD_OK)
			break;
		rd_path_key(&c->path, k->via.str.ptr, k->via.str.size);
		switch (x->type) {
		case MSGPACK_OBJECT_NIL:
			break;
		case MSGPACK_OBJECT_STR:
			if (x->via.str.size == 0)
				break;
			if ((st = get_str(c, x, RD_PERSON_STR_MAX)) == RD_OK)
				st = str_json(c, x->via.str.ptr, x->via.str.size, &j);
			break;
		case MSGPACK_OBJECT_POSITIVE_INTEGER:
		case MSGPACK_OBJECT_NEGATIVE_INTEGER:
			if ((st = get_int(c, x, &n)) == RD_OK)
				j = jnew(json_integer((json_int_t)n));
			break;
		case MSGPACK_OBJECT_FLOAT32:
		case MSGPACK_OBJECT_FLOAT64:
			if (!isfinite(x->via.f64))
				st = rej(c, "not a finite number");
			else
				j = jnew(json_real(x->via.f64));
			break;
		case MSGPACK_OBJECT_BOOLEAN:
			j = json_boolean(x->via.boolean);
			break;
		default:
			st = rej(c, "want str, number, bool or nil, got %s", rd_msgpack_kind(x));
			break;
		}
		if (st == RD_OK && j)
			st = set_user_key(c, o, k, j);
		rd_path_pop(&c->path, save);
	}
	if (st != RD_OK || json_object_size(o) == 0) {
		json_decref(o);
		o = NULL;
	}
	*out = o;
	return st;
}

/* Map of str -> str (max_len each); nil values are left out. */
static enum rd_status conv_strmap(struct pctx *c, const struct rd_field *f, const msgpack_object *v,
				  json_t **out)
{
	enum rd_status st = RD_OK;
	json_t *o;

	if (v->type != MSGPACK_OBJECT_MAP)
		return rej(c, "want map, got %s", rd_msgpack_kind(v));
	o = jnew(json_object());
	for (uint32_t i = 0; i < v->via.map.size && st == RD_OK; i++) {
		const msgpack_object *k = &v->via.map.ptr[i].key;
		const msgpack_object *x = &v->via.map.ptr[i].val;
		const size_t save = c->path.len;
		json_t *j = NULL;

		if ((st = map_key(c, k, i)) != RD_OK)
			break;
		rd_path_key(&c->path, k->via.str.ptr, k->via.str.size);
		if (x->type != MSGPACK_OBJECT_NIL) {
			if ((st = get_str(c, x, f->max_len)) == RD_OK)
				st = str_json(c, x->via.str.ptr, x->via.str.size, &j);
			if (st == RD_OK)
				st = set_user_key(c, o, k, j);
		}
		rd_path_pop(&c->path, save);
	}
	if (st != RD_OK) {
		json_decref(o);
		return st;
	}
	*out = o;
	return RD_OK;
}

/* Array of str (max_len each); "" elements are left out. */
static enum rd_status conv_strlist(struct pctx *c, const struct rd_field *f,
				   const msgpack_object *v, json_t **out)
{
	enum rd_status st = RD_OK;
	json_t *a;

	if (v->type != MSGPACK_OBJECT_ARRAY)
		return rej(c, "want array, got %s", rd_msgpack_kind(v));
	a = jnew(json_array());
	for (uint32_t i = 0; i < v->via.array.size && st == RD_OK; i++) {
		const msgpack_object *x = &v->via.array.ptr[i];
		const size_t save = c->path.len;
		json_t *j = NULL;

		rd_path_index(&c->path, i);
		if ((st = get_str(c, x, f->max_len)) == RD_OK && x->via.str.size > 0)
			st = str_json(c, x->via.str.ptr, x->via.str.size, &j);
		if (st == RD_OK && j)
			jappend(a, j);
		rd_path_pop(&c->path, save);
	}
	if (st != RD_OK) {
		json_decref(a);
		return st;
	}
	*out = a;
	return RD_OK;
}

/* ---- persons ---- */

static const char *const person_keys[] = {
    "email",  "first_name", "last_name", "company", "language",	 "phone",
    "street", "zip",	    "city",	 "country", "birthdate",
};

static const struct rd_field attendee_extra[] = {
    {"attendee_id", RD_F_STR, RD_FF_REQUIRED, ID_MAX, NULL, NULL},
    {"category", RD_F_STR, 0, RD_PERSON_STR_MAX, NULL, NULL},
    {"price", RD_F_INT, RD_FF_NONNEG, 0, NULL, NULL},
};

static enum rd_status apply_fields(struct pctx *c, const struct rd_field *fields, size_t n,
				   const msgpack_object *map, json_t *out);

static void person_email(const msgpack_object *v, json_t *out)
{
	char buf[RD_PERSON_STR_MAX + 1];
	const char *s = v->via.str.ptr;
	size_t len = v->via.str.size;
	const char *why;

	trim(&s, &len);
	if (len == 0)
		return; /* only white space: not given */
	why = rd_email_normalise(s, len, buf, sizeof(buf));
	if (!why) {
		jset(out, "email", jnew(json_string(buf)));
	} else {
		jset(out, "email_invalid", jnew(json_string(why)));
		/* valid UTF-8 without NUL, trimmed at ASCII bytes only */
		jset(out, "email_given", jnew(json_stringn(s, len)));
	}
}

/* The person keys of map into out (SPEC 2 "Person"). */
static enum rd_status person_keys_into(struct pctx *c, const msgpack_object *map, json_t *out)
{
	enum rd_status st = RD_OK;
	const msgpack_object *v;

	for (size_t i = 0; i < sizeof(person_keys) / sizeof(person_keys[0]) && st == RD_OK; i++) {
		const size_t save = c->path.len;
		json_t *j = NULL;

		v = get(map, person_keys[i]);
		if (not_given(v))
			continue;
		push(c, person_keys[i]);
		if ((st = get_str(c, v, RD_PERSON_STR_MAX)) == RD_OK) {
			if (i == 0)
				person_email(v, out);
			else if ((st = str_json(c, v->via.str.ptr, v->via.str.size, &j)) == RD_OK)
				jset(out, person_keys[i], j);
		}
		rd_path_pop(&c->path, save);
	}
	v = get(map, "fields");
	if (st == RD_OK && !not_given(v)) {
		const size_t save = c->path.len;
		json_t *j = NULL;
		push(c, "fields");
		st = conv_fields(c, v, &j);
		rd_path_pop(&c->path, save);
		if (j)
			jset(out, "fields", j);
	}
	return st;
}

/* A person's contact_id: prefilled from a contact (SPEC 4.1 step 2). One
 * that is no UUID cannot name a contact; it must not reject the booking, so
 * it is left out and kept as "contact_id_invalid" for the activity log. */
static enum rd_status person_contact_id(struct pctx *c, const msgpack_object *map, json_t *out)
{
	const msgpack_object *v = get(map, "contact_id");
	const size_t save = c->path.len;
	enum rd_status st;
	char u[37];

	if (not_given(v))
		return RD_OK;
	push(c, "contact_id");
	st = get_str(c, v, ID_MAX);
	rd_path_pop(&c->path, save);
	if (st != RD_OK)
		return st;
	if (uuid_norm(v->via.str.ptr, v->via.str.size, u))
		jset(out, "contact_id", jnew(json_string(u)));
	else
		jset(out, "contact_id_invalid",
		     jnew(json_stringn(v->via.str.ptr, v->via.str.size)));
	return RD_OK;
}

static enum rd_status conv_person(struct pctx *c, const msgpack_object *v, bool attendee,
				  json_t **out)
{
	enum rd_status st;
	json_t *o;

	if (v->type != MSGPACK_OBJECT_MAP)
		return rej(c, "want map, got %s", rd_msgpack_kind(v));
	o = jnew(json_object());
	st = person_keys_into(c, v, o);
	if (st == RD_OK)
		st = person_contact_id(c, v, o);
	if (st == RD_OK && attendee)
		st = apply_fields(c, attendee_extra,
				  sizeof(attendee_extra) / sizeof(attendee_extra[0]), v, o);
	if (st != RD_OK) {
		json_decref(o);
		return st;
	}
	*out = o;
	return RD_OK;
}

struct idref {
	const char *s;
	size_t i;
};

static int idref_cmp(const void *a, const void *b)
{
	const struct idref *x = a, *y = b;
	int r = strcmp(x->s, y->s);
	if (r)
		return r;
	return (x->i > y->i) - (x->i < y->i);
}

static enum rd_status conv_attendees(struct pctx *c, const msgpack_object *v, json_t **out)
{
	enum rd_status st = RD_OK;
	struct idref *ids;
	size_t n;
	json_t *a;

	if (v->type != MSGPACK_OBJECT_ARRAY)
		return rej(c, "want array, got %s", rd_msgpack_kind(v));
	a = jnew(json_array());
	for (uint32_t i = 0; i < v->via.array.size && st == RD_OK; i++) {
		const size_t save = c->path.len;
		json_t *j = NULL;
		rd_path_index(&c->path, i);
		if ((st = conv_person(c, &v->via.array.ptr[i], true, &j)) == RD_OK)
			jappend(a, j);
		rd_path_pop(&c->path, save);
	}
	if (st != RD_OK) {
		json_decref(a);
		return st;
	}

	/* attendee_id identifies an attendee within its booking */
	n = json_array_size(a);
	ids = rd_xcalloc(n ? n : 1, sizeof(*ids));
	for (size_t i = 0; i < n; i++) {
		ids[i].s = json_string_value(json_object_get(json_array_get(a, i), "attendee_id"));
		ids[i].i = i;
	}
	qsort(ids, n, sizeof(*ids), idref_cmp);
	for (size_t i = 1; i < n && st == RD_OK; i++) {
		if (strcmp(ids[i - 1].s, ids[i].s) == 0) {
			const size_t save = c->path.len;
			rd_path_index(&c->path, ids[i].i);
			push(c, "attendee_id");
			st = rej(c, "duplicate (also in [%zu])", ids[i - 1].i);
			rd_path_pop(&c->path, save);
		}
	}
	free(ids);
	if (st != RD_OK) {
		json_decref(a);
		return st;
	}
	*out = a;
	return RD_OK;
}

/* ---- the engine ---- */

static enum rd_status convert(struct pctx *c, const struct rd_field *f, const msgpack_object *v,
			      json_t **out)
{
	int64_t ms = 0;
	enum rd_status st;

	switch (f->kind) {
	case RD_F_STR:
		return conv_str(c, f, v, out);
	case RD_F_INT:
		return conv_int(c, f, v, out);
	case RD_F_BOOL:
		if (v->type != MSGPACK_OBJECT_BOOLEAN)
			return rej(c, "want bool, got %s", rd_msgpack_kind(v));
		*out = json_boolean(v->via.boolean);
		return RD_OK;
	case RD_F_ENUM:
		return conv_enum(c, f, v, out);
	case RD_F_DATE:
		if ((st = get_str(c, v, 0)) != RD_OK)
			return st;
		return conv_scalar_str(c, v, date_valid(v->via.str.ptr, v->via.str.size),
				       "want a real date as YYYY-MM-DD", out);
	case RD_F_INSTANT:
		if ((st = rd_msgpack_instant(v, c->path.s, &ms, c->err)) != RD_OK)
			return st;
		*out = jnew(json_integer((json_int_t)ms));
		return RD_OK;
	case RD_F_CURRENCY: {
		bool ok;
		if ((st = get_str(c, v, 0)) != RD_OK)
			return st;
		ok = v->via.str.size == 3;
		for (uint32_t i = 0; ok && i < 3; i++)
			ok = v->via.str.ptr[i] >= 'A' && v->via.str.ptr[i] <= 'Z';
		return conv_scalar_str(c, v, ok, "want three upper-case letters (ISO 4217)", out);
	}
	case RD_F_STRLIST:
		return conv_strlist(c, f, v, out);
	case RD_F_STRMAP:
		return conv_strmap(c, f, v, out);
	case RD_F_FIELDS:
		return conv_fields(c, v, out);
	case RD_F_PERSON:
		return conv_person(c, v, false, out);
	case RD_F_ATTENDEE:
		return conv_person(c, v, true, out);
	case RD_F_ATTENDEES:
		return conv_attendees(c, v, out);
	case RD_F_PERSONKEYS:
		break; /* handled by apply_fields */
	}
	return rej(c, "internal: field kind %d", (int)f->kind);
}

static enum rd_status apply_fields(struct pctx *c, const struct rd_field *fields, size_t n,
				   const msgpack_object *map, json_t *out)
{
	for (size_t i = 0; i < n; i++) {
		const struct rd_field *f = &fields[i];
		const msgpack_object *v;
		const size_t save = c->path.len;
		json_t *j = NULL;
		enum rd_status st;

		if (f->kind == RD_F_PERSONKEYS) {
			if ((st = person_keys_into(c, map, out)) != RD_OK)
				return st;
			continue;
		}
		v = get(map, f->key);
		push(c, f->key);
		if (not_given(v))
			st = (f->flags & RD_FF_REQUIRED)
				 ? rd_errf(c->err, RD_REJECT, "missing key: %s", c->path.s)
				 : RD_OK;
		else
			st = convert(c, f, v, &j);
		rd_path_pop(&c->path, save);
		if (st != RD_OK)
			return st;
		if (j)
			jset(out, f->key, j);
	}
	return RD_OK;
}

enum rd_status rd_payload_build(const struct rd_handler *h, const msgpack_object *data,
				json_t **out, struct rd_err *err)
{
	struct pctx c = {.err = err};
	enum rd_status st;
	json_t *p;

	*out = NULL;
	if (!data || data->type != MSGPACK_OBJECT_MAP)
		return rd_errf(err, RD_REJECT, "data: want map, got %s",
			       data ? rd_msgpack_kind(data) : "nothing");
	push(&c, "data");
	p = jnew(json_object());
	st = apply_fields(&c, h->fields, h->nfields, data, p);
	if (st == RD_OK && h->check)
		st = h->check(p, err);
	if (st != RD_OK) {
		json_decref(p);
		return st;
	}
	*out = p;
	return RD_OK;
}

/* ---- serialisation keys ---- */

static void add_key(json_t *keys, const char *prefix, const json_t *value)
{
	if (!json_is_string(value))
		return;
	jappend(keys, jnew(json_sprintf("%s:%s", prefix, json_string_value(value))));
}

static void person_locks(const json_t *person, json_t *keys)
{
	add_key(keys, "email", json_object_get(person, "email"));
	add_key(keys, "contact", json_object_get(person, "contact_id"));
}

void rd_payload_lock_keys(const struct rd_handler *h, const json_t *payload, json_t *keys)
{
	for (size_t i = 0; i < h->nfields; i++) {
		const struct rd_field *f = &h->fields[i];
		const json_t *v = json_object_get(payload, f->key ? f->key : "");

		if ((f->flags & RD_FF_LOCK) && f->lock_prefix)
			add_key(keys, f->lock_prefix, v);
		switch (f->kind) {
		case RD_F_PERSON:
		case RD_F_ATTENDEE:
			person_locks(v, keys);
			break;
		case RD_F_ATTENDEES:
			for (size_t k = 0; k < json_array_size(v); k++)
				person_locks(json_array_get(v, k), keys);
			break;
		case RD_F_PERSONKEYS:
			add_key(keys, "email", json_object_get(payload, "email"));
			break;
		default:
			break;
		}
	}
}
