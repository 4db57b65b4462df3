"""test_admin_merge.py - Step 5 (admin), part A: rosterctl contact show and
find, duplicates, merge and unmerge; the contact.merged message (SPEC 3,
4.1 ambiguous matches as duplicate candidates, 4.7, 4.7a, 5).
docs/admin.md lists which test covers which rule.

The fixtures build their data with rd.apply(...) on one migrated database
(one fresh organisation per test, payloads shaped as the C normaliser
emits them) and run the real rosterctl binary against it; the end-to-end
tests go through RabbitMQ and rosterd.
"""
import json
import uuid

import pytest

import harness
from harness import Database, make_msg, wait_for, wait_messages, write_config

T0 = 1_700_000_000_000


class Org:
    """One organisation of the shared database, built through rd.apply."""

    def __init__(self, db, cfg, name):
        self.db = db
        self.cfg = cfg
        self.org = name
        self.t = T0
        self.ok("org.configured", {"name": name, "mail_from": "Kurse <info@example.org>"})
        self.ok("offer.upserted", {"offer_id": "O1", "title": "Yoga", "currency": "CHF"})

    def apply(self, type, data, id=None):
        self.t += 1000
        id = id or uuid.uuid4().hex
        row = self.db.query("SELECT outcome, reason FROM rd.apply(%s, %s, %s, %s, %s::jsonb, false,"
                            " NULL)", self.org, id, type, self.t, json.dumps(data))
        return id, row[0]

    def ok(self, type, data, id=None):
        id, out = self.apply(type, data, id)
        assert out == ("applied", None), (type, data, out)
        return id

    def contact(self, **person):
        mid = self.ok("contact.upserted", person)
        return self.db.query1("SELECT contact_id::text FROM rd.contacts WHERE org = %s AND"
                              " created_by = %s", self.org, mid)

    def by_email(self, email):
        return self.db.query1("SELECT contact_id FROM report.contacts WHERE org = %s AND email = %s"
                              " AND merged_into IS NULL", self.org, email)

    def ctl(self, *args, org=True):
        return harness.rosterctl(self.cfg, *args, *(["--org", self.org] if org else []))

    def ctl_json(self, *args, org=True):
        r = self.ctl("--json", *args, org=org)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def contact_row(self, cid):
        return self.db.querydicts("SELECT * FROM report.contacts WHERE org = %s AND contact_id = %s",
                                  self.org, cid)[0]


@pytest.fixture(scope="module")
def shared(servers, tmp_path_factory):
    servers.ensure_up()
    db = Database(servers, "admin_merge")
    cfg = str(tmp_path_factory.mktemp("admin") / "rosterd.conf")
    write_config(cfg, {"daemon": {"instance": "admin"}, "amqp": {"url": servers.amqp_url},
                       "postgres": {"conninfo": db.conninfo}})
    harness.rosterctl(cfg, "migrate", check=True)
    yield db, cfg
    db.drop()


@pytest.fixture
def org(shared, request):
    db, cfg = shared
    return Org(db, cfg, "o-" + uuid.uuid4().hex[:10])


# Every report view of an organisation, rows as JSON text (sorted): what
# unmerge must give back. The merge/unmerge entries themselves (activity
# kinds contact.merged/unmerged, field history written by rosterctl, i.e.
# without a message id) are left out: they record the admin's acts.
VIEWS = ["contacts", "bookings", "attendees", "invoices", "transactions", "balances",
         "key_figures", "outbox", "activity", "field_history"]


def snapshot(db, org):
    snap = {}
    for v in VIEWS:
        where = "org = %s"
        if v == "activity":
            where += " AND kind NOT IN ('contact.merged', 'contact.unmerged')"
        if v == "field_history":
            where += " AND message_id IS NOT NULL"
        snap[v] = [r[0] for r in db.query(
            "SELECT to_jsonb(x)::text FROM report.%s x WHERE %s ORDER BY 1" % (v, where), org)]
    return snap


def totals(db, org):
    return dict(db.query("SELECT currency, sum(balance)::bigint FROM report.balances WHERE org = %s"
                         " GROUP BY currency", org))


