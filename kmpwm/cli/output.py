"""Printing for people and programs: one JSON document on stdout under ``--json``; otherwise a
rich table on a terminal and plain text elsewhere (no colour under ``NO_COLOR``)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

import orjson


def dumps(doc: Any) -> bytes:
    try:
        return orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS, default=str)
    except TypeError:  # text that is not valid UTF-8 (undecodable bytes from argv): show them as \xNN
        return orjson.dumps(_clean(doc), option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS, default=str)


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def print_json(doc: Any) -> None:
    sys.stdout.buffer.write(dumps(doc) + b"\n")
    sys.stdout.flush()


def print_json_line(doc: Any) -> None:
    sys.stdout.buffer.write(orjson.dumps(doc, default=str) + b"\n")
    sys.stdout.flush()


def is_tty(stream=None) -> bool:
    stream = stream or sys.stdout
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def color_enabled() -> bool:
    return is_tty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def printable(text: str) -> str:
    """``text`` with control characters escaped, so that nothing a user stored (an id, a worker
    name) can move the cursor, clear the screen or split an error over several lines.  Format
    characters (category Cf: the bidi overrides U+202E, U+2066-2069, U+200E/F, zero-width ones)
    and line/paragraph separators are not printable either, so they are escaped (``\\u202e``)
    and cannot reorder what a terminal shows."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def say(text: str = "") -> None:
    """One line for people (control characters escaped)."""
    sys.stdout.write(printable(text) + "\n")


def warn(text: str) -> None:
    sys.stderr.write(f"kmpwm: warning: {printable(text)}\n")


STATE_STYLE = {
    "ENQUEUED": "cyan",
    "BLOCKED": "magenta",
    "RUNNING": "bold yellow",
    "SUCCEEDED": "green",
    "FAILED": "bold red",
    "CANCELLED": "dim",
    "SUCCESS": "green",
    "FAILURE": "red",
    "RETRY": "yellow",
    "EXPIRED": "yellow",
}


def table(
    headers: Sequence[str], rows: Iterable[Sequence[Any]], *, title: str | None = None, style_column: int | None = None
) -> None:
    """A table: rich on a colour terminal, aligned plain text otherwise."""
    rows = [["" if c is None else printable(str(c)) for c in row] for row in rows]
    if color_enabled():
        from rich.console import Console
        from rich.markup import escape
        from rich.table import Table

        t = Table(title=title, header_style="bold", box=None, pad_edge=False)
        for h in headers:
            t.add_column(h, overflow="fold")
        for row in rows:
            t.add_row(*_styled([escape(c) for c in row], style_column))  # "[red]" in an id is text, not markup
        Console().print(t)
        return
    if title:
        say(title)
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    say("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for row in rows:
        say("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def grouped_table(
    headers: Sequence[str],
    groups: Sequence[tuple[Sequence[Any] | None, Sequence[Sequence[Any]]]],
    *,
    style_column: int | None = None,
) -> None:
    """A table in sections, each with an optional header row (shown in bold on a terminal): rich
    on a colour terminal, aligned plain text with the same columns otherwise."""

    def cells(row):
        return ["" if c is None else printable(str(c)) for c in row]

    groups = [(None if head is None else cells(head), [cells(r) for r in rows]) for head, rows in groups]
    if color_enabled():
        _rich_grouped_table(headers, groups, style_column)
        return
    widths = _column_widths(headers, groups)
    say("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    for head, rows in groups:
        for row in ([head] if head else []) + list(rows):
            say("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def _column_widths(headers: Sequence[str], groups: list) -> list[int]:
    widths = [len(h) for h in headers]
    for head, rows in groups:
        for row in ([head] if head else []) + list(rows):
            for i, cell in enumerate(row):
                widths[i] = max(widths[i], len(cell))
    return widths


def _rich_grouped_table(headers: Sequence[str], groups: list, style_column: int | None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    groups = [
        (None if head is None else [escape(c) for c in head], [[escape(c) for c in r] for r in rows])
        for head, rows in groups
    ]  # "[red]" in an id is text, not markup
    t = Table(header_style="bold", box=None, pad_edge=False)
    widths = _column_widths(headers, groups)
    for n, h in enumerate(headers):
        last = n == len(headers) - 1  # only the last column gives way on a narrow terminal
        t.add_column(h, no_wrap=True, overflow="ellipsis", min_width=None if last else widths[n])
    for n, (head, rows) in enumerate(groups):
        if head is not None:
            if n:
                t.add_section()
            t.add_row(*[f"[bold]{c}[/]" if c else "" for c in head])
        for row in rows:
            t.add_row(*_styled(list(row), style_column))
    Console().print(t)


def _styled(row: list[str], style_column: int | None) -> list[str]:
    """The state column in its colour (rich markup)."""
    if style_column is not None and row[style_column] in STATE_STYLE:
        row[style_column] = f"[{STATE_STYLE[row[style_column]]}]{row[style_column]}[/]"
    return row


def now() -> float:
    return time.time()
