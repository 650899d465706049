"""The Python API (SPEC section 8): the layer that does the work under the CLI.

    from kmpwm import Scheduler, TaskRequest, Constraints
    from kmpwm.core import triggers

    s = Scheduler()
    s.enqueue("data-sync", triggers.Periodic(3600), "SyncWorker",
              constraints=Constraints(requires_network=True))
    s.begin_with(TaskRequest("Download")).then([TaskRequest("Thumb"), TaskRequest("Index")]) \\
     .with_id("sync", policy="keep").enqueue()
    with s.batch():            # many enqueues, one durable append
        for n in range(1000):
            s.enqueue(f"job-{n}", None, "Echo")
"""

from __future__ import annotations

import gc
import os
import re
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kmpwm.core import schema
from kmpwm.core.exitcodes import InvalidParams, KmpwmError, OsPolicy
from kmpwm.core.hosts import check_host, this_host
from kmpwm.core.models import (
    DEFAULT_CONSTRAINTS_RECORD,
    UNFINISHED,
    Constraints,
    ExactBehavior,
    ExistingWorkPolicy,
    ScheduleResult,
    TaskRequest,
    enum_value,
)
from kmpwm.core.specs import normalise_input
from kmpwm.core.state import base_id, unfinished_family
from kmpwm.core.triggers import REPEATING, TIMED, Cron, DeviceState, OneTime, Periodic, initial, jitter_offset
from kmpwm.storage.paths import Paths, resolve
from kmpwm.storage.stores import open_store

MAX_ID_LEN = 200
MAX_CHAIN_TASKS = 10_000
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Triggers whose stored form does not depend on the time of enqueue (frozen, hashable).
_CACHEABLE_TRIGGERS = (OneTime, Periodic, Cron, DeviceState)


@dataclass(slots=True)
class Outcome:
    """What happened to one enqueue or chain request."""

    result: ScheduleResult
    id: str | None
    action: str | None = None  # enqueued | kept | replaced | appended
    next_run_at: float | None = None
    state: str | None = None  # the task's state as every view shows it (views.effective_state)
    tasks: list[str] = field(default_factory=list)
    error: str | None = None
    exit_code: int = 0
    hint: str | None = None  # how to fix it, for people (the CLI prints it under the error)

    @property
    def ok(self) -> bool:
        return self.result is ScheduleResult.SUCCESS


def check_id(value: Any, *, what: str = "id", allow_hash: bool = False) -> str:
    if (
        type(value) is str
        and 0 < len(value) <= MAX_ID_LEN
        and value.isascii()
        and value.isprintable()
        and not value.isspace()
        and (allow_hash or "#" not in value)
    ):
        return value  # the common case, checked in one go; the rest says what is wrong
    return _checked_id(value, what, allow_hash)


def _checked_id(value: Any, what: str, allow_hash: bool) -> str:
    """:func:`check_id` one check at a time, each with its own message (valid non-ASCII ids pass)."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidParams(f"invalid {what} {value!r}: expected a non-empty string")
    if len(value) > MAX_ID_LEN:
        raise InvalidParams(f"invalid {what}: longer than {MAX_ID_LEN} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidParams(f"invalid {what} {value!r}: not valid UTF-8 text") from None
    if _CONTROL.search(value):
        raise InvalidParams(f"invalid {what} {value!r}: control characters are not allowed")
    if "#" in value and not allow_hash:
        raise InvalidParams(f"invalid {what} {value!r}: '#' is reserved for appended tasks (ID#2, ID#3, ...)")
    return value


def check_tags(tags: Iterable[str]) -> list[str]:
    tags = list(tags)
    for tag in tags:
        if not _is_tag(tag):
            raise InvalidParams(f"invalid tag {tag!r}: expected a short non-empty string of UTF-8 text")
    return list(dict.fromkeys(tags))  # each once, in order


def _is_tag(tag: Any) -> bool:
    """A string of 1 to 100 characters, none of them below U+0020 or a surrogate."""
    return (
        isinstance(tag, str) and 0 < len(tag) <= 100 and not any(ord(c) < 32 or 0xD800 <= ord(c) < 0xE000 for c in tag)
    )


def _chain_id(chain_id: str | None) -> str:
    if chain_id is None:
        return f"chain-{uuid.uuid4().hex[:10]}"
    check_id(chain_id, what="chain id")
    if "/" in chain_id:
        raise InvalidParams(f"invalid chain id {chain_id!r}: '/' separates the parts of its task ids")
    return chain_id


def _check_importable(worker: str, info) -> None:
    """A worker declared in config.toml: its module imports."""
    from kmpwm.running.registry import import_error

    problem = import_error(info)
    if problem is not None:
        where = ", ".join(info.config.import_dirs)
        raise InvalidParams(
            f"worker {worker!r}: {problem} (searched {where} and sys.path; say where "
            f'the module is with path = "DIR" in [workers.{worker}] of config.toml)'
        )


def _first_due(trig: dict, crec: dict, task_id: str, host: str | None, now: float) -> tuple[float, dict | None]:
    """A new task's due time and trigger state (with its ``--jitter`` offset)."""
    if trig["type"] == "one_time":
        return now + trig["delay"], None
    offset = jitter_offset(task_id, crec["jitter"], host) if "jitter" in crec else 0.0
    return initial(trig, now, offset)


