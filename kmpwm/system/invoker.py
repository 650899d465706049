"""The periodic ``run-due`` invoker: ``kmpwm schedule install|uninstall|status`` (SPEC section 6).

Three backends, one entry per kmpwm home (``KMPWM_HOME`` / ``--home``, or the default layout):

* **cron** – a marked block in the user's crontab, edited through ``crontab -l`` / ``crontab -``;
  every other byte of the crontab is kept.  ``KMPWM_CRONTAB`` names the crontab program
  (default ``crontab``), so tests can point it at a fake.
* **launchd** – ``~/Library/LaunchAgents/dev.kmpwm.running.runner[.<hash>].plist``, loaded with
  ``launchctl bootstrap gui/<uid>`` (fallback ``launchctl load -w``).
* **systemd** – ``$XDG_CONFIG_HOME/systemd/user/kmpwm-run-due[-<hash>].{service,timer}``, enabled
  with ``systemctl --user enable --now``.

``<hash>`` is a short hash of the home directory; the default layout has no suffix, so two homes can
be installed side by side and ``uninstall`` removes only the current home's entry.  The installed
command is the absolute path of this kmpwm (its console script when it belongs to the running
Python environment, else ``python -m kmpwm``) and carries the home in ``KMPWM_HOME`` (or, for the
default layout, the ``XDG_*_HOME`` variables set now, so that cron finds the same journal).

``--print`` shows what would be written or removed and runs no command at all.  Every subprocess
gets an argv list and a timeout; failures become one-line :class:`KmpwmError` messages.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import plistlib
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kmpwm.core.exitcodes import FAILED_UNKNOWN, InvalidParams, KmpwmError, OsPolicy
from kmpwm.core.timeparse import format_duration, iso, parse_duration

BACKENDS = ("cron", "launchd", "systemd")
ACTIONS = ("install", "uninstall", "status")
MODES = ("minute", "serve")
DEFAULT_EVERY = 60.0
MIN_EVERY = 60.0

CRON_BEGIN = "# BEGIN kmpwm (managed by kmpwm schedule; do not edit)"
CRON_END = "# END kmpwm"
LAUNCHD_LABEL = "dev.kmpwm.running.runner"
SYSTEMD_NAME = "kmpwm-run-due"
LAUNCHD_SERVE_LABEL = "dev.kmpwm.running.serve"
SYSTEMD_SERVE_NAME = "kmpwm-serve"

CRON_TIMEOUT = 10.0
LAUNCHCTL_TIMEOUT = 15.0
SYSTEMCTL_TIMEOUT = 30.0
PROBE_TIMEOUT = 2.0

# With the default layout (no KMPWM_HOME) platformdirs reads these on Linux; cron and the service
# managers do not inherit a login shell's values, so the ones set now are baked into the entry.
_XDG_VARS = ("XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_STATE_HOME")


class InvokerError(KmpwmError):
    """A backend command failed (exit 70)."""

    exit_code = FAILED_UNKNOWN


# -- what to run ---------------------------------------------------------------------------


def _scripts_dir() -> Path | None:
    """The running Python environment's scripts directory (None: it has none)."""
    try:
        return Path(os.path.abspath(sysconfig.get_path("scripts")))
    except (KeyError, TypeError):
        return None


def _script_in_env(script: Path) -> bool:
    """Whether a ``kmpwm`` console script belongs to the running Python environment."""
    exe_dir = Path(os.path.abspath(sys.executable)).parent
    dirs = {exe_dir, _scripts_dir()}  # (a None there matches no parent)
    candidates = {Path(os.path.abspath(script))}
    try:
        candidates.add(script.resolve())
    except OSError:
        pass
    if any(c.parent in dirs for c in candidates):
        return True
    interp = _shebang_interpreter(script)  # e.g. a pipx symlink, or a copy elsewhere
    return interp is not None and Path(os.path.abspath(interp)).parent == exe_dir


def _shebang_interpreter(script: Path) -> str | None:
    """The interpreter the ``#!`` line of ``script`` names (None: no such line, or unreadable)."""
    try:
        with open(script, "rb") as fh:
            first = fh.readline(4096)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    try:
        return shlex.split(first[2:].decode(errors="replace"))[0]
    except (ValueError, IndexError):
        return None


def _script_candidates() -> list[Path]:
    """Where a ``kmpwm`` console script may be: on PATH, then in the environment's scripts directory."""
    found = shutil.which("kmpwm")
    candidates = [Path(os.path.abspath(found))] if found else []
    scripts = _scripts_dir()
    if scripts is not None:
        candidates.append(scripts / ("kmpwm.exe" if os.name == "nt" else "kmpwm"))
    return candidates


def kmpwm_argv() -> list[str]:
    """The absolute command that runs this kmpwm (without the subcommand)."""
    for script in _script_candidates():
        if script.is_file() and os.access(script, os.X_OK) and _script_in_env(script):
            return [str(script)]
    if not sys.executable:
        raise InvokerError(
            "cannot tell which Python runs kmpwm (sys.executable is empty)",
            hint="install kmpwm with pip or pipx so that a `kmpwm` command exists",
        )
    return [os.path.abspath(sys.executable), "-m", "kmpwm"]


class _Target:
    """What this home's invoker runs, and the names that keep homes apart."""

    def __init__(self, paths, sub: str = "run-due"):
        self.paths = paths
        self.sub = sub  # the subcommand it runs: run-due, or serve
        self.home = str(paths.home) if paths.home is not None else None
        self.suffix = hashlib.sha256(self.home.encode()).hexdigest()[:8] if self.home else None
        self._argv: list[str] | None = None

    @property
    def home_label(self) -> str:
        return self.home if self.home is not None else "default"

    @property
    def argv(self) -> list[str]:
        if self._argv is None:
            self._argv = kmpwm_argv() + [self.sub]
        return self._argv

    @property
    def env(self) -> dict[str, str]:
        fleet = _fleet_env()
        if self.home is not None:
            return {"KMPWM_HOME": self.home, **fleet}
        if sys.platform == "darwin" or os.name == "nt":
            return fleet
        return {**_xdg_env(), **fleet}

    def command(self) -> str:
        """The invocation as a /bin/sh command line."""
        return _shell_command(self.env, self.argv)


def _xdg_env() -> dict[str, str]:
    """The ``_XDG_VARS`` set now to an absolute path."""
    return {k: os.environ[k] for k in _XDG_VARS if os.environ.get(k, "").startswith("/")}


