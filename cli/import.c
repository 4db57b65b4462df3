/* import.c: rosterctl import FILE.csv --org ORG [--dry-run] [--sync on|off]
 *
 * Contacts from a CSV file, through the same path as messages: each row is
 * decoded and validated by handlers/csv_import.c (libcsv + the message
 * validator) into a contact.upserted payload with match "email", and
 * applied by rd.import_row -> rd.apply under the row's serialisation locks.
 * Each row's message id is "import:<sha-256 of the file>:<row>", so a
 * second import of the same file is a duplicate, row by row, and changes
 * nothing. The whole file is decoded before anything is applied: a file
 * that is not CSV, or whose header names an unknown column, changes
 * nothing. Rows are committed in chunks of ROWS_PER_TXN (so that a large
 * file does not hold email locks that long, nor more advisory locks than
 * the server's lock table holds); --dry-run runs the same chunks and rolls
 * each back, printing what each row would do (so a row sees the effect of
 * the rows before it in its chunk only). */
#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "csv_import.h"
#include "ctl.h"
#include "migrations.h"
#include "util.h"

#define ROWS_PER_TXN 500
#define IMPORT_MAX_BYTES (256L * 1024 * 1024)

struct row {
	long row;
	char *email;
	char *payload; /* JSON text, or NULL when refused */
	char *keys;    /* JSON array text */
	char *reason;  /* the validator's reason, or NULL */
};

struct rows {
	struct row *v;
	size_t n, cap;
	int sync; /* -1 org's setting, 0 off, 1 on */
};

static int collect(const struct rd_csv_row *r, void *arg)
{
	struct rows *rs = arg;
	if (rs->n == rs->cap) {
		rs->cap = rs->cap ? rs->cap * 2 : 256;
		rs->v = rd_xrealloc(rs->v, rs->cap * sizeof(*rs->v));
	}
	struct row *w = &rs->v[rs->n++];
	memset(w, 0, sizeof(*w));
	w->row = r->row;
	w->email = rd_xstrdup(r->email);
	if (r->reason) {
		w->reason = rd_xstrdup(r->reason);
	} else {
		json_t *p = json_deep_copy(r->payload);
		if (rs->sync >= 0)
			json_object_set_new(p, "sync", json_boolean(rs->sync));
		w->payload = json_dumps(p, JSON_COMPACT);
		w->keys = json_dumps(r->keys, JSON_COMPACT);
		json_decref(p);
	}
	return 0;
}

static void rows_free(struct rows *rs)
{
	for (size_t i = 0; i < rs->n; i++) {
		free(rs->v[i].email);
		free(rs->v[i].payload);
		free(rs->v[i].keys);
		free(rs->v[i].reason);
	}
	free(rs->v);
}

static char *read_file(const char *path, size_t *len)
{
	FILE *f = fopen(path, "rb");
	if (!f) {
		ctl_die("import: %s: %s", path, strerror(errno));
		return NULL;
	}
	struct stat sb;
	if (fstat(fileno(f), &sb) != 0 || !S_ISREG(sb.st_mode)) {
		ctl_die("import: %s: not a regular file", path);
		fclose(f);
		return NULL;
	}
	if (sb.st_size > IMPORT_MAX_BYTES) {
		ctl_die("import: %s: larger than %ld MiB; split it", path,
			IMPORT_MAX_BYTES / 1024 / 1024);
		fclose(f);
		return NULL;
	}
	char *buf = rd_xmalloc((size_t)sb.st_size + 1);
	*len = fread(buf, 1, (size_t)sb.st_size, f);
	if (ferror(f)) {
		ctl_die("import: %s: %s", path, strerror(errno));
		fclose(f);
		free(buf);
		return NULL;
	}
	fclose(f);
	buf[*len] = '\0';
	return buf;
}

/* sha-256 of the file's bytes, by the server (pgcrypto is not needed:
 * sha256() is built in), as hex into out[65]. */
static bool file_hash(PGconn *conn, const char *buf, size_t len, char *out)
{
	char *sql = rd_query_text("import_hash");
	const char *vals[1] = {buf};
	int lens[1] = {(int)len}, fmts[1] = {1};
	PGresult *res = PQexecParams(conn, sql, 1, NULL, vals, lens, fmts, 0);
	free(sql);
	bool ok = PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1;
	if (ok)
		rd_strlcpy(out, PQgetvalue(res, 0, 0), 65);
	else
		ctl_die("import: %s", PQresultErrorMessage(res));
	PQclear(res);
	return ok;
}

/* Take the serialisation keys of rows [from, to) at once, in the one sorted
 * order of rd.lock_keys, as a batch of the daemon does: taking them row by
 * row in file order could deadlock with a batch. */
static bool lock_chunk(PGconn *conn, const char *org, const char *hash, const struct rows *rs,
		       size_t from, size_t to)
{
	json_t *all = json_array();
	char key[160];
	for (size_t i = from; i < to && i < rs->n; i++) {
		snprintf(key, sizeof(key), "msg:import:%.32s:%ld", hash, rs->v[i].row);
		json_array_append_new(all, json_string(key));
		json_t *k = rs->v[i].keys ? json_loads(rs->v[i].keys, 0, NULL) : NULL;
		json_array_extend(all, k);
		json_decref(k);
	}
	char *text = json_dumps(all, JSON_COMPACT);
	json_decref(all);
	const char *p[2] = {org, text};
	PGresult *res = ctl_query(conn, "import_lock_chunk", 2, p);
	free(text);
	PQclear(res);
	return res != NULL;
}

static bool run(PGconn *conn, const char *name)
{
	PGresult *res = ctl_query(conn, name, 0, NULL);
	PQclear(res);
	return res != NULL;
}

