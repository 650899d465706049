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
    tasks, chains = state["tasks"], state["chains"]
    ops: list[dict] = []
    ids: list[str] = []
    running: list[str] = []
    taken: set[str] = set()

    def put_task(t: dict) -> None:
        t = _copy.deepcopy(t)
        if t["state"] == "RUNNING":
            running.append(t["id"])
            t["state"] = "ENQUEUED"
            t["lease"] = None
        ops.append(schema.put_task(pack_task(t)))
        ids.append(t["id"])
        taken.add(t["id"])

    for cid, chain in chains.items():
        if not live_chain(state, chain):
            continue
        ops.append(schema.put_chain(_copy.deepcopy(chain)))
        ids.append(cid)
        for t in members(state, chain):
            put_task(t)
    for tid, t in tasks.items():
        if tid not in taken and t["state"] in UNFINISHED:
            put_task(t)
    meta = schema.meta(state["seq"], dict(state["fam"]))
    if state.get("qpause"):
        meta["qpause"] = dict(state["qpause"])
    return ([meta] + ops if ops or state.get("qpause") else []), ids, running


def copy_between(source, target) -> dict:
    """Copy ``source``'s unfinished work into ``target`` (two stores); returns a report."""
    state = source.load(full=False).state
    ops, ids, running = plan_copy(state)
    with target.transaction() as txn:
        there = txn.state
        clash = [i for i in ids if i in there["tasks"] or i in there["chains"]]
        if clash:
            more = f" (and {len(clash) - 1} more)" if len(clash) > 1 else ""
            raise InvalidParams(
                f"the target store already has {clash[0]!r}{more}: store copy never overwrites",
                hint="cancel or compact them there first, or copy into an empty store",
            )
        if ops:
            if there["seq"] > state["seq"]:
                ops[0]["seq"] = there["seq"]
            txn.commit(ops)
    tasks = [i for i in ids if i in state["tasks"]]
    return {"copied": len(tasks), "chains": len(ids) - len(tasks), "ids": tasks, "was_running": running}