def _check_timed_only(crec: dict, trig: dict) -> None:
    """``--jitter`` and ``--misfire-grace`` go with triggers whose due times are on a clock or grid."""
    for key, flag in (("jitter", "--jitter"), ("misfire_grace", "--misfire-grace")):
        if key in crec and trig["type"] not in TIMED:
            raise InvalidParams(f"{flag} needs a trigger with due times on a clock or grid (--every, --cron or --at)")


def _exact_behavior(trig: dict, constraints: Constraints) -> None:
    """An exact trigger whose behaviour is "attempt" (its default) takes the constraints'
    ``exact_behavior``; the behaviour "error" is refused: this platform cannot wake at an exact time."""
    behavior = enum_value(ExactBehavior, constraints.exact_behavior, what="exact behavior")
    if trig["type"] != "exact":
        return
    if behavior != "attempt" and trig.get("behavior") == "attempt":
        trig["behavior"] = behavior
    if trig["behavior"] == "error":
        raise OsPolicy(
            "REJECTED_OS_POLICY: this platform cannot wake at an exact time; kmpwm runs exact tasks "
            "at the first run-due after the time",
            hint="use --exact-behavior attempt (run late, lateness recorded) or notify",
        )


def _chain_steps(steps) -> list[list]:
    """A chain's steps as lists, checked: at least one step, each with a task, not too many tasks."""
    steps = [step if type(step) is list else list(step) for step in steps]
    if not steps or not all(steps):
        raise InvalidParams("a chain needs at least one step, and every step at least one task")
    total = sum(map(len, steps))
    if total > MAX_CHAIN_TASKS:
        raise InvalidParams(f"chain too large ({total} tasks; the limit is {MAX_CHAIN_TASKS})")
    return steps


def _task_host(host: str | None, trig: dict, task_id: str) -> str | None:
    """The host a task is pinned to: the one asked for, checked; an on-change task's is the host
    that enqueues it (a path means something on the machine it lives on)."""
    if host is not None:
        host = check_host(host, "host")
    if trig["type"] != "on_change":
        return host
    here = this_host()
    if host is not None and host != here:
        raise InvalidParams(
            f"--on-change task {task_id!r}: pinned to the host that enqueues it ({here}), not {host!r} "
            f"(its path is on this machine; enqueue it on {host} to watch a path there)"
        )
    return here


