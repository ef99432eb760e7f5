"""The swarm: how peers find each other, prove who they are, and reach each other across NATs.

- ``identity``     persistent keys: libp2p identity, manifest-signing key
- ``manifest``     the signed swarm manifest (what all peers share) and its verification
- ``invite``       the copy-pasteable invite string
- ``admission``    private swarms: join tokens signed by the author, passes bound to a peer id, revocations
- ``discovery``    DHT keys and records: publishing manifests, finding swarms by model
- ``signed_records`` the records a peer keeps under its own id, signed by it inside hivemind's DHT
- ``p2p_stack``    which libp2p daemon hivemind runs: its bundled Go p2pd or ours (``p2ptrain.p2pd``, py-libp2p)
- ``go_p2pd``      the Go daemon with flags hivemind has no parameter for (relay slots, forced reachability)
- ``reachability`` can other peers connect to this one? (peers dial back; the verdict in the status)
- ``nat``          the role reachability calls for: relay slots, client mode, who aggregates a share
- ``port_mapping`` reads the mapping a home router made for us (UPnP IGD table, NAT-PMP)
- ``network``      the DHT started in that role; the port claimed once
- ``watch``        while the peer trains: the watch that notices when that role no longer fits, hole punching
- ``proximity``    how far other peers are: measured round trips, a Vivaldi coordinate, the signed near record
- ``grouping``     who averages with whom: clusters of nearby peers and Moshpit levels across them (not yet used)
- ``observer``     a client node that reads a swarm's records from outside (report and health page)
- ``joining``      which swarm to join (seed or join, invite, remembered, advertised) and what is remembered of it
"""
