"""Every decoder of data that comes from other peers, fed random input: it returns a value or raises its documented
error, never anything else, and never hangs (hypothesis, a bounded number of examples each).

Random bytes are refused at the first check; the structured strategies (random msgpack maps, with valid checksums
where there is one) reach the checks behind it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import socket
from types import SimpleNamespace

import msgpack
import numpy as np
import pytest
import torch
from hivemind.averaging.allreduce import AllreduceException
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils import MSGPackSerializer
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from p2ptrain.energy.records import verify_record
from p2ptrain.errors import InviteInvalid, LedgerInvalid, ManifestInvalid
from p2ptrain.swarm import manifest as mf
from p2ptrain.swarm.admission import Admission, NotAdmitted
from p2ptrain.swarm.invite import PREFIX, Invite, decode_invite
from p2ptrain.swarm.proximity import decode_near
from p2ptrain.swarm.reachability import Message
from p2ptrain.train import end_of_run
from p2ptrain.train.accusations import Evidence, Packed, judge, listed
from p2ptrain.train.codecs import UniformQuantization
from p2ptrain.train.param_check import read_sketches
from p2ptrain.train.policy import RoundReport
from p2ptrain.train.robust import AGGREGATIONS, check_contributions, reduce_parts
from p2ptrain.train.signed_parts import Unverified, part_digest, read_cert, read_stamp
from p2ptrain.train.state_download import check_downloaded_state, check_state, decode_download
from p2ptrain.volunteer.control_socket import COMMANDS, MAX_MESSAGE, ControlServer

BOUNDED = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=40)
    | st.binary(max_size=80)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)


def packed(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


@BOUNDED
@given(st.text(max_size=300) | st.builds(lambda v: PREFIX + base64.urlsafe_b64encode(packed(v)).decode(), values))
def test_invites_decode_or_are_refused(text):
    try:
        assert isinstance(decode_invite(text), Invite)
    except InviteInvalid:
        pass


@BOUNDED
@given(values)
def test_invites_with_a_valid_checksum_around_any_payload_decode_or_are_refused(payload):
    body = packed(payload)
    text = PREFIX + base64.urlsafe_b64encode(body + hashlib.sha256(body).digest()[:4]).decode().rstrip("=")
    try:
        decode_invite(text)
    except InviteInvalid:
        pass


@BOUNDED
@given(
    st.binary(max_size=400)
    | st.builds(packed, values)
    | st.builds(lambda m, s: packed({"manifest": packed(m), "signature": s}), values, st.binary(max_size=70))
)
def test_manifest_envelopes_verify_or_are_refused(envelope):
    with pytest.raises(ManifestInvalid):
        mf.verify(envelope)  # no random envelope carries a valid Ed25519 signature of its body


@BOUNDED
@given(
    st.binary(max_size=400)
    | values
    | st.builds(
        lambda p, k, s: packed({"payload": packed(p), "public_key": k, "signature": s}),
        values,
        st.binary(max_size=300),
        st.binary(max_size=300),
    ),
    values,
)
def test_ledger_records_verify_or_are_refused(value, subkey):
    with pytest.raises(LedgerInvalid):
        verify_record(value, subkey, "run")


@BOUNDED
@given(values)
def test_round_reports_parse_or_are_ignored(raw):
    report = RoundReport.from_wire(raw)
    assert report is None or isinstance(report, RoundReport)


@BOUNDED
@given(
    st.dictionaries(
        st.text(max_size=60) | st.integers() | st.binary(max_size=40),
        values | st.binary(min_size=1032, max_size=1032),
        max_size=8,
    )
    | values
)
def test_parameter_sketches_from_the_dht_are_read_or_skipped(records):
    found = (
        SimpleNamespace(value={k: SimpleNamespace(value=v) for k, v in records.items()})
        if isinstance(records, dict)
        else SimpleNamespace(value=records)
    )
    sketches = read_sketches(found, "me", epoch=0)
    assert all(s.dtype == np.float32 and s.shape == (256,) and np.isfinite(s).all() for s in sketches.values())


@BOUNDED
@given(st.dictionaries(st.text(max_size=60) | st.integers(), values, max_size=8), st.integers(-5, 100))
def test_end_of_run_records_are_read_or_skipped(raw, epoch):
    records = {k: SimpleNamespace(value=v) for k, v in raw.items()}
    finals = end_of_run._finals(records, epoch)
    assert all(len(final.digest) == 64 for final in finals)
    assert end_of_run._downloading(records, "me") >= 0
    end_of_run._announced_final(records, "me", epoch)


@BOUNDED
@given(st.binary(max_size=300) | st.builds(packed, values))
def test_reachability_messages_parse_or_raise_value_error(data):
    try:
        assert isinstance(Message.FromString(data), dict)
    except ValueError:
        pass


@BOUNDED
@given(
    st.binary(max_size=2000),
    st.sampled_from([b"", *(n.to_bytes(8, "little") for n in (4, 16, 256, 3, 2**63))]),  # codebook sizes
    st.lists(st.integers(0, 3000), max_size=4),  # the wire's sizes are uint32
    st.sampled_from(["float32", "float16", "int64", "bool", ""]),
)
def test_quantized_tensors_decode_or_raise_value_error(buffer, codebook_size, shape, dtype):
    buffer = codebook_size + buffer
    tensor = runtime_pb2.Tensor(buffer=buffer, size=shape, dtype=dtype, compression=runtime_pb2.UNIFORM_8BIT)
    try:
        decoded = UniformQuantization(8).extract(tensor)
    except ValueError:
        return
    assert list(decoded.shape) == shape


floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
part_shapes = st.sampled_from([(6,), (5,), (2, 3), (6, 1), ()])
parts = st.builds(
    lambda shape, dtype, fill: (
        torch.tensor((fill * 6)[: int(np.prod(shape))], dtype=torch.float64).reshape(shape).to(dtype)
    ),
    part_shapes,
    st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool]),
    st.lists(floats.filter(lambda x: x == x) | st.just(float("nan")), min_size=1, max_size=6),
)


@BOUNDED
@given(
    st.lists(st.tuples(parts, floats | st.integers(-3, 10**9)), min_size=1, max_size=6), st.sampled_from(AGGREGATIONS)
)
def test_averaging_contributions_are_reduced_or_refused(contributions, rule):
    """What members send for a part (after hivemind decoded it): any shape, dtype, values and claimed weight."""
    tensors, weights = [c[0] for c in contributions], [float(c[1]) for c in contributions]
    kept, refused = check_contributions(tensors, weights, torch.Size([6]))
    assert sorted(kept + [r.sender for r in refused]) == list(range(len(tensors)))
    try:
        result = reduce_parts([tensors[i] for i in kept], [weights[i] for i in kept], rule)
    except AllreduceException:
        assert not kept
        return
    assert result.shape == (6,) and torch.isfinite(result).all()


@BOUNDED
@given(values, st.lists(st.none() | parts | st.builds(torch.zeros, st.integers(0, 7)), max_size=4))
def test_state_downloads_are_checked_or_refused(metadata, tensors):
    ours = [torch.zeros(6), torch.zeros(2, 3)]
    try:
        assert check_state(metadata, tensors, ours) >= 0
    except ValueError:
        pass


@pytest.fixture(scope="module")
def control_server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("control")
    server = ControlServer(data_dir, lambda request: {"ok": True, "command": request["command"]})
    yield server
    server.close()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    st.binary(max_size=400)
    | st.builds(lambda v: json.dumps(v, default=repr).encode(), values)
    | st.builds(
        lambda c, r: json.dumps({"command": c, "reason": r}, default=repr).encode(), st.sampled_from(COMMANDS), values
    )
    | st.just(b"x" * (MAX_MESSAGE + 10))
)
def test_control_requests_get_a_reply_and_the_server_goes_on(control_server, line):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(control_server.path))
        sock.sendall(line.replace(b"\n", b" ") + b"\n")
        reply = json.loads(sock.makefile("rb").readline())
    assert isinstance(reply, dict) and isinstance(reply["ok"], bool)
    assert reply["ok"] or isinstance(reply["error"], str)


@BOUNDED
@given(values, st.lists(st.none() | parts | st.builds(torch.zeros, st.integers(0, 7)), max_size=4))
def test_gradient_mode_state_downloads_are_checked_or_refused(metadata, tensors):
    try:
        check_downloaded_state(metadata, tensors, [torch.zeros(6)])
    except ValueError:
        pass


grants = st.fixed_dictionaries(
    {"run": st.text(max_size=12), "key": st.binary(min_size=32, max_size=32), "id": st.binary(min_size=8, max_size=8),
     "expires": st.integers(-(2**40), 2**40), "invite": st.booleans()}
).map(packed) | st.builds(packed, values)  # fmt: skip
links = st.lists(st.tuples(grants, st.binary(min_size=64, max_size=64)).map(list) | values, max_size=3)
ADMISSION = Admission("fuzz-run", bytes(32), b"")


@BOUNDED
@given(st.builds(packed, st.tuples(links, st.binary(min_size=64, max_size=64)).map(list)) | st.builds(packed, values))
def test_passes_are_admitted_or_refused(shown):
    try:
        ADMISSION.check(b"\x00\x24" + bytes(36), shown)
    except NotAdmitted:
        pass


@BOUNDED
@given(st.builds(packed, st.fixed_dictionaries({"payload": st.builds(packed, values), "signature": values})) | values)
def test_revocation_records_are_adopted_or_ignored(record):
    assert ADMISSION.take_revocations(record) in (True, False)


@BOUNDED
@given(st.fixed_dictionaries({"c": links, "s": st.binary(min_size=32, max_size=32)}) | values)
def test_join_tokens_in_invites_decode_or_are_refused(token):
    body = packed({"h": bytes(32), "m": "gpt2-tiny", "p": ["/ip4/203.0.113.1/tcp/1/p2p/QmX"], "a": token})
    text = PREFIX + base64.urlsafe_b64encode(body + hashlib.sha256(body).digest()[:4]).decode().rstrip("=")
    try:
        decode_invite(text)
    except InviteInvalid:
        pass


tensor_parts = st.builds(
    runtime_pb2.Tensor,
    buffer=st.binary(max_size=64),
    size=st.lists(st.integers(0, 8), max_size=3),
    dtype=st.sampled_from(["", "float32", "float16", "int64", "bool", "complex", "x"]),
    compression=st.sampled_from(list(runtime_pb2.CompressionType.values())),
    chunks=st.integers(0, 3),
)


download_messages = st.builds(
    averaging_pb2.DownloadData, tensor_part=tensor_parts, metadata=st.builds(packed, values) | st.binary(max_size=20)
)


@BOUNDED
@given(st.lists(download_messages, max_size=5), st.integers(1, 3))
def test_served_states_decode_or_are_refused(messages, count):
    try:
        metadata, tensors = decode_download(messages, MSGPackSerializer, count)
        assert isinstance(metadata, dict) and len(tensors) == count
    except ValueError:
        pass


@BOUNDED
@given(
    st.fixed_dictionaries(
        {
            "c": st.tuples(st.floats(-2e5, 2e5), st.floats(), st.floats(-1, 2e5), st.floats(-0.5, 1.5)).map(list)
            | st.lists(scalars, max_size=5),
            "n": st.lists(
                st.tuples(st.text(max_size=70), st.floats(-10, 7e4), st.none() | st.floats(-1, 2e6)).map(list)
                | st.lists(scalars, max_size=4),
                max_size=9,
            ),
        }
    )
    | values
)
def test_near_records_decode_or_raise_value_error(value):
    try:
        near = decode_near(value)
    except ValueError:
        event("refused")
        return
    event("decoded")
    assert all(math.isfinite(v) for v in (near.coord.x, near.coord.y, near.coord.height, near.coord.error))
    assert len(near.neighbours) <= 8


@BOUNDED
@given(st.binary(max_size=400) | st.builds(packed, values | st.lists(values, min_size=7, max_size=7)))
def test_evidence_and_stamps_decode_or_are_unverified(data):
    for decode in (lambda d: Evidence.decode(d).sender(), read_stamp, read_cert, listed):
        try:
            decode(data)
        except Unverified:
            event("unverified")
    try:
        assert isinstance(Packed.FromString(data), dict)
    except ValueError:
        pass


@pytest.fixture(scope="module")
def part_signer():
    from cryptography.hazmat.primitives.asymmetric import rsa

    from p2ptrain.train.signed_parts import PartSigner

    return PartSigner(rsa.generate_private_key(public_exponent=65537, key_size=2048))


@BOUNDED
@given(
    st.binary(max_size=2000),
    st.lists(st.integers(0, 3000), max_size=4),
    st.sampled_from(["float32", "float16", "int8", "uint8", "int64", "bool", "complex64", "junk", ""]),
    st.integers(0, 12),
)
def test_signed_parts_of_any_bytes_are_judged_or_unverified(part_signer, buffer, size, dtype, compression):
    """An accused peer's own part, validly signed, can hold any bytes: judging it decodes them (hivemind's decoders
    and p2ptrain's codecs) and must end in a verdict or ``Unverified``."""
    part = runtime_pb2.Tensor(buffer=buffer, size=size, dtype=dtype, compression=compression)
    accuser = b"\x00\x24" + bytes(36)
    cert, signature = read_stamp(part_signer.stamp(part_digest("p", b"g", accuser, 0, part), with_cert=True))
    evidence = Evidence.decode(Evidence("p", b"g", accuser, 0, part, cert, signature).encode())
    try:
        accused, why = judge(evidence, "p", accuser, 1.0)
        event("guilty" if why else "not convinced")
    except Unverified:
        event("unverified")
