"""The state: a pure fold of journal records into tasks, chains and savepoints.

``apply(state, record)`` is the only place where the meaning of a record lives.  It uses no
clock but the record's own ``ts``, reads no files and calls no worker, so folding the same records
always gives the same state, whether from scratch or from a snapshot plus the tail.  The state is
plain JSON data (dicts, lists, strings, numbers) so that a snapshot is just its serialisation.

A record is ``{"ts": EPOCH, "ops": [op, ...]}``; each op has an ``op`` key:

``enq``     a task request with its policy (keep / replace / append / append-or-replace)
``chain``   a chain of steps of task requests, with its policy (keep / replace)
``cancel``  ids (tasks, their ``ID#n`` appends, chains), a tag, or everything
``claim``   a runner leases a task before running it
``result``  a run's outcome (SUCCESS / FAILURE / RETRY / EXPIRED)
``release`` a runner hands a claimed task back without a result
``fail``    a task ends FAILED without a run (window missed, quarantine, ...)
``trig``    trigger bookkeeping (next due time, on-change baseline, device-state arming)
``put`` / ``meta``   written by compaction: a task or chain as it stands, counters
``hdr``     the journal's header (its generation)
Records flagged ``"arc": true`` are history kept by compaction for ``events``; the fold skips them.
"""

from __future__ import annotations

from typing import Callable

# The fold owns these (models.py re-exports them); importing models or triggers here would put
# their cost on every command, and an idle `run-due` needs neither.
UNFINISHED = frozenset({"ENQUEUED", "BLOCKED", "RUNNING"})
FINISHED = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
MAX_EXPIRIES = 5  # expiries in a row before a task is FAILED
# The stored constraints of a task that sets none (what ``Constraints().to_record()`` gives:
# models.py checks that at import).  Records leave them out and the fold fills in this value, so
# it must only ever change together with a journal format version.
DEFAULT_CONSTRAINTS_RECORD = {
    "requires_network": False, "network_type": "not-required", "requires_charging": False,
    "battery_not_low": False, "storage_not_low": False, "device_idle": False, "heavy": False,
    "expedited": False, "qos": "default", "timeout": None, "backoff": "exponential", "backoff_delay": 10.0,
    "max_attempts": 10,
}

Emit = Callable[[float, str, str, dict], None] | None  # (ts, task_id, kind, detail)


def new_state() -> dict:
    return {"tasks": {}, "chains": {}, "seq": 0, "fam": {}, "waiters": {}}


def family(state: dict, base: str) -> list[str]:
    """``base`` and its appended ``base#n`` ids that exist, oldest first."""
    n = state["fam"].get(base)
    if n is None:  # never appended to: at most the base itself (the common case, kept cheap)
        return [base] if base in state["tasks"] else []
    ids = [base] + [f"{base}#{i}" for i in range(2, n + 1)]
    return [i for i in ids if i in state["tasks"]]


def base_id(task_id: str) -> str:
    return task_id.split("#", 1)[0]


def unfinished_family(state: dict, base: str) -> list[str]:
    tasks = state["tasks"]
    return [i for i in family(state, base) if tasks[i]["state"] in UNFINISHED]


def member(state: dict, chain: dict, task_id: str) -> dict | None:
    """The task ``task_id`` if it still belongs to ``chain``: an id a later task took over (a
    plain task, another chain) is no longer the chain's, and never decides anything about it."""
    t = state["tasks"].get(task_id)
    return t if t is not None and t.get("chain_id") == chain["id"] else None


def members(state: dict, chain: dict) -> list[dict]:
    """The chain's tasks in step order (see :func:`member`)."""
    return [t for step in chain["steps"] for i in step if (t := member(state, chain, i)) is not None]


def chain_state(state: dict, chain: dict) -> str:
    members_ = members(state, chain)
    states = {t["state"] for t in members_}
    if chain.get("cancelled"):
        return "CANCELLED"
    if "FAILED" in states:
        return "FAILED"
    if "CANCELLED" in states:
        return "CANCELLED"
    if states <= {"SUCCEEDED"}:
        return "SUCCEEDED"
    if "RUNNING" in states or any(t["attempts"] or t["state"] == "SUCCEEDED" for t in members_):
        return "RUNNING"
    return "ENQUEUED"


