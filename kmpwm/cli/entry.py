"""The console script's entry point (``kmpwm``, ``python -m kmpwm``).

cron starts kmpwm every minute and scripts call it in loops, so its start and its exit are part of
what every command costs.  Two things about the cyclic garbage collector make up ~20 ms of a
100 ms command, and neither is needed in a process that runs one command and exits:

* Importing typer and kmpwm creates ~60,000 objects, none of them garbage; the collector walks
  them again and again while they are created.  It is paused while the CLI is imported.
* At exit, CPython collects several times while it tears the modules down, walking every object
  again (~10 ms for ``import typer`` alone).  Objects alive when the command has finished are
  frozen (``gc.freeze``): the last collections skip them.  atexit handlers, flushing, waiting for
  threads and freeing by reference count happen as before; only a frozen object kept alive by a
  reference cycle is not finalized at exit (kmpwm keeps nothing that needs it).

Everything imported before the command runs is frozen too, so the collections a long run-due makes
walk only the objects it made itself.
"""

import gc
import sys


def run() -> None:
    enabled = gc.isenabled()
    gc.disable()
    try:
        from kmpwm.cli.app import main
    finally:
        gc.freeze()
        if enabled:
            gc.enable()
    code = main()
    gc.freeze()
    sys.exit(code)
