"""Signed parts and accusations (train/signed_parts.py, train/accusations.py): what a part's signature binds, what
evidence convinces a peer and what does not, and a real swarm of averagers in which a peer that never met the liar
bans it on the evidence of those that did."""

from __future__ import annotations

import asyncio
import logging
import pickle
import time

import msgpack
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import rsa
from hivemind.compression import serialize_torch_tensor
from hivemind.p2p import PeerID
from hivemind.proto import averaging_pb2, runtime_pb2

from p2ptrain.swarm.identity import peer_id_of, public_key_der
from p2ptrain.train.accusations import EVIDENCE_BOUND, Docket, Evidence, judge, listed, rms
from p2ptrain.train.bans import Bans
from p2ptrain.train.signed_parts import PartSigner, Receipts, Unverified, part_digest, read_cert, read_stamp

PREFIX, GROUP = "run_grad_averager_p2pt4", b"g" * 32


@pytest.fixture(scope="module")
def keys() -> list[rsa.RSAPrivateKey]:
    return [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(3)]


def peer_of(key: rsa.RSAPrivateKey) -> str:
    return peer_id_of(public_key_der(key))


def signed(signer: PartSigner, values: torch.Tensor, aggregator: bytes, index: int = 0, group: bytes = GROUP):
    """A part as a member sends it: (the serialized part, its stamp)."""
    part = serialize_torch_tensor(values, runtime_pb2.CompressionType.FLOAT16)
    return part, signer.stamp(part_digest(PREFIX, group, aggregator, index, part), with_cert=index == 0)


def evidence_of(signer, values, aggregator: bytes, index: int = 0) -> Evidence:
    part, stamp = signed(signer, values, aggregator, index)
    cert, signature = read_stamp(stamp)
    return Evidence(PREFIX, GROUP, aggregator, index, part, cert, signature)


def test_a_signature_binds_the_part_its_round_and_its_aggregator(keys):
    signer, accuser = PartSigner(keys[0]), PeerID.from_base58(peer_of(keys[1])).to_bytes()
    values = torch.randn(100)
    evidence = evidence_of(signer, values, accuser)
    assert evidence.sender() == peer_of(keys[0])
    assert Evidence.decode(evidence.encode()).sender() == peer_of(keys[0])
    tampered = runtime_pb2.Tensor()
    tampered.CopyFrom(evidence.part)
    tampered.buffer = bytes(len(tampered.buffer))
    elsewhere = [
        Evidence(PREFIX, GROUP, accuser, 0, tampered, evidence.cert, evidence.signature),  # other values
        Evidence(PREFIX, b"h" * 32, accuser, 0, evidence.part, evidence.cert, evidence.signature),  # other round
        Evidence(PREFIX, GROUP, b"x" + accuser[1:], 0, evidence.part, evidence.cert, evidence.signature),  # sent to
        Evidence(PREFIX, GROUP, accuser, 1, evidence.part, evidence.cert, evidence.signature),  # another part
        Evidence("other_p2pt4", GROUP, accuser, 0, evidence.part, evidence.cert, evidence.signature),  # averager
    ]
    for forged in elsewhere:
        with pytest.raises(Unverified, match="signature does not verify"):
            forged.sender()
    # a part key certified by somebody else's identity: the certificate's signature is the other key's
    other = PartSigner(keys[2])
    fields = msgpack.unpackb(other.cert)
    fields["k"] = public_key_der(keys[0])
    with pytest.raises(Unverified, match="certificate's signature"):
        read_cert(msgpack.packb(fields))
    assert pickle.loads(pickle.dumps(signer)).cert == signer.cert  # it travels to the averager processes