class Scheduler:
    """Enqueue, chain, cancel and inspect tasks of one kmpwm home (``KMPWM_HOME`` by default)."""

    def __init__(self, home: str | os.PathLike | None = None, *, paths: Paths | None = None):
        self.paths = paths or resolve(home)
        self.store = open_store(self.paths)
        self._registry = None
        self._pending: list | None = None  # (kind, payload, outcome) while a batch is open
        self._workers_ok: set[str] = set()
        self._command_workers: set[str] = set()
        self._clean_workers: set[str] = set()  # names fit for generated task ids
        self._plain: tuple[dict, dict] | None = None  # validated default trigger and constraints
        self._assume = os.environ.get("KMPWM_ASSUME")
        self._validated: dict = {}

    @property
    def registry(self):
        if self._registry is None:
            from kmpwm.running.registry import Registry

            self._registry = Registry(self.paths)
        return self._registry

    # -- building task records ------------------------------------------------------------

    def build_task(self, req: TaskRequest, now: float, *, task_id: str | None = None, trusted_id: bool = False) -> dict:
        """Validate a request and return the task record to journal (raises KmpwmError).

        Validated trigger and constraint records are cached by value, so a batch of many similar
        requests validates each distinct trigger and constraint set once."""
        if task_id is None:
            task_id = check_id(req.id)
        elif not trusted_id:
            task_id = check_id(task_id, allow_hash=True)
        worker = req.worker
        if worker not in self._workers_ok:
            self._check_worker(worker)
        trig, crec = self._trigger_and_constraints(req, now)
        host = _task_host(req.host, trig, task_id)
        due, trig_state = _first_due(trig, crec, task_id, host, now)
        data = req.input
        if data is not None:
            data = self._task_input(data, worker)
        # Defaults are left out of the record (the fold fills them in): a 10,000-task batch is a
        # third of the bytes to serialise, checksum and fsync.
        task = {"id": task_id, "worker": worker, "trigger": trig, "created_at": now}
        tags = check_tags(req.tags) if req.tags else None
        optional = (
            ("input", data, data is not None),
            ("constraints", crec, crec is not DEFAULT_CONSTRAINTS_RECORD),
            ("tags", tags, tags is not None),
            ("host", host, host is not None),
            ("due", due, due != now),
            ("trig_state", trig_state, bool(trig_state)),
        )
        for key, value, present in optional:
            if present:
                task[key] = value
        return task

    def _trigger_and_constraints(self, req: TaskRequest, now: float) -> tuple[dict, dict]:
        """The validated trigger and constraint records of a request."""
        trigger = req.trigger if req.trigger is not None else _ONE_TIME
        constraints = req.constraints if req.constraints is not None else _DEFAULT_CONSTRAINTS
        if trigger is _ONE_TIME and constraints is _DEFAULT_CONSTRAINTS and self._plain is not None:
            return self._plain  # the most common request: no trigger, no constraints
        if not isinstance(constraints, Constraints):
            raise InvalidParams("invalid constraints: expected kmpwm.Constraints")
        return self._validated_pair(trigger, constraints, now)

    def _check_worker(self, worker) -> None:
        """The worker exists (and a config worker's module imports): found now, not at 2 a.m."""
        if not isinstance(worker, str) or not worker:
            raise InvalidParams("missing worker name")
        info = self.registry.get(worker)
        if info is None:
            raise InvalidParams(
                f"unknown worker {worker!r}",
                hint="`kmpwm workers` lists the workers; declare it as [workers.NAME] in config.toml "
                "or install a package that provides it",
            )
        if info.kind == "command":
            self._command_workers.add(worker)
        elif info.source == "config":  # (entry points: checked at their install)
            _check_importable(worker, info)
        self._workers_ok.add(worker)

    def _task_input(self, data: str, worker: str) -> str:
        data = normalise_input(data)
        if worker in self._command_workers and "\0" in data:
            # it travels in KMPWM_INPUT, and no environment variable can hold a NUL byte
            raise InvalidParams(
                f"invalid input: a NUL byte, which the command worker {worker!r} cannot "
                "receive (it is passed in the environment, KMPWM_INPUT)",
                hint="encode binary input (base64) or pass a path to a file",
            )
        return data

    def _validated_pair(self, trigger, constraints: Constraints, now: float) -> tuple[dict, dict]:
        if not isinstance(trigger, _CACHEABLE_TRIGGERS):
            return self._validate(trigger, constraints, now)
        try:
            key = (trigger, constraints.key(), self._assume)
            return self._validated[key]
        except KeyError:
            pair = self._validated[key] = self._validate(trigger, constraints, now)
            if trigger is _ONE_TIME and constraints is _DEFAULT_CONSTRAINTS:
                self._plain = pair
            return pair
        except TypeError:  # unhashable values (a list in a field): validate without the cache
            return self._validate(trigger, constraints, now)

    def _validate(self, trigger, constraints: Constraints, now: float) -> tuple[dict, dict]:
        if not hasattr(trigger, "to_record"):
            raise InvalidParams(f"invalid trigger {trigger!r}: use kmpwm.core.triggers")
        trig = trigger.to_record(now)
        _exact_behavior(trig, constraints)
        crec = constraints.to_record()
        _check_timed_only(crec, trig)
        if crec == DEFAULT_CONSTRAINTS_RECORD:
            crec = DEFAULT_CONSTRAINTS_RECORD
        from kmpwm.scheduling.probes import unobservable

        missing = unobservable(crec, trig)
        if missing:
            raise OsPolicy(
                f"REJECTED_OS_POLICY: {missing[0]}",
                hint="see the README's table of constraints by platform, or set KMPWM_ASSUME",
            )
        return trig, crec

    # -- enqueue --------------------------------------------------------------------------

    def enqueue(
        self,
        id: str,
        trigger: Any = None,
        worker: str | None = None,
        input: Any = None,
        constraints: Constraints | None = None,
        *,
        policy: ExistingWorkPolicy | str = "keep",
        tags: Sequence[str] = (),
        host: str | None = None,
    ) -> ScheduleResult:
        """Schedule one task (seed: ``enqueue``); returns a ScheduleResult.  ``host`` pins it to
        the runners of that host (``KMPWM_HOST``, else the machine's name); an on-change task is
        pinned to this host whatever it says (another host is REJECTED_INVALID_PARAMS)."""
        req = TaskRequest(
            worker=worker,
            id=id,
            input=input,
            trigger=trigger,
            constraints=constraints or _DEFAULT_CONSTRAINTS,
            tags=list(tags) if tags else [],
            host=host,
        )
        return self.submit(req, policy).result

    def submit(self, req: TaskRequest, policy: ExistingWorkPolicy | str = "keep") -> Outcome:
        """Like :meth:`enqueue` but returns the full :class:`Outcome` (id, action, next run)."""
        if self._pending is None:
            return self.submit_many([(req, policy)])[0]
        op, outcome = self._enq_op(req, policy, time.time())  # inside a batch: validate now, write when it ends
        if op is not None:
            self._pending.append(("enq", op, outcome))
        return outcome

    def submit_many(self, items: Sequence[tuple[TaskRequest, str]], *, all_or_nothing: bool = False) -> list[Outcome]:
        """Enqueue many requests in one durable append.  With ``all_or_nothing``, one invalid
        request rejects the whole batch (nothing is written)."""
        now = time.time()
        self._set_assume()
        made = [self._enq_op(req, policy, now) for req, policy in items]
        outcomes = [outcome for _op, outcome in made]
        accepted = [("enq", op, outcome) for op, outcome in made if op is not None]
        if all_or_nothing and len(accepted) < len(made):
            return outcomes
        if self._pending is not None:
            self._pending += accepted
        elif accepted:
            self._commit(accepted, now)
        return outcomes

    def _enq_op(self, req: TaskRequest, policy, now: float) -> tuple[dict | None, Outcome]:
        """The ``enq`` op of one request and its outcome (no op: the request is rejected)."""
        try:
            pol = enum_value(ExistingWorkPolicy, policy, what="policy")
            task = self.build_task(req, now)
        except KmpwmError as exc:
            return None, _rejected(getattr(req, "id", None), exc)
        op = schema.enq(task, pol)
        if pol == "update":
            op["by"] = _who()  # events say who changed the task
        return op, Outcome(ScheduleResult.SUCCESS, task["id"])

    # -- chains ---------------------------------------------------------------------------

    def begin_with(self, request: TaskRequest | Sequence[TaskRequest]) -> TaskChain:
        """Start a chain with one task or several parallel tasks (seed: ``beginWith``)."""
        return TaskChain(self, [_as_step(request)])

    def enqueue_chain(
        self,
        steps: Sequence[Sequence[TaskRequest]],
        chain_id: str | None = None,
        policy: str = "replace",
        tags: Sequence[str] = (),
    ) -> Outcome:
        now = time.time()
        try:
            op = self._chain_op(steps, chain_id, policy, now, tags)
        except KmpwmError as exc:
            return _rejected(chain_id, exc)
        outcome = Outcome(ScheduleResult.SUCCESS, op["id"])
        if self._pending is not None:
            self._pending.append(("chain", op, outcome))
            return outcome
        try:
            self._commit([("chain", op, outcome)], now)
        except InvalidParams as exc:
            return _rejected(chain_id, exc)
        return outcome

    def _set_assume(self) -> None:
        if self._pending:
            return  # read once per batch
        assume = os.environ.get("KMPWM_ASSUME")
        if assume != self._assume:
            self._assume, self._plain = assume, None

    def _chain_op(self, steps, chain_id, policy, now, tags) -> dict:
        self._set_assume()
        policy = enum_value(ExistingWorkPolicy, policy, what="chain policy")
        if policy not in ("keep", "replace"):
            raise InvalidParams(f"invalid chain policy {policy!r}: a chain takes keep or replace")
        chain_id = _chain_id(chain_id)
        steps = _chain_steps(steps)
        seen: set[str] = set()
        out_steps = [self._chain_step(step, number, chain_id, now, seen) for number, step in enumerate(steps, 1)]
        return schema.chain(chain_id, policy, out_steps, check_tags(tags) if tags else [])

    def _chain_step(self, step: list, number: int, chain_id: str, now: float, seen: set[str]) -> list[dict]:
        """The task records of one chain step; a task without an id gets ``CHAIN/STEP/WORKER[#n]``."""
        counts: dict[str, int] = {}
        tasks = []
        prefix = f"{chain_id}/{number}/"
        for req in step:
            if not isinstance(req, TaskRequest):
                raise InvalidParams(f"step {number}: expected TaskRequest, got {type(req).__name__}")
            worker = req.worker
            n = counts[worker] = counts.get(worker, 0) + 1
            if req.id is not None:
                task_id, trusted = check_id(req.id), True
            else:
                task_id, trusted = self._generated_id(prefix, worker, n)
            if task_id in seen:
                raise InvalidParams(f"task id {task_id!r} appears twice in the chain")
            seen.add(task_id)
            task = self.build_task(req, now, task_id=task_id, trusted_id=trusted)
            if task["trigger"]["type"] in REPEATING:
                raise InvalidParams(
                    f"chain task {task_id!r}: a chain's tasks run once; use --delay, --at or --window "
                    "(repeating triggers belong to single tasks)"
                )
            tasks.append(task)
        return tasks

    def _generated_id(self, prefix: str, worker, n: int) -> tuple[str, bool]:
        """``CHAIN/STEP/WORKER[#n]`` for the ``n``-th task of ``worker`` in a step, and whether it
        is a valid id as it stands (a worker name with no control characters, short enough)."""
        task_id = f"{prefix}{worker}#{n}" if n > 1 else f"{prefix}{worker}"
        clean = self._clean_workers
        if worker not in clean and isinstance(worker, str) and not _CONTROL.search(worker):
            clean.add(worker)
        return task_id, len(task_id) <= MAX_ID_LEN and worker in clean

    # -- cancel ---------------------------------------------------------------------------

    def cancel(self, *ids: str) -> list[str]:
        """Cancel tasks (with their ``ID#n``) or chains by id; returns the ids cancelled."""
        return self._cancel(schema.cancel(ids=list(ids)))

    def cancel_tag(self, tag: str) -> list[str]:
        return self._cancel(schema.cancel(tag=tag))

    def cancel_all(self) -> list[str]:
        return self._cancel(schema.cancel(all=True))

    def _cancel(self, op: dict) -> list[str]:
        if not self.store.exists():
            return []  # no journal, no task: nothing to lock, and no home made for a mistyped --home
        with self.store.transaction() as txn:
            if not _cancel_would_change(txn.state, op):
                return []  # idempotent, and no journal growth for a no-op
            return txn.commit([op])[0]

    # -- steering (SPEC section 11) --------------------------------------------------------

    def pause(self, *ids: str, tag: str | None = None, all: bool = False, until=None) -> list[str]:
        """Pause tasks (with their ``ID#n``), chains, a tag's tasks, or with ``all=True`` the queue
        itself; ``until`` (aware datetime, epoch seconds or TIME text) ends the pause by itself.
        Returns the ids paused one by one."""
        from kmpwm.core.timeparse import parse_time
        from kmpwm.scheduling import steering

        until_ts = parse_time(until, what="until") if until is not None else None
        return steering.pause(self.store, ids, tag, all, until_ts)

    def resume(self, *ids: str, tag: str | None = None, all: bool = False) -> list[str]:
        """Resume paused tasks (``all=True``: the queue and every paused task); returns their ids."""
        from kmpwm.scheduling import steering

        return steering.resume(self.store, ids, tag, all)

    def retry(self, *ids: str, failed: bool = False, tag: str | None = None) -> list[str]:
        """Enqueue FAILED / CANCELLED tasks again, due now, attempts 0; a chain resumes at the step
        that failed.  Returns the ids made ENQUEUED or BLOCKED again."""
        from kmpwm.scheduling import steering

        return steering.retry(self.store, ids, failed, tag)

    def wait(self, *ids: str, tag: str | None = None, timeout: float | None = None):
        """Block until the tasks finish; returns a ``WaitResult`` (``tasks``, ``timed_out``,
        ``exit_code``: 0 all SUCCEEDED, 1 one did not, 75 time-out).  Raises InvalidParams when
        nothing matches."""
        from kmpwm.core.timeparse import parse_duration
        from kmpwm.scheduling import steering

        return steering.wait(self.store, ids, tag, parse_duration(timeout) if timeout is not None else None)

    def run_now(self, *ids: str, ignore_constraints: bool = False) -> dict:
        """Run the tasks (a chain: its steps in order) now in this process, as run-due would;
        returns run-due's document (``ran``, ``expired``, ``skipped``) plus ``exit_code``."""
        doc, code, _ = run_now(self.paths, list(ids), ignore_constraints)
        self.store.invalidate()
        return dict(doc, exit_code=code)

    # -- batches --------------------------------------------------------------------------

    def batch(self) -> Batch:
        """``with scheduler.batch():`` — enqueues and chains inside share one durable append."""
        return Batch(self)

    def _commit(self, items: list[tuple[str, dict, Outcome]], now: float) -> None:
        with self.store.transaction() as txn:
            for kind, op, _outcome in items:
                if kind == "chain":
                    _check_chain_ids(txn.state, op)
            results = txn.commit([op for _, op, _ in items], ts=now)
            for (kind, _op, outcome), res in zip(items, results):
                _tell(outcome, kind, res, txn.state, now)

    # -- reading --------------------------------------------------------------------------

    def state(self) -> dict:
        return self.store.load().state

    def task(self, task_id: str) -> dict | None:
        return self.state()["tasks"].get(task_id)


