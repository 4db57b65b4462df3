/* test_decode.c: the envelope decoder (daemon/decode.c) against a table of
 * bodies, good and bad (SPEC 2 and 9), plus the shared checks.
 *
 * Bodies are written as JSON with ' for " and turned into MessagePack here.
 * What JSON cannot say is spelt as a "$marker" string (see pack_marker):
 * "$u64max", "$ts8:SEC:NSEC", "$badutf8", "$rep:N:C" (N times C), "$int:N"
 * (also as a map key, for non-string keys)... A map key "k~2" is packed as
 * "k", which is how duplicate keys are written. Raw bytes and builder
 * functions cover the rest (depth, 10,000 elements, trailing bytes). */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <jansson.h>
#include <math.h>
#include <msgpack.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "decode.h"

#define MIB (1024 * 1024)

/* ---- JSON with markers -> MessagePack (same helper in test_handlers.c) ---- */

static void pack_be(msgpack_packer *pk, uint64_t v, int n)
{
	unsigned char b[8];
	for (int i = n - 1; i >= 0; i--) {
		b[i] = (unsigned char)(v & 0xff);
		v >>= 8;
	}
	msgpack_pack_ext_body(pk, b, (size_t)n);
}

static void pack_marker(msgpack_packer *pk, const char *s)
{
	long long a, b;
	unsigned n;
	char ch;
	float f;

	if (!strcmp(s, "$u64max")) {
		msgpack_pack_uint64(pk, UINT64_MAX);
	} else if (!strcmp(s, "$i64min")) {
		msgpack_pack_int64(pk, INT64_MIN);
	} else if (!strcmp(s, "$nan")) {
		msgpack_pack_double(pk, NAN);
	} else if (!strcmp(s, "$inf")) {
		msgpack_pack_double(pk, INFINITY);
	} else if (!strcmp(s, "$badutf8")) {
		msgpack_pack_str_with_body(pk, "\xc3\x28", 2);
	} else if (!strcmp(s, "$surrogate")) {
		msgpack_pack_str_with_body(pk, "\xed\xa0\x80", 3);
	} else if (!strcmp(s, "$overlong")) {
		msgpack_pack_str_with_body(pk, "\xc0\xaf", 2);
	} else if (!strcmp(s, "$nul")) {
		msgpack_pack_str_with_body(pk, "a\0b", 3);
	} else if (sscanf(s, "$int:%lld", &a) == 1) {
		msgpack_pack_int64(pk, a);
	} else if (sscanf(s, "$f32:%f", &f) == 1) {
		msgpack_pack_float(pk, f);
	} else if (sscanf(s, "$ts4:%lld", &a) == 1) {
		msgpack_pack_ext(pk, 4, -1);
		pack_be(pk, (uint64_t)a, 4);
	} else if (sscanf(s, "$ts8:%lld:%lld", &a, &b) == 2) {
		msgpack_pack_ext(pk, 8, -1);
		pack_be(pk, ((uint64_t)b << 34) | (uint64_t)a, 8);
	} else if (sscanf(s, "$ts12:%lld:%lld", &a, &b) == 2) {
		msgpack_pack_ext(pk, 12, -1);
		pack_be(pk, (uint64_t)b, 4);
		pack_be(pk, (uint64_t)a, 8);
	} else if (sscanf(s, "$ext:%lld:%u", &a, &n) == 2) {
		char z[64] = {0};
		assert_true(n <= sizeof(z));
		msgpack_pack_ext_with_body(pk, z, n, (int8_t)a);
	} else if (sscanf(s, "$bin:%u", &n) == 1) {
		char z[64] = {0};
		assert_true(n <= sizeof(z));
		msgpack_pack_bin_with_body(pk, z, n);
	} else if (sscanf(s, "$rep:%u:%c", &n, &ch) == 2) {
		char *r = malloc(n ? n : 1);
		assert_non_null(r);
		memset(r, ch, n);
		msgpack_pack_str_with_body(pk, r, n);
		free(r);
	} else {
		fail_msg("unknown marker %s", s);
	}
}

