"""Which workers exist: Python entry points in the group ``kmpwm.workers`` and
``[workers.NAME]`` tables of ``config.toml``.  Names are unique across both.

Entry points are listed only when a worker name must be checked or run, and loaded (imported)
only in the process that runs the worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from .config import Config, WorkerConfig, load
from .exitcodes import ConfigError
from .paths import Paths

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


class Registry:
    def __init__(self, paths: Paths, config: Config | None = None):
        self.paths = paths
        self._config = config

    @cached_property
    def config(self) -> Config:
        return self._config if self._config is not None else load(self.paths.config_file)

    @cached_property
    def entry_points(self) -> dict[str, WorkerInfo]:
        from importlib.metadata import entry_points

        found: dict[str, WorkerInfo] = {}
        for ep in entry_points(group=GROUP):
            dist = getattr(getattr(ep, "dist", None), "name", None)
            found.setdefault(ep.name, WorkerInfo(ep.name, "entry-point", ep.value, dist, entry_point=ep))
        return found

    def _from_config(self, name: str) -> WorkerInfo | None:
        wc = self.config.workers.get(name)
        if wc is None:
            return None
        target = " ".join(wc.command) if wc.command else wc.entry
        return WorkerInfo(name, "config", target, config=wc)

    def get(self, name: str) -> WorkerInfo | None:
        """The worker called ``name``, None if unknown; a name defined twice is a config error."""
        from_config = self._from_config(name)
        from_ep = self.entry_points.get(name)
        if from_config and from_ep:
            raise ConfigError(
                f"worker {name!r} is defined twice: in {self.config.path} and by the package "
                f"{from_ep.distribution or from_ep.target}",
                hint="rename the [workers] table in config.toml",
            )
        return from_config or from_ep

    def all(self) -> list[WorkerInfo]:
        names = sorted(set(self.config.workers) | set(self.entry_points))
        out = []
        for name in names:
            info = self._from_config(name) or self.entry_points[name]
            out.append(info)
        return out

    def duplicates(self) -> list[str]:
        return sorted(set(self.config.workers) & set(self.entry_points))
