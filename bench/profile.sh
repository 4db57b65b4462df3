#!/usr/bin/env bash
# bench/profile.sh - where rosterd's SQL time goes, on running private servers
# (tests/fixture/servers.sh start DIR), as root:
#
#   SERVERS=/tmp/srv-x BIN=/tmp/build-rel N=6000 bash bench/profile.sh
#
# Makes a fresh database rosterd_prof (owner rosterd_prof), migrates it with
# $BIN/rosterctl, seeds it like bench/run.sh, publishes N booking.created
# events with the shared publisher, drains them with $BIN/rosterd and prints:
#   - the drain line of bench/drain.py;
#   - backend CPU per event: perf stat (task-clock) over rosterd's
#     PostgreSQL backends during an 8 s window, divided by the messages
#     applied in it (needs perf; the most load-independent figure we have);
#   - the top statements (pg_stat_statements, nested ones included) and
#     functions by self time, when the server has pg_stat_statements loaded:
#       ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements';
#       ALTER SYSTEM SET pg_stat_statements.track = 'all';
#       ALTER SYSTEM SET track_functions = 'all';  -- then restart PostgreSQL
#     (and update DIR/pg.pid if you restart it by hand).
# docs/performance.md explains what the figures showed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
SERVERS=${SERVERS:?set SERVERS to the state dir of tests/fixture/servers.sh}
BIN=${BIN:?set BIN to a build directory with rosterd and rosterctl}
N=${N:-6000}
SHARED=${SHARED:-$ROOT/../shared/bench}
WORK=$(mktemp -d /tmp/rosterd-profile.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
set -a; . "$SERVERS/env"; set +a
psql_q() { psql -X -q -v ON_ERROR_STOP=1 "$@"; }
psql_q -c "DROP DATABASE IF EXISTS rosterd_prof" -c "DROP ROLE IF EXISTS rosterd_prof" \
  -c "CREATE ROLE rosterd_prof LOGIN" -c "CREATE DATABASE rosterd_prof OWNER rosterd_prof" >/dev/null
cat >"$WORK/rosterd.conf" <<CONF
[daemon]
instance = prof-1
log_level = notice
batch_size = ${BATCH_SIZE:-200}
[amqp]
url = $AMQP_URL
prefetch = ${PREFETCH:-1000}
[postgres]
conninfo = host=127.0.0.1 port=$PGPORT dbname=rosterd_prof user=rosterd_prof
connections = ${CONNECTIONS:-3}
CONF
chmod 600 "$WORK/rosterd.conf"
"$BIN/rosterctl" -c "$WORK/rosterd.conf" migrate >/dev/null
stats=$(psql -X -Atc "SHOW shared_preload_libraries" | grep -c pg_stat_statements || true)
[ "$stats" = 1 ] && psql_q -d rosterd_prof -c "CREATE EXTENSION IF NOT EXISTS pg_stat_statements" >/dev/null
psql_q -d rosterd_prof -f bench/seed_rosterd.sql >/dev/null
/usr/bin/python3 "$SHARED/publish_events.py" --port "$AMQP_PORT" --count "$N" --purge >/dev/null
[ "$stats" = 1 ] && psql_q -d rosterd_prof -c "SELECT pg_stat_statements_reset()" -c "SELECT pg_stat_reset()" >/dev/null
DSN="host=127.0.0.1 port=$PGPORT dbname=rosterd_prof user=postgres"
/usr/bin/python3 bench/drain.py --rosterd "$BIN/rosterd" --config "$WORK/rosterd.conf" --dsn "$DSN" \
  --count "$N" --amqp-url "$AMQP_URL" --log "$WORK/rosterd.log" >"$WORK/drain.out" &
drain=$!
backends() { psql -X -Atc "SELECT string_agg(pid::text, ',') FROM pg_stat_activity
  WHERE datname = 'rosterd_prof' AND application_name = 'prof-1' AND backend_type = 'client backend'"; }
applied() { psql -X -d rosterd_prof -Atc "SELECT count(*) FROM rd.messages"; }
for _ in $(seq 1 240); do
  [ "$(backends | tr ',' '\n' | grep -c .)" -ge "${CONNECTIONS:-3}" ] && break
  sleep 0.5
done
sleep 3
if command -v perf >/dev/null; then
  c0=$(applied)
  perf stat -e task-clock -p "$(backends)" -o "$WORK/stat.txt" -- sleep 8 >/dev/null 2>&1 || true
  c1=$(applied)
  ms=$(awk '/task-clock/ {gsub(",", "", $1); print $1}' "$WORK/stat.txt")
  [ -n "$ms" ] && [ "$c1" -gt "$c0" ] &&
    awk -v m="$ms" -v e=$((c1 - c0)) 'BEGIN { printf "backend_cpu_ms_per_event=%.3f (events=%d in the window)\n", m / e, e }'
fi
wait "$drain"
cat "$WORK/drain.out"
if [ "$stats" = 1 ]; then
  psql -X -d rosterd_prof -P pager=off -c "SELECT calls, round(total_exec_time::numeric, 1) AS ms,
      round((total_exec_time / $N)::numeric * 1000, 1) AS us_per_event, round(calls::numeric / $N, 2) AS per_event,
      left(regexp_replace(query, '\s+', ' ', 'g'), 100) AS statement
    FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = 'rosterd_prof')
    ORDER BY total_exec_time DESC LIMIT ${TOP:-30}"
  psql -X -d rosterd_prof -P pager=off -c "SELECT funcname, calls, round(self_time::numeric, 1) AS self_ms,
      round((self_time / $N)::numeric * 1000, 1) AS self_us_per_event
    FROM pg_stat_user_functions ORDER BY self_time DESC LIMIT ${TOP:-30}"
fi
