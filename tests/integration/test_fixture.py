"""Smoke tests of the test fixture itself (servers, sink, harness); they need
no rosterd binary."""
import json
import os
import smtplib
import socket
import ssl
import subprocess
import textwrap
import threading
import time

import pika
import psycopg2
import pytest

from harness import Rosterd, make_msg, pack, unpack, wait_for, wait_messages


def _send(port, rcpt="someone@example.org", subject="hello", timeout=10, host="127.0.0.1"):
    msg = ("From: sender@example.org\r\nTo: %s\r\nSubject: %s\r\n"
           "Message-ID: <%s@test>\r\n\r\nbody line\r\n" % (rcpt, subject, time.time_ns()))
    with smtplib.SMTP(host, port, timeout=timeout) as s:
        s.sendmail("sender@example.org", [rcpt], msg)


# --- PostgreSQL ----------------------------------------------------------------

def test_psql_select_1(servers):
    psql = os.path.join(servers.env["PG_BIN"], "psql")
    out = subprocess.run([psql, "-h", servers.pg_host, "-p", str(servers.pg_port), "-U", "postgres",
                          "-d", "postgres", "-XAtc", "SELECT 1"],
                         check=True, stdout=subprocess.PIPE, text=True).stdout
    assert out.strip() == "1"
    c = servers.connect()
    with c.cursor() as cur:
        cur.execute("SHOW max_connections")
        assert cur.fetchone()[0] == "200"
        cur.execute("SHOW fsync")
        assert cur.fetchone()[0] == "on"
        cur.execute("SHOW listen_addresses")
        assert cur.fetchone()[0] == "127.0.0.1"
    c.close()


def test_db_is_owned_by_a_plain_role(db):
    assert db.query1("SELECT current_database()") == db.name
    row = db.query("SELECT rolsuper, rolcreatedb, rolcreaterole, rolcanlogin FROM pg_roles "
                   "WHERE rolname = %s", db.role)
    assert row == [(False, False, False, True)]
    assert db.query1("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s",
                     db.name) == db.role
    # what rosterd's migrations need: the owner creates trusted extensions,
    # schemas and tables
    c = db.connect(as_owner=True)
    with c.cursor() as cur:
        cur.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        cur.execute("CREATE EXTENSION IF NOT EXISTS pgcrypto")
        cur.execute("CREATE SCHEMA report")
        cur.execute("CREATE TABLE report.messages (org text, message_id text, type text, "
                    "outcome text, reason text, at timestamptz DEFAULT now())")
        cur.execute("SELECT current_user")
        assert cur.fetchone()[0] == db.role
    c.close()
    assert db.query1("SELECT count(*) FROM report.messages") == 0

    def insert_later():
        time.sleep(0.5)
        for i in range(3):
            db.execute("INSERT INTO report.messages (org, message_id, type, outcome) "
                       "VALUES ('acme', %s, 'x', 'applied')", "m%d" % i)
    t = threading.Thread(target=insert_later)
    t.start()
    rows = wait_messages(db, 3, timeout=10)
    t.join()
    assert [r["message_id"] for r in rows] == ["m0", "m1", "m2"]
    assert db.querydicts("SELECT org FROM report.messages LIMIT 1") == [{"org": "acme"}]


def test_wait_messages_without_schema_times_out(db):
    with pytest.raises(AssertionError):
        wait_messages(db, 1, timeout=0.5)


def test_pg_outage_helpers(servers, db):
    assert db.query1("SELECT 1") == 1
    t0 = time.monotonic()
    servers.pg_stop()
    assert not servers.pg_up()
    servers.pg_start()
    assert servers.pg_up()
    assert db.query1("SELECT 2") == 2  # reconnects
    servers.pg_kill()
    assert not servers.pg_up()
    servers.ensure_up()
    assert db.query1("SELECT 3") == 3
    assert time.monotonic() - t0 < 30


# --- RabbitMQ ------------------------------------------------------------------

