"""The `p2ptrain` command line: flags → settings → the peer; errors → exit codes, in one place.

    p2ptrain demo                                   # a local swarm of 3 peers training gpt2-tiny
    p2ptrain seed --model gpt2-small --dataset ./texts/   # start a swarm; prints an invite
    p2ptrain join --model gpt2-small --invite p2pt1-…     # volunteer in it
    p2ptrain invite --days 3                        # another invite to a swarm seeded with --private
    p2ptrain report --swarm                         # tokens, GPU-hours, kWh, CO2e of the whole swarm
    p2ptrain export --out ./my-model                # the trained model as a Hugging Face directory
    p2ptrain dashboard                              # this peer's live page and /metrics, on 127.0.0.1:8470

Only ``main`` installs signal handlers: SIGINT/SIGTERM set a stop event and the peer shuts down in
order (a second Ctrl+C kills at once). Errors print ``p2ptrain: error: <what> (<flag>). <fix>``;
tracebacks only with ``--debug``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

import typer

from p2ptrain.cli import (
    daemon_commands,
    dashboard_command,
    export_command,
    invite_command,
    peer_commands,
    report_command,
    session,
)
from p2ptrain.compat.typer import ClickException
from p2ptrain.errors import ExitCode, P2PTrainError

logger = logging.getLogger("p2ptrain")


def version() -> None:
    """Print versions (include them in bug reports)."""
    print(session.versions())


app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train one model together with volunteers' GPUs.")
daemon_app = typer.Typer(no_args_is_help=True, help="The volunteer daemon: train in the background, only when idle.")
config_app = typer.Typer(help="Show or change the daemon's config file.")
app.add_typer(daemon_app, name="daemon")
app.add_typer(config_app, name="config")
# the commands, in the order `p2ptrain --help` lists them
app.command()(peer_commands.seed)
app.command()(peer_commands.join)
app.command()(peer_commands.demo)
app.command()(invite_command.invite)
app.command()(version)
app.command()(daemon_commands.status)
app.command()(daemon_commands.pause)
app.command()(daemon_commands.resume)
app.command()(daemon_commands.leave)
app.command()(report_command.report)
app.command()(export_command.export)
app.command()(export_command.generate)
app.command()(dashboard_command.dashboard)
daemon_app.command("run")(daemon_commands.daemon_run)
daemon_app.command("start")(daemon_commands.daemon_start)
daemon_app.command("stop")(daemon_commands.daemon_stop)
daemon_app.command("status")(daemon_commands.daemon_status)
config_app.callback(invoke_without_command=True)(daemon_commands.config_show)
config_app.command("set")(daemon_commands.config_set)
config_app.command("unset")(daemon_commands.config_unset)


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run the CLI; return the exit code. Tests call this in-process with their own ``env``."""
    session.use_env(env)
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="p2ptrain", standalone_mode=False)
        return int(result or 0)
    except typer.Exit as e:
        return e.exit_code
    except ClickException as e:
        e.show()
        return ExitCode.USAGE
    except typer.Abort:
        return ExitCode.INTERRUPTED
    except P2PTrainError as e:
        if debug:
            logger.exception("Details")
        print(f"p2ptrain: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    except Exception:  # noqa: BLE001 - the one place a bug becomes an exit code
        if debug:
            print(session.versions(), file=sys.stderr)
            raise
        logger.exception("Internal error")
        print("p2ptrain: error: internal error (above). Rerun with --debug and report it.", file=sys.stderr)
        return ExitCode.INTERNAL


def run() -> None:
    """Console-script entry point."""
    code = main()
    # Everything is stopped and written by now: leave without the interpreter's own shutdown. Its last full
    # garbage collection of torch's, hivemind's and codecarbon's objects took 2-5 s on a busy 2-core machine; and
    # after a shutdown around a training step stuck in hivemind, that step's threads (hivemind's progress tracker,
    # its executor calls into the stopped DHT) are still there: the interpreter waits for executor threads, and
    # one that never returns held a SIGTERMed peer until it was killed (30 s, seen in the swarm test).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))
