"""The real thing: `kmpwm schedule install --backend cron` writes the user's crontab with the real
`crontab` command, the real cron daemon reads it, and a due task runs without anyone calling
`run-due` by hand.

Needs root (to start cron) and Debian's `cron` package; skipped otherwise. It waits for the
daemon's next minute, so it takes up to about 70 seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
from helpers import kjson, kmpwm

CRON = shutil.which("cron") or "/usr/sbin/cron"
pytestmark = pytest.mark.skipif(
    not (os.path.exists(CRON) and shutil.which("crontab") and hasattr(os, "geteuid") and os.geteuid() == 0),
    reason="needs root, the cron daemon and crontab (Debian's cron package)",
)


def _crontab() -> tuple[int, str]:
    proc = subprocess.run(["crontab", "-l"], capture_output=True, text=True)
    return proc.returncode, proc.stdout


def _restore(saved: tuple[int, str]) -> None:
    code, text = saved
    if code == 0:
        subprocess.run(["crontab", "-"], input=text, text=True, check=True)
    else:
        subprocess.run(["crontab", "-r"], capture_output=True)


def _daemon_running() -> bool:
    return subprocess.run(["pgrep", "-x", "cron"], capture_output=True).returncode == 0


@pytest.fixture
def cron_daemon():
    saved = _crontab()
    started = None
    if not _daemon_running():
        started = subprocess.Popen([CRON, "-f"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        _restore(saved)
        if started is not None:
            started.terminate()
            try:
                started.wait(5)
            except subprocess.TimeoutExpired:
                started.kill()


def test_installed_crontab_line_makes_the_real_cron_daemon_run_a_due_task(cron_daemon, home, tmp_path):
    marker = tmp_path / "ran-by-cron"
    script = tmp_path / "worker.py"
    script.write_text(f"import pathlib, os\npathlib.Path({str(marker)!r}).write_text(os.environ['KMPWM_TASK_ID'])\n")
    config = home / "config.toml"
    config.write_text(f"[workers.mark]\ncommand = [{sys.executable!r}, {str(script)!r}]\n")
    os.chmod(config, 0o600)

    doc, rc = kjson("schedule", "install", "--backend", "cron", "--every", "1m")
    assert rc == 0, doc
    code, text = _crontab()
    assert code == 0 and "kmpwm" in text and "run-due" in text and str(home) in text
    assert kjson("schedule", "status", "--backend", "cron")[0]["installed"] is True

    assert kmpwm("enqueue", "by-cron", "mark").returncode == 0
    deadline = time.monotonic() + 75  # the daemon starts jobs at the top of each minute
    while time.monotonic() < deadline and not marker.exists():
        time.sleep(1)
    assert marker.exists(), f"cron did not run the task within 75s; crontab was:\n{text}"
    assert marker.read_text() == "by-cron"
    # run-due records the result a moment after the worker wrote the marker
    deadline = time.monotonic() + 15
    state = None
    while time.monotonic() < deadline:
        docs, _ = kjson("inspect-queue", "--all", "by-cron")
        state = docs["tasks"][0]["state"]
        if state == "SUCCEEDED":
            break
        time.sleep(0.5)
    assert state == "SUCCEEDED"
    status, _ = kjson("schedule", "status", "--backend", "cron")
    assert status["last_run_at"] is not None

    doc, rc = kjson("schedule", "uninstall", "--backend", "cron")
    assert rc == 0 and doc["action"] == "removed"
    assert "kmpwm" not in _crontab()[1]
