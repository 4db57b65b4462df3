"""test_security.py - Step 7.4: tenant isolation in depth (docs/security.md,
schema/migrations/0007_security.sql; SPEC 8).

rosterd runs as a LOGIN role in rosterd_app (not the owner, not a
superuser), with the database's owner as [postgres] migrate_conninfo, as an
operator would set it up. A realistic flow of two organisations (org,
offer, template, booking with attendees, invoice, payment, the booking
mail delivered to the SMTP sink) must apply completely; then, as that
role: without rd.org every rd table and report view is empty, with
rd.org = A exactly A's rows; the ledger cannot be changed or removed; rows
of another organisation cannot be written. The reader role cannot write
anything. rd.secure_tables() covers a table that a later migration adds.
rosterctl works per organisation with any login and across organisations
only with one that sees them all. Every organisation table has org first
in its primary key and its foreign keys (SPEC 8).

The group roles are cluster-wide: created here when missing (what the
operator or 0007 does once); the LOGIN roles are this test's own.
"""
import psycopg2
import psycopg2.errors
import pytest

import harness
from harness import make_msg, wait_for, wait_messages, write_config

GROUPS = ("rosterd_app", "rosterd_reader", "rosterd_admin")


# --- set-up ----------------------------------------------------------------------

class Sec:
    """Logins for one test database: app (IN ROLE rosterd_app), reader (IN
    ROLE rosterd_reader); the database owner is a member of rosterd_reader
    and rosterd_admin, as docs/security.md tells the operator."""

    def __init__(self, servers, db):
        self.servers = servers
        self.db = db
        self.app = db.role + "_app"
        self.reader = db.role + "_rdr"
        c = servers.connect()
        try:
            with c.cursor() as cur:
                for g in GROUPS:
                    cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (g,))
                    if not cur.fetchone():
                        try:
                            cur.execute('CREATE ROLE "%s" NOLOGIN' % g)
                        except (psycopg2.errors.DuplicateObject, psycopg2.errors.UniqueViolation):
                            pass
                cur.execute('GRANT rosterd_reader, rosterd_admin TO "%s"' % db.role)
                cur.execute('CREATE ROLE "%s" LOGIN IN ROLE rosterd_app' % self.app)
                cur.execute('CREATE ROLE "%s" LOGIN IN ROLE rosterd_reader' % self.reader)
        finally:
            c.close()

    def conninfo(self, user):
        return "host=%s port=%d dbname=%s user=%s" % (
            self.servers.pg_host, self.servers.pg_port, self.db.name, user)

    def connect(self, user, org=None):
        """A connection as `user` (autocommit), working in `org` when given."""
        c = self.servers.connect(self.db.name, True, user=user)
        if org is not None:
            with c.cursor() as cur:
                cur.execute("SELECT set_config('rd.org', %s, false)", (org,))
        return c

    def drop(self):
        c = self.servers.connect()
        try:
            with c.cursor() as cur:
                for r in (self.app, self.reader):
                    cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                                " WHERE usename = %s", (r,))
                    cur.execute('DROP ROLE IF EXISTS "%s"' % r)
        finally:
            c.close()


@pytest.fixture
def sec(servers, db):
    s = Sec(servers, db)
    yield s
    s.drop()


def one(conn, sql, *args):
    with conn.cursor() as cur:
        cur.execute(sql, args or None)
        return cur.fetchone()[0]


def denied(conn, sql, *args):
    """The statement fails for lack of privilege or by a policy; returns the
    error text."""
    with conn.cursor() as cur:
        with pytest.raises(psycopg2.Error) as e:
            cur.execute(sql, args or None)
    assert e.value.pgcode in ("42501",), (sql, e.value.pgcode, str(e.value))
    return str(e.value)


def org_tables(db):
    """Every table of schema rd that has an org column."""
    return [r[0] for r in db.query(
        "SELECT c.oid::regclass::text FROM pg_class c"
        "  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'org' AND NOT a.attisdropped"
        " WHERE c.relnamespace = 'rd'::regnamespace AND c.relkind IN ('r', 'p') ORDER BY 1")]


