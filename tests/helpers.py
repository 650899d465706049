"""Helpers to run the ``kmpwm`` command line end to end, in a subprocess.

    from helpers import kmpwm, kjson

    proc = kmpwm("enqueue", "a", "echo", check=0)          # CompletedProcess (text mode)
    doc, rc = kjson("inspect-queue", "--all")                # parsed stdout JSON, exit code

Every call runs ``[sys.executable, "-m", "kmpwm", *args]`` with the current environment (the
autouse fixture in conftest.py sets ``KMPWM_HOME`` to a fresh directory), plus ``env``
overrides, and asserts that stderr never holds a Python traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

import orjson

__all__ = ["kmpwm", "kjson", "jdoc", "kmpwm_env", "tasks_by_id", "DEFAULT_TIMEOUT"]

DEFAULT_TIMEOUT = 120.0


def kmpwm_env(env: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """The current environment with ``env`` applied on top (a value of None removes the key)."""
    out = dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = str(value)
    return out


def kmpwm(
    *args: Any,
    input: str | bytes | None = None,
    env: Mapping[str, str | None] | None = None,
    check: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    cwd: str | os.PathLike | None = None,
    faketime: str | None = None,
) -> subprocess.CompletedProcess:
    """Run ``python -m kmpwm ARGS`` and return the CompletedProcess (stdout/stderr as text).

    ``input``: text (or bytes) for stdin (stdin is empty otherwise); ``env``: overrides of the
    current environment (None removes a variable); ``check``: the exit code to assert, if any;
    ``faketime``: run under Debian's faketime with this offset (``+15``, ``+1d``).
    Always asserts that no traceback reached stderr.
    """
    argv = [sys.executable, "-m", "kmpwm", *(os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args)]
    if faketime is not None:
        argv = ["faketime", "-f", faketime, *argv]
    if isinstance(input, bytes):
        input = input.decode("utf-8")
    proc = subprocess.run(
        argv,
        input=input if input is not None else "",
        capture_output=True,
        text=True,
        env=kmpwm_env(env),
        timeout=timeout,
        cwd=cwd,
    )
    assert "Traceback" not in proc.stderr, f"traceback from kmpwm {args}:\n{proc.stderr}"
    if check is not None:
        assert proc.returncode == check, (
            f"kmpwm {' '.join(map(str, args))}: exit {proc.returncode}, expected {check}\n"
            f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
    return proc


def kjson(
    *args: Any,
    input: str | bytes | None = None,
    env: Mapping[str, str | None] | None = None,
    check: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> tuple[Any, int]:
    """Run ``kmpwm ARGS --json`` (``--json`` appended unless given) and return (document, exit code).

    Asserts that stdout is exactly one JSON document.
    """
    args = tuple(args)
    if "--json" not in args:
        args = (*args, "--json")
    proc = kmpwm(*args, input=input, env=env, check=check, timeout=timeout)
    try:
        doc = orjson.loads(proc.stdout)
    except orjson.JSONDecodeError as exc:
        raise AssertionError(
            f"kmpwm {' '.join(map(str, args))}: stdout is not one JSON document ({exc}):\n"
            f"{proc.stdout!r}\nstderr: {proc.stderr}"
        ) from None
    return doc, proc.returncode


def jdoc(*args: Any, expect: int = 0, **kw: Any) -> Any:
    """Run ``kmpwm ARGS --json``, assert the exit code is ``expect``, return the document."""
    proc = kmpwm(*args, "--json", **kw)
    assert proc.returncode == expect, (
        f"kmpwm {' '.join(map(str, args))} --json: exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    )
    return orjson.loads(proc.stdout)


def tasks_by_id(doc: dict) -> dict[str, dict]:
    """``inspect-queue --json`` tasks keyed by id."""
    return {t["id"]: t for t in doc["tasks"]}
