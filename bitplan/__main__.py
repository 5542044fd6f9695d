from bitplan.cli import run

run()