def chain_next_step(state: dict, chain: dict) -> int | None:
    """Number of the first step with an unfinished task (the savepoint), None when none is left."""
    for number, step in enumerate(chain["steps"], 1):
        for i in step:
            t = member(state, chain, i)
            if t is not None and t["state"] in UNFINISHED:
                return number
    return None


def idle_at(state: dict, now: float) -> bool:
    """True when nothing can be due at ``now``: no task running (its lease may have ended) and
    every enqueued task due later.  False means ``run-due`` must plan (scheduling.plan), which
    also checks on-change and device-state triggers, whose tasks are always due."""
    for t in state["tasks"].values():
        st = t["state"]
        if st == "RUNNING" or (st == "ENQUEUED" and t["due"] <= now):
            return False
    return True


def apply(state: dict, record: dict, emit: Emit = None) -> list:
    """Fold one record into ``state`` (in place); returns one result per op."""
    if record.get("arc"):
        return []
    ts = record.get("ts", 0.0)
    results = []
    for op in record.get("ops", ()):
        handler = _HANDLERS.get(op.get("op"))
        results.append(handler(state, op, ts, emit) if handler else None)
    return results


# -- helpers -------------------------------------------------------------------------------


_TASK_BASE = {
    "input": None, "constraints": DEFAULT_CONSTRAINTS_RECORD, "chain_id": None, "step": None, "attempts": 0,
    "occ_attempts": 0, "expiries": 0, "crashes": 0, "lease": None, "last_result": None, "reason": None,
    "finished_at": None,
}


_PACKED_DEFAULTS = dict(_TASK_BASE, tags=[], after=[], trig_state={})
_TEMPLATE = dict.fromkeys(("id", "worker", "trigger", "created_at", "due", "state", "seq", "updated_at", "tags",
                           "after", "trig_state"), None)
_TEMPLATE.update(_TASK_BASE)


def pack_task(t: dict) -> dict:
    """``t`` without the fields that hold their default value (snapshots, history, ``put`` ops):
    a finished task of the common kind shrinks to a third.  :func:`unpack_task` restores it."""
    return {k: v for k, v in t.items() if k not in _PACKED_DEFAULTS or v != _PACKED_DEFAULTS[k]}


def unpack_task(p: dict) -> dict:
    t = _TASK_BASE.copy()
    t["tags"] = []
    t["after"] = []
    t["trig_state"] = {}
    t.update(p)
    return t


def live_chain(state: dict, chain: dict) -> bool:
    return chain_next_step(state, chain) is not None


def split_history(state: dict) -> tuple[list[str], list[str]]:
    """Ids of the tasks and chains that can no longer change and that no later op reads.

    A finished task is history unless it belongs to a chain that is still going (its result
    feeds the next step; the chain's state is read from it).  Nothing a later op does depends on
    history: ops act on unfinished tasks and live chains only, a finished task waits on nothing,
    and a new task or chain with an old id simply replaces the old one.  So the fold over the
    "hot" rest alone gives the same results as over everything; ``run-due`` and ``enqueue``
    load only that (store.py keeps history in a file of its own)."""
    tasks, chains = state["tasks"], state["chains"]
    live = {cid for cid, c in chains.items() if live_chain(state, c)}
    in_live = {t["id"] for cid in live for t in members(state, chains[cid])}
    cold_tasks = [i for i, t in tasks.items() if t["state"] not in UNFINISHED and i not in in_live]
    cold_chains = [cid for cid in chains if cid not in live]
    return cold_tasks, cold_chains


