"""Corruption (SPEC section 2): truncations and byte flips at every region of the journal and of
the snapshot.

Journal: a torn last record is ignored and repaired by the next writer; a damaged record in the
middle is reported (doctor exit 74, a warning on stderr) while every valid record before and after
it is still shown; run-due fails closed (exit 74, saying how to repair) until ``doctor --repair``
moves the damaged bytes to ``journal/quarantine/`` and keeps every valid record.  Never a
traceback.  Snapshot: only a cache — damage to it must change nothing a user sees.

The sweeps run in-process against the library (every region of every record, plus hypothesis
picking offsets and byte values); a sample of cases runs the real command line end to end.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import time
from pathlib import Path

import pytest
from crashlib import Home, count, fold_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmpwm.storage.journal import decode

# -- the template journal ------------------------------------------------------------------


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A home whose journal has every kind of record: header, single and batch enqueues, a chain,
    a cancel, claims and results from a run-due, then more enqueues (one due now)."""
    from kmpwm import Scheduler, TaskRequest
    from kmpwm.core import triggers

    root = tmp_path_factory.mktemp("corruption")
    os.chmod(root, 0o700)
    home = Home(root / "home")
    home.install_workers()
    s = Scheduler(home=str(home.path))
    s.enqueue("a", None, "cw")
    s.enqueue("b", triggers.OneTime(3600), "cw", input="keep me")
    s.enqueue("c", None, "pw")
    s.begin_with(TaskRequest("cw")).then([TaskRequest("cw"), TaskRequest("pw")]).with_id("ch").enqueue()
    with s.batch():
        for i in range(3):
            s.enqueue(f"d{i}", triggers.OneTime(7200), "cw", tags=["batch"])
    s.enqueue("x", triggers.OneTime(3600), "cw")
    s.cancel("x")
    doc, rc, err = home.json("run-due", "--parallel", "2")
    assert rc == 0, err
    s2 = Scheduler(home=str(home.path))
    s2.enqueue("e", triggers.OneTime(3600), "cw", input={"k": [1, 2, 3]})
    s2.enqueue("f", triggers.Periodic(3600), "pw")
    s2.enqueue("g", None, "cw")  # due now: what run-due must not run while the journal is damaged
    for p in (home.runlog, home.donelog):
        p.unlink(missing_ok=True)
    assert not home.snapshot.exists()
    return home.path


