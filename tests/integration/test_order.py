"""test_order.py - SPEC 4.4: the end state does not depend on arrival order.

One fixed set of booking messages (booking.created, booking.updated twice,
attendee.updated, booking.cancelled, for three bookings whose bookers and
attendees share emails) goes through RabbitMQ and rosterd in 20 random
(seeded) orders, each into an organisation of its own, plus once in
version order as the reference. The report views of every organisation
must equal the reference once contact ids are replaced by the contact's
email and times are dropped.

What "the same" means is in docs/contacts.md ("Versions and order"): the
messages are full states of what they cover (as upstream platforms send
them), so a value never lives only in a version that a later one makes
stale; `match` is compared as its meaning, with created_no_match and
assigned_unique both "matched by email", since which of two persons with a
new email came first *is* the arrival order. The activity timeline and the
field history record what happened in arrival order and are not compared.
"""
import random
import uuid

import pytest

from harness import make_msg, wait_messages

T = 1_700_000_000_000
ANNA, BOB, CARL, DORA, ERIK = ("%s@example.org" % n for n in ("anna", "bob", "carl", "dora", "erik"))
SEED = 20241123
ORDERS = 20


def p(email, **kw):
    d = {"email": email} if email else {}
    d.update(kw)
    return d


def booking_messages(carl_id):
    """(type, data, at) of every booking message, in version order per booking."""
    at = lambda k: T + k * 1000
    anna = lambda phone: p(ANNA, first_name="Anna", last_name="Muster", phone=phone)
    bob = lambda first: p(BOB, first_name=first, city="Bern")
    msgs = []

    def add(type, k, **data):
        msgs.append((type, data, at(k)))

    # B1: attendee A3 leaves in v2, A2 renamed by attendee.updated v3, v4
    # pending, v5 cancels. Each version repeats everything it covers.
    add("booking.created", 1, booking_id="B1", version=1, offer_id="O1", number="B1-1", total=300,
        booker=anna("111"), attendees=[
            dict(anna("111"), attendee_id="A1", category="adult", price=100),
            dict(bob("Bob"), attendee_id="A2", category="child", price=100),
            dict(p(CARL, first_name="Carl"), attendee_id="A3", price=100)])
    add("booking.updated", 5, booking_id="B1", version=2, offer_id="O1", number="B1-2", total=200,
        booker=anna("222"), attendees=[
            dict(anna("222"), attendee_id="A1", category="adult", price=100),
            dict(bob("Bob"), attendee_id="A2", category="child", price=100)])
    add("attendee.updated", 7, booking_id="B1", version=3,
        attendee=dict(bob("Bobby"), attendee_id="A2", category="child", price=90))
    add("booking.updated", 9, booking_id="B1", version=4, offer_id="O1", number="B1-2", total=190,
        status="pending", booker=anna("222"), attendees=[
            dict(anna("222"), attendee_id="A1", category="adult", price=100),
            dict(bob("Bobby"), attendee_id="A2", category="child", price=90)])
    add("booking.cancelled", 11, booking_id="B1", version=5, reason="course full")
    # B2: anna attends with another phone (a later message wins, whatever
    # arrives last); erik joins in v3
    add("booking.created", 2, booking_id="B2", version=1, offer_id="O1", booker=bob("Bob"),
        attendees=[dict(p(DORA, first_name="Dora"), attendee_id="A1"),
                   dict(anna("111"), attendee_id="A2")])
    add("attendee.updated", 6, booking_id="B2", version=2,
        attendee=dict(anna("333"), attendee_id="A2", category="guest"))
    add("booking.updated", 8, booking_id="B2", version=3, offer_id="O1", number="B2-3",
        booker=bob("Bob"), attendees=[
            dict(p(DORA, first_name="Dora"), attendee_id="A1"),
            dict(anna("333"), attendee_id="A2", category="guest"),
            dict(p(ERIK, first_name="Erik", fields={"size": 42}), attendee_id="A3")])
    # B3 (offer O2, retain): booker prefilled from carl's contact; no-email and
    # invalid-email attendees; cancelled in v3 and reinstated in v4
    b3 = lambda v, status=None: dict(
        booking_id="B3", version=v, offer_id="O2", number="B3", currency="EUR",
        booker=p(CARL, first_name="Carl", contact_id=carl_id),
        attendees=[dict(p(ERIK, first_name="Erik", fields={"size": 42}), attendee_id="A1"),
                   dict(p(None, first_name="Nomail"), attendee_id="A2"),
                   dict(p("erik(at)example.org", first_name="Typo"), attendee_id="A3")],
        **({"status": status} if status else {}))
    add("booking.created", 3, **b3(1, "waitlist"))
    add("attendee.updated", 4, booking_id="B3", version=2,
        attendee=dict(p(ERIK, first_name="Erik", fields={"size": 42}), attendee_id="A1",
                      category="vip"))
    add("booking.cancelled", 10, booking_id="B3", version=3)
    d = b3(4)
    d["attendees"][0]["category"] = "vip"
    add("booking.updated", 12, **d)
    return msgs


