"""p2ptrain: volunteers' GPUs train one model together over the ordinary internet.

Where things are (one idea per module):

- ``cli``         the `p2ptrain` command: flags → settings → peer; errors → exit codes; signals
- ``settings``    PeerSettings (this machine) and the one place config sources are merged
- ``energy_settings`` EnergySettings: meter, country, grid-intensity source (the [energy] table)
- ``peer``        a peer's lifecycle in order: identity → DHT → swarm → model → train → shutdown
- ``training``    the step loop around hivemind.Optimizer, validation, the warm-up schedule
- ``local_updates`` local-update (DiLoCo) mode: inner AdamW, averaged pseudo-gradients, outer Nesterov
- ``averaging``   compressed all-reduce on hivemind's averagers (codec per round, sparse via shared masks)
- ``codecs``      fp16 / int8 / random-k, the ladder of compression levels
- ``policy``      the adaptive level every group member derives from the same reports
- ``volunteer``   the volunteer daemon's lifecycle: config → sensor → control socket → watcher → peer
- ``idle_policy`` when a volunteer's machine may train (games, schedule, heat, battery, caps)
- ``gate``        the pause/throttle point between training steps
- ``energy_meter`` joules per part (codecarbon: NVML, RAPL or TDP × load, RAM estimate; a fake for tests)
- ``carbon``      grid carbon intensity: per-country averages offline, live sources off the training thread
- ``ledger``      a peer's energy and carbon ledger per swarm, and the thread that keeps it
- ``ledger_records`` the ledger as a DHT record signed with the peer's identity key; the DHT validator
- ``report``      the report card (`p2ptrain report`): sums, per-peer table, datacenter comparison, chart
- ``machine_sensors`` GPU facts (NVML, or a fake for tests), battery, this peer's TCP traffic
- ``control``     the daemon's local control socket (status, pause, resume, leave, stop)
- ``daemon_config`` the daemon's TOML config file
- ``manifest``    the signed swarm manifest (what all peers share) and its verification
- ``invite``      the copy-pasteable invite string
- ``p2p_stack``   which libp2p daemon hivemind runs: its bundled Go p2pd or ``p2pd`` (ours, py-libp2p)
- ``go_p2pd``     the Go daemon with flags hivemind has no parameter for (relay slots, forced reachability)
- ``p2pd/``       p2ptrain-p2pd: hivemind's daemon protocol on py-libp2p, mDNS, circuit relay, UPnP; its own process
- ``reachability`` can other peers connect to this one? (peers dial back; the verdict in the status)
- ``nat``         the role reachability calls for: relay slots, client mode, who aggregates a share
- ``network``     the DHT started in that role, and the watch that notices when it no longer fits
- ``group_rounds`` averaging rounds that gather reachability, and fail whole when any part failed
- ``param_check`` after each global step, members compare sketches of their parameters; a stray resyncs
- ``discovery``   DHT records: publishing manifests, finding swarms by model
- ``identity``    persistent keys: libp2p identity, manifest-signing key
- ``models``      the model registry (gpt2-tiny/-small/-medium), built from configs
- ``tokenizer``   offline byte tokenizer; Hugging Face tokenizers from the local cache
- ``data``        datasets (embedded corpus, local files, HF streaming), held-out split, sharding
- ``checkpoint``  atomic safetensors checkpoints
- ``status``      the status file a running peer keeps
- ``processes``   child processes die with the peer and are reaped at shutdown
- ``local_swarm`` several peers on this machine (the demo and the integration tests)
- ``fileio``      atomic writes
- ``errors``      the exception hierarchy and exit codes
"""

__version__ = "0.1.0"
