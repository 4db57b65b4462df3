"""test_rules.py - the rules of SPEC 4.1 to 4.5 as tables, one row per case
with the expected outcome and `match` value.

The rules live in SQL (schema/migrations/0002_contacts.sql), so the tables
drive them directly: one migrated database for the module, one organisation
per case (organisations are independent: that is tenancy), and
`rd.apply(org, id, type, at_ms, data, final, NULL)` with payloads shaped as
the C normaliser emits them (handlers/payload.c: emails trimmed and
lower-cased, an implausible email as "email_invalid" + "email_given", "" and
nil left out, contact ids lower-case UUIDs). The last test sends a few rows
through RabbitMQ and rosterd to show that the normaliser feeds these shapes.

docs/contacts.md lists which test covers which rule.
"""
import json
import uuid

import pytest

import harness
from harness import Database, make_msg, wait_messages, write_config

T0 = 1_700_000_000_000          # upstream time (ms) of each case's set-up messages
T1 = T0 + 60_000                # ... of its first booking message
ANNA = "anna@example.org"
BOB = "bob@example.org"
INVALID = {"email_invalid": "no @", "email_given": "anna.example.org", "first_name": "Anna"}
# the activity kinds of these rules (later steps add their own, e.g. mail.*)
KINDS = ["contact.created", "contact.changed", "contact.edited", "contact.imported", "sync.kept",
         "value.skipped", "booking", "booking.changed", "booking.reassigned", "booking.cancelled",
         "attendance", "attendance.changed", "attendance.status", "person.unassigned",
         "person.prefill_unknown", "person.retained", "person.reassigned", "contact.tagged",
         "contact.noted"]


class Rules:
    """A migrated database and rd.apply() on it; one fresh org per case."""

    def __init__(self, db):
        self.db = db
        self.n = 0

    def org(self, sync=False, rule="reassign"):
        self.n += 1
        org = "r%d-%s" % (self.n, uuid.uuid4().hex[:6])
        self.ok(org, "org.configured", {"name": org, "sync_contacts": sync}, at=T0)
        self.ok(org, "offer.upserted", {"offer_id": "O1", "title": "Course", "email_change": rule},
                at=T0)
        return org

    def apply(self, org, type, data, id=None, at=None, final=False):
        """(outcome, reason) of one message."""
        id = id or uuid.uuid4().hex
        row = self.db.query("SELECT outcome, reason FROM rd.apply(%s, %s, %s, %s, %s::jsonb, %s, NULL)",
                            org, id, type, T1 if at is None else at, json.dumps(data), final)
        return row[0]

    def ok(self, org, type, data, id=None, at=None):
        """Apply a message that must be applied; returns its id."""
        id = id or uuid.uuid4().hex
        out = self.apply(org, type, data, id=id, at=at)
        assert out == ("applied", None), (type, data, out)
        return id

    def new_contact(self, org, person, at=T0):
        """A contact by manual entry (contact.upserted without contact_id)."""
        mid = self.ok(org, "contact.upserted", person, at=at)
        return self.db.query1("SELECT contact_id::text FROM rd.contacts WHERE org = %s AND created_by = %s",
                              org, mid)

    def booking(self, org, bid="B1"):
        rows = self.db.querydicts("SELECT * FROM report.bookings WHERE org = %s AND booking_id = %s",
                                  org, bid)
        return rows[0] if rows else None

    def attendees(self, org, bid="B1"):
        return {r["attendee_id"]: r for r in self.db.querydicts(
            "SELECT * FROM report.attendees WHERE org = %s AND booking_id = %s", org, bid)}

    def contact(self, org, cid):
        rows = self.db.querydicts("SELECT * FROM report.contacts WHERE org = %s AND contact_id = %s",
                                  org, cid)
        return rows[0] if rows else None

    def with_email(self, org, email):
        """The live contacts with this email (no tombstones, not erased)."""
        return [r[0] for r in self.db.query(
            "SELECT contact_id FROM report.contacts WHERE org = %s AND email = %s "
            "AND merged_into IS NULL AND NOT erased ORDER BY created_at",
            org, email)]

    def activity(self, org, cid="any"):
        """[(contact_id, kind, summary)] in order; cid=None: rows without contact."""
        # rd.activity for the insertion order within one message
        sql = "SELECT contact_id::text, kind, summary FROM rd.activity WHERE org = %s AND kind = ANY (%s)"
        args = [org, KINDS]
        if cid is None:
            sql += " AND contact_id IS NULL"
        elif cid != "any":
            sql += " AND contact_id = %s"
            args.append(cid)
        return self.db.query(sql + " ORDER BY at, activity_id", *args)

    def history(self, org, cid):
        return self.db.query("SELECT field, old_value, new_value FROM report.field_history "
                             "WHERE org = %s AND contact_id = %s ORDER BY at, field", org, cid)

    def outcome(self, org, mid):
        return self.db.query1("SELECT outcome FROM report.messages WHERE org = %s AND message_id = %s",
                              org, mid)


@pytest.fixture(scope="module")
def rules(servers, tmp_path_factory):
    servers.ensure_up()
    db = Database(servers, "rules")
    cfg = str(tmp_path_factory.mktemp("rules") / "rosterd.conf")
    write_config(cfg, {"daemon": {"instance": "rules"}, "amqp": {"url": servers.amqp_url},
                       "postgres": {"conninfo": db.conninfo}})
    harness.rosterctl(cfg, "migrate", check=True)
    yield Rules(db)
    db.drop()


def person(email=None, **kw):
    p = dict(kw)
    if email:
        p["email"] = email
    return p


