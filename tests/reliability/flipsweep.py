"""Damage at every byte of a small real journal, then ``doctor --repair``: no success forgotten.

Shared by tests/reliability/test_salvage.py (the pytest tier: one bit per byte, and a byte destroyed beyond
mending at every byte) and scripts/torture.py (``--flips``: every bit of every byte).

``build(root)`` makes the journal through the command line the way a user does: plain tasks, a
Python worker, a task that asks to retry and succeeds on its second run, a chain with a parallel
step, two run-due passes, a task waiting for later and one due now that has not run.  ``sweep``
then damages it one trial at a time and checks, for each:

* readers: the damage is reported (run-due fails closed on it), nothing is taken for a torn
  tail, and every record whose own bytes are untouched is shown, wherever its newline went;
* repair (the library's ``doctor.repair`` on a real home, or the same ``mend`` in memory): the
  journal is healthy after it, and holds exactly the records expected -- every original record
  after a single flipped bit (a flipped newline glues two records: both are kept; a flip inside a
  record is pinpointed by its CRC-32 and undone), every untouched one after a byte destroyed;
* the fold: every task that had SUCCEEDED is still SUCCEEDED -- unless the destroyed record held
  that success itself (no later step of its chain ran) or created the task; a lost claim, a lost
  RETRY result, a lost earlier step never make a recorded success run again.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from crashlib import Home, fold_bytes

FLAKY_SH = r"""#!/bin/bash
# asks to be retried (exit 75) on its first attempt, succeeds on the next
printf 'start %s %s %s %s\n' "$KMPWM_TASK_ID" "$KMPWM_ATTEMPT" "$$" "$EPOCHREALTIME" >> "$CRASH_RUNLOG"
[ "$KMPWM_ATTEMPT" = 1 ] && exit 75
exit 0
"""


def build(root: Path) -> Home:
    """A home with a small journal of real runs (see the module docstring)."""
    home = Home(root)
    home.install_workers()
    flaky = home.path / "flaky.sh"
    flaky.write_text(FLAKY_SH)
    os.chmod(flaky, 0o700)
    with open(home.path / "config.toml", "a") as fh:
        fh.write(f'\n[workers.flaky]\ncommand = ["/bin/bash", "{flaky}"]\n')
    for args in (
        ("enqueue", "a", "cw"),
        ("enqueue", "b", "pw", "--input", "hello"),
        ("enqueue", "r", "flaky", "--backoff-delay", "0s"),
        ("chain", "cw", "cw+pw", "cw", "--id", "ch"),
        ("run-due", "--parallel", "2"),
        ("run-due", "--parallel", "2"),
        ("enqueue", "later", "cw", "--delay", "1h"),
        ("enqueue", "now", "cw"),
    ):
        _, rc, err = home.json(*args)
        assert rc == 0, (args, rc, err)
    state, scan = home.fold()
    succeeded = {i for i, t in state["tasks"].items() if t["state"] == "SUCCEEDED"}
    assert {"a", "b", "r"} <= succeeded and len([i for i in succeeded if i.startswith("ch/")]) == 4, state
    assert state["tasks"]["r"]["attempts"] == 2, "r should have retried once"
    assert not scan.damage and scan.torn is None
    for p in (home.runlog, home.donelog, home.snapshot, home.journal_dir / "history.snap"):
        p.unlink(missing_ok=True)
    return home


@dataclass
class Template:
    data: bytes
    lines: list[tuple[int, int]]  # (start, index of its newline) of each record
    records: list[dict]
    succeeded: set[str]
    excused: list[set[str]]  # per record: the successes that may be lost when it is destroyed


def template(home: Home) -> Template:
    from kmpwm.storage.journal import decode

    data = home.journal.read_bytes()
    lines, pos = [], 0
    while (nl := data.find(b"\n", pos)) >= 0:
        lines.append((pos, nl))
        pos = nl + 1
    records = [decode(data[s:e]) for s, e in lines]
    state, _ = fold_bytes(data)
    succeeded = {i for i, t in state["tasks"].items() if t["state"] == "SUCCEEDED"}
    return Template(data, lines, records, succeeded, [_excused(records, n, state) for n in range(len(records))])


def _excused(records: list[dict], n: int, state: dict) -> set[str]:
    """Successes that may be lost with record ``n``: the tasks it created, and those whose SUCCESS
    result it holds, unless a later step of their chain has a result in another record (that run
    proves them succeeded)."""
    out: set[str] = set()
    for op in records[n]["ops"]:
        if op["op"] == "enq":
            out.add(op["task"]["id"])
        elif op["op"] == "chain":
            out.update(t["id"] for step in op["steps"] for t in step)
        elif op["op"] == "result" and op["status"] == "SUCCESS":
            out.add(op["id"])
    proved = set()
    for m, record in enumerate(records):
        if m == n:
            continue
        for op in record["ops"]:
            if op["op"] == "result" and (t := state["tasks"].get(op["id"])) and t["chain_id"]:
                chain = state["chains"][t["chain_id"]]
                proved.update(i for step in chain["steps"][: t["step"] - 1] for i in step)
    created = {
        i
        for op in records[n]["ops"]
        if op["op"] in ("enq", "chain")
        for i in ([op["task"]["id"]] if op["op"] == "enq" else [t["id"] for s in op["steps"] for t in s])
    }
    return (out - proved) | created


@dataclass
class Report:
    trials: int = 0
    checks: int = 0
    restored: int = 0  # trials after which the journal held every original record again
    violations: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:
        self.checks += 1
        if not ok and len(self.violations) < 200:
            self.violations.append(what)


def _no_hdr(records) -> list[dict]:
    return [r for r in records if not (r.get("ops") and r["ops"][0].get("op") == "hdr")]


def trial(tpl: Template, pos: int, value: int, report: Report, case: Path | None = None) -> None:
    """Set byte ``pos`` to ``value`` and check everything (``case``: a home to repair for real)."""
    from kmpwm.storage.journal import decode, mend, scan_bytes

    report.trials += 1
    old = tpl.data[pos]
    damaged = tpl.data[:pos] + bytes([value]) + tpl.data[pos + 1 :]
    label = f"byte {pos} {old:#04x}->{value:#04x}"
    hit = next((n for n, (s, e) in enumerate(tpl.lines) if s <= pos < e), None)  # None: a newline
    single = (old ^ value).bit_count() == 1
    if hit is not None and decode(damaged[tpl.lines[hit][0] : tpl.lines[hit][1]]) == tpl.records[hit]:
        hit = None  # still the same record: a hex digit of its checksum in upper case
        harmless = True
    else:
        harmless = False
    untouched = [r for n, r in enumerate(tpl.records) if n != hit]
    scan = scan_bytes(damaged)
    report.check(
        bool(scan.damage) != harmless and scan.torn is None,
        f"{label}: readers see damage {scan.damage}, torn {scan.torn}",
    )
    report.check([r for _, r in scan.records] == untouched, f"{label}: readers do not show every untouched record")
    want = _no_hdr(tpl.records if single or hit is None else untouched)
    if case is None:
        kept = _no_hdr(mend(damaged).records)
        healthy = True
    else:
        kept, healthy = _repair_for_real(case, damaged)
    report.check(healthy, f"{label}: the journal is not healthy after the repair")
    report.check(
        kept == want,
        f"{label}: repair kept {len(kept)} records, expected {len(want)}"
        + ("" if len(kept) != len(want) else " (different ones)"),
    )
    if kept == _no_hdr(tpl.records):
        report.restored += 1
    state, _ = fold_bytes(b"".join(_encode(r) for r in kept))
    excused = tpl.excused[hit] if hit is not None and not single else set()
    for tid in sorted(tpl.succeeded - excused):
        t = state["tasks"].get(tid)
        report.check(
            t is not None and t["state"] == "SUCCEEDED",
            f"{label}: {tid} had SUCCEEDED, after the repair it is {t and t['state']}"
            + (f" (record {hit} destroyed)" if hit is not None else " (a newline)"),
        )


def _encode(record: dict) -> bytes:
    from kmpwm.storage.journal import encode

    return encode(record)


def _repair_for_real(case: Path, damaged: bytes) -> tuple[list[dict], bool]:
    from kmpwm.storage.journal import Journal
    from kmpwm.storage.paths import resolve
    from kmpwm.system.doctor import check_journal, repair

    jdir = case / "journal"
    for p in jdir.iterdir():
        if p.is_dir():
            shutil.rmtree(p)
        elif p.name != "lock":
            p.unlink()
    (jdir / "journal.log").write_bytes(damaged)
    os.chmod(jdir / "journal.log", 0o600)
    paths = resolve(str(case))
    repair(paths)
    after = check_journal(Journal(paths))
    healthy = not after["damage"] and after["torn_tail"] is None
    return _no_hdr(r for _, r in after["_scan"].records), healthy


def sweep(
    tpl: Template, *, bits: str, case: Path | None, real_every: int = 1, seed: int = 0, destroy: bool = True
) -> Report:
    """Damage every byte: ``bits`` is "all" (each of its 8 bits in turn) or "one" (one random bit
    per byte); ``destroy`` adds, at every byte, a value 8 bits away (beyond mending).  Every
    ``real_every``-th trial repairs a real home (``case``) through ``doctor.repair``; the rest
    run the same ``mend`` in memory."""
    rng = random.Random(seed)
    report = Report()
    n = 0
    for pos in range(len(tpl.data)):
        old = tpl.data[pos]
        values = [old ^ (1 << b) for b in range(8)] if bits == "all" else [old ^ (1 << rng.randrange(8))]
        if destroy:
            values.append(old ^ 0xFF)
        for value in values:
            trial(tpl, pos, value, report, case if case is not None and n % real_every == 0 else None)
            n += 1
    return report


def cli_trial(tpl: Template, template_home: Home, root: Path, pos: int, value: int, report: Report) -> None:
    """One trial end to end through the command line: doctor --repair, doctor, run-due."""
    from crashlib import parse_log

    report.trials += 1
    label = f"CLI byte {pos} {tpl.data[pos]:#04x}->{value:#04x}"
    hit = next((n for n, (s, e) in enumerate(tpl.lines) if s <= pos < e), None)
    single = (tpl.data[pos] ^ value).bit_count() == 1
    excused = tpl.excused[hit] if hit is not None and not single else set()
    case = Home(root / "cli-case")
    shutil.rmtree(case.path)
    shutil.copytree(template_home.path, case.path)
    case.journal.write_bytes(tpl.data[:pos] + bytes([value]) + tpl.data[pos + 1 :])
    doc, rc, err = case.json("doctor", "--repair")
    report.check(rc == 0 and "Traceback" not in err, f"{label}: doctor --repair exit {rc}: {err.strip()[-300:]}")
    doc, rc, err = case.json("doctor")
    report.check(rc == 0 and bool(doc and doc["healthy"]), f"{label}: doctor after the repair: exit {rc}")
    doc, rc, err = case.json("run-due", "--parallel", "2")
    report.check(rc == 0, f"{label}: run-due after the repair: exit {rc}: {err.strip()[-300:]}")
    starts, _ = parse_log(case.runlog)
    again = sorted({s.id for s in starts} & (tpl.succeeded - excused))
    report.check(not again, f"{label}: run-due ran again what had succeeded: {again}")
    state, _ = case.fold()
    for tid in sorted(tpl.succeeded - excused):
        t = state["tasks"].get(tid)
        report.check(t is not None and t["state"] == "SUCCEEDED", f"{label}: {tid} is {t and t['state']} after run-due")
