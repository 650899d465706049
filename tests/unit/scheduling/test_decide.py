"""scheduling.decide: the one decision that run-due's plan acts on and explain puts into words.

Unit tests on hand-made states: the plan runs exactly the tasks explain calls due, lists in
``skipped`` exactly the held-back tasks whose time has come, and both tell the same story where
they once disagreed (a window that ended while paused or backing off; a RUNNING task whose
runner is gone but which a gate still holds back)."""

from __future__ import annotations

import pytest

from kmpwm.scheduling.decide import decide
from kmpwm.scheduling.explain import explain_task
from kmpwm.scheduling.plan import plan
from kmpwm.scheduling.probes import Device

NOW = 1_800_000_000.0
HOST = "here"


def task(tid: str, **kw) -> dict:
    t = {
        "id": tid,
        "state": "ENQUEUED",
        "trigger": {"type": "one_time"},
        "trig_state": {},
        "constraints": {},
        "due": NOW - 10,
        "seq": 1,
        "worker": "w",
        "attempts": 0,
        "occ_attempts": 0,
        "last_result": None,
        "lease": None,
        "crashes": 0,
        "tags": [],
    }
    t.update(kw)
    return t


def state_of(*tasks, **extra) -> dict:
    return {"tasks": {t["id"]: t for t in tasks}, "chains": {}, "fam": {}, "fences": {}, "qpause": None, **extra}


def gone_lease() -> dict:
    # another host's lease whose time is up: judged by the wall clock, whatever runs here
    return {"runner": "there/1/x", "pid": 1, "since": NOW - 100, "until": NOW - 1}


DEVICE = Device(assume={"charging": False, "network": True, "idle": True})

CASES = {
    "due": (task("a"), "due", None),
    "later": (task("a", due=NOW + 60), "not-due", None),
    "backoff": (task("a", due=NOW + 60, last_result={"status": "RETRY"}), "backoff", None),
    "paused, due": (task("a", paused=True), "paused", "paused"),
    "paused, later": (task("a", paused=True, due=NOW + 60), "paused", None),
    "constraint": (task("a", constraints={"requires_charging": True}), "constraint", "waiting for charging"),
    "pinned elsewhere": (task("a", host="there"), "host", "pinned to host there"),
    "window ended while paused": (
        task("a", trigger={"type": "windowed", "start": NOW - 99, "end": NOW - 5}, paused=True),
        "window-missed",
        None,
    ),
    "window ended in a backoff": (
        task("a", trigger={"type": "windowed", "start": NOW - 99, "end": NOW - 5}, due=NOW + 60),
        "window-missed",
        None,
    ),
    "runner gone": (task("a", state="RUNNING", lease=gone_lease()), "due", None),
    "runner gone, paused": (task("a", state="RUNNING", lease=gone_lease(), paused=True), "paused", "paused"),
    "runner gone, constraint": (
        task("a", state="RUNNING", lease=gone_lease(), constraints={"requires_charging": True}),
        "constraint",
        "waiting for charging",
    ),
    "held": (task("a", state="RUNNING", lease=dict(gone_lease(), until=NOW + 100)), "lease", None),
}


@pytest.mark.parametrize("name", CASES)
def test_plan_and_explain_tell_one_decision(name):
    t, code, skip = CASES[name]
    state = state_of(t)
    d = decide(t, state, NOW, DEVICE, host=HOST)
    p = plan(state, NOW, DEVICE, host=HOST)
    ex = explain_task(state, t, NOW, DEVICE, host=HOST)
    assert d.code == code
    assert ex["code"] == code
    assert [x["id"] for x in p.due] == (["a"] if code == "due" else [])
    reasons = [s["reason"] for s in p.skipped]
    assert reasons == [] if skip is None else len(reasons) == 1 and reasons[0].startswith(skip), reasons


def test_window_that_ended_fails_even_when_paused():
    t = task("a", trigger={"type": "windowed", "start": NOW - 99, "end": NOW - 5}, paused=True)
    p = plan(state_of(t), NOW, DEVICE, host=HOST)
    assert p.ops == [{"op": "fail", "id": "a", "seq": 1, "reason": "window missed"}]
    assert "FAILED (window missed)" in explain_task(state_of(t), t, NOW, DEVICE, host=HOST)["reason"]


def test_a_held_back_task_whose_runner_is_gone_says_both():
    t = task("a", state="RUNNING", lease=gone_lease(), paused=True)
    p = plan(state_of(t), NOW, DEVICE, host=HOST)
    assert p.broken == {"a"} and p.due == []
    reason = explain_task(state_of(t), t, NOW, DEVICE, host=HOST)["reason"]
    assert reason.startswith("its lease ended; paused"), reason


def test_quarantine_is_one_decision():
    t = task("a", state="RUNNING", lease=gone_lease(), crashes=2)
    d = decide(t, state_of(t), NOW, DEVICE, host=HOST)
    assert d.code == "quarantined" and d.ops[0]["reason"].startswith("quarantined")
    ex = explain_task(state_of(t), t, NOW, DEVICE, host=HOST)
    assert ex["code"] == "due" and "quarantined (FAILED)" in ex["reason"]
