"""test_tls.py - TLS and secrets (Step 7): amqps:// with the CA file and
peer/host-name verification, PostgreSQL sslmode=verify-full through the
conninfo, a certificate from another CA refused, passwords from files and
never in the log or the status document."""
import os

import pytest

from harness import make_msg, wait_for, wait_messages


@pytest.fixture
def tls(servers):
    e = servers.env
    if not e.get("AMQPS_URL") or not e.get("TLS_CA"):
        pytest.fail("the fixture has no TLS listeners (openssl missing?)")
    return e


def tls_conninfo(db, ca):
    return "host=localhost port=%d dbname=%s user=%s sslmode=verify-full sslrootcert=%s" % (
        db.port if hasattr(db, "port") else int(db.conninfo.split("port=")[1].split()[0]),
        db.name, db.role, ca)


def test_amqps_and_postgres_verify_full(rosterd, publish, db, tls, amqp):
    rd = rosterd(url=tls["AMQPS_URL"], ca_file=tls["TLS_CA"], verify_peer=True,
                 conninfo=tls_conninfo(db, tls["TLS_CA"]))
    m = make_msg("org.configured", {"name": "TLS"})
    publish(m)
    wait_messages(db, 1)
    # rosterd's own PostgreSQL sessions are encrypted
    ssl = db.query("SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)"
                   " WHERE a.application_name = %s", rd.instance)
    assert ssl and all(r[0] for r in ssl)
    st = amqp.status(instance=rd.instance)
    assert st["amqp"]["connected"] is True


def test_amqps_refuses_certificate_of_another_ca(rosterd, tls, db):
    rd = rosterd(wait=False, url=tls["AMQPS_URL"], ca_file=tls["TLS_OTHER_CA"], verify_peer=True)
    wait_for(lambda: "amqp.connect_failed" in rd.log_text() or "start.waiting" in rd.log_text(),
             20, message="a refused TLS connection")
    assert " ready " not in rd.log_text()
    assert rd.alive  # keeps retrying, does not crash


def test_postgres_verify_full_refuses_another_ca(rosterd, tls, db):
    rd = rosterd(wait=False, conninfo=tls_conninfo(db, tls["TLS_OTHER_CA"]))
    wait_for(lambda: "start.waiting" in rd.log_text(), 20, message="refused PostgreSQL TLS")
    assert "certificate" in rd.log_text().lower()
    assert " ready " not in rd.log_text()


def test_password_files_never_logged(rosterd, publish, db, servers, tmp_path, amqp):
    secret = "guest"  # the broker's password, given only through the file
    pw = tmp_path / "amqp.pw"
    pw.write_text(secret + "\n")
    os.chmod(pw, 0o600)
    url = servers.amqp_url.replace("guest:guest@", "guest@")
    rd = rosterd(url=url, log_level="debug", **{"amqp.password_file": str(pw)})
    m = make_msg("org.configured", {"name": "pw"})
    publish(m)
    wait_messages(db, 1)
    st = amqp.status(instance=rd.instance)
    assert "guest@" not in str(st)
    text = rd.log_text()
    assert ":guest@" not in text