def rich_pair(o):
    """Two contacts with something of everything; returns (keep, drop)."""
    o.ok("template.upserted", {"key": "booking_confirmation", "language": "en",
                               "subject": "Booking {{booking.number}}",
                               "body": "Hello {{contact.first_name}}"})
    o.ok("field.defined", {"key": "size", "kind": "text"})
    keep = o.contact(email="anna@example.org", first_name="Anna", last_name="Muster",
                     company="ACME", fields={"size": "M"})
    drop = o.contact(email="anna.m@example.org", first_name="Anne", last_name="Muster-Bauer",
                     phone="+41 44 555 00 11", zip="8001", city="Zurich", birthdate="1990-04-01",
                     fields={"size": "L", "diet": "vegan"})
    other = o.contact(email="zoe@example.org", first_name="Zoe")
    o.ok("contact.tagged", {"contact_id": keep, "add": ["yoga"]})
    o.ok("contact.tagged", {"contact_id": drop, "add": ["vip", "yoga"]})
    o.ok("contact.noted", {"contact_id": drop, "text": "prefers mornings", "author": "ops"})
    # drop books for itself and is an attendee of another's booking
    o.ok("booking.created", {"booking_id": "B1", "version": 1, "offer_id": "O1", "number": "N1",
                             "total": 12000, "currency": "CHF",
                             "booker": {"email": "anna.m@example.org"},
                             "attendees": [{"attendee_id": "A1", "email": "anna.m@example.org",
                                            "price": 12000}]})
    o.ok("booking.created", {"booking_id": "B2", "version": 1, "offer_id": "O1", "number": "N2",
                             "booker": {"email": "zoe@example.org"},
                             "attendees": [{"attendee_id": "A2", "email": "anna.m@example.org"},
                                           {"attendee_id": "A3", "email": "zoe@example.org"}]})
    o.ok("booking.created", {"booking_id": "B3", "version": 1, "offer_id": "O1", "number": "N3",
                             "booker": {"email": "anna@example.org"}})
    o.ok("invoice.issued", {"invoice_id": "I1", "amount": 12000, "currency": "CHF",
                            "booking_id": "B1"})
    o.ok("payment.recorded", {"payment_id": "P1", "invoice_id": "I1", "amount": 5000,
                              "currency": "CHF"})
    o.ok("invoice.issued", {"invoice_id": "I2", "amount": 3000, "currency": "EUR",
                            "contact_id": drop})
    o.ok("invoice.issued", {"invoice_id": "I3", "amount": 800, "currency": "CHF",
                            "contact_id": keep})
    o.ok("transaction.recorded", {"transaction_id": "M1", "contact_id": drop, "amount": -250,
                                  "currency": "CHF", "text": "late fee"})
    o.ok("mail.requested", {"contact_id": drop, "template": "booking_confirmation"})
    assert other
    return keep, drop


