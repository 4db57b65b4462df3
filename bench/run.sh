#!/usr/bin/env bash
# bench/run.sh - rosterd's throughput benchmark, one command (as root):
#
#   bash bench/run.sh                 N=200000 events, peer 50000, PG limit 15 s
#   N=50000 PEER_N=20000 bash bench/run.sh
#
# In one run, on the same private servers (../shared/bench/servers.sh: the
# settings LIMITS.md was measured with), it measures:
#   1. the PostgreSQL batched limit: pgbench, 100 events per transaction as
#      server-side calls in one pipeline, 4 clients (LIMITS.md's reference)
#   2. the Python peer (../shared/bench/peer_consumer.py) draining PEER_N
#   3. rosterd draining N realistic booking.created events (the shared
#      publisher: 1-2 attendees, 20 % new emails, 10 organisations,
#      100,000 existing contacts), with CPU per party and peak RSS
#   4. rosterd's apply latency p50/p99 at half its measured rate
#   5. rosterd's RSS over RSS_N messages (default 1,000,000; 0 skips it):
#      10 % new events, 0.5 % broken bodies, the rest re-sent (bench/rss_flat.py)
# and prints a table with the ratios against the targets of the issue.
# Results go to bench/results/<time>/ (summary.md, raw lines).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
SHARED=${SHARED:-$ROOT/../shared/bench}
N=${N:-200000}
PEER_N=${PEER_N:-50000}
RSS_N=${RSS_N:-1000000}
PG_SECONDS=${PG_SECONDS:-15}
LAT_SECONDS=${LAT_SECONDS:-20}
PY=/usr/bin/python3
[ -d "$SHARED" ] || { echo "bench: $SHARED not found (set SHARED=)" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "bench: run as root (private servers run as postgres/nobody)" >&2; exit 1; }

bash scripts/install-deps.sh
cmake -S . -B build-bench -DCMAKE_BUILD_TYPE=Release -DROSTERD_TESTS=OFF >/dev/null
cmake --build build-bench -j"$(nproc)" >/dev/null

