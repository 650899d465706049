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
    config, workers, invoker, serves = doc["config"], doc["workers"], doc["invoker"], doc["serve"]["running"]
    exists = os.path.exists(config["path"])
    say(
        f"config    {config['path']}: "
        + (f"ERROR {config['error']}" if config["error"] else "ok" if exists else "none (optional)")
    )
    bad = [w for w in workers if not w["ok"]]
    say(f"workers   {len(workers)} registered" + (f", {len(bad)} with problems" if bad else ", all importable"))
    for w in bad:
        say(f"          {w['name']}: {w['error']}")
    if invoker.get("installed"):
        say(f"invoker   installed ({invoker.get('backend', '?')})" + (", but STALE" if invoker["stale"] else ""))
    else:
        say("invoker   not installed: nothing runs `kmpwm run-due` periodically; `kmpwm schedule install` sets it up")
    say(f"last run  {doc['last_run_at'] or 'never'}")
    running = "; ".join(f"running (pid {x['pid']}, since {x['started_at']})" for x in serves)
    say("serve     " + (running or "not running (`kmpwm serve` starts work the moment it is due)"))