def _insert(state: dict, task: dict, ts: float, *, blocked: bool, chain_id: str | None = None,
            step: int | None = None) -> dict:
    """A new task in the state from its request record (defaults filled in; the record untouched:
    the containers a task may change are its own, the rest are never changed in place)."""
    seq = state["seq"] = state["seq"] + 1
    t = _TEMPLATE.copy()  # copying a dict of every key is twice as fast as building one
    t["due"] = t["created_at"] = task.get("created_at", ts)
    t.update(task)
    t["chain_id"] = chain_id
    t["step"] = step
    t["state"] = "BLOCKED" if blocked else "ENQUEUED"
    t["seq"] = seq
    t["updated_at"] = ts
    tags, after, trig_state = task.get("tags"), task.get("after"), task.get("trig_state")
    t["tags"] = list(tags) if tags else []
    t["after"] = after = list(after) if after else []
    t["trig_state"] = dict(trig_state) if trig_state else {}
    tasks = state["tasks"]
    tid = t["id"]
    old = tasks.get(tid)
    if old is not None and old.get("after"):
        _drop_waits(state, old)
    tasks[tid] = t
    for dep in after:
        state["waiters"].setdefault(dep, []).append(tid)
    return t


def _drop_waits(state: dict, task: dict) -> None:
    for dep in task.get("after", ()):
        waiting = state["waiters"].get(dep)
        if waiting and task["id"] in waiting:
            waiting.remove(task["id"])
            if not waiting:
                del state["waiters"][dep]


def _finish(state: dict, t: dict, new_state: str, ts: float, reason: str | None, emit: Emit) -> None:
    """Move ``t`` to a final state and propagate: chain steps after it, tasks appended after it."""
    t["state"] = new_state
    t["reason"] = reason
    t["finished_at"] = ts
    t["updated_at"] = ts
    t["lease"] = None
    if emit:
        emit(ts, t["id"], new_state.lower(), {"reason": reason} if reason else {})
    if t.get("after"):
        _drop_waits(state, t)  # a finished task waits on nothing
    _release_waiters(state, t, ts, emit)
    chain = state["chains"].get(t["chain_id"]) if t["chain_id"] else None
    if chain is None or t["step"] is None:
        return
    steps = chain["steps"]
    if not 1 <= t["step"] <= len(steps) or t["id"] not in steps[t["step"] - 1]:
        return  # a task of an earlier chain of that id: not part of this one
    if new_state == "SUCCEEDED":
        step = steps[t["step"] - 1]
        done = True
        for i in step:
            m = member(state, chain, i)
            if m is not None and m["state"] != "SUCCEEDED":
                done = False
                break
        if done and t["step"] < len(steps):
            for i in steps[t["step"]]:
                nxt = member(state, chain, i)
                if nxt and nxt["state"] == "BLOCKED" and not _waiting_on(state, nxt):
                    nxt["state"] = "ENQUEUED"
                    nxt["due"] = max(nxt["due"], ts)
                    nxt["updated_at"] = ts
                    if emit:
                        emit(ts, i, "unblocked", {"chain": chain["id"], "step": t["step"] + 1})
        return
    downstream_state = "FAILED" if new_state == "FAILED" else "CANCELLED"
    why = "upstream failed" if new_state == "FAILED" else "upstream cancelled"
    for later in steps[t["step"]:]:
        for i in later:
            other = member(state, chain, i)
            if other and other["state"] in UNFINISHED:
                _finish(state, other, downstream_state, ts, why, emit)


def _waiting_on(state: dict, t: dict) -> bool:
    tasks = state["tasks"]
    return any(dep in tasks and tasks[dep]["state"] in UNFINISHED for dep in t.get("after", ()))


def _release_waiters(state: dict, t: dict, ts: float, emit: Emit) -> None:
    for wid in state["waiters"].pop(t["id"], ()):
        w = state["tasks"].get(wid)
        if w is None or w["state"] != "BLOCKED" or _waiting_on(state, w):
            continue
        if w["chain_id"] and w["step"] and w["step"] > 1:
            chain = state["chains"].get(w["chain_id"])
            if chain and any((m := member(state, chain, i)) is not None and m["state"] != "SUCCEEDED"
                             for i in chain["steps"][w["step"] - 2]):
                continue
        w["state"] = "ENQUEUED"
        w["due"] = max(w["due"], ts)
        w["updated_at"] = ts
        if emit:
            emit(ts, wid, "unblocked", {"after": t["id"]})


