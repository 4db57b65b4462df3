"""test_outbox.py - Step 4: the mail outbox end to end (SPEC 3, 4.8, 9,
report.outbox): templates and placeholders, queueing in the transaction of
the change, language fallback, notify:false, delivery through libesmtp to
the loopback SMTP sink, retries (4xx, network faults, a hang-up after the
final dot) with growing delays, permanent failures (5xx), the lifetime,
header safety, STARTTLS, stuck servers (stall, black hole) against
shutdown, lease recovery after SIGKILL with no mail lost, two instances
never sending the same row, rosterctl outbox list|retry, and (with
ROSTERD_TSAN_BIN) the workers under ThreadSanitizer."""
import email
import email.policy
import json
import os
import signal
import socket
import subprocess
import time

import pytest

import harness
from harness import make_msg, wait_for, wait_messages

ORG = "acme"
FROM = "Acme Kurse <info@acme.example>"
REPLY = "office@acme.example"


# --- helpers -------------------------------------------------------------------

def org_msg(org=ORG, language="en", mail_from=FROM, reply_to=REPLY):
    d = {"name": "Acme", "language": language}
    if mail_from:
        d["mail_from"] = mail_from
    if reply_to:
        d["reply_to"] = reply_to
    return make_msg("org.configured", d, org=org)


def offer_msg(offer_id="O1", title="Yoga am See", org=ORG, starts_at=1767261600000,
              currency="CHF"):
    return make_msg("offer.upserted", {"offer_id": offer_id, "title": title,
                                       "starts_at": starts_at, "currency": currency}, org=org)


def tpl_msg(key, language, subject, body, org=ORG, id=None):
    return make_msg("template.upserted", {"key": key, "language": language, "subject": subject,
                                          "body": body}, org=org, id=id)


def booking_msg(bid, email, first_name="Anna", last_name=None, language=None, org=ORG,
                number=None, total=12050, currency="CHF", notify=None, status=None, version=1,
                offer_id="O1", fields=None):
    booker = {"email": email, "first_name": first_name}
    if last_name:
        booker["last_name"] = last_name
    if language:
        booker["language"] = language
    if fields:
        booker["fields"] = fields
    d = {"booking_id": bid, "version": version, "offer_id": offer_id, "booker": booker,
         "number": number or "N-" + bid, "total": total, "currency": currency}
    if notify is not None:
        d["notify"] = notify
    if status is not None:
        d["status"] = status
    return make_msg("booking.created", d, org=org)


def prepare(publish, db, templates=(("en", "Booking {{booking.number}}",
                                    "Hello {{contact.first_name}}, see you at {{offer.title}}."),),
          org=ORG, key="booking_confirmation", **org_kw):
    """The organisation, an offer and booking_confirmation templates; waits
    until they are applied."""
    msgs = [org_msg(org=org, **org_kw), offer_msg(org=org)]
    msgs += [tpl_msg(key, lang, subj, body, org=org) for lang, subj, body in templates]
    for m in msgs:
        publish(m)
    wait_messages(db, len(msgs), where="org = %s", args=(org,))


def outbox(db, org=ORG):
    return db.querydicts("SELECT * FROM report.outbox WHERE org = %s ORDER BY outbox_id::bigint",
                         org)


def outbox_row(db, outbox_id, org=ORG):
    return db.querydicts("SELECT o.*, r.outbox_id AS rid FROM rd.outbox o JOIN report.outbox r"
                         " ON r.org = o.org AND r.outbox_id = o.outbox_id::text"
                         " WHERE o.org = %s AND o.outbox_id = %s", org, int(outbox_id))[0]


def wait_status(db, status, n=1, timeout=30, org=ORG):
    return wait_for(lambda: (lambda rows: rows if len(rows) >= n else None)(
        db.querydicts("SELECT * FROM report.outbox WHERE org = %s AND status = %s"
                      " ORDER BY outbox_id::bigint", org, status)),
        timeout, 0.1, "%d outbox rows %s" % (n, status))


def activity(db, kind, org=ORG):
    return db.querydicts("SELECT * FROM report.activity WHERE org = %s AND kind = %s ORDER BY at",
                         org, kind)


# --- queueing and rendering ------------------------------------------------------

