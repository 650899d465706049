"""Triggers (SPEC section 3): when a task is due, as classes for the Python API and as pure
arithmetic over the stored form.

The stored form is a plain dict with a ``type`` key; times are epoch seconds.  Everything here is
pure except :func:`cron_next` without a zone (the machine's local zone) and the on-change
signature, which reads the disk.

Scheduling details (SPEC section 12): a trigger may carry ``tz`` (an IANA zone its cron
expression and naive times are read in), and a task's constraints may carry ``jitter`` (each due
time is delayed by a fixed per-task, per-host offset, :func:`jitter_offset`) and ``misfire_grace``
(see scheduling.py).  The arithmetic takes the jitter offset as a parameter: the grid is computed
without it and the offset added on top, so a jittered run never shifts the grid.
"""

from __future__ import annotations

import math
import os
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from kmpwm.core.exitcodes import InvalidParams
from kmpwm.core.models import BACKOFF_CAP, DeviceStateName, ExactBehavior, enum_value
from kmpwm.core.timeparse import iso, parse_duration, parse_time

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
        args = ", ".join(
            f"{name}={getattr(self, name)!r}" for name in self.__slots__ if name != "tz" or self.tz is not None
        )  # a zone only when one is set
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

    def __init__(
        self,
        interval: float | timedelta | str,
        flex: float | timedelta | str | None = None,
        delay: float | timedelta = 0,
    ) -> None:
        self._set(interval=interval, flex=flex, delay=delay)

    def to_record(self, now: float) -> dict:
        every = parse_duration(self.interval, what="interval")
        if every < MIN_PERIOD:
            raise InvalidParams(
                f"invalid interval {self.interval!r}: a periodic task repeats at most once a minute (--every 60s or more)"  # noqa: E501
            )
        flex = every if self.flex is None else parse_duration(self.flex, what="flex")
        if flex > every:
            raise InvalidParams(f"invalid flex {self.flex!r}: must not exceed the interval ({every:g}s)")
        return {"type": "periodic", "every": every, "flex": flex, "delay": parse_duration(self.delay, what="delay")}


def zone(name: str | None):
    """The ``zoneinfo.ZoneInfo`` for an IANA zone name, or None for None; 65 for a zone that does
    not exist (``--tz``)."""
    if name is None:
        return None
    try:
        return _ZONES[name]
    except (KeyError, TypeError):
        pass
    if not isinstance(name, str) or not name.strip():
        raise InvalidParams(f"invalid time zone {name!r}: expected an IANA name like Europe/Berlin")
    from zoneinfo import ZoneInfo

    try:
        tz = ZoneInfo(name)
    except Exception:  # ZoneInfoNotFoundError (a KeyError), ValueError for a path-like name, ...
        raise InvalidParams(
            f"unknown time zone {name!r}: expected an IANA name like Europe/Berlin, America/New_York or UTC"
        ) from None
    _ZONES[name] = tz
    return tz


_ZONES: dict = {}


def _tz_record(rec: dict, tz: str | None) -> dict:
    if tz is not None:
        zone(tz)
        rec["tz"] = tz
    return rec


class Exact(Trigger):
    __slots__ = ("at", "behavior", "delay", "tz")

    def __init__(
        self,
        at: datetime | float | str,
        behavior: ExactBehavior | str = ExactBehavior.ATTEMPT,
        delay: float | timedelta = 0,
        tz: str | None = None,
    ) -> None:
        self._set(at=at, behavior=behavior, delay=delay, tz=tz)

    def to_record(self, now: float) -> dict:
        return _tz_record(
            {
                "type": "exact",
                "at": parse_time(self.at, now=now, what="time", tz=zone(self.tz)),
                "behavior": enum_value(ExactBehavior, self.behavior, what="exact behavior"),
                "delay": parse_duration(self.delay, what="delay"),
            },
            self.tz,
        )


class Windowed(Trigger):
    __slots__ = ("start", "end", "delay", "tz")

    def __init__(
        self,
        start: datetime | float | str,
        end: datetime | float | str,
        delay: float | timedelta = 0,
        tz: str | None = None,
    ) -> None:
        self._set(start=start, end=end, delay=delay, tz=tz)

    def to_record(self, now: float) -> dict:
        start = parse_time(self.start, now=now, what="window start", tz=zone(self.tz))
        end = parse_time(self.end, now=now, what="window end", tz=zone(self.tz))
        if end < start:
            raise InvalidParams(f"invalid window: end ({iso(end)}) is before start ({iso(start)})")
        if end < now:
            raise InvalidParams(f"invalid window: it ended already ({iso(end)})")
        return _tz_record(
            {"type": "windowed", "start": start, "end": end, "delay": parse_duration(self.delay, what="delay")}, self.tz
        )


