/* decode.c: AMQP body -> checked envelope (SPEC 2).
 *
 * rd_decode_prescan walks the raw MessagePack bytes first, iteratively and
 * without allocating, so that msgpack-c (which allocates from a container
 * header's count before it has read a single element) only ever sees a body
 * whose every count is real: after a successful prescan the unpacked object
 * costs at most a small multiple of the body's size. rd_decode_envelope then
 * unpacks and checks the envelope keys, and walks the whole object once more
 * for string keys, UTF-8 and duplicate keys. Reasons name the key and are
 * always short, one line and valid UTF-8 (they end up in an AMQP header and
 * in a PostgreSQL text column). */
#include "decode.h"

#include <stdlib.h>
#include <string.h>
#include <unistr.h>

#include "log.h"

/* ---- paths for reasons ---- */

#define PATH_SEG_MAX 32 /* bytes of one key kept in a path */

static void path_append(struct rd_path *p, const char *seg, size_t seglen)
{
	const size_t cap = sizeof(p->s) - 1;

	if (p->len + seglen <= cap - 3) {
		memcpy(p->s + p->len, seg, seglen);
		p->len += seglen;
	} else if (p->len + 3 <= cap &&
		   !(p->len >= 3 && memcmp(p->s + p->len - 3, "...", 3) == 0)) {
		/* no room: mark the cut once; rd_path_pop removes it again */
		memcpy(p->s + p->len, "...", 3);
		p->len += 3;
	}
	p->s[p->len] = '\0';
}

void rd_path_key(struct rd_path *p, const char *key, size_t keylen)
{
	char seg[1 + PATH_SEG_MAX + 4];
	size_t n = 0;

	if (p->len > 0)
		seg[n++] = '.';
	if (keylen == 0) {
		memcpy(seg + n, "\"\"", 2);
		n += 2;
	} else if (!rd_utf8_valid(key, keylen)) {
		seg[n++] = '?';
	} else {
		size_t cut = keylen;
		if (cut > PATH_SEG_MAX) {
			cut = PATH_SEG_MAX;
			/* never split a UTF-8 sequence */
			while (cut > 0 && ((unsigned char)key[cut] & 0xc0) == 0x80)
				cut--;
		}
		for (size_t i = 0; i < cut; i++) {
			unsigned char c = (unsigned char)key[i];
			seg[n++] = (c < 0x20 || c == 0x7f) ? '?' : (char)c;
		}
		if (cut < keylen) {
			memcpy(seg + n, "...", 3);
			n += 3;
		}
	}
	path_append(p, seg, n);
}

void rd_path_index(struct rd_path *p, size_t i)
{
	char seg[32];
	int n = snprintf(seg, sizeof(seg), "[%zu]", i);
	if (n > 0)
		path_append(p, seg, (size_t)n);
}

void rd_path_pop(struct rd_path *p, size_t len)
{
	if (len < p->len) {
		p->len = len;
		p->s[len] = '\0';
	}
}

static const char *path_name(const struct rd_path *p)
{
	return p->len ? p->s : "body";
}

/* ---- shared checks ---- */

bool rd_utf8_valid(const char *s, size_t len)
{
	return len == 0 || u8_check((const uint8_t *)s, len) == NULL;
}

const char *rd_str_check(const char *s, size_t len)
{
	if (len == 0)
		return NULL;
	if (!rd_utf8_valid(s, len))
		return "invalid UTF-8";
	if (memchr(s, '\0', len))
		return "contains a NUL character";
	return NULL;
}

bool rd_org_valid(const char *s, size_t len)
{
	if (len < 1 || len > RD_ORG_MAX)
		return false;
	for (size_t i = 0; i < len; i++) {
		unsigned char c = (unsigned char)s[i];
		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
		      c == '.' || c == '_' || c == '-'))
			return false;
	}
	return true;
}

