"""kmpwm's built-in workers, registered through the same ``kmpwm.workers`` entry point group as
any installed package's workers."""
