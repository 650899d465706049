"""The command line: parse, call the API, print.  No scheduling logic lives here.

No ``from __future__ import annotations`` here, on purpose: typer reads every command's
annotations, and string annotations cost it an eval each (~5 ms for enqueue's options at every
start of the command)."""

import os
import sys
from pathlib import Path

import typer

from kmpwm import __version__
from kmpwm.core.exitcodes import USAGE, InvalidParams, KmpwmError

app = typer.Typer(
    name="kmpwm",
    help="A per-user persistent background-task scheduler: triggers, constraints, retries, chains "
    "with savepoints, run by cron/launchd/systemd through `kmpwm run-due`.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
schedule_app = typer.Typer(
    help="Install, remove or show the periodic `run-due` invoker (cron, launchd, systemd).", no_args_is_help=True
)
app.add_typer(schedule_app, name="schedule")
store_app = typer.Typer(help="Move a queue between stores (the journal, PostgreSQL).", no_args_is_help=True)
app.add_typer(store_app, name="store")

_home: str | None = None

JSON_OPT = typer.Option(False, "--json", help="Print exactly one JSON document on stdout.")


def _scheduler():
    from kmpwm.api import Scheduler

    return Scheduler(paths=_paths())


def _paths():
    """This home's paths, after the permission checks every command makes (exit 77), and with a
    ``KMPWM_HOST`` that is a host name (exit 78): every command refuses a bad one, not only those
    that happen to read it this time."""
    from kmpwm.storage.paths import check_all, resolve

    if os.environ.get("KMPWM_HOST"):
        from kmpwm.core.hosts import this_host

        this_host()
    paths = resolve(_home)
    check_all(paths)
    return paths


def _complete_worker(incomplete: str):
    try:
        from kmpwm.running.registry import Registry

        return [w.name for w in Registry(_paths()).all() if w.name.startswith(incomplete)]
    except Exception:
        return []


def _complete_task(incomplete: str):
    try:
        from kmpwm.storage.stores import open_store

        state = open_store(_paths()).load(full=False).state
        return [i for i in (*state["tasks"], *state["chains"]) if i.startswith(incomplete)]
    except Exception:
        return []


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"kmpwm {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    home: Path | None = typer.Option(
        None, "--home", metavar="DIR", help="Keep everything under DIR (wins over KMPWM_HOME)."
    ),
    store: str | None = typer.Option(
        None,
        "--store",
        metavar="URL",
        help="Keep the queue in this store: postgresql://... (a fleet's shared queue) or 'journal' "
        "(wins over KMPWM_STORE and [store] url in config.toml).",
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    global _home
    _home = str(home) if home is not None else None
    if store is not None:
        os.environ["KMPWM_STORE"] = store  # the store of this command and of the workers it starts


# -- shared option groups ------------------------------------------------------------------

Opt = typer.Option
TRIG = "Trigger"
CONS = "Constraints"
_NOT_FOR_CHAINS = "Not for chains (their tasks run once); accepted to say so."

# The task options of `enqueue` and `chain`, declared once: (parameter, type, option).  `chain`
# takes them all but the two in _ENQUEUE_ONLY, with the help text of _CHAIN_HELP where it differs.
_TASK_OPTIONS = (  # (parameter, type, flag, metavar (None: a switch), help, help panel)
    ("delay", str | None, "--delay", "DUR", "Due DUR from now (also an initial delay for other triggers).", TRIG),
    ("every", str | None, "--every", "DUR", "Periodic: due once per DUR (>= 60s).", TRIG),
    ("flex", str | None, "--flex", "DUR", "Periodic: due anywhere in the last DUR of each period.", TRIG),
    ("at", str | None, "--at", "TIME", "Exact: due at TIME (ISO 8601, @EPOCH or +DUR).", TRIG),
    (
        "exact_behavior",
        str | None,
        "--exact-behavior",
        "attempt|notify|error",
        "What --at does (default attempt).",
        TRIG,
    ),
    ("window", tuple[str, str] | None, "--window", "START END", "Windowed: run only inside [START, END].", TRIG),
    ("cron", str | None, "--cron", "EXPR", "A 5-field cron expression, local time.", TRIG),
    ("on_change", str | None, "--on-change", "PATH", "Due when PATH changed since the last run.", TRIG),
    ("no_descendants", bool, "--no-descendants", None, "With --on-change: only PATH itself counts.", TRIG),
    (
        "when",
        str | None,
        "--when",
        "battery-low|battery-okay|storage-low|device-idle",
        "Due each time the device enters that state.",
        TRIG,
    ),
    (
        "tz",
        str | None,
        "--tz",
        "ZONE",
        "Read --cron, --at and --window times in this IANA zone (stored with the task).",
        TRIG,
    ),
    (
        "jitter",
        str | None,
        "--jitter",
        "DUR",
        "Delay each due time by a fixed per-task, per-host offset in [0, DUR).",
        TRIG,
    ),
    (
        "misfire_grace",
        str | None,
        "--misfire-grace",
        "DUR",
        "Skip an occurrence that would start more than DUR late (recorded as missed).",
        TRIG,
    ),
    ("requires_network", bool, "--requires-network", None, "Needs a network connection.", CONS),
    (
        "network_type",
        str | None,
        "--network-type",
        "TYPE",
        "connected|unmetered|not-roaming|metered|temporarily-unmetered|not-required",
        CONS,
    ),
    ("requires_charging", bool, "--requires-charging", None, "Needs the device to be charging.", CONS),
    ("battery_not_low", bool, "--battery-not-low", None, "Needs the battery at 15% or more.", CONS),
    ("storage_not_low", bool, "--storage-not-low", None, "Needs storage not low.", CONS),
    ("device_idle", bool, "--device-idle", None, "Needs the device idle.", CONS),
    ("heavy", bool, "--heavy", None, "A long task: 10m time limit instead of 30s.", CONS),
    ("expedited", bool, "--expedited", None, "Run before non-expedited due tasks.", CONS),
    ("qos", str | None, "--qos", "high|default|low", "Order among due tasks.", CONS),
    ("timeout", str | None, "--timeout", "DUR", "Time limit of one run.", CONS),
    ("backoff", str | None, "--backoff", "exponential|linear", "Retry backoff (default exponential).", CONS),
    ("backoff_delay", str | None, "--backoff-delay", "DUR", "First retry delay (default 10s).", CONS),
    ("max_attempts", str | None, "--max-attempts", "N", "Runs allowed in all (default 10).", CONS),
    ("tags", list[str] | None, "--tag", "T", "Label the task (repeatable).", None),
    (
        "host",
        str | None,
        "--host",
        "NAME",
        "Run it only on host NAME (KMPWM_HOST, else the machine's name); --on-change tasks: this host.",
        None,
    ),
)
_ENQUEUE_ONLY = frozenset({"flex", "no_descendants"})
_CHAIN_HELP = {
    "delay": "Due DUR from now.",
    "every": _NOT_FOR_CHAINS,
    "cron": _NOT_FOR_CHAINS,
    "on_change": _NOT_FOR_CHAINS,
    "when": _NOT_FOR_CHAINS,
    "at": "Due at TIME.",
    "heavy": "Long tasks: 10m time limit instead of 30s.",
    "tags": "Label the chain and its tasks (repeatable).",
    "host": "Run its tasks only on host NAME (KMPWM_HOST, else the machine's name).",
}
_FLAGS = frozenset(row[0] for row in _TASK_OPTIONS if row[1] is bool)
_LISTS = frozenset({"window", "tags"})


def _task_options(command: str):
    """Give a command the task options in place of its ``flags`` parameter: typer sees them as
    parameters, the command gets them as ``flags``, the flat spec keys given on the command line."""
    import functools
    import inspect

    shared = []
    for name, kind, flag, metavar, help, panel in _options_of(command):
        option = Opt(False if kind is bool else None, flag, metavar=metavar, help=help, rich_help_panel=panel)
        shared.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind))
    names = [p.name for p in shared]

    def decorate(func):
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in inspect.signature(func).parameters.values()]
        at = [p.name for p in own].index("flags")
        params = own[:at] + shared + own[at + 1 :]  # the options take the place of ``flags``

        @functools.wraps(func)
        def command_with_options(**kwargs):
            given = {name: kwargs.pop(name) for name in names}
            return func(flags=_task_flags(given), **kwargs)

        command_with_options.__signature__ = inspect.Signature(params)
        command_with_options.__annotations__ = {p.name: p.annotation for p in params}
        return command_with_options

    return decorate


