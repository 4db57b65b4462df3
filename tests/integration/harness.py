"""harness.py - helpers for the rosterd integration tests.

The fixtures in conftest.py wrap these classes; test modules may also import
the plain helpers directly (`from harness import make_msg, wait_for`).

Servers come from tests/fixture/servers.sh (one set per test run, shared by
all tests); isolation between tests comes from names, not from servers:
each test has its own database and role (Database), its own AMQP object
names (Names), its own SMTP sink (SmtpSink.start) and its own rosterd
config, log and process (Rosterd).
"""
import ctypes
import email
import email.policy
import glob
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import threading
import time
import uuid

import msgpack
import pika
import psycopg2
import psycopg2.extensions

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.environ.get("ROSTERD_SOURCE") or os.path.abspath(os.path.join(HERE, "..", ".."))
SERVERS_SH = os.path.join(SOURCE, "tests", "fixture", "servers.sh")
SINK_PY = os.path.join(SOURCE, "tests", "fixture", "smtp_sink.py")
PYTHON = "/usr/bin/python3"

# pika logs every broker-closed channel (passive declares of absent queues)
logging.getLogger("pika").setLevel(logging.ERROR)

SANITIZER_RE = re.compile(
    r"ERROR: (?:Address|Leak|Memory|Thread)Sanitizer|WARNING: ThreadSanitizer|runtime error:")


def rosterd_bin():
    return os.environ.get("ROSTERD_BIN") or os.path.join(SOURCE, "build", "rosterd")


def rosterctl_bin():
    return os.environ.get("ROSTERCTL_BIN") or os.path.join(SOURCE, "build", "rosterctl")


# --- small helpers -----------------------------------------------------------

def wait_for(predicate, timeout=10.0, interval=0.1, message=None):
    """Call predicate() until it returns something truthy and return that.
    On timeout raise AssertionError naming `message` and the last value.
    Exceptions from predicate propagate (catch them inside if expected)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__name__", "condition")
            raise AssertionError("timed out after %.1fs waiting for %s (last value: %r)"
                                 % (timeout, what, value))
        time.sleep(interval)


def now_ms():
    return int(time.time() * 1000)


def make_msg(type, data, org="acme", id=None, at=None, v=1, **extra):
    """An envelope (section 2) as a dict: {v, id, type, org, at, data};
    id defaults to a fresh uuid4, at to now (ms). Extra keys are added as
    given (unknown keys must be ignored by rosterd)."""
    msg = {"v": v, "id": id if id is not None else str(uuid.uuid4()), "type": type,
           "org": org, "at": at if at is not None else now_ms(), "data": data}
    msg.update(extra)
    return msg


def pack(obj):
    return msgpack.packb(obj, use_bin_type=True)


def unpack(body):
    """msgpack-decode a body; None when it is not msgpack."""
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=False, timestamp=0)
    except Exception:
        return None


def slug(text, n=24):
    s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return s[:n].strip("_") or "t"


def free_port():
    """A free loopback port chosen by the kernel (for throwaway listeners)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(host, port, timeout=1.0):
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def _pdeathsig():
    """preexec_fn: the child gets SIGKILL when the test process dies, so that
    no rosterd outlives a killed pytest."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


# --- servers -----------------------------------------------------------------

def load_env(path):
    """Parse a servers.sh env file (KEY=value lines) into a dict."""
    env = {}
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line or line.startswith("#") or "=" not in line:
                continue
            k, _, v = line.partition("=")
            env[k] = v
    return env


class Servers:
    """The private PostgreSQL, RabbitMQ and SMTP sink of this run.

    Attributes: env (the DIR/env dict), dir, pg_host, pg_port, amqp_host,
    amqp_port, amqp_url, smtp_host, smtp_port, smtp_tls_port, smtp_tls_cert.
    Outage helpers (same ports and data afterwards): pg_stop(), pg_kill(),
    pg_start(), rabbit_stop(), rabbit_kill(), rabbit_start(), smtp_stop(),
    smtp_start(); ensure_up() restarts whatever is down."""

    def __init__(self, dir):
        self.dir = os.path.abspath(dir)
        self.env = load_env(os.path.join(self.dir, "env"))
        e = self.env
        self.pg_host = e["PGHOST"]
        self.pg_port = int(e["PGPORT"])
        self.pg_user = e.get("PGUSER", "postgres")
        self.amqp_host = e["AMQP_HOST"]
        self.amqp_port = int(e["AMQP_PORT"])
        self.amqp_url = e["AMQP_URL"]
        self.smtp_host = e.get("SMTP_HOST", "127.0.0.1")
        self.smtp_port = int(e["SMTP_PORT"])
        self.smtp_tls_port = int(e["SMTP_TLS_PORT"]) if e.get("SMTP_TLS_PORT") else None
        self.smtp_tls_cert = e.get("SMTP_TLS_CERT") or None
        self.servers_sh = e.get("SERVERS_SH") or SERVERS_SH

    # shared SMTP sink of servers.sh (tests normally use their own: SmtpSink.start)
    def shared_smtp(self):
        return SmtpSink(self.smtp_host, self.smtp_port, self.env["SMTP_DIR"],
                        self.env["SMTP_CTL"], self.env.get("SMTP_EVENTS"))

    def _sh(self, *cmd, timeout=120):
        r = subprocess.run(["bash", self.servers_sh, *cmd, self.dir], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError("servers.sh %s failed (%d):\n%s" % (" ".join(cmd), r.returncode, r.stdout))
        return r.stdout

    def pg_stop(self):
        """Fast shutdown of PostgreSQL (clients are disconnected)."""
        self._sh("pg-stop")

    def pg_kill(self):
        """Immediate shutdown (a crash; recovery at the next start)."""
        self._sh("pg-kill")

    def pg_start(self):
        self._sh("pg-start")

    def rabbit_stop(self):
        self._sh("rabbit-stop")

    def rabbit_kill(self):
        """SIGKILL the broker's Erlang VM."""
        self._sh("rabbit-kill")

    def rabbit_start(self):
        """Start the node again (same name, port and data: durable queues and
        persistent messages survive). Takes ~10 s."""
        self._sh("rabbit-start")

    def smtp_stop(self):
        self._sh("smtp-stop")

    def smtp_start(self):
        self._sh("smtp-start")

    def rabbitmqctl(self, *args, timeout=60):
        """Run rabbitmqctl against our node; returns stdout (raises on failure)."""
        r = subprocess.run([self.env["RABBITMQCTL"], *args], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError("rabbitmqctl %s: %s%s" % (" ".join(args), r.stdout, r.stderr))
        return r.stdout

    def pg_up(self):
        try:
            c = psycopg2.connect(host=self.pg_host, port=self.pg_port, user=self.pg_user,
                                 dbname="postgres", connect_timeout=3)
            c.close()
            return True
        except psycopg2.OperationalError:
            return False

    def rabbit_up(self):
        return port_open(self.amqp_host, self.amqp_port)

    def ensure_up(self):
        """Restart whatever an outage test left stopped."""
        if not self.pg_up():
            self.pg_start()
            wait_for(self.pg_up, 30, 0.2, "postgres up")
        if not self.rabbit_up():
            self.rabbit_start()
        if not port_open(self.smtp_host, self.smtp_port):
            self.smtp_start()

    def connect(self, dbname="postgres", autocommit=True, user=None):
        """A psycopg2 connection as the superuser (or `user`)."""
        c = psycopg2.connect(host=self.pg_host, port=self.pg_port, user=user or self.pg_user,
                             dbname=dbname, connect_timeout=10)
        c.autocommit = autocommit
        return c


def start_servers(dir):
    """servers.sh start DIR (reuses running servers); returns Servers."""
    r = subprocess.run(["bash", SERVERS_SH, "start", dir], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=180)
    if r.returncode != 0:
        raise RuntimeError("servers.sh start %s failed:\n%s" % (dir, r.stdout))
    return Servers(dir)


def stop_servers(dir, clean=False):
    cmd = ["bash", SERVERS_SH, "stop", dir] + (["--clean"] if clean else [])
    subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180)


