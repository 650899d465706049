"""``kmpwm doctor [--repair]``: journal integrity, permissions, configuration, workers, invoker.

Exit 0 when all is well (even without an invoker: it says so); otherwise the worst problem
found: 74 a damaged journal or one run-due cannot write (read-only, a lock that is a directory),
77 a private directory (runners/, quarantine/, cache/, logs/) that is not private or writable,
78 a bad config.toml or a worker that cannot start (program missing, entry not importable), 1 an
installed invoker that has not run for several periods (its daemon is not running).  ``--repair`` rewrites
the journal atomically with every valid
record, in order -- also those inside damaged lines, and one a single flipped bit damaged -- and
moves the bytes that belong to no record to ``journal/quarantine/`` (with a manifest); it exits 0
once the journal is healthy again.
"""

from __future__ import annotations

import os
import shutil
import stat
import time

import orjson

from kmpwm.core.exitcodes import CONFIG, IO_ERROR, NOPERM, NOTHING_MATCHED, InsecurePermissions, KmpwmError
from kmpwm.core.timeparse import iso
from kmpwm.storage.journal import Journal, mend
from kmpwm.storage.paths import Paths, check_all, check_secure, private_subdir

NOTIFY_QUEUE_FULL = 0.25  # a shared store's notification queue this full is a problem (doctor)


def check_journal(journal: Journal) -> dict:
    scan, _ = journal.read(0)
    ident = journal.identity()
    header = journal.header()
    return {
        "path": str(journal.path),
        "bytes": ident[1] if ident else 0,
        "records": len(scan.records),
        "generation": header.get("gen") if header else None,
        "damage": [{"offset": d.start, "length": d.end - d.start, "what": d.describe()} for d in scan.damage],
        "torn_tail": None
        if scan.torn is None
        else {"offset": scan.torn.start, "length": scan.torn.end - scan.torn.start},
        "_scan": scan,
    }


def repair(paths: Paths) -> dict:
    """Keep every valid record, in order -- the valid lines, the valid records inside damaged lines
    (a flipped newline glues two into one), a record one flipped bit damaged -- and move the bytes
    that belong to no record (and a corrected record's damaged bytes) to quarantine."""
    journal = Journal(paths)
    with journal.locked():
        swept = journal.sweep_temp_files()
        scan, _ = journal.read(0)
        if not scan.damage and scan.torn is None:
            return {
                "quarantined": [],
                "records_kept": len(scan.records),
                "salvaged": 0,
                "corrected": [],
                "temp_files_removed": swept,
            }
        with open(journal.path, "rb") as fh:
            raw = fh.read()
        mended = mend(raw)
        moved = [_quarantine(journal, raw, start, end, kind) for start, end, kind in mended.moved]
        kept = [r for r in mended.records if not _is_header(r)]  # rewrite writes its own
        _write_manifest(
            paths,
            {
                "journal": str(journal.path),
                "repaired_at": iso(time.time()),
                "regions": moved,
                "records_kept": len(kept),
                "salvaged": mended.salvaged,
                "corrected": mended.corrected,
            },
        )
        journal.rewrite(kept)
        from kmpwm.storage.store import Store

        Store(paths).drop_snapshot()
    return {
        "quarantined": moved,
        "records_kept": len(kept),
        "salvaged": mended.salvaged,
        "corrected": mended.corrected,
        "temp_files_removed": swept,
    }


def _is_header(record: dict) -> bool:
    """Is ``record`` a journal header?"""
    return bool(record.get("ops")) and record["ops"][0].get("op") == "hdr"


def _quarantine(journal: Journal, raw: bytes, start: int, end: int, kind: str) -> dict:
    """Move the bytes ``raw[start:end]`` to quarantine; the manifest's entry for them."""
    path = journal.quarantine(raw[start:end], start, kind)
    return {"offset": start, "length": end - start, "kind": kind, "file": str(path)}


def _write_manifest(paths: Paths, manifest: dict) -> None:
    """Write a repair's manifest to ``journal/quarantine/<time>-repair.json`` (private)."""
    path = private_subdir(paths.quarantine_dir) / f"{time.strftime('%Y%m%dT%H%M%S')}-repair.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))