def _lines(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each complete line; ``end`` is the index of its newline."""
    out, pos = [], 0
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            return out
        out.append((pos, nl))
        pos = nl + 1


def _expected(original: bytes, damaged: bytes, *, flip: int | None = None, cut: int | None = None):
    """What kmpwm must show and keep for ``damaged``.

    Every record whose own bytes (checksum, space, payload) are untouched is valid wherever its
    line boundaries went -- a flipped newline glues two records into one line, both still valid --
    and read-only commands show it.  ``doctor --repair`` keeps those and also the record whose one
    bit flipped (CRC-32 pinpoints a single flipped bit).  Returns the complete original lines repair
    must keep, the fold of the records readers must show, whether there is damage (a run-due
    stopper) and whether there is a torn tail."""
    kept, shown = [], []
    single_bit = flip is not None and (original[flip] ^ damaged[flip]).bit_count() == 1
    for start, end in _lines(original):
        line = original[start : end + 1]
        if cut is not None:
            if end < cut:
                kept.append(line)
                shown.append(line)
        elif not start <= flip < end:
            kept.append(line)
            shown.append(line)
        elif single_bit:
            kept.append(line)
    state, _ = fold_bytes(b"".join(shown))
    last_newline = flip is not None and flip == len(original) - 1  # the last record, unterminated, then a byte
    torn = not damaged.endswith(b"\n") and len(damaged) > 0 and not last_newline
    complete = damaged[: damaged.rfind(b"\n") + 1]
    middle = last_newline or any(decode(complete[s:e]) is None for s, e in _lines(complete))
    return kept, state, middle, torn


def _damaged_span(original: bytes, flip: int) -> int:
    """Length of the line(s) a flip at ``flip`` touched: its line, and the next one if it hit a newline."""
    lines = _lines(original)
    touched = [(s, e) for s, e in lines if s - 1 <= flip <= e]
    return sum(e + 1 - s for s, e in touched)


def _states(state: dict) -> dict:
    return {i: (t["state"], t["input"]) for i, t in state["tasks"].items()}


def _case_home(template: Path, data: bytes) -> Path:
    root = Path(tempfile.mkdtemp(prefix="kmpwm-corrupt-"))
    os.chmod(root, 0o700)
    home = root / "home"
    shutil.copytree(template, home)
    (home / "journal" / "journal.log").write_bytes(data)
    return home


def _check_in_process(template: Path, original: bytes, damaged: bytes, **where) -> None:
    """Library-level: the view, doctor's report, repair, and a write after the repair."""
    from kmpwm import Scheduler
    from kmpwm.storage.paths import resolve
    from kmpwm.storage.store import Store
    from kmpwm.system.doctor import check_journal, repair

    count("corruptions")
    intact, expected, middle, torn = _expected(original, damaged, **where)
    home = _case_home(template, damaged)
    try:
        paths = resolve(str(home))
        view = Store(paths).load()
        assert _states(view.state) == _states(expected), f"{where}: untouched valid records not all shown"
        assert bool(view.damage) == middle, f"{where}: damage {view.damage}, expected middle damage={middle}"
        assert (view.torn is not None) == torn, f"{where}: torn {view.torn}, expected {torn}"
        from kmpwm.storage.journal import Journal

        report = check_journal(Journal(paths))
        assert bool(report["damage"]) == middle and bool(report["torn_tail"]) == torn
        result = repair(paths)
        after = check_journal(Journal(paths))
        assert not after["damage"] and not after["torn_tail"], f"{where}: repair left {after['damage']}"
        kept = [r for _, r in after["_scan"].records if r["ops"][0].get("op") != "hdr"]
        want = [decode(line[:-1]) for line in intact]
        want = [r for r in want if r["ops"][0].get("op") != "hdr"]
        assert kept == want, f"{where}: repair did not keep exactly the valid records"
        qdir = home / "journal" / "quarantine"
        moved = sum(p.stat().st_size for p in qdir.glob("*.bin")) if qdir.exists() else 0
        if "cut" in where:
            assert moved == len(damaged) - sum(len(x) for x in intact), f"{where}: quarantine holds {moved} bytes"
        else:  # the flipped byte and at most the line(s) it damaged; never a valid record it did not touch
            assert 0 < moved <= _damaged_span(original, where["flip"]), f"{where}: quarantine holds {moved} bytes"
        assert result["records_kept"] == len(want) or not (middle or torn)
        repaired_state, _ = fold_bytes(b"".join(intact))
        assert _states(Store(paths).load().state) == _states(repaired_state), f"{where}: repaired state"
        Scheduler(home=str(home)).enqueue("after-repair", None, "cw")
        assert "after-repair" in Store(paths).load().state["tasks"]
    finally:
        shutil.rmtree(home.parent, ignore_errors=True)


def _regions(original: bytes) -> list[tuple[str, int]]:
    """Every region of every record: checksum, separator, payload start/middle/end, newline."""
    out = []
    for n, (start, end) in enumerate(_lines(original)):
        for name, pos in (
            ("crc[0]", start),
            ("crc[5]", start + 5),
            ("crc[7]", start + 7),
            ("space", start + 8),
            ("payload[0]", start + 9),
            ("payload[mid]", (start + 9 + end) // 2),
            ("payload[-1]", end - 1),
            ("newline", end),
        ):
            out.append((f"record {n} {name}", pos))
    return out


def test_every_region_flip_and_truncation(template):
    original = (template / "journal" / "journal.log").read_bytes()
    regions = _regions(original)
    assert len(regions) >= 8 * 12
    cases = 0
    for _label, pos in regions:
        for xor in (0x01, 0x80, original[pos] ^ 0x0A if original[pos] != 0x0A else 0x20):
            damaged = bytearray(original)
            damaged[pos] ^= xor
            _check_in_process(template, original, bytes(damaged), flip=pos)
            cases += 1
        _check_in_process(template, original, original[:pos], cut=pos)
        cases += 1
    _check_in_process(template, original, original + b'0badc0de {"ts":1,"ops":[{"op":"enq"', cut=len(original) + 99)
    assert cases >= 400


@settings(
    max_examples=int(os.environ.get("KMPWM_FUZZ_EXAMPLES", "120")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_fuzzed_journal_damage(template, data):
    original = (template / "journal" / "journal.log").read_bytes()
    pos = data.draw(st.integers(0, len(original) - 1), label="offset")
    if data.draw(st.booleans(), label="truncate"):
        _check_in_process(template, original, original[:pos], cut=pos)
    else:
        damaged = bytearray(original)
        damaged[pos] = data.draw(st.integers(0, 255).filter(lambda b: b != original[pos]), label="byte")
        _check_in_process(template, original, bytes(damaged), flip=pos)


# -- end to end through the CLI ------------------------------------------------------------


def _cli_case(template: Path, damaged: bytes, tmp_path: Path) -> Home:
    home = Home(tmp_path / "home")
    shutil.rmtree(home.path)
    shutil.copytree(template, home.path)
    home.journal.write_bytes(damaged)
    return home


CLI_CASES = ["middle-payload", "middle-newline", "middle-crc", "header", "torn-last", "garbage-tail"]


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_reports_fails_closed_and_repairs(template, tmp_path, case):
    original = (template / "journal" / "journal.log").read_bytes()
    lines = _lines(original)
    where: dict
    if case == "middle-payload":
        s, e = lines[len(lines) // 2]
        pos = (s + e) // 2
        damaged = original[:pos] + bytes([original[pos] ^ 0x04]) + original[pos + 1 :]
        where = {"flip": pos}
    elif case == "middle-newline":
        pos = lines[3][1]
        damaged = original[:pos] + b" " + original[pos + 1 :]
        where = {"flip": pos}
    elif case == "middle-crc":
        pos = lines[-3][0] + 2
        damaged = original[:pos] + (b"0" if original[pos : pos + 1] != b"0" else b"1") + original[pos + 1 :]
        where = {"flip": pos}
    elif case == "header":
        damaged = b"X" + original[1:]
        where = {"flip": 0}
    elif case == "torn-last":
        pos = lines[-1][0] + (lines[-1][1] - lines[-1][0]) // 2
        damaged = original[:pos]
        where = {"cut": pos}
    else:
        damaged = original + b'deadbeef {"ts":1,"ops":[{"op":"cancel","all":tr'
        where = {"cut": len(original) + 99}
    count("corruptions")
    intact, expected, middle, torn = _expected(original, damaged, **where)
    home = _cli_case(template, damaged, tmp_path)

    view, rc, err = home.json("inspect-queue", "--all")
    assert rc == 0 and "Traceback" not in err, err
    from kmpwm.scheduling.views import effective_state  # a RUNNING task whose runner is gone shows ENQUEUED

    shown = {i: effective_state(t, time.time()) for i, t in expected["tasks"].items()}
    assert {t["id"]: t["state"] for t in view["tasks"]} == shown
    assert ("damaged" in err) == middle, err

    doc, rc, err = home.json("doctor")
    assert rc == (74 if middle else 0), (rc, err)
    assert bool(doc["journal"]["damage"]) == middle and "Traceback" not in err

    before = home.journal.read_bytes()
    doc, rc, err = home.json("run-due")
    if middle:
        assert rc == 74, (rc, err)
        assert doc == {"error": doc["error"], "exit_code": 74} and "doctor --repair" in err
        assert len(err.strip().splitlines()) <= 2 and "Traceback" not in err
        assert home.journal.read_bytes() == before, "run-due wrote to a damaged journal"
        assert not home.runlog.exists(), "run-due ran work although the journal is damaged"
    else:
        assert rc == 0, err

    doc, rc, err = home.json("doctor", "--repair")
    assert rc == 0 and doc["healthy"], (rc, err)
    doc, rc, err = home.json("doctor")
    assert rc == 0 and doc["healthy"] and not doc["journal"]["damage"] and not doc["journal"]["torn_tail"]
    qdir = home.journal_dir / "quarantine"
    if middle or torn:
        files = list(qdir.iterdir())
        assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
        assert stat.S_IMODE(qdir.stat().st_mode) == 0o700
    doc, rc, err = home.json("run-due")
    assert rc == 0, err
    state, _ = home.fold()
    if "g" in expected["tasks"]:
        assert state["tasks"]["g"]["state"] == "SUCCEEDED"
    for tid, _t in expected["tasks"].items():
        assert tid in state["tasks"], f"{tid} was dropped"


# -- the snapshot: a cache, damage to it changes nothing --------------------------------------


@pytest.fixture(scope="module")
def snap_template(template, tmp_path_factory) -> Path:
    """The template plus a snapshot covering most of the journal, and records after it."""
    from kmpwm import Scheduler
    from kmpwm.core import triggers
    from kmpwm.storage.paths import resolve
    from kmpwm.storage.store import Store

    root = tmp_path_factory.mktemp("snapshot")
    os.chmod(root, 0o700)
    home = root / "home"
    shutil.copytree(template, home)
    store = Store(resolve(str(home)))
    store.write_snapshot(store.load())
    s = Scheduler(home=str(home))
    s.enqueue("after-snap-1", triggers.OneTime(3600), "cw")
    s.enqueue("after-snap-2", None, "cw")
    s.cancel("b")
    return home


def _snapshot_regions(blob: bytes) -> list[tuple[str, int]]:
    nl = blob.index(b"\n")
    out = [(f"magic[{i}]", i) for i in range(0, 11)]
    out += [(f"meta[{i - 11}]={chr(blob[i])!r}", i) for i in range(11, nl)]  # every byte of the meta line
    out.append(("meta newline", nl))
    body = len(blob) - nl - 1
    out += [(f"body[{f}]", nl + 1 + int(body * f)) for f in (0, 0.1, 0.25, 0.5, 0.75, 0.99)]
    out.append(("body[-1]", len(blob) - 1))
    return out


def _check_snapshot_case(snap_template: Path, blob: bytes, label: str, name: str = "state.snap") -> list[str]:
    from kmpwm.storage.paths import resolve
    from kmpwm.storage.store import Store

    count("corruptions")
    problems = []
    root = Path(tempfile.mkdtemp(prefix="kmpwm-snap-"))
    os.chmod(root, 0o700)
    home = root / "home"
    shutil.copytree(snap_template, home)
    (home / "journal" / name).write_bytes(blob)
    try:
        paths = resolve(str(home))
        expected, _ = fold_bytes((home / "journal" / "journal.log").read_bytes())
        store = Store(paths)
        view = store.load()
        if _states(view.state) != _states(expected):
            diff = {
                k
                for k in set(view.state["tasks"]) | set(expected["tasks"])
                if _states(view.state).get(k) != _states(expected).get(k)
            }
            problems.append(f"{label}: the view differs from the journal for {sorted(diff)}")
        store.verify_covered(view)  # what run-due checks before it runs anything
        if view.damage:
            problems.append(
                f"{label}: a damaged snapshot makes the healthy journal look damaged "
                f"({view.damage[0].describe()}): run-due would refuse to run"
            )
    except Exception as exc:  # noqa: BLE001 - any exception here is a finding
        problems.append(f"{label}: {type(exc).__name__}: {exc}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return problems


def test_snapshot_damage_changes_nothing(snap_template):
    blob = (snap_template / "journal" / "state.snap").read_bytes()
    problems = []
    for label, pos in _snapshot_regions(blob):
        for xor in (0x01, 0x10):
            damaged = bytearray(blob)
            damaged[pos] ^= xor
            problems += _check_snapshot_case(snap_template, bytes(damaged), f"flip {label} ^{xor:#x}")
        problems += _check_snapshot_case(snap_template, blob[:pos], f"truncate at {label}")
    problems += _check_snapshot_case(snap_template, b"", "empty snapshot")
    assert not problems, f"{len(problems)} damaged snapshot(s) changed what users see:\n" + "\n".join(problems[:25])


@settings(
    max_examples=int(os.environ.get("KMPWM_FUZZ_EXAMPLES", "80")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_fuzzed_snapshot_damage(snap_template, data):
    blob = (snap_template / "journal" / "state.snap").read_bytes()
    pos = data.draw(st.integers(0, len(blob) - 1), label="offset")
    if data.draw(st.booleans(), label="truncate"):
        damaged = blob[:pos]
    else:
        damaged = bytearray(blob)
        damaged[pos] = data.draw(st.integers(0, 255).filter(lambda b: b != blob[pos]), label="byte")
    problems = _check_snapshot_case(snap_template, bytes(damaged), f"offset {pos}")
    assert not problems, problems


def test_damaged_snapshot_offset_does_not_stop_run_due(snap_template, tmp_path):
    """End to end: one flipped digit in the snapshot's offset.  The journal is healthy (doctor
    says so); run-due must run, or at least doctor --repair must restore service."""
    home = Home(tmp_path / "home")
    shutil.rmtree(home.path)
    shutil.copytree(snap_template, home.path)
    blob = bytearray(home.snapshot.read_bytes())
    i = blob.index(b'"offset":') + len(b'"offset":') + 1
    blob[i] = ord("1") if blob[i] != ord("1") else ord("2")
    home.snapshot.write_bytes(bytes(blob))
    doc, rc, err = home.json("doctor")
    assert rc == 0 and doc["healthy"], "doctor: the journal itself is healthy"
    doc, rc, err = home.json("run-due")
    if rc == 74:
        rdoc, rrc, rerr = home.json("doctor", "--repair")
        doc, rc2, err2 = home.json("run-due")
        assert rc2 == 0, (
            f"run-due refuses (exit 74: {err.strip()}) because of a damaged snapshot, doctor says "
            f"the journal is healthy and doctor --repair (exit {rrc}) does not help: run-due still "
            f"exits {rc2}: {err2.strip()}"
        )
    else:
        assert rc == 0, err
    state, _ = home.fold()
    assert state["tasks"]["after-snap-2"]["state"] == "SUCCEEDED"


def test_damage_covered_by_the_snapshot_still_fails_closed(snap_template, tmp_path):
    """A record the snapshot already covers is damaged: read-only commands may serve the snapshot,
    but run-due checks the covered region and refuses until doctor --repair, which keeps every
    valid record."""
    home = Home(tmp_path / "home")
    shutil.rmtree(home.path)
    shutil.copytree(snap_template, home.path)
    original = home.journal.read_bytes()
    s, e = _lines(original)[2]
    pos = (s + e) // 2
    damaged = original[:pos] + bytes([original[pos] ^ 0x02]) + original[pos + 1 :]
    home.journal.write_bytes(damaged)
    intact, _, middle, _ = _expected(original, damaged, flip=pos)
    expected, _ = fold_bytes(b"".join(intact))  # after the repair: the one flipped bit is mended too
    assert middle
    view, rc, err = home.json("inspect-queue", "--all")
    assert rc == 0, err
    doc, rc, err = home.json("run-due")
    assert rc == 74 and "doctor --repair" in err, (rc, err)
    assert not home.runlog.exists()
    doc, rc, err = home.json("doctor")
    assert rc == 74
    doc, rc, err = home.json("doctor", "--repair")
    assert rc == 0, err
    view, rc, err = home.json("inspect-queue", "--all")
    assert {t["id"]: t["state"] for t in view["tasks"]} == {i: t["state"] for i, t in expected["tasks"].items()}
    doc, rc, err = home.json("run-due")
    assert rc == 0, err


def test_history_damage_changes_nothing(snap_template):
    """journal/history.snap (finished work, read by inspect-queue --all, explain...) flipped or
    cut anywhere: every reader still sees exactly the journal's state."""
    blob = (snap_template / "journal" / "history.snap").read_bytes()
    assert len(blob) > 200, "the template's history should hold finished tasks"
    problems = []
    for f in (0, 0.02, 0.1, 0.3, 0.5, 0.7, 0.9, 0.999):
        pos = min(len(blob) - 1, int(len(blob) * f))
        for xor in (0x01, 0x20):
            damaged = bytearray(blob)
            damaged[pos] ^= xor
            problems += _check_snapshot_case(
                snap_template, bytes(damaged), f"history flip {pos} ^{xor:#x}", "history.snap"
            )
        problems += _check_snapshot_case(snap_template, blob[:pos], f"history cut at {pos}", "history.snap")
    problems += _check_snapshot_case(
        snap_template, blob + b"00000000 {}\n", "history with a frame no snapshot names", "history.snap"
    )
    assert not problems, "\n".join(problems[:25])
