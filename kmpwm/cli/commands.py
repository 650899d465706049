"""What each CLI command does: call the API, shape the result, print it.  Returns exit codes."""

from __future__ import annotations

import sys
import time

from kmpwm.cli.output import print_json, printable, say, table, warn
from kmpwm.core.exitcodes import InvalidParams, KmpwmError
from kmpwm.core.timeparse import iso, relative


def _reject(task_id, exc_or_outcome, as_json: bool, extra: dict | None = None) -> int:
    from kmpwm.cli.output import error as say_error

    result, error, code, hint = _refusal(exc_or_outcome)
    if as_json:
        print_json({"result": result, "id": task_id, "error": error, **(extra or {})})
    say_error(error, hint)
    return code


def _refusal(exc_or_outcome) -> tuple:
    """(result, error, exit code, hint) of a KmpwmError or of an outcome that was not ok."""
    if isinstance(exc_or_outcome, KmpwmError):
        exc = exc_or_outcome
        return exc.result, str(exc).splitlines()[0], exc.exit_code, exc.hint
    outcome = exc_or_outcome
    return outcome.result.value, outcome.error, outcome.exit_code, getattr(outcome, "hint", None)


def warn_damage(view) -> None:
    if view.damage:
        first = view.damage[0]
        warn(
            f"the journal has {len(view.damage)} damaged region(s) ({first.describe()}); "
            "valid records before and after are shown; run `kmpwm doctor --repair`"
        )


# -- enqueue -------------------------------------------------------------------------------


def _enqueue_doc(outcome) -> dict:
    return {
        "result": outcome.result.value,
        "id": outcome.id,
        "action": outcome.action,
        "next_run_at": iso(outcome.next_run_at),
    }


_STATE_NOTES = {"BLOCKED": ", BLOCKED until the step or task before it succeeds", "RUNNING": ", running now"}


def _say_enqueued(outcome) -> None:
    when = _STATE_NOTES.get(outcome.state)
    if when is None:
        when = f", next run {relative(outcome.next_run_at)}" if outcome.next_run_at is not None else ""
    verb = "kept the existing" if outcome.action == "kept" else outcome.action
    say(f"{verb} {outcome.id}{when}")


def enqueue_one(scheduler, spec: dict, as_json: bool) -> int:
    from kmpwm.core.specs import request_from_spec

    try:
        req, policy = request_from_spec(spec)
    except KmpwmError as exc:
        return _reject(spec.get("id"), exc, as_json)
    outcome = scheduler.submit(req, policy)
    if not outcome.ok:
        return _reject(outcome.id, outcome, as_json)
    if as_json:
        print_json(_enqueue_doc(outcome))
    else:
        _say_enqueued(outcome)
    return 0


def _read_source(source: str, what: str) -> bytes:
    from kmpwm.core.specs import MAX_SPECS_BYTES, read_bounded

    return read_bounded(source, MAX_SPECS_BYTES, what)


def enqueue_from(scheduler, source: str, as_json: bool) -> int:
    try:
        items = _spec_requests(source)
    except KmpwmError as exc:
        return _reject(None, exc, as_json, {"results": []})
    if not items:
        return _reject(None, InvalidParams(f"no task specs in {source}"), as_json, {"results": []})
    outcomes = scheduler.submit_many(items, all_or_nothing=True)
    refused = _first_refused(outcomes)
    if refused is not None:
        return _reject_batch(*refused, outcomes, as_json)
    if as_json:
        print_json({"results": [_enqueue_doc(o) for o in outcomes]})
    else:
        _say_counts(outcomes)
    return 0


def _say_counts(outcomes: list) -> None:
    """How many tasks each action took (``3 enqueued, 1 replaced``), in order of first appearance."""
    from collections import Counter

    say(", ".join(f"{n} {a}" for a, n in Counter(o.action for o in outcomes).items()))


def _spec_requests(source: str) -> list:
    """The requests of a JSON Lines file of task specs, blank lines skipped (InvalidParams names
    the line of a bad one)."""
    from kmpwm.core.specs import request_from_spec, spec_lines

    return [
        request_from_spec(_json_line(line, number), where=f"line {number}")
        for number, line in spec_lines(source)
        if line.strip()
    ]