const char *rd_msgpack_kind(const msgpack_object *o)
{
	switch (o->type) {
	case MSGPACK_OBJECT_NIL:
		return "nil";
	case MSGPACK_OBJECT_BOOLEAN:
		return "bool";
	case MSGPACK_OBJECT_POSITIVE_INTEGER:
	case MSGPACK_OBJECT_NEGATIVE_INTEGER:
		return "int";
	case MSGPACK_OBJECT_FLOAT32:
	case MSGPACK_OBJECT_FLOAT64:
		return "float";
	case MSGPACK_OBJECT_STR:
		return "str";
	case MSGPACK_OBJECT_BIN:
		return "bin";
	case MSGPACK_OBJECT_ARRAY:
		return "array";
	case MSGPACK_OBJECT_MAP:
		return "map";
	case MSGPACK_OBJECT_EXT:
		return "ext";
	}
	return "unknown";
}

enum rd_status rd_msgpack_instant(const msgpack_object *o, const char *path, int64_t *ms,
				  struct rd_err *err)
{
	int64_t v;

	switch (o->type) {
	case MSGPACK_OBJECT_POSITIVE_INTEGER:
		if (o->via.u64 > (uint64_t)INT64_MAX)
			return rd_errf(err, RD_REJECT, "%s: integer out of range", path);
		v = (int64_t)o->via.u64;
		break;
	case MSGPACK_OBJECT_NEGATIVE_INTEGER:
		v = o->via.i64;
		break;
	case MSGPACK_OBJECT_EXT: {
		msgpack_timestamp ts;
		if (o->via.ext.type != -1)
			return rd_errf(err, RD_REJECT, "%s: want int or timestamp, got ext type %d",
				       path, (int)o->via.ext.type);
		if (!msgpack_object_to_timestamp(o, &ts))
			return rd_errf(err, RD_REJECT, "%s: invalid timestamp of %u bytes", path,
				       (unsigned)o->via.ext.size);
		if (ts.tv_nsec >= 1000000000u)
			return rd_errf(err, RD_REJECT, "%s: invalid timestamp (nanoseconds)", path);
		/* range first: the multiplication below cannot overflow */
		if (ts.tv_sec < RD_INSTANT_MIN_MS / 1000 || ts.tv_sec > RD_INSTANT_MAX_MS / 1000)
			return rd_errf(err, RD_REJECT, "%s: out of range (years 0001..9999)", path);
		v = ts.tv_sec * 1000 + (int64_t)(ts.tv_nsec / 1000000u);
		break;
	}
	default:
		return rd_errf(err, RD_REJECT, "%s: want int or timestamp, got %s", path,
			       rd_msgpack_kind(o));
	}
	if (v < RD_INSTANT_MIN_MS || v > RD_INSTANT_MAX_MS)
		return rd_errf(err, RD_REJECT, "%s: out of range (years 0001..9999)", path);
	*ms = v;
	return RD_OK;
}

/* ---- prescan ---- */

/* What a header byte starts, for "want map, got ..." */
static const char *hdr_kind(unsigned char b)
{
	if (b <= 0x7f || b >= 0xe0)
		return "int";
	if (b <= 0x8f)
		return "map";
	if (b <= 0x9f)
		return "array";
	if (b <= 0xbf)
		return "str";
	switch (b) {
	case 0xc0:
		return "nil";
	case 0xc1:
		return "reserved byte 0xc1";
	case 0xc2:
	case 0xc3:
		return "bool";
	case 0xc4:
	case 0xc5:
	case 0xc6:
		return "bin";
	case 0xc7:
	case 0xc8:
	case 0xc9:
	case 0xd4:
	case 0xd5:
	case 0xd6:
	case 0xd7:
	case 0xd8:
		return "ext";
	case 0xca:
	case 0xcb:
		return "float";
	case 0xd9:
	case 0xda:
	case 0xdb:
		return "str";
	case 0xdc:
	case 0xdd:
		return "array";
	case 0xde:
	case 0xdf:
		return "map";
	default:
		return "int"; /* 0xcc..0xd3 */
	}
}

static uint64_t load_be(const unsigned char *p, size_t n)
{
	uint64_t v = 0;
	for (size_t i = 0; i < n; i++)
		v = (v << 8) | p[i];
	return v;
}

enum rd_status rd_decode_prescan(const void *buf, size_t len, size_t max_bytes, struct rd_err *err)
{
	const unsigned char *p = buf;
	uint32_t left[RD_MAX_DEPTH]; /* items (keys and values) still due per open container */
	size_t depth = 0;
	size_t pos = 0;

