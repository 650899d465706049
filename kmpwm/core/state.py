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
``pause`` / ``resume``   ids, a tag, or the queue itself (``all``), optionally ``until`` a time
``retry``   FAILED / CANCELLED tasks (and their chain) enqueued again; carries the records it
            revives, so that it folds the same over the hot state as over the whole one
``put`` / ``meta``   written by compaction: a task or chain as it stands, counters
``hdr``     the journal's header (its generation)
Records flagged ``"arc": true`` are history kept by compaction for ``events``; the fold skips them.
"""

from __future__ import annotations

from collections.abc import Callable

# The fold owns these (models.py re-exports them); importing models or triggers here would put
# their cost on every command, and an idle `run-due` needs neither.
UNFINISHED = frozenset({"ENQUEUED", "BLOCKED", "RUNNING"})
FINISHED = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})
MAX_EXPIRIES = 5  # expiries in a row before a task is FAILED
# The stored constraints of a task that sets none (what ``Constraints().to_record()`` gives:
# models.py checks that at import).  Records leave them out and the fold fills in this value, so
# it must only ever change together with a journal format version.
DEFAULT_CONSTRAINTS_RECORD = {
    "requires_network": False,
    "network_type": "not-required",
    "requires_charging": False,
    "battery_not_low": False,
    "storage_not_low": False,
    "device_idle": False,
    "heavy": False,
    "expedited": False,
    "qos": "default",
    "timeout": None,
    "backoff": "exponential",
    "backoff_delay": 10.0,
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
    return _step_members(state, chain, chain["steps"])


def _live_members(state: dict, chain: dict) -> list[dict]:
    """The chain's unfinished tasks, in step order."""
    return [t for t in members(state, chain) if t["state"] in UNFINISHED]


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
    if states & {"RUNNING", "SUCCEEDED"} or any(t["attempts"] for t in members_):
        return "RUNNING"  # under way: a task ran, or runs
    return "ENQUEUED"


def chain_next_step(state: dict, chain: dict) -> int | None:
    """Number of the first step with an unfinished task (the savepoint), None when none is left."""
    for number, step in enumerate(chain["steps"], 1):
        for i in step:
            t = member(state, chain, i)
            if t is not None and t["state"] in UNFINISHED:
                return number
    return None


def idle_at(state: dict, now: float, host: str | None = None) -> bool:
    """True when nothing can be due at ``now``: no task running (its lease may have ended) and
    every enqueued task due later, none of them at a time set while the clock was ahead (due_at).
    False means ``run-due`` must plan (scheduling.plan), which also checks on-change and
    device-state triggers, whose tasks are always due.  With ``host``
    (the runner's host name), tasks pinned to another host do not count: they never run here."""
    for t in state["tasks"].values():
        st = t["state"]
        if host is not None and t.get("host") not in (None, host):
            continue
        if st == "RUNNING":
            return False
        if st == "ENQUEUED":
            at = due_at(t, now)
            if at <= now or at < t["due"]:  # due, or set while the clock was ahead (run-due journals it anew)
                return False
    return True


_DUE_NOW = frozenset({"one_time", "on_change", "device_state"})  # work due at enqueue (after its delay)
CLOCK_SLACK = 60.0  # a clock set back by less than this is not worth judging due times anew


def due_at(t: dict, now: float) -> float:
    """When ``t`` is due, as judged at ``now``: its due time, except for work that was due "now"
    (after its own delay) when the clock was set back since, by more than CLOCK_SLACK: such work
    never waits longer from ``now`` than its delay, instead of waiting out the offset.  (Grids and
    named times stay where they are: a periodic task's next run after the change returns to its
    grid, next_periodic; a retry keeps its backoff.)  run-due journals such a judgement
    (decide._clock_went_back), so the delay counts from the first look after the change, not
    from every look.  Read-only: every view and ``run-due`` judge the same way."""
    due = t["due"]
    if due <= now + CLOCK_SLACK or (t.get("updated_at") or 0.0) <= now:
        return due  # the common case: the clock did not go back since the due time was set
    trig = t["trigger"]
    if trig["type"] not in _DUE_NOW or (t.get("last_result") or {}).get("status") == "RETRY":
        return due
    return min(due, now + (trig.get("delay") or 0.0))


def occurrence(t: dict, signature: list | None = None) -> str:
    """The occurrence a claim of ``t`` consumes, named in the claim (``occ``): the contents
    an on-change task saw (its ``signature`` now), the entry into the device state of a
    ``--when`` task (counted each time the trigger re-arms), else its due time (a periodic or
    cron slot; a one-time task's due time changes with every run that does not end it)."""
    kind = t["trigger"]["type"]
    if kind == "on_change":
        return "c:" + ",".join(map(str, signature or ()))
    if kind == "device_state":
        return f"w:{t['trig_state'].get('entry', 0)}"
    return f"d:{float(t['due'])!r}"


