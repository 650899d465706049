"""Workers of every shape SPEC section 5 allows, exposed as ``kmpwm.workers`` entry points."""

import asyncio

import kmpwm
from kmpwm import WorkerResult


def sync_worker(input):
    """A plain function taking only the input."""
    return WorkerResult.Success(message="sync ok", data={"shape": "sync", "input": input})


def ctx_worker(input, ctx):
    """A function taking (input, ctx)."""
    return WorkerResult.Success(
        data={"shape": "ctx", "input": input, "attempt": ctx.attempt, "task_id": ctx.task_id, "upstream": ctx.upstream}
    )


async def async_worker(input):
    """A coroutine function."""
    await asyncio.sleep(0.01)
    return WorkerResult.Success(data={"shape": "async", "input": input})


class ClassWorker:
    """A class with do_work(self, input, ctx)."""

    def do_work(self, input, ctx):
        return WorkerResult.Success(
            data={"shape": "class", "input": input, "task_id": ctx.task_id, "attempt": ctx.attempt}
        )


def false_worker(input):
    return False


def none_worker(input, ctx):
    return None


def raising_worker(input):
    raise ValueError("plugin exploded 42")


def retry_worker(input, ctx):
    return WorkerResult.Retry("plugin wants another go")


def flaky_worker(input, ctx):
    """Retries on its first attempt, succeeds on the next one, reporting ctx.attempt."""
    if ctx.attempt < 2:
        return WorkerResult.Retry(f"attempt {ctx.attempt}: not yet")
    return WorkerResult.Success(data={"attempt": ctx.attempt, "task_id": ctx.task_id})


@kmpwm.worker(
    description="A worker that declares itself.",
    inputs={"n": {"type": "integer", "default": 1, "required": False, "description": "a number"}},
    returns={"left": "seconds left of its time limit"},
    timeout="5s",
)
def declared_worker(input, ctx):
    """Declared through kmpwm.worker: described by `kmpwm workers`, its 5 s limit applied."""
    return WorkerResult.Success(data={"left": ctx.time_left()})