def _fleet_env() -> dict[str, str]:
    """``KMPWM_STORE`` and ``KMPWM_HOST`` of the installing command (SPEC section 14: one
    ``schedule install`` per machine with ``KMPWM_STORE``), carried into the invoker.  A store URL
    holding a password is refused: the entry is printed (``--print``, ``schedule status``) and
    lives in a crontab or unit file; the password belongs in ``~/.pgpass``."""
    out = {}
    store = os.environ.get("KMPWM_STORE", "").strip()
    if store:
        _refuse_password(store)
        out["KMPWM_STORE"] = store
    if os.environ.get("KMPWM_HOST"):
        out["KMPWM_HOST"] = os.environ["KMPWM_HOST"]
    return out


def _refuse_password(store: str) -> None:
    """ConfigError when the store URL holds a password (:func:`_fleet_env` says why)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(store)
        secret = parts.password is not None or "password=" in parts.query.lower()
    except ValueError:
        return
    if secret:
        from kmpwm.core.exitcodes import ConfigError
        from kmpwm.storage.pgstore import mask

        raise ConfigError(
            f"the store URL {mask(store)} holds a password, which the invoker's entry would show",
            hint="put the password in ~/.pgpass (mode 0600) and give the URL without it",
        )


def _shell_command(env: dict[str, str], argv: list[str]) -> str:
    parts = [f"{k}={shlex.quote(v)}" for k, v in env.items()] + [shlex.quote(a) for a in argv]
    return " ".join(parts)


def _no_newlines(text: str, what: str) -> None:
    if "\n" in text or "\r" in text or "\0" in text:
        raise InvalidParams(
            f"{what} contains a newline or NUL character; {text!r} cannot be written into a crontab or unit file",
            hint="use a --home without such characters",
        )


# -- choices -----------------------------------------------------------------------------


def _systemd_user_usable(probe: bool) -> bool:
    if shutil.which("systemctl") is None or not os.path.isdir("/run/systemd/system"):
        return False
    if not probe:  # --print runs no command
        return _user_manager_dir()
    try:
        proc = subprocess.run(
            ["systemctl", "--user", "show-environment"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=PROBE_TIMEOUT,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0


def _user_manager_dir() -> bool:
    """Does the user manager's runtime directory look like one (its ``systemd`` or ``bus``)?"""
    runtime = os.environ.get("XDG_RUNTIME_DIR") or (f"/run/user/{os.getuid()}" if hasattr(os, "getuid") else "")
    return bool(runtime) and (
        os.path.exists(os.path.join(runtime, "systemd")) or os.path.exists(os.path.join(runtime, "bus"))
    )


def default_backend(probe: bool = True) -> str:
    """macOS: launchd; Linux: systemd when ``systemctl --user`` works, else cron; elsewhere cron."""
    if sys.platform == "darwin":
        return "launchd"
    if sys.platform.startswith("linux") and _systemd_user_usable(probe):
        return "systemd"
    return "cron"


def _pick_backend(backend: str | None, probe: bool) -> str:
    if backend is None or backend == "":
        return default_backend(probe)
    name = backend.strip().lower()
    if name not in BACKENDS:
        raise InvalidParams(f"unknown backend {backend!r}: expected cron, launchd or systemd")
    return name


_CRON_MINUTES = [m for m in range(1, 61) if 60 % m == 0]
_CRON_HOURS = [h for h in range(1, 25) if 24 % h == 0]
# the periods cron can express (seconds): every N minutes with N dividing 60, every N hours with N dividing 24
_CRON_PERIODS = {60 * m for m in _CRON_MINUTES} | {3600 * h for h in _CRON_HOURS}
_CRON_CHOICES = (
    f"cron can run every N minutes with N dividing 60 ({', '.join(f'{m}m' for m in _CRON_MINUTES[:-1])}) "
    f"or every N hours with N dividing 24 ({', '.join(f'{h}h' for h in _CRON_HOURS)})"
)


def parse_every(every: str | None, backend: str) -> int:
    """``--every`` in whole seconds (default 60s, at least 60s; cron needs a value it can express)."""
    seconds = DEFAULT_EVERY if every is None else parse_duration(every, what="--every")
    if seconds < MIN_EVERY:
        raise InvalidParams(f"invalid --every {every!r}: must be at least 1m (60s)")
    if seconds != int(seconds):
        raise InvalidParams(f"invalid --every {every!r}: must be a whole number of seconds")
    if backend == "cron" and seconds not in _CRON_PERIODS:
        raise InvalidParams(
            f"invalid --every {every!r} for cron: {_CRON_CHOICES}",
            hint="pick one of those, or use --backend systemd/launchd for any interval",
        )
    return int(seconds)


def cron_schedule(seconds: int) -> str:
    minutes = seconds // 60
    if minutes == 1:
        return "* * * * *"
    if minutes < 60:
        return f"*/{minutes} * * * *"
    hours = minutes // 60
    if hours == 1:
        return "0 * * * *"
    if hours == 24:
        return "0 0 * * *"
    return f"0 */{hours} * * *"


# -- running commands --------------------------------------------------------------------


