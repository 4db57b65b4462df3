"""test_ledger.py - Step 3: the ledger (SPEC 3 invoice.issued,
invoice.cancelled, payment.recorded, transaction.recorded; 4.6; 4.9
waiting; 9; report.invoices, report.transactions, report.balances,
report.key_figures; rosterctl ledger check). docs/ledger.md lists which
test covers which rule.

The rules live in SQL (schema/migrations/0003_ledger.sql), so the "unit"
tables (the invoice state machine, the key-figure arithmetic, contacts and
bookings) drive rd.apply(org, id, type, at_ms, data, final, NULL) directly
on one migrated database, one organisation per case, with payloads shaped
as the C normaliser emits them. The integration tests go through RabbitMQ
and rosterd: every case of the issue, waiting and giving up, and a seeded
random stream of 2,000 ledger messages in shuffled order whose expected
balances, invoices and key figures this file computes on its own.
"""
import collections
import json
import os
import random
import time
import uuid

import psycopg2
import pytest

import harness
from harness import Database, make_msg, wait_for, write_config

T0 = 1_700_000_000_000


# --- direct rd.apply ---------------------------------------------------------------

class Ledger:
    """A migrated database and rd.apply() on it; one fresh org per case."""

    def __init__(self, db, cfg):
        self.db = db
        self.cfg = cfg
        self.n = 0

    def org(self):
        self.n += 1
        org = "l%d-%s" % (self.n, uuid.uuid4().hex[:6])
        self.ok(org, "org.configured", {"name": org})
        self.ok(org, "offer.upserted", {"offer_id": "O1", "title": "Course"})
        return org

    def apply(self, org, type, data, id=None, final=False):
        """(outcome, reason) of one message."""
        id = id or uuid.uuid4().hex
        row = self.db.query("SELECT outcome, reason FROM rd.apply(%s, %s, %s, %s, %s::jsonb, %s, NULL)",
                            org, id, type, T0, json.dumps(data), final)
        return row[0]

    def ok(self, org, type, data, id=None):
        id = id or uuid.uuid4().hex
        out = self.apply(org, type, data, id=id)
        assert out == ("applied", None), (type, data, out)
        return id

    def contact(self, org, email=None):
        p = {"first_name": "P"}
        if email:
            p["email"] = email
        mid = self.ok(org, "contact.upserted", p)
        return self.db.query1("SELECT contact_id::text FROM rd.contacts WHERE org = %s AND created_by = %s",
                              org, mid)

    def invoice(self, org, iid="I1"):
        rows = self.db.querydicts("SELECT * FROM report.invoices WHERE org = %s AND invoice_id = %s",
                                  org, iid)
        return rows[0] if rows else None

    def balances(self, org):
        return {(r[0], r[1]): r[2] for r in self.db.query(
            "SELECT contact_id, currency, balance FROM report.balances WHERE org = %s", org)}

    def key_figures(self, org):
        return {(r[0], r[1]): tuple(r[2:]) for r in self.db.query(
            "SELECT contact_id, currency, revenue, invoices, outstanding FROM report.key_figures "
            "WHERE org = %s", org)}

    def check(self, org=None, json_out=False):
        args = (["--json"] if json_out else []) + ["ledger", "check"] + (["--org", org] if org else [])
        return harness.rosterctl(self.cfg, *args)


@pytest.fixture(scope="module")
def ledger(servers, tmp_path_factory):
    servers.ensure_up()
    db = Database(servers, "ledger")
    cfg = str(tmp_path_factory.mktemp("ledger") / "rosterd.conf")
    write_config(cfg, {"daemon": {"instance": "ledger"}, "amqp": {"url": servers.amqp_url},
                       "postgres": {"conninfo": db.conninfo}})
    harness.rosterctl(cfg, "migrate", check=True)
    yield Ledger(db, cfg)
    db.drop()


def issue(amount=10000, currency="CHF", iid="I1", **kw):
    return ("invoice.issued", dict({"invoice_id": iid, "amount": amount, "currency": currency}, **kw))


def pay(amount, currency="CHF", pid=None, iid="I1"):
    return ("payment.recorded", {"payment_id": pid or "P-" + uuid.uuid4().hex[:8], "invoice_id": iid,
                                 "amount": amount, "currency": currency})


def cancel(iid="I1"):
    return ("invoice.cancelled", {"invoice_id": iid})


A = ("applied", None)


def rej(text):
    return ("rejected", text)


RETRY = ("retry", None)

# --- the invoice state machine -----------------------------------------------------

# Each row: the messages for one invoice I1 (CHF) of one contact, in order
# (a message given as (id, message) is sent with that id: the same message
# coming back from the retry queue), the outcome of each (a rejection's
# reason must contain the text), then the invoice afterwards (status, paid,
# open; None: no invoice), the contact's CHF balance (None: no ledger row)
# and key figures (revenue, invoices, outstanding).
STATE_MACHINE = [
    ("issued", [issue()], [A], ("open", 0, 10000), -10000, (10000, 1, 10000)),
    ("partly_paid", [issue(), pay(4000)], [A, A], ("partial", 4000, 6000), -6000, (10000, 1, 6000)),
    ("paid_exactly", [issue(), pay(10000)], [A, A], ("paid", 10000, 0), 0, (10000, 1, 0)),
    ("two_partials_make_paid", [issue(), pay(4000), pay(6000)], [A, A, A], ("paid", 10000, 0), 0,
     (10000, 1, 0)),
    ("overpaid_at_once", [issue(), pay(12500)], [A, A], ("paid", 12500, 0), 2500, (10000, 1, 0)),
    ("overpaid_after_paid", [issue(), pay(10000), pay(1)], [A, A, A], ("paid", 10001, 0), 1,
     (10000, 1, 0)),
    ("cancelled_open", [issue(), cancel()], [A, A], ("cancelled", 0, 10000), 0, (0, 0, 0)),
    ("cancelled_partly_paid_credits_full_amount", [issue(), pay(4000), cancel()], [A, A, A],
     ("cancelled", 4000, 6000), 4000, (0, 0, 0)),
    ("cancelled_paid", [issue(), pay(10000), cancel()], [A, A, A], ("cancelled", 10000, 0), 10000,
     (0, 0, 0)),
    ("payment_on_cancelled_rejected", [issue(), cancel(), pay(100)],
     [A, A, rej("payment on cancelled invoice I1")], ("cancelled", 0, 10000), 0, (0, 0, 0)),
    ("cancelled_twice_rejected", [issue(), cancel(), cancel()],
     [A, A, rej("invoice I1 already cancelled")], ("cancelled", 0, 10000), 0, (0, 0, 0)),
    ("issued_twice_rejected", [issue(), issue(amount=777)],
     [A, rej("invoice I1 already issued")], ("open", 0, 10000), -10000, (10000, 1, 10000)),
    ("payment_currency_mismatch", [issue(), pay(100, "EUR")],
     [A, rej("currency mismatch: payment")], ("open", 0, 10000), -10000, (10000, 1, 10000)),
    ("payment_before_invoice_waits", [("M1", pay(3000, pid="P1")), issue(), ("M1", pay(3000, pid="P1"))],
     [RETRY, A, A], ("partial", 3000, 7000), -7000, (10000, 1, 7000)),
    ("cancel_before_invoice_waits", [("M1", cancel()), issue(), ("M1", cancel())], [RETRY, A, A],
     ("cancelled", 0, 10000), 0, (0, 0, 0)),
    ("payment_id_twice_rejected", [issue(), pay(4000, pid="P1"), pay(4000, pid="P1")],
     [A, A, rej("payment P1 already recorded")], ("partial", 4000, 6000), -6000, (10000, 1, 6000)),
    ("invoice_amount_zero", [issue(amount=0)], [rej("invoice amount must be positive")], None,
     None, None),
    ("invoice_amount_negative", [issue(amount=-5)], [rej("invoice amount must be positive")],
     None, None, None),
    ("payment_amount_zero", [issue(), pay(0)], [A, rej("payment amount must be positive")],
     ("open", 0, 10000), -10000, (10000, 1, 10000)),
    ("payment_amount_negative", [issue(), pay(-100)], [A, rej("payment amount must be positive")],
     ("open", 0, 10000), -10000, (10000, 1, 10000)),
    ("unknown_currency", [issue(currency="XYZ")],
     [rej("unknown currency code XYZ (not an active ISO 4217 code)")], None, None, None),
    ("no_currency_xxx", [issue(currency="XXX")], [rej("unknown currency code XXX")], None, None,
     None),
    ("payment_unknown_currency", [issue(), pay(5, "ABC")], [A, rej("unknown currency code ABC")],
     ("open", 0, 10000), -10000, (10000, 1, 10000)),
    ("vat_over_100_percent", [issue(vat_bp=10001)], [rej("vat_bp must be between 0 and 10000")],
     None, None, None),
    ("amount_not_an_integer", [issue(amount=12.5)], [rej("data.amount: want an integer")], None,
     None, None),
    ("neither_booking_nor_contact", [issue(contact_id=None)],
     [rej("booking_id or contact_id is required")], None, None, None),
]


