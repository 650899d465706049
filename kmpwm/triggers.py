"""Triggers (SPEC section 3): when a task is due, as classes for the Python API and as pure
arithmetic over the stored form.

The stored form is a plain dict with a ``type`` key; times are epoch seconds.  Everything here is
pure except :func:`cron_next` (local time zone) and the on-change signature, which reads the disk.
"""

from __future__ import annotations

import math
import os
from datetime import datetime, timedelta
from typing import Any

from .exitcodes import InvalidParams
from .models import BACKOFF_CAP, DeviceStateName, ExactBehavior, enum_value
from .timeparse import iso, parse_duration, parse_time

MIN_PERIOD = 60.0
REPEATING = frozenset({"periodic", "cron", "on_change", "device_state"})


class Trigger:
    """Base of the trigger classes: immutable values, equal when of the same class with equal fields.

    Written out by hand rather than with ``@dataclass(frozen=True)``: creating seven frozen
    dataclasses costs ~3.5 ms at every start of ``kmpwm enqueue``, a command cron and scripts run
    over and over.  Each subclass lists its fields in ``__slots__`` and sets them in ``__init__``."""

    __slots__ = ()

    def _set(self, **fields: Any) -> None:
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def _values(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def __hash__(self) -> int:
        return hash((self.__class__.__name__, self._values()))

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{self.__class__.__name__}({args})"

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"cannot assign to field {name!r}: triggers are immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}: triggers are immutable")

    def __reduce__(self):
        return (self.__class__, self._values())

    def to_record(self, now: float) -> dict:  # pragma: no cover - every subclass has its own
        raise NotImplementedError


class OneTime(Trigger):
    __slots__ = ("delay",)

    def __init__(self, delay: float | timedelta = 0) -> None:
        self._set(delay=delay)

    def to_record(self, now: float) -> dict:
        return {"type": "one_time", "delay": parse_duration(self.delay, what="delay")}


class Periodic(Trigger):
    __slots__ = ("interval", "flex", "delay")

    def __init__(self, interval: float | timedelta | str, flex: float | timedelta | str | None = None,
                 delay: float | timedelta = 0) -> None:
        self._set(interval=interval, flex=flex, delay=delay)

    def to_record(self, now: float) -> dict:
        every = parse_duration(self.interval, what="interval")
        if every < MIN_PERIOD:
            raise InvalidParams(f"invalid interval {self.interval!r}: a periodic task repeats at most once a minute (--every 60s or more)")
        flex = every if self.flex is None else parse_duration(self.flex, what="flex")
        if flex > every:
            raise InvalidParams(f"invalid flex {self.flex!r}: must not exceed the interval ({every:g}s)")
        return {"type": "periodic", "every": every, "flex": flex, "delay": parse_duration(self.delay, what="delay")}


class Exact(Trigger):
    __slots__ = ("at", "behavior", "delay")

    def __init__(self, at: datetime | float | str, behavior: ExactBehavior | str = ExactBehavior.ATTEMPT,
                 delay: float | timedelta = 0) -> None:
        self._set(at=at, behavior=behavior, delay=delay)

    def to_record(self, now: float) -> dict:
        return {
            "type": "exact",
            "at": parse_time(self.at, now=now, what="time"),
            "behavior": enum_value(ExactBehavior, self.behavior, what="exact behavior"),
            "delay": parse_duration(self.delay, what="delay"),
        }


class Windowed(Trigger):
    __slots__ = ("start", "end", "delay")

    def __init__(self, start: datetime | float | str, end: datetime | float | str,
                 delay: float | timedelta = 0) -> None:
        self._set(start=start, end=end, delay=delay)

    def to_record(self, now: float) -> dict:
        start = parse_time(self.start, now=now, what="window start")
        end = parse_time(self.end, now=now, what="window end")
        if end < start:
            raise InvalidParams(f"invalid window: end ({iso(end)}) is before start ({iso(start)})")
        if end < now:
            raise InvalidParams(f"invalid window: it ended already ({iso(end)})")
        return {"type": "windowed", "start": start, "end": end, "delay": parse_duration(self.delay, what="delay")}


class Cron(Trigger):
    __slots__ = ("expr", "delay")

    def __init__(self, expr: str, delay: float | timedelta = 0) -> None:
        self._set(expr=expr, delay=delay)

    def to_record(self, now: float) -> dict:
        if not isinstance(self.expr, str) or len(self.expr.split()) != 5:
            raise InvalidParams(f"invalid cron expression {self.expr!r}: expected 5 fields (minute hour day month weekday)")
        try:
            cron_next(self.expr, now)
        except InvalidParams:
            raise
        except Exception as exc:  # croniter's own message says which field
            raise InvalidParams(f"invalid cron expression {self.expr!r}: {exc}") from None
        return {"type": "cron", "expr": " ".join(self.expr.split()), "delay": parse_duration(self.delay, what="delay")}


class OnChange(Trigger):
    __slots__ = ("path", "descendants", "delay")

    def __init__(self, path: str | os.PathLike, descendants: bool = True, delay: float | timedelta = 0) -> None:
        self._set(path=path, descendants=descendants, delay=delay)

    def to_record(self, now: float) -> dict:
        path = os.path.abspath(os.path.expanduser(os.fspath(self.path)))
        if not os.path.exists(path):
            raise InvalidParams(f"invalid --on-change path {self.path!s}: it does not exist")
        return {"type": "on_change", "path": path, "descendants": bool(self.descendants),
                "delay": parse_duration(self.delay, what="delay")}