def test_booking_confirmation_rendered_and_delivered(rosterd, publish, db, smtp, amqp):
    rd = rosterd()
    prepare(publish, db, templates=[
        ("de", "Bestätigung {{booking.number}} für {{ contact.first_name }}",
         "Hallo {{contact.first_name}} {{contact.last_name}}\n"
         "Kurs: {{offer.title}} am {{offer.starts_at}}\n"
         "Total: {{booking.total}}\nFeld: {{contact.fields.diet}}!\n"
         "Zeile mit Punkt:\n.\nEnde {{contact.email}}\n"),
        ("en", "Booking {{booking.number}}", "Hello {{contact.first_name}}")])
    b = booking_msg("B1", "Zoe@Example.org", first_name="Zoë", last_name="Müller",
                    language="de", fields={"diet": "vegan"})
    publish(b)
    mails = smtp.wait_mails(1)
    m = mails[0]
    row = outbox(db)[0]
    assert row["status"] == "sent" or wait_status(db, "sent")
    row = wait_status(db, "sent")[0]
    assert row["language"] == "de" and row["template"] == "booking_confirmation"
    assert row["to_address"] == "zoe@example.org"
    assert row["subject"] == "Bestätigung N-B1 für Zoë"
    assert row["body"] == ("Hallo Zoë Müller\nKurs: Yoga am See am 2026-01-01 10:00 UTC\n"
                           "Total: CHF 120.50\nFeld: vegan!\nZeile mit Punkt:\n.\n"
                           "Ende zoe@example.org\n")
    assert row["attempts"] == 1 and row["last_error"] is None and row["sent_at"] is not None
    assert row["contact_id"] == db.query1("SELECT contact_id FROM report.bookings"
                                          " WHERE booking_id = 'B1'")
    # what the sink got is exactly the row
    assert m.rcpt_tos == ["zoe@example.org"]
    assert m.mail_from == "info@acme.example"
    assert m.subject == row["subject"]
    assert m.text.replace("\r\n", "\n") == row["body"]
    assert m.from_ == "Acme Kurse <info@acme.example>"
    assert m.to == "Zoë Müller <zoe@example.org>"
    assert m.reply_to == "office@acme.example"
    ob = outbox_row(db, row["outbox_id"])
    assert m.message_id == ob["message_id"]
    assert ob["message_id"].startswith("<%s." % row["outbox_id"])
    assert ob["message_id"].endswith("@acme.example>")
    assert m.msg["MIME-Version"] == "1.0"
    assert m.msg.get_content_type() == "text/plain"
    assert m.msg.get_content_charset() == "utf-8"
    assert m.msg["Content-Transfer-Encoding"] in ("quoted-printable", "7bit", "base64")
    assert m.msg["Date"] is not None
    raw_headers = m.raw.split(b"\r\n\r\n", 1)[0]
    assert b"=?UTF-8?B?" in raw_headers                   # RFC 2047 for non-ASCII
    assert all(b < 0x80 for b in raw_headers)             # headers are ASCII
    assert raw_headers.lower().count(b"\nmessage-id:") == 1
    # the activity says it, with the message that caused it
    acts = activity(db, "mail.queued")
    assert len(acts) == 1 and acts[0]["message_id"] == b["id"]
    assert acts[0]["contact_id"] == row["contact_id"]
    st = amqp.status(predicate=lambda s: s["outbox"]["sent"] >= 1, instance=rd.instance)
    assert st["outbox"]["queued"] == 1 and st["outbox"]["failed"] == 0


def test_unknown_placeholder_rejected_with_its_name(rosterd, publish, db, amqp):
    rosterd()
    bad = tpl_msg("booking_confirmation", "en", "Hi {{contact.nickname}}", "body")
    bad_body = tpl_msg("invoice", "en", "Invoice", "Pay {{invoice.amount}} by {{ due_date }}")
    open_ = tpl_msg("invoice", "de", "Rechnung", "Bitte {{invoice.amount")
    good = tpl_msg("booking_confirmation", "EN",
                   "{{ contact.first_name }} {{vars.x}} {{contact.fields.a b}}", "ok")
    for m in (bad, bad_body, open_, good):
        publish(m)
    rows = {r["message_id"]: r for r in wait_messages(db, 4)}
    assert rows[bad["id"]]["outcome"] == "rejected"
    assert "{{contact.nickname}}" in rows[bad["id"]]["reason"]
    assert "data.subject" in rows[bad["id"]]["reason"]
    assert "{{ due_date }}" in rows[bad_body["id"]]["reason"]
    assert "data.body" in rows[bad_body["id"]]["reason"]
    assert rows[open_["id"]]["outcome"] == "rejected"
    assert "unterminated" in rows[open_["id"]]["reason"]
    assert rows[good["id"]]["outcome"] == "applied"
    assert db.query("SELECT key, language FROM rd.templates") == [("booking_confirmation", "en")]
    dead = amqp.get_dead(3)
    assert any("{{contact.nickname}}" in (d.error or "") for d in dead)