_ONE_TIME = OneTime()
_DEFAULT_CONSTRAINTS = Constraints()


class TaskChain:
    """Builder for a chain (seed: ``TaskChain``): ``then``, ``with_id``, ``enqueue``."""

    def __init__(
        self, scheduler: Scheduler, steps: list[list[TaskRequest]], chain_id: str | None = None, policy: str = "replace"
    ):
        self._scheduler = scheduler
        self._steps = steps
        self._id = chain_id
        self._policy = policy

    def then(self, request: TaskRequest | Sequence[TaskRequest]) -> TaskChain:
        return TaskChain(self._scheduler, [*self._steps, _as_step(request)], self._id, self._policy)

    def with_id(self, chain_id: str, policy: ExistingWorkPolicy | str = "replace") -> TaskChain:
        return TaskChain(self._scheduler, self._steps, chain_id, policy)

    def enqueue(self) -> Outcome:
        return self._scheduler.enqueue_chain(self._steps, self._id, self._policy)


class Batch:
    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler
        self.outcomes: list[Outcome] = []

    def __enter__(self) -> Batch:
        if self.scheduler._pending is not None:
            raise RuntimeError("batches do not nest")
        self.scheduler._pending = []
        # A batch makes thousands of small records that all live on: the cyclic collector would
        # only rescan them (and the whole state) again and again.  Paused for the batch.
        self._gc_was = gc.isenabled()
        gc.disable()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            pending, self.scheduler._pending = self.scheduler._pending, None
            if exc_type is not None or not pending:
                return
            self.scheduler._commit(pending, time.time())
            self.outcomes = [o for _, _, o in pending]
        finally:
            if self._gc_was:
                gc.enable()