def _run(argv: list[str], *, timeout: float, input: bytes | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, LC_ALL="C", LANG="C")
    try:
        return subprocess.run(
            argv,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        raise InvokerError(f"`{shlex.join(argv)}` did not finish within {timeout:g}s") from None
    except FileNotFoundError:
        raise OsPolicy(f"{argv[0]} not found") from None
    except OSError as exc:
        raise InvokerError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None


def _stderr_line(proc: subprocess.CompletedProcess) -> str:
    text = (proc.stderr or b"").decode(errors="replace").strip() or (proc.stdout or b"").decode(
        errors="replace"
    ).strip()
    return text.splitlines()[-1].strip() if text else f"exit status {proc.returncode}"


def _write_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except OSError as exc:
        raise InvokerError(f"cannot write {path}: {exc.strerror or exc}") from None


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise InvokerError(f"cannot read {path}: {exc.strerror or exc}") from None


def _remove(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise InvokerError(f"cannot remove {path}: {exc.strerror or exc}") from None


def _restore(path: Path, old: bytes | None) -> None:
    try:
        if old is None:
            path.unlink(missing_ok=True)
        else:
            _write_file(path, old)
    except (OSError, KmpwmError):
        pass


# -- cron ----------------------------------------------------------------------------------


def _crontab_program() -> str:
    prog = os.environ.get("KMPWM_CRONTAB") or "crontab"
    found = shutil.which(prog)
    if found is None:
        raise OsPolicy(
            f"{prog} not found: the cron backend needs the crontab command",
            hint="install cron (e.g. `apt install cron`), or use --backend systemd/launchd, "
            "or --print to see the entry",
        )
    return found


def _cron_escaped(command: str, what: str) -> str:
    """``command`` as a crontab line holds it (``what`` names it in an error): a ``%`` escaped, as
    cron reads a bare one as a newline."""
    _no_newlines(command, what)
    if "\\%" in command:
        raise InvalidParams(f"{what} {command!r} contains \\% which cron cannot pass through")
    return command.replace("%", chr(92) + "%")


def _block_end(lines: list[bytes], i: int) -> int:
    """Where the block whose BEGIN line is ``lines[i]`` ends (exclusive): after its END line; a
    block that lost its END (another block begins first, or the crontab ends) is the BEGIN line
    and the run-due (and serve) lines right after it."""
    for j in range(i + 1, len(lines)):
        if lines[j].startswith(CRON_END.encode()):
            return j + 1
        if lines[j].startswith(CRON_BEGIN.encode()):
            break  # another block begins: ours lost its END
    return i + 1 + len(list(itertools.takewhile(_is_entry_line, lines[i + 1 :])))


def _outside(lines: list[bytes], blocks: list[tuple[int, int]]) -> list[bytes]:
    """The crontab's text around ``blocks``: before the first, between each two, after the last."""
    starts = [0] + [j for _, j in blocks]
    ends = [i for i, _ in blocks] + [len(lines)]
    return [b"".join(lines[start:end]) for start, end in zip(starts, ends)]


def _is_entry_line(line: bytes) -> bool:
    """A run-due or serve (``@reboot``) line, as a block holds them (not a comment)."""
    return (b"run-due" in line or line.startswith(b"@reboot ")) and not line.startswith(b"#")


def _no_crontab(proc: subprocess.CompletedProcess) -> bool:
    """Did ``crontab`` fail because the user has no crontab?"""
    return b"no crontab for" in (proc.stderr or b"").lower()


class Cron:
    name = "cron"

    def __init__(self, target: _Target, every: int | None, serve: bool = False):
        self.t = target
        self.every = every
        self.serve = serve  # --mode serve: an @reboot line starts `kmpwm serve` too

    @property
    def begin(self) -> str:
        return f"{CRON_BEGIN} home={self.t.home_label}"

    @property
    def end(self) -> str:
        return f"{CRON_END} home={self.t.home_label}"

    def line(self) -> str:
        return f"{cron_schedule(self.every)} {_cron_escaped(self.t.command(), 'the run-due command')}"

    def reboot_line(self) -> str:
        """``@reboot`` + the serve command, its output appended to logs/serve.log."""
        target = _Target(self.t.paths, "serve")
        log = shlex.quote(str(self.t.paths.log_dir / "serve.log"))
        return f"@reboot {_cron_escaped(f'{target.command()} >>{log} 2>&1', 'the serve command')}"

    def block(self) -> str:
        _no_newlines(self.t.home_label, "the home directory")
        reboot = f"{self.reboot_line()}\n" if self.serve else ""
        return f"{self.begin}\n{self.line()}\n{reboot}{self.end}\n"

    # crontab I/O
    def read(self, timeout: float = CRON_TIMEOUT) -> bytes:
        prog = _crontab_program()
        proc = _run([prog, "-l"], timeout=timeout)
        if proc.returncode == 0:
            return proc.stdout
        if _no_crontab(proc):
            return b""
        raise InvokerError(
            f"`crontab -l` failed: {_stderr_line(proc)}",
            hint="check that you may use cron (/etc/cron.allow, /etc/cron.deny)",
        )

    def write(self, data: bytes) -> None:
        prog = _crontab_program()
        if data.strip() == b"":
            proc = _run([prog, "-r"], timeout=CRON_TIMEOUT)
            if proc.returncode == 0 or _no_crontab(proc):
                return
            what = "crontab -r"
        else:
            proc = _run([prog, "-"], timeout=CRON_TIMEOUT, input=data)
            if proc.returncode == 0:
                return
            what = "crontab -"
        raise InvokerError(
            f"`{what}` failed: {_stderr_line(proc)}", hint="your crontab was left as it was; check it with `crontab -l`"
        )

    def find(self, data: bytes) -> tuple[list[bytes], list[tuple[int, int]]]:
        """Split the crontab into lines (with their endings) and locate this home's blocks [i, j)."""
        # bytes.splitlines also splits on \r, \v, \f...: split on \n only, keep everything else
        lines = re.findall(rb"[^\n]*\n|[^\n]+$", data) if data else []
        begin = self.begin.encode()
        blocks = []
        i = 0
        while i < len(lines):
            if lines[i].rstrip(b"\r\n") != begin:
                i += 1
                continue
            j = _block_end(lines, i)
            blocks.append((i, j))
            i = j
        return lines, blocks

    def entry_of(self, lines: list[bytes], block: tuple[int, int]) -> str | None:
        body = [
            ln.rstrip(b"\r\n").decode(errors="replace")
            for ln in lines[block[0] + 1 : block[1]]
            if ln.strip() and not ln.startswith(b"#")
        ]
        return "\n".join(body) or None

    def serve_entry(self, data: bytes | None = None) -> str | None:
        """The @reboot line of this home's block (None: not installed)."""
        lines, blocks = self.find(self.read() if data is None else data)
        for i, j in blocks[:1]:
            for ln in lines[i + 1 : j]:
                if ln.startswith(b"@reboot "):
                    return ln.rstrip(b"\r\n").decode(errors="replace")
        return None

    def install(self) -> dict:
        block = self.block().encode()
        entry = self.line()
        data = self.read()
        lines, blocks = self.find(data)
        if len(blocks) == 1 and b"".join(lines[slice(*blocks[0])]) == block:
            return {"action": "unchanged", "entry": entry, "path": None}
        head, *rest = _outside(lines, blocks)  # the new block goes where the first one was, else last
        if head and not head.endswith(b"\n"):
            head += b"\n"
        self.write(head + block + b"".join(rest))
        return {"action": "installed", "entry": entry, "path": None}

    def uninstall(self) -> dict:
        data = self.read()
        lines, blocks = self.find(data)
        if not blocks:
            return {"action": "absent", "entry": None, "path": None}
        entry = self.entry_of(lines, blocks[0])
        self.write(b"".join(_outside(lines, blocks)))
        return {"action": "removed", "entry": entry, "path": None}

    def status(self, timeout: float = CRON_TIMEOUT) -> dict:
        lines, blocks = self.find(self.read(timeout))
        entry = self.entry_of(lines, blocks[0]) if blocks else None
        if entry:  # the run-due line, not the serve @reboot line after it
            entry = next((e for e in entry.split("\n") if not e.startswith("@reboot ")), entry)
        return {"installed": bool(blocks), "entry": entry, "path": None}

    def printed(self, action: str) -> dict:
        if action == "uninstall":
            text = (
                f"# would remove this home's block from your crontab: the lines from\n"
                f"{self.begin}\n# through\n{self.end}\n"
            )
            note = "would edit the crontab with `crontab -l` and `crontab -` (nothing was changed)"
            return {"text": text, "entry": None, "path": None, "files": None, "note": note}
        return {
            "text": self.block(),
            "entry": self.line(),
            "path": None,
            "files": None,
            "note": "would add (or replace) this block in your crontab (nothing was changed)",
        }


# -- launchd -------------------------------------------------------------------------------


def _launchctl() -> str:
    found = shutil.which("launchctl")
    if found is None:
        raise OsPolicy(
            "launchctl not found: launchd is macOS's service manager",
            hint="use --backend cron or systemd here, or --print to see the plist",
        )
    return found


class Launchd:
    name = "launchd"

    def __init__(self, target: _Target, every: int | None):
        self.t = target
        self.every = every

    @property
    def label(self) -> str:
        return LAUNCHD_LABEL + (f".{self.t.suffix}" if self.t.suffix else "")

    @property
    def path(self) -> Path:
        return Path.home() / "Library" / "LaunchAgents" / f"{self.label}.plist"

    def plist(self) -> dict:
        doc: dict[str, Any] = {"Label": self.label, "ProgramArguments": self.t.argv}
        if self.t.env:
            doc["EnvironmentVariables"] = dict(self.t.env)
        doc.update(self._run_keys())
        return doc

    def _run_keys(self) -> dict:
        """The plist's keys that say when the agent runs, and where its output goes."""
        return {
            "StartInterval": int(self.every),
            "RunAtLoad": False,
            "ProcessType": "Background",
            "StandardOutPath": str(self.t.paths.log_dir / "launchd.out.log"),
            "StandardErrorPath": str(self.t.paths.log_dir / "launchd.err.log"),
        }

    def render(self) -> bytes:
        return plistlib.dumps(self.plist(), fmt=plistlib.FMT_XML, sort_keys=False)

    def _domain(self) -> str:
        return f"gui/{os.getuid()}" if hasattr(os, "getuid") else "gui/0"

    def _loaded(self, prog: str) -> bool:
        return _run([prog, "print", f"{self._domain()}/{self.label}"], timeout=LAUNCHCTL_TIMEOUT).returncode == 0

    def _unload(self, prog: str) -> None:
        proc = _run([prog, "bootout", f"{self._domain()}/{self.label}"], timeout=LAUNCHCTL_TIMEOUT)
        if proc.returncode != 0 and self.path.exists():
            _run([prog, "unload", "-w", str(self.path)], timeout=LAUNCHCTL_TIMEOUT)  # older macOS; not loaded is fine

    def install(self) -> dict:
        prog = _launchctl()
        new = self.render()
        entry = self.t.command()
        old = _read_bytes(self.path)
        loaded = self._loaded(prog)
        if old == new and loaded:
            return {"action": "unchanged", "entry": entry, "path": str(self.path)}
        from kmpwm.storage.paths import ensure_dir

        ensure_dir(self.t.paths.log_dir)  # launchd does not create the log directory
        if loaded:
            self._unload(prog)
        _write_file(self.path, new)
        self._load(prog, old)
        return {"action": "installed", "entry": entry, "path": str(self.path)}

    def _load(self, prog: str, old: bytes | None) -> None:
        """Load the plist just written (``bootstrap``, else the older ``load -w``); if launchctl
        cannot, put back the ``old`` plist (None: there was none)."""
        proc = _run([prog, "bootstrap", self._domain(), str(self.path)], timeout=LAUNCHCTL_TIMEOUT)
        if proc.returncode == 0:
            return
        first = _stderr_line(proc)
        if _run([prog, "load", "-w", str(self.path)], timeout=LAUNCHCTL_TIMEOUT).returncode == 0:
            return
        _restore(self.path, old)
        raise InvokerError(
            f"launchctl could not load {self.path}: {first}",
            hint="run it from a logged-in GUI session, or use --backend cron",
        )

    def uninstall(self) -> dict:
        prog = _launchctl()
        if not self.path.exists():
            return {"action": "absent", "entry": None, "path": str(self.path)}
        entry = self._entry_from_file()
        self._unload(prog)
        _remove(self.path)
        return {"action": "removed", "entry": entry, "path": str(self.path)}

    def _entry_from_file(self) -> str | None:
        try:
            doc = plistlib.loads(self.path.read_bytes())
            return _shell_command(dict(doc.get("EnvironmentVariables") or {}), list(doc["ProgramArguments"]))
        except Exception:
            return None

    def _every_from_file(self) -> int | None:
        try:
            return int(plistlib.loads(self.path.read_bytes())["StartInterval"])
        except Exception:
            return None

    def status(self, timeout: float = 0) -> dict:
        return {
            "installed": self.path.exists(),
            "entry": self._entry_from_file(),  # None when there is no plist
            "path": str(self.path),
            "every": self._every_from_file(),
        }

    def printed(self, action: str) -> dict:
        return self._would_remove() if action == "uninstall" else self._would_install()

    def _would_remove(self) -> dict:
        files = _existing_files([self.path])
        note = (
            f"would run `launchctl bootout {self._domain()}/{self.label}` and remove {self.path}"
            + ("" if files else " (not installed)")
            + " (nothing was changed)"
        )
        return {
            "text": files.get(str(self.path), ""),
            "entry": self._entry_from_file(),  # None when there is no plist
            "path": str(self.path),
            "files": files,
            "note": note,
        }

    def _would_install(self) -> dict:
        text = self.render().decode()
        note = (
            f"would write {self.path} and run `launchctl bootstrap {self._domain()} {self.path}` (nothing was changed)"
        )
        return {
            "text": text,
            "entry": self.t.command(),
            "path": str(self.path),
            "files": {str(self.path): text},
            "note": note,
        }


# -- systemd -------------------------------------------------------------------------------


def _systemctl() -> str:
    found = shutil.which("systemctl")
    if found is None:
        raise OsPolicy(
            "systemctl not found: this system does not run systemd",
            hint="use --backend cron (or launchd on macOS), or --print to see the units",
        )
    return found


def _sd_quote(arg: str, *, exec_line: bool) -> str:
    """Quote one word for a unit file (specifiers and, in Exec lines, variables escaped)."""
    s = arg.replace("%", "%%")
    if exec_line:
        s = s.replace("$", "$$")
    if s and re.fullmatch(r"[A-Za-z0-9_@%+=:,./$-]+", s):
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _sd_unquote(value: str, *, exec_line: bool) -> list[str]:
    words = shlex.split(value)
    out = []
    for w in words:
        w = w.replace("%%", "%")
        out.append(w.replace("$$", "$") if exec_line else w)
    return out


def _sd_span(seconds: int) -> str:
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0:
        return f"{seconds // 60}min"
    return f"{seconds}s"


def _sd_span_seconds(text: str) -> int | None:
    m = re.fullmatch(r"\s*(\d+)\s*(h|min|s)?\s*", text)
    if not m:
        return None
    return int(m.group(1)) * {"h": 3600, "min": 60, "s": 1, None: 1}[m.group(2)]


class Systemd:
    name = "systemd"
    wanted_by = "timers.target"  # enabling the managed unit links it into <wanted_by>.wants/

    def __init__(self, target: _Target, every: int | None):
        self.t = target
        self.every = every

    @property
    def unit(self) -> str:
        return SYSTEMD_NAME + (f"-{self.t.suffix}" if self.t.suffix else "")

    @property
    def directory(self) -> Path:
        base = os.environ.get("XDG_CONFIG_HOME")
        root = Path(base) if base and os.path.isabs(base) else Path.home() / ".config"
        return root / "systemd" / "user"

    @property
    def service_path(self) -> Path:
        return self.directory / f"{self.unit}.service"

    @property
    def timer_path(self) -> Path:
        return self.directory / f"{self.unit}.timer"

    @property
    def timer(self) -> str:
        return f"{self.unit}.timer"

    @property
    def managed_path(self) -> Path:
        """The file of the unit that is enabled, started and reported on: the timer."""
        return self.timer_path

    @property
    def managed(self) -> str:
        return self.managed_path.name

    @property
    def unit_paths(self) -> tuple[Path, ...]:
        """The unit files this backend writes, in the order it writes them."""
        return self.service_path, self.timer_path

    def files(self) -> dict[Path, str]:
        """The unit files to write: path -> text."""
        return dict(zip(self.unit_paths, self.render()))

    def _service_parts(self, what: str) -> tuple[str, str, str]:
        """What a service unit of this target says: its ExecStart command (``what`` names it in an
        error), its ``Environment=`` lines, and `` for KMPWM_HOME=...`` for its descriptions."""
        _no_newlines(self.t.home_label, "the home directory")
        exec_start = " ".join(_sd_quote(a, exec_line=True) for a in self.t.argv)
        _no_newlines(exec_start, what)
        env_lines = "".join(f"Environment={_sd_quote(f'{k}={v}', exec_line=False)}\n" for k, v in self.t.env.items())
        where = f" for KMPWM_HOME={self.t.home}".replace("%", "%%") if self.t.home else ""
        return exec_start, env_lines, where

    def render(self) -> tuple[str, str]:
        exec_start, env_lines, where = self._service_parts("the run-due command")
        service = (
            "# Managed by `kmpwm schedule`; do not edit (kmpwm schedule uninstall removes it).\n"
            "[Unit]\n"
            f"Description=kmpwm run-due: run the due background tasks{where}\n"
            "\n"
            "[Service]\n"
            "Type=oneshot\n"
            f"{env_lines}"
            f"ExecStart={exec_start}\n"
        )
        timer = (
            "# Managed by `kmpwm schedule`; do not edit (kmpwm schedule uninstall removes it).\n"
            "[Unit]\n"
            f"Description=Run kmpwm run-due every {format_duration(self.every)}{where}\n"
            "\n"
            "[Timer]\n"
            "OnBootSec=1min\n"
            f"OnUnitActiveSec={_sd_span(self.every)}\n"
            "AccuracySec=1s\n"
            "Persistent=true\n"
            f"Unit={self.unit}.service\n"
            "\n"
            "[Install]\n"
            "WantedBy=timers.target\n"
        )
        return service, timer

    def _check_user_manager(self, prog: str) -> None:
        proc = _run([prog, "--user", "show-environment"], timeout=PROBE_TIMEOUT + 3)
        if proc.returncode != 0:
            raise OsPolicy(
                f"no systemd user manager is reachable (`systemctl --user`: {_stderr_line(proc)})",
                hint="log in to a session with a user manager (or `loginctl enable-linger $USER`), "
                "or use --backend cron",
            )

    def _sc(self, prog: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = _run([prog, "--user", *args], timeout=SYSTEMCTL_TIMEOUT)
        if check and proc.returncode != 0:
            raise InvokerError(
                f"`systemctl --user {' '.join(args)}` failed: {_stderr_line(proc)}",
                hint="see `journalctl --user -xe`; or use --backend cron",
            )
        return proc

    def _enabled_and_active(self, prog: str) -> bool:
        unit = self.managed
        return (
            self._sc(prog, "is-enabled", "--quiet", unit, check=False).returncode == 0
            and self._sc(prog, "is-active", "--quiet", unit, check=False).returncode == 0
        )

    def install(self) -> dict:
        prog = _systemctl()
        new = {path: text.encode() for path, text in self.files().items()}
        entry = self.t.command()
        self._check_user_manager(prog)
        old = {path: _read_bytes(path) for path in new}
        if old == new and self._enabled_and_active(prog):
            return {"action": "unchanged", "entry": entry, "path": str(self.managed_path)}
        self._replace(prog, old, new)
        return {"action": "installed", "entry": entry, "path": str(self.managed_path)}

    def _replace(self, prog: str, old: dict[Path, bytes | None], new: dict[Path, bytes]) -> None:
        """Write the ``new`` unit files, then enable and start the managed unit (restarted when it
        ran with other files); if systemctl fails, put the ``old`` files back (None: none was)."""
        for path, data in new.items():
            _write_file(path, data)
        try:
            self._sc(prog, "daemon-reload")
            self._sc(prog, "enable", "--now", self.managed)
            if old != new and old[self.managed_path] is not None:
                self._sc(prog, "restart", self.managed)  # pick up a new interval or command
        except KmpwmError:
            for path, data in old.items():
                _restore(path, data)
            self._sc(prog, "daemon-reload", check=False)
            raise

    def uninstall(self) -> dict:
        prog = _systemctl()
        if not any(path.exists() for path in self.unit_paths):
            return {"action": "absent", "entry": None, "path": str(self.managed_path)}
        entry = self._entry_from_file()
        if self._sc(prog, "disable", "--now", self.managed, check=False).returncode != 0:
            self._remove_wants_link()  # no user manager
        for path in reversed(self.unit_paths):
            _remove(path)
        self._sc(prog, "daemon-reload", check=False)
        return {"action": "removed", "entry": entry, "path": str(self.managed_path)}

    def _remove_wants_link(self) -> None:
        """Disable the managed unit by hand: remove its link in ``<wanted_by>.wants/``."""
        wants = self.directory / f"{self.wanted_by}.wants" / self.managed
        if wants.is_symlink() or wants.exists():
            _remove(wants)

    def _entry_from_file(self) -> str | None:
        try:
            text = self.service_path.read_text()
        except OSError:
            return None
        try:
            return _service_command(text)
        except ValueError:  # a quote shlex cannot read
            return None

    def _every_from_file(self) -> int | None:
        try:
            for line in self.timer_path.read_text().splitlines():
                if line.startswith("OnUnitActiveSec="):
                    return _sd_span_seconds(line.split("=", 1)[1])
        except OSError:
            pass
        return None

    def status(self, timeout: float = 0) -> dict:
        installed = self.timer_path.exists()
        enabled = (self.directory / "timers.target.wants" / self.timer).exists()
        return {
            "installed": installed,
            "entry": self._entry_from_file() if installed else None,
            "path": str(self.timer_path),
            "every": self._every_from_file() if installed else None,
            "enabled": enabled,
        }

    def printed(self, action: str) -> dict:
        return self._would_remove() if action == "uninstall" else self._would_install()

    def _would_remove(self) -> dict:
        files = _existing_files(self.unit_paths)
        text = "".join(f"# {p}\n{c}" + ("" if c.endswith("\n") else "\n") for p, c in files.items())
        note = (
            f"would run `systemctl --user disable --now {self.timer}`, remove {self.service_path} and "
            f"{self.timer_path}" + ("" if files else " (not installed)") + ", then "
            "`systemctl --user daemon-reload` (nothing was changed)"
        )
        return {
            "text": text,
            "entry": self._entry_from_file() if files else None,
            "path": str(self.timer_path),
            "files": files,
            "note": note,
        }

    def _would_install(self) -> dict:
        service, timer = self.render()
        files = {str(self.service_path): service, str(self.timer_path): timer}
        text = f"# {self.service_path}\n{service}\n# {self.timer_path}\n{timer}"
        note = (
            f"would write both files and run `systemctl --user daemon-reload` and "
            f"`systemctl --user enable --now {self.timer}` (nothing was changed)"
        )
        return {"text": text, "entry": self.t.command(), "path": str(self.timer_path), "files": files, "note": note}


def _service_command(text: str) -> str | None:
    """The command line of a service unit: its ``Environment=`` and ``ExecStart=`` lines as one
    shell command (None: no ExecStart)."""
    env: dict[str, str] = {}
    argv: list[str] = []
    for line in text.splitlines():
        if line.startswith("Environment="):
            for word in _sd_unquote(line[len("Environment=") :], exec_line=False):
                k, _, v = word.partition("=")
                env[k] = v
        elif line.startswith("ExecStart="):
            argv = _sd_unquote(line[len("ExecStart=") :], exec_line=True)
    return _shell_command(env, argv) if argv else None


def _existing_files(paths) -> dict[str, str]:
    """The files of ``paths`` that exist, with their text: path -> text."""
    files = {}
    for path in paths:
        old = _read_bytes(path)
        if old is not None:
            files[str(path)] = old.decode(errors="replace")
    return files


class LaunchdServe(Launchd):
    """``--mode serve`` on macOS: a KeepAlive agent running ``kmpwm serve`` (the StartInterval
    agent of run-due stays as the fallback)."""

    @property
    def label(self) -> str:
        return LAUNCHD_SERVE_LABEL + (f".{self.t.suffix}" if self.t.suffix else "")

    def _run_keys(self) -> dict:
        return {
            "RunAtLoad": True,
            "KeepAlive": True,
            "ThrottleInterval": 10,
            "ProcessType": "Background",
            "StandardOutPath": str(self.t.paths.log_dir / "serve.log"),
            "StandardErrorPath": str(self.t.paths.log_dir / "serve.log"),
        }


class SystemdServe(Systemd):
    """``--mode serve`` with systemd: a user service running ``kmpwm serve``, restarted on
    failure (the run-due timer stays as the fallback)."""

    wanted_by = "default.target"

    @property
    def unit(self) -> str:
        return SYSTEMD_SERVE_NAME + (f"-{self.t.suffix}" if self.t.suffix else "")

    @property
    def service(self) -> str:
        return f"{self.unit}.service"

    @property
    def managed_path(self) -> Path:
        """The file of the unit that is enabled, started and reported on: the service."""
        return self.service_path

    @property
    def unit_paths(self) -> tuple[Path, ...]:
        return (self.service_path,)

    def files(self) -> dict[Path, str]:
        return {self.service_path: self.render_service()}

    def render_service(self) -> str:
        exec_start, env_lines, where = self._service_parts("the serve command")
        return (
            "# Managed by `kmpwm schedule`; do not edit (kmpwm schedule uninstall removes it).\n"
            "[Unit]\n"
            f"Description=kmpwm serve: start background tasks the moment they are due{where}\n"
            "\n"
            "[Service]\n"
            "Type=simple\n"
            f"{env_lines}"
            f"ExecStart={exec_start}\n"
            "ExecReload=/bin/kill -HUP $MAINPID\n"
            "Restart=on-failure\n"
            "RestartSec=5s\n"
            "KillMode=mixed\n"  # SIGTERM to serve only: it stops its workers (the expiry protocol)
            "TimeoutStopSec=60s\n"
            "\n"
            "[Install]\n"
            "WantedBy=default.target\n"
        )

    def status(self, timeout: float = 0) -> dict:
        installed = self.service_path.exists()
        return {
            "installed": installed,
            "entry": self._entry_from_file() if installed else None,
            "path": str(self.service_path),
        }

    def _would_remove(self) -> dict:
        files = _existing_files(self.unit_paths)
        text = "".join(f"# {p}\n{c}" for p, c in files.items())
        note = (
            f"would run `systemctl --user disable --now {self.service}` and remove {self.service_path}"
            + ("" if files else " (not installed)")
            + " (nothing was changed)"
        )
        return {
            "text": text,
            "entry": self._entry_from_file() if files else None,
            "path": str(self.service_path),
            "files": files,
            "note": note,
        }

    def _would_install(self) -> dict:
        text = self.render_service()
        return {
            "text": f"# {self.service_path}\n{text}",
            "entry": self.t.command(),
            "path": str(self.service_path),
            "files": {str(self.service_path): text},
            "note": f"would write it and run `systemctl --user enable --now {self.service}` (nothing was changed)",
        }


_IMPLS: dict[str, type[Backend]] = {"cron": Cron, "launchd": Launchd, "systemd": Systemd}
_SERVE_IMPLS: dict[str, type[Backend]] = {"launchd": LaunchdServe, "systemd": SystemdServe}


# -- status --------------------------------------------------------------------------------


def last_run_at(paths) -> float | None:
    try:
        return os.stat(paths.journal_dir / "runners" / "last-run").st_mtime
    except OSError:
        return None


def invoker_status(paths) -> dict:
    """A cheap report for ``kmpwm doctor``; never raises for a backend's sake.

    ``{"installed": bool, "backend": name|None, "entry": str|None, "path": str|None,
    "last_run_at": ISO|None, "backends": {name: {"installed", "entry", "path"[, "error"]}}}``.
    launchd and systemd are judged by their files only; cron runs ``crontab -l`` (2 s timeout)
    when a crontab program exists.
    """
    target = _Target(paths)
    order = ["launchd", "cron", "systemd"] if sys.platform == "darwin" else ["systemd", "cron", "launchd"]
    backends = {name: _backend_report(name, target) for name in order}
    chosen = next((n for n in order if backends[n]["installed"]), None)
    found = backends[chosen] if chosen else {}
    return {
        "installed": chosen is not None,
        "backend": chosen,
        "entry": found.get("entry"),
        "path": found.get("path"),
        "last_run_at": iso(last_run_at(paths)),
        "every": found.get("every"),
        "backends": backends,
    }


_NOT_INSTALLED = {"installed": False, "entry": None, "path": None}


def _backend_report(name: str, target: _Target) -> dict:
    """One backend's part of :func:`invoker_status`; an ``error`` in it instead of raising."""
    impl = _IMPLS[name](target, None)
    try:
        if name == "cron":
            _crontab_program()
    except OsPolicy:
        return {**_NOT_INSTALLED, "error": "crontab not found"}
    try:
        st = impl.status(timeout=PROBE_TIMEOUT)  # only cron's status runs a command
    except Exception as exc:  # doctor reports, it does not fail
        msg = exc.message if isinstance(exc, KmpwmError) else f"{type(exc).__name__}: {exc}"
        return {**_NOT_INSTALLED, "error": msg}
    every = st.get("every") or (_cron_every(st["entry"]) if name == "cron" else None)
    return {"installed": st["installed"], "entry": st["entry"], "path": st["path"], "every": every}


# the step of a cron field: ``*`` is every unit, ``*/n`` every n units
_CRON_STEPS = {"*": 1, **{f"*/{n}": n for n in range(1, 61)}}


def _cron_every(entry: str | None) -> int | None:
    """The period, in seconds, of a cron line that :func:`cron_schedule` wrote (None if another)."""
    fields = (entry or "").split()[:5]
    if len(fields) < 5 or fields[2:] != ["*", "*", "*"]:
        return None
    minute, hour = fields[0], fields[1]
    if hour == "*":
        return _field_period(minute, 60, 3600)
    if minute.isdigit():
        return _field_period(hour, 3600, 86400)
    return None


def _field_period(field: str, unit: int, whole: int) -> int | None:
    """The period, in seconds, of one cron field: a step of ``unit`` seconds, or ``whole`` for a
    fixed number (once a ``whole``); None for anything else.  A step as long as the field's whole
    range (a hand-written ``*/30`` hours) matches only its first value: once a ``whole``."""
    if field in _CRON_STEPS:
        return min(unit * _CRON_STEPS[field], whole)
    return whole if field.isdigit() else None


# -- the command ---------------------------------------------------------------------------


class Backend(Protocol):
    """What ``schedule`` needs of a backend (:class:`Cron`, :class:`Launchd`, :class:`Systemd`,
    and the serve services :class:`LaunchdServe`, :class:`SystemdServe`).  Each method returns a
    plain dict: ``install``/``uninstall`` -> ``{"action", "entry", "path"}``, ``status`` ->
    ``{"installed", "entry", "path"[, "every", "enabled"]}``, ``printed`` -> ``{"text", "entry",
    "path", "files", "note"}``."""

    def install(self) -> dict: ...

    def uninstall(self) -> dict: ...

    def status(self, timeout: float = ...) -> dict: ...

    def printed(self, action: str) -> dict: ...


@dataclass
class Plan:
    """One ``schedule`` invocation resolved: the backend, its serve service (None for cron, whose
    serve is an ``@reboot`` line inside its own block), and what the user asked for."""

    paths: Any
    name: str
    seconds: int
    impl: Backend
    serve_impl: Backend | None
    serve_mode: bool

    @property
    def where(self) -> str:
        return f"home {self.paths.home}" if self.paths.home is not None else "the default home"


def resolve_plan(
    paths, action: str, backend: str | None, every: str | None, print_only: bool, mode: str | None
) -> Plan:
    """Check the arguments and pick the backend (InvalidParams / OsPolicy on bad input)."""
    if action not in ACTIONS:
        raise InvalidParams(f"unknown schedule action {action!r}: expected install, uninstall or status")
    if mode is not None and mode not in MODES:
        raise InvalidParams(f"invalid --mode {mode!r}: expected minute or serve")
    serve_mode = mode == "serve"
    name = _pick_backend(backend, probe=not print_only)
    seconds = parse_every(every, name)  # the CLI gives --every to install only; None means the default
    impl = _IMPLS[name](_Target(paths), seconds)
    serve_impl = _SERVE_IMPLS[name](_Target(paths, "serve"), None) if name in _SERVE_IMPLS else None
    if isinstance(impl, Cron):
        impl.serve = serve_mode
    return Plan(paths, name, seconds, impl, serve_impl, serve_mode)


def schedule(
    paths, action: str, backend: str | None, every: str | None, print_only: bool, mode: str | None = None
) -> dict:
    """``kmpwm schedule install|uninstall|status``: do it (or, ``print_only``, only say what would
    be done) and return the report the CLI renders: ``{"kind": "printed"|"status"|"changed",
    "plan": Plan, "doc": the JSON document, ...}``.

    ``mode`` (install only): ``minute`` (the default) installs the periodic run-due alone and
    removes a serve set up before; ``serve`` adds ``kmpwm serve`` as a supervised service (a
    systemd user service, a launchd KeepAlive agent, a cron @reboot line), the periodic run-due
    staying as the fallback.  ``uninstall`` removes both."""
    plan = resolve_plan(paths, action, backend, every, print_only, mode)
    if print_only:
        return _printed(plan, "uninstall" if action == "uninstall" else "install")
    if action == "status":
        return _status(plan)
    return _change(plan, action)


def _printed(plan: Plan, act: str) -> dict:
    shown = plan.impl.printed(act)
    extra = _serve_printed(plan, act)
    more = extra or {"text": "", "files": {}}
    doc = {
        "backend": plan.name,
        "action": "printed",
        "entry": shown["entry"],
        "path": shown["path"],
        "text": shown["text"] + more["text"],
    }
    if shown["files"] is not None:
        doc["files"] = {**shown["files"], **more["files"]}
    if plan.serve_mode:
        doc["serve"] = (
            {"entry": extra["entry"], "path": extra["path"]}
            if extra
            else {"entry": plan.impl.reboot_line(), "path": None}  # cron's: the @reboot line of its block
        )
    return {"kind": "printed", "plan": plan, "doc": doc, "shown": shown, "extra": extra}


def _serve_printed(plan: Plan, act: str) -> dict | None:
    """What ``--print`` shows of the serve service (None: none to show; cron has none)."""
    if plan.serve_impl is None or not (plan.serve_mode or act == "uninstall"):
        return None
    return plan.serve_impl.printed(act)


def _status(plan: Plan) -> dict:
    from kmpwm.running.serve import running_serves

    st = plan.impl.status()
    last = last_run_at(plan.paths)
    running = [{"pid": x["pid"], "started_at": iso(x["started_at"])} for x in running_serves(plan.paths)]
    if plan.serve_impl is not None:
        sst = plan.serve_impl.status()
    else:
        entry = plan.impl.serve_entry() if st["installed"] else None
        sst = {"installed": entry is not None, "entry": entry, "path": None}
    doc = {
        "backend": plan.name,
        "installed": st["installed"],
        "entry": st["entry"],
        "last_run_at": iso(last),
        "path": st["path"],
        "serve": {"installed": sst["installed"], "entry": sst["entry"], "path": sst["path"], "running": running},
    }
    return {"kind": "status", "plan": plan, "doc": doc, "status": st, "last": last}


def _change(plan: Plan, action: str) -> dict:
    if action == "install":
        result = plan.impl.install()
        serve_result = _install_serve(plan, result)
    else:
        result, serve_result = _uninstall(plan)
    doc = {"backend": plan.name, "action": result["action"], "entry": result["entry"], "path": result["path"]}
    if serve_result is not None:
        doc["serve"] = serve_result
    return {"kind": "changed", "plan": plan, "doc": doc, "action": action}


def _uninstall(plan: Plan) -> tuple[dict, dict | None]:
    """Remove the invoker and its serve: what each removal did (None: there was no serve to remove)."""
    if plan.serve_impl is not None:
        result = plan.impl.uninstall()
        return result, plan.serve_impl.uninstall()
    serve_entry = plan.impl.serve_entry()  # read before its block goes
    result = plan.impl.uninstall()
    if serve_entry is None:
        return result, None
    # cron started it: stop it with its @reboot line
    return result, {"action": "removed", "entry": serve_entry, "path": None, "stopped": _stop_serves(plan.paths)}


def _install_serve(plan: Plan, result: dict) -> dict | None:
    if plan.serve_impl is not None:
        if plan.serve_mode:
            return plan.serve_impl.install()
        if plan.serve_impl.status()["installed"]:
            return plan.serve_impl.uninstall()  # --mode minute: back to run-due alone
        return None
    if not plan.serve_mode:
        return None
    from kmpwm.running.serve import running_serves

    serve_result = {"action": result["action"], "entry": plan.impl.reboot_line(), "path": None}
    if not running_serves(plan.paths):
        serve_result["started"] = _start_serve(plan.paths)
        serve_result["action"] = "installed"
    return serve_result


def _start_serve(paths) -> int:
    """cron has no service manager: start ``kmpwm serve`` now, detached (its @reboot line starts
    it after each boot); output appended to logs/serve.log."""
    from kmpwm.storage.paths import private_subdir

    target = _Target(paths, "serve")
    log_dir = private_subdir(paths.log_dir)
    fd = os.open(log_dir / "serve.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        proc = subprocess.Popen(
            target.argv,
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=fd,
            env={**os.environ, **target.env},
            start_new_session=True,
            close_fds=True,
        )
    finally:
        os.close(fd)
    return proc.pid


def _stop_serves(paths) -> list[int]:
    """SIGTERM the serve processes of this home (they savepoint their tasks and exit 0)."""
    import signal

    from kmpwm.running.serve import running_serves

    stopped = []
    for x in running_serves(paths):
        try:
            os.kill(x["pid"], signal.SIGTERM)
            stopped.append(x["pid"])
        except OSError:
            pass
    return stopped
