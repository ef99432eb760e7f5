"""The local dashboard (``p2ptrain dashboard``): a web page of this peer and its training, and ``/metrics`` for
Prometheus. Read-only; it reads what the running peer writes (``status.json``, the energy ledger), so it starts and
stops without touching the peer. With ``--swarm``, the swarm's health page, read from the DHT.

- ``metrics``: the Prometheus text exposition of a status and a ledger;
- ``server``: the HTTP server (the standard library's), the history it keeps while it runs, and the pages;
- ``swarm_health``: every peer of a swarm as its signed DHT records show it (``--swarm``).
"""
