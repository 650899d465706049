"""Configuration, permissions and input limits checked where the user is (issues 13 and 14).

One loader validates config.toml for every command (a broken file is exit 78 before run-due
claims anything), doctor finds what would stop run-due, caches that can change what code runs
are trusted only when private, every directory kmpwm makes is 0700, inputs are bounded even when
they are pipes or devices, and human output escapes characters that can spoof it.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import orjson
import pytest
from helpers import kjson, kmpwm, kmpwm_env


def write_config(home: Path, text: str) -> Path:
    path = home / "config.toml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(textwrap.dedent(text))
    return path


# -- 13.7: one loader; a broken config.toml is exit 78 before anything is claimed --------------

BROKEN = {
    "syntax": ('[workers.x\ncommand = ["true"]\n', "invalid TOML"),
    "command-string": ('[workers.x]\ncommand = "echo hi"\n', "command must be a non-empty list"),
    "env-number": ('[workers.x]\ncommand = ["true"]\nenv = { RETRIES = 3 }\n', "env value of RETRIES must be a string"),
    "bad-timeout": ('[workers.x]\ncommand = ["true"]\ntimeout = "soon"\n', "invalid timeout"),
    "nan-timeout": ('[workers.x]\ncommand = ["true"]\ntimeout = nan\n', "invalid timeout"),
    "redefined-builtin": ('[workers.echo]\ncommand = ["true"]\n', "taken by the worker of the package"),
    "nul-in-env": (
        '[workers.x]\ncommand = ["true"]\nenv = { A = "a\\u0000b" }\n',
        "env value of A contains a NUL byte",
    ),
    "nul-in-argument": ('[workers.x]\ncommand = ["true", "a\\u0000b"]\n', "command argument 1 contains a NUL byte"),
    "unknown-key": ('[workers.x]\ncommand = ["true"]\ntimeotu = "1m"\n', "unknown key 'timeotu'"),
    "unknown-table": ('[worker.x]\ncommand = ["true"]\n', "unknown table or key 'worker'"),
    "path-on-command": ('[workers.x]\ncommand = ["true"]\npath = "lib"\n', "path is for entry workers"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_config_stops_run_due_before_claiming(home, case):
    kmpwm("enqueue", "a", "echo", check=0)
    before = (home / "journal" / "journal.log").read_bytes()
    text, words = BROKEN[case]
    cfg = write_config(home, text)
    doc, rc = kjson("run-due")
    assert rc == 78, doc
    assert words in doc["error"] and str(cfg) in doc["error"]
    proc = kmpwm("run-due", check=78)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("kmpwm: error: ") and str(cfg) in lines[0] and words in lines[0], proc.stderr
    assert len(lines) <= 2
    # nothing claimed, skipped, counted: the journal holds exactly what it held
    assert (home / "journal" / "journal.log").read_bytes() == before
    # the same loader for the other commands that use workers
    kmpwm("enqueue", "b", "echo", check=78)
    kmpwm("workers", check=78)
    kmpwm("run-due", "--dry-run", check=78)
    d, rc = kjson("doctor")
    assert rc == 78 and any(words in p for p in d["problems"]), d
    # read-only commands that need no worker still show the queue
    assert [t["id"] for t in kjson("inspect-queue", check=0)[0]["tasks"]] == ["a"]
    # once fixed, the task runs
    cfg.unlink()
    doc, rc = kjson("run-due", check=0)
    assert [r["id"] for r in doc["ran"]] == ["a"] and doc["skipped"] == []


# -- 13.12: every directory kmpwm creates is 0700 whatever the umask ---------------------------


def _umask_022():
    os.umask(0o022)


@pytest.mark.parametrize("command", [["run-due"], ["enqueue", "a", "echo"]])
def test_fresh_home_is_private_under_umask_022(tmp_path, command):
    home = tmp_path / "new" / "deeper" / "home"
    proc = subprocess.run(
        [sys.executable, "-m", "kmpwm", "--home", str(home), *command],
        capture_output=True,
        text=True,
        env=kmpwm_env(),
        preexec_fn=_umask_022,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    if command[0] == "enqueue":
        subprocess.run(
            [sys.executable, "-m", "kmpwm", "--home", str(home), "run-due"],
            check=True,
            env=kmpwm_env(),
            preexec_fn=_umask_022,
            timeout=120,
        )
    made = [tmp_path / "new", tmp_path / "new" / "deeper"]
    made += [Path(root) / d for root, dirs, _ in os.walk(tmp_path / "new" / "deeper") for d in dirs]
    files = [Path(root) / f for root, _, fs in os.walk(home) for f in fs]
    assert home in made and home / "journal" in made
    for d in made:
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f


def test_group_writable_logs_dir_is_refused(home):
    kmpwm("enqueue", "a", "echo", check=0)
    (home / "logs").mkdir(exist_ok=True)
    os.chmod(home / "logs", 0o770)
    for args in (["run-due"], ["enqueue", "b", "echo"], ["inspect-queue"]):
        proc = kmpwm(*args, check=77)
        assert "log directory" in proc.stderr and "chmod 700" in proc.stderr
    os.chmod(home / "logs", 0o700)
    doc, _ = kjson("run-due", check=0)
    assert [r["id"] for r in doc["ran"]] == ["a"]


# -- 13.13: inputs are bounded for pipes and devices too ---------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["enqueue", "a", "echo", "--input-file", "/dev/zero"],
        ["enqueue", "--from", "/dev/zero"],
        ["chain", "--file", "/dev/zero"],
    ],
)
def test_dev_zero_is_refused_not_read_forever(args):
    doc, rc = kjson(*args, timeout=60)
    assert rc == 65 and ("larger than the limit of" in doc["error"] or "longer than 8 MiB" in doc["error"]), doc
    assert kjson("inspect-queue", "--all", check=0)[0]["tasks"] == []


def test_pipe_input_over_one_mib_is_refused(home):
    argv = [sys.executable, "-m", "kmpwm", "enqueue", "a", "echo", "--input-file", "/dev/stdin"]
    writer = subprocess.Popen(["head", "-c", str((1 << 20) + 1), "/dev/zero"], stdout=subprocess.PIPE)
    proc = subprocess.run(argv, stdin=writer.stdout, capture_output=True, text=True, env=kmpwm_env(), timeout=60)
    writer.stdout.close()
    writer.wait()
    assert proc.returncode == 65 and "larger than the limit of 1 MiB" in proc.stderr, proc.stderr
    # exactly the limit is fine, from a pipe (stdin as "-") too
    proc = kmpwm("enqueue", "a", "echo", "--input-file", "-", input="x" * (1 << 20), check=0)
    doc, _ = kjson("inspect-queue", "a", check=0)
    assert len(doc["tasks"][0]["input"]) == 1 << 20


def test_from_stream_over_limit_is_refused_whole():
    line = orjson.dumps({"id": "t", "worker": "echo", "input": "y" * 1000}).decode() + "\n"
    big = line * ((64 << 20) // len(line) + 2)
    doc, rc = kjson("enqueue", "--from", "-", input=big, timeout=120)
    assert rc == 65 and "larger than the limit of 64 MiB" in doc["error"] and doc["results"] == []
    doc, rc = kjson(
        "enqueue",
        "--from",
        "-",
        input=line + '{"id": "u", "worker": "echo", "input": "' + "z" * (9 << 20) + '"}\n',
        timeout=120,
    )
    assert rc == 65 and "line 2" in doc["error"] and "longer than 8 MiB" in doc["error"], doc
    assert kjson("inspect-queue", "--all", check=0)[0]["tasks"] == []


# -- 13.14: NUL bytes and a lock timeout that would never end ----------------------------------


def test_nul_in_input_for_command_worker_is_rejected(home, tmp_path):
    write_config(home, '[workers.cmd]\ncommand = ["cat"]\n')
    doc, rc = kjson("enqueue", "a", "cmd", "--input", "a\x00b".replace("\x00", "\\u0000"))  # literal text: fine
    assert rc == 0, doc
    spec = orjson.dumps({"id": "b", "worker": "cmd", "input": "a\x00b"}).decode()
    doc, rc = kjson("enqueue", "--from", "-", input=spec + "\n")
    assert rc == 65 and "NUL byte" in doc["error"] and doc["results"][0]["result"] == "REJECTED_INVALID_PARAMS"
    (tmp_path / "nul.txt").write_bytes(b"x\x00y")
    doc, rc = kjson("enqueue", "c", "cmd", "--input-file", tmp_path / "nul.txt")
    assert rc == 65 and "NUL byte" in doc["error"] and "cmd" in doc["error"]
    # a Python worker gets its input as a str: a NUL byte is fine there
    doc, rc = kjson("enqueue", "d", "echo", "--input-file", tmp_path / "nul.txt")
    assert rc == 0, doc
    ids = sorted(t["id"] for t in kjson("inspect-queue", check=0)[0]["tasks"])
    assert ids == ["a", "d"]


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "soon", "1e999"])
def test_bad_lock_timeout_is_a_config_error_not_a_hang(value):
    proc = kmpwm("enqueue", "a", "echo", env={"KMPWM_LOCK_TIMEOUT": value}, timeout=30, check=78)
    assert "KMPWM_LOCK_TIMEOUT" in proc.stderr and len(proc.stderr.splitlines()) <= 2
    kmpwm("enqueue", "a", "echo", env={"KMPWM_LOCK_TIMEOUT": "2.5"}, check=0)
    kmpwm("enqueue", "b", "echo", env={"KMPWM_LOCK_TIMEOUT": "1m"}, check=0)


# -- 13.11: a cache that decides what code runs is read only when private --------------------


def _hostile_cache(home: Path) -> Path:
    """The entry-point cache as another user would leave it: 'echo' mapped to another callable."""
    kmpwm("workers", check=0)
    kmpwm("enqueue", "warm", "echo", check=0)  # writes the cache (entry points are scanned, then cached)
    kmpwm("cancel", "warm", check=0)
    cache = home / "cache" / "entry-points.json"
    doc = orjson.loads(cache.read_bytes())
    doc["entry_points"] = [
        [n, "kmpwm.workers.builtin:fail" if n == "echo" else v, d] for n, v, d in doc["entry_points"]
    ]
    cache.write_bytes(orjson.dumps(doc))
    return cache


def _echo_runs_as_echo() -> None:
    kmpwm("enqueue", "a", "echo", "--input", "hi", check=0)
    doc, _ = kjson("run-due", check=0)
    row = next(r for r in doc["ran"] if r["id"] == "a")
    assert row["status"] == "SUCCESS", row


@pytest.mark.parametrize("how", ["group-writable-dir", "group-writable-file", "other-owner"])
def test_hostile_entry_point_cache_is_ignored(home, how):
    cache = _hostile_cache(home)
    if how == "group-writable-dir":
        os.chmod(cache.parent, 0o770)
    elif how == "group-writable-file":
        os.chmod(cache, 0o660)
    else:
        if os.getuid() != 0:
            pytest.skip("needs root to give the file to another user")
        os.chown(cache, 65534, 65534)
    _echo_runs_as_echo()
    if how != "group-writable-dir":  # rebuilt, private, in the private directory
        st = cache.stat()
        assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o600
        assert ["echo", "kmpwm.workers.builtin:echo", "kmpwm"] in orjson.loads(cache.read_bytes())["entry_points"]


def test_private_cache_is_used(home):
    """The control: the same tampering in a private cache is trusted (it is the user's own file),
    which is what makes the tests above fail without the check."""
    _hostile_cache(home)
    kmpwm("enqueue", "a", "echo", "--input", "hi", check=0)
    doc, _ = kjson("run-due", check=0)
    assert next(r for r in doc["ran"] if r["id"] == "a")["status"] == "FAILURE"


# -- 13 extra: --at on a local time a DST change skips moves forward, as cron does -------------


@pytest.mark.parametrize(
    "tz,local,expected",
    [
        ("Europe/Berlin", "2030-03-31T02:30:00", "2030-03-31T01:30:00Z"),  # 03:30 CEST, not 01:30 CET
        ("America/New_York", "2030-03-10T02:30:00", "2030-03-10T07:30:00Z"),  # 03:30 EDT, not 01:30 EST
        ("Europe/Berlin", "2030-10-27T02:30:00", "2030-10-27T00:30:00Z"),  # twice: the first (CEST)
        ("Europe/Berlin", "2030-07-01T12:00:00", "2030-07-01T10:00:00Z"),  # an ordinary time
    ],
)
def test_at_in_a_dst_gap_moves_forward(tz, local, expected):
    doc, rc = kjson("enqueue", "a", "echo", "--at", local, env={"TZ": tz})
    assert rc == 0 and doc["next_run_at"] == expected, doc


# -- 13 extra: bidi and other format characters are escaped on a terminal too -----------------


def _on_tty(*args, env=None) -> str:
    """Run kmpwm with stdout on a pseudo-terminal (the live progress and rich tables); its output."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kmpwm", *args],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=subprocess.PIPE,
        env=kmpwm_env(env),
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other side closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    return b"".join(chunks).decode("utf-8", "replace")


