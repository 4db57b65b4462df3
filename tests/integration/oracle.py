"""oracle.py - a seeded stream of mixed rosterd messages with its own model of
the end state (what PostgreSQL and the SMTP sink must hold once everything
published has settled), computed in Python, independently of the SQL.

Used by test_chaos.py. The stream is designed so that the end state does not
depend on the order in which messages are applied (they may wait, be
redelivered, be applied on any instance):

- setup (per organisation, published and settled before the faults start):
  org.configured (language en, mail_from noreply@ORG.example), one offer, a
  random subset of the four trigger templates, KNOWN contacts by email;
- phase A: booking.created (1-4 attendees, known or new emails, some
  pending, some notify:false), invoice.issued (on a booking of phase A or on
  a known contact_id), payment.recorded (none, full, partial, two partials,
  overpaid; amounts distinct per invoice), transaction.recorded (manual,
  signed), payments in the wrong currency (rejected by design);
- phase B, once A has settled: booking.updated (version 2),
  booking.cancelled (version 2, other bookings), booking.updated with
  version 1 (stale by design), invoice.cancelled, more payments on
  invoices not cancelled, manual transactions, messages of phase A sent
  again with the same id (duplicates);
- phase C, once B has settled: payments on cancelled invoices and second
  cancellations (rejected by design).

A message never depends on the outcome of another of its own phase except by
waiting (a payment before its invoice, an invoice before its booking), which
SPEC 4.9 makes order-independent. Mails (SPEC 4.8) are expected exactly where
the organisation has the template, the trigger applies and notify is not
false; every expected mail has a unique subject (the organisation, the
template and the booking or invoice number, plus the amount for receipts).
"""
import collections
import random

from harness import make_msg

T0 = 1_700_000_000_000
CURRENCIES = ("CHF", "EUR", "JPY")
EXPONENT = {"CHF": 2, "EUR": 2, "JPY": 0}
TEMPLATE_KEYS = ("booking_confirmation", "booking_cancellation", "invoice", "payment_receipt")
SUBJECTS = {
    "booking_confirmation": "[{org}] confirmation {{{{booking.number}}}}",
    "booking_cancellation": "[{org}] cancellation {{{{booking.number}}}}",
    "invoice": "[{org}] invoice {{{{invoice.number}}}} {{{{invoice.amount}}}}",
    "payment_receipt": "[{org}] receipt {{{{invoice.number}}}} {{{{payment.amount}}}}",
}
BODY = ("Hello {{contact.first_name}},\n\nthis is about {{offer.title}}.\n"
        "Booking {{booking.number}}, invoice {{invoice.number}}.\n\nRegards\n")


