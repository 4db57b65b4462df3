#!/usr/bin/env bash
# demo.sh - the whole demo on a fresh Debian 12 machine: installs what is
# missing, builds rosterd, starts a private PostgreSQL, RabbitMQ and SMTP
# sink on loopback in a temporary directory, runs rosterd, feeds it a sample
# stream of bookings, prints what it did, and stops everything again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
PY=/usr/bin/python3

bash scripts/install-deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$(nproc)" >/dev/null
echo "== built build/rosterd and build/rosterctl"

STATE=$(mktemp -d /tmp/rosterd-demo.XXXXXX)
chmod 0755 "$STATE"   # the postgres user must reach its data directory
ROSTERD_PID=""
cleanup() {
  if [ -n "$ROSTERD_PID" ] && kill -0 "$ROSTERD_PID" 2>/dev/null; then
    kill -TERM "$ROSTERD_PID" 2>/dev/null || true
    wait "$ROSTERD_PID" 2>/dev/null || true
  fi
  bash tests/fixture/servers.sh stop "$STATE/servers" >/dev/null 2>&1 || true
  rm -rf "$STATE"
}
trap cleanup EXIT

echo "== starting PostgreSQL, RabbitMQ and an SMTP sink in $STATE"
bash tests/fixture/servers.sh start "$STATE/servers" >/dev/null
set -a; . "$STATE/servers/env"; set +a
psql() { command psql -h 127.0.0.1 -p "$PGPORT" -U postgres -X "$@"; }
db() { psql -d rosterd "$@"; }
psql -qc "CREATE ROLE rosterd LOGIN" -c "CREATE DATABASE rosterd OWNER rosterd" >/dev/null

cat >"$STATE/rosterd.conf" <<CONF
[daemon]
instance = demo-1
status_interval = 2
retry_base_ms = 500
[amqp]
url = $AMQP_URL
[postgres]
conninfo = host=127.0.0.1 port=$PGPORT dbname=rosterd user=rosterd
[smtp]
host = 127.0.0.1
port = $SMTP_PORT
CONF
chmod 0600 "$STATE/rosterd.conf"
./build/rosterd -c "$STATE/rosterd.conf" --check-config
./build/rosterd -c "$STATE/rosterd.conf" 2>"$STATE/rosterd.log" &
ROSTERD_PID=$!
for _ in $(seq 1 100); do grep -q ' ready ' "$STATE/rosterd.log" && break; sleep 0.1; done
echo "== rosterd running (pid $ROSTERD_PID); publishing the sample stream"
$PY demo/sample_stream.py --url "$AMQP_URL" --bookings 40

# settled when every message with an id has its row and the queue is empty
for _ in $(seq 1 120); do
  depth=$("$RABBITMQCTL" -q list_queues name messages 2>/dev/null | awk '$1=="rosterd.events"{print $2}')
  waiting=$("$RABBITMQCTL" -q list_queues name messages 2>/dev/null | awk '$1 ~ /^rosterd\.retry\./{s+=$2} END{print s+0}')
  [ "${depth:-1}" = 0 ] && [ "$waiting" = 0 ] && break
  sleep 0.5
done
sleep 1

echo; echo "== what rosterd did (report.messages)"
db -c "SELECT org, outcome, count(*) FROM report.messages GROUP BY 1, 2 ORDER BY 1, 2"
echo "== rejected messages and why"
db -c "SELECT org, message_id, type, reason FROM report.messages WHERE outcome = 'rejected'"
echo "== how bookers and attendees were matched to contacts (SPEC 4.1)"
db -c "SELECT org, 'booker' AS who, match, count(*) FROM report.bookings GROUP BY 1, 3
         UNION ALL SELECT org, 'attendee', match, count(*) FROM report.attendees GROUP BY 1, 3
         ORDER BY 1, 2, 3"
echo "== contacts per organisation"
db -c "SELECT org, count(*) AS contacts, count(email) AS with_email FROM report.contacts GROUP BY 1"
echo "== one contact's timeline"
db -c "SELECT a.at::time(0), a.kind, a.summary, a.message_id FROM report.activity a
         WHERE a.contact_id = (SELECT contact_id FROM report.bookings WHERE org = 'acme-events'
                               AND contact_id IS NOT NULL ORDER BY created_at LIMIT 1)
         ORDER BY a.at, a.kind"
echo "== dead-letter queue (rejected before they could be recorded, and recorded ones)"
"$RABBITMQCTL" -q list_queues name messages | grep -E '^rosterd\.(dead|events)\b' || true
echo "== status document (rosterd.status exchange)"
$PY - "$AMQP_URL" "$ROSTERD_PID" <<'PYEOF'
import json, os, signal, sys, time, pika
c = pika.BlockingConnection(pika.URLParameters(sys.argv[1]))
ch = c.channel()
q = ch.queue_declare("", exclusive=True).method.queue
ch.queue_bind(q, "rosterd.status")
os.kill(int(sys.argv[2]), signal.SIGUSR1)
for _ in range(50):
    m, _, body = ch.basic_get(q, auto_ack=True)
    if m:
        print(json.dumps(json.loads(body), indent=2))
        break
    time.sleep(0.1)
c.close()
PYEOF
ctl() { ./build/rosterctl -c "$STATE/rosterd.conf" "$@"; }
echo "== rosterctl messages --org acme-events (latest 5)"
ctl messages --org acme-events --limit 5
echo "== balances per contact and currency (report.balances, first 5)"
db -c "SELECT org, contact_id, currency, balance FROM report.balances ORDER BY org, balance LIMIT 5"
echo "== rosterctl ledger check"
ctl ledger check
echo "== the outbox (SPEC 4.8) and the mails the SMTP sink received"
for _ in $(seq 1 50); do
  [ "$(db -Atc "SELECT count(*) FROM report.outbox WHERE status IN ('queued','sending')")" = 0 ] && break
  sleep 0.2
done
db -c "SELECT org, template, status, count(*) FROM report.outbox GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
echo "mails in the SMTP sink: $(find "$SMTP_DIR" -type f -name "*.eml" 2>/dev/null | wc -l)"
VRENI=$(db -Atc "SELECT contact_id FROM report.contacts WHERE org = 'acme-events' AND email = 'vreni.huber@example.org'")
OTHER=$(db -Atc "SELECT contact_id FROM report.contacts WHERE org = 'acme-events' AND email = 'v.huber@example.net'")
echo "== rosterctl duplicates --org acme-events --limit 3"
ctl duplicates --org acme-events --limit 3
echo "== rosterctl merge $VRENI $OTHER"
ctl merge "$VRENI" "$OTHER" --org acme-events
echo "== rosterctl contact show vreni.huber@example.org --org acme-events"
ctl contact show vreni.huber@example.org --org acme-events
MID=$(db -Atc "SELECT merge_id FROM report.merges WHERE org = 'acme-events' ORDER BY merge_id DESC LIMIT 1")
echo "== rosterctl unmerge $MID"
ctl unmerge "$MID" --org acme-events
echo; echo "== stopping rosterd (SIGTERM drains)"
kill -TERM "$ROSTERD_PID"; wait "$ROSTERD_PID" && echo "rosterd exited 0"
ROSTERD_PID=""