def test_merge_moves_everything_and_unmerge_restores_it(org):
    o, db = org, org.db
    keep, drop = rich_pair(o)
    before = snapshot(db, o.org)
    bal_before = totals(db, o.org)
    drop_counts = {v: db.query1("SELECT count(*) FROM report.%s WHERE org = %s AND contact_id = %s"
                                % (v, "%s", "%s"), o.org, drop)
                   for v in ("bookings", "attendees", "invoices", "transactions", "outbox",
                             "activity", "field_history")}
    assert all(n > 0 for n in drop_counts.values()), drop_counts

    r = o.ctl("merge", keep, drop)
    assert r.returncode == 0, r.stderr
    mid = int(r.stdout.split()[1].rstrip(":"))
    assert "merged into %s" % keep in r.stdout and "rosterctl unmerge %d" % mid in r.stdout

    # everything of drop is keep's now; drop is a tombstone
    for v in ("bookings", "attendees", "invoices", "transactions", "outbox", "field_history"):
        assert db.query1("SELECT count(*) FROM report.%s WHERE org = %%s AND contact_id = %%s" % v,
                         o.org, drop) == 0, v
    acts = db.querydicts("SELECT * FROM report.activity WHERE org = %s AND contact_id = %s",
                         o.org, drop)
    assert [a["kind"] for a in acts] == ["contact.merged"]
    assert db.query1("SELECT count(*) FROM rd.notes WHERE org = %s AND contact_id = %s",
                     o.org, keep) == 1
    d = o.contact_row(drop)
    assert d["merged_into"] == keep and d["email"] == "anna.m@example.org"
    k = o.contact_row(keep)
    # keep's non-empty values win, its empty ones are filled from drop
    assert (k["email"], k["first_name"], k["last_name"], k["company"]) == \
        ("anna@example.org", "Anna", "Muster", "ACME")
    assert (k["phone"], k["zip"], k["city"], str(k["birthdate"])) == \
        ("+41 44 555 00 11", "8001", "Zurich", "1990-04-01")
    assert k["fields"] == {"size": "M", "diet": "vegan"}
    assert k["tags"] == ["vip", "yoga"]
    hist = {h["field"]: h for h in db.querydicts(
        "SELECT * FROM report.field_history WHERE org = %s AND contact_id = %s AND message_id IS NULL",
        o.org, keep)}
    assert set(hist) == {"phone", "zip", "city", "birthdate", "fields.diet", "tags"}
    assert hist["phone"]["old_value"] is None and hist["phone"]["new_value"] == "+41 44 555 00 11"
    merged = [a for a in db.querydicts("SELECT * FROM report.activity WHERE org = %s AND"
                                       " contact_id = %s AND kind = 'contact.merged'", o.org, keep)]
    assert len(merged) == 1 and drop in merged[0]["summary"]
    # balances: no sum changes; keep's is the sum of both
    assert totals(db, o.org) == bal_before
    assert dict(db.query("SELECT currency, balance FROM report.balances WHERE org = %s"
                         " AND contact_id = %s", o.org, keep)) == {"CHF": -8050, "EUR": -3000}
    chk = harness.rosterctl(o.cfg, "ledger", "check", "--org", o.org)
    assert chk.returncode == 0, chk.stdout + chk.stderr
    # the dashboard of the tombstone says where it went
    show = o.ctl("contact", "show", drop)
    assert show.returncode == 0 and "MERGED into %s" % keep in show.stdout

    # unmerge: both contacts and every row exactly as before
    r = o.ctl("unmerge", str(mid))
    assert r.returncode == 0, r.stderr
    assert "both exactly as before" in r.stdout
    after = snapshot(db, o.org)
    for v in VIEWS:
        assert after[v] == before[v], v
    assert totals(db, o.org) == bal_before
    kinds = [a["kind"] for a in db.querydicts(
        "SELECT kind FROM report.activity WHERE org = %s AND contact_id IN (%s, %s)"
        " AND kind LIKE 'contact.%%merged' ORDER BY at, kind", o.org, keep, drop)]
    assert sorted(kinds) == ["contact.merged", "contact.merged", "contact.unmerged",
                             "contact.unmerged"]
    # a merge is undone once
    r = o.ctl("unmerge", str(mid))
    assert r.returncode == 1 and "already undone" in r.stderr
    assert r.stderr.count("\n") == 1


def test_merge_json_and_unmerge_after_later_changes(org):
    o, db = org, org.db
    keep = o.contact(email="k@example.org", first_name="Kim")
    drop = o.contact(email="d@example.org", first_name="Kim", phone="+41 1", zip="3000")
    summary = o.ctl_json("merge", keep, drop)
    assert summary["keep"] == keep and summary["drop"] == drop and summary["org"] == o.org
    assert summary["filled"] == ["phone", "zip"]
    assert summary["moved"]["activity"] >= 1
    # later messages naming drop act on keep
    note = o.ok("contact.noted", {"contact_id": drop, "text": "after the merge"})
    o.ok("contact.upserted", {"contact_id": drop, "phone": "+41 2"})
    assert db.query1("SELECT contact_id::text FROM rd.notes WHERE org = %s AND message_id = %s",
                     o.org, note) == keep
    assert o.contact_row(keep)["phone"] == "+41 2"
    assert o.contact_row(drop)["phone"] == "+41 1"
    # unmerge: the value changed since stays, the other filled one is emptied,
    # the later note stays with keep
    res = o.ctl_json("unmerge", str(summary["merge_id"]))
    assert res["exact"] is False and res["emptied"] == ["zip"] and res["kept"] == ["phone"]
    k, d = o.contact_row(keep), o.contact_row(drop)
    assert (k["phone"], k["zip"]) == ("+41 2", None)
    assert d["merged_into"] is None and (d["phone"], d["zip"]) == ("+41 1", "3000")
    assert db.query1("SELECT contact_id::text FROM rd.notes WHERE org = %s AND message_id = %s",
                     o.org, note) == keep
    # the contacts are separate again: a message naming drop acts on drop
    o.ok("contact.noted", {"contact_id": drop, "text": "separate"})
    assert db.query1("SELECT count(*) FROM rd.notes WHERE org = %s AND contact_id = %s",
                     o.org, drop) == 1