def occurrence_open(t: dict, occ: str) -> bool:
    """Is ``occ`` the occurrence ``t`` waits for now (not consumed by a run that ended)?  An
    on-change occurrence is consumed once its contents became the baseline; a device-state
    entry once the trigger disarmed (or re-armed for a later entry); a due time once the
    task moved on from it."""
    kind = t["trigger"]["type"]
    if kind == "on_change":
        return occ != occurrence(t, t["trig_state"].get("baseline"))
    if kind == "device_state":
        return t["trig_state"].get("armed", True) and occ == occurrence(t)
    return occ == occurrence(t)


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
    "input": None,
    "constraints": DEFAULT_CONSTRAINTS_RECORD,
    "chain_id": None,
    "step": None,
    "attempts": 0,
    "occ_attempts": 0,
    "expiries": 0,
    "crashes": 0,
    "lease": None,
    "last_result": None,
    "reason": None,
    "finished_at": None,
    "claimed_at": None,
    "host": None,  # --host: the only host whose runners run it (None: any host)
}


_PACKED_DEFAULTS = dict(_TASK_BASE, tags=[], after=[], trig_state={})
_TEMPLATE = dict.fromkeys(
    ("id", "worker", "trigger", "created_at", "due", "state", "seq", "updated_at", "tags", "after", "trig_state"), None
)
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


def _insert(
    state: dict, task: dict, ts: float, *, blocked: bool, chain_id: str | None = None, step: int | None = None
) -> dict:
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
    if new_state == "CANCELLED" and t["state"] == "RUNNING" and t["lease"]:
        _leave_fence(state, t)
    t["state"] = new_state
    t["reason"] = reason
    t["finished_at"] = ts
    t["updated_at"] = ts
    t["lease"] = None
    t["claimed_at"] = None  # a finished task takes no result: what its claims were no longer matters
    if emit:
        emit(ts, t["id"], new_state.lower(), {"reason": reason} if reason else {})
    if t.get("after"):
        _drop_waits(state, t)  # a finished task waits on nothing
    _release_waiters(state, t, ts, emit)
    chain = _chain_of_step(state, t)
    if chain is not None:
        _chain_goes_on(state, chain, t, ts, emit)


def _chain_goes_on(state: dict, chain: dict, t: dict, ts: float, emit: Emit) -> None:
    """``t``, a task of ``chain``, finished: a success may let the next step go; a failure fails
    the later steps' unfinished tasks, a cancel cancels them."""
    if t["state"] == "SUCCEEDED":
        _step_succeeded(state, chain, t["step"], ts, emit)
        return
    why = f"upstream {t['state'].lower()}"
    for other in _step_members(state, chain, chain["steps"][t["step"] :]):
        if other["state"] in UNFINISHED:  # (not one that an earlier _finish of this loop ended)
            _finish(state, other, t["state"], ts, why, emit)


def _leave_fence(state: dict, t: dict) -> None:
    """``t`` is cancelled (or replaced) while a worker runs it: the holder stops that worker (it
    watches the journal) and then writes a release.  Until then the lease lives on as a fence on
    the id (state["fences"], not on the finished task: history never changes), so that no run of
    a new task with this id starts beside the old one (_op_claim, scheduling.plan)."""
    lease = t["lease"]
    state.setdefault("fences", {})[t["id"]] = {k: lease.get(k) for k in ("runner", "pid", "token", "until")}


def _chain_of_step(state: dict, t: dict) -> dict | None:
    """The chain whose step ``t`` is (None: not in a chain, or a task of an earlier chain of that id)."""
    chain = state["chains"].get(t["chain_id"]) if t["chain_id"] else None
    if chain is None or t["step"] is None:
        return None
    steps = chain["steps"]
    if not 1 <= t["step"] <= len(steps) or t["id"] not in steps[t["step"] - 1]:
        return None
    return chain


def _step_members(state: dict, chain: dict, steps: list[list[str]]) -> list[dict]:
    """The chain's tasks in ``steps`` (a slice of its steps), in step order (see :func:`member`)."""
    return [t for step in steps for i in step if (t := member(state, chain, i)) is not None]


def _step_done(state: dict, chain: dict, number: int) -> bool:
    """Every task of step ``number`` that is still the chain's has succeeded."""
    return all(m["state"] == "SUCCEEDED" for m in _step_members(state, chain, chain["steps"][number - 1 : number]))


def _step_succeeded(state: dict, chain: dict, number: int, ts: float, emit: Emit) -> None:
    """A task of step ``number`` succeeded: when all of the step did, the next step's tasks go."""
    if not _step_done(state, chain, number) or number >= len(chain["steps"]):
        return
    for nxt in _step_members(state, chain, chain["steps"][number : number + 1]):
        if nxt["state"] == "BLOCKED" and not _waiting_on(state, nxt):
            _unblock(nxt, ts, emit, {"chain": chain["id"], "step": number + 1})


