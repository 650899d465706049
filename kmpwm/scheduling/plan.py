"""Deciding what runs: which tasks are due now, in what order, and why the others wait.

:func:`plan` reads the state and the device and returns the tasks to run, the tasks skipped
with a reason, and bookkeeping ops (a missed window, a device state re-armed, a task quarantined
after crashing its runners).  It writes nothing; the runner commits its ops with the claims.

Misfire grace (SPEC section 12) is decided here too, by :func:`misfire`, which ``explain`` calls
as well, so both say the same.  The rules:

- An occurrence is late by ``now - next_run_at`` (for ``--every --flex`` the start of the flex
  window, jitter included).  Later than the grace, it is not started: a ``missed`` event, and a
  repeating task goes on at the first time of its grid that is still within the grace (so it may
  run at once, in the occurrence that is on time), a one-time ``--at`` task ends FAILED ``missed``.
- Only the start of an occurrence is judged: a retry after a backoff and a re-run after an
  expiry continue an occurrence that did start, and a RUNNING task is never judged.
- A machine that slept (or a run-due invoker that was not running, or a ``serve`` that was
  stopped) is a misfire: the first run-due after waking judges the lateness.
- A constraint wait is not a misfire: when a run-due sees the occurrence due within its grace
  and holds it for a constraint, it records that (trig_state ``held``), and the occurrence runs
  whenever the constraint allows, however late.  A constraint that was already unmet when the
  first run-due saw the occurrence too late does not save it: that lateness was not the
  constraint's.
- ``serve`` (SPEC section 13) calls the same :func:`plan`, so it decides the same way.

Hosts (SPEC section 14): a task pinned to another host (``--host``, or an ``--on-change`` task
enqueued elsewhere) is not this runner's to judge: it is skipped, due, with the reason
:func:`pinned_elsewhere` gives, before anything else is decided, so no other host marks its
window missed, records it missed or counts its lease's end; the pinned host's runners do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kmpwm.core.hosts import pinned_elsewhere, this_host
from kmpwm.core.models import HEAVY_TIMEOUT, LIGHT_TIMEOUT
from kmpwm.core.state import due_at, member, occurrence, pause_of
from kmpwm.core.timeparse import format_duration, iso
from kmpwm.core.triggers import TIMED, change_signature, first_due_after, task_offset
from kmpwm.scheduling.leases import lease_state
from kmpwm.scheduling.probes import Device, device_state_now, unmet

MAX_CRASHES = 3
QOS_RANK = {"high": 0, "default": 1, "low": 2}


@dataclass
class Plan:
    due: list[dict] = field(default_factory=list)  # tasks to run, best first
    skipped: list[dict] = field(default_factory=list)  # {"id", "reason"}
    ops: list[dict] = field(default_factory=list)  # bookkeeping to journal
    broken: set[str] = field(default_factory=set)  # ids whose lease holder is gone
    fence_broken: set[str] = field(default_factory=set)  # ids whose cancelled run's holder is gone
    unstarted: set[str] = field(default_factory=set)  # ids whose gone holder never started the worker
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


def misfire(t: dict, now: float) -> dict | None:
    """The misfire decision for task ``t`` at ``now`` (see the module's docstring): None when it
    may start, else ``{"due", "late", "grace", "next"}`` where ``next`` is where a repeating task
    goes on (None: a one-time task, which ends FAILED ``missed``)."""
    grace = t["constraints"].get("misfire_grace")
    if not grace or t["state"] != "ENQUEUED" or t["due"] > now or t["trigger"]["type"] not in TIMED:
        return None
    if t.get("occ_attempts") or t.get("expiries"):
        return None  # the occurrence started already: its retries and re-runs are not judged
    if t["trig_state"].get("held") == t["due"]:
        return None  # seen due in time and held by a constraint: a constraint wait is not a misfire
    late = now - t["due"]
    if late <= grace:
        return None
    nxt = first_due_after(t["trigger"], t["trig_state"], now - grace, task_offset(t))
    return {"due": t["due"], "late": late, "grace": grace, "next": nxt}


def misfire_text(m: dict, outcome: bool = True) -> str:
    """ "missed: due at ..., 2h5m late (misfire grace 30m); next at ..." (``outcome``: with what
    happens to the task)."""
    late = "".join(re.findall(r"\d+[a-z]+", format_duration(m["late"]))[:2])  # the two largest units
    text = f"missed: due at {iso(m['due'])}, {late} late (misfire grace {format_duration(m['grace'])})"
    if not outcome:
        return text
    return text + (f"; next at {iso(m['next'])}" if m["next"] is not None else "; FAILED (missed)")


def missed_ops(t: dict, m: dict) -> dict:
    """The op that records a missed occurrence: the task moves on along its grid, or fails."""
    detail = {"due": iso(m["due"]), "late_ms": int(m["late"] * 1000), "grace": m["grace"]}
    if m["next"] is None:
        return {"op": "fail", "id": t["id"], "seq": t["seq"], "reason": "missed", "missed": detail}
    return {"op": "trig", "id": t["id"], "seq": t["seq"], "due": m["next"], "missed": dict(detail, next=iso(m["next"]))}


def plan(
    state: dict,
    now: float,
    device: Device,
    *,
    exclude: set | None = None,
    known_worker=None,
    host: str | None = None,
    started=None,
) -> Plan:
    """What is due at ``now``; ``exclude`` holds ids this run already ran or is running; ``host``
    is the runner's host name (default: this process's, core.hosts.this_host); ``started(t)``
    says whether the gone holder of RUNNING task ``t`` had started its worker (True, False, or
    None: cannot tell; scheduling.leases.holder_started).  A holder's death counts towards
    quarantine unless it had only claimed the task (ahead of a slot, or never started it)."""
    out = Plan()
    exclude = exclude if exclude is not None else set()
    fences = state.get("fences") or {}
    if host is None:
        host = this_host()
    for t in state["tasks"].values():
        st = t["state"]
        if st not in ("ENQUEUED", "RUNNING") or t["id"] in exclude:
            continue
        if t.get("host") is not None and t["host"] != host:
            if st == "ENQUEUED" and due_at(t, now) <= now:
                out.skipped.append({"id": t["id"], "reason": pinned_elsewhere(t, host)})
            continue  # the pinned host's runners judge it: its window, misfires, leases
        trig = t["trigger"]
        if st == "RUNNING":
            ls = lease_state(t, now)
            if ls == "held":
                continue
            counts = not (t["lease"] or {}).get("ahead")
            if counts and ls == "orphaned" and started is not None and started(t) is False:
                counts = False
                out.unstarted.add(t["id"])
            if counts and t.get("crashes", 0) + 1 >= MAX_CRASHES:
                out.ops.append(
                    {
                        "op": "fail",
                        "id": t["id"],
                        "seq": t["seq"],
                        "reason": f"quarantined: its runner died {t['crashes'] + 1} times while running it",
                    }
                )
                continue
            # taken over: its holder is gone, or its lease ended (the claim says so, so that every
            # reader's fold accepts it whatever its own clock says: a shared store's leases are
            # judged by the database's clock)
            out.broken.add(t["id"])
        elif fences and t["id"] in fences:
            # a cancelled run of this id is still stopping (state._finish): never start beside it
            fs = lease_state({"state": "RUNNING", "lease": fences[t["id"]]}, now)
            if fs == "held":
                if due_at(t, now) <= now:
                    out.skipped.append({"id": t["id"], "reason": "its cancelled previous run is still stopping"})
                continue
            out.fence_broken.add(t["id"])  # its holder is gone or its lease ended
        if st == "ENQUEUED" and due_at(t, now) > now:
            if trig["type"] == "windowed" and now > trig["end"]:
                out.ops.append({"op": "fail", "id": t["id"], "seq": t["seq"], "reason": "window missed"})
            continue
        if trig["type"] == "windowed" and now > trig["end"] and st == "ENQUEUED":
            out.ops.append({"op": "fail", "id": t["id"], "seq": t["seq"], "reason": "window missed"})
            continue
        if pause_of(state, t, now) is not None:
            out.skipped.append({"id": t["id"], "reason": "paused"})  # explain says by whom and until when
            continue
        if known_worker is not None and not known_worker(t["worker"]):
            out.skipped.append({"id": t["id"], "reason": f"unknown worker {t['worker']!r} (not registered any more)"})
            continue
        due_t = t["due"]
        if st == "ENQUEUED" and t["constraints"].get("misfire_grace"):
            m = misfire(t, now)
            if m is not None:
                out.ops.append(missed_ops(t, m))
                if m["next"] is None or m["next"] > now:
                    out.skipped.append({"id": t["id"], "reason": misfire_text(m)})
                    continue
                due_t = m["next"]  # the grid's next occurrence is on time: it may run in this pass
                out.occ[t["id"]] = occurrence(dict(t, due=due_t))  # the claim consumes that one
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
                    out.ops.append(
                        {
                            "op": "trig",
                            "id": t["id"],
                            "seq": t["seq"],  # a new entry is awaited
                            "trig_state": {"armed": True, "entry": t["trig_state"].get("entry", 0) + 1},
                        }
                    )
                continue
            if not armed:
                continue  # fired already on entering this state; re-arms when the device leaves it
            out.trig_updates[t["id"]] = {"armed": False}
        reason = unmet(t["constraints"], device)
        if reason:
            out.skipped.append({"id": t["id"], "reason": reason})
            if st == "ENQUEUED" and t["constraints"].get("misfire_grace") and t["trig_state"].get("held") != due_t:
                out.ops.append({"op": "trig", "id": t["id"], "seq": t["seq"], "trig_state": {"held": due_t}})
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
