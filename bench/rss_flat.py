#!/usr/bin/python3
"""rss_flat.py - rosterd's resident memory over a long run (Step 6: "flat over
a run of 1,000,000 messages").

    rss_flat.py --rosterd BIN --config FILE --amqp-url URL --shared DIR
                [--count 1000000] [--new-ratio 0.1] [--bad-ratio 0.005]
                [--queue rosterd.events] [--exchange rosterd.events]

Starts rosterd on an empty queue and feeds it COUNT messages while it runs,
keeping at most 50,000 waiting in the queue. A share NEW_RATIO are new
booking.created events of the shared publisher (../shared/bench/
publish_events.py: full rules, mails queued); BAD_RATIO are broken bodies
(cut msgpack: decoded, rejected, published to the dead-letter exchange with
publisher confirms); the rest are byte-identical re-sends of recent events
(decoded, batched, found applied: the idempotency path). Every 2 s it
samples VmRSS of rosterd. At the end (queue empty, nothing unacknowledged)
it prints the samples at every tenth of the run and one line:

  rss n=N seconds=S warm_kb=W max_after_warm_kb=M final_kb=F growth_kb=G hwm_kb=H

warm = RSS once 10 % of the messages were consumed; growth = max after that
minus warm. Exit status 0 when rosterd exited 0 and every message was
consumed.
"""
import argparse
import collections
import os
import random
import signal
import subprocess
import sys
import time

import msgpack
import pika


def rss_kb(pid, key="VmRSS:"):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rosterd", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--amqp-url", required=True)
    ap.add_argument("--shared", required=True, help="../shared/bench")
    ap.add_argument("--count", type=int, default=1000000)
    ap.add_argument("--new-ratio", type=float, default=0.1)
    ap.add_argument("--bad-ratio", type=float, default=0.005)
    ap.add_argument("--queue", default="rosterd.events")
    ap.add_argument("--exchange", default="rosterd.events")
    ap.add_argument("--log", default="/dev/null")
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    sys.path.insert(0, a.shared)
    from publish_events import make_event  # the shared publisher's events

    rng = random.Random(a.seed)
    conn = pika.BlockingConnection(pika.URLParameters(a.amqp_url))
    ch = conn.channel()
    ch.exchange_declare(a.exchange, exchange_type="topic", durable=True)
    ch.queue_declare(a.queue, durable=True)
    ch.queue_bind(a.queue, a.exchange, routing_key="#")
    ch.queue_purge(a.queue)
    ch.confirm_delivery()
    props = pika.BasicProperties(content_type="application/msgpack", delivery_mode=2)

    def depth():
        return ch.queue_declare(a.queue, durable=True, passive=True).method.message_count

    log = open(a.log, "wb")
    p = subprocess.Popen([a.rosterd, "-c", a.config], stderr=log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with open(a.log, "rb") as f:
            if b" ready " in f.read():
                break
        time.sleep(0.05)
    else:
        p.kill()
        sys.exit("rosterd did not become ready")

    recent = collections.deque(maxlen=20000)
    samples = []  # (consumed, rss_kb)
    kinds = collections.Counter()
    t0 = time.monotonic()
    last_sample = 0.0
    published = 0
    chunk = 2000
    while True:
        waiting = depth()
        consumed = published - waiting
        now = time.monotonic()
        if now - last_sample >= 2.0:
            samples.append((consumed, rss_kb(p.pid)))
            last_sample = now
        if p.poll() is not None:
            break
        if published >= a.count:
            if waiting == 0:
                break
            time.sleep(0.2)
            continue
        if waiting > 50000:
            time.sleep(0.1)
            continue
        for _ in range(min(chunk, a.count - published)):
            r = rng.random()
            if r < a.bad_ratio:
                body = msgpack.packb(make_event(rng, published, 100000, 0.2, 10),
                                     use_bin_type=True)[:-7]
                kinds["bad"] += 1
            elif r < a.bad_ratio + a.new_ratio or not recent:
                body = msgpack.packb(make_event(rng, published, 100000, 0.2, 10),
                                     use_bin_type=True)
                recent.append(body)
                kinds["new"] += 1
            else:
                body = recent[rng.randrange(len(recent))]
                kinds["resent"] += 1
            ch.basic_publish(a.exchange, "booking.created", body, props)
            published += 1
    # nothing waiting: give the last prefetch time to settle, then stop
    time.sleep(3)
    samples.append((published - depth(), rss_kb(p.pid)))
    hwm = rss_kb(p.pid, "VmHWM:")
    secs = time.monotonic() - t0
    p.send_signal(signal.SIGTERM)
    try:
        rc = p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()
        rc = -9
    conn.close()

    warm_at = a.count // 10
    warm = next((kb for n, kb in samples if n >= warm_at), samples[-1][1])
    after = [kb for n, kb in samples if n >= warm_at] or [warm]
    print("samples (consumed messages: RSS kB), every tenth of the run:")
    shown = 0
    for n, kb in samples:
        if n >= shown * a.count // 10:
            print("  %9d: %d" % (n, kb))
            shown = n * 10 // a.count + 1
    print("messages: %s" % " ".join("%s=%d" % kv for kv in sorted(kinds.items())))
    print("rss n=%d seconds=%.0f warm_kb=%d max_after_warm_kb=%d final_kb=%d growth_kb=%d "
          "hwm_kb=%d exit=%d" % (published, secs, warm, max(after), samples[-1][1],
                                 max(after) - warm, hwm, rc))
    return 0 if rc == 0 and published >= a.count else 1


if __name__ == "__main__":
    sys.exit(main())