@pytest.mark.parametrize("msgs,outcomes,inv,balance,kf",
                         [pytest.param(*row[1:], id=row[0]) for row in STATE_MACHINE])
def test_invoice_state_machine(ledger, msgs, outcomes, inv, balance, kf):
    org = ledger.org()
    cid = ledger.contact(org, "anna@example.org")
    got = []
    for m in msgs:
        mid, (type, data) = m if isinstance(m[0], str) and m[0].startswith("M") else (None, m)
        if type == "invoice.issued":
            data = {k: v for k, v in dict(dict(contact_id=cid), **data).items() if v is not None}
        got.append(ledger.apply(org, type, data, id=mid and org + mid))
    assert [o for o, _ in got] == [o for o, _ in outcomes]
    for (o, reason), (_, want) in zip(got, outcomes):
        if want:
            assert want in reason
    row = ledger.invoice(org)
    assert (row and (row["status"], row["paid"], row["open"])) == (inv or None)
    if row:
        assert row["contact_id"] == cid and row["amount"] == 10000
    assert ledger.balances(org).get((cid, "CHF")) == balance
    assert ledger.key_figures(org).get((cid, "CHF")) == kf
    # the ledger adds up whatever happened
    r = ledger.check(org)
    assert r.returncode == 0, r.stdout + r.stderr


def test_waiting_gives_up_when_final(ledger):
    org = ledger.org()
    cid = ledger.contact(org, "anna@example.org")
    assert ledger.apply(org, "payment.recorded", pay(5)[1], final=True) == \
        ("rejected", "gave up waiting: invoice I1 not yet seen")
    assert ledger.apply(org, "invoice.cancelled", {"invoice_id": "I7"}, final=True) == \
        ("rejected", "gave up waiting: invoice I7 not yet seen")
    other = str(uuid.uuid4())
    assert ledger.apply(org, "invoice.issued", dict(issue()[1], contact_id=other), final=True) == \
        ("rejected", "gave up waiting: contact %s not yet seen" % other)
    assert ledger.apply(org, "transaction.recorded", {
        "transaction_id": "T1", "contact_id": other, "amount": 5, "currency": "CHF", "text": "x"},
        final=True) == ("rejected", "gave up waiting: contact %s not yet seen" % other)
    assert ledger.balances(org) == {} and cid


# --- key figures ---------------------------------------------------------------------

# Each row: one contact's invoices (id, amount, currency, payments, cancelled)
# and manual transactions (amount, currency), then per currency the
# expected (revenue, invoices, outstanding, balance). Integer arithmetic:
# the large row sums beyond 2^53 (where a float would round).
KEY_FIGURES = [
    ("one_open", [("I1", 1000, "CHF", [], False)], [], {"CHF": (1000, 1, 1000, -1000)}),
    ("two_open", [("I1", 1000, "CHF", [], False), ("I2", 2500, "CHF", [], False)], [],
     {"CHF": (3500, 2, 3500, -3500)}),
    ("partial_counts_what_is_open", [("I1", 1000, "CHF", [400], False)], [],
     {"CHF": (1000, 1, 600, -600)}),
    ("overpaid_does_not_offset_another", [("I1", 1000, "CHF", [1500], False),
                                          ("I2", 1000, "CHF", [], False)], [],
     {"CHF": (2000, 2, 1000, -500)}),
    ("cancelled_left_out", [("I1", 1000, "CHF", [300], True), ("I2", 800, "CHF", [], False)], [],
     {"CHF": (800, 1, 800, -500)}),
    ("only_cancelled", [("I1", 1000, "CHF", [300], True)], [], {"CHF": (0, 0, 0, 300)}),
    ("per_currency", [("I1", 1000, "CHF", [400], False), ("I2", 2500, "CHF", [3000], False),
                      ("I3", 700, "EUR", [], True), ("I4", 900, "EUR", [900], False),
                      ("I5", 500, "JPY", [100, 100], False)], [(-250, "JPY")],
     {"CHF": (3500, 2, 600, -100), "EUR": (900, 1, 0, 0), "JPY": (500, 1, 300, -550)}),
    ("manual_only", [], [(500, "EUR"), (-200, "EUR")], {"EUR": (0, 0, 0, 300)}),
    ("manual_with_invoices", [("I1", 1000, "CHF", [], False)], [(-150, "CHF"), (1150, "CHF")],
     {"CHF": (1000, 1, 1000, 0)}),
    ("large", [("I1", 4_000_000_000_000_000_001, "CHF", [1], False),
               ("I2", 4_000_000_000_000_000_003, "CHF", [], False)], [],
     {"CHF": (8_000_000_000_000_000_004, 2, 8_000_000_000_000_000_003,
              -8_000_000_000_000_000_003)}),
]


@pytest.mark.parametrize("invoices,manual,expect",
                         [pytest.param(*row[1:], id=row[0]) for row in KEY_FIGURES])
