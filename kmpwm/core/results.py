"""What a worker returns (seed: ``WorkerResult``), and how any return value maps onto one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class WorkerResult:
    """Base of ``WorkerResult.Success``, ``WorkerResult.Failure`` and ``WorkerResult.Retry``."""

    status: str = ""
    message: str | None = None
    data: dict | None = None

    Success: type[WorkerResult]
    Failure: type[WorkerResult]
    Retry: type[WorkerResult]


@dataclass
class Success(WorkerResult):
    message: str | None = None
    data: dict | None = None
    status = "SUCCESS"


@dataclass
class Failure(WorkerResult):
    message: str = "Task failed"
    data: dict | None = None
    status = "FAILURE"


@dataclass
class Retry(WorkerResult):
    message: str | None = None
    data: dict | None = None
    status = "RETRY"


for _cls in (Success, Failure, Retry):
    _cls.__qualname__ = f"WorkerResult.{_cls.__name__}"
    setattr(WorkerResult, _cls.__name__, _cls)


def normalise(value: Any) -> WorkerResult:
    """Map a worker's return value onto a WorkerResult (True/None success, False failure)."""
    if isinstance(value, WorkerResult):
        return _dict_data(value)
    if value is None or value is True:
        return Success()
    if value is False:
        return Failure("Task failed")
    if isinstance(value, dict):
        return Success(data=value)
    return Failure(f"worker returned {type(value).__name__}, expected WorkerResult, bool or None")


def _dict_data(result: WorkerResult) -> WorkerResult:
    """``result``, except that a success whose ``data`` is no dict gets it as ``{"value": data}``."""
    if result.status == "SUCCESS" and result.data is not None and not isinstance(result.data, dict):
        return Success(result.message, {"value": result.data})
    return result