def _unblock(t: dict, ts: float, emit: Emit, detail: dict) -> None:
    """A BLOCKED task is due now (or at its own later due time)."""
    t["state"] = "ENQUEUED"
    t["due"] = max(t["due"], ts)
    t["updated_at"] = ts
    if emit:
        emit(ts, t["id"], "unblocked", detail)


def _waiting_on(state: dict, t: dict) -> bool:
    tasks = state["tasks"]
    return any(dep in tasks and tasks[dep]["state"] in UNFINISHED for dep in t.get("after", ()))


def _release_waiters(state: dict, t: dict, ts: float, emit: Emit) -> None:
    """The tasks appended after ``t`` go once they wait on nothing else (a chain step's task once
    its step before has succeeded as well)."""
    for wid in state["waiters"].pop(t["id"], ()):
        w = state["tasks"].get(wid)
        if w is not None and w["state"] == "BLOCKED" and not _waiting_on(state, w) and not _held_by_chain(state, w):
            _unblock(w, ts, emit, {"after": t["id"]})


def _held_by_chain(state: dict, t: dict) -> bool:
    """``t`` is a task of a chain's later step whose step before has not all succeeded."""
    if (t["step"] or 0) <= 1 or not t["chain_id"]:
        return False
    chain = state["chains"].get(t["chain_id"])
    return chain is not None and not _step_done(state, chain, t["step"] - 1)


def _current(state: dict, op: dict) -> dict | None:
    """The task ``op`` acts on, if it is still the one it names.  ``born`` (the task's
    ``created_at``, written by run-due) names it by itself; ``seq`` counts the tasks the fold has
    made, so a record lost to damage shifts it for every task made after it."""
    t = state["tasks"].get(op.get("id"))
    if t is None:
        return None
    born = op.get("born")
    if born is not None:
        return t if t["created_at"] == born else None
    return t if t["seq"] == op.get("seq") else None


# -- ops -----------------------------------------------------------------------------------


def _op_enq(state: dict, op: dict, ts: float, emit: Emit) -> dict:
    existing = unfinished_family(state, op["task"]["id"])
    by_policy = _ENQ_POLICIES.get(op.get("policy", "keep")) if existing else None
    if by_policy is not None:  # the id has unfinished work: keep, update, replace or append to it
        return by_policy(state, op, existing, ts, emit)
    t = _insert(state, op["task"], ts, blocked=False)
    if emit:
        emit(ts, t["id"], "enqueued", {"worker": t["worker"]})
    return {"action": "enqueued", "id": t["id"], "due": t["due"], "state": t["state"]}


def _enq_keep(state: dict, op: dict, existing: list[str], ts: float, emit: Emit) -> dict:
    last = state["tasks"][existing[-1]]
    if emit:
        emit(ts, op["task"]["id"], "kept", {})
    return {"action": "kept", "id": op["task"]["id"], "due": last["due"], "state": last["state"], "task": last["id"]}


def _enq_replace(state: dict, op: dict, existing: list[str], ts: float, emit: Emit) -> dict:
    for i in existing:
        _finish(state, state["tasks"][i], "CANCELLED", ts, "replaced", emit)
    t = _insert(state, op["task"], ts, blocked=False)
    if emit:
        emit(ts, t["id"], "enqueued", {"worker": t["worker"], "policy": op["policy"]})
    return {"action": "replaced", "id": t["id"], "due": t["due"], "state": t["state"]}


def _enq_append(state: dict, op: dict, existing: list[str], ts: float, emit: Emit) -> dict:
    """A new ``ID#n`` that waits for the family's last unfinished task."""
    base = op["task"]["id"]
    n = state["fam"][base] = state["fam"].get(base, 1) + 1
    t = _insert(state, dict(op["task"], id=f"{base}#{n}", after=[existing[-1]]), ts, blocked=True)
    if emit:
        emit(ts, t["id"], "enqueued", {"worker": t["worker"], "policy": op["policy"], "after": existing[-1]})
    return {"action": "appended", "id": t["id"], "due": None, "state": t["state"]}


def _op_chain(state: dict, op: dict, ts: float, emit: Emit) -> dict:
    cid = op["id"]
    old = state["chains"].get(cid)
    live = _live_members(state, old) if old is not None else []
    if live and op.get("policy", "replace") == "keep":
        return _chain_kept(old, ts, emit)
    for t in live:
        if t["state"] in UNFINISHED:  # (not a later step that the cancel of an earlier one ended)
            _finish(state, t, "CANCELLED", ts, "replaced", emit)
    chain = state["chains"][cid] = {
        "id": cid,
        "steps": [_insert_step(state, cid, number, step, ts, emit) for number, step in enumerate(op["steps"], 1)],
        "created_at": ts,
        "cancelled": False,
        "tags": op.get("tags", []),
    }
    return {"action": "replaced" if live else "enqueued", "id": cid, "tasks": _step_ids(chain)}