def report_views(db):
    return [r[0] for r in db.query(
        "SELECT c.oid::regclass::text FROM pg_class c"
        " WHERE c.relnamespace = 'report'::regnamespace AND c.relkind = 'v' ORDER BY 1")]


def flow(org, bid, email, attendee):
    """A realistic stream of one organisation; the last two need the first."""
    return [
        make_msg("org.configured", {"name": org.upper(), "language": "en",
                                    "mail_from": "office@%s.example" % org.lower()}, org=org),
        make_msg("offer.upserted", {"offer_id": "O1", "title": "Yoga", "currency": "CHF",
                                    "starts_at": 1767261600000}, org=org),
        make_msg("template.upserted", {"key": "booking_confirmation", "language": "en",
                                       "subject": "Booking {{booking.number}}",
                                       "body": "Hello {{contact.first_name}}"}, org=org),
        make_msg("booking.created", {
            "booking_id": bid, "version": 1, "offer_id": "O1", "number": "N-" + bid,
            "total": 24000, "currency": "CHF",
            "booker": {"email": email, "first_name": "Anna"},
            "attendees": [{"attendee_id": "A1", "email": email, "first_name": "Anna",
                           "price": 12000},
                          {"attendee_id": "A2", "email": attendee, "first_name": "Ben",
                           "price": 12000}]}, org=org),
        make_msg("invoice.issued", {"invoice_id": "I-" + bid, "booking_id": bid,
                                    "amount": 24000, "currency": "CHF"}, org=org),
        make_msg("payment.recorded", {"payment_id": "P-" + bid, "invoice_id": "I-" + bid,
                                      "amount": 10000, "currency": "CHF"}, org=org),
    ]


# --- the daemon as rosterd_app ------------------------------------------------------

