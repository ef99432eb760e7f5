"""What p2ptrain reaches inside the libraries it extends, each in one module, with the versions it was written for.

- ``hivemind``    hivemind's private names: codec registry, daemon launcher, averaging rounds, Optimizer's hooks
- ``codecarbon``  codecarbon 3.x's private counters and hardware objects (the energy meter)
- ``typer``       the click exception class typer vendors

py-libp2p's are in ``p2ptrain/p2pd/libp2p_patches.py``, with its version check: the Python daemon imports nothing
from p2ptrain.
"""
