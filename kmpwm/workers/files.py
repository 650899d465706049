"""The ``compress`` built-in worker, plus the input and file helpers the other built-ins share."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import posixpath
import tarfile
import time
import zipfile

from kmpwm.core.results import Failure, Retry, Success
from kmpwm.running.declare import worker

FORMATS = ("zip", "tar.gz")


def load_input(input, worker: str) -> dict | Failure:
    """The worker's input as a dict: empty when there is none, a Failure when it is not a JSON
    object (the scheduler records the message, so it names the worker and the problem)."""
    if input is None or (isinstance(input, str) and not input.strip()):
        return {}
    if isinstance(input, dict):
        return input
    return _json_object(input, worker)


def _json_object(text, worker: str) -> dict | Failure:
    """``text`` parsed as a JSON object, else the Failure that says why it is not one."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError) as exc:
        return Failure(f"{worker}: input is not valid JSON: {exc}")
    if not isinstance(value, dict):
        return Failure(f"{worker}: input must be a JSON object, got {type(value).__name__}")
    return value


def nonempty_string(value, message: str) -> str:
    """``value`` if it is a non-empty string, else ValueError(``message``)."""
    if not isinstance(value, str) or not value:
        raise ValueError(message)
    return value


def given_or_upstream(args: dict, ctx, key: str):
    """The input's ``key``, else the previous chain step's (so a chain can pass a path or URL on)."""
    return args.get(key) or (ctx.upstream or {}).get(key)


def elapsed_ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


