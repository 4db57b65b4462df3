#!/usr/bin/python3
"""drain.py - run rosterd on a pre-filled queue and measure how fast it drains.

    drain.py --rosterd BIN --config FILE --dsn DSN --count N [--amqp-url URL]
             [--status-exchange rosterd.status]

Starts rosterd, waits until report.messages holds N more rows than at the
start, then asks for a status document (SIGUSR1), stops rosterd with
SIGTERM and prints one line:
  rosterd n=N seconds=S events_per_s=R rss_peak_kb=K p50_ms=.. p99_ms=.. exit=0
The clock runs from rosterd's `ready` log line to the N-th row.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

import pika
import psycopg2


class Counter:
    """count(*) of report.messages over one connection. The count scans the
    table, so it is taken only as often as the end of the run needs: about
    twice per remaining-time estimate, at most once a second and at least
    every 50 ms. (A new connection and a count every 50 ms cost PostgreSQL
    ~2 ms each at the start of a 200,000-event run and ~20 ms at its end:
    up to 40 % of a core taken from what is measured, more as the table
    grew.)"""

    def __init__(self, dsn):
        self.dsn = dsn
        self.conn = None

    def __call__(self):
        try:
            if self.conn is None or self.conn.closed:
                self.conn = psycopg2.connect(self.dsn)
                self.conn.autocommit = True
            with self.conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM report.messages")
                return cur.fetchone()[0]
        except psycopg2.Error:
            self.conn = None
            return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rosterd", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--dsn", required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--amqp-url", required=True)
    ap.add_argument("--status-exchange", default="rosterd.status")
    ap.add_argument("--log", default="/dev/null")
    ap.add_argument("--timeout", type=float, default=1800)
    a = ap.parse_args()

    count = Counter(a.dsn)
    base = count()
    log = open(a.log, "wb")
    p = subprocess.Popen([a.rosterd, "-c", a.config], stderr=log)
    t_ready = None
    deadline = time.monotonic() + 60
    while t_ready is None and time.monotonic() < deadline:
        with open(a.log, "rb") as f:
            if b" ready " in f.read():
                t_ready = time.monotonic()
        time.sleep(0.02)
    if t_ready is None:
        p.kill()
        sys.exit("rosterd did not become ready")
    rss = 0
    deadline = t_ready + a.timeout
    n = 0
    next_count = 0.0
    while time.monotonic() < deadline:
        try:
            with open("/proc/%d/status" % p.pid) as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        rss = int(line.split()[1])
        except OSError:
            pass
        now = time.monotonic()
        if now >= next_count:
            n = count() - base
            if n >= a.count:
                break
            rate = n / (now - t_ready) if n > 0 else 0
            wait = (a.count - n) / rate / 2 if rate > 0 else 0.05
            next_count = now + min(1.0, max(0.05, wait))
        time.sleep(0.05)
    t_done = time.monotonic()
    # the status document, for the latency percentiles
    st = {}
    try:
        c = pika.BlockingConnection(pika.URLParameters(a.amqp_url))
        ch = c.channel()
        q = ch.queue_declare("", exclusive=True).method.queue
        ch.queue_bind(q, a.status_exchange)
        os.kill(p.pid, signal.SIGUSR1)
        for _ in range(50):
            m, _, body = ch.basic_get(q, auto_ack=True)
            if m:
                st = json.loads(body)
                break
            time.sleep(0.1)
        c.close()
    except Exception as e:  # the measurement stands without it
        print("status: %s" % e, file=sys.stderr)
    p.send_signal(signal.SIGTERM)
    rc = p.wait(30)
    secs = t_done - t_ready
    lat = st.get("latency_ms", {})
    print("rosterd n=%d seconds=%.2f events_per_s=%.0f rss_peak_kb=%d p50_ms=%.2f p99_ms=%.2f "
          "exit=%d" % (n, secs, n / secs if secs > 0 else 0, rss, lat.get("p50", 0),
                       lat.get("p99", 0), rc))
    return 0 if n >= a.count and rc == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
