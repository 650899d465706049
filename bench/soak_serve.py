"""Long life of ``kmpwm serve``: a task every second for an hour (``--minutes 60``, the default).

    python bench/soak_serve.py                 # one hour
    python bench/soak_serve.py --minutes 5     # a short look

Every second this process enqueues (Python API) a task for the serve: mostly single Python
tasks; every 10th second a three-step chain (a parallel middle step); every 7th a task whose
worker answers RETRY twice before it succeeds (linear backoff of 1 s); every 13th a command
worker.  Every ``--compact-every`` seconds (default 180) it runs ``kmpwm compact`` as another
process.  Once a minute it samples the serve process: RSS (VmRSS), open file descriptors,
threads, zombie children, CPU seconds.  At the end it waits for the queue to drain, stops the
serve with SIGTERM and reports the first sample after warm-up against the last: none of RSS,
fds or zombies may grow (figures, not pass/fail: it prints GROWS when one does).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PYTHON, ROOT, bench_env, loadavg, say  # noqa: E402

WORKERS_PY = """
import os
from kmpwm import WorkerResult

def ok(input):
    return {"n": input}

def flaky(input, ctx):
    if ctx.attempt < 3:
        return WorkerResult.Retry("not yet")
    return WorkerResult.Success()
"""


def sample(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss_kb = int(fields["VmRSS"].split()[0])
    threads = int(fields["Threads"])
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    zombies = children = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2 :].split()
        if int(rest[1]) == pid:
            children += 1
            zombies += rest[0] == "Z"
    stat = Path(f"/proc/{pid}/stat").read_text()
    rest = stat[stat.rindex(")") + 2 :].split()
    cpu = (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")
    return {
        "t": time.time(),
        "rss_mb": rss_kb / 1024,
        "fds": fds,
        "threads": threads,
        "children": children,
        "zombies": zombies,
        "cpu_s": cpu,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--compact-every", type=float, default=180.0, help="seconds between `kmpwm compact` runs")
    ap.add_argument("--sample-every", type=float, default=60.0, help="seconds between samples of the serve")
    args = ap.parse_args()

    base = Path(tempfile.mkdtemp(prefix="kmpwm-soak-"))
    home = base / "home"
    home.mkdir(mode=0o700)
    os.chmod(home, 0o700)
    (base / "soakworkers.py").write_text(WORKERS_PY)
    cfg = home / "config.toml"
    cfg.write_text(
        textwrap.dedent("""
        [workers.ok]
        entry = "soakworkers:ok"

        [workers.flaky]
        entry = "soakworkers:flaky"

        [workers.cmd]
        command = ["/bin/true"]
    """)
    )
    os.chmod(cfg, 0o600)
    env = bench_env(str(home), PYTHONPATH=f"{base}{os.pathsep}{ROOT}")
    sys.path.insert(0, str(base))
    from kmpwm import Constraints, Scheduler, TaskRequest
    from kmpwm.core import triggers

    sched = Scheduler(home=str(home))
    sched.enqueue("first", triggers.OneTime(), "ok", input="0")
    err = open(base / "serve.err", "w")
    serve = subprocess.Popen(
        [PYTHON, "-m", "kmpwm", "serve", "--parallel", "2"], env=env, stdout=subprocess.DEVNULL, stderr=err
    )
    say(f"soak_serve: {loadavg()}; home {home}; serve pid {serve.pid}; {args.minutes:g} minutes")
    retry = Constraints(backoff="linear", backoff_delay=1)
    end = time.monotonic() + args.minutes * 60
    next_compact = time.monotonic() + args.compact_every
    next_sample = time.monotonic() + min(30.0, args.minutes * 60 / 4)  # the first sample after warm-up
    samples, compactions, enqueued, i = [], 0, 0, 0
    start = time.monotonic()
    while time.monotonic() < end:
        tick = time.monotonic()
        i += 1
        if i % 10 == 0:
            sched.begin_with(TaskRequest(worker="ok", input=str(i))).then(
                [TaskRequest(worker="ok", input="a"), TaskRequest(worker="cmd")]
            ).then(TaskRequest(worker="ok", input="z")).with_id(f"chain{i}", "keep").enqueue()
            enqueued += 4
        elif i % 7 == 0:
            sched.enqueue(f"flaky{i}", triggers.OneTime(), "flaky", constraints=retry)
            enqueued += 1
        elif i % 13 == 0:
            sched.enqueue(f"cmd{i}", triggers.OneTime(), "cmd")
            enqueued += 1
        else:
            sched.enqueue(f"t{i}", triggers.OneTime(), "ok", input=str(i))
            enqueued += 1
        if tick >= next_compact:
            subprocess.run(
                [PYTHON, "-m", "kmpwm", "compact"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
            compactions += 1
            say(f"  compaction {compactions} at {(tick - start) / 60:.1f} min")
            next_compact = tick + args.compact_every
        if tick >= next_sample:
            s = sample(serve.pid)
            samples.append(s)
            fields = {k: round(v, 2) if isinstance(v, float) else v for k, v in s.items() if k != "t"}
            say(f"  {(tick - start) / 60:5.1f} min " + json.dumps(fields))
            next_sample = tick + args.sample_every
        if serve.poll() is not None:
            say(f"serve exited early: {serve.returncode}; see {base / 'serve.err'}")
            return 1
        time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
    # drain: everything enqueued finishes
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        out = subprocess.run(
            [PYTHON, "-m", "kmpwm", "inspect-queue", "--json"], env=env, capture_output=True, text=True, check=False
        )
        left = len(json.loads(out.stdout)["tasks"]) if out.returncode == 0 else -1
        if left == 0:
            break
        time.sleep(1)
    last = sample(serve.pid)
    samples.append(last)
    serve.send_signal(signal.SIGTERM)
    rc = serve.wait(60)
    out = subprocess.run(
        [PYTHON, "-m", "kmpwm", "inspect-queue", "--all", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    states: dict[str, int] = {}
    for t in json.loads(out.stdout)["tasks"]:
        states[t["state"]] = states.get(t["state"], 0) + 1
    first = samples[0]
    say(f"soak_serve: {loadavg()}")
    print(
        f"soak: {args.minutes:g} min, {enqueued} tasks enqueued ({i} enqueue calls), {compactions} compactions, "
        f"serve exit {rc}, unfinished left {left}, states after compaction {states}"
    )
    for key, unit in (("rss_mb", "MB"), ("fds", ""), ("threads", ""), ("zombies", ""), ("children", "")):
        grows = last[key] > first[key] * (1.10 if key == "rss_mb" else 1) + (0 if key == "rss_mb" else 0)
        print(
            f"  {key:<9} first {first[key]:8.2f}{unit}  last {last[key]:8.2f}{unit}"
            f"  max {max(s[key] for s in samples):8.2f}{unit}" + ("   GROWS" if grows else "")
        )
    print(
        f"  cpu      {last['cpu_s'] - first['cpu_s']:.1f} s of CPU between the first and last sample "
        f"({(last['cpu_s'] - first['cpu_s']) / max(1.0, last['t'] - first['t']) * 100:.1f}% of one core)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
