"""`kmpwm schedule install|uninstall|status` and `invoker_status` (kmpwm/invoker.py).

crontab, launchctl and systemctl are replaced by small logging shell scripts on PATH (or, for cron,
via KMPWM_CRONTAB); one test drives the real `crontab` end to end, restoring root's crontab after.
"""

from __future__ import annotations

import json
import os
import plistlib
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kmpwm.cli.schedulecmd import schedule_command
from kmpwm.core.exitcodes import InvalidParams, KmpwmError, OsPolicy
from kmpwm.storage.paths import resolve
from kmpwm.system import invoker
from kmpwm.system.invoker import CRON_BEGIN, CRON_END, invoker_status, parse_every

ROOT = Path(__file__).resolve().parents[2]

FAKE_CRONTAB = r"""#!/bin/sh
echo "crontab $*" >> "$FAKE_LOG"
case "$1" in
  -l) if [ -n "$FAKE_CRONTAB_FAIL" ]; then echo "crontab: permission denied" >&2; exit 1; fi
      if [ -f "$FAKE_CRONTAB_FILE" ]; then cat "$FAKE_CRONTAB_FILE"; else echo "no crontab for tester" >&2; exit 1; fi ;;
  -)  cat > "$FAKE_CRONTAB_FILE" ;;
  -r) rm -f "$FAKE_CRONTAB_FILE" ;;
  *)  exit 2 ;;
esac
"""

FAKE_LAUNCHCTL = r"""#!/bin/sh
echo "launchctl $*" >> "$FAKE_LOG"
case "$1" in
  print) exit "${FAKE_LAUNCHCTL_PRINT_RC:-113}" ;;
  bootstrap) [ -n "$FAKE_LAUNCHCTL_BOOTSTRAP_FAIL" ] && { echo "Bootstrap failed: 5: Input/output error" >&2; exit 5; } ;;
esac
exit 0
"""

FAKE_SYSTEMCTL = r"""#!/bin/sh
echo "systemctl $*" >> "$FAKE_LOG"
case "$2" in
  show-environment) [ -n "$FAKE_SYSTEMCTL_NO_BUS" ] && { echo "Failed to connect to bus: No medium found" >&2; exit 1; } ;;
  is-enabled|is-active) exit "${FAKE_SYSTEMCTL_ACTIVE_RC:-1}" ;;
  enable) [ -n "$FAKE_SYSTEMCTL_ENABLE_FAIL" ] && { echo "Failed to enable unit" >&2; exit 1; } ;;
esac
exit 0
"""


@pytest.fixture
def env(tmp_path, monkeypatch):
    """HOME, XDG_CONFIG_HOME, a 0700 KMPWM_HOME and fake crontab/launchctl/systemctl on PATH."""
    home = tmp_path / "userhome"
    home.mkdir()
    xdg = tmp_path / "xdgconfig"
    kh = tmp_path / "kmpwm home"  # a space, to exercise quoting
    kh.mkdir(mode=0o700)
    os.chmod(kh, 0o700)
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    for name, text in (("crontab", FAKE_CRONTAB), ("launchctl", FAKE_LAUNCHCTL), ("systemctl", FAKE_SYSTEMCTL)):
        p = fakebin / name
        p.write_text(text)
        p.chmod(0o755)
    log = tmp_path / "calls.log"
    vals = {
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(xdg),
        "KMPWM_HOME": str(kh),
        "PATH": f"{fakebin}{os.pathsep}{os.environ.get('PATH', '')}",
        "KMPWM_CRONTAB": str(fakebin / "crontab"),
        "FAKE_LOG": str(log),
        "FAKE_CRONTAB_FILE": str(tmp_path / "crontab.txt"),
    }
    for k, v in vals.items():
        monkeypatch.setenv(k, v)
    for k in (
        "FAKE_LAUNCHCTL_PRINT_RC",
        "FAKE_LAUNCHCTL_BOOTSTRAP_FAIL",
        "FAKE_SYSTEMCTL_NO_BUS",
        "FAKE_SYSTEMCTL_ACTIVE_RC",
        "FAKE_SYSTEMCTL_ENABLE_FAIL",
        "FAKE_CRONTAB_FAIL",
    ):
        monkeypatch.delenv(k, raising=False)

    class E:
        pass

    e = E()
    e.home, e.xdg, e.kh, e.bin, e.log = home, xdg, kh, fakebin, log
    e.crontab = tmp_path / "crontab.txt"
    e.paths = resolve(str(kh))
    e.calls = lambda: log.read_text().splitlines() if log.exists() else []
    return e


