"""Printing for people and programs: one JSON document on stdout under ``--json``; otherwise a
rich table on a terminal and plain text elsewhere (no colour under ``NO_COLOR``)."""

from __future__ import annotations

import itertools
import os
import sys
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


def error(message: str, hint: str | None = None) -> None:
    """The error on stderr, and under it what to do about it (if there is a hint)."""
    sys.stderr.write(f"kmpwm: error: {printable(message)}\n")
    if hint:
        sys.stderr.write(f"kmpwm: {printable(hint)}\n")


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
    rows = [_cells(row) for row in rows]
    if color_enabled():
        _rich_table(headers, rows, title, style_column)
        return
    if title:
        say(title)
    _plain_rows(headers, rows)


def grouped_table(
    headers: Sequence[str],
    groups: Sequence[tuple[Sequence[Any] | None, Sequence[Sequence[Any]]]],
    *,
    style_column: int | None = None,
) -> None:
    """A table in sections, each with an optional header row (shown in bold on a terminal): rich
    on a colour terminal, aligned plain text with the same columns otherwise."""
    groups = [(None if head is None else _cells(head), [_cells(r) for r in rows]) for head, rows in groups]
    if color_enabled():
        _rich_grouped_table(headers, groups, style_column)
    else:
        _plain_rows(headers, list(_group_rows(groups)))


def _cells(row: Sequence[Any]) -> list[str]:
    """A row's cells as text, control characters escaped (None is an empty cell)."""
    return ["" if c is None else printable(str(c)) for c in row]


def _group_rows(groups: list):
    """Every row of the sections, each section's header row (if it has one) first."""
    for head, rows in groups:
        if head:
            yield head
        yield from rows


def _plain_rows(headers: Sequence[str], rows: list[list[str]]) -> None:
    """The header line and the rows in aligned columns."""
    widths = _column_widths(headers, rows)
    for row in [headers, *rows]:
        say("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def _column_widths(headers: Sequence[str], rows: list[list[str]]) -> list[int]:
    """Each column's width: its longest cell (a short row's missing cells are empty)."""
    return [max(map(len, column)) for column in itertools.zip_longest(headers, *rows, fillvalue="")]


def _rich_table(headers: Sequence[str], rows: list[list[str]], title: str | None, style_column: int | None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=title, header_style="bold", box=None, pad_edge=False)
    for h in headers:
        t.add_column(h, overflow="fold")
    for row in rows:
        t.add_row(*_styled([escape(c) for c in row], style_column))  # "[red]" in an id is text, not markup
    Console().print(t)


def _rich_grouped_table(headers: Sequence[str], groups: list, style_column: int | None) -> None:
    from rich.console import Console
    from rich.table import Table

    groups = [_escaped_group(head, rows) for head, rows in groups]  # "[red]" in an id is text, not markup
    t = Table(header_style="bold", box=None, pad_edge=False)
    widths = _column_widths(headers, list(_group_rows(groups)))
    for n, h in enumerate(headers):
        last = n == len(headers) - 1  # only the last column gives way on a narrow terminal
        t.add_column(h, no_wrap=True, overflow="ellipsis", min_width=None if last else widths[n])
    _add_sections(t, groups, style_column)
    Console().print(t)


def _add_sections(t, groups: list, style_column: int | None) -> None:
    """Each section's rows into the rich table ``t``, a section with a header row set apart from the one before."""
    for n, (head, rows) in enumerate(groups):
        if head is not None:
            if n:
                t.add_section()
            t.add_row(*_bold(head))
        for row in rows:
            t.add_row(*_styled(list(row), style_column))


def _escaped_group(head: list[str] | None, rows: list[list[str]]) -> tuple:
    """A section with rich markup escaped in every cell."""
    from rich.markup import escape

    return (None if head is None else [escape(c) for c in head], [[escape(c) for c in r] for r in rows])


def _bold(row: list[str]) -> list[str]:
    """A section's header row in bold (rich markup)."""
    return [f"[bold]{c}[/]" if c else "" for c in row]


def _styled(row: list[str], style_column: int | None) -> list[str]:
    """The state column in its colour (rich markup)."""
    if style_column is not None and row[style_column] in STATE_STYLE:
        row[style_column] = f"[{STATE_STYLE[row[style_column]]}]{row[style_column]}[/]"
    return row