def _chain_kept(chain: dict, ts: float, emit: Emit) -> dict:
    """``chain --policy keep`` of a chain that is still going: nothing changes."""
    if emit:
        emit(ts, chain["id"], "kept", {"chain": chain["id"]})
    return {"action": "kept", "id": chain["id"], "tasks": _step_ids(chain)}


def _step_ids(chain: dict) -> list[str]:
    """The ids in the chain's steps, in step order (whether or not still the chain's tasks)."""
    return [i for step in chain["steps"] for i in step]


def _insert_step(state: dict, cid: str, number: int, step: list[dict], ts: float, emit: Emit) -> list[str]:
    """The tasks of step ``number`` of chain ``cid`` (an unfinished task of the same id is
    replaced); returns their ids."""
    ids = []
    for task in step:
        tid = task["id"]
        prior = state["tasks"].get(tid)
        if prior is not None and prior["state"] in UNFINISHED:
            _finish(state, prior, "CANCELLED", ts, "replaced", emit)
        _insert(state, task, ts, blocked=number > 1, chain_id=cid, step=number)
        ids.append(tid)
        if emit:
            emit(ts, tid, "enqueued", {"worker": task["worker"], "chain": cid, "step": number})
    return ids


def _op_cancel(state: dict, op: dict, ts: float, emit: Emit) -> list:
    tasks = state["tasks"]
    if op.get("all") or op.get("tag") is not None:
        targets = _cancel_all_or_tag(state, op.get("tag"))
        targets.sort(key=lambda i: tasks[i]["seq"])  # enqueue order, whatever the dict's order
    else:
        targets = _cancel_ids(state, op.get("ids", ()))
    cancelled: list[str] = []
    hook = _collect(cancelled, set(), emit)  # downstream steps cancelled too are reported as well
    for i in dict.fromkeys(targets):
        t = tasks[i]
        if t["state"] in UNFINISHED:
            _finish(state, t, "CANCELLED", ts, "cancelled", hook)
    return cancelled


def _cancel_all_or_tag(state: dict, tag: str | None) -> list[str]:
    """The unfinished tasks to cancel for ``cancel --all`` (tag None) or ``--tag``; the live chains
    concerned are marked cancelled."""
    targets = [i for i, t in state["tasks"].items() if t["state"] in UNFINISHED and _tagged(t, tag)]
    for chain in state["chains"].values():
        if _tagged(chain, tag) and live_chain(state, chain):
            chain["cancelled"] = True
            if tag is not None:  # (cancel --all has all of them already)
                targets += [t["id"] for t in _live_members(state, chain)]
    return targets


def _tagged(item: dict, tag: str | None) -> bool:
    """``item`` (a task or a chain) has ``tag``; with None (``cancel --all``), every item has."""
    return tag is None or tag in item.get("tags", ())


def _cancel_ids(state: dict, ids) -> list[str]:
    """The unfinished tasks named: a chain's live tasks, a task with its appended ``ID#n`` ones,
    or one ``ID#n`` named exactly."""
    tasks = state["tasks"]
    targets: list[str] = []
    for wanted in ids:
        chain = state["chains"].get(wanted)
        if chain is not None and live_chain(state, chain):
            chain["cancelled"] = True
        targets += [i for i in _named(state, wanted) if tasks[i]["state"] in UNFINISHED]
    return targets


def _named(state: dict, wanted: str) -> list[str]:
    """The ids ``wanted`` names: a chain's tasks, then a task with its appended ``ID#n`` ones, or
    one ``ID#n`` named exactly."""
    chain = state["chains"].get(wanted)
    ids = [t["id"] for t in members(state, chain)] if chain is not None else []
    if "#" not in wanted:
        return ids + family(state, wanted)
    if wanted in state["tasks"]:
        ids.append(wanted)
    return ids


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
    if t is None or not _claimable(state, t, op, ts, emit):
        return False
    t["state"] = "RUNNING"
    t["lease"] = _lease(op, ts)
    t["claimed_at"] = ts  # the newest claim: a result of an older one is stale (_unseen_claim)
    t["updated_at"] = ts
    if emit:
        emit(ts, t["id"], "started", {"runner": op["runner"], "pid": op.get("pid"), "attempt": t["occ_attempts"] + 1})
    return True


def _claimable(state: dict, t: dict, op: dict, ts: float, emit: Emit) -> bool:
    """May claim ``op`` take task ``t``?  (A RUNNING one is taken over, see :func:`_take_over`.)"""
    if t["state"] not in ("RUNNING", "ENQUEUED"):
        return False
    occ = op.get("occ")
    if occ is not None and not occurrence_open(t, occ):
        return False  # a claim planned on a stale view: that occurrence ran already
    if not op.get("forced") and pause_of(state, t, ts) is not None:
        return False  # paused after the claimer planned (run-now's claims are the user's say-so)
    if not _past_fence(state, t["id"], op, ts):
        return False  # a cancelled run of this id is still stopping
    # held, unless its lease ended or the holder is gone ("broken": the writer saw its process gone)
    return t["state"] != "RUNNING" or _take_over(t, op, ts, emit)