def run_now(paths, ids, ignore_constraints=False, grace=None, on_event=None, warn=None):
    """Run the named tasks (a chain id: its steps in order) now in this process; returns the
    run-due report document and the exit code (run-due's, or 1 when a task did not run or a run
    did not succeed).  ``warn(text)``: the runner's warnings as they come (the CLI prints them;
    they are in the report's ``warnings`` too)."""
    from kmpwm.core.models import DEFAULT_GRACE
    from kmpwm.running.runner import Runner
    from kmpwm.storage.stores import open_store

    store = open_store(paths)
    forced, named, before = _run_now_targets(store, ids)
    runner = Runner(
        paths,
        grace=DEFAULT_GRACE if grace is None else grace,
        parallel=None,
        store=store,
        forced=forced,
        ignore_constraints=ignore_constraints,
        on_event=on_event,
        warn=warn,
    )
    code = runner.run()
    doc = runner.report.doc()
    doc["skipped"] = _run_now_skips(doc, named, before)
    if code == 0 and (doc["skipped"] or any(r["status"] != "SUCCESS" for r in doc["ran"])):
        code = 1
    return doc, code, runner.expire_reason


def _run_now_targets(store, ids: list[str]) -> tuple[list[str], set[str], dict[str, str]]:
    """The tasks run-now runs, those of them named (by id or as ``ID#n``), and their states before."""
    from kmpwm.scheduling.steering import expand_ids

    state = store.load(full=True).state  # (not kept: the runner loads its own)
    forced = expand_ids(state, ids)
    if not forced:
        raise InvalidParams(
            f"no task matches {', '.join(repr(i) for i in ids)}", hint="`kmpwm inspect-queue --all` lists them"
        )
    named = {i for i in forced if i in ids or i.split("#", 1)[0] in ids}
    return forced, named, {i: state["tasks"][i]["state"] for i in forced}