def _json_line(line: str, number: int):
    import orjson

    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise InvalidParams(f"line {number}: malformed JSON ({exc.args[0].split(':')[0]})") from None


def _first_refused(outcomes: list) -> tuple | None:
    """(number from 1, outcome) of the first task that was refused, None if none was."""
    return next(((n, o) for n, o in enumerate(outcomes, 1) if not o.ok), None)


def _reject_batch(number: int, refused, outcomes: list, as_json: bool) -> int:
    """All or nothing: the first task refused (the ``number``-th) is the error, every task's result is listed."""
    refused.error = f"task {number} ({refused.id!r}): {refused.error}; nothing was enqueued"
    results = [_enqueue_doc(o) if o.ok else {"result": o.result.value, "id": o.id, "error": o.error} for o in outcomes]
    return _reject(None, refused, as_json, {"results": results})


# -- chain ---------------------------------------------------------------------------------


def load_chain_file(source: str) -> dict:
    doc = _parse_chain_file(source, _read_source(source, "chain file"))
    if isinstance(doc, list):
        doc = {"steps": doc}
    if not isinstance(doc, dict):
        raise InvalidParams(f'chain file {source}: expected a table/object with "steps"')
    unknown = set(doc) - {"id", "policy", "steps", "tags"}
    if unknown:
        raise InvalidParams(
            f"chain file {source}: unknown key {sorted(unknown)[0]!r} (expected id, policy, steps, tags)"
        )
    steps = doc.get("steps")
    if not isinstance(steps, list) or not steps:
        raise InvalidParams(f'chain file {source}: "steps" must be a non-empty list of steps')
    return doc


def _parse_chain_file(source: str, data: bytes):
    """The file's document: JSON for a .json name or text that starts like JSON, else TOML."""
    text = data.decode("utf-8", "replace")
    as_json = source.endswith(".json") or (not source.endswith(".toml") and text.lstrip().startswith(("{", "[")))
    try:
        if as_json:
            import orjson

            return orjson.loads(data)
        import tomllib

        return tomllib.loads(text)
    except Exception as exc:
        kind = "JSON" if as_json else "TOML"
        raise InvalidParams(f"chain file {source}: invalid {kind}: {str(exc).splitlines()[0]}") from None


def _step_tasks(step, number: int) -> list[dict]:
    if isinstance(step, str):
        step = step.split("+")  # "A+B": A and B in parallel
    elif isinstance(step, dict):
        step = step.get("tasks", [step])
    if not isinstance(step, list) or not step:
        raise InvalidParams(f"step {number}: expected a list of tasks")
    return [_task_fields(task, number) for task in step]


def _task_fields(task, number: int) -> dict:
    """One task of step ``number`` as flat spec keys: a worker name, or a table whose
    "constraints" table is merged in."""
    if isinstance(task, str):
        return {"worker": task}
    if not isinstance(task, dict):
        raise InvalidParams(f'step {number}: a task is a table/object with "worker"')
    task = dict(task)
    nested = task.pop("constraints", None)
    if isinstance(nested, dict):
        return {**nested, **task}
    if nested is not None:
        raise InvalidParams(f'step {number}: "constraints" must be a table/object')
    return task


def chain(scheduler, steps: list[str], source: str | None, chain_id, policy, flags: dict, as_json: bool) -> int:
    tags = flags.get("tags", [])
    try:
        if source is not None:
            doc = load_chain_file(source)
            chain_id = doc.get("id") if chain_id is None else chain_id
            steps, policy, tags = _file_settings(doc, policy, tags)
        if chain_id is not None and not isinstance(chain_id, str):
            raise InvalidParams("chain id must be a string")
        built = [_step_requests(step, number, flags, tags) for number, step in enumerate(steps, 1)]
    except KmpwmError as exc:
        return _reject(chain_id, exc, as_json, {"action": None, "tasks": []})
    outcome = scheduler.enqueue_chain(built, chain_id, policy or "replace", tags)
    if not outcome.ok:
        return _reject(outcome.id, outcome, as_json, {"action": None, "tasks": []})
    _print_chain(outcome, len(built), as_json)
    return 0