def _lease(op: dict, ts: float) -> dict:
    """The lease claim ``op`` takes at ``ts``."""
    lease = {
        "runner": op["runner"],
        "pid": op.get("pid"),
        "token": op.get("token"),
        "until": op["until"],
        "since": ts,
    }
    if op.get("boot"):
        lease["boot"] = op["boot"]  # the holder's boot: after a reboot it is gone for sure
    if op.get("occ") is not None:
        lease["occ"] = op["occ"]
    if op.get("ahead"):
        lease["ahead"] = True  # claimed ahead of a free slot: maybe never started
    return lease


def _past_fence(state: dict, task_id: str, op: dict, ts: float) -> bool:
    """False while the fence of a cancelled run of ``task_id`` stands; a fence that ended (or
    whose holder the claimer saw gone) is taken down."""
    fences = state.get("fences")
    fence = fences.get(task_id) if fences else None
    if fence is None:
        return True
    if fence["until"] > ts and not op.get("fence_broken"):
        return False
    _drop_fence(state, task_id)
    return True


def _drop_fence(state: dict, task_id: str) -> None:
    fences = state["fences"]
    del fences[task_id]
    if not fences:
        del state["fences"]  # (a state without fences has no such key, as new_state() gives)


def _take_over(t: dict, op: dict, ts: float, emit: Emit) -> bool:
    """A claim of a RUNNING task: only over a lease that ended or whose holder is gone; the gone
    holder's run counts as a crash of the task unless it never started."""
    lease = t["lease"]
    if lease and lease["until"] > ts and not op.get("broken"):
        return False
    if not (lease or {}).get("ahead") and not op.get("unstarted"):
        t["crashes"] += 1  # the previous holder vanished without a result while running it
    if emit and lease:
        why = "its process is gone" if op.get("broken") is True else "its lease ended"
        emit(ts, t["id"], "runner-lost", {"runner": lease.get("runner"), "pid": lease.get("pid"), "why": why})
    return True


def _holder(state: dict, op: dict) -> dict | None:
    t = _current(state, op)
    if t is None or t["state"] != "RUNNING" or not t["lease"] or t["lease"]["runner"] != op.get("runner"):
        return None
    return t


def _unseen_claim(state: dict, op: dict, ts: float, emit: Emit) -> dict | None:
    """The task of a result whose claim the fold never saw -- lost to damage and quarantined --
    when that claim is newer than every claim the fold did see of the task.

    A result is written only for a run whose claim its writer's fold accepted (under the lock, on
    the whole journal), and it names that claim (``claimed``, the claim's time).  A claim the fold
    saw that is newer superseded it (the run is stale); none newer means the fold is missing the
    claim, not that the run is stale, and forgetting the result would run a succeeded step again.
    A claim was accepted only once the task was due, so a chain step that still looks BLOCKED ran
    after every earlier step had succeeded: their lost results are recorded as successes."""
    claimed = op.get("claimed")
    t = _current(state, op)
    if claimed is None or t is None or t["state"] not in UNFINISHED:
        return None
    seen = t["lease"]["since"] if t["lease"] else t.get("claimed_at")
    if seen is not None and claimed <= seen:
        return None
    if t["state"] == "BLOCKED":
        _upstream_succeeded(state, t, ts, emit)
    t["claimed_at"] = claimed
    return t


def _upstream_succeeded(state: dict, t: dict, ts: float, emit: Emit) -> None:
    chain = _chain_of_step(state, t)
    if chain is None:
        return
    for m in _step_members(state, chain, chain["steps"][: t["step"] - 1]):
        if m["state"] in UNFINISHED:
            m["last_result"] = {
                "status": "SUCCESS",
                "data": None,
                "message": "its result was lost to journal damage; a later step of its chain ran, so it had succeeded",
            }
            _finish(state, m, "SUCCEEDED", ts, None, emit)


def _op_result(state: dict, op: dict, ts: float, emit: Emit) -> bool:
    t = _holder(state, op) or _unseen_claim(state, op, ts, emit)
    if t is None:
        _stale_result(state, op, ts, emit)
        return False
    result = {"status": op["status"], "message": op.get("message"), "data": op.get("data")}
    if op.get("late_ms") is not None:
        result["late_ms"] = op["late_ms"]  # an exact task: how late it ran
    if emit:
        emit(ts, t["id"], "ran", dict(result, duration_ms=op.get("duration_ms"), runner=op.get("runner")))
    t["lease"] = None
    t["updated_at"] = ts
    t["crashes"] = 0
    t["last_result"] = result
    if op["status"] == "EXPIRED":
        _expired(state, t, ts, emit)
    else:
        _ran(state, t, op, ts, emit)
    return True


def _stale_result(state: dict, op: dict, ts: float, emit: Emit) -> None:
    """A result of a run that no longer holds its task: reported, and the fence that a cancel of
    that run left (if any) comes down."""
    if emit:
        emit(ts, op.get("id", "?"), "stale-result", {"status": op.get("status"), "runner": op.get("runner")})
    _unfence(state, op, ts, emit)


