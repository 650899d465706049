"""The journal end to end (SPEC section 2): torn tails, damage in the middle, repair, the
snapshot cache, symlinks, compaction."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import pytest
from helpers import kjson, kmpwm, tasks_by_id

from kmpwm.storage import store as store_mod
from kmpwm.storage.journal import decode


def journal(home: Path) -> Path:
    return home / "journal" / "journal.log"


def quarantined(home: Path) -> list[Path]:
    q = home / "journal" / "quarantine"
    return sorted(p for p in q.iterdir() if p.is_file()) if q.is_dir() else []


def ids(*args) -> list[str]:
    doc, rc = kjson("inspect-queue", *args)
    assert rc == 0, doc
    return [t["id"] for t in doc["tasks"]]


def enqueue_each(*task_ids: str, delay: str = "1h") -> None:
    """One journal record per task (each its own enqueue command)."""
    for tid in task_ids:
        kmpwm("enqueue", tid, "echo", "--delay", delay, check=0)


def assert_all_records_valid(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    records = [decode(line) for line in data.split(b"\n")[:-1]]
    assert all(r is not None for r in records)
    return records


def assert_private_modes(home: Path) -> None:
    """SPEC 1: directories 0700, files 0600, whatever kmpwm wrote (quarantine, snapshot, manifest)."""
    import stat

    for root, dirs, files in os.walk(home):
        for d in dirs:
            assert stat.S_IMODE((Path(root) / d).stat().st_mode) == 0o700, Path(root) / d
        for f in files:
            assert stat.S_IMODE((Path(root) / f).stat().st_mode) == 0o600, Path(root) / f


# -- torn tail ------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate-half", "garbage-no-newline"])
def test_torn_tail_is_ignored_then_repaired(home, damage):
    enqueue_each("a", "b")
    path = journal(home)
    data = path.read_bytes()
    lines = data.split(b"\n")[:-1]
    if damage == "truncate-half":
        last = lines[-1] + b"\n"
        keep = len(data) - len(last)
        torn = last[: len(last) // 2]
        path.write_bytes(data[:keep] + torn)
        visible_before = ["a"]
    else:
        torn = b'0badc0de {"ts":1,"ops":[{"op":"enq","task":'
        path.write_bytes(data + torn)
        visible_before = ["a", "b"]

    proc = kmpwm("inspect-queue", "--json", check=0)
    assert [t["id"] for t in json.loads(proc.stdout)["tasks"]] == visible_before

    kmpwm("enqueue", "c", "echo", "--delay", "1h", check=0)
    records = assert_all_records_valid(path)
    assert ids() == visible_before + ["c"]
    assert len(records) == len(visible_before) + 2  # header + tasks
    saved = b"".join(p.read_bytes() for p in quarantined(home))
    assert torn in saved, "the torn bytes are kept in journal/quarantine/"
    # a torn tail is not damage
    doc, rc = kjson("doctor")
    assert rc == 0 and doc["healthy"] is True


def test_torn_tail_does_not_stop_run_due(home):
    enqueue_each("a", delay="0s")
    with open(journal(home), "ab") as fh:
        fh.write(b'12345678 {"ts":')
    run, rc = kjson("run-due")
    assert rc == 0 and [r["id"] for r in run["ran"]] == ["a"]
    assert_all_records_valid(journal(home))


# -- damage in the middle -------------------------------------------------------------------


def _flip_byte_in_record(path: Path, index: int) -> bytes:
    """Change one byte inside the payload of record ``index`` (0 = header); returns the old line."""
    data = bytearray(path.read_bytes())
    lines = bytes(data).split(b"\n")
    start = sum(len(line) + 1 for line in lines[:index])
    line = lines[index]
    pos = start + line.index(b'"id":"') + len(b'"id":"')  # the first letter of the task id
    data[pos] = ord("Z") if data[pos] != ord("Z") else ord("Y")
    path.write_bytes(bytes(data))
    return line


def test_corrupt_middle_record_read_only_commands_show_the_rest(home):
    enqueue_each("a", "b", "c")
    path = journal(home)
    _flip_byte_in_record(path, 2)  # header, a, b, c: damage b

    proc = kmpwm("inspect-queue", "--json", check=0)
    assert [t["id"] for t in json.loads(proc.stdout)["tasks"]] == ["a", "c"]
    assert "warning" in proc.stderr.lower()
    proc = kmpwm("inspect-queue")
    assert proc.returncode == 0 and "warning" in proc.stderr.lower()
    assert "c" in proc.stdout

    proc = kmpwm("run-due")
    assert proc.returncode == 74
    assert "kmpwm doctor --repair" in proc.stderr
    doc, rc = kjson("run-due")
    assert rc == 74 and doc["exit_code"] == 74 and doc["error"]

    doc, rc = kjson("doctor")
    assert rc == 74 and doc["healthy"] is False
    assert kmpwm("doctor").returncode == 74

    # whether or not writers may append meanwhile (SPEC is silent), nothing valid is lost
    proc = kmpwm("enqueue", "d", "echo", "--delay", "1h")
    assert proc.returncode in (0, 74), proc.stderr
    expected = ["a", "c", "d"] if proc.returncode == 0 else ["a", "c"]
    assert ids() == expected

    assert quarantined(home) == []
    doc, rc = kjson("doctor", "--repair")
    assert rc == 0, doc
    assert quarantined(home), "the damaged bytes are moved to journal/quarantine/"
    assert_private_modes(home)
    assert kmpwm("doctor").returncode == 0
    assert_all_records_valid(path)
    assert ids() == expected
    proc = kmpwm("inspect-queue")
    assert "warning" not in proc.stderr.lower()

    run, rc = kjson("run-due")
    assert rc == 0 and run["ran"] == []  # everything is delayed
    assert ids() == expected


def test_repair_keeps_every_valid_record_and_run_due_works_after(home):
    enqueue_each("a", "b", delay="0s")
    enqueue_each("c", "d")
    _flip_byte_in_record(journal(home), 3)  # damage c
    assert kmpwm("run-due").returncode == 74
    assert ids("--all") == ["a", "b", "d"]  # run-due ran nothing: all still ENQUEUED
    kmpwm("doctor", "--repair", check=0)
    run, rc = kjson("run-due")
    assert rc == 0 and sorted(r["id"] for r in run["ran"]) == ["a", "b"]
    tasks = tasks_by_id(kjson("inspect-queue", "--all")[0])
    assert tasks["a"]["state"] == tasks["b"]["state"] == "SUCCEEDED"
    assert tasks["d"]["state"] == "ENQUEUED"


# -- the snapshot is only a cache -----------------------------------------------------------


def test_deleting_or_damaging_the_snapshot_changes_nothing_visible(tmp_path, home):
    n = 2100
    # enough bytes in one batch that the next reader writes a snapshot
    pad = "x" * (math.ceil(store_mod.SNAPSHOT_AFTER_BYTES / n) + 64)
    batch = tmp_path / "batch.jsonl"
    with open(batch, "w") as fh:
        for i in range(n):
            fh.write(
                json.dumps(
                    {"id": f"t{i}", "worker": "echo", "delay": "1h", "input": pad, "tags": ["odd" if i % 2 else "even"]}
                )
                + "\n"
            )
    doc, rc = kjson("enqueue", "--from", batch)
    assert rc == 0 and len(doc["results"]) == n
    kmpwm("enqueue", "single-1", "echo", "--delay", "1h", check=0)
    kmpwm("cancel", "t5", "t7", check=0)
    kmpwm("enqueue", "t5", "sleep", "--delay", "2h", check=0)  # re-uses a finished id
    kmpwm("enqueue", "t9", "echo", "--policy", "append", check=0)
    snap = home / "journal" / "state.snap"
    assert snap.exists(), "a snapshot was written once the tail grew past the threshold"

    def visible():
        proc = kmpwm("inspect-queue", "--all", "--json", check=0)
        return json.loads(proc.stdout), proc.stderr

    from kmpwm.storage.paths import resolve

    view = store_mod.Store(resolve(str(home))).load()
    assert view.from_snapshot, "the snapshot is used (and records after it are replayed)"
    with_snapshot, err = visible()
    assert len(with_snapshot["tasks"]) == n + 2
    os.unlink(snap)
    without_snapshot, err2 = visible()
    assert without_snapshot == with_snapshot
    assert err2 == err
    # a damaged snapshot is ignored just the same
    snap.write_bytes(b'KMPWMSNAP1 {"gen": "nope"}\nnot json at all')
    damaged_snapshot, _ = visible()
    assert damaged_snapshot == with_snapshot


def test_store_snapshot_plus_tail_equals_full_fold(home):
    """A stale snapshot plus the records after it gives the same state as the whole journal."""
    from kmpwm.core.state import apply, new_state
    from kmpwm.storage.paths import resolve
    from kmpwm.storage.store import Store

    enqueue_each("a", "b")
    store = Store(resolve(str(home)))
    view = store.load()
    store.write_snapshot(view)
    enqueue_each("c")
    kmpwm("cancel", "a", check=0)
    fresh = Store(resolve(str(home))).load()
    assert fresh.from_snapshot
    full = new_state()
    for line in journal(home).read_bytes().splitlines():
        apply(full, decode(line))
    assert fresh.state == full
    assert sorted(full["tasks"]) == ["a", "b", "c"]
    assert full["tasks"]["a"]["state"] == "CANCELLED"


# -- symlinks -------------------------------------------------------------------------------


def test_symlinked_journal_is_not_followed(tmp_path, home):
    target = tmp_path / "precious.txt"
    target.write_bytes(b"do not touch\n")
    jdir = home / "journal"
    jdir.mkdir(mode=0o700)
    os.chmod(jdir, 0o700)
    (jdir / "journal.log").symlink_to(target)
    proc = kmpwm("enqueue", "a", "echo")
    assert target.read_bytes() == b"do not touch\n"
    if proc.returncode == 0:  # replacing the link by a real file would be acceptable too
        assert not (jdir / "journal.log").is_symlink()
    else:
        assert proc.stderr.strip()
    kmpwm("inspect-queue")  # no traceback either way
    kmpwm("doctor", "--repair")
    assert target.read_bytes() == b"do not touch\n"


def test_symlinked_snapshot_is_not_followed(tmp_path, home):
    target = tmp_path / "precious.txt"
    target.write_bytes(b"do not touch\n")
    enqueue_each("a")
    (home / "journal" / "state.snap").symlink_to(target)
    kmpwm("compact", check=0)  # writes a fresh snapshot
    kmpwm("enqueue", "b", "echo", "--delay", "1h", check=0)
    assert target.read_bytes() == b"do not touch\n"
    assert ids() == ["a", "b"]


# -- the writers' lock -----------------------------------------------------------------------


def test_lock_busy_exits_75_and_readers_need_no_lock(home):
    import portalocker

    enqueue_each("a")
    with open(home / "journal" / "lock", "r+b") as fh:
        portalocker.lock(fh, portalocker.LockFlags.EXCLUSIVE)
        try:
            start = time.monotonic()
            proc = kmpwm("enqueue", "b", "echo", env={"KMPWM_LOCK_TIMEOUT": "0.5"})
            waited = time.monotonic() - start
            assert proc.returncode == 75, proc.stderr
            assert proc.stderr.strip() and waited < 8
            assert ids() == ["a"]  # a reader never needs the lock
        finally:
            portalocker.unlock(fh)
    kmpwm("enqueue", "b", "echo", "--delay", "1h", check=0)
    assert ids() == ["a", "b"]


# -- compaction -----------------------------------------------------------------------------


def test_compact_keeps_live_tasks_and_history(home):
    lines = [
        {"id": "done", "worker": "echo"},
        {"id": "bad", "worker": "fail", "max_attempts": 1},
        {"id": "later", "worker": "echo", "delay": "1h", "tags": ["x"]},
        {"id": "later", "worker": "echo", "policy": "append"},
        {"id": "periodic", "worker": "echo", "every": "1h"},
        {"id": "gone", "worker": "echo", "delay": "1h"},
    ]
    kmpwm("enqueue", "--from", "-", input="\n".join(json.dumps(x) for x in lines), check=0)
    chain = {"id": "ch", "steps": [[{"worker": "echo"}], [{"worker": "echo", "delay": "1h"}], [{"worker": "echo"}]]}
    kmpwm("chain", "--file", "-", input=json.dumps(chain), check=0)
    kmpwm("run-due", check=0)
    kmpwm("cancel", "gone", check=0)

    before_q, _ = kjson("inspect-queue", "--all", check=0)
    before_ev, _ = kjson("events", check=0)
    doc, rc = kjson("compact")
    assert rc == 0, doc
    after_q, _ = kjson("inspect-queue", "--all", check=0)
    after_ev, _ = kjson("events", check=0)
    assert after_q == before_q
    assert after_ev["events"] == before_ev["events"]
    kinds = {(e["task"], e["event"]) for e in after_ev["events"]}
    assert ("done", "ran") in kinds and ("gone", "cancelled") in kinds
    tasks = tasks_by_id(after_q)
    assert tasks["done"]["state"] == "SUCCEEDED" and tasks["bad"]["state"] == "FAILED"
    assert tasks["later#2"]["state"] == "BLOCKED" and tasks["ch/2/echo"]["state"] == "ENQUEUED"
    assert_all_records_valid(journal(home))
    assert kmpwm("doctor").returncode == 0
    assert_private_modes(home)

    # the compacted journal still works: ids, appends and chains continue
    doc, _ = kjson("enqueue", "later", "echo", "--policy", "append", check=0)
    assert doc["id"] == "later#3"
    doc, _ = kjson("cancel", "ch", check=0)
    assert sorted(doc["cancelled"]) == ["ch/2/echo", "ch/3/echo"]


# -- reading in chunks ---------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lines=st.lists(st.sampled_from(["ok", "bad", "long"]), max_size=12),
    tail=st.sampled_from([b"", b'0badc0de {"ts"', b"x"]),
    chunk=st.sampled_from([1, 2, 7, 40, 1 << 20]),
    start_at=st.integers(0, 3),
)
def test_reading_in_chunks_equals_reading_at_once(tmp_path, lines, tail, chunk, start_at):
    """A huge journal is folded chunk by chunk (Journal.read_parts): records, damaged regions
    (even one split between two chunks), the torn tail and the end must be exactly what one
    read of the whole file finds."""
    from kmpwm.storage.journal import Journal, encode, scan_bytes
    from kmpwm.storage.paths import resolve

    home = tmp_path / f"h{chunk}-{len(lines)}-{start_at}"
    (home / "journal").mkdir(parents=True, mode=0o700, exist_ok=True)
    blob = b""
    boundaries = [0]
    for n, kind in enumerate(lines):
        if kind == "bad":
            blob += b'deadbeef {"ts": 1, "ops": []}\n'
        else:
            blob += encode({"ts": n, "ops": [{"op": "x", "pad": "y" * (300 if kind == "long" else 3)}]})
        boundaries.append(len(blob))
    blob += tail
    start = boundaries[min(start_at, len(boundaries) - 1)]
    j = Journal(resolve(str(home)))
    j.path.write_bytes(blob)
    expect = scan_bytes(blob[start:], start)
    ino, parts = j.read_parts(start, chunk=chunk)
    records, damage, torn, end = [], [], None, start
    from kmpwm.storage.journal import _add_damage

    for part in parts:
        records += part.records
        _add_damage(damage, part.damage)
        torn, end = part.torn, part.end
    assert ino and records == expect.records and damage == expect.damage
    assert torn == expect.torn and end == expect.end
    whole, _ = j.read(start)
    assert (whole.records, whole.damage, whole.torn, whole.end) == (
        expect.records,
        expect.damage,
        expect.torn,
        expect.end,
    )
