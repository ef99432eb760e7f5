"""The local mode's outer optimizer: Nesterov SGD on the agreed parameters, with the round's averaged pseudo-gradient
as its gradient (DiLoCo's outer step), on the coordinates the round averaged."""

from __future__ import annotations

import torch

from p2ptrain.train.codecs import shared_indices


def outer_step_(
    anchor: torch.Tensor,
    momentum: torch.Tensor,
    delta: torch.Tensor,
    lr: float,
    mu: float,
    mask: torch.Tensor | None,
) -> None:
    """Nesterov SGD on the anchor with the averaged pseudo-gradient ``delta``, only where ``mask`` is set.

    Coordinates outside the mask were not averaged this round: neither they nor their momentum move.
    """
    if mask is None:
        momentum.mul_(mu).add_(delta)
        anchor.sub_(delta + mu * momentum, alpha=lr)
        return
    momentum[mask] = mu * momentum[mask] + delta[mask]
    anchor[mask] -= lr * (delta[mask] + mu * momentum[mask])


def averaged_masks(group_id: bytes, ratio: float, like: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """Boolean masks shaped as ``like`` of the coordinates a random-k round averaged (``codecs.shared_indices`` of its
    group id); None when it averaged all of them."""
    if ratio >= 1.0:
        return None
    sizes = [t.numel() for t in like]
    flat = torch.zeros(sum(sizes), dtype=torch.bool)
    flat[shared_indices(group_id, sum(sizes), ratio)] = True
    return [m.view_as(t) for m, t in zip(flat.split(sizes), like, strict=True)]