def test_amqp_publish_get_round_trip(amqp, names):
    amqp.declare_topology()
    assert amqp.queue_depth("queue") == 0
    assert amqp.consumer_count(names.queue) == 0
    m = make_msg("booking.created", {"booking_id": "b1", "version": 1}, org="acme")
    amqp.publish(m, headers={"x-test": "1"})
    amqp.publish(b"\xc1 not msgpack", routing_key="junk")
    wait_for(lambda: amqp.queue_depth("queue") == 2, 5)
    got = amqp.get("queue")
    assert len(got) == 2
    (meth, props, body), (meth2, _, body2) = got
    assert meth.routing_key == "booking.created"
    assert props.content_type == "application/msgpack"
    assert props.delivery_mode == 2
    assert props.headers == {"x-test": "1"}
    assert unpack(body) == m and body == pack(m)
    assert meth2.routing_key == "junk" and body2 == b"\xc1 not msgpack"
    assert amqp.queue_depth("queue") == 0
    assert amqp.queue_depth("no.such.queue") is None
    # many at once
    amqp.publish_many([make_msg("contact.noted", {"contact_id": "c", "text": str(i)})
                       for i in range(200)])
    assert amqp.queue_depth("queue") == 200
    assert amqp.purge("queue") == 200


def test_amqp_unroutable_publish_raises(amqp):
    # an exchange without a queue bound: mandatory publishing says so
    ch = amqp.connection().channel()
    ch.exchange_declare(amqp.names.exchange, "topic", durable=True)
    ch.connection.close()
    with pytest.raises(pika.exceptions.UnroutableError):
        amqp.publish(make_msg("org.configured", {"name": "x"}))


def test_dead_and_status_helpers(amqp, names):
    # stand in for rosterd: declare the dead and status objects
    conn = amqp.connection()
    ch = conn.channel()
    ch.exchange_declare(names.dead_exchange, "fanout", durable=True)
    ch.queue_declare(names.dead_queue, durable=True)
    ch.queue_bind(names.dead_queue, names.dead_exchange, "")
    ch.exchange_declare(names.status_exchange, "fanout", durable=True)
    assert amqp.get_dead(timeout=0) == []
    body = pack(make_msg("contact.deleted", {"contact_id": "c1"}))
    ch.basic_publish(names.dead_exchange, "contact.deleted", body, pika.BasicProperties(
        headers={"x-rosterd-error": "contact has bookings: use contact.erased",
                 "x-rosterd-error-at": 1700000000000}, delivery_mode=2))
    dead = amqp.get_dead(n=1, timeout=5)
    assert len(dead) == 1
    assert dead[0].error == "contact has bookings: use contact.erased"
    assert dead[0].msg["type"] == "contact.deleted"
    assert dead[0].body == body
    assert dead[0].routing_key == "contact.deleted"

    watch = amqp.status_watch(timeout=5)
    doc = {"instance": "rd-1", "state": "running", "messages": {"applied": 3}}
    ch.basic_publish(names.status_exchange, "", json.dumps({"instance": "other"}))
    ch.basic_publish(names.status_exchange, "", json.dumps(doc))
    assert watch.next(5, instance="rd-1") == doc

    def later():
        time.sleep(0.5)
        c2 = amqp.connection()
        c2.channel().basic_publish(names.status_exchange, "", json.dumps(dict(doc, state="draining")))
        c2.close()
    t = threading.Thread(target=later)
    t.start()
    assert amqp.status(timeout=10, predicate=lambda d: d["state"] == "draining")["instance"] == "rd-1"
    t.join()
    conn.close()


@pytest.mark.timeout(120)
def test_rabbit_restart_keeps_durable_data(servers, amqp):
    amqp.declare_topology()
    amqp.publish(make_msg("org.configured", {"name": "Acme"}))
    t0 = time.monotonic()
    servers.rabbit_kill()
    assert not servers.rabbit_up()
    servers.rabbit_start()
    restart = time.monotonic() - t0
    assert servers.rabbit_up()
    # the helper reconnects by itself
    wait_for(lambda: amqp.queue_depth("queue") == 1, 10)
    servers.rabbit_stop()
    servers.ensure_up()
    assert amqp.queue_depth("queue") == 1
    assert restart < 60
    ctl = servers.rabbitmqctl("-q", "list_queues", "name", "durable", "--no-table-headers")
    assert amqp.names.queue in ctl


