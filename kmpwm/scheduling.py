"""Deciding what runs: which tasks are due now, in what order, and why the others wait.

:func:`plan` reads the state and the device and returns the tasks to run, the tasks skipped
with a reason, and bookkeeping ops (a missed window, a device state re-armed, a task quarantined
after crashing its runners).  It writes nothing; the runner commits its ops with the claims.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .leases import lease_state
from .models import HEAVY_TIMEOUT, LIGHT_TIMEOUT
from .probes import Device, device_state_now, unmet
from .state import due_at, member, occurrence
from .triggers import change_signature

MAX_CRASHES = 3
QOS_RANK = {"high": 0, "default": 1, "low": 2}


@dataclass
class Plan:
    due: list[dict] = field(default_factory=list)  # tasks to run, best first
    skipped: list[dict] = field(default_factory=list)  # {"id", "reason"}
    ops: list[dict] = field(default_factory=list)  # bookkeeping to journal
    broken: set[str] = field(default_factory=set)  # ids whose lease holder is gone
    trig_updates: dict[str, dict] = field(default_factory=dict)  # id -> trig_state to record with the run
    occ: dict[str, str] = field(default_factory=dict)  # id -> the occurrence a claim consumes (state.occurrence)


def time_limit(task: dict, worker_timeout: float | None = None) -> float:
    c = task["constraints"]
    if c.get("timeout"):
        return float(c["timeout"])
    if worker_timeout:
        return float(worker_timeout)
    return HEAVY_TIMEOUT if c.get("heavy") else LIGHT_TIMEOUT


def order_key(t: dict):
    c = t["constraints"]
    return (0 if c.get("expedited") else 1, QOS_RANK.get(c.get("qos", "default"), 1), t["due"], t["seq"])


def plan(state: dict, now: float, device: Device, *, exclude: set | None = None,
         known_worker=None) -> Plan:
    """What is due at ``now``; ``exclude`` holds ids this run already ran or is running."""
    out = Plan()
    exclude = exclude if exclude is not None else set()
    for t in state["tasks"].values():
        st = t["state"]
        if st not in ("ENQUEUED", "RUNNING") or t["id"] in exclude:
            continue
        trig = t["trigger"]
        if st == "RUNNING":
            ls = lease_state(t, now)
            if ls == "held":
                continue
            if t.get("crashes", 0) + 1 >= MAX_CRASHES:
                out.ops.append({"op": "fail", "id": t["id"], "seq": t["seq"],
                                "reason": f"quarantined: its runner died {t['crashes'] + 1} times while running it"})
                continue
            if ls == "orphaned":
                out.broken.add(t["id"])
        elif due_at(t, now) > now:
            if trig["type"] == "windowed" and now > trig["end"]:
                out.ops.append({"op": "fail", "id": t["id"], "seq": t["seq"], "reason": "window missed"})
            continue
        if trig["type"] == "windowed" and now > trig["end"] and st == "ENQUEUED":
            out.ops.append({"op": "fail", "id": t["id"], "seq": t["seq"], "reason": "window missed"})
            continue
        if known_worker is not None and not known_worker(t["worker"]):
            out.skipped.append({"id": t["id"], "reason": f"unknown worker {t['worker']!r} (not registered any more)"})
            continue
        if trig["type"] == "on_change":
            sig = change_signature(trig["path"], trig.get("descendants", True))
            if sig == t["trig_state"].get("baseline"):
                continue  # nothing changed: not due
            out.trig_updates[t["id"]] = {"baseline": sig}
            out.occ[t["id"]] = occurrence(t, sig)
        elif trig["type"] == "device_state":
            inside = device_state_now(trig["state"], device)
            armed = t["trig_state"].get("armed", True)
            if not inside:
                if not armed:
                    out.ops.append({"op": "trig", "id": t["id"], "seq": t["seq"],  # a new entry is awaited
                                    "trig_state": {"armed": True, "entry": t["trig_state"].get("entry", 0) + 1}})
                continue
            if not armed:
                continue  # fired already on entering this state; re-arms when the device leaves it
            out.trig_updates[t["id"]] = {"armed": False}
        reason = unmet(t["constraints"], device)
        if reason:
            out.skipped.append({"id": t["id"], "reason": reason})
            continue
        out.occ.setdefault(t["id"], occurrence(t))
        out.due.append(t)
    out.due.sort(key=order_key)
    return out


def upstream_of(state: dict, t: dict) -> dict:
    """Merged ``data`` of the previous chain step, in declaration order (later keys win)."""
    chain = state["chains"].get(t.get("chain_id")) if t.get("chain_id") else None
    if chain is None or not t.get("step") or t["step"] < 2:
        return {}
    merged: dict = {}
    for tid in chain["steps"][t["step"] - 2]:
        prev = member(state, chain, tid)
        data = (prev or {}).get("last_result") or {}
        if isinstance(data.get("data"), dict):
            merged.update(data["data"])
    return merged
