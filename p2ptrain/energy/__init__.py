"""Energy and carbon: what a peer's contribution cost, metered, priced in CO2e, and shared.

- ``settings`` EnergySettings: meter, country, grid-intensity source (the [energy] table)
- ``meter``    joules per part (codecarbon: NVML, RAPL or TDP × load, RAM estimate; a fake for tests)
- ``carbon``   grid carbon intensity: per-country averages offline, live sources off the training thread
- ``ledger``   a peer's energy and carbon ledger per swarm, and the thread that keeps it
- ``records``  the ledger as a DHT record signed with the peer's identity key; the DHT validator
- ``report``   the report card (`p2ptrain report`): sums, per-peer table, datacenter comparison, chart
"""