def test_key_figures(ledger, invoices, manual, expect):
    org = ledger.org()
    cid = ledger.contact(org, "anna@example.org")
    other = ledger.contact(org, "bob@example.org")
    # another contact's invoice must not count
    ledger.ok(org, *issue(99, "CHF", "X1", contact_id=other))
    for iid, amount, cur, payments, cancelled in invoices:
        ledger.ok(org, *issue(amount, cur, iid, contact_id=cid))
        for p in payments:
            ledger.ok(org, *pay(p, cur, iid=iid))
        if cancelled:
            ledger.ok(org, *cancel(iid))
    for i, (amount, cur) in enumerate(manual):
        ledger.ok(org, "transaction.recorded", {"transaction_id": "T%d" % i, "contact_id": cid,
                                                "amount": amount, "currency": cur, "text": "fee"})
    kf = {cur: v for (c, cur), v in ledger.key_figures(org).items() if c == cid}
    bal = {cur: v for (c, cur), v in ledger.balances(org).items() if c == cid}
    assert {cur: kf[cur] + (bal[cur],) for cur in kf} == expect
    assert set(bal) == set(expect)
    assert ledger.key_figures(org)[(other, "CHF")] == (99, 1, 99)
    assert ledger.check(org).returncode == 0


# --- contacts and bookings -----------------------------------------------------------

def booking(bid, email=None, version=1):
    booker = {"first_name": "Booker"}
    if email:
        booker["email"] = email
    return {"booking_id": bid, "version": version, "offer_id": "O1", "booker": booker}


def test_invoice_belongs_to_the_booker(ledger):
    org = ledger.org()
    anna = ledger.contact(org, "anna@example.org")
    bob = ledger.contact(org, "bob@example.org")
    ledger.ok(org, "booking.created", booking("B1", "anna@example.org"))
    ledger.ok(org, *issue(iid="I1", booking_id="B1"))
    assert ledger.invoice(org, "I1")["contact_id"] == anna
    assert ledger.invoice(org, "I1")["booking_id"] == "B1"
    # a contact_id given as well does not move it away from the booker
    ledger.ok(org, *issue(iid="I2", booking_id="B1", contact_id=bob))
    assert ledger.invoice(org, "I2")["contact_id"] == anna
    summary = ledger.db.query1("SELECT summary FROM report.activity WHERE org = %s AND kind = 'invoice' "
                               "AND summary LIKE %s", org, "%I2%")
    assert "belongs to the booker" in summary
    assert ledger.balances(org) == {(anna, "CHF"): -20000}


def test_invoice_for_booking_not_yet_seen_waits(ledger):
    org = ledger.org()
    anna = ledger.contact(org, "anna@example.org")
    assert ledger.apply(org, *issue(booking_id="B1"), id=org + "m1") == \
        ("retry", "booking B1 not yet seen")
    # a booking known only from attendee.updated has no booker yet
    ledger.ok(org, "attendee.updated", {"booking_id": "B1", "version": 1,
                                        "attendee": {"attendee_id": "A1", "first_name": "X"}})
    assert ledger.apply(org, *issue(booking_id="B1"), id=org + "m1")[0] == "retry"
    ledger.ok(org, "booking.updated", booking("B1", "anna@example.org", version=2))
    assert ledger.apply(org, *issue(booking_id="B1"), id=org + "m1") == A
    assert ledger.invoice(org)["contact_id"] == anna
    assert ledger.apply(org, *issue(iid="I2", booking_id="B9"), final=True) == \
        ("rejected", "gave up waiting: booking B9 not yet seen")


def test_invoice_for_booker_without_contact(ledger):
    org = ledger.org()
    bob = ledger.contact(org, "bob@example.org")
    ledger.ok(org, "booking.created", booking("B1"))  # booker without email: no contact
    out = ledger.apply(org, *issue(booking_id="B1"))
    assert out[0] == "rejected"
    assert "booking B1: its booker has no contact (unassigned_no_email)" in out[1]
    assert ledger.invoice(org) is None
    # with a contact_id as well, the invoice goes to that contact
    ledger.ok(org, *issue(booking_id="B1", contact_id=bob))
    assert ledger.invoice(org)["contact_id"] == bob


def test_contact_of_another_org_is_unknown(ledger):
    org, other = ledger.org(), ledger.org()
    foreign = ledger.contact(other, "anna@example.org")
    assert ledger.apply(org, *issue(contact_id=foreign)) == \
        ("retry", "contact %s not yet seen" % foreign)
    assert ledger.apply(org, "transaction.recorded", {
        "transaction_id": "T1", "contact_id": foreign, "amount": 5, "currency": "CHF",
        "text": "x"})[0] == "retry"
    # and an invoice id of another org is another invoice
    ledger.ok(other, *issue(contact_id=foreign))
    assert ledger.apply(org, *pay(5))[0] == "retry"
    assert ledger.balances(org) == {}


def test_tombstone_contact_resolves_to_keeping_contact(ledger):
    org = ledger.org()
    keep = ledger.contact(org, "anna@example.org")
    drop = ledger.contact(org, "anna2@example.org")
    ledger.db.execute("UPDATE rd.contacts SET merged_into = %s WHERE org = %s AND contact_id = %s",
                      keep, org, drop)
    ledger.ok(org, *issue(contact_id=drop))
    ledger.ok(org, "transaction.recorded", {"transaction_id": "T1", "contact_id": drop,
                                            "amount": -5, "currency": "CHF", "text": "fee"})
    assert ledger.invoice(org)["contact_id"] == keep
    assert ledger.balances(org) == {(keep, "CHF"): -10005}


def test_manual_transactions(ledger):
    org = ledger.org()
    cid = ledger.contact(org, "anna@example.org")
    mid = ledger.ok(org, "transaction.recorded", {
        "transaction_id": "T1", "contact_id": cid, "amount": -1500, "currency": "EUR",
        "text": "Late fee", "date": "2024-03-01", "vat_bp": 810})
    ledger.ok(org, "transaction.recorded", {
        "transaction_id": "T2", "contact_id": cid, "amount": 400, "currency": "EUR",
        "text": "Goodwill"})
    rows = ledger.db.querydicts("SELECT * FROM rd.transactions WHERE org = %s ORDER BY transaction_id",
                                org)
    assert [(r["transaction_id"], r["kind"], r["amount"], r["currency"], r["text"], r["invoice_id"])
            for r in rows] == [("T1", "manual", -1500, "EUR", "Late fee", None),
                               ("T2", "manual", 400, "EUR", "Goodwill", None)]
    assert (str(rows[0]["date"]), rows[0]["vat_bp"], rows[0]["message_id"]) == ("2024-03-01", 810, mid)
    assert str(rows[1]["date"]) == "2023-11-14"  # the message's day when no date is given
    assert ledger.balances(org) == {(cid, "EUR"): -1100}
    assert ledger.key_figures(org) == {(cid, "EUR"): (0, 0, 0)}
    for data, reason in [
            ({"transaction_id": "T1", "amount": 1}, "transaction T1 already recorded"),
            ({"transaction_id": "inv:I1", "amount": 1}, "reserved"),
            ({"transaction_id": "T3", "amount": 1, "currency": "EUX"}, "unknown currency code EUX"),
            ({"transaction_id": "T4", "amount": 1, "date": "2024-02-30"}, "not a calendar date")]:
        d = dict({"contact_id": cid, "currency": "EUR", "text": "x"}, **data)
        out = ledger.apply(org, "transaction.recorded", d)
        assert out[0] == "rejected" and reason in out[1], (data, out)
    assert ledger.balances(org) == {(cid, "EUR"): -1100}