def _expired(state: dict, t: dict, ts: float, emit: Emit) -> None:
    """A run that did not end in time: due again at once, FAILED after MAX_EXPIRIES in a row."""
    t["expiries"] += 1
    if t["expiries"] >= MAX_EXPIRIES:
        _finish(state, t, "FAILED", ts, f"expired {t['expiries']} times in a row", emit)
    else:
        t["state"] = "ENQUEUED"
        t["due"] = ts


def _ran(state: dict, t: dict, op: dict, ts: float, emit: Emit) -> None:
    """A run that ended SUCCESS, FAILURE or RETRY: tried again after its backoff, due at its
    trigger's next occurrence, or finished."""
    from kmpwm.core.triggers import REPEATING

    t["attempts"] += 1
    t["occ_attempts"] += 1
    t["expiries"] = 0
    if op["status"] == "RETRY" and _backed_off(t, ts):
        return  # the occurrence goes on: its trigger bookkeeping waits for its end
    if op.get("trig_state"):  # the occurrence ended: a new on-change baseline, a disarmed --when
        t["trig_state"] = dict(t["trig_state"], **op["trig_state"])
    if t["trigger"]["type"] in REPEATING:
        _next_occurrence(t, op, ts)
    elif op["status"] == "SUCCESS":
        _finish(state, t, "SUCCEEDED", ts, None, emit)
    else:
        _finish(state, t, "FAILED", ts, _failure_reason(t, op), emit)


def _backed_off(t: dict, ts: float) -> bool:
    """A RETRY with attempts left is due again after its backoff delay (False: none left)."""
    from kmpwm.core.triggers import backoff_delay

    c = t["constraints"]
    if t["occ_attempts"] >= c["max_attempts"]:
        return False
    t["state"] = "ENQUEUED"
    t["due"] = ts + backoff_delay(c["backoff"], c["backoff_delay"], t["occ_attempts"])
    return True


def _next_occurrence(t: dict, op: dict, ts: float) -> None:
    """A repeating task whose occurrence ended waits for its next one."""
    t["state"] = "ENQUEUED"
    t["occ_attempts"] = 0
    t["due"] = op.get("next_run_at") if op.get("next_run_at") is not None else ts
    if "updated_due" in t:  # --policy update gave it a new trigger while this run went on
        t["due"] = t.pop("updated_due")


def _failure_reason(t: dict, op: dict) -> str:
    if op["status"] != "RETRY":
        return op.get("message") or "worker failed"
    reason = f"gave up after {t['occ_attempts']} attempts"
    return f"{reason}: {op['message']}" if op.get("message") else reason


def _unfence(state: dict, op: dict, ts: float, emit: Emit) -> None:
    """A runner's result or release for a run that was cancelled meanwhile: its worker has
    stopped, so the fence it left (see _finish) comes down and the id may run again."""
    fences = state.get("fences")
    tid = op.get("id")
    if fences and tid in fences and fences[tid].get("runner") == op.get("runner"):
        _drop_fence(state, tid)
        if emit:
            emit(ts, tid, "stopped", {"runner": op.get("runner")})


def _op_release(state: dict, op: dict, ts: float, emit: Emit) -> bool:
    t = _holder(state, op)
    if t is None:
        _unfence(state, op, ts, emit)
        return False
    t["state"] = "ENQUEUED"
    t["lease"] = None
    t["updated_at"] = ts
    if op.get("due") is not None:
        t["due"] = op["due"]
    if emit:
        emit(ts, t["id"], "released", {"runner": op.get("runner")})
    return True


def _unfinished_target(state: dict, op: dict, ts: float, emit: Emit) -> dict | None:
    """The unfinished task a ``fail`` or ``trig`` op acts on (None: gone or finished), with the
    occurrence it ``missed`` (--misfire-grace) reported."""
    t = _current(state, op)
    if t is None or t["state"] not in UNFINISHED:
        return None
    if emit and op.get("missed"):
        emit(ts, t["id"], "missed", op["missed"])
    return t


def _op_fail(state: dict, op: dict, ts: float, emit: Emit) -> bool:
    t = _unfinished_target(state, op, ts, emit)  # missed: the occurrence was too late to start
    if t is None:
        return False
    if op.get("result"):
        t["last_result"] = op["result"]
    _finish(state, t, "FAILED", ts, op.get("reason") or "failed", emit)
    return True


def _op_trig(state: dict, op: dict, ts: float, emit: Emit) -> bool:
    t = _unfinished_target(state, op, ts, emit)  # missed: skipped to the next occurrence
    if t is None:
        return False
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
    if op.get("fences"):
        state.setdefault("fences", {}).update(op["fences"])
    if op.get("qpause"):
        state["qpause"] = dict(op["qpause"])
    return True


# -- steering (SPEC section 11) -------------------------------------------------------------


