"""Who aggregates in a group of peers behind NATs, and rounds that lost a part (group_rounds, nat)."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import pytest
import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException
from hivemind.averaging.group_info import GroupInfo
from hivemind.compression import Float16Compression
from hivemind.p2p import PeerID
from hivemind.utils import MSGPackSerializer

from p2ptrain.local_swarm import loopback_dhts
from p2ptrain.swarm.nat import PY_DAEMON, aggregates, cannot_average, offered_addrs
from p2ptrain.swarm.reachability import Kind
from p2ptrain.train.group_rounds import GroupRounds, RoundOutcome, with_shares
from p2ptrain.train.same_average import SameAverageRunner, check_whole
from p2ptrain.train.signed_parts import PartSigner

D, M, N, S, U = Kind.DIRECT, Kind.MAPPED, Kind.NAT, Kind.SYMMETRIC_NAT, Kind.UNKNOWN
NP = Kind.NAT.value + PY_DAEMON  # behind a port-keeping NAT, an older Python daemon (before go-libp2p's roles)


@pytest.mark.parametrize(
    ("kinds", "expected"),
    [
        ([D, N, N], [True, True, True]),  # hole punching joins the two behind NAT: everyone aggregates
        ([D, N, S], [True, False, False]),  # nobody reaches the symmetric one; it cannot reach the nat one
        ([M, S, S], [True, False, False]),
        ([U, N], [True, True]),  # the swarm's first peer, not checked yet, and a peer behind a port-keeping NAT
        ([S, S], [True, True]),  # nobody could: hivemind's own shares, the round fails or not as before
        ([D, NP, NP], [True, True, True]),  # older Python daemons hole-punch with each other
        ([D, N, NP], [True, False, False]),  # but not with anyone else's: the public one aggregates
    ],
)
def test_who_aggregates(kinds, expected):
    assert aggregates(kinds) == expected


def test_a_group_behind_two_kinds_of_nat_with_nobody_public_cannot_average():
    assert cannot_average([N, S]) and cannot_average([N, N, S]) and cannot_average([S, N, S])
    assert not cannot_average([D, N, S]) and not cannot_average([U, N, S])  # a public member aggregates
    assert not cannot_average([S, S]) and not cannot_average([N, N])  # one LAN, or hole punching: they may
    assert cannot_average([N, NP]) and not cannot_average([NP, NP]) and not cannot_average([D, N, NP])


def test_every_member_derives_the_same_shares_from_the_gathered_reports():
    serializer = MSGPackSerializer
    peers = tuple(PeerID(bytes([i]) * 34) for i in range(3))
    gathered = tuple(
        serializer.dumps([[bandwidth, kind], 0, serializer.dumps({"epoch": 7})])
        for bandwidth, kind in ((100.0, "direct"), (50.0, "nat"), (None, "symmetric-nat"))
    )
    group = GroupInfo(b"group", peers, gathered)
    shared = with_shares(group, serializer)
    entries = [serializer.loads(x) for x in shared.gathered]
    assert [e[0] for e in entries] == [100.0, 0.0, 0.0]  # hivemind's load balancing now sees plain bandwidths
    assert all(serializer.loads(e[2]) == {"epoch": 7} for e in entries)
    assert shared.peer_ids == peers and shared.group_id == b"group"
    # a member that is no p2ptrain averager (a plain bandwidth) fails the round instead of being misread
    stock = GroupInfo(b"g", peers[:2], (gathered[0], serializer.dumps([10.0, 0, serializer.dumps(None)])))
    with pytest.raises(AllreduceException, match="did not report its reachability"):
        with_shares(stock, serializer)


def runner(failed: int, left_out=()):
    return SimpleNamespace(
        tensor_part_container=SimpleNamespace(failed_size=failed, total_size=1000), left_out=list(left_out)
    )


def test_a_round_that_lost_a_part_is_no_success(caplog):
    group = GroupInfo(b"g", tuple(PeerID(bytes([i]) * 34) for i in range(3)), ())
    check_whole(runner(0), group)  # whole: nothing said
    assert not caplog.records
    with pytest.raises(AllreduceException, match="250 of 1,000 values came back from nobody"):
        check_whole(runner(250), group)
    with pytest.raises(AllreduceException, match="QmLate sent nothing in time .* fails on every member"):
        check_whole(runner(250, left_out=["QmLate"]), group)


def test_a_public_peer_offers_its_internet_addresses_first():
    maddrs = [
        "/ip4/127.0.0.1/tcp/31337/p2p/QmX",
        "/ip4/10.0.0.2/tcp/31337/p2p/QmX",
        "/ip4/11.77.0.1/tcp/31337/p2p/QmX",
        "/ip4/11.77.0.9/tcp/4001/p2p/QmR/p2p-circuit/p2p/QmX",
        "/ip4/11.77.0.1/udp/31337/quic-v1/p2p/QmX",
    ]
    assert offered_addrs(maddrs) == ["/ip4/11.77.0.1/tcp/31337/p2p/QmX", "/ip4/10.0.0.2/tcp/31337/p2p/QmX"]


class Rounds(GroupRounds, DecentralizedAverager):
    pass


def average_once(
    cls,
    vectors: list[torch.Tensor],
    kinds=None,
    timeout: float = 30,
    failing=(),
    outcomes: list | None = None,
    **options,
) -> list[torch.Tensor]:
    """One real averaging round of ``cls`` averagers (one per vector, fp16 on the wire; or a class per vector);
    each member's result. The members at the indices ``failing`` must fail the round, the others succeed (their
    rounds' results go into ``outcomes``)."""
    classes = cls if isinstance(cls, list) else [cls] * len(vectors)
    dhts = loopback_dhts(len(vectors))
    extra = [{} if kinds is None else {"reach_kind": kind} for kind in (kinds or vectors)]
    averagers = [
        kind([v.clone()], dht=dht, prefix="test", target_group_size=len(vectors), min_matchmaking_time=2.0,
            request_timeout=1.0, compression=Float16Compression(), start=True, **more, **options)
        for kind, v, dht, more in zip(classes, vectors, dhts, extra, strict=True)
    ]  # fmt: skip
    try:
        controls = [a.step(wait=False, timeout=timeout) for a in averagers]
        for i, control in enumerate(controls):
            if i in failing:
                with pytest.raises(AllreduceException):
                    control.result(timeout=60)
            else:
                assert len(control.result(timeout=60)) == len(vectors)
                (outcomes if outcomes is not None else []).append(control.result())
        results = []
        for averager in averagers:
            with averager.get_tensors() as (tensor,):
                results.append(tensor.clone())
        return results
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht in dhts:
            dht.shutdown()


