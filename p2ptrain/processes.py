"""Child processes: hivemind forks a DHT process and averager processes, and the DHT process runs p2pd.

Two guarantees, both tested:
- a clean stop leaves no child behind: ``reap_children`` waits for them, then kills stragglers with a warning;
- a crash of the peer (even ``kill -9``) takes its children with it: ``die_with_parent`` makes every
  child forked from this process receive SIGKILL when the peer dies (Linux ``PR_SET_PDEATHSIG``).
  Without it hivemind's DHT process and p2pd run on forever after the peer is killed. Linux sends it when the
  *thread* that forked the child exits: the peer forks its DHT and averagers from its main thread, and so must
  anything else that starts one (a child forked from a short-lived thread dies with that thread).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

import psutil

logger = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1
# Helpers that serve this process until it exits, then end by themselves: torch's shared-memory manager
# (stopping it early breaks every later tensor.share_memory_() here: "RuntimeError: Broken pipe") and wandb's
# service and its system monitor (--wandb: killed, they lose the curves not yet written).
HELPERS = {"torch_shm_manager", "wandb-core", "wandb-symon"}
_prctl = None  # libc's prctl, looked up before any fork: dlopen in the child of a threaded process can deadlock


def _in_forked_child() -> None:
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    # A fork inherits the peer's "set the stop event" handlers, which would make the child ignore
    # terminate(): children get the default behaviour back (hivemind then ignores SIGINT itself).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def die_with_parent() -> None:
    """Make processes forked from now on die when this process dies (Linux only; a no-op elsewhere)."""
    global _prctl
    if sys.platform.startswith("linux") and _prctl is None:
        _prctl = ctypes.CDLL(None, use_errno=True).prctl
        os.register_at_fork(after_in_child=_in_forked_child)


def descendants() -> list[psutil.Process]:
    """This process's children, grandchildren (p2pd is the DHT process's child), and so on."""
    try:
        return psutil.Process().children(recursive=True)
    except psutil.Error:
        return []


def _is_helper(proc: psutil.Process) -> bool:
    try:
        return proc.name() in HELPERS
    except psutil.Error:
        return False


def reap_children(timeout_s: float = 3.0, known: list[psutil.Process] = ()) -> list[int]:
    """Wait for every descendant but torch's helper to exit; SIGKILL those alive after ``timeout_s``.

    Returns the killed pids.

    ``known``: descendants listed earlier. A grandchild whose parent already exited is no longer
    our descendant (it is re-parented), so take the list before stopping its parent.
    """
    children = [p for p in {p.pid: p for p in [*known, *descendants()]}.values() if not _is_helper(p)]
    _, alive = psutil.wait_procs(children, timeout=timeout_s)
    killed = []
    for proc in alive:
        try:
            logger.warning("Child process %d (%s) did not exit in %.0f s; killing it", proc.pid, proc.name(), timeout_s)
            proc.kill()
            killed.append(proc.pid)
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=1.0)
    return killed
