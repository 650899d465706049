"""Shared helpers of the benchmark suite: homes, process timing, medians, the results table.

Every figure that involves a whole process is measured with ``os.wait4`` so that each run gives
its wall time, its CPU time (user + system, the process and the children it waited for) and its
peak RSS.  The machine is shared (two cores, other people's tests), so every module prints the
load average and reports medians; runs of figures that are compared with each other are
interleaved (A B C A B C ...) so that a burst of foreign load hits them alike.
"""

from __future__ import annotations

import atexit
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
PYTHON = sys.executable
_SCRIPT = Path(sys.executable).parent / "kmpwm"
# The console script is what cron runs; fall back to `python -m kmpwm` when it is not installed.
KMPWM = [str(_SCRIPT)] if _SCRIPT.exists() else [PYTHON, "-m", "kmpwm"]

# Bytecode: this sandbox exports PYTHONDONTWRITEBYTECODE=1 and kmpwm is an editable install, so
# without help every start would compile kmpwm's sources again -- which no installed copy does.
# Benchmark processes therefore keep their bytecode in a cache of their own (PYTHONPYCACHEPREFIX,
# nothing is written into the source tree) and are warmed once before timing.  The floor
# (`python -c "import typer"`) runs under exactly the same setting.
PYCACHE = Path(tempfile.gettempdir()) / "kmpwm-bench-pycache"
CACHE = Path(tempfile.gettempdir()) / "kmpwm-bench-cache"  # built journals, reused between runs


def bench_env(home: str | None = None, **extra: str) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    env.pop("KMPWM_ASSUME", None)
    env["NO_COLOR"] = "1"
    if home is not None:
        env["KMPWM_HOME"] = home
    env.update(extra)
    return env


def loadavg() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load average: unknown"
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def say(msg: str) -> None:
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


_homes: list[str] = []


def fresh_home(prefix: str = "kmpwm-bench-") -> str:
    home = tempfile.mkdtemp(prefix=prefix)
    os.chmod(home, 0o700)
    _homes.append(home)
    return home


def drop_home(home: str) -> None:
    shutil.rmtree(home, ignore_errors=True)
    if home in _homes:
        _homes.remove(home)


@atexit.register
def _cleanup() -> None:
    for home in list(_homes):
        shutil.rmtree(home, ignore_errors=True)


def write_config(home: str, text: str) -> None:
    path = os.path.join(home, "config.toml")
    with open(path, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


# -- timing --------------------------------------------------------------------------------


@dataclass
class ProcRun:
    wall: float  # seconds
    cpu: float  # seconds, user + system
    maxrss_kb: int  # peak RSS in KiB: see run_process(peak=...)
    code: int
    stdout: bytes = b""


# Peak RSS of a kmpwm process.  wait4's ru_maxrss is useless here: subprocess starts children with
# vfork, and Linux folds the *parent's* RSS high-water mark into the child's maxrss at exec, so a
# bench process holding 2 GiB would make every child look 2 GiB big.  VmHWM in /proc/self/status
# belongs to the process's own address space (reset at exec), so the kmpwm process reports it at
# exit, through this wrapper (the same entry point as the console script; forked pool hosts leave
# with os._exit and report nothing).
PEAK_WRAPPER = """
import atexit, os, sys
_pid = os.getpid()
def _report():
    if os.getpid() != _pid:
        return
    try:
        with open('/proc/self/status') as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith('VmHWM:'))
        with open(os.environ['KMPWM_BENCH_HWM'], 'w') as f:
            f.write(str(kb))
    except Exception:
        pass
atexit.register(_report)
sys.argv = ['kmpwm'] + sys.argv[1:]
from kmpwm.cli.entry import run
run()
"""


def run_process(
    cmd: list[str], env: dict, stdin: bytes | None = None, capture: bool = False, check: bool = True, peak: bool = False
) -> ProcRun:
    """Run one process to completion; wall time from just before the spawn to its reaping.

    ``peak=True`` (for ``KMPWM + args`` only): run kmpwm through PEAK_WRAPPER and report the
    kmpwm process's own VmHWM as ``maxrss_kb``; otherwise ``maxrss_kb`` is wait4's ru_maxrss."""
    hwm_file = None
    if peak and sys.platform.startswith("linux"):
        args = cmd[len(KMPWM) :]
        fd, hwm_file = tempfile.mkstemp(prefix="kmpwm-bench-hwm-")
        os.close(fd)
        cmd = [PYTHON, "-c", PEAK_WRAPPER, *args]
        env = dict(env, KMPWM_BENCH_HWM=hwm_file)
    out_fd = subprocess.PIPE if capture else subprocess.DEVNULL
    in_f = None
    if stdin is not None:
        in_f = tempfile.TemporaryFile()
        in_f.write(stdin)
        in_f.seek(0)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, stdin=in_f if in_f is not None else subprocess.DEVNULL, stdout=out_fd, stderr=subprocess.PIPE
    )
    out = proc.stdout.read() if capture else b""
    err = proc.stderr.read()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    for f in (proc.stdout, proc.stderr, in_f):
        if f is not None:
            f.close()
    maxrss = ru.ru_maxrss
    if hwm_file is not None:
        try:
            with open(hwm_file) as fh:
                maxrss = int(fh.read() or 0)
        except (OSError, ValueError):
            maxrss = 0
        os.unlink(hwm_file)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[-3:])} exited {proc.returncode}: {err.decode(errors='replace')[-2000:]}")
    return ProcRun(wall, ru.ru_utime + ru.ru_stime, maxrss, proc.returncode, out)


