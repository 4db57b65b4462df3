/* migrations.h: the versioned SQL files of schema/migrations, embedded at
 * build time (schema/embed.cmake), and the runner that applies the pending
 * ones once, under an advisory lock, so that several instances starting
 * together apply each exactly once; and the named statements of
 * schema/queries. */
#ifndef RD_MIGRATIONS_H
#define RD_MIGRATIONS_H

#include <libpq-fe.h>
#include <stddef.h>

#include "util.h"

struct rd_migration {
	int version;
	const char *name;
	const char *sql;
};

extern const struct rd_migration rd_migrations[];
extern const size_t rd_migrations_count;

/* The statements of schema/queries (*.sql), each after a "-- name: X" line. */
extern const char rd_queries_sql[];

/* A fresh copy of statement `name` (caller frees), or NULL if unknown. */
char *rd_query_text(const char *name);

/* Apply the pending migrations on conn (blocking). RD_OK or RD_FAIL. */
enum rd_status rd_migrate(PGconn *conn, struct rd_err *err) RD_WUR;

#endif