def test_bidi_controls_and_markup_escaped_on_a_terminal():
    tid = "ab\u202ecd[red]x\u2066"
    kmpwm("enqueue", tid, "fail", "--input", "bad\u200enews", "--max-attempts", "1", check=0)
    shown = _on_tty("run-due")  # the live progress lines
    assert "ab\\u202ecd[red]x\\u2066" in shown, shown
    assert "\u202e" not in shown and "\u2066" not in shown and "\u200e" not in shown
    shown = _on_tty("inspect-queue", "--all", env={"NO_COLOR": None, "TERM": "xterm"})  # rich
    assert "ab\\u202ecd[red]x\\u2066" in shown, shown
    assert "\u202e" not in shown and "\u2066" not in shown


# -- 13.9: doctor finds what would stop run-due, says how to fix it, exits non-zero -----------


def _doctor():
    doc, rc = kjson("doctor")
    return doc, rc, " | ".join(doc.get("problems", []))


def test_doctor_healthy_home_exits_0(home):
    kmpwm("enqueue", "a", "echo", check=0)
    kmpwm("run-due", check=0)
    doc, rc, problems = _doctor()
    assert rc == 0 and doc["healthy"] and not problems, problems


def test_doctor_lock_that_is_a_directory(home):
    kmpwm("enqueue", "a", "echo", check=0)
    lock = home / "journal" / "lock"
    lock.unlink()
    lock.mkdir()
    kmpwm("run-due", check=74)  # what doctor must predict
    doc, rc, problems = _doctor()
    assert rc == 74 and not doc["healthy"] and "is a directory" in problems and f"rmdir {lock}" in problems
    proc = kmpwm("doctor", check=74)
    assert f"rmdir {lock}" in proc.stdout