	if (!buf || len == 0)
		return rd_errf(err, RD_REJECT, "empty body");
	if (len > max_bytes)
		return rd_errf(err, RD_REJECT, "body: %zu bytes, over the limit of %zu", len,
			       max_bytes);
	if (p[0] == 0xc1)
		return rd_errf(err, RD_REJECT, "not msgpack: reserved byte 0xc1 at offset 0");
	if (strcmp(hdr_kind(p[0]), "map") != 0)
		return rd_errf(err, RD_REJECT, "body: want map, got %s", hdr_kind(p[0]));

	for (;;) {
		const size_t at = pos; /* offset of this object, for reasons */
		size_t lenbytes = 0;   /* str/bin/ext: size of the length field */
		size_t fixed = 0;      /* scalar: payload bytes after the header byte */
		size_t extra = 0;      /* ext: the type byte */
		size_t cntbytes = 0;   /* array16/32, map16/32: size of the count field */
		uint64_t n = 0;	       /* str/bin/ext: bytes of data */
		bool var = false;      /* n applies */
		uint64_t count = 0;
		unsigned per = 0; /* container: 1 item per element, 2 per map entry */
		const char *what = NULL;
		unsigned char b;

		if (pos >= len)
			return rd_errf(err, RD_REJECT, "not msgpack: truncated at offset %zu", pos);
		b = p[pos++];
		if (b <= 0x7f || b >= 0xe0) {
			/* fixint */
		} else if (b <= 0x8f) {
			count = b & 0x0fu;
			per = 2;
		} else if (b <= 0x9f) {
			count = b & 0x0fu;
			per = 1;
		} else if (b <= 0xbf) {
			what = "str";
			n = b & 0x1fu;
			var = true;
		} else {
			switch (b) {
			case 0xc0:
			case 0xc2:
			case 0xc3:
				break;
			case 0xc1:
				return rd_errf(err, RD_REJECT,
					       "not msgpack: reserved byte 0xc1 at offset %zu", at);
			case 0xc4:
			case 0xc5:
			case 0xc6:
				what = "bin";
				lenbytes = (size_t)1 << (b - 0xc4);
				break;
			case 0xc7:
			case 0xc8:
			case 0xc9:
				what = "ext";
				lenbytes = (size_t)1 << (b - 0xc7);
				extra = 1;
				break;
			case 0xca:
				fixed = 4;
				break;
			case 0xcb:
				fixed = 8;
				break;
			case 0xcc:
			case 0xcd:
			case 0xce:
			case 0xcf:
				fixed = (size_t)1 << (b - 0xcc);
				break;
			case 0xd0:
			case 0xd1:
			case 0xd2:
			case 0xd3:
				fixed = (size_t)1 << (b - 0xd0);
				break;
			case 0xd4:
			case 0xd5:
			case 0xd6:
			case 0xd7:
			case 0xd8:
				fixed = 1 + ((size_t)1 << (b - 0xd4));
				break;
			case 0xd9:
			case 0xda:
			case 0xdb:
				what = "str";
				lenbytes = (size_t)1 << (b - 0xd9);
				break;
			case 0xdc:
			case 0xdd:
				per = 1;
				cntbytes = b == 0xdc ? 2 : 4;
				break;
			default: /* 0xde, 0xdf */
				per = 2;
				cntbytes = b == 0xde ? 2 : 4;
				break;
			}
		}

		if (lenbytes) {
			if (len - pos < lenbytes)
				return rd_errf(err, RD_REJECT,
					       "not msgpack: truncated at offset %zu", at);
			n = load_be(p + pos, lenbytes);
			pos += lenbytes;
			var = true;
		}
		if (var) {
			if (n + extra > len - pos)
				return rd_errf(err, RD_REJECT,
					       "%s of %llu bytes at offset %zu: more than the %zu "
					       "bytes left",
					       what, (unsigned long long)n, at, len - pos);
			pos += (size_t)n + extra;
		} else if (fixed) {
			if (len - pos < fixed)
				return rd_errf(err, RD_REJECT,
					       "not msgpack: truncated at offset %zu", at);
			pos += fixed;
		}

		if (per) {
			const char *ckind = per == 2 ? "map" : "array";
			if (cntbytes) {
				if (len - pos < cntbytes)
					return rd_errf(err, RD_REJECT,
						       "not msgpack: truncated at offset %zu", at);
				count = load_be(p + pos, cntbytes);
				pos += cntbytes;
			}
			if (depth >= RD_MAX_DEPTH)
				return rd_errf(err, RD_REJECT,
					       "nesting deeper than %d at offset %zu", RD_MAX_DEPTH,
					       at);
			if (count > RD_MAX_ELEMENTS)
				return rd_errf(err, RD_REJECT,
					       "%s of %llu entries at offset %zu: more than %d",
					       ckind, (unsigned long long)count, at,
					       RD_MAX_ELEMENTS);
			/* each element takes at least one byte */
			if (count * per > len - pos)
				return rd_errf(
				    err, RD_REJECT,
				    "%s of %llu entries at offset %zu: more than the %zu "
				    "bytes left can hold",
				    ckind, (unsigned long long)count, at, len - pos);
			if (count > 0) {
				left[depth++] = (uint32_t)(count * per);
				continue;
			}
		}

		/* One object is complete: count it against the open containers,
		 * closing those it completes. */
		while (depth > 0 && --left[depth - 1] == 0)
			depth--;
		if (depth == 0)
			break;
	}
	if (pos < len)
		return rd_errf(err, RD_REJECT,
			       "trailing bytes after the message (%zu bytes at offset %zu)",
			       len - pos, pos);
	return RD_OK;
}