def test_merge_and_unmerge_errors_and_tenancy(org, shared):
    o, db = org, org.db
    a = o.contact(email="a@example.org", first_name="A")
    b = o.contact(email="b@example.org", first_name="B")
    c = o.contact(email="c@example.org", first_name="C")
    other = Org(db, o.cfg, o.org + "-x")
    x = other.contact(email="a@example.org", first_name="A")

    def fails(args, text, org=True):
        r = o.ctl(*args, org=org)
        assert r.returncode != 0 and text in r.stderr, (args, r.stdout, r.stderr)
        assert r.stderr.startswith("rosterctl: ") and r.stderr.count("\n") == 1, r.stderr

    # another organisation's contact is simply unknown
    fails(("merge", a, x), "contact %s is unknown in organisation %s" % (x, o.org))
    fails(("merge", x, a), "contact %s is unknown in organisation %s" % (x, o.org))
    fails(("merge", x, a), "contact %s is unknown in organisation %s" % (a, other.org), org=False)
    fails(("contact", "show", x), "no contact %s in organisation %s" % (x, o.org))
    fails(("contact", "show", "a@example.org"), "a@example.org is in several organisations",
          org=False)
    assert o.ctl_json("contact", "show", x, org=False)["contact"]["org"] == other.org
    fails(("merge", a, str(uuid.uuid4())), "is unknown in organisation")
    fails(("merge", a, "not-a-uuid"), "contact ids are UUIDs")
    fails(("merge", a, a), "keep and drop are the same contact")
    fails(("merge", a), "usage: rosterctl [--json] merge KEEP DROP")
    fails(("merge", a, b, "--bogus"), "unexpected argument --bogus")
    fails(("unmerge", "x1"), "MERGE_ID is a number")
    fails(("unmerge", "999999"), "merge 999999 is unknown")
    # merges chain: undo the later one first
    r1 = o.ctl_json("merge", a, b)
    fails(("merge", a, b), "contact %s is already merged into %s" % (b, a))
    fails(("merge", b, a), "keep and drop are the same contact (%s is merged into %s)" % (b, a))
    fails(("merge", c, b), "contact %s is already merged into %s" % (b, a))
    r2 = o.ctl_json("merge", a, c)
    fails(("unmerge", str(r1["merge_id"])),
          "merge %d involves the same contacts and came later" % r2["merge_id"])
    # a merge id of this organisation is unknown to another
    r = other.ctl("unmerge", str(r2["merge_id"]))
    assert r.returncode == 1 and "is unknown in organisation %s" % other.org in r.stderr
    assert o.ctl_json("unmerge", str(r2["merge_id"]))["exact"] is True
    assert o.ctl_json("unmerge", str(r1["merge_id"]))["exact"] is True
    assert db.query1("SELECT count(*) FROM rd.contacts WHERE org = %s AND merged_into IS NOT NULL",
                     o.org) == 0
    # without --org the organisation is the keeping contact's
    r = o.ctl("merge", x, a, org=False)
    assert r.returncode == 1
    assert other.contact_row(x)["merged_into"] is None
    # an erased contact is not merged
    db.execute("UPDATE rd.contacts SET erased = true WHERE org = %s AND contact_id = %s", o.org, c)
    fails(("merge", a, c), "contact %s is erased" % c)
    # help
    r = o.ctl("merge", "--help", org=False)
    assert r.returncode == 0 and "merge KEEP DROP [--org ORG]" in r.stdout


