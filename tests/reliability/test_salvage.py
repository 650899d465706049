"""A success recorded in the journal is never forgotten because another record was damaged, and
``doctor --repair`` keeps every checksum-valid record wherever its line boundaries went (issue 13,
item 3; SPEC section 2).

The sweep damages every byte of a small journal made through the command line (tasks, a retry,
a chain with a parallel step, two run-due passes) and checks the readers, the repair and the fold
after each (tests/reliability/flipsweep.py); the long tier (``scripts/torture.py --flips``) flips every bit.
End to end through the CLI: the flipped newline after a claim record (two records glued into one
line), a destroyed claim record, a destroyed RETRY result, a destroyed chain step's result, a
flipped last newline under a writer.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import flipsweep
import pytest
from crashlib import Home, count, fold_bytes, parse_log

from kmpwm.core.state import apply, new_state


def _scratch(prefix: str) -> Path:
    """A private directory on tmpfs when there is one: a repair fsyncs, thousands of times here."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    os.chmod(root, 0o700)
    return root


@pytest.fixture(scope="module")
def built():
    root = _scratch("kmpwm-salvage-")
    try:
        home = flipsweep.build(root / "template")
        yield home, flipsweep.template(home)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_every_byte_damaged_then_repaired_loses_no_success(built):
    """At every byte: one flipped bit (restored exactly), and the byte destroyed (8 bits, beyond
    mending); one trial in eight repairs a real home through doctor.repair."""
    home, tpl = built
    root = _scratch("kmpwm-salvage-case-")
    try:
        case = root / "case"
        shutil.copytree(home.path, case)
        report = flipsweep.sweep(tpl, bits="one", case=case, real_every=8, seed=len(tpl.data))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    count("corruptions", report.trials)
    assert report.trials == 2 * len(tpl.data) and report.checks > 10 * report.trials
    assert not report.violations, (
        f"{len(report.violations)} violated of {report.checks} checks in "
        f"{report.trials} trials:\n" + "\n".join(report.violations[:30])
    )
    # every single-bit flip restores the journal exactly; a destroyed byte on a newline does too
    assert report.restored >= len(tpl.data)


# -- end to end through the CLI ------------------------------------------------------------


def _case(built, tmp_path) -> tuple[Home, flipsweep.Template]:
    home, tpl = built
    case = Home(tmp_path / "case")
    shutil.rmtree(case.path)
    shutil.copytree(home.path, case.path)
    case.journal.write_bytes(tpl.data)
    return case, tpl


def _record(tpl: flipsweep.Template, want) -> int:
    return next(n for n, r in enumerate(tpl.records) if want(r["ops"]))


def _states(home: Home) -> dict[str, str]:
    doc, rc, err = home.json("inspect-queue", "--all")
    assert rc == 0 and "Traceback" not in err, err
    return {t["id"]: t["state"] for t in doc["tasks"]}


def _repair_then_run(home: Home, tpl: flipsweep.Template, excused: set[str]) -> dict:
    """run-due refuses, doctor --repair heals, and run-due then runs no task that had succeeded."""
    before = home.journal.read_bytes()
    doc, rc, err = home.json("run-due")
    assert rc == 74 and "doctor --repair" in err, (rc, err)
    assert home.journal.read_bytes() == before and not home.runlog.exists()
    doc, rc, err = home.json("doctor")
    assert rc == 74 and doc["journal"]["damage"], (rc, err)
    repaired, rc, err = home.json("doctor", "--repair")
    assert rc == 0 and repaired["healthy"] and "Traceback" not in err, (rc, err)
    doc, rc, err = home.json("doctor")
    assert rc == 0 and doc["healthy"], (rc, err)
    states = _states(home)
    for tid in tpl.succeeded - excused:
        assert states.get(tid) == "SUCCEEDED", f"{tid} had SUCCEEDED; after the repair it is {states.get(tid)}"
    doc, rc, err = home.json("run-due", "--parallel", "2")
    assert rc == 0, err
    starts, _ = parse_log(home.runlog)
    again = sorted({s.id for s in starts} & (tpl.succeeded - excused))
    assert not again, f"run-due ran again what had succeeded: {again}"
    assert "now" in {s.id for s in starts}, "the task due now runs once the journal is repaired"
    return repaired["repaired"]


