"""The one decision: is this task due now, and if not, why?

:func:`decide` judges one task at one moment on one host and returns a :class:`Decision`.
``run-due``'s plan (scheduling.plan) orders and filters the decisions of every task and journals
their bookkeeping ops; ``explain`` (scheduling.explain) puts one decision into words.  Neither
re-checks anything: a change of the rules is made here, and both tell it.

The gates, in order (the first that holds the task back decides):

1. a RUNNING task: its lease still held (``lease``), pinned to another host (``host``), its
   runner dead too often (``quarantined``: FAILED); else it is taken over and judged as below;
2. pinned to another host (``host``), a cancelled previous run still stopping (``stopping``),
   a window that ended (``window-missed``: FAILED);
3. paused (``paused``), its time not come (``not-due`` or, after a retry, ``backoff``), a worker
   no longer registered (``unknown-worker``);
4. later than its misfire grace (``missed``: see scheduling.plan's docstring), an on-change path
   unchanged or a device state not entered (``not-due``), a constraint that does not hold
   (``constraint``); a misfire whose next occurrence on the grid is already due does not hold
   the task back: it is recorded (:attr:`Decision.missed`, which ``explain`` reports) and that
   occurrence is judged by the gates after it;
5. else ``due``.

``run-due`` lists a task held back in its ``skipped`` (with :attr:`Decision.skip`) only once its
time has come: a paused task due tomorrow is not news today.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kmpwm.core import schema
from kmpwm.core.hosts import pinned_elsewhere, this_host
from kmpwm.core.state import FINISHED, due_at, member, occurrence, pause_of
from kmpwm.core.timeparse import format_duration, iso
from kmpwm.core.triggers import TIMED, change_signature, first_due_after, task_offset
from kmpwm.scheduling.leases import lease_state
from kmpwm.scheduling.probes import device_state_now, unmet

MAX_CRASHES = 3


@dataclass(frozen=True)
class Decision:
    """What :func:`decide` found.  ``code``: ``due`` or why not (the module's docstring); the rest
    is what the plan journals or claims with, and what ``explain`` shows."""

    code: str
    skip: str | None = None  # run-due's reason when it lists the task in ``skipped`` (None: it does not)
    at: float | None = None  # when it is due (state.due_at); None for a RUNNING, BLOCKED or finished task
    wait: str | None = None  # not-due: "time", "change" (on-change), "enter" or "armed" (device state)
    lease: str | None = None  # a RUNNING task's leases.lease_state
    paused: dict | None = None  # state.pause_of
    missed: dict | None = None  # the misfire (:func:`misfire`) recorded on the way, if any
    ops: tuple = ()  # bookkeeping to journal: a quarantine, a missed window or occurrence, a re-arm, a hold
    taken_over: bool = False  # a RUNNING task whose lease holder is gone (or whose lease ended)
    fence_broken: bool = False  # the holder of a cancelled previous run is gone
    unstarted: bool = False  # the gone holder never started the worker (its death does not count)
    trig_update: dict | None = None  # trig_state to record with the run
    occ: str | None = None  # the occurrence a claim consumes (state.occurrence)

    @property
    def due(self) -> bool:
        return self.code == "due"


def decide(t: dict, state: dict, now: float, device, *, host=None, known_worker=None, started=None) -> Decision:
    """Is ``t`` due at ``now`` for a runner of ``host`` (default: this process's host), and if not
    why.  ``known_worker(name)``: is the worker registered (None: not asked); ``started(t)``: did
    the gone holder of a RUNNING ``t`` start its worker (True, False, None: cannot tell;
    scheduling.leases.holder_started)."""
    st = t["state"]
    if st in FINISHED:
        return Decision("finished")
    if st == "BLOCKED":
        return Decision("blocked")
    judge = _Judge(t, state, now, device, this_host() if host is None else host, known_worker, started)
    for gate in _GATES:
        held_back = gate(judge)
        if held_back is not None:
            return held_back
    return judge.result("due", occ=judge.occ or occurrence(t))


class _Judge:
    """One task under judgement: what the gates read, and what they found on the way."""

    def __init__(self, t, state, now, device, host, known_worker, started):
        self.t, self.state, self.now, self.device, self.host = t, state, now, device, host
        self.known_worker, self.started = known_worker, started
        self.running = t["state"] == "RUNNING"
        self.at = None if self.running else due_at(t, now)
        self.ripe = self.running or self.at <= now  # its time has come: run-due lists it if held back
        self.facts: dict = {}  # lease, taken_over, fence_broken, unstarted, missed, trig_update
        self.ops: list[dict] = []
        self.occ: str | None = None
        self.due_t = t["due"]  # the occurrence judged (a misfire may move it along the grid)

    def result(self, code: str, skip: str | None = None, *, occ: str | None = None, **kw) -> Decision:
        skip = skip if self.ripe else None
        return Decision(code, skip, self.at, ops=tuple(self.ops), occ=occ or self.occ, **self.facts, **kw)


# -- the gates, in order: each returns a Decision that holds the task back, or None --------------


def _running(j: _Judge) -> Decision | None:
    """A RUNNING task: held, someone else's, quarantined, or taken over (then judged on)."""
    if not j.running:
        return None
    t = j.t
    ls = j.facts["lease"] = lease_state(t, j.now)
    if ls == "held":
        return j.result("lease")
    if pinned_elsewhere(t, j.host) is not None:
        return j.result("host")  # the pinned host's runners take it over
    if _death_counts(j, ls) and t.get("crashes", 0) + 1 >= MAX_CRASHES:
        reason = f"quarantined: its runner died {t['crashes'] + 1} times while running it"
        j.ops.append(schema.fail(j.t, reason))
        return j.result("quarantined")
    # taken over: its holder is gone, or its lease ended (the claim says so, so that every reader's
    # fold accepts it whatever its own clock says: a shared store's leases are judged by the
    # database's clock)
    j.facts["taken_over"] = True
    return None


def _death_counts(j: _Judge, ls: str) -> bool:
    """Does the death of ``j.t``'s holder count towards quarantine?  Not when it had only claimed
    the task: ahead of a slot, or (``started``) before it started the worker."""
    if (j.t["lease"] or {}).get("ahead"):
        return False
    if ls == "orphaned" and j.started is not None and j.started(j.t) is False:
        j.facts["unstarted"] = True
        return False
    return True


def _pinned(j: _Judge) -> Decision | None:
    why = None if j.running else pinned_elsewhere(j.t, j.host)
    return None if why is None else j.result("host", why)  # before anything else: its window, misfires, leases


def _fence(j: _Judge) -> Decision | None:
    """A cancelled run of this id is still stopping (state._finish): never start beside it."""
    fence = None if j.running else (j.state.get("fences") or {}).get(j.t["id"])
    if fence is None:
        return None
    if lease_state({"state": "RUNNING", "lease": fence}, j.now) == "held":
        return j.result("stopping", "its cancelled previous run is still stopping")
    j.facts["fence_broken"] = True  # its holder is gone or its lease ended
    return None


def _window(j: _Judge) -> Decision | None:
    trig = j.t["trigger"]
    if j.running or trig["type"] != "windowed" or j.now <= trig["end"]:
        return None
    j.ops.append(schema.fail(j.t, "window missed"))
    return j.result("window-missed")


def _paused(j: _Judge) -> Decision | None:
    paused = pause_of(j.state, j.t, j.now)
    return None if paused is None else j.result("paused", "paused", paused=paused)  # explain says by whom, until when


def _not_yet(j: _Judge) -> Decision | None:
    if j.ripe:
        return None
    retrying = (j.t.get("last_result") or {}).get("status") == "RETRY"
    return j.result("backoff" if retrying else "not-due", wait="time")


def _worker(j: _Judge) -> Decision | None:
    name = j.t["worker"]
    if j.known_worker is None or j.known_worker(name):
        return None
    return j.result("unknown-worker", f"unknown worker {name!r} (not registered any more)")


def _misfire(j: _Judge) -> Decision | None:
    m = None if j.running else misfire(j.t, j.now)
    if m is None:
        return None
    j.ops.append(missed_op(j.t, m))
    j.facts["missed"] = m
    if m["next"] is None or m["next"] > j.now:
        return j.result("missed", misfire_text(m))
    j.due_t = m["next"]  # the grid's next occurrence is on time: it may run in this pass
    j.occ = occurrence(dict(j.t, due=j.due_t))  # the claim consumes that one
    return None


def _on_change(j: _Judge) -> Decision | None:
    trig = j.t["trigger"]
    if trig["type"] != "on_change":
        return None
    sig = change_signature(trig["path"], trig.get("descendants", True))
    if sig == j.t["trig_state"].get("baseline"):
        return j.result("not-due", wait="change")  # nothing changed
    j.facts["trig_update"] = {"baseline": sig}
    j.occ = occurrence(j.t, sig)
    return None


def _device_state(j: _Judge) -> Decision | None:
    trig, ts = j.t["trigger"], j.t["trig_state"]
    if trig["type"] != "device_state":
        return None
    armed = ts.get("armed", True)
    if not device_state_now(trig["state"], j.device):
        if not armed:  # it left the state: a new entry is awaited
            j.ops.append(schema.trig(j.t, trig_state={"armed": True, "entry": ts.get("entry", 0) + 1}))
        return j.result("not-due", wait="enter")
    if not armed:
        return j.result("not-due", wait="armed")  # fired already on entering this state
    j.facts["trig_update"] = {"armed": False}
    return None


def _constraints(j: _Judge) -> Decision | None:
    reason = unmet(j.t["constraints"], j.device)
    if not reason:
        return None
    t = j.t
    if not j.running and t["constraints"].get("misfire_grace") and t["trig_state"].get("held") != j.due_t:
        j.ops.append(schema.trig(j.t, trig_state={"held": j.due_t}))  # a constraint wait is not a misfire
    return j.result("constraint", reason)


def _clock_went_back(j: _Judge) -> Decision | None:
    """A due time set while the clock was ahead, judged from the corrected clock (state.due_at):
    journal the judgement, or every later pass would judge it from its own now and the task
    would wait on a moving target.  The claim of this pass consumes that occurrence."""
    if j.at is not None and j.at < j.t["due"] and j.t["state"] == "ENQUEUED":
        j.ops.append(schema.trig(j.t, due=j.at))
        j.due_t = j.at
        j.occ = occurrence(dict(j.t, due=j.at))
    return None


_GATES = (
    # whose it is, and whether it may start at all
    _running,
    _pinned,
    _clock_went_back,
    _fence,
    _window,
    # whether it may start now
    _paused,
    _not_yet,
    _worker,
    # whether its occurrence and the device allow it
    _misfire,
    _on_change,
    _device_state,
    _constraints,
)


# -- misfire grace (scheduling.plan's docstring) -------------------------------------------------


def misfire(t: dict, now: float) -> dict | None:
    """The misfire decision for task ``t`` at ``now``: None when it may start, else ``{"due",
    "late", "grace", "next"}`` where ``next`` is where a repeating task goes on (None: a one-time
    task, which ends FAILED ``missed``)."""
    grace = t["constraints"].get("misfire_grace")
    if not grace or not _judged_late(t, now):
        return None
    late = now - t["due"]
    if late <= grace:
        return None
    nxt = first_due_after(t["trigger"], t["trig_state"], now - grace, task_offset(t))
    return {"due": t["due"], "late": late, "grace": grace, "next": nxt}


def _judged_late(t: dict, now: float) -> bool:
    """Is ``t`` the start of a timed occurrence that is due, whose lateness misfire grace judges?"""
    if t["state"] != "ENQUEUED" or t["due"] > now or t["trigger"]["type"] not in TIMED:
        return False
    if t.get("occ_attempts") or t.get("expiries"):
        return False  # the occurrence started already: its retries and re-runs are not judged
    # seen due in time and held by a constraint: a constraint wait is not a misfire
    return t["trig_state"].get("held") != t["due"]


def misfire_text(m: dict, outcome: bool = True) -> str:
    """ "missed: due at ..., 2h5m late (misfire grace 30m); next at ..." (``outcome``: with what
    happens to the task)."""
    late = "".join(re.findall(r"\d+[a-z]+", format_duration(m["late"]))[:2])  # the two largest units
    text = f"missed: due at {iso(m['due'])}, {late} late (misfire grace {format_duration(m['grace'])})"
    if not outcome:
        return text
    return text + (f"; next at {iso(m['next'])}" if m["next"] is not None else "; FAILED (missed)")


def missed_detail(m: dict) -> dict:
    """A misfire as the ``missed`` event and ``explain`` show it."""
    return {"due": iso(m["due"]), "late_ms": int(m["late"] * 1000), "grace": m["grace"]}


def missed_op(t: dict, m: dict) -> dict:
    """The op that records a missed occurrence: the task moves on along its grid, or fails."""
    detail = missed_detail(m)
    if m["next"] is None:
        return schema.fail(t, "missed", missed=detail)
    return schema.trig(t, due=m["next"], missed=dict(detail, next=iso(m["next"])))


# -- what a BLOCKED task waits for --------------------------------------------------------------


def blocked_by(state: dict, t: dict) -> tuple[str, list[str]]:
    """What BLOCKED ``t`` waits for: ``("step", ids)`` (the unfinished tasks of its chain's
    previous step) or ``("after", ids)`` (the unfinished tasks it was appended after)."""
    if t.get("chain_id") and t.get("step", 1) > 1:
        return "step", _previous_step(state, t)
    tasks = state["tasks"]
    return "after", [d for d in t.get("after", ()) if d in tasks and tasks[d]["state"] not in FINISHED]


def _previous_step(state: dict, t: dict) -> list[str]:
    """The tasks of the step before ``t``'s in its chain that have not SUCCEEDED."""
    chain = state["chains"].get(t["chain_id"], {"steps": []})
    prev = chain["steps"][t["step"] - 2] if len(chain["steps"]) >= t["step"] - 1 else []
    return [i for i in prev if chain.get("id") and (m := member(state, chain, i)) and m["state"] != "SUCCEEDED"]