def test_sql_rejects_unknown_placeholder_too(rosterd, db):
    """The rule lives in SQL as well (the C check only says it earlier)."""
    rosterd()
    wait_for(lambda: db.table_exists("rd.templates"), 20)
    assert db.query1("SELECT rd.tpl_check('Hi {{contact.nickname}}')") == \
        "unknown placeholder {{contact.nickname}}"
    assert db.query1("SELECT rd.tpl_check('Hi {{ contact.first_name }}')") is None
    assert db.query1("SELECT rd.tpl_check('{{contact.first_name')").startswith("unterminated")
    assert db.query("SELECT rd.money_fmt(12050, 'CHF'), rd.money_fmt(500, 'JPY'),"
                    " rd.money_fmt(1234, 'KWD'), rd.money_fmt(-5, 'EUR'),"
                    " rd.money_fmt(7, NULL)") == \
        [("CHF 120.50", "JPY 500", "KWD 1.234", "EUR -0.05", "0.07")]


def test_language_fallback(rosterd, publish, db, smtp):
    rosterd()
    prepare(publish, db, language="fr", templates=[
        ("de", "DE {{booking.number}}", "de"), ("fr", "FR {{booking.number}}", "fr"),
        ("en", "EN {{booking.number}}", "en")])
    publish(booking_msg("B1", "a@example.org", language="de"))        # its own
    publish(booking_msg("B2", "b@example.org", language="fr-CH"))     # primary subtag
    publish(booking_msg("B3", "c@example.org", language="it"))        # the org's
    publish(booking_msg("B4", "d@example.org"))                       # none: the org's
    rows = wait_status(db, "sent", 4)
    got = {r["to_address"]: (r["language"], r["subject"]) for r in rows}
    assert got == {"a@example.org": ("de", "DE N-B1"), "b@example.org": ("fr", "FR N-B2"),
                   "c@example.org": ("fr", "FR N-B3"), "d@example.org": ("fr", "FR N-B4")}
    # an organisation whose language has no template: any (stable: the first)
    prepare(publish, db, org="beta", language="es", templates=[
        ("it", "IT", "it"), ("de", "DE", "de")])
    publish(booking_msg("B5", "e@example.org", language="pt", org="beta"))
    rows = wait_status(db, "sent", 1, org="beta")
    assert (rows[0]["language"], rows[0]["subject"]) == ("de", "DE")
    assert {tuple(m.rcpt_tos) for m in smtp.wait_mails(5)} == \
        {("a@example.org",), ("b@example.org",), ("c@example.org",), ("d@example.org",),
         ("e@example.org",)}


def test_notify_false_no_template_no_email(rosterd, publish, db, smtp):
    rosterd()
    prepare(publish, db)
    publish(booking_msg("B1", "a@example.org", notify=False))
    publish(booking_msg("B2", "b@example.org", status="pending"))
    publish(make_msg("booking.cancelled", {"booking_id": "B1", "version": 2}))  # no template
    publish(make_msg("booking.cancelled", {"booking_id": "B2", "version": 2, "notify": False}))
    publish(booking_msg("B3", "c@example.org"))  # the one that is sent
    wait_messages(db, 5 + 3)
    wait_status(db, "sent", 1)
    time.sleep(0.5)
    rows = outbox(db)
    assert [r["to_address"] for r in rows] == ["c@example.org"]
    assert len(smtp.mails()) == 1
    notq = activity(db, "mail.not_queued")
    assert len(notq) == 1 and "no template booking_cancellation" in notq[0]["summary"]
    # a contact without email: nothing queued, the activity says why
    cid = db.query1("SELECT contact_id FROM report.contacts WHERE email = 'a@example.org'")
    publish(make_msg("contact.upserted", {"first_name": "Noemail"}))
    wait_messages(db, 9)
    cid2 = db.query1("SELECT contact_id FROM report.contacts WHERE first_name = 'Noemail'")
    publish(make_msg("mail.requested", {"contact_id": cid2, "template": "booking_confirmation"}))
    wait_for(lambda: len(activity(db, "mail.not_queued")) == 2, 10)
    assert "no email" in activity(db, "mail.not_queued")[1]["summary"]
    assert len(outbox(db)) == 1 and cid


def test_mail_requested_vars_and_waiting(rosterd, publish, db, smtp):
    rosterd(max_retries=2, retry_base_ms=100)
    prepare(publish, db, key="reminder", templates=[
        ("en", "Reminder: {{vars.topic}}", "Dear {{contact.first_name}},\n{{vars.text}}\n")])
    publish(make_msg("contact.upserted", {"email": "anna@example.org", "first_name": "Anna"}))
    wait_messages(db, 4)
    cid = db.query1("SELECT contact_id FROM report.contacts")
    publish(make_msg("mail.requested", {"contact_id": cid, "template": "reminder",
                                        "vars": {"topic": "Kurs 5", "text": "Bis bald!"}}))
    m = smtp.wait_mails(1)[0]
    assert m.subject == "Reminder: Kurs 5"
    assert m.text.replace("\r\n", "\n") == "Dear Anna,\nBis bald!\n"
    # an unknown contact: the message waits, then gives up (rejected)
    unknown = make_msg("mail.requested", {"contact_id": "00000000-0000-4000-8000-000000000001",
                                          "template": "reminder"})
    publish(unknown)
    row = wait_messages(db, 1, where="message_id = %s", args=(unknown["id"],), timeout=30)[0]
    assert row["outcome"] == "rejected" and "not yet seen" in row["reason"]