def test_merge_message_rules_through_rd_apply(org):
    o, db = org, org.db
    a = o.contact(email="a@example.org")
    b = o.contact(email="b@example.org")
    _, out = o.apply("contact.merged", {"keep": a, "drop": str(uuid.uuid4())})
    assert out[0] == "retry" and "not yet seen" in out[1]
    _, out = o.apply("contact.merged", {"keep": a, "drop": b})
    assert out == ("applied", None)
    _, out = o.apply("contact.merged", {"keep": a, "drop": b})
    assert out == ("rejected", "contact %s is already merged into %s" % (b, a))
    c = o.contact(email="c@example.org")
    _, out = o.apply("contact.merged", {"keep": c, "drop": b})
    assert out == ("rejected", "contact %s is already merged into %s" % (b, a))
    # keep given as a tombstone: the merge goes to its keeping contact
    mid = o.ok("contact.merged", {"keep": b, "drop": c})
    assert o.contact_row(c)["merged_into"] == a
    assert db.query1("SELECT message_id FROM report.merges WHERE org = %s AND drop_id = %s",
                     o.org, c) == mid


# --- duplicates ----------------------------------------------------------------------

def test_duplicates(org):
    o, db = org, org.db
    # 4.1: several contacts with the email: the booking creates another, a candidate
    e1 = o.contact(email="sam@example.org", first_name="Sam", last_name="Weber")
    e2 = o.contact(email="sam@example.org", first_name="Samuel", last_name="Weber")
    o.ok("booking.created", {"booking_id": "B1", "version": 1, "offer_id": "O1",
                             "booker": {"email": "sam@example.org", "first_name": "S"}})
    e3 = db.query1("SELECT contact_id FROM report.bookings WHERE org = %s AND booking_id = 'B1'",
                   o.org)
    assert db.query1("SELECT match FROM report.bookings WHERE org = %s", o.org) == \
        "created_ambiguous"
    p1 = o.contact(first_name="Lea", last_name="Keller", phone="+41 79 123 45 67")
    p2 = o.contact(first_name="lea", last_name="keller", phone="+41791234567",
                   email="lea@example.org")
    b1 = o.contact(first_name="Max", last_name="Frei", birthdate="1980-01-02")
    b2 = o.contact(first_name="Max", last_name="Frei", birthdate="1980-01-02")
    z1 = o.contact(first_name="Ida", last_name="Roth", zip="8000")
    z2 = o.contact(first_name="Ida", last_name="Roth", zip="8000")
    s1 = o.contact(first_name="Johanna", last_name="Schneiderhan")
    s2 = o.contact(first_name="Johana", last_name="Schneiderhan")
    o.contact(first_name="Completely", last_name="Different")
    Org(db, o.cfg, o.org + "-y").contact(email="sam@example.org", first_name="Sam",
                                          last_name="Weber")

    rows = o.ctl_json("duplicates")
    pairs = {frozenset((r["a"]["contact_id"], r["b"]["contact_id"])): r for r in rows}
    assert all(r["org"] == o.org for r in rows)
    # best first
    assert [r["score"] for r in rows] == sorted((r["score"] for r in rows), reverse=True)

    def reasons(x, y):
        return pairs[frozenset((x, y))]["reasons"]
    assert reasons(e1, e2)[0] == "same email"
    assert "same email" in reasons(e1, e3)
    assert "same email (ambiguous match) at matching" in reasons(e1, e3)
    assert "same email (ambiguous match) at matching" in reasons(e2, e3)
    assert reasons(p1, p2) == ["same name and phone", "same name"]
    assert reasons(b1, b2) == ["same name and birthdate", "same name"]
    assert reasons(z1, z2) == ["same name", "same name and postcode"]
    assert len(reasons(s1, s2)) == 1 and reasons(s1, s2)[0].startswith("similar names (0.")
    assert pairs[frozenset((p1, p2))]["score"] == 70
    assert pairs[frozenset((z1, z2))]["score"] == 55
    assert pairs[frozenset((p1, p2))]["score"] > pairs[frozenset((s1, s2))]["score"]
    assert not any("Different" in (r["a"]["name"] or "") + (r["b"]["name"] or "") for r in rows)
    # the older contact is a
    assert pairs[frozenset((p1, p2))]["a"]["contact_id"] == p1

    assert len(o.ctl_json("duplicates", "--limit", "2")) == 2
    text = o.ctl("duplicates")
    assert text.returncode == 0
    assert "reasons: same name and phone; same name" in text.stdout
    assert "rosterctl merge %s %s --org %s" % (p1, p2, o.org) in text.stdout
    # merged contacts are no candidates any more
    o.ctl_json("merge", p1, p2)
    rows = o.ctl_json("duplicates")
    assert frozenset((p1, p2)) not in {frozenset((r["a"]["contact_id"], r["b"]["contact_id"]))
                                       for r in rows}
    r = o.ctl("duplicates", "--limit", "x")
    assert r.returncode == 1 and "--limit: a number" in r.stderr


