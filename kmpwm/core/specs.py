"""Task specs with flat keys: the one way a task is described outside Python.

``enqueue`` flags, ``enqueue --from`` JSON Lines and the tasks of ``chain --file`` all become a
dict whose keys are the long flag names with dashes as underscores (``id``, ``worker``,
``input``, ``delay``, ``every``, ``flex``, ``at``, ``window``, ``cron``, ``requires_network``,
``policy``, ``tags``, ``tz``, ``jitter``, ``misfire_grace``, ``host``, ...).  :func:`request_from_spec`
turns such a dict into a TaskRequest (``tz`` goes to the trigger, ``jitter`` and
``misfire_grace`` to the constraints).
"""

from __future__ import annotations

import sys
from typing import Any

from kmpwm.core.exitcodes import InvalidParams
from kmpwm.core.models import (
    CONSTRAINT_FLAGS,
    CONSTRAINT_KEYS,
    Constraints,
    ExistingWorkPolicy,
    TaskRequest,
    enum_value,
)
from kmpwm.core.triggers import Cron, DeviceState, Exact, OnChange, OneTime, Periodic, Windowed

TRIGGER_KEYS = ("every", "at", "window", "cron", "on_change", "when")
SPEC_KEYS = frozenset(
    {
        "id",
        "worker",
        "input",
        "input_file",
        "delay",
        "flex",
        "exact_behavior",
        "no_descendants",
        "descendants",
        "policy",
        "tags",
        "tag",
        "tz",
        "host",
        *TRIGGER_KEYS,
        *CONSTRAINT_KEYS,
    }
)
BOOL_KEYS = frozenset({*CONSTRAINT_FLAGS, "no_descendants", "descendants"})
MAX_INPUT_BYTES = 1 << 20  # 1 MiB per task: inputs live in the journal and in memory


MAX_DEPTH = 64  # nesting of JSON values kmpwm stores (inputs, results' data)


def json_depth(value: Any, limit: int = MAX_DEPTH) -> int:
    """Nesting depth of a JSON value, counting stops past ``limit``."""
    depth, level = 0, [value]
    while level and depth <= limit:
        depth += 1
        nxt = []
        for v in level:
            if isinstance(v, dict):
                nxt.extend(v.values())
            elif isinstance(v, list):
                nxt.extend(v)
        level = nxt
    return depth


def normalise_input(value: Any) -> str | None:
    """A task's input as stored: a string, or the JSON text of any other JSON value."""
    if value is None:
        return None
    if type(value) is str and value.isascii() and len(value) <= MAX_INPUT_BYTES:
        return value  # ASCII text: valid UTF-8, one byte per character
    if not isinstance(value, str):
        value = _json_text(value)
    _check_text(value)
    return value


