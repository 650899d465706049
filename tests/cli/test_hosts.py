"""Hosts (SPEC section 14): every runner has a host name (``KMPWM_HOST``, else the machine's
name), ``--host NAME`` pins a task to one host, ``--on-change`` tasks are pinned to the host that
enqueued them, and task JSON shows ``host`` and, while running, ``lease.host``.

Several "hosts" here are runners on this one machine with different ``KMPWM_HOST`` values
sharing one home, which is also how two runners with different names must treat each other's
leases: as another host's, judged by the lease's end and never by pid liveness."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime

import pytest
from helpers import jdoc, kjson, kmpwm, kmpwm_env, tasks_by_id

A, B, C = {"KMPWM_HOST": "host-a"}, {"KMPWM_HOST": "host-b"}, {"KMPWM_HOST": "host-c"}


def queue(env=A, *args) -> dict:
    return tasks_by_id(jdoc("inspect-queue", "--all", *args, env=env))


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {stderr!r}"
    return lines[0]


# -- pinning ---------------------------------------------------------------------------------


def test_pinned_task_runs_only_on_its_host_and_explain_says_why():
    kmpwm("enqueue", "t", "echo", "--host", "host-b", env=A, check=0)
    kmpwm("enqueue", "u", "echo", env=A, check=0)
    q = queue()
    assert q["t"]["host"] == "host-b" and q["u"]["host"] is None
    assert q["t"]["lease"] is None

    doc = jdoc("run-due", env=A)
    assert [r["id"] for r in doc["ran"]] == ["u"]
    assert doc["skipped"] == [{"id": "t", "reason": "pinned to host host-b (this is host host-a)"}]
    # with nothing else due (run-due's quick idle path) it says the same
    assert jdoc("run-due", env=A)["skipped"] == doc["skipped"]
    assert queue()["t"]["state"] == "ENQUEUED" and queue()["t"]["attempts"] == 0

    ex = jdoc("explain", "t", env=A)
    assert ex["code"] == "host" and ex["running"] is False
    assert ex["reason"].startswith("pinned to host host-b") and ex["details"]["host"] == "host-b"
    human = kmpwm("explain", "t", env=A, check=0).stdout + kmpwm("explain", "t", env=A).stderr
    assert "pinned to host host-b" in human
    assert "on host-b" in kmpwm("inspect-queue", env=A, check=0).stdout + kmpwm("inspect-queue", env=A).stderr

    doc = jdoc("run-due", env=B)
    assert [(r["id"], r["status"]) for r in doc["ran"]] == [("t", "SUCCESS")]
    assert doc["skipped"] == []
    t = queue()["t"]
    assert t["state"] == "SUCCEEDED" and t["host"] == "host-b" and t["attempts"] == 1


def test_pinned_elsewhere_is_never_failed_or_missed_there():
    """Another host does not judge a pinned task: a missed window is for its own host to record."""
    kmpwm("enqueue", "w", "echo", "--host", "host-b", "--window", "+0s", "+1s", env=A, check=0)
    time.sleep(1.5)
    jdoc("run-due", env=A)
    assert queue()["w"]["state"] == "ENQUEUED"
    jdoc("run-due", env=B)
    w = queue()["w"]
    assert w["state"] == "FAILED" and w["reason"] == "window missed"


def test_run_now_refuses_a_task_pinned_elsewhere():
    kmpwm("enqueue", "t", "echo", "--host", "host-b", "--delay", "1h", env=A, check=0)
    doc, rc = kjson("run-now", "t", env=A)
    assert rc == 1 and doc["ran"] == []
    assert doc["skipped"] == [{"id": "t", "reason": "pinned to host host-b (this is host host-a): it runs only there"}]
    proc = kmpwm("run-now", "t", env=A, check=1)
    assert "pinned to host host-b" in proc.stdout + proc.stderr
    assert queue()["t"]["attempts"] == 0
    # --ignore-constraints does not move it: the host is not a constraint
    assert kjson("run-now", "t", "--ignore-constraints", env=A)[1] == 1
    doc, rc = kjson("run-now", "t", env=B)
    assert rc == 0 and [r["id"] for r in doc["ran"]] == ["t"]


def test_on_change_task_is_pinned_to_the_enqueuing_host(tmp_path):
    watched = tmp_path / "watched"
    watched.mkdir()
    doc = jdoc("enqueue", "oc", "echo", "--on-change", watched, env=A)
    assert doc["result"] == "SUCCESS"
    assert queue()["oc"]["host"] == "host-a"
    (watched / "new").write_text("x")
    doc = jdoc("run-due", env=B)
    assert doc["ran"] == []
    assert doc["skipped"] == [{"id": "oc", "reason": "pinned to host host-a (this is host host-b)"}]
    assert jdoc("explain", "oc", env=B)["code"] == "host"
    assert [r["id"] for r in jdoc("run-due", env=A)["ran"]] == ["oc"]
    assert queue()["oc"]["state"] == "ENQUEUED"  # on-change repeats, still pinned
    assert queue()["oc"]["host"] == "host-a"


def test_on_change_with_another_host_is_rejected_and_with_this_one_accepted(tmp_path):
    doc, rc = kjson("enqueue", "oc", "echo", "--on-change", tmp_path, "--host", "host-b", env=A)
    assert rc == 65 and doc["result"] == "REJECTED_INVALID_PARAMS" and "host-b" in doc["error"]
    proc = kmpwm("enqueue", "oc", "echo", "--on-change", tmp_path, "--host", "host-b", env=A, check=65)
    assert "on-change" in one_line(proc.stderr)
    assert jdoc("inspect-queue", "--all", env=A)["tasks"] == []
    kmpwm("enqueue", "oc", "echo", "--on-change", tmp_path, "--host", "host-a", env=A, check=0)
    assert queue()["oc"]["host"] == "host-a"


def test_chain_host_applies_to_every_task_and_a_chain_file_may_pin_one():
    doc = jdoc("chain", "--id", "ch", "--host", "host-b", "echo", "echo+fail", env=A)
    assert doc["result"] == "SUCCESS"
    q = queue()
    assert {q[i]["host"] for i in doc["tasks"]} == {"host-b"}
    spec = {"id": "cf", "steps": [[{"worker": "echo", "host": "host-c"}], [{"worker": "echo"}]]}
    doc = jdoc("chain", "--file", "-", input=json.dumps(spec), env=A)
    q = queue()
    assert [q[i]["host"] for i in doc["tasks"]] == ["host-c", None]
    assert jdoc("run-due", env=A)["ran"] == []  # only steps pinned elsewhere are due
    # host-c runs its step, then the unpinned next step (any host) in the same run
    assert [r["id"] for r in jdoc("run-due", env=C)["ran"]] == ["cf/1/echo", "cf/2/echo"]
    assert sorted(r["id"] for r in jdoc("run-due", env=B)["ran"]) == ["ch/1/echo", "ch/2/echo", "ch/2/fail"]


def test_enqueue_from_spec_lines_take_host():
    lines = json.dumps({"id": "x", "worker": "echo", "host": "host-b"}) + "\n"
    lines += json.dumps({"id": "y", "worker": "echo"}) + "\n"
    jdoc("enqueue", "--from", "-", input=lines, env=A)
    q = queue()
    assert q["x"]["host"] == "host-b" and q["y"]["host"] is None
    bad = json.dumps({"id": "z", "worker": "echo", "host": 5}) + "\n"
    doc, rc = kjson("enqueue", "--from", "-", input=bad, env=A)
    assert rc == 65 and "z" not in queue()


def test_policy_update_takes_the_new_requests_host():
    kmpwm("enqueue", "t", "echo", "--host", "host-b", "--delay", "1h", env=A, check=0)
    assert jdoc("enqueue", "t", "echo", "--delay", "1h", "--policy", "update", env=A)["action"] == "updated"
    assert queue()["t"]["host"] is None
    jdoc("enqueue", "t", "echo", "--delay", "1h", "--policy", "update", "--host", "host-c", env=A)
    assert queue()["t"]["host"] == "host-c"
    changed = [e["changed"] for e in jdoc("events", "--task", "t", env=A)["events"] if e["event"] == "updated"]
    assert changed == [["host"], ["host"]]
    # keep: the task stays as it was
    jdoc("enqueue", "t", "echo", "--host", "host-b", env=A)
    assert queue()["t"]["host"] == "host-c"


def test_python_api_host_keyword(kmpwm_home, monkeypatch):
    monkeypatch.setenv("KMPWM_HOST", "host-a")
    from kmpwm import Scheduler, triggers

    s = Scheduler(kmpwm_home)
    assert s.enqueue("p", None, "echo", host="host-b").value == "SUCCESS"
    assert s.enqueue("q", None, "echo").value == "SUCCESS"
    assert s.enqueue("bad", None, "echo", host="a/b").value == "REJECTED_INVALID_PARAMS"
    assert s.enqueue("oc", triggers.OnChange(str(kmpwm_home)), "echo", host="host-b").value == "REJECTED_INVALID_PARAMS"
    assert s.enqueue("oc", triggers.OnChange(str(kmpwm_home)), "echo").value == "SUCCESS"
    q = queue()
    assert (q["p"]["host"], q["q"]["host"], q["oc"]["host"]) == ("host-b", None, "host-a")
    assert "bad" not in q


def test_jitter_of_a_pinned_task_is_its_hosts():
    from kmpwm.core.triggers import jitter_offset

    at = int(time.time()) + 7200
    doc = jdoc("enqueue", "j", "echo", "--at", f"@{at}", "--jitter", "30m", "--host", "host-b", env=A)
    due = datetime.fromisoformat(doc["next_run_at"].replace("Z", "+00:00")).timestamp()
    assert due == pytest.approx(at + jitter_offset("j", 1800, host="host-b"), abs=0.002)


# -- bad names -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["a/b", "a b", "tab\there", "x" * 254, "nl\n"])
def test_invalid_kmpwm_host_is_a_one_line_configuration_error(bad):
    kmpwm("enqueue", "t", "echo", check=0)
    for args in (("run-due",), ("inspect-queue",), ("enqueue", "u", "echo"), ("explain", "t")):
        proc = kmpwm(*args, env={"KMPWM_HOST": bad}, check=78)
        assert "KMPWM_HOST" in one_line(proc.stderr)
        doc, rc = kjson(*args, env={"KMPWM_HOST": bad})
        assert rc == 78 and doc["exit_code"] == 78 and "KMPWM_HOST" in doc["error"]
    assert queue(None)["t"]["state"] == "ENQUEUED"  # nothing ran under the bad name
    assert "u" not in queue(None)


def test_empty_kmpwm_host_means_the_machines_name():
    import socket

    kmpwm("enqueue", "t", "echo", "--host", socket.gethostname(), env={"KMPWM_HOST": ""}, check=0)
    assert [r["id"] for r in jdoc("run-due", env={"KMPWM_HOST": ""})["ran"]] == ["t"]


@pytest.mark.parametrize("bad", ["a/b", "", "a b", "x" * 254, "bell\x07"])
def test_invalid_host_flag_is_rejected_with_one_line(bad):
    proc = kmpwm("enqueue", "t", "echo", "--host", bad, env=A, check=65)
    assert "invalid host" in one_line(proc.stderr)
    doc, rc = kjson("enqueue", "t", "echo", "--host", bad, env=A)
    assert rc == 65 and doc["result"] == "REJECTED_INVALID_PARAMS"
    assert kjson("chain", "--host", bad, "echo", env=A)[1] == 65
    assert jdoc("inspect-queue", "--all", env=A)["tasks"] == []


def test_longest_host_name_is_accepted():
    name = "h" * 253
    kmpwm("enqueue", "t", "echo", "--host", name, env=A, check=0)
    assert [r["id"] for r in jdoc("run-due", env={"KMPWM_HOST": name})["ran"]] == ["t"]


# -- leases ----------------------------------------------------------------------------------


def _spawn_run_due(env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kmpwm", "run-due", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=kmpwm_env(env),
        start_new_session=True,  # its own process group: the test can end it with its workers
    )


def _wait_running(task_id: str, env, timeout: float = 30.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        t = queue(env).get(task_id)
        if t and t["state"] == "RUNNING":
            return t
        time.sleep(0.1)
    raise AssertionError(f"{task_id} never became RUNNING")


def test_running_task_shows_lease_host_and_other_hosts_leave_it_alone():
    kmpwm("enqueue", "s", "sleep", "--input", "3", env=C, check=0)
    proc = _spawn_run_due(C)
    try:
        t = _wait_running("s", A)
        lease = t["lease"]
        assert lease["host"] == "host-c" and lease["runner"].startswith("host-c/") and lease["pid"] == proc.pid
        assert t["host"] is None
        ex = jdoc("explain", "s", env=A)
        assert ex["running"] is True and ex["details"]["lease"]["host"] == "host-c"
        assert "on host host-c" in ex["reason"] and "lease until" in ex["reason"]
        assert "on host" not in jdoc("explain", "s", env=C)["reason"]  # its own host: judged by the pid
        assert jdoc("run-due", env=A)["ran"] == []  # held: never a second run beside it
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert [r["id"] for r in json.loads(out)["ran"]] == ["s"]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    t = queue(A)["s"]
    assert t["state"] == "SUCCEEDED" and t["lease"] is None


def test_a_dead_holder_frees_its_lease_only_on_its_own_host():
    """Two runner names on one machine: host-a cannot check host-c's pids, so a lease of a
    host-c runner that died holds on host-a until it ends; on host-c it is free at once."""
    kmpwm("enqueue", "s", "sleep", "--input", "60", "--timeout", "10m", env=C, check=0)
    proc = _spawn_run_due(C)
    try:
        _wait_running("s", C)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the runner and its worker, with no word to the journal
        proc.wait()
    a = queue(A)["s"]
    assert a["state"] == "RUNNING" and a["lease"]["host"] == "host-c"  # judged by its end (minutes away)
    assert jdoc("explain", "s", env=A)["running"] is True
    assert jdoc("run-due", "--dry-run", env=A)["ran"] == []
    c = queue(C)["s"]
    assert c["state"] == "ENQUEUED" and "is gone" in (c["reason"] or "")  # its pid is checked here
    assert [r["id"] for r in jdoc("run-due", "--dry-run", env=C)["ran"]] == ["s"]


def test_serve_is_not_woken_by_tasks_pinned_elsewhere():
    """An idle serve sleeps until something can run here: a due task pinned to another host
    neither wakes it now nor makes it re-check the device every minute."""
    from kmpwm.core.state import apply, idle_at, new_state
    from kmpwm.running.serve import wake_plan

    now = 1_800_000_000.0
    state = new_state()
    task = {"id": "t", "worker": "echo", "trigger": {"type": "one_time", "delay": 0.0}, "created_at": now}
    apply(state, {"ts": now, "ops": [{"op": "enq", "task": dict(task, host="host-b"), "policy": "keep"}]})
    assert wake_plan(state, now + 1, "host-a/1/r", "host-a") == (None, {})
    assert idle_at(state, now + 1, "host-a") and not idle_at(state, now + 1, "host-b")
    assert wake_plan(state, now + 1, "host-b/1/r", "host-b")[0] is not None