RESULTS=${RESULTS:-$ROOT/bench/results/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$RESULTS"
WORK=$(mktemp -d /tmp/rosterd-bench.XXXXXX)
chmod 0755 "$WORK"
cleanup() {
  [ -d "$WORK/state" ] && "$SHARED/servers.sh" stop "$WORK/state" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
say() { printf '%s\n' "$*" | tee -a "$RESULTS/run.log" >&2; }

"$SHARED/servers.sh" start "$WORK/state" >/dev/null
eval "$("$SHARED/servers.sh" env "$WORK/state" | sed 's/^/export /')"
AMQP_URL="amqp://guest:guest@127.0.0.1:$AMQP_PORT/%2f"
psql_q() { psql -X -q -v ON_ERROR_STOP=1 "$@"; }
rmqctl() { "$SHARED/servers.sh" rabbitmqctl "$WORK/state" "$@"; }
purge() { rmqctl -q purge_queue rosterd.events >/dev/null 2>&1 || true; }
cpu() { "$SHARED/cpuwatch.py" --state "$WORK/state" --label "$1" --json "$RESULTS/cpu.jsonl" -- "${@:2}"; }

# --- 1. PostgreSQL batched limit ---------------------------------------------------
say "== PostgreSQL batched limit (pgbench func_100, 4 clients, ${PG_SECONDS}s)"
psql_q -d bench -f "$SHARED/schema.sql" >/dev/null
psql_q -d bench -f "$SHARED/seed.sql" >/dev/null
"$SHARED/gen_scripts.sh" "$WORK/pgs"
PGOPTIONS='-c synchronous_commit=on' pgbench -n -M prepared --max-tries=10 -c 4 -j 4 \
  -T "$PG_SECONDS" -f "$WORK/pgs/func_100.sql" bench >"$WORK/pgbench.out" 2>&1
tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$WORK/pgbench.out" | head -1)
PG_LIMIT=$(awk -v t="$tps" 'BEGIN{printf "%d", t * 100}')
say "   pg_limit events_per_s=$PG_LIMIT"

# --- 2. the peer ---------------------------------------------------------------------
say "== Python peer, $PEER_N events"
psql_q -d bench -f "$SHARED/seed.sql" >/dev/null
$PY "$SHARED/publish_events.py" --port "$AMQP_PORT" --count "$PEER_N" --purge >>"$RESULTS/run.log"
cpu peer $PY "$SHARED/peer_consumer.py" --port "$AMQP_PORT" --count "$PEER_N" \
  --dsn "host=127.0.0.1 port=$PGPORT dbname=bench user=postgres" >"$WORK/peer.out" 2>"$WORK/peer.err"
cat "$WORK/peer.out" >>"$RESULTS/run.log"; grep '^cpu ' "$WORK/peer.err" >>"$RESULTS/run.log" || true
PEER=$(sed -n 's/.*events_per_s=\([0-9.]*\).*/\1/p' "$WORK/peer.out" | tail -1)
say "   peer events_per_s=$PEER"

# --- 3. rosterd drain ----------------------------------------------------------------
say "== rosterd, $N events"
psql_q -c "DROP DATABASE IF EXISTS rosterd" -c "DROP ROLE IF EXISTS rosterd" \
  -c "CREATE ROLE rosterd LOGIN" -c "CREATE DATABASE rosterd OWNER rosterd" >/dev/null
cat >"$WORK/rosterd.conf" <<CONF
[daemon]
instance = bench-1
status_interval = 5
log_level = notice
batch_size = ${BATCH_SIZE:-200}
[amqp]
url = $AMQP_URL
prefetch = ${PREFETCH:-1000}
[postgres]
conninfo = host=127.0.0.1 port=$PGPORT dbname=rosterd user=rosterd
connections = ${CONNECTIONS:-3}
CONF
chmod 600 "$WORK/rosterd.conf"
./build-bench/rosterctl -c "$WORK/rosterd.conf" migrate >/dev/null
psql_q -d rosterd -f bench/seed_rosterd.sql >/dev/null
purge
$PY "$SHARED/publish_events.py" --port "$AMQP_PORT" --count "$N" --purge >>"$RESULTS/run.log"
DSN="host=127.0.0.1 port=$PGPORT dbname=rosterd user=postgres"
cpu rosterd $PY bench/drain.py --rosterd ./build-bench/rosterd --config "$WORK/rosterd.conf" \
  --dsn "$DSN" --count "$N" --amqp-url "$AMQP_URL" --log "$WORK/rosterd.log" \
  >"$WORK/drain.out" 2>"$WORK/drain.err" || { cat "$WORK/drain.err" "$WORK/rosterd.log" | tail -30; exit 1; }
cat "$WORK/drain.out" >>"$RESULTS/run.log"; grep '^cpu ' "$WORK/drain.err" >>"$RESULTS/run.log" || true
RATE=$(sed -n 's/.*events_per_s=\([0-9.]*\).*/\1/p' "$WORK/drain.out")
RSS=$(sed -n 's/.*rss_peak_kb=\([0-9]*\).*/\1/p' "$WORK/drain.out")
CPU_LINE=$(grep '^cpu ' "$WORK/drain.err" | tail -1 || true)
say "   $(cat "$WORK/drain.out")"
say "   $CPU_LINE"
outcomes=$(psql -X -Atd rosterd -c "SELECT string_agg(outcome || '=' || n, ' ') FROM (SELECT outcome, count(*) n FROM report.messages GROUP BY 1) s")
say "   outcomes: $outcomes"

# --- 4. latency at half load -------------------------------------------------------------
HALF=$(awk -v r="$RATE" 'BEGIN{printf "%d", r / 2}')
say "== rosterd latency at $HALF events/s (half of the drain rate), ${LAT_SECONDS}s"
purge
$PY bench/latency.py --rosterd ./build-bench/rosterd --config "$WORK/rosterd.conf" --dsn "$DSN" \
  --amqp-url "$AMQP_URL" --rate "$HALF" --seconds "$LAT_SECONDS" --shared "$SHARED" \
  --log "$WORK/rosterd-lat.log" >"$WORK/lat.out"
say "   $(cat "$WORK/lat.out")"
P50=$(sed -n 's/.*p50_ms=\([0-9.]*\).*/\1/p' "$WORK/lat.out")
P99=$(sed -n 's/.*p99_ms=\([0-9.]*\).*/\1/p' "$WORK/lat.out")
ACH=$(sed -n 's/.*achieved_rate=\([0-9.]*\).*/\1/p' "$WORK/lat.out")

# --- 5. memory over a long run -----------------------------------------------------------
RSS_LINE="" GROWTH="" WARM=""
if [ "$RSS_N" -gt 0 ]; then
  say "== rosterd RSS over $RSS_N messages"
  purge
  $PY bench/rss_flat.py --rosterd ./build-bench/rosterd --config "$WORK/rosterd.conf" \
    --amqp-url "$AMQP_URL" --shared "$SHARED" --count "$RSS_N" --log "$WORK/rosterd-rss.log" \
    >"$WORK/rss.out" || { tail -30 "$WORK/rss.out" "$WORK/rosterd-rss.log"; exit 1; }
  cat "$WORK/rss.out" >>"$RESULTS/run.log"
  RSS_LINE=$(grep '^rss ' "$WORK/rss.out")
  say "   $RSS_LINE"
  GROWTH=$(sed -n 's/.*growth_kb=\([0-9-]*\).*/\1/p' <<<"$RSS_LINE")
  WARM=$(sed -n 's/.*warm_kb=\([0-9]*\).*/\1/p' <<<"$RSS_LINE")
fi

# --- summary -----------------------------------------------------------------------------
{
  echo "| measure | value | target | verdict |"
  echo "|---|---:|---|---|"
  awk -v r="$RATE" -v l="$PG_LIMIT" -v p="$PEER" -v p50="$P50" -v p99="$P99" -v rss="$RSS" -v ach="$ACH" -v half="$HALF" 'BEGIN{
    printf "| rosterd drain, booking.created | %d events/s | | |\n", r;
    printf "| PostgreSQL batched limit (same run) | %d events/s | | |\n", l;
    printf "| Python peer (same run) | %d events/s | | |\n", p;
    printf "| rosterd / PostgreSQL limit | %.0f %% | >= 80 %% | %s |\n", 100*r/l, (r >= 0.8*l) ? "met" : "NOT met";
    printf "| rosterd / peer | %.1f x | >= 20 x | %s |\n", r/p, (r >= 20*p) ? "met" : "NOT met";
    printf "| apply latency p50 / p99 at %d/s (achieved %d/s) | %.1f / %.1f ms | p99 < 20 ms | %s |\n", half, ach, p50, p99, (p99 < 20) ? "met" : "NOT met";
    printf "| rosterd peak RSS | %.1f MiB | < 64 MiB | %s |\n", rss/1024, (rss < 65536) ? "met" : "NOT met";
  }'
  if [ -n "$RSS_LINE" ]; then
    awk -v g="$GROWTH" -v w="$WARM" -v n="$RSS_N" 'BEGIN{
      printf "| RSS growth over %d messages after the first 10 %% (from %.1f MiB) | %.1f MiB | flat (< 2 MiB) | %s |\n", n, w/1024, g/1024, (g < 2048) ? "met" : "NOT met";
    }'
  fi
  echo
  echo "CPU during the drain (percent of one core; the machine has $(nproc)): $CPU_LINE"
  echo "Outcomes: $outcomes"
} | tee "$RESULTS/summary.md"
