"""`p2ptrain seed --private` as a researcher runs it: invited peers train together, others are turned away, and
`p2ptrain invite` makes and revokes invites (real peers on 127.0.0.1)."""

from __future__ import annotations

import re

import pytest

from p2ptrain.cli.app import main
from p2ptrain.local_swarm import DEMO_PEER_FLAGS, DEMO_SWARM_FLAGS, LocalSwarm
from p2ptrain.swarm.admission import read_revocations
from p2ptrain.swarm.invite import decode_invite
from p2ptrain.swarm.joining import revocations_path

pytestmark = pytest.mark.slow
# enough steps that the seeder still trains when the invited peer's first progress record appears (a peer publishes
# one only once it has trained on a batch, after it downloaded the state): with 4, the seeder sometimes finished alone
STEPS = 10


def test_invited_peers_train_and_a_peer_without_an_invite_is_turned_away(tmp_path, capsys):
    peer_flags = (*DEMO_PEER_FLAGS, "--max-steps", str(STEPS))
    with LocalSwarm(tmp_path, swarm_flags=DEMO_SWARM_FLAGS, peer_flags=peer_flags) as swarm:
        private = ("--private", "--invite-days", "1", "--run-id", "private-demo")
        a = swarm.seed("a", *private, "--wait-for-peers", "2", "--debug")
        invite = swarm.invite(a)
        token = decode_invite(invite).token
        assert token is not None and token.grants[-1].run == "private-demo"
        b = swarm.join("b", "--invite", invite, "--wait-for-peers", "2")
        # a volunteer who found the swarm's peers but holds no invite: it finds the swarm, and is told why it cannot
        c = swarm.join("c", "--initial-peers", *decode_invite(invite).peers[:1])
        c.proc.wait(120)
        assert c.proc.returncode == 2, c.log()[-3000:]
        assert "swarm private-demo is private: only peers invited by its seeder may join" in c.log()
        for peer in (a, b):
            peer.proc.wait(300)
            assert peer.proc.returncode == 0, peer.log()[-3000:]
            assert peer.status()["epoch"] == STEPS
        assert "This swarm is private: the invite holds join token" in a.log()
        assert "Refused peer" not in a.log() + b.log()
        # they trained together: averaged a gradient round (a logs it at DEBUG), or one took the other's state, the
        # only one it could take (served to an admitted peer, taken from one); which happens in a few short steps
        # depends on timing
        took = re.search(r"Caught up: now at global step|Resynchronised with the swarm", a.log() + b.log())
        together = "Averaged gradients with 2 peers" in a.log() or took is not None
        assert together and "2 peer(s) in the swarm" in a.log(), b.log()[-3000:]

    # more invites, and a revocation, from the seeder's data directory
    capsys.readouterr()
    assert main(["invite", "--days", "2", "--data-dir", str(a.data_dir)]) == 0
    printed = capsys.readouterr().out
    second = decode_invite(printed.split("--invite ")[1].split()[0]).token
    assert second.grants[-1].id != token.grants[-1].id and "keep it secret" in printed
    assert main(["invite", "--revoke", token.grants[-1].id.hex(), "--data-dir", str(a.data_dir)]) == 0
    record = revocations_path(a.data_dir, "private-demo").read_bytes()
    run, ids, _ = read_revocations(record, _author(a.data_dir))
    assert (run, ids) == ("private-demo", [token.grants[-1].id])
    # an invited volunteer cannot revoke, nor delegate
    assert main(["invite", "--revoke", token.grants[-1].id.hex(), "--data-dir", str(b.data_dir)]) == 2
    assert main(["invite", "--delegate", "--data-dir", str(b.data_dir)]) == 2


def _author(data_dir) -> bytes:
    from p2ptrain.swarm.identity import author_key
    from p2ptrain.swarm.manifest import public_key_bytes

    return public_key_bytes(author_key(data_dir))
