"""p2ptrain: volunteers' GPUs train one model together over the ordinary internet.

Where things are (one idea per module):

- ``cli``         the `p2ptrain` command: flags → settings → peer; errors → exit codes; signals
- ``settings``    PeerSettings (this machine) and the one place config sources are merged
- ``peer``        a peer's lifecycle in order: identity → DHT → swarm → model → train → shutdown
- ``training``    the step loop around hivemind.Optimizer, validation, the warm-up schedule
- ``manifest``    the signed swarm manifest (what all peers share) and its verification
- ``invite``      the copy-pasteable invite string
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
