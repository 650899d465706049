"""The record schema, in one place: what a journal record and each of its ops hold, and the
functions that build the ops.

A record is ``{"ts": EPOCH, "ops": [op, ...]}``.  Every module that writes records builds its ops
here; :mod:`kmpwm.core.state` gives them their meaning (the fold).  The types are TypedDicts, defined for
readers and type checkers only (creating them would cost every command ~2 ms): the records stay
plain JSON data (a snapshot is their serialisation, the PostgreSQL store keeps the
same documents), and a type checker or a reader sees every key an op may carry.  Keys an op leaves
out take the default the fold gives them, so that a 10,000-task batch stays small.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # creating the types costs ~2 ms: for readers and type checkers, not at run time
    from typing import Literal, TypedDict

    # -- what is stored ------------------------------------------------------------------------

    class TaskRecord(TypedDict, total=False):
        """A task as enqueued (``enq``): ``id``, ``worker``, ``trigger`` and ``created_at`` always;
        the rest only when they differ from the default (api.Scheduler.build_task)."""

        id: str
        worker: str
        trigger: dict  # {"type": "one_time"|"periodic"|"exact"|"windowed"|"cron"|"on_change"|"device_state", ...}
        created_at: float
        input: str
        constraints: dict  # absent: state.DEFAULT_CONSTRAINTS_RECORD
        tags: list[str]
        host: str  # pinned to this host (SPEC section 14)
        due: float  # absent: created_at
        trig_state: dict

    class Lease(TypedDict, total=False):
        """Who runs a task (the fold's ``task["lease"]``, made from a ``claim``)."""

        runner: str
        pid: int
        token: str  # the holder's process start token: a recycled pid is not the holder
        until: float
        since: float
        boot: str
        host: str

    # -- the ops -------------------------------------------------------------------------------

    class Enq(TypedDict, total=False):
        op: Literal["enq"]
        task: TaskRecord
        policy: str  # keep | replace | append | append-or-replace | update
        by: str

    class Chain(TypedDict):
        op: Literal["chain"]
        id: str
        policy: str  # keep | replace
        steps: list[list[TaskRecord]]
        tags: list[str]

    class Cancel(TypedDict, total=False):
        op: Literal["cancel"]
        ids: list[str]
        tag: str
        all: bool

    class Claim(TypedDict, total=False):
        """A runner leases a task before it runs it; durable before the worker starts."""

        op: Literal["claim"]
        id: str
        seq: int  # the task's sequence number: a claim of a replaced task is stale
        born: float  # its created_at, the same check
        runner: str
        pid: int
        token: str
        until: float  # the lease's end
        occ: str  # the occurrence it consumes (on-change signature, --when entry): claimed once
        boot: str
        broken: bool | Literal["expired"]  # it takes over a lease whose holder is gone or whose time is up
        fence_broken: bool  # the cancelled run's holder is gone
        unstarted: bool  # the gone holder never started the worker: not the task's crash
        forced: bool  # run-now: a pause does not hold it
        ahead: bool  # claimed ahead of a free slot: its runner dying before the start is not a crash

    class Result(TypedDict, total=False):
        op: Literal["result"]
        id: str
        seq: int
        born: float
        runner: str
        claimed: float  # the claim it ran under (the lease's ``since``)
        status: Literal["SUCCESS", "FAILURE", "RETRY", "EXPIRED"]
        message: str | None
        data: Any
        duration_ms: int
        late_ms: int
        next_run_at: float | None
        trig_state: dict

    class Release(TypedDict, total=False):
        op: Literal["release"]
        id: str
        seq: int
        born: float
        runner: str
        due: float

    class Fail(TypedDict, total=False):
        op: Literal["fail"]
        id: str
        seq: int
        reason: str
        missed: dict
        result: dict

    class Trig(TypedDict, total=False):
        op: Literal["trig"]
        id: str
        seq: int
        due: float
        missed: dict
        trig_state: dict

    class Pause(TypedDict, total=False):
        op: Literal["pause"]
        ids: list[str]
        tag: str
        all: bool
        until: float | None
        by: str

    class Resume(TypedDict, total=False):
        op: Literal["resume"]
        ids: list[str]
        tag: str
        all: bool
        by: str

    class Retry(TypedDict, total=False):
        op: Literal["retry"]
        ids: list[str]
        by: str
        tasks: list[dict]  # the records it revives, so it folds the same over the hot state
        chains: list[dict]

    class Note(TypedDict, total=False):
        op: Literal["note"]
        id: str
        event: str
        detail: Any

    class Put(TypedDict, total=False):
        """Written by compaction and ``store copy``: a task or a chain as it stands."""

        op: Literal["put"]
        task: dict
        chain: dict

    class Meta(TypedDict, total=False):
        op: Literal["meta"]
        seq: int
        fam: dict[str, int]
        fences: dict
        qpause: dict

    class Header(TypedDict, total=False):
        op: Literal["hdr"]
        gen: str | None
        v: int  # the journal format version
        compacted_size: int  # automatic compaction waits until the journal doubles

    Op = (
        Enq
        | Chain
        | Cancel
        | Claim
        | Result
        | Release
        | Fail
        | Trig
        | Pause
        | Resume
        | Retry
        | Note
        | Put
        | Meta
        | Header
    )

    class Record(TypedDict, total=False):
        ts: float
        ops: list[Op]
        arc: bool  # history kept by compaction for `events`; the fold skips it


# -- building ops --------------------------------------------------------------------------


def enq(task: TaskRecord, policy: str) -> Enq:
    return {"op": "enq", "task": task, "policy": policy}


def chain(chain_id: str, policy: str, steps: list[list[TaskRecord]], tags: list[str]) -> Chain:
    return {"op": "chain", "id": chain_id, "policy": policy, "steps": steps, "tags": tags}


def cancel(*, ids: list[str] | None = None, tag: str | None = None, all: bool = False) -> Cancel:
    op: Cancel = {"op": "cancel"}
    _targets(op, ids or (), tag, all)  # type: ignore[arg-type]
    return op


def claim(task: dict, runner: str, pid: int, token: str, until: float, **flags: Any) -> Claim:
    """A claim of ``task`` (a task of the fold) under the lease (runner, pid, token) to ``until``;
    ``flags``: the optional keys of :class:`Claim` that apply."""
    op: Claim = {
        "op": "claim",
        "id": task["id"],
        "seq": task["seq"],
        "born": task["created_at"],
        "runner": runner,
        "pid": pid,
        "token": token,
        "until": until,
    }
    op.update(flags)  # type: ignore[typeddict-item]
    return op


def result(task: dict, runner: str, status: str, message, data, duration_ms: int) -> Result:
    op: Result = {
        "op": "result",
        "id": task["id"],
        "seq": task["seq"],
        "born": task["created_at"],
        "runner": runner,
        "status": status,  # type: ignore[typeddict-item]
        "message": message,
        "data": data,
        "duration_ms": duration_ms,
    }
    lease = task.get("lease")
    if lease:
        op["claimed"] = lease["since"]  # the claim it ran under: a lost claim loses no result
    return op


def release(task: dict, runner: str, *, born: bool = False, due: float | None = None) -> Release:
    """A claimed task handed back without a result (``born``: say which task it was, by its
    created_at, as a claim does)."""
    op: Release = {"op": "release", "id": task["id"], "seq": task["seq"]}
    if born:
        op["born"] = task["created_at"]
    op["runner"] = runner
    if due is not None:
        op["due"] = due
    return op


def fail(task: dict, reason: str, **extra: Any) -> Fail:
    op: Fail = {"op": "fail", "id": task["id"], "seq": task["seq"], "reason": reason}
    op.update(extra)  # type: ignore[typeddict-item]
    return op


def trig(task: dict, **fields: Any) -> Trig:
    op: Trig = {"op": "trig", "id": task["id"], "seq": task["seq"]}
    op.update(fields)  # type: ignore[typeddict-item]
    return op


def _targets(op: dict, ids, tag: str | None, all_: bool) -> None:
    if all_:
        op["all"] = True
    elif tag is not None:
        op["tag"] = tag
    else:
        op["ids"] = list(ids)


def pause(by: str, *, ids=(), tag: str | None = None, all_: bool = False, until: float | None = None) -> Pause:
    """Pause tasks (and their chains), a tag's, or with ``all_`` the queue itself, to ``until``."""
    op: Pause = {"op": "pause", "by": by}
    _targets(op, ids, tag, all_)  # type: ignore[arg-type]
    if until is not None:
        op["until"] = until
    return op


def resume(by: str, *, ids=(), tag: str | None = None, all_: bool = False) -> Resume:
    op: Resume = {"op": "resume", "by": by}
    _targets(op, ids, tag, all_)  # type: ignore[arg-type]
    return op


def retry(ids: list[str], by: str, tasks: list[dict] | None = None, chains: list[dict] | None = None) -> Retry:
    """``tasks``/``chains``: the records it revives that a reader without history lacks."""
    op: Retry = {"op": "retry", "ids": ids, "by": by}
    if tasks:
        op["tasks"] = tasks
    if chains:
        op["chains"] = chains
    return op


def note(task_id: str, event: str, detail: Any) -> Note:
    return {"op": "note", "id": task_id, "event": event, "detail": detail}


def put_task(task: dict) -> Put:
    return {"op": "put", "task": task}


def put_chain(chain: dict) -> Put:
    return {"op": "put", "chain": chain}


def meta(seq: int, fam: dict[str, int]) -> Meta:
    return {"op": "meta", "seq": seq, "fam": fam}


def header(gen: str | None, version: int | None = None) -> Header:
    op: Header = {"op": "hdr", "gen": gen}
    if version is not None:
        op["v"] = version
    return op