/* ---- envelope ---- */

static bool key_is(const msgpack_object *k, const char *name)
{
	size_t n = strlen(name);
	return k->type == MSGPACK_OBJECT_STR && k->via.str.size == n &&
	       memcmp(k->via.str.ptr, name, n) == 0;
}

/* First value under key name in map, and how often the key occurs. */
static const msgpack_object *find_key(const msgpack_object *map, const char *name, unsigned *count)
{
	const msgpack_object *v = NULL;
	*count = 0;
	for (uint32_t i = 0; i < map->via.map.size; i++) {
		if (key_is(&map->via.map.ptr[i].key, name)) {
			if (!v)
				v = &map->via.map.ptr[i].val;
			(*count)++;
		}
	}
	return v;
}

static enum rd_status check_id(const msgpack_object *o, struct rd_err *err)
{
	const char *why;
	if (o->type != MSGPACK_OBJECT_STR)
		return rd_errf(err, RD_REJECT, "id: want str, got %s", rd_msgpack_kind(o));
	if (o->via.str.size == 0)
		return rd_errf(err, RD_REJECT, "id: empty");
	if (o->via.str.size > RD_ID_MAX)
		return rd_errf(err, RD_REJECT, "id: longer than %d bytes", RD_ID_MAX);
	if ((why = rd_str_check(o->via.str.ptr, o->via.str.size)))
		return rd_errf(err, RD_REJECT, "id: %s", why);
	return RD_OK;
}

static enum rd_status check_org(const msgpack_object *o, struct rd_err *err)
{
	if (o->type != MSGPACK_OBJECT_STR)
		return rd_errf(err, RD_REJECT, "org: want str, got %s", rd_msgpack_kind(o));
	if (!rd_org_valid(o->via.str.ptr, o->via.str.size))
		return rd_errf(err, RD_REJECT, "org: want 1..%d of [A-Za-z0-9._-]", RD_ORG_MAX);
	return RD_OK;
}

static enum rd_status check_type(const msgpack_object *o, struct rd_err *err)
{
	const char *why;
	if (o->type != MSGPACK_OBJECT_STR)
		return rd_errf(err, RD_REJECT, "type: want str, got %s", rd_msgpack_kind(o));
	if (o->via.str.size == 0)
		return rd_errf(err, RD_REJECT, "type: empty");
	if (o->via.str.size > RD_TYPE_MAX)
		return rd_errf(err, RD_REJECT, "type: longer than %d bytes", RD_TYPE_MAX);
	if ((why = rd_str_check(o->via.str.ptr, o->via.str.size)))
		return rd_errf(err, RD_REJECT, "type: %s", why);
	return RD_OK;
}

