"""Claims: which of the plan's candidates a runner may take now, and the lease it writes for one.

Pure: the state, the plan's candidate, the time and the runner's identity in; a ``Claim`` (the
``claim`` op to stage, its lease and occurrence) or the reason the candidate cannot be claimed
out.  Nothing here reads a file or the clock; ``Runner._claim`` (runner.py) stages what it gets
under the journal lock, and tests/reliability/test_interleavings.py calls the same function against its model.
The fold (core/state.py) still refuses a claim that raced with another one: this decides what to
ask for, the fold decides what holds.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from dataclasses import dataclass, field

from kmpwm.core import schema
from kmpwm.core.state import due_at, occurrence_open, pause_of
from kmpwm.scheduling.leases import lease_state
from kmpwm.scheduling.plan import upstream_of

LEASE_MARGIN = 10.0
PREFETCH_MARGIN = 5.0  # a claimed task may wait briefly for a free slot before it starts
START_SLACK = 0.5  # scheduling delay between claiming a task and starting it


@dataclass(frozen=True)
class Identity:
    """Who claims: what a lease names (leases.py reads it back to tell whether its holder lives)."""

    runner: str  # host/pid/nonce
    pid: int
    token: str | None
    boot: str | None
    host: str  # pinned tasks run only on their host


@dataclass
class Candidates:
    """What the last plan said may be claimed: its due tasks (best last, so pop() takes the best)
    and what the claims of them must say (the occurrence, a broken lease or fence, trigger state)."""

    queue: list = field(default_factory=list)
    occ: dict = field(default_factory=dict)
    broken: set = field(default_factory=set)
    fence_broken: set = field(default_factory=set)
    trig: dict = field(default_factory=dict)

    @classmethod
    def of(cls, p) -> Candidates:
        """From a scheduling.plan.Plan."""
        return cls(list(reversed(p.due)), p.occ, p.broken, p.fence_broken, p.trig_updates)


@dataclass(frozen=True)
class Claim:
    """A task this runner claims (``op``, staged under the lock) and then runs.

    ``task`` is the record the claim was decided on until the op is staged; then (``taken``) the
    record as the claim left it, RUNNING under our lease (``accepted``)."""

    task: dict
    op: dict
    info: object = None  # the worker (registry.WorkerInfo); None: unknown
    limit: float = 0.0  # the run's time limit (s)
    upstream: dict = field(default_factory=dict)  # what the chain's previous step returned
    start_by: float = 0.0  # monotonic: start it before this, else hand it back (its lease allows no more)

    @property
    def id(self) -> str:
        return self.task["id"]

    @property
    def lease(self) -> float:
        """When the lease ends (wall clock) unless renewed."""
        return self.op["until"]

    @property
    def occurrence(self) -> str | None:
        return self.op.get("occ")

    @property
    def attempt(self) -> int:
        """The attempt its run is (of this occurrence)."""
        return self.task["occ_attempts"] + 1

    @property
    def takeover(self) -> bool:
        """Taken over from a runner that is gone (whatever of its run is left must die first)."""
        return self.task["state"] == "RUNNING" or bool(self.op.get("fence_broken"))


def refusal(state: dict, cand: dict, now: float, who: Identity, *, taken: Container, occ=None, forced=False):
    """Why the plan's candidate ``cand`` cannot be claimed by ``who`` at ``now`` (None: it can).

    The queue may be a cycle old: the task may have been replaced, run by another runner (the
    occurrence planned is no longer the one it waits for), pinned elsewhere or paused since.
    ``taken``: ids this runner has finished, runs or holds already."""
    t = state["tasks"].get(cand["id"])
    if t is None or t["seq"] != cand["seq"]:
        return "replaced since the plan"
    if t["id"] in taken:
        return "this runner has it"
    return _changed(state, t, now, who, occ=occ, forced=forced) or _unclaimable(t, now, forced)


def _changed(state: dict, t: dict, now: float, who: Identity, *, occ, forced: bool) -> str | None:
    """What changed since the plan that keeps ``who`` from claiming ``t`` (None: nothing)."""
    if t.get("host") not in (None, who.host):
        return "pinned to another host"  # since the plan (--policy update)
    if not forced and pause_of(state, t, now) is not None:
        return "paused"  # since the plan (`pause --all` while we claim)
    if occ is not None and not occurrence_open(t, occ):
        return "the planned occurrence ran meanwhile"  # (state.occurrence)
    return None


def _unclaimable(t: dict, now: float, forced: bool) -> str | None:
    """Why ``t`` is in no state to be claimed (None: due, or running under a lease that ended)."""
    if t["state"] == "ENQUEUED":
        return None if due_at(t, now) <= now or forced else "not due"
    if t["state"] == "RUNNING" and lease_state(t, now) != "held":
        return None
    return f"{t['state']}"


def lease_end(now: float, limit: float, grace: float) -> float:
    """The lease covers the run (its limit and grace period) started within PREFETCH_MARGIN."""
    return now + limit + grace + LEASE_MARGIN + PREFETCH_MARGIN + START_SLACK


def claim(
    state: dict,
    cand: dict,
    now: float,
    who: Identity,
    *,
    planned: Candidates,
    grace: float,
    limit_of: Callable[[dict], tuple[object, float]],
    taken: Container = (),
    forced: bool = False,
    ahead: bool = False,
    started: Callable[[dict], bool | None] | None = None,
):
    """The Claim of candidate ``cand`` by ``who`` at ``now``, or the reason (a str) it cannot be.

    ``limit_of(task) -> (worker info, time limit)``; ``ahead``: claimed beyond the free slots
    (prefetched); ``started(task)``: did the gone holder of a RUNNING task start its worker
    (leases.holder_started; None: cannot tell)."""
    occ = planned.occ.get(cand["id"])
    why = refusal(state, cand, now, who, taken=taken, occ=occ, forced=forced)
    if why is not None:
        return why
    t = state["tasks"][cand["id"]]
    info, limit = limit_of(t)
    op = schema.claim(t, who.runner, who.pid, who.token, lease_end(now, limit, grace))
    if occ is not None:
        op["occ"] = occ  # the occurrence this claim consumes (state.occurrence)
    if who.boot:
        op["boot"] = who.boot
    _mark_takeover(op, t, now, planned, started)
    if forced:
        op["forced"] = True  # run-now: a pause does not hold it
    if ahead:
        op["ahead"] = True  # its runner dying before it starts is not the task's crash
    return Claim(t, op, info, limit, upstream_of(state, t))


def _mark_takeover(op: dict, t: dict, now: float, planned: Candidates, started) -> None:
    """What the claim says of the lease or fence it breaks, and of a gone holder's run."""
    if t["id"] in planned.broken:
        op["broken"] = "expired" if lease_state(t, now) == "expired" else True
    if t["id"] in planned.fence_broken:
        op["fence_broken"] = True  # the cancelled run's holder is gone
    if t["state"] == "RUNNING" and started is not None and started(t) is False:
        op["unstarted"] = True  # its gone holder never started the worker: not the task's crash


def accepted(c: Claim, state: dict, planned: Candidates, start_by: float) -> Claim:
    """``c`` once the fold accepted its op: the task as the claim left it, with the trigger state
    its result is to record (plan's trig_updates)."""
    task = dict(state["tasks"][c.id])
    task["_trig_update"] = planned.trig.get(c.id)
    return Claim(task, c.op, c.info, c.limit, c.upstream, start_by)