def booking(booker, attendees=None, bid="B1", version=1, **kw):
    d = {"booking_id": bid, "version": version, "offer_id": "O1", "booker": booker}
    if attendees is not None:
        d["attendees"] = attendees
    d.update(kw)
    return d


# --- 4.1 matching ------------------------------------------------------------

# Each row: contacts that exist before (their email; merged_into / erased
# mark tombstones and erased contacts), the booker of booking.created
# ("prefill": the index of the contact its contact_id names, or "unknown",
# or "other_org"), the offer's email_change, the expected match, the
# expected contact (index into the set-up contacts, "new", or None) and
# how many live contacts have the email afterwards.
MATCHING = [
    # id, set-up contacts, booker, prefill, rule, match, contact, count
    ("none_has_email", [BOB], person(ANNA), None, "reassign", "created_no_match", "new", 1),
    ("exactly_one", [ANNA, BOB], person(ANNA), None, "reassign", "assigned_unique", 0, 1),
    ("several", [ANNA, ANNA], person(ANNA), None, "reassign", "created_ambiguous", "new", 3),
    ("no_email", [ANNA], person(None, first_name="Anna"), None, "reassign",
     "unassigned_no_email", None, 1),
    ("invalid_email", [ANNA], INVALID, None, "reassign", "unassigned_invalid_email", None, 1),
    ("prefilled_same_email", [ANNA, ANNA], person(ANNA), 1, "reassign", "prefilled", 1, 2),
    ("prefilled_contact_without_email", [None], person(ANNA), 0, "reassign", "prefilled", 0, 1),
    ("prefilled_person_without_email", [BOB], person(None, first_name="Anna"), 0, "reassign",
     "prefilled", 0, 0),
    ("prefilled_invalid_email", [BOB], INVALID, 0, "reassign", "prefilled", 0, 0),
    ("prefilled_other_email_reassign_to_new", [BOB], person(ANNA), 0, "reassign",
     "reassigned", "new", 1),
    ("prefilled_other_email_reassign_to_unique", [BOB, ANNA], person(ANNA), 0, "reassign",
     "reassigned", 1, 1),
    ("prefilled_other_email_retain", [BOB], person(ANNA), 0, "retain", "retained", 0, 0),
    ("prefilled_unknown_contact", [ANNA], person(ANNA), "unknown", "reassign",
     "assigned_unique", 0, 1),
    ("prefilled_contact_of_other_org", [], person(ANNA), "other_org", "reassign",
     "created_no_match", "new", 1),
    ("email_only_in_other_org", [], person(ANNA), None, "reassign", "created_no_match", "new", 1),
    ("tombstone_not_counted", [ANNA, {"email": ANNA, "merged_into": 0}], person(ANNA), None,
     "reassign", "assigned_unique", 0, 1),
    ("erased_not_counted", [{"email": ANNA, "erased": True}], person(ANNA), None, "reassign",
     "created_no_match", "new", 1),
    ("prefilled_tombstone_resolves", [ANNA, {"email": ANNA, "merged_into": 0}], person(ANNA), 1,
     "reassign", "prefilled", 0, 1),
]


@pytest.mark.parametrize("setup,booker,prefill,rule,match,expect,count",
                         [pytest.param(*row[1:], id=row[0]) for row in MATCHING])
def test_matching(rules, setup, booker, prefill, rule, match, expect, count):
    org = rules.org(rule=rule)
    ids = []
    for c in setup:
        c = c if isinstance(c, dict) else {"email": c}
        ids.append(rules.new_contact(org, person(c.get("email"), first_name="Set-up")))
        if "merged_into" in c:
            rules.db.execute("UPDATE rd.contacts SET merged_into = %s WHERE org = %s AND contact_id = %s",
                             ids[c["merged_into"]], org, ids[-1])
        if c.get("erased"):
            rules.db.execute("UPDATE rd.contacts SET erased = true WHERE org = %s AND contact_id = %s",
                             org, ids[-1])
    other = rules.org()
    foreign = rules.new_contact(other, person(ANNA, first_name="Foreign"))
    booker = dict(booker)
    if prefill == "unknown":
        booker["contact_id"] = str(uuid.uuid4())
    elif prefill == "other_org":
        booker["contact_id"] = foreign
    elif prefill is not None:
        booker["contact_id"] = ids[prefill]

    rules.ok(org, "booking.created", booking(booker))

    b = rules.booking(org)
    assert b["match"] == match
    if expect is None:
        assert b["contact_id"] is None
    elif expect == "new":
        assert b["contact_id"] not in ids + [foreign, None]
        assert rules.contact(org, b["contact_id"])["email"] == ANNA
    else:
        assert b["contact_id"] == ids[expect]
    assert len(rules.with_email(org, ANNA)) == count
    # the other organisation is never touched
    assert rules.contact(other, foreign)["first_name"] == "Foreign"
    assert rules.db.query1("SELECT count(*) FROM rd.contacts WHERE org = %s", other) == 1

    # every decision is explained
    acts = rules.activity(org)
    if match == "created_ambiguous":
        live = [i for i, c in zip(ids, setup) if not isinstance(c, dict)]
        pairs = set(rules.db.query("SELECT contact_a::text, contact_b::text FROM rd.duplicate_candidates "
                                   "WHERE org = %s", org))
        assert pairs == {(i, b["contact_id"]) for i in live}
        assert any("2 contacts had the email" in s for _, k, s in acts if k == "contact.created")
    else:
        assert rules.db.query1("SELECT count(*) FROM rd.duplicate_candidates WHERE org = %s", org) == 0
    if match == "unassigned_no_email":
        assert rules.activity(org, None) == [(None, "person.unassigned",
                                              "booker of booking B1 left unassigned: no email")]
    if match == "unassigned_invalid_email":
        assert rules.activity(org, None) == [
            (None, "person.unassigned", "booker of booking B1 left unassigned: invalid email (no @)")]
    if booker.get("email_invalid") and b["contact_id"]:
        assert (b["contact_id"], "value.skipped", "email skipped: no @") in acts
    if prefill in ("unknown", "other_org"):
        assert any(k == "person.prefill_unknown" and c == b["contact_id"] for c, k, s in acts)
    if match in ("reassigned", "retained"):
        assert any(k == "person." + match for c, k, s in acts)
    if match == "prefilled" and setup[0] is None:
        assert rules.contact(org, ids[0])["email"] == ANNA       # an empty email is filled
    if match == "retained":
        assert rules.contact(org, ids[0])["email"] == BOB        # synchronisation off: kept