def test_flow_as_app_role_then_isolation(sec, rosterd, publish, db, smtp):
    rd = rosterd(postgres={"conninfo": sec.conninfo(sec.app),
                           "migrate_conninfo": db.conninfo})
    # migrations ran as the owner; the daemon is not the owner
    assert db.query1("SELECT pg_get_userbyid(relowner) FROM pg_class"
                     " WHERE oid = 'rd.messages'::regclass") == db.role
    assert db.query1("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND usename = %s",
                     db.name, sec.app) >= 1
    # one line says what the migrator secured, and that no group role is missing
    secured = rd.log_events("schema.secured")
    assert [e["rls_tables"] for e in secured] == [str(len(org_tables(db)))]
    assert "roles_missing" not in secured[0]

    msgs = flow("A", "B1", "anna@a.example", "ben@a.example") + \
        flow("B", "B9", "zoe@b.example", "max@b.example")
    for m in msgs:
        publish(m)
    rows = wait_messages(db, len(msgs))
    assert sorted((r["org"], r["type"], r["outcome"], r["reason"]) for r in rows) == sorted(
        (m["org"], m["type"], "applied", None) for m in msgs)
    # everything applied, in both organisations
    for org, bid in (("A", "B1"), ("B", "B9")):
        assert db.query1("SELECT count(*) FROM report.attendees WHERE org = %s AND booking_id = %s",
                         org, bid) == 2
        inv = db.querydicts("SELECT * FROM report.invoices WHERE org = %s", org)
        assert [(i["invoice_id"], i["paid"], i["status"]) for i in inv] == [
            ("I-" + bid, 10000, "partial")]
        assert db.query1("SELECT sum(balance) FROM report.balances WHERE org = %s", org) == -14000
    # the mail workers (as rosterd_app) claimed and recorded both
    # organisations' mails: the cross-organisation claim works under RLS
    mails = smtp.wait_mails(2)
    assert sorted(m.rcpt_tos[0] for m in mails) == ["anna@a.example", "zoe@b.example"]
    wait_for(lambda: db.query1("SELECT count(*) FROM rd.outbox WHERE status = 'sent'") == 2,
             30, 0.1, "both outbox rows sent")

    tables, views = org_tables(db), report_views(db)
    assert {"rd.messages", "rd.contacts", "rd.bookings", "rd.attendees", "rd.invoices",
            "rd.payments", "rd.transactions", "rd.outbox", "rd.templates"} <= set(tables)
    assert len(views) >= 11
    a_rows = {t: db.query1("SELECT count(*) FROM %s WHERE org = 'A'" % t) for t in tables + views}
    for t in ("rd.messages", "rd.orgs", "rd.offers", "rd.contacts", "rd.bookings", "rd.attendees",
              "rd.invoices", "rd.payments", "rd.transactions", "rd.templates", "rd.outbox",
              "report.balances", "report.key_figures", "report.outbox"):
        assert a_rows[t] > 0, t  # nothing vacuous below

    # as the daemon's role, without rd.org: nothing, anywhere
    app = sec.connect(sec.app)
    try:
        for t in tables + views:
            assert one(app, "SELECT count(*) FROM %s" % t) == 0, t
        # rd.org names A: exactly A's rows
        one(app, "SELECT set_config('rd.org', 'A', false)")
        for t in tables + views:
            assert one(app, "SELECT count(*) FROM %s" % t) == a_rows[t], t
            assert one(app, "SELECT count(*) FROM %s WHERE org <> 'A'" % t) == 0, t
        # an id of another organisation is simply unknown
        assert one(app, "SELECT count(*) FROM rd.bookings WHERE booking_id = 'B9'") == 0
        assert one(app, "SELECT count(*) FROM rd.invoices WHERE org = 'B'") == 0

        # the ledger: appended to, never changed or removed
        for t in ("rd.transactions", "rd.payments"):
            denied(app, "UPDATE %s SET message_id = 'x'" % t)
            denied(app, "DELETE FROM %s" % t)
            denied(app, "TRUNCATE %s" % t)
        denied(app, "UPDATE rd.invoices SET amount = 1")
        denied(app, "UPDATE rd.invoices SET contact_id = contact_id")
        denied(app, "DELETE FROM rd.invoices")
        # writing another organisation's rows: refused by the policy
        msg = denied(app, "INSERT INTO rd.offers (org, offer_id, title, message_id)"
                          " VALUES ('B', 'O7', 'x', 'm')")
        assert "row-level security" in msg
        # nor DDL, nor the owner's function
        denied(app, "ALTER TABLE rd.offers DISABLE ROW LEVEL SECURITY")
        denied(app, "SELECT rd.secure_tables()")
    finally:
        app.close()
    assert db.query1("SELECT count(*) FROM rd.transactions") == 4  # untouched
    assert db.query1("SELECT count(*) FROM rd.offers WHERE offer_id = 'O7'") == 0

    # the reader: sees its organisation, writes nothing
    r = sec.connect(sec.reader)
    try:
        assert one(r, "SELECT count(*) FROM report.contacts") == 0
        one(r, "SELECT set_config('rd.org', 'A', false)")
        assert one(r, "SELECT count(*) FROM report.contacts") == a_rows["report.contacts"]
        for sql in ("INSERT INTO rd.offers (org, offer_id, title, message_id)"
                    " VALUES ('A', 'O8', 'x', 'm')",
                    "UPDATE rd.contacts SET first_name = 'x'",
                    "DELETE FROM rd.messages",
                    "UPDATE rd.outbox SET status = 'failed'",
                    "INSERT INTO rd.transactions SELECT * FROM rd.transactions LIMIT 1",
                    "SELECT * FROM rd.apply('A', 'reader-1', 'offer.upserted', 0,"
                    " '{\"offer_id\": \"O8\", \"title\": \"x\"}', false, NULL)",
                    "SELECT * FROM rd.outbox_claim('c', 10, 1000)"):
            denied(r, sql)
    finally:
        r.close()
    assert db.query1("SELECT count(*) FROM rd.offers WHERE offer_id = 'O8'") == 0
    assert rd.alive


# --- rosterctl ---------------------------------------------------------------------

