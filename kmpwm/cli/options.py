"""Option values the commands read from their text: each is optional (None when not given)."""

from __future__ import annotations

from kmpwm.core.timeparse import parse_duration


def duration_or_none(value, what: str) -> float | None:
    """``value`` parsed as a duration in seconds (InvalidParams names ``what``), None if not given."""
    return None if value is None else parse_duration(value, what=what)
