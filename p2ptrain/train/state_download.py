"""A late joiner's state download, checked before hivemind applies it.

A peer that downloads the swarm's state takes whatever the serving peer sends: hivemind would copy a NaN or
broadcast a scalar into every parameter, or fail on metadata that is not a map. Two checks stand in between:

1. **Against the other members** (``check_served_state``, in the averager's process, for each peer hivemind asks in
   turn): after each global step every member publishes a sketch of its parameters (``param_check``). The state a
   peer serves, at its global step N, must agree with at least half of the sketches that the *other* members
   published for N; one that does not is refused and logged, and hivemind asks the next peer. A liar cannot vouch
   for itself, and finite but poisoned parameters (scaled, flipped, shifted, random) disagree with every honest
   member's. With fewer than two other members' sketches for step N the state is taken unchecked, at once, and the
   log says so: one sketch against the server's state cannot tell which of the two is wrong (and one stray member,
   itself about to resynchronise, would veto every honest server), and waiting for more would hold the joiner back
   while the swarm steps on. Sketches are not signed: in an open swarm, a liar with many peer ids could vouch for
   itself through them.
2. **Its shape** (``CheckedStateDownload``, in the peer's process): metadata, every tensor's shape and dtype, finite.

The serving side (``WholeStepState``) serves copies taken between two steps. hivemind hands the averager process
the live tensors, moving their storage into shared memory in place while the optimizer may be writing it (seen to
hang the step and the state server both, and to crash the process: ``tests/test_state_download.py``), and reads
each when its turn in the stream comes: over a slow or relayed link the later tensors are read after the server's
next optimizer step, and the joiner gets parameters and Adam moments of different steps under a third step's number;
it then differs from the swarm after its first round (measured behind NATs: 0.02 learning rates apart, median, one
step after each download, and so downloads again). The local mode's ``StateSharingAverager`` serves copies as well
(``LocalUpdateOptimizer.current_state``).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.compression import CompressionInfo, deserialize_torch_tensor
from hivemind.utils.streaming import combine_from_streaming

from p2ptrain.train.averaging import PseudoGradientAverager
from p2ptrain.train.group_rounds import dht_get
from p2ptrain.train.param_check import read_sketches, sketch, sketch_key

AGREE_RELATIVE = 0.05  # a served coordinate agrees with a member's within 5 % (+ AGREE_ABSOLUTE): room for the
AGREE_ABSOLUTE = 1e-4  #   fp16 state averaging some members took and others not yet
AGREE_SHARE = 0.9  # ... on this share of the sketch's coordinates

logger = logging.getLogger(__name__)


class WholeStepState:
    """``TrainingStateAverager`` mixin: the state it serves is copied between two steps, never during one (module
    docstring). (A state-averaging round that lands in the background, ``delay_state_averaging``, is not covered:
    p2ptrain's swarms run none by default.)"""

    def __init__(self, *args: Any, **kwargs: Any):
        self._between_steps = threading.Lock()
        super().__init__(*args, **kwargs)

    def step(self, *args: Any, **kwargs: Any) -> Any:
        with self._between_steps:  # the epoch's increment and the optimizer step it waits for
            return super().step(*args, **kwargs)

    def get_current_state(self) -> tuple[Any, list[torch.Tensor], Any]:
        with self._between_steps:
            metadata, tensors, infos = super().get_current_state()
            return metadata, [tensor.clone() for tensor in tensors], infos


class CheckedStateDownload(DecentralizedAverager):
    """hivemind's state download (a late joiner's), checked before ``TrainingStateAverager`` applies it: in
    ``StateRounds`` this class comes between the two in the method order, so hivemind's ``load_state_from_peers``
    gets the downloaded state from here. A state that fails ``check_downloaded_state`` is refused with a warning and
    the joiner keeps its own (hivemind would copy a NaN or broadcast a scalar into every parameter, or fail on
    metadata that is not a map)."""

    def __init__(self, *args: Any, run_id: str = "", **kwargs: Any):
        self.run_id = run_id  # whose parameter sketches a served state is checked against ("": not checked)
        super().__init__(*args, **kwargs)

    async def check_served_state(self, peer: Any, messages: list[Any]) -> bool:
        """Whether the state ``peer`` served (``messages``, hivemind's download stream) agrees with the other
        members' sketches of its step (module docstring, 1); logs a refusal."""
        if not self.run_id:
            return True
        try:
            metadata, tensors = decode_download(messages, self.serializer, len(self.main_parameters))
            epoch = metadata["epoch"]
            served = sketch(tensors, self.run_id, epoch)
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as e:
            logger.warning("Refused the state peer %s served: undecodable (%s)", peer, e)
            return False
        found = await dht_get(self.dht, sketch_key(self.run_id, epoch))
        theirs = {p: v for p, v in read_sketches(found, str(self.peer_id), epoch).items() if p != str(peer)}
        agreeing = sum(close(served, other) for other in theirs.values())
        if len(theirs) < 2:  # one other sketch against the server's word: nothing tells which of the two is wrong
            logger.info("Took the state of peer %s (global step %d) unchecked: %d other member(s) published that "
                        "step's parameters, fewer than two", peer, epoch, len(theirs))  # fmt: skip
            return True
        if 2 * agreeing >= len(theirs):
            logger.info("Took the state of peer %s (global step %d): it agrees with %d of %d other members' "
                        "parameters", peer, epoch, agreeing, len(theirs))  # fmt: skip
            return True
        logger.warning(
            "Refused the state peer %s served (global step %d): it agrees with %d of %d other members' parameters",
            peer, epoch, agreeing, len(theirs),
        )  # fmt: skip
        return False

    def load_state_from_peers(self, **kwargs: Any) -> tuple[Any, Any] | None:
        loaded = super().load_state_from_peers(**kwargs)
        if loaded is None:
            return None
        params = [p for group in self.optimizer.param_groups for p in group["params"]] + list(self.extra_tensors)
        try:
            check_downloaded_state(*loaded, params)
        except ValueError as e:
            logger.warning("Ignoring the state a peer sent: %s", e)
            return None
        return loaded


def check_downloaded_state(metadata: Any, tensors: Any, params: list[torch.Tensor]) -> None:
    """Raise ValueError unless ``metadata`` and ``tensors`` are the shape of ``TrainingStateAverager``'s state for
    ``params``: metadata a map with a non-negative int epoch and optimizer metadata; the parameters first, each with
    its own shape and dtype; every floating-point value finite."""
    if not isinstance(tensors, (list, tuple)) or len(tensors) < len(params):
        raise ValueError(f"expected at least {len(params)} tensors")
    check_state(metadata, tensors[: len(params)], params)  # the local mode's check, for the parameters
    if "optimizer_metadata" not in metadata:
        raise ValueError("metadata without the optimizer's")
    for i, tensor in enumerate(tensors[len(params) :], start=len(params)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"item {i} is not a tensor")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"tensor {i} is not finite")


