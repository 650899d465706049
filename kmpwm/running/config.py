"""``config.toml``: command and entry workers a user declares (SPEC section 5).

    [workers.backup]
    command = ["restic", "backup", "/home/me"]   # never run through a shell
    timeout = "10m"                             # a DUR string or seconds
    cwd = "/home/me"
    env = { RESTIC_REPOSITORY = "/mnt/backup" }
    description = "Back up my home"             # optional, shown by `kmpwm workers backup`
    inputs = { tag = "a restic tag" }           # optional, the same (see kmpwm.running.declare)

    [workers.report]
    entry = "mypkg.jobs:report"                 # module:attr, imported in the worker process
    path = "lib"                                # where mypkg is: relative to this file's directory

An ``entry`` worker's module is searched in its ``path`` (if given), then in the directory of
``config.toml`` itself, then on the usual ``sys.path``.

:func:`load` is the one validator of the file: every command that looks a worker up goes through
it (``registry.Registry``), so a file that does not parse, a wrong type, an unknown key or a NUL
byte is one ConfigError (exit 78) naming the file, the worker and the problem, never a worker
silently missing.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from kmpwm.core.exitcodes import ConfigError
from kmpwm.storage.paths import check_secure

NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}$")
ENTRY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


@dataclass
class WorkerConfig:
    name: str
    command: list[str] | None = None
    entry: str | None = None
    timeout: float | None = None
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    description: str | None = None  # shown by `kmpwm workers NAME`
    inputs: dict | None = None  # {key: "description" | {type, default, required, description}}
    path: str | None = None  # absolute: the ``path`` key resolved against the config file's directory
    config_dir: str | None = None

    @property
    def import_dirs(self) -> list[str]:
        """Where an entry worker's module is looked for first, in order."""
        return [d for d in (self.path, self.config_dir) if d]


WORKER_KEYS = ("command", "entry", "timeout", "cwd", "env", "path", "description", "inputs")
SECTIONS = ("workers", "hooks", "store")


@dataclass
class Config:
    workers: dict[str, WorkerConfig] = field(default_factory=dict)
    path: Path | None = None
    hooks: dict = field(default_factory=dict)  # [hooks]: on_failure / on_success (kmpwm.running.hooks)


def load(path: Path) -> Config:
    """Read and validate ``config.toml``; a missing file is an empty config."""
    check_secure(path, what="config file")
    raw = _read(path)
    if raw is None:
        return Config(path=path)
    # the directory too: whoever can write it can replace the file (and it is on entry workers' sys.path)
    check_secure(path.parent, what="config directory")
    doc = _parse(path, raw)
    workers = doc.get("workers", {})
    if not isinstance(workers, dict):
        raise ConfigError(f"{path}: [workers] must be a table of [workers.NAME] tables")
    cfg = Config(path=path, workers={name: _worker(path, name, table) for name, table in workers.items()})
    from kmpwm.running.hooks import parse_hooks

    cfg.hooks = parse_hooks(path, doc.get("hooks"))
    from kmpwm.storage.stores import check_store_table

    check_store_table(path, doc.get("store"))
    return cfg


def _where(path: Path, name: str) -> str:
    """How errors name a worker's table (its name quoted when it does not print as it is)."""
    return f"{path}: [workers.{name}]" if name.isprintable() else f"{path}: [workers.{name!r}]"


