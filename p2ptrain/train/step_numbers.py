"""How the members of a gradient round number the global step they take with it, and what a peer does when the
swarm took its step without it.

hivemind matches gradient rounds by the averager's prefix, not by step: peers one step apart (one has just seen the
swarm move on, the other not yet) averaged together, the late one applied gradients of the others' step to its
older parameters, and robust aggregation refused its part as an outlier's. Each round is keyed by its global step
instead (``STEP_KEY``, as the level rounds of a grouped swarm are: ``grouping.step_bits``): a peer that arrives
while its step's group is still forming joins it, as hivemind intends; one that arrives after would find nobody and
wait out the averaging timeout alone. So while its round looks for a group, the peer reads the swarm's progress
records (``leave_if_passed``): once they show the swarm past its step, that step's round has been held without it,
and it cancels its own and downloads the swarm's state at once (``Trainer``). Members still report their step in
the round's all-gather (``EpochReports``): a member that finds its group ahead anyway (two steps' keys that collide)
downloads the swarm's state instead of comparing its parameters.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from hivemind.averaging.control import AveragingStage, StepControl

from p2ptrain.swarm.discovery import bounded
from p2ptrain.swarm.grouping import step_bits

STEP_KEY = "0" * 16  # hashed with the step into a gradient round's group bits: 1 in 65,536 steps apart share a key
NO_GROUP_YET = (AveragingStage.IDLE, AveragingStage.LOOKING_FOR_GROUP)  # an averaging round's stages
READ_EVERY_S = 0.5  # how often a round looking for its group reads the swarm's progress records
READ_TIMEOUT_S = 2.0


class EpochReports:
    """Mixin for the gradient averagers: each member reports its global step in the round's all-gather, as the
    user data ``{"epoch": n}`` (``protocols/averaging.md``). A member that was behind its group missed their last
    steps: it downloads the swarm's state instead of comparing its parameters (``Trainer``)."""

    epoch_of: Callable[[], int] | None = None  # the optimizer's global step; set once it exists

    def schedule_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.epoch_of is not None:
            epoch = self.epoch_of()
            self.set_group_bits(step_bits(STEP_KEY, epoch))  # before the round: the averager's process, in order
            if kwargs.get("gather") is None:
                kwargs["gather"] = {"epoch": epoch}
        return super().schedule_step(*args, **kwargs)

    def load_state_from_peers(self, *args: Any, **kwargs: Any) -> None:
        """Download nothing: hivemind's Optimizer downloads its gradient averager's "state" (the gradient buffers
        of the server's last step) after the state averager's, then zeroes them (a second transfer of the model's
        size, seen failing on a shape from a Python-daemon peer)."""


def group_epoch(outcome: dict, own: int, plausible: int) -> int | None:
    """The highest global step the members of a gradient round reported (``EpochReports``), if above ``own``: one
    step ahead is believed at once, more only up to ``plausible`` (the swarm's checked progress records). Waiting for
    the records to show the one step (they lag by seconds) left a peer behind its group comparing its parameters under
    the wrong step number, and in NAT runs its resynchronisations came from the camps it split instead (14 of 16); it
    would not stop a liar either, whose own progress record may claim a step or two ahead (``progress.EPOCH_SLACK``).
    What bounds a liar is that the download it sends a peer to is checked against the members' sketches."""
    reported = [d.get("epoch") for d in outcome.values() if isinstance(d, dict)]
    ahead = [e for e in reported if type(e) is int and own < e <= max(own + 1, plausible)]
    return max(ahead, default=None)


def swarm_epoch(tracker: Any) -> int | None:
    """The swarm's global step as its progress records say now, through the tracker's checks (``progress``); None if
    the read failed. Read from the DHT, not the tracker's copy: hivemind holds that still while the peer takes a
    step (``ProgressTracker.pause_updates``)."""
    found = bounded(tracker.dht.get(tracker.training_progress_key, latest=True, return_future=True), READ_TIMEOUT_S)
    if found is None or not isinstance(found.value, dict):
        return None
    return tracker.swarm_progress(found.value).epoch


def leave_if_passed(control: StepControl, epoch: int, read_epoch: Callable[[], int | None], timeout_s: float) -> bool:
    """Wait while ``control``'s round of global step ``epoch`` looks for its group; cancel it and return True once
    ``read_epoch`` (the swarm's step) is past ``epoch``: nobody finishes a step's round without all its members'
    parts, so that step's round was held without this peer, and its own would find nobody."""
    deadline = time.monotonic() + timeout_s
    while not control.done() and control.stage in NO_GROUP_YET and time.monotonic() < deadline:
        swarm = read_epoch()
        if swarm is not None and swarm > epoch and control.stage in NO_GROUP_YET:
            control.cancel()
            return True
        time.sleep(READ_EVERY_S)
    return False
