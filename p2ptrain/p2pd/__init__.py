"""A libp2p daemon on py-libp2p that speaks the control protocol of hivemind's bundled Go ``p2pd``.

It runs as its own process (py-libp2p runs on trio, hivemind on asyncio, and the two clash on protobuf
symbols in one process). ``p2ptrain-p2pd`` (``daemon.main``) is the command; protocols/p2pd.md the rules.
Nothing here imports hivemind or torch.
"""
