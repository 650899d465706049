"""Deciding what runs: which tasks are due now, in what order, and why the others wait.

:func:`plan` reads the state and the device and returns the tasks to run, the tasks skipped
with a reason, and bookkeeping ops (a missed window, a device state re-armed, a task quarantined
after crashing its runners).  It writes nothing; the runner commits its ops with the claims.

Whether each task is due, and why not, is decided by scheduling.decide (the one decision that
``explain`` puts into words); the plan orders and filters the decisions and gathers their ops.
Misfire grace (SPEC section 12) is decided there too (:func:`kmpwm.scheduling.decide.misfire`).
The rules:

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
``core.hosts.pinned_elsewhere`` gives, before anything else is decided, so no other host marks its
window missed, records it missed or counts its lease's end; the pinned host's runners do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kmpwm.core.hosts import this_host
from kmpwm.core.models import HEAVY_TIMEOUT, LIGHT_TIMEOUT
from kmpwm.core.state import member
from kmpwm.scheduling.decide import MAX_CRASHES, Decision, decide
from kmpwm.scheduling.leases import lease_state
from kmpwm.scheduling.probes import Device

__all__ = ["MAX_CRASHES", "QOS_RANK", "Plan", "lease_state", "order_key", "plan", "time_limit", "upstream_of"]

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

    def add(self, t: dict, d: Decision) -> None:
        """Take in the decision ``d`` about task ``t``."""
        self.ops.extend(d.ops)
        self._claim_facts(t["id"], d)
        if d.skip is not None:
            self.skipped.append({"id": t["id"], "reason": d.skip})
        if d.due:
            self.due.append(t)

    def _claim_facts(self, tid: str, d: Decision) -> None:
        """What the runner claims task ``tid`` with, from the decision ``d``."""
        for flag, ids in (
            (d.taken_over, self.broken),
            (d.fence_broken, self.fence_broken),
            (d.unstarted, self.unstarted),
        ):
            if flag:
                ids.add(tid)
        if d.trig_update is not None:
            self.trig_updates[tid] = d.trig_update
        if d.occ is not None:
            self.occ[tid] = d.occ


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
    host = host if host is not None else this_host()
    for t in state["tasks"].values():
        if t["state"] in ("ENQUEUED", "RUNNING") and t["id"] not in exclude:
            out.add(t, decide(t, state, now, device, host=host, known_worker=known_worker, started=started))
    out.due.sort(key=order_key)
    return out


def upstream_of(state: dict, t: dict) -> dict:
    """Merged ``data`` of the previous chain step, in declaration order (later keys win)."""
    chain = state["chains"].get(t.get("chain_id"))
    if chain is None or not t.get("step") or t["step"] < 2:
        return {}
    merged: dict = {}
    for tid in chain["steps"][t["step"] - 2]:
        merged.update(_result_data(member(state, chain, tid)))
    return merged


def _result_data(task: dict | None) -> dict:
    """The ``data`` dict of a task's last result (empty: none, or not a dict)."""
    result = (task or {}).get("last_result") or {}
    data = result.get("data")
    return data if isinstance(data, dict) else {}