def _check_workers(paths: Paths) -> tuple[list[dict], str | None]:
    from kmpwm.running.registry import Registry

    try:
        reg = Registry(paths, rescan=True)
        items = reg.all()
        dups = reg.duplicates()
    except KmpwmError as exc:
        return [], exc.message
    out = [_worker_doc(w) for w in items]
    for name in dups:
        out.append(
            {
                "name": name,
                "source": "both",
                "kind": "?",
                "target": "",
                "ok": False,
                "error": "defined both in config.toml and by a package",
            }
        )
    return out, None


def _worker_doc(w) -> dict:
    """One registered worker in the report: ``ok``, or the ``error`` that stops it from starting."""
    entry = {"name": w.name, "source": w.source, "kind": w.kind, "target": w.target, "ok": True, "error": None}
    cfg = w.config
    if cfg is not None and cfg.cwd and not os.path.isdir(cfg.cwd):
        entry.update(ok=False, error=f"its cwd {cfg.cwd} is not a directory (create it or fix cwd in config.toml)")
        return entry
    if w.kind == "command":
        entry["error"] = _command_problem(cfg)
    else:
        from kmpwm.running.registry import import_error

        entry["error"] = import_error(w)
    entry["ok"] = entry["error"] is None
    return entry


def _command_problem(cfg) -> str | None:
    """Why run-due could not start this command worker's program (None: it can)."""
    prog = cfg.command[0]
    path = cfg.env.get("PATH", os.environ.get("PATH"))
    if os.sep not in prog:
        return (
            None
            if shutil.which(prog, path=path)
            else (f"program {prog!r} not found on PATH (install it, or give its full path in command)")
        )
    full = os.path.join(cfg.cwd, prog) if cfg.cwd else prog  # an absolute prog stays as it is
    if not os.path.exists(full):
        return f"program {full} does not exist (fix command[0] in config.toml)"
    if not os.path.isfile(full) or not os.access(full, os.X_OK):
        return f"program {full} is not executable (chmod +x {full})"
    return None


def _read_only(path) -> str:
    try:
        if os.statvfs(path).f_flag & getattr(os, "ST_RDONLY", 1):
            return "its file system is mounted read-only (remount it read-write)"
    except OSError:
        pass
    return f"it is not writable by you (mode {stat.S_IMODE(os.stat(path).st_mode):04o}; chmod u+w {path})"


def check_files(paths: Paths) -> list[tuple[int, str]]:
    """What would stop run-due although the journal reads fine, as (exit code, problem and fix):
    74 for the journal's own files (the lock, a read-only journal), 77 for kmpwm's private
    directories (runners/, quarantine/, cache/, logs/) that are not private or not writable."""
    out, lock_is_file = _check_lock(paths.lock_file)
    out += _read_only_journal_files(paths, lock_is_file)
    for path, what in (
        (paths.runners_dir, "runners directory"),
        (paths.quarantine_dir, "quarantine directory"),
        (paths.cache_dir, "cache directory"),
        (paths.log_dir, "log directory"),
    ):
        problem = _check_private_dir(path, what)
        if problem is not None:
            out.append((NOPERM, problem))
    return out


def _read_only_journal_files(paths: Paths, lock_is_file: bool) -> list[tuple[int, str]]:
    """The journal's own files (the lock too, when it is a file) that run-due could not write."""
    journal_files = [(paths.journal_dir, "journal directory"), (paths.journal_file, "journal")]
    if lock_is_file:
        journal_files.append((paths.lock_file, "lock"))
    out = []
    for path, what in journal_files:
        if os.path.exists(path) and not os.access(path, os.W_OK | (os.X_OK if path.is_dir() else 0)):
            out.append(
                (
                    IO_ERROR,
                    f"the {what} {path} is read-only: run-due cannot record claims or results; {_read_only(path)}",
                )
            )
    return out


