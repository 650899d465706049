"""Host names (SPEC section 14): the name of the host a runner runs on, and checking a name.

Every runner (``run-due``, ``serve``, ``run-now``) has a host name: ``KMPWM_HOST``, else the
machine's name.  Leases carry it (``host/pid/...`` in a claim's ``runner``), a task pinned with
``--host NAME`` runs only where the name matches, and ``--jitter`` offsets are fixed per host.

Here, in ``core``, so that the trigger code (jitter) and the runners read one name; reading an
environment variable and the machine's name is all the I/O it does.
"""

from __future__ import annotations

import os

MAX_HOST_LEN = 253  # a DNS name's limit


def host_problem(name: object) -> str | None:
    """Why ``name`` cannot be a host name (None: it can).  A host name is a non-empty string of
    at most 253 characters without '/', whitespace or control characters ('/' separates the
    parts of a lease's runner id)."""
    if not isinstance(name, str):
        return "expected a string"
    if not name:
        return "it is empty"
    if len(name) > MAX_HOST_LEN:
        return f"longer than {MAX_HOST_LEN} characters"
    if "/" in name:
        return "it contains '/'"
    if any(c.isspace() for c in name):
        return "it contains whitespace"
    if not name.isprintable():
        return "it contains a control character"
    return None


def check_host(name: object, what: str = "--host") -> str:
    """``name`` if it is a valid host name, else InvalidParams (65) naming ``what``."""
    problem = host_problem(name)
    if problem is None:
        return name  # type: ignore[return-value]
    from kmpwm.core.exitcodes import InvalidParams

    raise InvalidParams(f"invalid {what} {name!r}: {problem} (a host name has no '/', spaces or control characters)")


_MACHINE: list[str] = []
_CHECKED: dict[str, str] = {}


def machine_name() -> str:
    """The machine's own name (``socket.gethostname()``, once per process)."""
    if not _MACHINE:
        import socket

        try:
            name = socket.gethostname()
        except OSError:
            name = ""
        _MACHINE.append(_host_safe(name)[:MAX_HOST_LEN] or "localhost")
    return _MACHINE[0]


def _host_safe(name: str) -> str:
    """``name`` with '/', whitespace and control characters made '-': a name no runner id can
    carry (none seen in practice) is made into one that can."""
    return "".join("-" if c == "/" or c.isspace() or not c.isprintable() else c for c in name)


def this_host() -> str:
    """The host name of this process: ``KMPWM_HOST`` (empty counts as unset), else the machine's
    name.  A ``KMPWM_HOST`` that is no valid host name is a configuration error (exit 78), like a
    bad ``KMPWM_ASSUME``: guessing would put leases and pinned tasks under the wrong name."""
    raw = os.environ.get("KMPWM_HOST")
    if not raw:
        return machine_name()
    name = _CHECKED.get(raw)
    if name is None:
        problem = host_problem(raw)
        if problem is not None:
            from kmpwm.core.exitcodes import ConfigError

            raise ConfigError(
                f"KMPWM_HOST={raw!r} is not a host name: {problem} "
                "(a host name has no '/', spaces or control characters; unset it for the machine's name)"
            )
        name = _CHECKED[raw] = raw
    return name


def pinned_elsewhere(t: dict, host: str) -> str | None:
    """Why task ``t`` does not run on ``host`` ("pinned to host NAME ..."), or None when it may:
    the one wording of the decision that scheduling.plan makes, for every view that shows it."""
    pin = t.get("host")
    if pin is None or pin == host:
        return None
    return f"pinned to host {pin} (this is host {host})"
