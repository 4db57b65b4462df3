"""test_chaos.py - Step 7: a chaos test with an oracle (docs/chaos.md).

20,000 mixed events over 50 organisations (oracle.ChaosStream) go through 3
rosterd instances on one queue while a seeded schedule SIGKILLs rosterd 25
times (a new instance is started each time), kills RabbitMQ 3 times (kill
-9 of the node, then start), stops PostgreSQL in immediate mode 3 times,
pauses an instance with SIGSTOP 5 times (SIGCONT after 2-5 s) and makes the
SMTP sink hang up after the final dot 3 times. The publisher uses publisher
confirms and publishes again (same id) whatever was not confirmed, so every
message of the stream counts. At the end the oracle's end state must hold
exactly: every message settled once with the designed outcome, nothing
applied twice, contacts, bookings, invoices, balances and ledger rows as
computed, every expected mail in the sink at least once, a re-send only
with the same Message-ID and bytes and only after a lost reply, queues
drained, all instances alive and draining cleanly, `rosterctl ledger check`
exit 0.

ROSTERD_CHAOS_SEED replays a run (the seed is printed and named in every
failure); ROSTERD_CHAOS_EVENTS and ROSTERD_CHAOS_WINDOW (seconds of faults)
shrink it for development.
"""
import collections
import json
import os
import random
import re
import signal
import threading
import time

import pika
import psycopg2
import pytest

import harness
from harness import pack, wait_for
from oracle import ChaosStream

SEED = int(os.environ.get("ROSTERD_CHAOS_SEED") or random.SystemRandom().randrange(1, 10**6))
N_EVENTS = int(os.environ.get("ROSTERD_CHAOS_EVENTS", "20000"))
N_ORGS = 50
WINDOW = float(os.environ.get("ROSTERD_CHAOS_WINDOW", "300"))   # seconds of faults
N_INSTANCES = 3
FAULTS = {"kill": 25, "rabbit": 3, "pg": 3, "stop": 5, "hangup": 3}
SMTP_TIMEOUT = 5          # s; a dead worker's lease (4 x timeout) ends after 20 s
STALL_S = 120.0           # s without any message settling: a phase is stuck
LOST_REPLY_BEFORE = 40.0  # s: a mail stored this long before a fault may lose its reply

CFG = {"retry_base_ms": 50, "max_retries": 14, "log_level": "info",
       "smtp": {"timeout": SMTP_TIMEOUT, "workers": 2, "mail_retry_base_ms": 200}}


def log(text):
    print("[chaos %s] %s" % (time.strftime("%H:%M:%S"), text), flush=True)