# --- PostgreSQL ----------------------------------------------------------------

class Database:
    """A fresh database owned by a fresh LOGIN-only role (neither superuser
    nor CREATEDB nor CREATEROLE): what rosterd is given in production.

    name, role, conninfo (for rosterd: host port dbname user), dsn.
    query(sql, *args) -> list of tuples; query1(sql, *args) -> first column
    of the first row (None when there is no row); querydicts(...) -> list of
    dicts; execute(sql, *args) -> rowcount. Placeholders are psycopg2's %s.
    All of these connect as the superuser postgres to this database
    (inspection, bypassing nothing but permissions), in autocommit mode, and
    reconnect once after a PostgreSQL restart."""

    def __init__(self, servers, label="t"):
        self.servers = servers
        self.name = "rd_%s_%s" % (slug(label, 40), secrets.token_hex(4))
        self.role = self.name
        self.conninfo = "host=%s port=%d dbname=%s user=%s" % (
            servers.pg_host, servers.pg_port, self.name, self.role)
        self.dsn = self.conninfo
        self._conn = None
        c = servers.connect()
        try:
            with c.cursor() as cur:
                cur.execute('CREATE ROLE "%s" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION'
                            % self.role)
                cur.execute('CREATE DATABASE "%s" OWNER "%s"' % (self.name, self.role))
        finally:
            c.close()

    def connect(self, as_owner=False, autocommit=True):
        """A new connection to this database (superuser, or the owner role)."""
        return self.servers.connect(self.name, autocommit, user=self.role if as_owner else None)

    def _run(self, fn):
        for attempt in (0, 1):
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = self.connect()
                with self._conn.cursor() as cur:
                    return fn(cur)
            except (psycopg2.OperationalError, psycopg2.InterfaceError):
                if self._conn is not None:
                    try:
                        self._conn.close()
                    except Exception:
                        pass
                self._conn = None
                if attempt:
                    raise
        return None

    def query(self, sql, *args):
        def fn(cur):
            cur.execute(sql, args or None)
            return [tuple(r) for r in cur.fetchall()] if cur.description else []
        return self._run(fn)

    def query1(self, sql, *args):
        rows = self.query(sql, *args)
        return rows[0][0] if rows else None

    def querydicts(self, sql, *args):
        def fn(cur):
            cur.execute(sql, args or None)
            if not cur.description:
                return []
            cols = [d[0] for d in cur.description]
            return [dict(zip(cols, r)) for r in cur.fetchall()]
        return self._run(fn)

    def execute(self, sql, *args):
        def fn(cur):
            cur.execute(sql, args or None)
            return cur.rowcount
        return self._run(fn)

    def table_exists(self, qualified):
        return bool(self.query1("SELECT to_regclass(%s) IS NOT NULL", qualified))

    def close(self):
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None

    def drop(self):
        self.close()
        c = self.servers.connect()
        try:
            with c.cursor() as cur:
                cur.execute('DROP DATABASE IF EXISTS "%s" WITH (FORCE)' % self.name)
                cur.execute('DROP ROLE IF EXISTS "%s"' % self.role)
        finally:
            c.close()


