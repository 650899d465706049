"""What each CLI command does: call the API, shape the result, print it.  Returns exit codes."""

from __future__ import annotations

import sys
import time

from kmpwm.cli.output import print_json, say, table, warn
from kmpwm.core.exitcodes import InvalidParams, KmpwmError
from kmpwm.core.timeparse import iso, relative


def _reject(task_id, exc_or_outcome, as_json: bool, extra: dict | None = None) -> int:
    if isinstance(exc_or_outcome, KmpwmError):
        result, error, code = exc_or_outcome.result, str(exc_or_outcome).splitlines()[0], exc_or_outcome.exit_code
        hint = exc_or_outcome.hint
    else:
        result, error, code = exc_or_outcome.result.value, exc_or_outcome.error, exc_or_outcome.exit_code
        hint = getattr(exc_or_outcome, "hint", None)
    if as_json:
        doc = {"result": result, "id": task_id, "error": error}
        doc.update(extra or {})
        print_json(doc)
    from kmpwm.cli.output import printable

    sys.stderr.write(f"kmpwm: error: {printable(error)}\n")
    if hint:
        sys.stderr.write(f"kmpwm: {printable(hint)}\n")
    return code


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


def _say_enqueued(outcome) -> None:
    when = f", next run {relative(outcome.next_run_at)}" if outcome.next_run_at is not None else ""
    if outcome.state == "BLOCKED":
        when = ", BLOCKED until the step or task before it succeeds"
    elif outcome.state == "RUNNING":
        when = ", running now"
    words = {
        "enqueued": "enqueued",
        "kept": "kept the existing",
        "replaced": "replaced",
        "appended": "appended",
        "updated": "updated",
    }
    say(f"{words.get(outcome.action, outcome.action)} {outcome.id}{when}")


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
    import orjson

    from kmpwm.core.specs import request_from_spec, spec_lines

    items = []
    try:
        for number, line in spec_lines(source):
            if not line.strip():
                continue
            try:
                spec = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise InvalidParams(f"line {number}: malformed JSON ({exc.args[0].split(':')[0]})") from None
            items.append(request_from_spec(spec, where=f"line {number}"))
    except KmpwmError as exc:
        return _reject(None, exc, as_json, {"results": []})
    if not items:
        return _reject(None, InvalidParams(f"no task specs in {source}"), as_json, {"results": []})
    outcomes = scheduler.submit_many(items, all_or_nothing=True)
    bad = [(n, o) for n, o in enumerate(outcomes, 1) if not o.ok]
    if bad:
        n, o = bad[0]
        o.error = f"task {n} ({o.id!r}): {o.error}; nothing was enqueued"
        results = [
            _enqueue_doc(x) if x.ok else {"result": x.result.value, "id": x.id, "error": x.error} for x in outcomes
        ]
        return _reject(None, o, as_json, {"results": results})
    if as_json:
        print_json({"results": [_enqueue_doc(o) for o in outcomes]})
    else:
        counts: dict[str, int] = {}
        for o in outcomes:
            counts[o.action] = counts.get(o.action, 0) + 1
        say(", ".join(f"{n} {a}" for a, n in counts.items()))
    return 0


# -- chain ---------------------------------------------------------------------------------


def load_chain_file(source: str) -> dict:
    data = _read_source(source, "chain file")
    text = data.decode("utf-8", "replace")
    as_json = source.endswith(".json") or (not source.endswith(".toml") and text.lstrip().startswith(("{", "[")))
    try:
        if as_json:
            import orjson

            doc = orjson.loads(data)
        else:
            import tomllib

            doc = tomllib.loads(text)
    except Exception as exc:
        kind = "JSON" if as_json else "TOML"
        raise InvalidParams(f"chain file {source}: invalid {kind}: {str(exc).splitlines()[0]}") from None
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


def _step_tasks(step, number: int) -> list[dict]:
    if isinstance(step, str):
        return [{"worker": w} for w in step.split("+")]
    if isinstance(step, dict):
        if "tasks" in step:
            step = step["tasks"]
        else:
            step = [step]
    if not isinstance(step, list) or not step:
        raise InvalidParams(f"step {number}: expected a list of tasks")
    out = []
    for task in step:
        if isinstance(task, str):
            task = {"worker": task}
        if not isinstance(task, dict):
            raise InvalidParams(f'step {number}: a task is a table/object with "worker"')
        task = dict(task)
        nested = task.pop("constraints", None)
        if isinstance(nested, dict):
            task = {**nested, **task}
        elif nested is not None:
            raise InvalidParams(f'step {number}: "constraints" must be a table/object')
        out.append(task)
    return out