def _print_chain(outcome, steps: int, as_json: bool) -> None:
    if as_json:
        print_json({"result": outcome.result.value, "id": outcome.id, "action": outcome.action, "tasks": outcome.tasks})
        return
    verb = "kept the existing chain" if outcome.action == "kept" else f"{outcome.action} chain"
    say(f"{verb} {outcome.id}: {len(outcome.tasks)} task(s) in {steps} step(s)")


def _file_settings(doc: dict, policy: str | None, tags: list) -> tuple[list, str | None, list]:
    """A chain file's steps, its policy unless --policy was given, and its tags after --tag's."""
    return doc["steps"], doc.get("policy") if policy is None else policy, list(tags) + _file_tags(doc)


def _file_tags(doc: dict) -> list[str]:
    tags = doc.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise InvalidParams('chain file: "tags" must be a list of strings')
    return list(tags)


def _step_requests(step, number: int, flags: dict, tags: list) -> list:
    """The requests of step ``number``: each task's keys over the command line's ``flags``,
    with the chain's ``tags`` added (InvalidParams on a bad task)."""
    from kmpwm.core.specs import request_from_spec

    return [
        request_from_spec(_chain_task_spec(task, step, number, flags, tags), where=f"step {number}", need_id=False)[0]
        for task in _step_tasks(step, number)
    ]


def _chain_task_spec(task: dict, step, number: int, flags: dict, tags: list) -> dict:
    """One task's spec: its keys over the command line's ``flags``, the chain's ``tags`` added."""
    if not task.get("worker") and isinstance(step, str):
        raise InvalidParams(f"step {number} ({step!r}): empty worker name")
    spec = {**flags, **task}
    if tags:
        spec["tags"] = list(dict.fromkeys(list(spec.get("tags", [])) + list(tags)))
    if "policy" in spec:
        raise InvalidParams(f"step {number}: a chain's tasks take no policy (the chain has one)")
    return spec


# -- cancel --------------------------------------------------------------------------------


def cancel(scheduler, ids: list[str], tag, all_: bool, as_json: bool) -> int:
    if all_:
        done = scheduler.cancel_all()
    elif tag is not None:
        done = scheduler.cancel_tag(tag)
    else:
        done = scheduler.cancel(*ids)
    if as_json:
        print_json({"cancelled": done})
    elif done:
        say(f"cancelled {len(done)} task(s): {', '.join(done)}")
    else:
        say("nothing to cancel")
    return 0


# -- inspect-queue -------------------------------------------------------------------------


def inspect(scheduler, task_id, tag, state_filter, all_: bool, watch: bool, as_json: bool) -> int:
    from kmpwm.scheduling.views import parse_state_filter
    from kmpwm.storage.paths import require_home

    require_home(scheduler.paths)

    wanted = parse_state_filter(state_filter)
    full = _needs_history(task_id, wanted, all_)
    while True:
        view = scheduler.store.load(full=full)
        warn_damage(view)
        now = time.time()
        doc = _queue_doc(view.state, now, task_id, tag, wanted, all_)
        from kmpwm.storage.progress import attach

        attach(scheduler.paths, doc["tasks"])
        _show_queue(doc, view.state, now, watch=watch, as_json=as_json)
        if not watch:
            return 0
        try:
            time.sleep(1.0)
        except KeyboardInterrupt:
            return 130  # interrupted by SIGINT, like any Unix tool (and events --follow)


def _needs_history(task_id, wanted: str | None, all_: bool) -> bool:
    """The plain queue (unfinished work) needs no history: only --all, an ID or a final state do."""
    from kmpwm.core.models import FINISHED

    return all_ or task_id is not None or wanted in FINISHED


def _show_queue(doc: dict, state: dict, now: float, *, watch: bool, as_json: bool) -> None:
    """The queue as one JSON document (a line of them with ``watch``), or as a table (redrawn in
    place with ``watch`` on a terminal)."""
    if as_json:
        from kmpwm.cli.output import print_json_line

        (print_json_line if watch else print_json)(doc)
        return
    if watch and sys.stdout.isatty():
        sys.stdout.write("\x1b[H\x1b[2J")
    _print_queue(doc, state, now)


