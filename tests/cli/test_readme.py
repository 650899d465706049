"""The README's examples, run as a new user would run them: top to bottom, in one fresh home.

What runs (everything else in the README, ```sh blocks included, is only read):

- ```console blocks: every line starting with ``$ `` is a command, run through ``sh -c`` in a
  temporary working directory with ``KMPWM_HOME`` set to a fresh home and ``kmpwm`` on PATH
  meaning ``python -m kmpwm`` of this checkout; stderr is merged into stdout, as on a terminal.
  The lines after it, up to the next ``$ `` line, are the output it must print, compared in
  shape (see :func:`shape`: times, durations, ids of runs and numbers may differ; words,
  columns, line count and JSON keys may not).  It must exit 0, unless the command line ends
  with ``# exit N``.
- ```python blocks: run with this interpreter, in the same home and directory.  A line
  ``EXPR  # -> TEXT`` (one line, one expression) also checks that ``str(EXPR)`` is ``TEXT``.
- ```toml (or any) blocks right after ``<!-- readme-test: file PATH -->``: written to PATH
  (relative to the working directory; ``$KMPWM_HOME`` expands) before the next block runs, so
  the examples can use the config.toml and chain files the README tells the user to write.
- ``<!-- readme-test: skip -->`` right before a ```console or ```python block: not run (the
  README should say why in its text: it needs the network, installs a crontab, ...).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

FENCE = re.compile(r"^```(\w*)\s*$")
MARK = re.compile(r"^<!--\s*readme-test:\s*(.*?)\s*-->\s*$")
EXIT = re.compile(r"\s+#\s*exit\s+(\d+)\s*$")


@dataclass
class Block:
    lang: str
    lines: list[str]
    line_no: int
    mark: str | None = None
    commands: list = field(default_factory=list)


def parse(text: str) -> list[Block]:
    blocks, lines, i, mark = [], text.splitlines(), 0, None
    while i < len(lines):
        m = MARK.match(lines[i])
        if m:
            mark = m.group(1)
            i += 1
            continue
        f = FENCE.match(lines[i])
        if f:
            start = i
            i += 1
            body = []
            while i < len(lines) and not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            blocks.append(Block(f.group(1), body, start + 1, mark))
            mark = None
        elif lines[i].strip():
            mark = None  # a marker applies only to the block right after it
        i += 1
    return blocks


def console_commands(block: Block) -> list[tuple[str, list[str], int]]:
    out = []
    for line in block.lines:
        if line.startswith("$ "):
            cmd = line[2:]
            m = EXIT.search(cmd)
            out.append((cmd, [], int(m.group(1)) if m else 0))
        else:
            assert out, f"README line {block.line_no}: a console block must start with a `$ ` command"
            out[-1][1].append(line)
    return out


TIME = re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d(:\d\d(\.\d+)?)?(Z|[+-]\d\d:?\d\d)?")
DUR = re.compile(r"(?<![\w.])\d+(\.\d+)?(ms|s|m|h|d)(\d+(ms|s|m|h))*(?![\w])")
RUNNER = re.compile(r"runner=\S+")
NUMBER = re.compile(r"\d+")


def shape(line: str, home: str, cwd: str) -> str:
    """A line with what differs from run to run (times, durations, runner ids, numbers, the
    temporary paths) replaced by placeholders, and runs of spaces collapsed."""
    line = line.replace(home, "$KMPWM_HOME").replace(cwd, "$PWD")
    line = TIME.sub("<TIME>", line)
    line = RUNNER.sub("runner=<RUNNER>", line)
    line = DUR.sub("<DUR>", line)
    line = NUMBER.sub("<N>", line)
    return " ".join(line.split())


@pytest.fixture
def world(tmp_path, kmpwm_home, pg_url):
    home, cwd, bin_dir = kmpwm_home, tmp_path / "work", tmp_path / "bin"  # home: like `mktemp -d`
    for d in (cwd, bin_dir):
        d.mkdir(mode=0o700)
    shim = bin_dir / "kmpwm"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m kmpwm "$@"\n')
    shim.chmod(0o755)
    env = dict(os.environ)
    env.update(
        KMPWM_HOME=str(home),
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
        NO_COLOR="1",
        COLUMNS="200",
    )
    env.pop("KMPWM_ASSUME", None)
    env["DATABASE_URL"] = pg_url  # the Fleet section's database: a fresh one on the test server
    return home, cwd, env


def _write_file(block: Block, home: Path, cwd: Path) -> None:
    target = block.mark.split(None, 1)[1].replace("$KMPWM_HOME", str(home))
    path = cwd / target
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(block.lines) + "\n")
    path.chmod(0o600)


def _run_console(block: Block, home: Path, cwd: Path, env: dict) -> list[str]:
    problems = []
    for cmd, expected, code in console_commands(block):
        proc = subprocess.run(
            ["sh", "-c", cmd],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=120,
        )
        where = f"README line {block.line_no} `$ {cmd}`"
        if proc.returncode != code:
            problems.append(f"{where}: exit {proc.returncode}, expected {code}\n{proc.stdout}")
            continue
        got = [shape(x, str(home), str(cwd)) for x in proc.stdout.splitlines()]
        want = [shape(x, str(home), str(cwd)) for x in expected]
        if got != want:
            diff = "\n".join(
                f"  README: {w!r}\n  actual: {g!r}"
                for w, g in zip(want + [""] * len(got), got + [""] * len(want))
                if w != g
            )
            problems.append(f"{where}: output differs from the README\n{diff}\nfull output:\n{proc.stdout}")
    return problems


CHECK = re.compile(r"^(?P<expr>[^#\s].*?)\s+#\s*->\s*(?P<want>.+?)\s*$")


def _python_source(block: Block) -> str:
    out = [
        "def __readme_check(value, want, line):",
        "    assert str(value) == want, f'README line {line}: got {value!s}, the README says {want}'",
    ]
    for n, line in enumerate(block.lines, block.line_no + 1):
        m = CHECK.match(line)
        out.append(f"__readme_check({m['expr']}, {m['want']!r}, {n})" if m else line)
    return "\n".join(out) + "\n"


def _run_python(block: Block, cwd: Path, env: dict) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", _python_source(block)], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    if proc.returncode != 0:
        return [f"README line {block.line_no} (python): exit {proc.returncode}\n{proc.stdout}{proc.stderr}"]
    return []


def test_readme_examples_work_as_written(world):
    home, cwd, env = world
    problems = []
    ran = 0
    for block in parse(README.read_text()):
        mark = block.mark or ""
        if mark.startswith("file "):
            _write_file(block, home, cwd)
        elif mark == "skip":
            continue
        elif block.lang == "console":
            problems += _run_console(block, home, cwd, env)
            ran += 1
        elif block.lang == "python":
            problems += _run_python(block, cwd, env)
            ran += 1
    assert ran >= 3, "the README's examples were not found"
    assert not problems, "\n\n".join(problems)


# -- the checker itself -------------------------------------------------------------------------


def test_shape_ignores_times_and_durations_but_not_words():
    a = shape("report: ENQUEUED — not yet due: next run in 9m57s (2026-11-22T09:09:03.200Z)", "/h", "/w")
    b = shape("report: ENQUEUED — not yet due: next run in 10m (2026-12-02T18:20:15.774Z)", "/h", "/w")
    assert a == b
    assert shape("ID  WORKER  STATE", "/h", "/w") != shape("ID  WORKER  STEP", "/h", "/w")
    assert (
        shape("journal /h/journal/journal.log: 12 record(s)", "/h", "/w")
        == "journal $KMPWM_HOME/journal/journal.log: <N> record(s)"
    )


def test_checker_fails_on_output_the_tool_no_longer_prints(world, tmp_path):
    home, cwd, env = world
    stale = Block(
        "console",
        [
            "$ kmpwm enqueue a echo",
            "enqueued a, next run now",
            "$ kmpwm inspect-queue",
            "ID  WORKER  STATE     NEXT RUN  ATTEMPTS  CHAIN  TAGS  LAST RESULT",
            "a   echo    ENQUEUED  now       0",
        ],
        1,
    )
    problems = _run_console(stale, home, cwd, env)
    assert len(problems) == 1 and "CHAIN" in problems[0]
    wrong_exit = Block(
        "console",
        [
            "$ kmpwm workers nope  # exit 65",
            "kmpwm: error: unknown worker 'nope'",
            "kmpwm: `kmpwm workers` lists them",
            "$ kmpwm workers nope",
        ],
        1,
    )
    problems = _run_console(wrong_exit, home, cwd, env)
    assert len(problems) == 1 and "exit 65, expected 0" in problems[0]
    bad_python = Block("python", ["x = 1 + 1", "x  # -> 3"], 1)
    assert "got 2, the README says 3" in _run_python(bad_python, cwd, env)[0]
