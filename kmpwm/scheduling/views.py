"""Read-side views of the state: the task and chain documents of ``inspect-queue --json``,
selection by id, tag and state, and the effective state of a task at a given time."""

from __future__ import annotations

from kmpwm.core.exitcodes import InvalidParams
from kmpwm.core.models import FINISHED, UNFINISHED, TaskState, enum_value
from kmpwm.core.state import chain_next_step, chain_state, due_at, family, members
from kmpwm.core.timeparse import iso
from kmpwm.core.triggers import to_json as trigger_json
from kmpwm.scheduling.leases import lease_state, lost_why


def effective_state(t: dict, now: float) -> str:
    """RUNNING only while its lease holds (leases.lease_state); a task whose runner is gone is
    claimable again: ENQUEUED, due now."""
    if t["state"] == "RUNNING" and lease_state(t, now) != "held":
        return "ENQUEUED"
    return t["state"]


def next_run_at(t: dict, now: float) -> float | None:
    """When it runs next: None unless ENQUEUED; a task whose runner is gone, now."""
    state = effective_state(t, now)
    if state != "ENQUEUED":
        return None
    if t["state"] == "RUNNING":
        return now
    return due_at(t, now)


def task_json(t: dict, now: float) -> dict:
    paused, until = _own_pause(t, now)
    return {
        "id": t["id"],
        "worker": t["worker"],
        "state": effective_state(t, now),
        "chain_id": t.get("chain_id"),
        "step": t.get("step"),
        "attempts": t["attempts"],
        "next_run_at": iso(next_run_at(t, now)),
        "trigger": trigger_json(t["trigger"]),
        "constraints": t["constraints"],
        "input": t["input"],
        "tags": t.get("tags", []),
        "last_result": t["last_result"],
        "reason": _reason(t, now),
        "created_at": iso(t.get("created_at")),
        "finished_at": iso(t.get("finished_at")),
        "after": t.get("after", []),
        # the task's own pause (the queue's is inspect-queue's top-level "paused")
        "paused": paused,
        "paused_until": iso(until),
        "lease": _lease_json(t["lease"]) if t.get("lease") else None,
        "progress": None,  # the latest of a running task (kmpwm.storage.progress.attach)
        "host": t.get("host"),  # --host: the only host that runs it (null: any host)
    }


def _own_pause(t: dict, now: float) -> tuple[bool, float | None]:
    """Whether the task's own pause holds at ``now`` (an ended ``--until`` is over), and until
    when (None: until resumed)."""
    until = t.get("paused_until")
    if not t.get("paused") or t["state"] not in UNFINISHED:
        return False, None
    if until is not None and until <= now:
        return False, None
    return True, until


def _reason(t: dict, now: float) -> str | None:
    """A task's reason; a RUNNING one whose run is over without a result: why, and that it runs again."""
    if t["state"] != "RUNNING" or (ls := lease_state(t, now)) == "held":
        return t.get("reason")
    return f"{lost_why(t, ls)}: it runs again"


def _lease_json(lease: dict) -> dict:
    return {"runner": lease["runner"], "pid": lease.get("pid"), "until": iso(lease["until"]), "host": lease_host(lease)}


def lease_host(lease: dict) -> str | None:
    """The host of a lease's holder: the first part of its runner id (``host/pid/...``)."""
    runner = lease.get("runner")
    return runner.split("/", 1)[0] if isinstance(runner, str) and runner else None


def chain_json(state: dict, chain: dict) -> dict:
    return {
        "id": chain["id"],
        "state": chain_state(state, chain),
        "steps": chain["steps"],
        "next_step": chain_next_step(state, chain),
        "created_at": iso(chain.get("created_at")),
    }


def parse_state_filter(value: str | None) -> str | None:
    if value is None:
        return None
    return (
        enum_value(TaskState, value.upper(), what="state")
        if value.upper() in TaskState.__members__
        else _bad_state(value)
    )


def _bad_state(value: str):
    raise InvalidParams(f"invalid state {value!r}: expected one of {'|'.join(s.value for s in TaskState)}")


def select(
    state: dict,
    now: float,
    *,
    task_id: str | None = None,
    tag: str | None = None,
    state_filter: str | None = None,
    include_finished: bool = False,
) -> tuple[list[dict], list[dict]]:
    """Tasks and chains to show, in enqueue order."""
    chains = state["chains"]
    picked = _named(state, task_id) if task_id is not None else list(state["tasks"].values())
    finished_too = include_finished or task_id is not None
    picked = [t for t in picked if _shown(t, now, chains, tag, state_filter, finished_too)]
    picked.sort(key=lambda t: t["seq"])
    return picked, _chains_of(picked, chains, task_id)


def _chains_of(picked: list[dict], chains: dict, task_id: str | None) -> list[dict]:
    """The chains of the ``picked`` tasks, and the chain ``task_id`` names, in first-seen order."""
    chain_ids = dict.fromkeys(t["chain_id"] for t in picked if t.get("chain_id"))
    if task_id in chains:
        chain_ids[task_id] = None
    return [chains[c] for c in chain_ids if c in chains]


def _named(state: dict, task_id: str) -> list[dict]:
    """The tasks ``task_id`` names: a chain's, an exact ``ID#n``, or ``ID`` with its ``ID#n``."""
    tasks = state["tasks"]
    ids: list[str] = []
    chain = state["chains"].get(task_id)
    if chain is not None:
        ids += [t["id"] for t in members(state, chain)]
    ids += [task_id] if "#" in task_id else family(state, task_id)
    return [tasks[i] for i in dict.fromkeys(ids) if i in tasks]


def _shown(t: dict, now: float, chains: dict, tag: str | None, state_filter: str | None, finished_too: bool) -> bool:
    """Does ``t`` pass the filters: its tag (or its chain's), its effective state, else unfinished
    unless ``finished_too``?"""
    if tag is not None and not _tagged(t, tag, chains):
        return False
    if state_filter is not None:
        return effective_state(t, now) == state_filter
    return finished_too or t["state"] in UNFINISHED


def _tagged(t: dict, tag: str, chains: dict) -> bool:
    """Has ``t`` the tag, itself or through its chain?"""
    return tag in t.get("tags", ()) or (t.get("chain_id") in chains and tag in chains[t["chain_id"]].get("tags", ()))


def is_finished(t: dict) -> bool:
    return t["state"] in FINISHED


def queue_paused(state: dict, now: float) -> bool:
    """The queue's own flag (``pause --all``), while it holds."""
    q = state.get("qpause")
    return q is not None and (q.get("until") is None or q["until"] > now)
