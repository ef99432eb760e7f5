from p2ptrain.cli.app import run

run()
