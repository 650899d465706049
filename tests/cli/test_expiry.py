"""End-to-end tests of expiry (SPEC sections 3-6, 9): time limits, ``--budget``,
``simulate-expire``, a run-due killed mid-run, SIGTERM then SIGKILL after the grace period, and
chain savepoints.  Real processes only; every wait is a polling loop with a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import jdoc as kjson  # kjson(ARGS, expect=N) -> the --json document
from helpers import kmpwm

pytestmark = pytest.mark.both_stores(long=True)  # PostgreSQL's side runs in scripts/long-tier

PY = sys.executable

# -- local helpers ----------------------------------------------------------------------------


def tasks() -> dict:
    return {t["id"]: t for t in kjson("inspect-queue", "--all")["tasks"]}


def chains() -> dict:
    return {c["id"]: c for c in kjson("inspect-queue", "--all")["chains"]}


def lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def pid_gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie nobody reaped counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(")") + 2 :].startswith(("Z", "X"))


def write_config(home: Path, workers: dict[str, dict]) -> None:
    out = []
    for name, spec in workers.items():
        out.append(f"[workers.{name}]")
        out += [f"{k} = {json.dumps(v)}" for k, v in spec.items()]
        out.append("")
    path = home / "config.toml"
    path.write_text("\n".join(out))
    os.chmod(path, 0o600)


# A command worker configured by argv[1] (JSON):
#   marker     file: one JSON line {"id", "pid", "attempt"} appended when the run starts
#   sleep      seconds to sleep (0 if the file ``fast_if`` exists)
#   ignore_term  ignore SIGTERM (so only SIGKILL stops it)
#   out        JSON object printed as the last stdout line
WORKER = r"""
import json, os, signal, sys, time

