"""A late joiner's state download, checked before hivemind applies it.

A peer that downloads the swarm's state takes whatever the serving peer sends: hivemind would copy a NaN or
broadcast a scalar into every parameter, or fail on metadata that is not a map. Here the download is checked for the
shape of ``TrainingStateAverager``'s state first. (Checking it against the digests other members announce, so that
one liar cannot hand a joiner finite but poisoned parameters, is not built yet.)
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from hivemind.averaging import DecentralizedAverager

from p2ptrain.train.local_updates import check_state

logger = logging.getLogger(__name__)


class CheckedStateDownload(DecentralizedAverager):
    """hivemind's state download (a late joiner's), checked before ``TrainingStateAverager`` applies it: in
    ``StateRounds`` this class comes between the two in the method order, so hivemind's ``load_state_from_peers``
    gets the downloaded state from here. A state that fails ``check_downloaded_state`` is refused with a warning and
    the joiner keeps its own (hivemind would copy a NaN or broadcast a scalar into every parameter, or fail on
    metadata that is not a map)."""

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