def _options_of(command: str) -> list[tuple]:
    """The rows of _TASK_OPTIONS that ``command`` takes, with its own help text and metavars."""
    if command != "chain":
        return list(_TASK_OPTIONS)
    return [
        (name, kind, flag, "STATE" if name == "when" else metavar, _CHAIN_HELP.get(name, help), panel)
        for name, kind, flag, metavar, help, panel in _TASK_OPTIONS
        if name not in _ENQUEUE_ONLY
    ]


def _task_flags(given: dict) -> dict:
    """The flat spec keys given on the command line (only those given)."""
    return {key: list(value) if key in _LISTS else value for key, value in given.items() if _is_given(key, value)}


def _is_given(key: str, value) -> bool:
    """A switch is given when set, a list when not empty, any other option when not None."""
    if key in _FLAGS or key in _LISTS:
        return bool(value)
    return value is not None


def _one_of(*given) -> bool:
    """Exactly one of the mutually exclusive choices was given."""
    return sum(map(bool, given)) == 1


def _int(value: str | None, flag: str, minimum: int = 1) -> int | None:
    if value is None:
        return None
    try:
        n = int(value)
    except ValueError:
        raise InvalidParams(f"invalid {flag} {value!r}: expected a whole number") from None
    if not minimum <= n <= 1_000_000:
        raise InvalidParams(f"invalid {flag} {value!r}: must be from {minimum} to 1000000")
    return n


