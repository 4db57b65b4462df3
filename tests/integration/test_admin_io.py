"""test_admin_io.py - Step 5 part B: contact.erased and contact.deleted
(SPEC 3, 4.7), rosterctl erase, export (SPEC 5 views, csv and json), import
(CSV through the contact.upserted path, dry run, idempotent re-import),
dead (list, show, replay of the dead-letter queue) and status."""
import csv
import io
import json
import os
import subprocess
import uuid

import pytest

from harness import make_msg, wait_for, wait_messages

ORG = "acme"
MARK_FIRST = "Quirinella"
MARK_LAST = "Zyxwvuts"
MARK_EMAIL = "quirinella.zyx@erase-me.example"
MARK_PHONE = "+41 79 555 01 23"


def org_msg(org=ORG, sync=False):
    return make_msg("org.configured", {"name": org.title(), "sync_contacts": sync,
                                       "mail_from": "Office <office@acme.example>"}, org=org)


def offer_msg(offer_id="O1", org=ORG):
    return make_msg("offer.upserted", {"offer_id": offer_id, "title": "Kurs", "currency": "CHF"},
                    org=org)


def settle(publish, db, msgs, org=ORG):
    """Publish and wait until they all have their report.messages row."""
    before = db.query1("SELECT count(*) FROM report.messages WHERE org = %s", org) or 0
    for m in msgs:
        publish(m)
    return wait_messages(db, before + len(msgs), where="org = %s", args=(org,))


def outcome(db, msg, org=ORG):
    return db.querydicts("SELECT outcome, reason FROM report.messages WHERE org = %s"
                         " AND message_id = %s", org, msg["id"])[0]


def contact_by_email(db, email, org=ORG):
    return db.query1("SELECT contact_id FROM report.contacts WHERE org = %s AND email = %s",
                     org, email)


def pg_dump(servers, db):
    pg_bin = servers.env.get("PG_BIN", "")
    exe = os.path.join(pg_bin, "pg_dump") if pg_bin else "pg_dump"
    r = subprocess.run([exe, "-h", servers.pg_host, "-p", str(servers.pg_port), "-U",
                        servers.pg_user, "--data-only", db.name],
                       capture_output=True, check=True, timeout=60)
    return r.stdout.decode("utf-8", "replace")


# --- erase and delete -------------------------------------------------------------

def history_msgs():
    """A contact with every kind of personal data: booking (booker and
    attendee), custom field, later change (field history), tag, note, an
    invoice and a payment (amounts to keep), a queued mail."""
    booker = {"email": MARK_EMAIL.upper(), "first_name": MARK_FIRST, "last_name": MARK_LAST,
              "phone": MARK_PHONE, "city": "Quirinalstadt", "fields": {"diet": "Quirinvegan"}}
    att = dict(booker, attendee_id="A1", price=5000)
    b = make_msg("booking.created", {"booking_id": "B1", "version": 1, "offer_id": "O1",
                                     "booker": booker, "attendees": [att], "total": 5000,
                                     "currency": "CHF"})
    tpl = make_msg("template.upserted", {"key": "booking_confirmation", "language": "en",
                                         "subject": "Hi {{contact.first_name}}",
                                         "body": "Dear {{contact.first_name}} "
                                                 "{{contact.last_name}}, {{contact.email}}"})
    return [org_msg(), offer_msg(), tpl, b]


