"""Workers that describe themselves: their input keys, the data they return, their default limits.

    import kmpwm

    @kmpwm.worker(
        description="Make thumbnails of the images in a directory.",
        inputs={
            "path": {"type": "string", "required": True, "description": "the directory"},
            "size": {"type": "integer", "default": 256, "description": "longest side in pixels"},
        },
        returns={"count": "thumbnails written"},
        heavy=True,                     # the 10 min time limit instead of 30 s, unless the task says
    )
    def thumbnail(input, ctx): ...

The decorator only attaches a :class:`WorkerSpec` to the callable (attribute
``__kmpwm_worker__``); the function is unchanged, so a package can use it for its entry-point
workers without importing anything heavy.  ``kmpwm workers NAME`` prints it; ``run-due`` takes
the time limit from it when a task gives neither ``--timeout`` nor ``--heavy``.

An input key's declaration is either a string (its description) or a table with ``type``
(string, integer, number, boolean, object, array, or any text), ``default``, ``required`` and
``description``.  A returned key's declaration is its description.  Command workers in
``config.toml`` may carry ``description`` and ``inputs`` (same shape) too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

ATTR = "__kmpwm_worker__"


@dataclass(frozen=True)
class InputKey:
    name: str
    type: str = ""
    default: Any = None
    required: bool = False
    description: str = ""
    has_default: bool = False

    def to_json(self) -> dict:
        doc = {
            "name": self.name,
            "type": self.type or None,
            "required": self.required,
            "description": self.description or None,
        }
        if self.has_default:
            doc["default"] = self.default
        return doc


@dataclass(frozen=True)
class WorkerSpec:
    description: str = ""
    inputs: tuple[InputKey, ...] = ()
    returns: tuple[tuple[str, str], ...] = ()
    heavy: bool = False
    timeout: float | None = None  # seconds

    def default_limit(self) -> float | None:
        """The time limit a task of this worker gets when it gives neither --timeout nor --heavy;
        None: the light default (30 s)."""
        if self.timeout:
            return float(self.timeout)
        if self.heavy:
            from kmpwm.core.models import HEAVY_TIMEOUT

            return HEAVY_TIMEOUT
        return None

    def to_json(self) -> dict:
        return {
            "description": self.description or None,
            "inputs": [i.to_json() for i in self.inputs],
            "returns": [{"name": n, "description": d or None} for n, d in self.returns],
            "heavy": self.heavy,
            "timeout": self.timeout,
        }


def _input_keys(inputs: dict | None, where: str) -> tuple[InputKey, ...]:
    if inputs is None:
        return ()
    if not isinstance(inputs, dict):
        raise ValueError(f"{where}: inputs must be a table of key names to declarations")
    return tuple(_input_key(name, decl, where) for name, decl in inputs.items())


def _input_key(name, decl, where: str) -> InputKey:
    """One input key's declaration: its description, or a table."""
    if isinstance(decl, str):
        return InputKey(str(name), description=decl)
    if not isinstance(decl, dict):
        raise ValueError(f"{where}: input {name!r} must be a description or a table")
    _check_input_table(name, decl, where)
    return InputKey(
        str(name),
        decl.get("type", ""),
        decl.get("default"),
        decl.get("required", False),
        decl.get("description", ""),
        "default" in decl,
    )


def _check_input_table(name, decl: dict, where: str) -> None:
    """Known keys only; ``type`` and ``description`` strings, ``required`` a boolean."""
    unknown = set(decl) - {"type", "default", "required", "description"}
    if unknown:
        raise ValueError(
            f"{where}: input {name!r}: unknown key {sorted(unknown)[0]!r} "
            "(expected type, default, required, description)"
        )
    kind, required, text = decl.get("type", ""), decl.get("required", False), decl.get("description", "")
    if not isinstance(kind, str) or not isinstance(required, bool) or not isinstance(text, str):
        raise ValueError(f"{where}: input {name!r}: type and description are strings, required a boolean")


def make_spec(
    *,
    description: str = "",
    inputs: dict | None = None,
    returns: dict | None = None,
    heavy: bool = False,
    timeout: Any = None,
    where: str = "worker",
) -> WorkerSpec:
    """A checked WorkerSpec; ValueError names what is wrong."""
    if not isinstance(description, str):
        raise ValueError(f"{where}: description must be a string")
    returned = _returned_keys(returns, where)
    if not isinstance(heavy, bool):
        raise ValueError(f"{where}: heavy must be true or false")
    seconds = _timeout_seconds(timeout, where)
    return WorkerSpec(description.strip(), _input_keys(inputs, where), returned, heavy, seconds)


def _returned_keys(returns: dict | None, where: str) -> tuple[tuple[str, str], ...]:
    if returns is None:
        return ()
    if not isinstance(returns, dict) or not all(isinstance(v, str) for v in returns.values()):
        raise ValueError(f"{where}: returns must be a table of key names to descriptions")
    return tuple((str(k), v) for k, v in returns.items())


