"""``kmpwm doctor [--repair]``: journal integrity, permissions, configuration, workers, invoker.

Exit 0 when the journal is healthy (even without an invoker: it says so), 74 when it finds
damage, 78 for a bad config.toml.  ``--repair`` moves every damaged region to
``journal/quarantine/`` (with a manifest) and rewrites the journal atomically with every valid
record, in order; it exits 0 once the journal is healthy again.
"""

from __future__ import annotations

import os
import shutil
import time

import orjson

from .exitcodes import CONFIG, IO_ERROR, KmpwmError
from .journal import Journal
from .paths import Paths, check_all, private_subdir
from .timeparse import iso


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
        "torn_tail": None if scan.torn is None else {"offset": scan.torn.start, "length": scan.torn.end - scan.torn.start},
        "_scan": scan,
    }


def repair(paths: Paths) -> dict:
    """Quarantine damaged regions and torn bytes; keep every valid record, in order."""
    journal = Journal(paths)
    with journal.locked():
        swept = journal.sweep_temp_files()
        scan, _ = journal.read(0)
        if not scan.damage and scan.torn is None:
            return {"quarantined": [], "records_kept": len(scan.records), "temp_files_removed": swept}
        with open(journal.path, "rb") as fh:
            raw = fh.read()
        moved = []
        regions = list(scan.damage) + ([scan.torn] if scan.torn else [])
        for d in regions:
            path = journal.quarantine(raw[d.start:d.end], d.start, "torn" if d.torn else "corrupt")
            moved.append({"offset": d.start, "length": d.end - d.start, "file": str(path)})
        manifest = private_subdir(paths.quarantine_dir) / f"{time.strftime('%Y%m%dT%H%M%S')}-repair.json"
        fd = os.open(manifest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(orjson.dumps({"journal": str(journal.path), "repaired_at": iso(time.time()),
                                   "regions": moved, "records_kept": len(scan.records)}, option=orjson.OPT_INDENT_2))
        kept = [r for _, r in scan.records if not (r.get("ops") and r["ops"][0].get("op") == "hdr")]
        journal.rewrite(kept)
        from .store import Store

        Store(paths).drop_snapshot()
    return {"quarantined": moved, "records_kept": len(kept), "temp_files_removed": swept}


def _check_workers(paths: Paths) -> tuple[list[dict], str | None]:
    from .registry import Registry

    try:
        reg = Registry(paths, rescan=True)
        items = reg.all()
        dups = reg.duplicates()
    except KmpwmError as exc:
        return [], exc.message
    out = []
    for w in items:
        entry = {"name": w.name, "source": w.source, "kind": w.kind, "target": w.target, "ok": True, "error": None}
        try:
            if w.kind == "command":
                prog = w.config.command[0]
                found = shutil.which(prog, path=os.environ.get("PATH")) if os.sep not in prog else (
                    prog if os.access(prog, os.X_OK) else None)
                if not found:
                    raise LookupError(f"command not found: {prog}")
            else:
                from .worker_host import load_target

                load_target(w)
        except Exception as exc:
            entry.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        out.append(entry)
    for name in dups:
        out.append({"name": name, "source": "both", "kind": "?", "target": "", "ok": False,
                    "error": "defined both in config.toml and by a package"})
    return out, None


def doctor_command(paths: Paths, do_repair: bool, as_json: bool) -> int:
    from .output import print_json, say

    check_all(paths)
    journal = Journal(paths)
    problems: list[str] = []
    repaired = None
    report = check_journal(journal)
    if do_repair:
        repaired = repair(paths)
        report = check_journal(journal)
    report.pop("_scan")
    if report["damage"]:
        problems.append(f"journal: {len(report['damage'])} damaged region(s); run `kmpwm doctor --repair`")
    workers, config_error = _check_workers(paths)
    if config_error:
        problems.append(f"config: {config_error}")
    for w in workers:
        if not w["ok"]:
            problems.append(f"worker {w['name']}: {w['error']}")
    try:
        from .invoker import invoker_status

        invoker = invoker_status(paths)
    except Exception as exc:  # doctor reports, it does not fail on the invoker
        invoker = {"installed": False, "error": f"{type(exc).__name__}: {exc}"}
    last_run = None
    try:
        last_run = iso(os.stat(paths.runners_dir / "last-run").st_mtime)
    except OSError:
        pass
    from .serve import running_serves

    serves = [{"pid": x["pid"], "started_at": iso(x["started_at"])} for x in running_serves(paths)]
    healthy = not report["damage"]
    code = IO_ERROR if report["damage"] else (CONFIG if config_error else 0)
    doc = {"healthy": healthy, "journal": report, "config": {"path": str(paths.config_file), "error": config_error},
           "workers": workers, "invoker": invoker, "last_run_at": last_run, "serve": {"running": serves}, "repaired": repaired,
           "problems": problems, "exit_code": code}
    if as_json:
        print_json(doc)
        return code
    say(f"journal   {report['path']}: {report['records']} record(s), {report['bytes']} bytes"
        + (", healthy" if healthy else f", {len(report['damage'])} DAMAGED region(s)"))
    for d in report["damage"]:
        say(f"          {d['what']}")
    if report["torn_tail"]:
        say(f"          torn last record ({report['torn_tail']['length']} bytes): the next write repairs it")
    if repaired:
        say(f"repaired  moved {len(repaired['quarantined'])} region(s) to {paths.quarantine_dir}; "
            f"kept {repaired['records_kept']} valid record(s)")
    say(f"config    {paths.config_file}: " + (f"ERROR {config_error}" if config_error else
                                             "ok" if paths.config_file.exists() else "none (optional)"))
    bad = [w for w in workers if not w["ok"]]
    say(f"workers   {len(workers)} registered" + (f", {len(bad)} with problems" if bad else ", all importable"))
    for w in bad:
        say(f"          {w['name']}: {w['error']}")
    if invoker.get("installed"):
        say(f"invoker   installed ({invoker.get('backend', '?')})")
    else:
        say("invoker   not installed: nothing runs `kmpwm run-due` periodically; `kmpwm schedule install` sets it up")
    say(f"last run  {last_run or 'never'}")
    say("serve     " + ("; ".join(f"running (pid {x['pid']}, since {x['started_at']})" for x in serves)
                        if serves else "not running (`kmpwm serve` starts work the moment it is due)"))
    if problems:
        for p in problems:
            say(f"problem:  {p}")
    return code