@app.command("enqueue")
@_task_options("enqueue")
def enqueue_cmd(
    task_id: str | None = typer.Argument(None, metavar="ID", help="The task's id (its unique-work name)."),
    worker: str | None = typer.Argument(
        None, metavar="WORKER", help="A registered worker name.", autocompletion=_complete_worker
    ),
    input: str | None = Opt(None, "--input", metavar="TEXT", help="Input text passed to the worker."),
    input_file: Path | None = Opt(
        None, "--input-file", metavar="FILE", help="Read the input from FILE (- for stdin; at most 1 MiB)."
    ),
    from_file: str | None = Opt(
        None,
        "--from",
        metavar="FILE",
        help="Read JSON Lines task specs from FILE (- for stdin; at most 64 MiB, each input at most 1 MiB): one durable append, all or nothing.",  # noqa: E501
    ),
    flags: dict | None = None,
    policy: str | None = Opt(
        None,
        "--policy",
        metavar="keep|replace|append|append-or-replace|update",
        help="When the id exists (default keep; update: same id, attempts and schedule, new definition).",
    ),
    as_json: bool = JSON_OPT,
) -> None:
    """Enqueue a task: ID WORKER plus a trigger and constraints, or --from FILE of JSON Lines."""
    from kmpwm.cli import commands

    if from_file is not None:
        if flags or policy or any(x is not None for x in (task_id, worker, input, input_file)):
            raise InvalidParams("--from takes the tasks from the file; give no ID, WORKER or task flags with it")
        raise typer.Exit(commands.enqueue_from(_scheduler(), from_file, as_json))
    if task_id is None or worker is None:
        raise _usage("enqueue needs ID and WORKER (or --from FILE)")
    spec = _task_spec(flags, task_id, worker, input, input_file, policy)
    raise typer.Exit(commands.enqueue_one(_scheduler(), spec, as_json))


def _task_spec(flags: dict, task_id: str, worker: str, input, input_file, policy) -> dict:
    """The spec of the task given on the command line: its flags, ID, WORKER and the options given."""
    optional = {"input": input, "input_file": None if input_file is None else str(input_file), "policy": policy}
    return dict(flags, id=task_id, worker=worker, **{k: v for k, v in optional.items() if v is not None})