static void pack_json(msgpack_packer *pk, const json_t *j)
{
	json_t *v;
	size_t i;

	switch (json_typeof(j)) {
	case JSON_OBJECT:
		msgpack_pack_map(pk, json_object_size(j));
		for (void *it = json_object_iter((json_t *)j); it;
		     it = json_object_iter_next((json_t *)j, it)) {
			const char *k = json_object_iter_key(it);
			const char *tilde = strchr(k, '~');
			v = json_object_iter_value(it);
			if (k[0] == '$')
				pack_marker(pk, k);
			else
				msgpack_pack_str_with_body(pk, k,
							   tilde ? (size_t)(tilde - k) : strlen(k));
			pack_json(pk, v);
		}
		break;
	case JSON_ARRAY:
		msgpack_pack_array(pk, json_array_size(j));
		for (i = 0; i < json_array_size(j); i++)
			pack_json(pk, json_array_get(j, i));
		break;
	case JSON_STRING:
		if (json_string_value(j)[0] == '$')
			pack_marker(pk, json_string_value(j));
		else
			msgpack_pack_str_with_body(pk, json_string_value(j), json_string_length(j));
		break;
	case JSON_INTEGER:
		msgpack_pack_int64(pk, json_integer_value(j));
		break;
	case JSON_REAL:
		msgpack_pack_double(pk, json_real_value(j));
		break;
	case JSON_TRUE:
		msgpack_pack_true(pk);
		break;
	case JSON_FALSE:
		msgpack_pack_false(pk);
		break;
	case JSON_NULL:
		msgpack_pack_nil(pk);
		break;
	}
}

/* ' -> " then parse; keys keep their order */
static json_t *qjson(const char *text)
{
	char *s = strdup(text);
	json_error_t e;
	json_t *j;

	assert_non_null(s);
	for (char *p = s; *p; p++)
		if (*p == '\'')
			*p = '"';
	j = json_loads(s, JSON_DECODE_ANY, &e);
	if (!j)
		fail_msg("bad test JSON (%s): %s", e.text, s);
	free(s);
	return j;
}

static void pack_qjson(msgpack_packer *pk, const char *text)
{
	json_t *j = qjson(text);
	pack_json(pk, j);
	json_decref(j);
}

/* ---- builders for what JSON is too verbose for ---- */

#define ENV "'v':1,'id':'m-1','type':'booking.created','org':'acme','at':1700000000000"

static void pack_str(msgpack_packer *pk, const char *s)
{
	msgpack_pack_str_with_body(pk, s, strlen(s));
}

/* Map header for 5 + extra keys and the five standard ones. */
static void env_begin(msgpack_packer *pk, size_t extra)
{
	msgpack_pack_map(pk, 5 + extra);
	pack_str(pk, "v");
	msgpack_pack_int(pk, 1);
	pack_str(pk, "id");
	pack_str(pk, "m-1");
	pack_str(pk, "type");
	pack_str(pk, "booking.created");
	pack_str(pk, "org");
	pack_str(pk, "acme");
	pack_str(pk, "at");
	msgpack_pack_int64(pk, 1700000000000LL);
}

/* data: {'a': [[...[]...]]} with total nesting `depth` (top map = 1) */
static void nested(msgpack_packer *pk, int depth)
{
	env_begin(pk, 1);
	pack_str(pk, "data");
	msgpack_pack_map(pk, 1);
	pack_str(pk, "a");
	for (int i = 0; i < depth - 3; i++)
		msgpack_pack_array(pk, 1);
	msgpack_pack_array(pk, 0);
}

static void depth16(msgpack_packer *pk)
{
	nested(pk, 16);
}

static void depth17(msgpack_packer *pk)
{
	nested(pk, 17);
}

/* depth 17 through maps only, innermost a scalar */
static void depth17_maps(msgpack_packer *pk)
{
	env_begin(pk, 1);
	pack_str(pk, "data");
	for (int i = 0; i < 16; i++) {
		msgpack_pack_map(pk, 1);
		pack_str(pk, "k");
	}
	msgpack_pack_int(pk, 1);
}

static void array_n(msgpack_packer *pk, unsigned n)
{
	env_begin(pk, 1);
	pack_str(pk, "data");
	msgpack_pack_map(pk, 1);
	pack_str(pk, "a");
	msgpack_pack_array(pk, n);
	for (unsigned i = 0; i < n; i++)
		msgpack_pack_int(pk, (int)(i & 0x7f));
}

static void array_10000(msgpack_packer *pk)
{
	array_n(pk, 10000);
}

static void array_10001(msgpack_packer *pk)
{
	array_n(pk, 10001);
}

