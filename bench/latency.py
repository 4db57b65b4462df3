#!/usr/bin/python3
"""latency.py - apply latency at a steady publishing rate.

    latency.py --rosterd BIN --config FILE --dsn DSN --amqp-url URL
               --rate R --seconds T --shared DIR

Starts rosterd on an empty queue, publishes realistic booking.created
events (../shared/bench/publish_events.py's generator) at R per second for
T seconds, waits until all are applied, then reads the status document:
its latency_ms (receipt to acknowledgement, the last 4096 messages) is the
steady-state apply latency at that rate. Prints one line:
  latency rate=R n=N p50_ms=.. p99_ms=.. achieved_rate=..
"""
import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time

import msgpack
import pika
import psycopg2


def count(dsn):
    with psycopg2.connect(dsn) as c, c.cursor() as cur:
        cur.execute("SELECT count(*) FROM report.messages")
        return cur.fetchone()[0]


def main():
    ap = argparse.ArgumentParser()
    for k in ("rosterd", "config", "dsn", "amqp-url", "shared"):
        ap.add_argument("--" + k, required=True)
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--log", default="/dev/null")
    ap.add_argument("--seed", type=int, default=99)
    a = ap.parse_args()
    sys.path.insert(0, a.shared)
    from publish_events import make_event  # noqa: E402  the shared generator

    base = count(a.dsn)
    log = open(a.log, "wb")
    p = subprocess.Popen([a.rosterd, "-c", a.config], stderr=log)
    for _ in range(600):
        with open(a.log, "rb") as f:
            if b" ready " in f.read():
                break
        time.sleep(0.05)
    conn = pika.BlockingConnection(pika.URLParameters(a.amqp_url))
    ch = conn.channel()
    props = pika.BasicProperties(content_type="application/msgpack", delivery_mode=2)
    rng = random.Random(a.seed)
    n = int(a.rate * a.seconds)
    t0 = time.monotonic()
    for i in range(n):
        due = t0 + i / a.rate
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        body = msgpack.packb(make_event(rng, 10_000_000 + i, 100000, 0.2, 10), use_bin_type=True)
        ch.basic_publish("rosterd.events", "booking.created", body, props)
    achieved = n / (time.monotonic() - t0)
    deadline = time.monotonic() + 120
    while count(a.dsn) - base < n and time.monotonic() < deadline:
        time.sleep(0.05)
    q = ch.queue_declare("", exclusive=True).method.queue
    ch.queue_bind(q, "rosterd.status")
    os.kill(p.pid, signal.SIGUSR1)
    st = {}
    for _ in range(50):
        m, _, body = ch.basic_get(q, auto_ack=True)
        if m:
            st = json.loads(body)
            break
        time.sleep(0.1)
    conn.close()
    p.send_signal(signal.SIGTERM)
    p.wait(30)
    lat = st.get("latency_ms", {})
    print("latency rate=%.0f n=%d p50_ms=%.2f p99_ms=%.2f achieved_rate=%.0f" % (
        a.rate, n, lat.get("p50", 0), lat.get("p99", 0), achieved))


if __name__ == "__main__":
    sys.exit(main())
