"""Whether this peer keeps up with the swarm: two ways of falling out of its rounds that no single step shows.

- ``StuckRounds``: its gradient rounds find no group step after step while others train (its averager is stuck:
  the peer rejoins with new ones).
- ``FallingBehind``: no global step with its group between one state download and the next. A peer that parted
  from the swarm downloads its state; hivemind forms each gradient round's group over the matchmaking time before
  the step is due, so a peer back from a download that took most of a step has missed its step's group (rounds are
  keyed by step): it leaves its round once the swarm's progress records show the step taken (``step_numbers``), and
  downloads again, and again. Nothing but longer steps (the swarm's target batch size) or a faster
  link ends that, so the peer says so, with the durations, instead of resynchronising silently forever.
"""

from __future__ import annotations

from dataclasses import dataclass, field

STUCK_STEPS = 6  # global steps in a row from our own gradients, with others in the swarm, before rejoining
BEHIND_DOWNLOADS = 3  # state downloads with no global step taken with a group between them, before saying so


@dataclass
class StuckRounds:
    """Tells when this peer's gradient rounds have failed ``limit`` global steps in a row while other peers train:
    its averager is stuck (seen: after a round cancelled at the wrong moment inside hivemind's matchmaking, every
    later round of that peer found no group, and it trained on alone while the swarm went on without it)."""

    limit: int = STUCK_STEPS
    in_a_row: int = 0

    def after(self, own_update: bool, peers: int) -> bool:
        """After a global step: was its update our own (the round failed), with ``peers`` in the swarm?"""
        self.in_a_row = self.in_a_row + 1 if own_update and peers > 1 else 0
        if self.in_a_row < self.limit:
            return False
        self.in_a_row = 0
        return True


@dataclass(frozen=True)
class Lag:
    """The measured reason a peer cannot catch up: its downloads' mean duration and the swarm's step."""

    downloads: int
    download_s: float
    step_s: float
    matchmaking_s: float

    def message(self) -> str:
        return (
            f"this peer took no global step with the swarm between its last {self.downloads} state downloads: a "
            f"download takes {self.download_s:.1f} s, the swarm steps every {self.step_s:.1f} s and forms each "
            f"round's group over the {self.matchmaking_s:.0f} s before it, so back from a download this peer has "
            "missed its step's round. It cannot catch up while a download takes most of a global step (a slow link, "
            "or steps too short for the model: the swarm's --target-batch-size sets their length)"
        )


@dataclass
class FallingBehind:
    """The chain of state downloads with no global step taken with a group between them (module docstring)."""

    matchmaking_s: float = 5.0  # the swarm's (the manifest's matchmaking time)
    limit: int = BEHIND_DOWNLOADS
    chain: list[tuple[float, int, float]] = field(default_factory=list)  # (ended at, swarm's step then, seconds)

    def after_download(self, ended_at: float, swarm_step: int, seconds: float) -> Lag | None:
        """After a state download; a ``Lag`` every ``limit`` in a row."""
        self.chain.append((ended_at, swarm_step, seconds))
        if len(self.chain) < self.limit:
            return None
        (first_at, first_step, _), (last_at, last_step, _) = self.chain[0], self.chain[-1]
        mean_s = sum(s for _, _, s in self.chain) / len(self.chain)
        step_s = (last_at - first_at) / max(1, last_step - first_step)
        self.chain = []  # the next report counts anew
        return Lag(self.limit, mean_s, step_s, self.matchmaking_s)

    def kept_up(self) -> None:
        """After a global step taken with a group: the chain, if any, is broken."""
        self.chain = []