@app.command("chain")
@_task_options("chain")
def chain_cmd(
    steps: list[str] | None = typer.Argument(
        None,
        metavar="STEP...",
        help="Worker names in order; A+B runs A and B in parallel.",
        autocompletion=_complete_worker,
    ),
    chain_id: str | None = Opt(None, "--id", metavar="ID", help="The chain's id (generated if left out)."),
    policy: str | None = Opt(
        None, "--policy", metavar="keep|replace", help="When the chain id exists (default replace)."
    ),
    file: str | None = Opt(
        None,
        "--file",
        metavar="FILE",
        help="TOML or JSON chain file (- for stdin; at most 64 MiB) with per-task input and constraints.",
    ),
    flags: dict | None = None,
    as_json: bool = JSON_OPT,
) -> None:
    """Enqueue a chain: steps run in order, A+B in parallel; each step gets the previous step's data."""
    from kmpwm.cli import commands

    if file is not None and steps:
        raise InvalidParams("give the steps either on the command line or in --file, not both")
    if file is None and not steps:
        raise _usage("chain needs STEP... or --file FILE")
    raise typer.Exit(commands.chain(_scheduler(), steps or [], file, chain_id, policy, flags, as_json))


@app.command("next")
def next_cmd(
    task_id: str | None = typer.Argument(
        None,
        metavar="[ID]",
        help="An existing task: its own next times (jitter and zone included).",
        autocompletion=_complete_task,
    ),
    cron: str | None = Opt(None, "--cron", metavar="EXPR", help="A 5-field cron expression."),
    every: str | None = Opt(
        None, "--every", metavar="DUR", help="An interval: the times a task enqueued now would be due."
    ),
    flex: str | None = Opt(None, "--flex", metavar="DUR", help="With --every: the flex window."),
    count: str | None = Opt(None, "-n", "--iterations", metavar="N", help="How many times to show (default 5)."),
    tz: str | None = Opt(
        None, "--tz", metavar="ZONE", help="Read the cron expression in, and show times in, this IANA zone."
    ),
    as_json: bool = JSON_OPT,
) -> None:
    """Show the next due times of a cron expression, an interval or a task (like systemd-analyze calendar)."""
    from kmpwm.cli.nextcmd import next_command

    if not _one_of(task_id is not None, cron is not None, every is not None):
        raise _usage("next needs one of --cron EXPR, --every DUR or ID")
    if flex is not None and every is None:
        raise InvalidParams("--flex needs --every")
    n = _int(count, "-n", minimum=1) or 5
    paths = _paths() if task_id is not None else None
    raise typer.Exit(next_command(paths, task_id, cron, every, flex, min(n, 1000), tz, as_json))


@app.command("cancel")
def cancel_cmd(
    ids: list[str] | None = typer.Argument(
        None, metavar="ID...", help="Task or chain ids (ID covers its ID#n).", autocompletion=_complete_task
    ),
    tag: str | None = Opt(None, "--tag", metavar="T", help="Cancel the unfinished tasks with this tag."),
    all_: bool = Opt(False, "--all", help="Cancel every unfinished task."),
    as_json: bool = JSON_OPT,
) -> None:
    """Cancel tasks and chains (idempotent; an unknown id is not an error)."""
    from kmpwm.cli import commands

    if not _one_of(ids, tag is not None, all_):
        raise _usage("cancel needs ID..., --tag T or --all (one of them)")
    raise typer.Exit(commands.cancel(_scheduler(), ids or [], tag, all_, as_json))


@app.command("wait")
def wait_cmd(
    ids: list[str] | None = typer.Argument(
        None, metavar="ID...", help="Tasks or chains (ID covers its ID#n).", autocompletion=_complete_task
    ),
    tag: str | None = Opt(None, "--tag", metavar="T", help="Every task with this tag."),
    timeout: str | None = Opt(None, "--timeout", metavar="DUR", help="Give up after DUR (exit 75)."),
    as_json: bool = JSON_OPT,
) -> None:
    """Wait until the tasks finish (exit 0 all succeeded, 1 one did not, 75 time-out); takes no lock."""
    from kmpwm.cli.steercmd import wait_command

    if bool(ids) == (tag is not None):
        raise _usage("wait needs ID... or --tag T (one of them)")
    raise typer.Exit(wait_command(_paths(), ids or [], tag, timeout, as_json))