def _queue_doc(state, now, task_id, tag, wanted, all_) -> dict:
    from kmpwm.scheduling.views import chain_json, queue_paused, select, task_json

    tasks, chains = select(state, now, task_id=task_id, tag=tag, state_filter=wanted, include_finished=all_)
    return {
        "tasks": [task_json(t, now) for t in tasks],
        "chains": [chain_json(state, c) for c in chains],
        "paused": queue_paused(state, now),
    }


def _print_queue(doc: dict, state: dict, now: float) -> None:
    """Standalone tasks first, then one section per chain, in enqueue order."""
    from kmpwm.cli.output import grouped_table, is_tty

    if doc.get("paused"):
        say("the queue is paused: nothing starts until `kmpwm resume --all`")
    if not doc["tasks"]:
        say("no tasks")
        return
    chains = {c["id"]: c for c in doc["chains"]}
    tty = is_tty()
    rows = [(t["chain_id"], _queue_row(t, state["tasks"][t["id"]], chains, now, tty)) for t in doc["tasks"]]
    grouped_table(_queue_headers(doc["tasks"]), _queue_groups(rows, chains), style_column=2)


def _queue_headers(tasks: list[dict]) -> list[str]:
    """The queue table's headers: its last column shows progress too while a task reports some."""
    last_head = "PROGRESS / LAST RESULT" if any(t.get("progress") for t in tasks) else "LAST RESULT"
    return ["ID", "WORKER", "STATE", "NEXT RUN", "ATTEMPTS", "STEP", "TAGS", last_head]


def _queue_groups(rows: list, chains: dict) -> list:
    """The rows (each with its chain id) in sections: standalone tasks (no header row), then
    each chain's tasks, indented under a header row of their own."""
    groups: list = []
    alone = [row for chain_id, row in rows if not chain_id]
    if alone:
        groups.append((None, alone))
    for cid, c in chains.items():
        members = _chain_rows(rows, cid)
        if members:
            groups.append((_chain_head(cid, c), members))
    return groups


def _chain_rows(rows: list, cid: str) -> list:
    """The rows of chain ``cid``'s tasks, their ids indented under the chain's header row."""
    return [["  " + row[0], *row[1:]] for chain_id, row in rows if chain_id == cid]


def _chain_head(cid: str, c: dict) -> list:
    nxt = f"next {c['next_step']}" if c["next_step"] else ""
    return [f"chain {cid}", "", c["state"], "", "", nxt, "", ""]


def _queue_row(t: dict, record: dict, chains: dict, now: float, tty: bool) -> list:
    """A task's row: ``t`` is its JSON document, ``record`` its state in the journal."""
    step = f"{t['step']}/{len(chains[t['chain_id']]['steps'])}" if t["chain_id"] in chains else ""
    shown_state = t["state"] + (" (paused)" if t.get("paused") else "")
    last = _last_cell(t, record, tty)
    nxt = _next_cell(t, record, now)
    return [t["id"], t["worker"], shown_state, nxt, t["attempts"], step, ",".join(t["tags"]), last[:70]]


def _next_cell(t: dict, record: dict, now: float) -> str:
    """NEXT RUN: since when a running task runs, else when it is due (and where, if pinned)."""
    from kmpwm.scheduling.views import next_run_at

    if t["state"] == "RUNNING" and t.get("lease"):
        return f"since {relative(record['lease']['since'], now).replace(' ago', '')}"
    nxt = relative(max(next_run_at(record, now), now), now) if t["next_run_at"] else ""  # overdue: "now"
    if t.get("host") and t["state"] in ("ENQUEUED", "BLOCKED"):
        nxt = f"{nxt} on {t['host']}".strip()  # pinned (--host): only that host runs it
    return nxt


def _last_cell(t: dict, record: dict, tty: bool) -> str:
    """LAST RESULT: how far a running task is, else its last result and why it ended."""
    leased = t["state"] == "RUNNING" and t.get("lease")
    if leased and t.get("progress"):
        from kmpwm.storage.progress import text as progress_text

        return progress_text(t["progress"], tty)  # while it runs: how far it is
    last = _result_text(t)
    if not leased and record["state"] == "RUNNING":  # its run is over without a result: as explain says it
        last = _with_reason(last, t["reason"])
    return last


