"""What a Python worker sees as ``ctx`` (SPEC section 5): who it is, what came before, and
whether it has been told to stop.

    def my_worker(input, ctx):
        for chunk in work():
            if ctx.expired:          # run-due was told time is up (SIGTERM to this process)
                return WorkerResult.Retry("stopped early")
            ...
        return WorkerResult.Success(data={"done": True})
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class WorkerContext:
    task_id: str
    attempt: int  # 1 on the first run
    upstream: dict = field(default_factory=dict)  # merged data of the previous chain step
    input: str | None = None
    worker: str = ""
    chain_id: str | None = None
    step: int | None = None
    deadline: float | None = None  # time.monotonic() value of the time limit
    progress_file: str | None = None  # where ctx.progress writes (beside the run's output)
    _expired: bool = False
    _reporter: object = None

    @property
    def expired(self) -> bool:
        """True once run-due has asked this worker to stop (time limit, budget, simulate-expire)."""
        return self._expired

    def is_expired(self) -> bool:
        return self._expired

    def expire(self) -> None:
        self._expired = True

    def progress(self, fraction: float, message: str | None = None) -> None:
        """Report how far the run is (``fraction`` 0..1, an optional short message); shown by
        ``inspect-queue`` and ``explain`` while the task runs.  Cheap enough to call in a loop."""
        if self._reporter is None:
            from kmpwm.storage.progress import Reporter

            self._reporter = Reporter(self.progress_file)
        self._reporter.report(fraction, message)

    def close(self) -> None:
        if self._reporter is not None:
            self._reporter.close()

    def time_left(self) -> float | None:
        """Seconds until the time limit (None when there is none)."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; returns True early if the worker was told to stop."""
        end = time.monotonic() + seconds
        while not self._expired:
            left = end - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(left, 0.05))
        return True

    def input_json(self) -> Any:
        """The input parsed as JSON (None when there is none)."""
        if self.input is None or self.input == "":
            return None
        import json

        return json.loads(self.input)