static void map_n(msgpack_packer *pk, unsigned n, bool dup)
{
	char k[16];
	env_begin(pk, 1);
	pack_str(pk, "data");
	msgpack_pack_map(pk, n);
	for (unsigned i = 0; i < n; i++) {
		snprintf(k, sizeof(k), "k%u", dup && i == n - 1 ? 17u : i);
		pack_str(pk, k);
		msgpack_pack_nil(pk);
	}
}

static void map_10000(msgpack_packer *pk)
{
	map_n(pk, 10000, false);
}

static void map_10001(msgpack_packer *pk)
{
	map_n(pk, 10001, false);
}

static void map_dup_large(msgpack_packer *pk)
{
	map_n(pk, 500, true);
}

static void trailing_nil(msgpack_packer *pk)
{
	env_begin(pk, 1);
	pack_str(pk, "data");
	msgpack_pack_map(pk, 0);
	msgpack_pack_nil(pk);
}

static void two_envelopes(msgpack_packer *pk)
{
	for (int i = 0; i < 2; i++) {
		env_begin(pk, 1);
		pack_str(pk, "data");
		msgpack_pack_map(pk, 0);
	}
}

/* A str8 header in the envelope that claims one byte more than is left. */
static void truncated_str(msgpack_packer *pk)
{
	env_begin(pk, 1);
	pack_str(pk, "data");
	msgpack_pack_map(pk, 1);
	pack_str(pk, "x");
	msgpack_pack_str(pk, 10);
	msgpack_pack_str_body(pk, "123456789", 9);
}

/* ---- the table ---- */

#define HAS(bits) (0x10 | (bits))
#define H_ORG 1
#define H_ID 2

struct dcase {
	const char *name;
	const char *json;		   /* body as marked-up JSON */
	void (*build)(msgpack_packer *pk); /* or built */
	const char *raw;		   /* or raw bytes */
	size_t rawlen;
	size_t max_bytes; /* 0: 1 MiB */
	enum rd_status want;
	const char *reason; /* substring of the reason */
	bool check_at;
	long long at;
	int has; /* HAS(bits) to check has_org/has_id, 0 not to */
	const char *type;
};

#define RAW(s) .raw = s, .rawlen = sizeof(s) - 1
#define OK .want = RD_OK
#define REJ(r) .want = RD_REJECT, .reason = r

