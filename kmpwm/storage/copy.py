"""``kmpwm store copy``: every unfinished task, live chain (with its savepoint: the steps done)
and queue pause from one store into another (journal <-> PostgreSQL), as ``put`` records.

Ids that exist in the target (any task or chain, finished or not) are refused before anything is
written: a copy never overwrites.  A RUNNING task is copied ENQUEUED (its run belongs to the
source's runner), and said so: stop the source's runners before moving a queue.
"""

from __future__ import annotations

import copy as _copy

from kmpwm.core import schema
from kmpwm.core.exitcodes import InvalidParams
from kmpwm.core.state import UNFINISHED, live_chain, members, pack_task


def plan_copy(state: dict) -> tuple[list[dict], list[str], list[str]]:
    """(the ops that recreate the unfinished part of ``state``, ids copied, ids that were RUNNING)."""
    ops: list[dict] = []
    ids: list[str] = []
    running: list[str] = []
    taken: set[str] = set()
    for cid, chain in state["chains"].items():
        if live_chain(state, chain):
            own = members(state, chain)
            ops += [schema.put_chain(_copy.deepcopy(chain)), *(_put_task(t, running) for t in own)]
            ids += [cid, *(t["id"] for t in own)]
            taken.update(t["id"] for t in own)
    rest = [t for tid, t in state["tasks"].items() if tid not in taken and t["state"] in UNFINISHED]
    ops += [_put_task(t, running) for t in rest]
    ids += [t["id"] for t in rest]
    if not (ops or state.get("qpause")):
        return [], ids, running
    meta = schema.meta(state["seq"], dict(state["fam"]))
    if state.get("qpause"):
        meta["qpause"] = dict(state["qpause"])
    return [meta, *ops], ids, running


def _put_task(t: dict, running: list) -> dict:
    """The put op of a copy of ``t``; a RUNNING task is copied ENQUEUED (and its id noted in ``running``)."""
    t = _copy.deepcopy(t)
    if t["state"] == "RUNNING":
        running.append(t["id"])
        t["state"] = "ENQUEUED"
        t["lease"] = None
    return schema.put_task(pack_task(t))


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