class Cron(Trigger):
    """A 5-field cron expression, read in ``tz`` (an IANA zone) or, without it, in the machine's
    local zone at each computation."""

    __slots__ = ("expr", "delay", "tz")

    def __init__(self, expr: str, delay: float | timedelta = 0, tz: str | None = None) -> None:
        self._set(expr=expr, delay=delay, tz=tz)

    def to_record(self, now: float) -> dict:
        if not isinstance(self.expr, str) or len(self.expr.split()) != 5:
            raise InvalidParams(
                f"invalid cron expression {self.expr!r}: expected 5 fields (minute hour day month weekday)"
            )
        zone(self.tz)
        try:
            cron_next(self.expr, now, self.tz)
        except InvalidParams:
            raise
        except Exception as exc:  # croniter's own message says which field
            raise InvalidParams(f"invalid cron expression {self.expr!r}: {exc}") from None
        return _tz_record(
            {"type": "cron", "expr": " ".join(self.expr.split()), "delay": parse_duration(self.delay, what="delay")},
            self.tz,
        )


class OnChange(Trigger):
    __slots__ = ("path", "descendants", "delay")

    def __init__(self, path: str | os.PathLike, descendants: bool = True, delay: float | timedelta = 0) -> None:
        self._set(path=path, descendants=descendants, delay=delay)

    def to_record(self, now: float) -> dict:
        path = os.path.abspath(os.path.expanduser(os.fspath(self.path)))
        if not os.path.exists(path):
            raise InvalidParams(f"invalid --on-change path {self.path!s}: it does not exist")
        return {
            "type": "on_change",
            "path": path,
            "descendants": bool(self.descendants),
            "delay": parse_duration(self.delay, what="delay"),
        }


class DeviceState(Trigger):
    __slots__ = ("name", "delay")

    def __init__(self, name: DeviceStateName | str, delay: float | timedelta = 0) -> None:
        self._set(name=name, delay=delay)

    def to_record(self, now: float) -> dict:
        return {
            "type": "device_state",
            "state": enum_value(DeviceStateName, self.name, what="device state"),
            "delay": parse_duration(self.delay, what="delay"),
        }


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


def cron_next(expr: str, after: float, tz: str | None = None) -> float:
    """The first time strictly after ``after`` that matches ``expr`` in wall-clock time of the
    zone ``tz`` (an IANA name), or of the machine's local zone without it.

    croniter walks naive wall times; each match is turned into an instant with the zone's rules
    (``mktime`` for the local zone), so a DST change moves nothing: 09:00 stays 09:00.  A wall time
    that does not exist (spring forward) runs at the shifted instant; one that exists twice (fall
    back) runs once, because matches at or before ``after`` are skipped."""
    if tz is None:
        return _cron_walk(expr, datetime.fromtimestamp(after), after, _local_instants)
    tzinfo = zone(tz)
    return _cron_walk(
        expr, datetime.fromtimestamp(after, tzinfo).replace(tzinfo=None), after, partial(_zone_instants, tz=tzinfo)
    )


def _cron_walk(expr: str, start: datetime, after: float, instants) -> float:
    """The first of ``instants(wall)`` after ``after``, for the wall times matching ``expr`` from
    ``start`` on."""
    from croniter import croniter  # only tasks with a cron trigger pay for it

    it = croniter(expr, start)
    for _ in range(1000):
        wall = it.get_next(datetime)
        for instant in instants(wall):
            if instant > after:
                return float(instant)
    raise InvalidParams(f"cron expression {expr!r} has no upcoming time")


def _local_instants(wall: datetime) -> list[float]:
    """The instants that show naive ``wall`` in the machine's local zone: both readings of a wall
    time that exists twice (summer and winter time), ``mktime``'s guess for one that does not exist."""
    import time as _time

    tt = wall.timetuple()[:8]
    readings = sorted({_time.mktime(tt + (dst,)) for dst in (1, 0)})
    exact = [r for r in readings if datetime.fromtimestamp(r).replace(microsecond=0) == wall]
    return exact or [_time.mktime(tt + (-1,))]  # none: a wall time that does not exist


def _zone_instants(wall: datetime, tz) -> list[float]:
    """:func:`_local_instants` in a named zone, with zoneinfo's rules instead of mktime's.
    ``fold`` picks the first or second reading of a repeated wall time; a wall time that does not
    exist reads with the offset before the change (fold 0), which is the shifted instant."""
    readings = sorted({wall.replace(tzinfo=tz, fold=f).timestamp() for f in (0, 1)})
    exact = [r for r in readings if datetime.fromtimestamp(r, tz).replace(tzinfo=None, microsecond=0) == wall]
    return exact or [wall.replace(tzinfo=tz, fold=0).timestamp()]