def cli(*args, env_extra=None, home=None):
    environ = dict(os.environ)
    environ.update(env_extra or {})
    argv = [sys.executable, "-m", "kmpwm"] + (["--home", str(home)] if home else []) + list(args)
    return subprocess.run(argv, capture_output=True, text=True, env=environ, cwd=ROOT, timeout=60)


def run(paths, action, backend, every=None, print_only=False, as_json=True, capsys=None):
    code = schedule_command(paths, action, backend, every, print_only, as_json)
    out = capsys.readouterr().out if capsys else ""
    return code, (json.loads(out) if as_json and out else out)


# -- intervals and backends ----------------------------------------------------------------


def test_every_default_minimum_and_cron_shapes():
    assert parse_every(None, "cron") == 60
    assert parse_every("90s", "systemd") == 90
    assert parse_every("7m", "launchd") == 420
    for bad in ("30s", "59s", "0", "nonsense"):
        with pytest.raises(InvalidParams):
            parse_every(bad, "systemd")
    for ok, line in (
        ("1m", "* * * * *"),
        ("5m", "*/5 * * * *"),
        ("30m", "*/30 * * * *"),
        ("1h", "0 * * * *"),
        ("60m", "0 * * * *"),
        ("6h", "0 */6 * * *"),
        ("1d", "0 0 * * *"),
    ):
        assert invoker.cron_schedule(parse_every(ok, "cron")) == line
        assert invoker._cron_every(line) == parse_every(ok, "cron")  # and read back
    # a hand-written step as long as the field's range fires once a day (hour 0) or an hour
    assert invoker._cron_every("0 */30 * * *") == 86400
    assert invoker._cron_every("*/60 * * * *") == 3600
    for bad in ("7m", "90s", "45m", "5h", "2d"):
        with pytest.raises(InvalidParams, match="cron"):
            parse_every(bad, "cron")


def test_unknown_backend_and_bad_every_exit_65(env):
    p = cli("schedule", "install", "--backend", "bogus", "--json")
    assert p.returncode == 65 and json.loads(p.stdout)["exit_code"] == 65
    assert "unknown backend" in p.stderr and "Traceback" not in p.stderr
    p = cli("schedule", "install", "--backend", "cron", "--every", "7m", "--print")
    assert p.returncode == 65 and "divid" in p.stderr and p.stdout == ""


