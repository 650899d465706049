"""``kmpwm schedule install|uninstall|status``: render what :func:`kmpwm.system.invoker.schedule`
did or would do."""

from __future__ import annotations

import sys

from kmpwm.cli.output import print_json, say
from kmpwm.core.timeparse import format_duration, relative
from kmpwm.system.invoker import schedule


def schedule_command(
    paths, action: str, backend: str | None, every: str | None, print_only: bool, as_json: bool, mode: str | None = None
) -> int:
    """Run ``schedule`` and print its report (JSON with ``as_json``); returns the exit code."""
    report = schedule(paths, action, backend, every, print_only, mode)
    if as_json:
        print_json(report["doc"])
    else:
        {"printed": _say_printed, "status": _say_status, "changed": _say_changed}[report["kind"]](report)
    return 0


def _say_printed(report: dict) -> None:
    plan, shown, extra = report["plan"], report["shown"], report["extra"]
    sys.stdout.write(shown["text"] + (("\n" + extra["text"]) if extra else ""))
    sys.stdout.flush()
    sys.stderr.write(f"kmpwm: {plan.name}: {shown['note']}\n")
    if extra:
        sys.stderr.write(f"kmpwm: {plan.name}: serve: {extra['note']}\n")
    elif plan.serve_mode and plan.name == "cron":
        sys.stderr.write(
            "kmpwm: cron: serve: would also start `kmpwm serve` now (the @reboot line starts it after each boot)\n"
        )


def _say_status(report: dict) -> None:
    plan, last, doc = report["plan"], report["last"], report["doc"]
    _say_invoker_status(plan, report["status"])
    say(
        f"run-due last ran: {doc['last_run_at']} ({relative(last)})"
        if last is not None
        else "run-due has not run yet for this home"
    )
    _say_serve_status(plan.name, doc["serve"])


def _at(path: str | None) -> str:
    """`` (PATH)`` where an entry is installed, if it is in a file."""
    return f" ({path})" if path else ""


def _say_invoker_status(plan, st: dict) -> None:
    name = plan.name
    if not st["installed"]:
        say(f"{name} invoker not installed for {plan.where}; `kmpwm schedule install --backend {name}` sets it up")
        return
    extra = f" every {format_duration(st['every'])}" if st.get("every") else ""
    say(f"{name} invoker installed for {plan.where}{extra}{_at(st['path'])}: {st['entry'] or '?'}")
    if name == "systemd" and not st.get("enabled", True):
        say("  note: the timer is not enabled; run `kmpwm schedule install --backend systemd`")


def _say_serve_status(name: str, sst: dict) -> None:
    if sst["installed"]:
        say(f"serve installed as a {name} service{_at(sst['path'])}: {sst['entry'] or '?'}")
    for x in sst["running"]:
        say(f"serve is running (pid {x['pid']}, since {x['started_at']})")
    if not sst["running"]:
        say("no serve is running for this home")


_CHANGED = {
    "installed": "Installed the {name} invoker for {where}: run-due every {every}{at}",
    "unchanged": "The {name} invoker for {where} is already installed (every {every}); nothing changed{at}",
    "removed": "Removed the {name} invoker for {where}{at}",
}
_NOTHING_REMOVED = "No {name} invoker was installed for {where}; nothing to remove"


def _say_changed(report: dict) -> None:
    plan, doc = report["plan"], report["doc"]
    template = _CHANGED.get(doc["action"], _NOTHING_REMOVED)
    say(template.format(name=plan.name, where=plan.where, every=format_duration(plan.seconds), at=_at(doc["path"])))
    if doc["action"] == "installed":
        say(f"  {doc['entry']}")
    if "serve" in doc:
        _say_serve_change(plan, doc["serve"], report["action"])


def _say_serve_change(plan, serve: dict, action: str) -> None:
    sat = _at(serve.get("path"))
    sact = serve["action"]
    if action == "uninstall" or not plan.serve_mode:
        if sact == "removed":
            _say_serve_removed(sat, serve.get("stopped"))
    elif sact == "unchanged":
        say(f"serve is already installed{sat}; nothing changed")
    else:
        _say_serve_installed(plan, serve, sat)


def _say_serve_installed(plan, serve: dict, at: str) -> None:
    started = serve.get("started")
    say(
        f"Installed serve as a {plan.name} service{at}, run-due every {format_duration(plan.seconds)} "
        f"as the fallback" + (f"; started it (pid {started})" if started else "")
    )
    say(f"  {serve['entry']}")


def _say_serve_removed(at: str, stopped: list | None) -> None:
    say(f"Removed the serve service{at}" + (f"; stopped serve pid {', '.join(map(str, stopped))}" if stopped else ""))