def _result_text(t: dict) -> str:
    """``STATUS: message`` of the last result, and why a task that ended FAILED or CANCELLED
    ended, when the message does not say it already."""
    lr = t["last_result"]
    last = _status_message(lr) if lr else ""
    ended = t["state"] in ("FAILED", "CANCELLED") and (not lr or t["reason"] != lr.get("message"))
    if t["reason"] and ended:
        return _with_reason(last, t["reason"])
    return last


def _status_message(result: dict) -> str:
    """``STATUS: message`` of a result (``STATUS`` without a message)."""
    return result["status"] + (f": {result['message']}" if result.get("message") else "")


def _with_reason(text: str, reason: str) -> str:
    return f"{text} ({reason})" if text else reason


# -- workers -------------------------------------------------------------------------------


def workers(paths, as_json: bool, name: str | None = None) -> int:
    from kmpwm.running.registry import Registry

    reg = Registry(paths, rescan=True)
    if name is not None:
        return describe_worker(reg, name, as_json)
    docs = [
        {"name": w.name, "source": w.source, "kind": w.kind, "target": w.target, "distribution": w.distribution}
        for w in reg.all()
    ]
    if as_json:
        print_json({"workers": docs})
    elif docs:
        _print_workers(docs, reg.duplicates())
    else:
        say("no workers: declare [workers.NAME] in config.toml or install a package that provides some")
    return 0


def _print_workers(docs: list[dict], duplicates) -> None:
    """The workers as a table, then a warning for each name both config.toml and a package define."""
    table(
        ["NAME", "KIND", "SOURCE", "TARGET"],
        [[d["name"], d["kind"], _source_text(d["source"], d["distribution"]), d["target"]] for d in docs],
    )
    for name in duplicates:
        warn(f"worker {name!r} is defined both in config.toml and by a package; rename one")


def _source_text(source: str, distribution: str | None) -> str:
    """Where a worker comes from, with the package that provides it."""
    return source + (f" ({distribution})" if distribution else "")


def describe_worker(reg, name: str, as_json: bool) -> int:
    """``kmpwm workers NAME``: the worker's declaration (kmpwm.worker(...) or config.toml)."""
    from kmpwm.core.exitcodes import CONFIG
    from kmpwm.running.declare import describe

    info = reg.get(name)
    if info is None:
        raise InvalidParams(f"unknown worker {name!r}", hint="`kmpwm workers` lists them")
    d = describe(info)
    if as_json:
        print_json(_worker_doc(d))
    else:
        _say_worker(info, d)
    return CONFIG if d.errors else 0


def _say_worker(info, d) -> None:
    say(f"{d.name}: {_description(d) or '(no description)'}")
    say(f"  kind     {d.kind}, from {_source_text(d.source, d.distribution)}: {d.target}")
    say(f"  limit    {_limit_line(info, d)}")
    if d.spec is None:
        say("  (this worker declares no input keys: see its documentation)")
    else:
        _say_declaration(d.spec)
    for err in d.errors:
        warn(err)


def _description(d) -> str | None:
    """The declared description, else the worker's docstring."""
    return (d.spec.description if d.spec else None) or d.doc


def _worker_doc(d) -> dict:
    return {
        "name": d.name,
        "kind": d.kind,
        "source": d.source,
        "target": d.target,
        "distribution": d.distribution,
        "description": _description(d) or None,
        "declared": d.spec is not None,
        "limit_s": d.limit,
        **_declaration_doc(d.spec),
        "errors": d.errors,
    }


def _declaration_doc(spec) -> dict:
    """What a worker declares: whether it is heavy, its input keys and the data it returns."""
    if spec is None:
        return {"heavy": False, "inputs": [], "returns": []}
    return {
        "heavy": bool(spec.heavy),
        "inputs": [i.to_json() for i in spec.inputs],
        "returns": [{"name": n, "description": t or None} for n, t in spec.returns],
    }


def _limit_line(info, d) -> str:
    """A worker's time limit and where it comes from."""
    from kmpwm.core.timeparse import format_duration

    if not d.limit:
        return "30s (light); a task's --heavy (10m) or --timeout wins"
    why = _limit_source(info, d.spec)
    wins = "--timeout or --heavy" if why == "declared" else "--timeout"
    return f"{format_duration(d.limit)} ({why}); a task's {wins} wins"