# Triggers that take --jitter and --misfire-grace: those with due times on a clock or a grid.
TIMED = frozenset({"periodic", "cron", "exact"})


def jitter_host() -> str:
    """The host name the jitter offset is fixed for: ``KMPWM_HOST``, else the machine's name."""
    from kmpwm.core.hosts import this_host

    return this_host()


def jitter_offset(task_id: str, jitter: float | None, host: str | None = None) -> float:
    """The fixed delay in [0, jitter) of a task on a host, like systemd's ``FixedRandomDelay``:
    a keyed hash of the task's id (its unique-work name, without ``#n``) and the host, so the same
    task on the same host always gets the same offset and a fleet with one schedule spreads out."""
    if not jitter:
        return 0.0
    import hashlib

    base = task_id.split("#", 1)[0]
    digest = hashlib.blake2b(
        f"{base}\0{host if host is not None else jitter_host()}".encode("utf-8", "surrogatepass"),
        digest_size=8,
        person=b"kmpwm-jitter",
    ).digest()
    fraction = int.from_bytes(digest, "big") / 2.0**64  # uniform in [0, 1)
    return math.floor(fraction * jitter * 1000) / 1000  # whole milliseconds: stable in JSON


def task_offset(task: dict) -> float:
    """The jitter offset of a task as the state holds it (0 without ``--jitter``); a task pinned
    to a host (``--host``) has the offset of that host, wherever it is computed."""
    jitter = (task.get("constraints") or {}).get("jitter")
    return jitter_offset(task["id"], jitter, task.get("host")) if jitter else 0.0


def initial(trigger: dict, now: float, offset: float = 0.0) -> tuple[float, dict]:
    """First due time and trigger state for a trigger enqueued at ``now``; ``offset`` is the
    task's jitter (added to clock and grid times, see :func:`jitter_offset`)."""
    start = now + trigger.get("delay", 0.0)
    kind = trigger["type"]
    if kind == "periodic":
        return start + offset, {"anchor": start}
    if kind == "exact":
        return max(trigger["at"] + offset, start), {}
    if kind == "windowed":
        return max(trigger["start"], start), {}
    if kind == "cron":
        return cron_next(trigger["expr"], start - 1e-6, trigger.get("tz")) + offset, {}
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


def next_after_run(trigger: dict, trig_state: dict, ran_at: float, offset: float = 0.0) -> float | None:
    """Next due time of a repeating task after a run, or None for one-shot triggers.  With a
    jitter ``offset`` the run is placed back on the grid (``ran_at - offset``) before the next
    grid time is found, and the offset is added to it."""
    kind = trigger["type"]
    if kind == "periodic":
        return next_periodic(trigger, trig_state, ran_at - offset) + offset
    if kind == "cron":
        return cron_next(trigger["expr"], ran_at - offset, trigger.get("tz")) + offset
    if kind in ("on_change", "device_state"):
        return ran_at
    return None


def first_due_after(trigger: dict, trig_state: dict, after: float, offset: float = 0.0) -> float | None:
    """The first due time of a repeating task's grid strictly after ``after`` (jitter included):
    where a task goes on after a missed occurrence (``--misfire-grace``).  None for triggers
    without a grid."""
    kind = trigger["type"]
    base = after - offset
    if kind == "cron":
        return cron_next(trigger["expr"], base, trigger.get("tz")) + offset
    if kind != "periodic":
        return None
    every, flex = trigger["every"], trigger["flex"]
    anchor = trig_state.get("anchor", base)
    if base < anchor:
        return anchor + offset
    # period k (k >= 1) is due from anchor + (k+1)*every - flex; period 0 at the anchor itself
    k = max(1, math.floor((base - anchor + flex) / every))
    due = anchor + (k + 1) * every - flex
    while due <= base:  # float rounding at a boundary
        k += 1
        due = anchor + (k + 1) * every - flex
    return due + offset


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
    for entry_path, est in _entries_below(path):
        count += 1
        acc = zlib.crc32(f"{entry_path}\0{est.st_mtime_ns}\0{est.st_size}".encode(), acc)
    return [st.st_mtime_ns, count, acc]


def _entries_below(path: str):
    """``(path, stat)`` of every entry below directory ``path``, depth first, symlinks not
    followed; an entry or directory that cannot be read is left out."""
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
                    yield entry.path, est
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
        except OSError:
            continue


def to_json(trigger: dict) -> dict:
    """The trigger as shown in ``inspect-queue --json``: times in ISO 8601 UTC."""
    out: dict[str, Any] = dict(trigger)
    for key in ("at", "start", "end"):
        if key in out:
            out[key] = iso(out[key])
    return out
