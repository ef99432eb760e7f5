"""``p2ptrain-p2pd-go``: hivemind's bundled Go ``p2pd``, started with flags hivemind has no parameter for.

hivemind builds the daemon's command line itself (``P2P.create``); a few of the Go daemon's flags that a peer
behind NAT needs are not among its parameters (``-relayDiscovery=0``: use the given relays at once, instead of
waiting minutes to discover candidates in the DHT). ``p2p_stack.select`` points hivemind at this launcher and
puts the extra flags in ``P2PTRAIN_P2PD_FLAGS``; the launcher appends them (Go's flag package lets the last
occurrence of a flag win) and replaces itself with the real binary, so hivemind's process is the daemon.

Kept free of heavy imports: it runs before every Go daemon start.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

FLAGS_ENV = "P2PTRAIN_P2PD_FLAGS"  # space-separated -name=value flags for the daemon, set by p2p_stack
LOG_DIR_ENV = "P2PTRAIN_P2PD_LOG_DIR"  # for bug reports: each daemon also writes its own log there (go-log's file)


def go_binary() -> Path:
    """hivemind's bundled daemon, found without importing hivemind (which takes seconds)."""
    spec = importlib.util.find_spec("hivemind")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("hivemind is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "hivemind_cli" / "p2pd"


def extra_flags(environ: dict[str, str]) -> list[str]:
    return [flag for flag in environ.get(FLAGS_ENV, "").split() if flag.startswith("-")]


def main() -> None:
    binary = str(go_binary())
    if os.environ.get(LOG_DIR_ENV):
        os.environ["GOLOG_FILE"] = os.path.join(os.environ[LOG_DIR_ENV], f"p2pd-{os.getpid()}.log")
    os.execv(binary, [binary, *sys.argv[1:], *extra_flags(dict(os.environ))])


if __name__ == "__main__":
    main()