def test_activity_and_message_ids(ledger):
    org = ledger.org()
    cid = ledger.contact(org, "anna@example.org")
    m1 = ledger.ok(org, *issue(number="2024-17", due="2024-05-31", contact_id=cid))
    m2 = ledger.ok(org, *pay(12000, pid="P1"))
    m3 = ledger.ok(org, *cancel())
    m4 = ledger.ok(org, "transaction.recorded", {"transaction_id": "T1", "contact_id": cid,
                                                 "amount": -2000, "currency": "CHF",
                                                 "text": "Anna Muster's refund"})
    tx = ledger.db.query("SELECT transaction_id, kind, amount, invoice_id, message_id FROM "
                         "report.transactions WHERE org = %s ORDER BY at, transaction_id", org)
    assert sorted(tx) == sorted([("inv:I1", "invoice", -10000, "I1", m1),
                                 ("pay:P1", "payment", 12000, "I1", m2),
                                 ("cxl:I1", "cancellation", 10000, "I1", m3),
                                 ("T1", "manual", -2000, None, m4)])
    act = {r[0]: (r[1], r[2]) for r in ledger.db.query(
        "SELECT message_id, kind, summary FROM report.activity WHERE org = %s AND contact_id = %s "
        "AND kind IN ('invoice', 'payment', 'invoice.cancelled', 'transaction')", org, cid)}
    assert act[m1] == ("invoice", "invoice 2024-17 (I1) issued: CHF 100.00, due 2024-05-31")
    assert act[m2][0] == "payment" and "CHF 120.00" in act[m2][1] and "overpaid by CHF 20.00" in act[m2][1]
    assert act[m3] == ("invoice.cancelled",
                       "invoice 2024-17 (I1) cancelled: CHF 100.00 credited "
                       "(CHF 120.00 paid on it stays as credit)")
    assert act[m4] == ("transaction", "manual transaction T1: CHF -20.00 on 2023-11-14")
    assert "Anna" not in " ".join(s for _, s in act.values())  # no personal data
    # -100.00 + 120.00 + 100.00 - 20.00
    assert ledger.balances(org) == {(cid, "CHF"): 10000}


# --- append-only -----------------------------------------------------------------------

def test_append_only_enforced_by_the_database(ledger):
    org = ledger.org()
    cid = ledger.contact(org, "anna@example.org")
    keep = ledger.contact(org, "anna.k@example.org")
    ledger.ok(org, *issue(contact_id=cid))
    ledger.ok(org, *pay(4000, pid="P1"))
    ledger.ok(org, "transaction.recorded", {"transaction_id": "T1", "contact_id": cid,
                                            "amount": 5, "currency": "CHF", "text": "x"})
    conn = ledger.db.connect(as_owner=True)  # the daemon's role, owner of every table
    try:
        cur = conn.cursor()

        def refused(sql, *args):
            with pytest.raises(psycopg2.Error) as e:
                cur.execute(sql, args)
            assert e.value.pgcode == "RDAPP", e.value
            return str(e.value)

        msg = refused("UPDATE rd.transactions SET amount = amount + 1 WHERE org = %s", org)
        assert "append-only: UPDATE refused" in msg
        assert "DELETE refused" in refused("DELETE FROM rd.transactions WHERE org = %s", org)
        refused("TRUNCATE rd.transactions CASCADE")
        refused("UPDATE rd.transactions SET text = 'y' WHERE org = %s AND transaction_id = 'T1'", org)
        refused("UPDATE rd.payments SET amount = 1 WHERE org = %s", org)
        refused("DELETE FROM rd.payments WHERE org = %s", org)
        assert "amount" in refused("UPDATE rd.invoices SET amount = 1 WHERE org = %s", org)
        refused("DELETE FROM rd.invoices WHERE org = %s", org)
        refused("UPDATE rd.invoices SET paid = 0, status = 'open' WHERE org = %s", org)
        # moving to another contact needs the merge's setting ...
        refused("UPDATE rd.transactions SET contact_id = %s WHERE org = %s", keep, org)
        refused("UPDATE rd.invoices SET contact_id = %s WHERE org = %s", keep, org)
        # ... and with it nothing else may change
        cur.execute("BEGIN")
        cur.execute("SELECT set_config('rd.ledger_move', 'on', true)")
        refused("UPDATE rd.transactions SET contact_id = %s, amount = 7 WHERE org = %s", keep, org)
        cur.execute("ROLLBACK")
        cur.execute("BEGIN")
        cur.execute("SELECT set_config('rd.ledger_move', 'on', true)")
        cur.execute("UPDATE rd.transactions SET contact_id = %s WHERE org = %s AND transaction_id = 'T1'",
                    (keep, org))
        assert cur.rowcount == 1
        cur.execute("ROLLBACK")
    finally:
        conn.close()
    assert ledger.balances(org) == {(cid, "CHF"): -5995}


def test_merge_moves_the_ledger_without_changing_sums(ledger):
    org = ledger.org()
    keep = ledger.contact(org, "anna@example.org")
    drop = ledger.contact(org, "anna2@example.org")
    ledger.ok(org, *issue(contact_id=drop))
    ledger.ok(org, *pay(2500))
    ledger.ok(org, *issue(iid="I2", contact_id=keep, amount=100))
    ledger.ok(org, "transaction.recorded", {"transaction_id": "T1", "contact_id": drop,
                                            "amount": 5, "currency": "EUR", "text": "x"})
    before = sum(ledger.balances(org).values())
    # a tombstone still holding ledger rows is a mismatch
    ledger.db.execute("UPDATE rd.contacts SET merged_into = %s WHERE org = %s AND contact_id = %s",
                      keep, org, drop)
    r = ledger.check(org)
    assert r.returncode == 1 and "MISMATCH contact" in r.stdout
    conn = ledger.db.connect(as_owner=True)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT rd.ledger_move_contact(%s, %s, %s)", (org, drop, keep))
            assert cur.fetchone()[0] == 3   # inv:I1, pay:..., T1
            cur.execute("SELECT current_setting('rd.ledger_move', true)")
            assert cur.fetchone()[0] in (None, "", "off")
    finally:
        conn.close()
    assert ledger.balances(org) == {(keep, "CHF"): -7600, (keep, "EUR"): 5}
    assert sum(ledger.balances(org).values()) == before
    assert ledger.invoice(org)["contact_id"] == keep
    r = ledger.check(org)
    assert r.returncode == 0, r.stdout


# --- the ledger check ------------------------------------------------------------------

