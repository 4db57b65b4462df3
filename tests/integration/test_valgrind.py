"""test_valgrind.py - Step 7: one 10,000-event run of a plain (no sanitizer)
rosterd under valgrind memcheck, realistic messages of every common kind
(organisations, offers, templates, contacts, bookings with confirmation
mails sent by the worker threads, rejections), then a SIGTERM drain: zero
valgrind errors and no definite or indirect leaks.

Needs ROSTERD_PLAIN_BIN (scripts/test.sh builds build-plain and sets it);
skipped with that reason otherwise (valgrind on an ASan build is
meaningless)."""
import os
import re
import shutil
import stat

import pytest

from checks_util import realistic
from harness import wait_for, wait_messages

N_EVENTS = 10_000


def plain_bin():
    b = os.environ.get("ROSTERD_PLAIN_BIN")
    if not b:
        pytest.skip("ROSTERD_PLAIN_BIN is not set (a plain RelWithDebInfo rosterd; "
                    "scripts/test.sh builds build-plain/rosterd)")
    if not os.access(b, os.X_OK):
        pytest.fail("ROSTERD_PLAIN_BIN=%s is not an executable" % b)
    if not shutil.which("valgrind"):
        pytest.fail("valgrind is not installed (scripts/install-deps.sh installs it)")
    return b


def test_10000_events_under_valgrind(rosterd, amqp, db, smtp, tmp_path):
    binary = plain_bin()
    vglog = str(tmp_path / "valgrind.%p.log")
    wrapper = tmp_path / "rosterd-valgrind.sh"
    wrapper.write_text(
        "#!/bin/sh\nexec valgrind --tool=memcheck --error-exitcode=99 --leak-check=full "
        "--show-leak-kinds=definite,indirect --errors-for-leak-kinds=definite,indirect "
        "--track-fds=no --num-callers=30 --log-file=%s %s \"$@\"\n" % (vglog, binary))
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    rd = rosterd(start=False, workers=2, **{"daemon.batch_size": 100, "daemon.drain_timeout": 60})
    rd.binary = str(wrapper)
    rd.start()
    rd.wait_ready(180)

    setup, events = realistic(N_EVENTS)
    amqp.publish_many(setup)
    wait_messages(db, len(setup), timeout=120)
    amqp.publish_many(events)
    rows = wait_messages(db, N_EVENTS, timeout=600)
    assert len(rows) == N_EVENTS
    outcomes = {}
    for r in rows:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    bad = sum(1 for e in events if e["data"].get("email") == 5)
    assert outcomes.get("rejected", 0) == bad
    assert outcomes.get("applied", 0) + outcomes.get("stale", 0) == N_EVENTS - bad
    # the mail worker threads ran too: every notifying booking got its mail
    mails = sum(1 for e in events if e["type"] == "booking.created" and e["data"]["notify"])
    wait_for(lambda: db.query1("SELECT count(*) FROM report.outbox WHERE status = 'sent'")
             == mails, 300, 0.5, "%d mails sent" % mails)

    assert rd.stop(180) == 0, "valgrind reported errors (exit 99) or rosterd failed"
    logs = [os.path.join(tmp_path, f) for f in os.listdir(tmp_path)
            if f.startswith("valgrind.") and f.endswith(".log")]
    assert logs, "no valgrind log"
    text = "".join(open(f, encoding="utf-8", errors="replace").read() for f in logs)
    summary = re.findall(r"ERROR SUMMARY: (\d+) errors", text)
    assert summary and all(s == "0" for s in summary), text[-6000:]
    for kind in ("definitely", "indirectly"):
        m = re.search(r"%s lost: ([\d,]+) bytes" % kind, text)
        assert m is None or m.group(1) == "0", text[-6000:]