int ctl_import(struct ctl *c)
{
	const char *file = NULL, *org = NULL, *sync = NULL;
	bool dry = false;
	for (int i = 0; i < c->argc; i++) {
		const char *a = c->argv[i];
		if (strcmp(a, "--org") == 0 || strcmp(a, "--sync") == 0) {
			if (i + 1 >= c->argc)
				return ctl_die("import: %s needs a value", a);
			if (a[2] == 'o')
				org = c->argv[++i];
			else
				sync = c->argv[++i];
		} else if (strcmp(a, "--dry-run") == 0) {
			dry = true;
		} else if (a[0] == '-' || file) {
			return ctl_die("import: unexpected argument %s", a);
		} else {
			file = a;
		}
	}
	if (!file)
		return ctl_die("import: which file? (rosterctl import FILE.csv --org ORG "
			       "[--dry-run] [--sync on|off])");
	if (!org)
		return ctl_die("import: --org ORG is required");
	struct rows rs = {.sync = -1};
	if (sync) {
		if (strcmp(sync, "on") == 0)
			rs.sync = 1;
		else if (strcmp(sync, "off") == 0)
			rs.sync = 0;
		else
			return ctl_die("import: --sync: on or off, not %s", sync);
	}

	size_t len = 0;
	char *buf = read_file(file, &len);
	if (!buf)
		return 1;
	struct rd_err err = {.st = RD_OK, .msg = ""};
	if (rd_csv_import_decode(buf, len, collect, &rs, &err) != RD_OK) {
		ctl_die("import: %s: %s; nothing imported", file, err.msg);
		rows_free(&rs);
		free(buf);
		return 1;
	}

	int rc = 1;
	PGconn *conn = ctl_connect(c);
	if (!conn) {
		rows_free(&rs);
		free(buf);
		return 1;
	}
	char hash[65];
	const char *op[1] = {org};
	PGresult *res = ctl_query(conn, "admin_org_exists", 1, op);
	if (!res)
		goto out;
	int known = PQntuples(res);
	PQclear(res);
	if (!known) {
		ctl_die("import: unknown organisation %s (no org.configured seen)", org);
		goto out;
	}
	if (!file_hash(conn, buf, len, hash))
		goto out;

	long n_created = 0, n_updated = 0, n_unchanged = 0, n_skipped = 0;
	json_t *jrows = json_array();
	if (!c->json && dry)
		printf("%-6s %-9s %-36s %-30s %s\n", "ROW", "ACTION", "CONTACT", "EMAIL", "WHY");
	bool in_txn = false;
	char at[32];
	snprintf(at, sizeof(at), "%" PRId64, rd_now_ms());
	for (size_t i = 0; i < rs.n; i++) {
		struct row *w = &rs.v[i];
		if (!in_txn) {
			if (!run(conn, "admin_begin") ||
			    !lock_chunk(conn, org, hash, &rs, i, i + ROWS_PER_TXN))
				goto out_rows;
			in_txn = true;
		}
		char id[128];
		snprintf(id, sizeof(id), "import:%.32s:%ld", hash, w->row);
		const char *p[6] = {org,       id,
				    at,	       w->payload ? w->payload : "{}",
				    w->reason, w->keys ? w->keys : "[]"};
		res = ctl_query(conn, "import_row", 6, p);
		if (!res) {
			ctl_die("import: row %ld failed; rows after the last commit are not "
				"imported",
				w->row);
			goto out_rows;
		}
		const char *outcome = PQgetvalue(res, 0, 0), *action = PQgetvalue(res, 0, 2),
			   *cid = PQgetvalue(res, 0, 3), *detail = PQgetvalue(res, 0, 4);
		if (strcmp(action, "created") == 0)
			n_created++;
		else if (strcmp(action, "updated") == 0)
			n_updated++;
		else if (strcmp(action, "unchanged") == 0)
			n_unchanged++;
		else
			n_skipped++;
		if (c->json) {
			json_array_append_new(jrows,
					      json_pack("{s:I, s:s, s:s, s:s, s:s?, s:s, s:s}",
							"row", (json_int_t)w->row, "message_id", id,
							"outcome", outcome, "action", action,
							"contact_id", *cid ? cid : NULL, "email",
							w->email, "detail", detail));
		} else if (dry || strcmp(action, "skipped") == 0) {
			printf("%-6ld %-9s %-36s %-30s %s\n", w->row, action, *cid ? cid : "-",
			       *w->email ? w->email : "-", detail);
		}
		PQclear(res);
		if ((i + 1) % ROWS_PER_TXN == 0) {
			if (!run(conn, dry ? "admin_rollback" : "admin_commit"))
				goto out_rows;
			in_txn = false;
		}
	}
	if (in_txn && !run(conn, dry ? "admin_rollback" : "admin_commit"))
		goto out_rows;
	if (c->json) {
		json_t *o = json_pack("{s:s, s:s, s:s, s:b, s:I, s:I, s:I, s:I, s:O}", "file", file,
				      "org", org, "sha256", hash, "dry_run", dry, "created",
				      (json_int_t)n_created, "updated", (json_int_t)n_updated,
				      "unchanged", (json_int_t)n_unchanged, "skipped",
				      (json_int_t)n_skipped, "rows", jrows);
		json_dumpf(o, stdout, JSON_INDENT(2));
		fputc('\n', stdout);
		json_decref(o);
	} else {
		printf("%s%s: %zu rows: %ld created, %ld updated, %ld unchanged, %ld skipped\n",
		       dry ? "dry run (nothing changed) " : "", file, rs.n, n_created, n_updated,
		       n_unchanged, n_skipped);
	}
	rc = 0;
out_rows:
	json_decref(jrows);
out:
	rows_free(&rs);
	free(buf);
	PQfinish(conn);
	return rc;
}