# --- find and show -------------------------------------------------------------------

def test_contact_find(org):
    o = org
    anna = o.contact(email="anna.mueller@example.org", first_name="Anna", last_name="Müller",
                     company="Seeblick AG")
    o.contact(email="peter@example.org", first_name="Peter", last_name="Brunner",
              company="Bergbahn GmbH")
    Org(o.db, o.cfg, o.org + "-z").contact(email="anna2@example.org", first_name="Anna",
                                           last_name="Müller")

    def ids(text):
        return [r["contact_id"] for r in o.ctl_json("contact", "find", text)]
    assert ids("anna.mueller@example.org")[0] == anna
    assert ids("Müler")[0] == anna            # a typo
    assert ids("anna muller")[0] == anna      # another
    assert ids("seeblik")[0] == anna          # company, with a typo
    assert ids("mueller@exmaple")[0] == anna  # email, with a typo
    assert ids("zzzzqqq") == []
    r = o.ctl_json("contact", "find", "Anna Müller")
    assert len(r) == 1 and r[0]["org"] == o.org and r[0]["matched"] == "name"
    assert r[0]["email"] == "anna.mueller@example.org" and r[0]["company"] == "Seeblick AG"
    # without --org every organisation
    assert len(o.ctl_json("contact", "find", "Anna Müller", org=False)) >= 2
    t = o.ctl("contact", "find", "brunner")
    assert t.returncode == 0 and "Peter Brunner" in t.stdout and "Bergbahn GmbH" in t.stdout
    assert "no contact matches" in o.ctl("contact", "find", "zzzzqqq").stdout
    r = o.ctl("contact", "find")
    assert r.returncode == 1 and "usage" in r.stderr


