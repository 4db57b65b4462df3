/* fuzz_csv.c: libFuzzer target for the CSV import decoder
 * (handlers/csv_import.c): any bytes as a CSV file. Checks: either a
 * file-level refusal with a one-line UTF-8 reason, or rows in order, each
 * with a payload and lock keys (serialisable) or a one-line UTF-8 reason,
 * never both. Memory stays bounded: run with -malloc_limit_mb=64. */
#include <jansson.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "csv_import.h"
#include "decode.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static bool one_line_utf8(const char *s)
{
	size_t len = strlen(s);
	return len > 0 && rd_utf8_valid(s, len) && !strchr(s, '\n');
}

static int check_row(const struct rd_csv_row *r, void *arg)
{
	long *last = arg;
	if (r->row != *last + 1 || !r->email)
		abort();
	*last = r->row;
	if (r->reason) {
		if (r->payload || r->keys || !one_line_utf8(r->reason))
			abort();
		return 0;
	}
	if (!json_is_object(r->payload) || !json_is_array(r->keys))
		abort();
	for (size_t i = 0; i < json_array_size(r->keys); i++)
		if (!json_is_string(json_array_get(r->keys, i)))
			abort();
	char *text = json_dumps(r->payload, JSON_COMPACT);
	if (!text)
		abort();
	free(text);
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct rd_err err = {.st = RD_OK, .msg = ""};
	long last = 0;
	enum rd_status st = rd_csv_import_decode((const char *)data, size, check_row, &last, &err);
	if (st != RD_OK && (st != RD_REJECT || !one_line_utf8(err.msg)))
		abort();
	return 0;
}