def _run_now_skips(doc: dict, named: set, before: dict) -> list[dict]:
    """run-now's ``skipped``: a chain's tasks that ran once their step came, or that its failure
    ended, are no skips; a chain's later tasks (named through the chain id) wait for their step
    or end with it: no skips either."""
    ran = {r["id"] for r in doc["ran"]}

    def counts(s: dict) -> bool:
        if s["id"] in ran:
            return False
        return s["id"] in named or (before[s["id"]] != "BLOCKED" and not s["reason"].startswith("finished"))

    return [s for s in doc["skipped"] if counts(s)]


def _tell(outcome: Outcome, kind: str, res: dict, state: dict, now: float) -> None:
    """Fill ``outcome`` in from ``res``, what the fold made of its op."""
    outcome.action = res["action"]
    outcome.id = res["id"]
    if kind == "chain":
        outcome.tasks = res["tasks"]
        return
    outcome.next_run_at, outcome.state = res.get("due"), res.get("state")
    kept = state["tasks"].get(res["task"]) if res["action"] == "kept" else None
    if kept is not None:  # an existing task: told as inspect-queue tells it
        from kmpwm.scheduling.views import effective_state, next_run_at

        outcome.state, outcome.next_run_at = effective_state(kept, now), next_run_at(kept, now)


