"""``kmpwm doctor [--repair]``: render :func:`kmpwm.system.doctor.doctor`'s report."""

from __future__ import annotations

import os

from kmpwm.cli.output import print_json, say
from kmpwm.system.doctor import doctor


def doctor_command(paths, do_repair: bool, as_json: bool) -> int:
    doc = doctor(paths, do_repair)
    if as_json:
        print_json(doc)
    else:
        _say_journal(doc["journal"], doc["repaired"], paths)
        _say_store(doc["store"])
        _say_setup(doc)
        for p in doc["problems"]:
            say(f"problem:  {p}")
    return doc["exit_code"]


def _say_journal(report: dict, repaired: dict | None, paths) -> None:
    damage = report["damage"]
    say(
        f"journal   {report['path']}: {report['records']} record(s), {report['bytes']} bytes"
        + (f", {len(damage)} DAMAGED region(s)" if damage else ", healthy")
    )
    for d in damage:
        say(f"          {d['what']}")
    if report["torn_tail"]:
        say(f"          torn last record ({report['torn_tail']['length']} bytes): the next write repairs it")
    if repaired:
        _say_repaired(repaired, paths)


def _say_repaired(repaired: dict, paths) -> None:
    extra = []
    if repaired["salvaged"]:
        extra.append(f"{repaired['salvaged']} found inside damaged lines")
    if repaired["corrected"]:
        extra.append(f"{len(repaired['corrected'])} restored from a single flipped bit")
    say(
        f"repaired  moved {len(repaired['quarantined'])} region(s) to {paths.quarantine_dir}; "
        f"kept {repaired['records_kept']} valid record(s)" + (f" ({', '.join(extra)})" if extra else "")
    )


def _say_store(store: dict | None) -> None:
    if store is None:
        return
    if store.get("error"):
        say(f"store     {store['url']}: ERROR {store['error']}")
        return
    hosts = ", ".join(h["host"] for h in store["hosts"]) or "none yet"
    say(
        f"store     {store['url']}: schema v{store['schema']}, {store['records']} record(s), hosts: {hosts}, "
        f"notification queue {store['notify_queue']:.0%} full"
    )


def _say_setup(doc: dict) -> None:
    say(f"config    {doc['config']['path']}: {_config_status(doc['config'])}")
    _say_workers(doc["workers"])
    _say_invoker(doc["invoker"])
    say(f"last run  {doc['last_run_at'] or 'never'}")
    running = "; ".join(f"running (pid {x['pid']}, since {x['started_at']})" for x in doc["serve"]["running"])
    say("serve     " + (running or "not running (`kmpwm serve` starts work the moment it is due)"))


def _config_status(config: dict) -> str:
    if config["error"]:
        return f"ERROR {config['error']}"
    return "ok" if os.path.exists(config["path"]) else "none (optional)"


def _say_workers(workers: list) -> None:
    bad = [w for w in workers if not w["ok"]]
    say(f"workers   {len(workers)} registered" + (f", {len(bad)} with problems" if bad else ", all importable"))
    for w in bad:
        say(f"          {w['name']}: {w['error']}")


def _say_invoker(invoker: dict) -> None:
    if invoker.get("installed"):
        say(f"invoker   installed ({invoker.get('backend', '?')})" + (", but STALE" if invoker["stale"] else ""))
    else:
        say("invoker   not installed: nothing runs `kmpwm run-due` periodically; `kmpwm schedule install` sets it up")