def wait_messages(db, n, timeout=30.0, where=None, args=()):
    """Wait until report.messages has at least n rows (optionally filtered by
    the SQL condition `where`, with %s args) and return them as dicts
    ordered by `at`. Raises AssertionError on timeout."""
    sql = "SELECT count(*) FROM report.messages" + (" WHERE " + where if where else "")

    def count():
        try:
            return db.query1(sql, *args)
        except psycopg2.errors.UndefinedTable:
            return 0  # migrations not applied yet
    wait_for(lambda: (count() or 0) >= n, timeout, 0.1,
             "%d rows in report.messages%s" % (n, " where " + where if where else ""))
    return db.querydicts("SELECT * FROM report.messages" + (" WHERE " + where if where else "")
                         + " ORDER BY at", *args)


# --- AMQP ----------------------------------------------------------------------

class Names:
    """Unique AMQP object names for one test (config keys of [amqp])."""

    KEYS = ("queue", "exchange", "retry_queue", "dead_exchange", "dead_queue", "status_exchange")

    def __init__(self, label="t"):
        self.prefix = "t.%s.%s" % (slug(label, 40), secrets.token_hex(3))
        self.queue = self.prefix + ".events"
        self.exchange = self.prefix + ".events"
        self.retry_queue = self.prefix + ".retry"
        self.dead_exchange = self.prefix + ".dead"
        self.dead_queue = self.prefix + ".dead"
        self.status_exchange = self.prefix + ".status"

    def config(self):
        return {k: getattr(self, k) for k in self.KEYS}

    def resolve(self, name):
        """A key of KEYS ('dead_queue') or a literal name -> the name."""
        return getattr(self, name) if name in self.KEYS else name


class DeadLetter:
    """A message from the dead queue: body (bytes), msg (decoded msgpack or
    None), headers (dict), error (x-rosterd-error), error_at, routing_key,
    exchange, properties."""

    def __init__(self, method, props, body):
        self.body = body
        self.msg = unpack(body)
        self.headers = dict(props.headers or {})
        self.properties = props
        self.routing_key = method.routing_key
        self.exchange = method.exchange
        self.redelivered = method.redelivered
        err = self.headers.get("x-rosterd-error")
        self.error = err.decode("utf-8", "replace") if isinstance(err, bytes) else err
        self.error_at = self.headers.get("x-rosterd-error-at")

    def __repr__(self):
        return "DeadLetter(rk=%r, error=%r, msg=%r)" % (self.routing_key, self.error, self.msg)