def _read(path: Path) -> bytes | None:
    """The file's bytes; None when there is no file."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a directory, not a config file") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def _parse(path: Path, raw: bytes) -> dict:
    """The TOML document, with known tables only."""
    import tomllib

    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    unknown = sorted(set(doc) - set(SECTIONS))
    if unknown:
        raise ConfigError(
            f"{path}: unknown table or key {unknown[0]!r} (expected [workers.NAME] tables, [hooks] and [store])"
        )
    return doc


def _worker(path: Path, name: str, table: object) -> WorkerConfig:
    where = _where(path, name)
    _check_table(where, name, table)
    command, entry = _worker_program(where, table)
    timeout = _worker_timeout(where, table.get("timeout"))
    cwd = _worker_cwd(where, table.get("cwd"))
    env = _worker_env(where, table.get("env", {}))
    extra = _worker_path(where, name, path, table.get("path"), entry)
    description, inputs = table.get("description"), table.get("inputs")
    _worker_declaration(where, description, inputs)
    return WorkerConfig(
        name,
        command=command,
        entry=entry,
        timeout=timeout,
        cwd=cwd,
        env=env,
        path=extra,
        config_dir=str(path.parent) if entry is not None else None,
        description=description,
        inputs=inputs,
    )


def _check_table(where: str, name: str, table: object) -> None:
    """A valid worker name, and a table of known keys."""
    if not NAME_RE.match(name):
        raise ConfigError(f"{where}: invalid worker name (letters, digits, _ . : - ; at most 128)")
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = set(table) - set(WORKER_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} (expected {', '.join(WORKER_KEYS)})")


def _worker_cwd(where: str, cwd: object) -> str | None:
    if cwd is not None and not _directory_name(cwd):
        raise ConfigError(f"{where}: cwd must be a directory name (a non-empty string without NUL bytes)")
    return cwd


def _directory_name(value: object) -> bool:
    """A non-empty string without NUL bytes."""
    return isinstance(value, str) and bool(value) and "\0" not in value


def _worker_declaration(where: str, description: object, inputs: object) -> None:
    """``description`` and ``inputs``, checked as a declared worker's are (kmpwm.running.declare)."""
    if description is None and inputs is None:
        return
    from kmpwm.running.declare import make_spec

    try:
        make_spec(description=description or "", inputs=inputs, where=where)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _worker_program(where: str, table: dict) -> tuple[list[str] | None, str | None]:
    """``command = [...]`` or ``entry = "module:attr"``: exactly one, well formed."""
    command, entry = table.get("command"), table.get("entry")
    if (command is None) == (entry is None):
        raise ConfigError(f'{where}: give exactly one of command = ["prog", "arg"] or entry = "module:attr"')
    if command is not None:
        _check_command(where, command)
    elif not isinstance(entry, str) or not ENTRY_RE.match(entry):
        raise ConfigError(f'{where}: entry must look like "module:attr"')
    return command, entry


def _check_command(where: str, command: object) -> None:
    if not isinstance(command, list) or not command or not all(isinstance(a, str) for a in command) or not command[0]:
        raise ConfigError(f'{where}: command must be a non-empty list of strings, e.g. ["prog", "arg"]')
    for n, arg in enumerate(command):
        if "\0" in arg:
            raise ConfigError(f"{where}: command argument {n} contains a NUL byte (no program can receive one)")


def _worker_timeout(where: str, timeout: object) -> float | None:
    """``timeout``: a DUR string or seconds, more than 0 (checked as a declared worker's is)."""
    if timeout is None:
        return None
    from kmpwm.running.declare import make_spec

    try:
        return make_spec(timeout=timeout, where=where).timeout
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _worker_env(where: str, env: object) -> dict[str, str]:
    if not isinstance(env, dict):
        raise ConfigError(f'{where}: env must be a table of strings, e.g. env = {{ NAME = "value" }}')
    for key, value in env.items():
        _check_variable(where, key, value)
    return dict(env)


def _check_variable(where: str, key: str, value: object) -> None:
    """One ``env`` entry: a variable name, a string value (neither with a NUL byte)."""
    if not isinstance(value, str):
        raise ConfigError(
            f'{where}: env value of {key} must be a string, not {_toml_type(value)} (quote it: {key} = "...")'
        )
    if not key or "=" in key or "\0" in key:
        raise ConfigError(f"{where}: env name {key!r} is not a valid variable name")
    if "\0" in value:
        raise ConfigError(f"{where}: env value of {key} contains a NUL byte (no program can receive one)")


def _worker_path(where: str, name: str, path: Path, extra: object, entry: str | None) -> str | None:
    """``path = "DIR"``: where an entry worker's module is, relative to config.toml; it decides
    what code runs, so it must pass the permission rules."""
    if extra is None:
        return None
    if entry is None:
        raise ConfigError(f"{where}: path is for entry workers (where the module is); a command worker has cwd")
    if not _directory_name(extra):
        raise ConfigError(f"{where}: path must be a directory name (a non-empty string without NUL bytes)")
    extra = os.path.normpath(os.path.join(path.parent, os.path.expanduser(extra)))
    check_secure(Path(extra), what=f"module path of worker {name}")
    return extra


def _toml_type(value: object) -> str:
    return {bool: "a boolean", int: "a number", float: "a number", list: "an array", dict: "a table"}.get(
        type(value), f"a {type(value).__name__}"
    )