def test_flipped_newline_after_a_claim_keeps_both_records(built, tmp_path):
    """The issue's case: one bit of the newline after a claim record.  Readers show both glued
    records, run-due refuses, repair keeps both and quarantines the one byte."""
    home, tpl = _case(built, tmp_path)
    n = _record(tpl, lambda ops: any(o["op"] == "claim" for o in ops) and not any(o["op"] == "result" for o in ops))
    assert any(o["op"] == "result" for o in tpl.records[n + 1]["ops"]) or n + 1 < len(tpl.records)
    nl = tpl.lines[n][1]
    data = bytearray(tpl.data)
    data[nl] ^= 0x01  # "\n" -> "\x0b": the claim and the next record are one line now
    home.journal.write_bytes(bytes(data))
    count("corruptions")

    doc, rc, err = home.json("inspect-queue", "--all")
    assert rc == 0 and "damaged" in err, (rc, err)
    assert {t["id"] for t in doc["tasks"] if t["state"] == "SUCCEEDED"} == tpl.succeeded
    repaired = _repair_then_run(home, tpl, excused=set())
    assert repaired["salvaged"] == 2 and repaired["corrected"] == []
    assert [q["length"] for q in repaired["quarantined"]] == [1], repaired
    quarantined = [p for p in (home.journal_dir / "quarantine").glob("*.bin")]
    assert [p.read_bytes() for p in quarantined] == [b"\x0b"]
    kept = flipsweep._no_hdr(r for _, r in fold_bytes(home.journal.read_bytes())[1].records)
    assert kept[: len(tpl.records) - 1] == flipsweep._no_hdr(tpl.records), "every original record is kept, in order"


def _destroy(tpl: flipsweep.Template, n: int) -> bytes:
    """Record ``n`` beyond mending: two bytes in the middle of its payload, 8 bits each."""
    s, e = tpl.lines[n]
    mid = (s + 9 + e) // 2
    data = bytearray(tpl.data)
    data[mid] ^= 0xFF
    data[mid + 1] ^= 0xFF
    return bytes(data)


DESTROYED = {
    # the claim of r's second (successful) run: its result must still count
    "claim": lambda ops: (
        any(o["op"] == "claim" and o["id"] == "r" for o in ops)
        and not any(o["op"] == "result" for o in ops)
        and ops[0].get("op") == "claim"
        and [o["id"] for o in ops if o["op"] == "claim"] == ["r"]
    ),
    # r's RETRY: its second claim and successful result must not be taken for stale
    "retry-result": lambda ops: any(o["op"] == "result" and o["id"] == "r" and o["status"] == "RETRY" for o in ops),
    # the first chain step's success: the later steps ran, so it had succeeded
    "first-step-result": lambda ops: any(o["op"] == "result" and o["id"] == "ch/1/cw" for o in ops),
    # the claims of the parallel step
    "parallel-claims": lambda ops: any(o["op"] == "claim" and o["id"] == "ch/2/pw" for o in ops),
}


@pytest.mark.parametrize("what", list(DESTROYED))
def test_destroyed_record_forgets_no_other_success(built, tmp_path, what):
    """A record damaged beyond mending: only what it alone recorded may be lost; every success
    recorded in another record stays, and run-due after the repair runs none of them again."""
    home, tpl = _case(built, tmp_path)
    n = _record(tpl, DESTROYED[what])
    home.journal.write_bytes(_destroy(tpl, n))
    count("corruptions")
    excused = tpl.excused[n]
    # what the test is about may not be lost (the record may hold another task's success too:
    # run-due writes the results that finished together in one record)
    assert (
        not excused
        & {
            "claim": {"r"},
            "retry-result": {"r"},
            "parallel-claims": {"ch/2/cw", "ch/2/pw"},
            "first-step-result": {"ch/1/cw"},
        }[what]
    ), excused
    repaired = _repair_then_run(home, tpl, excused)
    assert repaired["salvaged"] == 0 and repaired["corrected"] == []


def test_flipped_last_newline_is_not_cut_by_the_next_writer(built, tmp_path):
    """The last record's newline flipped: not a torn write (bytes follow a valid record), so the
    next enqueue keeps that record instead of cutting it away, and repair keeps it."""
    home, tpl = _case(built, tmp_path)
    data = bytearray(tpl.data)
    data[-1] ^= 0x40  # "\n" -> "J"
    home.journal.write_bytes(bytes(data))
    last = tpl.records[-1]["ops"][0]["task"]["id"]
    assert last in _states(home)
    doc, rc, err = home.json("enqueue", "z", "cw", "--delay", "1h")
    assert rc == 0, err
    states = _states(home)
    assert last in states and "z" in states
    doc, rc, err = home.json("doctor", "--repair")
    assert rc == 0 and doc["healthy"], err
    _, scan = fold_bytes(home.journal.read_bytes())
    kept = flipsweep._no_hdr(r for _, r in scan.records)
    assert kept[:-1] == flipsweep._no_hdr(tpl.records) and kept[-1]["ops"][0]["task"]["id"] == "z"
    assert [p.read_bytes() for p in (home.journal_dir / "quarantine").glob("*.bin")] == [b"J"]


