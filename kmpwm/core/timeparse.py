"""Durations and times as users type them (SPEC section 3), and ISO 8601 output.

DUR: ``500ms``, ``30s``, ``15m``, ``2h``, ``1d``, ``1w``, combinations such as ``1h30m``, or a
bare number of seconds.  TIME: ISO 8601 (naive means local time), ``@EPOCH_SECONDS`` or ``+DUR``.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta

from kmpwm.core.exitcodes import InvalidParams

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
# Larger than any schedule a person means; keeps datetime arithmetic in range.
MAX_SECONDS = 100 * 365 * 86400.0


def parse_duration(value: str | int | float | timedelta, *, what: str = "duration") -> float:
    """Return seconds for a DUR; raise :class:`InvalidParams` with a one-line reason."""
    seconds = _seconds(value, what)
    if seconds != seconds or seconds < 0:
        raise InvalidParams(f"invalid {what} {value!r}: must not be negative")
    if seconds > MAX_SECONDS:
        raise InvalidParams(f"invalid {what} {value!r}: longer than 100 years")
    return seconds


def _seconds(value, what: str) -> float:
    """The seconds a DUR says, whatever its type (not checked for range)."""
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, str):
        return _text_seconds(value, what)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise InvalidParams(f"invalid {what} {value!r}: expected a duration like 30s, 15m, 1h30m")


def _text_seconds(value: str, what: str) -> float:
    """Seconds for a DUR typed as text: a bare number, or parts such as ``1h30m``."""
    text = value.strip().lower()
    if _NUMBER.fullmatch(text):
        return float(text)
    pos, seconds = 0, 0.0
    for m in _PART.finditer(text):
        if m.start() != pos:
            break
        seconds += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not text or pos != len(text):
        raise InvalidParams(f"invalid {what} {value!r}: expected a duration like 500ms, 30s, 15m, 2h, 1d or 1h30m")
    return seconds


# Times kmpwm accepts: from the epoch to the end of year 9999 (what datetime can show).
MIN_TIME, MAX_TIME = 0.0, 253402300799.0


def parse_time(value: str | int | float | datetime, *, now: float | None = None, what: str = "time", tz=None) -> float:
    """Return epoch seconds for a TIME (ISO 8601, ``@EPOCH`` or ``+DUR``), between 1970 and 9999.
    ``tz`` (a tzinfo, from ``--tz``) is the zone a naive ISO time is read in instead of the local
    one; a wall time it skips (spring forward) reads as the shifted instant, one it repeats as
    the first of the two."""
    try:
        epoch = _parse_time(value, now=now, what=what, tz=tz)
    except (ValueError, OverflowError, OSError):
        raise InvalidParams(f"invalid {what} {value!r}: out of range") from None
    if not MIN_TIME <= epoch <= MAX_TIME:
        raise InvalidParams(f"invalid {what} {value!r}: out of range (1970 to 9999)")
    return epoch


def _parse_time(value, *, now: float | None, what: str, tz=None) -> float:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise InvalidParams(f"invalid {what} {value!r}: give an aware datetime (with a timezone)")
        return value.timestamp()
    if isinstance(value, str):
        return _text_time(value, now, what, tz)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _not_nan(float(value), value, what)
    raise InvalidParams(f"invalid {what} {value!r}: expected ISO 8601, @EPOCH_SECONDS or +DURATION")


def _text_time(value: str, now: float | None, what: str, tz) -> float:
    """Epoch seconds for a TIME typed as text."""
    text = value.strip()
    if text.startswith("+"):
        base = time.time() if now is None else now
        return base + parse_duration(text[1:], what=what)
    if text.startswith("@"):
        try:
            epoch = float(text[1:])
        except ValueError:
            raise InvalidParams(f"invalid {what} {value!r}: expected @EPOCH_SECONDS") from None
        return _not_nan(epoch, value, what)
    return _iso_time(text, value, what, tz)


def _not_nan(epoch: float, value, what: str) -> float:
    """``epoch``, refused when it is NaN."""
    if epoch != epoch:
        raise InvalidParams(f"invalid {what} {value!r}: not a number")
    return epoch


def _iso_time(text: str, value: str, what: str, tz) -> float:
    """Epoch seconds for an ISO 8601 time (naive: local time, or in ``tz``)."""
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidParams(
            f"invalid {what} {value!r}: expected ISO 8601 (2026-11-22T08:00:00, naive means local time), "
            "@EPOCH_SECONDS or +DURATION"
        ) from None
    if dt.tzinfo is None and tz is not None:
        dt = dt.replace(tzinfo=tz, fold=0)  # zoneinfo: fold 0 is the first reading, and the shifted one in a gap
    if dt.tzinfo is None:
        return local_epoch(dt)  # naive means local time
    return dt.timestamp()


def local_epoch(dt: datetime) -> float:
    """Epoch seconds of a naive local time.  A time that a DST change skips (02:30 on a
    spring-forward night) moves forward by the gap (to 03:30), as cron runs such a job after the
    change rather than an hour early; a time that occurs twice is its first occurrence."""
    first, second = dt.replace(fold=0).timestamp(), dt.replace(fold=1).timestamp()
    if datetime.fromtimestamp(first).replace(tzinfo=None) != dt.replace(fold=0):  # skipped
        return max(first, second)
    return min(first, second)


def iso(epoch: float | None) -> str | None:
    """ISO 8601 UTC ending in ``Z``; whole seconds unless the value has a fraction."""
    if epoch is None:
        return None
    dt = datetime.fromtimestamp(epoch, UTC)
    if dt.microsecond:
        return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def format_duration(seconds: float) -> str:
    """Short human form: 1h30m, 45s, 250ms."""
    if seconds < 1:
        return f"{int(round(seconds * 1000))}ms"
    seconds = int(round(seconds))
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            out.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(out) or "0s"


def relative(epoch: float | None, now: float | None = None) -> str:
    """ "in 4m" / "3h ago" / "now" for terminals."""
    if epoch is None:
        return "-"
    now = time.time() if now is None else now
    delta = epoch - now
    if abs(delta) < 1:
        return "now"
    text = format_duration(abs(delta))
    # keep it to the two largest units, as people read it
    parts = re.findall(r"\d+[a-z]+", text)
    text = "".join(parts[:2])
    return f"in {text}" if delta > 0 else f"{text} ago"