def pause_of(state: dict, t: dict, now: float) -> dict | None:
    """Whether task ``t`` is paused at ``now``: None, or ``{"until": EPOCH|None, "queue": bool}``
    (``queue``: the whole queue is paused).  A pause whose ``until`` has passed is over.  The one
    place that decides it: run-due's plan, explain, the task JSON and the runner's claims ask here."""
    q = state.get("qpause")
    if q is not None and _holds(q.get("until"), now):
        return {"until": q.get("until"), "queue": True}
    if t.get("paused") and _holds(t.get("paused_until"), now):
        return {"until": t.get("paused_until"), "queue": False}
    return None


def _holds(until: float | None, now: float) -> bool:
    """A pause to ``until`` (None: until resumed) is not over at ``now``."""
    return until is None or until > now


def steer_targets(state: dict, op: dict, wanted_states) -> list[str]:
    """Ids named by ``op`` (``ids``: a chain id, ``ID`` with its ``ID#n``, or an exact ``ID#n``;
    ``tag``: tasks with the tag or in a chain with it) whose state is in ``wanted_states``, in
    enqueue order."""
    tasks = state["tasks"]
    if op.get("tag") is not None:
        targets = _with_tag(state, op["tag"])
    else:
        targets = [i for wanted in op.get("ids", ()) for i in _named(state, wanted)]
    out = [i for i in dict.fromkeys(targets) if i in tasks and tasks[i]["state"] in wanted_states]
    out.sort(key=lambda i: tasks[i]["seq"])
    return out


def _with_tag(state: dict, tag: str) -> list[str]:
    """Ids of the tasks with ``tag`` or in a chain with it."""
    chains = {cid for cid, c in state["chains"].items() if tag in c.get("tags", ())}
    return [i for i, t in state["tasks"].items() if tag in t.get("tags", ()) or t.get("chain_id") in chains]


def _op_pause(state: dict, op: dict, ts: float, emit: Emit) -> list:
    until = op.get("until")
    detail = {"by": op.get("by")}
    if until is not None:
        detail["until"] = until
    if op.get("all"):
        return _pause_queue(state, op, ts, emit, detail)
    done = steer_targets(state, op, UNFINISHED)
    for i in done:
        t = state["tasks"][i]
        t["paused"] = True
        t["paused_until"] = until
        t["updated_at"] = ts
        if emit:
            emit(ts, i, "paused", detail)
    return done


def _pause_queue(state: dict, op: dict, ts: float, emit: Emit, detail: dict) -> list[str]:
    """``pause --all``: the queue itself is paused; returns the tasks paused one by one before."""
    state["qpause"] = {"until": op.get("until"), "since": ts, "by": op.get("by")}
    if emit:
        emit(ts, "*", "paused", dict(detail, queue=True))
    return _paused(state)


def _resume_queue(state: dict, op: dict, ts: float, emit: Emit) -> list[str]:
    """``resume --all``: the queue's pause ends, and every paused task is resumed (returned)."""
    if state.pop("qpause", None) is not None and emit:
        emit(ts, "*", "resumed", {"by": op.get("by"), "queue": True})
    return _paused(state)


def _paused(state: dict) -> list[str]:
    """Ids of the paused unfinished tasks (history never changes), in enqueue order."""
    tasks = state["tasks"]
    return sorted(
        (i for i, t in tasks.items() if t["state"] in UNFINISHED and t.get("paused")), key=lambda i: tasks[i]["seq"]
    )


def _op_resume(state: dict, op: dict, ts: float, emit: Emit) -> list:
    tasks = state["tasks"]
    if op.get("all"):
        done = _resume_queue(state, op, ts, emit)
    else:
        done = [i for i in steer_targets(state, op, UNFINISHED) if tasks[i].get("paused")]
    for i in done:
        t = tasks[i]
        t.pop("paused", None)
        t.pop("paused_until", None)
        t["updated_at"] = ts
        if emit:
            emit(ts, i, "resumed", {"by": op.get("by")})
    return done


def _op_retry(state: dict, op: dict, ts: float, emit: Emit) -> list:
    """``op["tasks"]``: the packed records of the tasks to revive as they stood when the op was
    made (the hot state may lack them: finished work lives in history); ``op["chains"]`` likewise
    for their chains, with ``op["ids"]`` the tasks the user asked for."""
    _restore(state, op)
    revived: list[str] = []
    for tid in op.get("ids", ()):
        t = state["tasks"].get(tid)
        if t is None or t["state"] not in _RETRYABLE:
            continue  # (as is a task of a chain that an earlier id of the op revived)
        chain = _chain_of_step(state, t)
        if chain is None:
            _retry_task(state, tid, ts, emit, op.get("by"))
            revived.append(tid)
        else:
            chain = state["chains"][chain["id"]] = dict(chain)  # a new object: the snapshot writes history by identity
            revived += _retry_chain(state, chain, ts, emit, op.get("by"))
    return revived