def _check_text(value: str) -> None:
    """An input is valid UTF-8 text of at most MAX_INPUT_BYTES."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidParams("invalid input: not valid UTF-8 text (it has undecodable bytes)") from None
    if len(value) > MAX_INPUT_BYTES or len(value.encode("utf-8", "surrogatepass")) > MAX_INPUT_BYTES:
        raise InvalidParams(
            f"input too large ({len(value.encode('utf-8', 'surrogatepass'))} bytes; the limit is 1 MiB)",
            hint="pass a path to a file in the input instead",
        )


def _json_text(value: Any) -> str:
    """The JSON text of an input that is not a string."""
    import orjson

    if json_depth(value) > MAX_DEPTH:
        raise InvalidParams(f"invalid input: nested deeper than {MAX_DEPTH} levels")
    try:
        return orjson.dumps(value).decode()
    except TypeError as exc:
        raise InvalidParams(f"invalid input: {exc}") from None


MAX_SPECS_BYTES = 64 << 20  # an ``enqueue --from`` or ``chain --file`` document, read whole


def _mib(n: int) -> str:
    return f"{n >> 20} MiB"


def read_bounded(source: str, limit: int, what: str) -> bytes:
    """The bytes of file ``source`` (``-``: stdin), at most ``limit``: a pipe or a device
    (``/dev/zero``) is read up to ``limit + 1`` bytes and refused beyond, never into memory whole."""
    try:
        if source == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with open(source, "rb") as fh:
                data = fh.read(limit + 1)
    except OSError as exc:
        raise InvalidParams(f"cannot read {what} {source}: {exc.strerror or exc}") from None
    if len(data) > limit:
        name = "stdin" if source == "-" else source
        raise InvalidParams(
            f"{what} {name} is larger than the limit of {_mib(limit)}",
            hint="pass a path to a file in the input instead" if limit == MAX_INPUT_BYTES else None,
        )
    return data


MAX_SPEC_LINE = 8 << 20  # one JSON line of ``enqueue --from``: an input of 1 MiB, escaped, fits


def spec_lines(source: str):
    """``(number, line)`` of the JSON Lines in ``source`` (``-``: stdin), read line by line: a
    line longer than 8 MiB or a stream longer than 64 MiB is refused as soon as it is seen."""
    try:
        fh = sys.stdin.buffer if source == "-" else open(source, "rb")
    except OSError as exc:
        raise InvalidParams(f"cannot read task specs {source}: {exc.strerror or exc}") from None
    name = "stdin" if source == "-" else source
    total = 0
    try:
        for number, line in enumerate(iter(lambda: fh.readline(MAX_SPEC_LINE + 1), b""), 1):
            total += len(line)
            _check_spec_line(name, number, line, total)
            yield number, line
    except OSError as exc:
        raise InvalidParams(f"cannot read task specs {source}: {exc.strerror or exc}") from None
    finally:
        if fh is not sys.stdin.buffer:
            fh.close()


def _check_spec_line(name: str, number: int, line: bytes, total: int) -> None:
    """Line ``number`` fits in MAX_SPEC_LINE, and the ``total`` read so far in MAX_SPECS_BYTES."""
    if len(line) > MAX_SPEC_LINE:
        raise InvalidParams(
            f"line {number} of {name} is longer than {_mib(MAX_SPEC_LINE)} "
            f"(a task's input is at most {_mib(MAX_INPUT_BYTES)})",
            hint="pass a path to a file in the input instead",
        )
    if total > MAX_SPECS_BYTES:
        raise InvalidParams(
            f"task specs {name} are larger than the limit of {_mib(MAX_SPECS_BYTES)}",
            hint="enqueue them in several batches",
        )


def read_input_file(path: str) -> str:
    data = read_bounded(path, MAX_INPUT_BYTES, "input file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidParams(f"input file {path} is not UTF-8 text") from None


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise InvalidParams(f"invalid {key}: expected true or false, got {value!r}")


def request_from_spec(
    spec: dict, *, where: str = "", default_policy: str = "keep", need_id: bool = True
) -> tuple[TaskRequest, str]:
    """Validate a flat spec and return the request and its policy."""
    try:
        _check_keys(spec)
        request, policy = _checked_request(spec, default_policy, need_id)
        request.input = normalise_input(request.input)
    except InvalidParams as exc:
        if where:
            exc.message = f"{where}: {exc.message}"
            exc.args = (exc.message,)
        raise
    return request, policy


def _check_keys(spec: Any) -> None:
    """A JSON object of known keys, with true or false for the flags."""
    if not isinstance(spec, dict):
        raise InvalidParams('expected a JSON object with at least "id" and "worker"')
    unknown = [k for k in spec if k not in SPEC_KEYS]
    if unknown:
        raise InvalidParams(f"unknown key {unknown[0]!r}")
    for key in BOOL_KEYS & spec.keys():
        _bool(key, spec[key])


def _checked_request(spec: dict, default_policy: str, need_id: bool) -> tuple[TaskRequest, str]:
    """The request of a spec with checked keys (its input as given) and its policy."""
    worker, task_id = _spec_names(spec, need_id)
    trigger = _spec_trigger(spec)
    constraints = Constraints(**{k: spec[k] for k in CONSTRAINT_KEYS if k in spec and spec[k] is not None})
    tags = _spec_tags(spec)
    raw_input = _spec_input(spec)
    policy = enum_value(ExistingWorkPolicy, spec.get("policy") or default_policy, what="policy")
    host = spec.get("host")
    if host is not None:
        from kmpwm.core.hosts import check_host

        check_host(host, "host")
    request = TaskRequest(
        worker=worker, id=task_id, input=raw_input, trigger=trigger, constraints=constraints, tags=tags, host=host
    )
    return request, policy


def _spec_names(spec: dict, need_id: bool) -> tuple[str, str | None]:
    worker = spec.get("worker")
    if not isinstance(worker, str) or not worker:
        raise InvalidParams('missing "worker" (a worker name)')
    task_id = spec.get("id")
    if task_id is None:
        if need_id:
            raise InvalidParams('missing "id"')
    elif not isinstance(task_id, str):
        raise InvalidParams(f"invalid id {task_id!r}: expected a string")
    return worker, task_id


# the option each trigger's modifier needs: (spec key, trigger keys it applies to, message)
_MODIFIERS = (
    ("flex", ("every",), "--flex needs --every"),
    ("exact_behavior", ("at",), "--exact-behavior needs --at"),
)


def _spec_trigger_key(spec: dict) -> str | None:
    """The one trigger a spec names (None: a one-time task), its modifiers checked against it."""
    given = [k for k in TRIGGER_KEYS if spec.get(k) not in (None, False)]
    if len(given) > 1:
        raise InvalidParams(
            f"two triggers at once (--{given[0].replace('_', '-')} and "
            f"--{given[1].replace('_', '-')}); a task has one trigger"
        )
    key = given[0] if given else None
    _check_modifiers(spec, key)
    return key


def _check_modifiers(spec: dict, key: str | None) -> None:
    """The options that modify a trigger are given only with the trigger ``key`` they modify."""
    for option, keys, message in _MODIFIERS:
        if spec.get(option) is not None and key not in keys:
            raise InvalidParams(message)
    if _no_descendants(spec) and key != "on_change":
        raise InvalidParams("--no-descendants needs --on-change")
    _check_tz(spec.get("tz"), key)


def _check_tz(tz, key: str | None) -> None:
    """``--tz`` (None: not given) goes with a trigger of times of day, and names a zone."""
    if tz is None:
        return
    if key not in ("cron", "at", "window"):
        raise InvalidParams("--tz needs --cron, --at or --window (the times it reads in that zone)")
    if not isinstance(tz, str):
        raise InvalidParams(f"invalid tz {tz!r}: expected an IANA zone name like Europe/Berlin")


def _no_descendants(spec: dict) -> bool:
    return bool(spec.get("no_descendants") or spec.get("descendants") is False)


def _spec_trigger(spec: dict):
    key = _spec_trigger_key(spec)
    delay = spec.get("delay")
    if delay is None:
        delay = 0
    if key is None:
        return OneTime(delay)
    return _TRIGGER_BUILDERS[key](spec, spec.get(key), delay, spec.get("tz"))


def _window(spec: dict, value, delay, tz):
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise InvalidParams("invalid window: expected two times [START, END]")
    return Windowed(value[0], value[1], delay, tz=tz)


def _on_change(spec: dict, value, delay, tz):
    if not isinstance(value, str):
        raise InvalidParams("invalid on_change: expected a path")
    return OnChange(value, not _no_descendants(spec), delay)


_TRIGGER_BUILDERS = {
    "every": lambda spec, value, delay, tz: Periodic(value, spec.get("flex"), delay),
    "at": lambda spec, value, delay, tz: Exact(value, spec.get("exact_behavior") or "attempt", delay, tz=tz),
    "window": _window,
    "cron": lambda spec, value, delay, tz: Cron(value, delay, tz=tz),
    "on_change": _on_change,
    "when": lambda spec, value, delay, tz: DeviceState(value, delay),
}


def _spec_tags(spec: dict) -> list[str]:
    tags = spec.get("tags", [])
    if isinstance(tags, str):
        tags = [tags]
    if not isinstance(tags, list):
        raise InvalidParams("invalid tags: expected a list of strings")
    if spec.get("tag") is not None:
        tags = tags + _tag_list(spec["tag"])
    if not all(isinstance(t, str) for t in tags):
        raise InvalidParams("invalid tags: expected a list of strings")
    return list(tags)


def _tag_list(tag) -> list:
    """The ``tag`` key, a string or a list, as a list."""
    if not isinstance(tag, (str, list)):
        raise InvalidParams("invalid tag: expected a string or a list of strings")
    return [tag] if isinstance(tag, str) else list(tag)


def _spec_input(spec: dict):
    path = spec.get("input_file")
    if path is None:
        return spec.get("input")
    if "input" in spec:
        raise InvalidParams("give --input or --input-file, not both")
    if not isinstance(path, str):
        raise InvalidParams("invalid input_file: expected a path")
    return read_input_file(path)
