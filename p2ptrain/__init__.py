"""p2ptrain: volunteers' GPUs train one model together over the ordinary internet.

The layers (each package's ``__init__`` maps its files), and what may import what:

- ``cli/``       the `p2ptrain` command: flags → settings → peer; errors → exit codes; signals
- ``volunteer/`` the volunteer daemon: idle policy, pauses, control socket, sensors
- ``energy/``    energy meter, carbon intensity, the ledger and the report card
- ``train/``     the step loop, hivemind's optimizers, averaging and codecs, models, data, checkpoints
- ``swarm/``     identity, manifest, invite, DHT records, reachability, NAT roles, the libp2p daemons
- ``p2pd/``      p2ptrain-p2pd: hivemind's daemon protocol on py-libp2p; its own process; imports nothing of p2ptrain

The shared basics, here:

- ``peer``        a peer's lifecycle in order: identity → DHT → swarm → model → train → shutdown
- ``leaving``     how a stay ends: each part's stop in reverse start order, timed, failures logged
- ``local_swarm`` several peers on this machine (the demo and the integration tests)
- ``settings``    PeerSettings (this machine) and the one place config sources are merged
- ``fields``      settings fields that are also command-line options (declared once, on the dataclass)
- ``status``      the status file a running peer keeps
- ``gate``        the pause/throttle point between training steps (idle policy, no relay) and its verdict
- ``processes``   child processes die with the peer and are reaped at shutdown
- ``fileio``      atomic writes
- ``errors``      the exception hierarchy and exit codes

``cli`` and ``volunteer`` use everything below them; ``train`` uses ``swarm``; ``energy`` and ``volunteer`` reach
the step loop only through the trainer's hooks. ARCHITECTURE.md tells the data flow of one global step.
"""

__version__ = "0.1.0"
