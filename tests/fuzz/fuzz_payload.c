/* fuzz_payload.c: libFuzzer target for the payload validator alone. The
 * first byte picks a handler of the table; the rest is a MessagePack `data`
 * map, bounded by rd_decode_prescan (as in the daemon) but not checked by
 * the envelope decoder, so the validator meets invalid UTF-8, repeated and
 * non-string keys itself. Checks: a payload only on RD_OK, a one-line UTF-8
 * reason otherwise, lock keys computable and the payload serialisable. */
#include <jansson.h>
#include <msgpack.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "decode.h"
#include "handlers.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const struct rd_handler *table, *h;
	struct rd_err err = {.st = RD_OK, .msg = ""};
	msgpack_unpacked unp;
	json_t *payload = NULL;
	size_t n, off = 0;
	enum rd_status st;

	if (size < 2)
		return 0;
	table = rd_handler_table(&n);
	h = &table[data[0] % n];
	data++;
	size--;
	if (rd_decode_prescan(data, size, 1024 * 1024, &err) != RD_OK)
		return 0;

	msgpack_unpacked_init(&unp);
	if (msgpack_unpack_next(&unp, (const char *)data, size, &off) != MSGPACK_UNPACK_SUCCESS)
		abort(); /* the prescan accepted it: msgpack-c must agree */
	st = rd_payload_build(h, &unp.data, &payload, &err);
	if (st == RD_OK) {
		json_t *keys = json_array();
		char *text;
		if (!payload)
			abort();
		rd_payload_lock_keys(h, payload, keys);
		for (size_t i = 0; i < json_array_size(keys); i++)
			if (!json_is_string(json_array_get(keys, i)))
				abort();
		text = json_dumps(payload, JSON_COMPACT);
		if (!text)
			abort();
		free(text);
		json_decref(keys);
		json_decref(payload);
	} else {
		size_t len = strlen(err.msg);
		if (payload || st != RD_REJECT || err.st != st || len == 0 ||
		    !rd_utf8_valid(err.msg, len) || strchr(err.msg, '\n'))
			abort();
	}
	msgpack_unpacked_destroy(&unp);
	return 0;
}