def _current(state: dict, op: dict) -> dict | None:
    t = state["tasks"].get(op.get("id"))
    if t is None or t["seq"] != op.get("seq"):
        return None
    return t


# -- ops -----------------------------------------------------------------------------------


def _op_enq(state: dict, op: dict, ts: float, emit: Emit) -> dict:
    task = op["task"]
    base = task["id"]
    tasks = state["tasks"]
    if base not in tasks and base not in state["fam"]:  # a new id: nothing to keep, replace or append to
        t = _insert(state, task, ts, blocked=False)
        if emit:
            emit(ts, base, "enqueued", {"worker": t["worker"]})
        return {"action": "enqueued", "id": base, "due": t["due"], "state": "ENQUEUED"}
    policy = op.get("policy", "keep")
    existing = unfinished_family(state, base)
    if existing and policy == "keep":
        first = tasks[existing[-1]]
        if emit:
            emit(ts, base, "kept", {})
        return {"action": "kept", "id": base, "due": first["due"], "state": first["state"]}
    if existing and policy == "replace":
        for i in existing:
            _finish(state, tasks[i], "CANCELLED", ts, "replaced", emit)
        t = _insert(state, task, ts, blocked=False)
        if emit:
            emit(ts, t["id"], "enqueued", {"worker": t["worker"], "policy": policy})
        return {"action": "replaced", "id": t["id"], "due": t["due"], "state": t["state"]}
    if existing and policy in ("append", "append-or-replace"):
        n = state["fam"].get(base, 1) + 1
        state["fam"][base] = n
        task = dict(task, id=f"{base}#{n}", after=[existing[-1]])
        t = _insert(state, task, ts, blocked=True)
        if emit:
            emit(ts, t["id"], "enqueued", {"worker": t["worker"], "policy": policy, "after": existing[-1]})
        return {"action": "appended", "id": t["id"], "due": None, "state": t["state"]}
    t = _insert(state, task, ts, blocked=False)
    if emit:
        emit(ts, t["id"], "enqueued", {"worker": t["worker"]})
    return {"action": "enqueued", "id": t["id"], "due": t["due"], "state": t["state"]}


def _op_chain(state: dict, op: dict, ts: float, emit: Emit) -> dict:
    cid = op["id"]
    tasks = state["tasks"]
    old = state["chains"].get(cid)
    action = "enqueued"
    if old is not None:
        live = [t["id"] for t in members(state, old) if t["state"] in UNFINISHED]
        if live and op.get("policy", "replace") == "keep":
            if emit:
                emit(ts, cid, "kept", {"chain": cid})
            return {"action": "kept", "id": cid, "tasks": [i for step in old["steps"] for i in step]}
        if live:
            action = "replaced"
            for i in live:
                if tasks[i]["state"] in UNFINISHED:
                    _finish(state, tasks[i], "CANCELLED", ts, "replaced", emit)
    ids_by_step = []
    all_ids: list[str] = []
    get = tasks.get
    for number, step in enumerate(op["steps"], 1):
        ids = []
        for task in step:
            tid = task["id"]
            prior = get(tid)
            if prior is not None and prior["state"] in UNFINISHED:
                _finish(state, prior, "CANCELLED", ts, "replaced", emit)
            _insert(state, task, ts, blocked=number > 1, chain_id=cid, step=number)
            ids.append(tid)
            if emit:
                emit(ts, tid, "enqueued", {"worker": task["worker"], "chain": cid, "step": number})
        ids_by_step.append(ids)
        all_ids += ids
    state["chains"][cid] = {"id": cid, "steps": ids_by_step, "created_at": ts, "cancelled": False,
                            "tags": op.get("tags", [])}
    return {"action": action, "id": cid, "tasks": all_ids}


