"""The volunteer daemon as a background process: started detached and waited for until its control socket answers;
stopped (or told to leave) through that socket and waited for until it has exited.

`p2ptrain daemon start/stop` and `p2ptrain leave` call these; the service files in ``daemon/`` run
`p2ptrain daemon run` in the foreground instead.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

from p2ptrain.errors import P2PTrainError
from p2ptrain.volunteer.control_socket import DaemonNotRunning, request

START_TIMEOUT_S = 120.0  # from the spawn to the first answer (it opens its socket before joining the swarm)
STOP_TIMEOUT_S = 60.0  # from "stop" to the process gone (it leaves the averaging round, writes its checkpoint)


@dataclass(frozen=True)
class Started:
    pid: int
    already: bool  # it was running already: nothing was started


def start_in_background(directory: Path, flags: Sequence[str], env: Mapping[str, str]) -> Started:
    """Start `p2ptrain daemon run --data-dir directory *flags`, detached, its output in ``daemon.out``.

    Raises:
        P2PTrainError: it exited at once (the message ends with its last output lines), or never answered."""
    try:
        return Started(int(request(directory, "status")["daemon_pid"]), already=True)
    except DaemonNotRunning:
        pass
    command = [sys.executable, "-m", "p2ptrain", "daemon", "run", "--data-dir", str(directory), *flags]
    out = directory / "daemon.out"
    with open(out, "ab") as log:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=dict(env),
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = out.read_text(errors="replace").splitlines()[-5:]
            raise P2PTrainError("the daemon exited at once:\n  " + "\n  ".join(tail) + f"\n(full output: {out})")
        try:
            request(directory, "status", timeout_s=2.0)
            return Started(proc.pid, already=False)
        except DaemonNotRunning:
            time.sleep(0.2)
    raise P2PTrainError(f"the daemon (pid {proc.pid}) did not answer within {START_TIMEOUT_S:.0f} s; see {out}")


def stop_and_wait(directory: Path, command: str = "stop") -> float:
    """Send ``command`` (stop, leave) and wait for the daemon's process to exit; returns the seconds it took.

    Raises:
        DaemonNotRunning: nobody answers on the control socket.
        P2PTrainError: it has not exited after ``STOP_TIMEOUT_S``."""
    started = time.monotonic()
    pid = request(directory, command)["daemon_pid"]
    try:
        psutil.Process(pid).wait(STOP_TIMEOUT_S)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        raise P2PTrainError(f"the daemon (pid {pid}) has not stopped after {STOP_TIMEOUT_S:.0f} s") from None
    return time.monotonic() - started
