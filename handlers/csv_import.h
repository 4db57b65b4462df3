/* csv_import.h: the decoder of `rosterctl import`: CSV text (RFC 4180, via
 * libcsv) to contact.upserted payloads. The header row names the columns:
 * person keys (SPEC 2 "Person": email, first_name, ...) and custom fields as
 * "fields.KEY". Each data row becomes a MessagePack `data` map
 * {match: "email", <columns>} that goes through the same validator as a
 * message (rd_payload_build), so a row is accepted or refused exactly as
 * the same contact.upserted from the queue would be. Pure: no I/O.
 * Owns struct rd_csv_row while the callback runs. */
#ifndef RD_CSV_IMPORT_H
#define RD_CSV_IMPORT_H

#include <jansson.h>
#include <stddef.h>

#include "../daemon/util.h"

#define RD_CSV_MAX_COLUMNS 64

struct rd_csv_row {
	long row;	    /* 1 = the first row after the header */
	json_t *payload;    /* the validated payload, or NULL when refused */
	json_t *keys;	    /* its serialisation keys (without org); NULL when refused */
	const char *email;  /* the row's email cell as given ("" when none) */
	const char *reason; /* why the row is refused ("row 3: data.email: ..."), or NULL */
};

/* Called once per data row, in order; borrowed row. Non-zero stops. */
typedef int (*rd_csv_row_fn)(const struct rd_csv_row *row, void *arg);

/* Decode a whole CSV text. RD_OK when the file was read to its end (rows
 * may still be refused, each with its reason); RD_REJECT with err->msg for a
 * file-level fault: no header, an unknown or repeated column, no column at
 * all, malformed quoting ("line 7: ..."), more than RD_CSV_MAX_COLUMNS. */
enum rd_status rd_csv_import_decode(const char *data, size_t len, rd_csv_row_fn fn, void *arg,
				    struct rd_err *err) RD_WUR;

#endif