class Amqp:
    """AMQP helpers bound to one test's Names.

    publish(body, routing_key=None, headers=None, exchange=None,
            properties=None, mandatory=True)   dict -> msgpack; confirmed
    publish_many(bodies, routing_key=None)     fast, one barrier at the end
    get(queue, n=None, timeout=0) -> [(method, props, body)]   (acks them)
    get_dead(n=None, timeout=10) -> [DeadLetter]  (consumes them)
    queue_depth(name) / consumer_count(name) -> int or None when absent
    queue_exists(name), exchange_exists(name), purge(name), delete_queue(name)
    declare_topology(queue_type=None)   the events exchange + queue only
    status(timeout=30, predicate=None, instance=None) -> dict
    status_watch() -> StatusWatch (bind first, then trigger, then .next())
    Queue/exchange arguments of these helpers accept a Names key
    ('dead_queue') or a literal name."""

    def __init__(self, servers, names):
        self.servers = servers
        self.names = names
        self._conn = None
        self._ch = None
        self._fast = None
        self._watches = []

    def params(self):
        return pika.ConnectionParameters(
            host=self.servers.amqp_host, port=self.servers.amqp_port,
            credentials=pika.PlainCredentials("guest", "guest"), heartbeat=0,
            blocked_connection_timeout=30, connection_attempts=1, socket_timeout=10,
            stack_timeout=15)

    def connection(self):
        """A new BlockingConnection (caller closes it)."""
        return pika.BlockingConnection(self.params())

    def _channel(self):
        if self._conn is None or self._conn.is_closed:
            self._conn = self.connection()
            self._ch = None
            self._fast = None
        if self._ch is None or self._ch.is_closed:
            self._ch = self._conn.channel()
            self._ch.confirm_delivery()
        return self._ch

    def _retry(self, fn):
        """Run fn(channel); after a lost connection (broker restarted)
        reconnect once and run it again."""
        for attempt in (0, 1):
            try:
                return fn(self._channel())
            except (pika.exceptions.AMQPConnectionError, pika.exceptions.StreamLostError,
                    pika.exceptions.ConnectionWrongStateError, pika.exceptions.ChannelWrongStateError,
                    ConnectionError):
                self.close()
                if attempt:
                    raise
        return None

    def _scratch(self, fn):
        """fn(channel) on a throwaway channel (passive declares close it on 404)."""
        def run(_ch):
            ch = self._conn.channel()
            try:
                return fn(ch)
            finally:
                if ch.is_open:
                    ch.close()
        return self._retry(run)

    def close(self):
        for w in self._watches:
            w.close()
        self._watches = []
        if self._conn is not None:
            try:
                if self._conn.is_open:
                    self._conn.close()
            except Exception:
                pass
        self._conn = self._ch = self._fast = None

    @staticmethod
    def _props(body_is_msgpack, headers, properties):
        kw = {"delivery_mode": 2, "headers": headers}
        if body_is_msgpack:
            kw["content_type"] = "application/msgpack"
        kw.update(properties or {})
        return pika.BasicProperties(**kw)

    def publish(self, body, routing_key=None, headers=None, exchange=None, properties=None,
                mandatory=True):
        """Publish one message to the test's events exchange (persistent,
        content type application/msgpack, confirmed). A dict is msgpack-
        encoded and routed by its 'type'; bytes are sent as they are.
        mandatory: raise pika.exceptions.UnroutableError when no queue is
        bound (rosterd not started and no declare_topology())."""
        if isinstance(body, (dict, list)):
            rk = routing_key if routing_key is not None else str(body.get("type", "")) \
                if isinstance(body, dict) else ""
            data = pack(body)
        else:
            rk = routing_key if routing_key is not None else ""
            data = body
        ex = self.names.resolve(exchange) if exchange else self.names.exchange
        props = self._props(True, headers, properties)
        self._retry(lambda ch: ch.basic_publish(ex, rk, data, props, mandatory=mandatory))

    def publish_many(self, bodies, routing_key=None, headers=None, exchange=None):
        """Publish many messages without per-message confirms (fast), then a
        synchronous round trip on the same channel as a barrier."""
        ex = self.names.resolve(exchange) if exchange else self.names.exchange
        props = self._props(True, headers, None)

        def run(_ch):
            if self._fast is None or self._fast.is_closed:
                self._fast = self._conn.channel()
            for b in bodies:
                if isinstance(b, dict):
                    rk = routing_key if routing_key is not None else str(b.get("type", ""))
                    data = pack(b)
                else:
                    rk, data = routing_key or "", b
                self._fast.basic_publish(ex, rk, data, props)
            self._fast.exchange_declare(ex, passive=True)  # barrier
        self._retry(run)

    def get(self, queue, n=None, timeout=0.0, ack=True):
        """basic_get from queue until it is empty (or n messages, waiting up
        to timeout for them). Returns [(method, properties, body)]."""
        q = self.names.resolve(queue)
        out = []
        deadline = time.monotonic() + timeout

        def one(ch):
            return ch.basic_get(q, auto_ack=ack)
        while n is None or len(out) < n:
            try:
                m, p, b = self._retry(one)
            except pika.exceptions.ChannelClosedByBroker as e:
                self._ch = None
                if e.reply_code == 404:
                    m = None
                else:
                    raise
            if m is None:
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.05)
                continue
            out.append((m, p, b))
        return out

    def get_dead(self, n=None, timeout=10.0):
        """The messages of the test's dead queue, consumed (acked). With n,
        wait up to timeout until n have arrived; without n, take what is
        there now (after waiting up to timeout for the first one when the
        queue is empty; pass timeout=0 not to wait)."""
        if n is None:
            first = self.get("dead_queue", 1, timeout)
            rest = self.get("dead_queue") if first else []
            raw = first + rest
        else:
            raw = self.get("dead_queue", n, timeout)
        return [DeadLetter(m, p, b) for m, p, b in raw]

    def _declare_passive(self, name, kind):
        def fn(ch):
            try:
                if kind == "queue":
                    return ch.queue_declare(name, passive=True).method
                ch.exchange_declare(name, passive=True)
                return True
            except pika.exceptions.ChannelClosedByBroker as e:
                if e.reply_code == 404:
                    return None
                raise
        return self._scratch(fn)

    def queue_depth(self, name):
        """Ready messages in the queue (not counting unacked ones), or None
        when the queue does not exist."""
        m = self._declare_passive(self.names.resolve(name), "queue")
        return m.message_count if m else None

    def consumer_count(self, name):
        m = self._declare_passive(self.names.resolve(name), "queue")
        return m.consumer_count if m else None

    def queue_exists(self, name):
        return self._declare_passive(self.names.resolve(name), "queue") is not None

    def exchange_exists(self, name):
        return self._declare_passive(self.names.resolve(name), "exchange") is not None

    def purge(self, name):
        q = self.names.resolve(name)
        return self._scratch(lambda ch: ch.queue_purge(q).method.message_count)

    def delete_queue(self, name):
        q = self.names.resolve(name)
        self._scratch(lambda ch: ch.queue_delete(q))

    def queue_unacked(self, name):
        """Unacknowledged messages of a queue (rabbitmqctl; slow, ~1 s)."""
        q = self.names.resolve(name)
        out = self.servers.rabbitmqctl("-q", "list_queues", "name", "messages_unacknowledged",
                                       "--no-table-headers")
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == q:
                return int(parts[1])
        return None

    def declare_topology(self, queue_type=None):
        """Declare what rosterd declares for input, so that messages can be
        published before rosterd starts: the events exchange (topic, durable)
        and the events queue (durable, bound with '#'; classic queues carry
        no x-queue-type argument)."""
        args = {"x-queue-type": queue_type} if queue_type and queue_type != "classic" else None

        def fn(ch):
            ch.exchange_declare(self.names.exchange, "topic", durable=True)
            ch.queue_declare(self.names.queue, durable=True, arguments=args)
            ch.queue_bind(self.names.queue, self.names.exchange, "#")
        self._scratch(fn)

    def status_watch(self, timeout=30.0):
        """Bind a temporary exclusive queue to the status exchange now (waits
        up to timeout for the exchange to exist); .next() returns documents
        published after this call."""
        w = StatusWatch(self, timeout)
        self._watches.append(w)
        return w

    def status(self, timeout=30.0, predicate=None, instance=None):
        """The next status document (dict) published to the test's status
        exchange, optionally the next one from `instance` and/or for which
        predicate(doc) is true."""
        deadline = time.monotonic() + timeout
        w = self.status_watch(timeout)
        try:
            return w.next(max(0.1, deadline - time.monotonic()), predicate, instance)
        finally:
            w.close()
            self._watches.remove(w)


