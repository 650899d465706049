"""``kmpwm next``: the next due times of a cron expression, an interval or a task (SPEC section
12), like ``systemd-analyze calendar --iterations``.  It uses the same trigger arithmetic as
enqueue and run-due (triggers.py), so what it shows is what the scheduler will do."""

from __future__ import annotations

from kmpwm.core.exitcodes import InvalidParams
from kmpwm.core.triggers import Cron, Periodic, cron_next, first_due_after, task_offset, zone

MAX_ITERATIONS = 10_000


def cron_times(expr: str, n: int, now: float, tz: str | None = None) -> list[float]:
    Cron(expr, tz=tz).to_record(now)  # the same validation (and messages) as enqueue --cron
    out, after = [], now
    for _ in range(n):
        after = cron_next(expr, after, tz)
        out.append(after)
    return out


def every_times(every, flex, n: int, now: float) -> list[float]:
    """The due times of a task enqueued now with ``--every EVERY [--flex FLEX]``: the first now."""
    trig = Periodic(every, flex).to_record(now)
    state = {"anchor": now}
    out = [now]
    while len(out) < n:
        out.append(first_due_after(trig, state, out[-1]))
    return out


def task_times(task: dict, n: int, now: float) -> tuple[list[float], str | None]:
    """A task's own next due times (its jitter included) and, when there are none to list, why."""
    why = _no_times(task)
    if why is not None:
        return [], why
    if task["trigger"]["type"] not in _GRIDS:
        return [task["due"]], None  # once, and not run yet
    return _grid_times(task, n, now), None


_LIVE = ("ENQUEUED", "RUNNING", "BLOCKED")
_GRIDS = ("periodic", "cron")  # the triggers that repeat on a grid of times


def _no_times(task: dict) -> str | None:
    """Why the task has no due times to list (None: it has)."""
    st, trig, tid = task["state"], task["trigger"], task["id"]
    if st not in _LIVE:
        return f"{tid} is {st}: it has no next run"
    if st == "BLOCKED":
        return f"{tid} is BLOCKED: it is due when the tasks before it finish"
    if trig["type"] == "on_change":
        return f"{tid} is due when {trig['path']} changes"
    if trig["type"] == "device_state":
        return f"{tid} is due each time the device enters {trig['state']}"
    if st == "RUNNING" and trig["type"] not in _GRIDS:
        return f"{tid} is running"
    return None


def _grid_times(task: dict, n: int, now: float) -> list[float]:
    """The next ``n`` times of a periodic or cron task: its due time, or (running) the one after now."""
    trig, trig_state, offset = task["trigger"], task["trig_state"], task_offset(task)
    if task["state"] == "ENQUEUED":
        out = [task["due"]]
    else:
        out = [first_due_after(trig, trig_state, max(now, task["due"]), offset)]
    while len(out) < n:
        out.append(first_due_after(trig, trig_state, out[-1], offset))
    return out


def _find(state: dict, task_id: str) -> dict:
    from kmpwm.core.state import family

    tasks = state["tasks"]
    if task_id in tasks:
        return tasks[task_id]
    fam = [tasks[i] for i in family(state, task_id)]
    if not fam:
        raise InvalidParams(f"no task {task_id!r}", hint="`kmpwm inspect-queue --all` lists them")
    live = [t for t in fam if t["state"] in _LIVE]
    return (live or fam)[0]


def next_times(paths, task_id, cron, every, flex, n: int, tz: str | None, now: float):
    """``next``'s answer: ``(times, note, tz)``, the next ``n`` due times of ``cron``, ``every``
    (with ``flex``) or task ``task_id``, a note when a task has none to list, and the zone to show
    them in (a task's own when ``tz`` is None)."""
    if n > MAX_ITERATIONS:
        raise InvalidParams(f"invalid -n {n}: at most {MAX_ITERATIONS}")
    zone(tz)  # an unknown zone is 65 before anything else
    if cron is not None:
        return cron_times(cron, n, now, tz), None, tz
    if every is not None:
        return every_times(every, flex, n, now), None, tz
    from kmpwm.storage.stores import open_store

    task = _find(open_store(paths).load(full=False).state, task_id)
    times, note = task_times(task, n, now)
    return times, note, tz if tz is not None else task["trigger"].get("tz")