def test_ledger_check_finds_corruption(ledger):
    org, other = ledger.org(), ledger.org()
    for o in (org, other):
        cid = ledger.contact(o, "anna@example.org")
        ledger.ok(o, *issue(contact_id=cid))
        ledger.ok(o, *pay(3000, pid="P1"))
        ledger.ok(o, *issue(iid="I2", contact_id=cid, currency="EUR"))
        ledger.ok(o, *cancel("I2"))
    r = ledger.check(org)
    assert r.returncode == 0 and r.stdout.startswith("ledger check (org %s): ok" % org), r.stdout
    assert "2 currencies, 4 transactions, 2 invoices, 1 payment" in r.stdout
    doc = json.loads(ledger.check(org, json_out=True).stdout)
    assert doc["ok"] is True and doc["mismatches"] == []
    assert {(t["currency"], t["balance"]) for t in doc["totals"]} == {("CHF", -7000), ("EUR", 0)}

    db = ledger.db
    # as the superuser: switch the guard off, change a payment's ledger row
    db.execute("ALTER TABLE rd.transactions DISABLE TRIGGER transactions_append_only")
    try:
        db.execute("UPDATE rd.transactions SET amount = 2999 WHERE org = %s AND transaction_id = 'pay:P1'",
                   org)
        db.execute("DELETE FROM rd.transactions WHERE org = %s AND transaction_id = 'cxl:I2'", org)
    finally:
        db.execute("ALTER TABLE rd.transactions ENABLE TRIGGER transactions_append_only")
    db.execute("ALTER TABLE rd.invoices DISABLE TRIGGER invoices_guard")
    try:
        db.execute("UPDATE rd.invoices SET paid = 3500, status = 'partial' "
                   "WHERE org = %s AND invoice_id = 'I1'", org)
    finally:
        db.execute("ALTER TABLE rd.invoices ENABLE TRIGGER invoices_guard")
    r = ledger.check(org)
    assert r.returncode == 1, r.stdout
    lines = r.stdout.splitlines()
    mism = [l for l in lines if l.startswith("MISMATCH ")]
    checks = sorted(l.split()[1] for l in mism)
    assert checks == ["cancellation_transaction", "invoice_paid", "payment_transaction",
                      "transactions", "transactions"], r.stdout
    assert any("invoice_paid" in l and "invoice I1: expected paid = sum of its 1 payments = 3000, "
               "found 3500" in l for l in mism), mism
    assert lines[-1].startswith("ledger check (org %s): FAILED, 5 mismatches" % org)
    doc = json.loads(ledger.check(org, json_out=True).stdout)
    assert doc["ok"] is False and len(doc["mismatches"]) == 5
    assert {"check", "org", "currency", "subject", "expected", "found"} == set(doc["mismatches"][0])
    # --org limits the check; without it every organisation is checked
    assert ledger.check(other).returncode == 0
    assert ledger.check().returncode == 1
    # usage errors are not "ok"
    assert harness.rosterctl(ledger.cfg, "ledger").returncode == 2
    assert harness.rosterctl(ledger.cfg, "ledger", "check", "--bogus").returncode == 2


# --- through RabbitMQ -------------------------------------------------------------------

def settle(db, msgs, timeout=60):
    """Wait until every message of msgs has its report.messages row; return
    {id: (outcome, reason)}."""
    ids = sorted({m["id"] for m in msgs})

    def done():
        rows = db.query("SELECT message_id, outcome, reason FROM report.messages "
                        "WHERE message_id = ANY(%s)", ids)
        return {r[0]: (r[1], r[2]) for r in rows} if len(rows) == len(ids) else None
    return wait_for(done, timeout, 0.1, "%d messages settled" % len(ids))


def contact_ids(db, org):
    return dict(db.query("SELECT email, contact_id FROM report.contacts WHERE org = %s", org))