cfg = json.loads(sys.argv[1])
if cfg.get("ignore_term"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
fd = os.open(cfg["marker"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
os.write(fd, (json.dumps({"id": os.environ.get("KMPWM_TASK_ID"), "pid": os.getpid(),
                          "attempt": os.environ.get("KMPWM_ATTEMPT")}) + "\n").encode())
os.close(fd)
seconds = cfg.get("sleep", 0)
if cfg.get("fast_if") and os.path.exists(cfg["fast_if"]):
    seconds = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    time.sleep(min(0.1, max(0.0, end - time.monotonic())))
if cfg.get("out") is not None:
    print(json.dumps(cfg["out"]))
"""


@pytest.fixture
def declare(home, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)

    def declare(**workers):
        write_config(home, {name: {"command": [PY, str(script), json.dumps(cfg)]} for name, cfg in workers.items()})

    return declare


@pytest.fixture
def chain_abc(tmp_path, declare):
    """Chain ``x``: wA -> wB (slow until ``fast`` exists, and ignoring nothing) -> wC."""
    m = {k: tmp_path / f"{k}.marks" for k in "ABC"}
    fast = tmp_path / "fast"
    declare(
        wA={"marker": str(m["A"]), "out": {"a": 1}},
        wB={"marker": str(m["B"]), "sleep": 30, "fast_if": str(fast), "out": {"b": 2}},
        wC={"marker": str(m["C"]), "out": {"c": 3}},
    )
    doc = kjson("chain", "--id", "x", "wA", "wB", "wC")
    assert doc["tasks"] == ["x/1/wA", "x/2/wB", "x/3/wC"]
    return m, fast


def start_run_due(*extra) -> subprocess.Popen:
    return subprocess.Popen(
        [PY, "-m", "kmpwm", "run-due", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_until_b_runs(proc: subprocess.Popen, marks: dict) -> int:
    def b_started():
        assert proc.poll() is None, f"run-due ended early: {proc.returncode} {proc.communicate()}"
        return lines(marks["B"])

    [rec] = wait_for(b_started, 60, "the slow step B to start")
    wait_for(lambda: tasks()["x/2/wB"]["state"] == "RUNNING", 30, "B RUNNING in inspect-queue")
    return rec["pid"]


def finish_chain_and_check(marks: dict, fast: Path) -> None:
    """Make B fast, run run-due again: B and C run, A does not; the chain succeeds."""
    fast.touch()
    run = kjson("run-due")
    assert sorted(r["id"] for r in run["ran"]) == ["x/2/wB", "x/3/wC"]
    assert all(r["status"] == "SUCCESS" for r in run["ran"])
    assert len(lines(marks["A"])) == 1, "a step that succeeded ran again"
    assert len(lines(marks["C"])) == 1
    state = tasks()
    assert [state[i]["state"] for i in ("x/1/wA", "x/2/wB", "x/3/wC")] == ["SUCCEEDED"] * 3
    assert state["x/3/wC"]["last_result"]["data"] == {"c": 3}
    ch = chains()["x"]
    assert ch["state"] == "SUCCEEDED" and ch["next_step"] is None


# -- simulate-expire --------------------------------------------------------------------------


def test_simulate_expire_savepoints_the_chain_and_resumes(chain_abc):
    marks, fast = chain_abc
    proc = start_run_due()
    try:
        worker_pid = wait_until_b_runs(proc, marks)
        r = kmpwm("simulate-expire", "x/2/wB")
        assert r.returncode == 0, (r.stdout, r.stderr)
        t0 = time.monotonic()
        proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 75
    assert took < 15, f"run-due needed {took:.1f}s to stop after simulate-expire"
    wait_for(lambda: pid_gone(worker_pid), 10, "the worker to be stopped")

    state = tasks()
    assert state["x/1/wA"]["state"] == "SUCCEEDED"
    b = state["x/2/wB"]
    assert b["state"] == "ENQUEUED"
    assert b["attempts"] == 0, "an expired run must not count as an attempt"
    assert b["last_result"]["status"] == "EXPIRED"
    assert state["x/3/wC"]["state"] == "BLOCKED"
    assert chains()["x"]["next_step"] == 2
    assert len(lines(marks["A"])) == 1
    assert lines(marks["C"]) == []

    finish_chain_and_check(marks, fast)
    assert [m["attempt"] for m in lines(marks["B"])] == ["1", "1"], "the run after an expiry has the same attempt"


def test_simulate_expire_with_nothing_running_exits_1():
    kjson("enqueue", "idle", "echo")  # known but not running
    assert kmpwm("simulate-expire", "nothing-running").returncode == 1
    assert kmpwm("simulate-expire", "idle").returncode == 1
    assert kmpwm("simulate-expire", "--all").returncode == 1


# -- run-due killed ---------------------------------------------------------------------------


def test_sigkill_of_run_due_kills_the_worker_and_the_next_run_resumes(chain_abc):
    marks, fast = chain_abc
    proc = start_run_due()
    try:
        worker_pid = wait_until_b_runs(proc, marks)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    wait_for(lambda: pid_gone(worker_pid), 10, "the worker to die with its run-due (PR_SET_PDEATHSIG)")

    assert tasks()["x/2/wB"]["attempts"] == 0
    # B's lease (30 s limit + grace + margin) has not ended, but its holder on this host is dead:
    # the next run-due takes B over at once instead of waiting for the lease to end
    t0 = time.monotonic()
    finish_chain_and_check(marks, fast)
    assert time.monotonic() - t0 < 20
    assert len(lines(marks["B"])) == 2


# -- budget and time limits -------------------------------------------------------------------


def test_budget_expires_the_run_exit_75():
    kjson("enqueue", "long", "sleep", "--input", "30")
    t0 = time.monotonic()
    r = kmpwm("run-due", "--budget", "2s", "--grace", "1s", "--json")
    took = time.monotonic() - t0
    assert r.returncode == 75, (r.stdout, r.stderr)
    assert 1.5 <= took < 15, took
    doc = json.loads(r.stdout)
    assert [(e["id"], e["worker"]) for e in doc["expired"]] == [("long", "sleep")]
    assert [(row["id"], row["status"]) for row in doc["ran"]] == [("long", "EXPIRED")]
    t = tasks()["long"]
    assert t["state"] == "ENQUEUED"
    assert t["attempts"] == 0
    assert t["last_result"]["status"] == "EXPIRED"


def test_budget_with_a_non_cooperative_command_worker(tmp_path, declare):
    marker = tmp_path / "m"
    declare(stubborn={"marker": str(marker), "sleep": 30})
    kjson("enqueue", "s", "stubborn")
    t0 = time.monotonic()
    r = kmpwm("run-due", "--budget", "2s", "--grace", "1s", "--json")
    took = time.monotonic() - t0
    assert r.returncode == 75, (r.stdout, r.stderr)
    assert took < 15, took
    doc = json.loads(r.stdout)
    assert [(row["id"], row["status"]) for row in doc["ran"]] == [("s", "EXPIRED")]
    assert [e["id"] for e in doc["expired"]] == ["s"]
    [rec] = lines(marker)
    wait_for(lambda: pid_gone(rec["pid"]), 10, "the worker to be stopped")
    assert tasks()["s"]["state"] == "ENQUEUED"


def test_task_timeout_expires_but_run_due_exits_0():
    kjson("enqueue", "slow", "sleep", "--input", "30", "--timeout", "1s")
    t0 = time.monotonic()
    r = kmpwm("run-due", "--grace", "2s", "--json")
    took = time.monotonic() - t0
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert took < 15, took
    doc = json.loads(r.stdout)
    assert [(row["id"], row["status"]) for row in doc["ran"]] == [("slow", "EXPIRED")]
    assert [e["id"] for e in doc["expired"]] == ["slow"]
    t = tasks()["slow"]
    assert t["state"] == "ENQUEUED"
    assert t["attempts"] == 0
    assert t["last_result"]["status"] == "EXPIRED"


def test_worker_ignoring_sigterm_is_killed_after_the_grace(tmp_path, declare):
    marker = tmp_path / "m"
    declare(deaf={"marker": str(marker), "sleep": 30, "ignore_term": True})
    kjson("enqueue", "deaf", "deaf", "--timeout", "1s")
    t0 = time.monotonic()
    r = kmpwm("run-due", "--grace", "1s", "--json")
    took = time.monotonic() - t0
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert took < 15, f"a worker ignoring SIGTERM was not killed after the grace ({took:.1f}s)"
    doc = json.loads(r.stdout)
    assert [(row["id"], row["status"]) for row in doc["ran"]] == [("deaf", "EXPIRED")]
    [rec] = lines(marker)
    wait_for(lambda: pid_gone(rec["pid"]), 10, "the SIGTERM-ignoring worker to be killed")
    assert tasks()["deaf"]["state"] == "ENQUEUED"


def test_a_task_that_keeps_expiring_ends_failed_after_5():
    kjson("enqueue", "never", "sleep", "--input", "30", "--timeout", "1s")
    for n in range(1, 6):
        r = kmpwm("run-due", "--grace", "1s", "--json")
        assert r.returncode == 0, (n, r.stdout, r.stderr)
        doc = json.loads(r.stdout)
        assert [(row["id"], row["status"]) for row in doc["ran"]] == [("never", "EXPIRED")], n
        t = tasks()["never"]
        assert t["attempts"] == 0
        if n < 5:
            assert t["state"] == "ENQUEUED", n
        else:
            assert t["state"] == "FAILED"
            assert "expired" in (t["reason"] or "").lower()
    assert kjson("run-due")["ran"] == []