def test_every_member_ends_with_the_same_average():
    """Small-batch gradients: each member's values are far larger than their mean. hivemind's members end off the
    mean by the fp16 rounding of their own values; p2ptrain's all hold the same fp16 average. Three members, one
    behind a symmetric NAT (it aggregates nothing)."""
    torch.manual_seed(0)
    mean = 1e-3 * torch.randn(20_000)
    noise = torch.randn(3, 20_000)
    vectors = [mean + noise[i] - noise.mean(0) for i in range(3)]  # the members' mean is exactly `mean`
    stock = average_once(DecentralizedAverager, vectors)
    ours = average_once(Rounds, vectors, kinds=[D, N, S])
    spread = lambda results: max(float((r - results[0]).abs().max()) for r in results)  # noqa: E731
    assert spread(stock) > 1e-4  # a tenth of the mean's size: members disagree
    assert spread(ours) == 0.0  # one average, bit for bit
    # the average itself is the mean of what crossed the wire: the inputs' fp16 rounding (2^-11 of |values| ≤ 5)
    assert float((ours[0] - mean).abs().max()) < 5 * 2**-11


class DropsItsSecondPart(SameAverageRunner):
    """A member whose part stream to each aggregator ends after its first part (as when a relay closes it)."""

    async def generate_input_for_peer(self, peer_index: int):
        async for message in super().generate_input_for_peer(peer_index):
            yield message
            return


FlakyRounds = type("Rounds", (Rounds,), {"runner_type": DropsItsSecondPart})  # hivemind names handlers by class


def test_a_part_that_lost_a_member_fails_the_round_on_every_member(tmp_path):
    """hivemind's aggregators average the parts after the drop without the flaky member and answer everybody: the
    two others would succeed with one average, the flaky one fail and end the step with other values. Here every
    member fails the round (hivemind retries it, which fails again, until its timeout), and the aggregators say
    whose parts they lost."""
    log = logging.FileHandler(tmp_path / "averagers.log")  # the averagers log in processes forked with it
    logging.getLogger("hivemind.averaging.averager").addHandler(log)
    try:
        vectors = [torch.randn(2_000_000) for _ in range(3)]  # 8 parts of 512 KiB in fp16: 2-3 per aggregator
        flaky = [Rounds, Rounds, FlakyRounds]
        results = average_once(flaky, vectors, timeout=8, failing=(0, 1, 2), min_group_size=3, allreduce_timeout=5)
    finally:
        logging.getLogger("hivemind.averaging.averager").removeHandler(log)
    said = (tmp_path / "averagers.log").read_text()
    assert "sent nothing in time for the parts this peer aggregates: the round with 3 peers fails" in said, said[-3000:]
    # the parts averaged before the drop are the same on every member; none took a part without the flaky one
    first = slice(0, 1000)
    assert all(torch.equal(r[first], results[0][first]) for r in results)


