"""``kmpwm store copy``: every unfinished task, live chain (with its savepoint: the steps done)
and queue pause from one store into another (journal <-> PostgreSQL), as ``put`` records.

Ids that exist in the target (any task or chain, finished or not) are refused before anything is
written: a copy never overwrites.  A RUNNING task is copied ENQUEUED (its run belongs to the
source's runner), and said so: stop the source's runners before moving a queue.
"""

from __future__ import annotations

import copy as _copy
from dataclasses import dataclass, field

from kmpwm.core import schema
from kmpwm.core.exitcodes import InvalidParams
from kmpwm.core.state import UNFINISHED, live_chain, members, pack_task


def plan_copy(state: dict) -> tuple[list[dict], list[str], list[str]]:
    """(the ops that recreate the unfinished part of ``state``, ids copied, ids that were RUNNING)."""
    plan = _Plan()
    for cid, chain in state["chains"].items():
        if live_chain(state, chain):
            plan.put_chain(cid, chain, members(state, chain))
    for tid, t in state["tasks"].items():
        if tid not in plan.taken and t["state"] in UNFINISHED:
            plan.put_task(t)
    if not (plan.ops or state.get("qpause")):
        return [], plan.ids, plan.running
    return [_meta_op(state), *plan.ops], plan.ids, plan.running


@dataclass
class _Plan:
    """A copy being planned: its put ops, the ids they copy (chains and tasks), the task ids
    among them, and those that were RUNNING."""

    ops: list[dict] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    taken: set[str] = field(default_factory=set)
    running: list[str] = field(default_factory=list)

    def put_chain(self, cid: str, chain: dict, own: list[dict]) -> None:
        self.ops.append(schema.put_chain(_copy.deepcopy(chain)))
        self.ids.append(cid)
        for t in own:
            self.put_task(t)

    def put_task(self, t: dict) -> None:
        """A copy of ``t``; a RUNNING task is copied ENQUEUED (its run belongs to the source)."""
        t = _copy.deepcopy(t)
        if t["state"] == "RUNNING":
            self.running.append(t["id"])
            t["state"] = "ENQUEUED"
            t["lease"] = None
        self.ops.append(schema.put_task(pack_task(t)))
        self.ids.append(t["id"])
        self.taken.add(t["id"])


def _meta_op(state: dict) -> dict:
    """The counters, and a queue pause if there is one, as one ``meta`` op."""
    meta = schema.meta(state["seq"], dict(state["fam"]))
    if state.get("qpause"):
        meta["qpause"] = dict(state["qpause"])
    return meta


def _refuse_overwrite(ids: list[str], there: dict) -> None:
    """InvalidParams if a task or chain of the target state ``there`` has one of ``ids``."""
    clash = [i for i in ids if i in there["tasks"] or i in there["chains"]]
    if clash:
        more = f" (and {len(clash) - 1} more)" if len(clash) > 1 else ""
        raise InvalidParams(
            f"the target store already has {clash[0]!r}{more}: store copy never overwrites",
            hint="cancel or compact them there first, or copy into an empty store",
        )


def copy_between(source, target) -> dict:
    """Copy ``source``'s unfinished work into ``target`` (two stores); returns a report."""
    state = source.load(full=False).state
    ops, ids, running = plan_copy(state)
    with target.transaction() as txn:
        there = txn.state
        _refuse_overwrite(ids, there)
        if ops:
            if there["seq"] > state["seq"]:
                ops[0]["seq"] = there["seq"]
            txn.commit(ops)
    tasks = [i for i in ids if i in state["tasks"]]
    return {"copied": len(tasks), "chains": len(ids) - len(tasks), "ids": tasks, "was_running": running}
