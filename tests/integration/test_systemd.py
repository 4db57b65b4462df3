"""test_systemd.py - systemd integration without systemd as PID 1: the units
pass `systemd-analyze verify`, their exposure (`systemd-analyze security
--offline=true`) is at most 2.0, and a fake NOTIFY_SOCKET receives READY,
STATUS, WATCHDOG (from the main loop, also while PostgreSQL is down),
RELOADING and STOPPING."""
import os
import re
import shutil
import subprocess

import pytest

import harness
from harness import make_msg, wait_for

SRC = os.environ.get("ROSTERD_SOURCE",
                     os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
UNITS = ["rosterd.service", "rosterd@.service"]


def unit_copy(tmp_path, name):
    """The unit with ExecStart pointing at the binary under test (verify
    checks that the executable exists)."""
    text = open(os.path.join(SRC, "systemd", name)).read()
    text = text.replace("/usr/bin/rosterd", harness.rosterd_bin())
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", UNITS)
def test_unit_verifies(tmp_path, name):
    if not shutil.which("systemd-analyze"):
        pytest.fail("systemd-analyze missing: scripts/install-deps.sh installs systemd")
    path = unit_copy(tmp_path, name)
    target = path
    if "@" in name:  # verify an instance of the template
        target = tmp_path / name.replace("@", "@demo")
        shutil.copy(path, target)
    r = subprocess.run(["systemd-analyze", "verify", str(target)], capture_output=True, text=True)
    problems = [l for l in (r.stdout + r.stderr).splitlines()
                if l.strip() and "rosterd" in l and "not executable" not in l]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


@pytest.mark.parametrize("name", UNITS)
def test_unit_exposure_at_most_2(tmp_path, name):
    path = unit_copy(tmp_path, name)
    r = subprocess.run(["systemd-analyze", "security", "--offline=true", str(path)],
                       capture_output=True, text=True)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) <= 2.0, r.stdout


def test_unit_is_notify_with_watchdog_and_sandbox():
    text = open(os.path.join(SRC, "systemd", "rosterd.service")).read()
    for line in ("Type=notify", "Restart=on-failure", "ProtectSystem=strict", "ProtectHome=yes",
                 "PrivateTmp=yes", "NoNewPrivileges=yes", "CapabilityBoundingSet=",
                 "SystemCallFilter=@system-service", "RestrictAddressFamilies="):
        assert line in text
    assert re.search(r"^WatchdogSec=\d+", text, re.M)
    assert re.search(r"^ExecReload=.*HUP", text, re.M)


def test_sd_notify_lifecycle(rosterd, db, publish, servers):
    rd = rosterd(notify=True, env={"WATCHDOG_USEC": "1000000"}, status_interval=1)

    def seen(key, value=None):
        return any(key in m and (value is None or m[key] == value) for m in rd.notifications())
    wait_for(lambda: seen("READY", "1"), 10, message="READY=1")
    wait_for(lambda: seen("STATUS"), 10, message="STATUS=")
    wait_for(lambda: sum("WATCHDOG" in m for m in rd.notifications()) >= 3, 10,
             message="WATCHDOG=1 every half WATCHDOG_USEC")
    # the loop keeps beating while a dependency is down (degraded, not dead)
    servers.pg_stop()
    try:
        n = sum("WATCHDOG" in m for m in rd.notifications())
        wait_for(lambda: sum("WATCHDOG" in m for m in rd.notifications()) >= n + 3, 10,
                 message="watchdog while PostgreSQL is down")
        wait_for(lambda: any("degraded" in m.get("STATUS", "") for m in rd.notifications()), 10,
                 message="STATUS says degraded")
    finally:
        servers.pg_start()
    rd.sighup()
    wait_for(lambda: seen("RELOADING", "1"), 10, message="RELOADING=1")
    rd.sigterm()
    assert rd.wait_exit(15) == 0
    assert seen("STOPPING", "1")