class StripsItsStamps(SameAverageRunner):
    """A member that sends its parts unsigned (``signed_parts``): the aggregators refuse it."""

    async def generate_input_for_peer(self, peer_index: int):
        async for message in super().generate_input_for_peer(peer_index):
            message.peer_id = b""
            yield message


def test_a_refused_sender_fails_its_own_round_only(tmp_path):
    """A sender the aggregators refuse on purpose (here: unsigned parts) is left out without failing the round: the
    two signed members end it with one average of their own values, the unsigned one fails. Were a refusal a lost
    part, one peer sending garbage would stop every round of its group."""
    from test_progress import identified_dhts

    nodes = identified_dhts(tmp_path, 3)
    unsigned = type("Rounds", (Rounds,), {"runner_type": StripsItsStamps})  # hivemind names handlers by class
    vectors = [torch.full((2_000_000,), float(i)) for i in range(3)]
    averagers = [
        kind([v.clone()], dht=dht, signer=PartSigner(key), prefix="test", target_group_size=3, min_group_size=3,
             min_matchmaking_time=2.0, request_timeout=1.0, allreduce_timeout=5, compression=Float16Compression(),
             reach_kind=reach, start=True)
        for kind, v, (dht, key), reach in zip([Rounds, Rounds, unsigned], vectors, nodes, [D, D, S], strict=True)
    ]  # fmt: skip
    try:
        controls = [a.step(wait=False, timeout=8) for a in averagers]
        for control in controls[:2]:
            assert len(control.result(timeout=60)) == 3
        with pytest.raises(AllreduceException):
            controls[2].result(timeout=60)
        for averager in averagers[:2]:
            with averager.get_tensors() as (tensor,):
                assert torch.all(tensor == 0.5)  # the signed members' mean; the unsigned one's 2.0 left out
    finally:
        for averager in averagers:
            averager.shutdown()
        for dht, _ in nodes:
            dht.shutdown()


def test_hivemind_averagers_measure_the_uplink_their_shares_follow():
    """hivemind's own averagers (the gradient mode's fp16 and none, PowerSGD) report what their part streams
    achieved and how long the round took, as p2ptrain's compressed ones do: the next round's shares follow the
    measured uplink (``shares.take_measurements``) and the per-link rates reach the near record."""
    outcomes = []
    average_once(Rounds, [torch.randn(5_000_000) for _ in range(2)], outcomes=outcomes)  # 5 MB in fp16 each way
    for outcome, other in zip(outcomes, reversed(outcomes), strict=True):
        assert isinstance(outcome, RoundOutcome) and outcome.round_s > 0  # PowerSGD's, too, were not timed
        assert outcome.uplink is not None and outcome.uplink > 1e6, outcome.uplink  # bytes/s, on loopback
        (peer,) = outcome.links  # the other member's aggregator, by its peer id
        assert peer in {p.to_base58() for p in other} and outcome.links[peer] > 8


def test_two_peers_behind_different_kinds_of_nat_do_not_wait_out_a_round_they_cannot_average(tmp_path):
    """On the internet neither could open a direct connection to the other; here, on loopback, they could (and did,
    before): every member fails such a group as soon as it forms, says why, and looks for another."""
    log = logging.FileHandler(tmp_path / "averagers.log")  # the averagers log in processes forked with it
    logging.getLogger("hivemind.averaging.averager").addHandler(log)
    try:
        with pytest.raises(AllreduceException, match="could not find a group"):
            average_once(Rounds, [torch.zeros(1000), torch.ones(1000)], kinds=[N, S], timeout=8)
    finally:
        logging.getLogger("hivemind.averaging.averager").removeHandler(log)
    said = (tmp_path / "averagers.log").read_text()
    assert "no member of this group of 2 can be reached directly by all the others" in said, said[-2000:]


def test_an_averager_stopped_during_a_round_ends_the_round():
    """hivemind 1.1's shutdown calls ``finalize`` on the future of a group still running, not on its runner
    (AttributeError in the averager's thread, seen at every SIGTERM during a round); ``AveragerHooks._shutdown``
    finalizes the runner and cancels a group whose runner is not made yet."""

    class Runner:
        cancelled = False

        def finalize(self, cancel: bool = False):
            self.cancelled = cancel

    async def stop(shutdown) -> tuple[Runner, asyncio.Future]:
        running, forming = asyncio.get_running_loop().create_future(), asyncio.get_running_loop().create_future()
        runner = Runner()
        running.set_result(runner)
        averager = SimpleNamespace(client_mode=True, _running_groups={b"a": running, b"b": forming})
        await shutdown(averager, timeout=1.0)
        return runner, forming

    with pytest.raises(AttributeError, match="finalize"):  # hivemind's own: when it passes, delete ours
        asyncio.run(stop(DecentralizedAverager._shutdown))
    runner, forming = asyncio.run(stop(Rounds._shutdown))
    assert runner.cancelled and forming.cancelled()