def test_default_backend(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert invoker.default_backend() == "launchd"
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("PATH", str(tmp_path))  # no systemctl at all
    assert invoker.default_backend() == "cron"
    monkeypatch.setattr(invoker, "_systemd_user_usable", lambda probe: True)
    assert invoker.default_backend() == "systemd"


def test_installed_command_is_absolute(env):
    argv = invoker.kmpwm_argv()
    assert os.path.isabs(argv[0])
    assert argv == [argv[0]] or argv[1:] == ["-m", "kmpwm"]


# -- --print -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["cron", "launchd", "systemd"])
def test_print_changes_nothing_and_runs_nothing(env, backend):
    p = cli("--home", str(env.kh), "schedule", "install", "--backend", backend, "--print")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    if backend == "cron":
        lines = out.splitlines()
        assert lines[0] == f"{CRON_BEGIN} home={env.kh}" and lines[2] == f"{CRON_END} home={env.kh}"
        assert lines[1].startswith("* * * * * KMPWM_HOME=") and lines[1].endswith(" run-due")
        assert shlex.split(lines[1][len("* * * * * ") :])[0] == f"KMPWM_HOME={env.kh}"
    elif backend == "launchd":
        doc = plistlib.loads(out.encode())
        assert doc["Label"].startswith("dev.kmpwm.running.runner.")
        assert doc["ProgramArguments"][-1] == "run-due" and os.path.isabs(doc["ProgramArguments"][0])
        assert doc["EnvironmentVariables"] == {"KMPWM_HOME": str(env.kh)}
        assert doc["StartInterval"] == 60 and doc["RunAtLoad"] is False
        assert doc["StandardOutPath"].startswith(str(env.kh / "logs"))
    else:
        assert f"# {env.xdg}/systemd/user/kmpwm-run-due-" in out
        assert "Type=oneshot" in out and "OnUnitActiveSec=1min" in out and "Persistent=true" in out
        assert f'Environment="KMPWM_HOME={env.kh}"' in out
    assert "nothing was changed" in p.stderr
    # nothing written, no command run (the fakes would have logged)
    assert env.calls() == []
    assert not env.crontab.exists() and not (env.home / "Library").exists() and not env.xdg.exists()
    assert not (env.kh / "logs").exists()


@pytest.mark.parametrize("backend", ["cron", "launchd", "systemd"])
def test_print_json_and_uninstall_print(env, backend):
    p = cli("--home", str(env.kh), "schedule", "install", "--backend", backend, "--every", "5m", "--print", "--json")
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["backend"] == backend and doc["action"] == "printed" and "run-due" in doc["entry"]
    assert (doc["path"] is None) == (backend == "cron")
    p = cli("--home", str(env.kh), "schedule", "uninstall", "--backend", backend, "--print")
    assert p.returncode == 0, p.stderr
    assert "would" in p.stderr
    assert env.calls() == []


def test_print_works_without_any_backend_program(env, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for backend in ("cron", "launchd", "systemd"):
        p = cli(
            "--home",
            str(env.kh),
            "schedule",
            "status",
            "--backend",
            backend,
            "--print",
            env_extra={"PATH": str(empty), "KMPWM_CRONTAB": ""},
        )
        assert p.returncode == 0 and "run-due" in p.stdout, p.stderr


def test_missing_programs_exit_69(env, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    extra = {"PATH": str(empty), "KMPWM_CRONTAB": ""}
    for backend, name in (("cron", "crontab"), ("launchd", "launchctl"), ("systemd", "systemctl")):
        p = cli("--home", str(env.kh), "schedule", "install", "--backend", backend, env_extra=extra)
        assert p.returncode == 69, (backend, p.stderr)
        assert name in p.stderr and "Traceback" not in p.stderr
        assert len(p.stderr.strip().splitlines()) <= 2


# -- cron (fake crontab) -------------------------------------------------------------------------

OTHER = b"# my own jobs\nMAILTO=me@example.org\n0 3 * * * /usr/bin/backup --all  \t# trailing\r\n"


def test_cron_install_idempotent_keeps_other_lines(env, capsys):
    env.crontab.write_bytes(OTHER + b"*/5 * * * * /bin/echo tail-without-newline")
    code, doc = run(env.paths, "install", "cron", capsys=capsys)
    assert code == 0 and doc["action"] == "installed" and doc["backend"] == "cron" and doc["path"] is None
    first = env.crontab.read_bytes()
    assert first.startswith(OTHER + b"*/5 * * * * /bin/echo tail-without-newline\n")
    assert first.count(CRON_BEGIN.encode()) == 1
    code, doc = run(env.paths, "install", "cron", capsys=capsys)
    assert doc["action"] == "unchanged" and env.crontab.read_bytes() == first
    assert sum(c == "crontab -" for c in env.calls()) == 1  # the second install wrote nothing

    code, doc = run(env.paths, "install", "cron", every="15m", capsys=capsys)
    assert doc["action"] == "installed" and doc["entry"].startswith("*/15 * * * * ")
    text = env.crontab.read_bytes()
    assert text.count(CRON_BEGIN.encode()) == 1 and b"\n* * * * * " not in text
    assert text.startswith(OTHER)

    code, doc = run(env.paths, "uninstall", "cron", capsys=capsys)
    assert doc["action"] == "removed" and "run-due" in doc["entry"]
    assert env.crontab.read_bytes() == OTHER + b"*/5 * * * * /bin/echo tail-without-newline\n"
    code, doc = run(env.paths, "uninstall", "cron", capsys=capsys)
    assert doc["action"] == "absent"


def test_cron_two_homes_side_by_side(env, tmp_path, capsys):
    other_home = tmp_path / "second"
    other_home.mkdir(mode=0o700)
    p2 = resolve(str(other_home))
    run(env.paths, "install", "cron", capsys=capsys)
    run(p2, "install", "cron", every="1h", capsys=capsys)
    text = env.crontab.read_text()
    assert text.count(CRON_BEGIN) == 2 and f"home={env.kh}" in text and f"home={other_home}" in text
    run(env.paths, "uninstall", "cron", capsys=capsys)
    text = env.crontab.read_text()
    assert text.count(CRON_BEGIN) == 1 and f"home={other_home}" in text and f"home={env.kh}\n" not in text
    code, doc = run(p2, "status", "cron", capsys=capsys)
    assert doc["installed"] is True and doc["entry"].startswith("0 * * * * ")
    run(p2, "uninstall", "cron", capsys=capsys)
    assert not env.crontab.exists()  # nothing left: the crontab is removed, as before the install


def test_cron_line_quoting(env, tmp_path, capsys):
    odd = tmp_path / "it's 100% mine"
    odd.mkdir(mode=0o700)
    code, doc = run(resolve(str(odd)), "install", "cron", capsys=capsys)
    line = doc["entry"]
    assert "\\%" in line  # cron would cut the command at a bare %
    words = shlex.split(line[len("* * * * * ") :].replace("\\%", "%"))
    assert words[0] == f"KMPWM_HOME={odd}" and words[-1] == "run-due"


def test_cron_failing_crontab_is_one_line_exit_70(env, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_CRONTAB_FAIL", "1")
    with pytest.raises(KmpwmError) as info:
        run(env.paths, "install", "cron", capsys=capsys)
    assert info.value.exit_code == 70 and "permission denied" in info.value.message
    p = cli("schedule", "install", "--backend", "cron", env_extra={"FAKE_CRONTAB_FAIL": "1"})
    assert p.returncode == 70 and "Traceback" not in p.stderr


def test_status_json_with_last_run(env, capsys):
    code, doc = run(env.paths, "status", "cron", capsys=capsys)
    assert code == 0 and doc == {
        "backend": "cron",
        "installed": False,
        "entry": None,
        "last_run_at": None,
        "path": None,
        "serve": {"installed": False, "entry": None, "path": None, "running": []},
    }
    runners = env.kh / "journal" / "runners"
    runners.mkdir(parents=True)
    (runners / "last-run").touch()
    os.utime(runners / "last-run", (1_700_000_000, 1_700_000_000))
    run(env.paths, "install", "cron", capsys=capsys)
    code, doc = run(env.paths, "status", "cron", capsys=capsys)
    assert doc["installed"] is True and doc["last_run_at"] == "2023-11-14T22:13:20Z" and "run-due" in doc["entry"]
    code, text = run(env.paths, "status", "cron", as_json=False, capsys=capsys)
    assert "installed" in text and "2023-11-14T22:13:20Z" in text and len(text.splitlines()) == 3
    assert text.splitlines()[2] == "no serve is running for this home"  # SPEC 13: status says whether


# -- cron (the real crontab binary) --------------------------------------------------------


@pytest.mark.skipif(shutil.which("crontab") is None, reason="no crontab program")
def test_real_crontab_end_to_end(tmp_path):
    crontab = shutil.which("crontab")
    saved = subprocess.run([crontab, "-l"], capture_output=True, timeout=10)
    had = saved.returncode == 0
    if not had and b"no crontab for" not in saved.stderr:
        pytest.skip(f"crontab -l unusable here: {saved.stderr.decode().strip()}")
    kh = tmp_path / "real home"
    kh.mkdir(mode=0o700)
    environ = {k: v for k, v in os.environ.items() if k != "KMPWM_CRONTAB"}
    mine = b"# kmpwm test: someone else's lines\n17 4 * * * /bin/true  \t# keep exactly\n"
    try:
        subprocess.run([crontab, "-"], input=mine, check=True, timeout=10)
        for _ in range(2):
            p = cli("schedule", "install", "--backend", "cron", "--json", home=kh, env_extra=environ)
            assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["action"] == "unchanged"
        now = subprocess.run([crontab, "-l"], capture_output=True, check=True, timeout=10).stdout
        assert now.startswith(mine) and now.count(CRON_BEGIN.encode()) == 1
        p = cli("schedule", "status", "--backend", "cron", "--json", home=kh, env_extra=environ)
        assert json.loads(p.stdout)["installed"] is True
        p = cli("schedule", "uninstall", "--backend", "cron", "--json", home=kh, env_extra=environ)
        assert p.returncode == 0 and json.loads(p.stdout)["action"] == "removed"
        assert subprocess.run([crontab, "-l"], capture_output=True, check=True, timeout=10).stdout == mine
    finally:
        if had:
            subprocess.run([crontab, "-"], input=saved.stdout, check=True, timeout=10)
        else:
            subprocess.run([crontab, "-r"], capture_output=True, timeout=10)
    after = subprocess.run([crontab, "-l"], capture_output=True, timeout=10)
    assert after.returncode == saved.returncode and after.stdout == saved.stdout


# -- launchd (fake launchctl) --------------------------------------------------------------


def test_launchd_install_reinstall_uninstall(env, monkeypatch, capsys):
    code, doc = run(env.paths, "install", "launchd", every="2m", capsys=capsys)
    assert code == 0 and doc["action"] == "installed"
    plist = Path(doc["path"])
    assert plist.parent == env.home / "Library" / "LaunchAgents" and plist.name.startswith("dev.kmpwm.running.runner.")
    data = plistlib.loads(plist.read_bytes())
    label = data["Label"]
    assert plist.name == f"{label}.plist"
    assert data["ProgramArguments"][-1] == "run-due" and os.path.isabs(data["ProgramArguments"][0])
    assert data["EnvironmentVariables"] == {"KMPWM_HOME": str(env.kh)}
    assert data["StartInterval"] == 120 and data["RunAtLoad"] is False
    assert (env.kh / "logs").is_dir()  # launchd needs the directory of StandardOutPath
    uid = os.getuid()
    assert env.calls() == [f"launchctl print gui/{uid}/{label}", f"launchctl bootstrap gui/{uid} {plist}"]

    monkeypatch.setenv("FAKE_LAUNCHCTL_PRINT_RC", "0")  # now loaded
    env.log.unlink()
    code, doc = run(env.paths, "install", "launchd", every="2m", capsys=capsys)
    assert doc["action"] == "unchanged" and env.calls() == [f"launchctl print gui/{uid}/{label}"]

    env.log.unlink()
    code, doc = run(env.paths, "install", "launchd", every="5m", capsys=capsys)
    assert doc["action"] == "installed" and plistlib.loads(plist.read_bytes())["StartInterval"] == 300
    assert env.calls() == [
        f"launchctl print gui/{uid}/{label}",
        f"launchctl bootout gui/{uid}/{label}",
        f"launchctl bootstrap gui/{uid} {plist}",
    ]

    code, doc = run(env.paths, "status", "launchd", capsys=capsys)
    assert doc["installed"] is True and doc["path"] == str(plist) and "KMPWM_HOME=" in doc["entry"]

    env.log.unlink()
    code, doc = run(env.paths, "uninstall", "launchd", capsys=capsys)
    assert doc["action"] == "removed" and not plist.exists()
    assert env.calls() == [f"launchctl bootout gui/{uid}/{label}"]
    code, doc = run(env.paths, "uninstall", "launchd", capsys=capsys)
    assert doc["action"] == "absent"


def test_launchd_bootstrap_fallback_to_load(env, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_LAUNCHCTL_BOOTSTRAP_FAIL", "1")
    code, doc = run(env.paths, "install", "launchd", capsys=capsys)
    assert doc["action"] == "installed"
    assert env.calls()[-1] == f"launchctl load -w {doc['path']}"


# -- systemd (fake systemctl) --------------------------------------------------------------


def test_systemd_install_reinstall_uninstall(env, monkeypatch, capsys):
    code, doc = run(env.paths, "install", "systemd", every="90s", capsys=capsys)
    assert code == 0 and doc["action"] == "installed"
    unit_dir = env.xdg / "systemd" / "user"
    timer = Path(doc["path"])
    service = timer.with_suffix(".service")
    assert timer.parent == unit_dir and timer.name.startswith("kmpwm-run-due-") and timer.suffix == ".timer"
    s = service.read_text()
    assert "Type=oneshot" in s and f'Environment="KMPWM_HOME={env.kh}"' in s
    exec_line = next(ln for ln in s.splitlines() if ln.startswith("ExecStart="))
    assert os.path.isabs(shlex.split(exec_line[len("ExecStart=") :])[0]) and exec_line.endswith(" run-due")
    t = timer.read_text()
    for want in (
        "OnBootSec=1min",
        "OnUnitActiveSec=90s",
        "Persistent=true",
        f"Unit={service.name}",
        "WantedBy=timers.target",
    ):
        assert want in t
    assert env.calls() == [
        "systemctl --user show-environment",
        "systemctl --user daemon-reload",
        f"systemctl --user enable --now {timer.name}",
    ]

    monkeypatch.setenv("FAKE_SYSTEMCTL_ACTIVE_RC", "0")
    env.log.unlink()
    code, doc = run(env.paths, "install", "systemd", every="90s", capsys=capsys)
    assert doc["action"] == "unchanged"
    assert not any("daemon-reload" in c or "enable" == c.split()[2] for c in env.calls())

    env.log.unlink()
    code, doc = run(env.paths, "install", "systemd", every="1h", capsys=capsys)
    assert doc["action"] == "installed" and "OnUnitActiveSec=1h" in timer.read_text()
    assert env.calls()[-3:] == [
        "systemctl --user daemon-reload",
        f"systemctl --user enable --now {timer.name}",
        f"systemctl --user restart {timer.name}",
    ]

    code, doc = run(env.paths, "status", "systemd", capsys=capsys)
    assert doc["installed"] is True and doc["entry"].startswith(f"KMPWM_HOME={shlex.quote(str(env.kh))} ")

    env.log.unlink()
    code, doc = run(env.paths, "uninstall", "systemd", capsys=capsys)
    assert doc["action"] == "removed" and not timer.exists() and not service.exists()
    assert env.calls() == [f"systemctl --user disable --now {timer.name}", "systemctl --user daemon-reload"]
    code, doc = run(env.paths, "uninstall", "systemd", capsys=capsys)
    assert doc["action"] == "absent"


def test_systemd_without_user_manager_is_69_and_writes_nothing(env, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_SYSTEMCTL_NO_BUS", "1")
    with pytest.raises(OsPolicy, match="user manager"):
        run(env.paths, "install", "systemd", capsys=capsys)
    assert not env.xdg.exists()


def test_systemd_enable_failure_rolls_back(env, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_SYSTEMCTL_ENABLE_FAIL", "1")
    with pytest.raises(KmpwmError) as info:
        run(env.paths, "install", "systemd", capsys=capsys)
    assert info.value.exit_code == 70 and "enable" in info.value.message
    assert list((env.xdg / "systemd" / "user").glob("kmpwm-run-due*")) == []


def test_systemd_default_home_uses_home_config(env, monkeypatch, capsys):
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.delenv("KMPWM_HOME")
    code, doc = run(resolve(None), "install", "systemd", print_only=True, capsys=capsys)
    assert doc["path"] == str(env.home / ".config" / "systemd" / "user" / "kmpwm-run-due.timer")
    assert "KMPWM_HOME" not in doc["entry"]


# -- invoker_status (for doctor) --------------------------------------------------------------


def test_invoker_status(env, capsys):
    st = invoker_status(env.paths)
    assert st["installed"] is False and st["backend"] is None and set(st["backends"]) == {"cron", "launchd", "systemd"}
    run(env.paths, "install", "systemd", capsys=capsys)
    env.log.unlink()
    st = invoker_status(env.paths)
    assert st["installed"] is True and st["backend"] == "systemd" and st["path"].endswith(".timer")
    assert [c for c in env.calls() if not c.startswith("crontab")] == []  # files only for systemd/launchd
    st = invoker_status(resolve(str(env.kh / "elsewhere")))  # another home: not installed
    assert st["installed"] is False


# -- --mode serve (SPEC section 13) ---------------------------------------------------------


def run_mode(paths, action, backend, mode, print_only=False, capsys=None):
    code = schedule_command(paths, action, backend, None, print_only, True, mode)
    return code, json.loads(capsys.readouterr().out)


def test_systemd_mode_serve_adds_a_restarting_service_and_keeps_the_timer(env, monkeypatch, capsys):
    code, doc = run_mode(env.paths, "install", "systemd", "serve", capsys=capsys)
    assert code == 0 and doc["action"] == "installed" and doc["serve"]["action"] == "installed"
    timer = Path(doc["path"])
    unit = Path(doc["serve"]["path"])
    assert timer.exists() and unit.name.startswith("kmpwm-serve-") and unit.suffix == ".service"
    text = unit.read_text()
    for want in (
        "Type=simple",
        "Restart=on-failure",
        "KillMode=mixed",
        "WantedBy=default.target",
        f'Environment="KMPWM_HOME={env.kh}"',
    ):
        assert want in text
    exec_line = next(ln for ln in text.splitlines() if ln.startswith("ExecStart="))
    assert exec_line.endswith(" serve")
    assert f"systemctl --user enable --now {unit.name}" in env.calls()

    monkeypatch.setenv("FAKE_SYSTEMCTL_ACTIVE_RC", "0")
    env.log.unlink()
    code, doc = run_mode(env.paths, "install", "systemd", "serve", capsys=capsys)
    assert doc["action"] == "unchanged" and doc["serve"]["action"] == "unchanged"
    assert not any("enable" == c.split()[2] for c in env.calls())

    code, doc = run(env.paths, "status", "systemd", capsys=capsys)
    assert doc["serve"]["installed"] is True and doc["serve"]["entry"].endswith(" serve")

    code, doc = run_mode(env.paths, "install", "systemd", "minute", capsys=capsys)  # back to the timer alone
    assert doc["serve"]["action"] == "removed" and not unit.exists() and timer.exists()
    run_mode(env.paths, "install", "systemd", "serve", capsys=capsys)
    env.log.unlink()
    code, doc = run(env.paths, "uninstall", "systemd", capsys=capsys)
    assert doc["action"] == "removed" and doc["serve"]["action"] == "removed"
    assert not unit.exists() and not timer.exists()
    assert f"systemctl --user disable --now {unit.name}" in env.calls()


def test_launchd_mode_serve_is_a_keepalive_agent(env, capsys):
    code, doc = run_mode(env.paths, "install", "launchd", "serve", capsys=capsys)
    assert doc["action"] == "installed" and doc["serve"]["action"] == "installed"
    data = plistlib.loads(Path(doc["serve"]["path"]).read_bytes())
    assert data["KeepAlive"] is True and data["RunAtLoad"] is True and data["ProgramArguments"][-1] == "serve"
    assert "StartInterval" not in data
    assert plistlib.loads(Path(doc["path"]).read_bytes())["StartInterval"] == 60  # the fallback stays
    code, doc = run(env.paths, "uninstall", "launchd", capsys=capsys)
    assert doc["serve"]["action"] == "removed" and doc["action"] == "removed"


@pytest.mark.parametrize("backend", ["cron", "launchd", "systemd"])
def test_mode_serve_print_shows_both_and_changes_nothing(env, backend, capsys):
    code, doc = run_mode(env.paths, "install", backend, "serve", print_only=True, capsys=capsys)
    assert code == 0 and "run-due" in doc["text"] and "serve" in doc["serve"]["entry"]
    assert "serve" in doc["text"].replace("serve.log", "")
    if backend == "cron":
        assert "\n@reboot " in doc["text"] and doc["serve"]["entry"].startswith("@reboot ")
    assert env.calls() == [] and not env.crontab.exists() and not env.xdg.exists()


def test_cron_mode_serve_reboot_line_starts_serve_and_uninstall_stops_it(env, capsys):
    from kmpwm.running.serve import running_serves

    kmpwm_home = env.kh
    (kmpwm_home / "journal").mkdir(mode=0o700, exist_ok=True)
    try:
        code, doc = run_mode(env.paths, "install", "cron", "serve", capsys=capsys)
        assert doc["serve"]["action"] == "installed" and doc["serve"]["started"]
        text = env.crontab.read_text()
        assert "* * * * * " in text and "\n@reboot " in text and " serve >>" in text
        deadline = __import__("time").monotonic() + 30
        while not running_serves(env.paths) and __import__("time").monotonic() < deadline:
            __import__("time").sleep(0.1)
        assert [x["pid"] for x in running_serves(env.paths)] == [doc["serve"]["started"]]
        code, doc = run_mode(env.paths, "install", "cron", "serve", capsys=capsys)  # idempotent
        assert doc["action"] == "unchanged" and "started" not in doc["serve"] and env.crontab.read_text() == text
        code, st = run(env.paths, "status", "cron", capsys=capsys)
        assert st["serve"]["installed"] is True and st["serve"]["entry"].startswith("@reboot ")
        assert st["entry"].startswith("* * * * * ") and len(st["serve"]["running"]) == 1
        code, doc = run(env.paths, "uninstall", "cron", capsys=capsys)
        assert doc["action"] == "removed" and doc["serve"]["stopped"]
        assert not env.crontab.exists() or "kmpwm" not in env.crontab.read_text()
    finally:
        import signal as _signal

        for x in running_serves(env.paths):
            os.kill(x["pid"], _signal.SIGTERM)