@app.command("retry")
def retry_cmd(
    ids: list[str] | None = typer.Argument(
        None, metavar="ID...", help="FAILED or CANCELLED tasks, or a chain.", autocompletion=_complete_task
    ),
    failed: bool = Opt(False, "--failed", help="Every FAILED task."),
    tag: str | None = Opt(None, "--tag", metavar="T", help="The FAILED and CANCELLED tasks with this tag."),
    as_json: bool = JSON_OPT,
) -> None:
    """Enqueue FAILED/CANCELLED tasks again (attempts 0, same id); a chain resumes at the failed step."""
    from kmpwm.cli.steercmd import retry_command

    if not _one_of(ids, failed, tag is not None):
        raise _usage("retry needs ID..., --failed or --tag T (one of them)")
    raise typer.Exit(retry_command(_paths(), ids or [], failed, tag, as_json))


@app.command("run-now")
def run_now_cmd(
    ids: list[str] = typer.Argument(
        ..., metavar="ID...", help="Tasks or chains to run now.", autocompletion=_complete_task
    ),
    ignore_constraints: bool = Opt(False, "--ignore-constraints", help="Run even when a constraint does not hold."),
    grace: str | None = Opt(
        None, "--grace", metavar="DUR", help="Time a told-to-stop worker gets before SIGKILL (default 5s)."
    ),
    as_json: bool = JSON_OPT,
) -> None:
    """Run tasks now in the foreground, as run-due would (exit 1 when a task did not run or succeed)."""
    from kmpwm.cli.steercmd import run_now_command

    raise typer.Exit(run_now_command(_paths(), ids, ignore_constraints, grace, as_json))


@app.command("pause")
def pause_cmd(
    ids: list[str] | None = typer.Argument(
        None, metavar="ID...", help="Tasks or chains (ID covers its ID#n).", autocompletion=_complete_task
    ),
    tag: str | None = Opt(None, "--tag", metavar="T", help="The unfinished tasks with this tag."),
    all_: bool = Opt(False, "--all", help="Pause the queue itself: nothing starts, tasks enqueued later included."),
    until: str | None = Opt(
        None, "--until", metavar="TIME", help="Resume by itself at TIME (ISO 8601, @EPOCH or +DUR)."
    ),
    as_json: bool = JSON_OPT,
) -> None:
    """Pause tasks, a tag or the whole queue (a running task finishes its run)."""
    from kmpwm.cli.steercmd import pause_command

    if not _one_of(ids, tag is not None, all_):
        raise _usage("pause needs ID..., --tag T or --all (one of them)")
    raise typer.Exit(pause_command(_paths(), ids or [], tag, all_, until, as_json))


@app.command("resume")
def resume_cmd(
    ids: list[str] | None = typer.Argument(
        None, metavar="ID...", help="Tasks or chains (ID covers its ID#n).", autocompletion=_complete_task
    ),
    tag: str | None = Opt(None, "--tag", metavar="T", help="The paused tasks with this tag."),
    all_: bool = Opt(False, "--all", help="Resume the queue and every paused task."),
    as_json: bool = JSON_OPT,
) -> None:
    """Resume paused tasks or the queue (a repeating task's missed occurrences run once)."""
    from kmpwm.cli.steercmd import resume_command

    if not _one_of(ids, tag is not None, all_):
        raise _usage("resume needs ID..., --tag T or --all (one of them)")
    raise typer.Exit(resume_command(_paths(), ids or [], tag, all_, as_json))


@app.command("inspect-queue")
def inspect_cmd(
    task_id: str | None = typer.Argument(
        None, metavar="[ID]", help="One task, its ID#n, or a chain.", autocompletion=_complete_task
    ),
    tag: str | None = Opt(None, "--tag", metavar="T", help="Only tasks with this tag."),
    state: str | None = Opt(None, "--state", metavar="S", help="Only tasks in this state (any case)."),
    all_: bool = Opt(False, "--all", help="Include finished tasks."),
    watch: bool = Opt(False, "--watch", help="Refresh until interrupted."),
    as_json: bool = JSON_OPT,
) -> None:
    """Show the queue: unfinished tasks by default, grouped by chain."""
    from kmpwm.cli import commands

    raise typer.Exit(commands.inspect(_scheduler(), task_id, tag, state, all_, watch, as_json))


