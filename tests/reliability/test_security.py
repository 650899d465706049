"""Security (SPEC sections 1 and 5, README "Files"): private modes, refusing insecure homes,
workers only from registered sources, no shell anywhere, the environment workers get, and
symlinks planted in the journal directory.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
from crashlib import Home

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def shome(kmpwm_home) -> Home:
    home = Home(kmpwm_home)
    home.install_workers()
    return home


def run_with_umask(home: Home, umask: int, *args, input: bytes = b""):
    proc = subprocess.run(
        home.argv(*args, "--json"),
        input=input,
        capture_output=True,
        env=home.env,
        timeout=120,
        preexec_fn=lambda: os.umask(umask),
    )
    assert b"Traceback" not in proc.stderr, proc.stderr
    return proc


def kmpwm_owned(home: Home) -> list[Path]:
    """Everything kmpwm creates: journal/, logs/ and what is in them."""
    out = []
    for top in (home.path / "journal", home.path / "logs"):
        if not top.exists():
            continue
        out.append(top)
        for root, dirs, files in os.walk(top):
            out += [Path(root) / d for d in dirs] + [Path(root) / f for f in files]
    return out


# -- modes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o000, 0o022])
def test_every_file_0600_and_directory_0700_whatever_the_umask(shome, umask, tmp_path):
    big = tmp_path / "big"
    big.write_bytes(b"x" * 950_000)
    # a log about to rotate (README: rotated at 1 MiB), created private
    logs = shome.path / "logs"
    logs.mkdir(mode=0o700)
    fd = os.open(logs / "kmpwm.log", os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"old log line\n" * 90_000)
    os.close(fd)
    steps = [
        ("enqueue", "a", "cw"),
        ("chain", "--id", "c", "cw", "cw+pw"),
        ("enqueue", "f", "fail"),
        *[("enqueue", f"big{i}", "cw", "--delay", "1h", "--input-file", big) for i in range(5)],
        ("inspect-queue",),  # the tail is over 4 MiB: writes the snapshot
        ("run-due",),
        ("compact",),
        ("cancel", "--all"),
    ]
    for args in steps:
        proc = run_with_umask(shome, umask, *args)
        assert proc.returncode == 0, (args, proc.stderr)
    assert shome.snapshot.exists()
    data = bytearray(shome.journal.read_bytes())
    data[data.index(b"\n") + 12] ^= 1
    shome.journal.write_bytes(bytes(data))
    proc = run_with_umask(shome, umask, "doctor", "--repair")
    assert proc.returncode == 0, proc.stderr
    assert (shome.journal_dir / "quarantine").is_dir()
    assert len(list(logs.iterdir())) >= 2, "the log rotated"
    wrong = []
    for p in kmpwm_owned(shome):
        mode = stat.S_IMODE(p.lstat().st_mode)
        want = 0o700 if p.is_dir() else 0o600
        if mode != want:
            wrong.append(f"{p.relative_to(shome.path)} {mode:04o} (want {want:04o})")
    assert not wrong, f"with umask {umask:03o}: " + ", ".join(wrong)


# -- refusing insecure homes (exit 77) -----------------------------------------------------------


def _insecure_cases():
    for target in ("home", "journal", "config"):
        yield target, "group-writable"
        yield target, "world-writable"
        yield target, "foreign-owner"


@pytest.mark.parametrize("target,problem", list(_insecure_cases()))
def test_insecure_paths_are_refused_with_77(shome, target, problem):
    doc, rc, err = shome.json("enqueue", "before", "cw", "--delay", "1h")
    assert rc == 0, err
    path = {"home": shome.path, "journal": shome.journal_dir, "config": shome.path / "config.toml"}[target]
    mode = stat.S_IMODE(path.stat().st_mode)
    if problem == "group-writable":
        os.chmod(path, mode | stat.S_IWGRP)
    elif problem == "world-writable":
        os.chmod(path, mode | stat.S_IWOTH)
    else:
        if os.geteuid() != 0:
            pytest.skip("changing the owner needs root")
        os.chown(path, 65534, 65534)
    before = shome.journal.read_bytes()
    for args in (("enqueue", "x", "cw"), ("run-due",), ("inspect-queue",), ("doctor",)):
        doc, rc, err = shome.json(*args)
        assert rc == 77, (args, rc, err)
        assert doc == {"error": doc["error"], "exit_code": 77}, doc
        reason = "owned by" if problem == "foreign-owner" else "writable by"
        assert reason in err and str(path) in err and ("chmod" in err or "chown" in err), err
        assert "Traceback" not in err and len(err.strip().splitlines()) <= 2, err
    assert shome.journal.read_bytes() == before, "a refused command touched the journal"
    assert not shome.runlog.exists(), "a refused run-due ran work"


@pytest.mark.parametrize("problem", ["world-writable", "foreign-owner"])
def test_insecure_journal_file_is_refused(shome, problem):
    """The issue asks to refuse a group/world-writable or foreign-owned journal, not only its
    directory: a journal file others may write is a way to plant tasks (which then run as you)."""
    doc, rc, err = shome.json("enqueue", "before", "cw", "--delay", "1h")
    assert rc == 0, err
    if problem == "world-writable":
        os.chmod(shome.journal, 0o666)
    else:
        if os.geteuid() != 0:
            pytest.skip("changing the owner needs root")
        os.chown(shome.journal, 65534, 65534)
    doc, rc, err = shome.json("enqueue", "x", "cw")
    assert rc == 77, f"a {problem} journal.log was accepted (exit {rc})"


# -- workers only from registered sources ------------------------------------------------------


@pytest.mark.parametrize(
    "worker", ["os:system", "kmpwm.workers.builtin:echo", "subprocess:run", "/bin/sh", "crashpw:work", "../../bin/sh"]
)
def test_enqueue_names_only_registered_workers(shome, worker):
    doc, rc, err = shome.json("enqueue", "x", worker)
    assert rc == 65 and doc["result"] == "REJECTED_INVALID_PARAMS" and "unknown worker" in err, (rc, err)


def _plant(home: Home, tasks: list[dict]) -> None:
    """Append a valid record (right checksum) with these task requests: journal tampering."""
    import time as _time

    from kmpwm.storage.journal import encode

    record = {
        "ts": _time.time(),
        "ops": [
            {
                "op": "enq",
                "task": dict(t, created_at=_time.time(), trigger={"type": "one_time", "delay": 0.0}),
                "policy": "keep",
            }
            for t in tasks
        ],
    }
    with open(home.journal, "ab") as fh:
        fh.write(encode(record))


def test_workers_never_come_from_the_journal(shome, tmp_path):
    """A task record naming a module path, a program, or carrying its own command/entry must not
    make run-due import or run anything that is not registered."""
    pwned = tmp_path / "pwned"
    doc, rc, err = shome.json("enqueue", "legit", "cw", "--delay", "1h")
    assert rc == 0
    _plant(
        shome,
        [
            {"id": "p1", "worker": "os:system", "input": f"touch {pwned}1"},
            {"id": "p2", "worker": "kmpwm.workers.builtin:echo"},
            {"id": "p3", "worker": "/usr/bin/touch", "input": f"{pwned}3"},
            {
                "id": "p4",
                "worker": "cw",
                "command": ["/usr/bin/touch", f"{pwned}4"],
                "entry": "os:system",
                "cwd": "/",
                "env": {"LD_PRELOAD": "/nonexistent.so"},
            },
            {"id": "p5", "worker": "crashpw.work"},
        ],
    )
    doc, rc, err = shome.json("run-due")
    assert rc == 0, err
    assert not list(tmp_path.glob("pwned*")), "a worker from the journal ran"
    ran = {r["id"]: r for r in doc["ran"]}
    assert set(ran) <= {"p4"}, f"unregistered workers ran: {sorted(set(ran) - {'p4'})}"
    starts, _, _ = shome.runs()
    assert [s.id for s in starts] == ["p4"], "p4 runs the registered cw command, not the journal's"
    skipped = {s["id"] for s in doc["skipped"]}
    assert {"p1", "p2", "p3", "p5"} <= skipped, doc


# -- no shell anywhere ------------------------------------------------------------------------


def test_no_shell_in_the_source():
    bad = re.compile(r"shell\s*=\s*True|os\.system\(|os\.popen\(|\[\s*['\"]/bin/sh['\"]|['\"]sh['\"],\s*['\"]-c['\"]")
    hits = []
    for path in (REPO / "kmpwm").rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if bad.search(line):
                hits.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert not hits, hits


def test_command_arguments_and_input_are_not_shell_parsed(shome, tmp_path):
    marker = tmp_path / "m"
    out = tmp_path / "argv.txt"
    cfg = shome.path / "config.toml"
    text = cfg.read_text() + (
        "\n[workers.argv]\n"
        f'command = ["{sys.executable}", "-c", "import sys, os; open({str(out)!r}, \'w\').write(repr(sys.argv[1:]))", '
        f'"$(touch {marker}1)", ";", "touch", "{marker}2", "|", "`touch {marker}3`", "&&", "*"]\n'
    )
    cfg.write_text(text)
    os.chmod(cfg, 0o600)
    doc, rc, err = shome.json("enqueue", "meta", "argv", "--input", f"$(touch {marker}4); `touch {marker}5`")
    assert rc == 0, err
    doc, rc, err = shome.json("enqueue", "meta2", "cw", "--input", f"$(touch {marker}6)")
    assert rc == 0, err
    doc, rc, err = shome.json("run-due")
    assert rc == 0 and all(r["status"] == "SUCCESS" for r in doc["ran"]), doc
    assert eval(out.read_text()) == [
        f"$(touch {marker}1)",
        ";",
        "touch",
        f"{marker}2",
        "|",
        f"`touch {marker}3`",
        "&&",
        "*",
    ]
    assert not list(tmp_path.glob("m*")), "something was run through a shell"


def test_cron_line_quotes_a_hostile_home(tmp_path):
    """The one place a shell does run kmpwm: cron.  A home with shell syntax in its name must reach
    run-due as one literal argument."""
    home = tmp_path / "we ird$(touch PWN1)'q\";`touch PWN2`;x"
    home.mkdir(mode=0o700)
    env = dict(os.environ, KMPWM_HOME=str(home))
    proc = subprocess.run(
        [sys.executable, "-m", "kmpwm", "schedule", "install", "--backend", "cron", "--print"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    entry = next(ln for ln in proc.stdout.splitlines() if ln and not ln.startswith("#"))
    command = entry.split(None, 5)[5].replace("\\%", "%")  # what cron hands to /bin/sh
    words = shlex.split(command)
    assert words[0] == f"KMPWM_HOME={home}", words
    run = subprocess.run(
        ["/bin/sh", "-c", command],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": os.environ["PATH"]},
    )
    assert run.returncode == 0, run.stderr
    assert not list(tmp_path.glob("PWN*")), "the crontab line let the shell run part of the home's name"
    assert (home / "journal").is_dir() or run.returncode == 0


# -- the environment a worker gets ------------------------------------------------------------


def test_worker_environment_is_as_documented(shome, tmp_path):
    dump = tmp_path / "env.json"
    cfg = shome.path / "config.toml"
    cfg.write_text(
        cfg.read_text()
        + (
            "\n[workers.envdump]\n"
            f'command = ["{sys.executable}", "-c", "import os, json; open({str(dump)!r}, \'w\').write(json.dumps(dict(os.environ)))"]\n'  # noqa: E501
            'env = { FROM_CONFIG = "yes" }\n'
        )
    )
    os.chmod(cfg, 0o600)
    doc, rc, err = shome.json("enqueue", "env1", "envdump", "--input", '{"k": 1}')
    assert rc == 0
    doc, rc, err = shome.json("run-due", env={"INHERITED_FROM_RUN_DUE": "1"})
    assert rc == 0, err
    env = orjson.loads(dump.read_bytes())
    assert env["KMPWM_INPUT"] == '{"k": 1}' and env["KMPWM_ATTEMPT"] == "1" and env["KMPWM_WORKER"] == "envdump"
    assert env["KMPWM_UPSTREAM"] == "{}" and env["FROM_CONFIG"] == "yes"
    assert env.get("INHERITED_FROM_RUN_DUE") == "1", "README: a command inherits run-due's environment"
    assert env["KMPWM_RUNNER"].count("/") == 2  # host/pid/id: how the next run-due finds an orphan (groups.py)
    readme = (REPO / "README.md").read_text()
    for name in (
        "KMPWM_INPUT",
        "KMPWM_TASK_ID",
        "KMPWM_ATTEMPT",
        "KMPWM_WORKER",
        "KMPWM_UPSTREAM",
        "KMPWM_CHAIN_ID",
        "KMPWM_STEP",
        "KMPWM_RUNNER",
    ):
        assert name in readme, f"{name} is passed to workers but not documented"
    assert "inherits run-due's environment" in readme


# -- symlinks planted in the journal directory ----------------------------------------------------


def _victim(tmp_path: Path) -> tuple[Path, bytes]:
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"precious\n")
    return victim, victim.read_bytes()


@pytest.mark.parametrize("name", ["journal.log", "lock", "state.snap", "history.snap"])
def test_planted_file_symlink_is_not_followed(shome, tmp_path, name):
    doc, rc, err = shome.json("enqueue", "a", "cw", "--delay", "1h")
    assert rc == 0
    victim, content = _victim(tmp_path)
    link = shome.journal_dir / name
    link.unlink(missing_ok=True)
    link.symlink_to(victim)
    for args in (
        ("enqueue", "b", "cw"),
        ("run-due",),
        ("compact",),
        ("doctor", "--repair"),
        ("cancel", "--all"),
        ("inspect-queue",),
    ):
        doc, rc, err = shome.json(*args)
        assert "Traceback" not in err and "internal error" not in err, (args, err)
        assert rc in (0, 74), (args, rc, err)
        assert victim.read_bytes() == content, f"{args} wrote through the {name} symlink"


@pytest.mark.parametrize("name", ["quarantine", "runners"])
def test_planted_directory_symlink_is_not_followed(shome, tmp_path, name):
    """journal/quarantine or journal/runners replaced by a symlink to another directory: kmpwm
    must not write its files (quarantined bytes, the repair manifest, last-run) over there."""
    for tid in ("a", "b", "c"):
        doc, rc, err = shome.json("enqueue", tid, "cw")
        assert rc == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_bytes(b"precious\n")
    link = shome.journal_dir / name
    if link.exists():
        import shutil

        shutil.rmtree(link)
    link.symlink_to(elsewhere, target_is_directory=True)
    data = bytearray(shome.journal.read_bytes())
    data[data.index(b"\n") + 12] ^= 1
    shome.journal.write_bytes(bytes(data))
    for args in (("doctor", "--repair"), ("run-due",), ("enqueue", "d", "cw")):
        doc, rc, err = shome.json(*args)
        assert "Traceback" not in err and "internal error" not in err, (args, err)
    assert sorted(p.name for p in elsewhere.iterdir()) == ["keep"], (
        f"kmpwm followed the planted journal/{name} symlink and wrote {sorted(p.name for p in elsewhere.iterdir())} "
        f"into {elsewhere}"
    )