def _check_lock(lock) -> tuple[list[tuple[int, str]], bool]:
    """Problems with the journal's lock file, and whether it is a regular file."""
    try:
        st = os.lstat(lock)
    except FileNotFoundError:
        return [], False
    except OSError as exc:
        return [(IO_ERROR, f"cannot inspect the lock {lock}: {exc.strerror}")], False
    if stat.S_ISREG(st.st_mode):
        return [], True
    is_dir = stat.S_ISDIR(st.st_mode)
    kind = "a directory" if is_dir else "a symlink" if stat.S_ISLNK(st.st_mode) else "not a file"
    problem = (
        f"the lock {lock} is {kind}: no command can take the journal lock; remove it "
        f"({'rmdir' if is_dir else 'rm'} {lock}), kmpwm makes a new one"
    )
    return [(IO_ERROR, problem)], False


def _check_private_dir(path, what: str) -> str | None:
    """Why one of kmpwm's private directories would stop run-due (None: fine, or not there yet)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot inspect the {what} {path}: {exc.strerror}"
    if not stat.S_ISDIR(st.st_mode):  # a symlink too: lstat does not follow it
        return (
            f"the {what} {path} is {'a symlink' if stat.S_ISLNK(st.st_mode) else 'not a directory'}"
            f": remove it (rm {path}); kmpwm creates it as a private directory"
        )
    try:
        check_secure(path, what=f"the {what}")
    except InsecurePermissions as exc:
        return f"{exc.message}; {exc.hint}"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"the {what} {path} is not writable by you (mode {stat.S_IMODE(st.st_mode):04o}): chmod 700 {path}"
    return None


# the invoker is stale when run-due has not run for this many of its periods (and a minute)
STALE_PERIODS = 3


def stale_invoker(invoker: dict, last_run: float | None, now: float) -> str | None:
    """Why an installed invoker looks dead (its daemon not running), None when it ran lately."""
    if not invoker.get("installed"):
        return None
    every = invoker.get("every") or 86400  # a schedule we cannot read: judged by a day
    # never ran: judged from when it was installed (its file), if known
    since = last_run if last_run is not None else _installed_at(invoker.get("path"))
    if since is None or now - since <= STALE_PERIODS * every + 60:
        return None
    return _stale_text(invoker.get("backend") or "?", every, last_run, now)


def _stale_text(backend: str, every: float, last_run: float | None, now: float) -> str:
    """The problem a stale invoker is: when run-due last ran, and what to look at."""
    from kmpwm.core.timeparse import format_duration

    check = _SCHEDULER_CHECKS.get(backend, "is its scheduler running?")
    ran = f"last ran {format_duration(now - last_run)} ago" if last_run is not None else "has never run"
    return (
        f"the invoker ({backend}, every {format_duration(every)}) is installed but run-due {ran}: "
        f"nothing runs your tasks; {check}"
    )


# what to look at when a backend's invoker is stale
_SCHEDULER_CHECKS = {
    "cron": "is the cron daemon running? (systemctl status cron, or crond; pgrep -a cron)",
    "systemd": "is the timer active? (systemctl --user status kmpwm-*.timer; loginctl enable-linger)",
    "launchd": "is the agent loaded? (launchctl list | grep kmpwm)",
}


def _installed_at(path: str | None) -> float | None:
    """When the invoker's file ``path`` was last written (None: no file, or unknown)."""
    if not path:
        return None
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def doctor(paths: Paths, do_repair: bool) -> dict:
    """``kmpwm doctor [--repair]``: check everything run-due needs and return the report (its
    ``exit_code``: the worst problem found, 0 when healthy)."""
    check_all(paths)
    report, repaired = _journal_report(paths, do_repair)
    found: list[tuple[int, str]] = []  # (exit code, problem)
    if report["damage"]:
        found.append((IO_ERROR, f"journal: {len(report['damage'])} damaged region(s); run `kmpwm doctor --repair`"))
    found += check_files(paths)
    workers, config_error = _check_workers(paths)
    found += _worker_problems(workers, config_error)
    invoker, last_run, stale = _check_invoker(paths)
    if stale:
        found.append((NOTHING_MATCHED, stale))
    store = _check_store(paths)
    if store is not None and store.get("error"):
        found.append((store["exit_code"], f"store: {store['error']}"))
    code = _worst(found)
    from kmpwm.running.serve import running_serves

    return {
        "healthy": code == 0,  # a damaged journal is a problem too
        "journal": report,
        "store": store,
        "config": {"path": str(paths.config_file), "error": config_error},
        "workers": workers,
        "invoker": invoker,
        "last_run_at": iso(last_run),
        "serve": {"running": [{"pid": x["pid"], "started_at": iso(x["started_at"])} for x in running_serves(paths)]},
        "repaired": repaired,
        "problems": [p for _, p in found],
        "exit_code": code,
    }