class Publisher(threading.Thread):
    """Publishes the phases with publisher confirms, paced, on its own
    connection; whatever is not confirmed (broker killed, nack) is published
    again with the same id until it is. Waits for a phase to settle in
    PostgreSQL before the next one starts."""

    def __init__(self, servers, names, db, phases, rates, settle_timeout=600):
        super().__init__(daemon=True)
        self.servers, self.names, self.db = servers, names, db
        self.phases, self.rates = phases, rates
        self.conn = self.ch = None
        self.confirmed = 0
        self.republished = 0
        self.error = None
        self.phase_times = []
        self.settle_timeout = settle_timeout
        self.gave_up = []
        self.stop = False

    def _channel(self):
        if self.ch is None or self.ch.is_closed or self.conn.is_closed:
            self._close()
            params = pika.ConnectionParameters(
                host=self.servers.amqp_host, port=self.servers.amqp_port,
                credentials=pika.PlainCredentials("guest", "guest"), heartbeat=0,
                blocked_connection_timeout=30, connection_attempts=1, socket_timeout=5,
                stack_timeout=10)
            self.conn = pika.BlockingConnection(params)
            self.ch = self.conn.channel()
            self.ch.confirm_delivery()
        return self.ch

    def _close(self):
        try:
            if self.conn is not None and self.conn.is_open:
                self.conn.close()
        except Exception:
            pass
        self.conn = self.ch = None

    def publish(self, msg):
        props = pika.BasicProperties(delivery_mode=2, content_type="application/msgpack")
        body = pack(msg)
        deadline = time.monotonic() + 180
        tried = False
        while True:
            try:
                ch = self._channel()
                if tried:
                    self.republished += 1
                tried = True
                ch.basic_publish(self.names.exchange, msg["type"], body, props, mandatory=True)
                self.confirmed += 1
                return
            except (pika.exceptions.AMQPError, ConnectionError, OSError) as e:
                self._close()
                if time.monotonic() > deadline:
                    raise AssertionError("publisher: %s not confirmed within 180 s: %r"
                                         % (msg["id"], e))
                time.sleep(0.5)

    def unsettled(self, ids, conn):
        rows = []
        left = sorted({m for _, m in ids})
        for i in range(0, len(left), 5000):
            with conn.cursor() as cur:
                cur.execute("SELECT org, message_id FROM report.messages WHERE outcome <> 'duplicate'"
                            " AND message_id = ANY(%s)", (left[i:i + 5000],))
                rows += cur.fetchall()
        return set(ids) - {(o, m) for o, m in rows}

    def wait_settled(self, ids, timeout):
        """Until every message of ids has its report.messages row. Gives up
        (the oracle then names what is missing) after `timeout`, or when
        nothing has settled for STALL_S (longer than any retry delay this
        test can reach while the stream flows)."""
        deadline = time.monotonic() + timeout
        conn = None
        left = set(ids)
        progress = time.monotonic()
        while left:
            before = len(left)
            try:
                if conn is None or conn.closed:
                    conn = self.db.connect()
                left = self.unsettled(left, conn)
            except psycopg2.Error:
                try:
                    conn.close()
                except Exception:
                    pass
                conn = None
            if not left or self.stop:
                break
            if len(left) < before:
                progress = time.monotonic()
            if time.monotonic() > deadline or time.monotonic() - progress > STALL_S:
                self.gave_up.append(len(left))
                log("%d messages of the phase not settled (nothing settled for %.0f s): "
                    "going on, the oracle will tell" % (len(left), time.monotonic() - progress))
                break
            time.sleep(1.0)
        if conn is not None:
            conn.close()

    def run(self):
        try:
            for n, (phase, rate) in enumerate(zip(self.phases, self.rates)):
                t0 = time.monotonic()
                for i, m in enumerate(phase):
                    if self.stop:
                        return
                    due = t0 + i / rate
                    d = due - time.monotonic()
                    if d > 0:
                        time.sleep(d)
                    self.publish(m)
                t1 = time.monotonic()
                self.wait_settled({(m["org"], m["id"]) for m in phase}, self.settle_timeout)
                self.phase_times.append((len(phase), t1 - t0, time.monotonic() - t0))
                log("phase %s: %d published in %.0f s, settled after %.0f s"
                    % ("ABC"[n], len(phase), t1 - t0, time.monotonic() - t0))
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            self._close()