# Bookers and attendees of one message: each person is matched in order.
ATTENDEES = [
    # id, set-up contacts, booker email, attendees (email or person), expected
    # (booker match, [attendee matches]), contacts with ANNA afterwards
    ("booker_and_attendee_same_new_email", [], ANNA, [ANNA],
     ("created_no_match", ["assigned_unique"]), 1),
    ("booker_and_attendee_same_ambiguous_email", [ANNA, ANNA], ANNA, [ANNA],
     ("created_ambiguous", ["created_ambiguous"]), 3),
    ("mixed_attendees", [BOB], ANNA,
     [BOB, None, INVALID, ANNA, "carl@example.org"],
     ("created_no_match", ["assigned_unique", "unassigned_no_email", "unassigned_invalid_email",
                           "assigned_unique", "created_no_match"]), 1),
]


@pytest.mark.parametrize("setup,booker,atts,expect,count",
                         [pytest.param(*row[1:], id=row[0]) for row in ATTENDEES])
def test_matching_attendees(rules, setup, booker, atts, expect, count):
    org = rules.org()
    for e in setup:
        rules.new_contact(org, person(e))
    attendees = []
    for i, a in enumerate(atts):
        p = dict(a) if isinstance(a, dict) else person(a, first_name="P%d" % i)
        p["attendee_id"] = "A%d" % i
        attendees.append(p)
    rules.ok(org, "booking.created", booking(person(booker), attendees))
    b = rules.booking(org)
    got = rules.attendees(org)
    assert (b["match"], [got["A%d" % i]["match"] for i in range(len(atts))]) == expect
    assert len(rules.with_email(org, ANNA)) == count
    for i, a in enumerate(atts):
        if a == booker:   # the same person in one message: one contact
            assert got["A%d" % i]["contact_id"] == b["contact_id"]
        if a is None or isinstance(a, dict):
            assert got["A%d" % i]["contact_id"] is None
    if isinstance(atts[-1], str) and atts[-1] not in (booker, BOB):
        # an invalid email is stored as given on the attendee row
        assert got["A2"]["email"] == "anna.example.org"
        unassigned = [s for _, k, s in rules.activity(org, None)]
        assert unassigned == ["attendee A1 of booking B1 left unassigned: no email",
                              "attendee A2 of booking B1 left unassigned: invalid email (no @)"]


# --- 4.2 synchronisation -----------------------------------------------------

# The contact has phone P0, no city; the booker (same email) brings phone P1
# and city C1. Org setting x message `sync` -> what the contact ends with.
SYNC = [
    # id, org sync_contacts, message sync, expected phone, history fields
    ("org_off", False, None, "P0", ["city"]),
    ("org_on", True, None, "P1", ["city", "phone"]),
    ("org_off_message_on", False, True, "P1", ["city", "phone"]),
    ("org_on_message_off", True, False, "P0", ["city"]),
]


@pytest.mark.parametrize("org_sync,msg_sync,phone,changed",
                         [pytest.param(*row[1:], id=row[0]) for row in SYNC])
def test_sync(rules, org_sync, msg_sync, phone, changed):
    org = rules.org(sync=org_sync)
    cid = rules.new_contact(org, person(ANNA, first_name="Anna", phone="P0"))
    extra = {} if msg_sync is None else {"sync": msg_sync}
    mid = rules.ok(org, "booking.created",
                   booking(person(ANNA, first_name="Anna", phone="P1", city="C1"), **extra), at=T1)
    c = rules.contact(org, cid)
    assert (c["phone"], c["city"], c["first_name"]) == (phone, "C1", "Anna")
    rows = rules.db.querydicts("SELECT * FROM report.field_history WHERE org = %s AND contact_id = %s "
                               "AND message_id = %s ORDER BY field", org, cid, mid)
    assert [r["field"] for r in rows] == changed
    assert rows[0]["old_value"] is None and rows[0]["new_value"] == "C1"
    assert all(r["at"].timestamp() * 1000 == T1 for r in rows)   # upstream time of the message
    if "phone" in changed:
        assert (rows[1]["old_value"], rows[1]["new_value"]) == ("P0", "P1")
    else:
        kept = [s for _, k, s in rules.activity(org, cid) if k == "sync.kept"]
        assert kept and "phone" in kept[0] and "synchronisation off" in kept[0]