@app.command("run-due")
def run_due_cmd(
    budget: str | None = Opt(
        None, "--budget", metavar="DUR", help="Time for the whole run; then running tasks expire (exit 75)."
    ),
    grace: str | None = Opt(
        None, "--grace", metavar="DUR", help="Time a told-to-stop worker gets before SIGKILL (default 5s)."
    ),
    parallel: str | None = Opt(None, "--parallel", metavar="N", help="Tasks at once (default: number of CPUs)."),
    max_tasks: str | None = Opt(None, "--max-tasks", metavar="N", help="Run at most N tasks."),
    dry_run: bool = Opt(False, "--dry-run", help="Show what is due, run nothing."),
    as_json: bool = JSON_OPT,
) -> None:
    """Run what is due now (cron, launchd or a systemd timer calls this every minute)."""
    from kmpwm.cli import commands

    raise typer.Exit(
        commands.run_due(
            _paths(), budget, grace, _int(parallel, "--parallel"), _int(max_tasks, "--max-tasks"), dry_run, as_json
        )
    )


@app.command("serve")
def serve_cmd(
    parallel: str | None = Opt(None, "--parallel", metavar="N", help="Tasks at once (default: number of CPUs)."),
    grace: str | None = Opt(
        None, "--grace", metavar="DUR", help="Time a told-to-stop worker gets before SIGKILL (default 5s)."
    ),
    as_json: bool = JSON_OPT,
) -> None:
    """Run due work the moment it is due, until SIGTERM (the long-running alternative to run-due)."""
    from kmpwm.cli import commands

    raise typer.Exit(commands.serve(_paths(), _int(parallel, "--parallel"), grace, as_json))


@app.command("simulate-expire")
def simulate_expire_cmd(
    ids: list[str] | None = typer.Argument(
        None, metavar="ID...", help="Running tasks or chains (ID covers its ID#n).", autocompletion=_complete_task
    ),
    all_: bool = Opt(False, "--all", help="Every running task."),
    grace: str | None = Opt(None, "--grace", metavar="DUR", help="Grace before SIGKILL (default 5s)."),
    as_json: bool = JSON_OPT,
) -> None:
    """Deliver the expiration signal to the run-due processes running these tasks (exit 1: none)."""
    from kmpwm.cli import commands

    if bool(ids) == all_:
        raise _usage("simulate-expire needs ID... or --all")
    raise typer.Exit(commands.simulate_expire(_paths(), ids or [], all_, grace, as_json))


@app.command("events")
def events_cmd(
    task: str | None = Opt(
        None,
        "--task",
        metavar="ID",
        help="Only this task (and its ID#n, or a chain's tasks).",
        autocompletion=_complete_task,
    ),
    since: str | None = Opt(None, "--since", metavar="DUR", help="Only events of the last DUR."),
    follow: bool = Opt(False, "--follow", "-f", help="Keep printing new events (JSON Lines with --json)."),
    as_json: bool = JSON_OPT,
) -> None:
    """The history of runs and state changes."""
    from kmpwm.cli import commands

    raise typer.Exit(commands.events(_paths(), task, since, follow, as_json))


@app.command("logs")
def logs_cmd(
    task_id: str = typer.Argument(..., metavar="ID", help="The task.", autocompletion=_complete_task),
    run: str | None = Opt(
        None, "--run", metavar="N", help="Its N-th run (from 1, in start order) instead of the latest."
    ),
    all_: bool = Opt(False, "--all", help="Every kept run, each under a header line."),
    tail: str | None = Opt(None, "--tail", metavar="LINES", help="Only the last LINES lines of each run's output."),
    follow: bool = Opt(False, "--follow", "-f", help="Stream the running run's output until it ends."),
    as_json: bool = JSON_OPT,
) -> None:
    """The output (stdout and stderr) of a task's runs."""
    from kmpwm.cli.logcmd import logs_command

    raise typer.Exit(
        logs_command(_paths(), task_id, _int(run, "--run"), all_, _int(tail, "--tail", 0), follow, as_json)
    )


@app.command("explain")
def explain_cmd(
    task_id: str = typer.Argument(
        ..., metavar="ID", help="A task, its ID#n, or a chain.", autocompletion=_complete_task
    ),
    as_json: bool = JSON_OPT,
) -> None:
    """Why a task is or is not running now."""
    from kmpwm.cli import commands

    raise typer.Exit(commands.explain(_paths(), task_id, as_json))


