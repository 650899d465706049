"""Which workers exist: Python entry points in the group ``kmpwm.workers`` and
``[workers.NAME]`` tables of ``config.toml``.  Names are unique across both.

Entry points are listed only when a worker name must be checked or run, and loaded (imported)
only in the process that runs the worker.  Listing them through importlib.metadata parses the
metadata of every installed distribution (~10 ms with a hundred packages), so the list is kept in
``cache/entry-points.json`` under the home, keyed by the interpreter and the distribution
metadata directories on ``sys.path`` (see ``_environment_key``), so the cache is never used
after a package was installed, upgraded or removed.  ``kmpwm workers`` and ``doctor`` always scan.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import suppress
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # config.toml is read only when a name is looked up: no import cost before
    from kmpwm.running.config import Config, WorkerConfig
from kmpwm.core.exitcodes import ConfigError
from kmpwm.storage.paths import Paths

GROUP = "kmpwm.workers"


@dataclass
class WorkerInfo:
    name: str
    source: str  # "entry-point" or "config"
    target: str  # "module:attr" or the command line
    distribution: str | None = None
    config: WorkerConfig | None = None
    entry_point: object | None = None
    preloaded: object | None = None  # the loaded worker object, when run-due imported it already

    @property
    def kind(self) -> str:
        if self.config is not None and self.config.command:
            return "command"
        return "python"


class _LazyEntryPoint:
    """What a cached entry point needs to be loaded; importlib.metadata only when it is."""

    def __init__(self, name: str, value: str):
        self.name, self.value = name, value

    def load(self):
        from importlib.metadata import EntryPoint

        return EntryPoint(self.name, self.value, GROUP).load()


# Directory times this close to now may still change within the same clock tick: not cached.
_RACY_SECONDS = 2.0


def _environment_key() -> list | None:
    """What the entry points depend on: the interpreter and, for every ``sys.path`` entry, the
    distribution metadata directories in it (name, inode, modification time).  A package
    installed, upgraded, reinstalled or removed changes this; other files changing in the same
    directories (the current directory of ``python -m``) do not.  None (do not cache) while a
    metadata directory is younger than a few seconds: it may still be being written."""
    key: list = [sys.executable, sys.version, GROUP]
    horizon = time.time() - _RACY_SECONDS
    for entry in sys.path:
        try:
            it = os.scandir(entry or ".")
        except NotADirectoryError:  # a zip file on the path
            key.append(_file_key(entry))
            continue
        except OSError:
            key.append([entry, None])
            continue
        with it:
            found = _metadata_dirs(it, horizon)
        if found is None:
            return None
        if found:  # directories without any (the script's, the current one) do not matter
            key.append([entry, found])
    return key


def _file_key(entry: str) -> list:
    """A file on ``sys.path`` (a zip): its size and modification time."""
    try:
        st = os.stat(entry)
    except OSError:
        return [entry, None]
    return [entry, st.st_size, st.st_mtime_ns]


def _metadata_dirs(entries, horizon: float) -> list | None:
    """The distribution metadata directories among ``entries`` (name, inode, modification time),
    sorted; None when one was modified after ``horizon``."""
    found = []
    for de in entries:
        if not de.name.endswith((".dist-info", ".egg-info")):
            continue
        try:
            st = de.stat()
        except OSError:
            continue
        if st.st_mtime > horizon:
            return None
        found.append([de.name, st.st_ino, st.st_mtime_ns])
    return sorted(found)


class Registry:
    def __init__(self, paths: Paths, config: Config | None = None, *, rescan: bool = False):
        self.paths = paths
        self._config = config
        self._rescan = rescan  # True: always ask importlib.metadata (``workers``, ``doctor``)

    @cached_property
    def config(self) -> Config:
        if self._config is not None:
            return self._config
        from kmpwm.running.config import load

        return load(self.paths.config_file)

    @cached_property
    def entry_points(self) -> dict[str, WorkerInfo]:
        key = _environment_key()
        cache_file = self.paths.cache_dir / "entry-points.json"
        cached = None if key is None or self._rescan else _cached_entry_points(cache_file, key)
        if cached is not None:
            return cached
        found = _scan_entry_points()
        if key is not None:
            _write_cache(cache_file, key, [[w.name, w.target, w.distribution] for w in found.values()])
        return found

    def _no_config(self) -> bool:
        """No config.toml (nothing to read, nor to import a reader for), none given or read."""
        return self._config is None and "config" not in self.__dict__ and not os.path.lexists(self.paths.config_file)

    def _from_config(self, name: str) -> WorkerInfo | None:
        if self._no_config():
            return None
        wc = self.config.workers.get(name)
        if wc is None:
            return None
        target = " ".join(wc.command) if wc.command else wc.entry
        return WorkerInfo(name, "config", target, config=wc)

    def check(self) -> None:
        """The one validation of the configuration every command that uses workers runs: config.toml
        parses and is well-formed (config.load), and redefines no worker a package provides.
        Raises ConfigError (exit 78) naming the file, the worker and the problem."""
        if self.__dict__.get("_checked") or self._no_config():
            return
        for name in self.duplicates():
            ep = self.entry_points[name]
            raise ConfigError(
                f"{self.config.path}: [workers.{name}]: the name {name!r} is taken by the worker of the package "
                f"{ep.distribution or '?'} ({ep.target})",
                hint=f"rename the [workers.{name}] table in config.toml (names are unique across both)",
            )
        self._checked = True

    def get(self, name: str) -> WorkerInfo | None:
        """The worker called ``name``, None if unknown; a broken config.toml is a ConfigError."""
        self.check()
        return self._from_config(name) or self.entry_points.get(name)

    def all(self) -> list[WorkerInfo]:
        self.check()
        names = sorted(set(self.config.workers) | set(self.entry_points))
        return [self._from_config(name) or self.entry_points[name] for name in names]

    def duplicates(self) -> list[str]:
        return sorted(set(self.config.workers) & set(self.entry_points))


def _cached_entry_points(cache_file, key: list) -> dict[str, WorkerInfo] | None:
    """The workers the cache lists for ``key``, loaded only when run (None: scan again)."""
    cached = _read_cache(cache_file, key)
    if cached is None:
        return None
    return {
        name: WorkerInfo(name, "entry-point", value, dist, entry_point=_LazyEntryPoint(name, value))
        for name, value, dist in cached
    }


def _scan_entry_points() -> dict[str, WorkerInfo]:
    """The workers of the installed distributions, as importlib.metadata lists them (the first of
    a name wins)."""
    from importlib.metadata import entry_points

    found: dict[str, WorkerInfo] = {}
    for ep in entry_points(group=GROUP):
        dist = getattr(getattr(ep, "dist", None), "name", None)
        found.setdefault(ep.name, WorkerInfo(ep.name, "entry-point", ep.value, dist, entry_point=ep))
    return found


def import_error(info: WorkerInfo) -> str | None:
    """Why a Python worker cannot be loaded the way its run will load it (None: it can).  Imports
    it here, with the worker's own ``sys.path`` additions, which are undone afterwards."""
    from kmpwm.running.worker_host import load_target

    saved = list(sys.path)
    try:
        load_target(info)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # SystemExit from a module's top level too
        return f"cannot import {info.target}: {type(exc).__name__}: {exc}"
    finally:
        sys.path[:] = saved
    return None


