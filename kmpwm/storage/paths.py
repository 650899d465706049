"""Where kmpwm keeps its files (SPEC section 1), and the permission rules that guard them.

``--home`` wins over ``KMPWM_HOME``; without either, platformdirs decides.  Directories are
created 0700 (parents kmpwm creates too, whatever the umask) and files 0600; a journal directory,
home, log directory or ``config.toml`` that others can write to, or that belongs to another user,
is refused with exit 77.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from kmpwm.core.exitcodes import InsecurePermissions, JournalError

APP = "kmpwm"


@dataclass(frozen=True)
class Paths:
    home: Path | None
    journal_dir: Path
    config_file: Path
    log_dir: Path

    @property
    def journal_file(self) -> Path:
        return self.journal_dir / "journal.log"

    @property
    def lock_file(self) -> Path:
        return self.journal_dir / "lock"

    @property
    def snapshot_file(self) -> Path:
        return self.journal_dir / "state.snap"

    @property
    def history_file(self) -> Path:
        return self.journal_dir / "history.snap"

    @property
    def cache_dir(self) -> Path:
        """Caches of things outside the journal (the entry-point list): safe to delete."""
        return self.journal_dir.parent / "cache"

    @property
    def quarantine_dir(self) -> Path:
        return self.journal_dir / "quarantine"

    @property
    def runners_dir(self) -> Path:
        return self.journal_dir / "runners"


def resolve(home: str | os.PathLike | None = None) -> Paths:
    """Resolve the file locations; ``home`` (``--home``) wins over ``KMPWM_HOME``."""
    chosen = home if home not in (None, "") else os.environ.get("KMPWM_HOME") or None
    if chosen is not None:
        base = Path(chosen).expanduser().absolute()
        return Paths(base, base / "journal", base / "config.toml", base / "logs")
    import platformdirs  # only needed without KMPWM_HOME

    data = Path(platformdirs.user_data_dir(APP))
    return Paths(
        None,
        data / "journal",
        Path(platformdirs.user_config_dir(APP)) / "config.toml",
        Path(platformdirs.user_log_dir(APP)),
    )


def check_secure(path: Path, *, what: str) -> None:
    """Refuse (exit 77) a path writable by group/others or owned by another user."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise JournalError(f"cannot read {what} {path}: {exc.strerror}") from None
    problems = _insecurities(st)
    if problems:
        raise InsecurePermissions(
            f"refusing to use {what} {path}: {'; '.join(problems)}", hint=_fix_hint(path, st, problems)
        )


def _fix_hint(path: Path, st: os.stat_result, problems: list[str]) -> str:
    fix = f"chmod {'700' if stat.S_ISDIR(st.st_mode) else '600'} {path}"
    return f"fix it with: {fix}" + (" (and chown it to yourself)" if "owned" in problems[0] else "")


_WRITABLE_BY = {stat.S_IWGRP: "group", stat.S_IWOTH: "others", stat.S_IWGRP | stat.S_IWOTH: "group and others"}


def _insecurities(st: os.stat_result) -> list[str]:
    """What makes a file with this stat unsafe to use: another owner, write access for others."""
    problems = []
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        problems.append(f"owned by uid {st.st_uid}, not you (uid {os.getuid()})")
    writable = _WRITABLE_BY.get(st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))
    if writable is not None:
        problems.append(f"writable by {writable} (mode {stat.S_IMODE(st.st_mode):04o})")
    return problems


def make_private_dirs(path: Path) -> None:
    """Create ``path`` and every missing parent 0700 whatever the umask (``os.makedirs`` gives the
    parents the umask's mode: a fresh ``--home a/b`` would be 0755)."""
    for d in reversed(_missing_dirs(Path(path))):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            if not os.path.isdir(d):
                raise
            continue  # made by a concurrent kmpwm: it set the mode
        os.chmod(d, 0o700)


def _missing_dirs(path: Path) -> list[Path]:
    """``path`` and its parents that are not directories, innermost first."""
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    return missing


def require_home(paths: Paths) -> None:
    """For commands that only read: a home given by ``--home`` or ``KMPWM_HOME`` that does not
    exist is said so (exit 1, "nothing matched"), so that a mistyped home never looks like an
    empty queue.  The platform's default home is where the queue would be, so there an empty
    queue is the truth and is shown."""
    if paths.home is not None and not os.path.lexists(paths.home):
        from kmpwm.core.exitcodes import NothingMatched

        raise NothingMatched(
            f"no kmpwm queue at {paths.home}: the directory does not exist",
            hint="check --home or KMPWM_HOME (the first enqueue creates a home)",
        )


def ensure_dir(path: Path) -> None:
    """Create ``path`` (and parents) with mode 0700 if missing."""
    if not path.is_dir():
        _create_private(path)


def _create_private(path: Path) -> None:
    """make_private_dirs, its failure a JournalError."""
    try:
        make_private_dirs(path)
    except OSError as exc:
        raise JournalError(f"cannot create directory {path}: {exc.strerror}") from None


def check_all(paths: Paths) -> None:
    """The permission checks every command runs before touching the journal."""
    if paths.home is not None:
        check_secure(paths.home, what="home directory")
    check_secure(paths.journal_dir, what="journal directory")
    check_secure(paths.journal_file, what="journal")
    check_secure(paths.config_file, what="config file")
    # logs/ too: a log kmpwm may not write is work gone unrecorded, so it is refused, not skipped
    check_secure(paths.log_dir, what="log directory")


def private_subdir(path: Path) -> Path:
    """A directory kmpwm writes into (quarantine/, runners/, logs/): created 0700 if missing,
    refused (exit 77) if something planted a symlink or a file there, so that writes never land
    elsewhere."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        _create_private(path)
        return path
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise InsecurePermissions(
            f"refusing to use {path}: it is {'a symlink' if stat.S_ISLNK(st.st_mode) else 'not a directory'}",
            hint=f"remove it (kmpwm creates it as a private directory): rm {path}",
        )
    check_secure(path, what="directory")
    return path


def private_log_dir(paths: Paths) -> Path:
    """The log directory, created private (and, under the platform's default home, the kmpwm
    directory above it: ours, so private too)."""
    log_dir = Path(paths.log_dir)
    if paths.home is None and log_dir.parent.name == "kmpwm":
        ensure_dir(log_dir.parent)
    return private_subdir(log_dir)


def prepare(paths: Paths) -> None:
    """Check permissions, then create the directories a writer needs (all of kmpwm's own 0700)."""
    check_all(paths)
    if paths.home is not None:
        ensure_dir(paths.home)
    else:
        ensure_dir(paths.journal_dir.parent)  # platformdirs' kmpwm directory, not only its journal/
    ensure_dir(paths.journal_dir)