@dataclass
class Stat:
    values: list[float] = field(default_factory=list)

    def add(self, v: float) -> None:
        self.values.append(v)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def n(self) -> int:
        return len(self.values)

    def spread(self, scale: float = 1000.0, unit: str = "ms") -> str:
        return f"n={self.n}, min {self.min * scale:.1f}, max {max(self.values) * scale:.1f} {unit}"


def interleaved(fns: dict, rounds: int, warmup: int = 1) -> dict[str, Stat]:
    """Call each function once per round, round-robin; each returns one figure (seconds)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    stats = {name: Stat() for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            stats[name].add(fn())
    return stats


def timed(fn, repeat: int, warmup: int = 1) -> Stat:
    for _ in range(warmup):
        fn()
    st = Stat()
    for _ in range(repeat):
        st.add(fn())
    return st


# -- the table -----------------------------------------------------------------------------


@dataclass
class Row:
    item: str
    figure: str  # e.g. "131 ms"
    goal: str  # e.g. "<= 1.2x floor"
    ratio: float | None = None
    ratio_def: str = ""  # what the ratio is, e.g. "enqueue / floor"
    note: str = ""


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1000
    if ms >= 10000:
        return f"{seconds:.1f} s"
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 10:
        return f"{ms:.1f} ms"
    return f"{ms:.2f} ms"


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def print_table(title: str, rows: list[Row], out=None) -> None:
    out = out or sys.stdout
    headers = ("item", "figure", "goal", "ratio", "ratio is", "notes")
    cells = [(r.item, r.figure, r.goal, "" if r.ratio is None else f"{r.ratio:.2f}", r.ratio_def, r.note) for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(headers)]
    widths[-1] = len(headers[-1])  # notes run free at the end of the line
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()
    out.write(f"\n{title}\n{line}\n{'-' * max(len(line), 100)}\n")
    for c in cells:
        if c[0].startswith("## "):
            out.write(f"{c[0][3:]}{'  ' + c[-1] if c[-1] else ''}\n")
            continue
        out.write(
            "  ".join(v.ljust(w) if i < len(c) - 1 else v for i, (v, w) in enumerate(zip(c, widths))).rstrip() + "\n"
        )
    out.flush()


def section(name: str) -> Row:
    """A heading row in the table."""
    return Row("## " + name, "", "")


def standalone(rows_fn, title: str) -> None:
    """``python bench/bench_x.py [--quick]``: run one module and print its part of the table."""
    import argparse

    ap = argparse.ArgumentParser(description=title)
    ap.add_argument("--quick", action="store_true", help="fewer runs and smaller sizes (a smoke test)")
    args = ap.parse_args()
    say(loadavg())
    rows = rows_fn(quick=args.quick)
    print(loadavg())
    print_table(title, rows)
