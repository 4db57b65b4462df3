/* csv_import.c: CSV rows to contact.upserted payloads (see csv_import.h).
 * libcsv does the CSV syntax (quotes, doubled quotes, CRLF, strict mode);
 * this file maps the header to person keys and custom fields, builds one
 * MessagePack `data` map per row and hands it to the message validator. */
#include <csv.h>
#include <msgpack.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "csv_import.h"
#include "decode.h"
#include "handlers.h"

static const char *const person_keys[] = {"email",    "first_name", "last_name", "company",
					  "language", "phone",	    "street",	 "zip",
					  "city",     "country",    "birthdate", NULL};

struct cell {
	char *s;
	size_t len;
};

struct state {
	const struct rd_handler *h;
	rd_csv_row_fn fn;
	void *arg;
	struct rd_err *err;
	bool failed;  /* a file-level fault: err is set */
	bool stopped; /* the callback asked to stop */
	bool have_header;
	int ncols;
	char *cols[RD_CSV_MAX_COLUMNS]; /* "email", ... or "fields.KEY" */
	int email_col;			/* -1: none */
	struct cell cells[RD_CSV_MAX_COLUMNS];
	int ncells;
	bool too_many; /* the current row has more cells than we keep */
	long row;      /* data rows seen */
	long line;     /* physical row (header = 1) for messages */
};

static void cells_clear(struct state *s)
{
	for (int i = 0; i < s->ncells; i++)
		free(s->cells[i].s);
	s->ncells = 0;
	s->too_many = false;
}

static void on_field(void *f, size_t len, void *arg)
{
	struct state *s = arg;
	if (s->failed || s->stopped)
		return;
	if (s->ncells == RD_CSV_MAX_COLUMNS) {
		s->too_many = true;
		return;
	}
	char *copy = rd_xmalloc(len + 1);
	if (len)
		memcpy(copy, f, len);
	copy[len] = '\0';
	s->cells[s->ncells].s = copy;
	s->cells[s->ncells].len = len;
	s->ncells++;
}

static bool is_person_key(const char *k)
{
	for (size_t i = 0; person_keys[i]; i++)
		if (strcmp(k, person_keys[i]) == 0)
			return true;
	return false;
}

/* A column name for an error message: one line, valid UTF-8, short. */
static void show_name(char *out, size_t size, const char *name)
{
	size_t n = 0;
	for (const char *p = name; *p && n + 1 < size; p++)
		out[n++] = (unsigned char)*p < 0x20 || *p == 0x7f ? '?' : *p;
	out[n] = '\0';
	while (n > 0 && !rd_utf8_valid(out, n)) /* cut inside a character */
		out[--n] = '\0';
}

static void header(struct state *s)
{
	if (s->too_many) {
		rd_errf(s->err, RD_REJECT, "header: more than %d columns", RD_CSV_MAX_COLUMNS);
		s->failed = true;
		return;
	}
	s->email_col = -1;
	for (int i = 0; i < s->ncells; i++) {
		char *c = s->cells[i].s;
		size_t len = s->cells[i].len;
		if (strlen(c) != len || !rd_utf8_valid(c, len)) {
			rd_errf(s->err, RD_REJECT, "header: column %d is not UTF-8 text", i + 1);
			s->failed = true;
			return;
		}
		while (len && (c[len - 1] == ' ' || c[len - 1] == '\t'))
			c[--len] = '\0';
		char *k = c + strspn(c, " \t");
		if (strncasecmp(k, "fields.", 7) == 0) {
			size_t kl = strlen(k + 7);
			if (kl == 0 || kl > RD_FIELD_KEY_MAX) {
				rd_errf(
				    s->err, RD_REJECT,
				    "header: column %d: a custom field needs a key of 1..%d bytes "
				    "after \"fields.\"",
				    i + 1, RD_FIELD_KEY_MAX);
				s->failed = true;
				return;
			}
			memcpy(k, "fields.", 7);
		} else {
			for (char *p = k; *p; p++)
				if (*p >= 'A' && *p <= 'Z')
					*p = (char)(*p - 'A' + 'a');
			if (!is_person_key(k)) {
				char shown[64];
				show_name(shown, sizeof(shown), k);
				rd_errf(s->err, RD_REJECT,
					"header: unknown column \"%s\" (known: email, first_name, "
					"last_name, company, language, phone, street, zip, city, "
					"country, birthdate, fields.KEY)",
					shown);
				s->failed = true;
				return;
			}
			if (strcmp(k, "email") == 0)
				s->email_col = i;
		}
		for (int j = 0; j < i; j++)
			if (strcmp(s->cols[j], k) == 0) {
				char shown[64];
				show_name(shown, sizeof(shown), k);
				rd_errf(s->err, RD_REJECT, "header: column \"%s\" appears twice",
					shown);
				s->failed = true;
				return;
			}
		s->cols[i] = rd_xstrdup(k);
		s->ncols = i + 1;
	}
	if (s->ncols == 0) {
		rd_errf(s->err, RD_REJECT, "header: no columns");
		s->failed = true;
		return;
	}
	s->have_header = true;
}

static void pack_str(msgpack_packer *pk, const char *str, size_t len)
{
	msgpack_pack_str(pk, len);
	msgpack_pack_str_body(pk, str, len);
}