def test_header_injection_from_message_values(rosterd, publish, db, smtp):
    rosterd()
    prepare(publish, db, key="note", templates=[
        ("en", "Re: {{vars.subject}} {{contact.first_name}}", "Text: {{vars.subject}}")])
    publish(make_msg("contact.upserted", {"email": "anna@example.org",
                                          "first_name": "Anna\r\nBcc: victim@example.org",
                                          "last_name": "X\nCc: other@example.org"}))
    wait_messages(db, 4)
    cid = db.query1("SELECT contact_id FROM report.contacts")
    publish(make_msg("mail.requested", {"contact_id": cid, "template": "note", "vars": {
        "subject": "hi\r\nBcc: victim2@example.org\r\n\r\nfake body"}}))
    m = smtp.wait_mails(1)[0]
    assert m.rcpt_tos == ["anna@example.org"]
    head = m.raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    names = [line.split(":", 1)[0].lower() for line in head.split("\r\n")
             if line and not line[0].isspace()]
    assert "bcc" not in names and "cc" not in names
    assert sorted(names) == sorted(["date", "from", "to", "reply-to", "subject", "message-id",
                                    "mime-version", "content-type",
                                    "content-transfer-encoding", "auto-submitted"])
    assert "\n" not in m.subject and "\r" not in m.subject
    assert "victim2@example.org" in m.subject          # the text stays, as text
    assert "victim@example.org" in m.to                # inside the display name only
    assert m.msg["To"].addresses[0].addr_spec == "anna@example.org"
    row = outbox(db)[0]
    assert "\n" not in row["subject"] and "\r" not in row["subject"]
    assert m.text.replace("\r\n", "\n").startswith("Text: hi\nBcc: victim2")  # body: as given


# --- delivery outcomes ---------------------------------------------------------------

def _mail_times(smtp):
    return [e["t"] for e in smtp.events("mail")]


def test_tempfail_then_success_with_growing_delays(rosterd, publish, db, smtp, amqp):
    rd = rosterd(mail_retry_base_ms=300)
    smtp.set_mode("tempfail", count=3)
    prepare(publish, db)
    publish(booking_msg("B1", "a@example.org"))
    row = wait_status(db, "sent", 1, timeout=30)[0]
    assert row["attempts"] == 4
    assert row["last_error"] == "451 4.3.0 Temporary failure, try later"
    t = _mail_times(smtp)
    assert len(t) == 4
    gaps = [b - a for a, b in zip(t, t[1:])]
    # 300, 600, 1200 ms (plus the time to notice), each longer than the last
    assert gaps[0] >= 0.28 and gaps[1] >= 0.58 and gaps[2] >= 1.18, gaps
    assert gaps[0] < gaps[1] < gaps[2]
    assert len(smtp.mails()) == 1
    st = amqp.status(predicate=lambda s: s["outbox"]["sent"] >= 1, instance=rd.instance)
    assert st["outbox"]["retrying"] == 3


def test_retrying_between_attempts(rosterd, publish, db, smtp):
    rosterd(mail_retry_base_ms=60000)
    smtp.set_mode("tempfail", stage="mail", code=421, text="4.7.0 Try again later")
    prepare(publish, db)
    publish(booking_msg("B1", "a@example.org"))
    row = wait_status(db, "retrying", 1)[0]
    assert row["attempts"] == 1 and row["last_error"] == "421 4.7.0 Try again later"
    ob = outbox_row(db, row["outbox_id"])
    left = db.query1("SELECT extract(epoch FROM due_at - now()) FROM rd.outbox")
    assert 50 < float(left) <= 60 and ob["claim"] is None