@app.command("workers")
def workers_cmd(
    name: str | None = typer.Argument(
        None, metavar="[NAME]", help="Describe this worker: its input keys, returned data and limits."
    ),
    as_json: bool = JSON_OPT,
) -> None:
    """List the registered workers and where each comes from, or describe one."""
    from kmpwm.cli import commands

    raise typer.Exit(commands.workers(_paths(), as_json, name))


@app.command("compact")
def compact_cmd(as_json: bool = JSON_OPT) -> None:
    """Rewrite the journal atomically, keeping live work and recent history."""
    from kmpwm.cli import commands

    raise typer.Exit(commands.compact(_paths(), as_json))


@app.command("doctor")
def doctor_cmd(
    repair: bool = Opt(False, "--repair", help="Move damaged records to journal/quarantine/ and keep every valid one."),
    as_json: bool = JSON_OPT,
) -> None:
    """Check the journal, permissions, workers and the invoker."""
    from kmpwm.cli import commands

    raise typer.Exit(commands.doctor(_paths(), repair, as_json))


BACKEND_HELP = "cron, launchd or systemd (default: the platform's own)."


@store_app.command("copy")
def store_copy(
    to: str | None = Opt(None, "--to", metavar="URL", help="Copy this home's store into URL ('journal': its journal)."),
    from_: str | None = Opt(None, "--from", metavar="URL", help="Copy URL's unfinished work into this home's store."),
    as_json: bool = JSON_OPT,
) -> None:
    """Copy every unfinished task, chain and savepoint to (or from) another store; never overwrites."""
    from kmpwm.cli import commands

    if (to is None) == (from_ is None):
        raise _Usage("store copy needs exactly one of --to URL and --from URL")
    raise typer.Exit(commands.store_copy(_paths(), to, from_, as_json))


@schedule_app.command("install")
def schedule_install(
    backend: str | None = Opt(None, "--backend", metavar="cron|launchd|systemd", help=BACKEND_HELP),
    every: str | None = Opt(None, "--every", metavar="DUR", help="How often run-due runs (default 1m)."),
    mode: str | None = Opt(
        None,
        "--mode",
        metavar="minute|serve",
        help="minute: run-due periodically (default); serve: also `kmpwm serve` as a service.",
    ),
    print_only: bool = Opt(False, "--print", help="Only print what would be installed."),
    as_json: bool = JSON_OPT,
) -> None:
    """Install the periodic run-due invoker (idempotent; other entries are kept)."""
    from kmpwm.cli import commands

    raise typer.Exit(commands.schedule(_paths(), "install", backend, every, print_only, as_json, mode))


@schedule_app.command("uninstall")
def schedule_uninstall(
    backend: str | None = Opt(None, "--backend", metavar="cron|launchd|systemd", help=BACKEND_HELP),
    print_only: bool = Opt(False, "--print", help="Only print what would be removed."),
    as_json: bool = JSON_OPT,
) -> None:
    """Remove the run-due invoker."""
    from kmpwm.cli import commands

    raise typer.Exit(commands.schedule(_paths(), "uninstall", backend, None, print_only, as_json))


@schedule_app.command("status")
def schedule_status(
    backend: str | None = Opt(None, "--backend", metavar="cron|launchd|systemd", help=BACKEND_HELP),
    print_only: bool = Opt(False, "--print", help="Print the invoker this backend would install."),
    as_json: bool = JSON_OPT,
) -> None:
    """Show whether the run-due invoker is installed."""
    from kmpwm.cli import commands

    raise typer.Exit(commands.schedule(_paths(), "status", backend, None, print_only, as_json))


# -- entry point ---------------------------------------------------------------------------


class _Usage(Exception):
    pass


def _usage(message: str) -> Exception:
    return _Usage(message)


def _fail(message: str, code: int, as_json: bool, hint: str | None = None) -> int:
    from kmpwm.cli.output import error, print_json

    if as_json:
        print_json({"error": message, "exit_code": code})
    error(message, hint)
    return code