/* clang-format off */
static const struct dcase cases[] = {
	/* good */
	{"minimal", "{" ENV ",'data':{}}", OK, .check_at = true, .at = 1700000000000LL,
	 .has = HAS(H_ORG | H_ID), .type = "booking.created"},
	{"keys in any order", "{'data':{'x':1},'at':5,'org':'a.B_c-9','type':'t','id':'x','v':1}", OK,
	 .check_at = true, .at = 5, .type = "t"},
	{"unknown keys ignored",
	 "{" ENV ",'data':{'future':[1,2,{'a':null}]},'trace':{'span':'$bin:3'},'x':'$ext:7:2'}", OK},
	{"unknown type accepted here", "{'v':1,'id':'m','type':'no.such.type','org':'o','at':0,"
				       "'data':{}}",
	 OK, .type = "no.such.type"},
	{"utf-8 strings", "{" ENV ",'data':{'first_name':'Zoë','city':'Zürich','emoji':'\\ud83d\\ude00',"
			  "'Straße':'ok'}}",
	 OK},
	{"id of 128 bytes", "{'v':1,'id':'$rep:128:i','type':'t','org':'o','at':0,'data':{}}", OK},
	{"org of 64 bytes", "{'v':1,'id':'i','type':'t','org':'$rep:64:o','at':0,'data':{}}", OK},
	{"type of 64 bytes", "{'v':1,'id':'i','type':'$rep:64:t','org':'o','at':0,'data':{}}", OK},
	{"at negative int", "{'v':1,'id':'i','type':'t','org':'o','at':-86400000,'data':{}}", OK,
	 .check_at = true, .at = -86400000},
	{"at timestamp 32", "{'v':1,'id':'i','type':'t','org':'o','at':'$ts4:1700000000','data':{}}",
	 OK, .check_at = true, .at = 1700000000000LL},
	{"at timestamp 64",
	 "{'v':1,'id':'i','type':'t','org':'o','at':'$ts8:1700000000:123456789','data':{}}", OK,
	 .check_at = true, .at = 1700000000123LL},
	{"at timestamp 96 negative",
	 "{'v':1,'id':'i','type':'t','org':'o','at':'$ts12:-2:500000000','data':{}}", OK,
	 .check_at = true, .at = -1500},
	{"at timestamp 96 year 9999",
	 "{'v':1,'id':'i','type':'t','org':'o','at':'$ts12:253402300799:999999999','data':{}}", OK,
	 .check_at = true, .at = 253402300799999LL},
	{"nil values in data", "{" ENV ",'data':{'a':null,'b':''}}", OK},
	{"depth 16 accepted", .build = depth16, OK},
	{"array of 10000 accepted", .build = array_10000, OK},
	{"map of 10000 accepted", .build = map_10000, OK},

	/* not a message */
	{"empty body", RAW(""), REJ("empty body")},
	{"not msgpack: text", RAW("hello"), REJ("body: want map, got int")},
	{"not msgpack: json", RAW("{\"v\":1}"), REJ("body: want map, got int")},
	{"not msgpack: reserved byte", RAW("\xc1"), REJ("reserved byte 0xc1")},
	{"reserved byte inside", RAW("\x81\xa1x\xc1"), REJ("reserved byte 0xc1 at offset 3")},
	{"truncated map", RAW("\x83\xa1" "a\x01\xa1" "b\x02\x00"), REJ("truncated at offset 8")},
	{"map count over bytes", RAW("\x82\xa1v\x01"),
	 REJ("map of 2 entries at offset 0: more than the 3 bytes left can hold")},
	{"truncated fixext", RAW("\x81\xa1x\xd7\xff\x00"), REJ("truncated at offset 3")},
	{"truncated str", .build = truncated_str, REJ("str of 10 bytes at offset 61: more than the 9")},
	{"truncated float", RAW("\x81\xa1x\xcb\x00\x00"), REJ("truncated")},
	{"truncated count", RAW("\x81\xa1x\xdd\x00"), REJ("truncated")},
	{"top-level array", "[1,2]", REJ("body: want map, got array")},
	{"top-level str", "'x'", REJ("body: want map, got str")},
	{"top-level nil", "null", REJ("body: want map, got nil")},
	{"trailing bytes", .build = trailing_nil, REJ("trailing bytes after the message")},
	{"two messages", .build = two_envelopes, REJ("trailing bytes after the message")},
	{"oversize", "{" ENV ",'data':{}}", .max_bytes = 20, REJ("over the limit of 20")},
	{"oversize 1 MiB + 1", "{" ENV ",'data':{'x':'$rep:1048576:x'}}", REJ("over the limit")},

	/* bounds before allocation */
	{"array32 4G top-level", RAW("\xdd\xff\xff\xff\xff"), REJ("body: want map, got array")},
	{"array32 4G inside", RAW("\x81\xa1x\xdd\xff\xff\xff\xff"),
	 REJ("array of 4294967295 entries at offset 3: more than 10000")},
	{"map32 4G", RAW("\xdf\xff\xff\xff\xff"), REJ("map of 4294967295 entries")},
	{"map32 4G inside", RAW("\x81\xa1x\xdf\xff\xff\xff\xff"), REJ("more than 10000")},
	{"str32 of 4 GB", RAW("\x81\xa1x\xdb\xff\xff\xff\xff"), REJ("str of 4294967295 bytes")},
	{"bin32 of 4 GB", RAW("\x81\xa1x\xc6\xff\xff\xff\xff"), REJ("bin of 4294967295 bytes")},
	{"ext32 of 4 GB", RAW("\x81\xa1x\xc9\xff\xff\xff\xff\x01"), REJ("ext of 4294967295 bytes")},
	{"array count over bytes left", RAW("\x81\xa1x\xdd\x00\x00\x27\x10"),
	 REJ("more than the 0 bytes left can hold")},
	{"map count over bytes left", RAW("\x81\xa1x\xde\x00\x05\x01\x02\x03\x04\x05\x06\x07\x08\x09"),
	 REJ("map of 5 entries at offset 3: more than the 9 bytes left")},
	{"array of 10001", .build = array_10001, REJ("array of 10001 entries")},
	{"map of 10001", .build = map_10001, REJ("map of 10001 entries")},
	{"depth 17 rejected", .build = depth17, REJ("nesting deeper than 16")},
	{"depth 17 of maps", .build = depth17_maps, REJ("nesting deeper than 16")},

	/* v */
	{"missing v", "{'id':'i','type':'t','org':'o','at':0,'data':{}}", REJ("missing key: v"),
	 .has = HAS(H_ORG | H_ID)},
	{"v is str", "{'v':'1','id':'i','type':'t','org':'o','at':0,'data':{}}",
	 REJ("v: want int, got str")},
	{"v is float", "{'v':1.0,'id':'i','type':'t','org':'o','at':0,'data':{}}",
	 REJ("v: want int, got float")},
	{"v is 2", "{'v':2,'id':'i','type':'t','org':'o','at':0,'data':{}}",
	 REJ("v: unsupported version 2"), .has = HAS(H_ORG | H_ID)},
	{"v is 0", "{'v':0,'id':'i','type':'t','org':'o','at':0,'data':{}}",
	 REJ("v: unsupported version 0")},
	{"v is -1", "{'v':-1,'id':'i','type':'t','org':'o','at':0,'data':{}}",
	 REJ("v: unsupported version -1")},
	{"v is nil", "{'v':null,'id':'i','type':'t','org':'o','at':0,'data':{}}",
	 REJ("v: want int, got nil")},

	/* id */
	{"missing id", "{'v':1,'type':'t','org':'o','at':0,'data':{}}", REJ("missing key: id"),
	 .has = HAS(H_ORG)},
	{"id is int", "{'v':1,'id':7,'type':'t','org':'o','at':0,'data':{}}",
	 REJ("id: want str, got int"), .has = HAS(H_ORG)},
	{"id is nil", "{'v':1,'id':null,'type':'t','org':'o','at':0,'data':{}}",
	 REJ("id: want str, got nil")},
	{"id is bin", "{'v':1,'id':'$bin:3','type':'t','org':'o','at':0,'data':{}}",
	 REJ("id: want str, got bin")},
	{"id empty", "{'v':1,'id':'','type':'t','org':'o','at':0,'data':{}}", REJ("id: empty")},
	{"id of 129 bytes", "{'v':1,'id':'$rep:129:i','type':'t','org':'o','at':0,'data':{}}",
	 REJ("id: longer than 128 bytes"), .has = HAS(H_ORG)},
	{"id invalid utf-8", "{'v':1,'id':'$badutf8','type':'t','org':'o','at':0,'data':{}}",
	 REJ("id: invalid UTF-8"), .has = HAS(H_ORG)},
	{"id surrogate", "{'v':1,'id':'$surrogate','type':'t','org':'o','at':0,'data':{}}",
	 REJ("id: invalid UTF-8")},
	{"id overlong", "{'v':1,'id':'$overlong','type':'t','org':'o','at':0,'data':{}}",
	 REJ("id: invalid UTF-8")},
	{"id with NUL", "{'v':1,'id':'$nul','type':'t','org':'o','at':0,'data':{}}",
	 REJ("id: contains a NUL character")},

	/* type */
	{"missing type", "{'v':1,'id':'i','org':'o','at':0,'data':{}}", REJ("missing key: type"),
	 .has = HAS(H_ORG | H_ID)},
	{"type is int", "{'v':1,'id':'i','type':3,'org':'o','at':0,'data':{}}",
	 REJ("type: want str, got int")},
	{"type empty", "{'v':1,'id':'i','type':'','org':'o','at':0,'data':{}}", REJ("type: empty")},
	{"type of 65 bytes", "{'v':1,'id':'i','type':'$rep:65:t','org':'o','at':0,'data':{}}",
	 REJ("type: longer than 64 bytes")},
	{"type invalid utf-8", "{'v':1,'id':'i','type':'$badutf8','org':'o','at':0,'data':{}}",
	 REJ("type: invalid UTF-8")},

	/* org */
	{"missing org", "{'v':1,'id':'i','type':'t','at':0,'data':{}}", REJ("missing key: org"),
	 .has = HAS(H_ID)},
	{"org is int", "{'v':1,'id':'i','type':'t','org':1,'at':0,'data':{}}",
	 REJ("org: want str, got int"), .has = HAS(H_ID)},
	{"org with a space", "{'v':1,'id':'i','type':'t','org':'ac me','at':0,'data':{}}",
	 REJ("org: want 1..64 of [A-Za-z0-9._-]"), .has = HAS(H_ID)},
	{"org with a slash", "{'v':1,'id':'i','type':'t','org':'a/b','at':0,'data':{}}",
	 REJ("org: want 1..64")},
	{"org non-ascii", "{'v':1,'id':'i','type':'t','org':'zürich','at':0,'data':{}}",
	 REJ("org: want 1..64")},
	{"org empty", "{'v':1,'id':'i','type':'t','org':'','at':0,'data':{}}", REJ("org: want 1..64")},
	{"org of 65 bytes", "{'v':1,'id':'i','type':'t','org':'$rep:65:o','at':0,'data':{}}",
	 REJ("org: want 1..64")},

	/* at */
	{"missing at", "{'v':1,'id':'i','type':'t','org':'o','data':{}}", REJ("missing key: at"),
	 .has = HAS(H_ORG | H_ID)},
	{"at is str", "{'v':1,'id':'i','type':'t','org':'o','at':'2025-01-01','data':{}}",
	 REJ("at: want int or timestamp, got str")},
	{"at is float", "{'v':1,'id':'i','type':'t','org':'o','at':1.5,'data':{}}",
	 REJ("at: want int or timestamp, got float")},
	{"at is uint64 max", "{'v':1,'id':'i','type':'t','org':'o','at':'$u64max','data':{}}",
	 REJ("at: integer out of range")},
	{"at is int64 min", "{'v':1,'id':'i','type':'t','org':'o','at':'$i64min','data':{}}",
	 REJ("at: out of range")},
	{"at after year 9999", "{'v':1,'id':'i','type':'t','org':'o','at':253402300800000,'data':{}}",
	 REJ("at: out of range")},
	{"at other ext type", "{'v':1,'id':'i','type':'t','org':'o','at':'$ext:5:4','data':{}}",
	 REJ("at: want int or timestamp, got ext type 5")},
	{"at timestamp of 6 bytes", "{'v':1,'id':'i','type':'t','org':'o','at':'$ext:-1:6','data':{}}",
	 REJ("at: invalid timestamp of 6 bytes")},
	{"at timestamp nanoseconds", "{'v':1,'id':'i','type':'t','org':'o',"
				     "'at':'$ts8:1:1000000000','data':{}}",
	 REJ("at: invalid timestamp (nanoseconds)")},
	{"at timestamp 96 huge", "{'v':1,'id':'i','type':'t','org':'o',"
				 "'at':'$ts12:9223372036854775807:0','data':{}}",
	 REJ("at: out of range")},

	/* data */
	{"missing data", "{" ENV "}", REJ("missing key: data"), .has = HAS(H_ORG | H_ID)},
	{"data is array", "{" ENV ",'data':[]}", REJ("data: want map, got array")},
	{"data is str", "{" ENV ",'data':'x'}", REJ("data: want map, got str")},
	{"data is nil", "{" ENV ",'data':null}", REJ("data: want map, got nil")},

	/* keys, UTF-8, duplicates everywhere */
	{"non-string key at top", "{'$int:5':1," ENV ",'data':{}}", REJ("body: key #0 is int, want str")},
	{"non-string key in data", "{" ENV ",'data':{'a':1,'$int:7':'x'}}",
	 REJ("data: key #1 is int, want str")},
	{"invalid utf-8 in a top-level key", "{'$badutf8':1," ENV ",'data':{}}",
	 REJ("body: key #0: invalid UTF-8"), .has = HAS(H_ORG | H_ID)},
	{"invalid utf-8 in a data key", "{" ENV ",'data':{'$badutf8':1}}",
	 REJ("data: key #0: invalid UTF-8")},
	{"invalid utf-8 deep in data",
	 "{" ENV ",'data':{'booker':{'fields':{'x':['a','$badutf8']}}}}",
	 REJ("data.booker.fields.x[1]: invalid UTF-8")},
	{"invalid utf-8 deep key", "{" ENV ",'data':{'attendees':[{},{'$badutf8':1}]}}",
	 REJ("data.attendees[1]: key #0: invalid UTF-8")},
	{"invalid utf-8 in an unknown key", "{" ENV ",'data':{},'note':'$badutf8'}",
	 REJ("note: invalid UTF-8")},
	{"NUL deep in data", "{" ENV ",'data':{'a':{'b':'$nul'}}}",
	 REJ("data.a.b: contains a NUL character")},
	{"duplicate id", "{" ENV ",'data':{},'id~2':'m-2'}", REJ("duplicate key: id"),
	 .has = HAS(H_ORG)},
	{"duplicate org", "{" ENV ",'data':{},'org~2':'other'}", REJ("duplicate key: org"),
	 .has = HAS(H_ID)},
	{"duplicate v", "{" ENV ",'data':{},'v~2':1}", REJ("duplicate key: v")},
	{"duplicate key in data", "{" ENV ",'data':{'amount':1,'x':2,'amount~2':3}}",
	 REJ("duplicate key: data.amount")},
	{"duplicate key deep", "{" ENV ",'data':{'booker':{'email':'a@b.c','email~':'d@e.f'}}}",
	 REJ("duplicate key: data.booker.email")},
	{"duplicate key in a large map", .build = map_dup_large, REJ("duplicate key: data.k17")},
	{"long key in a path",
	 "{" ENV ",'data':{'$rep:200:k':{'$rep:200:q':'$badutf8'}}}", REJ("...: invalid UTF-8")},
};
/* clang-format on */