def _private(st: os.stat_result) -> bool:
    """Owned by this user and writable by nobody else (SPEC section 1)."""
    return (not hasattr(os, "getuid") or st.st_uid == os.getuid()) and not st.st_mode & 0o022


def _read_cache(path, key: list) -> list | None:
    """The cached entry points, or None (scan again) when the cache is missing, stale or not
    private: it decides which code a worker name runs, so a file or directory another user could
    have written is never read."""
    import orjson

    with suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
        raw = _read_private(path)
        if raw is None:
            return None
        doc = orjson.loads(raw)
        if doc.get("key") != key:
            return None
        items = doc["entry_points"]
        if all(_is_cached_row(i) for i in items):
            return items
    return None


def _read_private(path) -> bytes | None:
    """The file's bytes, if it and its directory are private (else None)."""
    import stat

    dst = os.lstat(path.parent)
    if not stat.S_ISDIR(dst.st_mode) or not _private(dst):
        return None
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as fh:
        fst = os.fstat(fh.fileno())
        if not stat.S_ISREG(fst.st_mode) or not _private(fst):
            return None
        return fh.read()


def _is_cached_row(item) -> bool:
    """[name, target, distribution] with a name and a target."""
    return isinstance(item, list) and len(item) == 3 and isinstance(item[0], str) and isinstance(item[1], str)


def _write_cache(path, key: list, items: list) -> None:
    """Best effort: a cache that cannot be written costs time, never correctness."""
    import orjson

    from kmpwm.core.exitcodes import KmpwmError
    from kmpwm.storage.journal import atomic_write
    from kmpwm.storage.paths import private_subdir

    if not path.parent.parent.is_dir():
        return  # no home yet: the first write to the journal makes it, with the right mode
    with suppress(KmpwmError, OSError):
        private_subdir(path.parent)
        atomic_write(path, orjson.dumps({"key": key, "entry_points": items}))