def _limit_source(info, spec) -> str:
    if info.config is not None and info.config.timeout:
        return "config.toml timeout"
    if spec and spec.heavy and not spec.timeout:
        return "heavy"
    return "declared"


def _say_declaration(spec) -> None:
    if spec.inputs:
        say()
        table(
            ["INPUT", "TYPE", "DEFAULT", "REQUIRED", "DESCRIPTION"],
            [[i.name, i.type, _show_default(i), "yes" if i.required else "", i.description] for i in spec.inputs],
        )
    if spec.returns:
        say()
        table(["DATA", "DESCRIPTION"], spec.returns)


def _show_default(key) -> str:
    if not key.has_default:
        return ""
    import orjson

    return orjson.dumps(key.default).decode()


# -- delegated commands --------------------------------------------------------------------


def run_due(paths, budget, grace, parallel, max_tasks, dry_run, as_json) -> int:
    from kmpwm.cli.rundue import run_due_command

    return run_due_command(
        paths, budget=budget, grace=grace, parallel=parallel, max_tasks=max_tasks, dry_run=dry_run, as_json=as_json
    )


def serve(paths, parallel, grace, as_json=False) -> int:
    from kmpwm.cli.serve import serve_command

    return serve_command(paths, parallel=parallel, grace=grace, as_json=as_json)


def simulate_expire(paths, ids, all_, grace, as_json) -> int:
    from kmpwm.cli.expire import simulate_expire_command

    return simulate_expire_command(paths, ids, all_, grace, as_json)


def events(paths, task, since, follow, as_json) -> int:
    from kmpwm.cli.eventscmd import events_command
    from kmpwm.storage.paths import require_home

    require_home(paths)

    return events_command(paths, task, since, follow, as_json)


def explain(paths, task_id, as_json) -> int:
    from kmpwm.cli.explaincmd import explain_command
    from kmpwm.storage.paths import require_home

    require_home(paths)

    return explain_command(paths, task_id, as_json)


def compact(paths, as_json) -> int:
    from kmpwm.storage.compaction import compact as compact_journal

    stats = compact_journal(paths)
    if as_json:
        print_json(stats)
    elif stats["compacted"]:
        say(
            f"compacted: {stats['bytes_before']} -> {stats['bytes_after']} bytes; kept {stats['tasks_kept']} task(s), "
            f"{stats['chains_kept']} chain(s), {stats['events_kept']} event(s); dropped {stats['tasks_dropped']} "
            f"finished task(s) older than {stats['retention_days']:g} days"
        )
    else:
        say(f"nothing to compact ({stats['reason']})")
    return 0


def doctor(paths, repair, as_json) -> int:
    from kmpwm.cli.doctorcmd import doctor_command
    from kmpwm.storage.paths import require_home

    require_home(paths)

    return doctor_command(paths, repair, as_json)


def schedule(paths, action, backend, every, print_only, as_json, mode=None) -> int:
    from kmpwm.cli.schedulecmd import schedule_command

    return schedule_command(paths, action, backend, every, print_only, as_json, mode)


def store_copy(paths, to: str | None, from_: str | None, as_json: bool) -> int:
    """``kmpwm store copy --to URL | --from URL`` (storage.copy)."""
    from kmpwm.cli.output import print_json, say
    from kmpwm.storage.copy import copy_between
    from kmpwm.storage.stores import named_store, open_store

    here = open_store(paths)
    if to is not None:
        source, target = here, named_store(paths, to)
    else:
        source, target = named_store(paths, from_), here
    report = copy_between(source, target)
    doc = {"from": source_name(source), "to": source_name(target), **report}
    if report["was_running"]:
        _warn_copied_running(report["was_running"])
    if as_json:
        print_json(doc)
    else:
        say(f"copied {report['copied']} task(s) and {report['chains']} chain(s) from {doc['from']} to {doc['to']}")
    return 0


def _warn_copied_running(ids: list[str]) -> None:
    sys.stderr.write(
        f"kmpwm: warning: {len(ids)} running task(s) copied as ENQUEUED "
        f"({printable(', '.join(ids[:3]))}): stop the source's runners before they run twice\n"
    )


def source_name(store) -> str:
    describe = getattr(store, "describe", None)
    return describe() if describe else f"journal {store.paths.journal_dir}"
