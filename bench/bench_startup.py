"""Start-up: `kmpwm enqueue` and an idle `kmpwm run-due` as whole processes, against the floor
`python -c "import typer"` measured in the same run (goal: within 1.2x of the floor).

    python bench/bench_startup.py [--quick] [--importtime]

The three commands are run round-robin (floor, enqueue, run-due, floor, ...) so that foreign load
hits them alike; the table gives medians of wall time, with CPU time in the notes.  The enqueue
adds one task (a new id each time) to a home; the idle run-due runs over a home whose only task
is delayed by a day, so nothing is due.  `--importtime` also prints where the time above the floor
goes (python -X importtime, top-level modules that typer does not import).
"""

from __future__ import annotations

import itertools
import sys

from common import KMPWM, PYTHON, Row, bench_env, fmt_ms, fresh_home, interleaved, run_process, say, section, standalone

GOAL = 1.2


def rows(quick: bool = False) -> list[Row]:
    rounds = 5 if quick else 15
    enq_home, idle_home = fresh_home(), fresh_home()
    enq_env, idle_env = bench_env(enq_home), bench_env(idle_home)
    run_process(KMPWM + ["enqueue", "later", "echo", "--delay", "1d"], idle_env)
    counter = itertools.count()
    cpu = {"floor": [], "enqueue": [], "run-due": []}

    def floor():
        r = run_process([PYTHON, "-c", "import typer"], bench_env())
        cpu["floor"].append(r.cpu)
        return r.wall

    def enqueue():
        r = run_process(KMPWM + ["enqueue", f"t{next(counter)}", "echo"], enq_env)
        cpu["enqueue"].append(r.cpu)
        return r.wall

    def run_due():
        r = run_process(KMPWM + ["run-due"], idle_env)
        cpu["run-due"].append(r.cpu)
        return r.wall

    say(f"start-up: {rounds} interleaved rounds (after 2 warm-up rounds)")
    st = interleaved({"floor": floor, "enqueue": enqueue, "run-due": run_due}, rounds, warmup=2)
    for k in cpu:
        cpu[k] = sorted(cpu[k][-rounds:])
    med_cpu = {k: v[len(v) // 2] for k, v in cpu.items()}
    fl = st["floor"].median
    out = [
        section("Start-up (whole processes, median wall; interleaved with the floor)"),
        Row(
            'floor: python -c "import typer"',
            fmt_ms(fl),
            "(floor)",
            1.0,
            "",
            f"cpu {fmt_ms(med_cpu['floor'])}; {st['floor'].spread()}",
        ),
    ]
    for name, label in (("enqueue", "kmpwm enqueue ID echo"), ("run-due", "kmpwm run-due (idle: nothing due)")):
        s = st[name]
        out.append(
            Row(
                label,
                fmt_ms(s.median),
                f"<= {GOAL}x floor",
                s.median / fl,
                f"{name} / floor",
                f"cpu {fmt_ms(med_cpu[name])} = {med_cpu[name] / med_cpu['floor']:.2f}x floor cpu; {s.spread()}",
            )
        )
    return out


def importtime() -> None:
    """Which top-level imports kmpwm adds on top of typer (self+children, microseconds)."""
    import subprocess

    home = fresh_home()
    env = bench_env(home)
    run_process(KMPWM + ["enqueue", "later", "echo", "--delay", "1d"], env)
    for label, argv in (("enqueue", ["enqueue", "x", "echo"]), ("run-due", ["run-due"])):
        run_process(KMPWM + argv, env)  # warm the bytecode cache
        err = subprocess.run(
            [PYTHON, "-X", "importtime", *KMPWM[-1:], *argv]
            if KMPWM[0] != PYTHON
            else [PYTHON, "-X", "importtime", "-m", "kmpwm", *argv],
            env=env,
            capture_output=True,
        ).stderr.decode()
        typer_mods = set()
        floor = subprocess.run(
            [PYTHON, "-X", "importtime", "-c", "import typer"], env=env, capture_output=True
        ).stderr.decode()
        for line in floor.splitlines()[1:]:
            typer_mods.add(line.rsplit("|", 1)[-1].strip())
        top = []
        for line in err.splitlines()[1:]:
            parts = line.split("|")
            if len(parts) != 3:
                continue
            name = parts[2]
            depth = (len(name) - len(name.lstrip())) // 2
            name = name.strip()
            if name in typer_mods:
                continue
            top.append((int(parts[1]), depth, name))
        print(f"\n{label}: imports beyond `import typer` with cumulative >= 1 ms (depth, ms, module)")
        for cum, depth, name in top:
            if cum >= 1000 and depth <= 2:
                print(f"  {'  ' * depth}{name:40} {cum / 1000:7.1f}")


if __name__ == "__main__":
    if "--importtime" in sys.argv:
        sys.argv.remove("--importtime")
        importtime()
    standalone(rows, "kmpwm start-up")