def orders():
    """The reference (upstream order: by `at`) and ORDERS seeded random
    permutations."""
    rng = random.Random(SEED)
    msgs = booking_messages("x")
    n = len(msgs)
    out = [sorted(range(n), key=lambda i: msgs[i][2])]
    for _ in range(ORDERS):
        o = list(range(n))
        rng.shuffle(o)
        out.append(o)
    return out


MATCH_MEANING = {"created_no_match": "by_email", "assigned_unique": "by_email"}


def end_state(db, org):
    email_of = dict(db.query("SELECT contact_id, email FROM report.contacts WHERE org = %s", org))
    assert len(set(email_of.values())) == len(email_of), "one contact per email"
    canon = lambda cid: email_of.get(cid, cid)
    m = lambda v: MATCH_MEANING.get(v, v)
    contacts = sorted(db.query(
        "SELECT email, first_name, last_name, company, language, phone, street, zip, city, country, "
        "birthdate, fields::text, tags::text, merged_into, erased FROM report.contacts WHERE org = %s", org))
    bookings = sorted((b, o, n, s, v, canon(c), e, m(x), t, cur) for b, o, n, s, v, c, e, x, t, cur in db.query(
        "SELECT booking_id, offer_id, number, status, version, contact_id, email, match, total, currency "
        "FROM report.bookings WHERE org = %s", org))
    attendees = sorted((b, a, canon(c), e, f, l, cat, pr, s, m(x)) for b, a, c, e, f, l, cat, pr, s, x in db.query(
        "SELECT booking_id, attendee_id, contact_id, email, first_name, last_name, category, price, "
        "status, match FROM report.attendees WHERE org = %s", org))
    return {"contacts": contacts, "bookings": bookings, "attendees": attendees}