static enum rd_status check_v(const msgpack_object *o, struct rd_err *err)
{
	if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
		if (o->via.u64 == 1)
			return RD_OK;
		return rd_errf(err, RD_REJECT, "v: unsupported version %llu",
			       (unsigned long long)o->via.u64);
	}
	if (o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER)
		return rd_errf(err, RD_REJECT, "v: unsupported version %lld",
			       (long long)o->via.i64);
	return rd_errf(err, RD_REJECT, "v: want int, got %s", rd_msgpack_kind(o));
}

static int str_obj_cmp(const void *a, const void *b)
{
	const msgpack_object *x = *(const msgpack_object *const *)a;
	const msgpack_object *y = *(const msgpack_object *const *)b;
	uint32_t n = x->via.str.size < y->via.str.size ? x->via.str.size : y->via.str.size;
	int c = n ? memcmp(x->via.str.ptr, y->via.str.ptr, n) : 0;
	if (c)
		return c;
	return (x->via.str.size > y->via.str.size) - (x->via.str.size < y->via.str.size);
}

/* A key that occurs twice in map (all keys are strings), or NULL. Small maps
 * are compared pairwise, larger ones sorted (at most RD_MAX_ELEMENTS keys). */
static const msgpack_object *dup_key(const msgpack_object *map)
{
	const uint32_t n = map->via.map.size;
	const msgpack_object *found = NULL;

	if (n < 2)
		return NULL;
	if (n <= 16) {
		for (uint32_t i = 0; i < n && !found; i++)
			for (uint32_t j = i + 1; j < n && !found; j++) {
				const msgpack_object *a = &map->via.map.ptr[i].key;
				const msgpack_object *b = &map->via.map.ptr[j].key;
				if (str_obj_cmp(&a, &b) == 0)
					found = a;
			}
		return found;
	}
	const msgpack_object **keys = rd_xmalloc(n * sizeof(*keys));
	for (uint32_t i = 0; i < n; i++)
		keys[i] = &map->via.map.ptr[i].key;
	qsort(keys, n, sizeof(*keys), str_obj_cmp);
	for (uint32_t i = 1; i < n && !found; i++)
		if (str_obj_cmp(&keys[i - 1], &keys[i]) == 0)
			found = keys[i];
	free(keys);
	return found;
}

/* Every string is UTF-8 without NUL, every map key a string, no map repeats
 * a key. Recursion is bounded by the prescan's depth limit. */
static enum rd_status walk(const msgpack_object *o, struct rd_path *path, struct rd_err *err)
{
	const size_t save = path->len;
	const char *why;

	switch (o->type) {
	case MSGPACK_OBJECT_STR:
		if ((why = rd_str_check(o->via.str.ptr, o->via.str.size)))
			return rd_errf(err, RD_REJECT, "%s: %s", path_name(path), why);
		return RD_OK;
	case MSGPACK_OBJECT_ARRAY:
		for (uint32_t i = 0; i < o->via.array.size; i++) {
			rd_path_index(path, i);
			enum rd_status st = walk(&o->via.array.ptr[i], path, err);
			rd_path_pop(path, save);
			if (st != RD_OK)
				return st;
		}
		return RD_OK;
	case MSGPACK_OBJECT_MAP: {
		const msgpack_object *dup;
		for (uint32_t i = 0; i < o->via.map.size; i++) {
			const msgpack_object *k = &o->via.map.ptr[i].key;
			if (k->type != MSGPACK_OBJECT_STR)
				return rd_errf(err, RD_REJECT, "%s: key #%u is %s, want str",
					       path_name(path), (unsigned)i, rd_msgpack_kind(k));
			if ((why = rd_str_check(k->via.str.ptr, k->via.str.size)))
				return rd_errf(err, RD_REJECT, "%s: key #%u: %s", path_name(path),
					       (unsigned)i, why);
		}
		if ((dup = dup_key(o))) {
			rd_path_key(path, dup->via.str.ptr, dup->via.str.size);
			rd_errf(err, RD_REJECT, "duplicate key: %s", path->s);
			rd_path_pop(path, save);
			return RD_REJECT;
		}
		for (uint32_t i = 0; i < o->via.map.size; i++) {
			const msgpack_object_kv *kv = &o->via.map.ptr[i];
			rd_path_key(path, kv->key.via.str.ptr, kv->key.via.str.size);
			enum rd_status st = walk(&kv->val, path, err);
			rd_path_pop(path, save);
			if (st != RD_OK)
				return st;
		}
		return RD_OK;
	}
	default:
		return RD_OK;
	}
}