def test_erase_by_rosterctl_leaves_no_trace(rosterd, publish, db, rosterctl, servers):
    rosterd()
    settle(publish, db, history_msgs())
    cid = contact_by_email(db, MARK_EMAIL)
    assert cid
    more = [make_msg("contact.upserted", {"contact_id": cid, "phone": "+41 79 555 99 88",
                                          "company": "Quirin AG"}),
            make_msg("contact.tagged", {"contact_id": cid, "add": ["quirin-vip"]}),
            make_msg("contact.noted", {"contact_id": cid, "text": "Quirinella likes tea",
                                       "author": "desk"}),
            make_msg("invoice.issued", {"invoice_id": "I1", "booking_id": "B1", "amount": 5000,
                                        "currency": "CHF", "notify": False}),
            make_msg("payment.recorded", {"payment_id": "P1", "invoice_id": "I1",
                                          "amount": 2000, "currency": "CHF",
                                          "notify": False})]
    settle(publish, db, more)
    assert all(outcome(db, m)["outcome"] == "applied" for m in more)
    dump = pg_dump(servers, db)
    assert MARK_FIRST in dump and MARK_EMAIL in dump  # the check can fail
    balance = db.query1("SELECT sum(amount) FROM report.transactions WHERE org = %s", ORG)

    r = rosterctl("--json", "erase", cid, "--org", ORG)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["contact_id"] == cid and out["outcome"] == "applied"
    assert out["contacts_erased"] == 1

    dump = pg_dump(servers, db)
    # (markers that hex ids cannot contain by chance)
    for marker in (MARK_FIRST, MARK_LAST, MARK_EMAIL, "erase-me", "Quirin", MARK_PHONE,
                   "+41 79 555 99 88", "likes tea"):
        assert marker.lower() not in dump.lower(), marker
    c = db.querydicts("SELECT * FROM report.contacts WHERE contact_id = %s", cid)[0]
    assert c["erased"] is True and c["email"] is None and c["fields"] == {}
    # amounts kept, the ledger unchanged
    assert db.query1("SELECT sum(amount) FROM report.transactions WHERE org = %s", ORG) == balance
    inv = db.querydicts("SELECT * FROM report.invoices WHERE invoice_id = 'I1'")[0]
    assert (inv["amount"], inv["paid"], inv["contact_id"]) == (5000, 2000, cid)
    assert db.query1("SELECT total FROM report.bookings WHERE booking_id = 'B1'") == 5000
    assert db.query1("SELECT price FROM report.attendees WHERE attendee_id = 'A1'") == 5000
    # recorded like a message: report.messages and the activity
    assert db.query1("SELECT outcome FROM report.messages WHERE message_id = %s",
                     out["message_id"]) == "applied"
    assert db.query1("SELECT count(*) FROM report.activity WHERE contact_id = %s"
                     " AND kind = 'contact.erased'", cid) == 1
    # a later booking with the same email is a new person: a new contact
    settle(publish, db, [make_msg("booking.created", {
        "booking_id": "B2", "version": 1, "offer_id": "O1", "booker": {"email": MARK_EMAIL}})])
    assert db.query1("SELECT match FROM report.bookings WHERE booking_id = 'B2'") == \
        "created_no_match"

    # text output and errors
    r = rosterctl("erase", cid)
    assert r.returncode == 0 and "erased contact %s of %s" % (cid, ORG) in r.stdout
    r = rosterctl("erase", str(uuid.uuid4()), "--org", ORG)
    assert r.returncode == 1 and r.stderr.startswith("rosterctl: erase: no contact ")
    r = rosterctl("erase", cid, "--org", "other")
    assert r.returncode == 1 and "no contact %s in organisation other" % cid in r.stderr
    r = rosterctl("erase")
    assert r.returncode == 1 and "which contact?" in r.stderr
    r = rosterctl("erase", "not-a-uuid")
    assert r.returncode == 1 and "no contact not-a-uuid" in r.stderr


def test_erase_message_and_merge_group(rosterd, publish, db, servers, rosterctl):
    rosterd()
    settle(publish, db, history_msgs())
    cid = contact_by_email(db, MARK_EMAIL)
    # a second record of the same person, merged into the first (a tombstone)
    settle(publish, db, [make_msg("contact.upserted", {"email": "old.quirinella@erase-me.example",
                                                       "first_name": "Quirinella-Old"})])
    old = contact_by_email(db, "old.quirinella@erase-me.example")
    if db.query1("SELECT to_regproc('rd.merge_erase_contact') IS NOT NULL"):
        # a real merge (0005): its journal keeps images of both records
        mm = make_msg("contact.merged", {"keep": cid, "drop": old})
        settle(publish, db, [mm])
        assert outcome(db, mm)["outcome"] == "applied"
        assert "Quirinella-Old" in pg_dump(servers, db)  # the journal holds it
    else:
        db.execute("UPDATE rd.contacts SET merged_into = %s WHERE contact_id = %s", cid, old)
    # erasing the tombstone's id erases the person: keep and tombstone
    e = make_msg("contact.erased", {"contact_id": old})
    settle(publish, db, [e])
    assert outcome(db, e)["outcome"] == "applied"
    dump = pg_dump(servers, db)
    assert MARK_EMAIL not in dump and "Quirinella" not in dump and "erase-me" not in dump
    assert db.query("SELECT contact_id, erased, merged_into FROM report.contacts ORDER BY 1") == \
        sorted([(cid, True, None), (old, True, cid)])
    assert db.query1("SELECT summary FROM report.activity WHERE contact_id = %s"
                     " AND kind = 'contact.erased'", cid) == \
        "personal data erased (with 1 merged contacts)"
    r = rosterctl("--json", "erase", old)
    assert r.returncode == 0 and json.loads(r.stdout)["contacts_erased"] == 2
    # the outbox row keeps its status, not its text
    row = db.querydicts("SELECT * FROM report.outbox WHERE contact_id = %s", cid)
    assert row and all(r["to_address"] == "" and r["body"] == "" for r in row)
    # an unknown contact waits, then gives up (another org's id is unknown)
    settle(publish, db, [org_msg("other")], org="other")
    e2 = make_msg("contact.erased", {"contact_id": cid}, org="other")
    settle(publish, db, [e2], org="other")
    assert outcome(db, e2, org="other")["reason"] == \
        "gave up waiting: contact %s not yet seen" % cid


