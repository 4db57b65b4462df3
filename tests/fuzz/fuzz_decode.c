/* fuzz_decode.c: libFuzzer target for the whole intake path of one AMQP
 * body: rd_decode_envelope (prescan, unpack, envelope checks), then, for a
 * known type, rd_payload_build and rd_payload_lock_keys, as the daemon does.
 * Checks the invariants a caller relies on: a rejection carries a one-line
 * UTF-8 reason, an accepted envelope has org, id and a data map. Run under
 * ASan/UBSan/LSan with -malloc_limit_mb=64 (see run.sh). */
#include <jansson.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "decode.h"
#include "handlers.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_reason(const struct rd_err *err, enum rd_status st)
{
	size_t n = strlen(err->msg);
	if (err->st != st || n == 0 || !rd_utf8_valid(err->msg, n) || strchr(err->msg, '\n'))
		abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct rd_envelope env;
	struct rd_err err = {.st = RD_OK, .msg = ""};
	enum rd_status st = rd_decode_envelope(data, size, 1024 * 1024, &env, &err);

	if (st != RD_OK) {
		check_reason(&err, st);
	} else {
		const struct rd_handler *h;
		if (!env.has_org || !env.has_id || !env.data ||
		    env.data->type != MSGPACK_OBJECT_MAP)
			abort();
		h = rd_handler_find(env.type);
		if (h) {
			json_t *payload = NULL;
			err.msg[0] = '\0';
			st = rd_payload_build(h, env.data, &payload, &err);
			if (st == RD_OK) {
				json_t *keys = json_array();
				char *text;
				rd_payload_lock_keys(h, payload, keys);
				text = json_dumps(payload, JSON_COMPACT);
				if (!text)
					abort();
				free(text);
				json_decref(keys);
				json_decref(payload);
			} else {
				if (payload)
					abort();
				check_reason(&err, st);
			}
		}
	}
	rd_envelope_free(&env);
	return 0;
}
