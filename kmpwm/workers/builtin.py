"""Small built-in workers: ``echo`` (returns its input as data), ``sleep`` and ``fail``.

They make demos and smoke tests possible without writing a worker first.
"""

from __future__ import annotations

import json

from kmpwm.core.results import Failure, Retry, Success
from kmpwm.running.declare import worker


def _parse(input: str | None):
    if input is None or input == "":
        return None
    try:
        return json.loads(input)
    except ValueError:
        return input


@worker(
    description="Succeed, returning the input as data (for demos and trying out chains).",
    inputs={"(any)": {"type": "any JSON", "description": "an object becomes data; anything else is data.input"}},
    returns={
        "(input keys)": "the input object's keys",
        "input": "the input, when it is not an object",
        "upstream": "the previous chain step's data, when there is one",
        "task": "this task's id",
    },
)
def echo(input, ctx):
    """Succeed with ``data``: the input if it is a JSON object, else ``{"input": ...}``; the upstream
    data of a chain is passed through under ``upstream`` so chains can show data flowing."""
    value = _parse(input)
    data = dict(value) if isinstance(value, dict) else ({"input": value} if value is not None else {})
    if ctx.upstream:
        data.setdefault("upstream", ctx.upstream)
    data.setdefault("task", ctx.task_id)
    return Success(message=f"echo from {ctx.task_id}", data=data)


@worker(
    description="Sleep, stopping early when told to expire (for trying out limits and expiry).",
    inputs={"seconds": {"type": "number", "default": 1, "description": "how long (a bare number works too)"}},
    returns={"slept": "the seconds slept"},
)
def sleep(input, ctx):
    """Sleep for the number of seconds in the input (default 1); stops early when told to expire."""
    value = _parse(input)
    seconds = float(value.get("seconds", 1) if isinstance(value, dict) else (value if value is not None else 1))
    if ctx.wait(seconds):
        return Retry("told to stop before the sleep ended")
    return Success(message=f"slept {seconds:g}s", data={"slept": seconds})


@worker(
    description="Always fail, with the input as the message (for trying out retries and chains).",
    inputs={"(any)": {"type": "text", "default": "failed on purpose", "description": "the failure message"}},
)
def fail(input, ctx):
    """Always fail, with the input as the message (for trying out retries and chains)."""
    return Failure(str(_parse(input) or "failed on purpose"))
