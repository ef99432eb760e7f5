"""The `p2ptrain` command: flags → settings → the peer; errors → exit codes, in one place.

- ``app``             the commands, registered in the order ``--help`` lists them; ``main`` maps errors to exit codes
- ``options``         the options the commands share, declared once; the peer's flags → ``PeerSettings``
- ``session``         the environment the commands read, logging, versions, signals (``until_signalled``)
- ``peer_commands``   ``seed``, ``join``, ``demo``
- ``daemon_commands`` ``daemon run/start/stop/status``, ``status``, ``pause``, ``resume``, ``leave``, ``config``
- ``report_command``  ``p2ptrain report``: the report card of this peer or of the swarm
"""
