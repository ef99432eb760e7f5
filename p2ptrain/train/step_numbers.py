"""How the members of a gradient round number the global step they take with it.

hivemind matches gradient rounds by the averager's prefix, not by step: peers one step apart (one has just seen the
swarm move on, the other not yet) average together, apply the same average, and number the result differently.
The parameter check (``param_check``) compares sketches published under a step's number, so it then compares
different steps and finds everybody apart. Each member reports its step in the round's all-gather
(``EpochReports``); after a successful round a member that finds its group ahead (``group_epoch``) missed their
last steps, and downloads the swarm's state instead of comparing its parameters (``Trainer``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class EpochReports:
    """Mixin for the gradient averagers: each member reports its global step in the round's all-gather, as the
    user data ``{"epoch": n}`` (``protocols/averaging.md``). A member that was behind its group missed their last
    steps: it downloads the swarm's state instead of comparing its parameters (``Trainer``)."""

    epoch_of: Callable[[], int] | None = None  # the optimizer's global step; set once it exists

    def schedule_step(self, *args: Any, **kwargs: Any) -> Any:
        if self.epoch_of is not None and kwargs.get("gather") is None:
            kwargs["gather"] = {"epoch": self.epoch_of()}
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