# --- SMTP ----------------------------------------------------------------------

def test_shared_sink_stores_mail(servers):
    sink = servers.shared_smtp()
    sink.accept()
    before = len(sink.mails())
    _send(servers.smtp_port, rcpt="shared@example.org", subject="shared sink")
    mails = sink.wait_mails(before + 1, 5)
    m = mails[-1]
    assert m.rcpt_tos == ["shared@example.org"]
    assert m.mail_from == "sender@example.org"
    assert m.subject == "shared sink"
    assert m.text.strip() == "body line"
    assert m.path.startswith(servers.env["SMTP_DIR"])
    assert os.path.exists(m.path[:-4] + ".json")


def test_sink_tempfail_and_permfail(smtp):
    smtp.set_mode("tempfail")
    with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
        _send(smtp.port)
    assert list(e.value.recipients.values())[0][0] == 451
    smtp.set_mode("tempfail", stage="data")
    with pytest.raises(smtplib.SMTPDataError) as e:
        _send(smtp.port)
    assert e.value.smtp_code == 451
    smtp.set_mode("permfail")
    with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
        _send(smtp.port)
    assert list(e.value.recipients.values())[0][0] == 550
    smtp.set_mode("permfail", stage="data", code=552, text="5.3.4 too big")
    with pytest.raises(smtplib.SMTPDataError) as e:
        _send(smtp.port)
    assert e.value.smtp_code == 552
    smtp.set_mode("tempfail", stage="connect")
    with pytest.raises(smtplib.SMTPConnectError) as e:
        _send(smtp.port)
    assert e.value.smtp_code == 421
    smtp.set_mode("permfail", stage="mail")
    with pytest.raises(smtplib.SMTPSenderRefused) as e:
        _send(smtp.port)
    assert e.value.smtp_code == 550
    assert smtp.mails() == []
    smtp.accept()
    _send(smtp.port)
    assert len(smtp.mails()) == 1
    assert len(smtp.events("reject")) == 6
    assert smtp.attempts() == 6  # MAIL commands (connect-stage refusal has none)


def test_sink_count_applies_to_next_n(smtp):
    smtp.set_mode("tempfail", count=2)
    for _ in range(2):
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            _send(smtp.port)
    _send(smtp.port)
    _send(smtp.port)
    assert len(smtp.mails()) == 2
    smtp.set_mode("tempfail", count=1)  # rewriting restarts the count
    with pytest.raises(smtplib.SMTPRecipientsRefused):
        _send(smtp.port)
    _send(smtp.port)
    assert len(smtp.mails()) == 3


def test_sink_hangup_after_data(smtp):
    smtp.set_mode("hangup_after_data", count=1)
    with pytest.raises(smtplib.SMTPServerDisconnected):
        _send(smtp.port, subject="lost reply")
    assert smtp.mails() == []  # never acknowledged
    hung = smtp.mails(all=True)
    assert len(hung) == 1 and hung[0].hung_up and hung[0].subject == "lost reply"
    assert len(smtp.events("hangup")) == 1
    _send(smtp.port, subject="second try")
    assert [m.subject for m in smtp.mails()] == ["second try"]


def test_sink_stall_times_out(smtp):
    smtp.set_mode("stall", count=1)
    t0 = time.monotonic()
    with pytest.raises((socket.timeout, smtplib.SMTPServerDisconnected)):
        _send(smtp.port, timeout=1)
    assert 0.9 < time.monotonic() - t0 < 5
    assert len(smtp.events("stall")) == 1
    _send(smtp.port)  # count consumed: accepting again
    assert len(smtp.mails()) == 1