def test_sync_never_erases_and_one_history_row_per_field(rules):
    org = rules.org(sync=True)
    cid = rules.new_contact(org, person(ANNA, phone="P0", city="C0", company="Co"))
    # not given (left out by the normaliser) never erases; the booker and an
    # attendee of one message are the same contact: one history row per field
    mid = rules.ok(org, "booking.created", booking(
        person(ANNA, phone="P1"), [dict(person(ANNA, phone="P2"), attendee_id="A1")]))
    c = rules.contact(org, cid)
    assert (c["phone"], c["city"], c["company"]) == ("P2", "C0", "Co")
    assert rules.db.query("SELECT field, old_value, new_value FROM report.field_history "
                          "WHERE org = %s AND message_id = %s", org, mid) == [("phone", "P0", "P2")]
    # changing it back in one message leaves no history row for that message
    mid = rules.ok(org, "booking.created", booking(
        person(ANNA, phone="P3"), [dict(person(ANNA, phone="P2"), attendee_id="A1")], bid="B2"))
    assert rules.db.query1("SELECT count(*) FROM report.field_history WHERE org = %s AND message_id = %s",
                           org, mid) == 0


# Synchronised values carry the upstream time of their message: a message
# that happened earlier but arrives later does not revert them; it still
# fills what is empty. A value filled with synchronisation off is replaced by
# any synchronised one.
LATE = [
    # id, first (sync, at, phone), second (sync, at, phone), expected phone
    ("on_newer_then_older", (True, T1 + 2000, "NEW"), (True, T1 + 1000, "OLD"), "NEW"),
    ("on_older_then_newer", (True, T1 + 1000, "OLD"), (True, T1 + 2000, "NEW"), "NEW"),
    ("off_fill_then_on_older", (False, T1 + 2000, "NEW"), (True, T1 + 1000, "OLD"), "OLD"),
    ("on_older_then_off_fill", (True, T1 + 1000, "OLD"), (False, T1 + 2000, "NEW"), "OLD"),
]


@pytest.mark.parametrize("first,second,phone", [pytest.param(*row[1:], id=row[0]) for row in LATE])
def test_sync_late_message_does_not_revert(rules, first, second, phone):
    org = rules.org()
    for i, (sync, at, ph) in enumerate((first, second)):
        city = {"city": "C%d" % i} if i == 1 else {}
        rules.ok(org, "booking.created",
                 booking(person(ANNA, phone=ph, **city), bid="B%d" % i, sync=sync), at=at)
    cid = rules.with_email(org, ANNA)[0]
    c = rules.contact(org, cid)
    assert (c["phone"], c["city"]) == (phone, "C1")
    if first[0] and second[0] and first[1] > second[1]:
        assert any("come from a later message" in s for _, k, s in rules.activity(org, cid)
                   if k == "sync.kept")


def test_custom_fields_checked_against_kind(rules):
    org = rules.org(sync=True)
    for key, kind in (("size", "number"), ("vip", "bool"), ("since", "date"), ("cv", "file"),
                      ("diet", "text")):
        rules.ok(org, "field.defined", {"key": key, "kind": kind, "label": key.title()})
    fields = {"size": "XL", "vip": True, "since": "2024-02-30", "cv": 5, "diet": "vegan",
              "nick": "Annie", "score": 7.5}
    mid = rules.ok(org, "booking.created", booking(person(ANNA, fields=fields, country="ch",
                                                          birthdate="1990-02-30")))
    b = rules.booking(org)
    assert rules.outcome(org, mid) == "applied" and b["status"] == "confirmed"
    c = rules.contact(org, b["contact_id"])
    # undefined keys stored as given, bad values skipped, country upper-cased
    assert c["fields"] == {"vip": True, "diet": "vegan", "nick": "Annie", "score": 7.5}
    assert (c["country"], c["birthdate"]) == ("CH", None)
    skipped = sorted(s for _, k, s in rules.activity(org, b["contact_id"]) if k == "value.skipped")
    assert skipped == ["birthdate is not a calendar date: value skipped",
                       "field cv wants a string: value skipped",
                       "field since wants a date YYYY-MM-DD: value skipped",
                       "field size wants a number: value skipped"]
    assert ("fields.nick", None, "Annie") in rules.history(org, b["contact_id"])
    # sync off for a message: set values stay, empty ones fill
    rules.ok(org, "booking.created", booking(
        person(ANNA, fields={"size": 40, "diet": "none", "vip": False}, country="Switzerland"),
        bid="B2", sync=False))
    c = rules.contact(org, b["contact_id"])
    assert c["fields"] == {"vip": True, "diet": "vegan", "nick": "Annie", "score": 7.5, "size": 40}
    assert c["country"] == "CH"
    assert any(s == "country is not an ISO 3166 alpha-2 code: value skipped"
               for _, k, s in rules.activity(org, b["contact_id"]))


# --- 4.3 email changes -------------------------------------------------------

# A person assigned to the contact of anna@ comes back with bob@ in a later
# version. Rows: which message, the offer's rule, synchronisation, whether a
# contact already has bob@ -> the match, the contact ("old", "new",
# "existing") and the old contact's email afterwards.
EMAIL_CHANGE = [
    ("booker_reassign", "booking.updated", "reassign", False, False, "reassigned", "new", ANNA),
    ("booker_reassign_to_existing", "booking.updated", "reassign", False, True, "reassigned",
     "existing", ANNA),
    ("booker_reassign_sync_on", "booking.updated", "reassign", True, False, "reassigned", "new", ANNA),
    ("booker_retain_sync_off", "booking.updated", "retain", False, False, "retained", "old", ANNA),
    ("booker_retain_sync_on", "booking.updated", "retain", True, False, "retained", "old", BOB),
    ("attendee_reassign", "attendee.updated", "reassign", False, False, "reassigned", "new", ANNA),
    ("attendee_reassign_to_existing", "attendee.updated", "reassign", True, True, "reassigned",
     "existing", ANNA),
    ("attendee_retain_sync_off", "attendee.updated", "retain", False, False, "retained", "old", ANNA),
    ("attendee_retain_sync_on", "attendee.updated", "retain", True, False, "retained", "old", BOB),
    ("attendee_in_booking_updated", "booking.updated/attendee", "retain", True, False, "retained",
     "old", BOB),
]


