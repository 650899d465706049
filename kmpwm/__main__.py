from kmpwm.cli.entry import run

run()
