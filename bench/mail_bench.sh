#!/usr/bin/env bash
# mail_bench.sh - mails per second delivered by rosterd's mail workers to
# Postfix's smtp-sink, next to smtp-source pushing the same number of mails
# of the same size to the same sink with as many sessions as rosterd has
# workers (LIMITS.md: delivery >= 50 % of smtp-source's rate).
#
#   bash bench/mail_bench.sh [BUILD_DIR]    (default: build)
#
# Environment: MAILS (default 20000), WORKERS (default 4), SIZE (bytes of
# body, default 2048), ROUNDS (default 3; each runs smtp-source, then
# rosterd, and the median ratio is the result), ROSTERD_SERVERS (a
# tests/fixture/servers.sh directory to reuse; otherwise private servers
# are started and stopped).
# The outbox rows are inserted in one transaction while rosterd idles; the
# time runs from that commit until every row is `sent` (the time of the
# INSERT itself is printed apart: it is not the workers'). PostgreSQL is
# reached without TLS (sslmode=disable; the test servers offer it and
# libpq's default would take it), as in bench/run.sh: on loopback the
# encryption measures OpenSSL, not the outbox.
set -euo pipefail
export LC_ALL=C # printf %f and sort -g read the rates with a dot
HERE=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${1:-$HERE/build}
MAILS=${MAILS:-20000}
WORKERS=${WORKERS:-4}
SIZE=${SIZE:-2048}
ROUNDS=${ROUNDS:-3}
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || { echo "mail_bench: ROUNDS must be a number >= 1" >&2; exit 1; }
ROSTERD=$BUILD/rosterd
[ -x "$ROSTERD" ] || { echo "mail_bench: no $ROSTERD (build first)" >&2; exit 1; }
command -v smtp-sink >/dev/null || { echo "mail_bench: smtp-sink missing (apt-get install postfix)" >&2; exit 1; }

TMP=$(mktemp -d /tmp/rosterd-mailbench.XXXXXX)
chmod 755 "$TMP" # the postgres user starts its server below it
SRV=${ROSTERD_SERVERS:-}
OWN_SERVERS=0
SINK_PID=""
RD_PID=""
cleanup() {
	[ -n "$RD_PID" ] && kill "$RD_PID" 2>/dev/null && wait "$RD_PID" 2>/dev/null || true
	[ -n "$SINK_PID" ] && kill "$SINK_PID" 2>/dev/null && wait "$SINK_PID" 2>/dev/null || true
	if [ "$OWN_SERVERS" = 1 ]; then bash "$HERE/tests/fixture/servers.sh" stop "$SRV" >/dev/null 2>&1 || true; fi
	rm -rf "$TMP"
}
trap cleanup EXIT
if [ -z "$SRV" ]; then
	SRV=$TMP/servers
	OWN_SERVERS=1
	bash "$HERE/tests/fixture/servers.sh" start "$SRV" >/dev/null
fi
set -a
# shellcheck disable=SC1091
. "$SRV/env"
set +a
PSQL="$PG_BIN/psql -h $PGHOST -p $PGPORT -U ${PGUSER:-postgres} -XAtq"
DB=rd_mailbench_$$
$PSQL -d postgres -c "CREATE DATABASE $DB"
trap 'cleanup; $PSQL -d postgres -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null 2>&1 || true' EXIT

PORT=$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
smtp-sink -u nobody 127.0.0.1:"$PORT" 1024 &
SINK_PID=$!
sleep 0.5

cat >"$TMP/rosterd.conf" <<EOF
[daemon]
instance = mailbench
log_level = notice
[amqp]
url = $AMQP_URL
queue = mailbench.$$.events
exchange = mailbench.$$.events
retry_queue = mailbench.$$.retry
dead_exchange = mailbench.$$.dead
dead_queue = mailbench.$$.dead
status_exchange = mailbench.$$.status
[postgres]
conninfo = host=$PGHOST port=$PGPORT dbname=$DB user=${PGUSER:-postgres} sslmode=disable
[smtp]
host = 127.0.0.1
port = $PORT
workers = $WORKERS
timeout = 30
EOF
chmod 600 "$TMP/rosterd.conf"
"$ROSTERD" -c "$TMP/rosterd.conf" 2>"$TMP/rosterd.log" &
RD_PID=$!
for _ in $(seq 100); do grep -q " ready " "$TMP/rosterd.log" && break; sleep 0.1; done
grep -q " ready " "$TMP/rosterd.log" || { cat "$TMP/rosterd.log" >&2; exit 1; }