def test_sink_delay(smtp):
    smtp.set_mode("accept", delay_ms=700)
    t0 = time.monotonic()
    _send(smtp.port)
    assert time.monotonic() - t0 >= 0.7
    assert len(smtp.mails()) == 1


def test_sink_starttls(smtp_tls):
    ctx = ssl.create_default_context(cafile=smtp_tls.cert)
    with smtplib.SMTP("127.0.0.1", smtp_tls.port, timeout=10) as s:
        s.ehlo()
        assert s.has_extn("starttls")
        s.starttls(context=ctx)
        s.ehlo()
        s.sendmail("a@example.org", ["b@example.org"], "Subject: tls\r\n\r\nx\r\n")
    m = smtp_tls.wait_mails(1, 5)[0]
    assert m.tls and m.subject == "tls"


# --- rosterd harness (with a stand-in binary) ----------------------------------

FAKE = textwrap.dedent("""\
    #!/bin/sh
    # stand-in for rosterd: logs like it, reacts to signals
    [ "$1" = -c ] && [ -f "$2" ] || { echo "<3>rosterd config.error path=$2"; exit 78; }
    trap 'echo "<5>fake reload"' HUP
    trap 'echo "<5>fake draining"; echo "<5>fake stopped code=0"; exit 0' TERM
    [ -n "$FAKE_UBSAN" ] && echo "daemon/x.c:1:2: runtime error: signed integer overflow"
    echo "<6>fake starting pid=$$"
    sleep 0.3
    echo "<5>fake ready instance=fake version=0 queue=q prefetch=1 batch_size=1"
    while :; do sleep 0.1; done
    """)


@pytest.fixture
def fake_bin(tmp_path):
    p = tmp_path / "fake-rosterd"
    p.write_text(FAKE)
    p.chmod(0o755)
    return str(p)


def test_rosterd_process_helpers(tmp_path, fake_bin):
    conf = tmp_path / "r.conf"
    conf.write_text("[daemon]\ninstance = fake\n")
    rd = Rosterd(str(conf), str(tmp_path / "r.log"), binary=fake_bin).start()
    rd.wait_ready(10)
    assert rd.alive
    rd.sighup()
    rd.wait_log(r"fake reload", 5)
    ev = rd.log_events("ready")
    assert ev[0]["instance"] == "fake" and ev[0]["level"] == 5 and ev[0]["batch_size"] == "1"
    rd.sigterm()
    assert rd.wait_exit(5) == 0
    assert "stopped code=0" in rd.log_text()
    assert rd.sanitizer_errors() == []
    rd2 = Rosterd(str(conf), str(tmp_path / "r2.log"), binary=fake_bin,
                  env={"FAKE_UBSAN": "1"}).start()
    rd2.wait_ready(10)
    rd2.sigkill()
    assert rd2.wait_exit(5) == -9
    assert len(rd2.sanitizer_errors()) == 1
    rd3 = Rosterd(str(tmp_path / "missing.conf"), str(tmp_path / "r3.log"), binary=fake_bin).start()
    with pytest.raises(AssertionError, match="exited with 78"):
        rd3.wait_ready(5)


def test_rosterd_factory_writes_config(rosterd, db, names, smtp, servers):
    rd = rosterd(start=False, max_retries=1, smtp_port=2525, prefetch=None,
                 postgres={"connections": 2}, **{"daemon.batch_size": 10})
    text = open(rd.config_path).read()
    assert "[daemon]\ninstance = %s\n" % rd.instance in text
    assert "max_retries = 1\n" in text and "batch_size = 10\n" in text
    assert "conninfo = %s\n" % db.conninfo in text and "connections = 2\n" in text
    assert "queue = %s\n" % names.queue in text
    assert "dead_queue = %s\n" % names.dead_queue in text
    assert "url = %s\n" % servers.amqp_url in text
    assert "port = 2525\n" in text and "port = %d\n" % smtp.port not in text
    assert "prefetch" not in text
    with pytest.raises(ValueError):
        rosterd(start=False, no_such_key=1)
    assert not rd.alive