@pytest.mark.timeout(120)
def test_ledger_cases_through_rabbitmq(rosterd, publish, db, amqp):
    rosterd(retry_base_ms=50, max_retries=4)
    org = "acme"

    def msg(type, data):
        return make_msg(type, data, org=org)

    def send(*msgs):
        for m in msgs:
            publish(m)
        return settle(db, msgs)

    setup = [msg("org.configured", {"name": "Acme"}), msg("offer.upserted", {"offer_id": "O1", "title": "C"}),
             msg("contact.upserted", {"email": "anna@example.org", "first_name": "Anna"}),
             msg("contact.upserted", {"email": "bob@example.org", "first_name": "Bob"})]
    assert set(send(*setup).values()) == {A}
    ids = contact_ids(db, org)
    anna, bob = ids["anna@example.org"], ids["bob@example.org"]
    b1 = msg("booking.created", {"booking_id": "B1", "version": 1, "offer_id": "O1",
                                 "booker": {"email": "ANNA@example.org "}})
    b2 = msg("booking.created", {"booking_id": "B2", "version": 1, "offer_id": "O1",
                                 "booker": {"first_name": "No Email"}})
    assert set(send(b1, b2).values()) == {A}

    i1 = msg("invoice.issued", {"invoice_id": "I1", "amount": 10000, "currency": "CHF",
                                "booking_id": "B1", "number": "2024-001", "vat_bp": 810,
                                "due": "2024-06-30"})
    i2 = msg("invoice.issued", {"invoice_id": "I2", "amount": 5000, "currency": "EUR",
                                "contact_id": bob.upper()})
    i3 = msg("invoice.issued", {"invoice_id": "I3", "amount": 3000, "currency": "CHF",
                                "contact_id": bob})
    t1 = msg("transaction.recorded", {"transaction_id": "T1", "contact_id": bob, "amount": -1500,
                                      "currency": "CHF", "text": "Late fee", "date": "2024-03-01",
                                      "vat_bp": 0})
    t2 = msg("transaction.recorded", {"transaction_id": "T2", "contact_id": anna, "amount": 250,
                                      "currency": "JPY", "text": "Voucher"})
    r_zero = msg("invoice.issued", {"invoice_id": "I4", "amount": 0, "currency": "CHF",
                                    "contact_id": anna})
    r_xyz = msg("invoice.issued", {"invoice_id": "I5", "amount": 100, "currency": "XYZ",
                                   "contact_id": anna})
    r_nobody = msg("invoice.issued", {"invoice_id": "I6", "amount": 100, "currency": "CHF",
                                      "booking_id": "B2"})
    r_lower = msg("invoice.issued", {"invoice_id": "I7", "amount": 100, "currency": "chf",
                                     "contact_id": anna})
    out = send(i1, i2, i3, t1, t2, r_zero, r_xyz, r_nobody, r_lower)
    assert [out[m["id"]] for m in (i1, i2, i3, t1, t2)] == [A] * 5

    p1 = msg("payment.recorded", {"payment_id": "P1", "invoice_id": "I1", "amount": 4000,
                                  "currency": "CHF", "method": "card"})
    p3 = msg("payment.recorded", {"payment_id": "P3", "invoice_id": "I2", "amount": 7000,
                                  "currency": "EUR"})
    p4 = msg("payment.recorded", {"payment_id": "P4", "invoice_id": "I3", "amount": 1000,
                                  "currency": "CHF"})
    r_eur = msg("payment.recorded", {"payment_id": "P9", "invoice_id": "I1", "amount": 100,
                                     "currency": "EUR"})
    r_neg = msg("payment.recorded", {"payment_id": "P10", "invoice_id": "I2", "amount": -5,
                                     "currency": "EUR"})
    out.update(send(p1, p3, p4, r_eur, r_neg))
    p2 = msg("payment.recorded", {"payment_id": "P2", "invoice_id": "I1", "amount": 6000,
                                  "currency": "CHF"})
    c3 = msg("invoice.cancelled", {"invoice_id": "I3"})
    out.update(send(p2, c3))
    r_cxl = msg("payment.recorded", {"payment_id": "P11", "invoice_id": "I3", "amount": 100,
                                     "currency": "CHF"})
    out.update(send(r_cxl))
    assert [out[m["id"]] for m in (p1, p3, p4, p2, c3)] == [A] * 5

    rejected = {r_zero["id"]: "data.amount", r_xyz["id"]: "unknown currency code XYZ",
                r_nobody["id"]: "booking B2: its booker has no contact",
                r_lower["id"]: "three upper-case letters",
                r_eur["id"]: "currency mismatch: payment P9 is in EUR, invoice I1 in CHF",
                r_neg["id"]: "data.amount", r_cxl["id"]: "payment on cancelled invoice I3"}
    for mid, text in rejected.items():
        assert out[mid][0] == "rejected" and text in out[mid][1], (mid, out[mid], text)
    dead = {d.msg["id"]: d.error for d in amqp.get_dead(len(rejected), timeout=20)}
    assert set(dead) == set(rejected)
    for mid, text in rejected.items():
        assert text in dead[mid]

    inv = {r["invoice_id"]: r for r in db.querydicts("SELECT * FROM report.invoices WHERE org = %s", org)}
    assert set(inv) == {"I1", "I2", "I3"}
    assert {k: (v["contact_id"], v["status"], v["amount"], v["paid"], v["open"], v["currency"])
            for k, v in inv.items()} == {
        "I1": (anna, "paid", 10000, 10000, 0, "CHF"),
        "I2": (bob, "paid", 5000, 7000, 0, "EUR"),
        "I3": (bob, "cancelled", 3000, 1000, 2000, "CHF")}
    assert (inv["I1"]["booking_id"], inv["I1"]["number"], inv["I1"]["vat_bp"], str(inv["I1"]["due"])) == \
        ("B1", "2024-001", 810, "2024-06-30")
    bal = {(r[0], r[1]): r[2] for r in db.query(
        "SELECT contact_id, currency, balance FROM report.balances WHERE org = %s", org)}
    assert bal == {(anna, "CHF"): 0, (anna, "JPY"): 250, (bob, "EUR"): 2000,
                   (bob, "CHF"): -3000 + 1000 + 3000 - 1500}
    kf = {(r[0], r[1]): tuple(r[2:]) for r in db.query(
        "SELECT contact_id, currency, revenue, invoices, outstanding FROM report.key_figures "
        "WHERE org = %s", org)}
    assert kf == {(anna, "CHF"): (10000, 1, 0), (anna, "JPY"): (0, 0, 0),
                  (bob, "EUR"): (5000, 1, 0), (bob, "CHF"): (0, 0, 0)}
    # every ledger row names the message that caused it, and so does the activity
    tx = db.query("SELECT transaction_id, kind, contact_id, message_id FROM report.transactions "
                  "WHERE org = %s", org)
    by_msg = {m["id"]: m for m in (i1, i2, i3, t1, t2, p1, p2, p3, p4, c3)}
    assert sorted((t[0], t[1], t[2], t[3]) for t in tx) == sorted([
        ("inv:I1", "invoice", anna, i1["id"]), ("inv:I2", "invoice", bob, i2["id"]),
        ("inv:I3", "invoice", bob, i3["id"]), ("T1", "manual", bob, t1["id"]),
        ("T2", "manual", anna, t2["id"]), ("pay:P1", "payment", anna, p1["id"]),
        ("pay:P2", "payment", anna, p2["id"]), ("pay:P3", "payment", bob, p3["id"]),
        ("pay:P4", "payment", bob, p4["id"]), ("cxl:I3", "cancellation", bob, c3["id"])])
    act = dict(db.query("SELECT message_id, kind FROM report.activity WHERE org = %s AND kind IN "
                        "('invoice', 'payment', 'invoice.cancelled', 'transaction')", org))
    assert act == {mid: {"invoice.issued": "invoice", "payment.recorded": "payment",
                         "invoice.cancelled": "invoice.cancelled",
                         "transaction.recorded": "transaction"}[m["type"]]
                   for mid, m in by_msg.items()}


@pytest.mark.timeout(120)
def test_waiting_through_rabbitmq(rosterd, publish, db, amqp):
    rd = rosterd(retry_base_ms=200, max_retries=5)   # waits 0.2 + 0.4 + 0.8 + 1.6 + 3.2 s at most
    org = "acme"
    setup = [make_msg("org.configured", {"name": "Acme"}, org=org),
             make_msg("offer.upserted", {"offer_id": "O1", "title": "C"}, org=org),
             make_msg("contact.upserted", {"email": "anna@example.org"}, org=org)]
    for m in setup:
        publish(m)
    settle(db, setup)
    anna = contact_ids(db, org)["anna@example.org"]
    early = [make_msg("payment.recorded", {"payment_id": "P1", "invoice_id": "I1", "amount": 500,
                                           "currency": "CHF"}, org=org),
             make_msg("invoice.cancelled", {"invoice_id": "I2"}, org=org),
             make_msg("invoice.issued", {"invoice_id": "I3", "amount": 900, "currency": "EUR",
                                         "booking_id": "B1"}, org=org),
             make_msg("payment.recorded", {"payment_id": "P3", "invoice_id": "I3", "amount": 900,
                                           "currency": "EUR"}, org=org)]
    never = make_msg("payment.recorded", {"payment_id": "P9", "invoice_id": "I404", "amount": 1,
                                          "currency": "CHF"}, org=org)
    t0 = time.monotonic()
    for m in early + [never]:
        publish(m)

    def waiting():
        seen = {e["id"] for e in rd.log_events("msg.settled") if e.get("outcome") == "retry"}
        return all(m["id"] in seen for m in early)
    wait_for(waiting, 10, 0.05, "the early messages waiting")
    ids = [m["id"] for m in early]
    assert db.query("SELECT * FROM report.messages WHERE message_id = ANY(%s)", ids) == []
    late = [make_msg("invoice.issued", {"invoice_id": "I1", "amount": 1000, "currency": "CHF",
                                        "contact_id": anna}, org=org),
            make_msg("invoice.issued", {"invoice_id": "I2", "amount": 700, "currency": "CHF",
                                        "contact_id": anna}, org=org),
            make_msg("booking.created", {"booking_id": "B1", "version": 1, "offer_id": "O1",
                                         "booker": {"email": "anna@example.org"}}, org=org)]
    for m in late:
        publish(m)
    out = settle(db, early + late + [never], timeout=30)
    assert all(out[m["id"]] == A for m in early + late), out
    assert out[never["id"]] == ("rejected", "gave up waiting: invoice I404 not yet seen")
    assert time.monotonic() - t0 >= 6.2  # 0.2 + 0.4 + 0.8 + 1.6 + 3.2 s
    dead = amqp.get_dead(1)
    assert dead[0].msg["id"] == never["id"] and "gave up waiting: invoice I404" in dead[0].error
    st = {r[0]: r[1:] for r in db.query("SELECT invoice_id, status, paid, contact_id FROM report.invoices")}
    assert st == {"I1": ("partial", 500, anna), "I2": ("cancelled", 0, anna),
                  "I3": ("paid", 900, anna)}