def _journal_report(paths: Paths, do_repair: bool) -> tuple[dict, dict | None]:
    """The journal's report (:func:`check_journal`, after the repair when ``do_repair``) and what
    the repair did (None: no repair)."""
    journal = Journal(paths)
    repaired = None
    report = check_journal(journal)
    if do_repair:
        repaired = repair(paths)
        report = check_journal(journal)
    report.pop("_scan")
    return report, repaired


def _worker_problems(workers: list[dict], config_error: str | None) -> list[tuple[int, str]]:
    """A bad config.toml and the workers that cannot start, as (exit code, problem)."""
    found = [(CONFIG, f"config: {config_error}")] if config_error else []
    return found + [(CONFIG, f"worker {w['name']}: {w['error']}") for w in workers if not w["ok"]]


def _worst(found: list[tuple[int, str]]) -> int:
    """The exit code of the worst problem found, 0 for none."""
    codes = {c for c, _ in found}
    # the worst first: a damaged or unwritable journal, then permissions, configuration, a stale invoker
    return next((c for c in (IO_ERROR, NOPERM, CONFIG, NOTHING_MATCHED) if c in codes), 0)


def _check_invoker(paths: Paths) -> tuple[dict, float | None, str | None]:
    """The installed invoker, when run-due last ran, and why the invoker is stale (installed, but
    run-due has not run for too long) or None."""
    try:
        from kmpwm.system.invoker import invoker_status

        invoker = invoker_status(paths)
    except Exception as exc:  # doctor reports, it does not fail on the invoker
        invoker = {"installed": False, "error": f"{type(exc).__name__}: {exc}"}
    last_run = None
    try:
        last_run = os.stat(paths.runners_dir / "last-run").st_mtime
    except OSError:
        pass
    stale = stale_invoker(invoker, last_run, time.time())
    invoker["stale"] = stale is not None
    return invoker, last_run, stale


def _check_store(paths: Paths) -> dict | None:
    """A shared store (SPEC section 14): reachable, its schema current (migrated on first use),
    the hosts that ran work in it.  The URL is shown masked; None for the embedded journal."""
    from kmpwm.core.exitcodes import KmpwmError
    from kmpwm.storage.stores import store_url

    try:
        url = store_url(paths)
    except KmpwmError as exc:
        return {"url": None, "error": exc.message, "exit_code": exc.exit_code}
    if url is None:
        return None
    from kmpwm.storage.pgstore import SCHEMA_VERSION, PgStore, mask

    doc = {"url": mask(url), "kind": "postgresql", "schema": None, "expected_schema": SCHEMA_VERSION}
    try:
        store = PgStore(paths, url)
        store.conn()
        doc["schema"] = store.schema_version()
        doc["records"] = store._execute("SELECT count(*) FROM kmpwm_records").fetchone()[0]
        doc["hosts"] = store.hosts()
        doc["notify_queue"] = float(store._execute("SELECT pg_notification_queue_usage()").fetchone()[0])
        store.close()
    except KmpwmError as exc:
        return dict(doc, error=exc.message, exit_code=exc.exit_code)
    if doc["schema"] != SCHEMA_VERSION:
        return dict(doc, error=f"schema v{doc['schema']}, expected v{SCHEMA_VERSION}", exit_code=CONFIG)
    if doc["notify_queue"] >= NOTIFY_QUEUE_FULL:
        # A listening session that does not read (a `kmpwm serve` stopped with SIGSTOP for days)
        # holds the server's notification queue back; once it is full, every write fails.
        return dict(
            doc,
            error=f"PostgreSQL's notification queue is {doc['notify_queue']:.0%} full: a session that listens "
            "is not reading (a stopped `kmpwm serve`?); writes fail once it is full",
            exit_code=IO_ERROR,
        )
    return doc