def main(argv: list[str] | None = None) -> int:
    """Console-script entry: never a traceback on the terminal; named exit codes."""
    from typer._click import exceptions as click_exc

    args = sys.argv[1:] if argv is None else list(argv)
    as_json = "--json" in _before_operands(args)  # after "--" it is an operand
    command = typer.main.get_command(_app_for(args))
    try:
        return _invoke(command, args)
    except _Usage as exc:
        return _fail(f"{exc} (see kmpwm --help)", USAGE, as_json)
    except click_exc.ClickException as exc:
        return _click_failure(exc, as_json)
    except KmpwmError as exc:
        return _fail(exc.message, exc.exit_code, as_json, exc.hint)
    except KeyboardInterrupt:
        sys.stderr.write("kmpwm: interrupted\n")
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 0
    except OSError as exc:  # the file system refused (disk full, read-only, ...): an I/O error, 74
        return _io_failure(exc, as_json)
    except Exception as exc:  # an internal error: the traceback goes to the log, not the terminal
        return _internal_failure(exc, as_json)


def _invoke(command, args: list[str]) -> int:
    """Run the click ``command`` on ``args``; its exit code."""
    rv = command.main(args=args, prog_name="kmpwm", standalone_mode=False)
    return rv if isinstance(rv, int) else 0


def _before_operands(args: list[str]) -> list[str]:
    """The arguments before ``--`` (all of them if there is none)."""
    return args[: args.index("--")] if "--" in args else args


def _click_failure(exc, as_json: bool) -> int:
    """A usage error click found (exit 64, with where to get help), or another of its exceptions."""
    from typer._click import exceptions as click_exc

    if isinstance(exc, click_exc.NoArgsIsHelpError):
        sys.stderr.write(exc.format_message())
        return USAGE
    if isinstance(exc, click_exc.UsageError):
        ctx_name = exc.ctx.command_path if exc.ctx else "kmpwm"
        return _fail(f"{exc.format_message()} (see {ctx_name} --help)", USAGE, as_json)
    return _fail(exc.format_message(), exc.exit_code, as_json)


def _silence_stdout() -> None:
    """The reader went away: what is still buffered for stdout goes nowhere, quietly."""
    try:
        sys.stdout = open(os.devnull, "w")
    except OSError:
        pass


def _io_failure(exc: OSError, as_json: bool) -> int:
    import errno as _errno

    where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
    full = " — the disk is full" if exc.errno == _errno.ENOSPC else ""
    return _fail(
        f"I/O error: {exc.strerror or exc}{where}{full}",
        74,
        as_json,
        "nothing was left half-written; fix the file system, then try again",
    )


def _internal_failure(exc: Exception, as_json: bool) -> int:
    from kmpwm.storage.logs import log_exception

    where = log_exception(_paths_safe(), exc)
    return _fail(
        f"internal error: {type(exc).__name__}: {exc}" + (f" (traceback in {where})" if where else ""), 70, as_json
    )


def _app_for(args: list[str]) -> typer.Typer:
    """The app with only the command named in ``args``: typer builds a click command from every
    registered function's signature, ~20 ms for all of them, on every start of a tool cron runs
    every minute.  Anything else (``--help``, an unknown name, shell completion) gets the whole app."""
    if _completing():
        return app
    name = _command_name(args)
    commands = [c for c in app.registered_commands if c.name == name]
    groups = [g for g in app.registered_groups if g.name == name]
    if not (commands or groups):
        return app
    return _app_with(commands, groups)


def _app_with(commands: list, groups: list) -> typer.Typer:
    """A copy of the app with only these commands and groups of commands."""
    import copy

    one = copy.copy(app)
    one.registered_commands = commands
    one.registered_groups = groups
    return one


def _completing() -> bool:
    """Whether a shell's completion (its ``_KMPWM_COMPLETE`` variable) runs the command."""
    return any(k.endswith("_COMPLETE") for k in os.environ if k.startswith("_"))


def _command_name(args: list[str]) -> str | None:
    """The command ``args`` name: the first argument after the global options that take a value
    (None when that is another option, or there is none)."""
    rest = iter(args)
    for arg in rest:
        if arg in ("--home", "--store"):
            next(rest, None)  # its value
        elif not arg.startswith(("--home=", "--store=")):
            return None if arg.startswith("-") else arg
    return None


def _paths_safe():
    try:
        from kmpwm.storage.paths import resolve

        return resolve(_home)
    except Exception:
        return None


def run() -> None:
    sys.exit(main())