@pytest.mark.parametrize("via,rule,sync,exists,match,who,old_email",
                         [pytest.param(*row[1:], id=row[0]) for row in EMAIL_CHANGE])
def test_email_change(rules, via, rule, sync, exists, match, who, old_email):
    org = rules.org(sync=sync, rule=rule)
    existing = rules.new_contact(org, person(BOB, first_name="Bob")) if exists else None
    att = lambda e: [dict(person(e, first_name="Anna"), attendee_id="A1")]
    rules.ok(org, "booking.created", booking(person(ANNA, first_name="Anna"), att(ANNA)))
    old = rules.booking(org)["contact_id"]
    assert old and rules.attendees(org)["A1"]["contact_id"] == old
    if via == "booking.updated":
        rules.ok(org, via, booking(person(BOB, first_name="Anna"), att(ANNA), version=2), at=T1 + 1)
        row = rules.booking(org)
    elif via == "attendee.updated":
        rules.ok(org, via, {"booking_id": "B1", "version": 2, "attendee": att(BOB)[0]}, at=T1 + 1)
        row = rules.attendees(org)["A1"]
    else:
        rules.ok(org, "booking.updated", booking(person(ANNA, first_name="Anna"), att(BOB), version=2),
                 at=T1 + 1)
        row = rules.attendees(org)["A1"]
    assert (row["match"], row["email"]) == (match, BOB)
    expect = {"old": old, "existing": existing}.get(who)
    if who == "new":
        assert row["contact_id"] not in (old, None, existing)
        assert rules.contact(org, row["contact_id"])["email"] == BOB
    else:
        assert row["contact_id"] == expect
    assert rules.contact(org, old)["email"] == old_email
    if old_email == BOB:
        assert ("email", ANNA, BOB) in rules.history(org, old)
    kind = "person.retained" if match == "retained" else "person.reassigned"
    assert any(k == kind for _, k, _ in rules.activity(org, row["contact_id"]))
    # the next version with the same new email keeps the decision
    rules.ok(org, "attendee.updated", {"booking_id": "B1", "version": 3,
                                       "attendee": dict(att(BOB)[0], category="late")}, at=T1 + 2)
    if via != "booking.updated":
        a = rules.attendees(org)["A1"]
        assert (a["match"], a["contact_id"], a["category"]) == (match, row["contact_id"], "late")


@pytest.mark.parametrize("given,note", [
    pytest.param({}, None, id="email_not_given"),
    pytest.param({"email_invalid": "more than one @", "email_given": "a@@b"}, "email skipped",
                 id="email_invalid")])
def test_email_not_given_or_invalid_keeps_assignment(rules, given, note):
    org = rules.org(sync=True)
    rules.ok(org, "booking.created", booking(person(ANNA), [dict(person(ANNA), attendee_id="A1")]))
    cid = rules.booking(org)["contact_id"]
    rules.ok(org, "attendee.updated",
             {"booking_id": "B1", "version": 2, "attendee": dict(given, attendee_id="A1", first_name="X")})
    a = rules.attendees(org)["A1"]
    assert (a["contact_id"], a["match"], a["email"], a["first_name"]) == \
        (cid, "assigned_unique", ANNA, "X")
    assert rules.contact(org, cid)["email"] == ANNA
    if note:
        assert any(s.startswith(note) for _, k, s in rules.activity(org, cid) if k == "value.skipped")


# --- 4.4 versions and order --------------------------------------------------

def _b(version, booker=ANNA, attendees=("A1", "A2"), **kw):
    return ("booking.created" if version == 1 else "booking.updated",
            booking(person(booker, first_name="v%d" % version),
                    [dict(person("%s@example.org" % a.lower(), first_name="%s-v%d" % (a, version)),
                          attendee_id=a) for a in attendees], version=version,
                    number="N%d" % version, **kw))


def _att(version, aid="A1"):
    return ("attendee.updated", {"booking_id": "B1", "version": version, "attendee": dict(
        person("%s@example.org" % aid.lower(), first_name="%s-v%d" % (aid, version)), attendee_id=aid)})


def _cancel(version):
    return ("booking.cancelled", {"booking_id": "B1", "version": version, "reason": "ill"})