def chain(scheduler, steps: list[str], source: str | None, chain_id, policy, flags: dict, as_json: bool) -> int:
    from kmpwm.core.specs import request_from_spec

    tags = flags.get("tags", [])
    try:
        if source is not None:
            doc = load_chain_file(source)
            raw_steps = doc["steps"]
            chain_id = chain_id if chain_id is not None else doc.get("id")
            policy = policy if policy is not None else doc.get("policy")
            file_tags = doc.get("tags", [])
            if not isinstance(file_tags, list) or not all(isinstance(t, str) for t in file_tags):
                raise InvalidParams('chain file: "tags" must be a list of strings')
            tags = list(tags) + list(file_tags)
        else:
            raw_steps = steps
        if chain_id is not None and not isinstance(chain_id, str):
            raise InvalidParams("chain id must be a string")
        built = []
        for number, step in enumerate(raw_steps, 1):
            tasks = []
            for task in _step_tasks(step, number):
                if any(not w for w in [task.get("worker")]) and isinstance(step, str):
                    raise InvalidParams(f"step {number} ({step!r}): empty worker name")
                spec = {**flags, **task}
                if tags:
                    spec["tags"] = list(dict.fromkeys(list(spec.get("tags", [])) + list(tags)))
                if "policy" in spec:
                    raise InvalidParams(f"step {number}: a chain's tasks take no policy (the chain has one)")
                req, _ = request_from_spec(spec, where=f"step {number}", need_id=False)
                tasks.append(req)
            built.append(tasks)
    except KmpwmError as exc:
        return _reject(chain_id, exc, as_json, {"action": None, "tasks": []})
    outcome = scheduler.enqueue_chain(built, chain_id, policy or "replace", tags)
    if not outcome.ok:
        return _reject(outcome.id, outcome, as_json, {"action": None, "tasks": []})
    doc = {"result": outcome.result.value, "id": outcome.id, "action": outcome.action, "tasks": outcome.tasks}
    if as_json:
        print_json(doc)
    else:
        verb = {"kept": "kept the existing chain"}.get(outcome.action, f"{outcome.action} chain")
        say(f"{verb} {outcome.id}: {len(outcome.tasks)} task(s) in {len(built)} step(s)")
    return 0


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
    from kmpwm.core.models import FINISHED
    from kmpwm.scheduling.views import parse_state_filter
    from kmpwm.storage.paths import require_home

    require_home(scheduler.paths)

    wanted = parse_state_filter(state_filter)
    # the plain queue (unfinished work) needs no history: only --all, an ID or a final state do
    full = all_ or task_id is not None or (wanted is not None and wanted in FINISHED)
    while True:
        view = scheduler.store.load(full=full)
        warn_damage(view)
        now = time.time()
        doc = _queue_doc(view.state, now, task_id, tag, wanted, all_)
        from kmpwm.storage.progress import attach

        attach(scheduler.paths, doc["tasks"])
        if as_json:
            if watch:
                from kmpwm.cli.output import print_json_line

                print_json_line(doc)
            else:
                print_json(doc)
        else:
            if watch and sys.stdout.isatty():
                sys.stdout.write("\x1b[H\x1b[2J")
            _print_queue(doc, view.state, now)
        if not watch:
            return 0
        try:
            time.sleep(1.0)
        except KeyboardInterrupt:
            return 130  # interrupted by SIGINT, like any Unix tool (and events --follow)


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
    from kmpwm.cli.output import grouped_table
    from kmpwm.scheduling.views import next_run_at

    if doc.get("paused"):
        say("the queue is paused: nothing starts until `kmpwm resume --all`")
    if not doc["tasks"]:
        say("no tasks")
        return
    raw = state["tasks"]
    chains = {c["id"]: c for c in doc["chains"]}
    from kmpwm.cli.output import is_tty
    from kmpwm.storage.progress import text as progress_text

    tty = is_tty()

    def row(t: dict) -> list:
        lr = t["last_result"]
        last = "" if not lr else lr["status"] + (f": {lr['message']}" if lr.get("message") else "")
        if t["reason"] and t["state"] in ("FAILED", "CANCELLED") and (not lr or t["reason"] != lr.get("message")):
            last = f"{last} ({t['reason']})" if last else t["reason"]
        r = raw[t["id"]]
        nxt = relative(max(next_run_at(r, now), now), now) if t["next_run_at"] else ""  # overdue: "now"
        if t["state"] == "RUNNING" and t.get("lease"):
            nxt = f"since {relative(r['lease']['since'], now).replace(' ago', '')}"
            if t.get("progress"):
                last = progress_text(t["progress"], tty)  # while it runs: how far it is
        elif r["state"] == "RUNNING":  # its run is over without a result: as explain says it
            last = f"{last} ({t['reason']})" if last else t["reason"]
        if t.get("host") and t["state"] in ("ENQUEUED", "BLOCKED"):
            nxt = f"{nxt} on {t['host']}".strip()  # pinned (--host): only that host runs it
        step = f"{t['step']}/{len(chains[t['chain_id']]['steps'])}" if t["chain_id"] in chains else ""
        shown_state = t["state"] + (" (paused)" if t.get("paused") else "")
        return [t["id"], t["worker"], shown_state, nxt, t["attempts"], step, ",".join(t["tags"]), last[:70]]

    groups: list = []
    alone = [row(t) for t in doc["tasks"] if not t["chain_id"]]
    if alone:
        groups.append((None, alone))
    for cid, c in chains.items():
        members = [["  " + r[0], *r[1:]] for r in (row(t) for t in doc["tasks"] if t["chain_id"] == cid)]
        if members:
            nxt = f"next {c['next_step']}" if c["next_step"] else ""
            groups.append(([f"chain {cid}", "", c["state"], "", "", nxt, "", ""], members))
    last_head = "PROGRESS / LAST RESULT" if any(t.get("progress") for t in doc["tasks"]) else "LAST RESULT"
    grouped_table(["ID", "WORKER", "STATE", "NEXT RUN", "ATTEMPTS", "STEP", "TAGS", last_head], groups, style_column=2)