def decode_download(messages: list[Any], serializer: Any, count: int) -> tuple[dict, list[torch.Tensor]]:
    """The metadata and the first ``count`` tensors of a download stream (as hivemind's ``_load_state_from_peers``
    decodes it: a part with a dtype starts a new tensor)."""
    metadata, tensors, parts = None, [], []
    for message in messages:
        if message.metadata:
            try:
                metadata = serializer.loads(message.metadata)
            except Exception as e:  # noqa: BLE001 - a peer's bytes
                raise ValueError(f"undecodable metadata ({type(e).__name__})") from None
        if message.tensor_part.dtype and parts:
            tensors.append(_tensor(parts))
            parts = []
            if len(tensors) == count:
                break
        parts.append(message.tensor_part)
    if parts and len(tensors) < count:
        tensors.append(_tensor(parts))
    if not isinstance(metadata, dict) or type(metadata.get("epoch")) is not int or len(tensors) < count:
        raise ValueError("no metadata with an int epoch, or fewer tensors than parameters")
    return metadata, tensors


def _tensor(parts: list[Any]) -> torch.Tensor:
    try:
        return deserialize_torch_tensor(combine_from_streaming(parts))
    except Exception as e:  # noqa: BLE001 - a peer's bytes: hivemind's decoders raise anything (ImportError included)
        raise ValueError(f"undecodable tensor ({type(e).__name__})") from None


def close(served: np.ndarray, member: np.ndarray) -> bool:
    """A served sketch agrees with a member's (module docstring, 1)."""
    if served.shape != member.shape or not np.isfinite(served).all():
        return False
    a, b = served.astype(np.float64), member.astype(np.float64)
    near = np.abs(a - b) <= AGREE_RELATIVE * np.abs(b) + AGREE_ABSOLUTE
    return bool(near.mean() >= AGREE_SHARE)


def check_state(metadata: Any, tensors: Any, ours: list[torch.Tensor]) -> int:
    """The global step of a state another peer sent (``current_state``'s form), if it can replace ``ours``.

    Raises:
        ValueError: metadata without a non-negative int epoch, another number of tensors, a shape or dtype unlike
            ours, or a non-finite value."""
    if not isinstance(metadata, dict) or not isinstance(metadata.get("epoch"), int) or metadata["epoch"] < 0:
        raise ValueError(f"bad metadata {str(metadata)[:100]!r}")
    if not isinstance(tensors, (list, tuple)) or len(tensors) != len(ours):
        raise ValueError(f"expected {len(ours)} tensors")
    for i, (theirs, mine) in enumerate(zip(tensors, ours, strict=True)):
        if not isinstance(theirs, torch.Tensor) or theirs.shape != mine.shape or theirs.dtype != mine.dtype:
            raise ValueError(f"tensor {i} does not match ours in shape/dtype")
        if not torch.isfinite(theirs).all():
            raise ValueError(f"tensor {i} is not finite")
    return metadata["epoch"]


class StateSharingAverager(PseudoGradientAverager):
    """The local mode's averager; it serves its owner's anchor, outer momentum and global step
    (``LocalUpdateOptimizer.current_state``) to peers that download state."""

    def __init__(self, tensors: list[torch.Tensor], *, owner: Any, **kwargs: Any):
        self._owner = owner  # used in this (host) process only: get_current_state runs here
        super().__init__(tensors, **kwargs)

    def get_current_state(self):
        metadata, tensors = self._owner.current_state()
        return metadata, tensors, [CompressionInfo.from_tensor(t, key=i) for i, t in enumerate(tensors)]