def test_delete_only_without_history(rosterd, publish, db):
    rosterd()
    settle(publish, db, history_msgs())
    busy = contact_by_email(db, MARK_EMAIL)
    settle(publish, db, [make_msg("contact.upserted", {"email": "lonely@acme.example",
                                                       "first_name": "Lonely"})])
    lonely = contact_by_email(db, "lonely@acme.example")
    settle(publish, db, [make_msg("contact.tagged", {"contact_id": lonely, "add": ["x"]})])

    d1 = make_msg("contact.deleted", {"contact_id": busy})
    d2 = make_msg("contact.deleted", {"contact_id": lonely})
    settle(publish, db, [d1, d2])
    o1 = outcome(db, d1)
    assert o1["outcome"] == "rejected"
    assert "contact.erased" in o1["reason"] and "1 bookings" in o1["reason"], o1
    assert "1 attendances" in o1["reason"]
    assert contact_by_email(db, MARK_EMAIL) == busy
    assert outcome(db, d2)["outcome"] == "applied"
    assert db.query1("SELECT count(*) FROM report.contacts WHERE contact_id = %s", lonely) == 0
    for view in ("activity", "field_history"):
        assert db.query1("SELECT count(*) FROM report.%s WHERE contact_id = %s" % (view, "%s"),
                         lonely) == 0
    assert db.query1("SELECT count(*) FROM report.activity WHERE contact_id IS NULL"
                     " AND kind = 'contact.deleted' AND message_id = %s", d2["id"]) == 1
    # with an invoice only (no booking): rejected too, naming the invoice
    settle(publish, db, [make_msg("contact.upserted", {"email": "inv@acme.example"})])
    inv_c = contact_by_email(db, "inv@acme.example")
    settle(publish, db, [make_msg("invoice.issued", {"invoice_id": "I9", "contact_id": inv_c,
                                                     "amount": 100, "currency": "CHF",
                                                     "notify": False})])
    d3 = make_msg("contact.deleted", {"contact_id": inv_c})
    settle(publish, db, [d3])
    r = outcome(db, d3)
    assert r["outcome"] == "rejected" and "1 invoices, 1 transactions" in r["reason"]
    assert "contact.erased" in r["reason"]


# --- export -------------------------------------------------------------------------