def money(amount, currency):
    """The template engine's format (docs/outbox.md): minor units with the
    currency's exponent, no separators."""
    e = EXPONENT[currency]
    if e == 0:
        return "%s %d" % (currency, amount)
    sign = "-" if amount < 0 else ""
    a = abs(amount)
    return "%s %s%d.%0*d" % (currency, sign, a // 10 ** e, e, a % 10 ** e)


class ChaosStream:
    """The messages (setup, phases[0..2]) and the expected end state.

    Expectation accessors (all keyed by organisation first):
      outcomes        {(org, id): 'applied' | 'stale' | 'rejected'}
      reject_reason   {(org, id): substring of the reason}
      contacts()      {org: set of emails}            (one contact each)
      bookings()      {(org, bid): (booker email, version, status)}
      invoices()      {(org, iid): (email, amount, paid, open, currency, status)}
      balances()      {(org, email, currency): balance}
      kinds()         {(org, kind): number of ledger rows}
      mails()         {subject: (org, template, to address)}
    """

    def __init__(self, seed, orgs, n_events, known=6):
        self.rng = rng = random.Random(seed)
        self.seed = seed
        self.orgs = list(orgs)
        self.known = known
        self.n = 0
        self.outcomes = {}
        self.reject_reason = {}
        self.templates = {}              # org -> set of template keys
        self._contacts = collections.defaultdict(set)
        self._bookings = {}              # (org, bid) -> dict(email, version, status)
        self._invoices = {}              # (org, iid) -> dict
        self._payments = []              # (org, iid, amount)
        self._manual = []                # (org, email, currency, amount)
        self._mails = {}                 # subject -> (org, template, to)
        self.setup = []
        self.phases = [[], [], []]
        self.resent = []
        self.contact_ids = None          # org -> [uuid] of the known contacts, set later

        for org in self.orgs:
            self.setup.append(self.msg(org, "org.configured", {
                "name": "Org " + org, "language": "en", "mail_from": "noreply@%s.example" % org,
                "reply_to": "office@%s.example" % org}))
            self.setup.append(self.msg(org, "offer.upserted", {
                "offer_id": "O1", "title": "Course of " + org, "currency": "CHF"}))
            keys = {k for k in TEMPLATE_KEYS if rng.random() < 0.75}
            self.templates[org] = keys
            for k in sorted(keys):
                self.setup.append(self.msg(org, "template.upserted", {
                    "key": k, "language": "en", "subject": SUBJECTS[k].format(org=org),
                    "body": BODY}))
            for i in range(known):
                email = self.known_email(org, i)
                self._contacts[org].add(email)
                self.setup.append(self.msg(org, "contact.upserted", {
                    "email": email, "first_name": "K%d" % i, "last_name": org}))
        self.n_setup = len(self.setup)
        self.n_events = n_events
        self._per_org_target = (n_events - self.n_setup) // len(self.orgs)
        self._extra = (n_events - self.n_setup) % len(self.orgs)

    @staticmethod
    def known_email(org, i):
        return "k%d@%s.example" % (i, org)

    def msg(self, org, type, data, outcome="applied"):
        self.n += 1
        m = make_msg(type, data, org=org, id="x%d-%06d" % (self.seed, self.n),
                     at=T0 + self.n * 1000)
        self.outcomes[(org, m["id"])] = outcome
        return m

    def reject(self, org, type, data, reason):
        m = self.msg(org, type, data, outcome="rejected")
        self.reject_reason[(org, m["id"])] = reason
        return m

    def mail(self, org, template, to, subject):
        if template not in self.templates[org]:
            return
        assert subject not in self._mails, subject
        self._mails[subject] = (org, template, to)

    # --- the stream, built once the known contacts' ids are known -----------

    def build(self, contact_ids):
        """contact_ids: {org: [uuid of k0, k1, ...]} (from the settled setup)."""
        self.contact_ids = contact_ids
        for i, org in enumerate(self.orgs):
            self._build_org(org, self._per_org_target + (1 if i < self._extra else 0))
        # phase A in roughly dependency order, the groups overlapping: many
        # payments still come before their invoice and invoices before
        # their booking (they wait), but not minutes before
        rank = {"booking.created": 0, "invoice.issued": 1, "payment.recorded": 2}
        n = len(self.phases[0])
        keyed = [((rank.get(m["type"], self.rng.randrange(3)) + self.rng.uniform(0, 1.3)) * n, i, m)
                 for i, m in enumerate(self.phases[0])]
        self.phases[0] = [m for _, _, m in sorted(keyed, key=lambda x: x[:2])]
        for ph in self.phases[1:]:
            self.rng.shuffle(ph)
        total = self.n_setup + sum(len(p) for p in self.phases)
        assert total == self.n_events, (total, self.n_events)

    def _payment(self, org, iid, amount, used, out, currency=None, reason=None):
        inv = self._invoices[(org, iid)]
        while amount in used[iid]:
            amount += 1
        used[iid].add(amount)
        pid = "P%d" % (self.n + 1)
        d = {"payment_id": pid, "invoice_id": iid, "amount": amount,
             "currency": currency or inv["currency"], "method": self.rng.choice(["card", "bank"])}
        notify = self.rng.random() >= 0.1
        if not notify:
            d["notify"] = False
        if reason:
            out.append(self.reject(org, "payment.recorded", d, reason))
            return
        inv["paid"] += amount
        self._payments.append((org, iid, amount))
        if notify:
            self.mail(org, "payment_receipt", inv["email"],
                      "[%s] receipt %s %s" % (org, iid, money(amount, inv["currency"])))
        out.append(self.msg(org, "payment.recorded", d))

    def _manual_msg(self, org, out):
        rng = self.rng
        k = rng.randrange(self.known)
        cur = rng.choice(CURRENCIES)
        amount = rng.randint(-50_000, 50_000)
        self._manual.append((org, self.known_email(org, k), cur, amount))
        d = {"transaction_id": "T%d" % (self.n + 1), "contact_id": self.contact_ids[org][k],
             "amount": amount, "currency": cur, "text": "adjustment %d" % self.n}
        if rng.random() < 0.5:
            d["date"] = "2024-%02d-%02d" % (rng.randint(1, 12), rng.randint(1, 28))
        out.append(self.msg(org, "transaction.recorded", d))

    def _build_org(self, org, target):
        rng = self.rng
        A, B, C = [], [], []
        n_bookings = max(4, target * 15 // 100)
        n_invoices = max(4, target * 20 // 100)
        bids = []
        for b in range(n_bookings):
            bid = "B%d" % b
            bids.append(bid)
            if rng.random() < 0.6:
                booker = self.known_email(org, rng.randrange(self.known))
            else:
                booker = "p%d@%s.example" % (rng.randrange(n_bookings), org)
            self._contacts[org].add(booker)
            attendees = []
            for j in range(rng.randint(1, 4)):
                r = rng.random()
                if r < 0.3:
                    email = booker
                elif r < 0.6:
                    email = self.known_email(org, rng.randrange(self.known))
                else:
                    email = "a%s_%d@%s.example" % (bid.lower(), j, org)
                self._contacts[org].add(email)
                attendees.append({"attendee_id": "%s-A%d" % (bid, j), "email": email,
                                  "first_name": "Att%d" % j, "category": "adult",
                                  "price": rng.randint(0, 50_000)})
            status = "confirmed" if rng.random() < 0.9 else "pending"
            d = {"booking_id": bid, "version": 1, "offer_id": "O1", "status": status,
                 "booker": {"email": booker, "first_name": "Booker"}, "attendees": attendees,
                 "total": sum(a["price"] for a in attendees), "currency": "CHF"}
            notify = rng.random() >= 0.1
            if not notify:
                d["notify"] = False
            self._bookings[(org, bid)] = {"email": booker, "version": 1, "status": status,
                                          "data": d}
            if status == "confirmed" and notify:
                self.mail(org, "booking_confirmation", booker, "[%s] confirmation %s" % (org, bid))
            A.append(self.msg(org, "booking.created", d))
        used = collections.defaultdict(set)
        iids = []
        for i in range(n_invoices):
            iid = "I%d" % i
            iids.append(iid)
            cur = rng.choice(CURRENCIES)
            amount = rng.randint(100, 500_000)
            d = {"invoice_id": iid, "amount": amount, "currency": cur}
            if rng.random() < 0.5:
                bid = rng.choice(bids)
                d["booking_id"] = bid
                email = self._bookings[(org, bid)]["email"]
            else:
                k = rng.randrange(self.known)
                d["contact_id"] = self.contact_ids[org][k]
                email = self.known_email(org, k)
            notify = rng.random() >= 0.1
            if not notify:
                d["notify"] = False
            self._invoices[(org, iid)] = {"email": email, "amount": amount, "currency": cur,
                                          "paid": 0, "cancelled": False}
            if notify:
                self.mail(org, "invoice", email, "[%s] invoice %s %s" % (org, iid, money(amount, cur)))
            A.append(self.msg(org, "invoice.issued", d))
            plan = rng.random()
            if plan < 0.3:
                parts = []
            elif plan < 0.55:
                parts = [amount]
            elif plan < 0.7:
                parts = [rng.randint(1, amount - 1)]
            elif plan < 0.85:
                parts = [rng.randint(1, amount // 2), rng.randint(1, amount // 2)]
            else:
                parts = [amount + rng.randint(1, 10_000)]
            for p in parts:
                self._payment(org, iid, p, used, A)
        # a payment in another currency than its invoice: rejected by design
        iid = rng.choice(iids)
        inv = self._invoices[(org, iid)]
        wrong = [c for c in CURRENCIES if c != inv["currency"]][0]
        self._payment(org, iid, 100, used, A, currency=wrong, reason="currency mismatch")
        n_manual_a = target * 12 // 100
        for _ in range(n_manual_a):
            self._manual_msg(org, A)

        # phase B
        bsample = rng.sample(bids, max(3, n_bookings // 5))
        half = len(bsample) // 2
        for bid in bsample[:half]:               # updated to version 2
            bk = self._bookings[(org, bid)]
            d = dict(bk["data"], version=2, total=bk["data"]["total"] + 100)
            d.pop("notify", None)
            bk["version"] = 2
            B.append(self.msg(org, "booking.updated", d))
        for bid in bsample[half:]:               # cancelled at version 2
            bk = self._bookings[(org, bid)]
            d = {"booking_id": bid, "version": 2, "reason": "chaos"}
            notify = rng.random() >= 0.1
            if not notify:
                d["notify"] = False
            bk["version"] = 2
            bk["status"] = "cancelled"
            if notify:
                self.mail(org, "booking_cancellation", bk["email"], "[%s] cancellation %s" % (org, bid))
            B.append(self.msg(org, "booking.cancelled", d))
        for bid in rng.sample(bids, 2):          # version 1 again: stale
            d = dict(self._bookings[(org, bid)]["data"])
            d.pop("notify", None)
            B.append(self.msg(org, "booking.updated", d, outcome="stale"))
        cancelled = rng.sample(iids, max(2, n_invoices // 8))
        for iid in cancelled:
            self._invoices[(org, iid)]["cancelled"] = True
            B.append(self.msg(org, "invoice.cancelled", {"invoice_id": iid}))
        others = [i for i in iids if i not in cancelled]
        for _ in range(max(2, n_invoices // 4)):
            iid = rng.choice(others)
            self._payment(org, iid, rng.randint(1, self._invoices[(org, iid)]["amount"]), used, B)
        resent = rng.sample([m for m in A if m["type"] in
                             ("payment.recorded", "invoice.issued", "transaction.recorded",
                              "booking.created")], 4)
        self.resent.extend(resent)
        B.extend(resent)
        # phase C: rejected by design
        iid = rng.choice(cancelled)
        self._payment(org, iid, 1, used, C, reason="payment on cancelled invoice %s" % iid)
        C.append(self.reject(org, "invoice.cancelled", {"invoice_id": iid},
                             "invoice %s already cancelled" % iid))
        # fill up with manual transactions to the exact number of events
        while len(A) + len(B) + len(C) < target:
            self._manual_msg(org, B)
        self.phases[0].extend(A)
        self.phases[1].extend(B)
        self.phases[2].extend(C)

    # --- expectations ---------------------------------------------------------

    def ids(self):
        return set(self.outcomes)

    def contacts(self):
        return {org: set(s) for org, s in self._contacts.items()}

    def bookings(self):
        return {k: (v["email"], v["version"], v["status"]) for k, v in self._bookings.items()}

    def invoices(self):
        out = {}
        for key, inv in self._invoices.items():
            if inv["cancelled"]:
                status = "cancelled"
            elif inv["paid"] == 0:
                status = "open"
            elif inv["paid"] < inv["amount"]:
                status = "partial"
            else:
                status = "paid"
            out[key] = (inv["email"], inv["amount"], inv["paid"],
                        max(0, inv["amount"] - inv["paid"]), inv["currency"], status)
        return out

    def balances(self):
        bal = collections.Counter()
        for (org, _), inv in self._invoices.items():
            k = (org, inv["email"], inv["currency"])
            bal[k] += 0 if inv["cancelled"] else -inv["amount"]
        for org, iid, amount in self._payments:
            inv = self._invoices[(org, iid)]
            bal[(org, inv["email"], inv["currency"])] += amount
        for org, email, cur, amount in self._manual:
            bal[(org, email, cur)] += amount
        return dict(bal)

    def kinds(self):
        k = collections.Counter()
        for (org, _), inv in self._invoices.items():
            k[(org, "invoice")] += 1
            if inv["cancelled"]:
                k[(org, "cancellation")] += 1
        for org, _, _ in self._payments:
            k[(org, "payment")] += 1
        for org, _, _, _ in self._manual:
            k[(org, "manual")] += 1
        return dict(k)

    def mails(self):
        return dict(self._mails)

    def summary(self):
        c = collections.Counter(self.outcomes.values())
        t = collections.Counter(m["type"] for ph in [self.setup] + self.phases for m in ph)
        return ("%d events (%d setup + %s per phase) over %d organisations: %s; by type %s; "
                "%d resent (duplicates); %d mails expected"
                % (self.n_events, self.n_setup, "/".join(str(len(p)) for p in self.phases),
                   len(self.orgs), dict(c), dict(sorted(t.items())), len(self.resent),
                   len(self._mails)))