class DeviceState(Trigger):
    __slots__ = ("name", "delay")

    def __init__(self, name: DeviceStateName | str, delay: float | timedelta = 0) -> None:
        self._set(name=name, delay=delay)

    def to_record(self, now: float) -> dict:
        return {"type": "device_state", "state": enum_value(DeviceStateName, self.name, what="device state"),
                "delay": parse_duration(self.delay, what="delay")}


# Seed-style aliases for the device-state triggers.
def BatteryLow() -> DeviceState:  # noqa: N802 - mirrors the seed's names
    return DeviceState("battery-low")


def BatteryOkay() -> DeviceState:  # noqa: N802
    return DeviceState("battery-okay")


def StorageLow() -> DeviceState:  # noqa: N802
    return DeviceState("storage-low")


def DeviceIdle() -> DeviceState:  # noqa: N802
    return DeviceState("device-idle")


# --- arithmetic over the stored form -------------------------------------------------------


def cron_next(expr: str, after: float) -> float:
    """The first time strictly after ``after`` that matches ``expr`` in local wall-clock time.

    croniter walks naive local times; each match is turned into an instant with the C library's
    zone rules (``mktime``), so a DST change moves nothing: 09:00 stays 09:00.  A wall time that
    does not exist (spring forward) runs at the shifted instant; one that exists twice (fall back)
    runs once, because matches at or before ``after`` are skipped."""
    import time as _time

    from croniter import croniter  # only tasks with a cron trigger pay for it

    it = croniter(expr, datetime.fromtimestamp(after))
    for _ in range(1000):
        wall = it.get_next(datetime)
        tt = wall.timetuple()[:8]
        # both readings of the wall time (summer and winter); keep those that really show it
        readings = sorted({_time.mktime(tt + (dst,)) for dst in (1, 0)})
        exact = [r for r in readings if datetime.fromtimestamp(r).replace(microsecond=0) == wall]
        for instant in exact or [_time.mktime(tt + (-1,))]:  # none: a wall time that does not exist
            if instant > after:
                return float(instant)
    raise InvalidParams(f"cron expression {expr!r} has no upcoming time")


def initial(trigger: dict, now: float) -> tuple[float, dict]:
    """First due time and trigger state for a trigger enqueued at ``now``."""
    start = now + trigger.get("delay", 0.0)
    kind = trigger["type"]
    if kind == "periodic":
        return start, {"anchor": start}
    if kind == "exact":
        return max(trigger["at"], start), {}
    if kind == "windowed":
        return max(trigger["start"], start), {}
    if kind == "cron":
        return cron_next(trigger["expr"], start - 1e-6), {}
    if kind == "on_change":
        return start, {"baseline": change_signature(trigger["path"], trigger["descendants"])}
    if kind == "device_state":
        return start, {"armed": True}
    return start, {}


def next_periodic(trigger: dict, trig_state: dict, ran_at: float) -> float:
    """Next due time of a periodic task that ran at ``ran_at``: on the period grid, in the last
    FLEX of the period after the one that holds ``ran_at``; missed periods coalesce into one run."""
    every, flex = trigger["every"], trigger["flex"]
    anchor = trig_state.get("anchor", ran_at)
    # The grid extends before the anchor too: a run before it (the clock was set back after the
    # task was enqueued) is followed by the next period of the grid, not by one after the anchor.
    k = math.floor((ran_at - anchor) / every)
    return anchor + (k + 2) * every - flex


def next_after_run(trigger: dict, trig_state: dict, ran_at: float) -> float | None:
    """Next due time of a repeating task after a run, or None for one-shot triggers."""
    kind = trigger["type"]
    if kind == "periodic":
        return next_periodic(trigger, trig_state, ran_at)
    if kind == "cron":
        return cron_next(trigger["expr"], ran_at)
    if kind in ("on_change", "device_state"):
        return ran_at
    return None


def backoff_delay(policy: str, delay: float, retries: int) -> float:
    """Delay before retry number ``retries`` (1 for the first): exponential or linear, capped at 5h."""
    if retries < 1:
        retries = 1
    if policy == "linear":
        value = delay * retries
    else:
        value = delay * (2.0 ** min(retries - 1, 64))
    return min(value, BACKOFF_CAP)


def change_signature(path: str, descendants: bool) -> list:
    """A cheap fingerprint of PATH: size and mtime (ns) of it and, with descendants, of every entry
    below it.  Directory mtimes change when entries are added, removed or renamed."""
    try:
        st = os.stat(path)
    except OSError:
        return ["missing"]
    if not descendants or not os.path.isdir(path):
        return [st.st_mtime_ns, st.st_size, st.st_ino]
    import zlib

    count, acc = 0, zlib.crc32(f"{st.st_mtime_ns}".encode())
    stack = [path]
    while stack:
        top = stack.pop()
        try:
            with os.scandir(top) as it:
                for entry in it:
                    try:
                        est = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    count += 1
                    acc = zlib.crc32(f"{entry.path}\0{est.st_mtime_ns}\0{est.st_size}".encode(), acc)
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
        except OSError:
            continue
    return [st.st_mtime_ns, count, acc]


def to_json(trigger: dict) -> dict:
    """The trigger as shown in ``inspect-queue --json``: times in ISO 8601 UTC."""
    out: dict[str, Any] = dict(trigger)
    for key in ("at", "start", "end"):
        if key in out:
            out[key] = iso(out[key])
    return out
