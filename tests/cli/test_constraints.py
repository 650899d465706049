"""Constraints, ordering among due tasks, probe fallbacks and ``explain`` (SPEC sections 3, 6, 9).

Device state is simulated with ``KMPWM_ASSUME`` in the environment of each ``run-due``; the
helpers of tests/helpers.py run the real command line in subprocesses.  Probe failures are
tested in process (``kmpwm.scheduling.probes.Device`` and ``kmpwm.scheduling.plan``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from helpers import kjson, kmpwm_env, tasks_by_id

from kmpwm.core.timeparse import parse_duration
from kmpwm.scheduling.probes import Device, device_state_now, unmet

pytestmark = pytest.mark.both_stores(long=True)  # PostgreSQL's side runs in scripts/long-tier

# -- local helpers ------------------------------------------------------------------------------


def epoch(iso: str | None) -> float | None:
    if iso is None:
        return None
    assert iso.endswith("Z"), iso
    return datetime.fromisoformat(iso[:-1] + "+00:00").timestamp()


def assume(value: str | None) -> dict:
    return {"KMPWM_ASSUME": value}


def run_due(*args, env: dict | None = None) -> dict:
    return kjson("run-due", *args, env=env, check=0)[0]


def fake_run_due(offset: str, *args, env: dict | None = None) -> dict:
    """``run-due --json`` with the clock moved forward by ``offset`` (faketime)."""
    secs = parse_duration(offset.lstrip("+"))
    argv = ["faketime", "-f", f"+{secs:.0f}", sys.executable, "-m", "kmpwm", "run-due", *args, "--json"]
    proc = subprocess.run(argv, capture_output=True, text=True, env=kmpwm_env(env), timeout=60, input="")
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, f"{argv}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout)


def enqueue(*args, env: dict | None = None, check: int = 0) -> dict:
    return kjson("enqueue", *args, env=env, check=check)[0]


def task(task_id: str) -> dict:
    return tasks_by_id(kjson("inspect-queue", "--all", check=0)[0])[task_id]


def explain(task_id: str, env: dict | None = None) -> dict:
    doc = kjson("explain", task_id, env=env, check=0)[0]
    assert {"id", "state", "code", "reason", "next_run_at"} <= doc.keys(), doc
    assert doc["id"] == task_id
    return doc


def ran_ids(doc: dict) -> list[str]:
    return [r["id"] for r in doc["ran"]]


def skipped(doc: dict) -> dict[str, str]:
    for s in doc["skipped"]:
        assert set(s) == {"id", "reason"}, s
    return {s["id"]: s["reason"] for s in doc["skipped"]}


def write_config(home: Path, text: str) -> None:
    path = home / "config.toml"
    path.write_text(text)
    os.chmod(path, 0o600)


# -- each constraint, both ways ---------------------------------------------------------------

# (flags, KMPWM_ASSUME at enqueue, unmet reading, met reading, words the skip reason must contain)
CASES = {
    "requires-network": (["--requires-network"], None, "network=off", "network=on", ["network", "off"]),
    "connected": (["--network-type", "connected"], None, "network=off", "network=on", ["network", "off"]),
    "unmetered": (
        ["--network-type", "unmetered"],
        "metered=off",
        "network=on,metered=on",
        "network=on,metered=off",
        ["metered", "on"],
    ),
    "unmetered-offline": (
        ["--network-type", "unmetered"],
        "metered=off",
        "network=off,metered=off",
        "network=on,metered=off",
        ["network", "off"],
    ),
    "temporarily-unmetered": (
        ["--network-type", "temporarily-unmetered"],
        "metered=on",
        "network=on,metered=on",
        "network=on,metered=off",
        ["metered", "on"],
    ),
    "metered": (
        ["--network-type", "metered"],
        "metered=off",
        "network=on,metered=off",
        "network=on,metered=on",
        ["metered", "off"],
    ),
    "not-roaming": (
        ["--network-type", "not-roaming"],
        "roaming=off",
        "network=on,roaming=on",
        "network=on,roaming=off",
        ["roaming", "on"],
    ),
    "requires-charging": (["--requires-charging"], None, "charging=off", "charging=on", ["charging", "off"]),
    "battery-not-low": (["--battery-not-low"], None, "battery=14", "battery=15", ["battery", "14"]),
    "storage-not-low": (["--storage-not-low"], None, "storage_low=on", "storage_low=off", ["storage", "on"]),
    "device-idle": (["--device-idle"], None, "idle=off", "idle=on", ["idle", "off"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_constraint_skips_then_runs(name):
    flags, enq_assume, bad, good, words = CASES[name]
    doc = enqueue("t", "echo", *flags, env=assume(enq_assume))
    assert doc["result"] == "SUCCESS"
    out = run_due(env=assume(bad))
    assert ran_ids(out) == []
    reasons = skipped(out)
    assert "t" in reasons, out
    reason = reasons["t"].lower()
    for word in words:  # names the constraint and the reading
        assert word in reason, reason
    t = task("t")
    assert t["state"] == "ENQUEUED" and t["attempts"] == 0 and t["last_result"] is None
    out = run_due(env=assume(good))
    assert ran_ids(out) == ["t"] and out["ran"][0]["status"] == "SUCCESS"
    assert skipped(out) == {}


def test_constraints_in_spec_from_jsonl_and_all_must_hold():
    lines = [
        {"id": "both", "worker": "echo", "requires_charging": True, "battery_not_low": True},
        {"id": "plain", "worker": "echo"},
    ]
    kjson("enqueue", "--from", "-", input="\n".join(json.dumps(x) for x in lines), check=0)
    out = run_due(env=assume("charging=on,battery=3"))
    assert ran_ids(out) == ["plain"]
    assert "battery" in skipped(out)["both"] and "3" in skipped(out)["both"]
    out = run_due(env=assume("charging=off,battery=80"))
    assert ran_ids(out) == [] and "charging" in skipped(out)["both"]
    assert ran_ids(run_due(env=assume("charging=on,battery=80"))) == ["both"]


@pytest.mark.parametrize(
    "network_type, key",
    [
        ("unmetered", "metered"),
        ("metered", "metered"),
        ("temporarily-unmetered", "metered"),
        ("not-roaming", "roaming"),
    ],
)
def test_unobservable_network_type_is_rejected_os_policy(tmp_path, network_type, key):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    env = {"KMPWM_ASSUME": None, "PATH": str(empty)}  # no nmcli on PATH, nothing assumed
    doc = enqueue("r", "echo", "--network-type", network_type, env=env, check=69)
    assert doc["result"] == "REJECTED_OS_POLICY" and doc["error"]
    # other keys do not make it observable ...
    enqueue("r", "echo", "--network-type", network_type, env={**env, "KMPWM_ASSUME": "network=on"}, check=69)
    # ... a KMPWM_ASSUME key for the reading does
    doc = enqueue("r", "echo", "--network-type", network_type, env={**env, "KMPWM_ASSUME": f"{key}=off"})
    assert doc["result"] == "SUCCESS"


def test_observable_constraints_need_no_assume(tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    env = {"KMPWM_ASSUME": None, "PATH": str(empty)}
    specs = [
        {"requires_network": True},
        {"network_type": "connected"},
        {"requires_charging": True},
        {"battery_not_low": True},
        {"storage_not_low": True},
        {"device_idle": True},
    ]
    text = "\n".join(json.dumps({"id": f"ok{n}", "worker": "echo", **s}) for n, s in enumerate(specs))
    doc, _ = kjson("enqueue", "--from", "-", input=text, env=env, check=0)
    assert [r["result"] for r in doc["results"]] == ["SUCCESS"] * len(specs)


# -- ordering among due tasks -----------------------------------------------------------------


def test_order_expedited_then_qos_then_due_time():
    specs = [
        {"id": "low", "worker": "echo", "qos": "low"},
        {"id": "def-late", "worker": "echo", "delay": "2m"},
        {"id": "def-early", "worker": "echo", "delay": "1m"},
        {"id": "high", "worker": "echo", "qos": "high", "delay": "3m"},
        {"id": "exp-low", "worker": "echo", "expedited": True, "qos": "low", "delay": "4m"},
        {"id": "exp-high", "worker": "echo", "expedited": True, "qos": "high", "delay": "4m"},
    ]
    kjson("enqueue", "--from", "-", input="\n".join(json.dumps(s) for s in specs), check=0)
    out = fake_run_due("+5m", "--parallel", "1", "--max-tasks", "3")
    assert ran_ids(out) == ["exp-high", "exp-low", "high"]
    states = {i: task(i)["state"] for i in ("low", "def-late", "def-early")}
    assert states == {"low": "ENQUEUED", "def-late": "ENQUEUED", "def-early": "ENQUEUED"}
    out = fake_run_due("+5m", "--parallel", "1")
    assert ran_ids(out) == ["def-early", "def-late", "low"]


def test_max_tasks_with_constraint_skips_do_not_count():
    specs = [
        {"id": "net", "worker": "echo", "requires_network": True, "expedited": True},
        {"id": "a", "worker": "echo"},
        {"id": "b", "worker": "echo"},
    ]
    kjson("enqueue", "--from", "-", input="\n".join(json.dumps(s) for s in specs), check=0)
    out = run_due("--parallel", "1", "--max-tasks", "1", env=assume("network=off"))
    assert ran_ids(out) == ["a"]
    assert "net" in skipped(out)


# -- probes that fail fall back, run-due does not crash ----------------------------------------


class _BrokenNetwork(Device):
    def _probe_network(self) -> bool:
        raise OSError("no route to anywhere")


def test_probe_that_raises_falls_back_and_records_error():
    dev = _BrokenNetwork(assume={})
    assert dev.get("network") is True  # the permissive reading
    assert "network" in dev.errors and "no route" in dev.errors["network"]
    assert dev.get("network") is True  # cached: the probe runs once
    assert unmet({"network_type": "connected"}, dev) is None


def test_battery_probe_that_raises_falls_back(monkeypatch):
    import psutil

    def boom():
        raise RuntimeError("sysfs went away")

    monkeypatch.setattr(psutil, "sensors_battery", boom)
    dev = Device(assume={})
    assert dev.get("battery") == 100.0 and dev.get("charging") is True
    assert "battery" in dev.errors
    assert not dev.battery_low() and device_state_now("battery-okay", dev)
    assert unmet({"battery_not_low": True, "requires_charging": True}, dev) is None


def test_plan_survives_a_raising_probe(home):
    from kmpwm import Constraints, Scheduler
    from kmpwm.core import triggers
    from kmpwm.scheduling.plan import plan

    s = Scheduler(home=str(home))
    assert s.enqueue("n", None, "echo", constraints=Constraints(requires_network=True)) == "SUCCESS"
    assert s.enqueue("w", triggers.DeviceState("battery-low"), "echo") == "SUCCESS"

    class AllBroken(Device):
        def __getattribute__(self, name):
            if name.startswith("_probe_"):

                def fail():
                    raise OSError(f"{name} broke")

                return fail
            return object.__getattribute__(self, name)

    dev = AllBroken(assume={})
    p = plan(s.state(), time.time() + 1, dev)
    assert [t["id"] for t in p.due] == ["n"]  # network falls back to on; battery to 100% (not low)
    assert p.skipped == []
    assert {"network", "battery"} <= dev.errors.keys()


def test_assume_overrides_probes_in_process():
    dev = _BrokenNetwork(assume={"network": False})
    assert dev.get("network") is False and dev.errors == {}
    assert "network" in unmet({"network_type": "connected"}, dev)


def test_bad_kmpwm_assume_is_configuration_error():
    enqueue("x", "echo")
    proc_doc, rc = kjson("run-due", env=assume("battery=lots"))
    assert rc == 78 and proc_doc["exit_code"] == 78


# -- explain ---------------------------------------------------------------------------------


def test_explain_not_yet_due():
    doc = enqueue("nd", "echo", "--delay", "1h")
    ex = explain("nd")
    assert ex["state"] == "ENQUEUED" and ex["code"] == "not-due"
    assert ex["next_run_at"] == doc["next_run_at"] == task("nd")["next_run_at"]
    assert ex["reason"]


def test_explain_waiting_on_constraint_names_the_reading():
    enqueue("cw", "echo", "--requires-charging")
    ex = explain("cw", env=assume("charging=off"))
    assert ex["state"] == "ENQUEUED" and ex["code"] == "constraint"
    assert "charging" in ex["reason"] and "off" in ex["reason"]
    enqueue("bw", "echo", "--battery-not-low")
    ex = explain("bw", env=assume("battery=7"))
    assert ex["code"] == "constraint" and "battery" in ex["reason"] and "7" in ex["reason"]


def test_explain_backing_off_after_retry(home):
    write_config(home, f'[workers.again]\ncommand = [{json.dumps(sys.executable)}, "-c", "import sys; sys.exit(75)"]\n')
    enqueue("bo", "again", "--backoff-delay", "1h")
    t0 = time.time()
    out = run_due()
    assert [(r["id"], r["status"]) for r in out["ran"]] == [("bo", "RETRY")]
    ex = explain("bo")
    assert ex["state"] == "ENQUEUED" and ex["code"] == "backoff"
    assert t0 + 3600 - 5 < epoch(ex["next_run_at"]) < time.time() + 3600 + 5
    assert ex["reason"]


def test_explain_blocked_by_earlier_chain_step():
    doc = kjson("chain", "--id", "ch", "echo", "fail", check=0)[0]
    first, second = doc["tasks"]
    ex = explain(second)
    assert ex["state"] == "BLOCKED" and ex["code"] == "blocked"
    assert first in ex["reason"]
    assert explain(first)["code"] != "blocked"


def test_explain_held_by_lease_then_finished():
    enqueue("slow", "sleep", "--input", "3")
    bg = subprocess.Popen(
        [sys.executable, "-m", "kmpwm", "run-due", "--json"],
        env=kmpwm_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 15
        ex = explain("slow")
        while ex["code"] != "lease" and time.monotonic() < deadline and bg.poll() is None:
            time.sleep(0.1)
            ex = explain("slow")
        assert ex["code"] == "lease", ex
        assert ex["state"] == "RUNNING"
        assert str(bg.pid) in ex["reason"]
    finally:
        stdout, stderr = bg.communicate(timeout=30)
    assert bg.returncode == 0, stderr
    assert [r["id"] for r in json.loads(stdout)["ran"]] == ["slow"]
    ex = explain("slow")
    assert ex["state"] == "SUCCEEDED" and ex["code"] == "finished"
    assert ex["next_run_at"] is None


def test_explain_finished_failed_window_missed():
    enqueue("wf", "echo", "--window", "+1m", "+2m")
    fake_run_due("+10m")
    ex = explain("wf")
    assert ex["state"] == "FAILED" and ex["code"] == "finished"
    assert "window missed" in ex["reason"]


def test_explain_unknown_id_is_an_error():
    doc, rc = kjson("explain", "nobody")
    assert rc == 65 and doc["exit_code"] == 65 and doc["error"]
