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
    st, trig = task["state"], task["trigger"]
    if st not in ("ENQUEUED", "RUNNING", "BLOCKED"):
        return [], f"{task['id']} is {st}: it has no next run"
    if st == "BLOCKED":
        return [], f"{task['id']} is BLOCKED: it is due when the tasks before it finish"
    kind = trig["type"]
    if kind == "on_change":
        return [], f"{task['id']} is due when {trig['path']} changes"
    if kind == "device_state":
        return [], f"{task['id']} is due each time the device enters {trig['state']}"
    offset = task_offset(task)
    if kind not in ("periodic", "cron"):
        return ([task["due"]] if st == "ENQUEUED" else []), (None if st == "ENQUEUED" else f"{task['id']} is running")
    first = (
        task["due"] if st == "ENQUEUED" else first_due_after(trig, task["trig_state"], max(now, task["due"]), offset)
    )
    out = [first]
    while len(out) < n:
        out.append(first_due_after(trig, task["trig_state"], out[-1], offset))
    return out, None


def _find(state: dict, task_id: str) -> dict:
    from kmpwm.core.state import family

    tasks = state["tasks"]
    if task_id in tasks:
        return tasks[task_id]
    fam = [tasks[i] for i in family(state, task_id)]
    live = [t for t in fam if t["state"] in ("ENQUEUED", "RUNNING", "BLOCKED")]
    if live or fam:
        return (live or fam)[0]
    raise InvalidParams(f"no task {task_id!r}", hint="`kmpwm inspect-queue --all` lists them")


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