def fsync_dir(path: str) -> None:
    """Make a rename inside ``path`` durable; not every platform can open a directory, and the
    rename itself has already happened, so failing here must not fail the task."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@worker(
    description="Pack files and directories into a zip or tar.gz archive, written atomically.",
    inputs={
        "paths": {"type": "list of strings", "description": "files and directories to pack"},
        "path": {"type": "string", "description": "one file or directory (else upstream.path)"},
        "output": {"type": "string", "description": "the archive (default: the first input + .zip or .tar.gz)"},
        "format": {"type": "string", "description": "zip or tar.gz (default: from output's suffix, else zip)"},
    },
    returns={
        "path": "the archive written (what a next step such as upload takes)",
        "output": "the same",
        "format": "zip or tar.gz",
        "files": "regular files stored",
        "bytes_in": "their total size",
        "bytes_out": "the archive's size",
        "skipped": "entries skipped (links to directories, ...)",
        "duration_ms": "how long it took",
    },
    heavy=True,
)
def compress(input, ctx):
    """Pack files and directories into a zip or tar.gz archive, written atomically.

    Input (JSON object):
        ``paths``: list of files/directories, or ``path``: one (falls back to ``upstream["path"]``,
        so a chain can compress what a download produced); ``output``: the archive to write
        (default: the first input's path plus ``.zip`` or ``.tar.gz``); ``format``: ``"zip"`` or
        ``"tar.gz"`` (default: from the output's suffix — ``.tar.gz`` or ``.tgz`` mean tar.gz —
        else zip).
    Directories are added recursively under their own name (``dir/sub/file``); symlinks to files
    are stored as the file's content, symlinked directories and special files are skipped.

    Data: ``path`` and ``output`` (the archive), ``format``, ``files`` (regular files stored), ``bytes_in``
    (their total size),
    ``bytes_out`` (archive size), ``skipped``, ``duration_ms``.
    Told to expire between two files, it removes the partial archive and asks to be retried.
    The archive is written to ``.NAME.kmpwm-tmp`` beside it; one left by a killed run is removed
    by the next run.
    """
    started = time.monotonic()
    args = load_input(input, "compress")
    if isinstance(args, Failure):
        return args
    try:
        paths = _input_paths(args, ctx)
        output, fmt = _archive_target(args, paths)
    except ValueError as exc:
        return Failure(f"compress: {exc}")
    entries = _collect(paths, output)
    if isinstance(entries, Failure):
        return entries
    members, skipped = entries
    stopped = _write_atomically(output, fmt, members, ctx)
    if stopped is not None:
        return stopped  # a Retry or Failure
    return _compressed(output, fmt, members, skipped, started)


def _compressed(output: str, fmt: str, members: list, skipped: int, started: float) -> Success:
    """The Success of a written archive, with what it holds."""
    files = [m for m in members if m[2] is not None]
    return Success(
        message=f"compressed {len(files)} file(s) into {output}",
        data={
            "path": output,
            "output": output,
            "format": fmt,
            "files": len(files),
            "bytes_in": sum(m[2] for m in files),
            "bytes_out": os.path.getsize(output),
            "skipped": skipped,
            "duration_ms": elapsed_ms(started),
        },
    )


def _write_atomically(output: str, fmt: str, members: list, ctx) -> Retry | Failure | None:
    """Write the archive beside ``output`` and rename it into place: None once it is there, else
    the Retry (told to expire) or Failure (the file system refused) that stopped it."""
    directory = os.path.dirname(output)
    # Hidden, in the same directory so os.replace is an atomic rename, and named after the output
    # so that the next run finds and replaces one left by a run that was killed (SIGKILL leaves no
    # chance to clean up); created with os.open(0o666) rather than mkstemp so the archive gets the
    # user's umask, not 0600.
    tmp = temp_path(output)
    done = False
    try:
        os.makedirs(directory, exist_ok=True)
        _remove_stale(tmp)
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as raw:
            if not _write_archive(raw, fmt, output, members, ctx):
                return Retry("compress: stopped before the archive was complete; will start over")
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, output)
        done = True
    except OSError as exc:
        return Failure(f"compress: {exc}")
    finally:
        if not done:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
    fsync_dir(directory)
    return None


def temp_path(target: str) -> str:
    """Where a built-in worker writes ``target`` before renaming it into place: hidden, beside it,
    and the same on every run, so a run can remove what a killed run left behind."""
    return os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.kmpwm-tmp")


def _remove_stale(tmp: str) -> None:
    try:
        if os.path.islink(tmp) or os.path.isfile(tmp):
            os.remove(tmp)
    except FileNotFoundError:
        pass


def _input_paths(args: dict, ctx) -> list[str]:
    """The absolute paths to pack (ValueError when there are none, or one is not a path)."""
    paths = _given_paths(args, ctx)
    if not _is_path_list(paths):
        raise ValueError('"paths" must be a list of file or directory paths')
    if not paths:
        raise ValueError('nothing to compress: give "paths" or "path"')
    return [os.path.abspath(os.path.expanduser(p)) for p in paths]


def _is_path_list(value) -> bool:
    return isinstance(value, list) and all(isinstance(p, str) and p for p in value)


def _given_paths(args: dict, ctx):
    """``paths`` as given, else ``path`` (or the previous step's) as a list of one (none without it)."""
    paths = args.get("paths")
    if paths is not None:
        return paths
    one = given_or_upstream(args, ctx, "path")
    return [one] if one else []


def _archive_target(args: dict, paths: list[str]) -> tuple[str, str]:
    """The archive's absolute path and format (ValueError on a bad one)."""
    output, fmt = args.get("output"), args.get("format")
    if fmt not in (None, *FORMATS):
        raise ValueError(f"unknown format {fmt!r} (expected one of {', '.join(FORMATS)})")
    if output is None:
        output = os.path.normpath(paths[0]) + "." + (fmt or "zip")
    output = nonempty_string(output, '"output" (the archive path) must be a non-empty string')
    output = os.path.abspath(os.path.expanduser(output))
    if os.path.isdir(output):
        raise ValueError(f"output is a directory: {output}")
    return output, fmt or _format_from_suffix(output)


def _format_from_suffix(output: str) -> str:
    name = output.lower()
    return "tar.gz" if name.endswith((".tar.gz", ".tgz")) else "zip"


def _collect(paths: list[str], output: str):
    """Every (filesystem path, archive name, size or None for a directory) to store, plus how
    many entries were skipped; a Failure for a missing path or two inputs with the same name."""
    members: list[tuple[str, str, int | None]] = []
    skipped = 0
    for path in paths:
        if not os.path.exists(path):
            return Failure(f"compress: no such file or directory: {path}")
        prefix = os.path.basename(os.path.normpath(path))
        if os.path.isdir(path):
            found, passed = _directory_members(path, prefix, output)
            members += found
            skipped += passed
        else:
            members.append((path, prefix, os.path.getsize(path)))
    clash = _name_clash(members)
    if clash is not None:
        return clash
    return members, skipped


def _directory_members(path: str, prefix: str, output: str) -> tuple[list, int]:
    """A directory's members, recursively and in name order under ``prefix``, and how many
    entries were skipped (links to directories, special files, the archive itself)."""
    members: list[tuple[str, str, int | None]] = []
    skipped = 0
    for root, dirs, names in os.walk(path):
        dirs.sort()
        rel = os.path.relpath(root, path)
        base = prefix if rel == "." else posixpath.join(prefix, *rel.split(os.sep))
        members.append((root, base, None))
        files = _regular_files(root, names, output)
        members += [(full, posixpath.join(base, name), os.path.getsize(full)) for name, full in files]
        skipped += len(names) - len(files) + sum(os.path.islink(os.path.join(root, d)) for d in dirs)
    return members, skipped


def _regular_files(root: str, names: list[str], output: str) -> list[tuple[str, str]]:
    """(name, path) of the regular files among ``names`` in ``root``, in name order."""
    found = []
    for name in sorted(names):
        full = os.path.join(root, name)
        # An earlier archive in the directory being packed must not end up inside itself.
        if os.path.isfile(full) and os.path.abspath(full) != output:
            found.append((name, full))
    return found


def _name_clash(members: list) -> Failure | None:
    """The Failure when two members would be stored under the same name."""
    seen: dict[str, str] = {}
    for full, arcname, _ in members:
        if arcname in seen:
            return Failure(f"compress: {seen[arcname]} and {full} would both be stored as {arcname!r}")
        seen[arcname] = full
    return None


def _write_archive(raw, fmt: str, output: str, members, ctx) -> bool:
    """Write ``members`` into the open file ``raw``; False if told to expire part-way."""
    if fmt == "zip":
        with zipfile.ZipFile(
            raw,
            "w",
            compression=zipfile.ZIP_DEFLATED,
            strict_timestamps=False,  # pre-1980 mtimes
        ) as archive:
            return _add_members(members, ctx, archive.write)
    # name= only labels the gzip header; the bytes go to fileobj.
    with tarfile.open(name=output, mode="w:gz", fileobj=raw, dereference=True) as archive:
        return _add_members(members, ctx, functools.partial(archive.add, recursive=False))


def _add_members(members, ctx, add) -> bool:
    """``add(path, name)`` for each member, in order; False if told to expire part-way."""
    for full, arcname, _ in members:
        if ctx.expired:
            return False
        add(full, arcname)
    return True