# Each row: messages in arrival order, their outcomes, and the end state:
# (number, status, version, booker first name, {attendee: (first name, status)}).
VERSIONS = [
    ("in_order", [_b(1), _b(2)], ["applied", "applied"],
     ("N2", "confirmed", 2, "v2", {"A1": ("A1-v2", "confirmed"), "A2": ("A2-v2", "confirmed")})),
    ("older_after_newer_is_stale", [_b(2), _b(1)], ["applied", "stale"],
     ("N2", "confirmed", 2, "v2", {"A1": ("A1-v2", "confirmed"), "A2": ("A2-v2", "confirmed")})),
    ("same_version_again_is_stale", [_b(1), _b(1, booker=BOB)], ["applied", "stale"],
     ("N1", "confirmed", 1, "v1", {"A1": ("A1-v1", "confirmed"), "A2": ("A2-v1", "confirmed")})),
    ("updated_first_creates", [_b(3)], ["applied"],
     ("N3", "confirmed", 3, "v3", {"A1": ("A1-v3", "confirmed"), "A2": ("A2-v3", "confirmed")})),
    ("attendee_updated_first_creates", [_att(3)], ["applied"],
     (None, "confirmed", 3, None, {"A1": ("A1-v3", "confirmed")})),
    ("attendee_updated_then_created", [_att(3), _b(1)], ["applied", "applied"],
     ("N1", "confirmed", 3, "v1", {"A1": ("A1-v3", "confirmed"), "A2": ("A2-v1", "confirmed")})),
    ("attendee_updated_created_updated", [_att(3), _b(1), _b(2)], ["applied"] * 3,
     ("N2", "confirmed", 3, "v2", {"A1": ("A1-v3", "confirmed"), "A2": ("A2-v2", "confirmed")})),
    ("attendee_after_newer_list_is_stale", [_b(3), _att(2)], ["applied", "stale"],
     ("N3", "confirmed", 3, "v3", {"A1": ("A1-v3", "confirmed"), "A2": ("A2-v3", "confirmed")})),
    ("attendees_carry_own_versions", [_att(3, "A2"), _att(2, "A1"), _b(1)], ["applied"] * 3,
     ("N1", "confirmed", 3, "v1", {"A1": ("A1-v2", "confirmed"), "A2": ("A2-v3", "confirmed")})),
    ("attendee_left", [_b(1), _b(2, attendees=("A1",))], ["applied", "applied"],
     ("N2", "confirmed", 2, "v2", {"A1": ("A1-v2", "confirmed"), "A2": ("A2-v1", "cancelled")})),
    ("attendee_left_reversed", [_b(2, attendees=("A1",)), _b(1)], ["applied", "applied"],
     ("N2", "confirmed", 2, "v2", {"A1": ("A1-v2", "confirmed"), "A2": ("A2-v1", "cancelled")})),
    ("attendee_back_after_leaving", [_b(1), _b(2, attendees=("A1",)), _att(3, "A2")],
     ["applied"] * 3,
     ("N2", "confirmed", 3, "v2", {"A1": ("A1-v2", "confirmed"), "A2": ("A2-v3", "confirmed")})),
    ("cancel_waits_for_booking", [_cancel(2), _b(1)], ["retry", "applied"],
     ("N1", "cancelled", 2, "v1", {"A1": ("A1-v1", "cancelled"), "A2": ("A2-v1", "cancelled")})),
    ("cancel", [_b(1), _cancel(2)], ["applied", "applied"],
     ("N1", "cancelled", 2, "v1", {"A1": ("A1-v1", "cancelled"), "A2": ("A2-v1", "cancelled")})),
    ("cancel_before_created_data", [_att(3), _cancel(4), _b(1)], ["applied"] * 3,
     ("N1", "cancelled", 4, "v1", {"A1": ("A1-v3", "cancelled"), "A2": ("A2-v1", "cancelled")})),
    ("cancel_after_newer_attendee_update", [_b(1), _att(3), _cancel(2)], ["applied"] * 3,
     ("N1", "cancelled", 3, "v1", {"A1": ("A1-v3", "cancelled"), "A2": ("A2-v1", "cancelled")})),
    ("cancel_older_than_update_is_stale", [_b(1), _b(3), _cancel(2)], ["applied", "applied", "stale"],
     ("N3", "confirmed", 3, "v3", {"A1": ("A1-v3", "confirmed"), "A2": ("A2-v3", "confirmed")})),
    ("update_after_cancel_reinstates", [_b(1), _cancel(2), _b(3)], ["applied"] * 3,
     ("N3", "confirmed", 3, "v3", {"A1": ("A1-v3", "confirmed"), "A2": ("A2-v3", "confirmed")})),
    ("cancel_twice_is_stale", [_b(1), _cancel(2), _cancel(2)], ["applied", "applied", "stale"],
     ("N1", "cancelled", 2, "v1", {"A1": ("A1-v1", "cancelled"), "A2": ("A2-v1", "cancelled")})),
]


@pytest.mark.parametrize("msgs,outcomes,end", [pytest.param(*row[1:], id=row[0]) for row in VERSIONS])
def test_versions(rules, msgs, outcomes, end):
    org = rules.org(sync=True)
    got, later = [], []
    for type, data in msgs:
        mid = uuid.uuid4().hex
        before = rules.db.query("SELECT (SELECT count(*) FROM rd.activity WHERE org = %s), "
                                "(SELECT count(*) FROM rd.field_history WHERE org = %s), "
                                "(SELECT count(*) FROM rd.contacts WHERE org = %s)", org, org, org)
        out, _ = rules.apply(org, type, data, id=mid, at=T1 + 1000 * data["version"])
        got.append(out)
        if out == "stale":   # acknowledged, no effect, counted
            assert rules.outcome(org, mid) == "stale"
            assert rules.db.query("SELECT (SELECT count(*) FROM rd.activity WHERE org = %s), "
                                  "(SELECT count(*) FROM rd.field_history WHERE org = %s), "
                                  "(SELECT count(*) FROM rd.contacts WHERE org = %s)",
                                  org, org, org) == before
        if out == "retry":   # waits: no row; comes back at the end
            assert rules.outcome(org, mid) is None
            later.append((type, data))
    for type, data in later:
        assert rules.apply(org, type, data, at=T1 + 1000 * data["version"])[0] == "applied"
    assert got == outcomes
    b = rules.booking(org)
    booker = rules.db.query1("SELECT booker->>'first_name' FROM rd.bookings WHERE org = %s", org)
    atts = {k: (v["first_name"], v["status"]) for k, v in rules.attendees(org).items()}
    assert (b["number"], b["status"], b["version"], booker, atts) == end
    if booker:
        assert b["match"] and b["contact_id"] and b["offer_id"] == "O1"