class StatusWatch:
    def __init__(self, amqp, timeout):
        self.conn = amqp.connection()
        self.ch = self.conn.channel()
        ex = amqp.names.status_exchange

        def exists():
            ch = self.conn.channel()
            try:
                ch.exchange_declare(ex, passive=True)
                ch.close()
                return True
            except pika.exceptions.ChannelClosedByBroker as e:
                if e.reply_code != 404:
                    raise
                return False
        wait_for(exists, timeout, 0.2, "status exchange %s" % ex)
        self.queue = self.ch.queue_declare("", exclusive=True, auto_delete=True).method.queue
        self.ch.queue_bind(self.queue, ex, "")
        self.docs = []

    def next(self, timeout=30.0, predicate=None, instance=None):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("no matching status document within %.1fs (seen: %r)"
                                     % (timeout, self.docs[-3:]))
            m, p, body = self.ch.basic_get(self.queue, auto_ack=True)
            if m is None:
                self.conn.sleep(min(0.1, left))
                continue
            doc = json.loads(body)
            self.docs.append(doc)
            if instance is not None and doc.get("instance") != instance:
                continue
            if predicate is not None and not predicate(doc):
                continue
            return doc

    def close(self):
        try:
            if self.conn.is_open:
                self.conn.close()
        except Exception:
            pass


# --- SMTP ----------------------------------------------------------------------

class Mail:
    """A mail stored by the sink: mail_from, rcpt_tos, tls, hung_up, name,
    raw (bytes), msg (email.message.EmailMessage, policy default), plus
    subject, from_, to, reply_to, message_id (decoded header values, or
    None) and text (the text/plain body, decoded)."""

    def __init__(self, path):
        self.path = path
        with open(path[:-4] + ".json") as f:
            self.meta = json.load(f)
        with open(path, "rb") as f:
            self.raw = f.read()
        self.name = self.meta["name"]
        self.mail_from = self.meta["mail_from"]
        self.rcpt_tos = self.meta["rcpt_tos"]
        self.tls = self.meta.get("tls", False)
        self.hung_up = self.meta.get("hung_up", False)
        self.msg = email.message_from_bytes(self.raw, policy=email.policy.default)

    def header(self, name):
        v = self.msg.get(name)
        return str(v) if v is not None else None

    @property
    def subject(self):
        return self.header("Subject")

    @property
    def from_(self):
        return self.header("From")

    @property
    def to(self):
        return self.header("To")

    @property
    def reply_to(self):
        return self.header("Reply-To")

    @property
    def message_id(self):
        return self.header("Message-ID")

    @property
    def text(self):
        part = self.msg.get_body(preferencelist=("plain", "html"))
        if part is None:
            return None
        return part.get_content()

    def __repr__(self):
        return "Mail(to=%r, subject=%r)" % (self.rcpt_tos, self.subject)