def test_rosterctl_scoped_by_login(sec, rosterd, publish, db, smtp, tmp_path):
    rosterd(postgres={"conninfo": sec.conninfo(sec.app), "migrate_conninfo": db.conninfo})
    msgs = flow("A", "B1", "anna@a.example", "ben@a.example") + \
        flow("B", "B9", "zoe@b.example", "max@b.example")
    for m in msgs:
        publish(m)
    wait_messages(db, len(msgs))
    smtp.wait_mails(2)

    def cfg(name, **pg):
        return write_config(str(tmp_path / name), {"postgres": dict(conninfo=sec.conninfo(sec.app),
                                                                    **pg)})
    owner = cfg("owner.conf", migrate_conninfo=db.conninfo)
    app = cfg("app.conf")  # rosterctl as the daemon's login: org by org only

    r = harness.rosterctl(owner, "ledger", "check", check=True)
    assert "2 organisations" in r.stdout
    r = harness.rosterctl(owner, "--json", "outbox", "list", check=True)
    assert "anna@a.example" in r.stdout and "zoe@b.example" in r.stdout

    r = harness.rosterctl(app, "ledger", "check")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == (
        "rosterctl: ledger check: this login sees no organisation without --org (row-level "
        "security): give --org ORG, or set [postgres] migrate_conninfo to the owner's or a "
        "rosterd_admin login")
    r = harness.rosterctl(app, "outbox", "list")
    assert r.returncode == 1 and "outbox list: this login sees no organisation" in r.stderr
    r = harness.rosterctl(app, "--json", "outbox", "list", "--org", "A", check=True)
    assert "anna@a.example" in r.stdout and "zoe@b.example" not in r.stdout
    r = harness.rosterctl(app, "--json", "outbox", "list", "--org", "B", check=True)
    assert "zoe@b.example" in r.stdout and "anna@a.example" not in r.stdout
    r = harness.rosterctl(app, "ledger", "check", "--org", "A", check=True)
    assert "ok" in r.stdout
    # messages reads through ctl_connect_reader (rosterd_reader, read-only)
    for conf in (owner, app):
        r = harness.rosterctl(conf, "--json", "messages", "--org", "B", check=True)
        assert r.stdout.count('"org": "B"') == 6 and '"org": "A"' not in r.stdout
    # an organisation that is not there is simply empty
    r = harness.rosterctl(app, "--json", "messages", "--org", "C", check=True)
    assert r.stdout.strip() == "[]"
    # export reads as rosterd_reader (read-only), one organisation at a time
    r = harness.rosterctl(owner, "export", "contacts", "--org", "A", check=True)
    assert "anna@a.example" in r.stdout and "zoe@b.example" not in r.stdout
    r = harness.rosterctl(owner, "export", "contacts")
    assert r.returncode != 0 and "export: this login sees no organisation" in r.stderr


# --- tables added later --------------------------------------------------------------