#define NCASES (sizeof(cases) / sizeof(cases[0]))

static void run_case(void **state)
{
	const struct dcase *c = *state;
	msgpack_sbuffer sb;
	msgpack_packer pk;
	struct rd_envelope env;
	struct rd_err err = {.st = RD_OK, .msg = ""};
	const char *buf;
	size_t len;
	enum rd_status st;

	msgpack_sbuffer_init(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	if (c->json)
		pack_qjson(&pk, c->json);
	else if (c->build)
		c->build(&pk);
	if (c->raw) {
		buf = c->raw;
		len = c->rawlen;
	} else {
		buf = sb.data;
		len = sb.size;
	}

	st = rd_decode_envelope(buf, len, c->max_bytes ? c->max_bytes : MIB, &env, &err);
	/* keep what is checked, free, then assert (a failure longjmps) */
	const bool has_org = env.has_org, has_id = env.has_id;
	const bool data_map = env.data && env.data->type == MSGPACK_OBJECT_MAP;
	const int64_t at = env.at_ms;
	char type[sizeof(env.type)];
	memcpy(type, env.type, sizeof(type));
	if (has_id)
		assert_true(strlen(env.id) >= 1);
	rd_envelope_free(&env);
	rd_envelope_free(&env); /* idempotent */
	msgpack_sbuffer_destroy(&sb);

	if (getenv("RD_TEST_VERBOSE"))
		print_message("%-36s %s %s\n", c->name, rd_status_name(st), err.msg);
	if (st != c->want)
		fail_msg("%s: got %s (%s), want %s", c->name, rd_status_name(st), err.msg,
			 rd_status_name(c->want));
	if (st == RD_OK) {
		assert_true(has_org && has_id && data_map);
		if (c->check_at)
			assert_int_equal(at, c->at);
		if (c->type)
			assert_string_equal(type, c->type);
	} else {
		assert_int_equal(err.st, st);
		if (c->reason && !strstr(err.msg, c->reason))
			fail_msg("%s: reason \"%s\" lacks \"%s\"", c->name, err.msg, c->reason);
		/* a reason is one line of valid UTF-8 */
		assert_true(rd_utf8_valid(err.msg, strlen(err.msg)));
		assert_null(strchr(err.msg, '\n'));
	}
	if (c->has) {
		assert_int_equal(has_org, (c->has & H_ORG) != 0);
		assert_int_equal(has_id, (c->has & H_ID) != 0);
	}
}

/* ---- direct tests ---- */

static void test_prescan_direct(void **state)
{
	struct rd_err err;
	static const char ok[] = "\x81\xa1x\x90"; /* {'x': []} */
	(void)state;

	assert_int_equal(rd_decode_prescan(ok, 4, 100, &err), RD_OK);
	assert_int_equal(rd_decode_prescan(ok, 4, 3, &err), RD_REJECT);
	assert_int_equal(rd_decode_prescan(NULL, 0, 100, &err), RD_REJECT);
	assert_string_equal(err.msg, "empty body");
	assert_int_equal(rd_decode_prescan("\x80", 1, 100, &err), RD_OK);
	assert_int_equal(rd_decode_prescan("\x80\x80", 2, 100, &err), RD_REJECT);
	/* every byte as the only one: never more than a reject */
	for (unsigned b = 0; b < 256; b++) {
		char one = (char)b;
		enum rd_status st = rd_decode_prescan(&one, 1, 100, &err);
		assert_int_equal(st, b == 0x80 ? RD_OK : RD_REJECT);
	}
}

static void test_kind(void **state)
{
	msgpack_object o;
	(void)state;
	memset(&o, 0, sizeof(o));
	static const struct {
		msgpack_object_type t;
		const char *name;
	} k[] = {
	    {MSGPACK_OBJECT_NIL, "nil"},
	    {MSGPACK_OBJECT_BOOLEAN, "bool"},
	    {MSGPACK_OBJECT_POSITIVE_INTEGER, "int"},
	    {MSGPACK_OBJECT_NEGATIVE_INTEGER, "int"},
	    {MSGPACK_OBJECT_FLOAT32, "float"},
	    {MSGPACK_OBJECT_FLOAT64, "float"},
	    {MSGPACK_OBJECT_STR, "str"},
	    {MSGPACK_OBJECT_BIN, "bin"},
	    {MSGPACK_OBJECT_ARRAY, "array"},
	    {MSGPACK_OBJECT_MAP, "map"},
	    {MSGPACK_OBJECT_EXT, "ext"},
	};
	for (size_t i = 0; i < sizeof(k) / sizeof(k[0]); i++) {
		o.type = k[i].t;
		assert_string_equal(rd_msgpack_kind(&o), k[i].name);
	}
}

static void test_checks(void **state)
{
	(void)state;
	assert_true(rd_org_valid("acme", 4));
	assert_true(rd_org_valid("A.b_c-9", 7));
	assert_false(rd_org_valid("", 0));
	assert_false(rd_org_valid("a b", 3));
	assert_false(rd_org_valid("a\0b", 3));
	assert_true(rd_utf8_valid("", 0));
	assert_true(rd_utf8_valid("Zoë", strlen("Zoë")));
	assert_false(rd_utf8_valid("\xff", 1));
	assert_true(rd_utf8_valid("a\0b", 3));	  /* NUL is UTF-8 ... */
	assert_non_null(rd_str_check("a\0b", 3)); /* ... but not for us */
	assert_null(rd_str_check("abc", 3));
	assert_string_equal(rd_str_check("\xc3", 1), "invalid UTF-8");
}

static void test_path(void **state)
{
	struct rd_path p = {.len = 0};
	char big[300];
	(void)state;

	rd_path_key(&p, "data", 4);
	rd_path_key(&p, "attendees", 9);
	rd_path_index(&p, 2);
	rd_path_key(&p, "price", 5);
	assert_string_equal(p.s, "data.attendees[2].price");
	rd_path_pop(&p, 4);
	assert_string_equal(p.s, "data");
	rd_path_key(&p, "a\nb", 3);
	assert_string_equal(p.s, "data.a?b");
	rd_path_pop(&p, 4);
	rd_path_key(&p, "\xff", 1);
	assert_string_equal(p.s, "data.?");
	rd_path_pop(&p, 4);
	/* long keys are shortened on a character boundary; the path stays short */
	for (size_t i = 0; i + 1 < sizeof(big); i += 2)
		memcpy(big + i, "\xc3\xa9", 2); /* é */
	for (int i = 0; i < 10; i++)
		rd_path_key(&p, big, sizeof(big));
	assert_true(p.len < sizeof(p.s));
	assert_true(rd_utf8_valid(p.s, p.len));
	assert_non_null(strstr(p.s, "..."));
}

int main(void)
{
	static struct CMUnitTest tests[NCASES + 4];
	for (size_t i = 0; i < NCASES; i++) {
		tests[i].name = cases[i].name;
		tests[i].test_func = run_case;
		tests[i].initial_state = (void *)&cases[i];
	}
	tests[NCASES] = (struct CMUnitTest)cmocka_unit_test(test_prescan_direct);
	tests[NCASES + 1] = (struct CMUnitTest)cmocka_unit_test(test_kind);
	tests[NCASES + 2] = (struct CMUnitTest)cmocka_unit_test(test_checks);
	tests[NCASES + 3] = (struct CMUnitTest)cmocka_unit_test(test_path);
	return cmocka_run_group_tests_name("decode", tests, NULL, NULL);
}