@pytest.mark.parametrize("how", ["group-writable", "a-file", "unwritable"])
def test_doctor_runners_dir_with_bad_permissions(home, how):
    kmpwm("enqueue", "a", "echo", check=0)
    kmpwm("run-due", check=0)
    runners = home / "journal" / "runners"
    if how == "group-writable":
        os.chmod(runners, 0o770)
        fix = f"chmod 700 {runners}"
    elif how == "a-file":
        for f in runners.iterdir():
            f.unlink()
        runners.rmdir()
        runners.write_text("")
        fix = f"rm {runners}"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into a 0500 directory")
        os.chmod(runners, 0o500)
        fix = f"chmod 700 {runners}"
    doc, rc, problems = _doctor()
    assert rc == 77 and "runners directory" in problems and fix in problems, problems
    assert not doc["healthy"]


def test_doctor_read_only_journal(home, tmp_path):
    if os.geteuid() != 0:
        kmpwm("enqueue", "a", "echo", check=0)
        os.chmod(home / "journal" / "journal.log", 0o400)
        doc, rc, problems = _doctor()
        assert rc == 74 and "read-only" in problems and "chmod u+w" in problems, problems
        return
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        env = {"KMPWM_HOME": str(mnt)}
        kmpwm("enqueue", "a", "echo", env=env, check=0)
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        assert kmpwm("run-due", env=env).returncode == 74  # what doctor must predict
        doc, rc = kjson("doctor", env=env)
        problems = " | ".join(doc["problems"])
        assert rc == 74 and "read-only" in problems and "remount it read-write" in problems, problems
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_doctor_worker_program_missing_or_not_executable(home, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    os.chmod(script, 0o644)
    write_config(
        home,
        f'''
        [workers.gone]
        command = ["{tmp_path}/no-such-program", "x"]

        [workers.noexec]
        command = ["{script}"]

        [workers.nopath]
        command = ["no-such-program-on-path-x1"]

        [workers.nocwd]
        command = ["true"]
        cwd = "{tmp_path}/no-such-dir"

        [workers.fine]
        command = ["true"]
    ''',
    )
    doc, rc, problems = _doctor()
    assert rc == 78 and not doc["healthy"]
    by = {w["name"]: w for w in doc["workers"]}
    assert "does not exist" in by["gone"]["error"]
    assert "not executable" in by["noexec"]["error"] and f"chmod +x {script}" in by["noexec"]["error"]
    assert "not found on PATH" in by["nopath"]["error"]
    assert "cwd" in by["nocwd"]["error"] and "not a directory" in by["nocwd"]["error"]
    assert by["fine"]["ok"] and by["echo"]["ok"]
    os.chmod(script, 0o755)
    doc, rc, _ = _doctor()
    assert {w["name"] for w in doc["workers"] if not w["ok"]} == {"gone", "nopath", "nocwd"}


# -- 14.9: an installed invoker that stopped running is reported ------------------------------

FAKE_CRONTAB = """#!/bin/sh
case "$1" in
  -l) if [ -f "$FAKE_CRONTAB_FILE" ]; then cat "$FAKE_CRONTAB_FILE"; else echo "no crontab for tester" >&2; exit 1; fi ;;
  -)  cat > "$FAKE_CRONTAB_FILE" ;;
  -r) rm -f "$FAKE_CRONTAB_FILE" ;;
esac
"""


@pytest.mark.parametrize(
    "every,age,stale", [("1m", 3600, True), ("1m", 30, False), ("5m", 600, False), ("5m", 1000, True)]
)
def test_doctor_reports_a_stale_invoker(home, tmp_path, every, age, stale):
    import time

    fake = tmp_path / "crontab"
    fake.write_text(FAKE_CRONTAB)
    os.chmod(fake, 0o700)
    env = {
        "KMPWM_CRONTAB": str(fake),
        "FAKE_CRONTAB_FILE": str(tmp_path / "crontab.txt"),
        "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
        "HOME": str(tmp_path),
    }
    kmpwm("schedule", "install", "--backend", "cron", "--every", every, env=env, check=0)
    kmpwm("enqueue", "a", "echo", "--delay", "1h", env=env, check=0)
    kmpwm("run-due", env=env, check=0)  # marks the last run
    last = home / "journal" / "runners" / "last-run"
    t = time.time() - age
    os.utime(last, (t, t))
    doc, rc = kjson("doctor", env=env)
    problems = " | ".join(doc["problems"])
    if stale:
        assert rc == 1 and doc["invoker"]["stale"] and "cron daemon running" in problems, doc
        proc = kmpwm("doctor", env=env, check=1)
        assert "STALE" in proc.stdout and "last ran" in proc.stdout
    else:
        assert rc == 0 and not doc["invoker"]["stale"] and not problems, doc


# -- 14.8: a home that does not exist is said so ---------------------------------------------


@pytest.mark.parametrize("args", [["inspect-queue"], ["events"], ["explain", "x"], ["doctor"]])
def test_missing_home_is_not_an_empty_queue(tmp_path, args):
    missing = tmp_path / "no" / "such" / "home"
    proc = kmpwm("--home", missing, *args, check=1)
    assert proc.stdout == "" and f"no kmpwm queue at {missing}" in proc.stderr
    doc, rc = kjson("--home", missing, *args)
    assert rc == 1 and doc == {"error": f"no kmpwm queue at {missing}: the directory does not exist", "exit_code": 1}
    assert not (tmp_path / "no").exists()  # and nothing was created


def test_existing_empty_home_is_an_empty_queue(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o700)
    doc, rc = kjson("--home", empty, "inspect-queue")
    assert rc == 0 and doc == {"tasks": [], "chains": [], "paused": False}


# -- 14.7: an entry worker's module is found by path or next to config.toml, checked at enqueue -


def test_entry_worker_module_checked_at_enqueue_and_found_by_path(home):
    write_config(home, '[workers.gen]\nentry = "jobs_i13:gen"\n')
    doc, rc = kjson("enqueue", "a", "gen")
    assert rc == 65 and "No module named 'jobs_i13'" in doc["error"] and "path =" in doc["error"], doc
    d, rc = kjson("doctor")
    assert rc == 78 and any("No module named 'jobs_i13'" in p for p in d["problems"])
    lib = home / "lib"
    lib.mkdir()
    (lib / "jobs_i13.py").write_text("def gen(text):\n    return {'got': text}\n")
    write_config(home, '[workers.gen]\nentry = "jobs_i13:gen"\npath = "lib"\n')
    kmpwm("enqueue", "a", "gen", "--input", "one", check=0)
    for preload in ("1", "0"):  # imported in run-due, or only in the worker's own process
        kmpwm("enqueue", "a", "gen", "--input", f"p{preload}", "--policy", "replace", check=0)
        doc, _ = kjson("run-due", env={"KMPWM_PRELOAD": preload}, check=0)
        assert doc["ran"][0]["status"] == "SUCCESS" and doc["ran"][0]["data"] == {"got": f"p{preload}"}, doc
    assert kjson("doctor", check=0)[0]["healthy"]
    # config.toml's own directory is searched by default
    (lib / "jobs_i13.py").rename(home / "jobs_i13.py")
    write_config(home, '[workers.gen]\nentry = "jobs_i13:gen"\n')
    kmpwm("enqueue", "b", "gen", "--input", "two", check=0)
    doc, _ = kjson("run-due", env={"KMPWM_PRELOAD": "0"}, check=0)
    assert doc["ran"][0]["data"] == {"got": "two"}
    # a missing attribute is caught too
    write_config(home, '[workers.gen]\nentry = "jobs_i13:nope"\n')
    doc, rc = kjson("enqueue", "c", "gen")
    assert rc == 65 and "nope" in doc["error"]


def test_entry_path_that_others_can_write_is_refused(home):
    lib = home / "lib"
    lib.mkdir()
    os.chmod(lib, 0o777)
    write_config(home, '[workers.gen]\nentry = "jobs_i13:gen"\npath = "lib"\n')
    proc = kmpwm("enqueue", "a", "gen", check=77)
    assert "module path of worker gen" in proc.stderr and f"chmod 700 {lib}" in proc.stderr


def test_cancel_on_a_missing_home_creates_nothing(tmp_path):
    missing = tmp_path / "typo"
    doc, rc = kjson("--home", missing, "cancel", "x")
    assert rc == 0 and doc == {"cancelled": []}
    kjson("--home", missing, "cancel", "--all", check=0)
    assert not missing.exists()