def test_permanent_failure_then_retry_by_hand(rosterd, publish, db, smtp, rosterctl):
    rosterd()
    smtp.set_mode("permfail")
    prepare(publish, db)
    publish(booking_msg("B1", "a@example.org"))
    publish(booking_msg("B2", "b@example.org"))
    rows = wait_status(db, "failed", 2)
    assert all(r["attempts"] == 1 for r in rows)
    assert all(r["last_error"] == "550 5.1.1 Mailbox unavailable" for r in rows)
    assert smtp.attempts() == 2                # at once: no retry
    fails = activity(db, "mail.failed")
    assert len(fails) == 2 and "550" in fails[0]["summary"]
    # rosterctl shows them, for the org and for a contact
    out = rosterctl("--json", "outbox", "list", "--org", ORG, "--status", "failed", check=True)
    listed = json.loads(out.stdout)
    assert sorted(r["to_address"] for r in listed) == ["a@example.org", "b@example.org"]
    assert listed[0]["last_error"].startswith("550")
    cid = rows[0]["contact_id"]
    one = json.loads(rosterctl("--json", "outbox", "list", "--contact", cid, check=True).stdout)
    assert [r["outbox_id"] for r in one] == [rows[0]["outbox_id"]]
    text = rosterctl("outbox", "list", "--org", ORG, check=True).stdout
    assert "failed" in text and "550 5.1.1" in text
    # a sent mail is not sent again; a failed one is
    smtp.accept()
    r = rosterctl("outbox", "retry", "--org", ORG, "--id", rows[0]["outbox_id"], check=True)
    assert "1 mail" in r.stdout
    wait_status(db, "sent", 1)
    r = rosterctl("outbox", "retry", "--org", ORG, "--id", rows[0]["outbox_id"])
    assert r.returncode != 0 and "sent" in r.stderr
    r = rosterctl("outbox", "retry", "--org", ORG, "--failed", check=True)
    assert "1 mail" in r.stdout
    rows = wait_status(db, "sent", 2)
    assert [x["attempts"] for x in rows] == [2, 2]
    assert len(smtp.mails()) == 2
    assert rosterctl("outbox", "retry", "--org", ORG).returncode != 0      # no selection
    assert rosterctl("outbox", "bogus").returncode != 0


def test_lifetime_over_gives_up(rosterd, publish, db, smtp):
    rosterd(mail_retry_base_ms=200, mail_lifetime=60)
    smtp.set_mode("tempfail")
    prepare(publish, db)
    publish(booking_msg("B1", "a@example.org"))
    wait_for(lambda: smtp.attempts() >= 2, 15)
    # the mail was queued a minute ago: its window is over at the next failure
    db.execute("UPDATE rd.outbox SET window_at = now() - interval '61 seconds',"
               " created_at = now() - interval '61 seconds'")
    row = wait_status(db, "failed", 1, timeout=20)[0]
    assert "451" in row["last_error"] and "gave up" in row["last_error"]


def test_hangup_after_final_dot_resent_with_same_message_id(rosterd, publish, db, smtp):
    rosterd()
    smtp.set_mode("hangup_after_data", count=1)
    prepare(publish, db)
    publish(booking_msg("B1", "a@example.org"))
    row = wait_status(db, "sent", 1, timeout=30)[0]
    assert row["attempts"] == 2 and row["last_error"].startswith("network")
    mails = smtp.wait_mails(2, all=True)
    assert [m.hung_up for m in mails] == [True, False]
    assert mails[0].message_id == mails[1].message_id == outbox_row(db, row["outbox_id"])["message_id"]
    assert mails[0].raw == mails[1].raw     # a re-send is the same message, byte for byte


def test_batch_in_one_connection(rosterd, publish, db, smtp):
    """Many due mails go out in one session per worker (connection reuse)."""
    rosterd(workers=1)
    prepare(publish, db)
    smtp.set_mode("accept", delay_ms=3000)   # hold the first session a while
    publish(booking_msg("X", "x@example.org"))
    wait_for(lambda: smtp.attempts() >= 1, 10)
    for i in range(30):
        publish(booking_msg("B%d" % i, "p%d@example.org" % i))
    wait_for(lambda: len(outbox(db)) == 31, 10)
    smtp.accept()
    wait_status(db, "sent", 31, timeout=40)
    conns = smtp.events("connect")
    assert len(conns) <= 3, len(conns)        # not one per mail
    assert len({m.message_id for m in smtp.mails()}) == 31


def _queue_raw(db, org, n):
    """n due outbox rows in one transaction (as the mail benchmark does)."""
    db.execute("INSERT INTO rd.orgs (org, name, message_id) VALUES (%s, %s, 'm1')", org, org)
    db.execute("INSERT INTO rd.contacts (org, email) VALUES (%s, %s)", org, org + "@example.org")
    db.execute("INSERT INTO rd.outbox (org, contact_id, template, language, from_address,"
               " to_address, subject, body, message_id)"
               " SELECT %s, contact_id, 't', 'en', 'From <from@example.org>', email,"
               "        's' || g, 'b' || g, '<' || g || '.' || %s || '@example.org>'"
               "   FROM rd.contacts, generate_series(1, %s) g WHERE org = %s;"
               " NOTIFY rd_outbox", org, org, n, org)