def test_export_csv_json_round_trip(rosterd, publish, db, rosterctl, tmp_path):
    rosterd()
    settle(publish, db, [org_msg(), offer_msg()] + [
        make_msg("contact.upserted", {"email": "p%d@acme.example" % i,
                                      "first_name": 'Q"uote, %d' % i,
                                      "company": "Back\\slash\nnewline"}) for i in range(5)])
    settle(publish, db, [org_msg("other"), make_msg("contact.upserted", {"email": "o@x.example"},
                                                     org="other")], org="other")
    n = db.query1("SELECT count(*) FROM report.contacts WHERE org = %s", ORG)
    assert n == 5

    out = tmp_path / "contacts.csv"
    r = rosterctl("export", "contacts", "--org", ORG, "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "exported 5 rows of report.contacts" in r.stderr
    assert not os.path.exists(str(out) + ".tmp")
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == n and {r["org"] for r in rows} == {ORG}
    ids = db.query("SELECT contact_id, first_name, company FROM report.contacts"
                   " WHERE org = %s", ORG)
    assert {(r["contact_id"], r["first_name"], r["company"]) for r in rows} == set(ids)

    r = rosterctl("export", "report.contacts", "--org", ORG, "--format", "json")
    assert r.returncode == 0, r.stderr
    docs = json.loads(r.stdout)
    assert len(docs) == n
    assert {(d["contact_id"], d["first_name"], d["company"]) for d in docs} == set(ids)
    # every organisation without --org; --json means json
    r = rosterctl("--json", "export", "contacts")
    assert len(json.loads(r.stdout)) == 6
    # every view of SPEC 5 exports; an empty one is an empty array
    for view in ("bookings", "attendees", "invoices", "transactions", "balances",
                 "key_figures", "outbox", "activity", "field_history", "messages"):
        r = rosterctl("export", view, "--org", ORG, "--format", "json")
        assert r.returncode == 0, (view, r.stderr)
        got = json.loads(r.stdout)
        assert len(got) == db.query1("SELECT count(*) FROM report.%s WHERE org = %%s" % view,
                                     ORG), view
    r = rosterctl("export", "invoices", "--org", ORG)
    assert r.stdout.splitlines()[0].startswith("org,invoice_id,booking_id,contact_id")

    # errors: one line, the view list; never interpolated
    r = rosterctl("export", "contacts; DROP TABLE rd.contacts", "--org", ORG)
    assert r.returncode == 1
    assert "unknown view contacts; DROP TABLE rd.contacts (views: activity, attendees," \
        in r.stderr and r.stderr.count("\n") == 1
    assert db.query1("SELECT count(*) FROM rd.contacts") == 6
    r = rosterctl("export", "contacts", "--org", "nosuch")
    assert r.returncode == 1 and "unknown organisation nosuch" in r.stderr
    r = rosterctl("export", "contacts", "--format", "xml")
    assert r.returncode == 1 and "csv or json" in r.stderr
    r = rosterctl("export", "contacts", "-o", str(tmp_path / "no" / "dir.csv"))
    assert r.returncode == 1 and "No such file or directory" in r.stderr


# --- import ---------------------------------------------------------------------------

CSV = ("email,First_Name,last_name,phone,fields.size\n"
       "ada@acme.example,Ada,Lovelace,+41 1,M\n"          # existing: updated (sync on)
       "\"BOB@acme.example \",Bob,\"Bau, er\",,\n"          # new
       "not an email,Nomail,,,\n"                           # invalid email: a new contact
       "x@acme.example,X,,,,extra\n"                        # wrong cell count: skipped
       "ada@acme.example,Ada,Lovelace,+41 1,M\n")           # same as row 1: unchanged


def test_import_dry_run_real_and_idempotent(rosterd, publish, db, rosterctl, tmp_path):
    rosterd()
    settle(publish, db, [org_msg(), make_msg("contact.upserted", {
        "email": "ada@acme.example", "first_name": "Ada", "phone": "+41 0"})])
    ada = contact_by_email(db, "ada@acme.example")
    f = tmp_path / "people.csv"
    f.write_text(CSV)
    before = db.query("SELECT * FROM report.contacts ORDER BY contact_id")

    r = rosterctl("--json", "import", str(f), "--org", ORG, "--dry-run", "--sync", "on")
    assert r.returncode == 0, r.stderr
    dry = json.loads(r.stdout)
    assert dry["dry_run"] is True
    acts = [(x["row"], x["action"]) for x in dry["rows"]]
    assert acts == [(1, "updated"), (2, "created"), (3, "created"), (4, "skipped"),
                    (5, "unchanged")], dry
    assert dry["rows"][0]["contact_id"] == ada
    assert "6 cells, the header has 5" in dry["rows"][3]["detail"]
    assert (dry["created"], dry["updated"], dry["unchanged"], dry["skipped"]) == (2, 1, 1, 1)
    assert db.query("SELECT * FROM report.contacts ORDER BY contact_id") == before
    assert db.query1("SELECT count(*) FROM report.messages WHERE message_id LIKE 'import:%%'") == 0

    r = rosterctl("import", str(f), "--org", ORG, "--dry-run")
    assert r.returncode == 0
    assert "dry run (nothing changed)" in r.stdout and "ROW    ACTION" in r.stdout

    r = rosterctl("--json", "import", str(f), "--org", ORG, "--sync", "on")
    assert r.returncode == 0, r.stderr
    real = json.loads(r.stdout)
    assert [(x["row"], x["action"]) for x in real["rows"]] == acts
    c = db.querydicts("SELECT * FROM report.contacts WHERE contact_id = %s", ada)[0]
    assert c["phone"] == "+41 1" and c["last_name"] == "Lovelace" and c["fields"] == {"size": "M"}
    bob = db.querydicts("SELECT * FROM report.contacts WHERE email = 'bob@acme.example'")
    assert len(bob) == 1 and bob[0]["last_name"] == "Bau, er"
    assert db.query1("SELECT count(*) FROM report.contacts WHERE org = %s", ORG) == 3
    msgs = db.querydicts("SELECT * FROM report.messages WHERE message_id LIKE 'import:%%'"
                         " ORDER BY message_id")
    assert len(msgs) == 5 and {m["type"] for m in msgs} == {"contact.upserted"}
    assert [m["outcome"] for m in msgs].count("rejected") == 1
    assert db.query1("SELECT count(*) FROM report.field_history WHERE contact_id = %s"
                     " AND field = 'phone' AND new_value = '+41 1'", ada) == 1

    # the same file again: every row a duplicate, nothing changes
    snap = db.query("SELECT * FROM report.contacts ORDER BY contact_id")
    r = rosterctl("--json", "import", str(f), "--org", ORG)
    again = json.loads(r.stdout)
    assert [x["action"] for x in again["rows"]] == ["skipped"] * 5
    assert all(x["detail"].startswith("already imported") for x in again["rows"])
    assert db.query("SELECT * FROM report.contacts ORDER BY contact_id") == snap

    # the org's sync setting (off): the existing phone stays
    g = tmp_path / "sync-off.csv"
    g.write_text("email,phone\nada@acme.example,+41 2\n")
    r = rosterctl("import", str(g), "--org", ORG)
    assert r.returncode == 0 and "0 created, 0 updated, 1 unchanged" in r.stdout
    assert db.query1("SELECT phone FROM report.contacts WHERE contact_id = %s", ada) == "+41 1"


def test_import_errors_change_nothing(rosterd, publish, db, rosterctl, tmp_path):
    rosterd()
    settle(publish, db, [org_msg()])
    cases = [("email,shoe_size\na@b.c,9\n", "unknown column \"shoe_size\""),
             ("email,Email\n", "column \"email\" appears twice"),
             ("email,first_name\n\"a@b.c,Ann\n", "CSV record"),
             ("", "no header row"),
             ("email,fields.\n", "custom field needs a key"),
             ('"shoe\nsize",email\n', 'unknown column "shoe?size"')]
    for i, (text, why) in enumerate(cases):
        f = tmp_path / ("bad%d.csv" % i)
        f.write_text(text)
        r = rosterctl("import", str(f), "--org", ORG)
        assert r.returncode == 1, text
        assert why in r.stderr and "nothing imported" in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1
    f = tmp_path / "ok.csv"
    f.write_text("email\na@b.c\n")
    for args, why in [((str(f),), "--org ORG is required"),
                      ((str(f), "--org", "nosuch"), "unknown organisation nosuch"),
                      ((str(f), "--org", ORG, "--sync", "maybe"), "on or off"),
                      ((str(tmp_path / "missing.csv"), "--org", ORG), "No such file")]:
        r = rosterctl("import", *args)
        assert r.returncode == 1 and why in r.stderr, r.stderr
    assert db.query1("SELECT count(*) FROM report.contacts") == 0


# --- dead letters ------------------------------------------------------------------------

def test_dead_list_show_replay(rosterd, publish, db, rosterctl, amqp):
    rosterd(retry_base_ms=50, max_retries=1)
    settle(publish, db, [org_msg()])
    waiting = make_msg("booking.created", {"booking_id": "B7", "version": 1, "offer_id": "O7",
                                           "booker": {"email": "w@acme.example"}})
    bad = make_msg("contact.tagged", {"contact_id": "nope"})
    publish(waiting, headers={"x-upstream": "shop-1"})
    publish(bad)
    wait_messages(db, 3, where="org = %s", args=(ORG,))
    wait_for(lambda: amqp.queue_depth("dead_queue") == 2, 30, 0.1, "2 dead letters")

    r = rosterctl("--json", "dead", "list")
    assert r.returncode == 0, r.stderr
    items = json.loads(r.stdout)
    # in the order they were dead-lettered: the invalid one at once, the
    # waiting one after its retry
    assert [(x["n"], x["id"]) for x in items] == [(1, bad["id"]), (2, waiting["id"])], r.stderr
    assert items[1]["type"] == "booking.created" and items[1]["org"] == ORG
    assert items[1]["error"] == "gave up waiting: offer O7 not yet seen"
    assert items[1]["routing_key"] == "booking.created" and items[1]["error_at"]
    assert items[1]["retries"] == 1 and items[0]["error"] == "data.contact_id: want a UUID"
    assert amqp.queue_depth("dead_queue") == 2  # nothing lost by listing
    r = rosterctl("dead", "list")
    assert r.returncode == 0 and waiting["id"] in r.stdout and "ERROR AT" in r.stdout

    r = rosterctl("--json", "dead", "show", "2")
    shown = json.loads(r.stdout)
    assert shown["body"]["data"]["booking_id"] == "B7"
    assert shown["headers"]["x-upstream"] == "shop-1"
    r = rosterctl("dead", "show", "1")
    assert r.returncode == 0 and bad["id"] in r.stdout and "contact_id" in r.stdout
    assert amqp.queue_depth("dead_queue") == 2

    # fixed: the offer arrives; replay 1 applies the booking once
    settle(publish, db, [offer_msg("O7")])
    r = rosterctl("dead", "replay", "2")
    assert r.returncode == 0, r.stderr
    assert "replayed booking.created %s/%s" % (ORG, waiting["id"]) in r.stdout
    wait_for(lambda: db.query1("SELECT outcome FROM report.messages WHERE message_id = %s",
                               waiting["id"]) == "applied", 30, 0.1, "replayed booking applied")
    assert db.query1("SELECT count(*) FROM report.bookings WHERE booking_id = 'B7'") == 1
    wait_for(lambda: amqp.queue_depth("dead_queue") == 1, 30, 0.1, "the dead copy acknowledged")
    # its original headers travelled, without rosterd's x-rosterd-* ones
    r = rosterctl("--json", "dead", "list")
    assert [x["id"] for x in json.loads(r.stdout)] == [bad["id"]]

    # replay --all: the still-bad message comes back once and the command ends
    r = rosterctl("--json", "dead", "replay", "--all")
    assert r.returncode == 0, r.stderr
    assert [x["id"] for x in json.loads(r.stdout)] == [bad["id"]]
    wait_for(lambda: amqp.queue_depth("dead_queue") == 1, 30, 0.1, "rejected again")
    dl = amqp.get_dead(1)[0]
    assert dl.msg["id"] == bad["id"] and "contact_id" in dl.error

    # errors
    r = rosterctl("dead", "show", "5")
    assert r.returncode == 1 and "no message 5 (the queue holds 0)" in r.stderr
    r = rosterctl("dead", "replay", "0")
    assert r.returncode == 1 and "position in the queue" in r.stderr
    r = rosterctl("dead", "frobnicate")
    assert r.returncode == 1 and "unknown subcommand" in r.stderr


# --- status -------------------------------------------------------------------------------

def test_status(rosterd, publish, db, rosterctl):
    rd = rosterd(status_interval=1)
    settle(publish, db, [org_msg()])
    r = rosterctl("--json", "status", "--wait", "3")
    assert r.returncode == 0, r.stderr
    docs = json.loads(r.stdout)
    assert [d["instance"] for d in docs] == [rd.instance]
    assert docs[0]["state"] == "running" and docs[0]["messages"]["applied"] >= 1
    r = rosterctl("status", "--wait", "2")
    assert r.returncode == 0 and rd.instance in r.stdout and "INSTANCE" in r.stdout
    # two instances: the newest document of each, sorted by instance
    rd2 = rosterd(status_interval=1)
    r = rosterctl("--json", "status", "--wait", "3")
    docs = json.loads(r.stdout)
    assert [d["instance"] for d in docs] == sorted([rd.instance, rd2.instance])
    rd2.stop()
    rd.stop()
    r = rosterctl("status", "--wait", "1")
    assert r.returncode == 0 and "no status document in 1 s" in r.stdout
    r = rosterctl("status", "--wait", "x")
    assert r.returncode == 1 and "--wait" in r.stderr


def test_import_many_rows_in_chunks(rosterd, publish, db, rosterctl, tmp_path):
    """More rows than one transaction takes (500): every row lands once, a
    re-import after a partial run completes it."""
    rosterd()
    settle(publish, db, [org_msg()])
    f = tmp_path / "many.csv"
    f.write_text("email,first_name\n" + "".join("m%04d@acme.example,M%d\n" % (i, i)
                                                for i in range(600)))
    r = rosterctl("import", str(f), "--org", ORG)
    assert r.returncode == 0, r.stderr
    assert "600 rows: 600 created, 0 updated, 0 unchanged, 0 skipped" in r.stdout
    assert db.query1("SELECT count(DISTINCT email) FROM report.contacts WHERE org = %s",
                     ORG) == 600
    # forget the last 50 rows as if the run had stopped there: a re-run adds them
    db.execute("DELETE FROM rd.activity WHERE org = %s AND contact_id IN (SELECT contact_id"
               " FROM rd.contacts WHERE email >= 'm0550')", ORG)
    db.execute("DELETE FROM rd.field_history WHERE org = %s AND contact_id IN (SELECT"
               " contact_id FROM rd.contacts WHERE email >= 'm0550')", ORG)
    db.execute("DELETE FROM rd.contacts WHERE org = %s AND email >= 'm0550'", ORG)
    db.execute("DELETE FROM rd.messages WHERE org = %s AND message_id LIKE 'import:%%'"
               " AND split_part(message_id, ':', 3)::int > 550", ORG)
    r = rosterctl("import", str(f), "--org", ORG)
    assert "600 rows: 50 created, 0 updated, 0 unchanged, 550 skipped" in r.stdout
    assert db.query1("SELECT count(*) FROM report.contacts WHERE org = %s", ORG) == 600


def test_dead_on_quorum_queue_loses_nothing(rosterd, publish, db, amqp):
    """A quorum dead queue drops a message requeued more often than its
    delivery limit: listing must put messages back without requeueing."""
    rd = rosterd(queue_type="quorum", delivery_limit=2)
    rosterctl = rd.ctl  # its configuration: [amqp] queue_type = quorum
    settle(publish, db, [org_msg()])
    bad = [make_msg("contact.tagged", {"contact_id": "nope-%d" % i}) for i in range(3)]
    for m in bad:
        publish(m)
    wait_for(lambda: amqp.queue_depth("dead_queue") == 3, 30, 0.1, "3 dead letters")
    r = rosterctl("--json", "dead", "list")
    order = [x["id"] for x in json.loads(r.stdout)]
    assert sorted(order) == sorted(m["id"] for m in bad)
    bad = [next(m for m in bad if m["id"] == i) for i in order]
    for _ in range(4):
        r = rosterctl("--json", "dead", "list")
        assert r.returncode == 0, r.stderr
        assert [x["id"] for x in json.loads(r.stdout)] == order  # same order each time
        r = rosterctl("--json", "dead", "show", "2")
        assert json.loads(r.stdout)["id"] == bad[1]["id"]
    assert amqp.queue_depth("dead_queue") == 3
    r = rosterctl("--json", "dead", "replay", "2")
    assert r.returncode == 0, r.stderr
    assert [x["id"] for x in json.loads(r.stdout)] == [bad[1]["id"]]
    # rejected again (still invalid): it comes back, once. Where it lands
    # depends on when the daemon's new dead letter meets the cycle that the
    # replay makes through the quorum queue, so compare without order.
    want = sorted(m["id"] for m in bad)
    wait_for(lambda: sorted(x["id"] for x in json.loads(rosterctl("--json", "dead", "list").stdout))
             == want, 30, 0.2, "the replayed message dead again, nothing lost or doubled")
    assert amqp.queue_depth("dead_queue") == 3


def test_import_dry_run_large_file(rosterd, publish, db, rosterctl, tmp_path):
    """A dry run of more rows than one transaction takes changes nothing."""
    rosterd()
    settle(publish, db, [org_msg()])
    f = tmp_path / "big.csv"
    f.write_text("email\n" + "".join("d%04d@acme.example\n" % i for i in range(700)))
    r = rosterctl("--json", "import", str(f), "--org", ORG, "--dry-run")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["created"] == 700 and len(out["rows"]) == 700
    assert db.query1("SELECT count(*) FROM report.contacts") == 0
    assert db.query1("SELECT count(*) FROM report.messages WHERE message_id LIKE 'import:%%'") == 0
