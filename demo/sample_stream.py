#!/usr/bin/python3
"""sample_stream.py - publish a realistic sample stream to rosterd.

    sample_stream.py --url AMQP_URL [--exchange rosterd.events] [--bookings N] [--seed S]

Two organisations configure themselves and their offers, then publish
bookings with one to four attendees (some sharing emails, some without an
email, one with an invalid one), updates that arrive out of order, a
cancellation, a message sent twice, a message for an offer that comes later
(it waits in the retry queue), and two malformed messages (they go to the
dead-letter queue with a reason). Prints what it sent.
"""
import argparse
import random
import time
import uuid

import msgpack
import pika

FIRST = ["Anna", "Luca", "Sofia", "Noah", "Lea", "Elias", "Mia", "Jonas", "Chloé", "Jürg"]
LAST = ["Müller", "Meier", "Schmid", "Keller", "Weber", "Rossi", "Dubois", "Frei"]


def envelope(org, type_, data, id_=None):
    return {"v": 1, "id": id_ or str(uuid.uuid4()), "type": type_, "org": org,
            "at": int(time.time() * 1000), "data": data}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--exchange", default="rosterd.events")
    ap.add_argument("--bookings", type=int, default=40)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    conn = pika.BlockingConnection(pika.URLParameters(a.url))
    ch = conn.channel()
    ch.confirm_delivery()
    sent = {}

    def pub(env, raw=None):
        body = raw if raw is not None else msgpack.packb(env, use_bin_type=True)
        rk = env["type"] if env else "garbage"
        ch.basic_publish(a.exchange, rk, body,
                         pika.BasicProperties(content_type="application/msgpack",
                                              delivery_mode=2))
        sent[rk] = sent.get(rk, 0) + 1

    orgs = {"acme-events": "de", "bern-courses": "fr"}
    for org, lang in orgs.items():
        pub(envelope(org, "org.configured", {"name": org.replace("-", " ").title(),
                                             "sync_contacts": org == "acme-events",
                                             "language": lang,
                                             "mail_from": "office@%s.example" % org}))
        pub(envelope(org, "field.defined", {"key": "diet", "kind": "text", "label": "Diet"}))
        for o in range(3):
            pub(envelope(org, "offer.upserted", {"offer_id": "%s-course-%d" % (org, o),
                                                 "title": "Course %d" % (o + 1),
                                                 "currency": "CHF",
                                                 "email_change": "retain" if o == 2 else "reassign"}))
    # mail templates (SPEC 4.8): confirmations and receipts for acme-events
    for key, subj, body in (
            ("booking_confirmation", "Ihre Buchung {{booking.number}}",
             "Hallo {{contact.first_name}}\n\nDanke fuer Ihre Buchung {{booking.number}}"
             " ({{offer.title}}).\n"),
            ("payment_receipt", "Zahlung erhalten",
             "Hallo {{contact.first_name}}, wir haben {{payment.amount}} erhalten.\n")):
        pub(envelope("acme-events", "template.upserted",
                     {"key": key, "language": "de", "subject": subj, "body": body}))
    # a booking whose offer arrives later: it waits in the retry queue
    late = envelope("acme-events", "booking.created", {
        "booking_id": "late-1", "version": 1, "offer_id": "acme-events-late", "number": "L-1",
        "booker": {"email": "late@example.org", "first_name": "Lena"}, "total": 9900,
        "currency": "CHF"})
    pub(late)
    people = ["person%d@example.org" % i for i in range(25)]
    for b in range(a.bookings):
        org = rng.choice(list(orgs))
        booker_email = rng.choice(people)
        if rng.random() < 0.1:
            booker_email = booker_email.upper()
        atts = []
        for k in range(rng.randint(1, 4)):
            p = {"attendee_id": "b%d-a%d" % (b, k), "first_name": rng.choice(FIRST),
                 "last_name": rng.choice(LAST), "category": "adult", "price": 12000,
                 "fields": {"diet": rng.choice(["vegan", "none", ""])}}
            r = rng.random()
            if r < 0.6:
                p["email"] = rng.choice(people)
            elif r < 0.65:
                p["email"] = "not an email"
            atts.append(p)
        data = {"booking_id": "bk-%d" % b, "version": 1, "offer_id": "%s-course-%d" % (org, b % 3),
                "number": "B-%04d" % b,
                "booker": {"email": booker_email, "first_name": rng.choice(FIRST),
                           "last_name": rng.choice(LAST), "language": orgs[org],
                           "phone": "+41 44 %03d %02d %02d" % (rng.randrange(1000), rng.randrange(100), rng.randrange(100)),
                           "country": "CH"},
                "attendees": atts, "total": 12000 * len(atts), "currency": "CHF"}
        env = envelope(org, "booking.created", data)
        pub(env)
        if b % 10 == 3:
            pub(env)  # upstream sent it twice: a duplicate
        if b % 10 == 5:
            upd = dict(data, version=3, status="confirmed", total=data["total"] + 500)
            old = dict(data, version=2, total=1)
            pub(envelope(org, "booking.updated", upd))
            pub(envelope(org, "booking.updated", old))  # arrives late: stale
        if b % 10 == 7:
            pub(envelope(org, "booking.cancelled", {"booking_id": "bk-%d" % b, "version": 2,
                                                    "reason": "ill"}))
        elif b % 3 == 0:
            # an invoice for the booking, paid in part or in full (SPEC 4.6)
            inv = "inv-%d" % b
            pub(envelope(org, "invoice.issued", {"invoice_id": inv, "booking_id": "bk-%d" % b,
                                                 "amount": data["total"], "currency": "CHF",
                                                 "number": "R-%04d" % b, "vat_bp": 810}))
            paid = data["total"] if b % 2 == 0 else data["total"] // 2
            pub(envelope(org, "payment.recorded", {"payment_id": "pay-%d" % b,
                                                   "invoice_id": inv, "amount": paid,
                                                   "currency": "CHF", "method": "card"}))
    # the same person twice, entered by hand with another email: a
    # duplicate candidate (same name and phone)
    for email in ("vreni.huber@example.org", "v.huber@example.net"):
        pub(envelope("acme-events", "contact.upserted", {
            "email": email, "first_name": "Vreni", "last_name": "Huber",
            "phone": "+41 31 555 12 34", "city": "Bern", "match": "email"}))
    pub(envelope("acme-events", "offer.upserted", {"offer_id": "acme-events-late",
                                                   "title": "Late course"}))
    pub(None, raw=b"\xdd\xff\xff\xff\xff")          # not an envelope
    pub(envelope("acme-events", "booking.created", {"booking_id": "x"}))  # missing keys
    conn.close()
    for k in sorted(sent):
        print("  sent %-20s %d" % (k, sent[k]))
    print("  sent %-20s %d" % ("total", sum(sent.values())))


if __name__ == "__main__":
    main()
