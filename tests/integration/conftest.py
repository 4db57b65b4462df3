"""conftest.py - pytest fixtures for the rosterd integration tests.

Fixtures (see harness.py for the classes and their methods):
  servers   (session) Servers: the private PostgreSQL/RabbitMQ/SMTP of this
            run, from $ROSTERD_SERVERS/env (ctest starts them), or started
            here in a temporary directory and stopped at the end when
            ROSTERD_SERVERS is unset (python3 -m pytest tests/integration/...)
  db        Database: a fresh database owned by a fresh LOGIN-only role
  names     Names: unique AMQP object names for this test
  amqp      Amqp: publish/get_dead/queue_depth/status/... on those names
  publish   amqp.publish
  smtp      SmtpSink: a private SMTP sink for this test (rosterd uses it)
  smtp_tls  SmtpSink offering STARTTLS (self-signed cert: smtp_tls.cert)
  rosterd   RosterdFactory: rosterd(**overrides) -> running Rosterd
  rosterctl function(*args, **kw) -> CompletedProcess, with this test's config

Each test gets a time limit (ROSTERD_TEST_TIMEOUT, default 300 s, or
@pytest.mark.timeout(N)); rosterd logs are printed when a test fails, and a
test fails when a rosterd log has a sanitizer report.
"""
import os
import signal
import subprocess
import tempfile

import pytest

import harness
from harness import (Amqp, Database, Names, RosterdFactory, Servers, SmtpSink, start_servers,
                     stop_servers)


def pytest_configure(config):
    config.addinivalue_line("markers", "timeout(seconds): time limit of the test")


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def _failed(request):
    for when in ("setup", "call"):
        rep = getattr(request.node, "rep_" + when, None)
        if rep is not None and rep.failed:
            return True
    return False


class _TestTimeout(Exception):
    pass


@pytest.fixture(autouse=True)
def _time_limit(request):
    m = request.node.get_closest_marker("timeout")
    limit = int(m.args[0]) if m else int(os.environ.get("ROSTERD_TEST_TIMEOUT", "300"))

    def expired(signum, frame):
        raise _TestTimeout("test exceeded its time limit of %d s" % limit)
    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(limit)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="session")
def servers(request):
    d = os.environ.get("ROSTERD_SERVERS")
    if d:
        env = os.path.join(d, "env")
        if not os.path.exists(env):
            pytest.exit("ROSTERD_SERVERS=%s has no env file: servers.sh start failed?" % d, 3)
        s = Servers(d)
        if not s.pg_up() or not s.rabbit_up():
            s.ensure_up()
        yield s
        return
    d = tempfile.mkdtemp(prefix="rosterd-servers.")
    try:
        s = start_servers(d)
    except Exception as e:
        stop_servers(d)
        pytest.exit("cannot start the test servers: %s" % e, 3)
    yield s
    failed = request.session.testsfailed > 0
    stop_servers(d, clean=not failed)
    if failed:
        print("\nserver logs kept in %s" % d)


@pytest.fixture
def db(servers, request):
    servers.ensure_up()
    d = Database(servers, request.node.name)
    yield d
    servers.ensure_up()
    d.drop()


@pytest.fixture
def names(request):
    return Names(request.node.name)


@pytest.fixture
def amqp(servers, names):
    servers.ensure_up()
    a = Amqp(servers, names)
    yield a
    a.close()
    # drop the test's queues; exchanges are left (cheap, and a still running
    # rosterd of another fixture scope could re-declare them anyway)
    if servers.rabbit_up():
        b = Amqp(servers, names)
        try:
            for q in ("queue", "retry_queue", "dead_queue"):
                try:
                    b.delete_queue(q)
                except Exception:
                    pass
        finally:
            b.close()


@pytest.fixture
def publish(amqp):
    return amqp.publish


@pytest.fixture
def smtp(tmp_path):
    s = SmtpSink.start(str(tmp_path / "smtp"))
    yield s
    s.stop()


@pytest.fixture
def smtp_tls(tmp_path):
    d = tmp_path / "smtp-tls"
    d.mkdir()
    cert, key = str(d / "cert.pem"), str(d / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    s = SmtpSink.start(str(d), tls_cert=cert, tls_key=key)
    s.cert = cert
    yield s
    s.stop()


@pytest.fixture
def rosterd(request, tmp_path, servers, db, names, smtp, amqp):
    f = RosterdFactory(str(tmp_path), request.node.name, servers, db, names, smtp, amqp)
    yield f
    report, findings = f.teardown(_failed(request))
    if report:
        print("\n".join(report))
        # the reason again after the logs, where a reader of the tail looks
        for when in ("setup", "call"):
            rep = getattr(request.node, "rep_" + when, None)
            if rep is not None and rep.failed:
                crash = getattr(rep.longrepr, "reprcrash", None)
                why = crash.message if crash is not None else str(rep.longrepr)[-2000:]
                print("----- %s failed (%s): %s" % (request.node.name, when, why[:2000]))
    if findings:
        pytest.fail("sanitizer report in rosterd log:\n" + "\n".join(findings), pytrace=False)


@pytest.fixture
def rosterctl(rosterd):
    """rosterctl(*args, input=None, check=False, **overrides-free) with a
    config for this test's database and names."""
    path = rosterd.config()

    def run(*args, **kw):
        return harness.rosterctl(path, *args, **kw)
    run.config_path = path
    return run