class SmtpSink:
    """A running smtp_sink.py: host, port, dir, ctl, events_path.

    mails(all=False) -> [Mail] in arrival order; with all=True also those
      stored before a hangup_after_data (no reply was given: hung_up=True)
    wait_mails(n, timeout=30, all=False) -> [Mail] once at least n are there
    set_mode(mode, count=None, stage=None, code=None, text=None,
             delay_ms=None)   accept|tempfail|permfail|hangup_after_data|stall
    accept()                  back to the default
    events(ev=None) -> [dict] the sink's event log (connect, stall, mail,
      reject, stored, hangup); attempts() = number of MAIL transactions
    clear()                   remove stored mails and events
    SmtpSink.start(dir, tls_cert=None, tls_key=None) starts a private sink
    on a kernel-chosen port; stop() stops it."""

    def __init__(self, host, port, dir, ctl, events_path=None, proc=None):
        self.host = host
        self.port = int(port)
        self.dir = dir
        self.ctl = ctl
        self.events_path = events_path
        self.proc = proc

    @classmethod
    def start(cls, dir, tls_cert=None, tls_key=None, require_starttls=False):
        os.makedirs(dir, exist_ok=True)
        mdir = os.path.join(dir, "mail")
        ctl = os.path.join(dir, "ctl.json")
        events = os.path.join(dir, "events.jsonl")
        port_file = os.path.join(dir, "port")
        cmd = [PYTHON, SINK_PY, "--host", "127.0.0.1", "--port", "0", "--port-file", port_file,
               "--dir", mdir, "--ctl", ctl, "--events", events]
        if tls_cert:
            cmd += ["--tls-cert", tls_cert, "--tls-key", tls_key or tls_cert]
            if require_starttls:
                cmd.append("--require-starttls")
        log = open(os.path.join(dir, "sink.log"), "ab")
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                preexec_fn=_pdeathsig)
        log.close()

        def ready():
            if proc.poll() is not None:
                raise RuntimeError("smtp_sink exited: %s" % open(os.path.join(dir, "sink.log")).read())
            return os.path.exists(port_file)
        wait_for(ready, 15, 0.05, "smtp sink start")
        with open(port_file) as f:
            port = int(f.read())
        return cls("127.0.0.1", port, mdir, ctl, events, proc)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def mails(self, all=False):
        out = []
        for p in sorted(glob.glob(os.path.join(self.dir, "*.eml"))):
            m = Mail(p)
            if all or not m.hung_up:
                out.append(m)
        return out

    def wait_mails(self, n, timeout=30.0, all=False):
        return wait_for(lambda: (lambda ms: ms if len(ms) >= n else None)(self.mails(all)),
                        timeout, 0.1, "%d mails in the sink" % n)

    def set_mode(self, mode, count=None, stage=None, code=None, text=None, delay_ms=None):
        cfg = {"mode": mode}
        for k, v in (("count", count), ("stage", stage), ("code", code), ("text", text),
                     ("delay_ms", delay_ms)):
            if v is not None:
                cfg[k] = v
        tmp = "%s.%d.tmp" % (self.ctl, os.getpid())
        with open(tmp, "w") as f:
            json.dump(cfg, f)
        os.rename(tmp, self.ctl)  # a new inode: the sink restarts its count

    def accept(self):
        self.set_mode("accept")

    def events(self, ev=None):
        if not self.events_path or not os.path.exists(self.events_path):
            return []
        out = []
        with open(self.events_path) as f:
            for line in f:
                if not line.endswith("\n"):
                    break  # being written
                e = json.loads(line)
                if (self.port is None or e.get("port") in (None, self.port)) and \
                        (ev is None or e["ev"] == ev):
                    out.append(e)
        return out

    def attempts(self):
        return len(self.events("mail"))

    def clear(self):
        for p in glob.glob(os.path.join(self.dir, "*")):
            os.unlink(p)
        if self.events_path and os.path.exists(self.events_path):
            open(self.events_path, "w").close()


# --- rosterd ---------------------------------------------------------------------

SECTIONS = ("daemon", "amqp", "postgres", "smtp")
# flat keyword -> (section, key), from daemon/config.h
KEY_SECTIONS = {
    "instance": "daemon", "status_interval": "daemon", "retry_base_ms": "daemon",
    "max_retries": "daemon", "max_message_bytes": "daemon", "batch_size": "daemon",
    "batch_wait_ms": "daemon", "drain_timeout": "daemon", "log_level": "daemon",
    "url": "amqp", "ca_file": "amqp", "verify_peer": "amqp", "queue": "amqp",
    "exchange": "amqp", "retry_queue": "amqp", "dead_exchange": "amqp", "dead_queue": "amqp",
    "status_exchange": "amqp", "queue_type": "amqp", "prefetch": "amqp", "heartbeat": "amqp",
    "delivery_limit": "amqp",
    "conninfo": "postgres", "migrate_conninfo": "postgres", "connections": "postgres",
    "statement_timeout_ms": "postgres",
    "starttls": "smtp", "workers": "smtp", "mail_retry_base_ms": "smtp",
    "mail_lifetime": "smtp", "username": "smtp",
}
# struct field names that differ from the INI key
FIELD_ALIASES = {
    "amqp_url": ("amqp", "url"), "amqp_password_file": ("amqp", "password_file"),
    "pg_password_file": ("postgres", "password_file"),
    "smtp_host": ("smtp", "host"), "smtp_port": ("smtp", "port"),
    "smtp_username": ("smtp", "username"), "smtp_password_file": ("smtp", "password_file"),
    "smtp_timeout": ("smtp", "timeout"),
}


def _ini_value(v):
    if isinstance(v, bool):
        return "yes" if v else "no"
    return str(v)