def _who() -> str:
    from kmpwm.scheduling.steering import who

    return who()


def _as_step(request) -> list[TaskRequest]:
    if isinstance(request, TaskRequest):
        return [request]
    return list(request)


def _rejected(task_id, exc: KmpwmError) -> Outcome:
    result = ScheduleResult(exc.result) if exc.result in ScheduleResult.__members__ else ScheduleResult.FAILED_UNKNOWN
    return Outcome(
        result,
        task_id if isinstance(task_id, str) else None,
        error=str(exc).splitlines()[0],
        exit_code=exc.exit_code,
        hint=exc.hint,
    )


def _cancel_would_change(state: dict, op: dict) -> bool:
    tasks = state["tasks"]
    if op.get("all"):
        return any(t["state"] in UNFINISHED for t in tasks.values())
    if op.get("tag") is not None:
        return _tag_in_use(state, op["tag"])
    return any(wanted in state["chains"] or unfinished_family(state, base_id(wanted)) for wanted in op.get("ids", ()))


def _tag_in_use(state: dict, tag: str) -> bool:
    """An unfinished task, or any chain, has ``tag``."""
    return any(t["state"] in UNFINISHED and tag in t.get("tags", ()) for t in state["tasks"].values()) or any(
        tag in c.get("tags", ()) for c in state["chains"].values()
    )


def _check_chain_ids(state: dict, op: dict) -> None:
    """A chain task named by the user must not take over an unrelated unfinished task (one of an
    earlier chain of the same id is replaced with it)."""
    tasks = state["tasks"]
    for step in op["steps"]:
        for task in step:
            prior = tasks.get(task["id"])
            if prior and prior["state"] in UNFINISHED and prior.get("chain_id") != op["id"]:
                raise InvalidParams(
                    f"task id {task['id']!r} is already in use by an unfinished task",
                    hint="name the chain's tasks differently or cancel that task first",
                )