def test_evidence_convinces_only_when_damning_by_the_judges_own_measure(keys):
    signer, accuser = PartSigner(keys[0]), PeerID.from_base58(peer_of(keys[1])).to_bytes()
    own = torch.randn(1000)  # the judge's own contribution; honest parts look like it
    honest = evidence_of(signer, torch.randn(1000), accuser)
    nan = evidence_of(signer, torch.full((1000,), float("nan")), accuser)
    huge = evidence_of(signer, torch.randn(1000) * 1000, accuser)
    shifted = evidence_of(signer, torch.randn(1000) * 0.5 + 4.0, accuser)  # a lie within the bound
    accused = peer_of(keys[0])
    assert judge(nan, PREFIX, accuser, rms([own])) == (accused, "it sent values that are not finite (NaN/inf)")
    assert judge(nan, PREFIX, accuser, None)[1]  # no reference needed
    who, why = judge(huge, PREFIX, accuser, rms([own]))
    assert who == accused and "× larger (RMS) than this peer's own values" in why
    assert float(why.split("a part ")[1].split("×")[0]) > EVIDENCE_BOUND
    assert judge(huge, PREFIX, accuser, None) == (accused, "")  # nothing of its own to measure against yet
    # an accuser holding an honest member's genuine part cannot frame it; nor one within the bound
    assert judge(honest, PREFIX, accuser, rms([own])) == (accused, "")
    assert judge(shifted, PREFIX, accuser, rms([own])) == (accused, "")
    # evidence about another averager, or served by a peer it was not sent to
    with pytest.raises(Unverified, match="another averager or peer"):
        judge(nan, "other_p2pt4", accuser, None)
    with pytest.raises(Unverified, match="another averager or peer"):
        judge(nan, PREFIX, PeerID.from_base58(peer_of(keys[2])).to_bytes(), None)


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", msgpack.packb([1, 2, 3]), msgpack.packb(["p", b"g", b"a", -1, [b"", [], "float32", 0], b"", b""]),
     msgpack.packb(["p", b"g", b"a", 0, [b"", [2**40], "float32", 0], b"", b""]), b"\x00" * (3 * 2**20)],
)  # fmt: skip
def test_malformed_evidence_is_unverified(data):
    with pytest.raises(Unverified):
        Evidence.decode(data).sender()


def test_receipts_keep_signed_parts_and_refuse_unsigned_ones(keys, caplog):
    signer, sender = PartSigner(keys[0]), PeerID.from_base58(peer_of(keys[0]))
    aggregator = PeerID.from_base58(peer_of(keys[1])).to_bytes()

    def messages(stamps: bool = True, signer: PartSigner = signer):
        for index in range(3):
            part, stamp = signed(signer, torch.full((10,), float(index)), aggregator, index)
            yield averaging_pb2.AveragingData(tensor_part=part, weight=1.0, peer_id=stamp if stamps else b"")

    async def receive(stream, bans=None) -> tuple[Receipts, int]:
        receipts = Receipts(PREFIX, GROUP, aggregator, [sender], bans)

        async def aiter():
            for message in stream:
                yield message

        return receipts, len([m async for m in receipts.checked(aiter(), 0)])

    receipts, count = asyncio.run(receive(messages()))
    assert count == 3
    index, part, cert, signature = receipts.kept(0, 2)
    assert Evidence(PREFIX, GROUP, aggregator, index, part, cert, signature).sender() == str(sender)
    bans = Bans(strikes=1)
    another = PartSigner(keys[2])
    for unsigned, why in ((messages(stamps=False), "does not decode"), (messages(signer=another), "certified for")):
        with caplog.at_level(logging.WARNING), pytest.raises(Unverified, match=why):
            asyncio.run(receive(unsigned, bans))
    assert "is certified for peer" in caplog.text and "Refused the parts of peer" in caplog.text
    assert bans.banned(sender)  # an unsigned part counts as a refused round


def test_a_docket_keeps_the_last_pieces_and_lists_them():
    docket = Docket(keep=2)
    ids = [docket.add(f"peer{i}", bytes([i]) * 10) for i in range(3)]
    assert docket.get(ids[0]) is None and docket.get(ids[2]) == bytes([2]) * 10
    assert listed(docket.listing()) == [("peer1", ids[1]), ("peer2", ids[2])]
    assert listed([["x", b"short"], "junk", [1, ids[0]]]) == [] and listed(None) == []