def test_claims_grow_with_a_backlog_and_shrink_after(rosterd, db, smtp):
    """A claim is one SMTP session. Under a backlog a worker's claims grow
    from 128 to 512 rows (fewer claims, records and sessions per mail); a
    claim that is not full brings it back to 128, so that a worker does not
    take a few hundred rows alone while other workers could share them."""
    rosterd(workers=1)
    _queue_raw(db, "grow", 2000)
    wait_status(db, "sent", 2000, timeout=60, org="grow")
    # 128 + 256 + 512 + 512 + 512 + 80: 6 sessions (128 each: 16); a
    # session of 512 that takes over 2 s (a slow build) starts again at 128
    sessions = len(smtp.events("connect"))
    assert 5 <= sessions <= 10, sessions
    # after the backlog: 128 + 172, not one claim of 512
    _queue_raw(db, "grow2", 300)
    wait_status(db, "sent", 300, timeout=60, org="grow2")
    assert len(smtp.events("connect")) - sessions == 2
    assert len({m.message_id for m in smtp.mails()}) == 2300


def _commits(db):
    return int(db.query1("SELECT xact_commit FROM pg_stat_database"
                         " WHERE datname = current_database()"))


def test_idle_workers_sleep_when_nothing_is_due(rosterd, db):
    """With nothing to send, the next due time is 'none' (-1) and idle
    workers wait for NOTIFY rd_outbox or their longest sleep (5 s), not
    the shortest (20 ms): 0008 fixed a next-due time of 0 on an empty
    outbox, which made 4 idle workers claim about 200 times a second."""
    rosterd(workers=4)
    assert db.query1("SELECT rd.outbox_next_due_ms()") == -1
    time.sleep(1.5)   # the start-up work is counted and flushed
    before = _commits(db)
    time.sleep(3)
    idle = _commits(db) - before
    assert idle < 100, "%d transactions in 3 s with nothing to send" % idle
    # one row waiting: its due time, never negative
    db.execute("INSERT INTO rd.orgs (org, name, message_id) VALUES ('idle', 'Idle', 'm1')")
    db.execute("INSERT INTO rd.contacts (org, email) VALUES ('idle', 'i@example.org')")
    db.execute("INSERT INTO rd.outbox (org, contact_id, template, language, to_address, subject,"
               " body, message_id, status, due_at)"
               " SELECT 'idle', contact_id, 't', 'en', email, 's', 'b', '<i@x>', 'retrying',"
               "        now() + interval '60 s' FROM rd.contacts WHERE org = 'idle'")
    assert 55000 < db.query1("SELECT rd.outbox_next_due_ms()") <= 60000
    db.execute("UPDATE rd.outbox SET status = 'failed' WHERE org = 'idle'")
    assert db.query1("SELECT rd.outbox_next_due_ms()") == -1


# --- stuck servers, shutdown, crashes -------------------------------------------------

def test_stalled_server_does_not_block_other_workers(rosterd, publish, db, smtp):
    rosterd(workers=2, smtp={"timeout": 4})
    prepare(publish, db)
    smtp.set_mode("stall", count=1)            # the next connection hears nothing
    publish(booking_msg("B1", "a@example.org"))
    wait_for(lambda: smtp.events("stall"), 10)
    t0 = time.monotonic()
    publish(booking_msg("B2", "b@example.org"))
    publish(booking_msg("B3", "c@example.org"))
    wait_for(lambda: len(smtp.mails()) >= 2, 10)
    assert time.monotonic() - t0 < 3.5         # while the other worker still waits
    assert {m.rcpt_tos[0] for m in smtp.mails()} == {"b@example.org", "c@example.org"}
    row = wait_status(db, "sent", 3, timeout=30)[0]
    assert row["to_address"] == "a@example.org" and row["attempts"] == 2
    assert "no reply" in row["last_error"]