static void copy_str(char *dst, const msgpack_object *o)
{
	memcpy(dst, o->via.str.ptr, o->via.str.size);
	dst[o->via.str.size] = '\0';
}

enum rd_status rd_decode_envelope(const void *buf, size_t len, size_t max_bytes,
				  struct rd_envelope *env, struct rd_err *err)
{
	const msgpack_object *root, *o;
	struct rd_path path = {.len = 0};
	msgpack_unpack_return ur;
	size_t off = 0;
	unsigned n;
	enum rd_status st;

	memset(env, 0, sizeof(*env));
	msgpack_unpacked_init(&env->unp);
	env->unp_init = true;

	if ((st = rd_decode_prescan(buf, len, max_bytes, err)) != RD_OK)
		return st;
	ur = msgpack_unpack_next(&env->unp, buf, len, &off);
	if (ur == MSGPACK_UNPACK_NOMEM_ERROR) {
		/* the prescan bounds the unpacked size: this is a real OOM */
		rd_log(LOG_CRIT, "oom", "what=msgpack_unpack bytes=%zu", len);
		abort();
	}
	if (ur != MSGPACK_UNPACK_SUCCESS || off != len)
		return rd_errf(err, RD_REJECT, "not msgpack: unpack failed (%d)", (int)ur);
	root = &env->unp.data;
	if (root->type != MSGPACK_OBJECT_MAP)
		return rd_errf(err, RD_REJECT, "body: want map, got %s", rd_msgpack_kind(root));

	/* (org, id) first, so that any later rejection can be recorded against
	 * them; a repeated key leaves them unknown. */
	if ((o = find_key(root, "org", &n)) && n == 1 && check_org(o, NULL) == RD_OK) {
		copy_str(env->org, o);
		env->has_org = true;
	}
	if ((o = find_key(root, "id", &n)) && n == 1 && check_id(o, NULL) == RD_OK) {
		copy_str(env->id, o);
		env->has_id = true;
	}

	if (!(o = find_key(root, "v", &n)))
		return rd_errf(err, RD_REJECT, "missing key: v");
	if ((st = check_v(o, err)) != RD_OK)
		return st;
	if (!(o = find_key(root, "id", &n)))
		return rd_errf(err, RD_REJECT, "missing key: id");
	if ((st = check_id(o, err)) != RD_OK)
		return st;
	if (!(o = find_key(root, "type", &n)))
		return rd_errf(err, RD_REJECT, "missing key: type");
	if ((st = check_type(o, err)) != RD_OK)
		return st;
	copy_str(env->type, o);
	if (!(o = find_key(root, "org", &n)))
		return rd_errf(err, RD_REJECT, "missing key: org");
	if ((st = check_org(o, err)) != RD_OK)
		return st;
	if (!(o = find_key(root, "at", &n)))
		return rd_errf(err, RD_REJECT, "missing key: at");
	if ((st = rd_msgpack_instant(o, "at", &env->at_ms, err)) != RD_OK)
		return st;
	if (!(o = find_key(root, "data", &n)))
		return rd_errf(err, RD_REJECT, "missing key: data");
	if (o->type != MSGPACK_OBJECT_MAP)
		return rd_errf(err, RD_REJECT, "data: want map, got %s", rd_msgpack_kind(o));
	env->data = o;

	/* keys, UTF-8 and duplicates everywhere, unknown keys included */
	return walk(root, &path, err);
}

void rd_envelope_free(struct rd_envelope *env)
{
	if (!env)
		return;
	if (env->unp_init)
		msgpack_unpacked_destroy(&env->unp);
	env->unp_init = false;
	env->data = NULL;
}