def test_secure_tables_covers_later_tables(sec, db, tmp_path):
    conf = write_config(str(tmp_path / "rosterd.conf"), {"postgres": {"conninfo": db.conninfo}})
    harness.rosterctl(conf, "migrate", check=True)
    owner = db.connect(as_owner=True)
    try:
        with owner.cursor() as cur:
            # what a later migration might add: organisation data, and not
            cur.execute("CREATE TABLE rd.scratch (org text NOT NULL, id integer NOT NULL,"
                        " note text, PRIMARY KEY (org, id))")
            cur.execute("CREATE TABLE rd.scratch_ref (code text PRIMARY KEY)")
            cur.execute("CREATE VIEW report.scratch AS SELECT org, id FROM rd.scratch")
            cur.execute("INSERT INTO rd.scratch VALUES ('A', 1, 'a'), ('B', 2, 'b')")
    finally:
        owner.close()
    assert not db.query1("SELECT relrowsecurity FROM pg_class WHERE oid = 'rd.scratch'::regclass")

    # the migrator secures them on its next run (rosterd start, rosterctl migrate)
    harness.rosterctl(conf, "migrate", check=True)
    assert db.query("SELECT relrowsecurity, relforcerowsecurity FROM pg_class"
                    " WHERE oid = 'rd.scratch'::regclass") == [(True, True)]
    assert db.query1("SELECT relrowsecurity FROM pg_class"
                     " WHERE oid = 'rd.scratch_ref'::regclass") is False
    assert sorted(r[0] for r in db.query("SELECT polname FROM pg_policy"
                                         " WHERE polrelid = 'rd.scratch'::regclass")) == [
        "rd_all", "rd_org"]
    assert db.query1("SELECT 'security_invoker=true' = ANY (reloptions) FROM pg_class"
                     " WHERE oid = 'report.scratch'::regclass")
    # idempotent: a second call changes nothing and fails on nothing
    n = db.query1("SELECT count(*) FROM pg_policy")
    owner = db.connect(as_owner=True)
    try:
        assert one(owner, "SELECT rd.secure_tables()") == len(org_tables(db))
        # FORCE: the owner is subject to the policies too (rd_all lets it see all)
        assert one(owner, "SELECT count(*) FROM rd.scratch") == 2
    finally:
        owner.close()
    assert db.query1("SELECT count(*) FROM pg_policy") == n

    app = sec.connect(sec.app)
    try:
        assert one(app, "SELECT count(*) FROM rd.scratch") == 0
        assert one(app, "SELECT count(*) FROM report.scratch") == 0
        one(app, "SELECT set_config('rd.org', 'A', false)")
        assert one(app, "SELECT array_agg(id) FROM rd.scratch") == [1]
        assert one(app, "SELECT array_agg(id) FROM report.scratch") == [1]
        with app.cursor() as cur:  # ordinary organisation data: writable in A
            cur.execute("INSERT INTO rd.scratch VALUES ('A', 3, 'x')")
            cur.execute("UPDATE rd.scratch SET note = 'y' WHERE id = 3")
            cur.execute("DELETE FROM rd.scratch WHERE id = 3")
        denied(app, "INSERT INTO rd.scratch VALUES ('B', 4, 'x')")
        denied(app, "INSERT INTO rd.scratch_ref VALUES ('X')")  # not organisation data
        assert one(app, "SELECT count(*) FROM rd.scratch_ref") == 0
    finally:
        app.close()
    rdr = sec.connect(sec.reader, org="B")
    try:
        assert one(rdr, "SELECT array_agg(id) FROM report.scratch") == [2]
        denied(rdr, "INSERT INTO rd.scratch VALUES ('B', 5, 'x')")
    finally:
        rdr.close()


# --- SPEC 8 ------------------------------------------------------------------------

def test_org_first_in_every_key(sec, db, tmp_path):
    """Every organisation table: org first in its primary key and in every
    foreign key, except keys to reference data without an org column
    (rd.currencies: docs/security.md)."""
    conf = write_config(str(tmp_path / "rosterd.conf"), {"postgres": {"conninfo": db.conninfo}})
    harness.rosterctl(conf, "migrate", check=True)
    tables = org_tables(db)
    assert len(tables) >= 15
    keys = db.query(
        "SELECT c.conrelid::regclass::text, c.contype, c.confrelid::regclass::text,"
        "       (SELECT a.attname FROM pg_attribute a"
        "         WHERE a.attrelid = c.conrelid AND a.attnum = c.conkey[1]),"
        "       c.confrelid <> 0 AND NOT EXISTS (SELECT 1 FROM pg_attribute a"
        "         WHERE a.attrelid = c.confrelid AND a.attname = 'org')"
        "  FROM pg_constraint c"
        " WHERE c.conrelid = ANY (%s::regclass[]) AND c.contype IN ('p', 'f')", tables)
    pks = {t for t, kind, _, first, _ in keys if kind == "p" and first == "org"}
    assert pks == set(tables)
    bad = [(t, ref, first) for t, kind, ref, first, to_reference in keys
           if kind == "f" and first != "org" and not to_reference]
    assert bad == []
    exceptions = sorted({(t, ref) for t, kind, ref, first, to_reference in keys
                         if kind == "f" and to_reference})
    assert exceptions and all(ref == "rd.currencies" for _, ref in exceptions)