def _op_cancel(state: dict, op: dict, ts: float, emit: Emit) -> list:
    tasks, chains = state["tasks"], state["chains"]
    targets: list[str] = []
    if op.get("all"):
        targets = [i for i, t in tasks.items() if t["state"] in UNFINISHED]
        for chain in chains.values():
            if chain_next_step(state, chain) is not None:
                chain["cancelled"] = True
    elif op.get("tag") is not None:
        tag = op["tag"]
        targets = [i for i, t in tasks.items() if t["state"] in UNFINISHED and tag in t.get("tags", ())]
        for cid, chain in chains.items():
            if tag in chain.get("tags", ()) and chain_next_step(state, chain) is not None:
                chain["cancelled"] = True
                targets += [t["id"] for t in members(state, chain) if t["state"] in UNFINISHED]
    else:
        for wanted in op.get("ids", ()):
            chain = chains.get(wanted)
            if chain is not None:
                live = [t["id"] for t in members(state, chain) if t["state"] in UNFINISHED]
                if live:
                    chain["cancelled"] = True
                targets += live
            if wanted in tasks and "#" in wanted and tasks[wanted]["state"] in UNFINISHED:
                targets.append(wanted)  # one appended task named exactly
            elif "#" not in wanted:
                targets += unfinished_family(state, wanted)
    if op.get("all") or op.get("tag") is not None:
        targets.sort(key=lambda i: tasks[i]["seq"])  # enqueue order, whatever the dict's order
    cancelled: list[str] = []
    hook = _collect(cancelled, set(), emit)  # downstream steps cancelled too are reported as well
    for i in dict.fromkeys(targets):
        t = tasks[i]
        if t["state"] in UNFINISHED:
            _finish(state, t, "CANCELLED", ts, "cancelled", hook)
    return cancelled


def _collect(out: list, seen: set, emit: Emit) -> Emit:
    def hook(ts: float, task_id: str, kind: str, detail: dict) -> None:
        if kind == "cancelled" and task_id not in seen:
            seen.add(task_id)
            out.append(task_id)
        if emit:
            emit(ts, task_id, kind, detail)

    return hook


def _op_claim(state: dict, op: dict, ts: float, emit: Emit) -> bool:
    t = _current(state, op)
    if t is None:
        return False
    lease = t["lease"]
    if t["state"] == "RUNNING":
        if lease and lease["until"] > ts and not op.get("broken"):
            return False  # held; "broken" means the writer saw the holder's process gone
        if not (lease or {}).get("ahead"):
            t["crashes"] += 1  # the previous holder vanished without a result while running it
    elif t["state"] != "ENQUEUED":
        return False
    t["state"] = "RUNNING"
    t["lease"] = {"runner": op["runner"], "pid": op.get("pid"), "token": op.get("token"),
                  "until": op["until"], "since": ts}
    if op.get("ahead"):
        t["lease"]["ahead"] = True  # claimed ahead of a free slot: maybe never started
    t["updated_at"] = ts
    if emit:
        emit(ts, t["id"], "started", {"runner": op["runner"], "pid": op.get("pid"), "attempt": t["occ_attempts"] + 1})
    return True


def _holder(state: dict, op: dict) -> dict | None:
    t = _current(state, op)
    if t is None or t["state"] != "RUNNING" or not t["lease"] or t["lease"]["runner"] != op.get("runner"):
        return None
    return t