LINES=$(( SIZE / 72 + 1 ))
$PSQL -d "$DB" <<EOF
INSERT INTO rd.orgs (org, name, mail_from, message_id) VALUES ('bench', 'Bench', 'Bench <bench@example.org>', 'x');
INSERT INTO rd.contacts (org, email, first_name) VALUES ('bench', 'rcpt@example.org', 'Rcpt');
EOF

# the same mails with smtp-source, WORKERS sessions reusing connections
src_round() {
	local t0 t1
	t0=$(date +%s.%N)
	smtp-source -d -s "$WORKERS" -l "$SIZE" -m "$MAILS" -f bench@example.org -t rcpt@example.org 127.0.0.1:"$PORT"
	t1=$(date +%s.%N)
	SRC_RATE=$(echo "$MAILS / ($t1 - $t0)" | bc -l)
}

# MAILS outbox rows, inserted in one transaction while the workers idle;
# the time runs from its commit until no row is left to send
rd_round() {
	local t0 tc t1 sent
	t0=$(date +%s.%N)
	$PSQL -d "$DB" <<EOF
BEGIN;
INSERT INTO rd.outbox (org, contact_id, template, language, from_address, to_name, to_address,
		       subject, body, message_id)
SELECT 'bench', c.contact_id, 'bench', 'en', 'Bench <bench@example.org>', 'Rcpt', c.email,
       'Bench mail ' || g, repeat(repeat('x', 71) || E'\n', $LINES), '<' || g || '.bench@example.org>'
  FROM rd.contacts c, generate_series(1, $MAILS) g WHERE c.org = 'bench';
NOTIFY rd_outbox;
COMMIT;
EOF
	tc=$(date +%s.%N) # the commit: the workers start now
	QUEUE_S=$(echo "$tc - $t0" | bc -l)
	# Wait in one session, a short transaction every 20 ms on the partial
	# index of the rows still to send: a psql started every 50 ms for a
	# count over the table took 8-9 % of the machine from what is
	# measured, and a server-side loop (one DO block) held one snapshot for
	# the whole run, so that no dead row version could be pruned and every
	# claim stepped over all the rows sent before it (22 ms per claim of
	# 128 instead of ~2).
	/usr/bin/python3 - "host=$PGHOST port=$PGPORT dbname=$DB user=${PGUSER:-postgres} sslmode=disable" <<'PY'
import sys, time
import psycopg2
c = psycopg2.connect(sys.argv[1])
c.autocommit = True
cur = c.cursor()
while True:
    cur.execute("SELECT EXISTS (SELECT 1 FROM rd.outbox"
                " WHERE status IN ('queued', 'retrying', 'sending'))")
    if not cur.fetchone()[0]:
        break
    time.sleep(0.02)
PY
	t1=$(date +%s.%N)
	sent=$($PSQL -d "$DB" -c "SELECT count(*) FROM rd.outbox WHERE status = 'sent'")
	[ "$sent" = "$MAILS" ] || { echo "mail_bench: $sent of $MAILS mails sent" >&2; exit 1; }
	RD_RATE=$(echo "$MAILS / ($t1 - $tc)" | bc -l)
	# the dead row versions go now, not by an autovacuum during the next
	# round's smtp-source (which it slowed to half its rate)
	$PSQL -d "$DB" -c "TRUNCATE rd.outbox"
}

# ROUNDS rounds of smtp-source then rosterd: both rates move by a quarter
# from minute to minute on this shared machine (smtp-source 11,200-17,600
# mails/s in one quiet hour), so each round compares two runs seconds
# apart, and the median of the rounds' ratios is the result. (The order
# within a round is always the same; rosterd's clock starts when psql has
# returned from the commit, a few ms after the workers could start.)
printf 'mails=%d size=%d workers/sessions=%d rounds=%d\n' "$MAILS" "$SIZE" "$WORKERS" "$ROUNDS"
RATIOS=""
for r in $(seq "$ROUNDS"); do
	src_round
	rd_round
	ratio=$(echo "100 * $RD_RATE / $SRC_RATE" | bc -l)
	RATIOS="$RATIOS $ratio"
	printf 'round %d: smtp-source %6.0f mails/s, rosterd %6.0f mails/s = %3.0f %% (queueing %.2f s, not counted)\n' \
		"$r" "$SRC_RATE" "$RD_RATE" "$ratio" "$QUEUE_S"
done
MEDIAN=$(printf '%s\n' $RATIOS | sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}')
printf 'rosterd / smtp-source: median %.0f %% over %d rounds (target >= 50 %%)\n' "$MEDIAN" "$ROUNDS"