_RETRYABLE = frozenset({"FAILED", "CANCELLED"})


def _restore(state: dict, op: dict) -> None:
    """The tasks and chains a ``retry`` op carries, put back where the state lacks them."""
    tasks, chains = state["tasks"], state["chains"]
    for packed in op.get("tasks", ()):
        if packed["id"] not in tasks:
            tasks[packed["id"]] = unpack_task(packed)
    for chain in op.get("chains", ()):
        if chain["id"] not in chains:
            chains[chain["id"]] = dict(chain)


def _retry_task(state: dict, tid: str, ts: float, emit: Emit, by) -> None:
    tasks = state["tasks"]
    t = tasks[tid] = dict(tasks[tid])  # a new object (see _op_retry)
    waiting = [d for d in t.get("after", ()) if d in tasks and tasks[d]["state"] in UNFINISHED]
    _revive(t, "BLOCKED" if waiting else "ENQUEUED", ts, emit, by)
    for d in waiting:  # appended after a task that is unfinished: it waits for it again, as appended
        state["waiters"].setdefault(d, []).append(tid)


def _retry_chain(state: dict, chain: dict, ts: float, emit: Emit, by) -> list[str]:
    """The chain resumes at its first step with a task that did not succeed: that step's failed
    and cancelled tasks are due now, the later steps' ones BLOCKED again; successes stay."""
    chain["cancelled"] = False
    revived = []
    resume_at = None
    for number, step in enumerate(chain["steps"], 1):
        for i in step:
            m = member(state, chain, i)
            if m is None or m["state"] == "SUCCEEDED":
                continue
            if resume_at is None:
                resume_at = number
            if m["state"] in FINISHED:
                m = state["tasks"][i] = dict(m)  # a new object (see _op_retry)
                _revive(m, "ENQUEUED" if number == resume_at else "BLOCKED", ts, emit, by)
                revived.append(i)
    return revived


def _revive(t: dict, new_state_: str, ts: float, emit: Emit, by) -> None:
    t["state"] = new_state_
    t["attempts"] = t["occ_attempts"] = t["expiries"] = t["crashes"] = 0
    t["reason"] = None
    t["finished_at"] = None
    t["lease"] = None
    t["due"] = ts
    t["updated_at"] = ts
    t.pop("paused", None)
    t.pop("paused_until", None)
    if emit:
        emit(ts, t["id"], "retried", {"by": by, "state": new_state_})


_UPDATED = ("worker", "input", "trigger", "constraints", "tags", "host")  # what --policy update changes


def _enq_update(state: dict, op: dict, existing: list[str], ts: float, emit: Emit) -> dict:
    """``--policy update``: the family's first unfinished task ``t`` keeps its id, seq, attempts
    and (for an equal trigger) its due time and trigger state; it takes the new worker, input,
    trigger, constraints, tags and host (the new request's ``--host``, None unpinning it).  A
    running run goes on with the definition it started with (the runner holds its own copy), on
    the host that claimed it."""
    t, task = state["tasks"][existing[0]], op["task"]
    changed = [k for k in _UPDATED if task.get(k, _PACKED_DEFAULTS.get(k)) != t.get(k)]
    t["worker"] = task["worker"]
    t["input"] = task.get("input")
    t["host"] = task.get("host")
    t["constraints"] = task.get("constraints", DEFAULT_CONSTRAINTS_RECORD)
    t["tags"] = list(task.get("tags") or [])
    if task["trigger"] != t["trigger"]:
        _new_trigger(t, task, ts)
    t["updated_at"] = ts
    if emit:
        emit(ts, t["id"], "updated", {"changed": changed, "by": op.get("by")})
    due = t["due"] if t["state"] == "ENQUEUED" else None
    return {"action": "updated", "id": t["id"], "due": t.get("updated_due", due), "state": t["state"]}


def _new_trigger(t: dict, task: dict, ts: float) -> None:
    """``t`` takes the trigger of request ``task``, and the due time it gives."""
    t["trigger"] = task["trigger"]
    t["trig_state"] = dict(task.get("trig_state") or {})
    due = task["due"] if "due" in task else task.get("created_at", ts)
    if t["state"] == "RUNNING":
        t["updated_due"] = due  # the run's result must not put it back on the old grid
    elif t["state"] == "ENQUEUED":
        t["due"] = due


def _op_note(state: dict, op: dict, ts: float, emit: Emit) -> bool:
    """Something that happened around a task without changing it (a hook that failed)."""
    if emit:
        emit(ts, op.get("id", "?"), op.get("event", "note"), op.get("detail") or {})
    return True


_ENQ_POLICIES = {
    "keep": _enq_keep,
    "update": _enq_update,
    "replace": _enq_replace,
    "append": _enq_append,
    "append-or-replace": _enq_append,
}

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
    "pause": _op_pause,
    "resume": _op_resume,
    "retry": _op_retry,
    "hdr": lambda state, op, ts, emit: None,
}