def _op_result(state: dict, op: dict, ts: float, emit: Emit) -> bool:
    t = _holder(state, op)
    if t is None:
        if emit:
            emit(ts, op.get("id", "?"), "stale-result", {"status": op.get("status"), "runner": op.get("runner")})
        return False
    status = op["status"]
    result = {"status": status, "message": op.get("message"), "data": op.get("data")}
    if op.get("late_ms") is not None:
        result["late_ms"] = op["late_ms"]  # an exact task: how late it ran
    if emit:
        emit(ts, t["id"], "ran", dict(result, duration_ms=op.get("duration_ms"), runner=op.get("runner")))
    t["lease"] = None
    t["updated_at"] = ts
    t["crashes"] = 0
    if status == "EXPIRED":
        t["last_result"] = result
        t["expiries"] += 1
        if t["expiries"] >= MAX_EXPIRIES:
            _finish(state, t, "FAILED", ts, f"expired {t['expiries']} times in a row", emit)
        else:
            t["state"] = "ENQUEUED"
            t["due"] = ts
        return True
    t["last_result"] = result
    t["attempts"] += 1
    t["occ_attempts"] += 1
    t["expiries"] = 0
    from .triggers import REPEATING, backoff_delay

    repeating = t["trigger"]["type"] in REPEATING
    c = t["constraints"]
    if status == "RETRY":
        if t["occ_attempts"] < c["max_attempts"]:
            t["state"] = "ENQUEUED"
            t["due"] = ts + backoff_delay(c["backoff"], c["backoff_delay"], t["occ_attempts"])
            return True  # the occurrence goes on: its trigger bookkeeping waits for its end
        status = "FAILURE"
        reason = f"gave up after {t['occ_attempts']} attempts" + (f": {op['message']}" if op.get("message") else "")
    else:
        reason = op.get("message") or "worker failed"
    if op.get("trig_state"):  # the occurrence ended: a new on-change baseline, a disarmed --when
        t["trig_state"] = dict(t["trig_state"], **op["trig_state"])
    if repeating:
        t["state"] = "ENQUEUED"
        t["occ_attempts"] = 0
        t["due"] = op.get("next_run_at") if op.get("next_run_at") is not None else ts
        return True
    if status == "SUCCESS":
        _finish(state, t, "SUCCEEDED", ts, None, emit)
    else:
        _finish(state, t, "FAILED", ts, reason, emit)
    return True


def _op_release(state: dict, op: dict, ts: float, emit: Emit) -> bool:
    t = _holder(state, op)
    if t is None:
        return False
    t["state"] = "ENQUEUED"
    t["lease"] = None
    t["updated_at"] = ts
    if op.get("due") is not None:
        t["due"] = op["due"]
    if emit:
        emit(ts, t["id"], "released", {"runner": op.get("runner")})
    return True


def _op_fail(state: dict, op: dict, ts: float, emit: Emit) -> bool:
    t = _current(state, op)
    if t is None or t["state"] not in UNFINISHED:
        return False
    if emit and op.get("missed"):  # --misfire-grace: the occurrence was too late to start
        emit(ts, t["id"], "missed", op["missed"])
    if op.get("result"):
        t["last_result"] = op["result"]
    _finish(state, t, "FAILED", ts, op.get("reason") or "failed", emit)
    return True


def _op_trig(state: dict, op: dict, ts: float, emit: Emit) -> bool:
    t = _current(state, op)
    if t is None or t["state"] not in UNFINISHED:
        return False
    if emit and op.get("missed"):  # --misfire-grace: skipped to the next occurrence
        emit(ts, t["id"], "missed", op["missed"])
    if op.get("due") is not None:
        t["due"] = op["due"]
    if op.get("trig_state"):
        t["trig_state"] = dict(t["trig_state"], **op["trig_state"])
    t["updated_at"] = ts
    return True


def _op_put(state: dict, op: dict, ts: float, emit: Emit) -> bool:
    if "task" in op:
        t = unpack_task(op["task"])
        state["tasks"][t["id"]] = t
        for dep in t.get("after", ()):
            if t["state"] == "BLOCKED":
                state["waiters"].setdefault(dep, []).append(t["id"])
    if "chain" in op:
        state["chains"][op["chain"]["id"]] = dict(op["chain"])
    return True


def _op_meta(state: dict, op: dict, ts: float, emit: Emit) -> bool:
    state["seq"] = max(state["seq"], op.get("seq", 0))
    state["fam"].update(op.get("fam", {}))
    return True


def _op_note(state: dict, op: dict, ts: float, emit: Emit) -> bool:
    """Something that happened around a task without changing it (a hook that failed)."""
    if emit:
        emit(ts, op.get("id", "?"), op.get("event", "note"), op.get("detail") or {})
    return True


_HANDLERS = {
    "note": _op_note,
    "enq": _op_enq,
    "chain": _op_chain,
    "cancel": _op_cancel,
    "claim": _op_claim,
    "result": _op_result,
    "release": _op_release,
    "fail": _op_fail,
    "trig": _op_trig,
    "put": _op_put,
    "meta": _op_meta,
    "hdr": lambda state, op, ts, emit: None,
}