def test_cancel_gives_up_waiting(rules):
    org = rules.org()
    assert rules.apply(org, "booking.cancelled", {"booking_id": "NOPE", "version": 1}) == \
        ("retry", "booking NOPE not yet seen")
    out, reason = rules.apply(org, "booking.cancelled", {"booking_id": "NOPE", "version": 1},
                              final=True)
    assert out == "rejected" and reason == "gave up waiting: booking NOPE not yet seen"


# --- 4.5 idempotency ---------------------------------------------------------

def test_idempotency(rules):
    org, other = rules.org(), rules.org()
    data = booking(person(ANNA), [dict(person(BOB), attendee_id="A1")])
    assert rules.apply(org, "booking.created", data, id="m1") == ("applied", None)
    snapshot = rules.db.query("SELECT (SELECT count(*) FROM rd.activity WHERE org = %s), "
                              "(SELECT count(*) FROM rd.contacts WHERE org = %s), "
                              "(SELECT count(*) FROM rd.field_history WHERE org = %s)", org, org, org)
    assert rules.apply(org, "booking.created", data, id="m1") == ("duplicate", "applied")
    # even with other content: the (org, id) is what counts
    assert rules.apply(org, "booking.updated", dict(data, version=2), id="m1")[0] == "duplicate"
    assert rules.db.query("SELECT (SELECT count(*) FROM rd.activity WHERE org = %s), "
                          "(SELECT count(*) FROM rd.contacts WHERE org = %s), "
                          "(SELECT count(*) FROM rd.field_history WHERE org = %s)",
                          org, org, org) == snapshot
    assert rules.booking(org)["version"] == 1
    # the same id in another organisation is another message
    assert rules.apply(other, "booking.created", data, id="m1") == ("applied", None)
    # a rejected message stays rejected
    assert rules.apply(org, "contact.noted", {"contact_id": str(uuid.uuid4()), "text": "x"},
                       id="m2", final=True)[0] == "rejected"
    out, reason = rules.apply(org, "contact.noted", {"contact_id": str(uuid.uuid4()), "text": "x"},
                              id="m2")
    assert out == "duplicate" and reason.startswith("rejected: gave up waiting: contact")


# --- bookings, activity, manual entry, tenancy -------------------------------

def test_activity_timeline(rules):
    org = rules.org()
    mids = [rules.ok(org, "booking.created", booking(person(ANNA), [
        dict(person(ANNA), attendee_id="A1"), dict(person(BOB), attendee_id="A2")]))]
    anna = rules.booking(org)["contact_id"]
    bob = rules.attendees(org)["A2"]["contact_id"]
    mids.append(rules.ok(org, "booking.updated", booking(person(ANNA), [
        dict(person(ANNA, category="kid"), attendee_id="A1")], version=2), at=T1 + 1))
    mids.append(rules.ok(org, "booking.cancelled", {"booking_id": "B1", "version": 3,
                                                    "reason": "ill"}, at=T1 + 2))
    mids.append(rules.ok(org, "contact.tagged", {"contact_id": anna, "add": ["vip", "2024"],
                                                 "remove": ["none"]}, at=T1 + 3))
    mids.append(rules.ok(org, "contact.noted", {"contact_id": anna, "text": "called", "author": "eva"},
                         at=T1 + 4))
    kinds = [k for _, k, _ in rules.activity(org, anna)]
    assert kinds == ["contact.created", "booking", "attendance", "booking.changed",
                     "attendance.changed", "attendance.status", "booking.cancelled",
                     "contact.tagged", "contact.noted"]
    assert [k for _, k, _ in rules.activity(org, bob)] == [
        "contact.created", "attendance", "attendance.status"]
    assert rules.db.query("SELECT summary FROM report.activity WHERE org = %s AND contact_id = %s "
                          "AND kind = 'attendance.status'", org, bob) == [
        ("attendee A2 of booking B1: confirmed -> cancelled (no longer listed in the booking)",)]
    assert {m for (m,) in rules.db.query("SELECT message_id FROM report.activity "
                                         "WHERE org = %s AND contact_id = %s", org, anna)} == set(mids)
    c = rules.contact(org, anna)
    assert c["tags"] == ["2024", "vip"]
    assert ("tags", "", "2024,vip") in rules.history(org, anna)
    assert rules.db.query("SELECT text, author FROM rd.notes WHERE org = %s", org) == [("called", "eva")]