def write_config(path, sections):
    """Write {section: {key: value}} as INI; None values are left out."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        for sec in list(SECTIONS) + [s for s in sections if s not in SECTIONS]:
            kv = sections.get(sec) or {}
            kv = {k: v for k, v in kv.items() if v is not None}
            if not kv:
                continue
            f.write("[%s]\n" % sec)
            for k, v in kv.items():
                f.write("%s = %s\n" % (k, _ini_value(v)))
            f.write("\n")
    return path


def apply_overrides(sections, overrides):
    """Merge keyword overrides into {section: {key: value}}:
      key=value          a key of KEY_SECTIONS (or a struct field alias such
                         as smtp_port, pg_password_file)
      section={k: v}     any key of that section, unchecked
      **{"smtp.timeout": 5}   the same, one key
    A value of None removes the key (rosterd's default applies)."""
    for k, v in overrides.items():
        if k in SECTIONS and isinstance(v, dict):
            sections.setdefault(k, {}).update(v)
        elif "." in k:
            sec, key = k.split(".", 1)
            sections.setdefault(sec, {})[key] = v
        elif k in FIELD_ALIASES:
            sec, key = FIELD_ALIASES[k]
            sections.setdefault(sec, {})[key] = v
        elif k in KEY_SECTIONS:
            sections.setdefault(KEY_SECTIONS[k], {})[k] = v
        else:
            raise ValueError("unknown rosterd config key %r: use section={...} or 'section.key'" % k)
    return sections


class NotifySocket:
    """A sd_notify receiver: set NOTIFY_SOCKET to .path; .messages() lists
    the datagrams received (each a dict of KEY=value lines)."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self._msgs = []
        self._stop = False
        self._lock = threading.Lock()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                break
            d = {}
            for line in data.decode("utf-8", "replace").splitlines():
                k, _, v = line.partition("=")
                d[k] = v
            with self._lock:
                self._msgs.append(d)

    def messages(self):
        with self._lock:
            return list(self._msgs)

    def close(self):
        self._stop = True
        self._t.join(2)
        self.sock.close()


class Rosterd:
    """One rosterd process with its own config file and log.

    start(); wait_ready(timeout=30); sigterm(); sigkill(); sighup();
    signal(sig); wait_exit(timeout=15) -> returncode; stop(timeout=15) ->
    returncode (SIGTERM + wait); alive; pid; returncode; log_text();
    log_lines(); log_events(event=None) -> [dict(level, instance, event,
    **fields)]; wait_log(regex, timeout=10) -> match; sanitizer_errors();
    ctl(*args) -> CompletedProcess (rosterctl -c this config);
    notifications() (with notify=True: the sd_notify datagrams)."""

    READY_RE = re.compile(r"^<\d>\S+ ready(?:\s|$)", re.M)
    LINE_RE = re.compile(r"^<(\d)>(\S+) (\S+)(?: (.*))?$")
    KV_RE = re.compile(r'([A-Za-z0-9_.\-]+)=("(?:[^"\\]|\\.)*"|\S*)')

    def __init__(self, config_path, log_path, env=None, args=(), binary=None, amqp=None,
                 queue=None, notify=None):
        self.config_path = config_path
        self.log_path = log_path
        self.binary = binary or rosterd_bin()
        self.args = list(args)
        self.env = env or {}
        self.amqp = amqp
        self.queue = queue
        self.notify = notify
        self.proc = None
        self.instance = None
        self.sanitizer_checked = False

    def start(self):
        if not os.path.exists(self.binary):
            raise RuntimeError("no rosterd binary at %s (set ROSTERD_BIN or build it)" % self.binary)
        env = {k: v for k, v in os.environ.items()
               if not re.match(r"ROSTERD_(DAEMON|AMQP|POSTGRES|SMTP)_", k) and k != "NOTIFY_SOCKET"}
        env.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=1")
        env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
        if self.notify is not None:
            env["NOTIFY_SOCKET"] = self.notify.path
        env.update({k: str(v) for k, v in self.env.items()})
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([self.binary, "-c", self.config_path] + self.args,
                                     stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                     preexec_fn=_pdeathsig)
        log.close()
        return self

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    @property
    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self):
        return self.proc.poll() if self.proc else None

    def log_text(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_lines(self):
        return self.log_text().splitlines()

    def log_events(self, event=None):
        out = []
        for line in self.log_lines():
            m = self.LINE_RE.match(line)
            if not m:
                continue
            if event is not None and m.group(3) != event:
                continue
            d = {"level": int(m.group(1)), "instance": m.group(2), "event": m.group(3)}
            for k, v in self.KV_RE.findall(m.group(4) or ""):
                if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
                    v = re.sub(r'\\(.)', r'\1', v[1:-1])
                d[k] = v
            out.append(d)
        return out

    def wait_log(self, pattern, timeout=10.0):
        """Wait until the log matches regex `pattern` (re.M); return the match."""
        rx = re.compile(pattern, re.M)

        def found():
            m = rx.search(self.log_text())
            if m is None and not self.alive:
                raise AssertionError("rosterd exited (%s) before logging %r:\n%s"
                                     % (self.returncode, pattern, self.tail()))
            return m
        return wait_for(found, timeout, 0.05, "log line %r" % pattern)

    def tail(self, n=60):
        return "\n".join(self.log_lines()[-n:])

    def wait_ready(self, timeout=30.0):
        """Until the log has the `ready` event (or, failing that, the queue
        has a consumer and this is its only rosterd); raises with the log
        when rosterd exits first or on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if self.READY_RE.search(self.log_text()):
                return self
            if not self.alive:
                raise AssertionError("rosterd exited with %s before ready:\n%s"
                                     % (self.returncode, self.tail()))
            if self.amqp is not None and self.queue and getattr(self, "sole_instance", False):
                try:
                    if (self.amqp.consumer_count(self.queue) or 0) > 0:
                        return self
                except Exception:
                    pass
            if time.monotonic() >= deadline:
                raise AssertionError("rosterd not ready after %.0fs:\n%s" % (timeout, self.tail()))
            time.sleep(0.1)

    def signal(self, sig):
        if self.alive:
            self.proc.send_signal(sig)

    def sigterm(self):
        self.signal(signal.SIGTERM)

    def sigkill(self):
        self.signal(signal.SIGKILL)

    def sighup(self):
        self.signal(signal.SIGHUP)

    def wait_exit(self, timeout=15.0):
        """Wait for the process to exit and return its returncode (negative:
        killed by that signal). AssertionError (with the log) on timeout."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError("rosterd (pid %d) still running after %.0fs:\n%s"
                                 % (self.proc.pid, timeout, self.tail())) from None

    def stop(self, timeout=15.0):
        self.sigterm()
        return self.wait_exit(timeout)

    def kill(self):
        if self.alive:
            self.proc.kill()
            self.proc.wait(10)

    def sanitizer_errors(self):
        """Lines of the log reported by ASan/LSan/UBSan/TSan."""
        return [l for l in self.log_lines() if SANITIZER_RE.search(l)]

    def notifications(self):
        return self.notify.messages() if self.notify else []

    def ctl(self, *args, **kw):
        return rosterctl(self.config_path, *args, **kw)


def rosterctl(config_path, *args, input=None, timeout=60, env=None, check=False):
    """Run `rosterctl -c config_path args...`; returns CompletedProcess with
    text stdout/stderr. check=True raises on a non-zero exit. Sanitizer
    reports on stderr always raise AssertionError."""
    e = {k: v for k, v in os.environ.items() if not re.match(r"ROSTERD_(DAEMON|AMQP|POSTGRES|SMTP)_", k)}
    e.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=1")
    e.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
    e.update(env or {})
    r = subprocess.run([rosterctl_bin(), "-c", config_path, *[str(a) for a in args]],
                       input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=timeout, env=e)
    bad = [l for l in r.stderr.splitlines() if SANITIZER_RE.search(l)]
    if bad:
        raise AssertionError("rosterctl %s: sanitizer report:\n%s" % (" ".join(map(str, args)), r.stderr))
    if check and r.returncode != 0:
        raise AssertionError("rosterctl %s exited %d:\nstdout:\n%s\nstderr:\n%s"
                             % (" ".join(map(str, args)), r.returncode, r.stdout, r.stderr))
    return r


class RosterdFactory:
    """The `rosterd` fixture: rosterd(**overrides) writes a config for this
    test's database, names and SMTP sink, starts rosterd and (wait=True)
    waits until it is ready. Keyword arguments:
      wait=True, ready_timeout=30   wait for `ready`
      env={...}                     extra environment (ROSTERD_SECTION_KEY...)
      args=[...]                    extra command line arguments
      notify=False                  give it a NOTIFY_SOCKET (rd.notifications())
      start=False                   only create it (rd.start() later)
      plus config overrides: see apply_overrides (e.g. max_retries=2,
      smtp={'timeout': 3}, **{'daemon.batch_size': 1}).
    config(**overrides) -> path of a config file only (for rosterctl);
    ctl(*args, **kw) runs rosterctl with a default config;
    instances: every Rosterd made, in order.
    Test defaults (not rosterd's): status_interval=2, retry_base_ms=100,
    max_retries=3, log_level=info, workers=2, mail_retry_base_ms=200."""

    def __init__(self, tmpdir, label, servers, db, names, smtp, amqp):
        self.tmpdir = tmpdir
        self.label = slug(label, 20)
        self.servers = servers
        self.db = db
        self.names = names
        self.smtp = smtp
        self.amqp = amqp
        self.instances = []
        self.notifiers = []
        self.n = 0

    def sections(self, instance):
        return {
            "daemon": {"instance": instance, "status_interval": 2, "retry_base_ms": 100,
                       "max_retries": 3, "log_level": "info"},
            "amqp": dict(url=self.servers.amqp_url, **self.names.config()),
            "postgres": {"conninfo": self.db.conninfo},
            "smtp": {"host": self.smtp.host, "port": self.smtp.port, "workers": 2,
                     "mail_retry_base_ms": 200},
        }

    def config(self, **overrides):
        self.n += 1
        instance = "rd-%s-%d" % (self.label, self.n)
        secs = apply_overrides(self.sections(instance), overrides)
        self.last_sections = secs
        path = os.path.join(self.tmpdir, "rosterd-%d.conf" % self.n)
        return write_config(path, secs)

    def __call__(self, wait=True, ready_timeout=30.0, env=None, args=(), notify=False, start=True,
                 **overrides):
        path = self.config(**overrides)
        n = self.n
        ns = None
        if notify:
            ns = NotifySocket(os.path.join(self.tmpdir, "notify-%d.sock" % n))
            self.notifiers.append(ns)
        rd = Rosterd(path, os.path.join(self.tmpdir, "rosterd-%d.log" % n), env=env, args=args,
                     amqp=self.amqp, queue=self.last_sections.get("amqp", {}).get("queue"), notify=ns)
        rd.instance = self.last_sections.get("daemon", {}).get("instance")
        rd.sections = self.last_sections
        self.instances.append(rd)
        if start:
            rd.sole_instance = not any(r.alive for r in self.instances if r is not rd)
            rd.start()
            if wait:
                rd.wait_ready(ready_timeout)
        return rd

    def ctl(self, *args, **kw):
        return rosterctl(self.config(), *args, **kw)

    def teardown(self, failed):
        """Kill what still runs; return a report (logs when failed) and the
        sanitizer findings."""
        for rd in self.instances:
            rd.kill()
        for ns in self.notifiers:
            ns.close()
        report, findings = [], []
        for rd in self.instances:
            if rd.proc is None:
                continue
            bad = rd.sanitizer_errors()
            if bad:
                findings.append("%s: %s" % (rd.log_path, bad[0]))
            if failed or bad:
                lines = rd.log_lines()
                # notices and worse from the whole log (info lines such as
                # msg.settled would push them out of a plain tail), then
                # the tail as it is
                marked = [l for l in lines[:-100] if re.match(r"<[0-5]>", l)]
                report.append("----- rosterd log %s: %d lines; notices and worse before the "
                              "last 100 (%d, first 200) -----"
                              % (rd.log_path, len(lines), len(marked)))
                report.extend(marked[:200])
                report.append("----- rosterd log %s: last 100 lines -----" % rd.log_path)
                report.extend(lines[-100:])
        return report, findings