@pytest.mark.timeout(240)
def test_end_state_independent_of_arrival_order(rosterd, amqp, db):
    # one connection: batches run one after the other, so each organisation
    # sees its messages in its order (apart from waiting ones, which come
    # back later: another order, still an order)
    rosterd(retry_base_ms=50, max_retries=6, postgres={"connections": 1})
    perms = orders()
    orgs = ["ord%02d" % i for i in range(len(perms))]
    setup = []
    for org in orgs:
        setup += [make_msg("org.configured", {"name": org, "sync_contacts": True}, org=org, at=T),
                  make_msg("offer.upserted", {"offer_id": "O1", "title": "Reassign"}, org=org, at=T),
                  make_msg("offer.upserted", {"offer_id": "O2", "title": "Retain",
                                              "email_change": "retain"}, org=org, at=T),
                  make_msg("contact.upserted", {"email": CARL, "first_name": "Carl",
                                                "language": "de"}, org=org, at=T)]
    amqp.publish_many(setup)
    wait_messages(db, len(setup), timeout=60)
    carl = dict(db.query("SELECT org, contact_id FROM report.contacts"))
    stream = []
    for org, perm in zip(orgs, perms):
        msgs = booking_messages(carl[org])
        stream += [make_msg(msgs[i][0], msgs[i][1], org=org, at=msgs[i][2], id=str(uuid.uuid4()))
                   for i in perm]
    amqp.publish_many(stream)
    wait_messages(db, len(setup) + len(stream), timeout=120)
    assert db.query1("SELECT count(*) FROM report.messages WHERE outcome NOT IN ('applied', 'stale')") == 0

    ref = end_state(db, orgs[0])
    # the orders must include the hard cases, or the test proves little
    msgs = booking_messages("x")
    pos = lambda perm, k: perm.index(k)
    key = {(m[1]["booking_id"], m[1]["version"]): i for i, m in enumerate(msgs)}
    hard = {
        "attendee.updated before booking.created": lambda o: pos(o, key["B3", 2]) < pos(o, key["B3", 1]),
        "booking.updated before booking.created": lambda o: pos(o, key["B1", 2]) < pos(o, key["B1", 1]),
        "cancelled before created": lambda o: pos(o, key["B1", 5]) < pos(o, key["B1", 1]),
        "cancelled after a newer update": lambda o: pos(o, key["B3", 3]) > pos(o, key["B3", 4]),
        "older phone of anna last": lambda o: pos(o, key["B2", 3]) > pos(o, key["B1", 4]),
        "attendee.updated after newer list": lambda o: pos(o, key["B1", 3]) > pos(o, key["B1", 4]),
    }
    for what, seen in hard.items():
        assert any(seen(o) for o in perms[1:]), what

    diffs = []
    for org, perm in zip(orgs[1:], perms[1:]):
        got = end_state(db, org)
        for view in ref:
            if got[view] != ref[view]:
                diffs.append("%s (order %s) %s:\n  got  %s\n  want %s" % (
                    org, perm, view, sorted(set(got[view]) - set(ref[view])),
                    sorted(set(ref[view]) - set(got[view]))))
    assert not diffs, "\n".join(diffs)

    # the reference is what the rules say (so that equality is not vacuous)
    assert ref["bookings"] == [
        ("B1", "O1", "B1-2", "cancelled", 5, ANNA, ANNA, "by_email", 190, None),
        ("B2", "O1", "B2-3", "confirmed", 3, BOB, BOB, "by_email", None, None),
        ("B3", "O2", "B3", "confirmed", 4, CARL, CARL, "prefilled", None, "EUR")]
    assert ref["attendees"] == [
        ("B1", "A1", ANNA, ANNA, "Anna", "Muster", "adult", 100, "cancelled", "by_email"),
        ("B1", "A2", BOB, BOB, "Bobby", None, "child", 90, "cancelled", "by_email"),
        ("B1", "A3", CARL, CARL, "Carl", None, None, 100, "cancelled", "by_email"),
        ("B2", "A1", DORA, DORA, "Dora", None, None, None, "confirmed", "by_email"),
        ("B2", "A2", ANNA, ANNA, "Anna", "Muster", "guest", None, "confirmed", "by_email"),
        ("B2", "A3", ERIK, ERIK, "Erik", None, None, None, "confirmed", "by_email"),
        ("B3", "A1", ERIK, ERIK, "Erik", None, "vip", None, "confirmed", "by_email"),
        ("B3", "A2", None, None, "Nomail", None, None, None, "confirmed", "unassigned_no_email"),
        ("B3", "A3", None, "erik(at)example.org", "Typo", None, None, None, "confirmed",
         "unassigned_invalid_email")]
    contacts = {c[0]: c for c in ref["contacts"]}
    assert sorted(contacts) == [ANNA, BOB, CARL, DORA, ERIK]
    assert contacts[ANNA][1:6] == ("Anna", "Muster", None, None, "222")   # B1 v4 is the latest
    assert (contacts[BOB][1], contacts[BOB][8]) == ("Bobby", "Bern")
    assert (contacts[CARL][1], contacts[CARL][4]) == ("Carl", "de")
    assert contacts[ERIK][11] == '{"size": 42}'