def _timeout_seconds(timeout: Any, where: str) -> float | None:
    """A declared time limit (a DUR string or seconds) in seconds."""
    if timeout is None:
        return None
    from kmpwm.core.exitcodes import KmpwmError
    from kmpwm.core.timeparse import parse_duration

    try:
        seconds = parse_duration(timeout, what="timeout")
    except KmpwmError as exc:
        raise ValueError(f"{where}: {exc.message}") from None
    if seconds <= 0:
        raise ValueError(f"{where}: timeout must be more than 0s")
    return seconds


def worker(
    *,
    description: str = "",
    inputs: dict | None = None,
    returns: dict | None = None,
    heavy: bool = False,
    timeout: Any = None,
) -> Callable:
    """Declare what a worker takes, returns and needs (see the module's docstring).

    ``timeout``: its default time limit (a DUR string like ``"20m"`` or seconds); ``heavy``: the
    10 minute limit.  A task's own ``--timeout`` (and a config.toml ``timeout``) wins over both.
    """
    spec = make_spec(description=description, inputs=inputs, returns=returns, heavy=heavy, timeout=timeout)

    def attach(func):
        setattr(func, ATTR, spec)
        return func

    return attach


def spec_of(obj: Any) -> WorkerSpec | None:
    """The declaration attached to a worker object (function, class or instance), if any."""
    spec = getattr(obj, ATTR, None)
    return spec if isinstance(spec, WorkerSpec) else None


def declared_limit(info, preload: Callable[[Any], None], task: dict) -> float | None:
    """The worker's part of a run's time limit (scheduling.time_limit applies it after the
    task's ``--timeout``): config.toml's ``timeout``; else, unless the task says ``--heavy``, the
    worker's declared ``timeout``/``heavy`` (read from the object that ``preload`` loaded: run-due
    imports a Python worker before forking anyway); None for the task's own heavy/light default.
    With KMPWM_PRELOAD=0 run-due does not import workers, so only config.toml's ``timeout`` applies."""
    if info is None:
        return None
    if info.config is not None and info.config.timeout:
        return info.config.timeout
    if info.kind == "command" or task["constraints"].get("heavy"):
        return None
    return _declared_default(info, preload)


def _declared_default(info, preload: Callable[[Any], None]) -> float | None:
    """The limit the Python worker object declares (loaded by ``preload``), if any."""
    key = (info.name, info.target)
    if key in _LIMITS:  # once per worker and process (config workers are new objects per lookup)
        return _LIMITS[key]
    preload(info)
    obj = getattr(info, "preloaded", None)
    if obj is None:
        return None  # not imported (KMPWM_PRELOAD=0, or the import failed: the run reports it)
    spec = spec_of(obj)
    _LIMITS[key] = spec.default_limit() if spec else None
    return _LIMITS[key]


_LIMITS: dict[tuple, float | None] = {}


@dataclass
class Description:
    """What ``kmpwm workers NAME`` shows."""

    name: str
    kind: str
    source: str
    target: str
    distribution: str | None
    spec: WorkerSpec | None
    limit: float | None = None
    doc: str = ""
    errors: list[str] = field(default_factory=list)


def describe(info) -> Description:
    """Load (import) one worker and read its declaration; an import error is reported, not raised."""
    errors: list[str] = []
    doc = ""
    cfg = info.config
    spec = _config_spec(info, errors)
    if info.kind == "python":
        spec, doc = _python_declaration(info, spec, errors)
    limit = cfg.timeout if cfg is not None and cfg.timeout else (spec.default_limit() if spec else None)
    return Description(
        info.name, info.kind, info.source, info.target, info.distribution, spec, limit, " ".join(doc.split()), errors
    )


def _config_spec(info, errors: list[str]) -> WorkerSpec | None:
    """The description and inputs config.toml gives the worker, if any (a problem goes to ``errors``)."""
    cfg = info.config
    if cfg is None or not (cfg.description or cfg.inputs):
        return None
    try:
        return make_spec(description=cfg.description or "", inputs=cfg.inputs, where=f"[workers.{info.name}]")
    except ValueError as exc:
        errors.append(str(exc))
        return None


def _python_declaration(info, spec: WorkerSpec | None, errors: list[str]) -> tuple[WorkerSpec | None, str]:
    """Import a Python worker: ``spec`` completed by its own declaration, and the first paragraph
    of its docstring (an import error goes to ``errors``)."""
    try:
        from kmpwm.running.worker_host import load_target

        obj = load_target(info)
    except Exception as exc:  # noqa: BLE001  a broken worker is described as such
        errors.append(f"cannot import {info.target}: {exc or type(exc).__name__}")
        return spec, ""
    doc = (getattr(obj, "__doc__", None) or "").strip().split("\n\n")[0]
    return _merged(spec, spec_of(obj)), doc


def _merged(spec: WorkerSpec | None, declared: WorkerSpec | None) -> WorkerSpec | None:
    """config.toml's description and inputs over the worker's own declaration."""
    if declared is None or spec is None:
        return spec or declared
    return replace(
        declared, description=spec.description or declared.description, inputs=spec.inputs or declared.inputs
    )