/* The row as a `data` map; NULL and reason set when it cannot be one. */
static void data_row(struct state *s)
{
	struct rd_csv_row r = {.row = ++s->row, .email = ""};
	char reason[300];
	struct rd_err verr = {.st = RD_OK, .msg = ""};
	json_t *payload = NULL, *keys = NULL;
	int nfields = 0, nperson = 0;
	bool any = false;

	if (s->email_col >= 0 && s->email_col < s->ncells &&
	    strlen(s->cells[s->email_col].s) == s->cells[s->email_col].len &&
	    rd_utf8_valid(s->cells[s->email_col].s, s->cells[s->email_col].len))
		r.email = s->cells[s->email_col].s;
	if (s->too_many || s->ncells != s->ncols) {
		snprintf(reason, sizeof(reason), "row %ld has %s%d cells, the header has %d", r.row,
			 s->too_many ? "more than " : "", s->ncells, s->ncols);
		r.reason = reason;
		goto call;
	}
	for (int i = 0; i < s->ncols; i++) {
		if (s->cells[i].len)
			any = true;
		if (s->cols[i][0] == 'f' && strncmp(s->cols[i], "fields.", 7) == 0)
			nfields++;
		else
			nperson++;
	}
	if (!any) {
		snprintf(reason, sizeof(reason), "row %ld is empty", r.row);
		r.reason = reason;
		goto call;
	}

	msgpack_sbuffer sb;
	msgpack_packer pk;
	msgpack_sbuffer_init(&sb);
	msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
	msgpack_pack_map(&pk, (uint32_t)(1 + nperson + (nfields ? 1 : 0)));
	pack_str(&pk, "match", 5);
	pack_str(&pk, "email", 5);
	for (int i = 0; i < s->ncols; i++) {
		if (strncmp(s->cols[i], "fields.", 7) == 0)
			continue;
		pack_str(&pk, s->cols[i], strlen(s->cols[i]));
		pack_str(&pk, s->cells[i].s, s->cells[i].len);
	}
	if (nfields) {
		pack_str(&pk, "fields", 6);
		msgpack_pack_map(&pk, (uint32_t)nfields);
		for (int i = 0; i < s->ncols; i++) {
			if (strncmp(s->cols[i], "fields.", 7) != 0)
				continue;
			pack_str(&pk, s->cols[i] + 7, strlen(s->cols[i] + 7));
			if (s->cells[i].len)
				pack_str(&pk, s->cells[i].s, s->cells[i].len);
			else
				msgpack_pack_nil(&pk); /* "not given" */
		}
	}
	msgpack_unpacked unp;
	size_t off = 0;
	msgpack_unpacked_init(&unp);
	if (msgpack_unpack_next(&unp, sb.data, sb.size, &off) != MSGPACK_UNPACK_SUCCESS) {
		snprintf(reason, sizeof(reason), "row %ld: cannot be encoded", r.row);
		r.reason = reason;
	} else if (rd_payload_build(s->h, &unp.data, &payload, &verr) != RD_OK) {
		snprintf(reason, sizeof(reason), "row %ld: %s", r.row, verr.msg);
		r.reason = reason;
	} else {
		keys = json_array();
		rd_payload_lock_keys(s->h, payload, keys);
		r.payload = payload;
		r.keys = keys;
	}
	msgpack_unpacked_destroy(&unp);
	msgpack_sbuffer_destroy(&sb);
call:
	if (s->fn(&r, s->arg))
		s->stopped = true;
	json_decref(payload);
	json_decref(keys);
}

static void on_row(int c, void *arg)
{
	struct state *s = arg;
	(void)c;
	s->line++;
	if (!s->failed && !s->stopped) {
		if (!s->have_header)
			header(s);
		else
			data_row(s);
	}
	cells_clear(s);
}

enum rd_status rd_csv_import_decode(const char *data, size_t len, rd_csv_row_fn fn, void *arg,
				    struct rd_err *err)
{
	struct state s = {.fn = fn, .arg = arg, .err = err, .email_col = -1};
	struct csv_parser p;
	enum rd_status st = RD_OK;

	s.h = rd_handler_find("contact.upserted");
	if (!s.h)
		return rd_errf(err, RD_FAIL, "internal: no contact.upserted handler");
	if (len >= 3 && memcmp(data, "\xEF\xBB\xBF", 3) == 0) { /* a UTF-8 byte order mark */
		data += 3;
		len -= 3;
	}
	if (csv_init(&p, CSV_STRICT | CSV_STRICT_FINI) != 0)
		return rd_errf(err, RD_FAIL, "csv: cannot initialise the parser");
	/* feed in slices so that a stop or a fault ends the work early */
	size_t off = 0;
	while (off < len && !s.failed && !s.stopped) {
		size_t n = len - off < 65536 ? len - off : 65536;
		if (csv_parse(&p, data + off, n, on_field, on_row, &s) != n) {
			st = rd_errf(err, RD_REJECT, "CSV record %ld: %s", s.line + 1,
				     csv_strerror(csv_error(&p)));
			break;
		}
		off += n;
	}
	if (st == RD_OK && !s.failed && !s.stopped && csv_fini(&p, on_field, on_row, &s) != 0)
		st = rd_errf(err, RD_REJECT, "CSV record %ld: %s", s.line + 1,
			     csv_strerror(csv_error(&p)));
	csv_free(&p);
	cells_clear(&s);
	if (st == RD_OK && s.failed)
		st = RD_REJECT;
	if (st == RD_OK && !s.have_header)
		st =
		    rd_errf(err, RD_REJECT, "no header row (want e.g. email,first_name,last_name)");
	for (int i = 0; i < s.ncols; i++)
		free(s.cols[i]);
	return st;
}
