"""Faults: disk full (ENOSPC), I/O errors and a read-only journal during append, compaction,
the snapshot write, torn-tail repair and doctor --repair.  The command fails with exit 74 and a
clear message (never a traceback), and the journal is intact afterwards: every earlier task still
readable, no partial record, doctor healthy.

Two ways in: (1) injected — the real CLI runs in a subprocess through a small wrapper that makes
``os.write`` / ``fsync`` fail with a chosen errno on files whose name matches a pattern, after a
number of successful writes; (2) real — a small tmpfs mounted as KMPWM_HOME (root only; skipped
with the reason where the machine does not allow it), filled up, or remounted read-only.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from crashlib import Home, fold_bytes

WRAPPER = r"""
import errno, os, re, sys
pattern = re.compile(os.environ["FAULT_NAME_RE"])
after = int(os.environ.get("FAULT_AFTER", "0"))
code = getattr(errno, os.environ.get("FAULT_ERRNO", "ENOSPC"))
op = os.environ.get("FAULT_OP", "write")
partial = os.environ.get("FAULT_PARTIAL") == "1"
seen = [0]
real_write, real_fsync = os.write, os.fsync
real_fdatasync = getattr(os, "fdatasync", None)

def matches(fd):
    try:
        return bool(pattern.search(os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
    except OSError:
        return False

def due(fd):
    if not matches(fd):
        return False
    seen[0] += 1
    return seen[0] > after

def write(fd, data):
    if op == "write" and due(fd):
        if partial and len(data) > 1:
            real_write(fd, bytes(data)[: len(data) // 2])
        raise OSError(code, os.strerror(code))
    return real_write(fd, data)

def fsync(fd):
    if op == "fsync" and due(fd):
        raise OSError(code, os.strerror(code))
    return real_fsync(fd)

def fdatasync(fd):
    if op == "fsync" and due(fd):
        raise OSError(code, os.strerror(code))
    return real_fdatasync(fd)

os.write, os.fsync = write, fsync
if real_fdatasync is not None:
    os.fdatasync = fdatasync
from kmpwm.cli.app import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def fhome(kmpwm_home) -> Home:
    home = Home(kmpwm_home)
    home.install_workers()
    return home


def faulty(
    home: Home,
    tmp_path: Path,
    *args,
    name: str,
    errno_name: str = "ENOSPC",
    after: int = 0,
    op: str = "write",
    partial: bool = False,
    input: bytes | None = None,
):
    """Run ``kmpwm ARGS --json`` with the fault injected; (doc, rc, stderr)."""
    import orjson

    script = tmp_path / "fault_wrapper.py"
    script.write_text(WRAPPER)
    env = dict(
        home.env,
        FAULT_NAME_RE=name,
        FAULT_AFTER=str(after),
        FAULT_ERRNO=errno_name,
        FAULT_OP=op,
        FAULT_PARTIAL="1" if partial else "0",
    )
    proc = subprocess.run(
        [sys.executable, str(script), *map(str, args), "--json"],
        capture_output=True,
        input=input or b"",
        env=env,
        timeout=120,
    )
    err = proc.stderr.decode("utf-8", "replace")
    try:
        doc = orjson.loads(proc.stdout)
    except orjson.JSONDecodeError:
        doc = None
    return doc, proc.returncode, err


def assert_failed_cleanly(rc: int, err: str, *words: str) -> None:
    assert "Traceback" not in err and "Logging error" not in err and "internal error" not in err, err
    assert rc == 74, f"exit {rc}, expected 74: {err}"
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert 1 <= len(lines) <= 2, err
    for w in words:
        assert w in err, f"{w!r} not in: {err}"


def assert_journal_intact(home: Home, before: bytes, ids: list[str]) -> None:
    """Byte for byte the journal it was, doctor healthy, every earlier task readable."""
    after = home.journal.read_bytes() if home.journal.exists() else b""
    assert after == before, "the failed write left bytes behind"
    doc, rc, err = home.json("doctor")
    assert rc == 0 and doc["healthy"] and not doc["journal"]["damage"] and not doc["journal"]["torn_tail"], err
    view, rc, err = home.json("inspect-queue", "--all")
    assert rc == 0 and set(ids) <= {t["id"] for t in view["tasks"]}, err


def seed_tasks(home: Home, n: int = 3) -> list[str]:
    ids = [f"kept{i}" for i in range(n)]
    for tid in ids:
        doc, rc, err = home.json("enqueue", tid, "echo", "--delay", "1h")
        assert rc == 0, err
    return ids


# -- injected faults --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "errno_name,op,partial",
    [
        ("ENOSPC", "write", False),
        ("ENOSPC", "write", True),
        ("EIO", "write", True),
        ("EIO", "fsync", False),
        ("EDQUOT", "write", False),
    ],
)
def test_append_fault_fails_74_and_leaves_the_journal_intact(fhome, tmp_path, errno_name, op, partial):
    ids = seed_tasks(fhome)
    before = fhome.journal.read_bytes()
    doc, rc, err = faulty(
        fhome, tmp_path, "enqueue", "new", "echo", name=r"^journal\.log$", errno_name=errno_name, op=op, partial=partial
    )
    assert_failed_cleanly(rc, err, "journal")
    if errno_name == "ENOSPC":
        assert "disk full" in err or "No space" in err
    assert doc is not None and (doc.get("exit_code") == 74 or doc.get("result") not in (None, "SUCCESS")), doc
    assert_journal_intact(fhome, before, ids)
    doc, rc, err = fhome.json("enqueue", "new", "echo")
    assert rc == 0, "the next write works once the fault is gone"


def test_batch_fault_is_all_or_nothing(fhome, tmp_path):
    ids = seed_tasks(fhome, 2)
    before = fhome.journal.read_bytes()
    lines = b"".join(b'{"id":"b%d","worker":"echo"}\n' % i for i in range(200))
    doc, rc, err = faulty(fhome, tmp_path, "enqueue", "--from", "-", name=r"^journal\.log$", partial=True, input=lines)
    assert_failed_cleanly(rc, err)
    assert_journal_intact(fhome, before, ids)
    state, _ = fhome.fold()
    assert not any(t.startswith("b") for t in state["tasks"])


@pytest.mark.parametrize("errno_name,op", [("ENOSPC", "write"), ("EIO", "fsync")])
def test_compaction_fault_keeps_the_old_journal(fhome, tmp_path, errno_name, op):
    ids = seed_tasks(fhome, 5)
    doc, rc, err = fhome.json("run-due")
    before = fhome.journal.read_bytes()
    doc, rc, err = faulty(fhome, tmp_path, "compact", name=r"^\.journal\.log\..*\.tmp$", errno_name=errno_name, op=op)
    assert_failed_cleanly(rc, err)
    assert_journal_intact(fhome, before, ids)
    assert not [p for p in fhome.journal_dir.iterdir() if p.name.endswith(".tmp")], "the temp file was left behind"


def test_snapshot_write_fault_is_only_a_cache_miss(fhome, tmp_path):
    from kmpwm import Scheduler
    from kmpwm.core import triggers

    s = Scheduler(home=str(fhome.path))
    for i in range(5):
        s.enqueue(f"big{i}", triggers.OneTime(3600), "echo", input="x" * 900_000)
    fhome.snapshot.unlink(missing_ok=True)
    doc, rc, err = faulty(fhome, tmp_path, "inspect-queue", "--all", name=r"^\.state\.snap\..*\.tmp$")
    assert rc == 0 and "Traceback" not in err, err
    assert {t["id"] for t in doc["tasks"]} == {f"big{i}" for i in range(5)}
    assert not fhome.snapshot.exists()
    assert not [p for p in fhome.journal_dir.iterdir() if p.name.endswith(".tmp")]


def test_disk_full_while_repairing_a_torn_tail(fhome, tmp_path):
    """The next writer moves a torn tail to quarantine/ before appending; with the disk full that
    copy fails: the command must fail with 74 and a clear message, like any other write."""
    ids = seed_tasks(fhome)
    with open(fhome.journal, "ab") as fh:
        fh.write(b'0badc0de {"ts":1,"ops":[{"op":"enq"')
    before = fhome.journal.read_bytes()
    doc, rc, err = faulty(fhome, tmp_path, "enqueue", "new", "echo", name=r"torn")
    assert_failed_cleanly(rc, err)
    assert fhome.journal.read_bytes() == before
    view, rc, err = fhome.json("inspect-queue", "--all")
    assert rc == 0 and set(ids) <= {t["id"] for t in view["tasks"]}


def test_disk_full_during_doctor_repair(fhome, tmp_path):
    seed_tasks(fhome, 4)
    data = bytearray(fhome.journal.read_bytes())
    second = data.index(b"\n") + 20
    data[second] ^= 0x01
    fhome.journal.write_bytes(bytes(data))
    doc, rc, err = faulty(fhome, tmp_path, "doctor", "--repair", name=r"corrupt|repair")
    assert_failed_cleanly(rc, err)
    assert fhome.journal.read_bytes() == bytes(data), "a failed repair must leave the journal as it was"
    doc, rc, err = fhome.json("doctor", "--repair")
    assert rc == 0, err


def test_disk_full_when_recording_a_result(fhome, tmp_path):
    """run-due claims (first append works), the worker runs, the result cannot be written: exit 74,
    the journal intact; the next run-due runs the task again (its success was never recorded)."""
    doc, rc, err = fhome.json("enqueue", "r1", "cw")
    assert rc == 0
    doc, rc, err = faulty(fhome, tmp_path, "run-due", name=r"^journal\.log$", after=1)
    assert_failed_cleanly(rc, err)
    dd, rc2, err2 = fhome.json("doctor")
    assert rc2 == 0 and dd["healthy"], err2
    doc, rc, err = fhome.json("run-due")
    assert rc == 0, err
    state, _ = fhome.fold()
    assert state["tasks"]["r1"]["state"] == "SUCCEEDED"
    starts, _, _ = fhome.runs()
    assert 1 <= len([s for s in starts if s.id == "r1"]) <= 2


# -- a real small file system ----------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """A 256 KiB tmpfs; skipped (with the reason) where mounting is not allowed."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(mnt)], capture_output=True)
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _fill(directory: Path) -> None:
    with open(directory / "filler", "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def _tmpfs_home(mnt: Path) -> Home:
    home = Home(mnt / "home")
    return home


def test_real_disk_full_enqueue_and_compact(tmpfs):
    home = _tmpfs_home(tmpfs)
    ids = []
    for i in range(3):
        doc, rc, err = home.json("enqueue", f"t{i}", "echo", "--delay", "1h", "--input", "a" * 20000)
        assert rc == 0, err
        ids.append(f"t{i}")
    _fill(tmpfs)
    before = home.journal.read_bytes()
    doc, rc, err = home.json("enqueue", "big", "echo", "--input", "b" * 30000)
    assert_failed_cleanly(rc, err, "disk full")
    assert doc == {"error": doc["error"], "exit_code": 74} or doc["result"] != "SUCCESS"
    assert_journal_intact(home, before, ids)
    doc, rc, err = home.json("compact")
    assert_failed_cleanly(rc, err)
    assert home.journal.read_bytes() == before
    assert not [p for p in home.journal_dir.iterdir() if p.name.endswith(".tmp")]
    (tmpfs / "filler").unlink()
    doc, rc, err = home.json("enqueue", "big", "echo", "--input", "b" * 30000)
    assert rc == 0, err


def test_real_disk_full_with_a_torn_tail(tmpfs):
    home = _tmpfs_home(tmpfs)
    for i in range(2):
        doc, rc, err = home.json("enqueue", f"t{i}", "echo", "--delay", "1h", "--input", "a" * 20000)
        assert rc == 0, err
    with open(home.journal, "ab") as fh:
        fh.write(b'0badc0de {"ts":1,"ops":[{"op":"enq","task":{"id":"torn"' + b"x" * 6000)
    _fill(tmpfs)
    before = home.journal.read_bytes()
    doc, rc, err = home.json("enqueue", "new", "echo", "--input", "c" * 30000)
    assert_failed_cleanly(rc, err)
    assert home.journal.read_bytes() == before
    doc, rc, err = home.json("doctor", "--repair")
    assert "Traceback" not in err and "Logging error" not in err and rc in (0, 74), (rc, err)


def test_real_read_only_journal(tmpfs):
    home = _tmpfs_home(tmpfs)
    ids = []
    for i in range(3):
        doc, rc, err = home.json("enqueue", f"t{i}", "echo", *(["--delay", "1h"] if i else []))  # t0 is due
        assert rc == 0, err
        ids.append(f"t{i}")
    before = home.journal.read_bytes()
    proc = subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot remount read-only: {proc.stderr.strip()}")
    doc, rc, err = home.json("enqueue", "new", "echo")
    assert_failed_cleanly(rc, err, "Read-only")
    for cmd in (("compact",), ("cancel", "t0"), ("doctor", "--repair")):
        doc, rc, err = home.json(*cmd)
        assert "Traceback" not in err and "internal error" not in err, (cmd, err)
        assert rc in (0, 74), (cmd, rc, err)
    doc, rc, err = home.json("run-due")
    assert "internal error" not in err and "Traceback" not in err, f"run-due on a read-only journal: {err.strip()}"
    assert rc in (0, 74), (rc, err)
    view, rc, err = home.json("inspect-queue", "--all")
    assert rc == 0 and {t["id"] for t in view["tasks"]} == set(ids), "reading works on a read-only journal"
    subprocess.run(["mount", "-o", "remount,rw", str(tmpfs)], check=True)
    assert home.journal.read_bytes() == before
    state, scan = fold_bytes(before)
    assert not scan.damage and scan.torn is None


def test_full_log_file_system_is_not_a_traceback(tmp_path, fhome):
    """Logs are best effort: with the log directory's file system full, run-due still works and
    stderr gets no traceback (logging's "--- Logging error ---" dump goes to stderr)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    logs = fhome.path / "logs"
    logs.mkdir(mode=0o700, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(logs)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        (logs / "kmpwm.log").touch(mode=0o600)
        _fill(logs)
        doc, rc, err = fhome.json("enqueue", "l1", "fail")
        assert rc == 0, err
        doc, rc, err = fhome.json("run-due")
        assert "Traceback" not in err and "Logging error" not in err, err[:1500]
        assert rc == 0 and doc["ran"][0]["id"] == "l1"
    finally:
        if subprocess.run(["umount", str(logs)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(logs)], capture_output=True)