# -- the fold ------------------------------------------------------------------------------


def _fold(*records) -> dict:
    state = new_state()
    for ts, ops in records:
        apply(state, {"ts": ts, "ops": ops})
    return state


ENQ = (
    1.0,
    [
        {
            "op": "enq",
            "task": {"id": "t", "worker": "w", "trigger": {"type": "one_time", "delay": 0.0}, "created_at": 1.0},
        }
    ],
)
ENQ_OTHER = (
    0.5,
    [
        {
            "op": "enq",
            "task": {"id": "o", "worker": "w", "trigger": {"type": "one_time", "delay": 0.0}, "created_at": 0.5},
        }
    ],
)


def _claim(ts, runner, **kw):
    return ts, [
        {"op": "claim", "id": "t", "seq": kw.pop("seq", 1), "born": 1.0, "runner": runner, "until": ts + 60, **kw}
    ]


def _result(ts, runner, status, claimed, **kw):
    return ts, [
        {
            "op": "result",
            "id": "t",
            "seq": kw.pop("seq", 1),
            "born": 1.0,
            "runner": runner,
            "status": status,
            "claimed": claimed,
            **kw,
        }
    ]


def test_fold_applies_a_result_whose_claim_was_lost():
    state = _fold(ENQ, _result(3.0, "R1", "SUCCESS", claimed=2.0))  # the claim at 2.0 is gone
    assert state["tasks"]["t"]["state"] == "SUCCEEDED"


def test_fold_applies_a_result_after_a_lost_retry():
    """claim R1, (RETRY result lost), claim R2 refused (R1's lease looks held), R2's SUCCESS."""
    state = _fold(ENQ, _claim(2.0, "R1"), _claim(5.0, "R2"), _result(6.0, "R2", "SUCCESS", claimed=5.0))
    assert state["tasks"]["t"]["state"] == "SUCCEEDED"


def test_fold_still_ignores_a_stale_result():
    """R1's lease was broken and R2 took over: R1's late result (an older claim) is stale."""
    state = _fold(ENQ, _claim(2.0, "R1"), _claim(90.0, "R2", broken=True), _result(95.0, "R1", "FAILURE", claimed=2.0))
    t = state["tasks"]["t"]
    assert t["state"] == "RUNNING" and t["lease"]["runner"] == "R2"
    state = _fold(
        ENQ,
        _claim(2.0, "R1"),
        _claim(90.0, "R2", broken=True),
        _result(92.0, "R2", "RETRY", claimed=90.0),
        _result(95.0, "R1", "SUCCESS", claimed=2.0),
    )
    assert state["tasks"]["t"]["state"] == "ENQUEUED", "a result of a claim older than the last one seen is stale"


def test_fold_names_a_task_by_its_birth_when_an_earlier_record_is_lost():
    """Task numbers (seq) count the tasks the fold made: without the record that made ``o``, ``t``
    is task 1, not 2; its claim and result (seq 2) still name it by ``born``."""
    state = _fold(ENQ, _claim(2.0, "R1", seq=2), _result(3.0, "R1", "SUCCESS", claimed=2.0, seq=2))
    assert state["tasks"]["t"]["state"] == "SUCCEEDED"
    whole = _fold(ENQ_OTHER, ENQ, _claim(2.0, "R1", seq=2), _result(3.0, "R1", "SUCCESS", claimed=2.0, seq=2))
    assert whole["tasks"]["t"]["state"] == "SUCCEEDED"


def test_repair_mends_several_errors_in_one_damaged_region():
    """One region: a newline flipped (two records glued), a bit flipped in each of the two records
    after it, and a byte flipped into a newline in a fourth.  Every record comes back, in order."""
    from kmpwm.storage.journal import encode, mend, scan_bytes

    records = [{"ts": float(i), "ops": [{"op": "enq", "task": {"id": f"J{i}*", "worker": "w"}}]} for i in range(6)]
    lines = [bytearray(encode(r)) for r in records]
    lines[1][-1] ^= 0x01  # newline -> \x0b: records 1 and 2 glued
    lines[2][40] ^= 0x10  # a payload bit of record 2
    lines[3][3] ^= 0x04  # a checksum digit of record 3
    j = lines[4].index(b"J")
    lines[4][j] ^= 0x40  # "J" -> newline: record 4 split in two lines
    data = b"".join(bytes(x) for x in lines)
    scan = scan_bytes(data)
    assert [r for _, r in scan.records] == [records[0], records[1], records[5]] and len(scan.damage) == 1
    fixed = mend(data)
    assert fixed.records == records
    assert fixed.salvaged == 1 and len(fixed.corrected) == 3
