"""Training: the step loop around hivemind's optimizers, averaging, codecs and the data.

- ``trainer``       the step loop: batches, pauses, validation, the end of a run, its hooks (``StepObserver``)
- ``optimizers``    the optimizer of the swarm's mode (hivemind's, or local updates) and its averagers
- ``stopping``      how that optimizer stops within a bounded time (its averagers, the step in progress)
- ``round_log``     the averaging rounds' outcomes, reasons, bytes and the last few (status, dashboard, metrics)
- ``local_updates`` local-update (DiLoCo) mode: inner AdamW, averaged pseudo-gradients, outer Nesterov
- ``averaging``     compressed all-reduce on hivemind's averagers (codec per round, sparse via shared masks)
- ``group_rounds``  averaging rounds that gather reachability, and fail whole when any part failed
- ``robust``        each part's aggregator checks the members' copies and reduces them robustly (CenteredClip, …)
- ``bans``          a peer whose copies keep being refused is left out for a cooling-off time
- ``signed_parts``  every sent part signed with a key the peer's identity certifies; unsigned parts refused
- ``accusations``   refused parts kept as evidence, listed in the DHT; others' evidence judged by this peer
- ``state_download`` a late joiner's downloaded state, checked before hivemind applies it
- ``codecs``        fp16 / int8 / int4 / int2 / random-k, what the codec takes (error feedback), the ladder
- ``policy``        the adaptive level every group member derives from the same reports
- ``param_check``   after each global step, members compare sketches of their parameters; a stray resyncs
- ``step_numbers``  gradient rounds meet on their step's key; a round whose step the swarm took is left at once
- ``keeping_up``    a peer that cannot keep up with the swarm: stuck rounds, downloads that outlast a step
- ``end_of_run``    ``--max-steps``: every peer stops on the same global step with the same parameters
- ``models``        the model registry (gpt2-tiny/-small/-medium), built from configs; loss, held-out loss
- ``tokenizer``     offline byte tokenizer; Hugging Face tokenizers from the local cache
- ``data``          datasets (embedded ``corpus/``, local files, HF streaming), held-out split, sharding
- ``checkpoint``    atomic safetensors checkpoints

Nothing here imports ``volunteer`` or ``energy``: they reach the step loop through its hooks.
"""