# --- the random stream ---------------------------------------------------------------------

SEED = int(os.environ.get("ROSTERD_LEDGER_SEED", "20240917"))
N_EVENTS = 2000
ORGS = ("lga", "lgb")
CURRENCIES = ("CHF", "EUR", "JPY", "KWD")
N_CONTACTS = 12          # per organisation
N_BOOKINGS = 15          # per organisation


class Stream:
    """A seeded stream of ledger messages in three shuffled phases, with its
    own model of what the ledger must end up holding.

    A: bookings, invoices (35 % on a booking), payments (none, full,
       partial, two partials, overpaid), payments in the wrong currency
       (rejected), manual transactions;
    B: cancellations (of open, partly paid, paid and overpaid invoices),
       more payments on invoices not cancelled, manual transactions, and 40
       messages of phase A sent again (same id: duplicates, no effect);
    C: payments on cancelled invoices and second cancellations (rejected).
    Within a phase the order is random, so payments often come before their
    invoice and invoices before their booking: they wait and come back."""

    def __init__(self, seed, contacts):
        rng = random.Random(seed)
        self.rng = rng
        self.contacts = contacts                     # org -> [contact uuid]
        self.n = 0
        self.invoices = {}                           # (org, iid) -> dict
        self.payments = []                           # applied: (org, iid, amount)
        self.manual = []                             # (org, contact, currency, amount)
        self.rejected = {}                           # message id -> reason text
        self.bookings = {}                           # (org, bid) -> contact index
        self.events = 0
        phase_a, phase_b, phase_c = [], [], []
        for org in ORGS:
            for b in range(N_BOOKINGS):
                k = rng.randrange(N_CONTACTS)
                bid = "B%d" % b
                self.bookings[(org, bid)] = k
                phase_a.append(self.msg(org, "booking.created", {
                    "booking_id": bid, "version": 1, "offer_id": "O1",
                    "booker": {"email": "c%d@%s.example" % (k, org)}}, count=False))
        n_inv = 650
        for i in range(n_inv):
            org = rng.choice(ORGS)
            iid = "I%d" % i
            cur = rng.choice(CURRENCIES)
            amount = rng.randint(1, 500_000)
            d = {"invoice_id": iid, "amount": amount, "currency": cur}
            if rng.random() < 0.35:
                bid = "B%d" % rng.randrange(N_BOOKINGS)
                k = self.bookings[(org, bid)]
                d["booking_id"] = bid
            else:
                k = rng.randrange(N_CONTACTS)
                d["contact_id"] = contacts[org][k]
            if rng.random() < 0.5:
                d["number"] = "2024-%05d" % i
            if rng.random() < 0.5:
                d["vat_bp"] = rng.choice([0, 250, 770, 810, 2000])
            self.invoices[(org, iid)] = {"org": org, "iid": iid, "contact": contacts[org][k],
                                         "amount": amount, "currency": cur, "paid": 0,
                                         "cancelled": False}
            phase_a.append(self.msg(org, "invoice.issued", d))
            plan = rng.random()
            if plan < 0.25:
                parts = []
            elif plan < 0.5:
                parts = [amount]
            elif plan < 0.65:
                parts = [rng.randint(1, max(1, amount - 1))]
            elif plan < 0.8:
                parts = [rng.randint(1, max(1, amount - 1)), rng.randint(1, amount)]
            else:
                parts = [amount + rng.randint(1, 10_000)]
            for p in parts:
                phase_a.append(self.payment(org, iid, p))
        # payments in another currency than their invoice: rejected
        for _ in range(8):
            org, iid = rng.choice(sorted(self.invoices))
            inv = self.invoices[(org, iid)]
            wrong = rng.choice([c for c in CURRENCIES if c != inv["currency"]])
            m = self.payment(org, iid, 100, currency=wrong, applied=False)
            self.rejected[m["id"]] = "currency mismatch"
            phase_a.append(m)
        # phase B
        keys = sorted(self.invoices)
        cancelled = set(rng.sample(keys, 110))
        for key in sorted(cancelled):
            self.invoices[key]["cancelled"] = True
            phase_b.append(self.msg(key[0], "invoice.cancelled", {"invoice_id": key[1]}))
        others = [k for k in keys if k not in cancelled]
        for _ in range(150):
            org, iid = rng.choice(others)
            phase_b.append(self.payment(org, iid, rng.randint(1, self.invoices[(org, iid)]["amount"])))
        for _ in range(40):
            phase_b.append(self.manual_msg())
        # redelivered or resent payments and invoices (same message id): no effect
        self.resent = rng.sample([m for m in phase_a if m["type"] in
                                  ("payment.recorded", "invoice.issued")], 40)
        phase_b.extend(self.resent)
        # phase C
        for key in rng.sample(sorted(cancelled), 10):
            m = self.payment(key[0], key[1], 1, applied=False)
            self.rejected[m["id"]] = "payment on cancelled invoice %s" % key[1]
            phase_c.append(m)
        for key in rng.sample(sorted(cancelled), 5):
            m = self.msg(key[0], "invoice.cancelled", {"invoice_id": key[1]})
            self.rejected[m["id"]] = "invoice %s already cancelled" % key[1]
            phase_c.append(m)
        while self.events < N_EVENTS:
            phase_a.append(self.manual_msg())
        assert self.events == N_EVENTS, self.events
        for ph in (phase_a, phase_b, phase_c):
            rng.shuffle(ph)
        self.phases = [phase_a, phase_b, phase_c]

    def msg(self, org, type, data, count=True):
        self.n += 1
        self.events += count
        return make_msg(type, data, org=org, id="s%d-%05d" % (SEED, self.n),
                        at=T0 + self.n * 1000)

    def payment(self, org, iid, amount, currency=None, applied=True):
        inv = self.invoices[(org, iid)]
        pid = "P%d" % (self.n + 1)
        if applied:
            inv["paid"] += amount
            self.payments.append((org, iid, amount))
        return self.msg(org, "payment.recorded", {
            "payment_id": pid, "invoice_id": iid, "amount": amount,
            "currency": currency or inv["currency"], "method": self.rng.choice(["card", "bank"])})

    def manual_msg(self):
        org = self.rng.choice(ORGS)
        cid = self.rng.choice(self.contacts[org])
        cur = self.rng.choice(CURRENCIES)
        amount = self.rng.randint(-50_000, 50_000)
        self.manual.append((org, cid, cur, amount))
        d = {"transaction_id": "T%d" % (self.n + 1), "contact_id": cid, "amount": amount,
             "currency": cur, "text": "adjustment %d" % self.n}
        if self.rng.random() < 0.5:
            d["date"] = "2024-%02d-%02d" % (self.rng.randint(1, 12), self.rng.randint(1, 28))
        if self.rng.random() < 0.3:
            d["vat_bp"] = self.rng.choice([0, 810])
        return self.msg(org, "transaction.recorded", d)

    # --- the model's expectations (computed here, independently of SQL) ---

    def balances(self):
        bal = collections.Counter()
        for inv in self.invoices.values():
            key = (inv["org"], inv["contact"], inv["currency"])
            bal[key] += -inv["amount"] + (inv["amount"] if inv["cancelled"] else 0)
        for org, iid, amount in self.payments:
            inv = self.invoices[(org, iid)]
            bal[(org, inv["contact"], inv["currency"])] += amount
        for org, cid, cur, amount in self.manual:
            bal[(org, cid, cur)] += amount
        return dict(bal)

    def key_figures(self):
        kf = {k: [0, 0, 0] for k in self.balances()}
        for inv in self.invoices.values():
            if inv["cancelled"]:
                continue
            f = kf[(inv["org"], inv["contact"], inv["currency"])]
            f[0] += inv["amount"]
            f[1] += 1
            f[2] += max(0, inv["amount"] - inv["paid"])
        return {k: tuple(v) for k, v in kf.items()}

    def invoice_rows(self):
        out = {}
        for (org, iid), inv in self.invoices.items():
            if inv["cancelled"]:
                status = "cancelled"
            elif inv["paid"] == 0:
                status = "open"
            elif inv["paid"] < inv["amount"]:
                status = "partial"
            else:
                status = "paid"
            out[(org, iid)] = (inv["contact"], inv["amount"], inv["paid"],
                               max(0, inv["amount"] - inv["paid"]), inv["currency"], status)
        return out


