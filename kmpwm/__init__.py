"""kmpwm — a per-user persistent background-task scheduler (KMP WorkManager's model, for the shell).

The public API is imported lazily so that ``kmpwm`` commands start fast.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = [
    "Scheduler",
    "TaskRequest",
    "Constraints",
    "WorkerResult",
    "ScheduleResult",
    "triggers",
    "TaskState",
    "BackoffPolicy",
    "ExistingWorkPolicy",
    "NetworkType",
    "QualityOfService",
    "Outcome",
    "worker",
]

_LAZY = {
    "Scheduler": "api",
    "Outcome": "api",
    "TaskRequest": "core.models",
    "Constraints": "core.models",
    "ScheduleResult": "core.models",
    "TaskState": "core.models",
    "BackoffPolicy": "core.models",
    "ExistingWorkPolicy": "core.models",
    "NetworkType": "core.models",
    "QualityOfService": "core.models",
    "WorkerResult": "core.results",
    "worker": "running.declare",
}


def __getattr__(name: str):
    import importlib

    if name == "triggers":
        # import_module, not ``from . import triggers``: that asks this function again and again
        # while kmpwm.core.triggers is not imported yet (``from kmpwm import triggers`` in a fresh process).
        return importlib.import_module("kmpwm.core.triggers")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kmpwm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"kmpwm.{module}"), name)
    globals()[name] = value
    return value