def test_manual_entry_and_import(rules):
    org = rules.org(sync=False)
    a1 = rules.new_contact(org, person(ANNA, first_name="Anna", phone="P0"))
    a2 = rules.new_contact(org, person(ANNA, first_name="Anna"))        # duplicates allowed
    assert a1 != a2 and len(rules.with_email(org, ANNA)) == 2
    # match "email": 4.1 step 3 and the sync rules
    rules.ok(org, "contact.upserted", person(BOB, first_name="Bob", match="email"))
    bob = rules.with_email(org, BOB)
    assert len(bob) == 1
    rules.ok(org, "contact.upserted", person(BOB, first_name="Robert", city="Bern", match="email"))
    c = rules.contact(org, bob[0])
    assert (c["first_name"], c["city"]) == ("Bob", "Bern")           # sync off: kept, filled
    rules.ok(org, "contact.upserted", person(ANNA, match="email"))
    assert len(rules.with_email(org, ANNA)) == 3                     # ambiguous: a new one
    assert rules.db.query1("SELECT count(*) FROM rd.duplicate_candidates WHERE org = %s", org) == 2
    assert any(s == "contact data received (created_ambiguous)" for _, k, s in rules.activity(org))
    # contact_id: an admin edit, values overwrite even with sync off
    rules.ok(org, "contact.upserted", person("anna.new@example.org", contact_id=a1, phone="P9",
                                             match="email"))
    c = rules.contact(org, a1)
    assert (c["email"], c["phone"], c["first_name"]) == ("anna.new@example.org", "P9", "Anna")
    assert ("phone", "P0", "P9") in rules.history(org, a1)
    # unknown contact_id: waits, then is rejected
    assert rules.apply(org, "contact.upserted", {"contact_id": str(uuid.uuid4()), "phone": "1"})[0] == "retry"
    # barcodes: unique, 20 hex digits from a CSPRNG
    codes = [r[0] for r in rules.db.query("SELECT barcode FROM report.contacts WHERE org = %s", org)]
    assert len(codes) == len(set(codes)) == 4
    assert all(len(b) == 20 and all(ch in "0123456789ABCDEF" for ch in b) for b in codes)


def test_tenancy(rules):
    a, b = rules.org(), rules.org()
    foreign = rules.new_contact(b, person(ANNA, first_name="B-Anna"))
    for type, data in (("contact.tagged", {"contact_id": foreign, "add": ["x"]}),
                       ("contact.noted", {"contact_id": foreign, "text": "x"}),
                       ("contact.upserted", {"contact_id": foreign, "first_name": "Hacked"})):
        assert rules.apply(a, type, data)[0] == "retry"
        assert rules.apply(a, type, data, final=True)[0] == "rejected"
    rules.ok(a, "booking.created", booking(person(ANNA, contact_id=foreign, first_name="A-Anna")))
    mine = rules.booking(a)["contact_id"]
    assert mine != foreign and rules.booking(a)["match"] == "created_no_match"
    assert rules.contact(b, foreign)["first_name"] == "B-Anna"
    assert rules.contact(b, foreign)["tags"] == []
    assert rules.contact(a, foreign) is None


# --- the C normaliser feeds the same shapes ----------------------------------

# Raw values as upstream sends them -> the match; run through RabbitMQ.
THROUGH_RABBIT = [
    # attendee email as sent, prefill (None, "anna", "anna-upper", "junk"), match
    ("  Anna@Example.ORG\t", None, "assigned_unique"),
    ("ANNA@example.org", "anna-upper", "prefilled"),
    ("carl@example.org", None, "created_no_match"),
    ("", None, "unassigned_no_email"),
    (None, None, "unassigned_no_email"),
    ("   ", None, "unassigned_no_email"),
    ("anna@@example.org", None, "unassigned_invalid_email"),
    ("anna example@example.org", None, "unassigned_invalid_email"),
    ("@example.org", None, "unassigned_invalid_email"),
    ("anna@example.org", "junk", "assigned_unique"),
]


@pytest.mark.timeout(120)
def test_same_shapes_through_rabbitmq(rosterd, publish, db):
    rosterd(retry_base_ms=50, max_retries=2)
    publish(make_msg("org.configured", {"name": "Acme"}))
    publish(make_msg("offer.upserted", {"offer_id": "O1", "title": "Course"}))
    publish(make_msg("contact.upserted", {"email": ANNA, "first_name": "Anna"}))
    wait_messages(db, 3)
    anna = db.query1("SELECT contact_id FROM report.contacts WHERE email = %s", ANNA)
    attendees = []
    for i, (email, prefill, _) in enumerate(THROUGH_RABBIT):
        a = {"attendee_id": "A%d" % i, "first_name": "P%d" % i}
        if email is not None:
            a["email"] = email
        if prefill == "anna-upper":
            a["contact_id"] = anna.upper()
        elif prefill == "junk":
            a["contact_id"] = "not-a-uuid"
        attendees.append(a)
    m = make_msg("booking.created", {"booking_id": "B1", "version": 1, "offer_id": "O1",
                                     "booker": {"email": " BOB@Example.org "},
                                     "attendees": attendees})
    publish(m)
    rows = wait_messages(db, 4)
    assert [r["outcome"] for r in rows if r["message_id"] == m["id"]] == ["applied"]
    got = {r["attendee_id"]: (r["match"], r["contact_id"]) for r in db.querydicts(
        "SELECT * FROM report.attendees")}
    for i, (email, prefill, match) in enumerate(THROUGH_RABBIT):
        assert got["A%d" % i][0] == match, (email, prefill)
        if match in ("assigned_unique", "prefilled"):
            assert got["A%d" % i][1] == anna
    assert db.query1("SELECT match FROM report.bookings") == "created_no_match"
    assert db.query1("SELECT email FROM report.bookings") == BOB
    reasons = [s for (s,) in db.query("SELECT summary FROM report.activity WHERE contact_id IS NULL "
                                      "AND kind = 'person.unassigned' ORDER BY summary")]
    assert any("invalid email (more than one @)" in s for s in reasons)
    assert any("invalid email (contains space or control character)" in s for s in reasons)
    assert any("invalid email (empty local part)" in s for s in reasons)
    assert db.query1("SELECT count(*) FROM report.activity WHERE kind = 'person.prefill_unknown' "
                     "AND summary LIKE %s", "%not a UUID%") == 1