def test_contact_show(org):
    o, db = org, org.db
    keep, drop = rich_pair(o)
    doc = o.ctl_json("contact", "show", drop)
    c = doc["contact"]
    assert c["contact_id"] == drop and c["email"] == "anna.m@example.org"
    assert c["fields"] == {"size": "L", "diet": "vegan"} and c["tags"] == ["vip", "yoga"]
    assert len(c["barcode"]) == 20
    assert [b["booking_id"] for b in doc["bookings"]] == ["B1"]
    assert doc["bookings"][0]["match"] == "assigned_unique"
    assert doc["bookings"][0]["offer_title"] == "Yoga"
    assert doc["bookings"][0]["total_text"] == "CHF 120.00"
    assert [(a["booking_id"], a["attendee_id"], a["match"]) for a in doc["attendances"]] == \
        [("B1", "A1", "assigned_unique"), ("B2", "A2", "assigned_unique")]
    inv = {i["invoice_id"]: i for i in doc["invoices"]}
    assert inv["I1"]["status"] == "partial" and inv["I1"]["open_text"] == "CHF 70.00"
    assert {b["currency"]: b["balance"] for b in doc["balances"]} == {"CHF": -7250, "EUR": -3000}
    kf = {k["currency"]: k for k in doc["key_figures"]}
    assert (kf["CHF"]["revenue"], kf["CHF"]["invoices"], kf["CHF"]["outstanding"]) == \
        (12000, 1, 7000)
    assert {t["kind"] for t in doc["transactions"]} == {"invoice", "payment", "manual"}
    assert [n["text"] for n in doc["notes"]] == ["prefers mornings"]
    assert {m["template"] for m in doc["outbox"]} == {"booking_confirmation"}
    assert all(m["status"] == "queued" for m in doc["outbox"])
    kinds = [a["kind"] for a in doc["activity"]]
    assert kinds[0] == "contact.created" and "contact.noted" in kinds and "invoice" in kinds
    assert {h["field"] for h in doc["field_history"]} >= {"email", "phone", "fields.diet", "tags"}
    assert doc["merges"] == [] and doc["live_contact"] == drop
    # by email, the same contact
    assert o.ctl_json("contact", "show", "Anna.M@Example.org ")["contact"]["contact_id"] == drop
    # the terminal layout
    t = o.ctl("contact", "show", drop)
    assert t.returncode == 0, t.stderr
    for s in ("CONTACT %s  (org %s)" % (drop, o.org), "phone        +41 44 555 00 11",
              "tags         vip, yoga", "Custom fields", "diet", "Key figures (2)",
              "Balances (2)", "CHF -72.50", "Bookings (as booker) (1)", "Attendances (2)",
              "Invoices (2)", "Transactions (4)", "Notes (1)", "prefers mornings",
              "queued", "Outbox (2)", "Activity (", "Field history (", "assigned_unique"):
        assert s in t.stdout, s
    # errors: unknown, ambiguous email, another organisation's id, usage
    r = o.ctl("contact", "show", str(uuid.uuid4()))
    assert r.returncode == 1 and "no contact" in r.stderr
    o.contact(email="anna.m@example.org")
    r = o.ctl("contact", "show", "anna.m@example.org")
    assert r.returncode == 1 and "2 contacts have the email anna.m@example.org" in r.stderr
    assert drop in r.stderr
    r = o.ctl("contact", "show")
    assert r.returncode == 1 and "usage" in r.stderr
    r = o.ctl("contact", "bogus", org=False)
    assert r.returncode == 1 and "usage" in r.stderr
    # after a merge, the dashboard of keep has it all, and the merge
    m = o.ctl_json("merge", keep, drop)
    doc = o.ctl_json("contact", "show", keep)
    assert {b["booking_id"] for b in doc["bookings"]} == {"B1", "B3"}
    assert [mm["merge_id"] for mm in doc["merges"]] == [m["merge_id"]]
    assert o.ctl_json("contact", "show", drop)["live_contact"] == keep


# --- end to end: the contact.merged message through rosterd ---------------------------

ORG = "acme"


