"""``config.toml``: command and entry workers a user declares (SPEC section 5).

    [workers.backup]
    command = ["restic", "backup", "/home/me"]   # never run through a shell
    timeout = "10m"                             # a DUR string or seconds
    cwd = "/home/me"
    env = { RESTIC_REPOSITORY = "/mnt/backup" }

    [workers.report]
    entry = "mypkg.jobs:report"                 # module:attr, imported in the worker process
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .exitcodes import ConfigError, KmpwmError
from .paths import check_secure

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


@dataclass
class Config:
    workers: dict[str, WorkerConfig] = field(default_factory=dict)
    path: Path | None = None
    hooks: dict = field(default_factory=dict)  # [hooks]: on_failure / on_success (kmpwm.hooks)


def load(path: Path) -> Config:
    """Read and validate ``config.toml``; a missing file is an empty config."""
    check_secure(path, what="config file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return Config(path=path)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    import tomllib

    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    cfg = Config(path=path)
    workers = doc.get("workers", {})
    if not isinstance(workers, dict):
        raise ConfigError(f"{path}: [workers] must be a table of [workers.NAME] tables")
    for name, table in workers.items():
        cfg.workers[name] = _worker(path, name, table)
    from .hooks import parse_hooks

    cfg.hooks = parse_hooks(path, doc.get("hooks"))
    return cfg


def _worker(path: Path, name: str, table: object) -> WorkerConfig:
    where = f"{path}: [workers.{name!r}]" if not name.isprintable() else f"{path}: [workers.{name}]"
    if not NAME_RE.match(name):
        raise ConfigError(f"{where}: invalid worker name (letters, digits, _ . : - ; at most 128)")
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = set(table) - {"command", "entry", "timeout", "cwd", "env"}
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} (expected command, entry, timeout, cwd, env)")
    command, entry = table.get("command"), table.get("entry")
    if (command is None) == (entry is None):
        raise ConfigError(f"{where}: give exactly one of command = [\"prog\", \"arg\"] or entry = \"module:attr\"")
    if command is not None and (
        not isinstance(command, list) or not command or not all(isinstance(a, str) for a in command) or not command[0]
    ):
        raise ConfigError(f"{where}: command must be a non-empty list of strings, e.g. [\"prog\", \"arg\"]")
    if entry is not None and (not isinstance(entry, str) or not ENTRY_RE.match(entry)):
        raise ConfigError(f"{where}: entry must look like \"module:attr\"")
    timeout = table.get("timeout")
    if timeout is not None:
        from .timeparse import parse_duration

        try:
            timeout = parse_duration(timeout, what="timeout")
        except KmpwmError as exc:
            raise ConfigError(f"{where}: {exc.message}") from None
        if timeout <= 0:
            raise ConfigError(f"{where}: timeout must be more than 0s")
    cwd = table.get("cwd")
    if cwd is not None and not isinstance(cwd, str):
        raise ConfigError(f"{where}: cwd must be a string")
    env = table.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise ConfigError(f"{where}: env must be a table of strings")
    return WorkerConfig(name, command=command, entry=entry, timeout=timeout, cwd=cwd, env=dict(env))