@pytest.mark.timeout(420)
def test_random_stream_balances_exact(rosterd, amqp, db):
    t_start = time.monotonic()
    # two instances consume the same queue (SPEC 8)
    rosterd(retry_base_ms=50, max_retries=12)
    rosterd(retry_base_ms=50, max_retries=12)
    setup = []
    for org in ORGS:
        setup.append(make_msg("org.configured", {"name": org}, org=org))
        setup.append(make_msg("offer.upserted", {"offer_id": "O1", "title": "C"}, org=org))
        for k in range(N_CONTACTS):
            setup.append(make_msg("contact.upserted", {"email": "c%d@%s.example" % (k, org)}, org=org))
    amqp.publish_many(setup)
    settle(db, setup)
    contacts = {}
    for org in ORGS:
        ids = contact_ids(db, org)
        contacts[org] = [ids["c%d@%s.example" % (k, org)] for k in range(N_CONTACTS)]
    s = Stream(SEED, contacts)
    settled = {}
    for phase in s.phases:
        amqp.publish_many(phase)
        settled.update(settle(db, phase, timeout=300))
    resent = {m["id"] for m in s.resent}

    def duplicates_seen():
        return {e["id"] for i in rosterd.instances for e in i.log_events("msg.settled")
                if e.get("outcome") == "duplicate"} >= resent
    wait_for(duplicates_seen, 60, 0.2, "the resent messages settled as duplicates")
    t_applied = time.monotonic()
    # the shuffle made messages wait, and both instances took part
    retries = {}
    applied = []
    for inst in rosterd.instances:
        ev = inst.log_events("msg.settled")
        for e in ev:
            if e.get("outcome") == "retry":
                retries[e["id"]] = retries.get(e["id"], 0) + 1
        applied.append(sum(1 for e in ev if e.get("outcome") == "applied"))
    failed_batches = sum(len(i.log_events("batch.failed")) + len(i.log_events("batch.isolated"))
                         for i in rosterd.instances)
    waited = {mid for mid in retries if settled.get(mid, ("",))[0] == "applied"}
    assert len(waited) >= 50, len(waited)
    assert min(applied) > 0, applied

    # outcomes: exactly the designed rejections, everything else applied
    bad = {mid: o for mid, o in settled.items() if o[0] != "applied" and mid not in s.rejected}
    assert bad == {}, list(bad.items())[:10]
    for mid, text in s.rejected.items():
        assert settled[mid][0] == "rejected" and text in settled[mid][1], (mid, settled[mid])

    # bookings went to the intended bookers
    for (org, bid), k in s.bookings.items():
        assert db.query1("SELECT contact_id FROM report.bookings WHERE org = %s AND booking_id = %s",
                         org, bid) == contacts[org][k]

    want_bal = s.balances()
    got_bal = {(r[0], r[1], r[2]): r[3] for r in db.query(
        "SELECT org, contact_id, currency, balance FROM report.balances WHERE org = ANY(%s)",
        list(ORGS))}
    assert got_bal == want_bal
    want_inv = s.invoice_rows()
    got_inv = {(r[0], r[1]): tuple(r[2:]) for r in db.query(
        "SELECT org, invoice_id, contact_id, amount, paid, open, currency, status "
        "FROM report.invoices WHERE org = ANY(%s)", list(ORGS))}
    assert got_inv == want_inv
    got_kf = {(r[0], r[1], r[2]): tuple(r[3:]) for r in db.query(
        "SELECT org, contact_id, currency, revenue, invoices, outstanding FROM report.key_figures "
        "WHERE org = ANY(%s)", list(ORGS))}
    assert got_kf == s.key_figures()
    kinds = dict(db.query("SELECT kind, count(*) FROM report.transactions GROUP BY kind"))
    n_cancel = sum(1 for i in s.invoices.values() if i["cancelled"])
    assert kinds == {"invoice": len(s.invoices), "payment": len(s.payments),
                     "cancellation": n_cancel, "manual": len(s.manual)}
    # one activity row per applied ledger message
    n_act = db.query1("SELECT count(*) FROM report.activity WHERE kind IN "
                      "('invoice', 'payment', 'invoice.cancelled', 'transaction')")
    assert n_act == len(s.invoices) + len(s.payments) + n_cancel + len(s.manual)
    # the sum of all balances is the sum of all transactions ever applied
    total = sum(want_bal.values())
    assert db.query1("SELECT sum(amount) FROM report.transactions") == total

    r = harness.rosterctl(rosterd.instances[0].config_path, "--json", "ledger", "check")
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    want_tot = collections.Counter()
    for (org, _, cur), b in want_bal.items():
        want_tot[(org, cur)] += b
    assert {(t["org"], t["currency"]): t["balance"] for t in doc["totals"]} == dict(want_tot)
    assert doc["invoices"] == len(s.invoices) and doc["payments"] == len(s.payments)
    t_end = time.monotonic()
    print("\nrandom stream seed=%d: %d ledger events (%d invoices, %d payments applied, %d "
          "cancellations, %d manual, %d rejected by design) + %d bookings + %d resent; %d waited (%d "
          "retries, at most %d for one message), applied per instance %s, %d batches failed; "
          "%d balances, %d "
          "invoices and %d key-figure rows checked exactly; applied in %.1f s, test %.1f s"
          % (SEED, s.events, len(s.invoices), len(s.payments), n_cancel, len(s.manual),
             len(s.rejected), len(s.bookings), len(resent), len(waited), sum(retries.values()),
             max(retries.values()), applied, failed_batches, len(want_bal), len(want_inv), len(got_kf),
             t_applied - t_start, t_end - t_start))