class Chaos:
    """The instances and the fault schedule."""

    def __init__(self, rosterd, servers, smtp, amqp, db, rng, busy=lambda: True):
        self.rosterd, self.servers, self.smtp, self.amqp, self.db = rosterd, servers, smtp, amqp, db
        self.rng = rng
        self.live = []
        self.killed_by_us = set()
        self.crashed = []
        self.pending_ready = {}          # Rosterd -> start time (monotonic)
        self.recovery = collections.defaultdict(list)
        self.windows = []                # (wall t0, wall t1, cause): replies may be lost
        self.done = collections.Counter()
        self.hangups_set = 0
        self.busy = busy                 # is there work in flight (a recovery to measure)?

    def start(self, wait=False):
        rd = self.rosterd(wait=wait, **CFG)
        self.live.append(rd)
        if not wait:
            self.pending_ready[rd] = time.monotonic()
        return rd

    def poll(self):
        """Restart instances that died on their own (recorded as crashes) and
        note when started ones became ready."""
        for rd in list(self.live):
            if not rd.alive and rd not in self.killed_by_us:
                self.crashed.append("%s exited %s:\n%s" % (rd.instance, rd.returncode, rd.tail(40)))
                self.live.remove(rd)
                self.start()
        for rd, t in list(self.pending_ready.items()):
            if rd.READY_RE.search(rd.log_text()):
                self.recovery["instance ready after start"].append(time.monotonic() - t)
                del self.pending_ready[rd]

    def schedule(self, t_begin):
        """(monotonic time, kind) in time order: the faults in shuffled order
        over the window, except the hang-ups, which need mails in flight:
        they fall in its first half, while phase A is being published."""
        kinds = [k for k, n in FAULTS.items() if k != "hangup" for _ in range(n)]
        self.rng.shuffle(kinds)
        slot = (WINDOW - 10) / len(kinds)
        plan = [(t_begin + 10 + i * slot + self.rng.uniform(0, slot * 0.5), k)
                for i, k in enumerate(kinds)]
        hslot = (WINDOW * 0.5 - 15) / FAULTS["hangup"]
        plan += [(t_begin + 15 + i * hslot + self.rng.uniform(0, hslot * 0.5), "hangup")
                 for i in range(FAULTS["hangup"])]
        return sorted(plan)

    def victim(self):
        return self.rng.choice(self.live)

    def fault(self, kind):
        now = time.time()
        if kind == "kill":
            rd = self.victim()
            self.killed_by_us.add(rd)
            rd.sigkill()
            rd.wait_exit(10)
            self.live.remove(rd)
            self.windows.append((now - LOST_REPLY_BEFORE, time.time() + 1, "sigkill"))
            self.start()
        elif kind == "stop":
            rd = self.victim()
            pause = self.rng.uniform(2, 5)
            rd.signal(signal.SIGSTOP)
            time.sleep(pause)
            rd.signal(signal.SIGCONT)
            self.windows.append((now - LOST_REPLY_BEFORE, time.time() + LOST_REPLY_BEFORE, "sigstop"))
        elif kind == "rabbit":
            self.servers.rabbit_kill()
            time.sleep(self.rng.uniform(1, 3))
            self.servers.rabbit_start()
            t = time.monotonic()

            def consuming():
                try:
                    return (self.amqp.consumer_count("queue") or 0) >= len(self.live)
                except Exception:
                    return False
            try:
                wait_for(consuming, 90, 0.5, "all instances consuming again")
                self.recovery["consumers back after RabbitMQ start"].append(time.monotonic() - t)
            except AssertionError:
                self.recovery["consumers back after RabbitMQ start"].append(float("inf"))
        elif kind == "pg":
            before = self._settled_count()
            self.servers.pg_kill()
            time.sleep(self.rng.uniform(1, 4))
            self.servers.pg_start()
            t = time.monotonic()
            self.windows.append((now - LOST_REPLY_BEFORE, time.time() + LOST_REPLY_BEFORE, "pg stop"))
            try:
                if not self.busy():
                    raise AssertionError("idle")
                wait_for(lambda: (self._settled_count() or 0) > (before or 0), 60, 0.2,
                         "a message settled after the PostgreSQL restart")
                self.recovery["settling again after PostgreSQL start"].append(time.monotonic() - t)
            except AssertionError:
                pass  # nothing was waiting to be settled
        elif kind == "hangup":
            # the previous one must have happened (setting the mode again
            # restarts its count)
            try:
                wait_for(lambda: len(self.smtp.events("hangup")) >= self.hangups_set, 60, 0.2,
                         "the previous hang-up")
            except AssertionError:
                pass  # reported at the end (count of hang-ups)
            self.smtp.set_mode("hangup_after_data", count=1)
            self.hangups_set += 1
        self.done[kind] += 1
        log("fault %s done (%s)" % (kind, dict(self.done)))

    def _settled_count(self):
        try:
            return self.db.query1("SELECT count(*) FROM report.messages")
        except psycopg2.Error:
            return None


def queue_counts(servers, prefix):
    out = servers.rabbitmqctl("-q", "list_queues", "name", "messages", "messages_unacknowledged",
                              "--no-table-headers")
    res = {}
    for line in out.splitlines():
        p = line.split()
        if len(p) == 3 and p[0].startswith(prefix):
            res[p[0]] = (int(p[1]), int(p[2]))
    return res


