"""test_resources.py - Step 7: resources stay flat.

- 1,000 reconnects: rosterd's RabbitMQ connections are reset by a TcpProxy
  between it and the broker (consumer and publisher: 2 reconnects a cycle)
  and its PostgreSQL connections are ended by pg_terminate_backend (every
  backend of the instance: the pool and the mail workers' connections),
  with messages flowing; open file descriptors (/proc/PID/fd) end where
  they started, RSS (/proc/PID/status VmRSS) does not grow; nothing lost.
- Memory bounded: RSS under 64 MiB at the default settings while a
  realistic stream of 20,000 messages is consumed.

RSS is only meaningful without sanitizers: the RSS checks use
ROSTERD_PLAIN_BIN (scripts/test.sh builds build-plain) and are skipped,
with that reason, when it is not set; the descriptor checks run with
whichever rosterd is given."""
import os
import time

import pytest

from checks_util import TcpProxy, realistic
from harness import wait_for, wait_messages

RECONNECTS = 1000


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for pid %d" % pid)


def nfds(pid):
    return len(os.listdir("/proc/%d/fd" % pid))


def count(db):
    return db.query1("SELECT count(*) FROM report.messages") or 0


def backends(db, instance):
    return {r[0] for r in db.query("SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                                   instance)}


def test_1000_reconnects_fds_and_rss_flat(rosterd, amqp, db, servers):
    plain = os.environ.get("ROSTERD_PLAIN_BIN")
    proxy = TcpProxy(servers.amqp_host, servers.amqp_port)
    try:
        url = servers.amqp_url.replace(":%d/" % servers.amqp_port, ":%d/" % proxy.port)
        rd = rosterd(start=False, url=url, log_level="notice", workers=3,
                     **{"postgres.connections": 5})
        if plain:
            rd.binary = plain
        rd.start()
        rd.wait_ready(30)
        pid = rd.pid
        setup, events = realistic(3000, orgs=4, tag="rc")
        amqp.publish_many(setup)
        wait_messages(db, len(setup))
        chunks = [events[k:k + 20] for k in range(0, len(events), 20)]

        nbackends = len(wait_for(lambda: (lambda b: b if len(b) == 5 + 3 else None)(
            backends(db, rd.instance)), 30, 0.1, "5 pool + 3 mail worker backends"))
        reconnects = 0
        cycle = 0
        samples = []

        def one_cycle():
            nonlocal reconnects, cycle
            cycle += 1
            if chunks:  # messages keep flowing
                amqp.publish_many(chunks.pop())
            # AMQP: reset both connections (consumer and publisher)
            n = len(rd.log_events("amqp.connected"))
            had = proxy.open()
            proxy.drop_all()
            # PostgreSQL: end every backend of the instance
            old = backends(db, rd.instance)
            db.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                     " WHERE application_name = %s", rd.instance)
            wait_for(lambda: len(rd.log_events("amqp.connected")) >= n + had
                     and (lambda b: len(b) == nbackends and not (b & old))(
                         backends(db, rd.instance)),
                     30, 0.02, "cycle %d: every connection back" % cycle)
            reconnects += had + len(old)

        # warm up (allocator arenas, caches, libpq/librabbitmq buffers)
        for _ in range(20):
            one_cycle()
        base_fds, base_rss = nfds(pid), rss_kib(pid)
        t0 = time.monotonic()
        reconnects = 0
        while reconnects < RECONNECTS:
            one_cycle()
            if cycle % 25 == 0:
                samples.append((reconnects, nfds(pid), rss_kib(pid)))
        took = time.monotonic() - t0
        published = len(setup) + (len(events) - sum(len(c) for c in chunks))
        wait_for(lambda: count(db) >= published, 60, 0.2, "%d messages applied" % published)
        # idle again: the descriptors and memory at rest
        time.sleep(1.0)
        end_fds = min(nfds(pid) for _ in range(5) if time.sleep(0.1) is None)
        end_rss = rss_kib(pid)
        print("\n%d reconnects in %d cycles, %.1f s; fds %d -> %d; RSS %d -> %d KiB; samples %s"
              % (reconnects, cycle - 20, took, base_fds, end_fds, base_rss, end_rss,
                 samples))
        assert rd.alive
        assert reconnects >= RECONNECTS
        assert end_fds <= base_fds, "descriptors leaked: %d -> %d" % (base_fds, end_fds)
        if plain:
            # flat: a leak of even 1 KiB per reconnect would add 500 KiB over
            # the second half; allocator noise (messages keep flowing) stays
            # well under that. Total growth bounded too.
            # (RSS moves with the messages in flight: compare the floors)
            first = [r for n, _, r in samples if n < RECONNECTS // 2] + [base_rss]
            second = [r for n, _, r in samples if n >= RECONNECTS // 2] + [end_rss]
            assert min(second) - min(first) < 512, \
                "RSS still growing in the second half: %s -> %d KiB" % (samples, end_rss)
            assert end_rss - base_rss < 2048, "RSS grew %d KiB" % (end_rss - base_rss)
        assert rd.stop(15) == 0
    finally:
        proxy.close()


def test_rss_under_64mib_at_defaults(rosterd, amqp, db):
    plain = os.environ.get("ROSTERD_PLAIN_BIN")
    if not plain:
        pytest.skip("ROSTERD_PLAIN_BIN is not set: RSS of a sanitizer build means nothing "
                    "(scripts/test.sh builds build-plain/rosterd)")
    # rosterd's defaults, except what the harness needs (names, servers)
    rd = rosterd(start=False, status_interval=None, retry_base_ms=None, max_retries=None,
                 log_level="notice", workers=None, mail_retry_base_ms=None)
    rd.binary = plain
    rd.start()
    rd.wait_ready(30)
    setup, events = realistic(20000, orgs=10, tag="mem")
    amqp.publish_many(setup)
    wait_messages(db, len(setup))
    amqp.publish_many(events)
    peak = 0
    deadline = time.monotonic() + 300
    while count(db) < len(setup) + len(events):
        peak = max(peak, rss_kib(rd.pid))
        assert time.monotonic() < deadline, "not all applied in 300 s"
        time.sleep(0.05)
    peak = max(peak, rss_kib(rd.pid))
    print("\nRSS peak at defaults over %d messages: %d KiB" % (len(setup) + len(events), peak))
    assert peak < 64 * 1024
    assert rd.stop(15) == 0