def _blackhole():
    """A listening socket whose accept queue is full: a connect() to it
    hangs (SYNs are dropped), like a black-holed port."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    port = lsock.getsockname()[1]
    fill = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        try:
            c.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fill.append(c)
    time.sleep(0.2)
    return lsock, fill, port


def test_black_holed_port_times_out_and_cannot_hold_shutdown(rosterd, publish, db):
    lsock, fill, port = _blackhole()
    try:
        rd = rosterd(smtp_port=port, smtp={"timeout": 2})
        prepare(publish, db)
        publish(booking_msg("B1", "a@example.org"))
        row = wait_status(db, "retrying", 1, timeout=15)[0]
        assert "timed out" in row["last_error"] and str(port) in row["last_error"]
        rd.stop()
        # a long timeout: draining interrupts the connect at once
        rd2 = rosterd(smtp_port=port, smtp={"timeout": 60})
        wait_for(lambda: db.query1("SELECT count(*) FROM rd.outbox WHERE status = 'sending'"),
                 15, message="a worker connecting")
        time.sleep(0.5)
        t0 = time.monotonic()
        rd2.sigterm()
        assert rd2.wait_exit(15) == 0
        assert time.monotonic() - t0 < 3
        assert db.query1("SELECT status FROM rd.outbox") in ("retrying", "sending")
    finally:
        for c in fill:
            c.close()
        lsock.close()


def test_stalled_server_cannot_hold_shutdown(rosterd, publish, db, smtp):
    rd = rosterd(smtp={"timeout": 60}, drain_timeout=2)
    prepare(publish, db)
    smtp.set_mode("stall")
    publish(booking_msg("B1", "a@example.org"))
    wait_for(lambda: smtp.events("stall"), 10)
    t0 = time.monotonic()
    rd.sigterm()
    assert rd.wait_exit(15) == 0
    assert time.monotonic() - t0 < 4.5
    assert "mail.drain_timeout" in rd.log_text()
    # the row keeps its lease: sent later by whoever takes it then
    assert db.query1("SELECT status FROM rd.outbox") == "sending"


def test_drain_finishes_and_records_the_session_in_progress(rosterd, publish, db, smtp):
    rd = rosterd(smtp={"timeout": 10})
    prepare(publish, db)
    smtp.set_mode("accept", delay_ms=1500)    # a slow reply to the final dot
    publish(booking_msg("B1", "a@example.org"))
    wait_for(lambda: smtp.attempts() >= 1, 10)
    rd.sigterm()
    assert rd.wait_exit(15) == 0
    assert db.query1("SELECT status FROM rd.outbox") == "sent"   # recorded before the exit
    assert len(smtp.mails()) == 1


def test_sigkill_lease_recovery_loses_nothing(rosterd, publish, db, smtp):
    rd = rosterd(workers=2, smtp={"timeout": 3})      # lease 4 x 3 s
    prepare(publish, db)
    smtp.set_mode("accept", delay_ms=2500)
    for i in range(6):
        publish(booking_msg("B%d" % i, "p%d@example.org" % i))
    wait_for(lambda: len(outbox(db)) == 6, 15)
    wait_for(lambda: db.query1("SELECT count(*) FROM rd.outbox WHERE status = 'sending'"), 10)
    wait_for(lambda: smtp.attempts() >= 1, 10)
    rd.sigkill()
    rd.wait_exit(10)
    sending = db.query1("SELECT count(*) FROM rd.outbox WHERE status = 'sending'")
    assert sending >= 1
    smtp.accept()
    rosterd(workers=2, smtp={"timeout": 3})
    rows = wait_status(db, "sent", 6, timeout=60)
    ids = {outbox_row(db, r["outbox_id"])["message_id"] for r in rows}
    got = [m.message_id for m in smtp.mails()]
    assert set(got) == ids                         # nothing lost
    assert all(got.count(i) <= 2 for i in ids)     # a re-send only of what was in flight
    assert len(got) - len(ids) <= sending


def test_two_instances_never_send_the_same_row(rosterd, publish, db, smtp):
    rosterd(workers=3)
    rosterd(workers=3)
    prepare(publish, db)
    smtp.set_mode("accept", delay_ms=20)
    for i in range(60):
        publish(booking_msg("B%d" % i, "p%d@example.org" % i))
    wait_status(db, "sent", 60, timeout=60)
    got = [m.message_id for m in smtp.mails()]
    assert len(got) == 60 and len(set(got)) == 60
    assert db.query1("SELECT max(attempts) FROM rd.outbox") == 1


# --- STARTTLS ------------------------------------------------------------------------

def test_starttls_require_refuses_cleartext(rosterd, publish, db, smtp):
    rosterd(starttls="require")
    prepare(publish, db)
    publish(booking_msg("B1", "a@example.org"))
    row = wait_status(db, "retrying", 1)[0]
    assert "STARTTLS" in row["last_error"]
    time.sleep(0.3)
    assert smtp.mails(all=True) == []


def test_starttls_require_with_trusted_certificate(rosterd, publish, db, smtp_tls):
    # a short timeout: the sink (asyncio start_tls) now and then loses the
    # EHLO that follows the handshake; rosterd then retries
    rosterd(starttls="require", smtp_host="localhost", smtp_port=smtp_tls.port,
            env={"SSL_CERT_FILE": smtp_tls.cert}, smtp={"timeout": 2})
    prepare(publish, db)
    publish(booking_msg("B1", "a@example.org"))
    m = smtp_tls.wait_mails(1, timeout=30)[0]
    assert m.tls and m.rcpt_tos == ["a@example.org"]
    wait_status(db, "sent", 1)


def test_starttls_sessions_one_after_another(rosterd, publish, db, smtp_tls):
    """Each mail in its own TLS session, the CA from [smtp] ca_file. libesmtp
    1.1 freed its shared default TLS context with the first session: the
    second one then used freed memory (ASan report, lost mail)."""
    rosterd(starttls="require", smtp_host="localhost", smtp_port=smtp_tls.port,
            smtp={"timeout": 2, "ca_file": smtp_tls.cert})
    prepare(publish, db)
    for i in range(1, 4):
        publish(booking_msg("B%d" % i, "a%d@example.org" % i))
        wait_status(db, "sent", i)
    tos = sorted(m.rcpt_tos[0] for m in smtp_tls.mails())
    assert tos == ["a1@example.org", "a2@example.org", "a3@example.org"]
    assert all(m.tls for m in smtp_tls.mails())


def test_starttls_bad_ca_file_stops_the_start(rosterd, tmp_path):
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    rd = rosterd(wait=False, starttls="require", smtp={"ca_file": str(bad)})
    assert rd.wait_exit(20) != 0
    assert "[smtp] ca_file" in rd.log_text()


def test_starttls_try_takes_any_certificate(rosterd, publish, db, smtp_tls):
    rosterd(starttls="try", smtp_port=smtp_tls.port, smtp={"timeout": 2})
    prepare(publish, db)
    publish(booking_msg("B1", "a@example.org"))
    m = smtp_tls.wait_mails(1, timeout=30)[0]
    assert m.tls


def test_starttls_require_untrusted_certificate_is_not_used(rosterd, publish, db, smtp_tls):
    # the row is 'retrying' between attempts and 'sending' during one: wait
    # for the recorded reason rather than for a status seen between polls
    rosterd(starttls="require", smtp_port=smtp_tls.port, smtp={"timeout": 2})
    prepare(publish, db)
    publish(booking_msg("B1", "a@example.org"))
    row = wait_for(lambda: db.querydicts(
        "SELECT * FROM report.outbox WHERE org = %s AND last_error LIKE %s", ORG,
        "%certificate%"), 30, 0.1, "a certificate error recorded")[0]
    assert row["status"] in ("retrying", "sending")
    assert smtp_tls.mails(all=True) == []


# --- the ledger's triggers (when 0003 is there) ------------------------------------------

def test_invoice_and_payment_mails(rosterd, publish, db, smtp):
    rosterd()
    wait_for(lambda: db.table_exists("rd.outbox"), 20)
    if db.query1("SELECT to_regproc('rd.h_invoice_issued') IS NULL"):
        pytest.skip("the ledger (0003) is not in this tree")
    prepare(publish, db, key="invoice", templates=[
        ("en", "Invoice {{invoice.number}}", "Amount {{invoice.amount}} due {{invoice.due}}"
         " for {{booking.number}}")])
    for m in (tpl_msg("payment_receipt", "en", "Receipt",
                      "Paid {{payment.amount}} of {{invoice.amount}}"),):
        publish(m)
    publish(booking_msg("B1", "a@example.org", notify=False))
    wait_messages(db, 5)
    publish(make_msg("invoice.issued", {"invoice_id": "I1", "amount": 12050, "currency": "CHF",
                                        "booking_id": "B1", "number": "R-1",
                                        "due": "2026-02-01"}))
    publish(make_msg("invoice.issued", {"invoice_id": "I2", "amount": 500, "currency": "CHF",
                                        "booking_id": "B1", "notify": False}))
    publish(make_msg("payment.recorded", {"payment_id": "P1", "invoice_id": "I1",
                                          "amount": 2050, "currency": "CHF"}))
    rows = wait_status(db, "sent", 2)
    subj = {r["template"]: r for r in rows}
    assert subj["invoice"]["body"] == "Amount CHF 120.50 due 2026-02-01 for N-B1"
    assert subj["payment_receipt"]["body"] == "Paid CHF 20.50 of CHF 120.50"
    assert len(outbox(db)) == 2


# --- ThreadSanitizer ---------------------------------------------------------------------

@pytest.mark.timeout(240)
def test_workers_under_thread_sanitizer(rosterd, publish, db, smtp):
    """The worker threads under TSan with zero reports: set ROSTERD_TSAN_BIN
    to a rosterd built with -DROSTERD_TSAN=ON (see docs/outbox.md)."""
    tsan = os.environ.get("ROSTERD_TSAN_BIN")
    if not tsan:
        pytest.skip("ROSTERD_TSAN_BIN is not set (a -DROSTERD_TSAN=ON build of rosterd)")
    rd = rosterd(start=False, workers=4, smtp={"timeout": 3},
                 env={"TSAN_OPTIONS": "halt_on_error=0 second_deadlock_stack=1"})
    rd.binary = tsan
    rd.start()
    rd.wait_ready(60)
    prepare(publish, db)
    smtp.set_mode("tempfail", count=5)
    for i in range(40):
        publish(booking_msg("B%d" % i, "p%d@example.org" % i))
    wait_status(db, "sent", 40, timeout=120)
    rd.sighup()
    smtp.set_mode("stall", count=1)
    publish(booking_msg("Z", "z@example.org"))
    wait_for(lambda: smtp.events("stall"), 20)
    assert rd.stop(30) == 0
    assert "ThreadSanitizer" not in rd.log_text()