@pytest.mark.timeout(870)  # ctest: TIMEOUT 900
def test_chaos_oracle(rosterd, servers, amqp, db, smtp, names):
    t_start = time.monotonic()
    log("seed %d (replay: ROSTERD_CHAOS_SEED=%d), %d events, %d organisations, window %.0f s"
        % (SEED, SEED, N_EVENTS, N_ORGS, WINDOW))
    rng = random.Random(SEED)
    orgs = ["ch%02d" % i for i in range(N_ORGS)]
    stream = ChaosStream(SEED, orgs, N_EVENTS)
    chaos = Chaos(rosterd, servers, smtp, amqp, db, random.Random(SEED + 1))
    for _ in range(N_INSTANCES):
        chaos.start(wait=True)

    # setup, before any fault: organisations, offers, templates, known contacts
    pub0 = Publisher(servers, names, db, [stream.setup], [1e9], settle_timeout=120)
    pub0.run()
    assert pub0.error is None and not pub0.gave_up, (pub0.error, pub0.gave_up)
    contact_ids = {}
    for org in orgs:
        ids = dict(db.query("SELECT email, contact_id FROM report.contacts WHERE org = %s", org))
        contact_ids[org] = [ids[stream.known_email(org, k)] for k in range(stream.known)]
    stream.build(contact_ids)
    log(stream.summary())

    # the stream under faults
    pa, pb, pc = (len(p) for p in stream.phases)
    rates = [pa / (WINDOW * 0.55), pb / (WINDOW * 0.25), max(1.0, pc / 5.0)]
    pub = Publisher(servers, names, db, stream.phases, rates)
    chaos.busy = pub.is_alive
    t_begin = time.monotonic()
    plan = chaos.schedule(t_begin)
    log("fault schedule: " + ", ".join("%.0f:%s" % (t - t_begin, k) for t, k in plan))
    pub.start()
    for t, kind in plan:
        while time.monotonic() < t:
            chaos.poll()
            time.sleep(0.2)
        chaos.fault(kind)
        chaos.poll()
    t_faults = time.monotonic()
    servers.ensure_up()
    while pub.is_alive():
        chaos.poll()
        pub.join(0.5)
        if time.monotonic() - t_start > 720:
            pub.stop = True
            pub.join(5)
            break
    assert pub.error is None, "seed %d: %s" % (SEED, pub.error)
    t_settled = time.monotonic()

    # quiescence: outbox delivered, queues drained
    def outbox_done():
        chaos.poll()
        try:
            return db.query1("SELECT count(*) FROM report.outbox WHERE status <> 'sent'") == 0
        except psycopg2.Error:
            return False
    problems = []
    try:
        wait_for(outbox_done, 120, 0.5, "every outbox row sent")
    except AssertionError as e:
        problems.append("outbox: %s; not sent: %r" % (e, db.query(
            "SELECT org, template, status, attempts, last_error FROM report.outbox "
            "WHERE status <> 'sent' LIMIT 5")))
    prefix = names.prefix
    dead_q = names.dead_queue

    def drained():
        try:
            q = queue_counts(servers, prefix)
        except Exception:
            return False
        return all(v == (0, 0) for k, v in q.items() if k != dead_q) and q
    try:
        wait_for(drained, 60, 1.0, "queues drained")
    except AssertionError:
        problems.append("queues not drained: %r" % {k: v for k, v in queue_counts(servers, prefix)
                                                    .items() if k != dead_q and v != (0, 0)})
    t_quiet = time.monotonic()

    # ---- the oracle ---------------------------------------------------------
    def expect(cond, what, detail=()):
        if not cond:
            items = list(detail)
            problems.append("%s (%d): %s" % (what, len(items), items[:8]))

    # every message once, with the designed outcome
    rows = db.query("SELECT org, message_id, outcome, reason FROM report.messages")
    first = {}
    dup_rows = 0
    twice = []
    for org, mid, outcome, reason in rows:
        if outcome == "duplicate":
            dup_rows += 1
            continue
        if (org, mid) in first:
            twice.append((org, mid, outcome))
        first[(org, mid)] = (outcome, reason)
    want = stream.outcomes
    lost = sorted(set(want) - set(first))
    expect(not lost, "LOST: confirmed messages with no report.messages row", lost)
    expect(not twice, "APPLIED TWICE: more than one non-duplicate report.messages row", twice)
    extra = sorted(set(first) - set(want))
    expect(not extra, "unknown messages in report.messages", extra)
    wrong = [(k, want[k], first[k]) for k in want if k in first and first[k][0] != want[k]]
    expect(not wrong, "wrong outcome (id, expected, got)", wrong)
    bad_reason = [(k, r, first.get(k)) for k, r in stream.reject_reason.items()
                  if k in first and r not in (first[k][1] or "")]
    expect(not bad_reason, "rejected with another reason", bad_reason)
    # a duplicate leaves no row of its own here; the instance that settled it logs it
    resent = {(m["org"], m["id"]) for m in stream.resent}
    dups = {(e.get("org"), e.get("id")) for rd in rosterd.instances
            for e in rd.log_events("msg.settled") if e.get("outcome") == "duplicate"}
    expect(resent <= dups, "resent messages not settled as duplicates", sorted(resent - dups))

    # contacts: one per email, exactly the emails of the stream
    got_c = collections.defaultdict(collections.Counter)
    for org, email in db.query("SELECT org, email FROM report.contacts WHERE merged_into IS NULL"):
        got_c[org][email] += 1
    want_c = stream.contacts()
    for org in orgs:
        many = [e for e, n in got_c[org].items() if n > 1]
        expect(not many, "%s: emails with more than one contact" % org, many)
        expect(set(got_c[org]) == want_c[org], "%s: contact emails differ (missing, extra)" % org,
               [sorted(want_c[org] - set(got_c[org]))[:5], sorted(set(got_c[org]) - want_c[org])[:5]])
    got_b = {(r[0], r[1]): (r[2], r[3], r[4]) for r in db.query(
        "SELECT b.org, b.booking_id, b.email, b.version, b.status FROM report.bookings b")}
    want_b = stream.bookings()
    expect(got_b == want_b, "bookings differ (key, expected, got)",
           [(k, want_b.get(k), got_b.get(k)) for k in set(want_b) | set(got_b)
            if want_b.get(k) != got_b.get(k)])

    # the ledger: invoices, balances, row counts
    email_of = "JOIN report.contacts c ON c.org = x.org AND c.contact_id = x.contact_id"
    got_i = {(r[0], r[1]): tuple(r[2:]) for r in db.query(
        "SELECT x.org, x.invoice_id, c.email, x.amount, x.paid, x.open, x.currency, x.status "
        "FROM report.invoices x " + email_of)}
    want_i = stream.invoices()
    expect(got_i == want_i, "invoices differ (key, expected, got)",
           [(k, want_i.get(k), got_i.get(k)) for k in set(want_i) | set(got_i)
            if want_i.get(k) != got_i.get(k)])
    got_bal = {(r[0], r[1], r[2]): r[3] for r in db.query(
        "SELECT x.org, c.email, x.currency, x.balance FROM report.balances x " + email_of)}
    want_bal = stream.balances()
    expect(got_bal == want_bal, "BALANCES differ (org, email, currency, expected, got)",
           [(k, want_bal.get(k), got_bal.get(k)) for k in set(want_bal) | set(got_bal)
            if want_bal.get(k) != got_bal.get(k)])
    got_k = {(r[0], r[1]): r[2] for r in db.query(
        "SELECT org, kind, count(*) FROM report.transactions GROUP BY 1, 2")}
    want_k = stream.kinds()
    expect(got_k == want_k, "ledger row counts per org and kind differ (key, expected, got)",
           [(k, want_k.get(k), got_k.get(k)) for k in set(want_k) | set(got_k)
            if want_k.get(k) != got_k.get(k)])
    r = harness.rosterctl(chaos.live[0].config_path, "ledger", "check")
    expect(r.returncode == 0, "rosterctl ledger check exit %d" % r.returncode,
           (r.stdout + r.stderr).splitlines())

    # dead letters: exactly the designed rejections (each at least once)
    dead = amqp.get_dead(timeout=2)
    dead_ids = collections.Counter((d.msg or {}).get("id") for d in dead)
    designed = {mid for (_, mid) in stream.reject_reason}
    expect(set(dead_ids) == designed, "dead letters differ from the designed rejections "
           "(missing, extra)", [sorted(designed - set(dead_ids))[:5],
                                sorted(set(dead_ids) - designed)[:5]])

    # the outbox: one row per expected mail, all sent
    want_m = stream.mails()
    got_o = collections.defaultdict(list)
    for org, tpl, to, subject, status in db.query(
            "SELECT org, template, to_address, subject, status FROM report.outbox"):
        got_o[subject].append((org, tpl, to, status))
    bad_o = [(s, want_m.get(s), v) for s, v in got_o.items()
             if len(v) != 1 or want_m.get(s) != v[0][:3] or v[0][3] != "sent"]
    expect(not bad_o, "outbox rows differ (subject, expected, rows)", bad_o)
    missing_o = sorted(set(want_m) - set(got_o))
    expect(not missing_o, "outbox rows missing", missing_o)

    # the sink: every expected mail at least once; a re-send is the same mail
    # (Message-ID and bytes) and follows a lost reply
    copies = collections.defaultdict(list)
    for m in smtp.mails(all=True):
        copies[m.subject].append(m)
    missing = sorted(s for s in want_m if not any(not m.hung_up for m in copies.get(s, ())))
    expect(not missing, "EXPECTED MAILS NOT DELIVERED", missing)
    unexpected = sorted(s for s in copies if s not in want_m)
    expect(not unexpected, "unexpected mails", unexpected)
    hung = [m for ms in copies.values() for m in ms if m.hung_up]
    resends = collections.Counter()
    bad_resend = []
    for s, ms in copies.items():
        ms.sort(key=lambda m: m.name)
        for a, b in zip(ms, ms[1:]):
            if b.message_id != a.message_id or b.raw != a.raw or b.rcpt_tos != a.rcpt_tos:
                bad_resend.append((s, "different mail: %s vs %s" % (a.message_id, b.message_id)))
                continue
            t = int(a.name.split("-")[0]) / 1e9
            if a.hung_up:
                resends["after a hang-up after the final dot"] += 1
                continue
            causes = {c for t0, t1, c in chaos.windows if t0 <= t <= t1}
            if causes:
                resends["after %s" % "/".join(sorted(causes))] += 1
            else:
                bad_resend.append((s, "re-sent although its reply at %s was not lost"
                                   % time.strftime("%H:%M:%S", time.gmtime(t))))
    expect(not bad_resend, "RE-SENT MAILS without a lost reply or not the same mail", bad_resend)
    n_hangups = len(smtp.events("hangup"))
    expect(n_hangups == FAULTS["hangup"], "sink hang-ups after the final dot: %d, want %d"
           % (n_hangups, FAULTS["hangup"]))

    # the instances: no crash, all alive, each drains and exits 0
    chaos.poll()
    expect(not chaos.crashed, "rosterd instances died on their own", chaos.crashed)
    expect(len(chaos.live) == N_INSTANCES and all(rd.alive for rd in chaos.live),
           "instances alive at the end", [(rd.instance, rd.returncode) for rd in chaos.live])
    codes = []
    for rd in chaos.live:
        rd.sigterm()
    for rd in chaos.live:
        try:
            codes.append(rd.wait_exit(20))
        except AssertionError as e:
            codes.append(str(e)[:200])
    expect(codes == [0] * len(chaos.live), "exit codes after SIGTERM", codes)

    t_end = time.monotonic()
    rec = {k: "n=%d max %.1f s median %.1f s" % (len(v), max(v), sorted(v)[len(v) // 2])
           for k, v in chaos.recovery.items() if v}
    log("seed %d: %d events (%d confirmed publishes, %d published again after a lost confirm), "
        "%d messages checked (%d duplicates settled), faults %s, %d instances started in all; "
        "%d mails expected, %d stored by the sink (%d hung up), re-sends %s; recovery %s; "
        "time: faults %.0f s, settled %.0f s, quiet %.0f s, total %.0f s"
        % (SEED, N_EVENTS, pub0.confirmed + pub.confirmed, pub.republished, len(first), len(dups),
           dict(chaos.done), len(rosterd.instances), len(want_m),
           sum(len(v) for v in copies.values()), len(hung), dict(resends), rec,
           t_faults - t_begin, t_settled - t_begin, t_quiet - t_begin, t_end - t_start))
    assert not problems, "chaos oracle (seed %d, replay with ROSTERD_CHAOS_SEED=%d) found:\n  %s" % (
        SEED, SEED, "\n  ".join(problems))