@pytest.mark.slow(alone=False)  # in-process averagers on a small vector, no training
def test_a_peer_that_never_met_the_liar_bans_it_on_the_evidence_of_those_that_did(tmp_path):
    """Real averagers with their peers' identities: three honest members and a liar (behind a symmetric NAT, so it
    aggregates nothing) that sends NaN. The honest aggregators refuse its parts and list the evidence; a fifth peer
    that was never in a round with the liar then averages with one honest member, reads the accusations, checks the
    evidence itself, and bans the liar, while it believes nothing against the honest members."""
    from test_group_rounds import Rounds
    from test_progress import identified_dhts

    log = logging.FileHandler(tmp_path / "averagers.log")  # the averagers log in processes forked with it
    log.setFormatter(logging.Formatter("%(process)d %(name)s %(message)s"))
    for name in ("p2ptrain.train.accusations", "p2ptrain.train.bans"):
        logging.getLogger(name).addHandler(log)
        logging.getLogger(name).setLevel(logging.INFO)
    nodes = identified_dhts(tmp_path, 5)
    common = dict(prefix="acc", min_matchmaking_time=1.0, request_timeout=0.5, allreduce_timeout=10.0,
                  next_chunk_timeout=3.0, read_accusations_every_s=0.5, start=True)  # fmt: skip
    averagers = [
        Rounds([torch.zeros(1000)], dht=dht, signer=PartSigner(key), target_group_size=4 if i < 4 else 2,
               reach_kind="symmetric-nat" if i == 3 else "direct", bans=Bans(strikes=2, cooling_off_s=600), **common)
        for i, (dht, key) in enumerate(nodes)
    ]  # fmt: skip
    liar, judge_pid = str(nodes[3][0].peer_id), averagers[4].pid  # an averager is a process of its own

    def judged() -> list[str]:
        """The fifth peer's log lines."""
        said = (tmp_path / "averagers.log").read_text()
        return [line for line in said.splitlines() if line.startswith(f"{judge_pid} ")]

    try:
        refused_rounds = 0
        for round_ in range(4):  # the liar is refused in rounds with the honest three, until they ban it
            for i, averager in enumerate(averagers[:4]):
                with averager.get_tensors() as (tensor,):
                    tensor.copy_(torch.full((1000,), float("nan")) if i == 3 else torch.randn(1000))
            controls = [a.step(wait=False, timeout=15) for a in averagers[:4]]
            for control in controls:
                try:
                    control.result(timeout=30)
                except Exception:  # noqa: BLE001 - a failed round
                    pass
            said = (tmp_path / "averagers.log").read_text()
            refused_rounds = said.count(f"Banned peer {liar}")
            if refused_rounds >= 1 and round_ >= 1:
                break
        assert f"Banned peer {liar}" in said, said[-3000:]
        # the fifth peer averages with an honest member (never with the liar) until it has judged the evidence
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(f"Banned peer {liar}" in line for line in judged()):
            for averager in (averagers[0], averagers[4]):
                with averager.get_tensors() as (tensor,):
                    tensor.copy_(torch.randn(1000))
            controls = [a.step(wait=False, timeout=10) for a in (averagers[0], averagers[4])]
            for control in controls:
                try:
                    control.result(timeout=20)
                except Exception:  # noqa: BLE001
                    pass
        said, lines = (tmp_path / "averagers.log").read_text(), judged()
        shown = [line for line in lines if f"showed evidence against peer {liar}" in line]
        assert len(shown) >= 2 and any(f"Banned peer {liar}" in line for line in lines), said[-3000:]
        assert "not finite" in shown[0]
        assert not any("Did not believe" in line or "does not convince" in line for line in lines), lines
        assert not any(f"against peer {p}" in said for p in (str(n[0].peer_id) for n in nodes[:3]))
    finally:
        for name in ("p2ptrain.train.accusations", "p2ptrain.train.bans"):
            logging.getLogger(name).removeHandler(log)
        for averager in averagers:
            averager.shutdown()
        for dht, _ in nodes:
            dht.shutdown()