def test_merge_by_message_end_to_end(rosterd, publish, db, smtp, rosterctl):
    rosterd()
    msgs = [make_msg("org.configured", {"name": "Acme", "mail_from": "Acme <info@acme.example>"}),
            make_msg("offer.upserted", {"offer_id": "O1", "title": "Yoga"}),
            make_msg("template.upserted", {"key": "booking_confirmation", "language": "en",
                                           "subject": "Booking {{booking.number}}",
                                           "body": "Hi {{contact.first_name}}"})]
    for m in msgs:
        publish(m)
    wait_messages(db, 3)
    publish(make_msg("booking.created", {"booking_id": "B1", "version": 1, "offer_id": "O1",
                                         "number": "N1",
                                         "booker": {"email": "kim@example.org",
                                                    "first_name": "Kim"}}))
    publish(make_msg("booking.created", {"booking_id": "B2", "version": 1, "offer_id": "O1",
                                         "number": "N2",
                                         "booker": {"email": "kim.old@example.org",
                                                    "first_name": "Kimberly",
                                                    "phone": "+41 44 1"}}))
    wait_messages(db, 5)
    keep = db.query1("SELECT contact_id FROM report.bookings WHERE booking_id = 'B1'")
    drop = db.query1("SELECT contact_id FROM report.bookings WHERE booking_id = 'B2'")
    publish(make_msg("invoice.issued", {"invoice_id": "I1", "amount": 9000, "currency": "CHF",
                                        "booking_id": "B2", "notify": False}))
    publish(make_msg("payment.recorded", {"payment_id": "P1", "invoice_id": "I1", "amount": 9000,
                                          "currency": "CHF", "notify": False}))
    wait_messages(db, 7)
    wait_for(lambda: db.query1("SELECT count(*) FROM report.outbox WHERE status = 'sent'") == 2,
             30, 0.1, "both confirmations sent")
    before = snapshot(db, ORG)
    total = totals(db, ORG)

    merge = make_msg("contact.merged", {"keep": keep, "drop": drop})
    publish(merge)
    wait_messages(db, 8)
    assert db.query1("SELECT outcome FROM report.messages WHERE message_id = %s", merge["id"]) \
        == "applied"
    assert db.query1("SELECT merged_into FROM report.contacts WHERE contact_id = %s", drop) == keep
    assert db.query1("SELECT phone FROM report.contacts WHERE contact_id = %s", keep) == "+41 44 1"
    assert db.query1("SELECT count(*) FROM report.outbox WHERE contact_id = %s", keep) == 2
    assert db.query1("SELECT contact_id FROM report.invoices WHERE invoice_id = 'I1'") == keep
    assert totals(db, ORG) == total
    acts = db.querydicts("SELECT * FROM report.activity WHERE kind = 'contact.merged'")
    assert {a["contact_id"] for a in acts} == {keep, drop}
    assert all(a["message_id"] == merge["id"] for a in acts)

    # a later message naming drop acts on keep
    later = [make_msg("contact.noted", {"contact_id": drop, "text": "after"}),
             make_msg("transaction.recorded", {"transaction_id": "T1", "contact_id": drop,
                                               "amount": 500, "currency": "CHF", "text": "credit"}),
             make_msg("booking.updated", {"booking_id": "B2", "version": 2, "offer_id": "O1",
                                          "number": "N2",
                                          "booker": {"email": "kim.old@example.org"}})]
    for m in later:
        publish(m)
    wait_messages(db, 11)
    assert db.query1("SELECT count(*) FROM report.messages WHERE outcome <> 'applied'") == 0
    assert db.query1("SELECT contact_id FROM report.transactions WHERE transaction_id = 'T1'") \
        == keep
    assert db.query1("SELECT contact_id::text FROM rd.notes WHERE text = 'after'") == keep
    assert db.query1("SELECT contact_id FROM report.bookings WHERE booking_id = 'B2'") == keep
    # the same merge again is rejected with its reason
    again = make_msg("contact.merged", {"keep": keep, "drop": drop})
    publish(again)
    wait_messages(db, 12)
    assert "is already merged into %s" % keep in db.query1(
        "SELECT reason FROM report.messages WHERE message_id = %s", again["id"])

    # unmerge: what the merge moved goes back; what came later stays with keep
    mid = db.query1("SELECT merge_id FROM report.merges WHERE message_id = %s", merge["id"])
    r = rosterctl("unmerge", str(mid))
    assert r.returncode == 0, r.stderr
    assert db.query1("SELECT merged_into FROM report.contacts WHERE contact_id = %s", drop) is None
    assert db.query1("SELECT contact_id FROM report.invoices WHERE invoice_id = 'I1'") == drop
    assert db.query1("SELECT contact_id FROM report.bookings WHERE booking_id = 'B2'") == drop
    assert db.query1("SELECT contact_id FROM report.transactions WHERE transaction_id = 'T1'") \
        == keep
    assert db.query1("SELECT phone FROM report.contacts WHERE contact_id = %s", keep) is None
    after = snapshot(db, ORG)
    assert after["invoices"] == before["invoices"]
    assert after["outbox"] == before["outbox"]
    assert after["attendees"] == before["attendees"]
    chk = rosterctl("ledger", "check")
    assert chk.returncode == 0, chk.stdout + chk.stderr