# -- workers -------------------------------------------------------------------------------


def workers(paths, as_json: bool, name: str | None = None) -> int:
    from kmpwm.running.registry import Registry

    reg = Registry(paths, rescan=True)
    if name is not None:
        return describe_worker(reg, name, as_json)
    items = reg.all()
    docs = [
        {"name": w.name, "source": w.source, "kind": w.kind, "target": w.target, "distribution": w.distribution}
        for w in items
    ]
    if as_json:
        print_json({"workers": docs})
        return 0
    if not docs:
        say("no workers: declare [workers.NAME] in config.toml or install a package that provides some")
        return 0
    table(
        ["NAME", "KIND", "SOURCE", "TARGET"],
        [
            [d["name"], d["kind"], d["source"] + (f" ({d['distribution']})" if d["distribution"] else ""), d["target"]]
            for d in docs
        ],
    )
    for name in reg.duplicates():
        warn(f"worker {name!r} is defined both in config.toml and by a package; rename one")
    return 0


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
        return CONFIG if d.errors else 0
    spec = d.spec
    source = d.source + (f" ({d.distribution})" if d.distribution else "")
    say(f"{d.name}: {(spec.description if spec else '') or d.doc or '(no description)'}")
    say(f"  kind     {d.kind}, from {source}: {d.target}")
    say(f"  limit    {_limit_line(info, d)}")
    if spec is None:
        say("  (this worker declares no input keys: see its documentation)")
    else:
        _say_declaration(spec)
    for err in d.errors:
        warn(err)
    return CONFIG if d.errors else 0


def _worker_doc(d) -> dict:
    spec = d.spec
    return {
        "name": d.name,
        "kind": d.kind,
        "source": d.source,
        "target": d.target,
        "distribution": d.distribution,
        "description": (spec.description if spec else None) or d.doc or None,
        "declared": spec is not None,
        "limit_s": d.limit,
        "heavy": bool(spec and spec.heavy),
        "inputs": [i.to_json() for i in spec.inputs] if spec else [],
        "returns": [{"name": n, "description": t or None} for n, t in spec.returns] if spec else [],
        "errors": d.errors,
    }


def _limit_line(info, d) -> str:
    """A worker's time limit and where it comes from."""
    from kmpwm.core.timeparse import format_duration

    spec = d.spec
    if not d.limit:
        return "30s (light); a task's --heavy (10m) or --timeout wins"
    if info.config is not None and info.config.timeout:
        why = "config.toml timeout"
    else:
        why = "heavy" if spec and spec.heavy and not spec.timeout else "declared"
    wins = "--timeout or --heavy" if why == "declared" else "--timeout"
    return f"{format_duration(d.limit)} ({why}); a task's {wins} wins"


def _say_declaration(spec) -> None:
    if spec.inputs:
        say()
        table(
            ["INPUT", "TYPE", "DEFAULT", "REQUIRED", "DESCRIPTION"],
            [[i.name, i.type, _show_default(i), "yes" if i.required else "", i.description] for i in spec.inputs],
        )
    if spec.returns:
        say()
        table(["DATA", "DESCRIPTION"], [[n, t] for n, t in spec.returns])


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
    other = named_store(paths, to if to is not None else from_)
    source, target = (here, other) if to is not None else (other, here)
    report = copy_between(source, target)
    doc = {"from": source_name(source), "to": source_name(target), **report}
    if report["was_running"]:
        sys.stderr.write(
            f"kmpwm: warning: {len(report['was_running'])} running task(s) copied as ENQUEUED "
            f"({', '.join(report['was_running'][:3])}): stop the source's runners before they run twice\n"
        )
    if as_json:
        print_json(doc)
    else:
        say(f"copied {report['copied']} task(s) and {report['chains']} chain(s) from {doc['from']} to {doc['to']}")
    return 0


def source_name(store) -> str:
    describe = getattr(store, "describe", None)
    return describe() if describe else f"journal {store.paths.journal_dir}"
